"""The native CGNet kernel (openmm_flowmatch.native): exact against TorchScript, −∇E, serialization, dynamics."""

from __future__ import annotations

import copy
import inspect
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import openmm
import openmm.unit as unit
import pytest
from conftest import alanine_backbone_mapping, perturbed_backbones
import torch

import openmm_flowmatch
from openmm_flowmatch.export import FlowMatchForceField, export_force_field
from openmm_flowmatch.forcefield import CGNet, InvariantFeatures, MessagePassingNet
from openmm_flowmatch.forcefield.features import feature_set_options
from openmm_flowmatch.mapping import CGMapping
from openmm_flowmatch.native import (
    CHECK_TOLERANCE,
    NativeBuildError,
    NativeMismatchError,
    UnsupportedNetworkError,
    build_library,
    check_native_force,
    force_xml,
    load_native_plugin,
    native_available,
    native_network_force,
    network_parameters,
)
from openmm_flowmatch.priors import Priors

pytestmark = pytest.mark.skipif(
    not native_available(), reason="no C++ compiler (or no OpenMM C++ headers): the native CGNet kernel cannot be built"
)

TEMPERATURE = 300.0
RTOL = 1e-10


@pytest.fixture(scope="module")
def mapping() -> CGMapping:
    return alanine_backbone_mapping()


@pytest.fixture(scope="module")
def configurations(mapping) -> np.ndarray:
    """The PDB's backbone beads, perturbed by 0.01 nm (nm)."""
    return perturbed_backbones(mapping, 24)


@pytest.fixture(scope="module")
def priors(configurations, mapping) -> Priors:
    return Priors.fit(configurations, mapping.bonds, TEMPERATURE, repulsion=True)


def _export(model, path, priors, mapping) -> Path:
    kwargs = {}
    if "exported_program" in inspect.signature(export_force_field).parameters:
        kwargs["exported_program"] = False  # the .pt2 twin is not needed here
    model.training_info = {"method": "force-matching", "frames": 24, "epochs": 0, "seed": 0}
    export_force_field(model, path, priors=priors, mapping=mapping, temperature=TEMPERATURE * unit.kelvin, **kwargs)
    return path


MODELS = {
    # name: (feature set, width, layers, activation, Lipschitz bound)
    "tiny-tanh": ("dihedrals_and_distances", 8, 2, "tanh", None),
    "ala2-tanh": ("all", 160, 5, "tanh", 4.0),  # the paper's alanine-dipeptide CGNet
    "ala2-silu": ("all", 160, 5, "silu", None),
    "tiny-all-but-bonds": ("all_but_bonds", 8, 2, "tanh", 10.0),  # the chignolin flow-matching features
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, configurations, mapping, priors) -> dict:
    directory = tmp_path_factory.mktemp("native")
    result = {}
    for name, (feature_set, width, layers, activation, bound) in MODELS.items():
        torch.manual_seed(0)
        options = feature_set_options(feature_set, mapping.n_beads, mapping.bonds)
        features = InvariantFeatures.from_positions(configurations, mapping.bonds, **options)
        model = CGNet(features, hidden_width=width, n_layers=layers, activation=activation, lipschitz_bound=bound)
        if bound is None:
            with torch.no_grad():  # forces of the untrained network comparable to the priors'
                model.output_layer.weight.mul_(20.0)
        result[name] = _export(model, directory / f"{name}.pt", priors, mapping)
    return result


def _positions(configurations: np.ndarray, replicas: int, offset: int) -> np.ndarray:
    """R different configurations, one per copy, stacked as (R·n_beads, 3)."""
    frames = [configurations[(offset + r) % len(configurations)] + np.array([r, 0.0, 0.0]) for r in range(replicas)]
    return np.concatenate(frames)


def _context(system, platform: str, threads: int = 1) -> openmm.Context:
    properties = {"Threads": str(threads)} if platform == "CPU" else {}
    return openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform), properties)


def _energy_forces(context, positions):
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    return (
        state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
        np.asarray(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)),
    )


def _network_system(force, n_particles: int) -> openmm.System:
    system = openmm.System()
    for _ in range(n_particles):
        system.addParticle(12.0)
    system.addForce(copy.deepcopy(force))
    return system


def _torch_reference(force_field, positions):
    x = torch.tensor(positions, dtype=torch.float64, requires_grad=True)
    energy = force_field.module(x)
    (gradient,) = torch.autograd.grad(energy, x)
    return float(energy.detach()), -gradient.numpy()


