"""The `openmm-flowmatch` command: every subcommand on tiny inputs, --help, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from openmm_flowmatch import cli

SUBCOMMANDS = [
    "generate", "fit-priors", "train-flow", "teacher", "train-ff", "export", "simulate", "analyze", "demo", "benchmark",
    "check-time-step",
]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_lists_units_and_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: openmm-flowmatch {command}")
    if command not in ("benchmark", "train-flow", "teacher", "fit-priors", "export", "train-ff"):
        assert "(K)" in text or "(ps)" in text or "(nm)" in text
    if command in ("generate", "simulate", "train-flow", "train-ff"):
        assert "(default:" in text


def test_top_level_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert command in text


def run(arguments) -> int:
    return cli.main(["--quiet", "--torch-threads", "1", *arguments])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Run generate → fit-priors → train-flow → teacher → train-ff → export → simulate → analyze."""
    from pathlib import Path

    pdb = Path(cli.__file__).resolve().parent / "resources" / "alanine_dipeptide.pdb"
    directory = tmp_path_factory.mktemp("cli")
    codes = {}
    codes["generate"] = run([
        "generate", str(pdb), "--out", str(directory / "reference"), "--duration", "4", "--equilibration", "0",
        "--save-interval", "10", "--platform", "CPU", "--threads", "1",
    ])
    reference = str(directory / "reference" / "replica_000.h5")
    codes["fit-priors"] = run(["fit-priors", reference, "--out", str(directory / "priors.json")])
    codes["train-flow"] = run([
        "train-flow", str(directory / "reference"), "--out", str(directory / "flow.pt"), "--epochs", "1",
        "--blocks", "1", "--hidden", "16",
    ])
    codes["teacher"] = run([
        "teacher", str(directory / "flow.pt"), "--out", str(directory / "teacher.h5"), "--samples", "64",
        "--reference", reference, "--batch-size", "64",
    ])
    codes["train-ff"] = run([
        "train-ff", str(directory / "teacher.h5"), "--priors", str(directory / "priors.json"), "--out",
        str(directory / "network.pt"), "--epochs", "1", "--width", "16", "--layers", "1", "--batch-size", "32",
    ])
    codes["export"] = run([
        "export", str(directory / "network.pt"), "--reference", reference, "--priors", str(directory / "priors.json"),
        "--out", str(directory / "forcefield.pt"),
    ])
    codes["simulate"] = run([
        "simulate", str(directory / "forcefield.pt"), str(pdb), "--out", str(directory / "simulation"),
        "--steps", "60", "--replicas", "2", "--report-interval", "20", "--platform", "CPU", "--threads", "1",
        "--start-from", reference, "--time-step", "0.001",
    ])
    codes["analyze"] = run([
        "analyze", "--reference", reference, "--model", str(directory / "simulation"), "--out",
        str(directory / "analysis"), "--skip", "0",
    ])
    codes["analyze-self"] = run([
        "analyze", "--reference", reference, "--model", reference, "--out", str(directory / "self"), "--skip", "0",
    ])
    codes["analyze-tica"] = run([
        "analyze", "--kind", "tica", "--lag", "5", "--reference", reference, "--model", reference, "--out",
        str(directory / "tica"), "--skip", "0", "--native", str(directory / "simulation" / "topology.pdb"),
    ])
    return directory, codes


def test_generate_writes_cg_positions_and_forces(work):
    from openmm_flowmatch.data.storage import read_cg_file

    directory, codes = work
    assert codes["generate"] == 0
    data = read_cg_file(directory / "reference" / "replica_000.h5")
    # 4 ps / (10 steps × 4 fs) = 100 frames of the 5 backbone beads
    assert data["positions"].shape == (100, 5, 3)
    assert data["forces"].shape == (100, 5, 3)
    assert np.isfinite(data["forces"]).all()


def test_fit_priors_bond_lengths_are_data_means(work):
    from openmm_flowmatch.data.storage import read_cg_file
    from openmm_flowmatch.priors import Priors

    directory, codes = work
    assert codes["fit-priors"] == 0
    priors = Priors.from_dict(json.loads((directory / "priors.json").read_text()))
    x = read_cg_file(directory / "reference" / "replica_000.h5")["positions"].astype(np.float64)
    # the prior's bond energy is minimal at the mean bond length of the data (Boltzmann inversion)
    bonds = priors.terms[0]
    lengths = np.linalg.norm(x[:, 1:] - x[:, :-1], axis=-1).mean(axis=0)
    np.testing.assert_allclose(np.asarray(bonds.lengths, dtype=float), lengths, rtol=1e-4)


