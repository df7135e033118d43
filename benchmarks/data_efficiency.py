"""Benchmark: data efficiency of flow-matching vs force matching on alanine dipeptide.

The headline claim of Köhler, Krämer, Noé et al. (arXiv 2203.11167) is that flow-matching needs
about ten times fewer all-atom frames than force matching for the same accuracy. This script
measures it end to end through OpenMM:

1. Data: ``chunk_*.npz`` runs (``x`` CG positions nm, ``f`` mapped forces kJ/mol/nm). The final
   ``--holdout`` fraction of every run (a contiguous block of time) is the evaluation reference;
   training frames come only from the rest (the *training pool*).
2. For every training size N (frames evenly spaced in time over the pool) and every seed:

   - priors (harmonic bonds and angles, Boltzmann inversion) fitted on the N frames;
   - **force-matching**: a CGNet trained on the N frames with their mapped forces;
   - **flow-matching**: a CGFlow trained on the N frames, teacher samples with forces
     kT ∇ log q (outliers dropped by the published threshold), the same CGNet trained on them;
   - each force field exported (TorchScript) and simulated in OpenMM with R batched replicas
     started from training frames; equilibration discarded;
   - φ/ψ metrics (DESIGN.md: FES MSE (kcal/mol)², JS, KL(ref‖model)) vs the held-out reference,
     also as a function of the simulated time, and for the flow's own teacher samples.

3. ``benchmarks/results/data_efficiency_first_protocol.json`` and ``.png`` (``--results``; the headline
   ``data_efficiency.json`` is written by ``converged_sweep.py``).

Every stage writes its output under ``--work`` atomically; a re-run skips finished stages, and
interrupted training/simulation continues from its checkpoint. Several workers may run at once
(``--order descending`` for the second): each (seed, N, method) unit is taken under a lock file.
A work directory holds one protocol; only ``--set simulation_steps=<more>`` may change it, which
continues every finished simulation from its checkpoint and recomputes the metrics.
``--compare OTHER_WORK`` summarises a second work directory (e.g. another budget) alongside.

Usage::

    nice -n 10 python benchmarks/data_efficiency.py --data DIR --work benchmarks/runs/data_efficiency \\
        [--sizes 1000 3000 10000 30000 100000 all] [--seeds 0] [--preset full|quick]

``DIR`` holds one subdirectory per run with ``chunk_*.npz`` (e.g. the pregenerated
``ala2_train``), or is itself one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from openmm_flowmatch.analysis import jsonable
from openmm_flowmatch.data.dataset import evenly_spaced_indices

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results"
METHODS = ("force-matching", "flow-matching")
TEMPERATURE = 300.0
STAGE_FILES = {
    "priors": "priors.json",
    "flow": "flow/flow.pt",
    "teacher": "flow/teacher.json",
    "force_field": "model.json",
    "simulation": "simulation.json",
    "metrics": "metrics.json",
}

logger = logging.getLogger("data_efficiency")


class ProtocolError(ValueError):
    """Bad benchmark input (data directory, sizes, work directory); the message says what to do."""


# ------------------------------------------------------------------------------------- config


@dataclass
class ProtocolConfig:
    """Every size and budget of the protocol (all recorded in the results JSON).

    Budget rules (the same for both methods): the force field gets ``force_field_steps`` Adam
    steps of ``force_field_batch`` frames (as whole epochs, at least one), with early stopping on
    the last 10 % of its own training data; the flow gets ``flow_steps`` steps of ``flow_batch``
    frames with its learning rate decayed exponentially to 1 % over the budget.
    """

    sizes: list = field(default_factory=lambda: [1000, 3000, 10000, 30000, 100000, "all"])
    seeds: list = field(default_factory=lambda: [0])
    holdout_fraction: float = 0.2
    temperature: float = TEMPERATURE
    frame_interval_ps: float = 0.2
    # flow (teacher)
    flow_steps: int = 1000
    flow_batch: int = 256
    flow_blocks: int = 4
    flow_hidden: int = 128
    teacher_samples: int = 50000
    force_threshold: float = 1.5e5
    # CG network, identical for both methods (the paper's alanine-dipeptide CGnet)
    hidden_width: int = 160
    n_layers: int = 5
    activation: str = "tanh"
    lipschitz_bound: float = 4.0
    # network features: "auto" = the package's default per method (flow-matching: dihedrals and
    # distances, bonds and angles left to the priors; force matching: all), or one set for both
    feature_set: str = "auto"
    force_field_steps: int = 3000
    force_field_batch: int = 256
    force_field_early_stopping: bool = True
    learning_rate: float = 1e-3
    # simulation
    replicas: int = 64
    simulation_steps: int = 100000
    time_step_ps: float = 0.002
    report_interval: int = 50
    friction_per_ps: float = 1.0
    equilibration_ps: float = 10.0
    convergence_fractions: list = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
    threads: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


LEGACY_VALUES: dict[str, Any] = {"feature_set": "all"}
"""Values of settings added later, for work directories written before them."""

PRESETS: dict[str, dict] = {
    "full": {},
    # seconds, for tests and smoke runs
    "quick": dict(
        sizes=[60],
        flow_steps=4,
        flow_batch=32,
        flow_blocks=1,
        flow_hidden=16,
        teacher_samples=200,
        hidden_width=16,
        n_layers=2,
        force_field_steps=4,
        force_field_batch=32,
        replicas=2,
        simulation_steps=200,
        report_interval=10,
        equilibration_ps=0.04,
    ),
}


# ------------------------------------------------------------------------------------- helpers


def atomic_write_json(path: Path, payload: Any) -> Path:
    """Write JSON to ``path`` via a temporary file and rename (a killed run leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(jsonable(payload), indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)
    return path


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class UnitLock:
    """An exclusive lock of one (seed, N, method) unit, so that two workers never share one.

    An ``fcntl.flock`` through :mod:`openmm_flowmatch.locking`: the operating system releases it
    when the worker exits, also when it is killed, so a crashed worker never leaves a stale lock.
    """

    def __init__(self, path: Path) -> None:
        from openmm_flowmatch.locking import OutputLock

        self.path = path
        self._lock = OutputLock(path.parent, path, remove=True)
        self.held = False

    def acquire(self) -> bool:
        """Take the lock; ``False`` when another live worker holds it."""
        from openmm_flowmatch.locking import OutputLockedError

        try:
            self._lock.acquire()
        except OutputLockedError as error:
            logger.debug("%s", error)
            return False
        self.held = True
        return True

    def release(self) -> None:
        if self.held:
            self._lock.release()
            self.held = False


class StageLog:
    """Records which stages ran and which were taken from the cache (returned by :func:`run_protocol`)."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def run_stage(self, name: str, marker: Path, work: Callable[[], dict]) -> dict:
        """Return the stage's record from ``marker``, or run ``work`` and write its record there."""
        if marker.exists():
            self.events.append({"stage": name, "marker": str(marker), "status": "cached"})
            logger.info("cached: %s (%s)", name, marker)
            return read_json(marker)
        logger.info("running: %s", name)
        started = time.perf_counter()
        record = work()
        record["wall_seconds"] = time.perf_counter() - started
        atomic_write_json(marker, record)
        self.events.append({"stage": name, "marker": str(marker), "status": "ran", "seconds": record["wall_seconds"]})
        logger.info("finished: %s in %.1f s", name, record["wall_seconds"])
        return record


# ------------------------------------------------------------------------------------- data


@dataclass
class SplitData:
    """The training pool and the held-out reference, with where each frame came from."""

    pool: Any  # CGDataset
    reference: Any  # CGDataset
    pool_indices: np.ndarray  # indices into the full concatenated dataset
    reference_indices: np.ndarray
    description: dict


def load_split(data_directory: Path, config: ProtocolConfig) -> SplitData:
    """Read the runs and hold out the final ``holdout_fraction`` of each as the reference."""
    from openmm_flowmatch.data import CGDataset

    if not Path(data_directory).is_dir():
        raise ProtocolError(f"--data {data_directory}: not a directory of runs with chunk_*.npz files")
    full = CGDataset.from_npz_chunks(
        data_directory, temperature=config.temperature, frame_interval_ps=config.frame_interval_ps
    )
    if not full.has_forces:
        raise ProtocolError(f"--data {data_directory}: the chunks hold no forces 'f'; force matching needs them")
    pool_parts, reference_parts = [], []
    for start, length in zip(full.run_starts, full.run_lengths):
        n_reference = int(round(length * config.holdout_fraction))
        if n_reference < 1 or n_reference >= length:
            raise ProtocolError(f"a run of {length} frames cannot hold out {config.holdout_fraction:.0%}")
        pool_parts.append(np.arange(start, start + length - n_reference))
        reference_parts.append(np.arange(start + length - n_reference, start + length))
    pool_indices = np.concatenate(pool_parts)
    reference_indices = np.concatenate(reference_parts)
    pool, reference = full.select(pool_indices), full.select(reference_indices)
    phi = _phi(reference.positions)
    description = {
        "directory_name": Path(data_directory).name,
        "runs": full.metadata.get("runs"),
        "frames_per_run": [int(n) for n in full.run_lengths],
        "frame_interval_ps": config.frame_interval_ps,
        "ns_per_run": [n * config.frame_interval_ps / 1000 for n in full.run_lengths],
        "holdout": f"final {config.holdout_fraction:.0%} of every run (contiguous in time)",
        "reference_frames": int(reference.n_frames),
        "reference_ns": reference.n_frames * config.frame_interval_ps / 1000,
        "pool_frames": int(pool.n_frames),
        "pool_ns": pool.n_frames * config.frame_interval_ps / 1000,
        "reference_alpha_L_fraction": float(np.mean(phi > 0)),
        "pool_alpha_L_fraction": float(np.mean(_phi(pool.positions) > 0)),
    }
    return SplitData(pool, reference, pool_indices, reference_indices, description)


def _phi(positions: np.ndarray) -> np.ndarray:
    from openmm_flowmatch.analysis import phi_psi

    return phi_psi(positions)[0]


def resolve_size(size: Any, pool_frames: int) -> int:
    """``"all"`` → the whole pool; an int larger than the pool is an error."""
    if str(size).lower() == "all":
        return int(pool_frames)
    n_frames = int(size)
    if n_frames < 10:
        raise ProtocolError(f"training size {n_frames} is too small (need ≥ 10 frames)")
    if n_frames > pool_frames:
        raise ProtocolError(f"training size {n_frames} exceeds the {pool_frames} frames of the training pool")
    return n_frames


# ------------------------------------------------------------------------------------- metrics


def phi_psi_metrics(reference_positions: np.ndarray, model_positions: np.ndarray, temperature: float) -> dict:
    """DESIGN.md metrics of model vs reference φ/ψ (FES MSE (kcal/mol)², JS, KL(ref‖model))."""
    from openmm_flowmatch.analysis import compare_phi_psi

    comparison = compare_phi_psi(reference_positions, model_positions, temperature=temperature)
    metrics = dict(comparison.metrics)
    metrics["alpha_L_fraction"] = float(np.mean(_phi(model_positions) > 0))
    return metrics


def trajectory_positions(paths: Sequence[Path], topology: Any) -> list[np.ndarray]:
    """Positions ``(frames, beads, 3)`` nm of every replica trajectory."""
    from openmm_flowmatch.analysis import load_positions

    return [load_positions(path, topology) for path in paths if Path(path).exists()]


def production_parts(replicas: list[np.ndarray], config: ProtocolConfig, frame_ps: float) -> tuple[list, int]:
    """Every replica without its first ``equilibration_ps``, and the shortest remaining length."""
    equilibration_frames = int(round(config.equilibration_ps / frame_ps))
    production = [r[equilibration_frames:] for r in replicas]
    return production, min((len(r) for r in production), default=0)


def convergence_metrics(
    replicas: list[np.ndarray], reference: np.ndarray, config: ProtocolConfig, frame_ps: float
) -> list[dict]:
    """Metrics on the first fraction f of every replica's production part, for each f."""
    production, length = production_parts(replicas, config, frame_ps)
    curve = []
    for fraction in config.convergence_fractions:
        frames = int(round(fraction * length))
        if frames < 1:
            continue
        pooled = np.concatenate([r[:frames] for r in production])
        metrics = phi_psi_metrics(reference, pooled, config.temperature)
        metrics["fraction"] = fraction
        metrics["aggregate_ns"] = len(production) * frames * frame_ps / 1000.0
        metrics["per_replica_ps"] = frames * frame_ps
        curve.append(metrics)
    return curve


def halves_metrics(replicas: list[np.ndarray], reference: np.ndarray, config: ProtocolConfig, frame_ps: float) -> dict:
    """Metrics of the first and of the second half of every replica's production part, separately.

    A model whose replicas have relaxed to its own equilibrium gives the same metrics for both
    halves (up to sampling noise); a drift between them means the simulation is not long enough.
    """
    production, length = production_parts(replicas, config, frame_ps)
    half = length // 2
    if half < 1:
        return {}
    halves = {}
    for name, window in (("first", slice(0, half)), ("second", slice(half, 2 * half))):
        pooled = np.concatenate([r[window] for r in production])
        metrics = phi_psi_metrics(reference, pooled, config.temperature)
        metrics["aggregate_ns"] = len(production) * half * frame_ps / 1000.0
        metrics["per_replica_ps"] = [window.start * frame_ps + config.equilibration_ps,
                                     window.stop * frame_ps + config.equilibration_ps]
        halves[name] = metrics
    return halves


# ------------------------------------------------------------------------------------- stages


def fit_priors(positions: np.ndarray, mapping: Any, temperature: float):
    from openmm_flowmatch.priors import Priors

    return Priors.fit(positions, mapping.bonds, temperature)


def epochs_for_budget(steps: int, batch_size: int, frames: int) -> int:
    """Whole epochs (≥ 1) closest to ``steps`` optimiser steps on the 90 % of ``frames`` trained on."""
    n_train = int(round(0.9 * frames))
    return max(1, int(round(steps * batch_size / max(n_train, 1))))


def train_network(data: Any, priors: Any, config: ProtocolConfig, method: str, seed: int, checkpoint: Path):
    """The shared force-field budget rule: ``force_field_steps`` Adam steps, whole epochs (≥ 1)."""
    from openmm_flowmatch.forcefield import train_force_field

    epochs = epochs_for_budget(config.force_field_steps, config.force_field_batch, len(data[0]))
    patience = max(15, epochs // 10) if config.force_field_early_stopping else 0
    model = train_force_field(
        data,
        priors,
        method=method,
        model_kwargs=dict(
            hidden_width=config.hidden_width,
            n_layers=config.n_layers,
            activation=config.activation,
            lipschitz_bound=config.lipschitz_bound,
            feature_set=None if config.feature_set == "auto" else config.feature_set,
        ),
        epochs=epochs,
        batch_size=config.force_field_batch,
        learning_rate=config.learning_rate,
        early_stopping_patience=patience,
        checkpoint_path=checkpoint,
        seed=seed,
        progress=False,
    )
    return model, {"epochs_budget": epochs, "early_stopping_patience": patience}


def stage_force_field(
    unit: Path, positions: np.ndarray, forces: np.ndarray, priors: Any, mapping: Any, config: ProtocolConfig,
    method: str, seed: int,
) -> dict:
    from openmm_flowmatch.export import export_force_field

    model, budget = train_network((positions, forces), priors, config, method, seed, unit / "force_field_checkpoint.pt")
    info = dict(model.training_info)
    artifact = unit / "model.pt"  # export_force_field writes atomically
    export_force_field(model, artifact, priors=priors, mapping=mapping, temperature=config.temperature, training=info)
    summary = {k: info[k] for k in ("method", "frames", "validation_frames", "epochs", "best_epoch", "stopped_early",
                                    "initial_validation_loss", "best_validation_loss", "training_seconds")}
    summary.update(budget)
    summary["artifact"] = artifact.name
    summary["steps_done"] = int(info["epochs"] * math.ceil(info["frames"] / config.force_field_batch))
    return summary


def stage_flow(unit: Path, positions: np.ndarray, config: ProtocolConfig, seed: int) -> dict:
    from openmm_flowmatch.flows import train_flow

    epochs = epochs_for_budget(config.flow_steps, config.flow_batch, len(positions))
    decay = 0.01 ** (1.0 / epochs)
    flow = train_flow(
        positions,
        n_blocks=config.flow_blocks,
        hidden_features=config.flow_hidden,
        epochs=epochs,
        batch_size=config.flow_batch,
        learning_rate=config.learning_rate,
        learning_rate_decay=decay,
        patience=max(5, epochs // 10),
        checkpoint_path=unit / "flow" / "flow_checkpoint.pt",
        seed=seed,
        progress=False,
    )
    path = unit / "flow" / "flow.pt"
    flow.save(path.with_name("flow.pt.partial"))
    os.replace(path.with_name("flow.pt.partial"), path)
    history = flow.training_history
    best = min(history, key=lambda r: r["validation_nll"]) if history else {}
    return {
        "epochs_budget": epochs,
        "epochs": len(history),
        "learning_rate_decay_per_epoch": decay,
        "best_epoch": best.get("epoch"),
        "best_validation_nll": best.get("validation_nll"),
        "training_seconds": float(sum(r["seconds"] for r in history)),
    }


def stage_teacher(unit: Path, reference: np.ndarray, config: ProtocolConfig, seed: int) -> dict:
    from openmm_flowmatch.flows import CGFlow, sample_teacher

    flow = CGFlow.load(unit / "flow" / "flow.pt")
    temporary = unit / "flow" / "teacher.h5.partial"
    report = sample_teacher(
        flow, config.teacher_samples, temporary, config.temperature,
        force_threshold=config.force_threshold, seed=seed, progress=False,
    )
    os.replace(temporary, unit / "flow" / "teacher.h5")
    from openmm_flowmatch.data.storage import read_cg_file

    samples = read_cg_file(unit / "flow" / "teacher.h5")["positions"]
    return {
        "n_samples": report.n_samples,
        "n_drawn": report.n_drawn,
        "n_dropped": report.n_dropped,
        "dropped_fraction": report.dropped_fraction,
        "force_threshold_kT2_per_nm2": report.force_threshold,
        "samples_per_second": report.samples_per_second,
        "teacher_vs_reference": phi_psi_metrics(reference, np.asarray(samples), config.temperature),
    }


def stage_simulation(unit: Path, start_positions: np.ndarray, mapping: Any, config: ProtocolConfig, seed: int) -> dict:
    from openmm_flowmatch.export import FlowMatchForceField, replicate_topology
    from openmm_flowmatch.simulation import BlowUpError, run_simulation

    force_field = FlowMatchForceField.load(unit / "model.pt")
    topology = mapping.cg_topology()
    system = force_field.create_system(replicate_topology(topology, config.replicas), replicas=config.replicas)
    record = {"replicas": config.replicas, "steps": config.simulation_steps, "time_step_ps": config.time_step_ps,
              "per_replica_ps": config.simulation_steps * config.time_step_ps,
              "aggregate_ns": config.replicas * config.simulation_steps * config.time_step_ps / 1000.0}
    try:
        result = run_simulation(
            system, topology, start_positions, unit / "simulation", config.simulation_steps,
            replicas=config.replicas, temperature=config.temperature, friction=config.friction_per_ps,
            time_step=config.time_step_ps, report_interval=config.report_interval,
            checkpoint_interval=config.report_interval * 20,
            platform="CPU", platform_properties={"Threads": str(config.threads)}, seed=seed, progress=False,
        )
        record.update(status="finished", wall_time=result.wall_time, ns_per_day=result.ns_per_day,
                      resumed_from_step=result.resumed_from_step)
    except BlowUpError as error:
        record.update(status="blew_up", blow_up_step=error.step, blow_up_replica=error.replica, reason=error.reason)
        logger.warning("%s: %s", unit, error)
    return record


def stage_metrics(unit: Path, reference: np.ndarray, mapping: Any, config: ProtocolConfig, simulation: dict) -> dict:
    paths = sorted((unit / "simulation").glob("replica_*.dcd"))
    replicas = trajectory_positions(paths, mapping.cg_topology())
    frame_ps = config.report_interval * config.time_step_ps
    record: dict = {"simulation_status": simulation.get("status")}
    if simulation.get("status") == "blew_up":
        # a batched blow-up stops every replica at the same step: keep the frames before it
        record["note"] = "simulation blew up; metrics use the frames written before the blow-up"
    curve = convergence_metrics(replicas, reference, config, frame_ps) if replicas else []
    record["convergence"] = curve
    record["final"] = curve[-1] if curve else None
    record["halves"] = halves_metrics(replicas, reference, config, frame_ps) if replicas else {}
    return record


# ------------------------------------------------------------------------------------- protocol


def simulation_is_current(unit: Path, config: ProtocolConfig) -> bool:
    """Whether the unit's simulation record covers ``config.simulation_steps`` (or blew up before)."""
    marker = unit / STAGE_FILES["simulation"]
    if not marker.exists():
        return False
    record = read_json(marker)
    return record.get("status") == "blew_up" or int(record.get("steps", 0)) >= config.simulation_steps


def mark_simulation_for_extension(unit: Path, config: ProtocolConfig) -> dict:
    """Prepare a finished but shorter simulation to be continued to ``config.simulation_steps``.

    The simulation and metrics records are moved aside (the trajectories and the checkpoint stay,
    so :func:`run_simulation` continues from the last step). Returns what the new simulation
    record keeps of the old one (its steps and wall time), or ``{}`` when nothing is extended.
    """
    marker = unit / STAGE_FILES["simulation"]
    if marker.exists():
        if simulation_is_current(unit, config):
            return {}
        record = read_json(marker)
        logger.info("%s: extending the simulation from %d to %d steps", unit, record["steps"], config.simulation_steps)
        for name in (STAGE_FILES["metrics"], STAGE_FILES["simulation"]):
            path = unit / name
            if path.exists():
                os.replace(path, path.with_name(f"{path.stem}.steps{int(record['steps'])}.json"))
    earlier = sorted(unit.glob("simulation.steps*.json"), key=lambda path: int(path.stem.split("steps")[-1]))
    if not earlier:
        return {}
    record = read_json(earlier[-1])  # also after an interrupted extension
    return {
        "extended_from_steps": int(record["steps"]),
        "earlier_wall_seconds": float(record.get("wall_seconds", 0.0)) + float(record.get("earlier_wall_seconds", 0.0)),
    }


def unit_directory(work: Path, seed: int, n_frames: int, method: str) -> Path:
    return work / f"seed{seed}" / f"n{n_frames}" / method


def run_unit(
    work: Path, split: SplitData, mapping: Any, config: ProtocolConfig, seed: int, n_frames: int, method: str,
    log: StageLog,
) -> None:
    """All stages of one (seed, N, method): train, export, simulate, evaluate."""
    import torch

    torch.manual_seed(seed)
    unit = unit_directory(work, seed, n_frames, method)
    unit.mkdir(parents=True, exist_ok=True)
    indices = evenly_spaced_indices(split.pool.n_frames, n_frames)  # the rule of CGDataset.subsample
    positions = split.pool.positions[indices]
    forces = split.pool.forces[indices]
    reference = split.reference.positions
    tag = f"seed {seed}, N={n_frames}, {method}"

    def priors_stage() -> dict:
        priors = fit_priors(positions, mapping, config.temperature)
        return {"priors": priors.to_dict(), "frames": len(positions),
                "training_pool_indices_first_last": [int(indices[0]), int(indices[-1])],
                "training_data_vs_reference": phi_psi_metrics(reference, positions, config.temperature)}

    priors_record = log.run_stage(f"{tag}: priors", unit.parent / STAGE_FILES["priors"], priors_stage)
    from openmm_flowmatch.priors import Priors

    priors = Priors.from_dict(priors_record["priors"])

    if method == "flow-matching":
        log.run_stage(f"{tag}: flow", unit / "flow" / "flow.json", lambda: stage_flow(unit, positions, config, seed))
        log.run_stage(f"{tag}: teacher", unit / STAGE_FILES["teacher"], lambda: stage_teacher(unit, reference, config, seed))
        from openmm_flowmatch.data.storage import read_cg_file

        def teacher_force_field() -> dict:
            teacher = read_cg_file(unit / "flow" / "teacher.h5")
            return stage_force_field(unit, teacher["positions"], teacher["forces"], priors, mapping, config, method, seed)

        log.run_stage(f"{tag}: force field", unit / STAGE_FILES["force_field"], teacher_force_field)
    else:
        log.run_stage(
            f"{tag}: force field", unit / STAGE_FILES["force_field"],
            lambda: stage_force_field(unit, positions, forces, priors, mapping, config, method, seed),
        )
    starts = positions[np.linspace(0, len(positions) - 1, config.replicas).round().astype(int)].astype(np.float64)
    previous = mark_simulation_for_extension(unit, config)
    simulation = log.run_stage(
        f"{tag}: simulation", unit / STAGE_FILES["simulation"],
        lambda: {**stage_simulation(unit, starts, mapping, config, seed), **previous},
    )
    log.run_stage(
        f"{tag}: metrics", unit / STAGE_FILES["metrics"],
        lambda: stage_metrics(unit, reference, mapping, config, simulation),
    )


def run_protocol(
    data_directory: Path, work: Path, config: ProtocolConfig, pdb: Path | None = None, order: str = "ascending",
    methods: Sequence[str] = METHODS,
) -> StageLog:
    """Run (or continue) every unit of the sweep; returns which stages ran and which were cached.

    Units go smallest N first (``order="descending"``: largest first), seed by seed, force
    matching before flow-matching. A unit locked by another live worker is skipped.
    """
    import torch

    from openmm_flowmatch.mapping import CGMapping

    torch.set_num_threads(config.threads)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    split = load_split(data_directory, config)
    mapping = CGMapping.backbone(str(pdb or default_pdb()))
    if mapping.n_beads != split.pool.n_beads:
        raise ProtocolError(f"the structure maps to {mapping.n_beads} beads but the data has {split.pool.n_beads}")
    atomic_write_json(work / "config.json", config.to_dict())
    log = StageLog()
    log.run_stage("data split", work / "split.json", lambda: {
        **split.description,
        "pool_vs_reference": phi_psi_metrics(split.reference.positions, split.pool.positions, config.temperature),
    })
    sizes = sorted({resolve_size(size, split.pool.n_frames) for size in config.sizes}, reverse=order == "descending")
    for seed in config.seeds:
        for n_frames in sizes:
            for method in methods:
                lock = UnitLock(unit_directory(work, seed, n_frames, method) / "worker.lock")
                unit = unit_directory(work, seed, n_frames, method)
                if (unit / STAGE_FILES["metrics"]).exists() and simulation_is_current(unit, config):
                    log.events.append({"stage": f"seed {seed}, N={n_frames}, {method}", "status": "cached"})
                    continue
                if not lock.acquire():
                    logger.info("skipping seed %d, N=%d, %s: another worker holds it", seed, n_frames, method)
                    continue
                try:
                    run_unit(work, split, mapping, config, seed, n_frames, method, log)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as error:  # noqa: BLE001 - one failed unit must not stop the sweep
                    # e.g. torch.jit.script reads the source files again at export time, so an edit of
                    # the package during a long sweep can break one export; a re-run retries the unit
                    logger.exception("seed %d, N=%d, %s failed (%s); continuing with the next unit",
                                     seed, n_frames, method, error)
                    log.events.append({"stage": f"seed {seed}, N={n_frames}, {method}", "status": "failed",
                                       "error": str(error)})
                finally:
                    lock.release()
    return log


def default_pdb() -> Path:
    """The capped alanine dipeptide bundled with the package (bead order ACE C, N, CA, C, NME N)."""
    import openmm_flowmatch

    return Path(openmm_flowmatch.__file__).parent / "resources" / "alanine_dipeptide.pdb"


# ------------------------------------------------------------------------------------- results


def collect_results(work: Path) -> dict:
    """Everything finished under ``work`` as one JSON-able dict (partial sweeps marked as such)."""
    work = Path(work)
    config = read_json(work / "config.json")
    split = read_json(work / "split.json") if (work / "split.json").exists() else None
    records = []
    for seed_directory in sorted(work.glob("seed*")):
        seed = int(seed_directory.name[4:])
        for size_directory in sorted(seed_directory.glob("n*"), key=lambda p: int(p.name[1:])):
            n_frames = int(size_directory.name[1:])
            priors_path = size_directory / STAGE_FILES["priors"]
            priors = read_json(priors_path) if priors_path.exists() else {}
            for method in METHODS:
                unit = size_directory / method
                record: dict = {"seed": seed, "n_frames": n_frames, "method": method,
                                "training_data_vs_reference": priors.get("training_data_vs_reference")}
                stages = {}
                for name, marker in (("flow", "flow/flow.json"), ("teacher", "flow/teacher.json"),
                                     ("force_field", "model.json"), ("simulation", "simulation.json"),
                                     ("metrics", "metrics.json")):
                    if (unit / marker).exists():
                        stages[name] = read_json(unit / marker)
                if not stages:
                    continue
                simulation = stages.get("simulation", {})
                record["complete"] = "metrics" in stages and (
                    simulation.get("status") == "blew_up"
                    or int(simulation.get("steps", 0)) >= int(config["simulation_steps"])
                )
                record["stages_finished"] = sorted(stages)
                for name in ("flow", "teacher", "force_field", "simulation"):
                    if name in stages:
                        record[name] = stages[name]
                if "metrics" in stages:
                    record["metrics"] = stages["metrics"]["final"]
                    record["convergence"] = stages["metrics"]["convergence"]
                    record["halves"] = stages["metrics"].get("halves", {})
                    record["simulation_status"] = stages["metrics"]["simulation_status"]
                record["wall_seconds"] = {name: stage.get("wall_seconds") for name, stage in stages.items()}
                if "simulation" in stages and stages["simulation"].get("earlier_wall_seconds") is not None:
                    # an extended simulation: the run up to the earlier length plus the extension
                    record["wall_seconds"]["simulation"] += stages["simulation"]["earlier_wall_seconds"]
                records.append(record)
    expected = len(config["seeds"]) * len(config["sizes"]) * len(METHODS)
    complete = [r for r in records if r.get("complete")]
    return {
        "benchmark": "data_efficiency",
        "description": "φ/ψ free-energy error of CG force fields trained by flow-matching vs force matching "
                       "on N all-atom frames, simulated in OpenMM, vs a held-out reference block",
        "status": "complete" if len(complete) >= expected else "partial",
        "units_complete": len(complete),
        "units_expected": expected,
        "protocol": config,
        "sweep_command": "nice -n 10 python benchmarks/data_efficiency.py --data DIR --work WORK --sizes "
                         + " ".join(str(size) for size in config["sizes"])
                         + " --seeds " + " ".join(str(seed) for seed in config["seeds"]),
        "data": split,
        "metric_definitions": {
            "fes_mse": "(kcal/mol)^2, 60x60 phi/psi histogram on [-pi,pi)^2, bins where both populated and "
                       "reference F <= 5 kcal/mol, mean difference removed",
            "js_divergence": "Jensen-Shannon, natural log",
            "kl_divergence": "KL(reference || model), 1e-10 in empty bins",
        },
        "results": records,
        "summary": summarize(complete),
        "data_efficiency_ratio": {
            metric: efficiency_ratios(complete, metric) for metric in ("fes_mse", "js_divergence", "kl_divergence")
        },
    }


def summarize(records: list[dict]) -> list[dict]:
    """Mean, min and max over seeds of every metric per (N, method), plus the teacher's own."""
    rows = []
    keys = sorted({(r["n_frames"], r["method"]) for r in records})
    for n_frames, method in keys:
        group = [r for r in records if r["n_frames"] == n_frames and r["method"] == method and r.get("metrics")]
        row: dict = {"n_frames": n_frames, "method": method, "seeds": [r["seed"] for r in group]}
        for metric in ("fes_mse", "js_divergence", "kl_divergence", "alpha_L_fraction"):
            values = [r["metrics"][metric] for r in group if r["metrics"].get(metric) is not None]
            if values:
                row[metric] = {"mean": float(np.mean(values)), "min": float(np.min(values)),
                               "max": float(np.max(values)), "n": len(values)}
        for half in ("first", "second"):
            values = {m: [r["halves"][half][m] for r in group if r.get("halves") and r["halves"][half].get(m) is not None]
                      for m in ("fes_mse", "js_divergence")}
            if all(values.values()):
                row[f"{half}_half"] = {m: float(np.mean(v)) for m, v in values.items()}
        teachers = [r["teacher"]["teacher_vs_reference"] for r in group if "teacher" in r]
        if teachers:
            row["teacher"] = {m: float(np.mean([t[m] for t in teachers])) for m in ("fes_mse", "js_divergence", "kl_divergence")}
            row["teacher_dropped_fraction"] = float(np.mean([r["teacher"]["dropped_fraction"] for r in group]))
        data = [r["training_data_vs_reference"] for r in group if r.get("training_data_vs_reference")]
        if data:
            row["training_data"] = {m: float(np.mean([d[m] for d in data])) for m in ("fes_mse", "js_divergence")}
        rows.append(row)
    return rows


def efficiency_ratios(records: list[dict], metric: str) -> list[dict]:
    """Frames force matching needs to reach flow-matching's error at N, divided by N.

    Force matching's seed-mean error is interpolated linearly in (log N, log error) between
    measured sizes, after making it non-increasing in N (running minimum). Where force matching
    never gets down to flow-matching's error within the measured sizes the ratio is only a lower
    bound (``"> x"``); where force matching at N is already as good, the ratio is ≤ 1.
    """
    def mean_by_size(method: str) -> dict[int, float]:
        values: dict[int, list[float]] = {}
        for r in records:
            if r["method"] == method and r.get("metrics") and r["metrics"].get(metric) is not None:
                values.setdefault(r["n_frames"], []).append(r["metrics"][metric])
        return {n: float(np.mean(v)) for n, v in sorted(values.items())}

    flow, force = mean_by_size("flow-matching"), mean_by_size("force-matching")
    if not flow or not force:
        return []
    sizes = np.array(sorted(force))
    errors = np.minimum.accumulate(np.array([force[n] for n in sizes]))
    rows = []
    for n_frames, target in flow.items():
        row = {"n_frames": n_frames, "flow_matching": target, "force_matching_at_n": force.get(n_frames)}
        if target <= 0:
            row["ratio"] = None
        elif errors[0] <= target:
            row["frames_needed"] = int(sizes[0])
            row["ratio"] = f"<= {sizes[0] / n_frames:.3g}"
        elif errors[-1] > target:
            row["frames_needed"] = f"> {int(sizes[-1])}"
            row["ratio"] = f"> {sizes[-1] / n_frames:.3g}"
        else:
            k = int(np.argmax(errors <= target))
            x0, x1 = math.log(sizes[k - 1]), math.log(sizes[k])
            y0, y1 = math.log(max(errors[k - 1], 1e-300)), math.log(max(errors[k], 1e-300))
            x = x1 if y1 == y0 else x0 + (math.log(target) - y0) * (x1 - x0) / (y1 - y0)
            needed = math.exp(x)
            row["frames_needed"] = int(round(needed))
            row["ratio"] = needed / n_frames
        rows.append(row)
    return rows


def markdown_table(results: dict) -> str:
    """The seed-mean metrics per N and method as a Markdown table (for docs/benchmarks.md)."""
    def cell(row: dict, metric: str, digits: int = 3) -> str:
        if metric not in row:
            return "—"
        value = row[metric]
        text = f"{value['mean']:.{digits}g}"
        if value["n"] > 1:
            text += f" ({value['min']:.{digits}g}–{value['max']:.{digits}g})"
        return text

    summary = {(r["n_frames"], r["method"]): r for r in results["summary"]}
    lines = [
        "| N frames | FES MSE FM | FES MSE FlM | JS FM | JS FlM | KL FM | KL FlM | teacher FES MSE / JS | teacher dropped | N frames themselves: FES MSE / JS |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n_frames in sorted({n for n, _ in summary}):
        fm = summary.get((n_frames, "force-matching"), {})
        flm = summary.get((n_frames, "flow-matching"), {})
        teacher = flm.get("teacher")
        data = fm.get("training_data") or flm.get("training_data")
        lines.append(
            f"| {n_frames} | {cell(fm, 'fes_mse')} | {cell(flm, 'fes_mse')} | {cell(fm, 'js_divergence')} | "
            f"{cell(flm, 'js_divergence')} | {cell(fm, 'kl_divergence')} | {cell(flm, 'kl_divergence')} | "
            + (f"{teacher['fes_mse']:.3g} / {teacher['js_divergence']:.3g}" if teacher else "—")
            + " | "
            + (f"{flm['teacher_dropped_fraction']:.1%}" if teacher else "—")
            + " | "
            + (f"{data['fes_mse']:.3g} / {data['js_divergence']:.3g}" if data else "—")
            + " |"
        )
    lines += [
        "",
        "| N frames | FM: train / simulate (s) | FlM: flow / teacher / train / simulate (s) |",
        "|---:|---:|---:|",
    ]
    for n_frames in sorted({n for n, _ in summary}):
        cells = []
        for method, stages in (("force-matching", ("force_field", "simulation")),
                               ("flow-matching", ("flow", "teacher", "force_field", "simulation"))):
            group = [r for r in results["results"] if r["n_frames"] == n_frames and r["method"] == method and r.get("complete")]
            values = []
            for stage in stages:
                times = [r["wall_seconds"].get(stage) for r in group if r["wall_seconds"].get(stage) is not None]
                values.append(f"{np.mean(times):.0f}" if times else "—")
            cells.append(" / ".join(values))
        lines.append(f"| {n_frames} | {cells[0]} | {cells[1]} |")
    for other in results.get("comparisons", []):
        rows = {(r["n_frames"], r["method"]): r for r in other["summary"]}
        ratios = {r["n_frames"]: r.get("ratio") for r in other["data_efficiency_ratio"].get("fes_mse", [])}
        lines += [
            "",
            f"{other['label']} (seeds {other['seeds']}, work directory {other['work']}):",
            "",
            "| N frames | FES MSE FM | FES MSE FlM | JS FM | JS FlM | ratio (FES MSE) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for n_frames in sorted({n for n, _ in rows}):
            fm, flm = rows.get((n_frames, "force-matching"), {}), rows.get((n_frames, "flow-matching"), {})
            ratio = ratios.get(n_frames)
            ratio_text = f"{ratio:.3g}" if isinstance(ratio, float) else (ratio or "—")
            lines.append(
                f"| {n_frames} | {cell(fm, 'fes_mse')} | {cell(flm, 'fes_mse')} | {cell(fm, 'js_divergence')} | "
                f"{cell(flm, 'js_divergence')} | {ratio_text} |"
            )
    return "\n".join(lines)


def environment() -> dict:
    import openmm
    import torch

    import openmm_flowmatch

    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "note": "CPU shared with other jobs; wall times are upper bounds"},
        "versions": {"python": platform.python_version(), "openmm_flowmatch": openmm_flowmatch.__version__,
                     "openmm": openmm.__version__, "torch": torch.__version__, "numpy": np.__version__},
    }


def plot_results(results: dict, path: Path) -> Path:
    """Metric vs N for both methods (seed spread as bars), teacher and data floor; convergence panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(21, 4.8))
    colors = {"force-matching": "tab:blue", "flow-matching": "tab:red"}
    summary = results["summary"]
    for column, metric, label in ((0, "fes_mse", "φ/ψ FES MSE (kcal/mol)²"), (1, "js_divergence", "φ/ψ JS divergence")):
        axis = axes[column]
        for method in METHODS:
            rows = [r for r in summary if r["method"] == method and metric in r]
            if not rows:
                continue
            n = np.array([r["n_frames"] for r in rows])
            mean = np.array([r[metric]["mean"] for r in rows])
            low = mean - np.array([r[metric]["min"] for r in rows])
            high = np.array([r[metric]["max"] for r in rows]) - mean
            axis.errorbar(n, mean, yerr=[low, high], marker="o", capsize=3, color=colors[method],
                          label=f"{method} (OpenMM CG MD)")
            for r in results["results"]:
                if r["method"] == method and r.get("metrics") and r["metrics"].get(metric) is not None:
                    axis.scatter(r["n_frames"], r["metrics"][metric], s=8, color=colors[method], alpha=0.4)
        for other in results.get("comparisons", []):
            for method in METHODS:
                rows = [r for r in other["summary"] if r["method"] == method and metric in r]
                if rows:
                    axis.plot([r["n_frames"] for r in rows], [r[metric]["mean"] for r in rows], ":", marker="D",
                              mfc="none", color=colors[method],
                              label=f"{method}, {other['label']} (seeds {other['seeds']})")
        teacher = [r for r in summary if r["method"] == "flow-matching" and "teacher" in r]
        if teacher:
            axis.plot([r["n_frames"] for r in teacher], [r["teacher"][metric] for r in teacher], "s--",
                      color="tab:orange", label="flow samples (teacher)")
        data = [r for r in summary if r["method"] == "force-matching" and "training_data" in r]
        if data:
            axis.plot([r["n_frames"] for r in data], [r["training_data"][metric] for r in data], ":",
                      color="gray", label="the N training frames themselves")
        floor = (results.get("data") or {}).get("pool_vs_reference", {}).get(metric)
        if floor is not None:
            axis.axhline(floor, color="black", lw=0.8, ls="-.", label="whole training pool vs reference")
        _log_axes(axis)
        axis.set_xlabel("all-atom training frames N")
        axis.set_ylabel(label)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3, which="both")
    axis = axes[2]
    sizes = sorted({r["n_frames"] for r in results["results"]})
    cmap = plt.get_cmap("viridis")
    for r in results["results"]:
        curve = r.get("convergence") or []
        if not curve:
            continue
        shade = cmap(sizes.index(r["n_frames"]) / max(1, len(sizes) - 1))
        style = "-" if r["method"] == "flow-matching" else "--"
        first_seed = r["seed"] == min(q["seed"] for q in results["results"])
        label = f"N={r['n_frames']} {'FlM' if r['method'] == 'flow-matching' else 'FM'}" if first_seed else None
        axis.plot([c["aggregate_ns"] for c in curve], [c["fes_mse"] for c in curve], style, marker=".", color=shade,
                  lw=1, alpha=0.8, label=label)
    _log_axes(axis)
    axis.set_xlabel("aggregate simulated time after equilibration (ns)")
    axis.set_ylabel("φ/ψ FES MSE (kcal/mol)²")
    axis.set_title("convergence, every seed (solid: flow-matching, dashed: force matching)", fontsize=9)
    axis.legend(fontsize=6, ncol=2)
    axis.grid(alpha=0.3, which="both")
    _plot_halves(axes[3], results, colors)
    status = "" if results["status"] == "complete" else f"  [PARTIAL: {results['units_complete']}/{results['units_expected']} units]"
    seeds = sorted({r["seed"] for r in results["results"]})
    figure.suptitle(f"Alanine dipeptide data efficiency (bars: min–max over seeds {seeds}){status}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _plot_halves(axis: Any, results: dict, colors: dict) -> None:
    """Second half vs first half of every model's production run: on the diagonal = no drift."""
    values = []
    for method in METHODS:
        pairs = [(r["halves"]["first"]["fes_mse"], r["halves"]["second"]["fes_mse"]) for r in results["results"]
                 if r["method"] == method and r.get("halves") and r["halves"]["first"].get("fes_mse") is not None
                 and r["halves"]["second"].get("fes_mse") is not None]
        if pairs:
            first, second = np.array(pairs).T
            axis.scatter(first, second, s=14, color=colors[method], label=method)
            values.extend(first.tolist() + second.tolist())
    if not values:
        axis.set_visible(False)
        return
    low, high = min(values) / 1.2, max(values) * 1.2
    axis.plot([low, high], [low, high], color="black", lw=0.8)
    _log_axes(axis)
    axis.set_xlim(low, high)
    axis.set_ylim(low, high)
    axis.set_xlabel("FES MSE, first half of production (kcal/mol)²")
    axis.set_ylabel("FES MSE, second half (kcal/mol)²")
    axis.set_title("stationarity: every model, halves of equal length", fontsize=9)
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3, which="both")


def _log_axes(axis: Any) -> None:
    """Log scales where the axis holds positive data (an empty or all-zero panel stays linear).

    Only lines and markers in data coordinates count (``axhline`` spans axes coordinates in x).
    """
    points = [np.asarray(line.get_xydata()) for line in axis.get_lines() if line.get_transform() == axis.transData]
    points += [np.asarray(collection.get_offsets()) for collection in axis.collections
               if collection.get_offset_transform() == axis.transData]
    points = [p.reshape(-1, 2) for p in points if np.size(p)]
    if not points:
        return
    xy = np.concatenate(points).astype(float)
    for values, setter in ((xy[:, 0], axis.set_xscale), (xy[:, 1], axis.set_yscale)):
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() > 0:
            setter("log")


def comparison(work: Path, main_protocol: dict) -> dict:
    """A second work directory (e.g. another budget) summarised next to the main sweep."""
    other = collect_results(work)
    differing = {
        key: value for key, value in other["protocol"].items()
        if key not in ("sizes", "seeds") and main_protocol.get(key) != value
    }
    label = ", ".join(f"{key}={value}" for key, value in sorted(differing.items())) or "same settings"
    return {
        "work": Path(work).name,
        "label": label,
        "settings_differing": differing,
        "seeds": other["protocol"]["seeds"],
        "units_complete": other["units_complete"],
        "summary": other["summary"],
        "data_efficiency_ratio": other["data_efficiency_ratio"],
    }


def write_results(work: Path, results_directory: Path, command: str, compare: Sequence[Path] = ()) -> dict:
    results = collect_results(work)
    results["comparisons"] = [comparison(path, results["protocol"]) for path in compare]
    results.update(environment())
    results["command"] = command
    results["written"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_json(results_directory / "data_efficiency_first_protocol.json", results)
    if results["results"]:
        plot_results(results, results_directory / "data_efficiency_first_protocol.png")
    return results


# ------------------------------------------------------------------------------------- command line


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="directory of runs holding chunk_*.npz (x, f)")
    parser.add_argument("--work", type=Path, default=REPOSITORY / "benchmarks" / "runs" / "data_efficiency",
                        help="cache directory of every stage (re-runs continue here)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON and PNG go")
    parser.add_argument("--pdb", type=Path, default=None, help="all-atom structure for the bead map (default: bundled ala2)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--sizes", nargs="+", help="training sizes (integers or 'all')")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="run only these methods (diagnostics; the results still list what exists)")
    parser.add_argument("--order", choices=("ascending", "descending"), default="ascending")
    parser.add_argument("--report-only", action="store_true", help="only collect finished stages into the results")
    parser.add_argument("--markdown", action="store_true", help="also print the results table as Markdown")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a ProtocolConfig field")
    parser.add_argument("--compare", nargs="+", type=Path, default=[], metavar="WORK",
                        help="other work directories (e.g. another budget) to summarise and plot next to this one")
    return parser.parse_args(argv)


def build_config(arguments: argparse.Namespace) -> ProtocolConfig:
    config = ProtocolConfig(**PRESETS[arguments.preset])
    if arguments.sizes:
        config.sizes = [s if s == "all" else int(s) for s in arguments.sizes]
    if arguments.seeds:
        config.seeds = list(arguments.seeds)
    return apply_settings(config, arguments.set)


def apply_settings(config: Any, settings: Sequence[str], error: type = ProtocolError) -> Any:
    """Set ``KEY=VALUE`` items (``--set``) on a dataclass config, each parsed as its field's type.

    Booleans take 1/true/yes/on, lists and dicts JSON, other fields their type's constructor; an unknown
    key or a value that does not parse raises ``error`` naming the item.
    """
    fields = {f.name for f in dataclasses.fields(config)}
    for item in settings:
        key, _, value = item.partition("=")
        if key not in fields:
            raise error(f"--set {item}: no such setting; choose from {sorted(fields)}")
        current = getattr(config, key)
        try:
            if isinstance(current, bool):
                parsed: Any = value.strip().lower() in ("1", "true", "yes", "on")
            elif isinstance(current, (list, dict)):
                parsed = json.loads(value)
            else:
                parsed = type(current)(value)
        except ValueError as reason:
            raise error(f"--set {item}: {reason}") from None
        setattr(config, key, parsed)
    return config


def check_work_config(work: Path, config: ProtocolConfig) -> None:
    """Refuse to mix budgets: a work directory holds one protocol (sizes and seeds may grow)."""
    path = Path(work) / "config.json"
    if not path.exists():
        return
    old = read_json(path)
    # a field added after the run started had its default value then (LEGACY_VALUES) or now
    defaults = {**ProtocolConfig().to_dict(), **LEGACY_VALUES}
    mismatched = [
        k for k, v in config.to_dict().items()
        if k not in ("sizes", "seeds", "simulation_steps") and old.get(k, jsonable(defaults[k])) != jsonable(v)
    ]
    if config.simulation_steps < old.get("simulation_steps", defaults["simulation_steps"]):
        mismatched.append("simulation_steps (it may only grow: finished simulations are extended)")
    if mismatched:
        raise ProtocolError(
            f"{work} was run with other settings ({', '.join(mismatched)}); use another --work directory "
            "or the same settings"
        )
    config.sizes = _merge(old.get("sizes", []), config.sizes)
    config.seeds = _merge(old.get("seeds", []), config.seeds)


def _merge(old: list, new: list) -> list:
    merged = list(old)
    for item in new:
        if item not in merged:
            merged.append(item)
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    command = "python benchmarks/data_efficiency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    failed: list = []
    try:
        config = build_config(arguments)
        if not arguments.report_only:
            if arguments.data is None:
                raise ProtocolError("--data DIR is required (a directory of runs with chunk_*.npz files)")
            check_work_config(arguments.work, config)
            log = run_protocol(arguments.data, arguments.work, config, pdb=arguments.pdb, order=arguments.order,
                               methods=arguments.methods)
            failed = [event["stage"] for event in log.events if event["status"] == "failed"]
        if not (Path(arguments.work) / "config.json").exists():
            raise ProtocolError(f"{arguments.work} holds no run yet; start one with --data DIR")
        results = write_results(arguments.work, arguments.results, command, arguments.compare)
    except ProtocolError as error:
        logger.error("%s", error)
        return 2
    if arguments.markdown:
        print(markdown_table(results))
    logger.info("results: %d of %d units complete (%s)", results["units_complete"], results["units_expected"], results["status"])
    if failed:
        logger.error("failed units (re-run to retry them): %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
