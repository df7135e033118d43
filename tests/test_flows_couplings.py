"""Spline coupling layers: exact inverses, log-determinants equal to autograd's, circle topology."""

from __future__ import annotations

import math

import pytest
import torch

from openmm_flowmatch.flows.couplings import SplineCoupling, wrap_to_circle


def randomise(coupling: SplineCoupling, scale: float, seed: int) -> SplineCoupling:
    """Give the (zero-initialised) last conditioner layer random weights: a non-trivial spline."""
    generator = torch.Generator().manual_seed(seed)
    last = coupling.conditioner[-1]
    with torch.no_grad():
        last.weight.copy_(scale * torch.randn(last.weight.shape, generator=generator, dtype=last.weight.dtype))
        last.bias.copy_(scale * torch.randn(last.bias.shape, generator=generator, dtype=last.bias.dtype))
    return coupling


def features(batch: int, circular: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    bounded = 1.9 * torch.rand(batch, len(circular), generator=generator, dtype=torch.float64) - 0.95
    angles = (2 * torch.rand(batch, len(circular), generator=generator, dtype=torch.float64) - 1) * math.pi
    return torch.where(circular, angles, bounded)


# masks over [2 bonds, 1 angle, 3 dihedrals]: the groups CGFlow uses, and mixed ones
CIRCULAR = torch.tensor([False, False, False, True, True, True])
MASKS = [
    torch.tensor([False, False, False, True, False, True]),  # even dihedrals
    torch.tensor([False, False, False, False, True, False]),  # odd dihedrals
    torch.tensor([True, True, False, False, False, False]),  # bonds
    torch.tensor([False, False, True, False, False, False]),  # angles
    torch.tensor([True, False, True, True, False, False]),  # bounded and circular together
]


def build(mask: torch.Tensor, seed: int, circular: torch.Tensor = CIRCULAR) -> SplineCoupling:
    torch.manual_seed(seed)
    coupling = SplineCoupling(mask, circular, bins=8, hidden_features=16, hidden_layers=2).double()
    return randomise(coupling, scale=1.0, seed=seed)


def test_zero_initialised_layer_is_identity():
    coupling = SplineCoupling(MASKS[4], CIRCULAR, bins=8, hidden_features=16).double()
    u = features(32, CIRCULAR, torch.Generator().manual_seed(0))
    z, ladj = coupling(u)
    assert torch.allclose(z, u, atol=1e-12)
    assert torch.allclose(ladj, torch.zeros_like(ladj), atol=1e-12)


@pytest.mark.parametrize("index", range(len(MASKS)))
def test_coupling_inverts_and_is_not_identity(index):
    mask = MASKS[index]
    coupling = build(mask, seed=index)
    u = features(256, CIRCULAR, torch.Generator().manual_seed(100 + index))
    z, ladj = coupling(u)
    # untouched features pass through exactly; transformed ones moved
    assert torch.equal(z[:, ~mask], u[:, ~mask])
    assert (z[:, mask] - u[:, mask]).abs().max() > 1e-2
    # domain preserved: bounded in [-1, 1], circular in [-pi, pi]
    assert z[:, ~CIRCULAR].abs().max() <= 1.0 + 1e-12
    assert z[:, CIRCULAR].abs().max() <= math.pi + 1e-12
    back, ladj_back = coupling.inverse(z)
    difference = back - u
    difference[:, CIRCULAR] = wrap_to_circle(difference[:, CIRCULAR])
    assert difference.abs().max() < 1e-10
    assert torch.allclose(ladj_back, ladj, atol=1e-10)


@pytest.mark.parametrize("index", range(len(MASKS)))
def test_coupling_log_det_equals_autograd(index):
    coupling = build(MASKS[index], seed=10 + index)
    u = features(8, CIRCULAR, torch.Generator().manual_seed(200 + index))
    _, ladj = coupling(u)
    for row in range(len(u)):
        jacobian = torch.autograd.functional.jacobian(lambda v: coupling(v[None])[0][0], u[row])
        _, log_abs_det = torch.linalg.slogdet(jacobian)
        assert abs(float(log_abs_det - ladj[row].detach())) < 1e-9


def test_circular_transform_is_continuous_on_the_circle():
    """Output and slope agree at φ = −π and φ = +π (a diffeomorphism of the circle)."""
    circular = torch.tensor([False, True])
    coupling = build(torch.tensor([False, True]), seed=5, circular=circular)
    condition = torch.full((4,), 0.3, dtype=torch.float64)
    epsilon = 1e-7
    left = torch.stack([condition, torch.full((4,), -math.pi + epsilon, dtype=torch.float64)], -1)
    right = torch.stack([condition, torch.full((4,), math.pi - epsilon, dtype=torch.float64)], -1)
    z_left, ladj_left = coupling(left)
    z_right, ladj_right = coupling(right)
    gap = wrap_to_circle(z_left[:, 1] - z_right[:, 1])
    assert gap.abs().max() < 1e-5  # 2 epsilon times the slope
    assert torch.allclose(ladj_left, ladj_right, atol=1e-5)


def test_density_of_a_circular_coupling_integrates_to_one():
    """Change of variables on the circle: ∫ exp(ladj(φ)) dφ over [−π, π) = 2π for fixed conditions."""
    circular = torch.tensor([False, True])
    coupling = build(torch.tensor([False, True]), seed=7, circular=circular)
    n = 20000
    phi = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 * math.pi - math.pi
    for condition in (-0.5, 0.2, 0.9):
        u = torch.stack([torch.full_like(phi, condition), phi], -1)
        _, ladj = coupling(u)
        integral = float(torch.exp(ladj.detach()).sum() * (2 * math.pi / n))
        assert abs(integral - 2 * math.pi) < 1e-5  # midpoint rule across the spline knots


def test_bad_masks_raise():
    with pytest.raises(ValueError, match="at least one"):
        SplineCoupling(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="same length"):
        SplineCoupling(torch.ones(3, dtype=torch.bool), torch.zeros(2, dtype=torch.bool))
