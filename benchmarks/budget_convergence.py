"""Benchmark: budget doubling of force-field training (issue 16, seed 0), both methods.

Is a force field trained for B optimiser steps converged, i.e. would 2B or 4B steps give a different
model? DESIGN.md ("Training to convergence"): judge it on a large fixed set of mapped all-atom forces,
disjoint in time from every training set, by the paired per-frame loss differences between the
models of consecutive budgets and their block-bootstrap error (the noise of the mapped forces is a
constant offset that cancels in the pairs). A budget is converged when doubling it changes the loss
by less than that error bar (``openmm_flowmatch.forcefield.convergence.is_converged``).

The data, split, priors, flow and teacher stages are those of ``benchmarks/data_efficiency.py``
(imported, not copied):

1. the final ``holdout_fraction`` of every run is held out; the **validation set** is
   ``validation_frames`` frames evenly spaced in time over it (positions and mapped forces), the
   same for every N, method and budget; training frames are N frames evenly spaced over the rest;
2. for every N: priors on the N frames; flow-matching: the flow (its validation NLL on the fixed set
   reported, and optionally the NLL of a flow trained twice as long: its own budget doubling), the
   outlier threshold as a quantile of the flow's own force scores at the N training frames
   (``force_threshold_from_data``), ``teacher_samples`` teacher samples — all once per N, shared by
   the budgets;
3. for every N, method and budget ``m × base_steps`` (m in ``multipliers``): a CGNet trained for
   exactly that many Adam steps of ``batch_size`` frames with the published schedule (3e-3 → 1e-5
   at 30/45/60/75/90 % of the budget), **no early stopping**; the model at the end of the
   schedule ("final") is the budget's model; the one the package would keep (best on the last
   10 % of its own training data, "selected") is scored beside it;
4. per-frame force losses of both on the validation set; paired differences of consecutive budgets
   with block-bootstrap errors; the first converged budget;
5. optionally, CG simulations of every final model at ``time_step_ps`` (``replicas`` replicas,
   ``simulation_ps`` after ``equilibration_ps``), φ/ψ metrics vs the held-out reference, kinetic
   temperature, and for flow-matching vs its own teacher samples.

Every stage writes its record under ``--work`` atomically; a re-run takes finished stages from
there, an interrupted training continues from its checkpoint and an interrupted simulation from
its checkpoints. ``benchmarks/results/budget_convergence.json`` and ``budget_convergence.png``.

Usage::

    nice -n 10 python benchmarks/budget_convergence.py --data DIR [--work benchmarks/runs/budget_convergence]
        [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_efficiency import (  # noqa: E402
    ProtocolConfig,
    ProtocolError,
    StageLog,
    apply_settings,
    atomic_write_json,
    default_pdb,
    environment,
    fit_priors,
    load_split,
    phi_psi_metrics,
    production_parts,
    read_json,
    resolve_size,
    stage_flow,
    stage_teacher,
    trajectory_positions,
)

from openmm_flowmatch.data.dataset import evenly_spaced_indices  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results"
METHODS = ("force-matching", "flow-matching")
logger = logging.getLogger("budget_convergence")


@dataclass
class BudgetConfig:
    """Every setting of the budget-doubling run (all recorded in the results JSON)."""

    sizes: list = field(default_factory=lambda: [1000, 10000])
    seed: int = 0
    methods: list = field(default_factory=lambda: list(METHODS))
    # data (as data_efficiency.ProtocolConfig)
    holdout_fraction: float = 0.2
    temperature: float = 300.0
    frame_interval_ps: float = 0.2
    # the fixed validation set of mapped all-atom forces
    validation_frames: int = 20000
    block_size: int = 100  # validation frames per bootstrap block
    n_bootstrap: int = 1000
    # force-field budgets: multiplier × base_steps Adam steps, published schedule, no early stopping
    base_steps: int = 3000
    multipliers: list = field(default_factory=lambda: [1, 2, 4])
    batch_size: int = 128
    validations_per_run: int = 20  # checks on the training data's own 10 % split (and checkpoints)
    skip_budgets: list = field(default_factory=list)  # e.g. ["10000/flow-matching/4"]: cut for compute
    # CG network (data_efficiency's; features: the package default per method)
    hidden_width: int = 160
    n_layers: int = 5
    activation: str = "tanh"
    lipschitz_bound: float = 4.0
    # flow and teacher (flow budget: data_efficiency's)
    flow_steps: int = 1000
    flow_batch: int = 256
    flow_blocks: int = 4
    flow_hidden: int = 128
    flow_learning_rate: float = 1e-3
    flow_doubling: bool = True  # also train the flow for 2 × flow_steps (its own budget doubling)
    teacher_samples: int = 100000
    threshold_quantile: float = 0.999
    # simulations of the final models
    simulate: bool = True
    simulate_multipliers: list = field(default_factory=lambda: [1, 2, 4])
    replicas: int = 32
    time_step_ps: float = 0.004
    simulation_ps: float = 100.0
    equilibration_ps: float = 10.0
    report_interval: int = 25
    friction_per_ps: float = 1.0
    threads: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def protocol(self) -> ProtocolConfig:
        """The data_efficiency settings its reused stages read."""
        return ProtocolConfig(
            sizes=list(self.sizes), seeds=[self.seed], holdout_fraction=self.holdout_fraction,
            temperature=self.temperature, frame_interval_ps=self.frame_interval_ps, flow_steps=self.flow_steps,
            flow_batch=self.flow_batch, flow_blocks=self.flow_blocks, flow_hidden=self.flow_hidden,
            teacher_samples=self.teacher_samples, hidden_width=self.hidden_width, n_layers=self.n_layers,
            activation=self.activation, lipschitz_bound=self.lipschitz_bound, learning_rate=self.flow_learning_rate,
            threads=self.threads,
        )


# Settings a finished work directory may change without invalidating its stages.
MUTABLE = ("sizes", "methods", "multipliers", "skip_budgets", "simulate", "simulate_multipliers", "flow_doubling",
           "threads")
"""Rungs (``multipliers``) may be added: each budget has its own directory ``x<multiplier>``."""


# ------------------------------------------------------------------------------------- data


@dataclass
class Validation:
    positions: np.ndarray
    forces: np.ndarray
    global_indices: np.ndarray  # into the concatenated runs
    description: dict


def run_bounds(split: Any) -> list[tuple[int, int]]:
    """``(start, stop)`` global frame indices of every run (the runs are concatenated in order)."""
    lengths = split.description["frames_per_run"]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return [(int(s), int(s + n)) for s, n in zip(starts, lengths)]


def select_validation(split: Any, config: BudgetConfig) -> Validation:
    """``validation_frames`` frames evenly spaced in time over the held-out blocks of every run."""
    n_reference = split.reference.n_frames
    n = min(int(config.validation_frames), n_reference)
    if n < 2:
        raise ProtocolError(f"the held-out blocks hold {n_reference} frames; the validation set needs at least 2")
    local = evenly_spaced_indices(n_reference, n)
    global_indices = split.reference_indices[local]
    per_run = time_ranges(split, global_indices, config)
    spacing = n_reference / n
    description = {
        "frames": int(n),
        "rule": "evenly spaced in time over the held-out final block of every run (mapped all-atom forces)",
        "spacing_frames": float(spacing),
        "spacing_ps": float(spacing * config.frame_interval_ps),
        "block_size_frames": int(config.block_size),
        "block_ps": float(config.block_size * spacing * config.frame_interval_ps),
        "per_run": per_run,
    }
    return Validation(split.reference.positions[local], split.reference.forces[local], global_indices, description)


def training_indices(split: Any, n_frames: int) -> np.ndarray:
    """Indices into the training pool of the N training frames (data_efficiency's rule)."""
    return evenly_spaced_indices(split.pool.n_frames, n_frames)


def training_time_ranges(split: Any, n_frames: int, config: BudgetConfig) -> list[dict]:
    return time_ranges(split, split.pool_indices[training_indices(split, n_frames)], config)


def time_ranges(split: Any, global_indices: np.ndarray, config: BudgetConfig) -> list[dict]:
    """Per run holding any of ``global_indices``: how many, and the time of the first and last (ns)."""
    ranges = []
    for start, stop in run_bounds(split):
        inside = global_indices[(global_indices >= start) & (global_indices < stop)] - start
        if inside.size:
            ranges.append({"frames": int(inside.size),
                           "time_ns": [float(inside[0] * config.frame_interval_ps / 1000),
                                       float(inside[-1] * config.frame_interval_ps / 1000)]})
    return ranges


# ------------------------------------------------------------------------------------- stages


def model_kwargs(config: BudgetConfig) -> dict:
    return dict(hidden_width=config.hidden_width, n_layers=config.n_layers, activation=config.activation,
                lipschitz_bound=config.lipschitz_bound)


def stage_force_field(directory: Path, positions: np.ndarray, forces: np.ndarray, priors: Any, mapping: Any,
                      config: BudgetConfig, method: str, steps: int, validation: Validation) -> dict:
    """Train for exactly ``steps`` steps (published schedule, no early stopping), score on the validation set."""
    from openmm_flowmatch.export import export_force_field
    from openmm_flowmatch.forcefield import train_force_field
    from openmm_flowmatch.forcefield.convergence import block_bootstrap_standard_error, per_frame_force_loss
    from openmm_flowmatch.forcefield.training import _load_checkpoint

    directory.mkdir(parents=True, exist_ok=True)
    checkpoint = directory / "checkpoint.pt"
    interval = max(1, steps // max(1, config.validations_per_run))
    model = train_force_field(
        (positions, forces), priors, method=method, model_kwargs=model_kwargs(config), max_steps=steps,
        batch_size=config.batch_size, learning_rate_schedule="published", patience_steps=0,
        validation_interval=interval, checkpoint_path=checkpoint, seed=config.seed, progress=False,
    )
    info = dict(model.training_info)
    selected = per_frame_force_loss(model, priors, validation.positions, validation.forces)
    state = _load_checkpoint(checkpoint)
    if int(state["step"]) != steps:
        raise RuntimeError(f"{checkpoint} ends at step {state['step']}, not at the budget {steps}")
    model.load_state_dict(state["model_state"])  # the weights at the end of the schedule
    final = per_frame_force_loss(model, priors, validation.positions, validation.forces)
    np.save(directory / "losses_final.npy", final)
    np.save(directory / "losses_selected.npy", selected)
    export_force_field(model, directory / "model.pt", priors=priors, mapping=mapping, temperature=config.temperature,
                       training={**info, "kept": "final weights (end of the schedule)"})
    block = min(config.block_size, final.size)
    return {
        "method": method,
        "steps": int(info["steps"]),
        "batch_size": config.batch_size,
        "epochs_equivalent": steps * config.batch_size / info["frames"],
        "training_frames": int(info["frames"]),
        "own_split_frames": int(info["validation_frames"]),
        "feature_groups": {k: v for k, v in ((info.get("model") or {}).get("features") or {}).items()
                           if k.startswith("include_")},
        "learning_rate_schedule": info["learning_rate_schedule"],
        "early_stopping": False,
        "own_split_best_step": int(info["best_step"]),
        "own_split_loss_curve": {"step": info["validation_steps"], "validation_loss": info["validation_loss"],
                                 "train_loss": info["train_loss"]},
        "validation_loss_final": float(final.mean()),
        "validation_loss_final_se": block_bootstrap_standard_error(final, block, config.n_bootstrap, config.seed),
        "validation_loss_selected": float(selected.mean()),
        "validation_loss_selected_se": block_bootstrap_standard_error(selected, block, config.n_bootstrap, config.seed),
        "training_seconds": float(info["training_seconds"]),
    }


def flow_nll(flow_path: Path, positions: np.ndarray, batch: int = 4096) -> np.ndarray:
    """−log q per frame (nats), ``inf`` outside the flow's bond/angle intervals."""
    import torch

    from openmm_flowmatch.flows import CGFlow

    flow = CGFlow.load(flow_path)
    values = []
    with torch.no_grad():
        for start in range(0, len(positions), batch):
            values.append(-flow.log_prob(torch.as_tensor(positions[start:start + batch], dtype=torch.float64)
                                         ).double().cpu().numpy())
    return np.concatenate(values)


def nll_summary(nll: np.ndarray, config: BudgetConfig) -> dict:
    from openmm_flowmatch.forcefield.convergence import block_bootstrap_standard_error

    finite = np.isfinite(nll)
    values = nll[finite]
    return {"mean": float(values.mean()), "frames_outside_support": int((~finite).sum()),
            "se": block_bootstrap_standard_error(values, min(config.block_size, values.size), config.n_bootstrap,
                                                 config.seed)}


def stage_flow_validation(unit: Path, positions: np.ndarray, validation: Validation, config: BudgetConfig) -> dict:
    """The flow's NLL on the fixed validation set and on its own training frames."""
    nll = flow_nll(unit / "flow" / "flow.pt", validation.positions)
    np.save(unit / "flow" / "validation_nll.npy", nll)
    return {"validation_nll": nll_summary(nll, config),
            "training_frames_nll": float(np.mean(flow_nll(unit / "flow" / "flow.pt", positions)))}


def stage_threshold(unit: Path, positions: np.ndarray, forces: np.ndarray, config: BudgetConfig) -> dict:
    """Outlier threshold: a quantile of the flow's own force scores at the training frames."""
    import torch

    from openmm_flowmatch.flows import CGFlow
    from openmm_flowmatch.flows.teacher import mean_squared_force, force_threshold_from_data

    flow = CGFlow.load(unit / "flow" / "flow.pt")
    flow_forces = torch.cat([flow.forces(positions[s:s + 2048], config.temperature).double().cpu()
                             for s in range(0, len(positions), 2048)])
    threshold = force_threshold_from_data(flow_forces, config.temperature, config.threshold_quantile)
    mapped = mean_squared_force(torch.as_tensor(forces, dtype=torch.float64), config.temperature).numpy()
    return {"force_threshold_kT2_per_nm2": threshold, "quantile": config.threshold_quantile,
            "of": "the flow's forces kT∇log q at the N training frames",
            "mapped_forces_above_threshold_fraction": float(np.mean(mapped > threshold))}


def stage_simulation(directory: Path, starts: np.ndarray, mapping: Any, config: BudgetConfig) -> dict:
    from openmm_flowmatch.export import FlowMatchForceField, replicate_topology
    from openmm_flowmatch.simulation import BlowUpError, run_simulation

    force_field = FlowMatchForceField.load(directory / "model.pt")
    topology = mapping.cg_topology()
    system = force_field.create_system(replicate_topology(topology, config.replicas), replicas=config.replicas)
    dt = config.time_step_ps
    interval = config.report_interval
    steps = interval * int(round((config.simulation_ps + config.equilibration_ps) / (interval * dt)))
    record = {"replicas": config.replicas, "steps": steps, "time_step_ps": dt, "per_replica_ps": steps * dt,
              "report_interval_steps": interval}
    try:
        result = run_simulation(
            system, topology, starts, directory / "simulation", steps, replicas=config.replicas,
            temperature=config.temperature, friction=config.friction_per_ps, time_step=dt, report_interval=interval,
            checkpoint_interval=interval * 100, platform="CPU", platform_properties={"Threads": str(config.threads)},
            seed=config.seed, progress=False,
        )
        kinetic = result.kinetic_temperature
        record.update(status="finished", ns_per_day=result.ns_per_day,
                      kinetic_temperature=dataclasses.asdict(kinetic) if kinetic is not None else None)
    except BlowUpError as error:
        record.update(status="blew_up", blow_up_step=error.step, reason=error.reason)
        logger.warning("%s: %s", directory, error)
    return record


def production_replicas(directory: Path, mapping: Any, config: BudgetConfig) -> list[np.ndarray]:
    """Every replica of ``directory/simulation`` after ``equilibration_ps``, cut to the shortest."""
    paths = sorted((directory / "simulation").glob("replica_*.dcd"))
    frame_ps = config.report_interval * config.time_step_ps
    protocol = dataclasses.replace(config.protocol(), equilibration_ps=config.equilibration_ps)
    production, length = production_parts(trajectory_positions(paths, mapping.cg_topology()), protocol, frame_ps)
    return [replica[:length] for replica in production]


def stage_metrics(directory: Path, reference: np.ndarray, teacher: np.ndarray | None, mapping: Any,
                  config: BudgetConfig, simulation: dict) -> dict:
    production = production_replicas(directory, mapping, config)
    length = len(production[0]) if production else 0
    record: dict = {"simulation_status": simulation.get("status"), "production_frames_per_replica": int(length)}
    if length < 1:
        return record
    pooled = np.concatenate(production)
    record["vs_reference"] = phi_psi_metrics(reference, pooled, config.temperature)
    if teacher is not None:
        record["vs_own_teacher"] = phi_psi_metrics(teacher, pooled, config.temperature)
    record["aggregate_ns"] = len(production) * length * config.report_interval * config.time_step_ps / 1000.0
    return record


# ------------------------------------------------------------------------------------- protocol


def multiplier_values(multipliers: Sequence[Any]) -> list[float]:
    """Budget multipliers as floats (1, 2, 4; rungs below 1 such as 0.125 allowed)."""
    return [float(m) for m in multipliers]


def budget_steps(multiplier: float, config: BudgetConfig) -> int:
    return int(round(float(multiplier) * config.base_steps))


def budgets_of(config: BudgetConfig, n_frames: int, method: str) -> list[int]:
    skipped = {str(item) for item in config.skip_budgets}
    return [m for m in sorted(multiplier_values(config.multipliers)) if f"{n_frames}/{method}/{m:g}" not in skipped]


def run_benchmark(data_directory: Path, work: Path, config: BudgetConfig, pdb: Path | None = None) -> StageLog:
    """Run (or continue) every stage; returns which ran and which came from the cache."""
    import torch

    from openmm_flowmatch.data.storage import read_cg_file
    from openmm_flowmatch.mapping import CGMapping
    from openmm_flowmatch.priors import Priors

    torch.set_num_threads(config.threads)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    protocol = config.protocol()
    split = load_split(data_directory, protocol)
    mapping = CGMapping.backbone(str(pdb or default_pdb()))
    if mapping.n_beads != split.pool.n_beads:
        raise ProtocolError(f"the structure maps to {mapping.n_beads} beads but the data has {split.pool.n_beads}")
    atomic_write_json(work / "config.json", config.to_dict())
    validation = select_validation(split, config)
    log = StageLog()
    log.run_stage("data split and validation set", work / "split.json",
                  lambda: {**split.description, "validation": validation.description})
    sizes = sorted({resolve_size(size, split.pool.n_frames) for size in config.sizes})
    reference = split.reference.positions

    units = []  # (n_frames, method, directory of the unit, positions, forces, priors, teacher positions)
    for n_frames in sizes:
        indices = training_indices(split, n_frames)
        positions, forces = split.pool.positions[indices], split.pool.forces[indices]
        size_directory = work / f"n{n_frames}"

        def priors_stage(positions=positions, n_frames=n_frames) -> dict:
            priors = fit_priors(positions, mapping, config.temperature)
            return {"priors": priors.to_dict(), "frames": n_frames,
                    "training_time_ranges": training_time_ranges(split, n_frames, config)}

        priors = Priors.from_dict(log.run_stage(f"N={n_frames}: priors", size_directory / "priors.json",
                                                priors_stage)["priors"])
        for method in config.methods:
            unit = size_directory / method
            unit.mkdir(parents=True, exist_ok=True)
            tag = f"N={n_frames}, {method}"
            teacher = None
            if method == "flow-matching":
                log.run_stage(f"{tag}: flow", unit / "flow" / "flow.json",
                              lambda unit=unit, positions=positions: stage_flow(unit, positions, protocol, config.seed))
                log.run_stage(f"{tag}: flow NLL", unit / "flow" / "validation.json",
                              lambda unit=unit, positions=positions: stage_flow_validation(unit, positions, validation,
                                                                                           config))
                threshold = log.run_stage(
                    f"{tag}: outlier threshold", unit / "flow" / "threshold.json",
                    lambda unit=unit, positions=positions, forces=forces: stage_threshold(unit, positions, forces,
                                                                                          config))
                teacher_protocol = dataclasses.replace(protocol,
                                                       force_threshold=threshold["force_threshold_kT2_per_nm2"])
                log.run_stage(f"{tag}: teacher", unit / "flow" / "teacher.json",
                              lambda unit=unit: stage_teacher(unit, reference, teacher_protocol, config.seed))
                teacher = read_cg_file(unit / "flow" / "teacher.h5")
                train_positions, train_forces = np.asarray(teacher["positions"]), np.asarray(teacher["forces"])
                teacher = train_positions
            else:
                train_positions, train_forces = positions, forces
            for multiplier in budgets_of(config, n_frames, method):
                steps = budget_steps(multiplier, config)
                log.run_stage(
                    f"{tag}: {multiplier:g}x = {steps} steps", unit / f"x{multiplier:g}" / "force_field.json",
                    lambda unit=unit, multiplier=multiplier, steps=steps, method=method, tp=train_positions,
                    tf=train_forces: stage_force_field(unit / f"x{multiplier:g}", tp, tf, priors, mapping, config,
                                                       method, steps, validation))
            units.append((n_frames, method, unit, positions, teacher))

    # simulations after every force field
    if config.simulate:
        for multiplier in config.simulate_multipliers:
            for n_frames, method, unit, positions, teacher in units:
                if float(multiplier) not in budgets_of(config, n_frames, method):
                    continue
                directory = unit / f"x{float(multiplier):g}"
                tag = f"N={n_frames}, {method}, {float(multiplier):g}x"
                starts = positions[np.linspace(0, len(positions) - 1, config.replicas).round().astype(int)]
                simulation = log.run_stage(f"{tag}: simulation", directory / "simulation.json",
                                           lambda d=directory, s=starts: stage_simulation(d, s.astype(np.float64),
                                                                                           mapping, config))
                log.run_stage(f"{tag}: metrics", directory / "metrics.json",
                              lambda d=directory, t=teacher, s=simulation: stage_metrics(d, reference, t, mapping,
                                                                                          config, s))
    # the flow's own budget doubling (NLL only), last
    if config.flow_doubling:
        doubled = dataclasses.replace(protocol, flow_steps=2 * config.flow_steps)
        for n_frames, method, unit, positions, _ in units:
            if method != "flow-matching":
                continue
            twice = unit / "flow_doubled"
            twice.mkdir(parents=True, exist_ok=True)
            log.run_stage(f"N={n_frames}: flow at 2x", twice / "flow" / "flow.json",
                          lambda twice=twice, positions=positions: stage_flow(twice, positions, doubled, config.seed))
            log.run_stage(f"N={n_frames}: flow at 2x NLL", twice / "flow" / "validation.json",
                          lambda twice=twice, positions=positions: stage_flow_validation(twice, positions, validation,
                                                                                         config))

    return log


# ------------------------------------------------------------------------------------- results


def ladder(unit: Path, multipliers: Sequence[int], config: BudgetConfig, kind: str) -> dict:
    """Losses at every budget, paired differences of consecutive budgets, the first converged one."""
    from openmm_flowmatch.forcefield.convergence import first_converged_budget, is_converged, paired_loss_difference

    present = [m for m in sorted(multiplier_values(multipliers)) if (unit / f"x{m:g}" / f"losses_{kind}.npy").exists()]
    losses = {m: np.load(unit / f"x{m:g}" / f"losses_{kind}.npy") for m in present}
    steps = [budget_steps(m, config) for m in present]
    pairs = []
    for a, b in zip(present, present[1:]):
        difference, error = paired_loss_difference(losses[b], losses[a], min(config.block_size, losses[a].size),
                                                   config.n_bootstrap, config.seed)
        pairs.append({"from_steps": budget_steps(a, config), "to_steps": budget_steps(b, config),
                      "difference": difference, "se": error,
                      "identical_models": bool(np.array_equal(losses[a], losses[b])),
                      # identical models (e.g. the same best step kept at both budgets) changed nothing
                      "converged": bool(np.array_equal(losses[a], losses[b]))
                      or is_converged(float(losses[a].mean()), float(losses[b].mean()), error)})
    first = None
    if len(present) >= 2 and all(b == 2 * a for a, b in zip(present, present[1:])):
        first = first_converged_budget(steps, [float(losses[m].mean()) for m in present], [p["se"] for p in pairs])
        identical = [p["from_steps"] for p in pairs if p["identical_models"]]
        if identical and (first is None or identical[0] < first):
            first = identical[0]
    return {"steps": steps, "loss": [float(losses[m].mean()) for m in present], "pairs": pairs,
            "first_converged_steps": first,
            "verdict": (f"converged at {first} steps" if first is not None else
                        f"none of {steps} converged" if len(present) >= 2 else "fewer than two budgets")}


def artifact_feature_groups(path: Path) -> dict:
    """The network's feature groups (include_bonds, …) from the exported artifact's metadata."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("extra/openmm_flowmatch.json"))
        metadata = json.loads(archive.read(name))
    return {k: v for k, v in metadata["model"]["features"].items() if k.startswith("include_")}


def collect_results(work: Path) -> dict:
    work = Path(work)
    config = BudgetConfig(**read_json(work / "config.json"))
    split = read_json(work / "split.json") if (work / "split.json").exists() else None
    rows = []
    for size_directory in sorted(work.glob("n*"), key=lambda p: int(p.name[1:])):
        n_frames = int(size_directory.name[1:])
        priors = read_json(size_directory / "priors.json") if (size_directory / "priors.json").exists() else {}
        for method in METHODS:
            unit = size_directory / method
            if not unit.is_dir():
                continue
            row: dict = {"n_frames": n_frames, "method": method,
                         "training_time_ranges": priors.get("training_time_ranges")}
            budgets = []
            for m in sorted(multiplier_values(config.multipliers)):
                directory = unit / f"x{m:g}"
                if not (directory / "force_field.json").exists():
                    continue
                record = read_json(directory / "force_field.json")
                record.pop("feature_set", None)  # written as null by a first version; see feature_groups
                if not record.get("feature_groups") and (directory / "model.pt").exists():
                    record["feature_groups"] = artifact_feature_groups(directory / "model.pt")
                for name in ("simulation", "metrics"):
                    if (directory / f"{name}.json").exists():
                        record[name] = read_json(directory / f"{name}.json")
                record["multiplier"] = m
                budgets.append(record)
            row["budgets"] = budgets
            row["final"] = ladder(unit, config.multipliers, config, "final")
            row["selected"] = ladder(unit, config.multipliers, config, "selected")
            # the final model vs the largest budget's, for the figure
            largest = max((b["multiplier"] for b in budgets), default=None)
            if largest is not None:
                from openmm_flowmatch.forcefield.convergence import paired_loss_difference

                last = np.load(unit / f"x{largest:g}" / "losses_final.npy")
                row["final"]["versus_largest"] = [
                    dict(zip(("difference", "se"), paired_loss_difference(
                        np.load(unit / f"x{b['multiplier']:g}" / "losses_final.npy"), last,
                        min(config.block_size, last.size), config.n_bootstrap, config.seed)))
                    for b in budgets]
            if method == "flow-matching":
                flow = {}
                for name, path in (("training", "flow/flow.json"), ("nll", "flow/validation.json"),
                                   ("threshold", "flow/threshold.json"), ("teacher", "flow/teacher.json"),
                                   ("doubled_training", "flow_doubled/flow/flow.json"),
                                   ("doubled_nll", "flow_doubled/flow/validation.json")):
                    if (unit / path).exists():
                        flow[name] = read_json(unit / path)
                once, twice = unit / "flow" / "validation_nll.npy", unit / "flow_doubled" / "flow" / "validation_nll.npy"
                if once.exists() and twice.exists():
                    from openmm_flowmatch.forcefield.convergence import is_converged, paired_loss_difference

                    a, b = np.load(once), np.load(twice)
                    keep = np.isfinite(a) & np.isfinite(b)
                    difference, error = paired_loss_difference(b[keep], a[keep], min(config.block_size, int(keep.sum())),
                                                               config.n_bootstrap, config.seed)
                    flow["doubling"] = {"from_steps": config.flow_steps, "to_steps": 2 * config.flow_steps,
                                        "nll_difference": difference, "se": error, "frames": int(keep.sum()),
                                        "converged": is_converged(float(a[keep].mean()), float(b[keep].mean()), error)}
                row["flow"] = flow
            rows.append(row)
    comparison = []
    for n_frames in sorted({row["n_frames"] for row in rows}):
        best = {}
        for row in rows:
            if row["n_frames"] == n_frames and row["final"]["loss"]:
                index = int(np.argmin(row["final"]["loss"]))
                best[row["method"]] = (row["final"]["steps"][index], row["method"])
        if len(best) == 2:
            from openmm_flowmatch.forcefield.convergence import paired_loss_difference

            multiplier = {m: s / config.base_steps for m, (s, _) in best.items()}
            fm = np.load(work / f"n{n_frames}" / "force-matching" / f"x{multiplier['force-matching']:g}" / "losses_final.npy")
            flm = np.load(work / f"n{n_frames}" / "flow-matching" / f"x{multiplier['flow-matching']:g}" / "losses_final.npy")
            difference, error = paired_loss_difference(fm, flm, min(config.block_size, fm.size), config.n_bootstrap,
                                                       config.seed)
            comparison.append({"n_frames": n_frames, "force_matching_steps": best["force-matching"][0],
                               "flow_matching_steps": best["flow-matching"][0],
                               "force_matching_minus_flow_matching": difference, "se": error})
    return {
        "benchmark": "budget_convergence",
        "methods_at_their_lowest_validation_loss": comparison,
        "description": "budget doubling (1x, 2x, 4x optimiser steps) of CG force-field training, both methods, "
                       "scored by the mean force error on a fixed validation set of mapped all-atom forces "
                       "held out in time; paired differences with block-bootstrap standard errors",
        "config": config.to_dict(),
        "data": split,
        "definitions": {
            "validation_loss": "mean over validation frames of the per-frame mean squared force error "
                               "(kJ/mol/nm)^2 of -grad(U_prior + U_net) vs the mapped all-atom forces; "
                               "most of it is the noise of the mapped forces, common to every model",
            "difference": "mean paired per-frame loss difference, larger budget minus smaller; negative: the "
                          "larger budget is better",
            "se": "moving-block bootstrap standard error (block_size validation frames, n_bootstrap resamples)",
            "converged": "|loss(2B) - loss(B)| < se of the paired difference (convergence.is_converged), or the "
                         "two budgets gave identical per-frame losses (identical models, se 0)",
            "final": "weights at the end of the budget's schedule (no selection)",
            "selected": "weights with the lowest loss on the last 10 % of the model's own training data "
                        "(what train_force_field returns), the run itself not stopped early",
            "js_divergence": "phi/psi Jensen-Shannon divergence (natural log, 60x60 bins) of the CG simulation "
                             "vs the held-out reference (all of it), or vs the model's own teacher samples",
            "flow_nll": "-log q per frame on the validation positions (nats; density per nm^(3n-6))",
            "methods_at_their_lowest_validation_loss": "each method's final-weights model at the budget of lowest "
                                                        "validation loss (chosen on the validation set itself, so "
                                                        "optimistic for both), paired loss difference FM - FlM",
        },
        "results": rows,
    }


def table_rows(results: dict) -> list[dict]:
    """One flat row per (N, method, budget), for the Markdown table and the log."""
    rows = []
    for row in results["results"]:
        pairs = {p["to_steps"]: p for p in row["final"]["pairs"]}
        pairs_selected = {p["to_steps"]: p for p in row["selected"]["pairs"]}
        for budget in row["budgets"]:
            metrics = budget.get("metrics") or {}
            simulation = budget.get("simulation") or {}
            kinetic = simulation.get("kinetic_temperature") or {}
            pair = pairs.get(budget["steps"])
            pair_selected = pairs_selected.get(budget["steps"])
            rows.append({
                "n_frames": row["n_frames"], "method": row["method"], "steps": budget["steps"],
                "loss": budget["validation_loss_final"], "loss_se": budget["validation_loss_final_se"],
                "difference": pair["difference"] if pair else None, "difference_se": pair["se"] if pair else None,
                "converged": pair["converged"] if pair else None,
                "loss_selected": budget["validation_loss_selected"],
                "difference_selected": pair_selected["difference"] if pair_selected else None,
                "difference_selected_se": pair_selected["se"] if pair_selected else None,
                "js": (metrics.get("vs_reference") or {}).get("js_divergence"),
                "js_vs_teacher": (metrics.get("vs_own_teacher") or {}).get("js_divergence"),
                "kinetic_temperature": kinetic.get("mean"),
                "simulation_status": simulation.get("status"),
                "training_seconds": budget.get("training_seconds"),
            })
    return rows


def markdown_table(results: dict) -> str:
    def number(value: Any, digits: int = 4) -> str:
        return "—" if value is None else f"{value:.{digits}g}"

    lines = ["| N | method | steps | val. loss ± se | Δ vs half the budget ± se | converged? | Δ (selected) ± se "
             "| JS vs ref. | JS vs teacher | T_kin (K) |",
             "|---:|---|---:|---:|---:|:---:|---:|---:|---:|---:|"]
    for r in table_rows(results):
        converged = "—" if r["converged"] is None else ("yes" if r["converged"] else "no")
        lines.append(
            f"| {r['n_frames']} | {r['method']} | {r['steps']} | {number(r['loss'], 6)} ± {number(r['loss_se'], 2)} | "
            + ("—" if r["difference"] is None else f"{r['difference']:+.3g} ± {r['difference_se']:.2g}")
            + f" | {converged} | "
            + ("—" if r["difference_selected"] is None else
               f"{r['difference_selected']:+.3g} ± {r['difference_selected_se']:.2g}")
            + f" | {number(r['js'], 3)} | {number(r['js_vs_teacher'], 3)} | {number(r['kinetic_temperature'], 4)} |")
    lines += ["", "| N | method | first converged budget (final weights) | (selected weights) | lowest validation loss at |",
              "|---:|---|---|---|---:|"]
    for row in results["results"]:
        final = row["final"]
        best = final["steps"][int(np.argmin(final["loss"]))] if final["loss"] else None
        lines.append(f"| {row['n_frames']} | {row['method']} | {final['verdict']} | {row['selected']['verdict']} | "
                     f"{best} steps |")
    flows = [row for row in results["results"] if row.get("flow")]
    if flows:
        lines += ["", "| N | flow: epochs run / budget (best) | NLL on validation set ± se | NLL at 2× flow budget "
                  "− at 1× ± se | outlier threshold (kT/nm)² | teacher samples dropped |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for row in flows:
            flow = row["flow"]
            training, nll = flow.get("training", {}), (flow.get("nll") or {}).get("validation_nll", {})
            doubling = flow.get("doubling")
            lines.append(
                f"| {row['n_frames']} | {training.get('epochs')} / {training.get('epochs_budget')} "
                f"({training.get('best_epoch')}) | {number(nll.get('mean'), 5)} ± {number(nll.get('se'), 2)} | "
                + (f"{doubling['nll_difference']:+.3g} ± {doubling['se']:.2g}" if doubling else "—")
                + f" | {number((flow.get('threshold') or {}).get('force_threshold_kT2_per_nm2'), 3)} | "
                + f"{number((flow.get('teacher') or {}).get('dropped_fraction'), 3)} |")
    return "\n".join(lines)


def plot_results(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    colors = {"force-matching": "tab:blue", "flow-matching": "tab:red"}
    styles = {}
    for index, n_frames in enumerate(sorted({r["n_frames"] for r in results["results"]})):
        styles[n_frames] = ("o-", "s--", "^:", "D-.")[index % 4]
    for row in results["results"]:
        budgets = row["budgets"]
        if not budgets or "versus_largest" not in row["final"]:
            continue
        steps = [b["steps"] for b in budgets]
        label = f"{row['method']}, N={row['n_frames']}"
        values = [v["difference"] for v in row["final"]["versus_largest"]]
        errors = [v["se"] for v in row["final"]["versus_largest"]]
        axes[0].errorbar(steps, values, yerr=errors, fmt=styles[row["n_frames"]], color=colors[row["method"]],
                         capsize=3, label=label)
        js = [(b["steps"], b["metrics"]["vs_reference"]["js_divergence"]) for b in budgets
              if (b.get("metrics") or {}).get("vs_reference")]
        if js:
            axes[1].plot(*zip(*js), styles[row["n_frames"]], color=colors[row["method"]], label=label)
        kinetic = [(b["steps"], b["simulation"]["kinetic_temperature"]["mean"]) for b in budgets
                   if ((b.get("simulation") or {}).get("kinetic_temperature") or {}).get("mean") is not None]
        if kinetic:
            axes[2].plot(*zip(*kinetic), styles[row["n_frames"]], color=colors[row["method"]], label=label)
    axes[0].axhline(0.0, color="black", lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_yscale("symlog", linthresh=100.0)
    axes[0].set_xlabel("optimiser steps (batch %d, published schedule)" % results["config"]["batch_size"])
    axes[0].set_ylabel("validation loss − that of the largest budget\n(paired, (kJ/mol/nm)², ± block-bootstrap se; symlog)")
    axes[0].set_title("force error on %d held-out mapped all-atom frames" % (results["data"] or {}).get(
        "validation", {}).get("frames", 0), fontsize=9)
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3, which="both")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("optimiser steps")
    axes[1].set_ylabel("φ/ψ JS divergence vs held-out reference")
    config = results["config"]
    axes[1].set_title(f"CG MD at {config['time_step_ps'] * 1000:g} fs, {config['replicas']} replicas × "
                      f"{config['simulation_ps']:g} ps", fontsize=9)
    if axes[1].lines:
        axes[1].set_yscale("log")
        axes[1].legend(fontsize=7)
    axes[1].grid(alpha=0.3, which="both")
    bath = results["config"]["temperature"]
    axes[2].axhspan(0.98 * bath, 1.02 * bath, color="gray", alpha=0.2, label="bath ± 2 %")
    axes[2].set_xscale("log")
    if axes[2].lines:
        axes[2].set_yscale("log")
        axes[2].legend(fontsize=7)
    axes[2].set_xlabel("optimiser steps")
    axes[2].set_ylabel("mean kinetic temperature (K)")
    axes[2].set_title("soundness of the CG MD at that step (JS of unsound runs is not meaningful)", fontsize=9)
    axes[2].grid(alpha=0.3, which="both")
    figure.suptitle(f"Budget doubling, alanine dipeptide, seed {config['seed']}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_results(work: Path, results_directory: Path, command: str, wall_seconds: float | None = None) -> dict:
    results = collect_results(work)
    results.update(environment())
    results["command"] = command
    results["table"] = table_rows(results)
    stage_seconds = []
    for marker in sorted(Path(work).rglob("*.json")):
        if marker.name in ("config.json",):
            continue
        try:
            value = read_json(marker).get("wall_seconds")
        except (ValueError, AttributeError):
            continue
        if value is not None:
            stage_seconds.append(float(value))
    results["wall_seconds_all_stages"] = float(sum(stage_seconds))
    if wall_seconds is not None:
        results["wall_seconds_this_invocation"] = wall_seconds
    results["written"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_json(results_directory / "budget_convergence.json", results)
    plot_results(results, results_directory / "budget_convergence.png")
    return results


# ------------------------------------------------------------------------------------- command line


def shown_command(script: str, argv: Sequence[str] | None, data_flags: Sequence[str] = ("--data",)) -> str:
    """The command line for the results JSON, with DIR/WORK in place of this machine's paths."""
    given = list(sys.argv[1:] if argv is None else argv)
    shown = [("DIR" if previous in data_flags else "WORK" if previous in ("--work", "--results", "--pdb") else item)
             for previous, item in zip([None, *given], given)]
    return f"python benchmarks/{script} " + " ".join(shown)


def build_config(settings: Sequence[str]) -> BudgetConfig:
    return apply_settings(BudgetConfig(), settings)


def check_work_config(work: Path, config: BudgetConfig, mutable: Sequence[str] = MUTABLE) -> None:
    """A work directory holds one protocol; only the settings in ``mutable`` may change."""
    path = Path(work) / "config.json"
    if not path.exists():
        return
    old = read_json(path)
    mismatched = [key for key, value in config.to_dict().items() if key not in mutable and old.get(key) != value]
    if mismatched:
        raise ProtocolError(f"{Path(work).name} was run with other settings ({', '.join(mismatched)}); "
                            "use another --work directory or the same settings")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="directory of runs holding chunk_*.npz (x, f)")
    parser.add_argument("--work", type=Path, default=REPOSITORY / "benchmarks" / "runs" / "budget_convergence")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--pdb", type=Path, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a BudgetConfig field")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print the results table as Markdown")
    arguments = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_command(arguments, shown_command("budget_convergence.py", argv), build_config, check_work_config,
                       lambda config: run_benchmark(arguments.data, arguments.work, config, pdb=arguments.pdb),
                       write_results, markdown_table)


def run_command(arguments: argparse.Namespace, command: str, build: Callable, check: Callable, run: Callable,
                write: Callable, table: Callable) -> int:
    """The body of a benchmark's ``main``: settings, refusal of a changed protocol, run, results.

    Returns the exit status: 0, or 2 after logging a ``ProtocolError`` (bad settings, no data).
    """
    started = time.perf_counter()
    try:
        config = build(arguments.set)
        if not arguments.report_only:
            if arguments.data is None:
                raise ProtocolError("--data DIR is required (a directory of runs with chunk_*.npz files)")
            check(arguments.work, config)
            run(config)
        if not (Path(arguments.work) / "config.json").exists():
            raise ProtocolError(f"{arguments.work} holds no run yet; start one with --data DIR")
        results = write(arguments.work, arguments.results, command, time.perf_counter() - started)
    except ProtocolError as error:
        logger.error("%s", error)
        return 2
    if arguments.markdown:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
