"""Analysis of CG trajectories: dihedral and TICA free energies, divergences, plots.

Everything here works on plain arrays (positions ``(frames, beads, 3)`` in nm) or
``mdtraj.Trajectory`` objects, never on models. The metrics follow DESIGN.md exactly, so that
numbers compare across runs:

* φ/ψ: a 60×60 histogram on [−π, π)², density p; free energy F = −kT ln p in kcal/mol shifted
  so that its minimum is 0.
* FES MSE in (kcal/mol)² over the bins where both densities are non-zero and the reference
  F ≤ 5 kcal/mol, after subtracting the mean difference over those bins.
* Jensen–Shannon divergence (natural log) between the two normalised histograms.
* KL(reference ‖ model) between the normalised histograms, with 1e-10 put into empty bins.
* Proteins: the same on the first two TICA components (lag 100 frames, fitted on the reference,
  features: pairwise bead distances), plus pairwise-distance histograms and RMSD to the native
  structure.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from openmm_flowmatch.units import BOLTZMANN_KJ_PER_MOL_PER_K, KJ_PER_KCAL, kelvin

logger = logging.getLogger(__name__)

__all__ = [
    "AnalysisError",
    "FreeEnergySurface",
    "SurfaceComparison",
    "PERIODIC_RANGE",
    "dihedrals",
    "phi_psi",
    "alanine_basins",
    "free_energy_2d",
    "free_energy_from_histogram",
    "fes_mse",
    "js_divergence",
    "kl_divergence",
    "compare_surfaces",
    "compare_phi_psi",
    "pairwise_distances",
    "bond_lengths",
    "bond_angles",
    "bonded_statistics",
    "compare_bonded_statistics",
    "tica_projections",
    "compare_tica",
    "distance_histograms",
    "rmsd_to_native",
    "plot_free_energy_comparison",
    "jsonable",
    "write_metrics",
    "load_positions",
]

PERIODIC_RANGE: tuple[tuple[float, float], tuple[float, float]] = ((-math.pi, math.pi), (-math.pi, math.pi))
"""The φ/ψ histogram range [−π, π)² of DESIGN.md."""

KL_EMPTY_BIN: float = 1e-10
"""Probability put into empty bins for KL(reference ‖ model) (DESIGN.md)."""

FES_CUTOFF_KCAL: float = 5.0
"""Reference free energies above this (kcal/mol) are left out of the FES MSE (DESIGN.md)."""


class AnalysisError(ValueError):
    """Bad input to an analysis function (wrong shapes, empty data, unreadable file)."""


@dataclass
class FreeEnergySurface:
    """A 2-D histogram and its free energy.

    Attributes
    ----------
    probability
        ``(bins, bins)`` normalised histogram (sums to 1); axis 0 is x, axis 1 is y.
    free_energy
        ``(bins, bins)`` F = −kT ln p in kcal/mol, minimum 0, ``inf`` in empty bins.
    x_edges, y_edges
        Bin edges, ``(bins + 1,)``.
    temperature
        Temperature in K used for kT.
    n_samples
        Number of samples that went into the histogram.
    """

    probability: np.ndarray
    free_energy: np.ndarray
    x_edges: np.ndarray
    y_edges: np.ndarray
    temperature: float
    n_samples: int


@dataclass
class SurfaceComparison:
    """A reference and a model free-energy surface with the DESIGN.md metrics between them."""

    reference: FreeEnergySurface
    model: FreeEnergySurface
    metrics: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


def _as_positions(positions: Any) -> np.ndarray:
    """Positions as a float64 array ``(frames, beads, 3)``; accepts an mdtraj Trajectory."""
    if hasattr(positions, "xyz"):
        positions = positions.xyz
    array = np.asarray(positions, dtype=np.float64)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[-1] != 3:
        raise AnalysisError(
            f"positions must have shape (frames, beads, 3) in nm, got {array.shape}; "
            "pass an mdtraj.Trajectory or a numpy array"
        )
    if array.shape[0] == 0:
        raise AnalysisError("positions contain no frames")
    return array


def dihedrals(positions: Any, quadruples: Sequence[Sequence[int]]) -> np.ndarray:
    """Signed dihedral angles (rad, in (−π, π]) of bead quadruples.

    Same convention as ``mdtraj.compute_dihedrals`` (IUPAC: trans = ±π).

    Parameters
    ----------
    positions
        ``(frames, beads, 3)`` or ``(beads, 3)`` in nm, or an ``mdtraj.Trajectory``.
    quadruples
        ``(n, 4)`` bead indices i-j-k-l.

    Returns
    -------
    numpy.ndarray
        ``(frames, n)`` angles in radians.
    """
    x = _as_positions(positions)
    quads = np.asarray(quadruples, dtype=int).reshape(-1, 4)
    if quads.size and (quads.min() < 0 or quads.max() >= x.shape[1]):
        raise AnalysisError(f"dihedral indices {quads.tolist()} out of range for {x.shape[1]} beads")
    p0, p1, p2, p3 = (x[:, quads[:, i]] for i in range(4))
    b1 = p1 - p0
    b2 = p2 - p1
    b3 = p3 - p2
    n1 = np.cross(b1, b2)
    n2 = np.cross(b2, b3)
    b2_unit = b2 / np.linalg.norm(b2, axis=-1, keepdims=True)
    m1 = np.cross(n1, b2_unit)
    x_component = np.sum(n1 * n2, axis=-1)
    y_component = np.sum(m1 * n2, axis=-1)
    return -np.arctan2(y_component, x_component)


def phi_psi(positions: Any) -> tuple[np.ndarray, np.ndarray]:
    """Backbone φ and ψ of the 5-bead alanine-dipeptide CG model (ACE C, N, CA, C, NME N).

    φ is the dihedral of beads 0-1-2-3 and ψ of beads 1-2-3-4.

    Returns
    -------
    (phi, psi)
        Two ``(frames,)`` arrays in radians.
    """
    x = _as_positions(positions)
    if x.shape[1] != 5:
        raise AnalysisError(
            f"phi_psi expects the 5-bead alanine-dipeptide map (ACE C, N, CA, C, NME N), got "
            f"{x.shape[1]} beads; use dihedrals() with your own quadruples"
        )
    angles = dihedrals(x, [[0, 1, 2, 3], [1, 2, 3, 4]])
    return angles[:, 0], angles[:, 1]


def alanine_basins(positions: Any) -> dict[str, np.ndarray]:
    """Boolean ``(frames,)`` masks of the alanine-dipeptide φ/ψ regions, and ψ itself.

    Regions (rad): ``beta_pII``: φ ∈ [−π, 0), ψ ∈ [1.5, π) ∪ [−π, −2.8); ``alpha_R``:
    φ ∈ [−π, 0), ψ ∈ [−1.6, 1.0); ``phi_negative``: φ < 0 (its complement holds αL and C7ax);
    ``psi``: ψ in radians (for profiles along ψ). Positions as for :func:`phi_psi`.
    """
    phi, psi = phi_psi(positions)
    left = phi < 0
    return {
        "beta_pII": left & ((psi >= 1.5) | (psi < -2.8)),
        "alpha_R": left & (psi >= -1.6) & (psi < 1.0),
        "phi_negative": left,
        "psi": psi,
    }


def pairwise_distances(positions: Any, min_separation: int = 1) -> np.ndarray:
    """Distances (nm) between all bead pairs i < j with j − i ≥ ``min_separation``.

    Returns
    -------
    numpy.ndarray
        ``(frames, n_pairs)``, pairs in row-major order of ``numpy.triu_indices``.
    """
    x = _as_positions(positions)
    i, j = np.triu_indices(x.shape[1], k=max(1, int(min_separation)))
    return np.linalg.norm(x[:, j] - x[:, i], axis=-1)


def rmsd_to_native(positions: Any, native: Any) -> np.ndarray:
    """RMSD (nm) of each frame to a native structure after optimal superposition (Kabsch).

    Parameters
    ----------
    positions
        ``(frames, beads, 3)`` nm or an mdtraj Trajectory.
    native
        ``(beads, 3)`` nm (or a one-frame array / Trajectory).

    Returns
    -------
    numpy.ndarray
        ``(frames,)`` in nm, as ``mdtraj.rmsd`` would give.
    """
    x = _as_positions(positions)
    reference = _as_positions(native)[0]
    if reference.shape != x.shape[1:]:
        raise AnalysisError(f"native structure has {reference.shape[0]} beads, trajectory {x.shape[1]}")
    x = x - x.mean(axis=1, keepdims=True)
    reference = reference - reference.mean(axis=0)
    covariance = np.einsum("fni,nj->fij", x, reference)
    u, s, vt = np.linalg.svd(covariance)
    sign = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    s[:, -1] *= sign
    squared = (x**2).sum(axis=(1, 2)) + (reference**2).sum() - 2.0 * s.sum(axis=1)
    return np.sqrt(np.clip(squared, 0.0, None) / x.shape[1])


# --------------------------------------------------------------------------------------------
# histograms and free energies
# --------------------------------------------------------------------------------------------


def _kT_kcal(temperature: Any) -> float:
    return BOLTZMANN_KJ_PER_MOL_PER_K * kelvin(temperature) / KJ_PER_KCAL


def _is_periodic(value_range) -> bool:
    return all(abs(low + math.pi) < 1e-12 and abs(high - math.pi) < 1e-12 for low, high in value_range)


def _wrap_angles(angles: np.ndarray) -> np.ndarray:
    """Map angles into [−π, π) (so π itself lands in the first bin, as for a half-open range)."""
    return (np.asarray(angles, dtype=np.float64) + math.pi) % (2.0 * math.pi) - math.pi


def free_energy_from_histogram(counts: np.ndarray, temperature: Any = 300.0) -> np.ndarray:
    """F = −kT ln p in kcal/mol, shifted so that its minimum is 0; ``inf`` where p = 0."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise AnalysisError("histogram is empty: no samples fell into the histogram range")
    probability = counts / total
    with np.errstate(divide="ignore"):
        free_energy = -_kT_kcal(temperature) * np.log(probability)
    return free_energy - free_energy[np.isfinite(free_energy)].min()


