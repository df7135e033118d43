"""Prior energy terms of a CG force field: harmonic bonds and angles, repulsion, dihedrals.

Every term exists twice and both give the same energy (tests hold them equal):

* as standard OpenMM forces (:meth:`to_openmm_forces`), in OpenMM's conventions
  (``HarmonicBondForce``/``HarmonicAngleForce``: E = ½k(x − x₀)²);
* as a torch function (:meth:`energy`) of positions ``(..., n_beads, 3)`` in nm, any float
  dtype, returning energies ``(...)`` in kJ/mol, differentiable by autograd.

Parameters are fitted from CG positions by Boltzmann inversion (:meth:`Priors.fit`):

* harmonic bonds and angles: x₀ = mean, k = kT/σ² (σ² the variance in the data). This is
  the moment estimator of a Gaussian; it ignores the r² and sin θ Jacobians of bond and angle
  distributions, which shift x₀ by about 2σ²/r₀ (bonds) — negligible for CG bonds
  (σ ≈ 0.003–0.03 nm).
* repulsion ``E = c·(d − d₀)²`` for ``d < d₀`` between beads more than two bonds apart, with
  ``d₀`` per pair = (shortest distance of that pair in the data) − ``repulsion_margin``
  (default 0.01 nm), so that the wall never acts on a training configuration, and
  ``c = 1600 kT/nm²`` by default (Köhler et al.).
* optionally dihedrals along consecutive bonded quadruples, a periodic cosine series
  ``Σₙ kₙ(1 + cos(nφ − δₙ))`` fitted by weighted least squares to −kT ln p(φ).

mlcg and torchmd-cg write harmonic terms as E = k(x − x₀)²;
:func:`force_constant_from_mlcg` and :func:`force_constant_to_mlcg` convert (factor 2).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from openmm_flowmatch.units import kelvin
from openmm_flowmatch.units import kT as thermal_energy

logger = logging.getLogger(__name__)

__all__ = [
    "PriorError",
    "HarmonicBonds",
    "HarmonicAngles",
    "Repulsion",
    "Dihedrals",
    "Priors",
    "force_constant_from_mlcg",
    "force_constant_to_mlcg",
    "bonded_pairs",
    "bonded_triples",
    "bonded_quadruples",
    "nonbonded_pairs",
]

PRIORS_FORMAT_VERSION = 1
DEFAULT_REPULSION_STRENGTH_KT = 1600.0
"""Repulsion strength c in kT/nm² (Köhler et al., arXiv 2203.11167)."""
DEFAULT_REPULSION_MARGIN_NM = 0.01
"""d₀ = shortest distance seen in the data minus this margin (nm)."""


class PriorError(ValueError):
    """Prior terms cannot be built, fitted or evaluated; the message says which and why."""


# --------------------------------------------------------------------------------------------
# conventions
# --------------------------------------------------------------------------------------------


def force_constant_from_mlcg(force_constant: float | np.ndarray) -> float | np.ndarray:
    """Convert a harmonic constant from the mlcg/torchmd-cg form E = k(x−x₀)² to OpenMM's E = ½k(x−x₀)².

    Returns ``2 k``.
    """
    return 2.0 * np.asarray(force_constant, dtype=float) if np.ndim(force_constant) else 2.0 * float(force_constant)


def force_constant_to_mlcg(force_constant: float | np.ndarray) -> float | np.ndarray:
    """Convert a harmonic constant from OpenMM's E = ½k(x−x₀)² to the mlcg/torchmd-cg form E = k(x−x₀)².

    Returns ``k / 2``.
    """
    return 0.5 * np.asarray(force_constant, dtype=float) if np.ndim(force_constant) else 0.5 * float(force_constant)


# --------------------------------------------------------------------------------------------
# graph helpers
# --------------------------------------------------------------------------------------------


def _neighbours(bonds: Sequence[tuple[int, int]], n_beads: int) -> list[list[int]]:
    neighbours: list[list[int]] = [[] for _ in range(n_beads)]
    for first, second in bonds:
        neighbours[first].append(second)
        neighbours[second].append(first)
    return [sorted(set(entry)) for entry in neighbours]


def bonded_pairs(bonds: Sequence[tuple[int, int]]) -> np.ndarray:
    """Bonds as an ``(n, 2)`` int array, each pair sorted, duplicates removed, in input order."""
    seen, pairs = set(), []
    for first, second in bonds:
        pair = (min(int(first), int(second)), max(int(first), int(second)))
        if pair[0] == pair[1]:
            raise PriorError(f"bond {pair} joins a bead to itself")
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def bonded_triples(bonds: Sequence[tuple[int, int]], n_beads: int) -> np.ndarray:
    """Angles ``(i, j, k)`` with i–j and j–k bonded, i < k, ordered by central bead."""
    neighbours = _neighbours(bonded_pairs(bonds).tolist(), n_beads)
    triples = [
        (first, center, last)
        for center in range(n_beads)
        for index, first in enumerate(neighbours[center])
        for last in neighbours[center][index + 1 :]
    ]
    return np.array(triples, dtype=np.int64).reshape(-1, 3)


def bonded_quadruples(bonds: Sequence[tuple[int, int]], n_beads: int) -> np.ndarray:
    """Dihedrals ``(i, j, k, l)`` along bonded paths i–j–k–l, one per central bond, i ≠ l."""
    pairs = bonded_pairs(bonds)
    neighbours = _neighbours(pairs.tolist(), n_beads)
    quadruples = []
    for second, third in pairs.tolist():
        for first in neighbours[second]:
            if first == third:
                continue
            for last in neighbours[third]:
                if last in (second, first):
                    continue
                quadruples.append((first, second, third, last))
    return np.array(quadruples, dtype=np.int64).reshape(-1, 4)


def _graph_distances(bonds: Sequence[tuple[int, int]], n_beads: int) -> np.ndarray:
    neighbours = _neighbours(bonded_pairs(bonds).tolist(), n_beads)
    distances = np.full((n_beads, n_beads), np.iinfo(np.int64).max, dtype=np.int64)
    for source in range(n_beads):
        distances[source, source] = 0
        frontier = [source]
        while frontier:
            following = []
            for bead in frontier:
                for neighbour in neighbours[bead]:
                    if distances[source, neighbour] > distances[source, bead] + 1:
                        distances[source, neighbour] = distances[source, bead] + 1
                        following.append(neighbour)
            frontier = following
    return distances


def nonbonded_pairs(bonds: Sequence[tuple[int, int]], n_beads: int, exclusion: int = 2) -> np.ndarray:
    """Bead pairs more than ``exclusion`` bonds apart (unconnected beads included), i < j."""
    distances = _graph_distances(bonds, n_beads)
    first, second = np.triu_indices(n_beads, k=1)
    keep = distances[first, second] > exclusion
    return np.stack([first[keep], second[keep]], axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# geometry (torch and numpy share formulas)
# --------------------------------------------------------------------------------------------


def _bond_lengths(positions: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    difference = positions[..., pairs[:, 1], :] - positions[..., pairs[:, 0], :]
    return torch.linalg.vector_norm(difference, dim=-1)


def _angles(positions: torch.Tensor, triples: torch.Tensor) -> torch.Tensor:
    first = positions[..., triples[:, 0], :] - positions[..., triples[:, 1], :]
    second = positions[..., triples[:, 2], :] - positions[..., triples[:, 1], :]
    sine = torch.linalg.vector_norm(torch.linalg.cross(first, second, dim=-1), dim=-1)
    cosine = (first * second).sum(-1)
    return torch.atan2(sine, cosine)


def _dihedrals(positions: torch.Tensor, quadruples: torch.Tensor) -> torch.Tensor:
    """Signed dihedral angles (IUPAC convention, as OpenMM) in (−π, π]."""
    b1 = positions[..., quadruples[:, 1], :] - positions[..., quadruples[:, 0], :]
    b2 = positions[..., quadruples[:, 2], :] - positions[..., quadruples[:, 1], :]
    b3 = positions[..., quadruples[:, 3], :] - positions[..., quadruples[:, 2], :]
    n1 = torch.linalg.cross(b1, b2, dim=-1)
    n2 = torch.linalg.cross(b2, b3, dim=-1)
    y = torch.linalg.vector_norm(b2, dim=-1) * (b1 * n2).sum(-1)
    x = (n1 * n2).sum(-1)
    return torch.atan2(y, x)


def _check_positions(positions: Any, n_beads: int | None = None) -> np.ndarray:
    if hasattr(positions, "value_in_unit"):
        import openmm.unit as unit

        positions = positions.value_in_unit(unit.nanometer)
    if isinstance(positions, torch.Tensor):
        positions = positions.detach().cpu().numpy()
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim == 2:
        positions = positions[None]
    if positions.ndim != 3 or positions.shape[-1] != 3:
        raise PriorError(f"positions must have shape (frames, beads, 3), got {positions.shape}")
    if n_beads is not None and positions.shape[1] != n_beads:
        raise PriorError(f"positions have {positions.shape[1]} beads, expected {n_beads}")
    if positions.shape[0] < 2:
        raise PriorError("fitting priors needs at least two frames")
    if not np.isfinite(positions).all():
        frame = int(np.argwhere(~np.isfinite(positions))[0, 0])
        raise PriorError(f"positions contain NaN or infinite values (first in frame {frame})")
    return positions


def _check_indices(indices: Any, width: int, name: str) -> np.ndarray:
    array = np.asarray(indices, dtype=np.int64).reshape(-1, width) if len(indices) else np.zeros((0, width), np.int64)
    if (array < 0).any():
        raise PriorError(f"{name} contain negative bead indices")
    return array


def _parameter(values: Any, count: int, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 1 and count != 1:
        array = np.full(count, float(array[0]))
    if array.size != count:
        raise PriorError(f"{name} has {array.size} values for {count} terms")
    if not np.isfinite(array).all():
        raise PriorError(f"{name} contains NaN or infinite values")
    return array


def _tensor(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(array, dtype=like.dtype, device=like.device)


def _index_tensor(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(array, dtype=torch.long, device=like.device)


def _check_energy_input(positions: torch.Tensor, indices: np.ndarray, name: str) -> None:
    if not isinstance(positions, torch.Tensor):
        raise PriorError(f"{name}.energy takes a torch.Tensor of positions, got {type(positions).__name__}")
    if positions.ndim < 2 or positions.shape[-1] != 3:
        raise PriorError(f"{name}.energy takes positions (..., n_beads, 3), got {tuple(positions.shape)}")
    if indices.size and indices.max() >= positions.shape[-2]:
        raise PriorError(
            f"{name} refers to bead {int(indices.max())} but the positions have {positions.shape[-2]} beads"
        )


# --------------------------------------------------------------------------------------------
# terms
# --------------------------------------------------------------------------------------------


class HarmonicBonds:
    """Harmonic bonds ``E = ½ k (d − d₀)²`` (OpenMM ``HarmonicBondForce``).

    Parameters
    ----------
    pairs
        ``(n, 2)`` bead indices.
    lengths
        ``(n,)`` equilibrium lengths d₀ in nm.
    force_constants
        ``(n,)`` force constants k in kJ/mol/nm² (OpenMM's ½k convention).
    """

    type_name = "harmonic_bonds"

    def __init__(self, pairs: Any, lengths: Any, force_constants: Any) -> None:
        self.pairs = _check_indices(pairs, 2, "bond pairs")
        self.lengths = _parameter(lengths, len(self.pairs), "bond lengths")
        self.force_constants = _parameter(force_constants, len(self.pairs), "bond force constants")

    @classmethod
    def fit(cls, positions: Any, pairs: Any, temperature: Any) -> HarmonicBonds:
        """Boltzmann inversion: d₀ = mean length, k = kT / variance."""
        positions = _check_positions(positions)
        pairs = _check_indices(pairs, 2, "bond pairs")
        lengths = _bond_lengths(torch.from_numpy(positions), torch.from_numpy(pairs)).numpy()
        mean, variance = lengths.mean(0), lengths.var(0)
        _check_variance(variance, pairs, "bond")
        return cls(pairs, mean, thermal_energy(temperature) / variance)

    def values(self, positions: torch.Tensor) -> torch.Tensor:
        """Bond lengths ``(..., n)`` in nm."""
        return _bond_lengths(positions, _index_tensor(self.pairs, positions))

    def energy(self, positions: torch.Tensor) -> torch.Tensor:
        """Energy ``(...)`` in kJ/mol of positions ``(..., n_beads, 3)`` in nm."""
        _check_energy_input(positions, self.pairs, "HarmonicBonds")
        deviation = self.values(positions) - _tensor(self.lengths, positions)
        return 0.5 * (_tensor(self.force_constants, positions) * deviation**2).sum(-1)

    def to_openmm_forces(self) -> list:
        import openmm

        force = openmm.HarmonicBondForce()
        force.setName("PriorHarmonicBonds")
        for (first, second), length, constant in zip(self.pairs, self.lengths, self.force_constants):
            force.addBond(int(first), int(second), float(length), float(constant))
        return [force]

    def to_dict(self) -> dict:
        return {
            "type": self.type_name,
            "pairs": self.pairs.tolist(),
            "lengths_nm": self.lengths.tolist(),
            "force_constants_kj_per_mol_per_nm2": self.force_constants.tolist(),
            "convention": "E = 0.5*k*(d - d0)^2",
        }

    @classmethod
    def from_dict(cls, data: dict) -> HarmonicBonds:
        return cls(data["pairs"], data["lengths_nm"], data["force_constants_kj_per_mol_per_nm2"])

    def __len__(self) -> int:
        return len(self.pairs)


class HarmonicAngles:
    """Harmonic angles ``E = ½ k (θ − θ₀)²`` (OpenMM ``HarmonicAngleForce``).

    Parameters
    ----------
    triples
        ``(n, 3)`` bead indices, the angle sits at the middle bead.
    angles
        ``(n,)`` equilibrium angles θ₀ in radians.
    force_constants
        ``(n,)`` force constants k in kJ/mol/rad² (OpenMM's ½k convention).
    """

    type_name = "harmonic_angles"

    def __init__(self, triples: Any, angles: Any, force_constants: Any) -> None:
        self.triples = _check_indices(triples, 3, "angle triples")
        self.angles = _parameter(angles, len(self.triples), "equilibrium angles")
        self.force_constants = _parameter(force_constants, len(self.triples), "angle force constants")

    @classmethod
    def fit(cls, positions: Any, triples: Any, temperature: Any) -> HarmonicAngles:
        """Boltzmann inversion: θ₀ = mean angle, k = kT / variance."""
        positions = _check_positions(positions)
        triples = _check_indices(triples, 3, "angle triples")
        angles = _angles(torch.from_numpy(positions), torch.from_numpy(triples)).numpy()
        mean, variance = angles.mean(0), angles.var(0)
        _check_variance(variance, triples, "angle")
        return cls(triples, mean, thermal_energy(temperature) / variance)

    def values(self, positions: torch.Tensor) -> torch.Tensor:
        """Angles ``(..., n)`` in radians, in [0, π]."""
        return _angles(positions, _index_tensor(self.triples, positions))

    def energy(self, positions: torch.Tensor) -> torch.Tensor:
        """Energy ``(...)`` in kJ/mol of positions ``(..., n_beads, 3)`` in nm."""
        _check_energy_input(positions, self.triples, "HarmonicAngles")
        deviation = self.values(positions) - _tensor(self.angles, positions)
        return 0.5 * (_tensor(self.force_constants, positions) * deviation**2).sum(-1)

    def to_openmm_forces(self) -> list:
        import openmm

        force = openmm.HarmonicAngleForce()
        force.setName("PriorHarmonicAngles")
        for (first, center, last), angle, constant in zip(self.triples, self.angles, self.force_constants):
            force.addAngle(int(first), int(center), int(last), float(angle), float(constant))
        return [force]

    def to_dict(self) -> dict:
        return {
            "type": self.type_name,
            "triples": self.triples.tolist(),
            "angles_rad": self.angles.tolist(),
            "force_constants_kj_per_mol_per_rad2": self.force_constants.tolist(),
            "convention": "E = 0.5*k*(theta - theta0)^2",
        }

    @classmethod
    def from_dict(cls, data: dict) -> HarmonicAngles:
        return cls(data["triples"], data["angles_rad"], data["force_constants_kj_per_mol_per_rad2"])

    def __len__(self) -> int:
        return len(self.triples)


class Repulsion:
    """Short-range repulsion ``E = c (d − d₀)²`` for ``d < d₀``, zero beyond.

    OpenMM: ``CustomBondForce("step(d0-r)*c*(r-d0)^2")`` with per-pair ``d0`` and ``c``.

    Parameters
    ----------
    pairs
        ``(n, 2)`` bead indices (usually beads more than two bonds apart).
    distances
        ``(n,)`` onset distances d₀ in nm.
    strengths
        ``(n,)`` or scalar strength c in kJ/mol/nm² (E = c·(d−d₀)², no factor ½).
    """

    type_name = "repulsion"
    expression = "step(d0-r)*c*(r-d0)^2"

    def __init__(self, pairs: Any, distances: Any, strengths: Any) -> None:
        self.pairs = _check_indices(pairs, 2, "repulsion pairs")
        self.distances = _parameter(distances, len(self.pairs), "repulsion distances")
        self.strengths = _parameter(strengths, len(self.pairs), "repulsion strengths")
        if (self.distances < 0).any() or (self.strengths < 0).any():
            raise PriorError("repulsion distances and strengths must be non-negative")

    @classmethod
    def fit(
        cls,
        positions: Any,
        pairs: Any,
        temperature: Any,
        strength: float | None = None,
        margin: float = DEFAULT_REPULSION_MARGIN_NM,
        chunk_frames: int = 4096,
    ) -> Repulsion:
        """d₀ per pair = shortest distance of that pair in ``positions`` minus ``margin`` (nm).

        ``strength`` is c in kJ/mol/nm²; default 1600 kT/nm². d₀ is clipped at 0.
        """
        positions = _check_positions(positions)
        pairs = _check_indices(pairs, 2, "repulsion pairs")
        shortest = np.full(len(pairs), np.inf)
        index_tensor = torch.from_numpy(pairs)
        for start in range(0, positions.shape[0], chunk_frames):
            chunk = torch.from_numpy(positions[start : start + chunk_frames])
            distances = _bond_lengths(chunk, index_tensor).numpy()
            if distances.size:
                shortest = np.minimum(shortest, distances.min(0))
        if strength is None:
            strength = DEFAULT_REPULSION_STRENGTH_KT * thermal_energy(temperature)
        return cls(pairs, np.clip(shortest - margin, 0.0, None), strength)

    def energy(self, positions: torch.Tensor) -> torch.Tensor:
        """Energy ``(...)`` in kJ/mol of positions ``(..., n_beads, 3)`` in nm."""
        _check_energy_input(positions, self.pairs, "Repulsion")
        distances = _bond_lengths(positions, _index_tensor(self.pairs, positions))
        overlap = torch.clamp(_tensor(self.distances, positions) - distances, min=0.0)
        return (_tensor(self.strengths, positions) * overlap**2).sum(-1)

    def to_openmm_forces(self) -> list:
        import openmm

        force = openmm.CustomBondForce(self.expression)
        force.setName("PriorRepulsion")
        force.addPerBondParameter("d0")
        force.addPerBondParameter("c")
        for (first, second), distance, strength in zip(self.pairs, self.distances, self.strengths):
            force.addBond(int(first), int(second), [float(distance), float(strength)])
        return [force]

    def to_dict(self) -> dict:
        return {
            "type": self.type_name,
            "pairs": self.pairs.tolist(),
            "distances_nm": self.distances.tolist(),
            "strengths_kj_per_mol_per_nm2": self.strengths.tolist(),
            "convention": "E = c*(d - d0)^2 for d < d0",
        }

    @classmethod
    def from_dict(cls, data: dict) -> Repulsion:
        return cls(data["pairs"], data["distances_nm"], data["strengths_kj_per_mol_per_nm2"])

    def __len__(self) -> int:
        return len(self.pairs)


class Dihedrals:
    """Periodic dihedral series ``E = Σ k (1 + cos(n φ − δ))`` (OpenMM ``PeriodicTorsionForce``).

    One entry per (quadruple, periodicity) term; a quadruple may appear with several
    periodicities.

    Parameters
    ----------
    quadruples
        ``(n, 4)`` bead indices.
    periodicities
        ``(n,)`` positive integers n.
    phases
        ``(n,)`` phases δ in radians.
    force_constants
        ``(n,)`` amplitudes k in kJ/mol.
    """

    type_name = "dihedrals"

    def __init__(self, quadruples: Any, periodicities: Any, phases: Any, force_constants: Any) -> None:
        self.quadruples = _check_indices(quadruples, 4, "dihedral quadruples")
        periodicities = np.asarray(periodicities).reshape(-1)
        if periodicities.size != len(self.quadruples):
            raise PriorError(f"periodicities has {periodicities.size} values for {len(self.quadruples)} terms")
        if periodicities.size and (periodicities < 1).any():
            raise PriorError("dihedral periodicities must be positive integers")
        self.periodicities = periodicities.astype(np.int64)
        self.phases = _parameter(phases, len(self.quadruples), "dihedral phases")
        self.force_constants = _parameter(force_constants, len(self.quadruples), "dihedral force constants")

    @classmethod
    def fit(
        cls,
        positions: Any,
        quadruples: Any,
        temperature: Any,
        periodicities: Sequence[int] = (1, 2),
        bins: int = 60,
    ) -> Dihedrals:
        """Fit ``Σₙ kₙ(1 + cos(nφ − δₙ))`` to −kT ln p(φ) of each dihedral.

        The free energy of a ``bins``-bin histogram on [−π, π) is fitted by least squares
        with the bin counts as weights (empty bins ignored) by ``a₀ + Σₙ aₙ cos nφ + bₙ sin nφ``;
        then kₙ = √(aₙ² + bₙ²) and δₙ = atan2(bₙ, aₙ) (the constant is dropped).
        """
        positions = _check_positions(positions)
        quadruples = _check_indices(quadruples, 4, "dihedral quadruples")
        periodicities = [int(period) for period in periodicities]
        energy_scale = thermal_energy(temperature)
        angles = _dihedrals(torch.from_numpy(positions), torch.from_numpy(quadruples)).numpy()
        edges = np.linspace(-np.pi, np.pi, bins + 1)
        centers = 0.5 * (edges[1:] + edges[:-1])
        all_quadruples, all_periods, all_phases, all_constants = [], [], [], []
        for term, quadruple in enumerate(quadruples):
            counts, _ = np.histogram(angles[:, term], bins=edges)
            filled = counts > 0
            free_energy = -energy_scale * np.log(counts[filled] / counts.sum())
            columns = [np.ones(filled.sum())]
            for period in periodicities:
                columns += [np.cos(period * centers[filled]), np.sin(period * centers[filled])]
            design = np.stack(columns, axis=1)
            weights = np.sqrt(counts[filled].astype(float))
            coefficients, *_ = np.linalg.lstsq(design * weights[:, None], free_energy * weights, rcond=None)
            for index, period in enumerate(periodicities):
                cosine, sine = coefficients[1 + 2 * index], coefficients[2 + 2 * index]
                all_quadruples.append(quadruple)
                all_periods.append(period)
                all_phases.append(math.atan2(sine, cosine))
                all_constants.append(math.hypot(cosine, sine))
        return cls(np.array(all_quadruples).reshape(-1, 4), all_periods, all_phases, all_constants)

    def values(self, positions: torch.Tensor) -> torch.Tensor:
        """Signed dihedral angles ``(..., n)`` in radians (IUPAC/OpenMM sign)."""
        return _dihedrals(positions, _index_tensor(self.quadruples, positions))

    def energy(self, positions: torch.Tensor) -> torch.Tensor:
        """Energy ``(...)`` in kJ/mol of positions ``(..., n_beads, 3)`` in nm."""
        _check_energy_input(positions, self.quadruples, "Dihedrals")
        angles = self.values(positions)
        periods = _tensor(self.periodicities.astype(np.float64), positions)
        terms = 1.0 + torch.cos(periods * angles - _tensor(self.phases, positions))
        return (_tensor(self.force_constants, positions) * terms).sum(-1)

    def to_openmm_forces(self) -> list:
        import openmm

        force = openmm.PeriodicTorsionForce()
        force.setName("PriorDihedrals")
        for quadruple, period, phase, constant in zip(
            self.quadruples, self.periodicities, self.phases, self.force_constants
        ):
            force.addTorsion(*(int(index) for index in quadruple), int(period), float(phase), float(constant))
        return [force]

    def to_dict(self) -> dict:
        return {
            "type": self.type_name,
            "quadruples": self.quadruples.tolist(),
            "periodicities": self.periodicities.tolist(),
            "phases_rad": self.phases.tolist(),
            "force_constants_kj_per_mol": self.force_constants.tolist(),
            "convention": "E = k*(1 + cos(n*phi - phase))",
        }

    @classmethod
    def from_dict(cls, data: dict) -> Dihedrals:
        return cls(data["quadruples"], data["periodicities"], data["phases_rad"], data["force_constants_kj_per_mol"])

    def __len__(self) -> int:
        return len(self.quadruples)


_TERM_TYPES = {term.type_name: term for term in (HarmonicBonds, HarmonicAngles, Repulsion, Dihedrals)}


def _check_variance(variance: np.ndarray, indices: np.ndarray, what: str) -> None:
    bad = np.flatnonzero(~(variance > 0.0))
    if bad.size:
        raise PriorError(
            f"{what} {tuple(int(i) for i in indices[bad[0]])} does not fluctuate in the data "
            "(zero variance); is it constrained, or are all frames identical? Leave it out of the prior"
        )


# --------------------------------------------------------------------------------------------
# container
# --------------------------------------------------------------------------------------------


class Priors:
    """A sum of prior terms.

    Parameters
    ----------
    terms
        Prior terms (:class:`HarmonicBonds`, :class:`HarmonicAngles`, :class:`Repulsion`,
        :class:`Dihedrals`).
    temperature
        Temperature (K) the terms were fitted at, if any (kept in :meth:`to_dict`).
    """

    def __init__(self, terms: Sequence[Any] = (), temperature: float | None = None) -> None:
        self.terms = list(terms)
        self.temperature = None if temperature is None else float(temperature)

    @classmethod
    def fit(
        cls,
        positions: Any,
        bonds: Sequence[tuple[int, int]],
        temperature: Any,
        repulsion: bool | str = "auto",
        dihedrals: bool = False,
        angles: bool = True,
        repulsion_strength: float | None = None,
        repulsion_margin: float = DEFAULT_REPULSION_MARGIN_NM,
        dihedral_periodicities: Sequence[int] = (1, 2),
    ) -> Priors:
        """Fit priors to CG positions by Boltzmann inversion.

        Parameters
        ----------
        positions
            ``(frames, beads, 3)`` CG positions in nm (array, tensor or quantity).
        bonds
            CG bond graph (e.g. ``CGMapping.bonds``); harmonic bonds on each.
        temperature
            Temperature of the data, K or ``openmm.unit`` quantity.
        repulsion
            Add a repulsion between beads more than two bonds apart. ``"auto"`` (default)
            adds it for molecules of more than five beads and leaves it out for the five-bead
            alanine-dipeptide backbone map, as in Köhler et al. (there the 1–4/1–5 distances are
            set by φ/ψ and the network learns them freely).
        dihedrals
            Add a periodic dihedral series on every bonded quadruple (default off).
        angles
            Add harmonic angles on every bonded triple (default on).
        repulsion_strength
            c in kJ/mol/nm²; default 1600 kT/nm².
        repulsion_margin
            d₀ = shortest distance of the pair in the data − margin (nm); default 0.01 nm.
        dihedral_periodicities
            Periodicities of the dihedral series.

        Returns
        -------
        Priors
        """
        positions = _check_positions(positions)
        n_beads = positions.shape[1]
        pairs = bonded_pairs(bonds)
        if pairs.size and pairs.max() >= n_beads:
            raise PriorError(f"bond {tuple(pairs[pairs.max(1).argmax()])} refers to a bead beyond the {n_beads} beads")
        temperature_kelvin = kelvin(temperature)
        terms: list[Any] = []
        if len(pairs):
            terms.append(HarmonicBonds.fit(positions, pairs, temperature))
        if angles:
            triples = bonded_triples(pairs.tolist(), n_beads)
            if len(triples):
                terms.append(HarmonicAngles.fit(positions, triples, temperature))
        if repulsion == "auto":
            repulsion = n_beads > 5
        elif not isinstance(repulsion, (bool, np.bool_)):
            raise PriorError(f"repulsion must be True, False or 'auto', got {repulsion!r}")
        if repulsion:
            repulsive_pairs = nonbonded_pairs(pairs.tolist(), n_beads, exclusion=2)
            if len(repulsive_pairs):
                terms.append(
                    Repulsion.fit(
                        positions, repulsive_pairs, temperature, strength=repulsion_strength, margin=repulsion_margin
                    )
                )
        if dihedrals:
            quadruples = bonded_quadruples(pairs.tolist(), n_beads)
            if len(quadruples):
                terms.append(Dihedrals.fit(positions, quadruples, temperature, periodicities=dihedral_periodicities))
        logger.info(
            "fitted priors on %d frames of %d beads: %s",
            positions.shape[0],
            n_beads,
            ", ".join(f"{type(term).__name__}({len(term)})" for term in terms),
        )
        return cls(terms, temperature=temperature_kelvin)

    def energy(self, positions: torch.Tensor) -> torch.Tensor:
        """Total prior energy ``(...)`` in kJ/mol of positions ``(..., n_beads, 3)`` in nm."""
        if not isinstance(positions, torch.Tensor):
            raise PriorError(f"Priors.energy takes a torch.Tensor, got {type(positions).__name__}")
        total = torch.zeros(positions.shape[:-2], dtype=positions.dtype, device=positions.device)
        for term in self.terms:
            total = total + term.energy(positions)
        return total

    def forces(self, positions: torch.Tensor) -> torch.Tensor:
        """Forces −∇E ``(..., n_beads, 3)`` in kJ/mol/nm (autograd)."""
        with torch.enable_grad():
            coordinates = positions.detach().requires_grad_(True)
            energy = self.energy(coordinates)
            (gradient,) = torch.autograd.grad(energy.sum(), coordinates)
        return -gradient

    def to_openmm_forces(self) -> list:
        """Standard OpenMM forces of all terms (group 0, non-periodic)."""
        forces = []
        for term in self.terms:
            forces.extend(term.to_openmm_forces())
        return forces

    def to_dict(self) -> dict:
        """JSON-able description with parameters in OpenMM units."""
        return {
            "format_version": PRIORS_FORMAT_VERSION,
            "temperature_k": self.temperature,
            "terms": [term.to_dict() for term in self.terms],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Priors:
        """Inverse of :meth:`to_dict`."""
        version = data.get("format_version", PRIORS_FORMAT_VERSION)
        if version > PRIORS_FORMAT_VERSION:
            raise PriorError(f"priors format version {version} is newer than this package understands")
        terms = []
        for entry in data.get("terms", []):
            kind = entry.get("type")
            if kind not in _TERM_TYPES:
                raise PriorError(f"unknown prior term type {kind!r}; known: {sorted(_TERM_TYPES)}")
            terms.append(_TERM_TYPES[kind].from_dict(entry))
        return cls(terms, temperature=data.get("temperature_k"))

    def __len__(self) -> int:
        return len(self.terms)

    def __repr__(self) -> str:
        inner = ", ".join(f"{type(term).__name__}({len(term)})" for term in self.terms)
        return f"Priors([{inner}])"
