"""CG simulations in OpenMM: platforms, replicas, reporters, checkpoints, blow-up detection.

:func:`run_simulation` runs Langevin dynamics (``LangevinMiddleIntegrator``) of a CG
``openmm.System`` for several independent replicas, in one of two ways:

* **batched**: one System that holds R independent copies of the molecule (what
  ``FlowMatchForceField.create_system(topology, replicas=R)`` builds) in one Context; the
  system then has R × (topology atoms) particles;
* **separate**: one System for one copy, R Contexts stepped in turn.

The mode follows from the particle count. Each replica gets its own trajectory file
(``replica_000.dcd`` or ``.xtc``); each Context gets a state-data CSV (OpenMM's
``StateDataReporter``) and a checkpoint. Re-running with the same output directory continues
from the checkpoints (the trajectory is cut back to the checkpointed step first), so a run that
was interrupted and restarted yields the same frames as one that ran through, on the Reference
and CPU platforms. Every report checks for NaN energies/positions and overlapping beads and
stops with :class:`BlowUpError`, keeping the frames written so far.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from openmm_flowmatch.topology import replicate_topology
from openmm_flowmatch.units import kelvin, strip_unit

logger = logging.getLogger(__name__)

__all__ = [
    "BlowUpError",
    "SimulationError",
    "SimulationResult",
    "select_platform",
    "replicate_topology",
    "run_simulation",
    "simulate_force_field",
]

PLATFORM_PREFERENCE = ("CUDA", "CPU", "Reference")
"""Platforms tried in order when none is named."""

RUN_INFO_FILE = "simulation.json"


class SimulationError(ValueError):
    """Bad simulation input or an output directory that cannot be continued."""


class BlowUpError(RuntimeError):
    """The simulation became unstable (NaN, or beads overlapping); frames so far are kept.

    Attributes
    ----------
    step
        Step at which the problem was seen.
    replica
        Replica index (``None`` when it could not be attributed).
    reason
        What was seen.
    trajectories
        Trajectory files, which hold every frame before the blow-up.
    """

    def __init__(self, message: str, step: int, replica: int | None, reason: str, trajectories=()):
        super().__init__(message)
        self.step = step
        self.replica = replica
        self.reason = reason
        self.trajectories = [Path(p) for p in trajectories]


@dataclass
class SimulationResult:
    """What :func:`run_simulation` produced."""

    trajectories: list[Path]
    state_data: list[Path]
    checkpoints: list[Path]
    replicas: int
    batched: bool
    steps: int
    frames_per_replica: int
    time_step: float
    report_interval: int
    platform: str
    wall_time: float = 0.0
    steps_run: int = 0
    ns_per_day: float = float("nan")
    resumed_from_step: int = 0


# --------------------------------------------------------------------------------------------
# platforms and topologies
# --------------------------------------------------------------------------------------------


def select_platform(name: str | None = None):
    """Return an OpenMM platform: ``name`` if given, otherwise CUDA > CPU > Reference.

    Raises
    ------
    SimulationError
        If the named platform is not available (the message lists those that are).
    """
    import openmm

    available = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    if name is not None:
        for candidate in available:
            if candidate.lower() == str(name).lower():
                return openmm.Platform.getPlatformByName(candidate)
        raise SimulationError(f"OpenMM platform {name!r} is not available here; available: {', '.join(available)}")
    for candidate in PLATFORM_PREFERENCE:
        if candidate in available:
            return openmm.Platform.getPlatformByName(candidate)
    return openmm.Platform.getPlatform(0)


# --------------------------------------------------------------------------------------------
# reporters and files
# --------------------------------------------------------------------------------------------


class _ReplicaTrajectoryReporter:
    """OpenMM reporter that checks each report for blow-ups, then writes one file per replica."""

    def __init__(self, writers, interval: int, n_beads: int, replica_offset: int, min_distance: float):
        self.writers = writers
        self.interval = interval
        self.n_beads = n_beads
        self.replica_offset = replica_offset
        self.min_distance = min_distance

    def describeNextReport(self, simulation):  # noqa: N802 (OpenMM reporter API)
        steps = self.interval - simulation.currentStep % self.interval
        return {"steps": steps, "periodic": False, "include": ["positions", "energy"]}

    def report(self, simulation, state):
        import openmm.unit as u

        positions = state.getPositions(asNumpy=True).value_in_unit(u.nanometer)
        energy = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
        replicas = positions.reshape(len(self.writers), self.n_beads, 3)
        step = simulation.currentStep
        problem = _find_problem(replicas, energy, self.min_distance)
        if problem is not None:
            replica, reason = problem
            replica = None if replica is None else replica + self.replica_offset
            raise _BlowUp(step, replica, reason)
        for writer, replica_positions in zip(self.writers, replicas):
            writer.write(replica_positions)


class _BlowUp(Exception):
    def __init__(self, step, replica, reason):
        super().__init__(reason)
        self.step, self.replica, self.reason = step, replica, reason


def _find_problem(replicas: np.ndarray, energy: float, min_distance: float):
    """(replica or None, reason) for the first problem found, else None.

    ``replicas`` is ``(R, beads, 3)``; all replicas are checked at once.
    """
    finite = np.isfinite(replicas).all(axis=(1, 2))
    if not finite.all():
        return int(np.argmin(finite)), "positions are NaN or infinite"
    if not math.isfinite(energy):
        return None, f"potential energy is {energy}"
    if min_distance > 0 and replicas.shape[1] > 1:
        i, j = np.triu_indices(replicas.shape[1], k=1)
        distances = np.linalg.norm(replicas[:, j] - replicas[:, i], axis=-1)  # (R, pairs)
        overlapping = distances.min(axis=1) < min_distance
        if overlapping.any():
            index = int(np.argmax(overlapping))
            worst = int(np.argmin(distances[index]))
            return index, (
                f"beads {int(i[worst])} and {int(j[worst])} are {distances[index, worst]:.4f} nm apart "
                f"(overlap threshold {min_distance} nm)"
            )
    return None


class _TrajectoryWriter:
    """Append frames of one replica to a DCD or XTC file (OpenMM's DCDFile / XTCFile)."""

    def __init__(self, path: Path, topology, time_step: float, interval: int, first_step: int, append: bool):
        import openmm.app as app
        import openmm.unit as u

        self.path = path
        dt = time_step * u.picosecond
        self._handle = None
        if path.suffix == ".dcd":
            self._handle = open(path, "r+b" if append else "wb")
            self._file = app.DCDFile(self._handle, topology, dt, first_step, interval, append=append)
        elif path.suffix == ".xtc":
            self._file = app.XTCFile(str(path), topology, dt, first_step, interval, append=append)
        else:
            raise SimulationError(f"{path}: trajectory format must be .dcd or .xtc")

    def write(self, positions_nm: np.ndarray) -> None:
        import openmm.unit as u

        self._file.writeModel(positions_nm * u.nanometer)
        if self._handle is not None:
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _count_frames(path: Path) -> int:
    import mdtraj

    if not path.exists() or path.stat().st_size == 0:
        return 0
    with mdtraj.open(str(path)) as handle:
        return len(handle)


def _truncate_trajectory(path: Path, topology, frames: int) -> None:
    """Cut a trajectory back to its first ``frames`` frames (after an interrupted run)."""
    import mdtraj

    present = _count_frames(path)
    if present == frames:
        return
    if present < frames:
        raise SimulationError(
            f"{path} has {present} frames but its checkpoint is at frame {frames}; the files do not "
            "belong together. Delete the output directory to start again."
        )
    logger.info("cutting %s back from %d to %d frames (the last checkpoint)", path, present, frames)
    if frames == 0:
        path.unlink()
        return
    if path.suffix == ".dcd":
        _truncate_dcd(path, topology.getNumAtoms(), frames)
        return
    trajectory = mdtraj.load(str(path), top=mdtraj.Topology.from_openmm(topology))[:frames]
    temporary = path.with_name(path.stem + ".tmp" + path.suffix)
    trajectory.save(str(temporary))
    os.replace(temporary, path)


def _truncate_dcd(path: Path, n_atoms: int, frames: int) -> None:
    """Cut an OpenMM-written DCD (no unit cell) to ``frames`` frames in place, bytes untouched."""
    import struct

    with open(path, "r+b") as handle:
        handle.seek(92)
        comment_bytes = struct.unpack("<i", handle.read(4))[0]
        header_bytes = 104 + comment_bytes + 8
        handle.seek(12)
        first_step, interval = struct.unpack("<2i", handle.read(8))
        frame_bytes = 3 * (4 * n_atoms + 8)
        handle.truncate(header_bytes + frames * frame_bytes)
        handle.seek(8)
        handle.write(struct.pack("<i", frames))
        handle.seek(20)
        handle.write(struct.pack("<i", first_step + (frames - 1) * interval))


def _truncate_state_data(path: Path, last_step: int) -> None:
    """Drop state-data rows written after ``last_step``."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            kept.append(line)
            continue
        try:
            step = int(float(line.split(",")[0]))
        except ValueError:
            continue
        if step <= last_step:
            kept.append(line)
    path.write_text("\n".join(kept) + ("\n" if kept else ""))


def _write_topology(path: Path, topology, positions_nm: np.ndarray) -> None:
    """The CG structure of one replica, the topology for reading the DCD/XTC files."""
    import openmm.app as app
    import openmm.unit as u

    with open(path, "w") as handle:
        app.PDBFile.writeFile(topology, positions_nm * u.nanometer, handle)


def _save_checkpoint(context, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(context.createCheckpoint())
    os.replace(temporary, path)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def _integrator_seed(seed: int, context_index: int) -> int:
    # OpenMM treats 0 as "pick a random seed", so map every seed to a positive int
    return int((int(seed) * 100003 + context_index) % (2**31 - 2)) + 1


def _initial_positions(positions: Any, replicas: int, n_beads: int) -> np.ndarray:
    import openmm.unit as u

    array = np.asarray(strip_unit(positions, u.nanometer), dtype=np.float64)
    if array.shape == (n_beads, 3):
        array = np.repeat(array[None], replicas, axis=0)
    if array.shape != (replicas, n_beads, 3):
        raise SimulationError(
            f"initial positions must have shape ({n_beads}, 3) or ({replicas}, {n_beads}, 3) in nm, "
            f"got {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise SimulationError("initial positions contain NaN or infinite values")
    return array


def _check_run_info(path: Path, info: dict) -> None:
    if not path.exists():
        return
    previous = json.loads(path.read_text())
    for key in ("replicas", "batched", "n_beads", "report_interval", "time_step", "trajectory_format"):
        if previous.get(key) != info[key]:
            raise SimulationError(
                f"{path.parent} holds a run with {key}={previous.get(key)!r}, this call asks for "
                f"{info[key]!r}; use the same options to continue it, or another output directory"
            )


def run_simulation(
    system,
    topology,
    positions: Any,
    out_dir: str | Path,
    steps: int,
    *,
    replicas: int = 1,
    temperature: Any = 300.0,
    friction: Any = 1.0,
    time_step: Any = 0.002,
    report_interval: int = 100,
    checkpoint_interval: int | None = None,
    trajectory_format: str = "dcd",
    platform: str | None = None,
    platform_properties: dict[str, str] | None = None,
    seed: int = 0,
    min_distance: float = 0.05,
    resume: bool = True,
    progress: bool = True,
) -> SimulationResult:
    """Run Langevin dynamics of a CG system for several independent replicas.

    Parameters
    ----------
    system
        ``openmm.System`` of one copy (R Contexts are run) or of ``replicas`` copies
        (batched: one Context).
    topology
        ``openmm.app.Topology`` of one copy (the CG topology).
    positions
        Initial positions in nm (or a Quantity): ``(beads, 3)`` for all replicas or
        ``(replicas, beads, 3)``.
    out_dir
        Directory for ``replica_XXX.{dcd,xtc}``, ``state_XXX.csv``, ``checkpoint_XXX.chk`` and
        ``simulation.json``. A directory with checkpoints is continued (``resume=True``).
    steps
        Total number of steps of each replica (including steps done before a restart).
    replicas
        Number of independent replicas R.
    temperature
        K (default 300).
    friction
        1/ps (default 1).
    time_step
        ps (default 0.002).
    report_interval
        Steps between frames, state-data rows and blow-up checks (default 100).
    checkpoint_interval
        Steps between checkpoints; a multiple of ``report_interval`` (default 10 reports).
    trajectory_format
        ``"dcd"`` or ``"xtc"``.
    platform
        OpenMM platform name; default CUDA > CPU > Reference.
    platform_properties
        Passed to the Context (e.g. ``{"Threads": "1"}``).
    seed
        Seed of the integrator and initial velocities; the same seed on the same platform gives
        the same trajectory.
    min_distance
        Beads closer than this (nm) count as a blow-up (0 turns the check off).
    resume
        Continue from checkpoints in ``out_dir``; ``False`` starts again and overwrites.
    progress
        Show a tqdm progress bar.

    Returns
    -------
    SimulationResult

    Raises
    ------
    BlowUpError
        NaN positions/energy or overlapping beads; trajectories keep the frames before it.
    SimulationError
        Inconsistent input or an output directory written with other options.
    """
    import openmm
    import openmm.app as app
    import openmm.unit as u
    from tqdm.auto import tqdm

    steps = int(steps)
    replicas = int(replicas)
    report_interval = int(report_interval)
    if replicas < 1 or steps < 0 or report_interval < 1:
        raise SimulationError("replicas and report_interval must be ≥ 1 and steps ≥ 0")
    if checkpoint_interval is None:
        checkpoint_interval = 10 * report_interval
    checkpoint_interval = int(checkpoint_interval)
    if checkpoint_interval < report_interval or checkpoint_interval % report_interval:
        raise SimulationError(
            f"checkpoint_interval ({checkpoint_interval}) must be a multiple of report_interval ({report_interval})"
        )
    if steps % report_interval:
        raise SimulationError(f"steps ({steps}) must be a multiple of report_interval ({report_interval})")
    trajectory_format = trajectory_format.lower().lstrip(".")
    if trajectory_format not in ("dcd", "xtc"):
        raise SimulationError(f"trajectory_format must be 'dcd' or 'xtc', got {trajectory_format!r}")
    temperature = kelvin(temperature)
    friction = float(strip_unit(friction, 1 / u.picosecond))
    time_step = float(strip_unit(time_step, u.picosecond))

    n_beads = topology.getNumAtoms()
    n_particles = system.getNumParticles()
    if n_particles == n_beads * replicas and replicas > 1:
        batched = True
    elif n_particles == n_beads:
        batched = False
    else:
        raise SimulationError(
            f"the System has {n_particles} particles but the topology has {n_beads} beads; for "
            f"{replicas} replicas it must have {n_beads} (one copy) or {n_beads * replicas} (batched)"
        )
    for index in range(n_particles):
        if system.getParticleMass(index).value_in_unit(u.dalton) == 0.0:
            raise SimulationError(
                f"particle {index} has zero mass and would not move; give every CG bead a mass"
            )
    start = _initial_positions(positions, replicas, n_beads)
    platform_object = select_platform(platform)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    info = {
        "replicas": replicas,
        "batched": batched,
        "n_beads": n_beads,
        "report_interval": report_interval,
        "time_step": time_step,
        "trajectory_format": trajectory_format,
        "temperature": temperature,
        "friction": friction,
        "steps": steps,
        "seed": int(seed),
        "platform": platform_object.getName(),
    }
    info_path = out_dir / RUN_INFO_FILE
    if resume:
        _check_run_info(info_path, info)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    _write_topology(out_dir / "topology.pdb", topology, start[0])

    contexts = 1 if batched else replicas
    per_context = replicas if batched else 1
    context_topology = replicate_topology(topology, per_context)
    trajectories = [out_dir / f"replica_{r:03d}.{trajectory_format}" for r in range(replicas)]
    state_files = [out_dir / f"state_{c:03d}.csv" for c in range(contexts)]
    checkpoints = [out_dir / f"checkpoint_{c:03d}.chk" for c in range(contexts)]

    simulations, writers = [], []
    resumed_step = 0
    try:
        for c in range(contexts):
            integrator = openmm.LangevinMiddleIntegrator(
                temperature * u.kelvin, friction / u.picosecond, time_step * u.picosecond
            )
            integrator.setRandomNumberSeed(_integrator_seed(seed, c))
            simulation = app.Simulation(
                context_topology, system, integrator, platform_object, platform_properties or {}
            )
            own_replicas = list(range(c * per_context, (c + 1) * per_context)) if not batched else list(range(replicas))
            continuing = resume and checkpoints[c].exists()
            if continuing:
                simulation.context.loadCheckpoint(checkpoints[c].read_bytes())
                done = simulation.context.getStepCount()
                if done % report_interval:
                    raise SimulationError(f"{checkpoints[c]} is at step {done}, not a multiple of the report interval")
                for r in own_replicas:
                    _truncate_trajectory(trajectories[r], topology, done // report_interval)
                _truncate_state_data(state_files[c], done)
                resumed_step = done
            else:
                simulation.context.setPositions(start[own_replicas].reshape(-1, 3) * u.nanometer)
                simulation.context.setVelocitiesToTemperature(temperature * u.kelvin, _integrator_seed(seed, c))
            done = simulation.context.getStepCount()
            own_writers = [
                _TrajectoryWriter(
                    trajectories[r], topology, time_step, report_interval, report_interval,
                    append=continuing and trajectories[r].exists(),
                )
                for r in own_replicas
            ]
            writers.extend(own_writers)
            simulation.reporters.append(
                _ReplicaTrajectoryReporter(own_writers, report_interval, n_beads, own_replicas[0], min_distance)
            )
            simulation.reporters.append(
                app.StateDataReporter(
                    str(state_files[c]), report_interval, step=True, time=True, potentialEnergy=True,
                    kineticEnergy=True, temperature=True, speed=True,
                    append=continuing and state_files[c].exists(),
                )
            )
            simulations.append(simulation)

        steps_done = [s.currentStep for s in simulations]
        if len(set(steps_done)) != 1:
            raise SimulationError(f"checkpoints in {out_dir} are at different steps {steps_done}; delete the directory")
        first_step = steps_done[0]
        if first_step > steps:
            raise SimulationError(f"{out_dir} already holds {first_step} steps, more than the {steps} asked for")
        if first_step:
            logger.info("continuing %s from step %d of %d", out_dir, first_step, steps)

        clock = time.perf_counter()
        with tqdm(total=steps, initial=first_step, unit="step", desc="simulate", disable=not progress) as bar:
            current = first_step
            while current < steps:
                chunk = min(report_interval, steps - current)
                for c, simulation in enumerate(simulations):
                    _step(simulation, chunk, c, batched, trajectories)
                current += chunk
                bar.update(chunk)
                if current % checkpoint_interval == 0 or current == steps:
                    for c, simulation in enumerate(simulations):
                        _save_checkpoint(simulation.context, checkpoints[c])
        wall = time.perf_counter() - clock
    finally:
        for writer in writers:
            writer.close()
        for simulation in simulations:
            for reporter in simulation.reporters:
                handle = getattr(reporter, "_out", None)
                if handle is not None and hasattr(handle, "close"):
                    handle.close()

    steps_run = steps - first_step
    simulated_ns = steps_run * time_step * replicas / 1000.0
    result = SimulationResult(
        trajectories=trajectories,
        state_data=state_files,
        checkpoints=checkpoints,
        replicas=replicas,
        batched=batched,
        steps=steps,
        frames_per_replica=steps // report_interval,
        time_step=time_step,
        report_interval=report_interval,
        platform=platform_object.getName(),
        wall_time=wall,
        steps_run=steps_run,
        ns_per_day=(simulated_ns / wall * 86400.0) if steps_run and wall > 0 else float("nan"),
        resumed_from_step=first_step,
    )
    logger.info(
        "simulated %d replicas × %d steps on %s in %.1f s (%.1f ns/day summed over replicas)",
        replicas, steps_run, result.platform, wall, result.ns_per_day,
    )
    return result


def _step(simulation, steps: int, context_index: int, batched: bool, trajectories) -> None:
    """Advance one Context, turning NaN failures into :class:`BlowUpError`."""
    import openmm

    try:
        simulation.step(steps)
    except _BlowUp as blow_up:
        raise _blow_up_error(blow_up.step, blow_up.replica, blow_up.reason, trajectories) from None
    except (openmm.OpenMMException, ValueError) as error:  # ValueError: StateDataReporter's "Energy is NaN"
        if "nan" not in str(error).lower():
            raise
        replica = None if batched else context_index
        raise _blow_up_error(simulation.currentStep, replica, str(error).strip(), trajectories) from error


def _blow_up_error(step, replica, reason, trajectories) -> BlowUpError:
    where = "a replica" if replica is None else f"replica {replica}"
    files = trajectories if replica is None else [trajectories[replica]]
    message = (
        f"simulation blew up at step {step} in {where}: {reason}. The frames before it are kept in "
        f"{', '.join(str(p) for p in files)}. Try a smaller time step or a higher friction, and "
        "check the model's priors (repulsion) and training data."
    )
    return BlowUpError(message, step, replica, reason, trajectories)


# --------------------------------------------------------------------------------------------
# from an artifact
# --------------------------------------------------------------------------------------------


def simulate_force_field(
    artifact: str | Path,
    structure: str | Path,
    out_dir: str | Path,
    steps: int,
    *,
    replicas: int = 1,
    batched: bool = True,
    initial_positions: Any = None,
    **options: Any,
) -> SimulationResult:
    """Simulate an exported force field (``.pt`` artifact) from a structure file.

    Parameters
    ----------
    artifact
        The TorchScript force-field file written by ``export_force_field``.
    structure
        A PDB of either the CG beads (one atom per bead) or the all-atom molecule the model was
        trained on (it is mapped to beads with the mapping stored in the artifact).
    out_dir, steps, replicas
        As in :func:`run_simulation`.
    batched
        One System with all replicas (``create_system(topology, replicas=R)``) instead of R
        Contexts.
    initial_positions
        Optional ``(replicas, beads, 3)`` nm starting structures instead of the PDB's.
    **options
        Passed to :func:`run_simulation` (temperature, friction, time_step, platform, ...).
        The temperature defaults to the artifact's training temperature.
    """
    from openmm_flowmatch.export import FlowMatchForceField

    force_field = FlowMatchForceField.load(artifact)
    topology, positions = cg_structure(force_field, structure)
    copies = replicas if batched else 1
    hint = select_platform(options.get("platform")).getName()
    system = force_field.create_system(replicate_topology(topology, copies), replicas=copies, platform_hint=hint)
    if options.get("temperature") is None:
        options["temperature"] = force_field.temperature or 300.0
    start = positions if initial_positions is None else initial_positions
    return run_simulation(system, topology, start, out_dir, steps, replicas=replicas, **options)


def cg_structure(force_field, structure: str | Path):
    """CG topology and positions (nm) of a force field's molecule from a CG or all-atom PDB.

    Parameters
    ----------
    force_field
        A loaded ``FlowMatchForceField`` (its mapping says which atoms make each bead).
    structure
        PDB with one atom per bead, or the all-atom PDB the mapping refers to.
    """
    import mdtraj

    path = Path(structure)
    if not path.exists():
        raise SimulationError(f"{path}: no such structure file")
    try:
        trajectory = mdtraj.load(str(path))
    except Exception as error:  # mdtraj raises many types for unreadable files
        raise SimulationError(f"{path}: cannot read the structure ({error})") from error
    mapping = force_field.mapping
    if trajectory.n_atoms == mapping.n_beads:
        return mapping.cg_topology(), trajectory.xyz[0].astype(np.float64)
    if trajectory.n_atoms == mapping.n_atoms:
        return mapping.cg_topology(), np.asarray(mapping.map_positions(trajectory.xyz[0]))[0].astype(np.float64)
    raise SimulationError(
        f"{path} has {trajectory.n_atoms} atoms; the force field expects a CG structure with "
        f"{mapping.n_beads} beads or the all-atom structure it was trained on ({mapping.n_atoms} atoms)"
    )


def result_summary(result: SimulationResult) -> dict:
    """JSON-able summary of a :class:`SimulationResult`."""
    summary = asdict(result)
    for key in ("trajectories", "state_data", "checkpoints"):
        summary[key] = [str(p) for p in summary[key]]
    return summary