def free_energy_2d(
    x: np.ndarray,
    y: np.ndarray,
    bins: int = 60,
    range: Sequence[Sequence[float]] = PERIODIC_RANGE,
    temperature: Any = 300.0,
    clip: bool = False,
) -> FreeEnergySurface:
    """Histogram two coordinates and return the free-energy surface.

    Parameters
    ----------
    x, y
        ``(frames,)`` samples, e.g. φ and ψ in radians.
    bins
        Bins per axis (DESIGN.md: 60).
    range
        ``((xmin, xmax), (ymin, ymax))``; the default [−π, π)² wraps angles into the half-open
        interval first.
    temperature
        K (or an ``openmm.unit`` quantity) for kT.
    clip
        Put samples outside ``range`` into the border bins instead of dropping them (used for
        model samples on TICA axes fitted to the reference).

    Returns
    -------
    FreeEnergySurface
        Probability (sums to 1), F in kcal/mol (minimum 0, ``inf`` where empty), the edges.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise AnalysisError(f"x and y must have the same number of samples, got {x.size} and {y.size}")
    if x.size == 0:
        raise AnalysisError("no samples to histogram")
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.all():
        logger.warning("dropping %d non-finite samples from the histogram", int((~finite).sum()))
        x, y = x[finite], y[finite]
    value_range = tuple(tuple(float(v) for v in axis) for axis in range)
    if _is_periodic(value_range):
        x, y = _wrap_angles(x), _wrap_angles(y)
    x_edges = np.linspace(*value_range[0], bins + 1)
    y_edges = np.linspace(*value_range[1], bins + 1)
    if clip:
        x = np.clip(x, x_edges[0], x_edges[-1])
        y = np.clip(y, y_edges[0], y_edges[-1])
    counts, _, _ = np.histogram2d(x, y, bins=[x_edges, y_edges])
    free_energy = free_energy_from_histogram(counts, temperature)
    return FreeEnergySurface(
        probability=counts / counts.sum(),
        free_energy=free_energy,
        x_edges=x_edges,
        y_edges=y_edges,
        temperature=kelvin(temperature),
        n_samples=int(x.size),
    )


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def _normalised(histogram: np.ndarray) -> np.ndarray:
    histogram = np.asarray(histogram, dtype=np.float64)
    if np.any(histogram < 0):
        raise AnalysisError("histograms must be non-negative")
    total = histogram.sum()
    if total <= 0:
        raise AnalysisError("histogram is empty")
    return histogram / total


def _check_same_shape(reference: np.ndarray, model: np.ndarray) -> None:
    if np.shape(reference) != np.shape(model):
        raise AnalysisError(f"histograms differ in shape: {np.shape(reference)} vs {np.shape(model)}")


def fes_mse(
    reference: np.ndarray,
    model: np.ndarray,
    temperature: Any = 300.0,
    cutoff: float = FES_CUTOFF_KCAL,
) -> float:
    """Mean squared difference of two free-energy surfaces in (kcal/mol)² (DESIGN.md).

    Over the bins where both densities are non-zero and the reference F ≤ ``cutoff`` kcal/mol,
    the difference F_model − F_ref minus its mean over those bins, squared and averaged.

    Parameters
    ----------
    reference, model
        Histograms (counts or probabilities) of the same shape.
    temperature
        K, for kT.
    cutoff
        kcal/mol.

    Returns
    -------
    float
        ``nan`` when no bin qualifies.
    """
    _check_same_shape(reference, model)
    reference_free_energy = free_energy_from_histogram(reference, temperature)
    model_free_energy = free_energy_from_histogram(model, temperature)
    mask = (
        (np.asarray(reference) > 0)
        & (np.asarray(model) > 0)
        & (reference_free_energy <= cutoff)
    )
    if not mask.any():
        logger.warning("FES MSE: no bin is populated in both histograms; returning nan")
        return float("nan")
    difference = model_free_energy[mask] - reference_free_energy[mask]
    difference = difference - difference.mean()
    return float(np.mean(difference**2))


def js_divergence(reference: np.ndarray, model: np.ndarray) -> float:
    """Jensen–Shannon divergence (natural log) between two histograms, in [0, ln 2].

    JS = ½ Σ p ln(p/m) + ½ Σ q ln(q/m) with m = (p + q)/2, p and q normalised, 0 ln 0 = 0.
    """
    _check_same_shape(reference, model)
    p, q = _normalised(reference), _normalised(model)
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        term_p = np.where(p > 0, p * np.log(p / m), 0.0)
        term_q = np.where(q > 0, q * np.log(q / m), 0.0)
    return float(0.5 * term_p.sum() + 0.5 * term_q.sum())


def kl_divergence(reference: np.ndarray, model: np.ndarray, empty_bin: float = KL_EMPTY_BIN) -> float:
    """KL(reference ‖ model) = Σ p ln(p/q) (natural log) between two histograms.

    Both histograms are normalised to sum 1, then empty bins (in either) are set to
    ``empty_bin`` (1e-10, DESIGN.md), without renormalising.
    """
    _check_same_shape(reference, model)
    p, q = _normalised(reference), _normalised(model)
    p = np.where(p > 0, p, empty_bin)
    q = np.where(q > 0, q, empty_bin)
    return float(np.sum(p * np.log(p / q)))


def compare_surfaces(
    reference: FreeEnergySurface, model: FreeEnergySurface, cutoff: float = FES_CUTOFF_KCAL
) -> dict[str, float]:
    """The DESIGN.md metrics between two surfaces built on the same bins.

    Returns
    -------
    dict
        ``fes_mse`` ((kcal/mol)²), ``js_divergence``, ``kl_divergence``, ``bins_compared`` and
        the sample counts.
    """
    if not (np.allclose(reference.x_edges, model.x_edges) and np.allclose(reference.y_edges, model.y_edges)):
        raise AnalysisError("surfaces use different bins; build both with the same bins and range")
    mask = (
        (reference.probability > 0) & (model.probability > 0) & (reference.free_energy <= cutoff)
    )
    return {
        "fes_mse": fes_mse(reference.probability, model.probability, reference.temperature, cutoff),
        "js_divergence": js_divergence(reference.probability, model.probability),
        "kl_divergence": kl_divergence(reference.probability, model.probability),
        "bins_compared": int(mask.sum()),
        "reference_samples": reference.n_samples,
        "model_samples": model.n_samples,
    }


def compare_phi_psi(
    reference_positions: Any,
    model_positions: Any,
    temperature: Any = 300.0,
    bins: int = 60,
) -> SurfaceComparison:
    """φ/ψ free-energy surfaces of the 5-bead alanine-dipeptide map and their metrics."""
    reference = free_energy_2d(*phi_psi(reference_positions), bins=bins, temperature=temperature)
    model = free_energy_2d(*phi_psi(model_positions), bins=bins, temperature=temperature)
    return SurfaceComparison(reference, model, compare_surfaces(reference, model))


def _as_feature_list(features: Any) -> list[np.ndarray]:
    if isinstance(features, np.ndarray):
        features = [features]
    arrays = [np.asarray(f, dtype=np.float64) for f in features]
    if not arrays or any(a.ndim != 2 for a in arrays):
        raise AnalysisError("features must be a (frames, n_features) array or a list of them")
    return arrays


def tica_projections(
    reference_features: Any, model_features: Any, lag: int = 100, dim: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Project reference and model features onto TICA components fitted on the reference.

    Parameters
    ----------
    reference_features, model_features
        ``(frames, n_features)`` arrays or lists of them (one per trajectory), e.g. from
        :func:`pairwise_distances`.
    lag
        TICA lag time in frames (DESIGN.md: 100).
    dim
        Number of components.

    Returns
    -------
    (reference, model)
        ``(frames, dim)`` projections, trajectories concatenated.
    """
    from deeptime.decomposition import TICA

    reference = _as_feature_list(reference_features)
    model = _as_feature_list(model_features)
    usable = [f for f in reference if f.shape[0] > lag]
    if not usable:
        raise AnalysisError(
            f"TICA needs reference trajectories longer than the lag ({lag} frames); the longest has "
            f"{max(f.shape[0] for f in reference)}"
        )
    estimator = TICA(lagtime=lag, dim=dim).fit(usable)
    tica = estimator.fetch_model()
    project = lambda arrays: np.concatenate([tica.transform(a) for a in arrays])  # noqa: E731
    return project(reference), project(model)


