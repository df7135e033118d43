"""The CG neural force field: invariant features, networks and the force-matching trainer.

- :mod:`~openmm_flowmatch.forcefield.features`: :class:`InvariantFeatures` (bonds, angles,
  dihedral cos/sin, non-bonded distances, z-scored with stored training statistics).
- :mod:`~openmm_flowmatch.forcefield.networks`: :class:`CGNet` (CGnet-style residual MLP, optional
  Lipschitz bound) and :class:`MessagePassingNet` (SchNet-like, all bead pairs).
- :mod:`~openmm_flowmatch.forcefield.training`: :func:`train_force_field`, force matching on
  teacher forces (flow-matching) or mapped all-atom forces (force matching).

This package never imports :mod:`openmm_flowmatch.flows`; the two meet through the dataset format.
"""

from .features import FeatureError, InvariantFeatures, chain_bonds, graph_distances
from .networks import ACTIVATIONS, CGNet, MessagePassingNet, network_from_config
from .training import METHODS, TrainingError, force_matching_loss, forces_of, train_force_field

__all__ = [
    "ACTIVATIONS",
    "CGNet",
    "FeatureError",
    "InvariantFeatures",
    "METHODS",
    "MessagePassingNet",
    "TrainingError",
    "chain_bonds",
    "force_matching_loss",
    "forces_of",
    "graph_distances",
    "network_from_config",
    "train_force_field",
]
