"""Benchmark (diagnostic): does a flow-matching model's basin balance follow its teacher or its initialisation?

In the converged sweep (``converged_sweep.py``) seed 1's flow-matching models at N = 1k/3k put far
more of their frames in α_R than their own teachers do. This trains the CG network again on the
teacher samples of given sweep units (``--teachers``: sweep seeds, at ``--frames``), each with
several network seeds (``--inits``: initialisation and batch order), at the sweep's 1× budget and
settings, simulates each model as the sweep does, and reports φ/ψ JS (vs the held-out reference
and vs the teacher), the α_R fraction (−1.2 < ψ < 1.0) of model and teacher, and the kinetic
temperature with its time step. Every stage is cached under ``--out``.

Writes ``benchmarks/results/teacher_dependence.json`` (or ``--results``).

Usage::

    python benchmarks/teacher_dependence.py --data DIR --work SWEEP_WORK --out benchmarks/runs/teacher_dependence
        [--teachers 1 0] [--inits 0 1 11 21] [--frames 1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import converged_sweep as sweep  # noqa: E402
from data_efficiency import StageLog, atomic_write_json, default_pdb, environment, load_split  # noqa: E402

ALPHA_R_PSI = (-1.2, 1.0)
"""ψ range (rad) counted as the α_R basin."""


def alpha_r_fraction(positions: np.ndarray) -> float:
    """Fraction of CG frames with ψ inside :data:`ALPHA_R_PSI`."""
    from openmm_flowmatch.analysis import phi_psi

    psi = phi_psi(positions)[1]
    return float(np.mean((psi > ALPHA_R_PSI[0]) & (psi < ALPHA_R_PSI[1])))


def model_row(directory: Path, mapping, teacher_positions: np.ndarray, config) -> dict:
    """JS, α_R fractions and kinetic temperature of one simulated model (its sound run, as the sweep reports it)."""
    run_directory, simulation = sweep.sound_run(directory)
    metrics = json.loads((run_directory / "metrics.json").read_text())
    at_step = dataclasses.replace(config, time_step_ps=simulation["time_step_ps"])
    production = np.concatenate(sweep.production_replicas(run_directory, mapping, at_step))
    return {"js_vs_reference": metrics["vs_reference"]["js_divergence"],
            "js_vs_own_teacher": metrics["vs_own_teacher"]["js_divergence"],
            "alpha_r_model": alpha_r_fraction(production), "alpha_r_teacher": alpha_r_fraction(teacher_positions),
            "kinetic_temperature": simulation["kinetic_temperature"]["mean"],
            "time_step_fs": simulation["time_step_ps"] * 1000, "sound": sweep.is_sound(simulation)}


def run(data: Path, work: Path, out: Path, teachers: Sequence[int], inits: Sequence[int], n_frames: int) -> list[dict]:
    """Train, simulate and measure every (teacher, init); returns one row each."""
    import torch

    from openmm_flowmatch.data.storage import read_cg_file
    from openmm_flowmatch.mapping import CGMapping
    from openmm_flowmatch.priors import Priors

    torch.set_num_threads(1)
    stored = json.loads((work / "config.json").read_text())
    config = sweep.SweepConfig(**{f.name: stored[f.name] for f in dataclasses.fields(sweep.SweepConfig) if f.name in stored})
    split = load_split(data, config.protocol())
    mapping = CGMapping.backbone(str(default_pdb()))
    scoring = sweep.validation_halves(sweep.select_validation(split, config), config.block_size)[1]
    log, rows = StageLog(), []
    for teacher_seed in teachers:
        unit = work / f"seed{teacher_seed}" / f"n{n_frames}"
        positions = split.pool.positions[sweep.training_indices(split.pool.n_frames, n_frames, teacher_seed)]
        starts = positions[np.linspace(0, len(positions) - 1, config.replicas).round().astype(int)].astype(np.float64)
        priors = Priors.from_dict(json.loads((unit / "priors.json").read_text())["priors"])
        teacher = read_cg_file(unit / "flow-matching" / "flow" / "teacher.h5")
        data_pair = (np.asarray(teacher["positions"]), np.asarray(teacher["forces"]))
        for init in inits:
            directory = out / f"teacher{teacher_seed}_init{init}"
            log.run_stage(f"{directory.name}: train", directory / "force_field.json",
                          lambda d=directory, s=init: sweep.stage_train(
                              d, data_pair, priors, mapping, config, s, "flow-matching", config.base_steps,
                              config.lipschitz_bound, 0.0, None, scoring))
            sweep.simulate_model(directory, starts, mapping, config, teacher_seed, split.reference.positions,
                                 data_pair[0], log, directory.name)
            rows.append({"teacher_seed": teacher_seed, "init_seed": init, "n_frames": n_frames,
                         "budget_steps": config.base_steps, **model_row(directory, mapping, data_pair[0], config)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="directory of runs holding chunk_*.npz (x, f)")
    parser.add_argument("--work", type=Path, required=True, help="a converged_sweep work directory")
    parser.add_argument("--out", type=Path, default=sweep.REPOSITORY / "benchmarks" / "runs" / "teacher_dependence")
    parser.add_argument("--teachers", type=int, nargs="+", default=[1, 0])
    parser.add_argument("--inits", type=int, nargs="+", default=[0, 1, 11, 21])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--results", type=Path, default=sweep.RESULTS)
    arguments = parser.parse_args(argv)
    started = time.perf_counter()
    rows = run(arguments.data, arguments.work, arguments.out, arguments.teachers, arguments.inits, arguments.frames)
    results = {"benchmark": "teacher_dependence", "description": __doc__.split("\n\n")[0],
               "alpha_r_psi_range": list(ALPHA_R_PSI), "rows": rows, **environment(),
               "command": "teacher_dependence.py " + " ".join(f"--{k} {v}" for k, v in (
                   ("teachers", " ".join(map(str, arguments.teachers))), ("inits", " ".join(map(str, arguments.inits))),
                   ("frames", arguments.frames))),
               "wall_seconds_this_invocation": time.perf_counter() - started}
    arguments.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(arguments.results / "teacher_dependence.json", results)
    for row in rows:
        print(f"teacher {row['teacher_seed']} init {row['init_seed']}: JS {row['js_vs_reference']:.3f}, α_R model "
              f"{row['alpha_r_model']:.2f} vs teacher {row['alpha_r_teacher']:.2f}, "
              f"{row['kinetic_temperature']:.1f} K at {row['time_step_fs']:g} fs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
