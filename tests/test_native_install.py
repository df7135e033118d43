"""The native kernel's installation and backend selection: the library compiled at install, the
reason given when it is missing, and ``backend="auto"`` falling back to TorchForce (these tests
run also where the native kernel is unavailable)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import openmm
import pytest
import torch
from conftest import alanine_backbone_mapping, perturbed_backbones

import openmm_flowmatch
import openmm_flowmatch.native as native
from openmm_flowmatch.export import FlowMatchForceField, export_force_field
from openmm_flowmatch.forcefield import CGNet, InvariantFeatures, MessagePassingNet
from openmm_flowmatch.native import build
from openmm_flowmatch.priors import Priors
from openmm_flowmatch.topology import replicate_topology

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def setting():
    mapping = alanine_backbone_mapping()
    configurations = perturbed_backbones(mapping, 24)
    priors = Priors.fit(configurations, mapping.bonds, 300.0, repulsion=True)
    return mapping, configurations, priors


def _artifact(model, path: Path, setting) -> FlowMatchForceField:
    mapping, _, priors = setting
    model.training_info = {"method": "force-matching", "frames": 24, "epochs": 0, "seed": 0}
    export_force_field(model, path, priors=priors, mapping=mapping, temperature=300.0 * openmm.unit.kelvin,
                       exported_program=False)
    return FlowMatchForceField.load(path)


@pytest.fixture(scope="module")
def cgnet(setting, tmp_path_factory) -> FlowMatchForceField:
    mapping, configurations, _ = setting
    torch.manual_seed(0)
    model = CGNet(InvariantFeatures.from_positions(configurations, mapping.bonds), hidden_width=8, n_layers=2)
    return _artifact(model, tmp_path_factory.mktemp("cgnet") / "cgnet.pt", setting)


def _has_force(system, kind: str) -> bool:
    return f'type="{kind}"' in openmm.XmlSerializer.serialize(system)


def _unavailable(monkeypatch, tmp_path) -> Path:
    """Simulate a missing library: the library path names a missing file, the plugin is not loaded."""
    missing = tmp_path / "missing" / build.LIBRARY_NAME
    monkeypatch.setenv(build.LIBRARY_ENV, str(missing))
    monkeypatch.setattr(native, "_loaded", None)
    return missing


def test_missing_library_gives_the_reason(monkeypatch, tmp_path, cgnet, setting):
    missing = _unavailable(monkeypatch, tmp_path)
    reason = native.native_unavailable_reason()
    assert reason is not None and str(missing) in reason and "does not exist" in reason
    assert not native.native_available()
    topology = replicate_topology(setting[0].cg_topology(), 1)
    with pytest.raises(native.NativeBuildError, match="native CGNet kernel is unavailable.*does not exist.*torchforce"):
        cgnet.create_system(topology, backend="native")


def test_auto_falls_back_to_torchforce_and_logs_why(monkeypatch, tmp_path, cgnet, setting, caplog):
    _unavailable(monkeypatch, tmp_path)
    topology = replicate_topology(setting[0].cg_topology(), 2)
    with caplog.at_level(logging.INFO, logger="openmm_flowmatch.export"):
        system = cgnet.create_system(topology, platform_hint="CPU")  # default backend: auto
    assert _has_force(system, "TorchForce") and not _has_force(system, "CGNetForce")
    assert "network backend: torchforce" in caplog.text and "does not exist" in caplog.text


def test_install_without_compiler_records_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    reason = build.install_library(tmp_path / "native")
    assert reason is not None and "no C++ compiler" in reason
    assert (tmp_path / "native" / "lib" / "build_error.txt").read_text().strip() == reason
    library, why = build.installed_library(tmp_path / "native" / "lib")
    assert library is None and "no C++ compiler" in why


def test_install_without_openmm_records_the_reason(tmp_path):
    reason = build.install_library(tmp_path / "native", site_dirs=[tmp_path / "empty-site-packages"])
    assert reason is not None and "OpenMM is not installed in the target environment" in reason


def test_a_library_built_for_another_openmm_is_not_used(tmp_path):
    directory = tmp_path / "lib"
    directory.mkdir()
    (directory / build.LIBRARY_NAME).write_bytes(b"not a library")
    stamp = build._stamp(build.find_openmm())
    (directory / "build.json").write_text(json.dumps({**stamp, "openmm_version": "0.0"}))
    library, why = build.installed_library(directory)
    assert library is None and "another OpenMM" in why and "'0.0'" in why
    (directory / "build.json").write_text(json.dumps(stamp))
    assert build.installed_library(directory) == (directory / build.LIBRARY_NAME, "")


def test_setup_builds_the_library_at_install():
    """setup.py's build_py step calls install_library (checked by reading setup.py: no pip run here)."""
    text = (Path(openmm_flowmatch.__file__).parents[1] / "setup.py").read_text()
    assert '"build_py": BuildPyWithNative' in text and "install_library(" in text


