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

Every run also records the kinetic temperature of each replica at each report
(``kinetic_XXX.csv``, one per Context, cut back on restart like the trajectories) and puts its
summary (:class:`KineticTemperatureSummary`) into the result and ``simulation.json``; a mean
kinetic temperature off the bath by more than :data:`TEMPERATURE_TOLERANCE` is logged as a
WARNING: the model or the time step does not integrate soundly (``openmm-flowmatch
check-time-step`` finds the largest sound step).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openmm_flowmatch.locking import holds_directory_lock
from openmm_flowmatch.topology import replicate_topology
from openmm_flowmatch.units import BOLTZMANN_KJ_PER_MOL_PER_K, strip_unit

logger = logging.getLogger(__name__)

__all__ = [
    "BlowUpError",
    "KineticTemperatureReporter",
    "KineticTemperatureSummary",
    "MAX_TIME_STEP",
    "SimulationError",
    "SimulationResult",
    "TEMPERATURE_TOLERANCE",
    "degrees_of_freedom",
    "kinetic_temperatures",
    "summarize_kinetic_temperatures",
    "validate_dynamics",
    "select_platform",
    "default_cg_platform",
    "replicate_topology",
    "run_simulation",
    "simulate_force_field",
]

PLATFORM_PREFERENCE = ("CUDA", "CPU", "Reference")
"""Platforms tried in order when none is named."""

SMALL_NATIVE_SYSTEM_BEADS = 50
"""Beads (all replicas together) up to which :func:`simulate_force_field` runs a native-kernel
system on the Reference platform when no platform is named and CPU would be chosen: OpenMM's CPU
platform costs tens of µs per step in thread hand-offs, more than a small network. Measured with
benchmarks/bench_cg_md.py (alanine dipeptide, 5 beads per replica, quiet 2-core CPU;
benchmarks/results/cg_md_speed.json, cg_md_speed_2threads.json): Reference / CPU steps/s 21× at
5 beads, 2.9× at 50, 2.2× at 500 against the CPU platform on one thread; 2.3× at 50 and 1.05×
at 500 against it on two threads. With more cores the CPU platform spreads replicas over more
threads, so only systems this small leave it."""

RUN_INFO_FILE = "simulation.json"

TEMPERATURE_TOLERANCE = 0.02
"""Largest relative deviation |T_kin/T − 1| of the mean kinetic temperature from the bath that
counts as sound dynamics (DESIGN.md, "Sound dynamics")."""

MAX_TIME_STEP = 0.02
"""Largest time step (ps) accepted for CG Langevin dynamics; anything above is a unit mistake."""

KINETIC_EQUILIBRATION_FRACTION = 0.1
"""Fraction of the kinetic-temperature reports at the start of a run left out of its summary
(the start structure relaxes and takes kinetic energy for about 1/friction)."""


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
    kinetic_state_data: list[Path] = field(default_factory=list)
    kinetic_temperature: KineticTemperatureSummary | None = None
    bonded: dict | None = None


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


def default_cg_platform(force_field: Any, n_beads: int, backend: str | None = None) -> tuple[str, str]:
    """``(platform name, reason)`` for a CG system when the caller named no platform.

    OpenMM's preference (CUDA > CPU > Reference), except that a system of at most
    :data:`SMALL_NATIVE_SYSTEM_BEADS` beads whose network runs on the native kernel goes to the
    Reference platform instead of CPU (faster there; see that constant).

    Parameters
    ----------
    force_field
        A :class:`~openmm_flowmatch.export.FlowMatchForceField`.
    n_beads
        Beads of the System (all replicas).
    backend
        The network backend asked for (``None``/``"auto"``: what ``auto`` picks on Reference).
    """
    preferred = select_platform(None).getName()
    if preferred != "CPU":
        return preferred, f"OpenMM's preferred platform ({' > '.join(PLATFORM_PREFERENCE)})"
    if n_beads > SMALL_NATIVE_SYSTEM_BEADS:
        return preferred, f"{n_beads} beads: more than {SMALL_NATIVE_SYSTEM_BEADS}, the CPU platform's threads pay off"
    native = backend == "native" or (backend in (None, "auto") and force_field.auto_backend("Reference")[0] == "native")
    if not native:
        return preferred, "the network does not run on the native kernel"
    return "Reference", (f"{n_beads} beads on the native kernel: the Reference platform is faster than CPU's "
                         f"thread hand-offs up to {SMALL_NATIVE_SYSTEM_BEADS} beads")


