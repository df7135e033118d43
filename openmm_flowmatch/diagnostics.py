"""Is a CG model integrated soundly? Kinetic and configurational temperature, bond widths, time steps.

A CG force field is only usable at time steps where Langevin dynamics samples its Boltzmann
distribution: there the kinetic temperature of every replica equals the bath's and the bond
widths equal the data's (DESIGN.md, "Sound dynamics"). Stiff network terms heat the system at
too large a step long before anything blows up, so this module measures instead of guessing:

* :func:`configurational_temperature` — T_conf = ⟨|∇U|²⟩ / (k_B ⟨∇²U⟩) (Rugh 1997; Butler,
  Ayton, Jepps & Evans 1998) from positions and a torch energy function; it depends on the
  positions only, so it tells whether the *configurations* are at the bath temperature.
* :func:`reference_statistics` / :func:`compare_with_data` — bond and angle means and widths of
  a simulation against the training data stored in the artifact (``data_statistics``) or, when
  the artifact has none, against the widths σ = sqrt(kT/k) and means x₀ of its
  Boltzmann-inverted harmonic priors.
* :func:`check_time_step` — R replicas at each of several time steps; a step is *sound* when
  |T_kin/T − 1| ≤ :data:`~openmm_flowmatch.simulation.TEMPERATURE_TOLERANCE` and every bond width
  ratio model/data lies within 1 ± :data:`BOND_WIDTH_TOLERANCE`;
  :func:`record_sound_time_step` stores the result in the artifact
  (``FlowMatchForceField.sound_time_step``).

The kinetic temperature itself is measured by
:class:`~openmm_flowmatch.simulation.KineticTemperatureReporter`, which every
:func:`~openmm_flowmatch.simulation.run_simulation` attaches.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from openmm_flowmatch.analysis import bonded_statistics, compare_bonded_statistics, jsonable
from openmm_flowmatch.simulation import (
    TEMPERATURE_TOLERANCE,
    SimulationError,
    degrees_of_freedom,
    kinetic_temperatures,
    replicate_topology,
    select_platform,
    summarize_kinetic_temperatures,
    validate_dynamics,
)
from openmm_flowmatch.units import BOLTZMANN_KJ_PER_MOL_PER_K, kT, strip_unit

logger = logging.getLogger(__name__)

__all__ = [
    "BOND_WIDTH_TOLERANCE",
    "DEFAULT_TIME_STEPS",
    "DiagnosticsError",
    "TimeStepReport",
    "TimeStepResult",
    "check_time_step",
    "compare_with_data",
    "configurational_temperature",
    "model_energy_function",
    "record_sound_time_step",
    "reference_statistics",
]

BOND_WIDTH_TOLERANCE = 0.1
"""A sound step keeps every bond width within (1 ± this) × the data's."""

DEFAULT_TIME_STEPS = (0.001, 0.002, 0.003, 0.004, 0.005)
"""Time steps (ps) tried by :func:`check_time_step` by default."""

CONFIGURATIONAL_FRAMES = 500
"""Frames (spread over the production run) used for the configurational temperature."""


class DiagnosticsError(SimulationError):
    """Bad input to a diagnostic (shapes, values, a quantity that is not defined)."""


# --------------------------------------------------------------------------------------------
# configurational temperature
# --------------------------------------------------------------------------------------------


def _laplacian(gradient: Any, coordinates: Any) -> Any:
    """Per-frame trace of the Hessian: one backward pass per coordinate, batched over frames."""
    import torch

    flat = gradient.reshape(gradient.shape[0], -1)
    trace = torch.zeros(flat.shape[0], dtype=flat.dtype)
    if not flat.requires_grad:  # the gradient does not depend on the positions
        return trace
    for index in range(flat.shape[1]):
        (second,) = torch.autograd.grad(flat[:, index].sum(), coordinates, retain_graph=True, allow_unused=True)
        if second is not None:
            trace = trace + second.reshape(flat.shape[0], -1)[:, index].detach()
    return trace


