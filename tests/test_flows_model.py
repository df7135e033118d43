"""CGFlow: an exact, normalised Cartesian density; consistent sampling; forces = kT ∇ log q."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openmm_flowmatch.flows import CGFlow, FlowConfig, FlowFileError, InternalCoordinateError
from openmm_flowmatch.flows.internal import cartesian_to_internal, internal_to_cartesian, log_det_jacobian
from openmm_flowmatch.units import kT


def training_like_chains(n_beads: int, frames: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    bonds = 0.15 + 0.01 * torch.randn(frames, n_beads - 1, generator=generator, dtype=torch.float64)
    angles = 1.9 + 0.15 * torch.randn(frames, n_beads - 2, generator=generator, dtype=torch.float64)
    dihedrals = (2 * torch.rand(frames, n_beads - 3, generator=generator, dtype=torch.float64) - 1) * math.pi
    return internal_to_cartesian(bonds, angles, dihedrals)


def random_flow(n_beads: int, seed: int = 0, scale: float = 0.5) -> CGFlow:
    """A float64 flow fitted to synthetic chains, with random (non-identity) spline parameters."""
    torch.manual_seed(seed)
    flow = CGFlow.from_data(training_like_chains(n_beads, 500, seed), n_blocks=2, hidden_features=16, bins=6).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for coupling in flow.couplings:
            last = coupling.conditioner[-1]
            last.weight.copy_(scale * torch.randn(last.weight.shape, generator=generator, dtype=torch.float64))
            last.bias.copy_(scale * torch.randn(last.bias.shape, generator=generator, dtype=torch.float64))
    return flow


def random_rigid_motion(positions: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return positions @ q.T + torch.randn(3, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("n_beads", [3, 4, 5, 8])
def test_sample_then_log_prob_is_consistent(n_beads):
    flow = random_flow(n_beads, seed=n_beads)
    positions, log_q_sampling = flow.sample_with_log_prob(500, seed=1)
    assert positions.shape == (500, n_beads, 3)
    # log_prob recomputes internal coordinates from Cartesian and runs the couplings forward
    log_q = flow.log_prob(random_rigid_motion(positions, seed=2))
    assert torch.isfinite(log_q).all()
    assert torch.allclose(log_q, log_q_sampling, atol=1e-8, rtol=0)


def test_sampling_is_seeded():
    flow = random_flow(5)
    assert torch.equal(flow.sample(10, seed=3), flow.sample(10, seed=3))
    assert not torch.equal(flow.sample(10, seed=3), flow.sample(10, seed=4))


def test_internal_density_integrates_to_one():
    """3 beads: ∫ q_ic(b0, b1, θ) db0 db1 dθ = 1 by quadrature (base, rescaling and splines normalised)."""
    flow = random_flow(3, seed=11, scale=0.3)
    low = flow.center - flow.half_width
    high = flow.center + flow.half_width
    n = 64
    grids = [low[i] + (torch.arange(n, dtype=torch.float64) + 0.5) / n * (high[i] - low[i]) for i in range(3)]
    b0, b1, theta = torch.meshgrid(*grids, indexing="ij")
    bonds = torch.stack([b0.reshape(-1), b1.reshape(-1)], -1)
    angles = theta.reshape(-1, 1)
    positions = internal_to_cartesian(bonds, angles, torch.zeros(len(bonds), 0, dtype=torch.float64))
    with torch.no_grad():
        log_q_internal = flow.log_prob(positions) - log_det_jacobian(bonds, angles)
    cell = float(torch.prod((high - low) / n))
    integral = float(torch.exp(log_q_internal).sum()) * cell
    # midpoint-rule error: measured 2.0e-3 at n=64, 2e-4 at n=160, 2e-6 with identity couplings
    assert abs(integral - 1.0) < 5e-3, integral


def test_log_prob_is_invariant_under_rigid_motion_and_minus_inf_outside_support():
    flow = random_flow(6)
    positions = flow.sample(50, seed=0)
    assert torch.allclose(flow.log_prob(positions), flow.log_prob(random_rigid_motion(positions, 5)), atol=1e-9)
    stretched = positions.clone()
    stretched[:, 3:] += torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64)  # bond 2 far outside its interval
    assert torch.all(flow.log_prob(stretched) == -math.inf)


def test_forces_equal_finite_differences_of_kT_log_q():
    flow = random_flow(5, seed=3)
    temperature = 300.0
    positions = random_rigid_motion(flow.sample(3, seed=7), 8)
    forces = flow.forces(positions, temperature)
    step = 1e-7  # central-difference error measured: 5e-5 kJ/mol/nm at 1e-7, 5e-3 at 1e-6 (h²)
    numeric = torch.zeros_like(positions)
    with torch.no_grad():
        for bead in range(5):
            for axis in range(3):
                plus, minus = positions.clone(), positions.clone()
                plus[:, bead, axis] += step
                minus[:, bead, axis] -= step
                numeric[:, bead, axis] = kT(temperature) * (flow.log_prob(plus) - flow.log_prob(minus)) / (2 * step)
    assert torch.allclose(forces, numeric, rtol=1e-6, atol=1e-7 * float(numeric.abs().max()))


def test_forces_carry_no_net_force_or_torque_and_accept_quantities():
    openmm_unit = pytest.importorskip("openmm.unit")
    flow = random_flow(7)
    positions = random_rigid_motion(flow.sample(20, seed=1), 3)
    forces = flow.forces(positions, 300.0 * openmm_unit.kelvin)
    scale = float(forces.abs().max())
    assert float(forces.sum(1).abs().max()) < 1e-9 * scale
    centred = positions - positions.mean(1, keepdim=True)
    assert float(torch.cross(centred, forces, dim=-1).sum(1).abs().max()) < 1e-9 * scale
    # kT scaling: forces are proportional to the temperature
    assert torch.allclose(flow.forces(positions, 600.0), 2 * forces, rtol=1e-12)
    # numpy input works too
    assert torch.allclose(flow.forces(positions.numpy(), 300.0), forces)


def test_fitted_base_matches_data_statistics():
    data = training_like_chains(5, 2000, seed=4)
    flow = CGFlow.from_data(data, margin=0.25)
    bonds, angles, _ = cartesian_to_internal(data)
    values = torch.cat([bonds, angles], -1)
    low, high = values.min(0).values, values.max(0).values
    margin = 0.25 * (high - low)
    assert torch.allclose(flow.center.double(), (low + high) / 2, atol=1e-6)
    assert torch.allclose(flow.half_width.double(), (high - low) / 2 + margin, atol=1e-6)
    scaled = (values - flow.center.double()) / flow.half_width.double()
    assert torch.allclose(flow.base_mean.double(), scaled.mean(0), atol=1e-5)
    assert torch.allclose(flow.base_std.double(), scaled.std(0), atol=1e-5)
    # an untrained flow (identity couplings) has exactly the base's marginals: bond 0 mean/std
    samples = flow.sample(20000, seed=0).double()
    b0 = cartesian_to_internal(samples)[0][:, 0]
    assert abs(float(b0.mean() - bonds[:, 0].mean())) < 4 * float(bonds[:, 0].std()) / math.sqrt(20000) + 1e-6
    assert abs(float(b0.std() / bonds[:, 0].std()) - 1) < 0.03


def test_save_and_load_round_trip(tmp_path):
    flow = random_flow(5)
    path = flow.save(tmp_path / "flow.pt")
    loaded = CGFlow.load(path)
    assert loaded.config == flow.config
    positions = flow.sample(16, seed=0)
    assert torch.equal(loaded.log_prob(positions), flow.log_prob(positions))
    with pytest.raises(FlowFileError, match="does not exist"):
        CGFlow.load(tmp_path / "missing.pt")
    torch.save({"something": "else"}, tmp_path / "other.pt")
    with pytest.raises(FlowFileError, match="not a CGFlow"):
        CGFlow.load(tmp_path / "other.pt")


def test_wrong_bead_count_is_a_clear_error():
    flow = random_flow(5)
    with pytest.raises(InternalCoordinateError, match="models 5 beads"):
        flow.log_prob(torch.zeros(2, 6, 3, dtype=torch.float64))
    unfitted = CGFlow(FlowConfig(n_beads=4))
    with pytest.raises(InternalCoordinateError, match="not fitted"):
        unfitted.log_prob(np.zeros((1, 4, 3), dtype=np.float32))
