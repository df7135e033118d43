"""The CG neural force field: invariant features, networks and the force-matching trainer.

- :mod:`~openmm_flowmatch.forcefield.features`: :class:`InvariantFeatures` (bonds, angles,
  dihedral cos/sin, non-bonded distances, z-scored with stored training statistics).
- :mod:`~openmm_flowmatch.forcefield.networks`: :class:`CGNet` (CGnet-style residual MLP, optional
  Lipschitz bound) and :class:`MessagePassingNet` (SchNet-like, all bead pairs);
  :func:`save_network` / :func:`load_network` for trained networks (``train-ff`` files).
- :mod:`~openmm_flowmatch.forcefield.training`: :func:`train_force_field`, force matching on
  teacher forces (flow-matching) or mapped all-atom forces (force matching).

This package never imports :mod:`openmm_flowmatch.flows`; the two meet through the dataset format.
"""

from .features import (
    DEFAULT_FEATURE_SET,
    DEFAULT_FEATURE_SETS,
    FEATURE_SETS,
    FeatureError,
    InvariantFeatures,
    chain_bonds,
    feature_set_options,
    graph_distances,
)
from .networks import (
    ACTIVATIONS,
    CGNet,
    MessagePassingNet,
    NetworkFileError,
    load_network,
    network_from_config,
    save_network,
)
from .training import METHODS, TrainingError, force_matching_loss, forces_of, train_force_field

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_FEATURE_SET",
    "DEFAULT_FEATURE_SETS",
    "FEATURE_SETS",
    "feature_set_options",
    "CGNet",
    "FeatureError",
    "InvariantFeatures",
    "METHODS",
    "MessagePassingNet",
    "NetworkFileError",
    "TrainingError",
    "chain_bonds",
    "force_matching_loss",
    "forces_of",
    "graph_distances",
    "load_network",
    "network_from_config",
    "save_network",
    "train_force_field",
]
