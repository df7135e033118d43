"""Tests of the prior terms: OpenMM forces = torch twins, finite differences, Boltzmann inversion."""

from __future__ import annotations

import json

import numpy as np
import openmm
import pytest
import torch

from openmm_flowmatch.priors import (
    DEFAULT_REPULSION_STRENGTH_KT,
    Dihedrals,
    HarmonicAngles,
    HarmonicBonds,
    PriorError,
    Priors,
    Repulsion,
    bonded_quadruples,
    bonded_triples,
    force_constant_from_mlcg,
    force_constant_to_mlcg,
    nonbonded_pairs,
)
from openmm_flowmatch.units import kT

TEMPERATURE = 300.0


# ----------------------------------------------------------------------------------- helpers


def build_chain(lengths, angles, dihedrals):
    """Cartesian chains (frames, n, 3) from internal coordinates (NeRF construction).

    lengths (frames, n-1), angles (frames, n-2) bond angles in rad, dihedrals (frames, n-3) IUPAC.
    """
    frames, n = lengths.shape[0], lengths.shape[1] + 1
    x = np.zeros((frames, n, 3))
    x[:, 1, 0] = lengths[:, 0]
    x[:, 2, 0] = lengths[:, 0] - lengths[:, 1] * np.cos(angles[:, 0])
    x[:, 2, 1] = lengths[:, 1] * np.sin(angles[:, 0])
    for i in range(3, n):
        a, b, c = x[:, i - 3], x[:, i - 2], x[:, i - 1]
        bc = (c - b) / np.linalg.norm(c - b, axis=1, keepdims=True)
        normal = np.cross(b - a, bc)
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        m = np.stack([bc, np.cross(normal, bc), normal], axis=2)
        theta, phi, r = angles[:, i - 2], dihedrals[:, i - 3], lengths[:, i - 1]
        local = np.stack([-r * np.cos(theta), r * np.sin(theta) * np.cos(phi), r * np.sin(theta) * np.sin(phi)], axis=1)
        x[:, i] = c + np.einsum("fij,fj->fi", m, local)
    return x


def random_rotations(frames, rng):
    q = rng.normal(size=(frames, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        1,
    )


def chain_bonds(n):
    return [(i, i + 1) for i in range(n - 1)]


def random_configurations(n_beads=8, frames=6, seed=0):
    """Compact random chains (bond ≈ 0.38 nm) that put some far pairs inside a repulsion wall."""
    rng = np.random.default_rng(seed)
    lengths = rng.uniform(0.33, 0.43, size=(frames, n_beads - 1))
    angles = rng.uniform(1.2, 2.6, size=(frames, n_beads - 2))
    dihedrals = rng.uniform(-np.pi, np.pi, size=(frames, n_beads - 3))
    x = build_chain(lengths, angles, dihedrals)
    return x + rng.normal(scale=0.5, size=(frames, 1, 3))


def example_priors(n_beads=8, seed=0):
    rng = np.random.default_rng(seed)
    bonds = chain_bonds(n_beads)
    triples = bonded_triples(bonds, n_beads)
    quadruples = bonded_quadruples(bonds, n_beads)
    far = nonbonded_pairs(bonds, n_beads)
    return Priors(
        [
            HarmonicBonds(bonds, rng.uniform(0.36, 0.40, len(bonds)), rng.uniform(1e4, 5e4, len(bonds))),
            HarmonicAngles(triples, rng.uniform(1.5, 2.2, len(triples)), rng.uniform(50, 400, len(triples))),
            Repulsion(far, rng.uniform(0.5, 0.9, len(far)), rng.uniform(1e3, 5e3, len(far))),
            Dihedrals(
                np.repeat(quadruples, 2, axis=0),
                [1, 3] * len(quadruples),
                rng.uniform(-np.pi, np.pi, 2 * len(quadruples)),
                rng.uniform(0.5, 5.0, 2 * len(quadruples)),
            ),
        ]
    )


def openmm_energies_and_forces(forces, positions):
    system = openmm.System()
    for _ in range(positions.shape[1]):
        system.addParticle(12.0)
    for force in forces:
        system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    energies, all_forces = [], []
    for frame in positions:
        context.setPositions(frame)
        state = context.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy()._value)
        all_forces.append(np.asarray(state.getForces(asNumpy=True)._value))
    return np.array(energies), np.array(all_forces)


