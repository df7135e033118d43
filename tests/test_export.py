"""The TorchScript artifact in OpenMM: energies/forces against the module, round trips, replicas."""

from __future__ import annotations

import copy
import json

import numpy as np
import openmm
import openmm.unit as unit
import pytest
from conftest import alanine_backbone_mapping, perturbed_backbones
import torch

import openmm_flowmatch
from openmm_flowmatch.export import (
    METADATA_FILE,
    ArtifactError,
    FlowMatchForceField,
    export_force_field,
    replicate_topology,
)
from openmm_flowmatch.forcefield import CGNet, InvariantFeatures, MessagePassingNet
from openmm_flowmatch.mapping import CGMapping
from openmm_flowmatch.priors import Priors

openmmtorch = pytest.importorskip("openmmtorch")

TEMPERATURE = 300.0


@pytest.fixture(scope="module")
def mapping() -> CGMapping:
    return alanine_backbone_mapping()


@pytest.fixture(scope="module")
def configurations(mapping) -> np.ndarray:
    """The PDB's backbone beads, perturbed by 0.01 nm (nm)."""
    return perturbed_backbones(mapping, 40)


@pytest.fixture(scope="module")
def priors(configurations, mapping) -> Priors:
    # repulsion (1-4, 1-5 pairs) and dihedrals: every kind of prior force is part of every check
    return Priors.fit(configurations, mapping.bonds, TEMPERATURE, repulsion=True, dihedrals=True)


def make_model(configurations, mapping, seed: int = 0, **kwargs) -> CGNet:
    torch.manual_seed(seed)
    kwargs.setdefault("hidden_width", 32)
    kwargs.setdefault("n_layers", 3)
    model = CGNet(InvariantFeatures.from_positions(configurations, mapping.bonds), **kwargs)
    with torch.no_grad():  # make the untrained network's forces comparable to the priors'
        model.output_layer.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def model(configurations, mapping) -> CGNet:
    model = make_model(configurations, mapping)
    model.training_info = {"method": "force-matching", "frames": 40, "epochs": 0, "seed": 0, "train_loss": []}
    return model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, model, priors, mapping):
    path = tmp_path_factory.mktemp("artifact") / "ala2_cg.pt"
    export_force_field(model, path, priors=priors, mapping=mapping, temperature=TEMPERATURE * unit.kelvin)
    return path


def reference_energy_and_forces(force_field: FlowMatchForceField, priors: Priors, positions: np.ndarray):
    """The module's energy and autograd forces plus the torch twin of the priors (double)."""
    n_beads = force_field.n_beads
    x = torch.tensor(positions, dtype=torch.float64, requires_grad=True)
    energy = force_field.module(x) + priors.energy(x.reshape(-1, n_beads, 3)).sum()
    (gradient,) = torch.autograd.grad(energy, x)
    return float(energy.detach()), -gradient.numpy()


def openmm_energy_and_forces(system, positions, platform="Reference", groups=-1):
    properties = {"Threads": "1"} if platform == "CPU" else {}
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform), properties)
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True, groups=groups)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return energy, np.asarray(forces)


@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_openmm_energies_and_forces_equal_the_module(artifact, priors, mapping, configurations, backend, platform):
    force_field = FlowMatchForceField.load(artifact)
    system = force_field.create_system(mapping.cg_topology(), backend=backend, network_force_group=1)
    for positions in configurations[:3]:
        energy, forces = openmm_energy_and_forces(system, positions, platform)
        expected_energy, expected_forces = reference_energy_and_forces(force_field, priors, positions)
        assert energy == pytest.approx(expected_energy, rel=1e-5)
        np.testing.assert_allclose(forces, expected_forces, rtol=1e-5, atol=1e-5 * np.abs(expected_forces).max())
        # the network term alone is the module's energy; the priors alone are their torch twin
        network_energy, _ = openmm_energy_and_forces(system, positions, platform, groups={1})
        assert network_energy == pytest.approx(float(force_field.module(torch.tensor(positions)).detach()), rel=1e-5)
        prior_energy, _ = openmm_energy_and_forces(system, positions, platform, groups={0})
        assert prior_energy == pytest.approx(float(priors.energy(torch.tensor(positions))), rel=1e-5)
    assert abs(network_energy) > 1.0 and prior_energy > 1.0  # both terms matter in this check


