"""Chignolin Cα chain: OpenMM prior forces equal their torch twins, and the energy tells mirror images apart.

Pair distances are the same for a structure and its mirror image; only signed dihedrals (as
network features, in the message-passing net's chirality head, or in a dihedral prior) let the
CG energy prefer the native handedness (DESIGN.md, *CG network*).
"""

from __future__ import annotations

from pathlib import Path

import mdtraj
import numpy as np
import openmm
import pytest
import torch

from openmm_flowmatch.forcefield.features import FEATURE_SETS, InvariantFeatures, chain_bonds, feature_set_options
from openmm_flowmatch.forcefield.networks import CGNet, MessagePassingNet
from openmm_flowmatch.mapping import CGMapping
from openmm_flowmatch.priors import Dihedrals, Priors, Repulsion

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RESOURCES = Path(__file__).resolve().parents[1] / "openmm_flowmatch" / "resources"
TEMPERATURE = 340.0
MIRROR = np.diag([-1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """425 chignolin Cα frames (nm), folded and unfolded (tests/fixtures/README.md)."""
    with np.load(FIXTURES / "chignolin_ca_every_80ps.npz") as archive:
        return archive["x"].astype(np.float64)


@pytest.fixture(scope="module")
def native() -> np.ndarray:
    structure = mdtraj.load(str(RESOURCES / "chignolin_cln025.pdb"))
    return CGMapping.alpha_carbons(structure.topology).map_positions(structure.xyz)[0]


@pytest.fixture(scope="module")
def priors(frames) -> Priors:
    return Priors.fit(frames, chain_bonds(10), TEMPERATURE, repulsion=True, dihedrals=True)


def rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def openmm_energy_and_forces(priors: Priors, positions: np.ndarray) -> tuple[float, np.ndarray]:
    system = openmm.System()
    for _ in range(positions.shape[0]):
        system.addParticle(12.0)
    for force in priors.to_openmm_forces():
        system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer)
    return energy, np.asarray(forces)


def test_chignolin_priors_have_every_term(priors):
    names = [type(term).__name__ for term in priors.terms]
    assert names == ["HarmonicBonds", "HarmonicAngles", "Repulsion", "Dihedrals"]
    assert [len(term) for term in priors.terms] == [9, 8, 28, 14]  # 7 quadruples × periodicities 1, 2


def test_openmm_prior_forces_equal_torch_twin(priors, frames, native):
    # folded, unfolded, a mirror image and a compressed frame (so that the repulsion walls act)
    spread = np.argsort(np.linalg.norm(frames - frames.mean(axis=1, keepdims=True), axis=-1).sum(axis=1))
    compressed = native.mean(axis=0) + 0.8 * (native - native.mean(axis=0))
    configurations = [native, frames[spread[-1]], frames[spread[0]], native @ MIRROR, compressed]
    repulsion = next(term for term in priors.terms if isinstance(term, Repulsion))
    assert float(repulsion.energy(torch.tensor(compressed))) > 1.0, "the compressed frame must touch the walls"
    for positions in configurations:
        energy, forces = openmm_energy_and_forces(priors, positions)
        tensor = torch.tensor(positions)
        torch_energy = float(priors.energy(tensor))
        torch_forces = priors.forces(tensor).numpy()
        assert energy == pytest.approx(torch_energy, rel=1e-6, abs=1e-6)
        np.testing.assert_allclose(forces, torch_forces, rtol=1e-5, atol=1e-4 * (1 + np.abs(torch_forces).max()))


def test_only_the_dihedral_prior_sees_the_mirror_image(priors, native):
    positions = torch.tensor(native)
    mirrored = torch.tensor(native @ MIRROR)
    rotated = torch.tensor(native @ rotation(1).T + 0.3)
    for term in priors.terms:
        assert float(term.energy(rotated)) == pytest.approx(float(term.energy(positions)), abs=1e-9)
        if isinstance(term, Dihedrals):
            assert abs(float(term.energy(mirrored)) - float(term.energy(positions))) > 1.0  # kJ/mol
        else:
            assert float(term.energy(mirrored)) == pytest.approx(float(term.energy(positions)), abs=1e-9)


def make_cgnet(frames: np.ndarray, feature_set: str) -> CGNet:
    torch.manual_seed(0)
    options = feature_set_options(feature_set, 10)
    features = InvariantFeatures.from_positions(frames, bonds=chain_bonds(10), **options)
    return CGNet(features, hidden_width=32, n_layers=3, activation="silu").double()


def make_message_passing(chirality_head: bool = True) -> MessagePassingNet:
    torch.manual_seed(0)
    sequence = ["TYR", "TYR", "ASP", "PRO", "GLU", "THR", "GLY", "THR", "TRP", "TYR"]
    types = [sorted(set(sequence)).index(name) for name in sequence]
    return MessagePassingNet(types, hidden_width=16, n_interactions=2, n_radial=8, chirality_head=chirality_head).double()


@pytest.mark.parametrize("network", [f"cgnet_{name}" for name in sorted(FEATURE_SETS)] + ["message_passing"])
def test_mirrored_native_gets_another_energy_rotated_the_same(network, frames, native):
    model = make_message_passing() if network == "message_passing" else make_cgnet(frames, network[len("cgnet_"):])
    model.requires_grad_(False)
    positions = torch.tensor(native)
    energy = float(model(positions))
    for seed in range(3):
        moved = torch.tensor(native @ rotation(seed).T + np.random.default_rng(seed).normal(size=3))
        assert float(model(moved)) == pytest.approx(energy, abs=1e-9)
    mirrored = float(model(torch.tensor(native @ MIRROR)))
    assert abs(mirrored - energy) > 1e-4, (network, energy, mirrored)
    # the mirror image through another plane is the same enantiomer up to a rotation: same energy
    other_plane = float(model(torch.tensor(native @ np.diag([1.0, 1.0, -1.0]))))
    assert other_plane == pytest.approx(mirrored, abs=1e-9)


def test_every_feature_set_has_signed_dihedrals():
    """Chirality lives in the signed dihedrals: no named feature set may drop them."""
    assert all(options["include_dihedrals"] for options in FEATURE_SETS.values())


def test_distance_only_message_passing_is_blind_to_the_mirror(native):
    """The control: without its dihedral head the pair-distance network gives both enantiomers one energy."""
    model = make_message_passing(chirality_head=False).requires_grad_(False)
    energy = float(model(torch.tensor(native)))
    assert float(model(torch.tensor(native @ MIRROR))) == pytest.approx(energy, abs=1e-9)
