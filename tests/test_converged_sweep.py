"""benchmarks/converged_sweep.py: its data rules, budget ladder, ratio intervals, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmark_helpers import load_benchmark, run_tiny, write_alanine_like_runs

from openmm_flowmatch.data.dataset import evenly_spaced_indices

TINY = [
    "sizes=[60]", "seeds=[0,1]", "validation_frames=40", "block_size=5", "n_bootstrap=200", "base_steps=6",
    "batch_size=16", "validations_per_run=3", "patience_fraction=0.5", "lipschitz_grid=[2.0,10.0]",
    "weight_decay_grid=[0.0]", "max_doublings=1", "hidden_width=16", "n_layers=2", "flow_steps=4", "flow_batch=32",
    "flow_blocks=1", "flow_hidden=16", "teacher_samples=200", "replicas=2", "simulation_ps=0.4",
    "equilibration_ps=0.04", "report_interval=10", 'threshold_sensitivity=[0.9,"none"]', "sensitivity_sizes=[60]",
    "lipschitz_limits=[2.0,10.0]", "simulate_grid_seeds=[1]", "extra_doubling_seeds=[1]",
]


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark("converged_sweep")


@pytest.fixture(scope="module")
def data_directory(tmp_path_factory) -> Path:
    return write_alanine_like_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def finished_run(benchmark, data_directory, tmp_path_factory):
    return run_tiny(benchmark, data_directory, tmp_path_factory, TINY)


@pytest.mark.parametrize("total, n_frames", [(1000, 10), (192000, 100000), (50, 49), (30, 60)])
def test_training_frames_are_n_distinct_frames_seed_zero_the_subsample_rule(benchmark, total, n_frames):
    zero = benchmark.training_indices(total, n_frames, 0)
    np.testing.assert_array_equal(zero, evenly_spaced_indices(total, n_frames))
    for seed in (1, 2, 7):
        indices = benchmark.training_indices(total, n_frames, seed)
        assert len(indices) == min(total, n_frames) and len(np.unique(indices)) == len(indices)
        assert indices.min() >= 0 and indices.max() == total - 1
        if n_frames < total / 2:  # room to shift: another seed, other frames
            assert not np.array_equal(indices, zero)


def test_validation_halves_alternate_blocks_and_cover_the_set(benchmark):
    positions = np.arange(23, dtype=float)[:, None, None] * np.ones((1, 2, 3))
    validation = benchmark.Validation(positions, -positions, np.arange(100, 123), {"frames": 23})
    selection, scoring = benchmark.validation_halves(validation, 5)
    assert selection.global_indices.tolist() == [*range(100, 105), *range(110, 115), *range(120, 123)]
    assert scoring.global_indices.tolist() == [*range(105, 110), *range(115, 120)]
    np.testing.assert_array_equal(scoring.forces, -scoring.positions)
    assert selection.description["role"] == "selection" and scoring.description["frames"] == 10


def test_sizes_by_seed(benchmark):
    config = benchmark.apply_settings(benchmark.SweepConfig(), ['sizes=[1000,"all"]', 'sizes_by_seed={"3": [1000, 3000]}'])
    assert benchmark.unit_sizes(config, 0, 5000) == [1000, 5000]
    assert benchmark.unit_sizes(config, 3, 5000) == [1000, 3000]


def fake_trainer(directory: Path, losses_by_steps: dict, calls: list):
    def train(path: Path, steps: int) -> dict:
        calls.append(steps)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "losses.npy", losses_by_steps[steps])
        return {"budget_steps": steps, "scoring_loss": float(losses_by_steps[steps].mean())}
    return train


def test_the_ladder_stops_at_the_first_converged_doubling(benchmark, tmp_path):
    from data_efficiency import StageLog

    rng = np.random.default_rng(0)
    noise = 1000 + 50 * rng.standard_normal(400)
    losses = {10: noise + 30.0, 20: noise + 0.01 * rng.standard_normal(400), 40: noise}
    config = benchmark.SweepConfig(base_steps=10, max_doublings=2, extra_doubling_seeds=[], block_size=20,
                                   n_bootstrap=300)
    calls: list = []
    ladder = benchmark.doubling_ladder(tmp_path, fake_trainer(tmp_path, losses, calls), config, 0, StageLog(), "t")
    # 10 → 20 moves the loss by −30 with a paired error ≪ 30: not converged; 20 → 40 by ~0: converged
    assert calls == [10, 20, 40]
    first, second = ladder["pairs"]
    assert not first["converged"] and first["difference"] == pytest.approx(-30.0, abs=0.01)
    assert second["converged"] and ladder["converged_at_steps"] == 20 and ladder["model"] == "x2"
    # capped: one doubling only, not converged → the largest budget's model
    capped = benchmark.doubling_ladder(tmp_path / "capped", fake_trainer(tmp_path, losses, []),
                                       benchmark.SweepConfig(base_steps=10, max_doublings=1, extra_doubling_seeds=[],
                                                             block_size=20), 0, StageLog(), "t")
    assert capped["converged_at_steps"] is None and capped["model"] == "x2"
    assert capped["verdict"] == "not converged up to 20 steps"
    # extra_doubling_seeds: those seeds (only) go one doubling further, here to the converged 20 → 40
    deeper = benchmark.SweepConfig(base_steps=10, max_doublings=1, extra_doubling_seeds=[3], block_size=20)
    extra_calls: list = []
    extended = benchmark.doubling_ladder(tmp_path / "extended", fake_trainer(tmp_path, losses, extra_calls), deeper, 3,
                                         StageLog(), "t")
    assert extra_calls == [10, 20, 40] and extended["converged_at_steps"] == 20 and extended["model"] == "x2"
    # the evidence rung is never the model: 20 → 40 still moving, the model stays at 2× (max_doublings=1)
    moving = {10: noise + 30.0, 20: noise + 15.0, 40: noise}
    evidence = benchmark.doubling_ladder(tmp_path / "moving", fake_trainer(tmp_path, moving, []), deeper, 3, StageLog(), "t")
    assert [rung["budget_steps"] for rung in evidence["rungs"]] == [10, 20, 40] and evidence["converged_at_steps"] is None
    assert evidence["model"] == "x2" and evidence["standard_steps"] == 20
    other_calls: list = []
    benchmark.doubling_ladder(tmp_path / "other", fake_trainer(tmp_path, losses, other_calls), deeper, 0, StageLog(), "t")
    assert other_calls == [10, 20]


def test_force_matching_doublings_by_size(benchmark):
    config = benchmark.apply_settings(
        benchmark.SweepConfig(), ["max_doublings=1", 'force_matching_doublings_by_size={"all": 5, "1000": 3}'])
    assert benchmark.force_matching_doublings(config, 5000, 5000) == 5  # "all" of a 5000-frame pool
    assert benchmark.force_matching_doublings(config, 1000, 5000) == 3
    assert benchmark.force_matching_doublings(config, 3000, 5000) == 1  # not listed: max_doublings
    assert benchmark.force_matching_doublings(benchmark.SweepConfig(max_doublings=2), 1000, 5000) == 2


def test_an_extended_ladder_doubles_until_converged_without_an_evidence_rung(benchmark, tmp_path):
    from data_efficiency import StageLog

    rng = np.random.default_rng(1)
    noise = 1000 + 50 * rng.standard_normal(400)
    losses = {10: noise + 60.0, 20: noise + 30.0, 40: noise + 0.01 * rng.standard_normal(400), 80: noise,
              160: noise}
    config = benchmark.SweepConfig(base_steps=10, max_doublings=1, extra_doubling_seeds=[0], block_size=20,
                                   n_bootstrap=300)
    calls: list = []
    ladder = benchmark.doubling_ladder(tmp_path, fake_trainer(tmp_path, losses, calls), config, 0, StageLog(), "t",
                                       max_doublings=4)
    # 10 → 20 → 40 still move, 40 → 80 does not: the model is 40 steps, and 160 is never trained
    assert calls == [10, 20, 40, 80]
    assert ladder["converged_at_steps"] == 40 and ladder["model"] == "x4" and ladder["standard_steps"] == 80
    # never converged within 2 ** 2 ×: the largest budget, and no evidence rung beyond it for seed 0
    moving = {10: noise + 60.0, 20: noise + 30.0, 40: noise}
    capped_calls: list = []
    capped = benchmark.doubling_ladder(tmp_path / "capped", fake_trainer(tmp_path, moving, capped_calls), config, 0,
                                       StageLog(), "t", max_doublings=2)
    assert capped_calls == [10, 20, 40] and capped["model"] == "x4" and capped["converged_at_steps"] is None
    # two confirmations: a lucky flat first doubling (10 → 20) does not end the ladder, 80 → 160 → 320 does
    tiny = 0.01 * rng.standard_normal(400)
    lucky = {10: noise + 60.0, 20: noise + 60.0 + tiny, 40: noise + 30.0, 80: noise + tiny, 160: noise - tiny,
             320: noise}
    once: list = []
    assert benchmark.doubling_ladder(tmp_path / "once", fake_trainer(tmp_path, lucky, once), config, 0, StageLog(),
                                     "t", max_doublings=5)["model"] == "x1"
    assert once == [10, 20]
    twice: list = []
    confirmed = benchmark.doubling_ladder(tmp_path / "twice", fake_trainer(tmp_path, lucky, twice), config, 0,
                                          StageLog(), "t", max_doublings=5, confirmations=2)
    assert twice == [10, 20, 40, 80, 160, 320] and confirmed["converged_at_steps"] == 80 and confirmed["model"] == "x8"
    assert [pair["converged"] for pair in confirmed["pairs"]] == [True, False, False, True, True]


def test_offloaded_training_equals_the_sweeps_own(benchmark, finished_run, data_directory, tmp_path):
    """prepare → run-job → adopt, then the sweep's stage resumes: the same model as training here."""
    import shutil

    from openmm_flowmatch.mapping import CGMapping
    from openmm_flowmatch.priors import Priors

    offload = load_benchmark("offload_training")
    work, _, _ = finished_run
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    jobs = offload.prepare(data_directory, copy, tmp_path / "jobs", [0], 60, [4])
    assert [job["steps"] for job in jobs] == [24] and jobs[0]["destination"].endswith("/x4")
    import torch

    threads = torch.get_num_threads()
    try:
        record = offload.run_job(tmp_path / "jobs", jobs[0]["name"], tmp_path / "runs", "cpu", 1)
    finally:
        torch.set_num_threads(threads)
    assert record["finished"] and record["steps"] == 24
    assert offload.adopt(tmp_path / "jobs", tmp_path / "runs", copy) == [jobs[0]["destination"]]
    assert offload.adopt(tmp_path / "jobs", tmp_path / "runs", copy) == []  # not again onto an equal checkpoint

    config = offload.sweep_config(copy)
    split = benchmark.load_split(data_directory, config.protocol())
    halves = benchmark.validation_halves(benchmark.select_validation(split, config), config.block_size)
    indices = benchmark.training_indices(split.pool.n_frames, 60, 0)
    data = (split.pool.positions[indices], split.pool.forces[indices])
    priors = Priors.from_dict(json.loads((copy / "seed0" / "n60" / "priors.json").read_text())["priors"])
    mapping = CGMapping.backbone(str(benchmark.default_pdb()))
    job = jobs[0]

    def stage(directory: Path) -> dict:
        return benchmark.stage_train(directory, data, priors, mapping, config, 0, "force-matching", job["steps"],
                                     job["lipschitz_bound"], job["weight_decay"], *halves)

    checkpoint = copy / job["destination"] / "checkpoint.pt"
    written = checkpoint.stat().st_mtime_ns
    adopted, here = stage(copy / job["destination"]), stage(tmp_path / "here")
    assert checkpoint.stat().st_mtime_ns == written  # resumed at its last step: no step trained, nothing saved
    assert adopted["steps_run"] == here["steps_run"] == 24 and adopted["best_step"] == here["best_step"]
    np.testing.assert_array_equal(np.load(copy / job["destination"] / "losses.npy"), np.load(tmp_path / "here" / "losses.npy"))
    assert json.loads((copy / job["destination"] / "offloaded_training.json").read_text())["steps_at_adoption"] == 24