def test_command_line_status(monkeypatch, tmp_path):
    env = {**os.environ, build.LIBRARY_ENV: str(tmp_path / "missing.so"),
           "PYTHONPATH": str(Path(openmm_flowmatch.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-m", "openmm_flowmatch.native", "status"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 1 and "unavailable" in result.stdout and "missing.so" in result.stdout


@pytest.mark.skipif(not native.native_available(), reason=f"native kernel unavailable: {native.native_unavailable_reason()}")
def test_auto_chooses_native_for_a_cgnet_on_cpu(cgnet, setting, caplog):
    topology = replicate_topology(setting[0].cg_topology(), 2)
    with caplog.at_level(logging.INFO, logger="openmm_flowmatch.export"):
        system = cgnet.create_system(topology, platform_hint="CPU")
    assert _has_force(system, "CGNetForce") and not _has_force(system, "TorchForce")
    assert "network backend: native" in caplog.text
    assert cgnet.auto_backend("CPU")[0] == "native"


def test_auto_refuses_other_platforms_and_networks(cgnet, setting, tmp_path):
    backend, reason = cgnet.auto_backend("HIP")
    assert backend == "torchforce" and "no implementation for the HIP platform" in reason
    if "CUDA" not in native.native_platforms():
        backend, reason = cgnet.auto_backend("CUDA")
        assert backend == "torchforce" and "CUDA platform is unavailable" in reason
    mapping, _, _ = setting
    torch.manual_seed(0)
    model = MessagePassingNet([0, 1, 2, 3, 1], bonds=mapping.bonds, hidden_width=8, n_interactions=1, n_radial=4)
    message_passing = _artifact(model, tmp_path / "mp.pt", setting)
    backend, reason = message_passing.auto_backend("CPU")
    assert backend == "torchforce"
    if native.native_available():
        assert "only CGNet" in reason


@pytest.mark.skipif(not native.native_available(), reason=f"native kernel unavailable: {native.native_unavailable_reason()}")
def test_small_native_systems_default_to_the_reference_platform(cgnet, setting, tmp_path, monkeypatch):
    from openmm_flowmatch import simulation

    monkeypatch.setattr(simulation, "select_platform", lambda name=None: openmm.Platform.getPlatformByName(
        name or "CPU"))  # as on a machine without CUDA
    limit = simulation.SMALL_NATIVE_SYSTEM_BEADS
    assert simulation.default_cg_platform(cgnet, 5)[0] == "Reference"
    assert simulation.default_cg_platform(cgnet, limit, "native")[0] == "Reference"
    platform, reason = simulation.default_cg_platform(cgnet, limit + 1)
    assert platform == "CPU" and f"more than {limit}" in reason
    platform, reason = simulation.default_cg_platform(cgnet, 5, "torchforce")
    assert platform == "CPU" and "does not run on the native kernel" in reason
    # end to end: no platform named → Reference, and the result says so; a named one is kept
    mapping, configurations, _ = setting
    pdb = tmp_path / "cg.pdb"
    from openmm.app import PDBFile

    with open(pdb, "w") as handle:
        PDBFile.writeFile(mapping.cg_topology(), configurations[0] * openmm.unit.nanometer, handle)
    result = simulation.simulate_force_field(cgnet.path, pdb, tmp_path / "auto", 20, report_interval=10,
                                             progress=False)
    assert result.platform == "Reference"
    named = simulation.simulate_force_field(cgnet.path, pdb, tmp_path / "named", 20, report_interval=10,
                                            platform="CPU", progress=False)
    assert named.platform == "CPU"


def test_other_preferred_platforms_are_kept(cgnet, monkeypatch):
    from openmm_flowmatch import simulation

    class Fake:
        def getName(self):
            return "CUDA"

    monkeypatch.setattr(simulation, "select_platform", lambda name=None: Fake())
    platform, reason = simulation.default_cg_platform(cgnet, 5)
    assert platform == "CUDA" and "preferred" in reason
