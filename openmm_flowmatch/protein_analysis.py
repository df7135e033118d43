"""Protein metrics for Cα models: folding, transitions, contacts, TICA and 1-D histograms.

Everything here works on arrays of bead positions ``(frames, beads, 3)`` in nm (or
``mdtraj.Trajectory`` objects), never on models, and reuses :mod:`openmm_flowmatch.analysis`
(TICA, histograms and divergences with the DESIGN.md conventions), mdtraj and deeptime.

Definitions (the defaults were read off the chignolin CLN025 reference data at 340 K, 2 × 8500
frames every 2 ps; docs/proteins.md):

* RMSD: Cα RMSD to the native structure after optimal superposition
  (:func:`openmm_flowmatch.analysis.rmsd_to_native`, equal to ``mdtraj.rmsd``).
* Folded: RMSD below :data:`FOLDED_THRESHOLD_NM` (0.15 nm), the dip of the data's RMSD histogram
  between the folded basin (0.02–0.14 nm) and the misfolded/unfolded states (0.2–0.55 nm).
* Transitions: counted core to core with hysteresis. The folded core is RMSD <
  :data:`FOLDED_CORE_NM` (0.1 nm), the unfolded core RMSD > :data:`UNFOLDED_CORE_NM` (0.3 nm);
  a folding event is leaving the unfolded core and next entering the folded core, an unfolding
  event the reverse. Excursions into the transition region that return to the core they left
  do not count.
* Contact: Cα–Cα distance below :data:`CONTACT_CUTOFF_NM` (0.8 nm, the usual Cα contact cutoff
  for coarse-grained folding analyses).
* TICA: pairwise Cα distances, lag :data:`TICA_LAG_FRAMES` (100 frames), fitted on the reference,
  free energies on the first two components with the DESIGN.md metrics.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from openmm_flowmatch import analysis
from openmm_flowmatch.analysis import AnalysisError

logger = logging.getLogger(__name__)

__all__ = [
    "CONTACT_CUTOFF_NM",
    "FOLDED_CORE_NM",
    "FOLDED_THRESHOLD_NM",
    "TICA_LAG_FRAMES",
    "UNFOLDED_CORE_NM",
    "NativeStructure",
    "check_same_protein",
    "compare_proteins",
    "contact_map",
    "contact_map_difference",
    "count_transitions",
    "fraction_folded",
    "histogram_comparison",
    "load_native",
    "plot_protein_comparison",
    "radius_of_gyration",
]

FOLDED_THRESHOLD_NM: float = 0.15
"""RMSD (nm) below which a frame counts as folded: the dip of the chignolin data's RMSD histogram."""

FOLDED_CORE_NM: float = 0.1
"""RMSD (nm) below which a frame is in the folded core (transition counting)."""

UNFOLDED_CORE_NM: float = 0.3
"""RMSD (nm) above which a frame is in the unfolded core (transition counting)."""

CONTACT_CUTOFF_NM: float = 0.8
"""Cα–Cα distance (nm) below which two beads are in contact."""

TICA_LAG_FRAMES: int = 100
"""TICA lag time in frames (DESIGN.md, *Metrics*)."""

CONTACT_MIN_SEPARATION: int = 3
"""Contact-map summaries use bead pairs at least this far apart in sequence: pairs i, i+1 and
i, i+2 are closer than 0.8 nm in every frame (two Cα–Cα bonds of 0.38 nm), so they carry no
information and would only dilute the mean."""


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


class NativeStructure:
    """Cα positions and residue names of a native structure.

    Attributes
    ----------
    positions
        ``(beads, 3)`` nm.
    residue_names
        One name per bead, or ``None`` when the structure came as a bare array.
    source
        Where it came from (file name or ``"array"``), for messages.
    """

    def __init__(self, positions: np.ndarray, residue_names: Sequence[str] | None, source: str) -> None:
        self.positions = np.asarray(positions, dtype=np.float64)
        self.residue_names = None if residue_names is None else [str(name) for name in residue_names]
        self.source = source

    @property
    def n_beads(self) -> int:
        """Number of beads."""
        return int(self.positions.shape[0])

    def describe(self) -> str:
        """``"<source> (10 beads: TYR TYR ASP …)"``."""
        names = f": {' '.join(self.residue_names)}" if self.residue_names else ""
        return f"the native structure {self.source} ({self.n_beads} beads{names})"


