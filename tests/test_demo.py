"""The alanine-dipeptide demo: every stage runs, outputs are consistent, re-runs skip done stages."""

from __future__ import annotations

import json

import mdtraj
import numpy as np
import pytest
import torch

from openmm_flowmatch import analysis, cli, demo


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo")
    events = []
    report = demo.run_demo(
        directory, demo.QUICK, threads=1, progress=False, stage_callback=lambda *event: events.append(event)
    )
    return directory, report, events


def test_quick_demo_runs_every_stage(quick_demo):
    directory, report, events = quick_demo
    assert [name for name, status, _ in events if status == "done"] == list(demo.STAGES)
    assert set(report["stages"]) == set(demo.STAGES)
    assert all(stage["seconds"] >= 0 for stage in report["stages"].values())
    assert "teacher samples" in report["description"]
    for key in ("metrics", "figure", "artifact", "teacher"):
        assert (directory / report["outputs"][key].split("/")[-1]).exists()
    assert (directory / "phi_psi.png").read_bytes()[:4] == b"\x89PNG"


def test_quick_demo_outputs_are_consistent(quick_demo):
    directory, report, _ = quick_demo
    sizes = demo.QUICK
    reference_frames = report["stages"]["reference"]["frames"]
    assert reference_frames == int(round(sizes.reference_ps / (sizes.reference_save_interval_steps * 0.004)))
    simulation = directory / "simulation"
    topology = str(simulation / "topology.pdb")
    trajectories = [mdtraj.load(str(simulation / f"replica_{r:03d}.dcd"), top=topology) for r in range(sizes.replicas)]
    assert [t.n_frames for t in trajectories] == [sizes.simulation_steps // sizes.report_interval] * sizes.replicas
    # the metrics in metrics.json are those of the trajectories on disk against the reference data
    from openmm_flowmatch.data.storage import read_cg_file

    reference = read_cg_file(directory / "reference" / "replica_000.h5")["positions"]
    model = np.concatenate([t.xyz[len(t.xyz) // 10 :] for t in trajectories])
    expected = analysis.compare_phi_psi(reference, model).metrics
    stored = json.loads((directory / "metrics.json").read_text())["cg_simulation"]
    assert stored["js_divergence"] == pytest.approx(expected["js_divergence"], rel=1e-6)
    assert stored["kl_divergence"] == pytest.approx(expected["kl_divergence"], rel=1e-6)


def test_rerun_skips_done_stages(quick_demo):
    directory, report, _ = quick_demo
    events = []
    again = demo.run_demo(directory, demo.QUICK, threads=1, progress=False, stage_callback=lambda *e: events.append(e))
    assert [status for _, status, _ in events] == ["cached"] * len(demo.STAGES)
    assert again["stages"] == report["stages"]


def test_interrupted_demo_resumes_missing_stages(quick_demo, tmp_path):
    directory, report, _ = quick_demo
    # a copy of the run that "stopped" after the export stage
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(directory, copy, ignore=shutil.ignore_patterns("simulation", "metrics.json", "*.png"))
    saved = json.loads((copy / demo.REPORT_FILE).read_text())
    for stage in ("simulate", "analyze"):
        del saved["stages"][stage]
    (copy / demo.REPORT_FILE).write_text(json.dumps(saved))
    events = []
    demo.run_demo(copy, demo.QUICK, threads=1, progress=False, stage_callback=lambda *e: events.append(e))
    ran = [name for name, status, _ in events if status == "done"]
    assert ran == ["simulate", "analyze"]
    # same seed, same platform: the resumed demo reproduces the original trajectory
    topology = str(directory / "simulation" / "topology.pdb")
    original = mdtraj.load(str(directory / "simulation" / "replica_000.dcd"), top=topology).xyz
    resumed = mdtraj.load(str(copy / "simulation" / "replica_000.dcd"), top=topology).xyz
    np.testing.assert_array_equal(original, resumed)


def test_other_sizes_in_same_directory_are_refused(quick_demo):
    directory, _, _ = quick_demo
    with pytest.raises(demo.DemoError, match="other sizes"):
        demo.run_demo(directory, demo.sizes_from_options(quick=True, replicas=3), progress=False)


def test_cli_demo_quick_uses_the_cache(quick_demo, capsys):
    directory, _, _ = quick_demo
    assert cli.main(["demo", "--quick", "--out", str(directory), "--threads", "1"]) == 0
    log = capsys.readouterr().err
    assert "skipped" in log and "FES MSE" in log


def test_network_file_round_trip(quick_demo):
    directory, _, _ = quick_demo
    from openmm_flowmatch.forcefield import load_network, save_network

    network = load_network(directory / "forcefield_network.pt")
    positions = torch.randn(3, 5, 3) * 0.2
    again_path = save_network(network, directory / "again.pt")
    again = load_network(again_path)
    torch.testing.assert_close(network(positions), again(positions))
    assert network.training_info["method"] == "flow-matching"


def test_basin_balance_warning_names_the_basins_that_are_off():
    reference = {"beta_pII": 0.74, "alpha_R": 0.25, "phi_positive": 0.01}
    close = {"beta_pII": 0.70, "alpha_R": 0.29, "phi_positive": 0.01}
    assert demo.basin_balance_warning({"reference": reference, "cg_simulation": close}) is None
    flipped = {"beta_pII": 0.22, "alpha_R": 0.76, "phi_positive": 0.02}
    warning = demo.basin_balance_warning({"reference": reference, "cg_simulation": flipped})
    assert "beta_pII 22% vs 74%" in warning and "alpha_R 76% vs 25%" in warning
    only_alpha = {"beta_pII": 0.66, "alpha_R": 0.10, "phi_positive": 0.24}
    warning = demo.basin_balance_warning({"reference": reference, "cg_simulation": only_alpha})
    assert "alpha_R 10% vs 25%" in warning and "beta_pII" not in warning
    assert demo.basin_balance_warning({"reference": reference, "cg_simulation": only_alpha}, tolerance=0.2) is None


@pytest.mark.slow
def test_full_demo_looks_like_alanine_dipeptide(tmp_path):
    """The default demo (about 8 min on 2 cores): β/PII and αR basins in the CG simulation.

    One thread for PyTorch and OpenMM, as `openmm-flowmatch demo` runs by default (the CG
    network is too small to gain from more; on a busy 2-core machine two threads are slower).
    """
    report = demo.run_demo(tmp_path, demo.FULL, threads=1, progress=False)
    basins = report["stages"]["analyze"]["basins"]["cg_simulation"]
    assert basins["beta_pII"] > 0.1
    assert basins["alpha_R"] > 0.05
    assert report["stages"]["analyze"]["metrics"]["js_divergence"] < 0.2
    assert report["total_seconds"] < 15 * 60
    # sound dynamics at the demo's step (≥ the paper's 2 fs): kinetic T within 2 % of the bath (or,
    # where the demo's 32 × 40 ps cannot resolve 2 %, within 3 standard errors), CG bond widths
    # within 10 % of the data's. The old network (bonds and angles as features) ran at 530 K at 2 fs.
    simulation = report["stages"]["simulate"]
    assert simulation["time_step_ps"] >= 0.002
    kinetic = simulation["kinetic_temperature"]
    assert abs(kinetic["mean"] - kinetic["bath"]) <= max(0.02 * kinetic["bath"], 3 * kinetic["standard_error"])
    bonded = simulation["bonded"]
    assert 0.9 <= bonded["bond_width_ratio_min"] and bonded["bond_width_ratio_max"] <= 1.1
