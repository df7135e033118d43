"""Rotation- and translation-invariant features of a coarse-grained (CG) configuration.

:class:`InvariantFeatures` turns bead positions into the CGnet feature vector (Wang et al., ACS
Cent. Sci. 2019; Köhler et al., arXiv 2203.11167): bond lengths, bond angles, signed dihedrals as
(cos, sin), and distances between beads that are at least ``min_separation`` bonds apart in the CG
bond graph. The features are z-scored with means and standard deviations of the training
positions, stored in the module as buffers, so that a saved module carries its own
standardisation.

Signed dihedrals keep the handedness of the configuration: a mirror image flips every sin φ, so a
network on these features can tell enantiomers apart (distances alone cannot).

The module is TorchScript-compatible (``torch.jit.script``) and works on ``(n_beads, 3)`` or
``(batch, n_beads, 3)`` positions in nm, in float32 or float64 (computed in the input dtype).
"""

from __future__ import annotations

from collections import deque
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_FEATURE_SET",
    "DEFAULT_FEATURE_SETS",
    "FEATURE_SETS",
    "FeatureError",
    "InvariantFeatures",
    "chain_bonds",
    "feature_set_options",
    "graph_distances",
]

FEATURE_SETS: dict[str, dict] = {
    # Bond lengths and angles are left to the harmonic priors: the network sees what the priors
    # cannot express (signed dihedrals and distances of beads ≥ 3 bonds apart). Trained on a
    # flow's forces, a network that sees bonds or angles learns the jumps of the flow's spline
    # density along them and becomes too stiff to integrate (docs/benchmarks.md, "Time step").
    "dihedrals_and_distances": dict(
        include_bonds=False, include_angles=False, include_dihedrals=True, include_distances=True, min_separation=3
    ),
    # Everything but the bond lengths (the stiffest coordinates, left to the harmonic bond prior):
    # angles, signed dihedrals and distances of beads ≥ 2 bonds apart. For Cα proteins, whose CG
    # angles are soft and carry structure, a flow-matching network blind to angles fitted
    # chignolin's teacher worse (docs/benchmarks.md, "Chignolin").
    "all_but_bonds": dict(
        include_bonds=False, include_angles=True, include_dihedrals=True, include_distances=True, min_separation=2
    ),
    # The CGnet / paper feature set: bonds, angles, dihedrals and distances of non-bonded pairs.
    "all": dict(include_bonds=True, include_angles=True, include_dihedrals=True, include_distances=True, min_separation=2),
}
"""Named feature selections for :class:`InvariantFeatures` (see :func:`feature_set_options`)."""

DEFAULT_FEATURE_SET = "dihedrals_and_distances"
"""The feature set of the package's default flow-matching networks."""

DEFAULT_FEATURE_SETS: dict[str, str] = {"flow-matching": DEFAULT_FEATURE_SET, "force-matching": "all"}
"""Default feature set per training method. Only a flow's forces carry the spline-knot jumps that
make a network on bonds and angles stiff; force matching on mapped all-atom forces stays sound at
5 fs with every feature and is more accurate with them (docs/benchmarks.md, "Time step")."""


class FeatureError(ValueError):
    """Raised for an inconsistent bead count, bond graph or feature configuration."""


def chain_bonds(n_beads: int) -> list[tuple[int, int]]:
    """Bonds of a linear chain: ``[(0, 1), (1, 2), …, (n_beads − 2, n_beads − 1)]``."""
    return [(index, index + 1) for index in range(n_beads - 1)]


def graph_distances(n_beads: int, bonds: Sequence[tuple[int, int]]) -> np.ndarray:
    """Shortest-path lengths (number of bonds) between all beads of a bond graph.

    Returns
    -------
    numpy.ndarray
        ``(n_beads, n_beads)`` integer array; beads in different connected components get
        ``n_beads`` (further apart than any path).
    """
    neighbours: list[list[int]] = [[] for _ in range(n_beads)]
    for first, second in bonds:
        neighbours[first].append(second)
        neighbours[second].append(first)
    distances = np.full((n_beads, n_beads), n_beads, dtype=np.int64)
    for start in range(n_beads):
        distances[start, start] = 0
        queue = deque([start])
        while queue:
            bead = queue.popleft()
            for neighbour in neighbours[bead]:
                if distances[start, neighbour] > distances[start, bead] + 1:
                    distances[start, neighbour] = distances[start, bead] + 1
                    queue.append(neighbour)
    return distances