# ----------------------------------------------------------------------------------- OpenMM = torch


@pytest.mark.parametrize("term_index", [0, 1, 2, 3], ids=["bonds", "angles", "repulsion", "dihedrals"])
def test_openmm_force_equals_torch_twin(term_index):
    term = example_priors().terms[term_index]
    positions = random_configurations()
    energies, forces = openmm_energies_and_forces(term.to_openmm_forces(), positions)
    tensor = torch.tensor(positions, dtype=torch.float64, requires_grad=True)
    torch_energy = term.energy(tensor)
    (gradient,) = torch.autograd.grad(torch_energy.sum(), tensor)
    assert np.abs(energies).max() > 1e-3  # the term is active on these configurations
    np.testing.assert_allclose(torch_energy.detach().numpy(), energies, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(-gradient.numpy(), forces, rtol=1e-6, atol=1e-6 * np.abs(forces).max())


def test_repulsion_is_active_and_inactive_on_test_configurations():
    repulsion = example_priors().terms[2]
    distances = np.linalg.norm(
        random_configurations()[:, repulsion.pairs[:, 0]] - random_configurations()[:, repulsion.pairs[:, 1]], axis=-1
    )
    inside = distances < repulsion.distances
    assert inside.any() and (~inside).any()  # both branches of step(d0 - r) are exercised


def test_priors_container_matches_openmm_and_finite_differences():
    priors = example_priors()
    positions = random_configurations(frames=4, seed=3)
    energies, forces = openmm_energies_and_forces(priors.to_openmm_forces(), positions)
    tensor = torch.tensor(positions)
    np.testing.assert_allclose(priors.energy(tensor).numpy(), energies, rtol=1e-6)
    torch_forces = priors.forces(tensor).numpy()
    np.testing.assert_allclose(torch_forces, forces, rtol=1e-6, atol=1e-6 * np.abs(forces).max())

    # central finite differences of the torch energy
    step = 1e-6
    numeric = np.zeros_like(positions)
    for bead in range(positions.shape[1]):
        for axis in range(3):
            shifted = positions.copy()
            shifted[:, bead, axis] += step
            plus = priors.energy(torch.tensor(shifted)).numpy()
            shifted[:, bead, axis] -= 2 * step
            minus = priors.energy(torch.tensor(shifted)).numpy()
            numeric[:, bead, axis] = -(plus - minus) / (2 * step)
    np.testing.assert_allclose(torch_forces, numeric, rtol=1e-5, atol=1e-5 * np.abs(numeric).max())


def test_float32_and_batch_shapes():
    priors = example_priors()
    positions = torch.tensor(random_configurations(frames=6))
    reference = priors.energy(positions)
    single = priors.energy(positions.to(torch.float32))
    assert single.dtype == torch.float32
    np.testing.assert_allclose(single.numpy(), reference.numpy(), rtol=1e-4)
    batched = priors.energy(positions.reshape(2, 3, 8, 3))
    assert batched.shape == (2, 3)
    np.testing.assert_allclose(batched.reshape(-1).numpy(), reference.numpy())
    assert priors.energy(positions[0]).shape == ()
    assert priors.forces(positions[0]).shape == (8, 3)


def test_dihedral_prior_distinguishes_mirror_images():
    dihedrals = Dihedrals([[0, 1, 2, 3]], [1], [0.5], [10.0])
    positions = torch.tensor(random_configurations(n_beads=4, frames=5))
    mirrored = positions * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    np.testing.assert_allclose(dihedrals.values(mirrored).numpy(), -dihedrals.values(positions).numpy())
    assert not torch.allclose(dihedrals.energy(mirrored), dihedrals.energy(positions))


# ----------------------------------------------------------------------------------- conventions


def test_openmm_half_k_convention_and_mlcg_conversion():
    """OpenMM's E = ½k(x−x0)²; mlcg writes E = k'(x−x0)²; k = 2k'."""
    positions = np.array([[[0.0, 0.0, 0.0], [0.5, 0.0, 0.0]]])
    k_openmm = 1000.0
    energies, forces = openmm_energies_and_forces(HarmonicBonds([[0, 1]], [0.4], [k_openmm]).to_openmm_forces(), positions)
    assert energies[0] == pytest.approx(0.5 * k_openmm * 0.1**2, rel=1e-10)
    assert forces[0, 1, 0] == pytest.approx(-k_openmm * 0.1, rel=1e-10)
    k_mlcg = force_constant_to_mlcg(k_openmm)
    assert k_mlcg == pytest.approx(500.0)
    assert k_mlcg * 0.1**2 == pytest.approx(energies[0], rel=1e-12)
    assert force_constant_from_mlcg(k_mlcg) == pytest.approx(k_openmm)
    np.testing.assert_allclose(force_constant_from_mlcg(np.array([1.0, 2.0])), [2.0, 4.0])

    angles = HarmonicAngles([[0, 1, 2]], [np.pi / 2], [100.0])
    triangle = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [np.cos(2.0), np.sin(2.0), 0.0]], dtype=torch.float64)
    assert angles.energy(triangle).item() == pytest.approx(0.5 * 100.0 * (2.0 - np.pi / 2) ** 2)