def test_train_flow_and_teacher(work):
    from openmm_flowmatch.data.storage import read_cg_file
    from openmm_flowmatch.flows.model import CGFlow

    directory, codes = work
    assert codes["train-flow"] == 0 and codes["teacher"] == 0
    flow = CGFlow.load(directory / "flow.pt")
    teacher = read_cg_file(directory / "teacher.h5")
    assert teacher["positions"].shape == (64, 5, 3)
    assert "mapping" in teacher["metadata"]
    # the teacher's forces are kT ∇ log q of the saved flow
    x = torch.as_tensor(teacher["positions"][:4], dtype=torch.float32)
    forces = flow.forces(x, 300.0).detach().numpy()
    np.testing.assert_allclose(teacher["forces"][:4], forces, rtol=1e-3, atol=1e-2)


def test_train_ff_and_export_agree(work):
    from openmm_flowmatch.forcefield import load_network
    from openmm_flowmatch.export import FlowMatchForceField

    directory, codes = work
    assert codes["train-ff"] == 0 and codes["export"] == 0
    network = load_network(directory / "network.pt")
    artifact = FlowMatchForceField.load(directory / "forcefield.pt")
    assert artifact.metadata["temperature"] == pytest.approx(300.0)
    x = torch.randn(5, 3, dtype=torch.float64) * 0.2
    expected = network(x.float()[None]).double().item()
    assert artifact.module(x).item() == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_simulate_writes_frames(work):
    import mdtraj

    directory, codes = work
    assert codes["simulate"] == 0
    simulation = directory / "simulation"
    for replica in range(2):
        frames = mdtraj.load(str(simulation / f"replica_{replica:03d}.dcd"), top=str(simulation / "topology.pdb"))
        assert frames.n_frames == 3 and frames.n_atoms == 5
    # every simulation carries its diagnostics: kinetic temperature and bond widths against the data
    info = json.loads((simulation / "simulation.json").read_text())
    assert info["kinetic_temperature"]["bath"] == pytest.approx(300.0)
    assert len(info["kinetic_temperature"]["degrees_of_freedom"]) == 2
    assert info["bonded"]["source"] == "priors" and len(info["bonded"]["bond_width_ratio"]) == 4


def test_analyze_metrics(work):
    directory, codes = work
    assert codes["analyze"] == 0 and codes["analyze-self"] == 0
    metrics = json.loads((directory / "analysis" / "metrics.json").read_text())["phi-psi"]
    assert set(metrics) >= {"fes_mse", "js_divergence", "kl_divergence"}
    assert (directory / "analysis" / "phi-psi.png").read_bytes()[:4] == b"\x89PNG"
    bonded = json.loads((directory / "self" / "metrics.json").read_text())["bonded"]
    assert bonded["bond_width_ratio"] == [1.0] * 4 and bonded["angle_width_ratio"] == [1.0] * 3
    itself = json.loads((directory / "self" / "metrics.json").read_text())["phi-psi"]
    assert itself["fes_mse"] == 0.0 and itself["js_divergence"] == 0.0 and itself["kl_divergence"] == 0.0


def test_bad_input_is_one_line(tmp_path, capsys):
    code = cli.main(["simulate", str(tmp_path / "missing.pt"), str(tmp_path / "x.pdb"), "--out", str(tmp_path / "s")])
    assert code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert error[0].startswith("openmm-flowmatch simulate: error:") and "missing.pt" in error[0]
    assert "Traceback" not in error[0]


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(ValueError, match="missing.h5"):
        cli.main(["--debug", "fit-priors", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "p.json")])


def test_benchmark_lists_and_rejects_unknown(tmp_path, capsys):
    (tmp_path / "bench_example.py").write_text("import sys\nopen(sys.argv[1], 'w').write('ran')\n")
    assert cli.main(["benchmark", "--directory", str(tmp_path)]) == 0
    assert "bench-example" in capsys.readouterr().err
    # names are given with hyphens (as listed) or as the file's stem
    assert cli.main(["benchmark", "--directory", str(tmp_path), "bench-example", str(tmp_path / "out.txt")]) == 0
    assert (tmp_path / "out.txt").read_text() == "ran"
    assert cli.main(["benchmark", "--directory", str(tmp_path), "bench_example", str(tmp_path / "out2.txt")]) == 0
    assert (tmp_path / "out2.txt").read_text() == "ran"
    assert cli.main(["benchmark", "--directory", str(tmp_path), "nope"]) == 1
    assert "available: bench-example" in capsys.readouterr().err


