"""The torch.export artifact (.pt2): equality with TorchScript, no torch.jit, old files, bad files, policy."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import openmm
import openmm.unit as unit
import pytest
from conftest import alanine_backbone_mapping, perturbed_backbones
import torch

from openmm_flowmatch import compatibility
from openmm_flowmatch.artifact_formats import companion_path, save_exported
from openmm_flowmatch.compatibility import TorchScriptDeprecationWarning, deprecation_notice
from openmm_flowmatch.export import (
    ArtifactError,
    FlowMatchForceField,
    export_force_field,
    read_weights,
    replicate_topology,
    update_artifact_metadata,
)
from openmm_flowmatch.forcefield import CGNet, InvariantFeatures
from openmm_flowmatch.forcefield.networks import network_from_config
from openmm_flowmatch.mapping import CGMapping
from openmm_flowmatch.priors import Priors

openmmtorch = pytest.importorskip("openmmtorch")

FIXTURES = Path(__file__).parent / "fixtures"
TEMPERATURE = 300.0
pytestmark = pytest.mark.filterwarnings("ignore::openmm_flowmatch.compatibility.TorchScriptDeprecationWarning")


@pytest.fixture(scope="module")
def mapping() -> CGMapping:
    return alanine_backbone_mapping()


@pytest.fixture(scope="module")
def configurations(mapping) -> np.ndarray:
    """The PDB's backbone beads, perturbed by 0.01 nm (nm)."""
    return perturbed_backbones(mapping, 20)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, configurations, mapping) -> Path:
    torch.manual_seed(0)
    model = CGNet(InvariantFeatures.from_positions(configurations, mapping.bonds), hidden_width=32, n_layers=3,
                  lipschitz_bound=4.0)
    with torch.no_grad():
        model.output_layer.weight.mul_(20.0)
    priors = Priors.fit(configurations, mapping.bonds, TEMPERATURE)
    path = tmp_path_factory.mktemp("artifact") / "ala2.pt"
    return export_force_field(model, path, priors=priors, mapping=mapping, temperature=TEMPERATURE)


def energy_and_forces(module, positions: np.ndarray, dtype=torch.float64) -> tuple[float, np.ndarray]:
    x = torch.tensor(positions, dtype=dtype, requires_grad=True)
    energy = module(x)
    (gradient,) = torch.autograd.grad(energy, x)
    return float(energy.detach()), -gradient.double().numpy()


def openmm_state(system, positions, platform="Reference", groups=-1) -> tuple[float, np.ndarray]:
    properties = {"Threads": "1"} if platform == "CPU" else {}
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform), properties)
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True, groups=groups)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole), np.asarray(forces)


@pytest.mark.parametrize("replicas", [1, 4])
def test_exported_program_equals_torchscript(artifact, configurations, replicas):
    scripted = FlowMatchForceField.load(artifact)
    exported = FlowMatchForceField.load(companion_path(artifact))
    assert scripted.has_torchscript and not exported.has_torchscript
    positions = configurations[:replicas].reshape(-1, 3)
    for dtype, rel in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        energy, forces = energy_and_forces(exported.module, positions, dtype)
        expected_energy, expected_forces = energy_and_forces(scripted.module, positions, dtype)
        assert exported.module(torch.tensor(positions, dtype=dtype)).dtype == dtype
        assert energy == pytest.approx(expected_energy, rel=rel, abs=rel)
        np.testing.assert_allclose(forces, expected_forces, rtol=rel, atol=rel * np.abs(expected_forces).max())
    assert abs(expected_energy) > 1.0
    with pytest.raises(ValueError, match="R\\*n_beads"):
        exported.module(torch.zeros(7, 3, dtype=torch.float64))


