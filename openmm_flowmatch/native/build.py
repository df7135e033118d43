"""Compile the native CGNet plugin (C++ sources in ``native/src``) against the installed OpenMM.

The library is built on first use into a per-user cache directory whose name is a hash of
everything that makes the binary (the C++ sources, the OpenMM version and library path, the
compiler and its flags, the CPU's instruction-set flags, since the build uses ``-march=native``),
so a changed source, another OpenMM or another machine type gets a fresh build and an existing
build is never overwritten while another process uses it. Concurrent builds are serialised with
a file lock; the finished library is moved into place atomically.

Where: ``$OPENMM_FLOWMATCH_NATIVE_CACHE`` if set, else ``$XDG_CACHE_HOME/openmm_flowmatch/native``
(default ``~/.cache/openmm_flowmatch/native``), then ``<hash>/libOpenMMFlowMatchNative.so``.
Compiler: ``$CXX`` if set, else ``c++`` or ``g++`` on ``PATH`` (C++17, GCC or Clang: the kernels
use the GCC/Clang vector extension).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

__all__ = [
    "LIBRARY_NAME",
    "NativeBuildError",
    "SOURCE_DIR",
    "build_library",
    "cache_directory",
    "find_compiler",
    "library_path",
    "openmm_paths",
]

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent / "src"
"""The C++ sources shipped with the package."""

LIBRARY_NAME = "libOpenMMFlowMatchNative.so" if sys.platform != "darwin" else "libOpenMMFlowMatchNative.dylib"

NATIVE_VERSION = "1"
"""Version tag compiled into the library (``openmmFlowmatchNativeVersion()``); bump on format changes."""

SOURCES = ("CGNetModel.cpp", "CGNetForce.cpp")
HEADERS = ("CGNetModel.h", "CGNetForce.h")
BASE_FLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-Wall", "-Wno-unused-parameter", "-Wno-unused-function", "-Wno-psabi")
ARCH_FLAGS = ("-march=native",)


class NativeBuildError(RuntimeError):
    """The native plugin cannot be built (no C++ compiler, no OpenMM headers, or a failed compile)."""


def find_compiler() -> Optional[str]:
    """Path of the C++ compiler to use (``$CXX``, else ``c++``/``g++``/``clang++`` on PATH), or ``None``."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def openmm_paths() -> tuple[Path, Path]:
    """``(include_dir, lib_dir)`` of the OpenMM that Python imports (wheel: ``OpenMM.libs``; conda: the prefix).

    Raises
    ------
    NativeBuildError
        When the headers or ``libOpenMM`` are missing.
    """
    import openmm.version

    lib_dir = Path(openmm.version.openmm_library_path)
    include_dir = lib_dir.parent / "include"
    if not (include_dir / "openmm" / "Force.h").is_file() or not (include_dir / "openmm" / "reference").is_dir():
        raise NativeBuildError(
            f"the OpenMM C++ headers are not at {include_dir} (needed: openmm/Force.h, openmm/reference/); "
            "install an OpenMM that ships its headers (the PyPI wheel or the conda package do)"
        )
    if not any((lib_dir / name).exists() for name in ("libOpenMM.so", "libOpenMM.dylib")):
        raise NativeBuildError(f"libOpenMM is not in {lib_dir}; cannot link the native plugin")
    return include_dir, lib_dir


def _uses_old_cxx_abi(lib_dir: Path) -> bool:
    """True when libOpenMM was built with the pre-C++11 libstdc++ string ABI."""
    library = lib_dir / ("libOpenMM.so" if (lib_dir / "libOpenMM.so").exists() else "libOpenMM.dylib")
    try:
        return b"__cxx11" not in library.read_bytes()
    except OSError:
        return False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


