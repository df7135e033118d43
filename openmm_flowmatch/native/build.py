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

Installation: ``pip install`` (``setup.py``'s ``build_py`` step) calls :func:`install_library`,
which compiles the plugin into the package (``native/lib/``, with a ``build.json`` stamp naming
the OpenMM and the sources it was built for) when the target environment already holds OpenMM and
a compiler is present; otherwise, or on a failed compile, the install still succeeds and the
reason is written to ``native/lib/build_error.txt``. At run time :func:`locate_library` uses, in
order: ``$OPENMM_FLOWMATCH_NATIVE_LIBRARY`` (exactly that file), the installed library when its
stamp matches the running OpenMM and sources, the per-user cache, and (``build=True``) a fresh
build into the cache. By hand: ``python -m openmm_flowmatch.native build [--force]``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

__all__ = [
    "INSTALL_DIR",
    "LIBRARY_ENV",
    "LIBRARY_NAME",
    "NativeBuildError",
    "OpenMMInstall",
    "SOURCE_DIR",
    "build_library",
    "cache_directory",
    "find_compiler",
    "find_openmm",
    "gpu_libraries",
    "gpu_library_name",
    "install_library",
    "installed_library",
    "library_path",
    "locate_library",
    "openmm_paths",
    "unavailable_reason",
]

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent / "src"
"""The C++ sources shipped with the package."""

LIBRARY_NAME = "libOpenMMFlowMatchNative.so" if sys.platform != "darwin" else "libOpenMMFlowMatchNative.dylib"

NATIVE_VERSION = "1"
"""Version tag compiled into the library (``openmmFlowmatchNativeVersion()``); bump on format changes."""

INSTALL_DIR = Path(__file__).resolve().parent / "lib"
"""Where ``pip install`` puts the library it compiles (with ``build.json``, or ``build_error.txt``)."""

LIBRARY_ENV = "OPENMM_FLOWMATCH_NATIVE_LIBRARY"
"""Environment variable naming a prebuilt library to use instead of the installed or cached one."""

STAMP_NAME = "build.json"
ERROR_NAME = "build_error.txt"

SOURCES = ("CGNetModel.cpp", "CGNetForce.cpp")
HEADERS = ("CGNetModel.h", "CGNetForce.h")
GPU_SOURCE = "CGNetCommonKernel.cpp"
"""The common-compute-layer kernel, built once per GPU platform into its own library beside the main one."""

GPU_PLATFORMS = {"OpenCL": ("FLOWMATCH_PLATFORM_OPENCL", "OpenMMOpenCL"), "CUDA": ("FLOWMATCH_PLATFORM_CUDA", "OpenMMCUDA")}
"""platform name -> (macro selecting it in CGNetCommonKernel.cpp, OpenMM's platform library in lib/plugins)."""
BASE_FLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-Wall", "-Wno-unused-parameter", "-Wno-unused-function", "-Wno-psabi")
ARCH_FLAGS = ("-march=native",)


class NativeBuildError(RuntimeError):
    """The native plugin is not available (no C++ compiler, no OpenMM headers, a failed compile, a missing library)."""


@dataclass(frozen=True)
class OpenMMInstall:
    """An OpenMM installation: its version, git revision, C++ headers and ``libOpenMM`` folder."""

    version: str
    git_revision: str
    include_dir: Path
    lib_dir: Path


def find_compiler() -> Optional[str]:
    """Path of the C++ compiler to use (``$CXX``, else ``c++``/``g++``/``clang++`` on PATH), or ``None``."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def _read_version_file(path: Path) -> dict:
    """The assignments of an ``openmm/version.py`` without importing openmm (it only sets strings)."""
    namespace = {"__file__": str(path), "__name__": "openmm.version"}
    exec(compile(path.read_text(), str(path), "exec"), namespace)  # noqa: S102 - OpenMM's own generated file
    return namespace


def find_openmm(site_dirs: Optional[Sequence[str | Path]] = None) -> OpenMMInstall:
    """The OpenMM to build against: the one Python imports, or the first one in ``site_dirs``.

    Parameters
    ----------
    site_dirs
        Folders holding an ``openmm`` package (site-packages); searched without importing it (the
        install step runs in pip's isolated build environment). ``None``: ``import openmm``.

    Raises
    ------
    NativeBuildError
        No OpenMM, or one without its C++ headers or ``libOpenMM``.
    """
    if site_dirs is None:
        import openmm.version as version

        info = {name: getattr(version, name) for name in ("short_version", "git_revision", "openmm_library_path")}
    else:
        files = [Path(folder) / "openmm" / "version.py" for folder in site_dirs]
        found = [path for path in files if path.is_file()]
        if not found:
            raise NativeBuildError(
                "OpenMM is not installed in the target environment yet (pip installs it in the same step as this "
                "package); the native kernel is compiled on first use instead, or by hand with "
                "`python -m openmm_flowmatch.native build`"
            )
        info = _read_version_file(found[0])
    lib_dir = Path(info["openmm_library_path"])
    return _checked_install(str(info["short_version"]), str(info["git_revision"]), lib_dir.parent / "include", lib_dir)


def _checked_install(version: str, revision: str, include_dir: Path, lib_dir: Path) -> OpenMMInstall:
    if not (include_dir / "openmm" / "Force.h").is_file() or not (include_dir / "openmm" / "reference").is_dir():
        raise NativeBuildError(
            f"the OpenMM C++ headers are not at {include_dir} (needed: openmm/Force.h, openmm/reference/); "
            "install an OpenMM that ships its headers (the PyPI wheel or the conda package do)"
        )
    if not any((lib_dir / name).exists() for name in ("libOpenMM.so", "libOpenMM.dylib")):
        raise NativeBuildError(f"libOpenMM is not in {lib_dir}; cannot link the native plugin")
    return OpenMMInstall(version, revision, include_dir, lib_dir)


def openmm_paths() -> tuple[Path, Path]:
    """``(include_dir, lib_dir)`` of the OpenMM that Python imports (wheel: ``OpenMM.libs``; conda: the prefix).

    Raises
    ------
    NativeBuildError
        When the headers or ``libOpenMM`` are missing.
    """
    install = find_openmm()
    return install.include_dir, install.lib_dir


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


def sources_digest() -> str:
    """Hash of the C++ sources and the library's version tag (stamped into installed builds)."""
    digest = hashlib.sha256(NATIVE_VERSION.encode())
    for name in HEADERS + SOURCES + (GPU_SOURCE,):
        digest.update(name.encode())
        digest.update((SOURCE_DIR / name).read_bytes())
    return digest.hexdigest()[:20]


def _build_key(compiler: str, flags: list[str], install: OpenMMInstall) -> str:
    digest = hashlib.sha256()
    for part in (
        sources_digest(),
        install.version,
        install.git_revision,
        str(install.lib_dir),
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


def _flags(lib_dir: Path) -> list[str]:
    flags = list(BASE_FLAGS) + list(ARCH_FLAGS)
    flags.append(f"-DOPENMM_FLOWMATCH_NATIVE_VERSION=\"{NATIVE_VERSION}\"")
    # always explicit: a compiler configured with the other default (some GCC builds in CUDA images default
    # to the pre-C++11 ABI) would otherwise pass std::string to libOpenMM in another layout and crash
    flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={0 if _uses_old_cxx_abi(lib_dir) else 1}")
    return flags


def _compiler_or_raise() -> str:
    compiler = find_compiler()
    if compiler is None:
        raise NativeBuildError(_no_compiler_message())
    return compiler


def library_path() -> Path:
    """Where :func:`build_library` puts (or finds) the library for this OpenMM, compiler and CPU."""
    compiler = _compiler_or_raise()
    install = find_openmm()
    return cache_directory() / _build_key(compiler, _flags(install.lib_dir), install) / LIBRARY_NAME


def _no_compiler_message() -> str:
    return (
        "no C++ compiler found (set $CXX or install g++, e.g. `apt-get install g++` or "
        "`conda install cxx-compiler`), so the native CGNet kernel cannot be compiled. "
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


def _compile(compiler: str, install: OpenMMInstall, target: Path, verbose: bool = False) -> str:
    """Compile the plugin into ``target`` (written under a temporary name, renamed into place).

    Returns the command line used; raises :class:`NativeBuildError` with the compiler's output.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=LIBRARY_NAME)
    os.close(handle)
    command = [
        compiler, *_flags(install.lib_dir), f"-I{SOURCE_DIR}", f"-I{install.include_dir}",
        *[str(SOURCE_DIR / name) for name in SOURCES], "-o", temporary,
        f"-L{install.lib_dir}", "-lOpenMM", f"-Wl,-rpath,{install.lib_dir}",
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
    return " ".join(command)


def gpu_library_name(platform: str) -> str:
    """File name of the plugin library holding the CGNetForce kernel of a GPU ``platform``."""
    return LIBRARY_NAME.replace("Native", f"Native{platform}")


def _compile_gpu(compiler: str, install: OpenMMInstall, main_library: Path, platform: str) -> str:
    """Compile the common-compute kernel for ``platform`` beside ``main_library``; returns the command."""
    macro, openmm_library = GPU_PLATFORMS[platform]
    plugins = install.lib_dir / "plugins"
    if not any((plugins / f"lib{openmm_library}{suffix}").exists() for suffix in (".so", ".dylib")):
        raise NativeBuildError(f"OpenMM's {platform} platform library (lib{openmm_library}) is not in {plugins}")
    if not (install.include_dir / "openmm" / "common" / "ComputeContext.h").is_file():
        raise NativeBuildError(f"OpenMM's common compute headers are not in {install.include_dir / 'openmm' / 'common'}")
    target = main_library.parent / gpu_library_name(platform)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=target.name)
    os.close(handle)
    command = [
        compiler, *[flag for flag in _flags(install.lib_dir) if flag not in ARCH_FLAGS], f"-D{macro}",
        f"-I{SOURCE_DIR}", f"-I{install.include_dir}", str(SOURCE_DIR / GPU_SOURCE), "-o", temporary,
        f"-L{main_library.parent}", "-l" + main_library.name[3:].split(".")[0], f"-L{plugins}", f"-l{openmm_library}",
        f"-L{install.lib_dir}", "-lOpenMM", f"-Wl,-rpath,$ORIGIN:{plugins}:{install.lib_dir}",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            output = (result.stderr or result.stdout).strip()
            raise NativeBuildError(f"compiling the {platform} kernel failed (exit {result.returncode}):\n"
                                   f"{' '.join(command)}\n{output[-4000:]}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return " ".join(command)


def _build_gpu_libraries(compiler: str, install: OpenMMInstall, main_library: Path) -> dict[str, str]:
    """Build every GPU platform's kernel library that can be built; never raises.

    Returns ``{platform: reason}`` for those not built; the reasons are also written to
    ``build_error_<platform>.txt`` beside the main library (read by :func:`gpu_libraries`).
    """
    failures = {}
    for platform in GPU_PLATFORMS:
        error_file = main_library.parent / f"build_error_{platform}.txt"
        try:
            command = _compile_gpu(compiler, install, main_library, platform)
            error_file.unlink(missing_ok=True)
            logger.debug("built the %s kernel: %s", platform, command)
        except NativeBuildError as error:
            failures[platform] = str(error)
            error_file.write_text(str(error) + "\n")
    return failures


def gpu_libraries(main_library: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The GPU kernel libraries beside ``main_library`` (``{platform: path}``) and why the others are missing."""
    found, missing = {}, {}
    for platform in GPU_PLATFORMS:
        path = main_library.parent / gpu_library_name(platform)
        error_file = main_library.parent / f"build_error_{platform}.txt"
        if path.is_file():
            found[platform] = path
        else:
            missing[platform] = error_file.read_text().strip() if error_file.is_file() else f"{path.name} was not built"
    return found, missing


def build_library(force: bool = False, verbose: bool = False) -> Path:
    """Compile the plugin into the per-user cache if needed and return the path of the shared library.

    A failed build is recorded (``build_error.txt`` beside where the library would be) and not
    retried automatically; ``force=True`` (or ``python -m openmm_flowmatch.native build --force``)
    tries again.

    Parameters
    ----------
    force
        Rebuild even when a library (or a failed build) for this configuration exists.
    verbose
        Log the compiler command at INFO level (it is always logged at DEBUG).

    Raises
    ------
    NativeBuildError
        No C++ compiler, no OpenMM headers/library, or the compiler failed (its output is in the
        message).
    """
    compiler = _compiler_or_raise()
    install = find_openmm()
    target_dir = cache_directory() / _build_key(compiler, _flags(install.lib_dir), install)
    target = target_dir / LIBRARY_NAME
    failure = target_dir / ERROR_NAME
    with _file_lock(target_dir.parent / (target_dir.name + ".lock")):
        if not force and target.is_file():
            return target
        if not force and failure.is_file():
            raise NativeBuildError(f"an earlier build of the native plugin failed (not retried automatically; "
                                   f"`python -m openmm_flowmatch.native build --force` tries again): {failure.read_text()}")
        try:
            command = _compile(compiler, install, target, verbose)
        except NativeBuildError as error:
            failure.write_text(str(error))
            raise
        failure.unlink(missing_ok=True)
        (target_dir / "build.txt").write_text(command + "\n")
        _build_gpu_libraries(compiler, install, target)
    return target


def _stamp(install: OpenMMInstall) -> dict:
    return {
        "native_version": NATIVE_VERSION,
        "sources": sources_digest(),
        "openmm_version": install.version,
        "openmm_git_revision": install.git_revision,
        "openmm_lib_dir": str(install.lib_dir),
        # -march=native: a library built on another CPU type (e.g. inside a wheel) must not be used here
        "cpu_flags_sha256": hashlib.sha256(_cpu_flags().encode()).hexdigest()[:16],
    }


def install_library(package_dir: str | Path, site_dirs: Optional[Sequence[str | Path]] = None) -> Optional[str]:
    """Compile the plugin into ``package_dir/lib`` at install time (called by ``setup.py``); never raises.

    Parameters
    ----------
    package_dir
        The ``openmm_flowmatch/native`` folder being installed (the source tree for editable installs).
    site_dirs
        Where to look for the target environment's OpenMM (see :func:`find_openmm`).

    Returns
    -------
    str or None
        ``None`` on success (``lib/build.json`` names what it was built for), else the reason, which is
        also written to ``lib/build_error.txt``.
    """
    lib_dir = Path(package_dir) / "lib"
    lib_dir.mkdir(parents=True, exist_ok=True)
    for name in (LIBRARY_NAME, STAMP_NAME, ERROR_NAME, *map(gpu_library_name, GPU_PLATFORMS)):
        (lib_dir / name).unlink(missing_ok=True)
    try:
        compiler = _compiler_or_raise()
        install = find_openmm(site_dirs)
        command = _compile(compiler, install, lib_dir / LIBRARY_NAME)
    except Exception as error:  # noqa: BLE001 - the install must succeed whatever happens here
        reason = f"the native CGNet plugin was not compiled at install: {error}"
        (lib_dir / ERROR_NAME).write_text(reason + "\n")
        return reason
    failures = _build_gpu_libraries(compiler, install, lib_dir / LIBRARY_NAME)
    stamp = {**_stamp(install), "command": command, "gpu_not_built": failures}
    (lib_dir / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n")
    return None


def installed_library(directory: Path = INSTALL_DIR) -> tuple[Optional[Path], str]:
    """The library compiled at install, if it fits the running OpenMM and sources; else ``(None, why not)``."""
    library, stamp_file, error_file = directory / LIBRARY_NAME, directory / STAMP_NAME, directory / ERROR_NAME
    if not library.is_file() or not stamp_file.is_file():
        if error_file.is_file():
            return None, error_file.read_text().strip()
        return None, "no library was compiled at install (an install from a source tree without the build step)"
    try:
        stamp = json.loads(stamp_file.read_text())
        expected = _stamp(find_openmm())
    except (ValueError, NativeBuildError) as error:
        return None, f"the library compiled at install cannot be checked: {error}"
    differing = [key for key, value in expected.items() if stamp.get(key) != value]
    if differing:
        changes = ", ".join(f"{key}: {stamp.get(key)!r} -> {expected[key]!r}" for key in differing)
        return None, f"the library compiled at install was built for another OpenMM or other sources ({changes})"
    return library, ""


def locate_library(build: bool = False) -> tuple[Optional[Path], str]:
    """The plugin library to load, and why there is none (see the module docstring for the order).

    Parameters
    ----------
    build
        Compile into the per-user cache when no built library is found (:func:`build_library`).

    Returns
    -------
    (Path or None, str)
        The library, or ``None`` and a sentence saying why native is unavailable.
    """
    explicit = os.environ.get(LIBRARY_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_file():
            return path, ""
        return None, f"${LIBRARY_ENV} names {path}, which does not exist"
    library, why_not_installed = installed_library()
    if library is not None:
        return library, ""
    try:
        cached = library_path()
        if cached.is_file():
            return cached, ""
        if not build:
            return None, f"{why_not_installed}; not built in the cache either ({cached.parent})"
        return build_library(), ""
    except NativeBuildError as error:
        return None, f"{why_not_installed}; and {error}"


def unavailable_reason() -> Optional[str]:
    """Why the plugin can be neither loaded nor built here, or ``None`` when it can.

    ``None`` when a built library is found (:func:`locate_library`) or one can be compiled on first
    use (a compiler and OpenMM's headers are present and no earlier build of this configuration
    failed).
    """
    library, why = locate_library(build=False)
    if library is not None:
        return None
    if os.environ.get(LIBRARY_ENV):
        return why
    try:
        cached = library_path()
    except NativeBuildError:
        return why
    failure = cached.parent / ERROR_NAME
    if failure.is_file():
        return f"{why}; an earlier build in the cache failed: {failure.read_text().strip()}"
    return None