def configurational_temperature(
    energy_function: Callable[[Any], Any], positions: Any, batch_size: int = 256
) -> float:
    """Configurational temperature T_conf = ⟨|∇U|²⟩ / (k_B ⟨∇²U⟩) in K.

    Rugh's estimator in the form of Butler et al. (J. Chem. Phys. 109, 6519, 1998): for
    configurations drawn from exp(−U/kT) it equals T. It needs U twice differentiable;
    kinks (e.g. ReLU networks, the edge of a one-sided repulsion) contribute nothing to the
    Laplacian computed here.

    Parameters
    ----------
    energy_function
        Torch function of positions ``(batch, beads, 3)`` (float64, nm) returning energies in
        kJ/mol, either ``(batch,)`` or their sum; frames must not interact.
    positions
        ``(frames, beads, 3)`` nm.
    batch_size
        Frames per evaluation.

    Returns
    -------
    float
        T_conf in K.

    Raises
    ------
    DiagnosticsError
        If the positions have the wrong shape or ⟨∇²U⟩ ≤ 0 (T_conf is then not defined).
    """
    import torch

    array = np.asarray(strip_unit(positions, _nanometer()), dtype=np.float64)
    if array.ndim != 3 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise DiagnosticsError(f"positions must have shape (frames, beads, 3) in nm, got {array.shape}")
    squared_gradient, laplacian = 0.0, 0.0
    for start in range(0, len(array), int(batch_size)):
        coordinates = torch.tensor(array[start : start + int(batch_size)], requires_grad=True)
        with torch.enable_grad():
            energy = energy_function(coordinates).sum()
            (gradient,) = torch.autograd.grad(energy, coordinates, create_graph=True)
            laplacian += float(_laplacian(gradient, coordinates).sum())
        squared_gradient += float((gradient.detach() ** 2).sum())
    if not laplacian > 0.0:
        raise DiagnosticsError(
            f"the mean Laplacian of the energy is {laplacian / len(array):.4g} kJ/mol/nm² (not positive); "
            "the configurational temperature is not defined here"
        )
    return squared_gradient / (BOLTZMANN_KJ_PER_MOL_PER_K * laplacian)


def _nanometer():
    import openmm.unit as u

    return u.nanometer


def model_energy_function(force_field: Any) -> Callable[[Any], Any]:
    """Total energy of a force field (network + priors) as a torch function for diagnostics.

    The network is the eager module (``FlowMatchForceField.eager_module()``, float64) when the
    artifact's network can be rebuilt, otherwise the TorchScript module. The returned function
    takes ``(batch, beads, 3)`` nm and returns the summed energy of the independent frames
    (kJ/mol), which is what :func:`configurational_temperature` needs.
    """
    try:
        network = force_field.eager_module()
    except Exception as error:  # noqa: BLE001 - any network this package cannot rebuild
        logger.debug("using the TorchScript network for diagnostics (%s)", error)
        network = force_field.fresh_module()
    priors = force_field.priors

    def energy(positions: Any) -> Any:
        total = network(positions.reshape(-1, 3))
        if priors is not None:
            total = total + priors.energy(positions).sum()
        return total

    return energy


# --------------------------------------------------------------------------------------------
# bonds and angles against the data
# --------------------------------------------------------------------------------------------


def reference_statistics(force_field: Any) -> dict | None:
    """Data bond/angle means and widths of a force field; ``None`` if nothing to compare with.

    Explicit ``data_statistics`` from the artifact metadata come first (``source`` =
    ``"data_statistics"``). Otherwise they are derived from the harmonic priors, which were
    fitted by Boltzmann inversion: mean = x₀ and σ = sqrt(kT/k) with k in OpenMM's ½k(x − x₀)²
    convention and T the priors' fitting temperature (else the artifact's) (``source`` =
    ``"priors"``).
    """
    explicit = getattr(force_field, "data_statistics", None)
    if explicit:
        return {**explicit, "source": "data_statistics"}
    priors = force_field.priors
    if priors is None:
        return None
    from openmm_flowmatch.priors import HarmonicAngles, HarmonicBonds

    thermal = kT(priors.temperature or force_field.temperature or 300.0)
    statistics: dict[str, Any] = {"bonds": [], "angles": [], "source": "priors"}
    for term in priors.terms:
        if isinstance(term, HarmonicBonds) and not statistics["bonds"]:
            statistics.update(bonds=term.pairs.tolist(), bond_mean=term.lengths.tolist(),
                              bond_std=np.sqrt(thermal / term.force_constants).tolist())
        elif isinstance(term, HarmonicAngles) and not statistics["angles"]:
            statistics.update(angles=term.triples.tolist(), angle_mean=term.angles.tolist(),
                              angle_std=np.sqrt(thermal / term.force_constants).tolist())
    return statistics if statistics["bonds"] else None


