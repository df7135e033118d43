"""Native OpenMM kernel for the CG network (fast path beside TorchForce).

A C++ OpenMM plugin (sources in ``native/src``) defines ``CGNetForce`` with kernels for the
Reference and CPU platforms: the package's :class:`~openmm_flowmatch.forcefield.CGNet` evaluated
in double precision from its weights, forces by hand-written backpropagation. The TorchScript
artifact stays the source of truth: :func:`native_network_force` reads the weights from it and
checks the native energies and forces against it before returning the force. See docs/native.md.

API
---
``build_library(force=False) -> Path``
    Compile the plugin (first use; cached per user, OpenMM version, compiler and CPU).
``load_native_plugin() -> Path``
    Build if needed and load it into OpenMM (``Platform.loadPluginLibrary``); idempotent. Needed
    before ``XmlSerializer.deserialize`` of a System holding a ``CGNetForce``.
``native_network_force(force_field, replicas) -> openmm.Force``
    The artifact's network as a checked native force for ``replicas`` copies.
``native_available() -> bool``
    Whether a C++ compiler and the OpenMM headers are present.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Optional

from .build import NativeBuildError, build_library, find_compiler, library_path, openmm_paths
from .force import (
    CHECK_TOLERANCE,
    NativeMismatchError,
    SUPPORTED_ACTIVATIONS,
    UnsupportedNetworkError,
    check_native_force,
    force_xml,
    native_network_force,
    network_parameters,
)

__all__ = [
    "CHECK_TOLERANCE",
    "NativeBuildError",
    "NativeMismatchError",
    "SUPPORTED_ACTIVATIONS",
    "UnsupportedNetworkError",
    "build_library",
    "check_native_force",
    "force_xml",
    "load_native_plugin",
    "native_available",
    "native_network_force",
    "network_parameters",
]

_lock = threading.Lock()
_loaded: Optional[Path] = None


def native_available() -> bool:
    """True when the plugin can be built here (a C++ compiler and OpenMM's headers are present)."""
    if find_compiler() is None:
        return False
    try:
        openmm_paths()
    except NativeBuildError:
        return False
    return True


def load_native_plugin(path: Optional[str | Path] = None) -> Path:
    """Load the plugin into OpenMM once per process (building it first if needed).

    ``openmm.Platform.loadPluginLibrary`` registers the ``CGNetForce`` kernels for the Reference and
    CPU platforms; loading the library also registers its XmlSerializer proxy. Load it before
    deserializing a System that holds a ``CGNetForce`` (otherwise OpenMM reports "no serialization
    proxy registered for type CGNetForce").

    Parameters
    ----------
    path
        A prebuilt library to load instead of :func:`build_library`'s.

    Returns
    -------
    Path
        The loaded library (the first one loaded, on later calls).
    """
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        import openmm

        library = Path(path) if path is not None else build_library()
        openmm.Platform.loadPluginLibrary(str(library))
        handle = ctypes.CDLL(str(library))  # already loaded: same handle; reads the version tag
        handle.openmmFlowmatchNativeVersion.restype = ctypes.c_char_p
        handle.openmmFlowmatchNativeVersion()
        _loaded = library
        return library
