"""Packaging for openmm_flowmatch (setuptools)."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_version() -> str:
    for line in (HERE / "openmm_flowmatch" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__ in openmm_flowmatch/__init__.py")


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
        # C++ sources of the native CGNet kernel, compiled on first use (openmm_flowmatch.native)
        "openmm_flowmatch.native": ["src/*.cpp", "src/*.h"],
    },
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["openmm-flowmatch = openmm_flowmatch.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Chemistry",
        "Intended Audience :: Science/Research",
    ],
)