def test_module_dtypes_and_original_model(artifact, model, configurations):
    module = FlowMatchForceField.load(artifact).module
    positions = torch.tensor(configurations[5])
    double = module(positions)
    single = module(positions.float())
    assert double.dtype == torch.float64 and double.dim() == 0
    assert single.dtype == torch.float32 and single.dim() == 0
    original = copy.deepcopy(model).double()(positions)
    assert float(double) == pytest.approx(float(original.detach()), rel=1e-12)
    assert float(single) == pytest.approx(float(double), rel=1e-5, abs=1e-4)
    # gradients after calls without them (a TorchScript profiling pitfall)
    x = positions.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(module(x), x)
    x_model = positions.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(copy.deepcopy(model).double()(x_model), x_model)
    torch.testing.assert_close(gradient, expected)


def test_rotation_translation_invariance_and_mirror(artifact, mapping, configurations):
    force_field = FlowMatchForceField.load(artifact)
    system = force_field.create_system(mapping.cg_topology())
    positions = configurations[7]
    energy, forces = openmm_energy_and_forces(system, positions)
    generator = np.random.default_rng(1)
    for _ in range(3):
        q, r = np.linalg.qr(generator.normal(size=(3, 3)))
        rotation = q * np.sign(np.diag(r))
        if np.linalg.det(rotation) < 0:
            rotation[:, 0] *= -1
        moved = positions @ rotation.T + generator.normal(size=3)
        moved_energy, moved_forces = openmm_energy_and_forces(system, moved)
        assert moved_energy == pytest.approx(energy, rel=1e-9, abs=1e-9)
        np.testing.assert_allclose(moved_forces, forces @ rotation.T, rtol=1e-7, atol=1e-7)
    mirrored_energy, _ = openmm_energy_and_forces(system, positions * np.array([1.0, 1.0, -1.0]))
    assert abs(mirrored_energy - energy) > 1e-3  # signed dihedrals keep chirality


def test_artifact_round_trip_keeps_metadata(artifact, model, priors, mapping, configurations):
    force_field = FlowMatchForceField.load(artifact)
    metadata = force_field.metadata
    assert metadata["format_version"] == 1
    assert metadata["package_version"] == openmm_flowmatch.__version__
    assert metadata["bead_names"] == mapping.bead_names == ["C", "N", "CA", "C", "N"]
    assert metadata["residue_names"] == ["ACE", "ALA", "ALA", "ALA", "NME"]
    assert metadata["elements"] == ["C", "N", "C", "C", "N"]
    np.testing.assert_allclose(metadata["masses"], mapping.masses)
    assert [tuple(bond) for bond in metadata["bonds"]] == list(mapping.bonds)
    assert metadata["temperature"] == TEMPERATURE
    assert metadata["priors"] == json.loads(json.dumps(priors.to_dict()))
    assert metadata["mapping"]["bead_atoms"] == mapping.bead_atoms
    assert metadata["training"]["method"] == "force-matching"
    assert metadata["model"]["class"] == "CGNet" and metadata["model"]["hidden_width"] == 32
    assert force_field.mapping.bead_atoms == mapping.bead_atoms
    x = torch.tensor(configurations[:4])
    torch.testing.assert_close(force_field.priors.energy(x), priors.energy(x))
    # the module from the file gives the exported model's energies; the eager rebuild as well
    eager = force_field.eager_module()
    double_model = copy.deepcopy(model).double()
    for positions in configurations[:4]:
        expected = float(double_model(torch.tensor(positions)).detach())
        assert float(force_field.module(torch.tensor(positions))) == pytest.approx(expected, rel=1e-12)
        assert float(eager(torch.tensor(positions))) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
