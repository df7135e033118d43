"""sample_teacher: samples with forces kT ∇ log q, outliers dropped by the documented threshold, file format."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openmm_flowmatch.flows import CGFlow, TeacherError, mean_squared_force, sample_teacher
from openmm_flowmatch.flows.internal import internal_to_cartesian
from openmm_flowmatch.units import kT


def small_flow(seed: int = 0) -> CGFlow:
    generator = torch.Generator().manual_seed(seed)
    bonds = 0.15 + 0.005 * torch.randn(400, 4, generator=generator, dtype=torch.float64)
    angles = 1.9 + 0.1 * torch.randn(400, 3, generator=generator, dtype=torch.float64)
    dihedrals = (2 * torch.rand(400, 2, generator=generator, dtype=torch.float64) - 1) * math.pi
    torch.manual_seed(seed)
    flow = CGFlow.from_data(internal_to_cartesian(bonds, angles, dihedrals), n_blocks=1, hidden_features=16, bins=6)
    with torch.no_grad():
        for coupling in flow.couplings:
            last = coupling.conditioner[-1]
            last.weight.copy_(0.3 * torch.randn(last.weight.shape, generator=generator))
            last.bias.copy_(0.3 * torch.randn(last.bias.shape, generator=generator))
    return flow


def test_mean_squared_force_is_in_kT_per_nm_squared():
    temperature = 300.0
    forces = torch.full((2, 5, 3), 3.0 * kT(temperature), dtype=torch.float64)  # 3 kT/nm per component
    assert torch.allclose(mean_squared_force(forces, temperature), torch.full((2,), 9.0, dtype=torch.float64))


def test_teacher_file_holds_flow_samples_and_their_forces(tmp_path):
    read_cg_file = pytest.importorskip("openmm_flowmatch.data.storage").read_cg_file
    flow = small_flow()
    report = sample_teacher(flow, 300, tmp_path / "teacher.h5", 300.0, batch_size=128, seed=1, progress=False)
    data = read_cg_file(report.path)
    positions, forces = np.asarray(data["positions"]), np.asarray(data["forces"])
    assert positions.shape == forces.shape == (300, 5, 3)
    assert report.n_samples == 300 and report.n_drawn == 300 + report.n_dropped
    # the stored forces are the flow's forces at the stored positions (float32 on disk)
    expected = flow.forces(torch.as_tensor(positions, dtype=torch.float64).float(), 300.0).numpy()
    assert np.allclose(forces, expected, rtol=1e-4, atol=1e-3 * np.abs(expected).max())
    # every kept sample passes the threshold; forces sum to zero (frame-independent)
    score = mean_squared_force(torch.as_tensor(forces, dtype=torch.float64), 300.0)
    assert torch.all(score <= report.force_threshold * (1 + 1e-5))
    assert np.abs(forces.sum(1)).max() < 1e-3 * np.abs(forces).max()
    metadata = data["metadata"]
    assert metadata["source"] == "flow-teacher"
    assert metadata["temperature"] == 300.0
    assert metadata["n_samples"] == 300
    assert metadata["force_threshold"] == 1.5e5
    assert math.isclose(metadata["dropped_fraction"], report.dropped_fraction)
    assert metadata["flow_config"]["n_beads"] == 5
    # same seed, same samples
    again = sample_teacher(flow, 300, tmp_path / "again.h5", 300.0, batch_size=128, seed=1, progress=False)
    assert np.array_equal(np.asarray(read_cg_file(again.path)["positions"]), positions)


def test_dropped_fraction_matches_the_threshold():
    """With the threshold at the median of the mean squared force, about half the draws are dropped."""
    flow = small_flow(seed=2)
    temperature = 300.0
    probe = flow.sample(4000, seed=99)
    scores = mean_squared_force(flow.forces(probe, temperature), temperature)
    threshold = float(scores.median())
    report = sample_teacher(
        flow, 1000, None, temperature, batch_size=256, force_threshold=threshold, seed=5, max_draw_factor=4.0,
        progress=False,
    )
    kept_probability = 1000 / report.n_drawn
    # n_drawn is negative-binomial around 2000: standard deviation of the kept fraction ≈ 0.011
    assert abs(kept_probability - 0.5) < 0.05, report
    assert math.isclose(report.dropped_fraction, report.n_dropped / report.n_drawn)
    assert report.samples_per_second > 0


def test_impossible_threshold_is_a_clear_error():
    flow = small_flow()
    with pytest.raises(TeacherError, match="force threshold"):
        sample_teacher(flow, 50, None, 300.0, force_threshold=1e-9, progress=False)
    with pytest.raises(TeacherError, match="positive"):
        sample_teacher(flow, 50, None, 300.0, force_threshold=-1.0, progress=False)


def test_quantile_threshold_drops_the_expected_fraction():
    """A threshold at the q-quantile of the scores of data drops 1 − q of fresh samples from the
    same distribution (within binomial error)."""
    from openmm_flowmatch.flows.teacher import force_threshold_from_data

    temperature, quantile = 300.0, 0.99
    generator = torch.Generator().manual_seed(0)
    scale = kT(temperature) * 30.0 * torch.exp(0.5 * torch.randn(200000, 1, 1, generator=generator, dtype=torch.float64))
    reference = scale[:100000] * torch.randn(100000, 5, 3, generator=generator, dtype=torch.float64)
    fresh = scale[100000:] * torch.randn(100000, 5, 3, generator=generator, dtype=torch.float64)
    threshold = force_threshold_from_data(reference.numpy(), temperature, quantile=quantile)
    assert threshold == pytest.approx(float(np.quantile(mean_squared_force(reference, temperature).numpy(), quantile)))
    dropped = float((mean_squared_force(fresh, temperature) > threshold).double().mean())
    binomial = math.sqrt(quantile * (1 - quantile) / 100000)
    assert abs(dropped - (1 - quantile)) < 4 * binomial + 1e-3  # + the threshold's own sampling error
    with pytest.raises(TeacherError, match="quantile"):
        force_threshold_from_data(reference.numpy(), temperature, quantile=1.5)


def test_sample_teacher_accepts_a_data_threshold():
    from openmm_flowmatch.flows.teacher import force_threshold_from_data

    flow = small_flow()
    with torch.no_grad():
        positions = flow.sample(400, generator=torch.Generator().manual_seed(9))
    threshold = force_threshold_from_data(flow.forces(positions, 300.0).detach(), 300.0, quantile=0.9)
    report = sample_teacher(flow, 200, None, 300.0, batch_size=100, seed=2, force_threshold=threshold, progress=False)
    assert report.force_threshold == threshold and 0.0 < report.dropped_fraction < 0.3
