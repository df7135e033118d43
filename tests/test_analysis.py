"""Analysis metrics against hand-computed values, mdtraj and the DESIGN.md definitions."""

from __future__ import annotations

import json
import math

import mdtraj
import numpy as np
import pytest

from openmm_flowmatch import analysis
from openmm_flowmatch.units import BOLTZMANN_KJ_PER_MOL_PER_K, KJ_PER_KCAL

# The temperature at which kT = 1 kcal/mol, so F = −ln p in the hand computations below.
UNIT_KT_TEMPERATURE = KJ_PER_KCAL / BOLTZMANN_KJ_PER_MOL_PER_K


def random_chain(frames: int, beads: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    steps = rng.normal(size=(frames, beads, 3))
    steps *= 0.15 / np.linalg.norm(steps, axis=-1, keepdims=True)
    return np.cumsum(steps, axis=1)


def test_dihedrals_match_mdtraj():
    x = random_chain(50, 6).astype(np.float32)
    topology = mdtraj.Topology()
    chain = topology.add_chain()
    residue = topology.add_residue("ALA", chain)
    for index in range(6):
        topology.add_atom(f"C{index}", mdtraj.element.carbon, residue)
    quadruples = [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]]
    expected = mdtraj.compute_dihedrals(mdtraj.Trajectory(x, topology), quadruples)
    np.testing.assert_allclose(analysis.dihedrals(x, quadruples), expected, atol=1e-5)


def carbon_topology(n: int) -> mdtraj.Topology:
    topology = mdtraj.Topology()
    residue = topology.add_residue("ALA", topology.add_chain())
    for index in range(n):
        topology.add_atom(f"C{index}", mdtraj.element.carbon, residue)
    return topology


@pytest.mark.parametrize("angle", [0.3, 1.2, 2.5, -0.7, -2.9])
def test_phi_psi_of_known_geometry(angle):
    # beads 1..4 = (1,0,0), (0,0,0), (0,1,0), (cos a, 1, sin a): |ψ| = a; bead 0 in the plane
    # of beads 1-2-3 on the side of bead 3 (cis): φ = 0
    x = np.array(
        [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [math.cos(angle), 1.0, math.sin(angle)]]
    )
    phi, psi = analysis.phi_psi(x)
    assert abs(psi[0]) == pytest.approx(abs(angle), abs=1e-12)
    expected = mdtraj.compute_dihedrals(mdtraj.Trajectory(x[None], carbon_topology(5)), [[0, 1, 2, 3], [1, 2, 3, 4]])
    assert phi[0] == pytest.approx(expected[0, 0], abs=1e-6)
    assert psi[0] == pytest.approx(expected[0, 1], abs=1e-6)
    assert phi[0] == pytest.approx(0.0, abs=1e-12)


def test_phi_psi_requires_five_beads():
    with pytest.raises(analysis.AnalysisError, match="5-bead"):
        analysis.phi_psi(np.zeros((3, 4, 3)))


def test_free_energy_2d_hand_computed():
    # 2x2 bins on [0, 2)²: counts [[3, 1], [0, 0]] -> p = [[3/4, 1/4], [0, 0]]
    x = np.array([0.5, 0.5, 0.5, 0.5])
    y = np.array([0.5, 0.5, 0.5, 1.5])
    surface = analysis.free_energy_2d(x, y, bins=2, range=((0, 2), (0, 2)), temperature=UNIT_KT_TEMPERATURE)
    np.testing.assert_allclose(surface.probability, [[0.75, 0.25], [0, 0]])
    # F = −ln p − min(−ln p) = [0, ln 3]
    assert surface.free_energy[0, 0] == pytest.approx(0.0)
    assert surface.free_energy[0, 1] == pytest.approx(math.log(3.0))
    assert np.isinf(surface.free_energy[1]).all()


def test_free_energy_uses_kcal_per_mol():
    x = np.array([0.5] * 2 + [1.5])
    surface = analysis.free_energy_2d(x, np.full(3, 0.5), bins=2, range=((0, 2), (0, 2)), temperature=300.0)
    kT_kcal = 0.0083144626 * 300.0 / 4.184  # 0.596 kcal/mol
    assert surface.free_energy[1, 0] == pytest.approx(kT_kcal * math.log(2.0))


