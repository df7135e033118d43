"""Convergence tooling: the doubling rule, block-bootstrap errors, paired loss differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openmm_flowmatch.forcefield import CGNet, InvariantFeatures
from openmm_flowmatch.forcefield.convergence import (
    block_bootstrap_standard_error,
    first_converged_budget,
    is_converged,
    paired_loss_difference,
    per_frame_force_loss,
)
from openmm_flowmatch.forcefield.training import forces_of


def ar1(n: int, rho: float, seed: int) -> np.ndarray:
    generator = np.random.default_rng(seed)
    noise = generator.normal(size=n)
    series = np.empty(n)
    series[0] = noise[0] / np.sqrt(1 - rho**2)
    for index in range(1, n):
        series[index] = rho * series[index - 1] + noise[index]
    return series


def test_doubling_rule_on_a_curve_with_a_known_plateau():
    """L(B) = 10 + 50 exp(−B/1000) + noise of std 0.05, error bar 0.2: the budgets before the
    plateau (where doubling still gains far more than 0.2) are not converged, the plateau is."""
    generator = np.random.default_rng(0)
    budgets = [250 * 2**k for k in range(7)]  # 250 … 16000 steps
    metrics = [10 + 50 * np.exp(-budget / 1000) + 0.05 * generator.normal() for budget in budgets]
    error = 0.2
    assert not is_converged(metrics[0], metrics[1], error)  # 250 → 500: gains ≈ 8
    assert not is_converged(metrics[2], metrics[3], error)  # 1000 → 2000: gains ≈ 11.6
    assert is_converged(metrics[5], metrics[6], error)  # 8000 → 16000: on the plateau
    first = first_converged_budget(budgets, metrics, [error] * (len(budgets) - 1))
    assert first == 8000  # 4000 → 8000 still gains 50 (e^-4 − e^-8) ≈ 0.9
    assert first_converged_budget(budgets[:4], metrics[:4], [error] * 4) is None
    with pytest.raises(ValueError):
        is_converged(1.0, 1.0, float("nan"))


def test_block_bootstrap_error_of_an_ar1_mean_matches_the_analytic_value():
    rho, n = 0.9, 40000
    series = ar1(n, rho, seed=1)
    # Var(mean) of AR(1) with unit innovations: σ²/n · (1+ρ)/(1−ρ), σ² = 1/(1−ρ²) (large n)
    analytic = np.sqrt(1 / (1 - rho**2) / n * (1 + rho) / (1 - rho))
    for moving in (True, False):
        estimate = block_bootstrap_standard_error(series, block_size=400, n_bootstrap=2000, seed=2, moving=moving)
        assert estimate == pytest.approx(analytic, rel=0.25)
    # ignoring the correlation (blocks of one frame) underestimates it badly
    assert block_bootstrap_standard_error(series, block_size=1, n_bootstrap=2000) < 0.5 * analytic


def test_paired_differences_cancel_a_common_noise_offset():
    generator = np.random.default_rng(3)
    noise = 100.0 + 20.0 * np.abs(ar1(20000, 0.8, seed=4))  # large noise common to both models
    losses_a = noise + 0.5 + 0.05 * generator.normal(size=noise.size)
    losses_b = noise + 0.05 * generator.normal(size=noise.size)
    difference, error = paired_loss_difference(losses_a, losses_b, block_size=100, n_bootstrap=500, seed=0)
    assert difference == pytest.approx(0.5, abs=5 * error) and error < 0.01
    # each loss alone carries the noise: its error is over 20 times that of the paired difference
    assert block_bootstrap_standard_error(losses_a, 100, 500) > 20 * error


def test_per_frame_force_loss_averages_to_the_validation_loss():
    generator = np.random.default_rng(5)
    steps = generator.normal(size=(30, 5, 3))
    positions = np.cumsum(0.15 * steps / np.linalg.norm(steps, axis=-1, keepdims=True), axis=1)
    forces = 10.0 * generator.normal(size=positions.shape)
    torch.manual_seed(0)
    model = CGNet(InvariantFeatures.from_positions(positions), hidden_width=8, n_layers=2).double()
    losses = per_frame_force_loss(model, None, positions, forces, batch_size=7)
    predicted = forces_of(model, torch.tensor(positions)).numpy()
    assert losses.shape == (30,)
    np.testing.assert_allclose(losses, ((predicted - forces) ** 2).mean(axis=(1, 2)), rtol=1e-12)