def test_xml_serializer_round_trip(artifact, mapping, configurations, backend):
    system = FlowMatchForceField.load(artifact).create_system(mapping.cg_topology(), backend=backend)
    copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    assert copy.getNumParticles() == 5 and copy.getNumForces() == system.getNumForces()
    for positions in configurations[:2]:
        energy, forces = openmm_energy_and_forces(system, positions)
        copy_energy, copy_forces = openmm_energy_and_forces(copy, positions)
        assert copy_energy == pytest.approx(energy, rel=1e-12)
        np.testing.assert_allclose(copy_forces, forces, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
def test_replicas_equal_copies_computed_one_by_one(artifact, priors, mapping, configurations, backend):
    force_field = FlowMatchForceField.load(artifact)
    replicas = 3
    topology = replicate_topology(mapping.cg_topology(), replicas)
    assert topology.getNumAtoms() == 15 and len(list(topology.bonds())) == 3 * len(mapping.bonds)
    system = force_field.create_system(topology, replicas=replicas, backend=backend)
    assert system.getNumParticles() == 15
    np.testing.assert_allclose([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(15)],
                               np.tile(mapping.masses, 3))
    single_system = force_field.create_system(mapping.cg_topology(), backend=backend)
    copies = configurations[10:13] + np.arange(3)[:, None, None] * 5.0  # far apart; they must not interact anyway
    energy, forces = openmm_energy_and_forces(system, copies.reshape(-1, 3))
    one_by_one = [openmm_energy_and_forces(single_system, copy) for copy in copies]
    assert energy == pytest.approx(sum(e for e, _ in one_by_one), rel=1e-10)
    np.testing.assert_allclose(forces.reshape(3, 5, 3), np.stack([f for _, f in one_by_one]), rtol=1e-9, atol=1e-9)
    # overlapping copies still do not interact
    overlapping = configurations[10:13]
    energy, forces = openmm_energy_and_forces(system, overlapping.reshape(-1, 3))
    one_by_one = [openmm_energy_and_forces(single_system, copy) for copy in overlapping]
    assert energy == pytest.approx(sum(e for e, _ in one_by_one), rel=1e-10)
    # and the whole System equals the module + priors twin on (R·n, 3)
    expected_energy, expected_forces = reference_energy_and_forces(force_field, priors, overlapping.reshape(-1, 3))
    assert energy == pytest.approx(expected_energy, rel=1e-6)
    np.testing.assert_allclose(forces, expected_forces, rtol=1e-5, atol=1e-6 * np.abs(expected_forces).max())


def test_replica_count_is_inferred_from_the_topology(artifact, mapping):
    force_field = FlowMatchForceField.load(artifact)
    system = force_field.create_system(replicate_topology(mapping.cg_topology(), 4))
    assert system.getNumParticles() == 20
    bonds = [force for force in system.getForces() if isinstance(force, openmm.HarmonicBondForce)][0]
    assert bonds.getNumBonds() == 4 * len(mapping.bonds)
    assert bonds.getBondParameters(4 * 3 + 1)[:2] == [3 * 5 + 1, 3 * 5 + 2]


@pytest.mark.parametrize("n_steps", [2_000, pytest.param(10_000, marks=pytest.mark.slow)])
def test_langevin_run_stays_finite(tmp_path, priors, mapping, configurations, n_steps):
    """Steps of 5 fs with the default-size CGNet (width 160, 5 layers, tanh, bound 4).

    A TorchForce step of the 5-bead model costs about 1–3 ms on the shared 2-core test machine
    (TorchScript per-op overhead), so the 10,000-step run (the issue's check) is marked slow and
    the default run takes 2,000 steps.
    """
    torch.manual_seed(2)
    model = CGNet(InvariantFeatures.from_positions(configurations, mapping.bonds), lipschitz_bound=4.0)
    path = export_force_field(model, tmp_path / "default.pt", priors=priors, mapping=mapping, temperature=TEMPERATURE)
    system = FlowMatchForceField.load(path).create_system(mapping.cg_topology())
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, 1.0 / unit.picosecond, 0.005 * unit.picoseconds)
    integrator.setRandomNumberSeed(5)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"), {"Threads": "1"})
    context.setPositions(configurations[0])
    context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, 5)
    lengths, kinetic = [], []
    for _ in range(20):
        integrator.step(n_steps // 20)
        state = context.getState(getPositions=True, getEnergy=True)
        positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        assert np.all(np.isfinite(positions)) and np.isfinite(state.getPotentialEnergy()._value)
        lengths.append(np.linalg.norm(np.diff(positions, axis=0), axis=1))
        kinetic.append(state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole))
    assert context.getStepCount() == n_steps
    lengths = np.array(lengths)
    # bonds held by the priors: E = ½k(d − d0)², thermal spread σ = sqrt(kT/k)
    bonds = priors.to_dict()["terms"][0]
    rest = np.array(bonds["lengths_nm"])
    spread = np.sqrt(0.0083144626 * TEMPERATURE / np.array(bonds["force_constants_kj_per_mol_per_nm2"]))
    assert np.all(np.abs(lengths.mean(0) - rest) < 2 * spread)
    assert np.all(np.abs(lengths - rest) < 6 * spread)
    # equipartition, loosely: mean kinetic energy of 15 degrees of freedom ≈ 7.5 kT
    kT = 0.0083144626 * TEMPERATURE
    assert 3.0 * kT < np.mean(kinetic) < 12.0 * kT


