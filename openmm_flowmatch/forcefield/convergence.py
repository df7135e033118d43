"""Convergence of force-field training: paired loss differences, block bootstrap, budget ladders.

DESIGN.md ("Training to convergence"): force matching is judged on a large fixed validation set
of mapped all-atom forces. Mapped forces are noisy, and most of their mean squared error is a
constant (the noise variance), common to every model evaluated on the same frames. Two models are
therefore compared by the **paired** per-frame loss differences, whose mean has a much smaller
error than either loss; frames of an MD trajectory are correlated in time, so the error bar comes
from a block bootstrap over time-ordered frames.

A training budget is converged when doubling it changes the metric by less than the metric's
error bar (:func:`is_converged`); :func:`first_converged_budget` walks a ladder 1×, 2×, 4×, ….
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .training import forces_of

__all__ = [
    "per_frame_force_loss",
    "block_bootstrap_standard_error",
    "paired_loss_difference",
    "is_converged",
    "first_converged_budget",
]

logger = logging.getLogger(__name__)


def per_frame_force_loss(
    model: nn.Module,
    priors: Any,
    positions: np.ndarray | Tensor,
    forces: np.ndarray | Tensor,
    batch_size: int = 1024,
) -> np.ndarray:
    """Mean squared force error of every frame, (kJ/mol/nm)².

    Parameters
    ----------
    model
        Network energy ``(batch, n, 3) -> (batch,)`` in kJ/mol (evaluated in its own dtype).
    priors
        Prior energy with ``energy(positions)`` (kJ/mol), or ``None``.
    positions, forces
        ``(frames, n_beads, 3)`` in nm and kJ/mol/nm (e.g. mapped all-atom forces).
    batch_size
        Frames per evaluation.

    Returns
    -------
    numpy.ndarray
        ``(frames,)``: mean over beads and x, y, z of ``(−∇(U_prior + U_net) − F)²``, float64;
        its mean is the validation loss of :func:`~openmm_flowmatch.forcefield.train_force_field`.
    """
    parameter = next(iter(model.parameters()), None)
    dtype = parameter.dtype if parameter is not None else torch.float64
    device = parameter.device if parameter is not None else torch.device("cpu")
    positions = torch.as_tensor(np.asarray(positions), dtype=dtype, device=device)
    forces = torch.as_tensor(np.asarray(forces), dtype=torch.float64)
    if positions.shape != forces.shape or positions.dim() != 3:
        raise ValueError(f"positions {tuple(positions.shape)} and forces {tuple(forces.shape)} must be (frames, beads, 3) alike")

    def total_energy(batch: Tensor) -> Tensor:
        energy = model(batch)
        return energy if priors is None else energy + priors.energy(batch)

    was_training = model.training
    model.eval()
    losses = []
    try:
        for start in range(0, positions.shape[0], batch_size):
            predicted = forces_of(total_energy, positions[start:start + batch_size]).detach().cpu().double()
            losses.append(((predicted - forces[start:start + batch_size]) ** 2).mean(dim=(-2, -1)))
    finally:
        model.train(was_training)
    return torch.cat(losses).numpy()


def block_bootstrap_standard_error(
    values: np.ndarray,
    block_size: int,
    n_bootstrap: int = 1000,
    seed: int = 0,
    moving: bool = True,
) -> float:
    """Block-bootstrap standard error of the mean of a time-ordered series.

    Parameters
    ----------
    values
        ``(frames,)`` in time order.
    block_size
        Frames per block; should exceed the correlation time of the series (a few times it).
    n_bootstrap
        Number of bootstrap resamples.
    seed
        Seed of the resampling.
    moving
        ``True`` (default): moving (overlapping) blocks, every start position allowed;
        ``False``: non-overlapping blocks.

    Returns
    -------
    float
        Standard deviation of the resampled means (ddof 1).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    n = values.size
    block_size = int(block_size)
    if n < 2 or not 1 <= block_size <= n:
        raise ValueError(f"need at least 2 values and 1 <= block_size <= {n}, got {n} values, block_size {block_size}")
    n_blocks = math.ceil(n / block_size)
    generator = np.random.default_rng(seed)
    if moving:
        sums = np.concatenate([[0.0], np.cumsum(values)])
        block_sums = sums[block_size:] - sums[:-block_size]  # every overlapping block
        starts = generator.integers(0, n - block_size + 1, size=(n_bootstrap, n_blocks))
    else:
        usable = (n // block_size) * block_size
        block_sums = values[:usable].reshape(-1, block_size).sum(axis=1)
        starts = generator.integers(0, block_sums.size, size=(n_bootstrap, n_blocks))
    means = block_sums[starts].sum(axis=1) / (n_blocks * block_size)
    return float(np.std(means, ddof=1))


def paired_loss_difference(
    losses_a: np.ndarray,
    losses_b: np.ndarray,
    block_size: int = 100,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Mean of the paired per-frame loss differences ``a − b`` and its block-bootstrap error.

    Parameters
    ----------
    losses_a, losses_b
        Per-frame losses of two models on the **same** time-ordered frames (e.g. from
        :func:`per_frame_force_loss`); the noise of the mapped forces, common to both, cancels.
    block_size
        Frames per bootstrap block (default 100: 20 ps at the 0.2 ps spacing of the shared data).
    n_bootstrap
        Bootstrap resamples.
    seed
        Seed of the resampling.

    Returns
    -------
    tuple of float
        ``(mean_difference, standard_error)`` in the unit of the losses; negative means ``a`` is
        better.
    """
    losses_a, losses_b = np.asarray(losses_a, dtype=np.float64), np.asarray(losses_b, dtype=np.float64)
    if losses_a.shape != losses_b.shape or losses_a.ndim != 1:
        raise ValueError(f"paired losses need two 1-d arrays of one length, got {losses_a.shape} and {losses_b.shape}")
    difference = losses_a - losses_b
    error = block_bootstrap_standard_error(difference, min(int(block_size), difference.size), n_bootstrap, seed)
    return float(difference.mean()), error


def is_converged(metric_at_budget: float, metric_at_double_budget: float, standard_error: float) -> bool:
    """Whether doubling the budget changed the metric by less than its error bar.

    Parameters
    ----------
    metric_at_budget, metric_at_double_budget
        The metric (e.g. validation loss, or a paired loss difference) at budget B and 2B.
    standard_error
        Error bar of the change (e.g. the block-bootstrap error of the paired difference).

    Returns
    -------
    bool
        ``|metric(2B) − metric(B)| < standard_error``.
    """
    if not standard_error >= 0:
        raise ValueError(f"standard_error must be a non-negative number, got {standard_error}")
    return abs(float(metric_at_double_budget) - float(metric_at_budget)) < float(standard_error)


def first_converged_budget(
    budgets: Sequence[int],
    metrics: Sequence[float],
    standard_errors: Sequence[float],
) -> Optional[int]:
    """First budget of a doubling ladder (1×, 2×, 4×, …) that is converged.

    Parameters
    ----------
    budgets
        Increasing budgets, each twice the one before (e.g. optimiser steps 1000, 2000, 4000).
    metrics
        The metric at every budget.
    standard_errors
        Error bar of the change from each budget to the next (``len(budgets) − 1`` values, e.g.
        the paired-difference errors between consecutive models) or of the metric at every
        budget (``len(budgets)`` values; the one of the larger budget is used).

    Returns
    -------
    int or None
        The first budget B with :func:`is_converged` (metric(B), metric(2B), error), or ``None``
        when no budget of the ladder is converged (train longer).
    """
    budgets, metrics, errors = list(budgets), [float(value) for value in metrics], [float(value) for value in standard_errors]
    if len(metrics) != len(budgets) or len(errors) not in (len(budgets) - 1, len(budgets)):
        raise ValueError("budgets and metrics need one entry per budget and standard_errors one per budget or step")
    for index in range(len(budgets) - 1):
        if budgets[index + 1] != 2 * budgets[index]:
            logger.warning("budget %s is not twice %s; the ladder should double", budgets[index + 1], budgets[index])
        error = errors[index] if len(errors) == len(budgets) - 1 else errors[index + 1]
        if is_converged(metrics[index], metrics[index + 1], error):
            return budgets[index]
    return None