def test_periodic_range_is_half_open():
    # π and −π are the same angle and must land in the first bin
    surface = analysis.free_energy_2d(np.array([math.pi, -math.pi]), np.array([0.1, 0.1]), bins=60)
    assert surface.probability[0].sum() == pytest.approx(1.0)


def test_metrics_zero_for_identical_inputs():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 20, size=(60, 60)).astype(float)
    assert analysis.fes_mse(counts, counts) == pytest.approx(0.0, abs=1e-20)
    assert analysis.js_divergence(counts, counts) == pytest.approx(0.0, abs=1e-15)
    assert analysis.kl_divergence(counts, counts) == pytest.approx(0.0, abs=1e-15)
    # a histogram scaled by a constant is the same density
    assert analysis.js_divergence(counts, 7 * counts) == pytest.approx(0.0, abs=1e-15)


def test_js_divergence_hand_computed():
    p = np.array([[2.0, 1.0], [1.0, 0.0]])  # -> [1/2, 1/4, 1/4, 0]
    q = np.array([[1.0, 1.0], [1.0, 1.0]])  # -> [1/4, 1/4, 1/4, 1/4]
    # m = [3/8, 1/4, 1/4, 1/8]
    expected = 0.5 * (0.5 * math.log(0.5 / 0.375)) + 0.5 * (
        0.25 * math.log(0.25 / 0.375) + 0.25 * math.log(0.25 / 0.125)
    )
    assert analysis.js_divergence(p, q) == pytest.approx(expected, rel=1e-12)
    # disjoint supports: JS = ln 2
    assert analysis.js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(math.log(2.0))


def test_kl_divergence_hand_computed():
    p = np.array([[2.0, 1.0], [1.0, 0.0]])  # [1/2, 1/4, 1/4, 0]
    q = np.array([[1.0, 0.0], [1.0, 2.0]])  # [1/4, 0, 1/4, 1/2]
    eps = 1e-10
    expected = (
        0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / eps) + 0.25 * math.log(1.0) + eps * math.log(eps / 0.5)
    )
    assert analysis.kl_divergence(p, q) == pytest.approx(expected, rel=1e-12)
    # KL is not symmetric
    assert analysis.kl_divergence(q, p) != pytest.approx(expected)


def test_fes_mse_hand_computed():
    # kT = 1 kcal/mol, so F = −ln p − min
    p = np.array([[4.0, 2.0], [1.0, 1.0]])  # [1/2, 1/4, 1/8, 1/8] -> F = [0, ln2, ln4, ln4]
    q = np.array([[1.0, 1.0], [1.0, 1.0]])  # F = 0 everywhere
    f_ref = np.array([0.0, math.log(2), math.log(4), math.log(4)])
    difference = np.zeros(4) - f_ref
    difference -= difference.mean()
    expected = float(np.mean(difference**2))
    assert analysis.fes_mse(p, q, temperature=UNIT_KT_TEMPERATURE) == pytest.approx(expected, rel=1e-12)
    # a constant offset (same shape) gives 0
    assert analysis.fes_mse(p, 3 * p, temperature=UNIT_KT_TEMPERATURE) == pytest.approx(0.0, abs=1e-24)


def test_fes_mse_masks_empty_and_high_bins():
    # kT = 1 kcal/mol; reference bin 3 has F = ln 1000 ≈ 6.9 > 5 and must be left out,
    # model bin 2 is empty and must be left out
    p = np.array([1000.0, 500.0, 250.0, 1.0])
    q = np.array([1000.0, 250.0, 0.0, 1000.0])
    f_ref = -np.log(p / p.sum())
    f_ref -= f_ref.min()
    f_model = -np.log(q[:2] / q.sum())
    f_model -= -np.log(q.max() / q.sum())
    difference = f_model - f_ref[:2]
    difference -= difference.mean()
    expected = float(np.mean(difference**2))
    assert f_ref[3] > 5.0
    assert analysis.fes_mse(p, q, temperature=UNIT_KT_TEMPERATURE) == pytest.approx(expected, rel=1e-12)


