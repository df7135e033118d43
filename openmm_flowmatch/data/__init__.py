"""CG data: all-atom reference runs with OpenMM, the on-disk format, and datasets.

``storage``
    :class:`CGTrajectoryFile`, :func:`write_cg_file`, :func:`read_cg_file` — one appendable HDF5
    file per run (positions nm, forces kJ/mol/nm, time ps, JSON metadata).
``reference``
    :func:`generate_reference` — all-atom MD with OpenMM saving CG positions and mapped forces,
    resumable, several replicas.
``dataset``
    :class:`CGDataset` — load, split by blocks of time, subsample, PyTorch DataLoader.

The names are imported lazily, so ``import openmm_flowmatch.data`` does not load OpenMM.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "CGTrajectoryFile": "openmm_flowmatch.data.storage",
    "StorageError": "openmm_flowmatch.data.storage",
    "read_cg_file": "openmm_flowmatch.data.storage",
    "write_cg_file": "openmm_flowmatch.data.storage",
    "FORMAT_VERSION": "openmm_flowmatch.data.storage",
    "generate_reference": "openmm_flowmatch.data.reference",
    "ReferenceGenerationError": "openmm_flowmatch.data.reference",
    "replica_seed": "openmm_flowmatch.data.reference",
    "CGDataset": "openmm_flowmatch.data.dataset",
    "DatasetError": "openmm_flowmatch.data.dataset",
    "evenly_spaced_indices": "openmm_flowmatch.data.dataset",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'openmm_flowmatch.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