def test_js_error_bar_resamples_whole_replicas(benchmark):
    from openmm_flowmatch.analysis import compare_phi_psi

    from benchmark_helpers import alanine_like_run

    reference = alanine_like_run(400, seed=1)[0]
    replicas = [alanine_like_run(50, seed=10 + index)[0] for index in range(6)]
    spread = benchmark.js_replica_bootstrap(reference, replicas, 100, seed=0)
    pooled = compare_phi_psi(reference, np.concatenate(replicas)).metrics["js_divergence"]
    assert spread["js"] == pytest.approx(pooled, rel=1e-12) and spread["se"] > 0 and spread["replicas"] == 6
    # identical replicas: every resample is the same histogram
    assert benchmark.js_replica_bootstrap(reference, [replicas[0]] * 5, 50, seed=0)["se"] == 0.0


@pytest.mark.parametrize("optimum, expected_bounds, winner", [
    (0.7, [0.5, 1.0, 2.0, 4.0, 10.0], 0.5),   # below the grid: halved twice, stops at the limit 0.5
    (3.0, [2.0, 4.0, 10.0], 4.0),             # inside: no extension (4 is closest to 3 in log)
    (15.0, [2.0, 4.0, 10.0, 20.0], 20.0),     # above: doubled once; 20 wins, 40 is the limit
])
def test_an_edge_optimum_extends_the_regularisation_grid(benchmark, tmp_path, monkeypatch, optimum,
                                                         expected_bounds, winner):
    from data_efficiency import StageLog

    def fake_train(directory, data, priors, mapping, config, seed, method, steps, lipschitz, weight_decay, *rest):
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "losses.npy", np.full(50, 100.0))
        loss = (math.log(lipschitz) - math.log(optimum)) ** 2 + weight_decay
        return {"lipschitz_bound": lipschitz, "weight_decay": weight_decay, "selection_loss": loss,
                "budget_steps": steps}

    monkeypatch.setattr(benchmark, "stage_train", fake_train)
    config = benchmark.SweepConfig(lipschitz_grid=[2.0, 4.0, 10.0], lipschitz_limits=[0.5, 20.0],
                                   weight_decay_grid=[0.0, 0.1], base_steps=10, max_doublings=1, block_size=10)
    outcome = benchmark.force_matching_unit(tmp_path, None, None, None, config, 0, (None, None), StageLog(), "t")
    assert sorted({cell["lipschitz_bound"] for cell in outcome["grid"]}) == expected_bounds
    assert outcome["chosen_cell"] == f"L{winner:g}_wd0"
    assert outcome["ladder"]["converged_at_steps"] == 10  # identical losses at both budgets