def test_compare_phi_psi_identical_and_shifted():
    x = random_chain(4000, 5, seed=3)
    comparison = analysis.compare_phi_psi(x, x)
    assert comparison.metrics["fes_mse"] == 0.0
    assert comparison.metrics["js_divergence"] == 0.0
    assert comparison.metrics["kl_divergence"] == 0.0
    assert comparison.reference.free_energy.shape == (60, 60)
    other = random_chain(4000, 5, seed=4)
    different = analysis.compare_phi_psi(x, other)
    assert different.metrics["js_divergence"] > 0.0
    assert different.metrics["kl_divergence"] > 0.0


def test_rmsd_matches_mdtraj():
    x = random_chain(20, 8, seed=5).astype(np.float32)
    native = random_chain(1, 8, seed=6).astype(np.float32)
    topology = carbon_topology(8)
    expected = mdtraj.rmsd(mdtraj.Trajectory(x, topology), mdtraj.Trajectory(native, topology))
    np.testing.assert_allclose(analysis.rmsd_to_native(x, native[0]), expected, atol=2e-5)
    # a rotated, translated copy has RMSD 0
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    rotation *= np.sign(np.linalg.det(rotation))
    moved = native[0] @ rotation.T + 1.0
    assert analysis.rmsd_to_native(moved, native[0])[0] == pytest.approx(0.0, abs=1e-5)


def test_pairwise_distances():
    x = np.array([[[0, 0, 0], [3, 0, 0], [3, 4, 0]]], dtype=float)
    np.testing.assert_allclose(analysis.pairwise_distances(x), [[3.0, 5.0, 4.0]])
    np.testing.assert_allclose(analysis.pairwise_distances(x, min_separation=2), [[5.0]])


def test_tica_finds_slow_coordinate_and_identical_metrics_vanish():
    # a slow two-state switch in the distance between beads 0 and 1 plus fast noise elsewhere
    rng = np.random.default_rng(2)
    frames = 3000
    state = np.repeat(rng.integers(0, 2, frames // 300), 300)
    x = random_chain(1, 4, seed=8).repeat(frames, axis=0)
    x += 0.01 * rng.normal(size=x.shape)
    x[:, 1, 0] += 0.3 * state
    comparison = analysis.compare_tica(x, x, lag=10)
    assert comparison.metrics["fes_mse"] == 0.0
    assert comparison.metrics["js_divergence"] == 0.0
    reference_projection, _ = analysis.tica_projections(
        analysis.pairwise_distances(x), analysis.pairwise_distances(x), lag=10
    )
    correlation = abs(np.corrcoef(reference_projection[:, 0], state)[0, 1])
    assert correlation > 0.95
    with pytest.raises(analysis.AnalysisError, match="lag"):
        analysis.compare_tica(x[:50], x, lag=100)


def test_distance_histograms():
    x = random_chain(500, 4, seed=9)
    same = analysis.distance_histograms(x, x, bins=20)
    assert same["mean_js_divergence"] == 0.0
    assert same["reference"].shape == (6, 20)
    np.testing.assert_allclose(same["reference"].sum(axis=1), 1.0)
    stretched = analysis.distance_histograms(x, 1.5 * x, bins=20)
    assert stretched["mean_js_divergence"] > 0.1


def test_plot_and_metrics_json(tmp_path):
    x = random_chain(2000, 5, seed=10)
    comparison = analysis.compare_phi_psi(x, random_chain(2000, 5, seed=11))
    png = analysis.plot_free_energy_comparison(comparison, tmp_path / "fes.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics_path = analysis.write_metrics(tmp_path / "m.json", {**comparison.metrics, "bad": float("nan")})
    loaded = json.loads(metrics_path.read_text())
    assert loaded["js_divergence"] == pytest.approx(comparison.metrics["js_divergence"])
    assert loaded["bad"] is None


def test_load_positions_formats(tmp_path):
    x = random_chain(7, 5, seed=12).astype(np.float32)
    np.savez(tmp_path / "a.npz", x=x)
    np.testing.assert_allclose(analysis.load_positions(tmp_path / "a.npz"), x)
    import h5py

    with h5py.File(tmp_path / "a.h5", "w") as handle:
        handle["positions"] = x
    np.testing.assert_allclose(analysis.load_positions(tmp_path / "a.h5"), x)
    with pytest.raises(analysis.AnalysisError, match="no such file"):
        analysis.load_positions(tmp_path / "missing.dcd")
    with pytest.raises(analysis.AnalysisError, match="shape"):
        analysis.fes_mse(np.ones((2, 2)), np.ones((3, 3)))
