"""Chignolin (CLN025) Cα: flow-matching and force matching from the same frames, end to end.

One command, cached and resumable stage by stage (a killed run continues where it stopped)::

    python benchmarks/chignolin.py --data ../shared/data/chignolin --work runs/chignolin
    openmm-flowmatch benchmark chignolin --data ../shared/data/chignolin   # the same

Stages (each writes a JSON record under ``--work``; a stage whose record exists is skipped):

1. data: both runs, Cα RMSD to the crystal structure, the reference-vs-reference floor
   (run 1 against run 2 with the same metrics as the models);
2. priors: harmonic bonds and angles, repulsion per pair fitted from the data (Boltzmann inversion);
3. flow (teacher) on all frames, validation NLL early stopping; teacher samples with forces,
   outliers dropped above a quantile of the flow's own force scores on the data frames (no all-atom
   force is used by flow-matching);
4. force fields: the paper's protein CGnet (8 residual layers × 160, SiLU, Lipschitz 10), trained on
   teacher forces (flow-matching) and on mapped all-atom forces (force matching), same frames;
5. time step: the largest sound step of each model (kinetic temperature within 2 %, bond widths
   within 10 %) among the steps tried;
6. CG simulations: many replicas in one System, started from frames spread over the data;
7. metrics: TICA free energy (fitted on the reference, lag 100 frames = 200 ps), fraction folded,
   folding/unfolding events, RMSD/Rg histograms, contact maps, kinetic temperature; a figure.

The data (2 × 17 ns at 340 K) unfold within a few ns and refold now and then: enough to build and
test the pipeline, not an equilibrium reference. Every number is reported against it with the floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_efficiency import StageLog, apply_settings, atomic_write_json, environment, read_json  # noqa: E402

logger = logging.getLogger("chignolin")

METHODS = ("flow-matching", "force-matching")
RESULTS = Path(__file__).resolve().parent / "results"


class ChignolinError(ValueError):
    """A bad argument or input of the chignolin benchmark (printed as one line)."""


@dataclass
class ChignolinConfig:
    """Every size and budget of the benchmark (recorded in the results JSON)."""

    temperature: float = 340.0
    frame_interval_ps: float = 2.0
    # flow (teacher)
    flow_steps: int = 8000
    flow_batch: int = 256
    flow_blocks: int = 4
    flow_hidden: int = 128
    flow_patience_epochs: int = 20
    teacher_samples: int = 100000
    teacher_threshold_quantile: float = 0.999
    # CG network, identical for both methods: the paper's protein CGnet (8 x 160, Lipschitz 10) but
    # with tanh. With SiLU, which extrapolates linearly, the flow-matching network opened a hole off
    # the data (docs/benchmarks.md, "Chignolin"); tanh saturates and keeps the energy bounded there.
    hidden_width: int = 160
    n_layers: int = 8
    activation: str = "tanh"
    lipschitz_bound: float = 10.0
    # network features per method ("auto": the package default, forcefield.features.DEFAULT_FEATURE_SETS).
    # Chignolin's flow-matching network sees the Cα angles too: blind to them (the alanine-dipeptide
    # default, "dihedrals_and_distances") it fitted the teacher worse (docs/benchmarks.md, "Chignolin").
    flow_matching_feature_set: str = "all_but_bonds"
    force_matching_feature_set: str = "auto"
    force_field_steps: int = 20000
    force_field_batch: int = 128
    force_field_patience_steps: int = 4000
    force_field_validation_interval: int = 500
    # dynamics
    # 4 fs was tried too: the flow-matching model ran at +2.0 % (346.8 ± 0.6 K, 100 × 520 ps), on the
    # edge of the tolerance, after a 32 × 10 ps check had called it sound (docs/benchmarks.md)
    time_steps_fs: list = field(default_factory=lambda: [2.0, 3.0])
    check_replicas: int = 64
    check_production_ps: float = 20.0
    replicas: int = 100
    simulation_ps: float = 500.0
    report_interval_ps: float = 2.0
    friction_per_ps: float = 1.0
    equilibration_ps: float = 20.0
    # analysis
    tica_lag_frames: int = 100
    threads: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    "full": {},
    "quick": dict(  # seconds: for tests and smoke runs
        flow_steps=20, flow_batch=64, flow_blocks=1, flow_hidden=16, flow_patience_epochs=2, teacher_samples=500,
        hidden_width=16, n_layers=2, force_field_steps=20, force_field_batch=64, force_field_patience_steps=20,
        force_field_validation_interval=10, time_steps_fs=[2.0], check_replicas=2, check_production_ps=0.2,
        replicas=4, simulation_ps=4.0, equilibration_ps=0.2, tica_lag_frames=10,
    ),
}


# ------------------------------------------------------------------------------------- data


def native_structure(pdb: Path) -> tuple[Any, np.ndarray]:
    """The Cα mapping of the bundled CLN025 structure and its native Cα positions (nm)."""
    import mdtraj

    from openmm_flowmatch.mapping import CGMapping

    structure = mdtraj.load(str(pdb))
    mapping = CGMapping.alpha_carbons(structure.topology)
    return mapping, mapping.map_positions(structure.xyz)[0].astype(np.float64)


def load_runs(data: Path, config: ChignolinConfig, native: np.ndarray) -> list:
    """One ``CGDataset`` per run directory, checked against the native structure's bead count."""
    from openmm_flowmatch.data.dataset import CGDataset

    runs = sorted(path for path in Path(data).iterdir() if path.is_dir() and any(path.glob("chunk_*.npz")))
    if not runs:
        raise ChignolinError(f"{data}: no run directories with chunk_*.npz files (expected e.g. seed1001/)")
    datasets = [CGDataset.from_npz_chunks(run, config.temperature, config.frame_interval_ps) for run in runs]
    for run, dataset in zip(runs, datasets):
        if dataset.n_beads != len(native):
            raise ChignolinError(
                f"{run}: {dataset.n_beads} beads per frame, but CLN025 has {len(native)} Cα beads; is this chignolin data?"
            )
        if not dataset.has_forces:
            raise ChignolinError(f"{run}: no mapped forces 'f' in the chunks; force matching needs them")
    return datasets