def compare_with_data(force_field: Any, positions: Any, reference: dict | None = None) -> dict | None:
    """Bond/angle width ratios (model/data) and mean shifts of CG positions of a force field.

    Parameters
    ----------
    force_field
        A loaded ``FlowMatchForceField``.
    positions
        ``(frames, beads, 3)`` nm sampled with the force field.
    reference
        Reference statistics; default :func:`reference_statistics` of the force field.

    Returns
    -------
    dict or None
        :func:`~openmm_flowmatch.analysis.compare_bonded_statistics` plus ``source`` (where the
        reference came from) and ``sound_bonds`` (every bond width ratio within
        1 ± :data:`BOND_WIDTH_TOLERANCE`); ``None`` when there is no reference.
    """
    reference = reference_statistics(force_field) if reference is None else reference
    if reference is None:
        return None
    model = bonded_statistics(positions, reference["bonds"], reference.get("angles") or [])
    comparison = compare_bonded_statistics(model, reference)
    comparison["source"] = reference.get("source")
    comparison["sound_bonds"] = _bonds_sound(comparison)
    return comparison


def _bonds_sound(comparison: dict | None) -> bool:
    if comparison is None:
        return True
    ratios = np.asarray(comparison["bond_width_ratio"], dtype=float)
    return bool(np.all(np.abs(ratios - 1.0) <= BOND_WIDTH_TOLERANCE))


# --------------------------------------------------------------------------------------------
# time-step check
# --------------------------------------------------------------------------------------------


@dataclass
class TimeStepResult:
    """What :func:`check_time_step` measured at one time step (temperatures in K, time in ps)."""

    time_step: float
    steps: int
    kinetic_temperature: float | None = None
    kinetic_temperature_error: float | None = None
    kinetic_temperature_min: float | None = None
    kinetic_temperature_max: float | None = None
    relative_deviation: float | None = None
    bonded: dict | None = None
    configurational_temperature: float | None = None
    blew_up: bool = False
    reason: str = ""
    wall_time: float = 0.0
    steps_per_second: float = 0.0
    sound: bool = False

    def row(self) -> list[str]:
        """The cells of :meth:`TimeStepReport.table`."""
        def span(low, high, digits):
            return "–" if low is None else f"{low:.{digits}f}–{high:.{digits}f}"

        if self.blew_up:
            return [f"{self.time_step * 1000:g}", f"blew up: {self.reason}"[:40], "–", "–", "–", "no"]
        bonded = self.bonded or {}
        kinetic = (
            f"{self.kinetic_temperature:.1f} ± {self.kinetic_temperature_error:.1f} "
            f"[{self.kinetic_temperature_min:.0f}–{self.kinetic_temperature_max:.0f}]"
        )
        configurational = "–" if self.configurational_temperature is None else f"{self.configurational_temperature:.1f}"
        return [
            f"{self.time_step * 1000:g}", kinetic,
            span(bonded.get("bond_width_ratio_min"), bonded.get("bond_width_ratio_max"), 3),
            span(bonded.get("angle_width_ratio_min"), bonded.get("angle_width_ratio_max"), 3),
            configurational, "yes" if self.sound else "no",
        ]