def feature_set_options(name: str, n_beads: int, bonds: Optional[Sequence[Sequence[int]]] = None) -> dict:
    """Constructor options of :class:`InvariantFeatures` for a named feature set.

    Parameters
    ----------
    name
        A key of :data:`FEATURE_SETS`: ``"dihedrals_and_distances"`` (default of the package:
        bonds and angles left to the priors) or ``"all"`` (CGnet's features).
    n_beads, bonds
        The CG molecule. A chain too short for the named set to select any feature (fewer than
        4 beads for ``"dihedrals_and_distances"``) falls back to ``"all"``.

    Raises
    ------
    FeatureError
        For an unknown name.
    """
    try:
        options = dict(FEATURE_SETS[name])
    except KeyError:
        raise FeatureError(f"unknown feature set {name!r}; choose one of {sorted(FEATURE_SETS)}") from None
    bond_list = _validated_bonds(int(n_beads), bonds)
    has_dihedrals = len(_dihedral_quadruples(int(n_beads), bond_list)) > 0
    has_far_pairs = bool((graph_distances(int(n_beads), bond_list) >= options["min_separation"]).any())
    if not (has_dihedrals and options["include_dihedrals"]) and not (has_far_pairs and options["include_distances"]):
        return dict(FEATURE_SETS["all"])
    return options


def _validated_bonds(n_beads: int, bonds: Optional[Sequence[Sequence[int]]]) -> list[tuple[int, int]]:
    if n_beads < 2:
        raise FeatureError(f"a CG model needs at least 2 beads, got n_beads={n_beads}")
    if bonds is None:
        return chain_bonds(n_beads)
    result = []
    for bond in bonds:
        first, second = (int(bond[0]), int(bond[1]))
        if not (0 <= first < n_beads and 0 <= second < n_beads) or first == second:
            raise FeatureError(
                f"bond ({first}, {second}) is not a pair of distinct beads in 0..{n_beads - 1}; "
                "check the CG bond graph (mapping.bonds)"
            )
        result.append((min(first, second), max(first, second)))
    return sorted(set(result))