def records(values: dict) -> list[dict]:
    return [{"n_frames": n, "method": method, "seed": seed, "metrics": {"js_divergence": js}}
            for (n, method), per_seed in values.items() for seed, js in enumerate(per_seed)]


def test_ratio_interval_from_resampled_seeds(benchmark):
    # force matching's JS falls 10× per 10× frames; flow-matching at 1000 equals force matching at 10 000
    values = {(1000, "force-matching"): [0.1, 0.1, 0.1], (10000, "force-matching"): [0.01, 0.01, 0.01],
              (100000, "force-matching"): [0.001, 0.001, 0.001], (1000, "flow-matching"): [0.01, 0.01, 0.01],
              (10000, "flow-matching"): [0.0001, 0.0002, 0.0003]}
    rows = {row["n_frames"]: row for row in benchmark.ratio_intervals(records(values), "js_divergence", 200)}
    assert rows[1000]["ratio"] == pytest.approx(10.0) and rows[1000]["interval_95"] == pytest.approx([10.0, 10.0])
    # out of force matching's measured range: a lower bound, and an interval reaching infinity
    assert rows[10000]["ratio"] == "> 10" and rows[10000]["interval_95"] == ["inf", "inf"]
    assert rows[1000]["seeds_per_point"] == {"force-matching": 3, "flow-matching": 3}
    # spread over seeds widens the interval around the point estimate
    values[(1000, "flow-matching")] = [0.005, 0.01, 0.02]
    row = {r["n_frames"]: r for r in benchmark.ratio_intervals(records(values), "js_divergence", 500)}[1000]
    low, high = row["interval_95"]
    assert low < row["ratio"] < high
    assert benchmark.ratio_as_number("> 3") == math.inf and benchmark.ratio_as_number("<= 0.5") == 0.5


