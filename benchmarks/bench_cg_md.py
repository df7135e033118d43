"""Benchmark: OpenMM speed of the CG neural force field vs the all-atom system (alanine dipeptide).

Measured in one run, on one OpenMM platform (CPU by default):

- ``all_atom``: the all-atom implicit-solvent system of DESIGN.md (amber14-all + implicit/gbn2,
  NoCutoff, HBonds, hydrogen mass 3 amu, LangevinMiddleIntegrator 4 fs, 1/ps, 300 K);
- ``cg``: the 5-bead CG model (ACE C, ALA N, CA, C, NME N) exported through
  :func:`openmm_flowmatch.export_force_field`: a randomly initialised :class:`CGNet` of the default
  size (width 160, 5 layers, tanh, Lipschitz bound 4; the cost of a trained one is the same)
  plus priors fitted to perturbed copies of the PDB structure, LangevinMiddleIntegrator 5 fs;
  for R = 1, 10, 100, 1000 independent replicas in one System (one batched network call per
  step), with the ``TorchForce`` backend, the ``PythonForce`` backend running the TorchScript
  module, the ``exported`` backend (``PythonForce`` running the ``torch.export`` program of the
  ``.pt2`` file, eager ``.module()``) and the ``native`` backend (the package's C++ CGNet kernel,
  docs/native.md; skipped with the reason where it is unavailable). Aggregate throughput is reported as
  bead-steps/s = R · 5 · steps/s.
- with ``--platform CPU``, the native backend also on OpenMM's ``Reference`` platform for the replica
  counts of ``--reference-replicas`` (default R = 1): rows with ``"platform": "Reference"``. The
  Reference platform runs everything on the calling thread; the CPU platform, even with
  ``Threads=1``, hands every integrator phase and every force kernel to a worker thread of its
  pool, which costs more per step than one CG network call when the machine is loaded
  (docs/native.md). Every CG row names its platform.
- AOTInductor (``--aoti``): the float64 energy program compiled with
  ``torch._inductor.aoti_compile_and_package``; compile time, and energy-only call time against the
  eager exported program (an AOTInductor package has no autograd, so it cannot give MD forces).

With ``--platform CUDA`` the TorchForce rows are measured with and without CUDA graphs.

Writes ``benchmarks/results/cg_md_speed.json`` (or ``--output``).

Usage::

    python benchmarks/bench_cg_md.py [--platform CPU] [--threads 1] [--seconds 3] [--repeats 2]
                                     [--replicas 1 10 100 1000]

The machine load (``os.getloadavg``) before each measurement is stored with the numbers.
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
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import torch

import openmm_flowmatch
from openmm_flowmatch.export import FlowMatchForceField, export_force_field, replicate_topology
from openmm_flowmatch.forcefield import CGNet, InvariantFeatures
from openmm_flowmatch.mapping import CGMapping
from openmm_flowmatch.priors import Priors

REPOSITORY = Path(__file__).resolve().parents[1]
PDB = REPOSITORY / "openmm_flowmatch" / "resources" / "alanine_dipeptide.pdb"
RESULTS = REPOSITORY / "benchmarks" / "results"
TEMPERATURE = 300.0
ALL_ATOM_TIME_STEP_PS = 0.004
CG_TIME_STEP_PS = 0.005

logger = logging.getLogger("bench_cg_md")


def ns_per_day(steps_per_second: float, time_step_ps: float) -> float:
    return steps_per_second * time_step_ps * 86400.0 / 1000.0


def platform_properties(name: str, threads: int) -> dict:
    return {"Threads": str(threads)} if name == "CPU" else {}


def time_steps(context: openmm.Context, integrator: openmm.Integrator, seconds: float, warmup_steps: int) -> dict:
    """Steps/s of ``integrator.step`` after a warm-up, in chunks until ``seconds`` have passed."""
    load = os.getloadavg()[0]
    integrator.step(warmup_steps)
    chunk, steps, started = 1, 0, time.perf_counter()
    while True:
        integrator.step(chunk)
        steps += chunk
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            break
        chunk = max(1, min(4 * chunk, int(steps * (seconds - elapsed) / elapsed) + 1))
    state = context.getState(getPositions=True)
    finite = bool(np.all(np.isfinite(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))))
    return {"steps": steps, "seconds": round(elapsed, 3), "steps_per_second": steps / elapsed,
            "load_average_1min_before": round(load, 2), "positions_finite": finite}


def all_atom(platform: str, threads: int, seconds: float) -> dict:
    pdb = app.PDBFile(str(PDB))
    forcefield = app.ForceField("amber14-all.xml", "implicit/gbn2.xml")
    system = forcefield.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds,
                                     hydrogenMass=3.0 * unit.amu)
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, 1.0 / unit.picosecond,
                                                 ALL_ATOM_TIME_STEP_PS * unit.picoseconds)
    integrator.setRandomNumberSeed(1)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform),
                             platform_properties(platform, threads))
    context.setPositions(pdb.positions)
    openmm.LocalEnergyMinimizer.minimize(context)
    context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, 1)
    result = time_steps(context, integrator, seconds, warmup_steps=200)
    result.update(n_atoms=system.getNumParticles(), time_step_fs=1000 * ALL_ATOM_TIME_STEP_PS,
                  ns_per_day=ns_per_day(result["steps_per_second"], ALL_ATOM_TIME_STEP_PS))
    return result


def cg_artifact(directory: Path) -> tuple[Path, CGMapping, np.ndarray]:
    """Export a default-size random CGNet with priors fitted to perturbed PDB backbones."""
    mapping = CGMapping.backbone(mdtraj.load(str(PDB)).topology)
    start = mapping.map_positions(mdtraj.load(str(PDB)).xyz.astype(np.float64))[0]
    configurations = start + 0.01 * np.random.default_rng(0).normal(size=(200, mapping.n_beads, 3))
    priors = Priors.fit(configurations, mapping.bonds, TEMPERATURE)
    torch.manual_seed(0)
    model = CGNet(InvariantFeatures.from_positions(configurations, mapping.bonds), hidden_width=160, n_layers=5,
                  activation="tanh", lipschitz_bound=4.0)
    path = export_force_field(model, directory / "ala2_cg_random.pt", priors=priors, mapping=mapping,
                              temperature=TEMPERATURE, training={"method": "none (random initialisation)"})
    return path, mapping, configurations


def cg(force_field: FlowMatchForceField, mapping: CGMapping, configurations: np.ndarray, replicas: int, backend: str,
       platform: str, threads: int, seconds: float, cuda_graphs: bool | None = None,
       run_platform: str | None = None) -> dict:
    topology = replicate_topology(mapping.cg_topology(), replicas)
    hint = "CUDA" if cuda_graphs else None
    system = force_field.create_system(topology, replicas=replicas, backend=backend, platform_hint=hint)
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, 1.0 / unit.picosecond,
                                                 CG_TIME_STEP_PS * unit.picoseconds)
    integrator.setRandomNumberSeed(1)
    platform = run_platform or platform
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform),
                             platform_properties(platform, threads))
    starts = configurations[np.arange(replicas) % len(configurations)]
    context.setPositions(starts.reshape(-1, 3))
    context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, 1)
    result = time_steps(context, integrator, seconds, warmup_steps=20 if replicas < 1000 else 3)
    steps_per_second = result["steps_per_second"]
    result.update(replicas=replicas, beads=replicas * mapping.n_beads, backend=backend, platform=platform,
                  bead_steps_per_second=steps_per_second * replicas * mapping.n_beads,
                  replica_ns_per_day=replicas * ns_per_day(steps_per_second, CG_TIME_STEP_PS))
    if cuda_graphs is not None:
        result["cuda_graphs"] = cuda_graphs
    return result


def call_time(function, positions: torch.Tensor, seconds: float = 1.0) -> float:
    """Mean seconds per call of ``function(positions)`` after 5 warm-up calls."""
    for _ in range(5):
        function(positions)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        function(positions)
        calls += 1
    return (time.perf_counter() - started) / calls


def aoti_energy_only(force_field: FlowMatchForceField, configurations: np.ndarray, replica_counts: list) -> dict:
    """Compile the float64 energy program with AOTInductor; its energy-only call time vs the eager program."""
    program = force_field.exported_programs["model"]
    eager = force_field.exported_module()
    result: dict = {"what": "energy only (no forces): AOTInductor packages have no autograd"}
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as directory:
            package = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(directory) / "aoti.pt2"))
            compiled = torch._inductor.aoti_load_package(package)
            result["compile_seconds"] = round(time.perf_counter() - started, 1)
            for replicas in replica_counts:
                x = torch.tensor(configurations[np.arange(replicas) % len(configurations)].reshape(-1, 3))
                result[f"R{replicas}"] = {
                    "aoti_ms": 1e3 * call_time(compiled, x), "eager_exported_ms": 1e3 * call_time(eager, x),
                    "max_abs_energy_difference": abs(float(compiled(x)) - float(eager(x))),
                }
    except Exception as error:  # noqa: BLE001 - record whatever AOTInductor raises on this machine
        result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    logger.info("AOTInductor: %s", result)
    return result


def best_of(rows: list[dict]) -> dict:
    """The fastest of repeated measurements (the least disturbed by other load), with all rates kept."""
    best = dict(max(rows, key=lambda row: row["steps_per_second"]))
    best["steps_per_second_all_repeats"] = [round(row["steps_per_second"], 2) for row in rows]
    best["positions_finite"] = all(row["positions_finite"] for row in rows)
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platform", default="CPU", help="OpenMM platform (default CPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU platform threads and torch threads (default 1)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement (default 3)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--backends", nargs="+", default=["torchforce", "native", "pythonforce", "exported"])
    parser.add_argument("--reference-replicas", type=int, nargs="*", default=[1],
                        help="with --platform CPU: replica counts for which the native backend is also measured on "
                             "the Reference platform (default 1; none: leave out)")
    parser.add_argument("--aoti", action="store_true", help="also compile the energy program with AOTInductor")
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved repeats of every measurement; the fastest is reported (default 2)")
    parser.add_argument("--output", type=Path, default=RESULTS / "cg_md_speed.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    from openmm_flowmatch.native import native_unavailable_reason

    native_reason = native_unavailable_reason()
    if native_reason is not None and "native" in args.backends:
        logger.warning("native backend skipped: %s", native_reason)
        args.backends = [backend for backend in args.backends if backend != "native"]
    results: dict = {"all_atom": None, "cg": [], "native_unavailable_reason": native_reason}
    graph_options = [True, False] if args.platform.upper() == "CUDA" else [None]
    configurations_to_run = [
        (backend, replicas, cuda_graphs, None)
        for replicas in args.replicas
        for backend in args.backends
        for cuda_graphs in (graph_options if backend == "torchforce" else [None])
    ]
    if args.platform.upper() == "CPU" and "native" in args.backends:
        configurations_to_run += [("native", replicas, None, "Reference") for replicas in args.reference_replicas]
    measured: dict = {key: [] for key in configurations_to_run}
    all_atom_runs = []
    with tempfile.TemporaryDirectory() as directory:
        path, mapping, configurations = cg_artifact(Path(directory))
        force_field = FlowMatchForceField.load(path)
        # interleave the repeats, so that a change of machine load hits every configuration alike
        for repeat in range(args.repeats):
            all_atom_runs.append(all_atom(args.platform, args.threads, args.seconds))
            logger.info("repeat %d: all-atom %.1f steps/s", repeat, all_atom_runs[-1]["steps_per_second"])
            for backend, replicas, cuda_graphs, run_platform in configurations_to_run:
                row = cg(force_field, mapping, configurations, replicas, backend, args.platform, args.threads,
                         args.seconds, cuda_graphs, run_platform)
                measured[(backend, replicas, cuda_graphs, run_platform)].append(row)
                logger.info("repeat %d: CG %s R=%d%s on %s: %.1f steps/s, %.3g bead-steps/s", repeat, backend,
                            replicas, "" if cuda_graphs is None else f" graphs={cuda_graphs}", row["platform"],
                            row["steps_per_second"], row["bead_steps_per_second"])
        if args.aoti:
            results["aoti_energy_only"] = aoti_energy_only(force_field, configurations, args.replicas)
    results["all_atom"] = best_of(all_atom_runs)
    results["cg"] = [best_of(rows) for rows in measured.values()]
    single = [row for row in results["cg"] if row["replicas"] == 1 and row["backend"] == "torchforce"]
    summary = {}
    if single:
        summary["cg_torchforce_R1_over_all_atom_steps_per_second"] = (
            single[0]["steps_per_second"] / results["all_atom"]["steps_per_second"])
        summary["cg_torchforce_R1_over_all_atom_ns_per_day"] = (
            ns_per_day(single[0]["steps_per_second"], CG_TIME_STEP_PS) / results["all_atom"]["ns_per_day"])
    native_single = [row for row in results["cg"]
                     if row["replicas"] == 1 and row["backend"] == "native" and row["platform"] == args.platform]
    if native_single:
        summary["cg_native_R1_over_all_atom_steps_per_second"] = (
            native_single[0]["steps_per_second"] / results["all_atom"]["steps_per_second"])
        summary["cg_native_R1_over_all_atom_ns_per_day"] = (
            ns_per_day(native_single[0]["steps_per_second"], CG_TIME_STEP_PS) / results["all_atom"]["ns_per_day"])
    native_reference = [row for row in results["cg"] if row["replicas"] == 1 and row["backend"] == "native"
                        and row["platform"] == "Reference" and args.platform != "Reference"]
    if native_reference:
        summary["cg_native_R1_Reference_platform_over_all_atom_steps_per_second"] = (
            native_reference[0]["steps_per_second"] / results["all_atom"]["steps_per_second"])
        if single:
            summary["native_R1_Reference_platform_over_torchforce_R1"] = (
                native_reference[0]["steps_per_second"] / single[0]["steps_per_second"])
    for replicas in args.replicas:
        pair = {row["backend"]: row for row in results["cg"] if row["replicas"] == replicas and not row.get("cuda_graphs")
                and row["platform"] == args.platform}
        for other in ("pythonforce", "exported", "native"):
            if "torchforce" in pair and other in pair:
                summary[f"{other}_over_torchforce_R{replicas}"] = (
                    pair[other]["steps_per_second"] / pair["torchforce"]["steps_per_second"])
    report = {
        "benchmark": "CG neural force field vs all-atom OpenMM speed, alanine dipeptide (benchmarks/bench_cg_md.py)",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "settings": {
            "platform": args.platform, "threads": args.threads, "torch_threads": args.threads,
            "seconds_per_measurement": args.seconds, "repeats": args.repeats,
            "reported": "fastest of the interleaved repeats (all repeats listed in steps_per_second_all_repeats)",
            "all_atom": "amber14-all.xml + implicit/gbn2.xml, NoCutoff, HBonds, hydrogen mass 3 amu, "
                        "LangevinMiddleIntegrator 300 K, 1/ps, 4 fs",
            "cg": "5 beads (ACE C, ALA N, CA, C, NME N); random-init CGNet width 160, 5 layers, tanh, Lipschitz "
                  "bound 4 (same cost as a trained one) + harmonic bond/angle priors; LangevinMiddleIntegrator "
                  "300 K, 1/ps, 5 fs; R replicas in one System, one batched network call per step; "
                  "each CG row names its OpenMM platform",
            "bead_steps_per_second": "replicas * 5 beads * steps/s",
            "backends": "torchforce = openmmtorch.TorchForce (TorchScript); pythonforce = openmm.PythonForce calling "
                        "the TorchScript module; exported = openmm.PythonForce calling the torch.export program "
                        "(.pt2, eager .module(), autograd forces); native = the package's C++ CGNetForce "
                        "(openmm_flowmatch.native, float64, checked against TorchScript at creation)",
        },
        "machine": {
            "description": "shared 2-core CPU: other engineers' jobs ran at the same time; the numbers are noisy "
                           "lower bounds (see load_average_1min_before of each row)",
            "cpu_count": os.cpu_count(), "processor": platform_module.processor() or platform_module.machine(),
            "openmm_version": openmm.__version__, "torch_version": torch.__version__,
            "openmm_flowmatch_version": openmm_flowmatch.__version__,
            "load_average_1_5_15min_start": [round(value, 2) for value in load_start],
            "load_average_1_5_15min_end": [round(value, 2) for value in os.getloadavg()],
        },
        "results": results,
        "summary": summary,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    logger.info("wrote %s", args.output)
    return report


if __name__ == "__main__":
    main()
