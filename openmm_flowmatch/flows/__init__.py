"""The teacher: a normalizing flow over coarse-grained internal coordinates.

- :mod:`~openmm_flowmatch.flows.internal`: exact Cartesian ↔ internal-coordinate transform of a
  CG chain and its log-Jacobian.
- :mod:`~openmm_flowmatch.flows.couplings`: rational-quadratic spline couplings (circular for
  dihedrals) with MLP conditioners.
- :mod:`~openmm_flowmatch.flows.model`: :class:`CGFlow` (``log_prob``, ``sample``, ``forces``).
- :mod:`~openmm_flowmatch.flows.training`: :func:`train_flow` (maximum likelihood).
- :mod:`~openmm_flowmatch.flows.teacher`: :func:`sample_teacher` (samples + forces, outliers dropped).
"""

from .couplings import SplineCoupling
from .internal import (
    InternalCoordinateError,
    cartesian_to_internal,
    internal_to_cartesian,
    log_det_jacobian,
)
from .model import CGFlow, FlowConfig, FlowFileError
from .teacher import DEFAULT_FORCE_THRESHOLD, TeacherError, TeacherReport, mean_squared_force, sample_teacher
from .training import FlowTrainingError, negative_log_likelihood, train_flow

__all__ = [
    "CGFlow",
    "FlowConfig",
    "FlowFileError",
    "FlowTrainingError",
    "InternalCoordinateError",
    "SplineCoupling",
    "TeacherError",
    "TeacherReport",
    "DEFAULT_FORCE_THRESHOLD",
    "cartesian_to_internal",
    "internal_to_cartesian",
    "log_det_jacobian",
    "mean_squared_force",
    "negative_log_likelihood",
    "sample_teacher",
    "train_flow",
]