def test_tiny_sweep_end_to_end(benchmark, finished_run):
    work, results, _ = finished_run
    payload = json.loads((results / "data_efficiency.json").read_text())
    assert (results / "data_efficiency.png").stat().st_size > 0
    assert {(r["seed"], r["method"]) for r in payload["results"]} == {
        (seed, method) for seed in (0, 1) for method in ("force-matching", "flow-matching")}
    for record in payload["results"]:
        ladder = record["ladder"]
        # seed 1 (extra_doubling_seeds) runs the 4× evidence rung unless 1× → 2× converged; never its model
        evidence = record["seed"] == 1 and not ladder["pairs"][0]["converged"]
        budgets = [6, 12, 24] if evidence else [6, 12]
        assert [rung["budget_steps"] for rung in ladder["rungs"]] == budgets
        assert len(ladder["pairs"]) == len(budgets) - 1
        assert ladder["model"] == ("x1" if ladder["pairs"][0]["converged"] else "x2")
        assert record["kinetic_temperature"] > 0
        assert record["js_se"] >= 0 and set(record["kinetic_temperature_per_budget"]) == {str(b) for b in budgets}
        evidence_rows = [row for row in payload["budget_evidence"]
                         if (row["seed"], row["method"]) == (record["seed"], record["method"])]
        assert len(evidence_rows) == (1 if evidence else 0)
        if evidence:
            assert [b["steps"] for b in evidence_rows[0]["budgets"]] == budgets and evidence_rows[0]["model_steps"] == 12
        # a model unsound at 4 fs is reported at 2 fs, where it was simulated again
        first = record["first_step"]
        assert first["time_step_fs"] == 4.0
        assert record["time_step_fs"] == (4.0 if first["sound"] else 2.0)
        doubling = record["js_doubling"][0]
        assert len(record["js_doubling"]) == len(budgets) - 1
        assert doubling["converged"] == (abs(doubling["js_change"]) < doubling["se"])
        assert 0.0 <= record["metrics"]["js_divergence"] <= math.log(2.0) + 1e-12
        if record["method"] == "force-matching":
            # the winning cell has the lowest loss on the selection half
            losses = {f"L{cell['lipschitz_bound']:g}_wd{cell['weight_decay']:g}": cell["selection_loss"]
                      for cell in record["grid"]}
            assert set(losses) == {"L2_wd0", "L10_wd0"} and record["chosen_cell"] == min(losses, key=losses.get)
            assert all(cell["early_stopping_on"] == "selection half" for cell in record["grid"])
            simulated = {row["cell"] for row in record["grid_simulated"]}
            # seed 1: every cell; seed 0: only the chosen one (its 1× run is the ladder's first rung)
            assert simulated == (set(losses) if record["seed"] == 1 else {record["chosen_cell"]})
        else:
            assert record["teacher_vs_reference"]["js_divergence"] >= 0
            assert record["ladder"]["rungs"][0]["early_stopping_on"].startswith("its own last")
    # the two halves: 20 + 20 frames, disjoint; seeds trained on different frames
    assert payload["data"]["selection"]["frames"] == payload["data"]["scoring"]["frames"] == 20
    priors = [json.loads((work / f"seed{s}" / "n60" / "priors.json").read_text()) for s in (0, 1)]
    assert priors[0]["first_indices"] != priors[1]["first_indices"]
    assert payload["floor"]["js_divergence"] >= 0
    assert [row["n_frames"] for row in payload["ratios"]] == [60]
    variants = {row["quantile"]: row for row in payload["threshold_sensitivity"]}
    assert set(variants) == {0.9, "none"} and all(row["seed"] == 0 for row in variants.values())
    assert variants["none"]["force_threshold_kT2_per_nm2"] is None and variants["none"]["dropped_fraction"] == 0.0
    assert variants[0.9]["force_threshold_kT2_per_nm2"] > 0 and variants[0.9]["dropped_fraction"] > 0
    assert variants[0.9]["default_threshold_same_budget"]["quantile"] == 0.999
    assert str(work) not in json.dumps(payload)
    assert "| 60 | force-matching | [0, 1] |" in benchmark.markdown_table(payload)


