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
