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

__all__ = ["DemoError", "DemoSizes", "FULL", "QUICK", "run_demo", "STAGES"]

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
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pdb = Path(pdb) if pdb is not None else _resource("alanine_dipeptide.pdb")
    report = _Report(out_dir / REPORT_FILE, sizes)
    logger.info("demo sizes: %s", sizes.describe())
    paths = {
        "reference": out_dir / "reference",
        "priors": out_dir / "priors.json",
        "flow": out_dir / "flow.pt",
        "teacher": out_dir / "teacher.h5",
        "network": out_dir / "forcefield_network.pt",
        "artifact": out_dir / "forcefield.pt",
        "simulation": out_dir / "simulation",
        "metrics": out_dir / "metrics.json",
        "figure": out_dir / "phi_psi.png",
        "teacher_figure": out_dir / "phi_psi_teacher.png",
    }
    state: dict[str, Any] = {}

    def reference_data() -> dict:
        if "reference" not in state:
            from openmm_flowmatch.data.storage import read_cg_file

            files = sorted(paths["reference"].glob("replica_*.h5"))
            if not files:
                raise DemoError(f"no reference data in {paths['reference']}; delete {report.path} to start again")
            parts = [read_cg_file(f) for f in files]
            state["reference"] = {
                "positions": np.concatenate([p["positions"] for p in parts]),
                "per_replica": [p["positions"] for p in parts],
                "metadata": parts[0]["metadata"],
            }
        return state["reference"]

    def mapping():
        from openmm_flowmatch.mapping import CGMapping

        return CGMapping.from_dict(reference_data()["metadata"]["mapping"])

    def stage_reference() -> dict:
        from openmm_flowmatch.data.reference import generate_reference

        files = generate_reference(
            pdb, paths["reference"], "backbone", temperature=sizes.temperature, duration_ps=sizes.reference_ps,
            equilibration_ps=sizes.reference_equilibration_ps, save_interval_steps=sizes.reference_save_interval_steps,
            replicas=sizes.reference_replicas, seed=sizes.seed, platform=platform, threads=threads, progress=progress,
        )
        frames = reference_data()["positions"].shape[0]
        return {"files": [str(f) for f in files], "frames": int(frames)}

    def stage_priors() -> dict:
        from openmm_flowmatch.priors import Priors

        priors = Priors.fit(reference_data()["positions"], mapping().bonds, sizes.temperature)
        paths["priors"].write_text(json.dumps(priors.to_dict(), indent=1) + "\n")
        return {"terms": repr(priors)}

    def load_priors():
        from openmm_flowmatch.priors import Priors

        return Priors.from_dict(json.loads(paths["priors"].read_text()))

    def stage_flow() -> dict:
        from openmm_flowmatch.flows.training import train_flow

        torch.manual_seed(sizes.seed)
        flow = train_flow(
            reference_data()["positions"], epochs=sizes.flow_epochs, batch_size=sizes.flow_batch_size,
            n_blocks=sizes.flow_blocks, hidden_features=sizes.flow_hidden, seed=sizes.seed,
            checkpoint_path=out_dir / "flow_checkpoint.pt", progress=progress,
        )
        flow.save(paths["flow"])
        history = getattr(flow, "training_history", []) or []
        best = min((h["validation_nll"] for h in history), default=float("nan"))
        return {"epochs": len(history), "best_validation_nll": best}

    def stage_teacher() -> dict:
        from openmm_flowmatch.flows.model import CGFlow
        from openmm_flowmatch.flows.teacher import sample_teacher

        flow = CGFlow.load(paths["flow"])
        teacher = sample_teacher(
            flow, sizes.teacher_samples, paths["teacher"], sizes.temperature, seed=sizes.seed,
            metadata={"mapping": mapping().to_dict()}, progress=progress,
        )
        return {
            "samples": teacher.n_samples, "drawn": teacher.n_drawn,
            "dropped_fraction": teacher.dropped_fraction, "force_threshold": teacher.force_threshold,
        }

    def teacher_data() -> dict:
        from openmm_flowmatch.data.storage import read_cg_file

        return read_cg_file(paths["teacher"])

    def stage_forcefield() -> dict:
        from openmm_flowmatch.forcefield.training import train_force_field

        data = teacher_data()
        model = train_force_field(
            {"positions": data["positions"], "forces": data["forces"]}, load_priors(), method="flow-matching",
            bonds=mapping().bonds, epochs=sizes.forcefield_epochs, batch_size=sizes.forcefield_batch_size,
            learning_rate=sizes.forcefield_learning_rate,
            model_kwargs={"hidden_width": sizes.forcefield_width, "n_layers": sizes.forcefield_layers},
            checkpoint_path=out_dir / "forcefield_checkpoint.pt", seed=sizes.seed, progress=progress,
        )
        save_network(model, paths["network"])
        info = getattr(model, "training_info", {}) or {}
        return {
            "frames": info.get("frames"), "epochs": info.get("epochs"),
            "best_validation_loss": info.get("best_validation_loss"),
        }

    def stage_export() -> dict:
        from openmm_flowmatch.export import export_force_field

        export_force_field(
            load_network(paths["network"]), paths["artifact"], priors=load_priors(), mapping=mapping(),
            temperature=sizes.temperature, replicas=sizes.replicas,
        )
        return {"artifact": str(paths["artifact"])}

    def stage_simulate() -> dict:
        from openmm_flowmatch.simulation import simulate_force_field

        reference = reference_data()["positions"]
        starts = reference[np.linspace(0, len(reference) - 1, sizes.replicas).astype(int)]
        properties = {"Threads": str(threads)} if threads and (platform or "").upper() == "CPU" else None
        result = simulate_force_field(
            paths["artifact"], pdb, paths["simulation"], sizes.simulation_steps, replicas=sizes.replicas,
            initial_positions=starts, temperature=sizes.temperature, time_step=sizes.time_step_ps,
            report_interval=sizes.report_interval, platform=platform, platform_properties=properties,
            seed=sizes.seed, progress=progress,
        )
        kinetic = result.kinetic_temperature
        return {
            "platform": result.platform, "replicas": result.replicas, "steps": result.steps,
            "time_step_ps": sizes.time_step_ps, "frames_per_replica": result.frames_per_replica,
            "ns_per_day": result.ns_per_day,
            "kinetic_temperature": None if kinetic is None else asdict(kinetic),
            "bonded": result.bonded,
        }

    def stage_analyze() -> dict:
        from openmm_flowmatch import analysis

        topology = mapping().cg_topology()
        trajectories = sorted(paths["simulation"].glob("replica_*.dcd"))
        # drop the first 10 % of every replica (relaxation from the reference start)
        model = np.concatenate(
            [frames[len(frames) // 10 :] for frames in (analysis.load_positions(t, topology) for t in trajectories)]
        )
        reference = reference_data()["positions"]
        comparison = analysis.compare_phi_psi(reference, model, temperature=sizes.temperature)
        analysis.plot_free_energy_comparison(
            comparison, paths["figure"], titles=("all-atom reference (CG map)", "CG model in OpenMM")
        )
        teacher = analysis.compare_phi_psi(reference, teacher_data()["positions"], temperature=sizes.temperature)
        analysis.plot_free_energy_comparison(
            teacher, paths["teacher_figure"], titles=("all-atom reference (CG map)", "flow teacher samples")
        )
        basins = _basin_populations(reference, model)
        metrics = {
            "cg_simulation": comparison.metrics,
            "teacher": teacher.metrics,
            "basins": basins,
            "sizes": sizes.describe(),
            "definition": "DESIGN.md Metrics: 60x60 phi/psi histogram on [-pi, pi)^2, F in kcal/mol",
        }
        analysis.write_metrics(paths["metrics"], metrics)
        return {"metrics": metrics["cg_simulation"], "teacher_metrics": teacher.metrics, "basins": basins}

    stages = {
        "reference": stage_reference,
        "priors": stage_priors,
        "flow": stage_flow,
        "teacher": stage_teacher,
        "forcefield": stage_forcefield,
        "export": stage_export,
        "simulate": stage_simulate,
        "analyze": stage_analyze,
    }
    for number, name in enumerate(STAGES, start=1):
        label = f"[{number}/{len(STAGES)}] {name}"
        if report.done(name):
            logger.info("%s: done before (%.1f s), skipped", label, report.data["stages"][name]["seconds"])
            if stage_callback:
                stage_callback(name, "cached", report.data["stages"][name]["seconds"])
            continue
        logger.info("%s: running", label)
        if stage_callback:
            stage_callback(name, "start", None)
        clock = time.perf_counter()
        summary = stages[name]()
        seconds = time.perf_counter() - clock
        report.record(name, seconds, summary)
        logger.info("%s: finished in %.1f s", label, seconds)
        if stage_callback:
            stage_callback(name, "done", seconds)
    total = sum(stage["seconds"] for stage in report.data["stages"].values())
    report.data["total_seconds"] = round(total, 2)
    report.data["outputs"] = {key: str(value) for key, value in paths.items()}
    report.save()
    return report.data


def _basin_populations(reference: np.ndarray, model: np.ndarray) -> dict:
    """Fractions of frames in the β/PII and αR basins and at φ > 0, reference and model.

    Regions (rad): β/PII: φ ∈ [−π, 0), ψ ∈ [1.5, π) ∪ [−π, −2.8); αR: φ ∈ [−π, 0),
    ψ ∈ [−1.6, 1.0); φ > 0 (αL, C7ax): φ ∈ [0, π).
    """
    from openmm_flowmatch.analysis import phi_psi

    def populations(positions):
        phi, psi = phi_psi(positions)
        left = phi < 0
        beta = left & ((psi >= 1.5) | (psi < -2.8))
        alpha_right = left & (psi >= -1.6) & (psi < 1.0)
        return {
            "beta_pII": float(beta.mean()),
            "alpha_R": float(alpha_right.mean()),
            "phi_positive": float((~left).mean()),
        }

    return {"reference": populations(reference), "cg_simulation": populations(model)}


def sizes_from_options(quick: bool = False, **overrides: Any) -> DemoSizes:
    """:data:`FULL` or :data:`QUICK` with some fields replaced (``None`` values are ignored)."""
    base = QUICK if quick else FULL
    known = {f.name for f in fields(DemoSizes)}
    unknown = set(overrides) - known
    if unknown:
        raise DemoError(f"unknown demo size(s): {', '.join(sorted(unknown))}")
    values = {**asdict(base), **{k: v for k, v in overrides.items() if v is not None}}
    return DemoSizes(**values)
