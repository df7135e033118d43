"""Benchmark: samples/s of force-field training and teacher sampling on 1 and 2 processes.

Each configuration runs in freshly spawned processes (``torch.multiprocessing``, start method
spawn); a 2-process run sets the environment ``torchrun`` would set and starts a gloo process group
on localhost, exactly as ``torchrun --nproc_per_node 2`` would. Measured:

- ``force_field``: :func:`~openmm_flowmatch.forcefield.train_force_field` for ``--steps`` optimiser
  steps at a global batch of ``--batch-size`` frames (CGNet width 160, 5 layers, tanh, Lipschitz
  bound 4, float32, precomputed features): training frames per second of training-loop wall time
  (``training_info["training_seconds"]``: steps, all-reduce, Lipschitz projection and one
  validation; not the one-off feature precomputation);
- ``teacher``: :func:`~openmm_flowmatch.flows.sample_teacher` of ``--samples`` samples with forces
  from a CGFlow of the default architecture (4 blocks, 128 hidden units; untrained, speed only, no
  outlier dropped), batch 1024: samples drawn per second of the slowest rank.

Configurations: one process with 1 thread, one process with 2 threads, two processes with 1 thread
each. Each is repeated ``--repeats`` times; the fastest repeat is reported. Data:
``../shared/data/ala2_train/seed101/chunk_0000.npz`` (beside the clone) when present (``--data``), else synthetic
5-bead chains.

Writes ``benchmarks/results/distributed.json`` (or ``--output``).

Usage::

    python benchmarks/bench_distributed.py [--steps 60] [--samples 4096] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ala2_train" / "seed101" / "chunk_0000.npz"
CONFIGURATIONS = {"1 process x 1 thread": (1, 1), "1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}
"""name: (processes, torch threads per process)."""


def load_frames(path: Path | None, n_frames: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Positions and forces of real alanine-dipeptide CG data when present, else synthetic chains."""
    if path is not None and path.exists():
        content = np.load(path)
        return content["x"][:n_frames].astype(np.float32), content["f"][:n_frames].astype(np.float32), str(path)
    generator = np.random.default_rng(0)
    steps = generator.normal(size=(n_frames, 5, 3))
    steps = (0.15 + 0.01 * generator.normal(size=(n_frames, 5, 1))) * steps / np.linalg.norm(steps, axis=-1, keepdims=True)
    forces = 100.0 * generator.normal(size=(n_frames, 5, 3))
    return np.cumsum(steps, axis=1).astype(np.float32), forces.astype(np.float32), "synthetic random 5-bead chains"


def force_field_rate(positions: np.ndarray, forces: np.ndarray, settings: dict) -> float:
    """Training frames per second of :func:`train_force_field` (this rank's view; all ranks agree)."""
    from openmm_flowmatch.forcefield import train_force_field

    steps, batch_size = settings["steps"], settings["batch_size"]
    model = train_force_field(
        (positions, forces), model_kwargs={"hidden_width": 160, "n_layers": 5, "lipschitz_bound": 4.0},
        max_steps=steps, validation_interval=steps, batch_size=batch_size, learning_rate=3e-3,
        early_stopping_patience=0, progress=False,
    )
    return steps * batch_size / model.training_info["training_seconds"]


def teacher_rate(positions: np.ndarray, settings: dict) -> float:
    """Samples drawn per second by :func:`sample_teacher` (slowest rank)."""
    from openmm_flowmatch.flows import CGFlow, sample_teacher

    torch.manual_seed(0)
    flow = CGFlow.from_data(positions[:2000])
    report = sample_teacher(flow, settings["samples"], None, 300.0, batch_size=1024, force_threshold=1e30,
                            progress=False)
    return report.samples_per_second


def _worker(rank: int, world_size: int, threads: int, port: int, settings: dict, out_dir: str) -> None:
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    positions, forces, _ = load_frames(settings["data"], settings["frames"])
    rates = {"force_field": force_field_rate(positions, forces, settings), "teacher": teacher_rate(positions, settings)}
    if rank == 0:
        Path(out_dir, "rates.json").write_text(json.dumps(rates))


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def measure(processes: int, threads: int, settings: dict) -> dict:
    """Rates (samples/s) of one configuration, from freshly spawned processes."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(processes, threads, _free_port(), settings, out_dir), nprocs=processes,
                           start_method="spawn")
        return json.loads(Path(out_dir, "rates.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--frames", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "distributed.json")
    arguments = parser.parse_args()
    settings = {"data": arguments.data, "frames": arguments.frames, "steps": arguments.steps,
                "batch_size": arguments.batch_size, "samples": arguments.samples}
    load_before = os.getloadavg()
    runs = {name: [measure(processes, threads, settings) for _ in range(arguments.repeats)]
            for name, (processes, threads) in CONFIGURATIONS.items()}
    best = {name: {task: max(run[task] for run in repeats) for task in ("force_field", "teacher")}
            for name, repeats in runs.items()}
    baseline = best["1 process x 1 thread"]
    result = {
        "benchmark": "distributed training and sampling, samples/s on 1 and 2 processes (benchmarks/bench_distributed.py)",
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "torch_version": torch.__version__,
        "settings": {
            "force_field": f"CGNet width 160, 5 layers, tanh, Lipschitz bound 4, float32, precomputed features, "
                           f"global batch {arguments.batch_size}, {arguments.steps} steps, gloo all-reduce",
            "teacher": f"CGFlow default architecture (4 blocks, 128 hidden), untrained, {arguments.samples} samples "
                       "with forces, batch 1024, no outlier dropped",
            "data": load_frames(arguments.data, 1)[2], "frames": arguments.frames, "repeats": arguments.repeats,
            "reported": "fastest repeat", "unit": "samples per second (training frames / teacher samples drawn)",
        },
        "samples_per_second": best,
        "samples_per_second_all_repeats": runs,
        "speedup_vs_1_process_1_thread": {name: {task: rates[task] / baseline[task] for task in rates}
                                          for name, rates in best.items()},
    }
    result["settings"]["data"] = str(result["settings"]["data"])
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(result, indent=1) + "\n")
    json.dump({key: result[key] for key in ("samples_per_second", "speedup_vs_1_process_1_thread")}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
