"""Shared fixtures and markers for the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

RESOURCES = Path(__file__).resolve().parents[1] / "openmm_flowmatch" / "resources"


def cuda_available() -> bool:
    """True when both torch and OpenMM can use a CUDA device."""
    if not torch.cuda.is_available():
        return False
    try:
        import openmm

        openmm.Platform.getPlatformByName("CUDA")
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch and OpenMM CUDA platform)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Keep tests single-threaded and deterministic on the 2-core CI machine."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


@pytest.fixture
def alanine_dipeptide_pdb() -> Path:
    return RESOURCES / "alanine_dipeptide.pdb"


@pytest.fixture
def chignolin_pdb() -> Path:
    return RESOURCES / "chignolin_cln025.pdb"


def alanine_backbone_mapping():
    """The 5-bead backbone CGMapping of the bundled alanine-dipeptide PDB."""
    import mdtraj

    from openmm_flowmatch.mapping import CGMapping

    return CGMapping.backbone(mdtraj.load(str(RESOURCES / "alanine_dipeptide.pdb")).topology)


def perturbed_backbones(mapping, n_frames: int, scale: float = 0.01, seed: int = 0):
    """The PDB's backbone beads with Gaussian noise of ``scale`` nm: ``(n_frames, beads, 3)``."""
    import mdtraj
    import numpy as np

    start = mapping.map_positions(mdtraj.load(str(RESOURCES / "alanine_dipeptide.pdb")).xyz.astype(np.float64))[0]
    return start + scale * np.random.default_rng(seed).normal(size=(n_frames, mapping.n_beads, 3))
