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
    Build if needed, self-test it once in a child process (:mod:`.selftest`: a library that
    crashes is never loaded here) and load it into OpenMM (``Platform.loadPluginLibrary``);
    idempotent. Needed before ``XmlSerializer.deserialize`` of a System holding a ``CGNetForce``.
``native_network_force(force_field, replicas) -> openmm.Force``
    The artifact's network as a checked native force for ``replicas`` copies.
``native_choice(force_field, platform_hint=None) -> (bool, str)``
    Whether ``backend="auto"`` takes the native kernel for this force field and platform, and why.
``native_available() -> bool`` / ``native_unavailable_reason() -> str | None``
    Whether the plugin is built (at install, or in the cache) or can be compiled on first use,
    and if not, why not.

Command line: ``python -m openmm_flowmatch.native status|build [--force]``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Optional

from .build import (
    GPU_PLATFORMS,
    LIBRARY_ENV,
    NativeBuildError,
    build_library,
    find_compiler,
    library_path,
    locate_library,
    openmm_paths,
    unavailable_reason,
)
from .selftest import library_selftest
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
    "LIBRARY_ENV",
    "NativeBuildError",
    "NativeMismatchError",
    "SUPPORTED_ACTIVATIONS",
    "UnsupportedNetworkError",
    "build_library",
    "check_native_force",
    "force_xml",
    "load_native_plugin",
    "NATIVE_PLATFORMS",
    "gpu_unavailable_reasons",
    "native_available",
    "native_choice",
    "native_platforms",
    "native_network_force",
    "native_unavailable_reason",
    "network_parameters",
]

NATIVE_PLATFORMS = ("Reference", "CPU")
"""OpenMM platforms for which the main plugin registers a CGNetForce kernel (double precision)."""

_lock = threading.Lock()
_loaded: Optional[Path] = None
_gpu: dict = {"loaded": {}, "missing": {}}  # GPU kernel libraries loaded with the plugin, and why others are not


def native_unavailable_reason() -> Optional[str]:
    """Why the native kernel cannot be used in this process, or ``None`` when it can.

    ``None`` when the plugin is loaded, built (at install or in the per-user cache) or can be
    compiled on first use. Otherwise one sentence: no C++ compiler, no OpenMM headers, a failed
    compile (with the compiler's output), ``$OPENMM_FLOWMATCH_NATIVE_LIBRARY`` naming a missing file,
    a library built for another OpenMM, ...
    """
    if _loaded is not None and not os.environ.get(LIBRARY_ENV):
        return None
    reason = unavailable_reason()
    if reason is None:
        return _recorded_selftest_failure()
    return reason


def _recorded_selftest_failure() -> Optional[str]:
    """The reason a located library failed its earlier self-test (:mod:`.selftest`), if it did."""
    from .selftest import recorded_outcome

    library, _ = locate_library(build=False)
    outcome = recorded_outcome(library) if library is not None else None
    return outcome.get("main") if outcome else None


def native_available() -> bool:
    """True when the native kernel can be used here (see :func:`native_unavailable_reason`)."""
    return native_unavailable_reason() is None


def load_native_plugin(path: Optional[str | Path] = None) -> Path:
    """Load the plugin into OpenMM once per process (building it first if needed).

    ``openmm.Platform.loadPluginLibrary`` registers the ``CGNetForce`` kernels for the Reference and
    CPU platforms; loading the library also registers its XmlSerializer proxy. Load it before
    deserializing a System that holds a ``CGNetForce`` (otherwise OpenMM reports "no serialization
    proxy registered for type CGNetForce").

    Parameters
    ----------
    path
        A prebuilt library to load instead of the one :func:`~openmm_flowmatch.native.build.locate_library`
        finds (installed, cached, or compiled now).

    Returns
    -------
    Path
        The loaded library (the first one loaded, on later calls).

    Raises
    ------
    NativeBuildError
        The library is missing and cannot be built; the message says why.
    """
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        import openmm

        library = Path(path) if path is not None else _located_library()
        selftest = library_selftest(library)  # in a child process: a crashing library never reaches this one
        if selftest["main"] is not None:
            raise NativeBuildError(f"{selftest['main']} ({library}); use backend='torchforce' (backend='auto' falls back "
                                   "to it); docs/native.md, 'Self-test'")
        openmm.Platform.loadPluginLibrary(str(library))
        handle = ctypes.CDLL(str(library))  # already loaded: same handle; reads the version tag
        handle.openmmFlowmatchNativeVersion.restype = ctypes.c_char_p
        handle.openmmFlowmatchNativeVersion()
        _load_gpu_libraries(library, selftest["gpu"])
        _loaded = library
        return library


