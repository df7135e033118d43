"""Which network backends the installed torch / OpenMM / openmm-torch offer, and which are deprecated.

The policy is written out in docs/compatibility.md. In short:

- ``"torchforce"``: ``openmmtorch.TorchForce`` + TorchScript. Default whenever openmm-torch is
  installed and the artifact has a TorchScript file. Deprecated (a
  :class:`TorchScriptDeprecationWarning`, never an error) under torch ≥ 2.10, the first release
  whose ``torch.jit.script`` / ``torch.jit.save`` emit their own DeprecationWarning.
- ``"pythonforce"``: ``openmm.PythonForce`` (OpenMM ≥ 8.5) calling the TorchScript module (or the
  eager / ``torch.compile``d rebuild); deprecated like ``torchforce`` when it runs TorchScript.
- ``"exported"``: ``openmm.PythonForce`` calling the ``torch.export`` program (``.pt2``); needs
  OpenMM ≥ 8.5 and torch ≥ 2.6 (the PT2 archive). The default when TorchForce is unavailable.
- ``"pythontorchforce"``: openmm-torch's own ``PythonTorchForce`` running the exported program,
  used only if ``openmmtorch`` has it (openmm-torch 1.10 does not).
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

__all__ = [
    "BACKENDS",
    "TORCHSCRIPT_DEPRECATED_FROM",
    "TorchScriptDeprecationWarning",
    "available_backends",
    "choose_default_backend",
    "deprecation_notice",
    "has_python_force",
    "python_torch_force_class",
    "torch_version_tuple",
    "warn_if_deprecated",
]

logger = logging.getLogger(__name__)

BACKENDS = ("torchforce", "pythonforce", "exported", "pythontorchforce", "native")

TORCHSCRIPT_DEPRECATED_FROM = (2, 10)
"""torch release from which a TorchScript backend draws :class:`TorchScriptDeprecationWarning`."""

TORCHSCRIPT_BACKENDS = ("torchforce", "pythonforce")


class TorchScriptDeprecationWarning(FutureWarning):
    """The chosen backend runs TorchScript, which the installed torch deprecates (not an error)."""


def torch_version_tuple(version: Optional[str] = None) -> tuple[int, int]:
    """``(major, minor)`` of ``version`` (default the installed torch), e.g. ``"2.12.1+cu130"`` → (2, 12)."""
    if version is None:
        import torch

        version = torch.__version__
    parts = str(version).split("+")[0].split(".")
    numbers = []
    for part in parts[:2]:
        digits = "".join(character for character in part if character.isdigit())
        numbers.append(int(digits) if digits else 0)
    while len(numbers) < 2:
        numbers.append(0)
    return numbers[0], numbers[1]


def has_python_force() -> bool:
    """Whether the installed OpenMM has ``openmm.PythonForce`` (OpenMM ≥ 8.5)."""
    import openmm

    return hasattr(openmm, "PythonForce")


def python_torch_force_class() -> Optional[type]:
    """openmm-torch's ``PythonTorchForce`` if the installed ``openmmtorch`` has it, else ``None``."""
    try:
        import openmmtorch
    except ImportError:
        return None
    return getattr(openmmtorch, "PythonTorchForce", None)


def _has_openmmtorch() -> bool:
    try:
        import openmmtorch  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends(has_torchscript: bool = True, has_exported: bool = True) -> list[str]:
    """Backends usable with the installed packages, for an artifact with the given files."""
    backends = []
    if has_torchscript and _has_openmmtorch():
        backends.append("torchforce")
    if has_python_force():
        if has_torchscript or has_exported:
            backends.append("pythonforce")
        if has_exported:
            backends.append("exported")
    if has_exported and python_torch_force_class() is not None:
        backends.append("pythontorchforce")
    return backends


def choose_default_backend(has_torchscript: bool = True, has_exported: bool = True) -> str:
    """The backend ``create_system`` uses when none is named.

    ``"torchforce"`` while openmm-torch is installed and the artifact has a TorchScript file
    (today's production path: no Python in the MD loop, CUDA graphs); otherwise
    ``"pythontorchforce"`` if openmm-torch offers it, otherwise ``"exported"``.
    """
    backends = available_backends(has_torchscript, has_exported)
    for backend in ("torchforce", "pythontorchforce", "exported", "pythonforce"):
        if backend in backends:
            return backend
    raise RuntimeError(
        "no network backend is available: install openmm-torch (TorchForce) or OpenMM >= 8.5 (PythonForce)"
    )


def deprecation_notice(backend: str, uses_torchscript: bool, torch_version: Optional[str] = None) -> Optional[str]:
    """The deprecation message for ``backend`` under ``torch_version``, or ``None`` when it is not deprecated.

    Rule: a backend that runs TorchScript (``torchforce``; ``pythonforce`` with the scripted
    module) is deprecated under torch ≥ :data:`TORCHSCRIPT_DEPRECATED_FROM`.
    """
    if backend not in TORCHSCRIPT_BACKENDS or not uses_torchscript:
        return None
    version = torch_version_tuple(torch_version)
    if version < TORCHSCRIPT_DEPRECATED_FROM:
        return None
    major, minor = version
    return (
        f"backend {backend!r} runs TorchScript, which torch {major}.{minor} deprecates; it still works, but for "
        "artifacts that must outlive TorchScript use backend='exported' (the .pt2 ExportedProgram), see "
        "docs/compatibility.md"
    )


def warn_if_deprecated(backend: str, uses_torchscript: bool, torch_version: Optional[str] = None) -> Optional[str]:
    """Issue :class:`TorchScriptDeprecationWarning` when :func:`deprecation_notice` has a message; return it."""
    message = deprecation_notice(backend, uses_torchscript, torch_version)
    if message is not None:
        warnings.warn(message, TorchScriptDeprecationWarning, stacklevel=3)
        logger.debug(message)
    return message