# --------------------------------------------------------------------------------------------
# dynamics parameters and kinetic temperature
# --------------------------------------------------------------------------------------------


def validate_dynamics(temperature: Any, friction: Any, time_step: Any) -> tuple[float, float, float]:
    """Temperature (K), friction (1/ps) and time step (ps) as floats, checked for sense.

    Raises
    ------
    SimulationError
        If the temperature is not positive, the friction is negative, or the time step is not
        in (0, :data:`MAX_TIME_STEP`] ps (a larger step is a unit mistake for CG dynamics).
    """
    import openmm.unit as u

    temperature = float(strip_unit(temperature, u.kelvin))
    friction = float(strip_unit(friction, 1 / u.picosecond))
    time_step = float(strip_unit(time_step, u.picosecond))
    if not temperature > 0.0:
        raise SimulationError(f"temperature must be positive (K), got {temperature}")
    if not friction >= 0.0:
        raise SimulationError(f"friction must be ≥ 0 (1/ps), got {friction}")
    if not 0.0 < time_step <= MAX_TIME_STEP:
        raise SimulationError(
            f"time step must be in (0, {MAX_TIME_STEP}] ps, got {time_step} ps; time steps are in ps "
            "(2 fs = 0.002)"
        )
    return temperature, friction, time_step