def test_pt2_loads_and_simulates_without_torch_jit(artifact, mapping, configurations, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.jit was called")

    for name in ("load", "script", "save", "trace"):
        monkeypatch.setattr(torch.jit, name, forbidden)
    field = FlowMatchForceField.load(companion_path(artifact))
    assert field.default_backend() == "exported"
    with warnings.catch_warnings():
        warnings.simplefilter("error", TorchScriptDeprecationWarning)
        system = field.create_system(replicate_topology(mapping.cg_topology(), 2))
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE, 1.0, 0.005)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"), {"Threads": "1"})
    context.setPositions(configurations[:2].reshape(-1, 3))
    integrator.step(20)
    positions = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    assert context.getStepCount() == 20 and np.all(np.isfinite(positions))


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
@pytest.mark.parametrize("replicas", [1, 3])
def test_exported_backend_forces_equal_autograd(artifact, mapping, configurations, platform, replicas):
    field = FlowMatchForceField.load(companion_path(artifact))
    system = field.create_system(replicate_topology(mapping.cg_topology(), replicas), backend="exported",
                                 network_force_group=1)
    positions = configurations[5:5 + replicas].reshape(-1, 3)
    energy, forces = openmm_state(system, positions, platform, groups={1})
    expected_energy, expected_forces = energy_and_forces(field.module, positions)
    assert energy == pytest.approx(expected_energy, rel=1e-10)
    np.testing.assert_allclose(forces, expected_forces, rtol=1e-9, atol=1e-9 * np.abs(expected_forces).max())


def test_exported_backend_from_the_pt_file_and_xml_round_trip(artifact, mapping, configurations):
    field = FlowMatchForceField.load(artifact)  # the .pt file; the backend reads its .pt2 companion
    system = field.create_system(mapping.cg_topology(), backend="exported")
    copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    reference = field.create_system(mapping.cg_topology(), backend="torchforce")
    for positions in configurations[:2]:
        energy, forces = openmm_state(copy, positions)
        expected_energy, expected_forces = openmm_state(reference, positions)
        assert energy == pytest.approx(expected_energy, rel=1e-12)
        np.testing.assert_allclose(forces, expected_forces, rtol=1e-10, atol=1e-10)


def test_release_1_artifact_still_loads():
    """tests/fixtures/artifact_v1.pt, written by the export code of commit 80ea996 (format version 1)."""
    field = FlowMatchForceField.load(FIXTURES / "artifact_v1.pt")
    assert field.metadata["format_version"] == 1 and field.metadata["model"]["hidden_width"] == 8
    expected = json.loads((FIXTURES / "artifact_v1_expected.json").read_text())
    positions = torch.tensor(expected["positions_nm"], dtype=torch.float64)
    eager = field.eager_module()  # rebuilt from the stored config and the file's own weights
    exported = field.exported_module()  # no .pt2 next to a release-1 file: exported now
    for x, energy in zip(positions, expected["network_energies_kj_per_mol"]):
        assert float(field.module(x)) == pytest.approx(energy, rel=1e-12)
        assert float(eager(x)) == pytest.approx(energy, rel=1e-12)
        assert float(exported(x)) == pytest.approx(energy, rel=1e-12)
    system = field.create_system(field.mapping.cg_topology(), backend="exported", network_force_group=1)
    assert openmm_state(system, positions[0].numpy(), groups={1})[0] == pytest.approx(
        expected["network_energies_kj_per_mol"][0], rel=1e-10)


def test_weights_and_features_read_without_running_code(artifact, configurations):
    field = FlowMatchForceField.load(companion_path(artifact))
    weights = read_weights(companion_path(artifact))  # zipfile + json + NumPy only
    state = field.network_state_dict()
    assert {f"net.{name}" for name in state} == set(weights)
    for name, tensor in state.items():
        np.testing.assert_array_equal(weights[f"net.{name}"], tensor.numpy())
    single = read_weights(companion_path(artifact), "model_float32")
    assert single["net.input_layer.weight"].dtype == np.float32
    # the metadata's network config plus those arrays rebuild the network
    network = network_from_config(field.metadata["model"]).double()
    network.load_state_dict({name[4:]: torch.from_numpy(array) for name, array in weights.items()})
    x = torch.tensor(configurations[0])
    assert float(network(x).detach()) == pytest.approx(float(field.module(x)), rel=1e-12)