def _is_coarse_grained(topology: Any, n_beads: int | None) -> bool:
    """One atom per bead already: the bead count asked for, one atom per residue, or Cα atoms only."""
    if n_beads is not None and topology.n_atoms == int(n_beads):
        return True
    return topology.n_atoms == topology.n_residues or topology.n_atoms == len(topology.select("name CA"))


def _alpha_carbon_structure(trajectory: Any, source: str, n_beads: int | None) -> NativeStructure:
    """Beads of an mdtraj Trajectory: CG structures taken as they are, all-atom ones mapped to Cα."""
    from openmm_flowmatch.mapping import CGMapping, MappingError

    topology = trajectory.topology
    if _is_coarse_grained(topology, n_beads):
        residue_names = [atom.residue.name for atom in topology.atoms]
        return NativeStructure(trajectory.xyz[0], residue_names, source)
    try:
        mapping = CGMapping.alpha_carbons(trajectory)
    except MappingError as error:
        raise AnalysisError(f"{source}: {error}") from error
    return NativeStructure(mapping.map_positions(trajectory.xyz[:1])[0], mapping.residue_names, source)


def load_native(native: Any, n_beads: int | None = None) -> NativeStructure:
    """The native structure as CG beads (Cα for an all-atom structure).

    Parameters
    ----------
    native
        A PDB (or any structure file mdtraj reads), all-atom (mapped with
        :meth:`CGMapping.alpha_carbons <openmm_flowmatch.mapping.CGMapping.alpha_carbons>`) or
        CG (one atom per bead); an ``mdtraj.Trajectory`` (first frame); a
        :class:`NativeStructure`; or an array ``(beads, 3)`` / ``(1, beads, 3)`` in nm.
    n_beads
        Bead count of the trajectories to compare with: a structure with exactly this many atoms
        is taken as CG as it is (e.g. the ``topology.pdb`` a simulation writes).

    Raises
    ------
    AnalysisError
        If the file is missing or unreadable, or an all-atom structure has no Cα map (a residue
        without CA, a chain break).
    """
    if isinstance(native, NativeStructure):
        return native
    if isinstance(native, (str, os.PathLike)):
        import mdtraj

        path = Path(native)
        if not path.is_file():
            raise AnalysisError(f"native structure {str(path)!r} does not exist")
        try:
            trajectory = mdtraj.load(str(path), frame=0)
        except Exception as error:  # mdtraj raises many types for unreadable files
            raise AnalysisError(f"cannot read the native structure {str(path)!r} ({error})") from error
        return _alpha_carbon_structure(trajectory, repr(path.name), n_beads)
    if hasattr(native, "xyz") and hasattr(native, "topology"):
        return _alpha_carbon_structure(native, "(trajectory)", n_beads)
    return NativeStructure(_as_positions(native)[0], None, "(array)")


def _as_positions(positions: Any) -> np.ndarray:
    """Float64 ``(frames, beads, 3)``; accepts an mdtraj Trajectory (analysis' convention)."""
    return analysis._as_positions(positions)


def _residue_names_of(trajectory: Any) -> list[str] | None:
    """Per-bead residue names of an mdtraj Trajectory, ``None`` for a bare array."""
    topology = getattr(trajectory, "topology", None)
    if topology is None or not hasattr(topology, "atoms"):
        return None
    return [atom.residue.name for atom in topology.atoms]


def _as_replicas(trajectories: Any) -> list[Any]:
    """A list of trajectories (replicas) from one trajectory or a sequence of them."""
    if isinstance(trajectories, (list, tuple)):
        if not trajectories:
            raise AnalysisError("no trajectories given (an empty list)")
        return list(trajectories)
    return [trajectories]