@dataclass
class TimeStepReport:
    """Soundness of Langevin dynamics of a force field over several time steps.

    Attributes
    ----------
    results
        One :class:`TimeStepResult` per time step, smallest first.
    temperature, friction, replicas, equilibration_time, production_time, platform, seed
        The settings of the check (K, 1/ps, ps).
    reference_source
        Where the data bond widths came from (``"data_statistics"``, ``"priors"`` or ``None``).
    date
        UTC time of the check (ISO 8601).
    """

    results: list[TimeStepResult]
    temperature: float
    friction: float
    replicas: int
    equilibration_time: float
    production_time: float
    platform: str
    seed: int
    reference_source: str | None = None
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    @property
    def largest_sound_time_step(self) -> float | None:
        """Largest step (ps) such that it and every smaller tested step are sound; None if none."""
        largest = None
        for result in sorted(self.results, key=lambda r: r.time_step):
            if not result.sound:
                break
            largest = result.time_step
        return largest

    def to_dict(self) -> dict:
        """JSON-able description (NaN written as ``None``)."""
        data = asdict(self)
        data["rows"] = data.pop("results")
        data["largest_sound_time_step"] = self.largest_sound_time_step
        data["temperature_tolerance"] = TEMPERATURE_TOLERANCE
        data["bond_width_tolerance"] = BOND_WIDTH_TOLERANCE
        return jsonable(data)

    def table(self) -> str:
        """Text table: time step | kinetic T | bond and angle width ratios | T_conf | sound."""
        header = ["step (fs)", "kinetic T (K) ± se [replicas]", "bond width ratio", "angle width ratio", "T_conf (K)", "sound"]
        rows = [header] + [result.row() for result in sorted(self.results, key=lambda r: r.time_step)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        largest = self.largest_sound_time_step
        lines.append(
            f"bath {self.temperature:g} K, {self.replicas} replicas, {self.production_time:g} ps each; largest sound "
            f"time step: {'none' if largest is None else f'{largest * 1000:g} fs'}"
        )
        return "\n".join(lines)


@dataclass
class _Settings:
    temperature: float
    friction: float
    replicas: int
    equilibration_time: float
    production_time: float
    sample_interval: float
    seed: int
    platform: Any
    properties: dict


class _Unstable(Exception):
    pass


def _starting_positions(positions: Any, n_beads: int, replicas: int) -> np.ndarray:
    array = np.asarray(strip_unit(positions, _nanometer()), dtype=np.float64)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (n_beads, 3) or array.shape[0] == 0:
        raise DiagnosticsError(f"starting positions must have shape (frames, {n_beads}, 3) in nm, got {array.shape}")
    if not np.isfinite(array).all():
        raise DiagnosticsError("starting positions contain NaN or infinite values")
    return array[np.arange(replicas) % len(array)]


def _advance(integrator: Any, context: Any, steps: int, interval: int, bar: Any, collect: bool):
    """Step in chunks of ``interval``; return positions and velocities at each chunk end if ``collect``."""
    import openmm
    import openmm.unit as u

    positions, velocities = [], []
    for done in range(0, steps, interval):
        chunk = min(interval, steps - done)
        try:
            integrator.step(chunk)
            state = context.getState(getPositions=True, getVelocities=True)
        except openmm.OpenMMException as error:
            raise _Unstable(" ".join(str(error).split())) from None
        x = state.getPositions(asNumpy=True).value_in_unit(u.nanometer)
        v = state.getVelocities(asNumpy=True).value_in_unit(u.nanometer / u.picosecond)
        if not (np.isfinite(x).all() and np.isfinite(v).all()):
            raise _Unstable(f"NaN positions or velocities after {done + chunk} steps")
        if collect:
            positions.append(np.array(x))
            velocities.append(np.array(v))
        bar.update(chunk)
    return positions, velocities


def _measure(time_step: float, system: Any, starts: np.ndarray, settings: _Settings, bar: Any):
    """Run one time step: equilibration then production; (positions, velocities) of production."""
    import openmm
    import openmm.unit as u

    integrator = openmm.LangevinMiddleIntegrator(
        settings.temperature * u.kelvin, settings.friction / u.picosecond, time_step * u.picosecond
    )
    integrator.setRandomNumberSeed(int(settings.seed) % (2**31 - 2) + 1)
    context = openmm.Context(system, integrator, settings.platform, settings.properties)
    try:
        context.setPositions(starts.reshape(-1, 3) * u.nanometer)
        context.setVelocitiesToTemperature(settings.temperature * u.kelvin, int(settings.seed) % (2**31 - 2) + 1)
        interval = max(1, round(settings.sample_interval / time_step))
        _advance(integrator, context, round(settings.equilibration_time / time_step), interval, bar, False)
        production = max(interval, interval * round(settings.production_time / time_step / interval))
        return _advance(integrator, context, production, interval, bar, True)
    finally:
        del context, integrator


def _steps_of(time_step: float, settings: _Settings) -> int:
    interval = max(1, round(settings.sample_interval / time_step))
    production = max(interval, interval * round(settings.production_time / time_step / interval))
    return round(settings.equilibration_time / time_step) + production


def _check_one(time_step, system, starts, settings, reference, energy_function, bar) -> TimeStepResult:
    """Measure one time step; a blow-up is recorded, not raised."""
    result = TimeStepResult(time_step=time_step, steps=_steps_of(time_step, settings))
    clock = time.perf_counter()
    try:
        positions, velocities = _measure(time_step, system, starts, settings, bar)
    except _Unstable as error:
        result.blew_up, result.reason = True, str(error)
        result.wall_time = time.perf_counter() - clock
        logger.info("time step %g fs: blew up (%s)", time_step * 1000, error)
        return result
    result.wall_time = time.perf_counter() - clock
    result.steps_per_second = result.steps / result.wall_time if result.wall_time > 0 else float("nan")
    masses = _masses(system)
    dof = degrees_of_freedom(system, settings.replicas)
    series = np.array([kinetic_temperatures(v, masses, dof) for v in velocities])
    summary = summarize_kinetic_temperatures(series, settings.temperature, dof, skip_fraction=0.0)
    result.kinetic_temperature, result.kinetic_temperature_error = summary.mean, summary.standard_error
    result.kinetic_temperature_min, result.kinetic_temperature_max = summary.replica_min, summary.replica_max
    result.relative_deviation = summary.relative_deviation
    frames = np.concatenate(positions).reshape(-1, starts.shape[1], 3)
    if reference is not None:
        result.bonded = compare_with_data(None, frames, reference)
    if energy_function is not None:
        result.configurational_temperature = _configurational_or_none(energy_function, frames)
    result.sound = bool(summary.sound and _bonds_sound(result.bonded))
    return result


def _masses(system: Any) -> np.ndarray:
    import openmm.unit as u

    return np.array([system.getParticleMass(i).value_in_unit(u.dalton) for i in range(system.getNumParticles())])


def _configurational_or_none(energy_function: Callable, frames: np.ndarray) -> float | None:
    chosen = frames[np.linspace(0, len(frames) - 1, min(CONFIGURATIONAL_FRAMES, len(frames))).astype(int)]
    try:
        return configurational_temperature(energy_function, chosen)
    except Exception as error:  # noqa: BLE001 - a diagnostic that cannot be computed is left out
        logger.warning("configurational temperature not computed: %s", " ".join(str(error).split())[:200])
        return None


def _validated_settings(force_field, time_steps, replicas, equilibration_time, production_time, temperature,
                        friction, sample_interval, seed, platform, platform_properties):
    import openmm.unit as u

    if temperature is None:
        temperature = force_field.temperature or 300.0
    steps = sorted({float(strip_unit(step, u.picosecond)) for step in time_steps})
    if not steps:
        raise DiagnosticsError("no time steps to check")
    for step in steps:
        temperature, friction, _ = validate_dynamics(temperature, friction, step)
    if int(replicas) < 1:
        raise DiagnosticsError(f"replicas must be ≥ 1, got {replicas}")
    production_time = float(strip_unit(production_time, u.picosecond))
    equilibration_time = float(strip_unit(equilibration_time, u.picosecond))
    if not production_time > 0 or not equilibration_time >= 0 or not sample_interval > 0:
        raise DiagnosticsError(
            f"production time ({production_time} ps) and sample interval ({sample_interval} ps) must be positive "
            f"and the equilibration time ({equilibration_time} ps) ≥ 0"
        )
    settings = _Settings(temperature, friction, int(replicas), equilibration_time, production_time,
                         float(sample_interval), int(seed), select_platform(platform), dict(platform_properties or {}))
    return steps, settings


def check_time_step(
    force_field: Any,
    positions: Any,
    time_steps: Sequence[float] = DEFAULT_TIME_STEPS,
    replicas: int = 32,
    equilibration_time: float = 2.0,
    production_time: float = 20.0,
    temperature: float | None = None,
    friction: float = 1.0,
    platform: str | None = None,
    seed: int = 0,
    progress: bool = True,
    *,
    configurational: bool = True,
    sample_interval: float = 0.02,
    platform_properties: dict[str, str] | None = None,
) -> TimeStepReport:
    """Find the time steps at which Langevin dynamics of a force field is sound.

    For each time step, ``replicas`` independent copies (one batched System from
    ``create_system(..., replicas=R)``) start from ``positions`` (cycled over the replicas),
    equilibrate for ``equilibration_time`` and run ``production_time`` (the same *times* at
    every step, so steps = time / Δt), sampled every ``sample_interval``. Measured: kinetic
    temperature (mean, standard error from the replica means, range of replica means), bond
    and angle width ratios model/data and bond mean shifts (:func:`compare_with_data`),
    configurational temperature, blow-ups (recorded, not raised), wall time and steps/s.
    A step is sound when |T_kin/T − 1| ≤ ``TEMPERATURE_TOLERANCE`` (2 %) and every bond width
    ratio lies in [0.9, 1.1]. The standard error of T_kin should be well below 2 % of T; give
    more replicas or a longer production time otherwise.

    Parameters
    ----------
    force_field
        A ``FlowMatchForceField`` or the path of an artifact.
    positions
        Starting CG positions ``(frames, beads, 3)`` or ``(beads, 3)`` in nm (e.g. all-atom
        frames mapped to beads).
    time_steps
        Time steps in ps, each in (0, 0.02].
    replicas
        Independent replicas R per time step.
    equilibration_time, production_time
        ps per replica and time step.
    temperature
        Bath temperature in K; default the artifact's training temperature.
    friction
        Langevin friction in 1/ps.
    platform
        OpenMM platform name; default CUDA > CPU > Reference.
    seed
        Seed of velocities and integrator (the same for every time step).
    progress
        Show a tqdm progress bar over all steps.
    configurational
        Compute the configurational temperature (network + priors, autograd) on up to 500
        production frames.
    sample_interval
        ps between samples of velocities and positions.
    platform_properties
        Passed to each Context (e.g. ``{"Threads": "1"}``).

    Returns
    -------
    TimeStepReport

    Raises
    ------
    SimulationError
        A time step ≤ 0 or > 0.02 ps, a temperature ≤ 0, a negative friction, replicas < 1 or
        starting positions of the wrong shape (:class:`DiagnosticsError` is a subclass).
    """
    from tqdm.auto import tqdm

    if isinstance(force_field, (str, Path)):
        from openmm_flowmatch.export import FlowMatchForceField

        force_field = FlowMatchForceField.load(force_field)
    steps, settings = _validated_settings(
        force_field, time_steps, replicas, equilibration_time, production_time, temperature, friction,
        sample_interval, seed, platform, platform_properties,
    )
    starts = _starting_positions(positions, force_field.n_beads, settings.replicas)
    topology = replicate_topology(force_field.mapping.cg_topology(), settings.replicas)
    system = force_field.create_system(topology, replicas=settings.replicas, platform_hint=settings.platform.getName())
    reference = reference_statistics(force_field)
    if reference is None:
        logger.warning("the force field has neither data statistics nor harmonic bond priors: bond widths are not checked")
    energy_function = model_energy_function(force_field) if configurational else None
    total = sum(_steps_of(step, settings) for step in steps)
    with tqdm(total=total, unit="step", desc="check-time-step", disable=not progress) as bar:
        results = [_check_one(step, system, starts, settings, reference, energy_function, bar) for step in steps]
    report = TimeStepReport(
        results=results, temperature=settings.temperature, friction=settings.friction, replicas=settings.replicas,
        equilibration_time=settings.equilibration_time, production_time=settings.production_time,
        platform=settings.platform.getName(), seed=settings.seed,
        reference_source=None if reference is None else reference.get("source"),
    )
    _warn_if_imprecise(results, settings.temperature)
    logger.info("time-step check:\n%s", report.table())
    return report


def _warn_if_imprecise(results: list[TimeStepResult], temperature: float) -> None:
    for result in results:
        error = result.kinetic_temperature_error
        if error is not None and error > 0.5 * TEMPERATURE_TOLERANCE * temperature:
            logger.warning(
                "time step %g fs: the kinetic temperature's standard error (%.1f K) is more than half the tolerance; "
                "use more replicas or a longer production time", result.time_step * 1000, error,
            )


def record_sound_time_step(artifact_path: str | Path, report: TimeStepReport) -> dict:
    """Store a time-step check in an artifact's metadata (entry ``"time_step_check"``).

    The entry holds ``largest_sound_time_step`` (ps or ``None``), the table ``rows``, ``date``,
    ``platform``, ``replicas``, ``temperature``, ``production_time`` and ``package_version``;
    ``FlowMatchForceField.sound_time_step`` reads it back. The network and the rest of the
    metadata are kept; the file is replaced atomically.

    Returns
    -------
    dict
        The stored entry.
    """
    from openmm_flowmatch import __version__
    from openmm_flowmatch.export import update_artifact_metadata

    data = report.to_dict()
    entry = {
        "largest_sound_time_step": data["largest_sound_time_step"],
        "rows": data["rows"],
        "date": data["date"],
        "platform": data["platform"],
        "replicas": data["replicas"],
        "temperature": data["temperature"],
        "friction": data["friction"],
        "production_time": data["production_time"],
        "temperature_tolerance": TEMPERATURE_TOLERANCE,
        "bond_width_tolerance": BOND_WIDTH_TOLERANCE,
        "package_version": __version__,
    }
    update_artifact_metadata(artifact_path, {"time_step_check": entry})
    return entry