def compare_tica(
    reference_positions: Any,
    model_positions: Any,
    lag: int = 100,
    temperature: Any = 300.0,
    bins: int = 60,
) -> SurfaceComparison:
    """Free energies on the first two TICA components (features: pairwise distances).

    TICA is fitted on the reference (trajectories passed as a list stay separate for the lagged
    pairs). The histogram range is the reference projection's min/max; model samples outside it
    go into the border bins, so that leaving the reference region counts against the model.
    """
    reference_list = reference_positions if isinstance(reference_positions, list) else [reference_positions]
    model_list = model_positions if isinstance(model_positions, list) else [model_positions]
    reference_projection, model_projection = tica_projections(
        [pairwise_distances(p) for p in reference_list],
        [pairwise_distances(p) for p in model_list],
        lag=lag,
        dim=2,
    )
    value_range = [
        (float(reference_projection[:, i].min()), float(reference_projection[:, i].max())) for i in (0, 1)
    ]
    reference = free_energy_2d(
        reference_projection[:, 0], reference_projection[:, 1], bins, value_range, temperature
    )
    model = free_energy_2d(
        model_projection[:, 0], model_projection[:, 1], bins, value_range, temperature, clip=True
    )
    return SurfaceComparison(reference, model, compare_surfaces(reference, model))