def stage_data(runs: list, native: np.ndarray, config: ChignolinConfig) -> dict:
    from openmm_flowmatch.analysis import rmsd_to_native
    from openmm_flowmatch.protein_analysis import compare_proteins

    positions = [run.positions.astype(np.float64) for run in runs]
    rmsd = np.concatenate([rmsd_to_native(x, native) for x in positions])
    floor = compare_proteins(
        [positions[0]], [positions[1]], native, config.temperature, lag=config.tica_lag_frames,
        reference_frame_interval_ps=config.frame_interval_ps, model_frame_interval_ps=config.frame_interval_ps,
    ) if len(positions) > 1 else None
    return {
        "runs": [{"frames": int(run.n_frames), "ns": run.n_frames * config.frame_interval_ps / 1000.0} for run in runs],
        "rmsd_percentiles_nm": {str(q): float(np.percentile(rmsd, q)) for q in (5, 25, 50, 75, 95)},
        "floor_run1_vs_run2": floor,
    }


# ------------------------------------------------------------------------------------- training


def stage_priors(positions: np.ndarray, mapping: Any, config: ChignolinConfig) -> dict:
    from openmm_flowmatch.priors import Priors

    priors = Priors.fit(positions, mapping.bonds, config.temperature, repulsion=True)
    return {"priors": priors.to_dict(), "frames": int(len(positions))}


def stage_flow(unit: Path, positions: np.ndarray, config: ChignolinConfig, seed: int) -> dict:
    from openmm_flowmatch.flows import train_flow

    epochs = max(1, round(config.flow_steps * config.flow_batch / (0.9 * len(positions))))
    decay = 0.01 ** (1.0 / epochs)
    flow = train_flow(
        positions, n_blocks=config.flow_blocks, hidden_features=config.flow_hidden, epochs=epochs,
        batch_size=config.flow_batch, learning_rate=1e-3, learning_rate_decay=decay,
        patience=config.flow_patience_epochs, checkpoint_path=unit / "flow_checkpoint.pt", seed=seed, progress=False,
    )
    path = unit / "flow.pt"
    flow.save(path.with_name("flow.pt.partial"))
    os.replace(path.with_name("flow.pt.partial"), path)
    history = flow.training_history
    best = min(history, key=lambda record: record["validation_nll"])
    return {
        "epochs_budget": epochs, "epochs": len(history), "best_epoch": best["epoch"],
        "best_validation_nll": best["validation_nll"], "stopped_early": len(history) < epochs,
        "validation_nll_last_epochs": [record["validation_nll"] for record in history[-5:]],
        "training_seconds": float(sum(record["seconds"] for record in history)),
    }