def test_analyze_tica_of_identical_data(work):
    directory, codes = work
    assert codes["analyze-tica"] == 0
    metrics = json.loads((directory / "tica" / "metrics.json").read_text())
    assert metrics["tica"]["js_divergence"] == 0.0 and metrics["tica"]["fes_mse"] == 0.0
    assert metrics["distance_histograms_mean_js"] == 0.0
    assert metrics["rmsd_nm"]["model_mean"] == pytest.approx(metrics["rmsd_nm"]["reference_mean"])
    assert 0.0 < metrics["rmsd_nm"]["model_mean"] < 0.2


def test_feature_set_names_match_the_library():
    from openmm_flowmatch.cli import FEATURE_SET_NAMES
    from openmm_flowmatch.forcefield import DEFAULT_FEATURE_SETS, FEATURE_SETS

    assert set(FEATURE_SET_NAMES) == set(FEATURE_SETS)
    assert set(DEFAULT_FEATURE_SETS.values()) <= set(FEATURE_SET_NAMES)


def test_simulate_takes_the_recorded_sound_step_and_the_native_backend(work, tmp_path):
    """Without --time-step, `simulate` uses the step `check-time-step` recorded in the artifact;
    --backend native runs the C++ kernel and gives the TorchForce run's first frames."""
    import shutil

    import mdtraj

    from openmm_flowmatch.export import update_artifact_metadata

    directory, _ = work
    artifact = tmp_path / "forcefield.pt"
    shutil.copy(directory / "forcefield.pt", artifact)
    update_artifact_metadata(artifact, {"time_step_check": {"largest_sound_time_step": 0.0015}})
    pdb = str(directory / "simulation" / "topology.pdb")
    frames = {}
    for backend in ("native", "torchforce"):
        out = tmp_path / backend
        assert cli.main([
            "simulate", str(artifact), pdb, "--out", str(out), "--steps", "40", "--report-interval", "20",
            "--platform", "CPU", "--threads", "1", "--backend", backend,
        ]) == 0
        info = json.loads((out / "simulation.json").read_text())
        assert info["time_step"] == pytest.approx(0.0015)
        frames[backend] = mdtraj.load(str(out / "replica_000.dcd"), top=pdb).xyz
    np.testing.assert_allclose(frames["native"], frames["torchforce"], atol=1e-5)


def test_simulate_splits_replicas_over_ranks_and_each_rank_resumes(work, tmp_path):
    """Under torchrun/srun (RANK, WORLD_SIZE in the environment) `simulate` runs this rank's share
    of the replicas (5 over 2 ranks: 3 + 2) into out/rank_XXX with a rank-derived seed; re-running
    the same command continues each rank's own checkpoints without duplicating frames."""
    import os
    import subprocess
    import sys

    import mdtraj

    directory, _ = work
    pdb = str(directory / "simulation" / "topology.pdb")
    out = tmp_path / "ensemble"

    def run_rank(rank: int, steps: int) -> None:
        environment = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        command = [sys.executable, "-m", "openmm_flowmatch.cli", "simulate", str(directory / "forcefield.pt"), pdb,
                   "--out", str(out), "--replicas", "5", "--steps", str(steps), "--report-interval", "20",
                   "--time-step", "0.001", "--platform", "CPU", "--threads", "1", "--quiet"]
        subprocess.run(command, check=True, env=environment, capture_output=True, timeout=300)

    for rank in (0, 1):
        run_rank(rank, 40)
    run_rank(1, 80)  # rank 1 continues to 80 steps; rank 0 is left at 40
    counts = {rank: sorted(p.name for p in (out / f"rank_{rank:03d}").glob("replica_*.dcd")) for rank in (0, 1)}
    assert counts == {0: [f"replica_{i:03d}.dcd" for i in range(3)], 1: [f"replica_{i:03d}.dcd" for i in range(2)]}
    frames = {rank: mdtraj.load(str(out / f"rank_{rank:03d}" / "replica_000.dcd"), top=pdb).xyz for rank in (0, 1)}
    assert len(frames[0]) == 2 and len(frames[1]) == 4
    seeds = [json.loads((out / f"rank_{rank:03d}" / "simulation.json").read_text())["seed"] for rank in (0, 1)]
    assert seeds[0] == 0 and seeds[1] != 0
    with pytest.raises(Exception, match="cannot be split"):
        from openmm_flowmatch.distributed import Ranks, replica_slice

        replica_slice(1, Ranks(0, 2))