def test_message_passing_artifact_in_openmm(tmp_path, priors, mapping, configurations):
    torch.manual_seed(3)
    types = [0, 1, 2, 3, 1]
    model = MessagePassingNet(types, bonds=mapping.bonds, hidden_width=16, n_interactions=2, n_radial=8, cutoff=1.2)
    path = export_force_field(model, tmp_path / "mp.pt", priors=priors, mapping=mapping.to_dict(), temperature=TEMPERATURE)
    force_field = FlowMatchForceField.load(path)
    assert force_field.metadata["model"]["class"] == "MessagePassingNet"
    system = force_field.create_system(replicate_topology(mapping.cg_topology(), 2))
    positions = configurations[20:22].reshape(-1, 3)
    energy, forces = openmm_energy_and_forces(system, positions, "CPU")
    expected_energy, expected_forces = reference_energy_and_forces(force_field, priors, positions)
    assert energy == pytest.approx(expected_energy, rel=1e-5)
    np.testing.assert_allclose(forces, expected_forces, rtol=1e-5, atol=1e-5 * np.abs(expected_forces).max())
    eager = force_field.eager_module()
    assert float(eager(torch.tensor(positions))) == pytest.approx(float(force_field.module(torch.tensor(positions))), rel=1e-12)


def test_cuda_hint_switches_on_cuda_graphs(artifact, mapping):
    force_field = FlowMatchForceField.load(artifact)
    assert force_field.network_force(platform_hint="CUDA").getProperties()["useCUDAGraphs"] == "true"
    assert dict(force_field.network_force(platform_hint="CPU").getProperties()).get("useCUDAGraphs", "false") == "false"
    # and create_system passes the hint on (seen in the serialized TorchForce)
    cuda_xml = openmm.XmlSerializer.serialize(force_field.create_system(mapping.cg_topology(), platform_hint="CUDA"))
    assert '<Property name="useCUDAGraphs" value="true"/>' in cuda_xml
    cpu_xml = openmm.XmlSerializer.serialize(force_field.create_system(mapping.cg_topology()))
    assert '<Property name="useCUDAGraphs" value="true"/>' not in cpu_xml


