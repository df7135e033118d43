"""Invariant features: values against mdtraj, pair selection, standardisation, invariances."""

from __future__ import annotations

import itertools

import mdtraj
import numpy as np
import pytest
import torch

from openmm_flowmatch.forcefield.features import FeatureError, InvariantFeatures, graph_distances


def random_chains(n_frames: int, n_beads: int, seed: int = 0) -> np.ndarray:
    """Random-walk chains with steps of 0.15 ± 0.01 nm (nm)."""
    generator = np.random.default_rng(seed)
    steps = generator.normal(size=(n_frames, n_beads, 3))
    lengths = 0.15 + 0.01 * generator.normal(size=(n_frames, n_beads, 1))
    steps = lengths * steps / np.linalg.norm(steps, axis=-1, keepdims=True)
    steps[:, 0] = generator.normal(size=(n_frames, 3))
    return np.cumsum(steps, axis=1)


def mdtraj_trajectory(positions: np.ndarray) -> mdtraj.Trajectory:
    topology = mdtraj.Topology()
    residue = topology.add_residue("CG", topology.add_chain())
    for _ in range(positions.shape[1]):
        topology.add_atom("B", mdtraj.element.carbon, residue)
    return mdtraj.Trajectory(positions, topology)


def random_rotation(seed: int) -> np.ndarray:
    generator = np.random.default_rng(seed)
    q, r = np.linalg.qr(generator.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def test_feature_values_match_mdtraj():
    positions = random_chains(6, 6)
    features = InvariantFeatures(6)
    raw = features.raw(torch.tensor(positions)).numpy()
    trajectory = mdtraj_trajectory(positions)
    n_bonds, n_angles, n_dihedrals = 5, 4, 3
    bonds = features.bond_index.numpy()
    angles = features.angle_index.numpy()
    dihedrals = features.dihedral_index.numpy()
    pairs = features.pair_index.numpy()
    assert bonds.tolist() == [[i, i + 1] for i in range(5)]
    assert angles.tolist() == [[i, i + 1, i + 2] for i in range(4)]
    assert dihedrals.tolist() == [[i, i + 1, i + 2, i + 3] for i in range(3)]
    # min_separation 2: every pair except the bonded ones
    assert pairs.tolist() == [[i, j] for i in range(6) for j in range(i + 2, 6)]
    columns = np.cumsum([0, n_bonds, n_angles, 2 * n_dihedrals, len(pairs)])
    assert raw.shape == (6, columns[-1]) == (6, features.n_features)
    np.testing.assert_allclose(raw[:, : columns[1]], mdtraj.compute_distances(trajectory, bonds), rtol=1e-5)
    np.testing.assert_allclose(raw[:, columns[1] : columns[2]], mdtraj.compute_angles(trajectory, angles), atol=1e-5)
    phi = mdtraj.compute_dihedrals(trajectory, dihedrals)
    np.testing.assert_allclose(raw[:, columns[2] : columns[3] : 2], np.cos(phi), atol=1e-5)
    np.testing.assert_allclose(raw[:, columns[2] + 1 : columns[3] : 2], np.sin(phi), atol=1e-5)
    np.testing.assert_allclose(raw[:, columns[3] :], mdtraj.compute_distances(trajectory, pairs), rtol=1e-5)


def test_min_separation_and_branched_graph():
    # star: bead 0 bonded to 1, 2, 3; bead 3 bonded to 4
    bonds = [(0, 1), (0, 2), (0, 3), (3, 4)]
    separations = graph_distances(5, bonds)
    assert separations[1, 4] == 3 and separations[1, 2] == 2 and separations[0, 4] == 2
    features = InvariantFeatures(5, bonds=bonds, min_separation=3)
    assert features.pair_index.tolist() == [[1, 4], [2, 4]]
    expected_angles = {(1, 0, 2), (1, 0, 3), (2, 0, 3), (0, 3, 4)}
    assert {tuple(row) for row in features.angle_index.tolist()} == expected_angles
    assert {tuple(row) for row in features.dihedral_index.tolist()} == {(1, 0, 3, 4), (2, 0, 3, 4)}
    all_pairs = InvariantFeatures(5, bonds=bonds, min_separation=1)
    assert len(all_pairs.pair_index) == 10


def test_standardisation_uses_training_statistics():
    positions = random_chains(200, 5, seed=1)
    features = InvariantFeatures.from_positions(positions)
    standardised = features(torch.tensor(positions)).numpy()
    np.testing.assert_allclose(standardised.mean(0), 0.0, atol=1e-10)
    np.testing.assert_allclose(standardised.std(0), 1.0, atol=1e-10)
    # the statistics travel with the module (buffers in the state dict)
    state = features.state_dict()
    assert {"mean", "std", "pair_index"} <= set(state)
    fresh = InvariantFeatures(5)
    fresh.load_state_dict(state)
    np.testing.assert_allclose(fresh(torch.tensor(positions)).numpy(), standardised)


def test_scripted_shapes_and_dtypes():
    positions = torch.tensor(random_chains(4, 5, seed=2))
    features = InvariantFeatures.from_positions(positions)
    scripted = torch.jit.script(features)
    for dtype in (torch.float32, torch.float64):
        batch = scripted(positions.to(dtype))
        assert batch.dtype == dtype and batch.shape == (4, features.n_features)
        single = scripted(positions[1].to(dtype))
        assert single.shape == (features.n_features,)
        torch.testing.assert_close(single, batch[1])
        torch.testing.assert_close(batch, features(positions.to(dtype)))
    torch.testing.assert_close(scripted(positions.float()).double(), scripted(positions), rtol=1e-4, atol=1e-4)


def test_invariance_and_mirror_image():
    positions = random_chains(3, 6, seed=3)
    features = InvariantFeatures.from_positions(random_chains(50, 6, seed=4))
    reference = features(torch.tensor(positions))
    for seed in range(3):
        moved = positions @ random_rotation(seed).T + np.random.default_rng(seed).normal(size=3)
        torch.testing.assert_close(features(torch.tensor(moved)), reference, rtol=1e-9, atol=1e-9)
    mirrored = positions * np.array([-1.0, 1.0, 1.0])
    raw, raw_mirrored = features.raw(torch.tensor(positions)), features.raw(torch.tensor(mirrored))
    first_dihedral = 5 + 4
    sines = slice(first_dihedral + 1, first_dihedral + 6, 2)
    cosines = slice(first_dihedral, first_dihedral + 6, 2)
    torch.testing.assert_close(raw_mirrored[:, sines], -raw[:, sines])
    torch.testing.assert_close(raw_mirrored[:, cosines], raw[:, cosines])
    assert raw[:, sines].abs().min() > 1e-3  # the mirror image really differs


def test_gradients_are_finite_and_match_finite_differences():
    positions = torch.tensor(random_chains(2, 5, seed=5), requires_grad=True)
    features = InvariantFeatures.from_positions(random_chains(30, 5, seed=6))
    assert torch.autograd.gradcheck(lambda x: features(x), (positions,), eps=1e-6, atol=1e-5)


def test_bad_input_raises():
    with pytest.raises(FeatureError, match="bond"):
        InvariantFeatures(4, bonds=[(0, 4)])
    with pytest.raises(FeatureError, match="at least 2 beads"):
        InvariantFeatures(1)
    with pytest.raises(FeatureError, match="no features"):
        InvariantFeatures(3, include_bonds=False, include_angles=False, include_dihedrals=False, include_distances=False)
    features = InvariantFeatures(5)
    with pytest.raises(FeatureError, match=r"\(frames, 5, 3\)"):
        features.fit_standardization(np.zeros((10, 4, 3)))
    with pytest.raises(torch.jit.Error, match="n_beads"):  # TorchScript raises torch.jit.Error
        torch.jit.script(features)(torch.zeros(4, 3))


@pytest.mark.parametrize("n_beads", [2, 3, 4])
def test_short_chains(n_beads):
    features = InvariantFeatures.from_positions(random_chains(20, n_beads, seed=n_beads))
    expected = (n_beads - 1) + max(n_beads - 2, 0) + 2 * max(n_beads - 3, 0) + len(
        [pair for pair in itertools.combinations(range(n_beads), 2) if pair[1] - pair[0] >= 2]
    )
    assert features.n_features == expected
    assert torch.isfinite(torch.jit.script(features)(torch.tensor(random_chains(2, n_beads)))).all()
