"""openmm_flowmatch: flow-matching coarse-grained force fields for OpenMM.

Flow-matching (Köhler, Krämer, Noé et al., arXiv 2203.11167) trains a normalizing flow on
coarse-grained (CG) configurations, uses the flow's forces to train a CG neural force field by
force matching, and runs that force field in OpenMM through openmm-torch's ``TorchForce``.

The public API is re-exported here lazily, so that ``import openmm_flowmatch`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "kT": "openmm_flowmatch.units",
    "CGMapping": "openmm_flowmatch.mapping",
    "MappingError": "openmm_flowmatch.mapping",
    "Priors": "openmm_flowmatch.priors",
    "build_cg_system": "openmm_flowmatch.system",
    "CGDataset": "openmm_flowmatch.data.dataset",
    "generate_reference": "openmm_flowmatch.data.reference",
    "CGFlow": "openmm_flowmatch.flows.model",
    "train_flow": "openmm_flowmatch.flows.training",
    "sample_teacher": "openmm_flowmatch.flows.teacher",
    "CGNet": "openmm_flowmatch.forcefield.networks",
    "train_force_field": "openmm_flowmatch.forcefield.training",
    "export_force_field": "openmm_flowmatch.export",
    "FlowMatchForceField": "openmm_flowmatch.export",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'openmm_flowmatch' has no attribute {name!r}")