def stage_teacher(unit: Path, positions: np.ndarray, config: ChignolinConfig, seed: int) -> dict:
    """Teacher samples; the outlier threshold is a quantile of the flow's force scores on the data."""
    import torch

    from openmm_flowmatch.flows import CGFlow, sample_teacher
    from openmm_flowmatch.flows.teacher import force_threshold_from_data

    flow = CGFlow.load(unit / "flow.pt")
    data_forces = torch.cat([flow.forces(torch.as_tensor(chunk, dtype=torch.float32), config.temperature).detach()
                             for chunk in np.array_split(positions, max(1, len(positions) // 2000))])
    threshold = force_threshold_from_data(data_forces, config.temperature, config.teacher_threshold_quantile)
    temporary = unit / "teacher.h5.partial"
    report = sample_teacher(flow, config.teacher_samples, temporary, config.temperature,
                            force_threshold=threshold, seed=seed, progress=False)
    os.replace(temporary, unit / "teacher.h5")
    return {
        "n_samples": report.n_samples, "n_drawn": report.n_drawn, "dropped_fraction": report.dropped_fraction,
        "force_threshold_kT2_per_nm2": threshold, "threshold_rule": (
            f"quantile {config.teacher_threshold_quantile} of the flow's mean squared force (kT/nm)^2 on the data frames"),
        "samples_per_second": report.samples_per_second,
    }


def feature_set_of(config: ChignolinConfig, method: str) -> str | None:
    """The network feature set of ``method`` (``None``: the package default for the method)."""
    name = config.flow_matching_feature_set if method == "flow-matching" else config.force_matching_feature_set
    return None if name == "auto" else name


def stage_force_field(unit: Path, data: tuple, priors: Any, mapping: Any, config: ChignolinConfig, method: str,
                      seed: int) -> dict:
    from openmm_flowmatch.export import export_force_field
    from openmm_flowmatch.forcefield import train_force_field

    model = train_force_field(
        data, priors, method=method,
        model_kwargs=dict(hidden_width=config.hidden_width, n_layers=config.n_layers, activation=config.activation,
                          lipschitz_bound=config.lipschitz_bound, feature_set=feature_set_of(config, method)),
        max_steps=config.force_field_steps, batch_size=config.force_field_batch,
        learning_rate_schedule="published", patience_steps=config.force_field_patience_steps,
        validation_interval=config.force_field_validation_interval,
        checkpoint_path=unit / "force_field_checkpoint.pt", seed=seed, progress=False,
    )
    info = dict(model.training_info)
    export_force_field(model, unit / "model.pt", priors=priors, mapping=mapping, temperature=config.temperature,
                       training=info)
    keep = ("method", "frames", "validation_frames", "epochs", "best_epoch", "stopped_early", "feature_set",
            "initial_validation_loss", "best_validation_loss", "training_seconds", "steps", "best_step")
    return {key: info[key] for key in keep if key in info} | {"artifact": "model.pt"}


# ------------------------------------------------------------------------------------- dynamics


def spread_starts(positions: np.ndarray, count: int) -> np.ndarray:
    """``count`` start frames evenly spaced over the data (folded and unfolded alike)."""
    return positions[np.linspace(0, len(positions) - 1, count).round().astype(int)].astype(np.float64)


def stage_time_step(unit: Path, starts: np.ndarray, config: ChignolinConfig, seed: int) -> dict:
    """The model's largest sound step among ``config.time_steps_fs``, stored in the artifact too."""
    from openmm_flowmatch.diagnostics import check_time_step, record_sound_time_step
    from openmm_flowmatch.export import FlowMatchForceField

    report = check_time_step(
        FlowMatchForceField.load(unit / "model.pt"), starts, time_steps=[step / 1000.0 for step in config.time_steps_fs],
        replicas=config.check_replicas, equilibration_time=2.0, production_time=config.check_production_ps,
        temperature=config.temperature, friction=config.friction_per_ps, platform="CPU",
        platform_properties={"Threads": str(config.threads)}, seed=seed, progress=False,
    )
    record_sound_time_step(unit / "model.pt", report)
    return report.to_dict()


def production_time_step(time_step_record: dict, config: ChignolinConfig) -> tuple[float, str]:
    """The step (ps) to simulate at, and why: the largest sound one, else the smallest tried."""
    sound = time_step_record.get("largest_sound_time_step")
    if sound is not None:
        return float(sound), "largest sound step of the check"
    return min(config.time_steps_fs) / 1000.0, "no tried step was sound; the smallest one is used and the run flagged"


def stage_simulation(unit: Path, starts: np.ndarray, mapping: Any, config: ChignolinConfig, time_step: float,
                     seed: int) -> dict:
    from openmm_flowmatch.export import FlowMatchForceField, replicate_topology
    from openmm_flowmatch.simulation import BlowUpError, run_simulation

    force_field = FlowMatchForceField.load(unit / "model.pt")
    topology = mapping.cg_topology()
    system = force_field.create_system(replicate_topology(topology, config.replicas), replicas=config.replicas)
    report_interval = max(1, round(config.report_interval_ps / time_step))
    steps = report_interval * round((config.simulation_ps + config.equilibration_ps) / (report_interval * time_step))
    record = {"replicas": config.replicas, "steps": steps, "time_step_ps": time_step,
              "report_interval_steps": report_interval, "per_replica_ps": steps * time_step}
    try:
        result = run_simulation(
            system, topology, starts, unit / "simulation", steps, replicas=config.replicas,
            temperature=config.temperature, friction=config.friction_per_ps, time_step=time_step,
            report_interval=report_interval, checkpoint_interval=report_interval * 50, platform="CPU",
            platform_properties={"Threads": str(config.threads)}, seed=seed, progress=False,
        )
        kinetic = result.kinetic_temperature
        record.update(status="finished", wall_time=result.wall_time, ns_per_day=result.ns_per_day,
                      steps_per_second=result.steps_run / result.wall_time if result.wall_time else None,
                      kinetic_temperature=dataclasses.asdict(kinetic) if kinetic is not None else None,
                      bonded=result.bonded)
    except BlowUpError as error:
        record.update(status="blew_up", blow_up_step=error.step, reason=error.reason)
        logger.warning("%s: %s", unit, error)
    return record


def discard_stale_simulation(unit: Path, time_step: float) -> None:
    """Move aside a simulation (and its metrics) run at another step than the time-step check now gives."""
    marker = unit / "simulation.json"
    if not marker.exists() or abs(read_json(marker)["time_step_ps"] - time_step) < 1e-12:
        return
    logger.warning("%s: the simulation ran at %s ps, the time-step check now gives %s ps; simulating again",
                   unit, read_json(marker)["time_step_ps"], time_step)
    for name in ("simulation.json", "metrics.json", "simulation"):
        path, stale = unit / name, unit / f"{name}.stale"
        if stale.is_dir():
            shutil.rmtree(stale)
        if path.exists():
            os.replace(path, stale)


def model_trajectories(unit: Path, mapping: Any, config: ChignolinConfig, simulation: dict) -> list[np.ndarray]:
    """Replica trajectories (nm) after the equilibration time."""
    from openmm_flowmatch.analysis import load_positions

    frame_ps = simulation["report_interval_steps"] * simulation["time_step_ps"]
    skip = int(round(config.equilibration_ps / frame_ps))
    paths = sorted((unit / "simulation").glob("replica_*.dcd"))
    if simulation.get("status") == "blew_up":
        logger.warning("%s: the simulation blew up; its metrics are not computed", unit)
        return []
    return [load_positions(path, mapping.cg_topology())[skip:].astype(np.float64) for path in paths]


def stage_metrics(unit: Path, runs: list, native: np.ndarray, mapping: Any, config: ChignolinConfig,
                  simulation: dict) -> dict:
    from openmm_flowmatch.protein_analysis import compare_proteins, plot_protein_comparison

    reference = [run.positions.astype(np.float64) for run in runs]
    model = model_trajectories(unit, mapping, config, simulation)
    if not model:
        return {"metrics": None, "simulation_status": simulation.get("status"), "model_ns": 0.0}
    frame_ps = simulation["report_interval_steps"] * simulation["time_step_ps"]
    metrics = compare_proteins(reference, model, native, config.temperature, lag=config.tica_lag_frames,
                               reference_frame_interval_ps=config.frame_interval_ps, model_frame_interval_ps=frame_ps)
    plot_protein_comparison(reference, model, native, unit / "comparison.png", temperature=config.temperature,
                            lag=config.tica_lag_frames, label=unit.name, reference_frame_interval_ps=config.frame_interval_ps,
                            model_frame_interval_ps=frame_ps)
    record = {"metrics": metrics, "simulation_status": simulation.get("status"),
              "model_ns": sum(len(x) for x in model) * frame_ps / 1000.0}
    if (unit / "teacher.h5").exists():
        record["teacher_vs_reference"] = teacher_metrics(unit, reference, native, config)
    return record


def teacher_metrics(unit: Path, reference: list, native: np.ndarray, config: ChignolinConfig) -> dict:
    """The flow's own samples (the teacher, independent draws) against the reference: what the CG model could reach."""
    from openmm_flowmatch.data.storage import read_cg_file
    from openmm_flowmatch.protein_analysis import compare_proteins

    samples = read_cg_file(unit / "teacher.h5")["positions"].astype(np.float64)
    metrics = compare_proteins(reference, [samples], native, config.temperature, lag=config.tica_lag_frames,
                               reference_frame_interval_ps=config.frame_interval_ps)
    metrics.pop("transitions", None)  # independent samples have no time axis
    return metrics | {"samples": int(len(samples))}


# ------------------------------------------------------------------------------------- protocol


def run_method(work: Path, runs: list, native: np.ndarray, mapping: Any, priors: Any, config: ChignolinConfig,
               method: str, seed: int, log: StageLog) -> None:
    """All stages of one method: teacher (flow-matching), force field, time step, simulation, metrics."""
    import torch

    torch.manual_seed(seed)
    unit = work / method
    unit.mkdir(parents=True, exist_ok=True)
    positions = np.concatenate([run.positions for run in runs])
    if method == "flow-matching":
        log.run_stage(f"{method}: flow", unit / "flow.json", lambda: stage_flow(unit, positions, config, seed))
        log.run_stage(f"{method}: teacher", unit / "teacher.json", lambda: stage_teacher(unit, positions, config, seed))

        def training_data() -> tuple:
            from openmm_flowmatch.data.storage import read_cg_file

            teacher = read_cg_file(unit / "teacher.h5")
            return teacher["positions"], teacher["forces"]
    else:
        def training_data() -> tuple:
            return positions, np.concatenate([run.forces for run in runs])
    log.run_stage(f"{method}: force field", unit / "force_field.json",
                  lambda: stage_force_field(unit, training_data(), priors, mapping, config, method, seed))
    starts = spread_starts(positions, max(config.replicas, config.check_replicas))
    time_step_record = log.run_stage(f"{method}: time step", unit / "time_step.json",
                                     lambda: stage_time_step(unit, starts[: config.check_replicas], config, seed))
    time_step, reason = production_time_step(time_step_record, config)
    discard_stale_simulation(unit, time_step)
    simulation = log.run_stage(
        f"{method}: simulation", unit / "simulation.json",
        lambda: stage_simulation(unit, starts[: config.replicas], mapping, config, time_step, seed)
        | {"time_step_reason": reason},
    )
    log.run_stage(f"{method}: metrics", unit / "metrics.json",
                  lambda: stage_metrics(unit, runs, native, mapping, config, simulation))


def check_work_config(work: Path, config: ChignolinConfig) -> None:
    """Refuse to mix a work directory's cached stages with another configuration."""
    path = work / "config.json"
    if path.exists():
        old = read_json(path)
        changed = {key: (old.get(key), value) for key, value in config.to_dict().items() if old.get(key) != value}
        if changed:
            described = ", ".join(f"{key}: was {was}, now {now}" for key, (was, now) in changed.items())
            raise ChignolinError(f"{work} holds a run with another configuration ({described}); use another --work")
    else:
        atomic_write_json(path, config.to_dict())


def run_benchmark(data: Path, work: Path, config: ChignolinConfig, pdb: Path, methods: Sequence[str],
                  seed: int = 0) -> StageLog:
    from openmm_flowmatch.priors import Priors

    work.mkdir(parents=True, exist_ok=True)
    check_work_config(work, config)
    mapping, native = native_structure(pdb)
    runs = load_runs(data, config, native)
    log = StageLog()
    positions = np.concatenate([run.positions for run in runs])
    priors = Priors.from_dict(log.run_stage("priors", work / "priors.json",
                                            lambda: stage_priors(positions, mapping, config))["priors"])
    for method in methods:
        run_method(work, runs, native, mapping, priors, config, method, seed, log)
    log.run_stage("data", work / "data.json", lambda: stage_data(runs, native, config))
    return log


# ------------------------------------------------------------------------------------- results


def collect_results(work: Path, config: ChignolinConfig, command: str) -> dict:
    """Every stage record of the work directory in one JSON-able dict."""
    def optional(path: Path) -> Any:
        return read_json(path) if path.exists() else None

    results: dict = {
        "benchmark": "chignolin CLN025 Cα, flow-matching vs force matching (benchmarks/chignolin.py)",
        "command": command, "config": config.to_dict(), **environment(),
        "data": optional(work / "data.json"), "priors": optional(work / "priors.json"), "methods": {},
        "caveat": ("reference = 2 x 17 ns all-atom at 340 K that unfold within a few ns and refold now and then: "
                   "not an equilibrium ensemble; compare models with the run-1-vs-run-2 floor"),
    }
    for method in METHODS:
        unit = work / method
        names = ("flow", "teacher", "force_field", "time_step", "simulation", "metrics")
        records = {name: optional(unit / f"{name}.json") for name in names}
        if any(value is not None for value in records.values()):
            results["methods"][method] = records
    return results


def plot_results(work: Path, config: ChignolinConfig, path: Path, pdb: Path, data: Path) -> Path | None:
    """One figure of every simulated method beside the reference (None before any simulation)."""
    from openmm_flowmatch.protein_analysis import plot_protein_comparison

    mapping, native = native_structure(pdb)
    models = {}
    for method in METHODS:
        marker = work / method / "simulation.json"
        if marker.exists() and (work / method / "metrics.json").exists() and read_json(marker)["status"] == "finished":
            models[method] = model_trajectories(work / method, mapping, config, read_json(marker))
    if not models:
        return None
    reference = [run.positions.astype(np.float64) for run in load_runs(data, config, native)]
    frame_ps = {read_json(work / method / "simulation.json")["report_interval_steps"]
                * read_json(work / method / "simulation.json")["time_step_ps"] for method in models}
    path.parent.mkdir(parents=True, exist_ok=True)
    return plot_protein_comparison(reference, models, native, path, temperature=config.temperature,
                                   lag=config.tica_lag_frames, reference_frame_interval_ps=config.frame_interval_ps,
                                   model_frame_interval_ps=frame_ps.pop() if len(frame_ps) == 1 else None)


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="directory of run folders with chunk_*.npz (Cα)")
    parser.add_argument("--work", type=Path, default=Path("runs/chignolin"), help="cache of every stage (resumable)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where chignolin.json and the figure go")
    parser.add_argument("--pdb", type=Path, default=None, help="native structure (default: bundled CLN025)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_config(arguments: argparse.Namespace) -> ChignolinConfig:
    return apply_settings(ChignolinConfig(**PRESETS[arguments.preset]), arguments.set, error=ChignolinError)


def default_pdb() -> Path:
    from importlib.resources import files

    return Path(str(files("openmm_flowmatch") / "resources" / "chignolin_cln025.pdb"))


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    command = "python benchmarks/chignolin.py " + " ".join(sys.argv[1:] if argv is None else argv)
    name = "chignolin.json" if arguments.preset == "full" else f"chignolin_{arguments.preset}.json"
    started = time.perf_counter()
    try:
        config = build_config(arguments)
        run_benchmark(arguments.data, arguments.work, config, arguments.pdb or default_pdb(), arguments.methods,
                      arguments.seed)
    except ChignolinError as error:
        logger.error("%s", error)
        return 2
    results = collect_results(arguments.work, config, command)
    figure = plot_results(arguments.work, config, arguments.results / name.replace(".json", ".png"),
                          arguments.pdb or default_pdb(), arguments.data)
    results["figure"] = figure.name if figure else None
    results["wall_seconds_this_invocation"] = time.perf_counter() - started
    atomic_write_json(arguments.results / name, results)
    logger.info("results written to %s", arguments.results / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
