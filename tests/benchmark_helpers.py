"""Shared by the tests of the benchmark scripts: load a script as a module, synthetic chain data."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from openmm_flowmatch.flows.internal import internal_to_cartesian

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (benchmarks/ on sys.path, as when it runs as a script)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def alanine_like_run(frames: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Chain positions (frames, 5, 3) nm with φ/ψ from two basins, forces of E = ½k Σ(d − 0.145)² (kJ/mol/nm)."""
    rng = np.random.default_rng(seed)
    bonds = 0.145 + 0.004 * rng.standard_normal((frames, 4))
    angles = 1.95 + 0.05 * rng.standard_normal((frames, 3))
    basin = rng.random(frames) < 0.7
    phi = np.where(basin, -2.5, -1.4) + 0.3 * rng.standard_normal(frames)
    psi = np.where(basin, 2.6, -0.6) + 0.3 * rng.standard_normal(frames)
    dihedrals = np.stack([phi, psi], axis=1)
    positions = internal_to_cartesian(
        torch.as_tensor(bonds), torch.as_tensor(angles), torch.as_tensor(dihedrals)
    ).requires_grad_(True)
    distance = (positions[:, 1:] - positions[:, :-1]).norm(dim=-1)
    energy = (0.5 * 2.0e5 * (distance - 0.145) ** 2).sum()
    (gradient,) = torch.autograd.grad(energy, positions)
    return positions.detach().numpy().astype(np.float32), (-gradient).numpy().astype(np.float32)


def write_alanine_like_runs(root: Path, frames_per_chunk: int = 150) -> Path:
    """Two runs ``run_a``, ``run_b`` of two ``chunk_*.npz`` each (x, f), like the pregenerated data."""
    for run_index, name in enumerate(("run_a", "run_b")):
        directory = root / name
        directory.mkdir()
        for chunk in range(2):
            positions, forces = alanine_like_run(frames_per_chunk, seed=10 * run_index + chunk)
            np.savez(directory / f"chunk_{chunk:04d}.npz", x=positions, f=forces)
    return root


def run_tiny(benchmark: ModuleType, data_directory: Path, tmp_path_factory, settings: list[str]) -> tuple:
    """Run a benchmark script's ``main`` on ``data_directory`` into fresh work/results folders."""
    work = tmp_path_factory.mktemp("work")
    results = tmp_path_factory.mktemp("results")
    argv = ["--data", str(data_directory), "--work", str(work), "--results", str(results), "--set", *settings]
    assert benchmark.main(argv) == 0
    return work, results, argv