def _load_gpu_libraries(library: Path, selftest: dict) -> None:
    """Load the common-compute kernels (OpenCL, CUDA) built beside ``library`` for platforms OpenMM has,
    except those that failed their self-test (``selftest``: platform -> reason or None)."""
    import openmm

    from .build import gpu_libraries

    found, missing = gpu_libraries(library)
    registered = {openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())}
    for platform, path in found.items():
        if platform not in registered:
            missing[platform] = f"OpenMM has no {platform} platform here"
            continue
        if selftest.get(platform):
            missing[platform] = selftest[platform]
            continue
        try:
            openmm.Platform.loadPluginLibrary(str(path))
            _gpu["loaded"][platform] = path
        except Exception as error:  # noqa: BLE001 - e.g. the platform's runtime library is missing
            missing[platform] = f"loading {path.name} failed: {error}"
    _gpu["missing"] = missing


def native_platforms() -> tuple[str, ...]:
    """Platforms with a CGNetForce kernel in this process: Reference, CPU and the GPU platforms loaded.

    Loads (and if needed builds) the plugin; the GPU kernels (OpenCL; CUDA where OpenMM's CUDA
    platform library was there to link) run in the context's precision (single by default).
    """
    load_native_plugin()
    return NATIVE_PLATFORMS + tuple(_gpu["loaded"])


def gpu_unavailable_reasons() -> dict:
    """``{platform: reason}`` for the GPU platforms without a native kernel in this process (after loading)."""
    return dict(_gpu["missing"])


def _located_library() -> Path:
    library, why = locate_library(build=True)
    if library is None:
        raise NativeBuildError(f"the native CGNet kernel is unavailable: {why}. Use backend='torchforce' (or 'auto', "
                               "which falls back to it); `python -m openmm_flowmatch.native build` compiles it by hand")
    return library


def default_platform_name() -> str:
    """The platform an ``openmm.Context`` gets when none is named (``$OPENMM_DEFAULT_PLATFORM``, else the fastest)."""
    import openmm

    if os.environ.get("OPENMM_DEFAULT_PLATFORM"):
        return os.environ["OPENMM_DEFAULT_PLATFORM"]

    platforms = [openmm.Platform.getPlatform(i) for i in range(openmm.Platform.getNumPlatforms())]
    return max(platforms, key=lambda platform: platform.getSpeed()).getName()


def native_choice(force_field, platform_hint: Optional[str] = None) -> tuple[bool, str]:
    """Whether ``backend="auto"`` uses the native kernel, and why (one sentence for the log).

    Native is chosen when the plugin is available (:func:`native_unavailable_reason`), the network
    is one it evaluates exactly (:func:`network_parameters`) and the platform the System will run
    on has a native kernel (:data:`NATIVE_PLATFORMS`; without ``platform_hint``, OpenMM's default
    platform, the fastest available). The creation check runs later, when the force is made.

    Parameters
    ----------
    force_field
        A :class:`~openmm_flowmatch.export.FlowMatchForceField`.
    platform_hint
        Name of the OpenMM platform the System will run on, if known.
    """
    platform = platform_hint or default_platform_name()
    where = "" if platform_hint else " (OpenMM's default platform here)"
    if platform not in NATIVE_PLATFORMS and platform not in GPU_PLATFORMS:
        return False, f"the native kernel has no implementation for the {platform} platform{where}"
    if not getattr(force_field, "has_torchscript", True):
        return False, "the artifact has no TorchScript module to read and check the native network against"
    reason = native_unavailable_reason()
    if reason is not None:
        return False, reason
    if platform not in NATIVE_PLATFORMS:
        try:
            available = native_platforms()
        except NativeBuildError as error:
            return False, str(error)
        if platform not in available:
            why = gpu_unavailable_reasons().get(platform, "not built")
            return False, f"the native kernel for the {platform} platform{where} is unavailable: {why}"
    try:
        parameters = network_parameters(force_field)
    except UnsupportedNetworkError as error:
        return False, str(error)
    return True, f"a CGNet with {parameters['activation']} on the {platform} platform, which the native kernel evaluates exactly"
