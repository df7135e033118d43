"""The budget-doubling benchmark (benchmarks/budget_convergence.py) on a tiny synthetic data set.

Two synthetic "runs" of a 5-bead chain (alanine-dipeptide-like bonds and angles, φ/ψ from two
basins, forces of a harmonic bond energy) as ``chunk_*.npz``; tiny networks and budgets of a few
steps: this checks the stages, the validation split, the ladder bookkeeping and the cache, not accuracy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmark_helpers import load_benchmark, run_tiny, write_alanine_like_runs


TINY = [
    "sizes=[60]", "validation_frames=40", "block_size=5", "n_bootstrap=200", "base_steps=4", "multipliers=[1,2,4]",
    "batch_size=16", "validations_per_run=2", "hidden_width=16", "n_layers=2", "flow_steps=4", "flow_batch=32",
    "flow_blocks=1", "flow_hidden=16", "teacher_samples=200", "replicas=2", "simulation_ps=0.4",
    "equilibration_ps=0.04", "report_interval=10", "simulate_multipliers=[1,4]",
]



@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark("budget_convergence")


@pytest.fixture(scope="module")
def data_directory(tmp_path_factory) -> Path:
    return write_alanine_like_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def finished_run(benchmark, data_directory, tmp_path_factory):
    return run_tiny(benchmark, data_directory, tmp_path_factory, TINY)


def test_validation_frames_are_disjoint_in_time_from_training_frames(benchmark, data_directory):
    config = benchmark.build_config(TINY)
    split = benchmark.load_split(data_directory, config.protocol())
    validation = benchmark.select_validation(split, config)
    assert len(validation.positions) == 40 == len(validation.forces)
    for n_frames in (60, 200, split.pool.n_frames):
        training = split.pool_indices[benchmark.training_indices(split, n_frames)]
        assert set(training.tolist()).isdisjoint(validation.global_indices.tolist())
        # within every run every validation frame comes after every training frame
        for start, stop in benchmark.run_bounds(split):
            train_in_run = training[(training >= start) & (training < stop)]
            validation_in_run = validation.global_indices[(validation.global_indices >= start)
                                                          & (validation.global_indices < stop)]
            assert validation_in_run.size > 0 and train_in_run.size > 0
            assert train_in_run.max() < validation_in_run.min()
        # no training configuration equals a validation configuration (synthetic frames are unique)
        chosen = split.pool.positions[benchmark.training_indices(split, n_frames)]
        assert not (chosen[:, None] == validation.positions[None]).all(axis=(-1, -2)).any()
    # the same frames (and forces) whatever N, method or budget: they depend on the split alone
    again = benchmark.select_validation(split, config)
    np.testing.assert_array_equal(again.global_indices, validation.global_indices)
    np.testing.assert_array_equal(again.forces, validation.forces)
    # the held-out blocks: frames 240-299 of each 300-frame run
    assert set(validation.global_indices.tolist()) <= set(range(240, 300)) | set(range(540, 600))


def test_every_stage_runs_and_the_results_hold_the_ladders(finished_run):
    work, results, _ = finished_run
    payload = json.loads((results / "budget_convergence.json").read_text())
    assert (results / "budget_convergence.png").stat().st_size > 0
    assert payload["data"]["validation"]["frames"] == 40
    rows = {r["method"]: r for r in payload["results"]}
    assert set(rows) == {"force-matching", "flow-matching"}
    for method, row in rows.items():
        assert [b["steps"] for b in row["budgets"]] == [4, 8, 16]
        for budget in row["budgets"]:
            assert budget["early_stopping"] is False and budget["learning_rate_schedule"] == "published"
            assert budget["validation_loss_final"] > 0 and budget["validation_loss_final_se"] > 0
        for kind in ("final", "selected"):
            ladder = row[kind]
            assert len(ladder["pairs"]) == 2
            for pair, (small, large) in zip(ladder["pairs"], [(0, 1), (1, 2)]):
                # the mean paired difference is the difference of the mean losses (same frames)
                assert pair["difference"] == pytest.approx(ladder["loss"][large] - ladder["loss"][small], abs=1e-9)
                assert pair["se"] > 0
                assert pair["converged"] == (abs(pair["difference"]) < pair["se"] or pair["identical_models"])
            expected = next((ladder["steps"][i] for i, p in enumerate(ladder["pairs"]) if p["converged"]), None)
            assert ladder["first_converged_steps"] == expected
        # simulated budgets only (1x and 4x), with the kinetic temperature recorded
        simulated = [b["steps"] for b in row["budgets"] if "metrics" in b]
        assert simulated == [4, 16]
        for budget in row["budgets"]:
            if "metrics" in budget and budget["simulation"]["status"] == "finished":
                assert budget["simulation"]["kinetic_temperature"]["mean"] > 0
                assert 0.0 <= budget["metrics"]["vs_reference"]["js_divergence"] <= math.log(2.0) + 1e-12
    flow = rows["flow-matching"]["flow"]
    assert flow["teacher"]["n_samples"] == 200
    assert flow["threshold"]["force_threshold_kT2_per_nm2"] > 0
    assert math.isfinite(flow["nll"]["validation_nll"]["mean"])
    assert "doubling" in flow and flow["doubling"]["to_steps"] == 8
    assert "flow" not in rows["force-matching"]
    # no machine paths in the results
    assert str(work) not in json.dumps(payload)


def test_second_invocation_reuses_every_stage(benchmark, finished_run, data_directory):
    work, results, _ = finished_run
    markers = {path: path.stat().st_mtime_ns for path in work.rglob("*.json") if path.name != "config.json"}
    artifacts = {path: path.stat().st_mtime_ns for path in work.rglob("model.pt")}
    assert len(artifacts) == 6
    config = benchmark.build_config(TINY)
    log = benchmark.run_benchmark(data_directory, work, config)
    statuses = {event["status"] for event in log.events}
    assert statuses == {"cached"}, [e for e in log.events if e["status"] != "cached"]
    # 1 split + 1 priors + FM 3 + FlM (flow, NLL, threshold, teacher, 3) + flow 2x (2) + 2 × 2 × (sim, metrics)
    assert len(log.events) == 1 + 1 + 3 + 7 + 2 + 8
    assert {p: p.stat().st_mtime_ns for p in markers} == markers
    assert {p: p.stat().st_mtime_ns for p in artifacts} == artifacts


def test_a_lower_rung_can_be_added_and_only_it_runs(benchmark, finished_run, data_directory):
    work, results, _ = finished_run
    config = benchmark.build_config([*TINY, "multipliers=[0.5,1,2,4]"])
    benchmark.check_work_config(work, config)
    log = benchmark.run_benchmark(data_directory, work, config)
    ran = sorted(event["stage"] for event in log.events if event["status"] == "ran")
    assert ran == ["N=60, flow-matching: 0.5x = 2 steps", "N=60, force-matching: 0.5x = 2 steps"]
    payload = benchmark.collect_results(work)
    for row in payload["results"]:
        assert row["final"]["steps"] == [2, 4, 8, 16] and len(row["final"]["pairs"]) == 3


def test_changed_budget_settings_are_refused(benchmark, finished_run):
    work, results, argv = finished_run
    assert benchmark.main([*argv, "base_steps=5"]) == 2
    # settings that only add or cut work are allowed
    benchmark.check_work_config(work, benchmark.build_config([*TINY, "simulate=false"]))
