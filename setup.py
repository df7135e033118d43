"""Packaging for openmm_flowmatch (setuptools)."""

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent


def read_version() -> str:
    for line in (HERE / "openmm_flowmatch" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__ in openmm_flowmatch/__init__.py")


def _native_builder():
    """openmm_flowmatch/native/build.py loaded by path (the package itself is not importable here)."""
    spec = importlib.util.spec_from_file_location("_openmm_flowmatch_native_build", HERE / "openmm_flowmatch" / "native" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _target_site_dirs() -> list:
    """Where the target environment's packages live (pip's isolated build hides them from sys.path)."""
    paths = sysconfig.get_paths()
    return [path for path in dict.fromkeys([*sys.path, paths["purelib"], paths["platlib"]]) if path]


class BuildPyWithNative(build_py):
    """build_py, then compile the native CGNet plugin against the target environment's OpenMM.

    Never fails the install: without a compiler, without OpenMM (yet) or on a failed compile the
    reason goes to openmm_flowmatch/native/lib/build_error.txt and the package runs with TorchForce
    (or compiles the kernel on first use). OPENMM_FLOWMATCH_SKIP_NATIVE_BUILD=1 skips the step.
    """

    def run(self):
        super().run()
        if os.environ.get("OPENMM_FLOWMATCH_SKIP_NATIVE_BUILD"):
            return
        package = Path("openmm_flowmatch") / "native"
        target = HERE / package if self.editable_mode else Path(self.build_lib) / package
        try:
            reason = _native_builder().install_library(target, site_dirs=_target_site_dirs())
        except Exception as error:  # noqa: BLE001 - the install must not fail because of the native kernel
            reason = f"{type(error).__name__}: {error}"
        if reason:
            print(f"openmm_flowmatch: {reason}", file=sys.stderr)
        else:
            print(f"openmm_flowmatch: compiled the native CGNet plugin into {target / 'lib'}", file=sys.stderr)


CORE = [
    "numpy>=1.24",
    "scipy>=1.10",
    "openmm>=8.2",
    "torch>=2.2",
    "mdtraj>=1.10",
    "h5py>=3.8",
    "zuko>=1.2",
    "deeptime>=0.4.4",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "pdbfixer>=1.9",
]

EXTRAS = {
    # CPU machines: the pinned combination that openmmtorch's CPU wheels are built against.
    # OpenMM 8.5.2, not 8.6.x: with openmm 8.6.1 the acellera-openmmtorch 1.10 wheels compute
    # TorchForce energies correctly but crash (segfault) when a System holding a TorchForce is
    # deserialized by XmlSerializer (tests/test_torchforce_stack.py); with 8.5.2 it round-trips.
    "cpu": ["torch==2.12.1", "openmm==8.5.2", "acellera-openmmtorch-cpu==1.10"],
    # CUDA machines (OpenMM CUDA platform + openmm-torch built for that CUDA).
    "cuda13": ["openmm==8.5.2", "openmm-cuda-13==8.5.2", "acellera-openmmtorch-cu13==1.10"],
    "cuda12": ["openmm==8.5.2", "openmm-cuda-12==8.5.2", "acellera-openmmtorch-cu12==1.10"],
    "test": ["pytest>=7", "pytest-timeout>=2.1", "nbformat>=5", "nbclient>=0.7", "ipykernel>=6"],
}

setup(
    name="openmm_flowmatch",
    version=read_version(),
    description="Flow-matching coarse-grained neural force fields for OpenMM (TorchForce)",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["openmm_flowmatch", "openmm_flowmatch.*"]),
    package_data={
        "openmm_flowmatch": ["resources/*.pdb", "resources/*.md"],
        # C++ sources of the native CGNet kernel, compiled at install by BuildPyWithNative (or on first use)
        "openmm_flowmatch.native": ["src/*.cpp", "src/*.h"],
    },
    install_requires=CORE,
    extras_require=EXTRAS,
    cmdclass={"build_py": BuildPyWithNative},
    entry_points={"console_scripts": ["openmm-flowmatch = openmm_flowmatch.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Chemistry",
        "Intended Audience :: Science/Research",
    ],
)
