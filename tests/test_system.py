"""Tests of build_cg_system: masses, prior forces, serialisation, dynamics, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
import torch

from openmm_flowmatch.mapping import CGMapping
from openmm_flowmatch.priors import HarmonicAngles, HarmonicBonds, Priors, Repulsion
from openmm_flowmatch.system import CGSystemError, build_cg_system
from openmm_flowmatch.units import kT

RESOURCES = Path(__file__).resolve().parents[1] / "openmm_flowmatch" / "resources"


@pytest.fixture(scope="module")
def chignolin_mapping():
    pdb = app.PDBFile(str(RESOURCES / "chignolin_cln025.pdb"))
    mapping = CGMapping.alpha_carbons(pdb.topology)
    positions = mapping.map_positions(pdb.positions)[0]
    return mapping, positions


def reference_context(system):
    return openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))


def jittered(positions, frames, scale, seed):
    rng = np.random.default_rng(seed)
    return positions[None] + rng.normal(scale=scale, size=(frames, *positions.shape))


def test_system_has_bead_masses_and_prior_energies(chignolin_mapping):
    mapping, positions = chignolin_mapping
    data = jittered(positions, 200, 0.02, seed=0)
    priors = Priors.fit(data, mapping.bonds, 340.0)
    assert isinstance(priors.terms[-1], Repulsion)
    system = build_cg_system(mapping.cg_topology(), priors, mapping.masses)
    assert system.getNumParticles() == 10
    assert [system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(10)] == pytest.approx(mapping.masses)
    assert not system.usesPeriodicBoundaryConditions()
    assert system.getNumForces() == len(priors.to_openmm_forces()) == 3
    assert {system.getForce(i).getForceGroup() for i in range(system.getNumForces())} == {0}

    context = reference_context(system)
    probes = jittered(positions, 3, 0.05, seed=1) * np.array([1.0, 1.0, 0.8])  # some pairs inside the wall
    for frame in probes:
        context.setPositions(frame)
        state = context.getState(getEnergy=True, getForces=True)
        tensor = torch.tensor(frame)
        assert state.getPotentialEnergy()._value == pytest.approx(priors.energy(tensor).item(), rel=1e-6)
        np.testing.assert_allclose(
            state.getForces(asNumpy=True)._value, priors.forces(tensor).numpy(), rtol=1e-6, atol=1e-6
        )


def test_system_serialises_with_xml(chignolin_mapping):
    mapping, positions = chignolin_mapping
    priors = Priors.fit(jittered(positions, 100, 0.02, seed=2), mapping.bonds, 340.0)
    system = build_cg_system(mapping.cg_topology(), priors, mapping.masses)
    copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    probe = jittered(positions, 1, 0.05, seed=3)[0]
    energies = []
    for candidate in (system, copy):
        context = reference_context(candidate)
        context.setPositions(probe)
        energies.append(context.getState(getEnergy=True).getPotentialEnergy()._value)
    assert energies[0] == pytest.approx(energies[1], rel=1e-12)


def test_masses_as_quantities_and_no_priors(chignolin_mapping):
    mapping, _ = chignolin_mapping
    system = build_cg_system(mapping.cg_topology(), None, mapping.masses * unit.dalton)
    assert system.getNumForces() == 0
    assert system.getParticleMass(3).value_in_unit(unit.dalton) == pytest.approx(mapping.masses[3])


def test_langevin_dynamics_samples_the_bond_prior():
    """Equipartition: a stiff harmonic bond at T has ⟨½k(d−d0)²⟩ = ½kT and ⟨d⟩ ≈ d0 + 2σ²/d0."""
    temperature = 300.0
    thermal = kT(temperature)
    n_beads, length, constant = 4, 0.38, 10000.0
    bonds = [(i, i + 1) for i in range(n_beads - 1)]
    priors = Priors([HarmonicBonds(bonds, length, constant), HarmonicAngles([[0, 1, 2], [1, 2, 3]], 1.9, 50.0)])
    topology = app.Topology()
    residue = topology.addResidue("ALA", topology.addChain())
    atoms = [topology.addAtom("CA", None, residue) for _ in range(n_beads)]
    for first, second in bonds:
        topology.addBond(atoms[first], atoms[second])
    system = build_cg_system(topology, priors, [12.0] * n_beads)
    integrator = openmm.LangevinMiddleIntegrator(temperature, 5.0, 0.005)
    integrator.setRandomNumberSeed(11)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    positions = np.array([[0.0, 0.0, 0.0], [0.38, 0.0, 0.0], [0.5, 0.36, 0.0], [0.9, 0.45, 0.1]])
    context.setPositions(positions)
    context.setVelocitiesToTemperature(temperature, 11)
    integrator.step(500)
    samples = []
    for _ in range(10000):  # 1 ns, a sample every 0.1 ps
        integrator.step(20)
        samples.append(context.getState(getPositions=True).getPositions(asNumpy=True)._value)
    samples = np.array(samples)
    distances = np.linalg.norm(samples[:, 1:] - samples[:, :-1], axis=-1)
    bond_energy = (0.5 * constant * (distances - length) ** 2).mean()
    # σ ≈ 0.016 nm: relaxation ~0.2 ps, so ~5000 independent samples per bond (error ≈ 2 %)
    assert bond_energy == pytest.approx(0.5 * thermal, rel=0.06)
    fitted = Priors.fit(samples, bonds, temperature, repulsion=False, angles=False).terms[0]
    np.testing.assert_allclose(fitted.force_constants, constant, rtol=0.1)
    # the moment estimator ignores the d² Jacobian: ⟨d⟩ = d0 + 2σ²/d0 to first order (documented)
    np.testing.assert_allclose(fitted.lengths, length + 2 * thermal / (constant * length), atol=3e-4)


@pytest.mark.parametrize(
    "masses,match",
    [
        ([12.0] * 9, "got 9 masses for a CG topology of 10 beads"),
        ([12.0] * 9 + [0.0], r"bead 9 \(CA of residue TYR10\) has mass 0.0"),
        ([12.0] * 4 + [-1.0] + [12.0] * 5, "bead 4 .* has mass -1.0"),
        ([12.0] * 9 + [np.nan], "bead 9"),
    ],
)
def test_bad_masses(chignolin_mapping, masses, match):
    mapping, _ = chignolin_mapping
    with pytest.raises(CGSystemError, match=match):
        build_cg_system(mapping.cg_topology(), None, masses)


def test_priors_for_another_mapping(chignolin_mapping):
    mapping, _ = chignolin_mapping
    priors = Priors([HarmonicBonds([(i, i + 1) for i in range(11)], 0.38, 1000.0)])
    with pytest.raises(CGSystemError, match="PriorHarmonicBonds acts on beads .* 10 beads"):
        build_cg_system(mapping.cg_topology(), priors, mapping.masses)