def check_same_protein(trajectory: Any, native: Any, what: str = "the trajectory") -> None:
    """Refuse a trajectory of another protein than the native structure.

    Parameters
    ----------
    trajectory
        ``(frames, beads, 3)`` array (bead count checked) or ``mdtraj.Trajectory`` (bead count
        and residue names checked).
    native
        Anything :func:`load_native` takes.
    what
        How the message names the trajectory.

    Raises
    ------
    AnalysisError
        One line naming both: bead counts or residue names differ.
    """
    positions = _as_positions(trajectory)
    structure = load_native(native, positions.shape[1])
    names = _residue_names_of(trajectory)
    described = f"{what} ({positions.shape[1]} beads{': ' + ' '.join(names) if names else ''})"
    if positions.shape[1] != structure.n_beads:
        raise AnalysisError(
            f"{described} has another bead count than {structure.describe()}; analyse trajectories of the "
            "protein of the native structure, mapped with the same CG map"
        )
    if names is not None and structure.residue_names is not None and names != structure.residue_names:
        first = next(index for index, (a, b) in enumerate(zip(names, structure.residue_names)) if a != b)
        raise AnalysisError(
            f"{described} differs from {structure.describe()} in its residue names (first at bead {first}: "
            f"{names[first]} vs {structure.residue_names[first]}); analyse trajectories of the same protein"
        )


# --------------------------------------------------------------------------------------------
# per-frame observables
# --------------------------------------------------------------------------------------------


def radius_of_gyration(positions: Any, masses: Sequence[float] | None = None) -> np.ndarray:
    """Radius of gyration (nm) of every frame.

    Rg² = Σ mᵢ |xᵢ − x_c|² / Σ mᵢ with x_c the (mass-weighted) centre; equal weights by default,
    as ``mdtraj.compute_rg`` (for Cα beads the residue masses are rarely what one wants).

    Parameters
    ----------
    positions
        ``(frames, beads, 3)`` or ``(beads, 3)`` in nm, or an ``mdtraj.Trajectory``.
    masses
        ``(beads,)`` weights (amu); ``None`` for equal weights.

    Returns
    -------
    numpy.ndarray
        ``(frames,)`` in nm.
    """
    x = _as_positions(positions)
    weights = np.ones(x.shape[1]) if masses is None else np.asarray(masses, dtype=np.float64).reshape(-1)
    if weights.shape != (x.shape[1],) or np.any(weights < 0) or weights.sum() <= 0:
        raise AnalysisError(f"masses must be {x.shape[1]} non-negative numbers with a positive sum, got {weights.shape}")
    weights = weights / weights.sum()
    centre = np.einsum("b,fbi->fi", weights, x)
    squared = np.einsum("b,fb->f", weights, ((x - centre[:, None]) ** 2).sum(axis=-1))
    return np.sqrt(squared)