def degrees_of_freedom(system: Any, copies: int = 1) -> np.ndarray:
    """Degrees of freedom of each of ``copies`` equal blocks of particles of a System.

    Each copy has 3 per particle, minus the constraints between its particles, minus its share
    3/``copies`` of the three centre-of-mass degrees of freedom when the System holds a
    ``CMMotionRemover``: that force removes the centre-of-mass motion of the whole System, not of
    each copy, so the three removed degrees of freedom are split evenly over the copies (for one
    copy this is OpenMM's own count, as in ``StateDataReporter``). CG Systems of this package
    (``build_cg_system``, ``FlowMatchForceField.create_system``) have no CMMotionRemover and no
    constraints, so each copy has 3·n_beads.

    Parameters
    ----------
    system
        ``openmm.System`` of ``copies`` × n particles.
    copies
        Number of independent copies (replicas) the System holds.

    Returns
    -------
    numpy.ndarray
        ``(copies,)`` degrees of freedom.
    """
    import openmm

    n_particles = system.getNumParticles()
    if copies < 1 or n_particles % copies:
        raise SimulationError(f"a System of {n_particles} particles does not split into {copies} equal copies")
    per_copy = n_particles // copies
    counts = np.full(copies, 3.0 * per_copy)
    for index in range(system.getNumConstraints()):
        first, second, _ = system.getConstraintParameters(index)
        if first // per_copy != second // per_copy:
            raise SimulationError(f"constraint {index} joins particles {first} and {second} of different copies")
        counts[first // per_copy] -= 1.0
    if any(isinstance(system.getForce(i), openmm.CMMotionRemover) for i in range(system.getNumForces())):
        counts -= 3.0 / copies
    return counts


def kinetic_temperatures(velocities: np.ndarray, masses: np.ndarray, dof: np.ndarray) -> np.ndarray:
    """Kinetic temperature (K) of each copy: 2·KE / (k_B · dof), KE = ½ Σ m v².

    Parameters
    ----------
    velocities
        ``(copies · n, 3)`` nm/ps (or ``(copies, n, 3)``).
    masses
        ``(copies · n,)`` amu.
    dof
        ``(copies,)`` degrees of freedom (:func:`degrees_of_freedom`).
    """
    copies = len(dof)
    energy = 0.5 * np.asarray(masses, dtype=float).reshape(copies, -1) * np.square(
        np.asarray(velocities, dtype=float).reshape(copies, -1, 3)
    ).sum(-1)
    return 2.0 * energy.sum(-1) / (BOLTZMANN_KJ_PER_MOL_PER_K * np.asarray(dof, dtype=float))


class KineticTemperatureReporter:
    """OpenMM reporter writing the kinetic temperature of each replica of a Context to a CSV file.

    Rows are ``step,T_0,T_1,...`` (K), one column per replica the Context holds. The kinetic
    energy is ½ Σ m v² of the velocities the Context stores; ``LangevinMiddleIntegrator`` stores
    half-step (leapfrog) velocities v(t − Δt/2), and OpenMM's own ``getKineticEnergy`` (hence
    ``StateDataReporter``) uses the same velocities, so the two agree for one replica.

    Parameters
    ----------
    path
        Output CSV file.
    interval
        Steps between reports.
    system
        The Context's ``openmm.System`` (masses, constraints, CMMotionRemover).
    copies
        Replicas the System holds.
    first_replica
        Global index of the Context's first replica (for the header).
    append
        Continue an existing file (after a restart) instead of overwriting it.
    """

    def __init__(self, path: str | Path, interval: int, system: Any, copies: int = 1,
                 first_replica: int = 0, append: bool = False) -> None:
        import openmm.unit as u

        self.path = Path(path)
        self.interval = int(interval)
        self.masses = np.array([system.getParticleMass(i).value_in_unit(u.dalton) for i in range(system.getNumParticles())])
        self.dof = degrees_of_freedom(system, copies)
        self._out = open(self.path, "a" if append else "w")
        if not append:
            columns = ",".join(f"replica_{first_replica + r:03d}" for r in range(copies))
            self._out.write(f"#step,{columns} (kinetic temperature, K)\n")
            self._out.flush()

    def describeNextReport(self, simulation):  # noqa: N802 (OpenMM reporter API)
        steps = self.interval - simulation.currentStep % self.interval
        return {"steps": steps, "periodic": False, "include": ["velocities"]}

    def report(self, simulation, state) -> None:
        import openmm.unit as u

        velocities = state.getVelocities(asNumpy=True).value_in_unit(u.nanometer / u.picosecond)
        values = kinetic_temperatures(velocities, self.masses, self.dof)
        self._out.write(f"{simulation.currentStep}," + ",".join(f"{value:.6g}" for value in values) + "\n")
        self._out.flush()

    def close(self) -> None:
        self._out.close()


@dataclass
class KineticTemperatureSummary:
    """Kinetic temperature of a run against the bath.

    Attributes
    ----------
    mean
        Mean over the reports (after the first :data:`KINETIC_EQUILIBRATION_FRACTION`) and over
        all replicas, K.
    standard_error
        Standard error of ``mean``: from the spread of the replica means for ≥ 2 replicas, from
        10 consecutive blocks of the series for one replica (NaN if too short).
    replica_min, replica_max
        Smallest and largest replica mean, K.
    bath
        Thermostat temperature, K.
    relative_deviation
        mean / bath − 1.
    degrees_of_freedom
        Per replica.
    reports
        Reports per replica that went into the mean.
    """

    mean: float
    standard_error: float
    replica_min: float
    replica_max: float
    bath: float
    relative_deviation: float
    degrees_of_freedom: list[float]
    reports: int

    @property
    def sound(self) -> bool:
        """Whether |mean/bath − 1| ≤ :data:`TEMPERATURE_TOLERANCE`."""
        return abs(self.relative_deviation) <= TEMPERATURE_TOLERANCE

    def describe(self) -> str:
        """One line: mean ± standard error (replica range) against the bath."""
        return (
            f"kinetic temperature {self.mean:.1f} ± {self.standard_error:.1f} K (replica means "
            f"{self.replica_min:.1f}–{self.replica_max:.1f} K) against the bath's {self.bath:.1f} K "
            f"({100 * self.relative_deviation:+.1f} %)"
        )


def summarize_kinetic_temperatures(
    series: np.ndarray, bath: float, dof: Any = (), skip_fraction: float = KINETIC_EQUILIBRATION_FRACTION
) -> KineticTemperatureSummary | None:
    """Summary of a ``(reports, replicas)`` kinetic-temperature series (K); None if empty.

    The first ``skip_fraction`` of the reports is left out (equilibration).
    """
    series = np.asarray(series, dtype=float)
    if series.ndim != 2 or series.shape[0] == 0:
        return None
    series = series[int(series.shape[0] * skip_fraction):]
    replica_means = series.mean(axis=0)
    if series.shape[1] > 1:
        error = float(replica_means.std(ddof=1) / math.sqrt(series.shape[1]))
    elif series.shape[0] >= 10:
        blocks = np.array([block.mean() for block in np.array_split(series[:, 0], 10)])
        error = float(blocks.std(ddof=1) / math.sqrt(10))
    else:
        error = float("nan")
    mean = float(series.mean())
    return KineticTemperatureSummary(
        mean=mean, standard_error=error, replica_min=float(replica_means.min()),
        replica_max=float(replica_means.max()), bath=float(bath), relative_deviation=mean / float(bath) - 1.0,
        degrees_of_freedom=[float(d) for d in dof], reports=int(series.shape[0]),
    )


def _read_kinetic_series(paths: list[Path]) -> np.ndarray:
    """``(reports, replicas)`` from the per-Context kinetic CSV files (columns side by side)."""
    tables = []
    for path in paths:
        if not path.exists():
            return np.zeros((0, 0))
        table = np.loadtxt(path, delimiter=",", comments="#", ndmin=2)
        tables.append(table[:, 1:])
    length = min((len(table) for table in tables), default=0)
    return np.concatenate([table[:length] for table in tables], axis=1) if length else np.zeros((0, 0))


def _warn_if_unsound(summary: KineticTemperatureSummary | None, time_step: float) -> None:
    if summary is None:
        return
    logger.info("%s", summary.describe())
    if not summary.sound:
        logger.warning(
            "the mean kinetic temperature %.1f ± %.1f K is %.1f %% off the bath's %.1f K (tolerance %.0f %%) at a "
            "time step of %g fs: the model or the step does not integrate soundly; find the largest sound step with "
            "`openmm-flowmatch check-time-step`",
            summary.mean, summary.standard_error, 100 * summary.relative_deviation, summary.bath,
            100 * TEMPERATURE_TOLERANCE, time_step * 1000.0,
        )


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
    """Write a checkpoint atomically; a full disk fails the run with one line, keeping the old one."""
    from openmm_flowmatch.safe_files import write_atomically

    write_atomically(path, context.createCheckpoint(), SimulationError)


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


RESUME_SETTINGS = ("replicas", "batched", "n_beads", "report_interval", "time_step", "trajectory_format",
                   "temperature", "friction", "seed", "platform")
"""Options a continued run must share with the run that wrote the checkpoints (``steps`` may grow)."""


def _check_run_info(path: Path, info: dict) -> None:
    """Refuse to continue checkpoints written with other options, naming the first that differs."""
    if not path.exists() or not any(path.parent.glob("checkpoint_*.chk")):
        return
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SimulationError(
            f"{path} cannot be read ({error}); delete the output directory or pass resume=False (--restart)"
        ) from None
    for key in RESUME_SETTINGS:
        if key in previous and previous.get(key) != info[key]:
            raise SimulationError(
                f"{path.parent} holds a run with {key}={previous.get(key)!r}, this call asks for "
                f"{info[key]!r}; use the same options to continue it, or another output directory"
            )


@holds_directory_lock("out_dir")
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
    steps, replicas, report_interval, checkpoint_interval, trajectory_format = _checked_run_options(
        steps, replicas, report_interval, checkpoint_interval, trajectory_format
    )
    temperature, friction, time_step = validate_dynamics(temperature, friction, time_step)
    n_beads, batched = _replica_layout(system, topology, replicas)
    start = _initial_positions(positions, replicas, n_beads)
    platform_object = select_platform(platform)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "replicas": replicas, "batched": batched, "n_beads": n_beads, "report_interval": report_interval,
        "time_step": time_step, "trajectory_format": trajectory_format, "temperature": temperature,
        "friction": friction, "steps": steps, "seed": int(seed), "platform": platform_object.getName(),
    }
    info_path = out_dir / RUN_INFO_FILE
    if resume:
        _check_run_info(info_path, info)
    _write_run_info(info_path, info)
    _write_topology(out_dir / "topology.pdb", topology, start[0])
    plan = _RunPlan(system, topology, replicas, batched, n_beads, temperature, friction, time_step, report_interval,
                    seed, min_distance, resume, _OutputFiles.of(out_dir, replicas, batched, trajectory_format))

    simulations, writers = [], []
    try:
        for context_index in range(plan.contexts):
            simulation, own_writers = _context_simulation(plan, context_index, start, platform_object,
                                                          platform_properties)
            simulations.append(simulation)
            writers.extend(own_writers)
        first_step = _common_start_step(simulations, out_dir, steps)
        wall = _advance(simulations, plan, first_step, steps, checkpoint_interval, progress)
    finally:
        _close_outputs(writers, simulations)
    return _simulation_result(plan, steps, first_step, wall, platform_object.getName(), info_path)


