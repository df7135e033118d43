"""End-to-end check of the data-efficiency benchmark protocol on a tiny synthetic data set.

The data are two short "runs" of a 5-bead chain (alanine-dipeptide-like bond lengths and angles,
φ/ψ drawn from two basins) with forces from a harmonic energy, written as ``chunk_*.npz`` like the
pregenerated set. The protocol runs with the ``quick`` preset (tiny networks, a few steps, two
replicas of 200 steps), so this checks the plumbing, caching and the split, not accuracy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmark_helpers import load_benchmark, write_alanine_like_runs


@pytest.fixture(scope="module")
def data_directory(tmp_path_factory) -> Path:
    return write_alanine_like_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark("data_efficiency")


@pytest.fixture(scope="module")
def finished_run(benchmark, data_directory, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    results = tmp_path_factory.mktemp("results")
    argv = ["--data", str(data_directory), "--work", str(work), "--results", str(results), "--preset", "quick"]
    assert benchmark.main(argv) == 0
    return work, results, argv


def test_held_out_block_is_final_fifth_and_disjoint_from_training(benchmark, data_directory):
    config = benchmark.ProtocolConfig(**benchmark.PRESETS["quick"])
    split = benchmark.load_split(data_directory, config)
    # each run: 300 frames, the last 60 held out
    assert split.reference.n_frames == 120 and split.pool.n_frames == 480
    assert set(split.pool_indices).isdisjoint(split.reference_indices)
    np.testing.assert_array_equal(split.reference_indices, np.r_[240:300, 540:600])
    for size in (60, 200, "all"):
        n_frames = benchmark.resolve_size(size, split.pool.n_frames)
        chosen = split.pool.positions[benchmark.evenly_spaced_indices(split.pool.n_frames, n_frames)]
        assert len(chosen) == n_frames
        # no training configuration equals any held-out configuration (the synthetic frames are unique)
        matches = (chosen[:, None] == split.reference.positions[None]).all(axis=(-1, -2))
        assert not matches.any()
    with pytest.raises(benchmark.ProtocolError):
        benchmark.resolve_size(10_000, split.pool.n_frames)


def test_results_json_schema(finished_run):
    work, results, _ = finished_run
    payload = json.loads((results / "data_efficiency_first_protocol.json").read_text())
    assert (results / "data_efficiency_first_protocol.png").stat().st_size > 0
    assert payload["status"] == "complete" and payload["units_complete"] == payload["units_expected"] == 2
    assert payload["data"]["reference_frames"] == 120 and payload["data"]["pool_frames"] == 480
    for key in ("protocol", "versions", "machine", "summary", "data_efficiency_ratio", "command"):
        assert key in payload
    by_method = {r["method"]: r for r in payload["results"]}
    assert set(by_method) == {"force-matching", "flow-matching"}
    for record in by_method.values():
        assert record["complete"] and record["n_frames"] == 60
        metrics = record["metrics"]
        assert 0.0 <= metrics["js_divergence"] <= math.log(2.0) + 1e-12
        assert metrics["kl_divergence"] >= 0.0
        assert metrics["fes_mse"] is None or metrics["fes_mse"] >= 0.0
        times = [point["aggregate_ns"] for point in record["convergence"]]
        assert times == sorted(times) and len(times) >= 2
        # 2 replicas × (200 steps × 2 fs − 0.04 ps equilibration) = 0.72 ps
        assert times[-1] == pytest.approx(2 * (0.4 - 0.04) / 1000.0, rel=1e-6)
    teacher = by_method["flow-matching"]["teacher"]
    assert teacher["n_samples"] == 200 and teacher["n_drawn"] >= 200
    assert teacher["dropped_fraction"] == pytest.approx(teacher["n_dropped"] / teacher["n_drawn"])
    assert "teacher" not in by_method["force-matching"]


def test_rerun_skips_finished_stages(benchmark, finished_run, data_directory):
    work, results, argv = finished_run
    markers = sorted(work.rglob("*.json"))
    before = {path: path.stat().st_mtime_ns for path in markers}
    config = benchmark.ProtocolConfig(**benchmark.PRESETS["quick"])
    log = benchmark.run_protocol(data_directory, work, config)
    assert log.events and all(event["status"] == "cached" for event in log.events)
    assert {path: path.stat().st_mtime_ns for path in markers if path.name != "config.json"} == {
        path: mtime for path, mtime in before.items() if path.name != "config.json"
    }
    # a run killed after training: only the simulation and the metrics are redone
    unit = work / "seed0" / "n60" / "flow-matching"
    (unit / "metrics.json").unlink()
    (unit / "simulation.json").unlink()
    log = benchmark.run_protocol(data_directory, work, config)
    ran = [event["stage"] for event in log.events if event["status"] == "ran"]
    assert ran == ["seed 0, N=60, flow-matching: simulation", "seed 0, N=60, flow-matching: metrics"]
    # other settings in the same work directory are refused
    assert benchmark.main([*argv, "--set", "replicas=3"]) == 2


def test_efficiency_ratio_of_a_power_law(benchmark):
    """Force-matching error ∝ 1/N and flow-matching 10× better → ratio 10 where it can be read off."""
    sizes = [100, 1000, 10000, 100000]
    records = []
    for n in sizes:
        records.append({"n_frames": n, "method": "force-matching", "metrics": {"fes_mse": 100.0 / n}})
        records.append({"n_frames": n, "method": "flow-matching", "metrics": {"fes_mse": 10.0 / n}})
    rows = {row["n_frames"]: row for row in benchmark.efficiency_ratios(records, "fes_mse")}
    for n in (100, 1000, 10000):
        assert rows[n]["ratio"] == pytest.approx(10.0)
        assert rows[n]["frames_needed"] == 10 * n
    # beyond the largest measured force-matching size only a lower bound is known
    assert rows[100000]["ratio"] == "> 1"


def test_longer_simulation_extends_finished_units(benchmark, data_directory, finished_run, tmp_path):
    """--set simulation_steps=<more> continues every finished simulation; training stays cached."""
    import mdtraj

    work, results = tmp_path / "work", tmp_path / "results"
    argv = ["--data", str(data_directory), "--work", str(work), "--results", str(results), "--preset", "quick"]
    assert benchmark.main(argv) == 0
    unit = work / "seed0" / "n60" / "force-matching"
    topology = unit / "simulation" / "topology.pdb"
    before = mdtraj.load(str(unit / "simulation" / "replica_000.dcd"), top=str(topology)).xyz
    trained = {path: path.stat().st_mtime_ns for path in work.rglob("model.json")}
    assert len(trained) == 2

    assert benchmark.main([*argv, "--set", "simulation_steps=400"]) == 0
    after = mdtraj.load(str(unit / "simulation" / "replica_000.dcd"), top=str(topology)).xyz
    assert len(before) == 20 and len(after) == 40  # report interval 10 steps
    np.testing.assert_array_equal(after[:20], before)  # continued, not started again
    assert {path: path.stat().st_mtime_ns for path in work.rglob("model.json")} == trained
    payload = json.loads((results / "data_efficiency_first_protocol.json").read_text())
    assert payload["status"] == "complete" and payload["protocol"]["simulation_steps"] == 400
    for record in payload["results"]:
        assert record["simulation"]["steps"] == 400 and record["simulation"]["extended_from_steps"] == 200
        # 2 replicas × (400 steps × 2 fs − 0.04 ps equilibration)
        assert record["convergence"][-1]["aggregate_ns"] == pytest.approx(2 * (0.8 - 0.04) / 1000.0, rel=1e-6)
        assert record["halves"]["first"]["per_replica_ps"][1] == pytest.approx(record["halves"]["second"]["per_replica_ps"][0])
    # shorter simulations than the ones already run are refused
    assert benchmark.main([*argv, "--set", "simulation_steps=200"]) == 2
    # another work directory is summarised next to this one, labelled by the settings that differ
    shorter_work = finished_run[0]
    assert benchmark.main(["--work", str(work), "--results", str(results), "--report-only",
                           "--compare", str(shorter_work)]) == 0
    (other,) = json.loads((results / "data_efficiency_first_protocol.json").read_text())["comparisons"]
    assert other["settings_differing"] == {"simulation_steps": 200} and other["units_complete"] == 2