def _angle_triples(n_beads: int, bonds: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    neighbours: list[list[int]] = [[] for _ in range(n_beads)]
    for first, second in bonds:
        neighbours[first].append(second)
        neighbours[second].append(first)
    triples = []
    for centre in range(n_beads):
        around = sorted(neighbours[centre])
        for a in range(len(around)):
            for b in range(a + 1, len(around)):
                triples.append((around[a], centre, around[b]))
    return sorted(triples)


def _dihedral_quadruples(n_beads: int, bonds: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    neighbours: list[list[int]] = [[] for _ in range(n_beads)]
    for first, second in bonds:
        neighbours[first].append(second)
        neighbours[second].append(first)
    quadruples = set()
    for second, third in bonds:
        for first in neighbours[second]:
            for fourth in neighbours[third]:
                if len({first, second, third, fourth}) < 4:
                    continue
                path = (first, second, third, fourth)
                # one orientation per path: the one whose first index is smaller than its last
                quadruples.add(path if first < fourth else path[::-1])
    return sorted(quadruples)


def _index_tensor(rows: Sequence[Sequence[int]], width: int) -> Tensor:
    if len(rows) == 0:
        return torch.zeros((0, width), dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long).reshape(-1, width)


class InvariantFeatures(nn.Module):
    """Z-scored bonds, angles, dihedral (cos, sin) and non-bonded distances of CG beads.

    Parameters
    ----------
    n_beads
        Number of CG beads.
    bonds
        CG bond graph as pairs of bead indices; default: a linear chain ``(i, i+1)``.
        Angles are all bonded triples, dihedrals all bonded paths of four beads.
    min_separation
        Pair distances are included for beads at least this many bonds apart in the graph
        (default 2, the CGnet choice for alanine dipeptide: all pairs except bonded ones).
    include_bonds, include_angles, include_dihedrals, include_distances
        Switch feature groups on or off (all on by default).
    mean, std
        Standardisation statistics, shape ``(n_features,)``; default 0 and 1. Use
        :meth:`fit_standardization` or :meth:`from_positions` to compute them from training data.

    Notes
    -----
    Feature order: bond lengths (nm), angles (rad, in [0, π]), for each dihedral cos φ then sin φ
    (IUPAC sign convention, as ``mdtraj.compute_dihedrals``), distances (nm).
    """


    def __init__(
        self,
        n_beads: int,
        bonds: Optional[Sequence[Sequence[int]]] = None,
        min_separation: int = 2,
        include_bonds: bool = True,
        include_angles: bool = True,
        include_dihedrals: bool = True,
        include_distances: bool = True,
        mean: Optional[Tensor] = None,
        std: Optional[Tensor] = None,
    ) -> None:
        super().__init__()
        n_beads = int(n_beads)
        bond_list = _validated_bonds(n_beads, bonds)
        if min_separation < 1:
            raise FeatureError(f"min_separation must be >= 1, got {min_separation}")
        separations = graph_distances(n_beads, bond_list)
        pairs = [
            (i, j) for i in range(n_beads) for j in range(i + 1, n_beads) if separations[i, j] >= min_separation
        ]
        self.n_beads = n_beads
        self.graph_bonds = bond_list
        self.min_separation = int(min_separation)
        self.include_groups = [bool(include_bonds), bool(include_angles), bool(include_dihedrals), bool(include_distances)]
        self.register_buffer("bond_index", _index_tensor(bond_list if include_bonds else [], 2))
        self.register_buffer(
            "angle_index", _index_tensor(_angle_triples(n_beads, bond_list) if include_angles else [], 3)
        )
        self.register_buffer(
            "dihedral_index",
            _index_tensor(_dihedral_quadruples(n_beads, bond_list) if include_dihedrals else [], 4),
        )
        self.register_buffer("pair_index", _index_tensor(pairs if include_distances else [], 2))
        self.n_features = (
            self.bond_index.shape[0]
            + self.angle_index.shape[0]
            + 2 * self.dihedral_index.shape[0]
            + self.pair_index.shape[0]
        )
        if self.n_features == 0:
            raise FeatureError("the feature configuration selects no features; switch a group on")
        self.n_bonds = int(self.bond_index.shape[0])
        self.n_pairs = int(self.pair_index.shape[0])
        self.n_angles = int(self.angle_index.shape[0])
        self.n_dihedrals = int(self.dihedral_index.shape[0])
        self.register_buffer("vector_index", self._vector_index())
        self.register_buffer("mean", torch.zeros(self.n_features, dtype=torch.float64))
        self.register_buffer("std", torch.ones(self.n_features, dtype=torch.float64))
        if mean is not None or std is not None:
            self.set_standardization(
                mean if mean is not None else torch.zeros(self.n_features),
                std if std is not None else torch.ones(self.n_features),
            )

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_positions(
        cls,
        positions: np.ndarray | Tensor,
        bonds: Optional[Sequence[Sequence[int]]] = None,
        min_separation: int = 2,
        **kwargs,
    ) -> "InvariantFeatures":
        """Features with standardisation fitted to ``positions`` ``(frames, n_beads, 3)`` in nm."""
        positions = torch.as_tensor(np.asarray(positions), dtype=torch.float64)
        if positions.dim() != 3 or positions.shape[-1] != 3:
            raise FeatureError(f"positions must have shape (frames, n_beads, 3), got {tuple(positions.shape)}")
        features = cls(positions.shape[1], bonds=bonds, min_separation=min_separation, **kwargs)
        features.fit_standardization(positions)
        return features

    @torch.jit.unused
    def fit_standardization(self, positions: np.ndarray | Tensor, batch_size: int = 4096) -> None:
        """Set mean and standard deviation of every feature from training positions (nm).

        Features with (numerically) zero spread keep a standard deviation of 1.
        """
        positions = torch.as_tensor(np.asarray(positions), dtype=torch.float64)
        if positions.dim() != 3 or positions.shape[1] != self.n_beads or positions.shape[2] != 3:
            raise FeatureError(
                f"positions must have shape (frames, {self.n_beads}, 3), got {tuple(positions.shape)}"
            )
        self.set_standardization(torch.zeros(self.n_features), torch.ones(self.n_features))
        with torch.no_grad():
            raw = torch.cat([self.raw(chunk) for chunk in positions.split(batch_size)])
        mean = raw.mean(dim=0)
        std = raw.std(dim=0, unbiased=False) if raw.shape[0] > 1 else torch.ones_like(mean)
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
        self.set_standardization(mean, std)

    @torch.jit.unused
    def set_standardization(self, mean: Tensor, std: Tensor) -> None:
        """Replace the stored feature mean and standard deviation."""
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
        if mean.numel() != self.n_features or std.numel() != self.n_features:
            raise FeatureError(f"mean and std need {self.n_features} entries, got {mean.numel()} and {std.numel()}")
        if not bool(torch.all(std > 0)):
            raise FeatureError("feature standard deviations must be positive")
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(std.to(self.std.dtype))

    @torch.jit.unused
    def config(self) -> dict:
        """JSON-able constructor arguments (without the standardisation buffers)."""
        include_bonds, include_angles, include_dihedrals, include_distances = self.include_groups
        return {
            "n_beads": self.n_beads,
            "bonds": [list(bond) for bond in self.graph_bonds],
            "min_separation": self.min_separation,
            "include_bonds": include_bonds,
            "include_angles": include_angles,
            "include_dihedrals": include_dihedrals,
            "include_distances": include_distances,
        }

    # ------------------------------------------------------------------ computation
    @torch.jit.unused
    def _vector_index(self) -> Tensor:
        """(start, end) bead pairs of every difference vector the features need, in one table.

        Layout: bonds, pairs, then the left operands of one batched cross product (angle arm
        u = p0 − p1, dihedral b1, dihedral b2) and its right operands (angle arm v = p2 − p1,
        dihedral b2, dihedral b3). One gather per call keeps the TorchScript op count (the cost
        of a 5-bead model in OpenMM) low.
        """
        angles, dihedrals = self.angle_index.tolist(), self.dihedral_index.tolist()
        rows = [list(row) for row in self.bond_index.tolist()] + [list(row) for row in self.pair_index.tolist()]
        rows += [[b, a] for a, b, _ in angles] + [[a, b] for a, b, _, _ in dihedrals] + [[b, c] for _, b, c, _ in dihedrals]
        rows += [[b, c] for _, b, c in angles] + [[b, c] for _, b, c, _ in dihedrals] + [[c, d] for _, _, c, d in dihedrals]
        return _index_tensor(rows, 2)

    def raw(self, positions: Tensor) -> Tensor:
        """Unstandardised features, ``(batch, n_features)`` for ``(batch, n_beads, 3)`` input."""
        # narrow/select instead of [:, a:b] slicing: one op each, the cost here is per op
        ends = positions.index_select(1, self.vector_index.flatten()).unflatten(1, (-1, 2))
        vectors = ends.select(2, 1) - ends.select(2, 0)
        n_lengths = self.n_bonds + self.n_pairs
        n_crosses = self.n_angles + 2 * self.n_dihedrals
        parts: List[Tensor] = []
        lengths = torch.linalg.vector_norm(vectors.narrow(1, 0, n_lengths), dim=-1)
        if self.n_bonds > 0:
            parts.append(lengths.narrow(1, 0, self.n_bonds))
        if n_crosses > 0:
            left = vectors.narrow(1, n_lengths, n_crosses)
            right = vectors.narrow(1, n_lengths + n_crosses, n_crosses)
            crosses = torch.linalg.cross(left, right, dim=-1)
            if self.n_angles > 0:
                cross = crosses.narrow(1, 0, self.n_angles)
                sine_part = torch.sqrt((cross * cross).sum(-1) + 1e-20)
                cosine_part = (left.narrow(1, 0, self.n_angles) * right.narrow(1, 0, self.n_angles)).sum(-1)
                parts.append(torch.atan2(sine_part, cosine_part))
            if self.n_dihedrals > 0:
                start = self.n_angles
                middle = start + self.n_dihedrals
                b1 = left.narrow(1, start, self.n_dihedrals)
                b2 = left.narrow(1, middle, self.n_dihedrals)
                n1 = crosses.narrow(1, start, self.n_dihedrals)
                n2 = crosses.narrow(1, middle, self.n_dihedrals)
                x = (n1 * n2).sum(-1)
                y = torch.linalg.vector_norm(b2, dim=-1) * (b1 * n2).sum(-1)
                radius = torch.sqrt(x * x + y * y + 1e-30)
                parts.append(torch.stack([x / radius, y / radius], dim=-1).flatten(-2))
        if self.n_pairs > 0:
            parts.append(lengths.narrow(1, self.n_bonds, self.n_pairs))
        return torch.cat(parts, dim=-1)

    def standardized(self, batch: Tensor) -> Tensor:
        """Standardised features ``(batch, n_features)`` of positions ``(batch, n_beads, 3)``.

        Networks call this on a batch and reshape only their final output.
        """
        return (self.raw(batch) - self.mean.to(batch.dtype)) / self.std.to(batch.dtype)

    def forward(self, positions: Tensor) -> Tensor:
        """Standardised features.

        Parameters
        ----------
        positions
            ``(n_beads, 3)`` or ``(batch, n_beads, 3)`` in nm, float32 or float64.

        Returns
        -------
        Tensor
            ``(n_features,)`` or ``(batch, n_features)`` in the dtype of ``positions``.
        """
        if positions.dim() < 2 or positions.dim() > 3 or positions.size(-2) != self.n_beads or positions.size(-1) != 3:
            raise ValueError("InvariantFeatures: positions must have shape (n_beads, 3) or (batch, n_beads, 3)")
        features = self.standardized(positions.reshape(-1, self.n_beads, 3))
        # reshape the output instead of branching on the input rank (a branch, or a reshape that
        # feeds further layers, trips TorchScript's profiling executor into dropping the gradient
        # with respect to the positions after a first call without gradients)
        shape: List[int] = list(positions.shape[:-2])
        shape.append(self.n_features)
        return features.reshape(shape)
