"""Benchmark: milliseconds per force-matching optimiser step, old path vs new path, on CPU.

One optimiser step of :func:`openmm_flowmatch.forcefield.train_force_field` (batch 256, Adam lr
3e-3, Lipschitz projection after the step) for a CGNet of the alanine-dipeptide size (width 160,
5 layers, tanh, Lipschitz bound 4) on 5-bead configurations, in variants that add one change at
a time:

- ``baseline``: autograd through the features at every step (double back-propagation through
  features and MLP), ``torch.linalg.matrix_norm(ord=2)`` float64 norm of every weight in the
  Lipschitz projection, the default (per-tensor) Adam: the old trainer, verbatim;
- ``power_iteration``: as baseline, but the warm-started power-iteration projection
  (``CGNet.project_lipschitz``, as it is now in every variant that has it);
- ``precomputed_features``: as baseline, but forces −Jᵀ ∂U/∂φ from precomputed features and
  Jacobians, ∂U/∂φ by autograd (double back-propagation through the MLP only);
- ``precomputed_and_power_iteration``: both (the trainer before the explicit input gradient);
- ``explicit_gradient_torch_tanh``: as the previous, but ∂U/∂φ from
  ``CGNet.energy_and_input_gradient`` (explicit reverse pass with a hand-written backward: one
  backward pass per step), tanh evaluated by ``torch.tanh``;
- ``explicit_gradient``: as the previous, tanh evaluated as 2 s(2a) − 1 (s the logistic sigmoid;
  the same values up to float rounding, ~3× cheaper than ``torch.tanh`` on CPU), as the trainer;
- ``fused_adam``: as the previous, with Adam's fused kernel (``training.adam_optimizer``): the
  trainer of the previous release;
- ``new``: as the previous, the loss and its parameter gradients computed directly from the
  explicit passes, with no autograd graph (``input_gradient.force_matching_gradients``, through
  ``_ForceData.accumulate_gradients``): what the trainer does now.

Every variant starts from the same fresh network; ``--steps`` steps are timed after 5 warm-up
steps, the variants interleaved, ``--repeats`` times; the fastest repeat is reported (and all
repeats, and their median). Data: ``../shared/data/ala2_train/seed101/chunk_0000.npz`` (beside
the clone) (``x`` nm, ``f`` kJ/mol/nm) when it exists (or ``--data FILE``), else synthetic random
5-bead chains. Also reported: the largest force difference between the precomputed-feature
force paths (explicit ∂U/∂φ as in ``new``, and autograd ∂U/∂φ) and autograd through the positions
on the same network (float32 and float64), and the largest parameter difference after 20 float64
training steps along the ``baseline`` and ``new`` paths.

Writes ``benchmarks/results/training_speed.json`` (or ``--output``).

Usage::

    python benchmarks/bench_training_speed.py [--threads 1] [--steps 60] [--repeats 3] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from openmm_flowmatch.forcefield import CGNet, InvariantFeatures
from openmm_flowmatch.forcefield.input_gradient import DERIVATIVES
from openmm_flowmatch.forcefield.training import _force_data, adam_optimizer, forces_from_features, forces_of

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ala2_train" / "seed101" / "chunk_0000.npz"


class Variant(NamedTuple):
    """One training path: which of the changes it has."""

    precompute: bool  # precomputed features and Jacobians (else autograd through the features)
    explicit_gradient: bool  # CGNet.energy_and_input_gradient (else autograd's double back-propagation)
    exact_projection: bool  # matrix_norm(ord=2) of every weight (else the power-iteration projection)
    fused_adam: bool  # training.adam_optimizer (else torch.optim.Adam's default)
    torch_tanh: bool = False  # the explicit pass with torch.tanh (else tanh as 2 s(2a) − 1, as the trainer)
    direct: bool = False  # loss gradients without autograd (force_matching_gradients), else loss.backward()


VARIANTS = {
    "baseline": Variant(False, False, True, False),
    "power_iteration": Variant(False, False, False, False),
    "precomputed_features": Variant(True, False, True, False),
    "precomputed_and_power_iteration": Variant(True, False, False, False),
    "explicit_gradient_torch_tanh": Variant(True, True, False, False, torch_tanh=True),
    "explicit_gradient": Variant(True, True, False, False),
    "fused_adam": Variant(True, True, False, True),
    "new": Variant(True, True, False, True, direct=True),
}


@contextmanager
def tanh_of(variant: Variant) -> Iterator[None]:
    """Within: the explicit input gradient evaluates tanh with ``torch.tanh`` if the variant asks."""
    original = DERIVATIVES["tanh"]
    if variant.torch_tanh:
        DERIVATIVES["tanh"] = original._replace(function=torch.tanh, inplace_function=torch.tanh_)
    try:
        yield
    finally:
        DERIVATIVES["tanh"] = original


def shown_path(path: Path) -> str:
    """``path`` as recorded in the results: relative to the clone's parent when beside it (no machine paths)."""
    repository = Path(__file__).resolve().parents[1]
    try:
        return str(Path("..") / Path(path).resolve().relative_to(repository.parent))
    except ValueError:
        return Path(path).name


