"""The chignolin benchmark's plumbing on a tiny synthetic Cα data set (the ``quick`` preset).

Two short "runs" of the 10-bead CLN025 Cα chain: frames scattered around the crystal structure
(folded) and around a stretched copy of it (unfolded), with forces of a harmonic restraint, written
as ``chunk_*.npz`` like ../shared/data/chignolin. Checks the stages, the cache, the results JSON
(kinetic temperature, time step, protein metrics for both methods) and the bad-input errors; it
does not check accuracy (tiny networks, a few steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import mdtraj
import numpy as np
import pytest
from benchmark_helpers import load_benchmark

PDB = Path(__file__).resolve().parents[1] / "openmm_flowmatch" / "resources" / "chignolin_cln025.pdb"


def native_alpha_carbons() -> np.ndarray:
    structure = mdtraj.load(str(PDB))
    return structure.xyz[0, structure.topology.select("name CA")].astype(np.float64)


def synthetic_run(frames: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cα frames around the native structure or a 1.3× stretched copy, forces of a restraint."""
    rng = np.random.default_rng(seed)
    native = native_alpha_carbons()
    stretched = native.mean(0) + 1.3 * (native - native.mean(0))
    centres = np.where((np.arange(frames) // 25 % 2 == 0)[:, None, None], native, stretched)
    positions = centres + 0.01 * rng.standard_normal((frames, 10, 3))
    forces = -500.0 * (positions - centres)
    return positions.astype(np.float32), forces.astype(np.float32)


def write_runs(root: Path, beads: int = 10) -> Path:
    for index, name in enumerate(("seed1", "seed2")):
        directory = root / name
        directory.mkdir(parents=True)
        for chunk in range(2):
            positions, forces = synthetic_run(100, seed=10 * index + chunk)
            np.savez(directory / f"chunk_{chunk:04d}.npz", x=positions[:, :beads], f=forces[:, :beads])
    return root


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("chignolin")
    data = write_runs(root / "data")
    arguments = ["--data", str(data), "--work", str(root / "work"), "--results", str(root / "results"),
                 "--preset", "quick"]
    assert load_benchmark("chignolin").main(arguments) == 0
    results = json.loads((root / "results" / "chignolin_quick.json").read_text())
    return root, data, results


def test_both_methods_run_every_stage(finished):
    _, _, results = finished
    assert set(results["methods"]) == {"flow-matching", "force-matching"}
    for method, records in results["methods"].items():
        assert records["force_field"]["method"] == method
        assert records["simulation"]["status"] == "finished"
        kinetic = records["simulation"]["kinetic_temperature"]
        assert 100.0 < kinetic["mean"] < 1000.0 and kinetic["bath"] == pytest.approx(340.0)
        assert records["time_step"]["rows"], "the time-step check must record its rows"
        metrics = records["metrics"]["metrics"]
        assert 0.0 <= metrics["tica"]["js_divergence"] <= np.log(2) + 1e-9
        assert 0.0 <= metrics["fraction_folded"]["model"] <= 1.0
    assert results["methods"]["flow-matching"]["teacher"]["n_samples"] == 500
    assert results["methods"]["force-matching"].get("teacher") is None
    floor = results["data"]["floor_run1_vs_run2"]
    assert 0.0 <= floor["tica"]["js_divergence"] <= np.log(2) + 1e-9


def test_second_invocation_reuses_every_stage(finished, caplog):
    root, data, _ = finished
    benchmark = load_benchmark("chignolin")
    stamp = {path: path.stat().st_mtime_ns for path in (root / "work").rglob("*.json")}
    arguments = ["--data", str(data), "--work", str(root / "work"), "--results", str(root / "results"),
                 "--preset", "quick"]
    assert benchmark.main(arguments) == 0
    assert {path: path.stat().st_mtime_ns for path in stamp} == stamp


def test_another_configuration_in_the_same_work_directory_is_refused(finished, caplog):
    root, data, _ = finished
    arguments = ["--data", str(data), "--work", str(root / "work"), "--results", str(root / "results"),
                 "--preset", "quick", "--set", "replicas=6"]
    assert load_benchmark("chignolin").main(arguments) == 2
    assert "replicas: was 4, now 6" in caplog.text


def test_data_of_another_molecule_is_refused(tmp_path, caplog):
    data = write_runs(tmp_path / "data", beads=5)
    arguments = ["--data", str(data), "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
                 "--preset", "quick"]
    assert load_benchmark("chignolin").main(arguments) == 2
    assert "5 beads per frame, but CLN025 has 10" in caplog.text