def _checked_run_options(steps: int, replicas: int, report_interval: int, checkpoint_interval: int | None,
                         trajectory_format: str) -> tuple[int, int, int, int, str]:
    """The run's counts and trajectory format as plain values, checked (:class:`SimulationError`)."""
    steps, replicas, report_interval = int(steps), int(replicas), int(report_interval)
    if replicas < 1 or steps < 0 or report_interval < 1:
        raise SimulationError("replicas and report_interval must be ≥ 1 and steps ≥ 0")
    checkpoint_interval = int(10 * report_interval if checkpoint_interval is None else checkpoint_interval)
    if checkpoint_interval < report_interval or checkpoint_interval % report_interval:
        raise SimulationError(
            f"checkpoint_interval ({checkpoint_interval}) must be a multiple of report_interval ({report_interval})"
        )
    if steps % report_interval:
        raise SimulationError(f"steps ({steps}) must be a multiple of report_interval ({report_interval})")
    trajectory_format = trajectory_format.lower().lstrip(".")
    if trajectory_format not in ("dcd", "xtc"):
        raise SimulationError(f"trajectory_format must be 'dcd' or 'xtc', got {trajectory_format!r}")
    return steps, replicas, report_interval, checkpoint_interval, trajectory_format


def _replica_layout(system, topology, replicas: int) -> tuple[int, bool]:
    """``(beads per copy, batched)``: whether the System holds all replicas (one Context) or one
    copy (a Context per replica); every particle must have a mass."""
    import openmm.unit as u

    n_beads, n_particles = topology.getNumAtoms(), system.getNumParticles()
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
    return n_beads, batched