def distance_histograms(
    reference_positions: Any,
    model_positions: Any,
    bins: int = 100,
    min_separation: int = 1,
) -> dict[str, Any]:
    """Histograms of every pairwise bead distance and their JS divergences.

    The range of each pair is [0, 1.2 × the largest reference distance of that pair]; model
    distances beyond it go into the last bin.

    Returns
    -------
    dict
        ``pairs`` (n_pairs, 2), ``edges`` (n_pairs, bins + 1), ``reference`` and ``model``
        (n_pairs, bins) probabilities, ``js_divergence`` (n_pairs,) and ``mean_js_divergence``.
    """
    x_reference = _as_positions(reference_positions)
    x_model = _as_positions(model_positions)
    if x_reference.shape[1] != x_model.shape[1]:
        raise AnalysisError(f"reference has {x_reference.shape[1]} beads, model {x_model.shape[1]}")
    reference = pairwise_distances(x_reference, min_separation)
    model = pairwise_distances(x_model, min_separation)
    i, j = np.triu_indices(x_reference.shape[1], k=max(1, int(min_separation)))
    edges, reference_histograms, model_histograms, divergences = [], [], [], []
    for column in np.arange(reference.shape[1]):
        pair_edges = np.linspace(0.0, 1.2 * reference[:, column].max(), bins + 1)
        reference_counts, _ = np.histogram(reference[:, column], pair_edges)
        model_counts, _ = np.histogram(np.clip(model[:, column], 0.0, pair_edges[-1]), pair_edges)
        edges.append(pair_edges)
        reference_histograms.append(reference_counts / reference_counts.sum())
        model_histograms.append(model_counts / max(model_counts.sum(), 1))
        divergences.append(js_divergence(reference_counts, model_counts))
    return {
        "pairs": np.stack([i, j], axis=1),
        "edges": np.array(edges),
        "reference": np.array(reference_histograms),
        "model": np.array(model_histograms),
        "js_divergence": np.array(divergences),
        "mean_js_divergence": float(np.mean(divergences)),
    }


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def plot_free_energy_comparison(
    comparison: SurfaceComparison,
    path: str | Path,
    labels: tuple[str, str] = ("φ (rad)", "ψ (rad)"),
    titles: tuple[str, str] = ("reference", "model"),
    max_free_energy: float = 8.0,
) -> Path:
    """Save a PNG with three panels: reference F | model F | difference (model − reference).

    The difference is shown where both surfaces are populated, after subtracting its mean over
    the FES-MSE bins (reference F ≤ 5 kcal/mol), i.e. exactly what the FES MSE measures.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference, model = comparison.reference, comparison.model
    extent = [reference.x_edges[0], reference.x_edges[-1], reference.y_edges[0], reference.y_edges[-1]]
    both = np.isfinite(reference.free_energy) & np.isfinite(model.free_energy)
    difference = np.full_like(reference.free_energy, np.nan)
    difference[both] = model.free_energy[both] - reference.free_energy[both]
    inside = both & (reference.free_energy <= FES_CUTOFF_KCAL)
    if inside.any():
        difference -= np.nanmean(np.where(inside, difference, np.nan))

    figure, axes = plt.subplots(1, 3, figsize=(13.5, 4.2), constrained_layout=True)
    for axis, surface, title in zip(axes[:2], (reference, model), titles):
        shown = np.where(np.isfinite(surface.free_energy), surface.free_energy, np.nan)
        image = axis.imshow(
            shown.T, origin="lower", extent=extent, aspect="auto", cmap="viridis",
            vmin=0.0, vmax=max_free_energy, interpolation="nearest",
        )
        axis.set_title(f"{title} ({surface.n_samples} samples)")
        figure.colorbar(image, ax=axis, label="F (kcal/mol)")
    limit = float(np.nanmax(np.abs(difference))) if np.isfinite(difference).any() else 1.0
    limit = min(max(limit, 0.5), 5.0)
    image = axes[2].imshow(
        difference.T, origin="lower", extent=extent, aspect="auto", cmap="RdBu_r",
        vmin=-limit, vmax=limit, interpolation="nearest",
    )
    figure.colorbar(image, ax=axes[2], label="ΔF (kcal/mol)")
    metrics = comparison.metrics
    axes[2].set_title(
        "difference: MSE {:.2f} (kcal/mol)², JS {:.3f}".format(
            metrics.get("fes_mse", float("nan")), metrics.get("js_divergence", float("nan"))
        )
    )
    for axis in axes:
        axis.set_xlabel(labels[0])
        axis.set_ylabel(labels[1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# --------------------------------------------------------------------------------------------
# CG bonds and angles against the data
# --------------------------------------------------------------------------------------------


def _index_array(indices: Any, width: int, n_beads: int, what: str) -> np.ndarray:
    array = np.asarray(indices, dtype=int).reshape(-1, width)
    if array.size and (array.min() < 0 or array.max() >= n_beads):
        raise AnalysisError(f"{what} indices {array.tolist()} out of range for {n_beads} beads")
    return array


def bond_lengths(positions: Any, bonds: Sequence[Sequence[int]]) -> np.ndarray:
    """Lengths (nm) of bead pairs.

    Parameters
    ----------
    positions
        ``(frames, beads, 3)`` or ``(beads, 3)`` nm, or an ``mdtraj.Trajectory``.
    bonds
        ``(n, 2)`` bead indices.

    Returns
    -------
    numpy.ndarray
        ``(frames, n)`` lengths in nm.
    """
    x = _as_positions(positions)
    pairs = _index_array(bonds, 2, x.shape[1], "bond")
    return np.linalg.norm(x[:, pairs[:, 1]] - x[:, pairs[:, 0]], axis=-1)


def bond_angles(positions: Any, angles: Sequence[Sequence[int]]) -> np.ndarray:
    """Angles (rad, in [0, π]) at the middle bead j of bead triples (i, j, k).

    Returns
    -------
    numpy.ndarray
        ``(frames, n)`` angles in radians.
    """
    x = _as_positions(positions)
    triples = _index_array(angles, 3, x.shape[1], "angle")
    first = x[:, triples[:, 0]] - x[:, triples[:, 1]]
    second = x[:, triples[:, 2]] - x[:, triples[:, 1]]
    sine = np.linalg.norm(np.cross(first, second), axis=-1)
    return np.arctan2(sine, np.sum(first * second, axis=-1))


def bonded_statistics(
    positions: Any, bonds: Sequence[Sequence[int]], angles: Sequence[Sequence[int]] = ()
) -> dict[str, Any]:
    """Means and widths (standard deviations) of the bond lengths and angles of CG positions.

    Returns
    -------
    dict
        ``bonds`` and ``angles`` (index lists), ``bond_mean``/``bond_std`` (nm) and
        ``angle_mean``/``angle_std`` (rad), one value per bond/angle, and ``frames``. This is the
        ``data_statistics`` an artifact may carry (``export_force_field(..., data_statistics=)``).
    """
    x = _as_positions(positions)
    lengths = bond_lengths(x, bonds)
    values = bond_angles(x, angles)
    return {
        "bonds": np.asarray(bonds, dtype=int).reshape(-1, 2).tolist(),
        "angles": np.asarray(angles, dtype=int).reshape(-1, 3).tolist(),
        "bond_mean": lengths.mean(axis=0).tolist(),
        "bond_std": lengths.std(axis=0).tolist(),
        "angle_mean": values.mean(axis=0).tolist(),
        "angle_std": values.std(axis=0).tolist(),
        "frames": int(x.shape[0]),
    }


def _ratio_summary(ratios: np.ndarray) -> tuple[float | None, float | None]:
    return (float(ratios.min()), float(ratios.max())) if ratios.size else (None, None)


def compare_bonded_statistics(model: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Widths and means of a model's bonds and angles against the reference's.

    Parameters
    ----------
    model, reference
        Dicts as returned by :func:`bonded_statistics` (the same bonds and angles, in order);
        the reference may lack the angle entries.

    Returns
    -------
    dict
        Per bond ``bond_width_ratio`` (model std / reference std) and ``bond_mean_shift``
        (model − reference, nm); per angle ``angle_width_ratio`` and ``angle_mean_shift`` (rad);
        their ranges ``bond_width_ratio_min``/``_max``, ``angle_width_ratio_min``/``_max`` and
        the largest absolute ``bond_mean_shift_max`` (nm).
    """
    result: dict[str, Any] = {}
    for kind in ("bond", "angle"):
        model_std = np.asarray(model.get(f"{kind}_std") or [], dtype=float)
        reference_std = np.asarray(reference.get(f"{kind}_std") or [], dtype=float)
        if reference_std.size == 0 or model_std.size == 0:
            model_std = reference_std = np.zeros(0)
        elif model_std.shape != reference_std.shape:
            raise AnalysisError(
                f"the model has {model_std.size} {kind}s but the reference {reference_std.size}; compare the same {kind}s"
            )
        ratio = model_std / reference_std
        shift = np.asarray(model.get(f"{kind}_mean") or [], dtype=float)[: ratio.size] - np.asarray(
            reference.get(f"{kind}_mean") or [], dtype=float
        )[: ratio.size]
        result[f"{kind}_width_ratio"] = ratio.tolist()
        result[f"{kind}_mean_shift"] = shift.tolist()
        result[f"{kind}_width_ratio_min"], result[f"{kind}_width_ratio_max"] = _ratio_summary(ratio)
    shifts = np.abs(np.asarray(result["bond_mean_shift"]))
    result["bond_mean_shift_max"] = float(shifts.max()) if shifts.size else None
    return result