@functools.lru_cache(maxsize=None)
def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build_key(compiler: str, flags: list[str]) -> str:
    import openmm
    import openmm.version

    digest = hashlib.sha256()
    for name in HEADERS + SOURCES:
        digest.update(name.encode())
        digest.update((SOURCE_DIR / name).read_bytes())
    for part in (
        NATIVE_VERSION,
        openmm.__version__,
        openmm.version.git_revision,
        str(openmm.version.openmm_library_path),
        _compiler_version(compiler),
        " ".join(flags),
        _cpu_flags(),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def cache_directory() -> Path:
    """Root of the build cache (see the module docstring)."""
    if os.environ.get("OPENMM_FLOWMATCH_NATIVE_CACHE"):
        return Path(os.environ["OPENMM_FLOWMATCH_NATIVE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "openmm_flowmatch" / "native"


def _flags(include_dir: Path, lib_dir: Path) -> list[str]:
    flags = list(BASE_FLAGS) + list(ARCH_FLAGS)
    flags.append(f"-DOPENMM_FLOWMATCH_NATIVE_VERSION=\"{NATIVE_VERSION}\"")
    if _uses_old_cxx_abi(lib_dir):
        flags.append("-D_GLIBCXX_USE_CXX11_ABI=0")
    return flags


def library_path() -> Path:
    """Where :func:`build_library` puts (or finds) the library for this OpenMM, compiler and CPU."""
    compiler = find_compiler()
    if compiler is None:
        raise NativeBuildError(_no_compiler_message())
    include_dir, lib_dir = openmm_paths()
    return cache_directory() / _build_key(compiler, _flags(include_dir, lib_dir)) / LIBRARY_NAME


def _no_compiler_message() -> str:
    return (
        "no C++ compiler found (set $CXX or install g++, e.g. `apt-get install g++` or "
        "`conda install cxx-compiler`); the native CGNet kernel is compiled on first use. "
        "Use the TorchForce backend (create_system(backend='torchforce')) instead"
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        try:
            yield
        finally:
            try:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            except ImportError:  # pragma: no cover
                pass


def build_library(force: bool = False, verbose: bool = False) -> Path:
    """Compile the plugin if needed and return the path of the shared library.

    Parameters
    ----------
    force
        Rebuild even when a library for this configuration exists.
    verbose
        Log the compiler command at INFO level (it is always logged at DEBUG).

    Raises
    ------
    NativeBuildError
        No C++ compiler, no OpenMM headers/library, or the compiler failed (its output is in the
        message).
    """
    compiler = find_compiler()
    if compiler is None:
        raise NativeBuildError(_no_compiler_message())
    include_dir, lib_dir = openmm_paths()
    flags = _flags(include_dir, lib_dir)
    target_dir = cache_directory() / _build_key(compiler, flags)
    target = target_dir / LIBRARY_NAME
    if target.is_file() and not force:
        return target
    with _file_lock(target_dir.parent / (target_dir.name + ".lock")):
        if target.is_file() and not force:  # built by another process while we waited
            return target
        target_dir.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target_dir, prefix=".build-", suffix=LIBRARY_NAME)
        os.close(handle)
        command = [
            compiler,
            *flags,
            f"-I{SOURCE_DIR}",
            f"-I{include_dir}",
            *[str(SOURCE_DIR / name) for name in SOURCES],
            "-o",
            temporary,
            f"-L{lib_dir}",
            "-lOpenMM",
            f"-Wl,-rpath,{lib_dir}",
        ]
        (logger.info if verbose else logger.debug)("building the native CGNet plugin: %s", " ".join(command))
        try:
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0 and any(flag in command for flag in ARCH_FLAGS):
                # a compiler that does not know -march=native (some ARM/Apple toolchains): plain -O3
                retry = [part for part in command if part not in ARCH_FLAGS]
                retried = subprocess.run(retry, capture_output=True, text=True)
                if retried.returncode == 0:
                    command, result = retry, retried
            if result.returncode != 0:
                output = (result.stderr or result.stdout).strip()
                raise NativeBuildError(
                    f"compiling the native CGNet plugin failed (exit {result.returncode}):\n{' '.join(command)}\n{output[-4000:]}"
                )
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        (target_dir / "build.txt").write_text(" ".join(command) + "\n")
    return target