def test_rerun_is_cached_and_changed_settings_are_refused(benchmark, finished_run, data_directory):
    work, _, argv = finished_run
    artifacts = {path: path.stat().st_mtime_ns for path in work.rglob("model.pt")}
    log = benchmark.run_benchmark(data_directory, work, benchmark.apply_settings(benchmark.SweepConfig(), TINY))
    # every stage came from its marker file, and every marker file in the work directory was read
    assert {event["status"] for event in log.events} == {"cached"}
    stage_files = {path for path in work.rglob("*.json")  # less run_simulation's own simulation/simulation.json
                   if path.name not in ("config.json", "outcome.json", "variant.json")
                   and path.parent.name != "simulation"}
    assert {Path(event["marker"]) for event in log.events} == stage_files
    # split + 2 seeds × [priors + FM (2 cells, the ladder's 2×) + FlM (flow, threshold, teacher, its metrics,
    # 2 rungs) + 2 methods × 2 rungs × 3 simulation stages] + seed 0's threshold variants (6 + 5 stages)
    # + seed 1's other FM grid cell (3) + 3 per model simulated again at half the step
    # + seed 1's evidence rungs (4×: training + 3 simulation stages each)
    half_steps = len(list(work.rglob("half_step/simulation.json")))
    evidence_rungs = len([path for path in (work / "seed1").rglob("force_field.json") if path.parent.name == "x4"])
    assert len(stage_files) == 1 + 2 * (1 + 3 + 6 + 2 * 2 * 3) + 6 + 5 + 3 + 3 * half_steps + 4 * evidence_rungs
    assert {path: path.stat().st_mtime_ns for path in artifacts} == artifacts
    assert benchmark.main([*argv, "base_steps=7"]) == 2
    benchmark.check_work_config(work, benchmark.apply_settings(benchmark.SweepConfig(), [*TINY, "seeds=[0,1,2]"]))