def jsonable(value: Any) -> Any:
    """``value`` with NumPy values as plain numbers/lists, paths as strings and nan/inf as ``None``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> Path:
    """Write metrics as indented JSON (numpy values converted, nan/inf written as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(metrics), indent=2, sort_keys=True) + "\n")
    return path


def load_positions(path: str | Path, topology: Any = None) -> np.ndarray:
    """Read CG positions ``(frames, beads, 3)`` nm from a trajectory or data file.

    Supported: ``.dcd``/``.xtc``/``.pdb`` (mdtraj; DCD and XTC need ``topology``: a PDB path, an
    mdtraj or OpenMM topology), ``.h5``/``.hdf5`` CG files (dataset ``positions``), ``.npz``
    (key ``positions`` or ``x``) and ``.npy``.
    """
    path = Path(path)
    if not path.exists():
        raise AnalysisError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as handle:
            if "positions" not in handle:
                raise AnalysisError(f"{path}: no 'positions' dataset; is this a CG data file?")
            return np.asarray(handle["positions"][...], dtype=np.float64)
    if suffix == ".npz":
        with np.load(path) as archive:
            for key in ("positions", "x"):
                if key in archive:
                    return np.asarray(archive[key], dtype=np.float64)
        raise AnalysisError(f"{path}: expected an array named 'positions' or 'x'")
    if suffix == ".npy":
        return _as_positions(np.load(path))
    import mdtraj

    if suffix in (".dcd", ".xtc") and topology is None:
        raise AnalysisError(f"{path}: a {suffix} file needs a topology (the CG PDB)")
    if topology is not None and hasattr(topology, "getNumAtoms"):
        topology = mdtraj.Topology.from_openmm(topology)
    kwargs = {} if topology is None else {"top": str(topology) if isinstance(topology, Path) else topology}
    try:
        return np.asarray(mdtraj.load(str(path), **kwargs).xyz, dtype=np.float64)
    except Exception as error:  # mdtraj raises many types for unreadable files
        raise AnalysisError(f"{path}: could not read trajectory ({error})") from error
