"""Benchmark: which time steps CG models integrate soundly at, before and after the feature fix.

Issue "CG models that integrate soundly": flow-matching networks that see bond lengths (and
angles) learn the jumps of the flow's spline density along those stiff coordinates and heat the
system at 2 fs. The fix leaves bonds and angles to the harmonic priors (feature set
``dihedrals_and_distances``). This script measures, for flow-matching and force-matching models
trained on the same N frames (the data-efficiency protocol, seed 0) with the old (``all``) and the
new feature set, and for any extra artifacts given with ``--artifact LABEL=PATH`` (e.g. the demo's
model before and after):

- the network's curvature along every CG bond: |d²U_net/db²| over ±0.01 nm (±4σ) around 20
  held-out frames, beads beyond the bond moved along it (median over frames of the maximum);
- :func:`openmm_flowmatch.diagnostics.check_time_step` at 1–5 fs: kinetic temperature per replica,
  bond and angle width ratios against the data, configurational temperature, blow-ups;
- φ/ψ metrics (DESIGN.md) against the held-out reference at the largest sound step (1 fs if none
  larger is sound), the step a user would run.

Usage::

    python benchmarks/time_step.py --data ../shared/data/ala2_train --work benchmarks/runs/time_step \\
        [--frames 10000] [--replicas 64] [--production-time 20] [--artifact demo-after=demo_output/forcefield.pt]

Writes ``benchmarks/results/time_step.json`` and ``time_step.png``. Every stage is cached in
``--work``; a re-run skips what is done.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_efficiency as protocol  # noqa: E402  (the shared data-efficiency protocol)

from openmm_flowmatch.analysis import compare_phi_psi, jsonable  # noqa: E402

RESULTS = protocol.RESULTS
FEATURE_SETS = ("all", "dihedrals_and_distances")
logger = logging.getLogger("time_step")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_json(path: Path, value: Any) -> None:
    temporary = Path(str(path) + ".partial")
    temporary.write_text(json.dumps(jsonable(value), indent=1))
    os.replace(temporary, path)


def cached(path: Path, compute) -> Any:
    """Read ``path`` if a previous run wrote it, else compute, write and return the value."""
    if path.exists():
        return read_json(path)
    value = compute()
    write_json(path, value)
    return value


# ----------------------------------------------------------------------------------------- models
def train_models(work: Path, split: Any, arguments: argparse.Namespace) -> dict[str, Path]:
    """Flow, teacher and the four force fields (2 methods × 2 feature sets) of one seed."""
    from openmm_flowmatch.data.storage import read_cg_file

    config = protocol.ProtocolConfig(seeds=[arguments.seed])
    from openmm_flowmatch import CGMapping

    mapping = CGMapping.backbone(str(protocol.default_pdb()))
    train = split.pool.select(protocol.evenly_spaced_indices(split.pool.n_frames, arguments.frames))
    priors = protocol.fit_priors(train.positions, mapping, config.temperature)
    flow_unit = work / "flow_unit"
    flow_unit.mkdir(parents=True, exist_ok=True)
    cached(flow_unit / "flow.json", lambda: protocol.stage_flow(flow_unit, train.positions, config, arguments.seed))
    cached(flow_unit / "teacher.json",
           lambda: protocol.stage_teacher(flow_unit, split.reference.positions, config, arguments.seed))
    teacher = read_cg_file(flow_unit / "flow" / "teacher.h5")
    sources = {"flow-matching": (teacher["positions"], teacher["forces"]),
               "force-matching": (train.positions, train.forces)}
    artifacts = {}
    for method, data in sources.items():
        for feature_set in FEATURE_SETS:
            unit = work / f"{method}_{feature_set}"
            unit.mkdir(parents=True, exist_ok=True)
            unit_config = protocol.ProtocolConfig(seeds=[arguments.seed], feature_set=feature_set)
            cached(unit / "model.json", lambda: protocol.stage_force_field(
                unit, data[0], data[1], priors, mapping, unit_config, method, arguments.seed))
            artifacts[f"{method} / {feature_set}"] = unit / "model.pt"
    return artifacts


# --------------------------------------------------------------------------------------- measures
def bond_curvature(force_field: Any, frames: np.ndarray, span: float = 0.01, points: int = 401) -> list[float]:
    """Median over frames of max |d²U_net/db²| (kJ/mol/nm²) along each CG bond, priors excluded."""
    import torch

    module = force_field.module
    offsets = torch.linspace(-span, span, points, dtype=torch.float64)
    spacing = float(offsets[1] - offsets[0])
    result = []
    for first, second in force_field.mapping.bonds:
        maxima = []
        for frame in torch.as_tensor(frames, dtype=torch.float64):
            direction = frame[second] - frame[first]
            moved = frame.repeat(points, 1, 1)
            moved[:, second:] += offsets[:, None, None] * direction / direction.norm()
            with torch.no_grad():
                energy = torch.stack([module(x) for x in moved]).numpy()
            second_derivative = (energy[2:] - 2 * energy[1:-1] + energy[:-2]) / spacing**2
            maxima.append(float(np.abs(second_derivative).max()))
        result.append(float(np.median(maxima)))
    return result


def teacher_force_scan(flow_path: Path, frame: np.ndarray, bond: int = 0, span: float = 0.01,
                       points: int = 2001) -> dict:
    """The flow's force along one CG bond, beads beyond it moved along it (±``span`` nm).

    A rational-quadratic spline is C¹: log q's gradient jumps where the bond crosses a knot. The
    largest change between neighbouring points (``span``/1000 apart) shows those jumps; a smooth
    force changes by about k·Δb ≈ 4·10⁵ · 10⁻⁵ = 4 kJ/mol/nm there.
    """
    import torch

    from openmm_flowmatch.flows import CGFlow

    flow = CGFlow.load(flow_path).double()
    x = torch.as_tensor(frame, dtype=torch.float64)
    direction = (x[bond + 1] - x[bond]) / (x[bond + 1] - x[bond]).norm()
    offsets = torch.linspace(-span, span, points, dtype=torch.float64)
    moved = x.repeat(points, 1, 1)
    moved[:, bond + 1:] += offsets[:, None, None] * direction
    forces = flow.forces(moved, protocol.TEMPERATURE)
    along = (forces[:, bond + 1:] * direction).sum((-1, -2)).numpy()
    steps = np.abs(np.diff(along))
    return {"bond": bond, "offsets_nm": offsets.numpy()[::10].tolist(), "force_kJ_mol_nm": along[::10].tolist(),
            "largest_change_between_neighbours": float(steps.max()), "median_change_between_neighbours": float(np.median(steps)),
            "neighbour_spacing_nm": float(2 * span / (points - 1))}


def phi_psi_metrics(force_field: Any, reference: np.ndarray, time_step: float, arguments, directory: Path) -> dict:
    """Simulate 64 replicas for ``--phi-psi-time`` ps at ``time_step`` and score φ/ψ vs the reference."""
    from openmm_flowmatch.analysis import load_positions
    from openmm_flowmatch.simulation import run_simulation
    from openmm_flowmatch.topology import replicate_topology

    replicas = arguments.replicas
    topology = force_field.mapping.cg_topology()
    system = force_field.create_system(replicate_topology(topology, replicas))
    starts = reference[np.linspace(0, len(reference) - 1, replicas).astype(int)]
    interval = int(round(0.2 / time_step))
    steps = int(np.ceil((arguments.phi_psi_time + 10.0) / (interval * time_step))) * interval
    result = run_simulation(system, topology, starts, directory, steps, replicas=replicas, time_step=time_step,
                            report_interval=interval, platform="CPU", platform_properties={"Threads": "1"},
                            seed=arguments.seed, progress=False)
    skip = int(round(10.0 / (interval * time_step)))  # 10 ps of equilibration
    positions = np.concatenate([load_positions(path, topology)[skip:] for path in result.trajectories])
    metrics = compare_phi_psi(reference, positions, temperature=protocol.TEMPERATURE).metrics
    kinetic = result.kinetic_temperature
    return {"time_step_ps": time_step, "replicas": replicas, "production_ps_per_replica": arguments.phi_psi_time,
            "js_divergence": metrics["js_divergence"], "fes_mse": metrics["fes_mse"],
            "kinetic_temperature": jsonable(kinetic.__dict__ if hasattr(kinetic, "__dict__") else kinetic),
            "wall_seconds": result.wall_time}


def measure(label: str, artifact: Path, reference: np.ndarray, arguments, work: Path) -> dict:
    """Curvature, time-step scan and φ/ψ metrics of one artifact (each cached)."""
    from openmm_flowmatch import FlowMatchForceField
    from openmm_flowmatch.diagnostics import check_time_step

    force_field = FlowMatchForceField.load(artifact)
    unit = work / "measures" / label.replace(" / ", "_").replace(" ", "_")
    unit.mkdir(parents=True, exist_ok=True)
    frames = reference[np.linspace(0, len(reference) - 1, 20).astype(int)]
    record = {"label": label, "artifact": str(artifact.name), "training": force_field.metadata.get("training", {})}
    record["bond_curvature"] = cached(unit / "curvature.json", lambda: bond_curvature(force_field, frames))
    starts = reference[np.linspace(0, len(reference) - 1, arguments.replicas).astype(int)]
    record["time_steps"] = cached(unit / "time_steps.json", lambda: check_time_step(
        force_field, starts, time_steps=[t / 1000 for t in arguments.time_steps], replicas=arguments.replicas,
        production_time=arguments.production_time, platform="CPU", platform_properties={"Threads": "1"},
        seed=arguments.seed, progress=False).to_dict())
    sound = record["time_steps"].get("largest_sound_time_step")
    # φ/ψ at the step a user would run: the largest sound one (1 fs for a model sound at no larger step)
    steps = [sound or 0.001] if arguments.phi_psi_time > 0 else []
    record["phi_psi"] = [cached(unit / f"phi_psi_{int(round(dt * 1e4))}.json",
                                lambda dt=dt: phi_psi_metrics(force_field, reference, dt, arguments, unit / f"md_{dt}"))
                         for dt in steps]
    return record


def long_run(artifact: Path, reference: np.ndarray, arguments, work: Path) -> dict:
    """``--long-run-steps`` steps of one replica at ``--long-run-time-step`` (cached; resumable)."""
    from openmm_flowmatch.simulation import simulate_force_field

    directory = work / "long_run"
    result = simulate_force_field(
        artifact, protocol.default_pdb(), directory, arguments.long_run_steps, replicas=1,
        initial_positions=reference[:1], time_step=arguments.long_run_time_step, report_interval=1000,
        platform="CPU", platform_properties={"Threads": "1"}, seed=arguments.seed, progress=False,
        backend=arguments.long_run_backend,
    )
    info = read_json(directory / "simulation.json")
    return {"artifact": artifact.name, "steps": arguments.long_run_steps, "time_step_ps": arguments.long_run_time_step,
            "backend": arguments.long_run_backend, "simulated_ns": arguments.long_run_steps * arguments.long_run_time_step / 1000,
            "frames": result.frames_per_replica, "wall_seconds_last_invocation": result.wall_time,
            "steps_per_second_last_invocation": result.steps_run / max(result.wall_time, 1e-9),
            "kinetic_temperature": info.get("kinetic_temperature"), "bonded": info.get("bonded"), "blew_up": False}


def unstable_run(artifact: Path, reference: np.ndarray, arguments, work: Path) -> dict:
    """A deliberately unstable step must be stopped by the blow-up guard with a clear message."""
    import shutil

    from openmm_flowmatch.simulation import BlowUpError, simulate_force_field

    directory = work / "unstable_run"
    shutil.rmtree(directory, ignore_errors=True)
    try:
        simulate_force_field(artifact, protocol.default_pdb(), directory, 20000, replicas=8,
                             initial_positions=reference[:: len(reference) // 8][:8],
                             time_step=arguments.unstable_time_step, report_interval=10, platform="CPU",
                             platform_properties={"Threads": "1"}, seed=arguments.seed, progress=False)
    except BlowUpError as error:
        return {"time_step_ps": arguments.unstable_time_step, "caught": True, "step": error.step,
                "replica": error.replica, "reason": error.reason, "message": str(error)}
    return {"time_step_ps": arguments.unstable_time_step, "caught": False}


# ---------------------------------------------------------------------------------------- report
def summary_row(record: dict) -> dict:
    """One line per model: T_kin and bond width ratios per step, the largest sound step, φ/ψ."""
    steps = {}
    for row in record["time_steps"]["rows"]:
        bonded = row.get("bonded") or {}
        steps[f"{row['time_step'] * 1000:g} fs"] = {
            "kinetic_temperature": row.get("kinetic_temperature"),
            "kinetic_temperature_error": row.get("kinetic_temperature_error"),
            "bond_width_ratio_min": bonded.get("bond_width_ratio_min"),
            "bond_width_ratio_max": bonded.get("bond_width_ratio_max"),
            "configurational_temperature": row.get("configurational_temperature"),
            "blew_up": row.get("blew_up"), "sound": row.get("sound"),
        }
    return {"label": record["label"], "bond_curvature_kJ_mol_nm2": record["bond_curvature"],
            "largest_sound_time_step_fs": (record["time_steps"]["largest_sound_time_step"] or 0) * 1000,
            "time_steps": steps,
            "phi_psi": {f"{p['time_step_ps'] * 1000:g} fs": {k: p[k] for k in ("js_divergence", "fes_mse")}
                        for p in record["phi_psi"]}}


def plot(records: list[dict], scans: list[dict], path: Path) -> None:
    """Kinetic temperature and bond width ratios against the time step, one line per model; the
    teacher's force along the first bond (the jumps at the spline knots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right, third) = plt.subplots(1, 3, figsize=(16, 4.4))
    for scan in scans[:2]:
        third.plot(np.array(scan["offsets_nm"]) * 1000, scan["force_kJ_mol_nm"], label=f"bond {scan['bond']}")
    third.set(xlabel="bond stretch (pm)", ylabel="teacher force along the bond (kJ/mol/nm)",
              title="flow forces jump at spline knots")
    if scans:
        third.legend(fontsize=7)
    for record in records:
        rows = [r for r in record["time_steps"]["rows"] if not r.get("blew_up")]
        steps = [r["time_step"] * 1000 for r in rows]
        style = "-" if "dihedrals_and_distances" in record["label"] or "after" in record["label"] else "--"
        left.errorbar(steps, [r["kinetic_temperature"] for r in rows], [r["kinetic_temperature_error"] for r in rows],
                      linestyle=style, marker="o", capsize=2, label=record["label"])
        right.plot(steps, [(r.get("bonded") or {}).get("bond_width_ratio_max") for r in rows], style, marker="o")
    left.axhspan(protocol.TEMPERATURE * 0.98, protocol.TEMPERATURE * 1.02, color="0.85", label="bath ± 2 %")
    right.axhspan(0.9, 1.1, color="0.85")
    left.set(xlabel="time step (fs)", ylabel="kinetic temperature (K)", yscale="log")
    right.set(xlabel="time step (fs)", ylabel="largest CG bond width / data", yscale="log")
    left.legend(fontsize=7)
    figure.suptitle("LangevinMiddleIntegrator 300 K, 1/ps; dashed: network sees bonds and angles (before)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown(summary: list[dict]) -> str:
    """The docs' tables: kinetic T (± se) and largest bond width ratio per step; sound step; φ/ψ."""
    steps = sorted({key for row in summary for key in row["time_steps"]}, key=lambda k: float(k.split()[0]))
    header = "| model | max bond curvature (kJ/mol/nm²) | " + " | ".join(f"T / bond width, {k}" for k in steps)
    lines = [header + " | sound step | φ/ψ JS (FES MSE) |", "|---" * (len(steps) + 4) + "|"]
    for row in summary:
        cells = []
        for key in steps:
            cell = row["time_steps"].get(key)
            if not cell or cell.get("blew_up"):
                cells.append("blew up" if cell else "–")
                continue
            cells.append(f"{cell['kinetic_temperature']:.0f} ± {cell['kinetic_temperature_error']:.0f} K / "
                         f"×{cell['bond_width_ratio_max']:.2f}")
        js = "; ".join(f"{step}: {value['js_divergence']:.3f} ({value['fes_mse']:.2f})"
                       for step, value in row["phi_psi"].items()) or "–"
        sound = row["largest_sound_time_step_fs"]
        lines.append(f"| {row['label']} | {max(row['bond_curvature_kJ_mol_nm2']):.2g} | " + " | ".join(cells)
                     + f" | {f'{sound:g} fs' if sound else 'none'} | {js} |")
    return "\n".join(lines)


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="directory of runs with chunk_*.npz (x, f)")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/runs/time_step"), help="cache directory")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where time_step.json/.png go")
    parser.add_argument("--frames", type=int, default=10000, help="training frames (evenly spaced in the pool)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replicas", type=int, default=64)
    parser.add_argument("--time-steps", type=float, nargs="+", default=[1, 2, 3, 4, 5], help="fs")
    parser.add_argument("--production-time", type=float, default=20.0, help="ps per replica and time step")
    parser.add_argument("--phi-psi-time", type=float, default=50.0,
                        help="ps per replica for the φ/ψ run at the largest sound step (0: none)")
    parser.add_argument("--artifact", action="append", default=[], help="LABEL=PATH of another artifact to measure")
    parser.add_argument("--skip-training", action="store_true", help="measure only the --artifact files")
    parser.add_argument("--markdown", action="store_true", help="print the docs' table")
    parser.add_argument("--long-run-steps", type=int, default=0, help="steps of the long single-replica run (0: none)")
    parser.add_argument("--long-run-time-step", type=float, default=0.004, help="ps")
    parser.add_argument("--long-run-backend", default="native", help="network backend of the long run")
    parser.add_argument("--long-run-label", default="flow-matching / dihedrals_and_distances",
                        help="model of the long run and of the unstable-step check")
    parser.add_argument("--unstable-time-step", type=float, default=0.012, help="ps; 0 skips the blow-up check")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(1)  # TorchForce's libtorch otherwise takes every core: one thread, like OpenMM's
    started = time.perf_counter()
    config = protocol.ProtocolConfig(seeds=[arguments.seed])
    split = protocol.load_split(arguments.data, config)
    arguments.work.mkdir(parents=True, exist_ok=True)
    artifacts = {} if arguments.skip_training else train_models(arguments.work, split, arguments)
    for item in arguments.artifact:
        label, _, path = item.partition("=")
        artifacts[label] = Path(path)
    reference = split.reference.positions
    flow_path = arguments.work / "flow_unit" / "flow" / "flow.pt"
    scans = [cached(arguments.work / f"teacher_scan_{bond}.json", lambda bond=bond: teacher_force_scan(
        flow_path, reference[0], bond)) for bond in range(4)] if flow_path.exists() else []
    records = []
    for label, artifact in artifacts.items():
        logger.info("measuring %s", label)
        records.append(measure(label, artifact, reference, arguments, arguments.work))
    arguments.results.mkdir(parents=True, exist_ok=True)
    extra = {}
    if arguments.long_run_label in artifacts and arguments.long_run_steps > 0:
        extra["long_run"] = long_run(artifacts[arguments.long_run_label], reference, arguments, arguments.work)
    if arguments.long_run_label in artifacts and arguments.unstable_time_step > 0:
        extra["unstable_run"] = cached(arguments.work / "unstable_run.json", lambda: unstable_run(
            artifacts[arguments.long_run_label], reference, arguments, arguments.work))
    result = {
        "benchmark": "time_step", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(arguments).items()
                                              if k not in ("data", "work", "results", "artifact")},
        "extra_artifacts": [item.partition("=")[0] for item in arguments.artifact],
        "integrator": "LangevinMiddleIntegrator, 300 K, friction 1/ps, CPU platform, 1 thread",
        "sound_rule": "|T_kin/T - 1| <= 2 % and every CG bond width within 10 % of the data's",
        "summary": [summary_row(record) for record in records], **extra, "teacher_force_scans": scans,
        "records": records,
        "wall_seconds_this_invocation": time.perf_counter() - started,
    }
    write_json(arguments.results / "time_step.json", result)
    plot(records, scans, arguments.results / "time_step.png")
    logger.info("wrote %s", arguments.results / "time_step.json")
    if arguments.markdown:
        print(markdown(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