def test_flow_ladder_doubles_the_flow_and_judges_it_by_the_paired_scoring_nll(benchmark, data_directory, tmp_path):
    config = benchmark.apply_settings(benchmark.SweepConfig(), TINY)
    split = benchmark.load_split(data_directory, config.protocol())
    _, scoring = benchmark.validation_halves(benchmark.select_validation(split, config), config.block_size)
    positions = split.pool.positions[:60]
    log = benchmark.StageLog()
    single = benchmark.flow_ladder(tmp_path / "single", positions, config, 0, scoring, log, "t", 0)
    assert single["verdict"] == "one budget only" and single["flow"] == "."
    assert not (tmp_path / "single" / "flow" / "scoring_nll.npy").exists()  # no doublings: no NLL computed

    ladder = benchmark.flow_ladder(tmp_path / "unit", positions, config, 0, scoring, log, "t", 1)
    first, second = ladder["rungs"]
    assert (first["flow_steps"], second["flow_steps"]) == (4, 8) and second["directory"] == "flow_x2"
    assert (tmp_path / "unit" / "flow_x2" / "flow" / "flow.pt").exists()
    nll = [np.load(tmp_path / "unit" / r["directory"] / "flow" / "scoring_nll.npy") for r in ladder["rungs"]]
    assert all(len(values) == len(scoring.positions) for values in nll)
    finite = np.isfinite(nll[0]) & np.isfinite(nll[1])
    pair = ladder["pairs"][0]
    assert pair["difference"] == pytest.approx(float(np.mean(nll[1][finite] - nll[0][finite])))
    assert pair["converged"] == (pair["difference"] > -pair["se"])  # one-sided: no improvement beyond its error
    assert ladder["flow"] == (first["directory"] if pair["converged"] else "flow_x2")
    assert ladder["converged_at_steps"] == (4 if pair["converged"] else None)

    # a doubling that lowers the NLL by far more than its error: not converged, the larger flow is used;
    # one that raises it as much: converged (more budget does not help), the smaller flow is used
    shifted = tmp_path / "shifted"
    benchmark.flow_ladder(shifted, positions, config, 0, scoring, log, "t", 1)
    np.save(shifted / "flow_x2" / "flow" / "scoring_nll.npy",
            np.load(shifted / "flow" / "scoring_nll.npy") - 10.0)
    rerun = benchmark.flow_ladder(shifted, positions, config, 0, scoring, log, "t", 1)  # stages cached, pair recomputed
    assert rerun["pairs"][0]["difference"] == pytest.approx(-10.0) and not rerun["pairs"][0]["converged"]
    assert rerun["flow"] == "flow_x2" and rerun["verdict"] == "not converged up to 8 steps"
    np.save(shifted / "flow_x2" / "flow" / "scoring_nll.npy", np.load(shifted / "flow" / "scoring_nll.npy") + 10.0)
    worse = benchmark.flow_ladder(shifted, positions, config, 0, scoring, log, "t", 1)
    assert worse["pairs"][0]["difference"] == pytest.approx(10.0) and worse["pairs"][0]["converged"]
    assert worse["flow"] == "." and worse["verdict"] == "converged at 4 steps"