# ----------------------------------------------------------------------------------- fitting


def test_fit_recovers_known_harmonic_parameters():
    """Chains whose bonds and angles are Gaussian with known mean/σ: x0 and k = kT/σ² come back."""
    rng = np.random.default_rng(7)
    frames, n = 20000, 6
    bond_means = np.array([0.38, 0.37, 0.39, 0.36, 0.38])
    bond_sigmas = np.array([0.004, 0.006, 0.005, 0.008, 0.003])
    angle_means = np.array([1.6, 1.9, 2.1, 1.7])
    angle_sigmas = np.array([0.05, 0.12, 0.08, 0.10])
    lengths = rng.normal(bond_means, bond_sigmas, size=(frames, n - 1))
    angles = rng.normal(angle_means, angle_sigmas, size=(frames, n - 2))
    dihedrals = rng.uniform(-np.pi, np.pi, size=(frames, n - 3))
    x = build_chain(lengths, angles, dihedrals)
    x = np.einsum("fij,fnj->fni", random_rotations(frames, rng), x) + rng.normal(size=(frames, 1, 3))

    priors = Priors.fit(x, chain_bonds(n), TEMPERATURE, repulsion=False)
    bonds, angle_term = priors.terms
    thermal = kT(TEMPERATURE)
    # mean: standard error σ/√N; variance: relative standard error √(2/N) → k likewise
    tolerance_mean = 4 * bond_sigmas / np.sqrt(frames)
    np.testing.assert_array_less(np.abs(bonds.lengths - bond_means), tolerance_mean)
    np.testing.assert_array_less(np.abs(angle_term.angles - angle_means), 4 * angle_sigmas / np.sqrt(frames))
    relative = 4 * np.sqrt(2 / frames)
    np.testing.assert_array_less(np.abs(bonds.force_constants / (thermal / bond_sigmas**2) - 1), relative)
    np.testing.assert_array_less(np.abs(angle_term.force_constants / (thermal / angle_sigmas**2) - 1), relative)
    np.testing.assert_array_equal(angle_term.triples, [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]])


def test_fit_at_another_temperature_scales_k():
    x = random_configurations(n_beads=5, frames=200, seed=2)
    cold = Priors.fit(x, chain_bonds(5), 150.0)
    hot = Priors.fit(x, chain_bonds(5), 600.0)
    np.testing.assert_allclose(hot.terms[0].force_constants, 4 * cold.terms[0].force_constants)
    np.testing.assert_allclose(hot.terms[0].lengths, cold.terms[0].lengths)


def test_fit_recovers_dihedral_series():
    rng = np.random.default_rng(3)
    thermal = kT(TEMPERATURE)
    true = [(1, 0.7, 1.5 * thermal), (2, -1.2, 0.8 * thermal)]

    def energy(phi):
        return sum(k * (1 + np.cos(n * phi - delta)) for n, delta, k in true)

    # rejection sampling of φ from exp(−E/kT)
    candidates = rng.uniform(-np.pi, np.pi, 400000)
    accept = rng.uniform(size=candidates.size) < np.exp(-(energy(candidates) - energy(candidates).min()) / thermal)
    phi = candidates[accept][:100000]
    frames = phi.size
    x = build_chain(np.full((frames, 3), 0.38), np.full((frames, 2), 1.8), phi[:, None])
    fitted = Priors.fit(x, chain_bonds(4), TEMPERATURE, repulsion=False, dihedrals=True, angles=False)
    (dihedrals,) = [term for term in fitted.terms if isinstance(term, Dihedrals)]
    assert dihedrals.periodicities.tolist() == [1, 2]
    for (n, delta, k), period, phase, constant in zip(true, dihedrals.periodicities, dihedrals.phases, dihedrals.force_constants):
        assert period == n
        assert constant == pytest.approx(k, rel=0.05)
        assert np.angle(np.exp(1j * (phase - delta))) == pytest.approx(0.0, abs=0.05)


