"""Benchmark: speed of the all-atom reference MD (OpenMM) for alanine dipeptide and chignolin.

Settings of DESIGN.md (Reference systems): amber14-all + implicit/gbn2, NoCutoff, HBonds,
hydrogen mass 3 amu, LangevinMiddleIntegrator with 4 fs steps, friction 1/ps (300 K for alanine
dipeptide, 340 K for chignolin). For each system it reports

- ``integrator``: steps/s and ns/day of plain ``integrator.step`` (the MD engine alone);
- ``generate_reference``: steps/s and ns/day of :func:`openmm_flowmatch.data.generate_reference`
  saving CG positions and mapped forces every 50 steps (0.2 ps) with a checkpoint every 100
  frames (the whole pipeline, file writes included).

Writes ``benchmarks/results/reference_md_speed.json`` (or ``--output``).

Usage::

    python benchmarks/bench_reference_md.py [--platform CPU] [--threads 2] [--seconds 10]

The machine load (``os.getloadavg``) before each measurement is stored with the numbers, since a
shared machine slows them down.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform as platform_module
import tempfile
import time
from pathlib import Path

import openmm

from openmm_flowmatch.data.reference import create_all_atom_system, generate_reference, load_structure

REPOSITORY = Path(__file__).resolve().parents[1]
RESOURCES = REPOSITORY / "openmm_flowmatch" / "resources"
RESULTS = REPOSITORY / "benchmarks" / "results"
TIME_STEP_PS = 0.004
SYSTEMS = {
    "alanine_dipeptide": {"pdb": RESOURCES / "alanine_dipeptide.pdb", "temperature": 300.0, "mapping": "backbone"},
    "chignolin_cln025": {"pdb": RESOURCES / "chignolin_cln025.pdb", "temperature": 340.0, "mapping": "alpha_carbons"},
}

logger = logging.getLogger("bench_reference_md")


def platform_properties(name: str, threads: int) -> dict:
    return {"Threads": str(threads)} if name == "CPU" else {}


def ns_per_day(steps_per_second: float) -> float:
    return steps_per_second * TIME_STEP_PS * 86400.0 / 1000.0


def time_integrator(pdb: Path, temperature: float, platform: str, threads: int, seconds: float) -> dict:
    """Steps/s of the bare integrator after minimisation and a warm-up."""
    topology, positions = load_structure(pdb)
    system, _, positions, n_solute, _ = create_all_atom_system(topology, positions, hydrogen_mass=3.0)
    integrator = openmm.LangevinMiddleIntegrator(temperature, 1.0, TIME_STEP_PS)
    integrator.setRandomNumberSeed(1)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform), platform_properties(platform, threads))
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 0)
    context.setVelocitiesToTemperature(temperature, 1)
    integrator.step(200)
    load = os.getloadavg()
    steps, block = 0, 250
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        integrator.step(block)
        steps += block
    context.getState(getEnergy=True)  # synchronise (GPU platforms)
    elapsed = time.perf_counter() - start
    rate = steps / elapsed
    return {
        "n_atoms": system.getNumParticles(),
        "steps": steps,
        "seconds": round(elapsed, 3),
        "steps_per_second": round(rate, 1),
        "ns_per_day": round(ns_per_day(rate), 2),
        "load_average_1min_before": round(load[0], 2),
    }


def time_generate_reference(pdb: Path, temperature: float, mapping: str, platform: str, threads: int, seconds: float, rate_guess: float) -> dict:
    """Steps/s of the whole generate_reference pipeline, for a duration of about ``seconds``."""
    save_interval = 50
    frames = max(20, int(rate_guess * seconds / save_interval))
    duration_ps = frames * save_interval * TIME_STEP_PS
    with tempfile.TemporaryDirectory() as directory:
        load = os.getloadavg()
        start = time.perf_counter()
        generate_reference(
            pdb,
            directory,
            mapping=mapping,
            temperature=temperature,
            duration_ps=duration_ps,
            equilibration_ps=0.0,
            save_interval_steps=save_interval,
            checkpoint_interval_frames=100,
            platform=platform,
            threads=threads,
            seed=1,
            progress=False,
        )
        elapsed = time.perf_counter() - start
    steps = frames * save_interval
    rate = steps / elapsed
    return {
        "steps": steps,
        "frames_saved": frames,
        "seconds_including_setup_and_minimisation": round(elapsed, 3),
        "steps_per_second": round(rate, 1),
        "ns_per_day": round(ns_per_day(rate), 2),
        "load_average_1min_before": round(load[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--platform", default="CPU", help="OpenMM platform (default CPU)")
    parser.add_argument("--threads", type=int, default=2, help="CPU platform threads (default 2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement (default 10)")
    parser.add_argument("--output", type=Path, default=RESULTS / "reference_md_speed.json")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. about the machine)")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    results = {}
    for name, spec in SYSTEMS.items():
        integrator = time_integrator(spec["pdb"], spec["temperature"], arguments.platform, arguments.threads, arguments.seconds)
        logger.info("%s integrator: %.0f steps/s, %.1f ns/day", name, integrator["steps_per_second"], integrator["ns_per_day"])
        pipeline = time_generate_reference(
            spec["pdb"], spec["temperature"], spec["mapping"], arguments.platform, arguments.threads, arguments.seconds, integrator["steps_per_second"]
        )
        logger.info("%s generate_reference: %.0f steps/s, %.1f ns/day", name, pipeline["steps_per_second"], pipeline["ns_per_day"])
        results[name] = {"temperature_K": spec["temperature"], "integrator": integrator, "generate_reference": pipeline}

    report = {
        "benchmark": "all-atom reference MD speed (benchmarks/bench_reference_md.py)",
        "settings": {
            "forcefield": ["amber14-all.xml", "implicit/gbn2.xml"],
            "nonbonded_method": "NoCutoff",
            "constraints": "HBonds",
            "hydrogen_mass_amu": 3.0,
            "integrator": "LangevinMiddleIntegrator, friction 1/ps",
            "time_step_fs": TIME_STEP_PS * 1000,
            "platform": arguments.platform,
            "threads": arguments.threads if arguments.platform == "CPU" else None,
        },
        "machine": {
            "description": arguments.note,
            "cpu_count": os.cpu_count(),
            "processor": platform_module.processor() or platform_module.machine(),
            "openmm_version": openmm.__version__,
        },
        "results": results,
    }
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s", arguments.output)


if __name__ == "__main__":
    main()