@dataclass(frozen=True)
class _OutputFiles:
    """The files of a run: one trajectory per replica, state data, checkpoint and kinetic
    temperatures per Context."""

    trajectories: list[Path]
    state_data: list[Path]
    checkpoints: list[Path]
    kinetic: list[Path]

    @classmethod
    def of(cls, out_dir: Path, replicas: int, batched: bool, trajectory_format: str) -> "_OutputFiles":
        contexts = range(1 if batched else replicas)
        return cls(
            [out_dir / f"replica_{r:03d}.{trajectory_format}" for r in range(replicas)],
            [out_dir / f"state_{c:03d}.csv" for c in contexts],
            [out_dir / f"checkpoint_{c:03d}.chk" for c in contexts],
            [out_dir / f"kinetic_{c:03d}.csv" for c in contexts],
        )


@dataclass(frozen=True)
class _RunPlan:
    """What every Context of a run shares."""

    system: Any
    topology: Any
    replicas: int
    batched: bool
    n_beads: int
    temperature: float
    friction: float
    time_step: float
    report_interval: int
    seed: int
    min_distance: float
    resume: bool
    files: _OutputFiles

    @property
    def contexts(self) -> int:
        return 1 if self.batched else self.replicas

    @property
    def per_context(self) -> int:
        """Replicas per Context."""
        return self.replicas if self.batched else 1

    def replicas_of(self, context_index: int) -> list[int]:
        return list(range(context_index * self.per_context, (context_index + 1) * self.per_context))