def test_repulsion_fit_sits_just_below_the_data():
    x = random_configurations(n_beads=8, frames=300, seed=5)
    priors = Priors.fit(x, chain_bonds(8), TEMPERATURE, repulsion=True, repulsion_margin=0.02)
    (repulsion,) = [term for term in priors.terms if isinstance(term, Repulsion)]
    expected_pairs = [(i, j) for i in range(8) for j in range(i + 3, 8)]
    assert [tuple(pair) for pair in repulsion.pairs] == expected_pairs
    shortest = np.linalg.norm(x[:, repulsion.pairs[:, 0]] - x[:, repulsion.pairs[:, 1]], axis=-1).min(0)
    np.testing.assert_allclose(repulsion.distances, shortest - 0.02)
    np.testing.assert_allclose(repulsion.strengths, DEFAULT_REPULSION_STRENGTH_KT * kT(TEMPERATURE))
    # the wall never acts on training data, and pushes back when a pair comes closer
    assert torch.all(repulsion.energy(torch.tensor(x)) == 0)
    distances = np.linalg.norm(x[:, repulsion.pairs[:, 0]] - x[:, repulsion.pairs[:, 1]], axis=-1)
    closest_frames = np.unique(distances.argmin(0))
    squeezed = x[closest_frames] * 0.5  # every pair's closest frame, shrunk to half
    energies = repulsion.energy(torch.tensor(squeezed)).numpy()
    squeezed_distances = 0.5 * distances[closest_frames]
    overlap = np.clip(repulsion.distances - squeezed_distances, 0.0, None)
    assert np.all(energies > 0)
    np.testing.assert_allclose(energies, (repulsion.strengths * overlap**2).sum(-1), rtol=1e-10)


def test_repulsion_default_is_off_for_five_beads_on_for_more():
    five = Priors.fit(random_configurations(5, 50), chain_bonds(5), TEMPERATURE)
    assert [type(term) for term in five.terms] == [HarmonicBonds, HarmonicAngles]
    ten = Priors.fit(random_configurations(10, 50), chain_bonds(10), TEMPERATURE)
    assert [type(term) for term in ten.terms] == [HarmonicBonds, HarmonicAngles, Repulsion]
    assert len(ten.terms[2]) == 10 * 9 // 2 - 9 - 8


def test_json_round_trip_keeps_energies():
    priors = example_priors()
    copy = Priors.from_dict(json.loads(json.dumps(priors.to_dict())))
    positions = torch.tensor(random_configurations())
    np.testing.assert_array_equal(copy.energy(positions).numpy(), priors.energy(positions).numpy())
    assert copy.to_dict() == priors.to_dict()


# ----------------------------------------------------------------------------------- bad input


def test_bad_input():
    x = random_configurations(5, 20)
    bad = x.copy()
    bad[3, 2, 0] = np.nan
    with pytest.raises(PriorError, match="NaN .* frame 3"):
        Priors.fit(bad, chain_bonds(5), TEMPERATURE)
    with pytest.raises(PriorError, match="does not fluctuate"):
        Priors.fit(np.repeat(x[:1], 10, axis=0), chain_bonds(5), TEMPERATURE)
    with pytest.raises(PriorError, match="beyond the 5 beads"):
        Priors.fit(x, chain_bonds(6), TEMPERATURE)
    with pytest.raises(PriorError, match="refers to bead 7"):
        example_priors().energy(torch.tensor(x))
    with pytest.raises(PriorError, match="3 values for 2 terms"):
        HarmonicBonds([[0, 1], [1, 2]], [0.1, 0.2, 0.3], 1.0)
    with pytest.raises(PriorError, match="unknown prior term type"):
        Priors.from_dict({"terms": [{"type": "coulomb"}]})
    with pytest.raises(ValueError, match="temperature must be positive"):
        Priors.fit(x, chain_bonds(5), -5.0)