def load_frames(path: Path | None, n_frames: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Positions and forces of real data when available, else synthetic chains with random forces."""
    if path is not None and path.exists():
        content = np.load(path)
        return content["x"][:n_frames].astype(np.float64), content["f"][:n_frames].astype(np.float64), shown_path(path)
    generator = np.random.default_rng(0)
    steps = generator.normal(size=(n_frames, 5, 3))
    steps = (0.15 + 0.01 * generator.normal(size=(n_frames, 5, 1))) * steps / np.linalg.norm(steps, axis=-1, keepdims=True)
    return np.cumsum(steps, axis=1), 100.0 * generator.normal(size=(n_frames, 5, 3)), "synthetic random 5-bead chains"


def make_model(positions: np.ndarray, dtype: torch.dtype) -> CGNet:
    torch.manual_seed(0)
    features = InvariantFeatures.from_positions(positions)
    return CGNet(features, hidden_width=160, n_layers=5, activation="tanh", lipschitz_bound=4.0).to(dtype)


@torch.no_grad()
def old_projection(model: CGNet) -> None:
    """The projection before the power iteration: a float64 SVD norm of every weight, every step."""
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            sigma = torch.linalg.matrix_norm(layer.weight.double(), ord=2)
            scale = float(max(1.0, float(sigma) / model.lipschitz_bound))
            if scale > 1.0:
                layer.weight.div_(scale)


def run_steps(model: CGNet, data, n_steps: int, batch_size: int, variant: Variant, seed: int = 0) -> float:
    """Seconds for ``n_steps`` optimiser steps (Adam lr 3e-3, projection after each) along ``variant``."""
    if variant.fused_adam:
        optimizer = adam_optimizer(model.parameters(), 3e-3)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    data.explicit_gradient, data.direct_gradients = variant.explicit_gradient, variant.direct
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(n_steps):
        batch = torch.randint(len(data), (batch_size,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        data.accumulate_gradients(model, batch)  # the trainer's call: loss.backward() unless variant.direct
        optimizer.step()
        if variant.exact_projection:
            old_projection(model)
        else:
            model.project_lipschitz()
    return time.perf_counter() - started


def time_variants(positions, forces, arguments) -> dict:
    """Fastest (and median) of ``repeats`` interleaved timings, ms per step, for every variant."""
    datasets = {}
    for precompute in (False, True):
        model = make_model(positions, torch.float32)
        x, f = torch.tensor(positions, dtype=torch.float32), torch.tensor(forces, dtype=torch.float32)
        started = time.perf_counter()
        datasets[precompute] = _force_data(model, x, f, precompute)
        if precompute:
            precompute_seconds = time.perf_counter() - started
    timings = {name: [] for name in VARIANTS}
    for _ in range(arguments.repeats):
        for name, variant in VARIANTS.items():
            model = make_model(positions, torch.float32)
            data = datasets[variant.precompute]
            with tanh_of(variant):
                run_steps(model, data, 5, arguments.batch_size, variant)  # warm-up
                seconds = run_steps(model, data, arguments.steps, arguments.batch_size, variant)
            timings[name].append(1000.0 * seconds / arguments.steps)
    return {"ms_per_step": {name: min(values) for name, values in timings.items()},
            "ms_per_step_median": {name: float(np.median(values)) for name, values in timings.items()},
            "ms_per_step_all_repeats": timings, "precompute_seconds": precompute_seconds}


def force_differences(positions: np.ndarray, n_frames: int = 1000) -> dict:
    """Largest |F − F_autograd| (and relative to max |F|) of the precomputed-feature force paths,
    explicit ∂U/∂φ (the new path) and autograd ∂U/∂φ, against autograd through the positions."""
    result = {}
    for dtype in (torch.float32, torch.float64):
        model = make_model(positions, dtype)
        x = torch.tensor(positions[:n_frames], dtype=dtype)
        data = _force_data(model, x, torch.zeros_like(x), True)
        reference = forces_of(model, x).flatten(1)
        scale = float(reference.abs().max())
        differences = {}
        for name, explicit in (("explicit_gradient", True), ("autograd_gradient", False)):
            precomputed = forces_from_features(model, data.features, data.jacobian, explicit=explicit)
            difference = float((precomputed - reference).abs().max())
            differences[name] = {"max_abs_difference_kJ_mol_nm": difference, "relative_to_max_force": difference / scale}
        result[str(dtype).replace("torch.", "")] = differences
    return result


def parameter_difference(positions, forces, n_steps: int = 20) -> float:
    """Largest parameter difference after ``n_steps`` float64 steps along the baseline and new paths."""
    models = []
    for variant in (VARIANTS["baseline"], VARIANTS["new"]):
        model = make_model(positions, torch.float64)
        x, f = torch.tensor(positions[:2000]), torch.tensor(forces[:2000])
        run_steps(model, _force_data(model, x, f, variant.precompute), n_steps, 256, variant)
        models.append(model)
    return max(float((a - b).detach().abs().max()) for a, b in zip(models[0].parameters(), models[1].parameters()))


def processor_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name where there is one, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--frames", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "training_speed.json")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    positions, forces, source = load_frames(arguments.data, arguments.frames)
    load_before = os.getloadavg()
    timings = time_variants(positions, forces, arguments)
    ms = timings["ms_per_step"]
    result = {
        "benchmark": "force-matching ms per optimiser step, old vs new path (benchmarks/bench_training_speed.py)",
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": processor_name(), "cpu_count": os.cpu_count(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "torch_version": torch.__version__,
        "settings": {"threads": arguments.threads, "batch_size": arguments.batch_size, "dtype": "float32",
                     "steps_timed": arguments.steps, "warm_up_steps": 5, "repeats": arguments.repeats,
                     "reported": "fastest repeat (ms_per_step), median (ms_per_step_median)",
                     "model": "CGNet width 160, 5 layers, tanh, Lipschitz bound 4, Adam lr 3e-3",
                     "data": source, "frames": int(len(positions))},
        "variants": {name: variant._asdict() for name, variant in VARIANTS.items()},
        "ms_per_step": ms,
        "ms_per_step_median": timings["ms_per_step_median"],
        "ms_per_step_all_repeats": timings["ms_per_step_all_repeats"],
        "speedup_vs_baseline": {name: ms["baseline"] / value for name, value in ms.items()},
        "speedup_vs_baseline_of_medians": {
            name: timings["ms_per_step_median"]["baseline"] / value for name, value in timings["ms_per_step_median"].items()
        },
        "precompute_seconds": timings["precompute_seconds"],
        "force_difference_between_paths": force_differences(positions),
        "max_parameter_difference_after_20_float64_steps": parameter_difference(positions, forces),
    }
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(result, indent=1) + "\n")
    json.dump({key: result[key] for key in ("ms_per_step", "speedup_vs_baseline")}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