def _context_simulation(plan: _RunPlan, context_index: int, start: np.ndarray, platform_object,
                        platform_properties: dict[str, str] | None):
    """One Context's ``app.Simulation`` (continued from its checkpoint or started at ``start``) with
    its reporters, and its replicas' trajectory writers."""
    import openmm
    import openmm.app as app
    import openmm.unit as u

    integrator = openmm.LangevinMiddleIntegrator(
        plan.temperature * u.kelvin, plan.friction / u.picosecond, plan.time_step * u.picosecond
    )
    integrator.setRandomNumberSeed(_integrator_seed(plan.seed, context_index))
    simulation = app.Simulation(replicate_topology(plan.topology, plan.per_context), plan.system, integrator,
                                platform_object, platform_properties or {})
    own_replicas = plan.replicas_of(context_index)
    files = plan.files
    continuing = plan.resume and files.checkpoints[context_index].exists()
    if continuing:
        _continue_from_checkpoint(simulation, plan, context_index, own_replicas)
    else:
        simulation.context.setPositions(start[own_replicas].reshape(-1, 3) * u.nanometer)
        simulation.context.setVelocitiesToTemperature(plan.temperature * u.kelvin,
                                                      _integrator_seed(plan.seed, context_index))
    writers = [
        _TrajectoryWriter(files.trajectories[r], plan.topology, plan.time_step, plan.report_interval,
                          plan.report_interval, append=continuing and files.trajectories[r].exists())
        for r in own_replicas
    ]
    interval = plan.report_interval
    simulation.reporters.append(
        _ReplicaTrajectoryReporter(writers, interval, plan.n_beads, own_replicas[0], plan.min_distance)
    )
    state_file, kinetic_file = files.state_data[context_index], files.kinetic[context_index]
    simulation.reporters.append(
        app.StateDataReporter(
            str(state_file), interval, step=True, time=True, potentialEnergy=True, kineticEnergy=True,
            temperature=True, speed=True, append=continuing and state_file.exists(),
        )
    )
    simulation.reporters.append(
        KineticTemperatureReporter(kinetic_file, interval, plan.system, plan.per_context, own_replicas[0],
                                   append=continuing and kinetic_file.exists())
    )
    return simulation, writers