def test_build_library_is_cached():
    path = build_library()
    assert path.is_file() and path.name.startswith("libOpenMMFlowMatchNative")
    start = time.perf_counter()
    assert build_library() == path  # second call: no compile
    assert time.perf_counter() - start < 2.0
    assert load_native_plugin() == load_native_plugin()


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
@pytest.mark.parametrize("replicas", [1, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_energies_and_forces_equal_torchscript(artifacts, configurations, name, replicas, platform):
    force_field = FlowMatchForceField.load(artifacts[name])
    force = native_network_force(force_field, replicas)  # includes the creation check
    assert force.getName() == "FlowMatchNetwork"
    context = _context(_network_system(force, 5 * replicas), platform)
    for offset in range(0, 12, 4):
        positions = _positions(configurations, replicas, offset)
        energy, forces = _energy_forces(context, positions)
        expected_energy, expected_forces = _torch_reference(force_field, positions)
        assert abs(expected_energy) > 1e-2
        assert energy == pytest.approx(expected_energy, rel=RTOL)
        np.testing.assert_allclose(forces, expected_forces, rtol=RTOL, atol=RTOL * np.abs(expected_forces).max())


def test_cpu_threads_give_identical_results(artifacts, configurations):
    force_field = FlowMatchForceField.load(artifacts["ala2-silu"])
    replicas = 11  # three blocks of four copies, the last one partial
    force = native_network_force(force_field, replicas)
    system = _network_system(force, 5 * replicas)
    positions = _positions(configurations, replicas, 0)
    one = _energy_forces(_context(system, "CPU", threads=1), positions)
    two = _energy_forces(_context(system, "CPU", threads=2), positions)
    assert one[0] == two[0]
    np.testing.assert_array_equal(one[1], two[1])
    expected_energy, expected_forces = _torch_reference(force_field, positions)
    assert one[0] == pytest.approx(expected_energy, rel=RTOL)
    np.testing.assert_allclose(one[1], expected_forces, rtol=RTOL, atol=RTOL * np.abs(expected_forces).max())


@pytest.mark.parametrize("name", ["tiny-tanh", "ala2-silu"])
def test_forces_are_minus_energy_gradient(artifacts, configurations, name):
    force_field = FlowMatchForceField.load(artifacts[name])
    force = native_network_force(force_field, 1)
    context = _context(_network_system(force, 5), "Reference")
    positions = configurations[3].copy()
    _, forces = _energy_forces(context, positions)
    step = 1e-5
    numeric = np.zeros_like(forces)
    for bead in range(5):
        for axis in range(3):
            shifted = positions.copy()
            shifted[bead, axis] += step
            plus, _ = _energy_forces(context, shifted)
            shifted[bead, axis] -= 2 * step
            minus, _ = _energy_forces(context, shifted)
            numeric[bead, axis] = -(plus - minus) / (2 * step)
    np.testing.assert_allclose(forces, numeric, rtol=1e-6, atol=1e-6 * np.abs(forces).max())


def _native_system(force_field, mapping, replicas: int) -> openmm.System:
    """create_system's System (priors + TorchForce) with the TorchForce replaced by the native force."""
    from openmm_flowmatch.export import replicate_topology

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript deprecation notice of torch >= 2.10
        system = force_field.create_system(replicate_topology(mapping.cg_topology(), replicas), replicas=replicas,
                                           backend="torchforce")
    for index in reversed(range(system.getNumForces())):
        if system.getForce(index).getName() == "FlowMatchNetwork":
            system.removeForce(index)
    system.addForce(native_network_force(force_field, replicas))
    return system


def test_xml_round_trip_and_deepcopy(artifacts, mapping, configurations):
    force_field = FlowMatchForceField.load(artifacts["ala2-tanh"])
    system = _native_system(force_field, mapping, 2)
    xml = openmm.XmlSerializer.serialize(system)
    assert 'type="CGNetForce"' in xml
    restored = openmm.XmlSerializer.deserialize(xml)
    duplicate = copy.deepcopy(system)
    positions = _positions(configurations, 2, 5)
    energy, forces = _energy_forces(_context(system, "CPU"), positions)
    for other in (restored, duplicate):
        other_energy, other_forces = _energy_forces(_context(other, "CPU"), positions)
        assert other_energy == energy  # weights are stored exactly (base64 float64)
        np.testing.assert_array_equal(other_forces, forces)
    # the round-tripped force serializes to the same text
    assert openmm.XmlSerializer.serialize(restored) == xml


def test_deserializing_without_the_plugin_fails_clearly(artifacts, tmp_path):
    """Documented pitfall: a fresh process must call load_native_plugin() before deserializing."""
    force_field = FlowMatchForceField.load(artifacts["tiny-tanh"])
    path = tmp_path / "force.xml"
    path.write_text(force_xml(network_parameters(force_field), 1))
    script = (
        "import sys, openmm\n"
        "text = open(sys.argv[1]).read()\n"
        "try:\n    openmm.XmlSerializer.deserialize(text)\nexcept Exception as error:\n    print('ERROR', error)\n"
        "from openmm_flowmatch.native import load_native_plugin\nload_native_plugin()\n"
        "print('OK', openmm.XmlSerializer.deserialize(text).getName())\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(openmm_flowmatch.__file__).parents[1])})
    assert result.returncode == 0, result.stderr
    assert "ERROR" in result.stdout and "CGNetForce" in result.stdout
    assert "OK FlowMatchNetwork" in result.stdout


def test_energy_is_conserved_by_verlet(artifacts, mapping, configurations):
    """NVE with the priors and the native network (ala2-sized, tanh): 4000 steps of 0.5 fs.

    The total energy must stay within 0.5 % of the mean kinetic energy (~16 kJ/mol), for the drift
    (last − first) and the spread (max − min); measured: drift 0.003 %, spread 0.010 %.
    """
    force_field = FlowMatchForceField.load(artifacts["ala2-tanh"])
    system = _native_system(force_field, mapping, 1)
    integrator = openmm.VerletIntegrator(0.0005)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"), {"Threads": "1"})
    context.setPositions(configurations[0])
    context.setVelocitiesToTemperature(TEMPERATURE, 1)
    totals, kinetics = [], []
    for _ in range(40):
        integrator.step(100)
        state = context.getState(getEnergy=True)
        kinetic = state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
        totals.append(kinetic + state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        kinetics.append(kinetic)
    totals = np.asarray(totals)
    scale = float(np.mean(kinetics))
    assert np.all(np.isfinite(totals)) and scale > 1.0
    assert abs(totals[-1] - totals[0]) < 0.005 * scale
    assert np.ptp(totals) < 0.005 * scale


def test_message_passing_net_is_refused(tmp_path, configurations, mapping, priors):
    torch.manual_seed(0)
    model = MessagePassingNet([0, 1, 2, 3, 1], bonds=mapping.bonds, hidden_width=8, n_interactions=1, n_radial=4)
    force_field = FlowMatchForceField.load(_export(model, tmp_path / "mp.pt", priors, mapping))
    with pytest.raises(UnsupportedNetworkError, match="only CGNet.*MessagePassingNet.*torchforce"):
        native_network_force(force_field, 1)


def test_unsupported_activation_is_refused(tmp_path, configurations, mapping, priors):
    torch.manual_seed(0)
    model = CGNet(InvariantFeatures.from_positions(configurations, mapping.bonds), hidden_width=8, n_layers=2,
                  activation="relu")
    force_field = FlowMatchForceField.load(_export(model, tmp_path / "relu.pt", priors, mapping))
    with pytest.raises(UnsupportedNetworkError, match="activations.*ReLU"):
        native_network_force(force_field, 1)


def test_a_wrong_force_fails_the_creation_check(artifacts):
    force_field = FlowMatchForceField.load(artifacts["tiny-tanh"])
    parameters = network_parameters(force_field)
    parameters["mean"] = parameters["mean"] + 1e-6  # a slightly wrong standardisation
    force = openmm.XmlSerializer.deserialize(force_xml(parameters, 2))
    with pytest.raises(NativeMismatchError, match="differs from the TorchScript module"):
        check_native_force(force, force_field, 2)
    good = native_network_force(force_field, 2, check=False)
    errors = check_native_force(good, force_field, 2, platforms=("Reference", "CPU"))
    assert errors["energy"] < CHECK_TOLERANCE and errors["forces"] < CHECK_TOLERANCE


def test_particle_count_mismatch_is_an_openmm_error(artifacts):
    force = native_network_force(FlowMatchForceField.load(artifacts["tiny-tanh"]), 2, check=False)
    with pytest.raises(openmm.OpenMMException, match="2 copies of 5 beads"):
        _context(_network_system(force, 5), "Reference")


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(NativeBuildError, match="no C\\+\\+ compiler"):
        build_library(force=True)


@pytest.mark.parametrize("replicas", [1, 3])
def test_create_system_native_backend_equals_torchforce(artifacts, mapping, configurations, replicas):
    """FlowMatchForceField.create_system(backend="native"): the whole System (priors + network)
    gives the TorchForce System's energy and forces on the CPU platform."""
    from openmm_flowmatch.topology import replicate_topology

    force_field = FlowMatchForceField.load(next(iter(artifacts.values())))
    topology = replicate_topology(mapping.cg_topology(), replicas)
    positions = _positions(configurations, replicas, offset=5)
    results = {}
    for backend in ("native", "torchforce"):
        system = force_field.create_system(topology, backend=backend)
        results[backend] = _energy_forces(_context(system, "CPU"), positions)
    assert results["native"][0] == pytest.approx(results["torchforce"][0], rel=1e-10, abs=1e-10)
    np.testing.assert_allclose(results["native"][1], results["torchforce"][1], rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ GPU kernel (common compute layer)
def _opencl_missing() -> str:
    try:
        openmm.Platform.getPlatformByName("OpenCL")
    except Exception:  # noqa: BLE001 - OpenMM raises a plain Exception for unknown platforms
        return "no OpenCL platform in OpenMM (install an OpenCL runtime, e.g. Debian's pocl-opencl-icd)"
    return ""


needs_opencl = pytest.mark.skipif(bool(_opencl_missing()), reason=_opencl_missing() or "OpenCL present")
GPU_PLATFORMS = [pytest.param("OpenCL", marks=needs_opencl), pytest.param("CUDA", marks=pytest.mark.gpu)]
"""The common-compute kernel on OpenCL (pocl runs it on this CPU, in CI too) and CUDA (`gpu` tests)."""
SINGLE_RTOL = 1e-5  # single precision (float positions, network and features)


def _gpu_context(system, platform: str, precision: str, integrator=None) -> openmm.Context:
    from openmm_flowmatch.native import gpu_unavailable_reasons, native_platforms

    if platform not in native_platforms():
        pytest.fail(f"OpenMM has a {platform} platform but the native {platform} kernel is missing: "
                    f"{gpu_unavailable_reasons()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return openmm.Context(system, integrator or openmm.VerletIntegrator(0.001),
                              openmm.Platform.getPlatformByName(platform), {"Precision": precision})


def _overlapping_copies(configurations: np.ndarray, replicas: int, offset: int) -> np.ndarray:
    """R configurations near the origin (float32 positions far from it would limit single precision)."""
    return np.concatenate([configurations[(offset + r) % len(configurations)] for r in range(replicas)])


@pytest.mark.parametrize("platform", GPU_PLATFORMS)
@pytest.mark.parametrize("replicas", [1, 3, 40])
@pytest.mark.parametrize("name", list(MODELS))
def test_gpu_kernel_equals_torchscript(artifacts, configurations, name, replicas, platform):
    """Single precision: energy within 1e-5 of the energy scale, forces within 1e-5·max|F|; double: 1e-9.

    The energy scale is max(Σ_r |E_r|, 1 kJ/mol) over the copies' energies E_r: the total of R copies
    can cancel to almost nothing (0.015 kJ/mol from copies of ±20 kJ/mol), below what float32 resolves.
    """
    force_field = FlowMatchForceField.load(artifacts[name])
    system = _network_system(native_network_force(force_field, replicas), 5 * replicas)
    contexts = {precision: _gpu_context(system, platform, precision) for precision in ("single", "double")}
    for offset in (0, 7):
        positions = _overlapping_copies(configurations, replicas, offset)
        expected_energy, expected_forces = _torch_reference(force_field, positions)
        scale = max(sum(abs(_torch_reference(force_field, copy)[0]) for copy in positions.reshape(replicas, 5, 3)), 1.0)
        for precision, tolerance in (("single", SINGLE_RTOL), ("double", 1e-9)):
            energy, forces = _energy_forces(contexts[precision], positions)
            assert abs(energy - expected_energy) <= tolerance * scale, (precision, energy, expected_energy, scale)
            assert np.abs(forces - expected_forces).max() <= tolerance * np.abs(expected_forces).max(), precision


@pytest.mark.parametrize("platform", GPU_PLATFORMS)
def test_gpu_dynamics_with_priors_after_xml_round_trip(artifacts, mapping, configurations, platform):
    """A serialized native System (priors + CGNetForce) runs Langevin dynamics on the GPU platform; afterwards
    (atoms possibly reordered by OpenMM) its energy and forces equal the TorchForce System's on CPU."""
    from openmm_flowmatch.topology import replicate_topology

    force_field = FlowMatchForceField.load(artifacts["ala2-tanh"])
    replicas = 8
    topology = replicate_topology(mapping.cg_topology(), replicas)
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(
        force_field.create_system(topology, backend="native")))
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE, 1.0, 0.002)
    context = _gpu_context(system, platform, "single", integrator)
    context.setPositions(_overlapping_copies(configurations, replicas, 0))
    context.setVelocitiesToTemperature(TEMPERATURE, 1)
    integrator.step(600)
    positions = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    assert np.all(np.isfinite(positions))
    energy, forces = _energy_forces(context, positions)
    reference = force_field.create_system(topology, backend="torchforce")
    expected_energy, expected_forces = _energy_forces(_context(reference, "CPU"), positions)
    assert abs(energy - expected_energy) <= SINGLE_RTOL * max(abs(expected_energy), 1.0)
    assert np.abs(forces - expected_forces).max() <= SINGLE_RTOL * np.abs(expected_forces).max()


@pytest.mark.parametrize("platform", GPU_PLATFORMS)
def test_auto_backend_uses_the_gpu_kernel(artifacts, mapping, platform):
    from openmm_flowmatch.topology import replicate_topology

    force_field = FlowMatchForceField.load(artifacts["tiny-tanh"])
    assert force_field.auto_backend(platform)[0] == "native"
    system = force_field.create_system(replicate_topology(mapping.cg_topology(), 2), platform_hint=platform)
    assert 'type="CGNetForce"' in openmm.XmlSerializer.serialize(system)


# ------------------------------------------------------------------ self-test in a child process
def test_selftest_passes_and_is_recorded_once(monkeypatch, tmp_path):
    from openmm_flowmatch.native import selftest

    monkeypatch.setenv("OPENMM_FLOWMATCH_NATIVE_CACHE", str(tmp_path))
    library = build_library()
    outcome = selftest.library_selftest(library)
    assert outcome["main"] is None and outcome["passed"][:4] == ["load", "deserialize", "Reference", "CPU"]
    assert selftest.record_path(library).is_file()

    def no_child(*args, **kwargs):
        raise AssertionError("the recorded outcome should have been reused")

    monkeypatch.setattr(selftest.subprocess, "run", no_child)
    assert selftest.library_selftest(library) == outcome


@pytest.mark.parametrize("stage", ["load", "deserialize", "CPU"])
def test_a_crash_in_the_selftest_disables_the_library(monkeypatch, tmp_path, stage):
    """A segmentation fault of the library in the child marks it unusable (and is not cached: a testing hook)."""
    from openmm_flowmatch.native import selftest

    monkeypatch.setenv("OPENMM_FLOWMATCH_NATIVE_CACHE", str(tmp_path))
    library = build_library()
    monkeypatch.setenv(selftest.CRASH_ENV, stage)
    outcome = selftest.library_selftest(library)
    assert f"stage '{stage}'" in outcome["main"] and "SIGSEGV" in outcome["main"]
    assert not selftest.record_path(library).exists()


@needs_opencl
def test_a_crashing_gpu_kernel_disables_only_its_platform(monkeypatch, tmp_path):
    from openmm_flowmatch.native import selftest

    monkeypatch.setenv("OPENMM_FLOWMATCH_NATIVE_CACHE", str(tmp_path))
    library = build_library()
    monkeypatch.setenv(selftest.CRASH_ENV, "OpenCL")
    outcome = selftest.library_selftest(library)
    assert outcome["main"] is None and "SIGSEGV" in outcome["gpu"]["OpenCL"]


def test_auto_backend_falls_back_when_the_library_crashes(artifacts, tmp_path):
    """In a fresh process whose native library crashes in its self-test, backend="auto" builds a TorchForce
    System and says why; backend="native" raises NativeBuildError."""
    script = f"""
import logging, openmm
logging.basicConfig(level=logging.INFO)
from openmm_flowmatch.export import FlowMatchForceField
from openmm_flowmatch.native import NativeBuildError
from openmm_flowmatch.topology import replicate_topology
force_field = FlowMatchForceField.load({str(artifacts["tiny-tanh"])!r})
topology = replicate_topology(force_field.mapping.cg_topology(), 2)
system = force_field.create_system(topology, backend="auto", platform_hint="Reference")
xml = openmm.XmlSerializer.serialize(system)
print("FORCES", [kind for kind in ("TorchForce", "CGNetForce") if f'type="{{kind}}"' in xml])
try:
    force_field.create_system(topology, backend="native")
except NativeBuildError as error:
    print("NATIVE RAISED", error)
"""
    environment = {**os.environ, "OPENMM_FLOWMATCH_NATIVE_CACHE": str(tmp_path),
                   "OPENMM_FLOWMATCH_NATIVE_LIBRARY": str(build_library()), "OPENMM_FLOWMATCH_SELFTEST_CRASH": "deserialize"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TorchForce" in result.stdout and "CGNetForce" not in result.stdout
    assert "NATIVE RAISED" in result.stdout and "SIGSEGV" in result.stdout
    assert "failed its self-test" in result.stderr
