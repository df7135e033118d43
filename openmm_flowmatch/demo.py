"""The end-to-end alanine-dipeptide demo: all-atom reference to CG simulation in OpenMM.

:func:`run_demo` runs every stage of flow-matching (Köhler, Krämer, Noé et al.,
arXiv 2203.11167) on capped alanine dipeptide, at sizes scaled down from the paper so that the
whole demo runs in minutes on a laptop CPU:

1. ``reference``  all-atom MD (amber14 + GBn2, 300 K) with :func:`generate_reference`,
   saved as the 5-bead backbone CG map (ACE C, ALA N, CA, C, NME N);
2. ``priors``     harmonic bonds and angles fitted by Boltzmann inversion;
3. ``flow``       the normalizing-flow teacher, trained by maximum likelihood;
4. ``teacher``    teacher samples with forces kT ∇ log q, outliers dropped;
5. ``forcefield`` the CG network trained by force matching on the teacher forces;
6. ``export``     the TorchScript artifact;
7. ``simulate``   the artifact in OpenMM (one System with all replicas, TorchForce);
8. ``analyze``    φ/ψ free energies of the CG simulation (and of the teacher) against the
   reference, with the DESIGN.md metrics (``metrics.json``) and a figure (``phi_psi.png``).

Every stage is cached in the output directory: a stage whose record exists in
``demo_report.json`` is skipped when the demo is run again, and the long stages (reference,
flow, force field, simulation) resume from their own checkpoints after an interruption.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from openmm_flowmatch.forcefield.networks import load_network, save_network

logger = logging.getLogger(__name__)

__all__ = ["DemoError", "DemoSizes", "FULL", "QUICK", "run_demo", "STAGES", "basin_balance_warning"]

STAGES = ("reference", "priors", "flow", "teacher", "forcefield", "export", "simulate", "analyze")
REPORT_FILE = "demo_report.json"


class DemoError(ValueError):
    """The demo cannot run (e.g. an output directory holding a demo of other sizes)."""


@dataclass(frozen=True)
class DemoSizes:
    """Sizes of the demo. Defaults (:data:`FULL`) target < 15 min on 2 CPU cores.

    The paper used 1 µs of all-atom data (every 1 ps), 100k teacher samples and long CG
    simulations; the demo uses much less of each (see :meth:`describe`).
    """

    reference_ps: float = 1000.0
    reference_equilibration_ps: float = 20.0
    reference_replicas: int = 1
    reference_save_interval_steps: int = 50  # 0.2 ps at 4 fs
    flow_epochs: int = 25
    flow_batch_size: int = 256
    flow_blocks: int = 4
    flow_hidden: int = 128
    teacher_samples: int = 100000
    forcefield_epochs: int = 50
    forcefield_batch_size: int = 256
    forcefield_learning_rate: float = 3e-3
    forcefield_width: int = 160
    forcefield_layers: int = 5
    replicas: int = 32
    simulation_steps: int = 13200
    time_step_ps: float = 0.003  # the largest sound step of this model: benchmarks/results/time_step.json
    report_interval: int = 33  # a frame every 0.099 ps
    temperature: float = 300.0
    seed: int = 0

    def describe(self) -> str:
        """One paragraph stating the sizes (printed by the CLI and stored in the report)."""
        frames = int(round(self.reference_ps / (self.reference_save_interval_steps * 0.004)))
        simulated_ns = self.replicas * self.simulation_steps * self.time_step_ps / 1000.0
        return (
            f"all-atom reference {self.reference_replicas} × {self.reference_ps:g} ps "
            f"({frames} CG frames per replica; paper: 1 µs); flow {self.flow_epochs} epochs; "
            f"{self.teacher_samples} teacher samples (paper: 100k); force field {self.forcefield_epochs} "
            f"epochs, width {self.forcefield_width} × {self.forcefield_layers} layers; CG simulation "
            f"{self.replicas} replicas × {self.simulation_steps} steps of {self.time_step_ps * 1000:g} fs "
            f"({simulated_ns:.2f} ns in total) at {self.temperature:g} K"
        )


FULL = DemoSizes()
"""Default demo sizes (minutes on a laptop CPU)."""

QUICK = DemoSizes(
    reference_ps=20.0,
    reference_equilibration_ps=2.0,
    flow_epochs=2,
    teacher_samples=600,
    forcefield_epochs=2,
    forcefield_width=32,
    forcefield_layers=2,
    replicas=2,
    simulation_steps=400,
    time_step_ps=0.001,
    report_interval=20,
)
"""Tiny sizes for tests (seconds); the result is not meant to look like alanine dipeptide."""


# --------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------


def _resource(name: str) -> Path:
    return Path(__file__).resolve().parent / "resources" / name


class _Report:
    """demo_report.json: sizes, and per stage its wall time and summary."""

    def __init__(self, path: Path, sizes: DemoSizes) -> None:
        self.path = path
        self.data = {"sizes": asdict(sizes), "description": sizes.describe(), "stages": {}}
        if path.exists():
            previous = json.loads(path.read_text())
            if previous.get("sizes") != self.data["sizes"]:
                changed = [k for k in self.data["sizes"] if previous.get("sizes", {}).get(k) != self.data["sizes"][k]]
                raise DemoError(
                    f"{path.parent} holds a demo run with other sizes ({', '.join(changed)} differ); "
                    "use another --out directory or the same options"
                )
            self.data["stages"] = previous.get("stages", {})

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def record(self, stage: str, seconds: float, summary: dict) -> None:
        self.data["stages"][stage] = {"seconds": round(seconds, 2), **summary}
        self.save()

    def save(self) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        temporary.replace(self.path)


def run_demo(
    out_dir: str | Path,
    sizes: DemoSizes = FULL,
    *,
    pdb: str | Path | None = None,
    platform: str | None = "CPU",
    threads: int | None = None,
    progress: bool = True,
    stage_callback: Callable[[str, str, float | None], None] | None = None,
) -> dict:
    """Run (or resume) the alanine-dipeptide demo in ``out_dir``.

    Parameters
    ----------
    out_dir
        Output directory; stages already recorded in its ``demo_report.json`` are skipped.
    sizes
        :data:`FULL` (default) or :data:`QUICK` or your own :class:`DemoSizes`.
    pdb
        All-atom ACE-ALA-NME structure; default the bundled ``alanine_dipeptide.pdb``.
    platform
        OpenMM platform for the all-atom and CG simulations (default CPU).
    threads
        Threads of OpenMM's CPU platform (default: OpenMM's choice).
    progress
        tqdm progress bars inside the stages.
    stage_callback
        Called as ``stage_callback(stage, status, seconds)`` with status ``"start"``, ``"done"``
        or ``"cached"``; stage lines are also logged at INFO level.

    Returns
    -------
    dict
        The report: sizes, per-stage seconds and summaries, metrics (also in
        ``out_dir/demo_report.json``, ``out_dir/metrics.json`` and ``out_dir/phi_psi.png``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pdb = Path(pdb) if pdb is not None else _resource("alanine_dipeptide.pdb")
    report = _Report(out_dir / REPORT_FILE, sizes)
    logger.info("demo sizes: %s", sizes.describe())
    run = _DemoStages(out_dir, sizes, pdb, platform, threads, progress, report.path)
    for number, name in enumerate(STAGES, start=1):
        _run_stage(f"[{number}/{len(STAGES)}] {name}", name, getattr(run, name), report, stage_callback)
    total = sum(stage["seconds"] for stage in report.data["stages"].values())
    report.data["total_seconds"] = round(total, 2)
    report.data["outputs"] = {key: str(value) for key, value in run.paths.items()}
    report.save()
    return report.data


def _run_stage(label: str, name: str, stage: Callable[[], dict], report: _Report,
               stage_callback: Callable[[str, str, float | None], None] | None) -> None:
    """Run one stage unless the report holds it; record its wall time and summary."""
    if report.done(name):
        seconds = report.data["stages"][name]["seconds"]
        logger.info("%s: done before (%.1f s), skipped", label, seconds)
        if stage_callback:
            stage_callback(name, "cached", seconds)
        return
    logger.info("%s: running", label)
    if stage_callback:
        stage_callback(name, "start", None)
    clock = time.perf_counter()
    summary = stage()
    seconds = time.perf_counter() - clock
    report.record(name, seconds, summary)
    logger.info("%s: finished in %.1f s", label, seconds)
    if stage_callback:
        stage_callback(name, "done", seconds)


def _output_paths(out_dir: Path) -> dict[str, Path]:
    """Where the demo's stages write, by name."""
    names = {
        "reference": "reference", "priors": "priors.json", "flow": "flow.pt", "teacher": "teacher.h5",
        "network": "forcefield_network.pt", "artifact": "forcefield.pt", "simulation": "simulation",
        "metrics": "metrics.json", "figure": "phi_psi.png", "teacher_figure": "phi_psi_teacher.png",
    }
    return {key: out_dir / name for key, name in names.items()}


class _DemoStages:
    """The demo's stages over one output directory: one method per name of :data:`STAGES`, each
    returning its summary for the report, and the loaders the later stages share."""

    def __init__(self, out_dir: Path, sizes: DemoSizes, pdb: Path, platform: str | None, threads: int | None,
                 progress: bool, report_path: Path) -> None:
        self.out_dir, self.sizes, self.pdb = out_dir, sizes, pdb
        self.platform, self.threads, self.progress = platform, threads, progress
        self.report_path = report_path
        self.paths = _output_paths(out_dir)
        self._reference: dict | None = None

    # ------------------------------------------------------------------ what later stages read
    def reference_data(self) -> dict:
        """The reference's CG positions (all replicas, and per replica) and metadata, read once."""
        if self._reference is None:
            from openmm_flowmatch.data.storage import read_cg_file

            files = sorted(self.paths["reference"].glob("replica_*.h5"))
            if not files:
                raise DemoError(f"no reference data in {self.paths['reference']}; delete {self.report_path} to start again")
            parts = [read_cg_file(f) for f in files]
            self._reference = {
                "positions": np.concatenate([p["positions"] for p in parts]),
                "per_replica": [p["positions"] for p in parts],
                "metadata": parts[0]["metadata"],
            }
        return self._reference

    def mapping(self):
        from openmm_flowmatch.mapping import CGMapping

        return CGMapping.from_dict(self.reference_data()["metadata"]["mapping"])

    def load_priors(self):
        from openmm_flowmatch.priors import Priors

        return Priors.from_dict(json.loads(self.paths["priors"].read_text()))

    def teacher_data(self) -> dict:
        from openmm_flowmatch.data.storage import read_cg_file

        return read_cg_file(self.paths["teacher"])

    # ------------------------------------------------------------------------------- stages
    def reference(self) -> dict:
        from openmm_flowmatch.data.reference import generate_reference

        sizes = self.sizes
        files = generate_reference(
            self.pdb, self.paths["reference"], "backbone", temperature=sizes.temperature,
            duration_ps=sizes.reference_ps, equilibration_ps=sizes.reference_equilibration_ps,
            save_interval_steps=sizes.reference_save_interval_steps, replicas=sizes.reference_replicas,
            seed=sizes.seed, platform=self.platform, threads=self.threads, progress=self.progress,
        )
        frames = self.reference_data()["positions"].shape[0]
        return {"files": [str(f) for f in files], "frames": int(frames)}

    def priors(self) -> dict:
        from openmm_flowmatch.priors import Priors

        priors = Priors.fit(self.reference_data()["positions"], self.mapping().bonds, self.sizes.temperature)
        self.paths["priors"].write_text(json.dumps(priors.to_dict(), indent=1) + "\n")
        return {"terms": repr(priors)}

    def flow(self) -> dict:
        import torch

        from openmm_flowmatch.flows.training import train_flow

        sizes = self.sizes
        torch.manual_seed(sizes.seed)
        flow = train_flow(
            self.reference_data()["positions"], epochs=sizes.flow_epochs, batch_size=sizes.flow_batch_size,
            n_blocks=sizes.flow_blocks, hidden_features=sizes.flow_hidden, seed=sizes.seed,
            checkpoint_path=self.out_dir / "flow_checkpoint.pt", progress=self.progress,
        )
        flow.save(self.paths["flow"])
        history = getattr(flow, "training_history", []) or []
        best = min((h["validation_nll"] for h in history), default=float("nan"))
        return {"epochs": len(history), "best_validation_nll": best}

    def teacher(self) -> dict:
        from openmm_flowmatch.flows.model import CGFlow
        from openmm_flowmatch.flows.teacher import sample_teacher

        flow = CGFlow.load(self.paths["flow"])
        teacher = sample_teacher(
            flow, self.sizes.teacher_samples, self.paths["teacher"], self.sizes.temperature, seed=self.sizes.seed,
            metadata={"mapping": self.mapping().to_dict()}, progress=self.progress,
        )
        return {
            "samples": teacher.n_samples, "drawn": teacher.n_drawn,
            "dropped_fraction": teacher.dropped_fraction, "force_threshold": teacher.force_threshold,
        }

    def forcefield(self) -> dict:
        from openmm_flowmatch.forcefield.training import train_force_field

        sizes, data = self.sizes, self.teacher_data()
        model = train_force_field(
            {"positions": data["positions"], "forces": data["forces"]}, self.load_priors(), method="flow-matching",
            bonds=self.mapping().bonds, epochs=sizes.forcefield_epochs, batch_size=sizes.forcefield_batch_size,
            learning_rate=sizes.forcefield_learning_rate,
            model_kwargs={"hidden_width": sizes.forcefield_width, "n_layers": sizes.forcefield_layers},
            checkpoint_path=self.out_dir / "forcefield_checkpoint.pt", seed=sizes.seed, progress=self.progress,
        )
        save_network(model, self.paths["network"])
        info = getattr(model, "training_info", {}) or {}
        return {
            "frames": info.get("frames"), "epochs": info.get("epochs"),
            "best_validation_loss": info.get("best_validation_loss"),
        }

    def export(self) -> dict:
        from openmm_flowmatch.export import export_force_field

        export_force_field(
            load_network(self.paths["network"]), self.paths["artifact"], priors=self.load_priors(),
            mapping=self.mapping(), temperature=self.sizes.temperature, replicas=self.sizes.replicas,
        )
        return {"artifact": str(self.paths["artifact"])}

    def simulate(self) -> dict:
        from openmm_flowmatch.simulation import simulate_force_field

        sizes, reference = self.sizes, self.reference_data()["positions"]
        starts = reference[np.linspace(0, len(reference) - 1, sizes.replicas).astype(int)]
        on_cpu = (self.platform or "").upper() == "CPU"
        properties = {"Threads": str(self.threads)} if self.threads and on_cpu else None
        result = simulate_force_field(
            self.paths["artifact"], self.pdb, self.paths["simulation"], sizes.simulation_steps,
            replicas=sizes.replicas, initial_positions=starts, temperature=sizes.temperature,
            time_step=sizes.time_step_ps, report_interval=sizes.report_interval, platform=self.platform,
            platform_properties=properties, seed=sizes.seed, progress=self.progress,
        )
        kinetic = result.kinetic_temperature
        return {
            "platform": result.platform, "replicas": result.replicas, "steps": result.steps,
            "time_step_ps": sizes.time_step_ps, "frames_per_replica": result.frames_per_replica,
            "ns_per_day": result.ns_per_day,
            "kinetic_temperature": None if kinetic is None else asdict(kinetic),
            "bonded": result.bonded,
        }

    def analyze(self) -> dict:
        from openmm_flowmatch import analysis

        model = self._simulated_positions()
        reference, temperature = self.reference_data()["positions"], self.sizes.temperature
        comparison = analysis.compare_phi_psi(reference, model, temperature=temperature)
        analysis.plot_free_energy_comparison(
            comparison, self.paths["figure"], titles=("all-atom reference (CG map)", "CG model in OpenMM")
        )
        teacher = analysis.compare_phi_psi(reference, self.teacher_data()["positions"], temperature=temperature)
        analysis.plot_free_energy_comparison(
            teacher, self.paths["teacher_figure"], titles=("all-atom reference (CG map)", "flow teacher samples")
        )
        basins = _basin_populations(reference, model)
        warning = basin_balance_warning(basins)
        if warning:
            logger.warning("%s", warning)
        metrics = {
            "cg_simulation": comparison.metrics,
            "teacher": teacher.metrics,
            "basins": basins,
            "basin_balance_warning": warning,
            "sizes": self.sizes.describe(),
            "definition": "DESIGN.md Metrics: 60x60 phi/psi histogram on [-pi, pi)^2, F in kcal/mol",
        }
        analysis.write_metrics(self.paths["metrics"], metrics)
        return {"metrics": metrics["cg_simulation"], "teacher_metrics": teacher.metrics, "basins": basins}

    def _simulated_positions(self) -> np.ndarray:
        """The CG simulation's frames, all replicas, without the first 10 % of each (relaxation
        from the reference start)."""
        from openmm_flowmatch import analysis

        topology = self.mapping().cg_topology()
        trajectories = sorted(self.paths["simulation"].glob("replica_*.dcd"))
        return np.concatenate(
            [frames[len(frames) // 10 :] for frames in (analysis.load_positions(t, topology) for t in trajectories)]
        )


def _basin_populations(reference: np.ndarray, model: np.ndarray) -> dict:
    """Fractions of frames in the β/PII and αR basins and at φ > 0, reference and model
    (regions of :func:`openmm_flowmatch.analysis.alanine_basins`)."""
    from openmm_flowmatch.analysis import alanine_basins

    def populations(positions):
        basins = alanine_basins(positions)
        return {
            "beta_pII": float(basins["beta_pII"].mean()),
            "alpha_R": float(basins["alpha_R"].mean()),
            "phi_positive": float((~basins["phi_negative"]).mean()),
        }

    return {"reference": populations(reference), "cg_simulation": populations(model)}


BASIN_TOLERANCE: float = 0.1
"""Largest difference of a basin's population (fraction of frames), CG simulation vs reference,
that :func:`basin_balance_warning` lets pass."""


def basin_balance_warning(basins: dict, tolerance: float = BASIN_TOLERANCE) -> str | None:
    """A sentence when the CG simulation's β/PII or αR population differs from the reference's by
    more than ``tolerance`` (``basins`` as in the demo's metrics), else ``None``."""
    reference, model = basins["reference"], basins["cg_simulation"]
    off = [name for name in ("beta_pII", "alpha_R") if abs(model[name] - reference[name]) > tolerance]
    if not off:
        return None
    shown = ", ".join(f"{name} {model[name]:.0%} vs {reference[name]:.0%}" for name in off)
    return (f"the CG simulation's basin populations differ from the reference's ({shown}, CG vs reference); "
            "where a longer simulation does not change them, they are the model's: flow-matching networks that "
            "leave bonds and angles to the priors can miss their teacher's basin balance (docs/benchmarks.md, "
            "'Basin balance'; benchmarks/basin_offset.py measures it)")


def sizes_from_options(quick: bool = False, **overrides: Any) -> DemoSizes:
    """:data:`FULL` or :data:`QUICK` with some fields replaced (``None`` values are ignored)."""
    base = QUICK if quick else FULL
    known = {f.name for f in fields(DemoSizes)}
    unknown = set(overrides) - known
    if unknown:
        raise DemoError(f"unknown demo size(s): {', '.join(sorted(unknown))}")
    values = {**asdict(base), **{k: v for k, v in overrides.items() if v is not None}}
    return DemoSizes(**values)