def _continue_from_checkpoint(simulation, plan: _RunPlan, context_index: int, own_replicas: list[int]) -> None:
    """Load the Context's checkpoint and cut its outputs back to the checkpoint's step."""
    files = plan.files
    simulation.context.loadCheckpoint(files.checkpoints[context_index].read_bytes())
    done = simulation.context.getStepCount()
    if done % plan.report_interval:
        raise SimulationError(
            f"{files.checkpoints[context_index]} is at step {done}, not a multiple of the report interval"
        )
    for r in own_replicas:
        _truncate_trajectory(files.trajectories[r], plan.topology, done // plan.report_interval)
    _truncate_state_data(files.state_data[context_index], done)
    _truncate_state_data(files.kinetic[context_index], done)


def _common_start_step(simulations: list, out_dir: Path, steps: int) -> int:
    """The step every Context starts from (all equal, at most ``steps``)."""
    steps_done = [s.currentStep for s in simulations]
    if len(set(steps_done)) != 1:
        raise SimulationError(f"checkpoints in {out_dir} are at different steps {steps_done}; delete the directory")
    first_step = steps_done[0]
    if first_step > steps:
        raise SimulationError(f"{out_dir} already holds {first_step} steps, more than the {steps} asked for")
    if first_step:
        logger.info("continuing %s from step %d of %d", out_dir, first_step, steps)
    return first_step


def _advance(simulations: list, plan: _RunPlan, first_step: int, steps: int, checkpoint_interval: int,
             progress: bool) -> float:
    """Step every Context from ``first_step`` to ``steps``, a report interval at a time,
    checkpointing every ``checkpoint_interval`` steps and at the end; return the wall seconds."""
    from tqdm.auto import tqdm

    clock = time.perf_counter()
    with tqdm(total=steps, initial=first_step, unit="step", desc="simulate", disable=not progress) as bar:
        current = first_step
        while current < steps:
            chunk = min(plan.report_interval, steps - current)
            for context_index, simulation in enumerate(simulations):
                _step(simulation, chunk, context_index, plan.batched, plan.files.trajectories)
            current += chunk
            bar.update(chunk)
            if current % checkpoint_interval == 0 or current == steps:
                for context_index, simulation in enumerate(simulations):
                    _save_checkpoint(simulation.context, plan.files.checkpoints[context_index])
    return time.perf_counter() - clock


def _close_outputs(writers: list, simulations: list) -> None:
    for writer in writers:
        writer.close()
    for simulation in simulations:
        for reporter in simulation.reporters:
            handle = getattr(reporter, "_out", None)
            if handle is not None and hasattr(handle, "close"):
                handle.close()


def _simulation_result(plan: _RunPlan, steps: int, first_step: int, wall: float, platform_name: str,
                       info_path: Path) -> SimulationResult:
    """The :class:`SimulationResult` of a finished run, with its kinetic-temperature summary
    (also added to ``simulation.json``; a warning when it runs hot or cold)."""
    steps_run = steps - first_step
    simulated_ns = steps_run * plan.time_step * plan.replicas / 1000.0
    files = plan.files
    result = SimulationResult(
        trajectories=files.trajectories,
        state_data=files.state_data,
        checkpoints=files.checkpoints,
        replicas=plan.replicas,
        batched=plan.batched,
        steps=steps,
        frames_per_replica=steps // plan.report_interval,
        time_step=plan.time_step,
        report_interval=plan.report_interval,
        platform=platform_name,
        wall_time=wall,
        steps_run=steps_run,
        ns_per_day=(simulated_ns / wall * 86400.0) if steps_run and wall > 0 else float("nan"),
        resumed_from_step=first_step,
        kinetic_state_data=files.kinetic,
    )
    logger.info(
        "simulated %d replicas × %d steps on %s in %.1f s (%.1f ns/day summed over replicas)",
        plan.replicas, steps_run, result.platform, wall, result.ns_per_day,
    )
    dof = np.tile(degrees_of_freedom(plan.system, plan.per_context), plan.contexts)
    result.kinetic_temperature = summarize_kinetic_temperatures(_read_kinetic_series(files.kinetic),
                                                                plan.temperature, dof)
    _warn_if_unsound(result.kinetic_temperature, plan.time_step)
    if result.kinetic_temperature is not None:
        _update_run_info(info_path, "kinetic_temperature", asdict(result.kinetic_temperature))
    return result


def _update_run_info(path: Path, key: str, value: Any) -> None:
    """Add a diagnostics entry to ``simulation.json`` (options written at the start stay)."""
    info = json.loads(path.read_text()) if path.exists() else {}
    info[key] = value
    _write_run_info(path, info)


def _write_run_info(path: Path, info: dict) -> None:
    from openmm_flowmatch.safe_files import write_atomically

    write_atomically(path, json.dumps(info, indent=2) + "\n", SimulationError)


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
    files = [Path(p) for p in (trajectories if replica is None else [trajectories[replica]])]
    kept = str(files[0]) if len(files) == 1 else f"{files[0].parent}/replica_*{files[0].suffix} ({len(files)} files)"
    message = (
        f"simulation blew up at step {step} in {where}: {reason.split('  For more information')[0]} "
        f"The frames before it are kept in {kept}. The time step is too large for this model: "
        "`openmm-flowmatch check-time-step ARTIFACT STRUCTURE` finds the largest sound one; also check "
        "the model's priors (repulsion) and training data."
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
    backend: str | None = None,
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
    backend
        Network backend of ``FlowMatchForceField.create_system`` (``"auto"``, ``"torchforce"``,
        ``"native"``, ``"exported"``, …); default ``"auto"``: native where it is available and exact
        for the network on the chosen platform, else TorchForce (logged).
    **options
        Passed to :func:`run_simulation` (temperature, friction, time_step, platform, ...).
        The temperature defaults to the artifact's training temperature. Without ``platform`` and
        ``platform_properties`` the platform is :func:`default_cg_platform`'s (logged): OpenMM's
        preferred one, but Reference for a small system on the native kernel.
    """
    from openmm_flowmatch.export import FlowMatchForceField

    force_field = FlowMatchForceField.load(artifact)
    topology, positions = cg_structure(force_field, structure)
    copies = replicas if batched else 1
    if options.get("platform") is None and not options.get("platform_properties"):
        options["platform"], reason = default_cg_platform(force_field, copies * topology.getNumAtoms(), backend)
        logger.info("platform: %s (%s)", options["platform"], reason)
    hint = select_platform(options.get("platform")).getName()
    system = force_field.create_system(
        replicate_topology(topology, copies), replicas=copies, platform_hint=hint, backend=backend
    )
    if options.get("temperature") is None:
        options["temperature"] = force_field.temperature or 300.0
    start = positions if initial_positions is None else initial_positions
    result = run_simulation(system, topology, start, out_dir, steps, replicas=replicas, **options)
    result.bonded = _bonded_diagnostics(force_field, topology, result, Path(out_dir))
    return result


def _bonded_diagnostics(force_field, topology, result: SimulationResult, out_dir: Path) -> dict | None:
    """Bond/angle width ratios of the trajectories against the artifact's data (also into simulation.json)."""
    from openmm_flowmatch.analysis import load_positions
    from openmm_flowmatch.diagnostics import BOND_WIDTH_TOLERANCE, compare_with_data

    frames = [load_positions(path, topology) for path in result.trajectories if path.exists()]
    frames = [x[int(len(x) * KINETIC_EQUILIBRATION_FRACTION):] for x in frames if len(x)]
    if not frames:
        return None
    comparison = compare_with_data(force_field, np.concatenate(frames))
    if comparison is None:
        return None
    _update_run_info(out_dir / RUN_INFO_FILE, "bonded", comparison)
    logger.info(
        "bond width ratios model/data %.3f–%.3f, angle width ratios %s (reference: %s)",
        comparison["bond_width_ratio_min"], comparison["bond_width_ratio_max"],
        "–" if comparison["angle_width_ratio_min"] is None
        else f"{comparison['angle_width_ratio_min']:.3f}–{comparison['angle_width_ratio_max']:.3f}",
        comparison["source"],
    )
    if not comparison["sound_bonds"]:
        logger.warning(
            "bond widths are off the data's by more than %.0f %% (ratios %.3f–%.3f) at a time step of %g fs; "
            "check the time step with `openmm-flowmatch check-time-step`",
            100 * BOND_WIDTH_TOLERANCE, comparison["bond_width_ratio_min"], comparison["bond_width_ratio_max"],
            result.time_step * 1000.0,
        )
    return comparison


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
    for key in ("trajectories", "state_data", "checkpoints", "kinetic_state_data"):
        summary[key] = [str(p) for p in summary[key]]
    return summary
