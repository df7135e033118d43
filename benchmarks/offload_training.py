"""Train force-matching budget rungs of a ``converged_sweep.py`` work directory on another machine.

The long rungs of force matching's budget ladder (``force_matching_doublings_by_size``: up to
32 × 3 000 steps on all 480k frames) take hours on two CPU cores. This tool moves exactly those
training runs elsewhere (a lent GPU) and back, without changing what is trained:

``prepare``
    For each (seed, size) unit with a chosen force-matching cell, write the training inputs that
    ``converged_sweep.stage_train`` gives ``train_force_field`` — the N training frames, the
    selection half — with the prior forces already subtracted (``forces − prior forces`` in
    float64, stored as the float32 the trainer casts to, so the tensors trained on are
    bit-identical), and ``jobs.json`` with every other argument (seed, steps, schedule,
    validation interval, patience, network) and the rung directory it belongs to. Units whose
    inputs are equal share one data file (on all frames every seed trains on the same frames).
``train``
    On the other machine: every job in its own process, all at once (``--device cuda``), each
    checkpointing as the sweep does (every 1/``validations_per_run`` of its budget); at
    ``--deadline`` seconds the unfinished ones are stopped and keep their last checkpoint.
``adopt``
    Back here: copy each job's checkpoint into its rung directory of the work directory (where
    that rung has no result yet), with ``offloaded_training.json`` saying where and how long it
    was trained. The sweep then resumes every such rung from its checkpoint: a finished one is
    only scored, exported and simulated here, an unfinished one trains on from where it stopped.

Only the optimiser steps move; the float32 arithmetic of another device differs from this CPU's
in rounding, so a rung trained there is not bit-identical to one trained here.

Usage::

    python benchmarks/offload_training.py prepare --data DIR --work WORK --out .gpu/offload \\
        --seeds 0 1 2 --size all --multipliers 8 16 32
    python benchmarks/offload_training.py train --jobs .gpu/offload --out $OUT/offload --device cuda --deadline 480
    python benchmarks/offload_training.py adopt --jobs .gpu/offload --runs RETURNED/offload --work WORK
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_efficiency import atomic_write_json as write_json  # noqa: E402
from data_efficiency import read_json  # noqa: E402

logger = logging.getLogger("offload_training")
JOBS_FILE = "jobs.json"
OFFLOADED_RECORD = "offloaded_training.json"
"""Written beside an adopted checkpoint: the job, the device, steps and seconds there."""


# ------------------------------------------------------------------------------------------ prepare
def sweep_config(work: Path) -> Any:
    """The :class:`SweepConfig` recorded in ``work/config.json``."""
    from converged_sweep import SweepConfig

    recorded = read_json(Path(work) / "config.json")
    names = {item.name for item in dataclasses.fields(SweepConfig)}
    return SweepConfig(**{key: value for key, value in recorded.items() if key in names})


def residual_forces(priors: Any, positions: np.ndarray, forces: np.ndarray) -> np.ndarray:
    """``forces − prior forces`` in float64, as the float32 the trainer casts it to."""
    from openmm_flowmatch.forcefield.training import _prior_forces

    return (np.asarray(forces) - _prior_forces(priors, positions)).astype(np.float32)


def unit_inputs(split: Any, halves: tuple, work: Path, seed: int, n_frames: int) -> dict:
    """Training and selection arrays of one unit, prior forces subtracted."""
    from converged_sweep import training_indices

    from openmm_flowmatch.priors import Priors

    unit = Path(work) / f"seed{seed}" / f"n{n_frames}"
    priors = Priors.from_dict(read_json(unit / "priors.json")["priors"])
    indices = training_indices(split.pool.n_frames, n_frames, seed)
    positions, forces = split.pool.positions[indices], split.pool.forces[indices]
    selection = halves[0]
    return {"positions": positions, "residual": residual_forces(priors, positions, forces),
            "selection_positions": selection.positions,
            "selection_residual": residual_forces(priors, selection.positions, selection.forces)}


def save_inputs(out: Path, inputs: dict) -> str:
    """Write the arrays once per distinct content; returns the file name."""
    digest = hashlib.sha256()
    for key in sorted(inputs):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(inputs[key]).tobytes())
    name = f"data_{digest.hexdigest()[:12]}.npz"
    if not (out / name).exists():
        np.savez(out / name, **inputs)
    return name


def job_record(config: Any, outcome: dict, seed: int, n_frames: int, multiplier: int, data_name: str) -> dict:
    """Every argument of the sweep's ``train_force_field`` call for one rung of the chosen cell."""
    chosen = next(cell for cell in outcome["grid"]
                  if f"L{cell['lipschitz_bound']:g}_wd{cell['weight_decay']:g}" == outcome["chosen_cell"])
    steps = int(multiplier) * int(config.base_steps)
    return {
        "name": f"seed{seed}_n{n_frames}_{outcome['chosen_cell']}_x{multiplier}",
        "data": data_name, "seed": int(seed), "method": "force-matching", "steps": steps,
        "batch_size": int(config.batch_size), "lipschitz_bound": float(chosen["lipschitz_bound"]),
        "weight_decay": float(chosen["weight_decay"]), "hidden_width": int(config.hidden_width),
        "n_layers": int(config.n_layers), "activation": str(config.activation),
        "validation_interval": max(1, steps // int(config.validations_per_run)),
        "patience_steps": int(round(float(config.patience_fraction) * steps)),
        "destination": f"seed{seed}/n{n_frames}/force-matching/grid/{outcome['chosen_cell']}/x{multiplier}",
    }


def prepare(data: Path, work: Path, out: Path, seeds: Sequence[int], size: Any, multipliers: Sequence[int]) -> list:
    """Write the data files and ``jobs.json`` for the rungs ``multipliers`` of every seed at ``size``."""
    from converged_sweep import load_split, resolve_size, select_validation, validation_halves

    config = sweep_config(work)
    split = load_split(Path(data), config.protocol())
    halves = validation_halves(select_validation(split, config), config.block_size)
    n_frames = resolve_size(size, split.pool.n_frames)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for seed in seeds:
        outcome_path = Path(work) / f"seed{seed}" / f"n{n_frames}" / "force-matching" / "outcome.json"
        if not outcome_path.exists():
            raise SystemExit(f"{outcome_path} is missing: run the sweep's grid for seed {seed}, N={n_frames} first")
        data_name = save_inputs(out, unit_inputs(split, halves, work, seed, n_frames))
        for multiplier in multipliers:
            jobs.append(job_record(config, read_json(outcome_path), seed, n_frames, multiplier, data_name))
    write_json(out / JOBS_FILE, jobs)
    logger.info("%d jobs, data %s", len(jobs), sorted({job["data"] for job in jobs}))
    return jobs


# -------------------------------------------------------------------------------------------- train
def run_job(jobs_directory: Path, name: str, runs: Path, device: str, threads: int) -> dict:
    """Train one job (in this process); returns its record, also written to ``runs/name/done.json``."""
    import torch

    from openmm_flowmatch.forcefield import train_force_field

    torch.set_num_threads(int(threads))
    job = next(job for job in read_json(jobs_directory / JOBS_FILE) if job["name"] == name)
    arrays = np.load(jobs_directory / job["data"])
    directory = runs / name
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = train_force_field(
        (arrays["positions"], arrays["residual"]), None, method=job["method"],
        model_kwargs=dict(hidden_width=job["hidden_width"], n_layers=job["n_layers"], activation=job["activation"],
                          lipschitz_bound=job["lipschitz_bound"]),
        max_steps=job["steps"], batch_size=job["batch_size"],
        validation_data=(arrays["selection_positions"], arrays["selection_residual"]),
        learning_rate_schedule="published", weight_decay=job["weight_decay"],
        validation_interval=job["validation_interval"], patience_steps=job["patience_steps"],
        checkpoint_path=directory / "checkpoint.pt", seed=job["seed"], progress=False, device=device,
    )
    info = model.training_info
    record = {"job": job, "device": device_name(device), "steps": int(info["steps"]), "best_step": int(info["best_step"]),
              "stopped_early": bool(info["stopped_early"]), "training_seconds": float(info["training_seconds"]),
              "wall_seconds": time.perf_counter() - started, "finished": True}
    write_json(directory / "done.json", record)
    return record


def device_name(device: str) -> str:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{device}: {torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return f"{device}, torch {torch.__version__}"


def train_all(jobs_directory: Path, runs: Path, device: str, deadline: float, threads: int) -> list[dict]:
    """Every job in its own process at once; stop the unfinished ones after ``deadline`` seconds."""
    jobs = read_json(jobs_directory / JOBS_FILE)
    runs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    processes = {}
    for job in jobs:
        log = open(runs / f"{job['name']}.log", "w")
        command = [sys.executable, __file__, "run-job", "--jobs", str(jobs_directory), "--name", job["name"],
                   "--runs", str(runs), "--device", device, "--threads", str(threads)]
        processes[job["name"]] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log)
    while any(process.poll() is None for process, _ in processes.values()):
        if time.perf_counter() - started > deadline:
            for process, _ in processes.values():
                if process.poll() is None:
                    process.terminate()
            break
        time.sleep(2.0)
    records = []
    for name, (process, log) in processes.items():
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        done = runs / name / "done.json"
        records.append(read_json(done) if done.exists() else
                       {"job": name, "finished": False, "returncode": process.returncode,
                        "stopped_after_seconds": time.perf_counter() - started, "device": device})
    write_json(runs / "summary.json", {"device": device, "deadline_seconds": deadline, "jobs": records,
                                       "wall_seconds": time.perf_counter() - started})
    return records


# -------------------------------------------------------------------------------------------- adopt
def checkpoint_step(path: Path) -> int:
    from openmm_flowmatch.forcefield.training import _load_checkpoint

    return int(_load_checkpoint(path)["step"])


def adopt(jobs_directory: Path, runs: Path, work: Path) -> list[str]:
    """Copy every returned checkpoint into its rung directory unless that rung is done or further."""
    summary = read_json(runs / "summary.json") if (runs / "summary.json").exists() else {"jobs": []}
    records = {(record["job"]["name"] if isinstance(record["job"], dict) else record["job"]): record
               for record in summary["jobs"]}
    adopted = []
    for job in read_json(jobs_directory / JOBS_FILE):
        source = runs / job["name"] / "checkpoint.pt"
        destination = Path(work) / job["destination"]
        if not source.exists() or (destination / "force_field.json").exists():
            continue
        done = runs / job["name"] / "done.json"
        record = read_json(done) if done.exists() else records.get(job["name"], {})
        target = destination / "checkpoint.pt"
        if target.exists() and checkpoint_step(target) >= checkpoint_step(source):
            continue
        destination.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        write_json(destination / OFFLOADED_RECORD, {**record, "job": job,
                                                    "steps_at_adoption": checkpoint_step(target)})
        adopted.append(job["destination"])
    return adopted


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    making = commands.add_parser("prepare", help="write data files and jobs.json from a sweep work directory")
    making.add_argument("--data", type=Path, required=True)
    making.add_argument("--work", type=Path, required=True)
    making.add_argument("--out", type=Path, required=True)
    making.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    making.add_argument("--size", default="all")
    making.add_argument("--multipliers", type=int, nargs="+", required=True)
    training = commands.add_parser("train", help="run every job at once, stop at the deadline")
    training.add_argument("--jobs", type=Path, required=True)
    training.add_argument("--out", type=Path, required=True)
    training.add_argument("--device", default="cuda")
    training.add_argument("--deadline", type=float, default=480.0)
    training.add_argument("--threads", type=int, default=1)
    one = commands.add_parser("run-job", help="(internal) train one job in this process")
    one.add_argument("--jobs", type=Path, required=True)
    one.add_argument("--name", required=True)
    one.add_argument("--runs", type=Path, required=True)
    one.add_argument("--device", default="cuda")
    one.add_argument("--threads", type=int, default=1)
    adopting = commands.add_parser("adopt", help="copy returned checkpoints into the work directory")
    adopting.add_argument("--jobs", type=Path, required=True)
    adopting.add_argument("--runs", type=Path, required=True)
    adopting.add_argument("--work", type=Path, required=True)
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if arguments.command == "prepare":
        size = arguments.size if arguments.size == "all" else int(arguments.size)
        prepare(arguments.data, arguments.work, arguments.out, arguments.seeds, size, arguments.multipliers)
    elif arguments.command == "train":
        for record in train_all(arguments.jobs, arguments.out, arguments.device, arguments.deadline, arguments.threads):
            print(json.dumps({key: value for key, value in record.items() if key != "job"}))
    elif arguments.command == "run-job":
        run_job(arguments.jobs, arguments.name, arguments.runs, arguments.device, arguments.threads)
    else:
        for destination in adopt(arguments.jobs, arguments.runs, arguments.work):
            print("adopted", destination)
    return 0


if __name__ == "__main__":
    sys.exit(main())