def test_bad_files_raise_clear_errors(tmp_path, artifact):
    with pytest.raises(ArtifactError, match="no such"):
        FlowMatchForceField.load(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a zip file at all")
    with pytest.raises(ArtifactError, match="not a TorchScript"):
        FlowMatchForceField.load(garbage)
    state = tmp_path / "state.pt"
    torch.save({"weights": torch.zeros(3)}, state)
    with pytest.raises(ArtifactError, match="not a TorchScript"):
        FlowMatchForceField.load(state)
    bare = tmp_path / "bare.pt"
    torch.jit.save(torch.jit.load(str(artifact)), str(bare))  # TorchScript without the metadata
    with pytest.raises(ArtifactError, match=METADATA_FILE):
        FlowMatchForceField.load(bare)
    newer = tmp_path / "newer.pt"
    torch.jit.save(torch.jit.load(str(artifact)), str(newer), _extra_files={METADATA_FILE: json.dumps({"format_version": 99})})
    with pytest.raises(ArtifactError, match="version"):
        FlowMatchForceField.load(newer)


def test_bead_count_mismatch_raises(artifact, mapping, configurations, model, priors):
    force_field = FlowMatchForceField.load(artifact)
    topology = mapping.cg_topology()
    with pytest.raises(ArtifactError, match="5 beads"):
        force_field.create_system(replicate_topology(topology, 2), replicas=3)
    import openmm.app as app

    seven = app.Topology()
    residue = seven.addResidue("CG", seven.addChain())
    for index in range(7):
        seven.addAtom(f"B{index}", None, residue)
    with pytest.raises(ArtifactError, match="7 atoms"):
        force_field.create_system(seven)
    with pytest.raises(ArtifactError, match="backend"):
        force_field.create_system(topology, backend="tensorflow")
    six_bead_mapping = dict(mapping.to_dict())
    six_bead_mapping["bead_names"] = six_bead_mapping["bead_names"] + ["X"]
    with pytest.raises(ArtifactError, match="6"):
        export_force_field(model, "unused.pt", priors=priors, mapping=six_bead_mapping, temperature=TEMPERATURE)
    # the module itself refuses a particle count that is not a multiple of the bead count
    with pytest.raises(torch.jit.Error, match="R\\*n_beads"):
        force_field.module(torch.zeros(7, 3, dtype=torch.float64))


def test_python_force_with_eager_module(artifact, mapping, configurations):
    force_field = FlowMatchForceField.load(artifact)
    eager_system = force_field.create_system(mapping.cg_topology(), backend="pythonforce",
                                             python_module=force_field.eager_module())
    torch_system = force_field.create_system(mapping.cg_topology())
    energy, forces = openmm_energy_and_forces(eager_system, configurations[30], "CPU")
    expected_energy, expected_forces = openmm_energy_and_forces(torch_system, configurations[30], "CPU")
    assert energy == pytest.approx(expected_energy, rel=1e-12)
    np.testing.assert_allclose(forces, expected_forces, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_python_force_with_torch_compile(artifact, mapping, configurations):
    force_field = FlowMatchForceField.load(artifact)
    system = force_field.create_system(mapping.cg_topology(), backend="pythonforce", compile=True)
    energy, forces = openmm_energy_and_forces(system, configurations[31], "CPU")
    expected_energy, expected_forces = openmm_energy_and_forces(force_field.create_system(mapping.cg_topology()),
                                                                configurations[31], "CPU")
    assert energy == pytest.approx(expected_energy, rel=1e-10)
    np.testing.assert_allclose(forces, expected_forces, rtol=1e-8, atol=1e-8)


def test_scripted_model_export_and_frozen_parameters(tmp_path, model, mapping, configurations):
    """A scripted model exports too; exported parameters need no gradients (none computed in MD)."""
    path = export_force_field(torch.jit.script(copy.deepcopy(model)), tmp_path / "scripted.pt", priors=None,
                              mapping=mapping, temperature=TEMPERATURE)
    force_field = FlowMatchForceField.load(path)
    assert force_field.priors is None and force_field.metadata["training"] == {}
    assert not any(parameter.requires_grad for parameter in force_field.module.parameters())
    positions = torch.tensor(configurations[3])
    expected = copy.deepcopy(model).double()(positions)
    assert float(force_field.module(positions).detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    system = force_field.create_system(mapping.cg_topology())
    assert system.getNumForces() == 1  # the network alone
    energy, _ = openmm_energy_and_forces(system, configurations[3])
    assert energy == pytest.approx(float(expected.detach()), rel=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_cuda_platform_matches_the_module(artifact, priors, mapping, configurations, cuda_graphs):
    """Mixed precision on CUDA (float32 positions into the module), with and without CUDA graphs."""
    force_field = FlowMatchForceField.load(artifact)
    system = force_field.create_system(replicate_topology(mapping.cg_topology(), 4),
                                       platform_hint="CUDA" if cuda_graphs else None)
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE, 1.0, 0.002)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CUDA"), {"Precision": "mixed"})
    context.setPositions(configurations[:4].reshape(-1, 3))
    integrator.step(30)  # past TorchForce's CUDA-graph warm-up, so that graph replays are checked
    state = context.getState(getPositions=True, getEnergy=True, getForces=True)
    positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    expected_energy, expected_forces = reference_energy_and_forces(force_field, priors, np.asarray(positions))
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert energy == pytest.approx(expected_energy, rel=1e-4, abs=1e-3)
    np.testing.assert_allclose(forces, expected_forces, rtol=1e-3, atol=1e-3 * np.abs(expected_forces).max())