def _rmsd_series(rmsd: Any) -> np.ndarray:
    values = np.asarray(rmsd, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise AnalysisError("the RMSD series is empty")
    if not np.isfinite(values).all():
        raise AnalysisError("the RMSD series contains NaN or infinite values")
    return values


def fraction_folded(rmsd: Any, threshold: float = FOLDED_THRESHOLD_NM) -> float:
    """Fraction of frames with RMSD to the native structure below ``threshold``.

    Parameters
    ----------
    rmsd
        RMSD values in nm (one array, or a list of replicas: all frames pooled).
    threshold
        nm. The default 0.15 nm is the dip of the chignolin CLN025 reference's RMSD histogram,
        between its folded basin (0.02–0.14 nm) and its misfolded and unfolded states
        (0.2–0.55 nm); 17 % of the reference frames lie below it. Read the dip off your own
        protein's histogram before reusing it.

    Returns
    -------
    float
        In [0, 1].
    """
    series = [_rmsd_series(values) for values in _rmsd_replicas(rmsd)]
    pooled = np.concatenate(series)
    return float(np.mean(pooled < float(threshold)))


def _rmsd_replicas(rmsd: Any) -> list[Any]:
    """A list of 1-D series: a list/tuple stays, a 2-D array is replicas × frames, 1-D is one replica."""
    if isinstance(rmsd, (list, tuple)) and rmsd and np.ndim(rmsd[0]) >= 1:
        return list(rmsd)
    array = np.asarray(rmsd, dtype=np.float64)
    return list(array) if array.ndim == 2 else [array]


def _core_states(rmsd: np.ndarray, folded_below: float, unfolded_above: float) -> np.ndarray:
    """+1 in the folded core, −1 in the unfolded core, 0 in between."""
    states = np.zeros(rmsd.shape, dtype=int)
    states[rmsd < folded_below] = 1
    states[rmsd > unfolded_above] = -1
    return states


def _events_of_replica(rmsd: np.ndarray, folded_below: float, unfolded_above: float) -> tuple[int, int]:
    """(folding, unfolding) events of one series, core to core."""
    cores = _core_states(rmsd, folded_below, unfolded_above)
    visited = cores[cores != 0]
    if visited.size < 2:
        return 0, 0
    changes = np.diff(visited)
    return int(np.sum(changes > 0)), int(np.sum(changes < 0))


def count_transitions(
    rmsd: Any,
    frame_interval_ps: float | None,
    folded_below: float = FOLDED_CORE_NM,
    unfolded_above: float = UNFOLDED_CORE_NM,
) -> dict[str, Any]:
    """Folding and unfolding events, counted core to core with hysteresis.

    A frame is in the folded core when RMSD < ``folded_below`` and in the unfolded core when
    RMSD > ``unfolded_above``. A folding event is leaving the unfolded core and next entering the
    folded core; an unfolding event the reverse. A dip into the transition region that returns
    to the core it left is no event, and neither is the first core a replica reaches.

    Parameters
    ----------
    rmsd
        RMSD to the native structure in nm: one series, or a list of replicas (a 2-D array is
        replicas × frames). Events are counted within each replica, times are summed.
    frame_interval_ps
        Time between frames in ps; ``None`` when unknown (then the time and the rates are
        ``None``).
    folded_below, unfolded_above
        Core boundaries in nm (defaults from the chignolin data: its folded basin reaches
        0.14 nm, its unfolded states start at 0.2 nm).

    Returns
    -------
    dict
        ``folding_events``, ``unfolding_events``, ``transitions`` (their sum), per replica lists
        ``folding_events_per_replica`` and ``unfolding_events_per_replica``, ``simulated_time_us``
        (frames × interval, summed over replicas), ``folding_per_us``, ``unfolding_per_us``,
        ``transitions_per_us``, and the settings.
    """
    if frame_interval_ps is not None and not float(frame_interval_ps) > 0:
        raise AnalysisError(f"frame_interval_ps must be positive, got {frame_interval_ps}")
    if not 0 < float(folded_below) < float(unfolded_above):
        raise AnalysisError(
            f"the folded core must lie below the unfolded core: folded_below {folded_below} nm, "
            f"unfolded_above {unfolded_above} nm"
        )
    series = [_rmsd_series(values) for values in _rmsd_replicas(rmsd)]
    events = [_events_of_replica(values, float(folded_below), float(unfolded_above)) for values in series]
    folding = [pair[0] for pair in events]
    unfolding = [pair[1] for pair in events]
    frames = sum(values.size for values in series)
    time_us = None if frame_interval_ps is None else frames * float(frame_interval_ps) * 1e-6
    rate = (lambda count: None) if time_us is None else (lambda count: count / time_us)  # noqa: E731
    return {
        "folding_events": int(sum(folding)),
        "unfolding_events": int(sum(unfolding)),
        "transitions": int(sum(folding) + sum(unfolding)),
        "folding_events_per_replica": folding,
        "unfolding_events_per_replica": unfolding,
        "replicas": len(series),
        "frames": int(frames),
        "simulated_time_us": time_us,
        "folding_per_us": rate(sum(folding)),
        "unfolding_per_us": rate(sum(unfolding)),
        "transitions_per_us": rate(sum(folding) + sum(unfolding)),
        "folded_below_nm": float(folded_below),
        "unfolded_above_nm": float(unfolded_above),
        "frame_interval_ps": None if frame_interval_ps is None else float(frame_interval_ps),
    }


# --------------------------------------------------------------------------------------------
# contacts and histograms
# --------------------------------------------------------------------------------------------


def contact_map(positions: Any, cutoff: float = CONTACT_CUTOFF_NM) -> np.ndarray:
    """Fraction of frames in which each bead pair is closer than ``cutoff``.

    Parameters
    ----------
    positions
        ``(frames, beads, 3)`` in nm, an ``mdtraj.Trajectory``, or a list of them (replicas,
        frames pooled).
    cutoff
        nm; default 0.8 nm, the usual Cα–Cα contact cutoff of coarse-grained folding analyses
        (wide enough for the side chains of two residues in contact to sit between their Cα).

    Returns
    -------
    numpy.ndarray
        ``(beads, beads)`` symmetric, in [0, 1]; the diagonal is 1 (a bead is at distance 0 of
        itself).
    """
    arrays = [_as_positions(item) for item in _as_replicas(positions)]
    if len({array.shape[1] for array in arrays}) != 1:
        raise AnalysisError(f"replicas differ in bead count: {sorted({array.shape[1] for array in arrays})}")
    counts = np.zeros((arrays[0].shape[1],) * 2)
    for x in arrays:
        distances = np.linalg.norm(x[:, :, None, :] - x[:, None, :, :], axis=-1)
        counts += np.sum(distances < float(cutoff), axis=0)
    return counts / sum(array.shape[0] for array in arrays)


def contact_map_difference(model: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Model contact map minus reference contact map (both from :func:`contact_map`).

    Returns
    -------
    numpy.ndarray
        ``(beads, beads)`` in [−1, 1]; positive where the model forms a contact more often.
    """
    model, reference = np.asarray(model, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if model.shape != reference.shape or model.ndim != 2 or model.shape[0] != model.shape[1]:
        raise AnalysisError(f"contact maps must be square and of one shape, got {model.shape} and {reference.shape}")
    return model - reference


def _contact_summary(difference: np.ndarray, min_separation: int = CONTACT_MIN_SEPARATION) -> dict[str, float]:
    first, second = np.triu_indices(difference.shape[0], k=int(min_separation))
    values = np.abs(difference[first, second])
    if values.size == 0:
        return {"max_abs": float("nan"), "mean_abs": float("nan"), "min_separation": int(min_separation)}
    return {"max_abs": float(values.max()), "mean_abs": float(values.mean()), "min_separation": int(min_separation)}


def histogram_comparison(
    reference_values: Any,
    model_values: Any,
    bins: int = 60,
    value_range: tuple[float, float] | None = None,
    temperature: float | None = None,
) -> dict[str, Any]:
    """Histograms of a 1-D observable (RMSD, Rg, …) and the DESIGN.md divergences between them.

    Model values outside ``value_range`` go into the border bins (as for TICA in
    :func:`openmm_flowmatch.analysis.compare_tica`), so leaving the reference region counts
    against the model; reference values outside it are dropped.

    Parameters
    ----------
    reference_values, model_values
        Samples (arrays or lists of arrays, pooled).
    bins
        Number of bins.
    value_range
        ``(low, high)``; default the smallest and largest value of both sets together.
    temperature
        K; when given, the 1-D FES MSE ((kcal/mol)², DESIGN.md convention) is added.

    Returns
    -------
    dict
        ``js_divergence`` (natural log), ``kl_divergence`` (KL(reference ‖ model), 1e-10 in empty
        bins), ``reference_mean``, ``model_mean``, ``edges``, ``reference`` and ``model``
        probabilities, and ``fes_mse`` when ``temperature`` is given.
    """
    reference = _pooled_values(reference_values, "reference")
    model = _pooled_values(model_values, "model")
    if value_range is None:
        low = float(min(reference.min(), model.min()))
        high = float(max(reference.max(), model.max()))
        value_range = (low, high if high > low else low + 1.0)
    edges = np.linspace(float(value_range[0]), float(value_range[1]), int(bins) + 1)
    reference_counts, _ = np.histogram(reference, edges)
    model_counts, _ = np.histogram(np.clip(model, edges[0], edges[-1]), edges)
    if reference_counts.sum() == 0:
        raise AnalysisError(f"no reference value lies in the histogram range {tuple(value_range)}")
    result: dict[str, Any] = {
        "js_divergence": analysis.js_divergence(reference_counts, model_counts),
        "kl_divergence": analysis.kl_divergence(reference_counts, model_counts),
        "reference_mean": float(reference.mean()),
        "model_mean": float(model.mean()),
        "edges": edges,
        "reference": reference_counts / reference_counts.sum(),
        "model": model_counts / model_counts.sum(),
    }
    if temperature is not None:
        result["fes_mse"] = analysis.fes_mse(reference_counts, model_counts, temperature)
    return result


def _pooled_values(values: Any, what: str) -> np.ndarray:
    arrays = values if isinstance(values, (list, tuple)) else [values]
    pooled = np.concatenate([np.asarray(array, dtype=np.float64).reshape(-1) for array in arrays]) if arrays else np.zeros(0)
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        raise AnalysisError(f"no finite {what} values to histogram")
    return pooled


# --------------------------------------------------------------------------------------------
# reference against model
# --------------------------------------------------------------------------------------------


def _observables(trajectories: list[np.ndarray], native: NativeStructure) -> dict[str, list[np.ndarray]]:
    return {
        "rmsd": [analysis.rmsd_to_native(x, native.positions) for x in trajectories],
        "radius_of_gyration": [radius_of_gyration(x) for x in trajectories],
    }


def _bead_count(trajectories: Any) -> int:
    """Bead count of the first trajectory of a trajectory or list of replicas."""
    return int(_as_positions(_as_replicas(trajectories)[0]).shape[1])


def _checked_replicas(trajectories: Any, native: NativeStructure, what: str) -> list[np.ndarray]:
    replicas = _as_replicas(trajectories)
    for index, replica in enumerate(replicas):
        name = what if len(replicas) == 1 else f"{what} replica {index}"
        check_same_protein(replica, native, name)
    return [_as_positions(replica) for replica in replicas]


def compare_proteins(
    reference: Any,
    model: Any,
    native: Any,
    temperature: float,
    lag: int = TICA_LAG_FRAMES,
    frame_interval_ps: float | None = None,
    model_frame_interval_ps: float | None = None,
    bins: int = 60,
    folded_threshold: float = FOLDED_THRESHOLD_NM,
    contact_cutoff: float = CONTACT_CUTOFF_NM,
    reference_frame_interval_ps: float | None = None,
) -> dict[str, Any]:
    """All protein metrics of a model against a reference, as plain numbers.

    Parameters
    ----------
    reference, model
        ``(frames, beads, 3)`` Cα positions in nm or ``mdtraj.Trajectory``, or lists of them
        (replicas: kept apart for TICA's lagged pairs and for transition counting).
    native
        The native structure (anything :func:`load_native` takes).
    temperature
        K, for the free energies.
    lag
        TICA lag in reference frames (DESIGN.md: 100).
    frame_interval_ps
        Time between reference frames (ps; the chignolin data saves every 2 ps). ``None``: the
        transition counts come without times and rates.
    model_frame_interval_ps
        Time between model frames (ps); default ``frame_interval_ps``.
    bins
        Bins per axis of the TICA surfaces and of the RMSD and Rg histograms.
    folded_threshold
        RMSD (nm) below which a frame counts as folded.
    contact_cutoff
        Cα–Cα contact distance (nm).
    reference_frame_interval_ps
        Another name of ``frame_interval_ps`` (give one of the two).

    Returns
    -------
    dict
        ``tica`` (``fes_mse``, ``js_divergence``, ``kl_divergence``, ``bins_compared``, …, of the
        first two TICA components), ``rmsd`` and ``radius_of_gyration`` (1-D histogram metrics
        of :func:`histogram_comparison`, without the arrays), ``fraction_folded``
        (``reference``, ``model``, ``threshold_nm``), ``contact_map_difference`` (``max_abs``,
        ``mean_abs`` over pairs ≥ 3 apart in sequence), ``distance_histograms_mean_js``, and
        ``transitions`` (``reference``, ``model``: :func:`count_transitions`).

    Raises
    ------
    AnalysisError
        If a trajectory is of another protein than ``native`` (bead count or residue names),
        or the reference is shorter than the TICA lag.
    """
    frame_interval_ps = _reference_interval(frame_interval_ps, reference_frame_interval_ps)
    structure = load_native(native, _bead_count(reference))
    reference_list = _checked_replicas(reference, structure, "the reference")
    model_list = _checked_replicas(model, structure, "the model")
    model_interval = frame_interval_ps if model_frame_interval_ps is None else model_frame_interval_ps
    tica = analysis.compare_tica(reference_list, model_list, lag=lag, temperature=temperature, bins=bins)
    reference_observables = _observables(reference_list, structure)
    model_observables = _observables(model_list, structure)
    result: dict[str, Any] = {"tica": dict(tica.metrics, lag_frames=int(lag))}
    for name in ("rmsd", "radius_of_gyration"):
        comparison = histogram_comparison(reference_observables[name], model_observables[name], bins, None, temperature)
        result[name] = {key: value for key, value in comparison.items() if key not in ("edges", "reference", "model")}
    result["fraction_folded"] = {
        "reference": fraction_folded(reference_observables["rmsd"], folded_threshold),
        "model": fraction_folded(model_observables["rmsd"], folded_threshold),
        "threshold_nm": float(folded_threshold),
    }
    difference = contact_map_difference(
        contact_map(model_list, contact_cutoff), contact_map(reference_list, contact_cutoff)
    )
    result["contact_map_difference"] = dict(_contact_summary(difference), cutoff_nm=float(contact_cutoff))
    result["distance_histograms_mean_js"] = analysis.distance_histograms(
        np.concatenate(reference_list), np.concatenate(model_list)
    )["mean_js_divergence"]
    result["transitions"] = {
        "reference": count_transitions(reference_observables["rmsd"], frame_interval_ps),
        "model": count_transitions(model_observables["rmsd"], model_interval),
    }
    _log_summary(result)
    return result


def _reference_interval(frame_interval_ps: float | None, reference_frame_interval_ps: float | None) -> float | None:
    """The reference frame interval given under either name."""
    if frame_interval_ps is not None and reference_frame_interval_ps is not None:
        if float(frame_interval_ps) != float(reference_frame_interval_ps):
            raise AnalysisError(
                f"frame_interval_ps ({frame_interval_ps}) and reference_frame_interval_ps ({reference_frame_interval_ps}) "
                "name the same setting; give one"
            )
    return frame_interval_ps if frame_interval_ps is not None else reference_frame_interval_ps


def _log_summary(result: dict[str, Any]) -> None:
    logger.info(
        "TICA JS %.4f, FES MSE %.3f (kcal/mol)²; folded %.3f (model) vs %.3f (reference); RMSD JS %.4f, Rg JS %.4f; "
        "contact map |Δ| max %.3f mean %.3f; transitions %d (model) vs %d (reference)",
        result["tica"]["js_divergence"], result["tica"]["fes_mse"], result["fraction_folded"]["model"],
        result["fraction_folded"]["reference"], result["rmsd"]["js_divergence"],
        result["radius_of_gyration"]["js_divergence"], result["contact_map_difference"]["max_abs"],
        result["contact_map_difference"]["mean_abs"], result["transitions"]["model"]["transitions"],
        result["transitions"]["reference"]["transitions"],
    )


# --------------------------------------------------------------------------------------------
# figure
# --------------------------------------------------------------------------------------------


def _labelled_models(models: Any, label: str) -> dict[str, Any]:
    if isinstance(models, Mapping):
        if not models:
            raise AnalysisError("no models given (an empty mapping)")
        return dict(models)
    return {str(label): models}


def _plot_surface(axis: Any, surface: Any, title: str, max_free_energy: float) -> Any:
    extent = [surface.x_edges[0], surface.x_edges[-1], surface.y_edges[0], surface.y_edges[-1]]
    shown = np.where(np.isfinite(surface.free_energy), surface.free_energy, np.nan)
    image = axis.imshow(
        shown.T, origin="lower", extent=extent, aspect="auto", cmap="viridis", vmin=0.0,
        vmax=max_free_energy, interpolation="nearest",
    )
    axis.set_title(title, fontsize=9)
    axis.set_xlabel("TIC 1")
    axis.set_ylabel("TIC 2")
    return image


def _plot_histograms(axis: Any, values: dict[str, list[np.ndarray]], xlabel: str, bins: int) -> None:
    low = min(float(np.min(array)) for arrays in values.values() for array in arrays)
    high = max(float(np.max(array)) for arrays in values.values() for array in arrays)
    edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
    for label, arrays in values.items():
        counts, _ = np.histogram(np.concatenate(arrays), edges, density=True)
        axis.step(edges[:-1], counts, where="post", label=label)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("density")
    axis.legend(fontsize=8)


def plot_protein_comparison(
    reference: Any,
    models: Any,
    native: Any,
    path: str | Path,
    temperature: float,
    lag: int = TICA_LAG_FRAMES,
    frame_interval_ps: float | None = None,
    model_frame_interval_ps: float | None = None,
    bins: int = 60,
    replicas_shown: int = 3,
    contact_cutoff: float = CONTACT_CUTOFF_NM,
    max_free_energy: float = 8.0,
    label: str = "model",
    reference_frame_interval_ps: float | None = None,
) -> Path:
    """One PNG: TICA free energies (reference and each model), RMSD and Rg histograms, the
    contact-map difference of the first model, and RMSD time series of a few replicas.

    Parameters
    ----------
    reference
        Reference trajectory or list of replicas (as for :func:`compare_proteins`).
    models
        One model (trajectory or list of replicas), or a mapping label → model.
    native
        Native structure (:func:`load_native`).
    path
        Output PNG.
    temperature, lag, frame_interval_ps, model_frame_interval_ps, bins, contact_cutoff
        As for :func:`compare_proteins`.
    replicas_shown
        RMSD time series drawn per data set.
    max_free_energy
        Top of the free-energy colour scale (kcal/mol).
    label
        Name of the model when ``models`` is a single model.
    reference_frame_interval_ps
        Another name of ``frame_interval_ps``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame_interval_ps = _reference_interval(frame_interval_ps, reference_frame_interval_ps)
    structure = load_native(native, _bead_count(reference))
    reference_list = _checked_replicas(reference, structure, "the reference")
    labelled = _labelled_models(models, label)
    model_lists = {name: _checked_replicas(item, structure, f"model {name!r}") for name, item in labelled.items()}
    model_interval = frame_interval_ps if model_frame_interval_ps is None else model_frame_interval_ps
    surfaces = {name: analysis.compare_tica(reference_list, item, lag, temperature, bins) for name, item in model_lists.items()}
    sets = {"reference": reference_list, **model_lists}
    observables = {name: _observables(item, structure) for name, item in sets.items()}

    columns = max(4, 1 + len(model_lists))
    figure, axes = plt.subplots(2, columns, figsize=(4.3 * columns, 8.0), constrained_layout=True, squeeze=False)
    first_surface = next(iter(surfaces.values()))
    reference_title = f"reference ({first_surface.reference.n_samples} frames)"
    image = _plot_surface(axes[0, 0], first_surface.reference, reference_title, max_free_energy)
    for column, (name, comparison) in enumerate(surfaces.items(), start=1):
        title = f"{name}: JS {comparison.metrics['js_divergence']:.3f}, MSE {comparison.metrics['fes_mse']:.2f}"
        image = _plot_surface(axes[0, column], comparison.model, title, max_free_energy)
    figure.colorbar(image, ax=axes[0, : 1 + len(surfaces)].tolist(), label="F (kcal/mol)")
    for column in range(1 + len(surfaces), columns):
        axes[0, column].axis("off")

    _plot_histograms(axes[1, 0], {name: item["rmsd"] for name, item in observables.items()}, "Cα RMSD to native (nm)", bins)
    axes[1, 0].axvline(FOLDED_THRESHOLD_NM, color="grey", linestyle=":", linewidth=1)
    _plot_histograms(axes[1, 1], {name: item["radius_of_gyration"] for name, item in observables.items()}, "Rg (nm)", bins)
    first_label, first_model = next(iter(model_lists.items()))
    difference = contact_map_difference(contact_map(first_model, contact_cutoff), contact_map(reference_list, contact_cutoff))
    contact_image = axes[1, 2].imshow(difference, cmap="RdBu_r", vmin=-1.0, vmax=1.0, origin="lower")
    axes[1, 2].set_title(f"contacts < {contact_cutoff:g} nm: {first_label} − reference", fontsize=9)
    axes[1, 2].set_xlabel("bead")
    axes[1, 2].set_ylabel("bead")
    figure.colorbar(contact_image, ax=axes[1, 2], label="Δ contact fraction")
    _plot_time_series(axes[1, 3], observables, frame_interval_ps, model_interval, replicas_shown)
    for column in range(4, columns):
        axes[1, column].axis("off")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_time_series(
    axis: Any,
    observables: dict[str, dict[str, list[np.ndarray]]],
    frame_interval_ps: float | None,
    model_interval_ps: float | None,
    replicas_shown: int,
) -> None:
    known = frame_interval_ps is not None and model_interval_ps is not None
    for label, item in observables.items():
        interval = frame_interval_ps if label == "reference" else model_interval_ps
        for index, series in enumerate(item["rmsd"][:replicas_shown]):
            time = np.arange(series.size) * (interval * 1e-3 if known else 1.0)
            axis.plot(time, series, linewidth=0.5, label=f"{label} {index}")
    axis.axhline(FOLDED_THRESHOLD_NM, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("time (ns)" if known else "frame")
    axis.set_ylabel("Cα RMSD (nm)")
    axis.legend(fontsize=7)
