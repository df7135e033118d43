"""Benchmark: the native CGNet kernel (openmm_flowmatch.native) against TorchForce on the CPU platform.

The alanine-dipeptide-sized CG model (5 beads; randomly initialised CGNet width 160, 5 layers,
tanh, Lipschitz bound 4, feature set "all" as in the paper; the cost of a trained one is the same)
plus harmonic priors fitted to perturbed copies of the PDB backbone; R = 1 and R = 100 copies in
one System; LangevinMiddleIntegrator 300 K, 1/ps, 2 fs; CPU platform with 1 thread, torch with 1
thread. Rows:

- ``torchforce``: ``create_system(backend="torchforce")`` (openmm-torch ``TorchForce``);
- ``native``: the same System with the TorchForce replaced by ``native_network_force`` (checked
  against the TorchScript module at creation);
- ``priors_only``: the System without a network force (the floor: integrator + priors), so that
  ``1/steps_per_second − 1/priors_only`` estimates the network's cost per step.

Every measurement is repeated (interleaved) and the fastest repeat is reported; all repeats and
the 1-minute load average before each are stored. Writes ``benchmarks/results/native_speed.json``.

Usage::

    python benchmarks/bench_native.py [--seconds 3] [--repeats 2] [--replicas 1 100]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform as platform_module
import sys
import tempfile
import time
import warnings
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import openmm.unit as unit
import torch

import openmm_flowmatch
from openmm_flowmatch.export import FlowMatchForceField, export_force_field, replicate_topology
from openmm_flowmatch.forcefield import CGNet, InvariantFeatures
from openmm_flowmatch.mapping import CGMapping
from openmm_flowmatch.native import build_library, native_network_force
from openmm_flowmatch.priors import Priors

REPOSITORY = Path(__file__).resolve().parents[1]
PDB = REPOSITORY / "openmm_flowmatch" / "resources" / "alanine_dipeptide.pdb"
RESULTS = REPOSITORY / "benchmarks" / "results"
TEMPERATURE = 300.0
TIME_STEP_PS = 0.002
NETWORK_NAME = "FlowMatchNetwork"

logger = logging.getLogger("bench_native")


def make_artifact(directory: Path) -> tuple[Path, CGMapping, np.ndarray]:
    mapping = CGMapping.backbone(mdtraj.load(str(PDB)).topology)
    start = mapping.map_positions(mdtraj.load(str(PDB)).xyz.astype(np.float64))[0]
    configurations = start + 0.01 * np.random.default_rng(0).normal(size=(200, mapping.n_beads, 3))
    priors = Priors.fit(configurations, mapping.bonds, TEMPERATURE)
    torch.manual_seed(0)
    model = CGNet(InvariantFeatures.from_positions(configurations, mapping.bonds), hidden_width=160, n_layers=5,
                  activation="tanh", lipschitz_bound=4.0)
    model.training_info = {"method": "none (random initialisation)"}
    kwargs = {"exported_program": False} if "exported_program" in export_force_field.__code__.co_varnames else {}
    path = export_force_field(model, directory / "ala2_cg_random.pt", priors=priors, mapping=mapping,
                              temperature=TEMPERATURE, **kwargs)
    return Path(path), mapping, configurations


def build_system(force_field: FlowMatchForceField, mapping: CGMapping, replicas: int, kind: str) -> openmm.System:
    topology = replicate_topology(mapping.cg_topology(), replicas)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript deprecation notice of torch >= 2.10
        system = force_field.create_system(topology, replicas=replicas, backend="torchforce")
    if kind == "torchforce":
        return system
    for index in reversed(range(system.getNumForces())):
        if system.getForce(index).getName() == NETWORK_NAME:
            system.removeForce(index)
    if kind == "native":
        system.addForce(native_network_force(force_field, replicas))
    return system


def time_steps(context: openmm.Context, integrator: openmm.Integrator, seconds: float, warmup_steps: int) -> dict:
    load = os.getloadavg()[0]
    integrator.step(warmup_steps)
    chunk, steps, started, cpu_started = 1, 0, time.perf_counter(), time.process_time()
    while True:
        integrator.step(chunk)
        steps += chunk
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            break
        chunk = max(1, min(4 * chunk, int(steps * (seconds - elapsed) / elapsed) + 1))
    cpu = time.process_time() - cpu_started
    positions = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    return {"steps": steps, "seconds": round(elapsed, 3), "steps_per_second": steps / elapsed,
            "cpu_seconds": round(cpu, 3), "steps_per_cpu_second": steps / cpu,
            "load_average_1min_before": round(load, 2), "positions_finite": bool(np.all(np.isfinite(positions)))}


def measure(system: openmm.System, configurations: np.ndarray, replicas: int, seconds: float) -> dict:
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, 1.0 / unit.picosecond,
                                                 TIME_STEP_PS * unit.picoseconds)
    integrator.setRandomNumberSeed(1)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"), {"Threads": "1"})
    starts = configurations[np.arange(replicas) % len(configurations)] + np.arange(replicas)[:, None, None] * [1.0, 0, 0]
    context.setPositions(starts.reshape(-1, 3))
    context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, 1)
    return time_steps(context, integrator, seconds, warmup_steps=50)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the fastest is reported")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--output", type=Path, default=RESULTS / "native_speed.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)

    started = time.perf_counter()
    library = build_library()
    build_seconds = time.perf_counter() - started  # ~0 when cached
    kinds = ["torchforce", "native", "priors_only"]
    rows: dict = {}
    with tempfile.TemporaryDirectory() as directory:
        path, mapping, configurations = make_artifact(Path(directory))
        force_field = FlowMatchForceField.load(path)
        systems = {}
        for replicas in args.replicas:
            for kind in kinds:
                created = time.perf_counter()
                systems[replicas, kind] = build_system(force_field, mapping, replicas, kind)
                if kind == "native":
                    rows.setdefault(f"R{replicas}", {})["native_creation_seconds_with_check"] = round(
                        time.perf_counter() - created, 3)
        for repeat in range(args.repeats):
            for replicas in args.replicas:
                for kind in kinds:
                    result = measure(systems[replicas, kind], configurations, replicas, args.seconds)
                    logger.info("R=%d %-12s repeat %d: %.1f steps/s, %.1f steps/CPU-s (load %.2f)", replicas, kind,
                                repeat, result["steps_per_second"], result["steps_per_cpu_second"],
                                result["load_average_1min_before"])
                    rows.setdefault(f"R{replicas}", {}).setdefault(kind, []).append(result)
    results = {}
    for key, row in rows.items():
        entry = {"native_creation_seconds_with_check": row.get("native_creation_seconds_with_check")}
        for kind in kinds:
            best = dict(max(row[kind], key=lambda item: item["steps_per_second"]))
            best["steps_per_second_all_repeats"] = [round(item["steps_per_second"], 1) for item in row[kind]]
            best["positions_finite"] = all(item["positions_finite"] for item in row[kind])
            best["steps_per_cpu_second_all_repeats"] = [round(item["steps_per_cpu_second"], 1) for item in row[kind]]
            best["us_per_step"] = round(1e6 / best["steps_per_second"], 2)
            best["cpu_us_per_step_best"] = round(1e6 / max(item["steps_per_cpu_second"] for item in row[kind]), 2)
            entry[kind] = best
        floor = entry["priors_only"]["cpu_us_per_step_best"]
        entry["network_cpu_us_per_step_estimate"] = {
            kind: round(entry[kind]["cpu_us_per_step_best"] - floor, 2) for kind in ("torchforce", "native")
        }
        entry["speedup_native_over_torchforce"] = round(
            entry["native"]["steps_per_second"] / entry["torchforce"]["steps_per_second"], 2)
        entry["speedup_native_over_torchforce_cpu_time"] = round(
            entry["torchforce"]["cpu_us_per_step_best"] / entry["native"]["cpu_us_per_step_best"], 2)
        results[key] = entry

    from importlib import metadata

    def distribution_version(*names: str) -> str:
        for name in names:
            try:
                return f"{name} {metadata.version(name)}"
            except metadata.PackageNotFoundError:
                continue
        return "not installed"

    report = {
        "benchmark": "native CGNet kernel vs TorchForce, alanine-dipeptide CG model (benchmarks/bench_native.py)",
        "command": "bench_native.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {
            "platform": "CPU", "threads": 1, "torch_threads": 1,
            "integrator": "LangevinMiddleIntegrator 300 K, 1/ps, 2 fs",
            "model": "5 beads (ACE C, ALA N, CA, C, NME N); random-init CGNet width 160, 5 layers, tanh, Lipschitz "
                     "bound 4, features 'all' (4 bonds, 3 angles, 2 dihedrals, 6 pairs: 17) + harmonic bond/angle priors",
            "native": "openmm_flowmatch.native.native_network_force (double precision, Reference/CPU kernel)",
            "seconds_per_measurement": args.seconds, "repeats": args.repeats,
            "reported": "fastest of the interleaved repeats (all in steps_per_second_all_repeats); also the process "
                        "CPU time per step (time.process_time, less sensitive to other jobs on the machine than "
                        "wall time) and, from it, the network's cost per step (minus the priors-only row)",
        },
        "machine": {
            "description": "2-core CPU shared with other engineers' jobs running at the same time; numbers are "
                           "noisy lower bounds (see load_average_1min_before of each row)",
            "cpu_count": os.cpu_count(), "processor": platform_module.processor() or platform_module.machine(),
            "openmm_version": openmm.__version__, "openmmtorch_version": distribution_version(
                "acellera-openmmtorch-cpu", "acellera-openmmtorch", "openmmtorch"),
            "torch_version": torch.__version__, "openmm_flowmatch_version": openmm_flowmatch.__version__,
            "python": platform_module.python_version(),
        },
        "native_library": {"path_name": library.name, "build_seconds_this_run": round(build_seconds, 2),
                           "build_command": _without_machine_paths((library.parent / "build.txt").read_text().strip(), library)
                           if (library.parent / "build.txt").exists() else None},
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    logger.info("wrote %s", args.output)
    for key, entry in results.items():
        logger.info("%s: torchforce %.0f, native %.0f, priors only %.0f steps/s (native %.1fx; CPU time %.1fx); "
                    "network CPU us/step: %s", key, entry["torchforce"]["steps_per_second"],
                    entry["native"]["steps_per_second"], entry["priors_only"]["steps_per_second"],
                    entry["speedup_native_over_torchforce"], entry["speedup_native_over_torchforce_cpu_time"],
                    entry["network_cpu_us_per_step_estimate"])
    return report


def _without_machine_paths(command: str, library: Path) -> str:
    """The build command with this machine's folders replaced by placeholders (results are committed)."""
    import openmm

    site_packages = str(Path(openmm.__file__).resolve().parents[1])
    repository = str(Path(__file__).resolve().parents[1])
    return (command.replace(str(library.parent), "<cache>").replace(site_packages, "<site-packages>")
            .replace(repository, "<repository>"))


if __name__ == "__main__":
    main()