def test_doublings_at_size_takes_the_largest_entry_of_that_size(benchmark):
    by_size = {"all": 3, "1000": 2}
    assert benchmark.doublings_at_size(by_size, 1, 5000, 5000) == 3
    assert benchmark.doublings_at_size(by_size, 1, 1000, 5000) == 2
    assert benchmark.doublings_at_size(by_size, 1, 3000, 5000) == 1
    assert benchmark.doublings_at_size({}, 0, 3000, 5000) == 0


def test_flow_matching_from_another_work_directory_replaces_only_its_flow_matching_units(benchmark, finished_run,
                                                                                         tmp_path):
    import shutil

    work, _, _ = finished_run
    other = tmp_path / "longer_flows"
    shutil.copytree(work, other, ignore=shutil.ignore_patterns("*.lock"))
    # the other directory's flow-matching model of seed 1 scores differently, and it has no force matching
    shutil.rmtree(other / "seed1" / "n60" / "force-matching")
    shutil.rmtree(other / "seed0")
    outcome = json.loads((other / "seed1" / "n60" / "flow-matching" / "outcome.json").read_text())
    model = other / "seed1" / "n60" / "flow-matching" / outcome["model_directory"]
    run = model / "half_step" if (model / "half_step" / "js_bootstrap.json").exists() else model
    spread = json.loads((run / "js_bootstrap.json").read_text())
    spread["se"] = 12.5
    (run / "js_bootstrap.json").write_text(json.dumps(spread))
    merged = benchmark.write_results(work, tmp_path / "results", "cmd", flow_matching_from=other)
    by_unit = {(r["seed"], r["method"]): r for r in merged["results"]}
    assert set(by_unit) == {(s, m) for s in (0, 1) for m in ("force-matching", "flow-matching")}
    assert by_unit[(1, "flow-matching")]["from"] == "flow_matching_from" and by_unit[(1, "flow-matching")]["js_se"] == 12.5
    assert "from" not in by_unit[(0, "flow-matching")] and "from" not in by_unit[(1, "force-matching")]
    assert merged["flow_matching_from"]["units"] == [[1, 60]]
    alone = benchmark.write_results(work, tmp_path / "alone", "cmd")
    assert {r["js_se"] for r in alone["results"] if r["seed"] == 1 and r["method"] == "flow-matching"} != {12.5}
    # another data split is refused
    split = json.loads((other / "split.json").read_text())
    (other / "split.json").write_text(json.dumps({**split, "pool_frames": split["pool_frames"] + 1}))
    with pytest.raises(benchmark.ProtocolError, match="another data split"):
        benchmark.write_results(work, tmp_path / "refused", "cmd", flow_matching_from=other)