def test_truncated_files_raise_one_line_errors(artifact, tmp_path):
    for source in (artifact, companion_path(artifact)):
        truncated = tmp_path / f"truncated{source.suffix}"
        data = source.read_bytes()
        truncated.write_bytes(data[: len(data) // 2])
        with pytest.raises(ArtifactError) as caught:
            FlowMatchForceField.load(truncated)
        message = str(caught.value)
        assert "\n" not in message and str(truncated) in message and "re-export" in message


def test_newer_format_versions_are_refused(artifact, tmp_path):
    field = FlowMatchForceField.load(companion_path(artifact))
    newer = tmp_path / "newer.pt2"
    save_exported(str(newer), field.exported_programs, json.dumps(dict(field.metadata, format_version=3)))
    with pytest.raises(ArtifactError, match="format version 3 is newer.*update the package") as caught:
        FlowMatchForceField.load(newer)
    assert "\n" not in str(caught.value) and str(newer) in str(caught.value)
    newer_pt = tmp_path / "newer.pt"
    module = FlowMatchForceField.load(artifact).module
    torch.jit.save(module, str(newer_pt), _extra_files={"openmm_flowmatch.json": json.dumps({"format_version": 3})})
    with pytest.raises(ArtifactError, match="update the package"):
        FlowMatchForceField.load(newer_pt)


def test_update_metadata_rewrites_both_files(artifact, tmp_path):
    path = tmp_path / "copy.pt"
    shutil.copy(artifact, path)
    shutil.copy(companion_path(artifact), companion_path(path))
    update_artifact_metadata(path, {"note": "checked"})
    assert FlowMatchForceField.load(path).metadata["note"] == "checked"
    exported = FlowMatchForceField.load(companion_path(path)).metadata
    assert exported["note"] == "checked" and exported["format_version"] == 2


def test_deprecation_rule():
    assert deprecation_notice("torchforce", True, "2.9.1") is None
    assert "deprecates" in deprecation_notice("torchforce", True, "2.10.0")
    assert "backend='exported'" in deprecation_notice("torchforce", True, "2.12.1+cu130")
    assert deprecation_notice("pythonforce", True, "2.12.1") is not None
    assert deprecation_notice("pythonforce", False, "2.12.1") is None  # eager / torch.compile'd model
    assert deprecation_notice("exported", False, "3.0") is None


def test_default_backend_warns_under_new_torch(artifact, mapping, monkeypatch):
    """The backend "auto" falls back to when native is not used is TorchForce, which warns under torch >= 2.10."""
    field = FlowMatchForceField.load(artifact)
    fallback = field.default_backend()
    assert fallback == "torchforce"  # today's users keep TorchForce
    monkeypatch.setattr(torch, "__version__", "2.12.1")
    with pytest.warns(TorchScriptDeprecationWarning, match="torch 2.12 deprecates"):
        system = field.create_system(mapping.cg_topology(), backend=fallback)
    assert 'type="TorchForce"' in openmm.XmlSerializer.serialize(system.getForce(system.getNumForces() - 1))
    monkeypatch.setattr(torch, "__version__", "2.9.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TorchScriptDeprecationWarning)
        field.create_system(mapping.cg_topology(), backend=fallback)


def test_python_torch_force_detection(artifact, mapping, monkeypatch):
    field = FlowMatchForceField.load(companion_path(artifact))
    assert compatibility.python_torch_force_class() is getattr(openmmtorch, "PythonTorchForce", None)
    if not hasattr(openmmtorch, "PythonTorchForce"):  # openmm-torch 1.10
        assert "pythontorchforce" not in compatibility.available_backends()
        with pytest.raises(ArtifactError, match="no PythonTorchForce"):
            field.network_force("pythontorchforce")

    class FakePythonTorchForce(openmm.PythonForce):
        def __init__(self, module):
            from openmm_flowmatch.export import TorchComputation

            super().__init__(TorchComputation(module))
            self.module = module

    monkeypatch.setattr(openmmtorch, "PythonTorchForce", FakePythonTorchForce, raising=False)
    assert "pythontorchforce" in compatibility.available_backends()
    assert field.default_backend() == "pythontorchforce"
    assert FlowMatchForceField.load(artifact).default_backend() == "torchforce"
    force = field.network_force()
    assert isinstance(force, FakePythonTorchForce) and force.module is field.exported_module()
