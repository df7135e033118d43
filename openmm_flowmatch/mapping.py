"""Coarse-grained mappings: which atoms make each bead, and how positions and forces map.

A :class:`CGMapping` holds, for every CG bead, the all-atom indices that make it and the
weights of the coordinate map ``M`` (beads × atoms, rows summing to one):

* slice beads (Cα, backbone, a selection, single indices) sit on one atom: ``M[b, a] = 1``;
* multi-atom beads (per-residue centre of mass, groups of indices) sit on the centre of mass
  of their atoms: ``M[b, a] = m_a / Σ m``.

The force map ``W`` (``f_CG = W · f_atoms``) is built from an all-atom ``openmm.System``
because it must respect the System's constraints (DESIGN.md, *Force maps*; Krämer et al.,
JCTC 2023). OpenMM never reports constraint forces, so a bead must collect the forces of every
atom joined to its atom(s) by a chain of constraints, and every atom of such a constraint
cluster must carry the same weight. :meth:`CGMapping.force_map` therefore puts weight 1 on

* every atom of the bead, and
* every atom in the same constraint cluster as an atom of the bead,

and 0 elsewhere. This ``W`` satisfies ``W · Mᵀ = I`` and gives atoms joined by a constraint
equal weights in every bead. A constraint cluster that touches two different beads has no valid
map of this kind, and raises :class:`MappingError`.

This module is part of the package's ground floor: it imports no other module of the package.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["CGMapping", "MappingError"]

MAPPING_FORMAT_VERSION = 1

# Capping groups and the one atom each contributes to a backbone map.
_BACKBONE_CAP_ATOMS = {"ACE": "C", "FOR": "C", "NME": "N", "NMA": "N", "NH2": "N"}
_BACKBONE_ATOMS = ("N", "CA", "C")


class MappingError(ValueError):
    """A CG mapping cannot be built or applied; the message names the atom/residue/file."""


MAX_ALPHA_CARBON_DISTANCE_NM: float = 0.45
"""Consecutive Cα of one chain farther apart than this (nm) mean a chain break (a missing residue):
trans peptides put them 0.38 nm apart, cis peptides 0.29 nm."""

MAX_PEPTIDE_BOND_NM: float = 0.2
"""A C(i)–N(i+1) distance above this (nm) is no peptide bond (its length is 0.133 nm)."""


# --------------------------------------------------------------------------------------------
# topology helpers
# --------------------------------------------------------------------------------------------


def _as_mdtraj_topology(topology: Any):
    """Return an ``mdtraj.Topology`` for an mdtraj or OpenMM topology (or an mdtraj Trajectory)."""
    import mdtraj

    if isinstance(topology, mdtraj.Topology):
        return topology
    if isinstance(topology, mdtraj.Trajectory):
        return topology.topology
    import openmm.app as app

    if isinstance(topology, app.Topology):
        return mdtraj.Topology.from_openmm(topology)
    if isinstance(topology, (app.PDBFile, app.PDBxFile)):
        return mdtraj.Topology.from_openmm(topology.topology)
    raise MappingError(
        f"expected an mdtraj.Topology, an openmm.app.Topology or a structure file path, "
        f"got {type(topology).__name__}"
    )


def _load_structure_file(path: str):
    """The structure with its first frame (an ``mdtraj.Trajectory``), or its topology alone if no frame reads."""
    import mdtraj

    if not Path(path).is_file():
        raise MappingError(f"structure file {path!r} does not exist")
    try:
        return mdtraj.load(path, frame=0)
    except Exception:  # a topology-only file (e.g. PSF/PRMTOP) or one mdtraj cannot read: see below
        logger.debug("no coordinates read from %s; reading its topology alone", path)
    try:
        return mdtraj.load_topology(path)
    except Exception as error:
        raise MappingError(
            f"cannot read a topology from {path!r} ({type(error).__name__}: {error}); "
            "check that it is a valid PDB/mmCIF/GRO file"
        ) from error


def _accepts_structure_file(constructor):
    """Let a constructor take a structure file path; its errors then name the file."""

    @functools.wraps(constructor)
    def wrapper(cls, topology, *args, **kwargs):
        if not isinstance(topology, (str, os.PathLike)):
            return constructor(cls, topology, *args, **kwargs)
        path = str(topology)
        try:
            return constructor(cls, _load_structure_file(path), *args, **kwargs)
        except MappingError as error:
            if path in str(error):
                raise
            raise MappingError(f"{path}: {error}") from error

    return wrapper


def _describe_atom(atom) -> str:
    residue = atom.residue
    return f"atom {atom.name} (index {atom.index}) of residue {residue.name}{residue.resSeq}"


def _describe_residue(residue) -> str:
    return f"residue {residue.name}{residue.resSeq} (index {residue.index}, chain {residue.chain.index})"


def _atom_mass(atom) -> float:
    element = atom.element
    mass = getattr(element, "mass", None) if element is not None else None
    if mass is None:
        return 0.0
    return float(mass)


def _find_atom(residue, name: str, map_name: str):
    for atom in residue.atoms:
        if atom.name == name:
            return atom
    raise MappingError(
        f"{_describe_residue(residue)} has no atom {name!r}, which the {map_name} map needs; "
        "fix the structure (e.g. openmm_flowmatch.topology.fix_pdb) or choose another mapping"
    )


def _is_amino_acid(residue) -> bool:
    return bool(residue.is_protein) and residue.name not in _BACKBONE_CAP_ATOMS


def _atom_named(residue, name: str):
    return next((atom for atom in residue.atoms if atom.name == name), None)


def _chain_gap(previous, following, positions: np.ndarray) -> str | None:
    """What breaks the chain between two consecutive residues, or ``None``."""
    carbon, nitrogen = _atom_named(previous, "C"), _atom_named(following, "N")
    if carbon is not None and nitrogen is not None:
        distance = float(np.linalg.norm(positions[nitrogen.index] - positions[carbon.index]))
        if distance > MAX_PEPTIDE_BOND_NM:
            return f"C–N {distance:.2f} nm > {MAX_PEPTIDE_BOND_NM} nm, no peptide bond"
    first, second = _atom_named(previous, "CA"), _atom_named(following, "CA")
    if first is not None and second is not None:
        distance = float(np.linalg.norm(positions[second.index] - positions[first.index]))
        if distance > MAX_ALPHA_CARBON_DISTANCE_NM:
            return f"Cα–Cα {distance:.2f} nm > {MAX_ALPHA_CARBON_DISTANCE_NM} nm"
    return None


def _check_chain_continuity(topology, positions: np.ndarray) -> None:
    """Refuse a chain with a missing residue (a gap between consecutive amino acids)."""
    if positions.shape[0] != topology.n_atoms:
        raise MappingError(f"{positions.shape[0]} positions for a topology of {topology.n_atoms} atoms")
    for chain in topology.chains:
        residues = [residue for residue in chain.residues if _is_amino_acid(residue)]
        for previous, following in zip(residues[:-1], residues[1:]):
            gap = _chain_gap(previous, following, positions)
            if gap is not None:
                raise MappingError(
                    f"chain break between {_describe_residue(previous)} and {_describe_residue(following)} "
                    f"({gap}): a residue is missing; complete the structure (openmm_flowmatch.topology.fix_pdb "
                    "with add_missing_residues=True) or put the two parts in separate chains"
                )


def _chain_bonds(chain_indices: Sequence[int]) -> list[tuple[int, int]]:
    """Bonds between consecutive beads that belong to the same chain."""
    return [
        (index, index + 1)
        for index in range(len(chain_indices) - 1)
        if chain_indices[index] == chain_indices[index + 1]
    ]


def _as_array(values: Any, what: str) -> np.ndarray:
    """Strip ``openmm.unit`` (to nm / kJ/mol/nm) or take ``.xyz`` of an mdtraj Trajectory."""
    if hasattr(values, "xyz") and hasattr(values, "topology"):
        values = values.xyz
    if hasattr(values, "value_in_unit"):
        import openmm.unit as unit

        target = unit.nanometer if what == "positions" else unit.kilojoule_per_mole / unit.nanometer
        if not values.unit.is_compatible(target):
            raise MappingError(f"{what} must be in units compatible with {target}, got {values.unit}")
        values = values.value_in_unit(target)
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=float)


def _apply_map(matrix: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``matrix @ values`` over the atoms with a non-zero weight only: (frames, atoms, 3) → (frames, beads, 3)."""
    used = np.flatnonzero(np.any(matrix != 0.0, axis=0))
    return np.matmul(matrix[:, used], values[:, used])


class _DisjointSets:
    """Union-find over particle indices (constraint clusters)."""

    def __init__(self, size: int) -> None:
        self.parent = np.arange(size)

    def find(self, index: int) -> int:
        root = index
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[index] != root:
            self.parent[index], index = root, self.parent[index]
        return int(root)

    def union(self, first: int, second: int) -> None:
        first_root, second_root = self.find(first), self.find(second)
        if first_root != second_root:
            self.parent[max(first_root, second_root)] = min(first_root, second_root)


# --------------------------------------------------------------------------------------------
# CGMapping
# --------------------------------------------------------------------------------------------


class CGMapping:
    """A linear map from all-atom to coarse-grained coordinates, with its force map.

    Build one with a constructor classmethod (:meth:`alpha_carbons`, :meth:`backbone`,
    :meth:`from_selection`, :meth:`from_indices`, :meth:`center_of_mass`) or read one back
    with :meth:`from_dict`. Constructors take an ``mdtraj.Topology``, an ``openmm.app.Topology``
    or the path of a structure file (then errors name the file).

    Parameters
    ----------
    n_atoms
        Number of atoms of the all-atom system.
    bead_atoms
        All-atom indices of each bead.
    bead_weights
        Coordinate-map weights of each bead's atoms (same shape as ``bead_atoms``, each
        summing to one).
    bead_names, residue_names, residue_indices, chain_indices, elements, masses
        Per-bead labels: bead name, name and index of the residue the bead belongs to, index of
        its chain, element symbol (``None`` for multi-atom beads) and mass in amu.
    bonds
        CG bond graph, pairs of bead indices. ``None``: consecutive beads of each chain.
    residue_numbers
        Residue numbers (PDB resSeq) of the beads' residues; default ``residue_indices + 1``.
    atom_labels
        Optional human-readable labels of the all-atom atoms, used in error messages.

    Attributes
    ----------
    n_atoms, n_beads : int
    bead_atoms : list of list of int
    bead_names, residue_names : list of str
    residue_indices, chain_indices : list of int
    elements : list of str or None
    masses : numpy.ndarray
        ``(n_beads,)`` bead masses in amu (sum of the masses of the bead's atoms, standard
        element masses of the topology, i.e. without hydrogen mass repartitioning).
    bonds : list of tuple of int
    """

    def __init__(
        self,
        n_atoms: int,
        bead_atoms: Sequence[Sequence[int]],
        bead_weights: Sequence[Sequence[float]],
        bead_names: Sequence[str],
        residue_names: Sequence[str],
        residue_indices: Sequence[int],
        chain_indices: Sequence[int],
        elements: Sequence[str | None],
        masses: Sequence[float],
        bonds: Sequence[tuple[int, int]] | None = None,
        residue_numbers: Sequence[int] | None = None,
        atom_labels: Sequence[str] | None = None,
    ) -> None:
        self.n_atoms = int(n_atoms)
        self.bead_atoms = [[int(atom) for atom in atoms] for atoms in bead_atoms]
        self.bead_weights = [[float(weight) for weight in weights] for weights in bead_weights]
        self.bead_names = [str(name) for name in bead_names]
        self.residue_names = [str(name) for name in residue_names]
        self.residue_indices = [int(index) for index in residue_indices]
        self.chain_indices = [int(index) for index in chain_indices]
        self.elements = [None if element is None else str(element) for element in elements]
        self.masses = np.asarray(masses, dtype=float).reshape(-1)
        if residue_numbers is None:
            residue_numbers = [index + 1 for index in self.residue_indices]
        self.residue_numbers = [int(number) for number in residue_numbers]
        self.atom_labels = None if atom_labels is None else [str(label) for label in atom_labels]
        self.n_beads = len(self.bead_atoms)
        if bonds is None:
            bonds = _chain_bonds(self.chain_indices)
        self.bonds = [(int(first), int(second)) for first, second in bonds]
        self._validate()

    # ---------------------------------------------------------------- validation

    def _validate(self) -> None:
        if self.n_beads == 0:
            raise MappingError("a CG mapping needs at least one bead; the selection matched no atom")
        per_bead = {
            "bead_weights": self.bead_weights,
            "bead_names": self.bead_names,
            "residue_names": self.residue_names,
            "residue_indices": self.residue_indices,
            "chain_indices": self.chain_indices,
            "elements": self.elements,
            "masses": self.masses,
            "residue_numbers": self.residue_numbers,
        }
        for name, values in per_bead.items():
            if len(values) != self.n_beads:
                raise MappingError(f"{name} has {len(values)} entries for {self.n_beads} beads")
        seen: dict[int, int] = {}
        for bead, (atoms, weights) in enumerate(zip(self.bead_atoms, self.bead_weights)):
            if not atoms:
                raise MappingError(f"bead {bead} ({self.bead_names[bead]}) has no atoms")
            if len(weights) != len(atoms):
                raise MappingError(f"bead {bead} has {len(atoms)} atoms but {len(weights)} weights")
            if not np.isclose(sum(weights), 1.0, atol=1e-8):
                raise MappingError(f"coordinate weights of bead {bead} sum to {sum(weights)}, not 1")
            for atom in atoms:
                if not 0 <= atom < self.n_atoms:
                    raise MappingError(
                        f"atom index {atom} of bead {bead} ({self.bead_names[bead]}) is out of range "
                        f"for a topology of {self.n_atoms} atoms (valid: 0..{self.n_atoms - 1})"
                    )
                if atom in seen and seen[atom] != bead:
                    raise MappingError(
                        f"{self._atom_label(atom)} belongs to beads {seen[atom]} and {bead}; "
                        "each atom may belong to one bead only"
                    )
                seen[atom] = bead
        for first, second in self.bonds:
            if not (0 <= first < self.n_beads and 0 <= second < self.n_beads) or first == second:
                raise MappingError(f"CG bond ({first}, {second}) is invalid for {self.n_beads} beads")
        if np.any(~np.isfinite(self.masses)) or np.any(self.masses <= 0.0):
            bead = int(np.flatnonzero(~(self.masses > 0.0))[0])
            raise MappingError(
                f"bead {bead} ({self.bead_names[bead]}) has mass {self.masses[bead]} amu; "
                "beads need a positive mass (atoms without an element have mass 0)"
            )

    def _atom_label(self, atom: int) -> str:
        if self.atom_labels is not None and 0 <= atom < len(self.atom_labels):
            return self.atom_labels[atom]
        return f"atom {atom}"

    # ---------------------------------------------------------------- constructors

    @classmethod
    def _from_topology(
        cls,
        topology: Any,
        groups: Sequence[Sequence[int]],
        names: Sequence[str] | None = None,
        bonds: Sequence[tuple[int, int]] | None = None,
    ) -> CGMapping:
        """Beads from groups of atom indices: one atom → slice bead, several → centre of mass."""
        topology = _as_mdtraj_topology(topology)
        atoms = list(topology.atoms)
        bead_atoms, bead_weights, elements, masses = [], [], [], []
        residue_names, residue_indices, residue_numbers, chain_indices, bead_names = [], [], [], [], []
        for bead, group in enumerate(groups):
            group = [int(index) for index in group]
            if not group:
                raise MappingError(f"bead {bead} has no atoms")
            for index in group:
                if not 0 <= index < topology.n_atoms:
                    raise MappingError(
                        f"atom index {index} of bead {bead} is out of range for a topology of "
                        f"{topology.n_atoms} atoms (valid: 0..{topology.n_atoms - 1})"
                    )
            if len(set(group)) != len(group):
                raise MappingError(f"bead {bead} lists an atom twice: {group}")
            group_masses = np.array([_atom_mass(atoms[index]) for index in group])
            if np.any(group_masses <= 0.0):
                bad = atoms[group[int(np.flatnonzero(group_masses <= 0.0)[0])]]
                raise MappingError(
                    f"{_describe_atom(bad)} has no element mass; beads need atoms with a known "
                    "element (check the element column of the PDB)"
                )
            first = atoms[group[0]]
            bead_atoms.append(group)
            bead_weights.append(list(group_masses / group_masses.sum()))
            masses.append(float(group_masses.sum()))
            if len(group) == 1:
                elements.append(first.element.symbol if first.element is not None else None)
                default_name = first.name
            else:
                elements.append(None)
                default_name = f"B{first.residue.name}"[:4]
            bead_names.append(default_name)
            residue_names.append(first.residue.name)
            residue_indices.append(first.residue.index)
            residue_numbers.append(first.residue.resSeq)
            chain_indices.append(first.residue.chain.index)
        if names is not None:
            names = [str(name) for name in names]
            if len(names) != len(bead_atoms):
                raise MappingError(f"got {len(names)} bead names for {len(bead_atoms)} beads")
            bead_names = names
        return cls(
            n_atoms=topology.n_atoms,
            bead_atoms=bead_atoms,
            bead_weights=bead_weights,
            bead_names=bead_names,
            residue_names=residue_names,
            residue_indices=residue_indices,
            chain_indices=chain_indices,
            elements=elements,
            masses=masses,
            bonds=bonds,
            residue_numbers=residue_numbers,
            atom_labels=[_describe_atom(atom) for atom in atoms],
        )

    @classmethod
    @_accepts_structure_file
    def alpha_carbons(cls, topology: Any, positions: Any = None) -> CGMapping:
        """One bead on the Cα of every amino-acid residue.

        Capping groups (ACE, NME, ...) and non-protein residues get no bead. Where coordinates are
        known (a structure file, an ``mdtraj.Trajectory``, or ``positions``) the chains are
        checked for breaks first: consecutive residues of a chain whose Cα are more than
        :data:`MAX_ALPHA_CARBON_DISTANCE_NM` (0.45 nm) apart, or whose C(i)–N(i+1) is longer than
        :data:`MAX_PEPTIDE_BOND_NM` (0.2 nm), have a missing residue between them, and a Cα bond
        across the gap would be wrong.

        Parameters
        ----------
        topology
            All-atom mdtraj or OpenMM topology, ``mdtraj.Trajectory`` or structure file path.
        positions
            Optional ``(atoms, 3)`` nm (array or quantity) for the chain-break check.

        Raises
        ------
        MappingError
            If an amino-acid residue has no ``CA`` atom, the topology has no amino acid, or a chain
            has a break (the message names the two residues).
        """
        if positions is None and hasattr(topology, "xyz") and hasattr(topology, "topology"):
            positions = topology.xyz[0]
        topology = _as_mdtraj_topology(topology)
        if positions is not None:
            _check_chain_continuity(topology, _as_array(positions, "positions").reshape(-1, 3))
        groups = [
            [_find_atom(residue, "CA", "alpha-carbon").index]
            for residue in topology.residues
            if _is_amino_acid(residue)
        ]
        if not groups:
            raise MappingError("the topology has no amino-acid residue, so no Cα bead")
        return cls._from_topology(topology, groups)

    @classmethod
    @_accepts_structure_file
    def backbone(cls, topology: Any) -> CGMapping:
        """Backbone beads: N, CA, C of every amino acid, plus ACE's C and NME's N.

        For the capped alanine dipeptide (ACE-ALA-NME) this gives the five beads ACE C, ALA N,
        ALA CA, ALA C, NME N, so that φ and ψ are the CG dihedrals (0, 1, 2, 3) and
        (1, 2, 3, 4).

        Raises
        ------
        MappingError
            If an amino-acid residue lacks N, CA or C, or a cap lacks its backbone atom.
        """
        topology = _as_mdtraj_topology(topology)
        groups = []
        for residue in topology.residues:
            if residue.name in _BACKBONE_CAP_ATOMS:
                groups.append([_find_atom(residue, _BACKBONE_CAP_ATOMS[residue.name], "backbone").index])
            elif _is_amino_acid(residue):
                groups.extend([_find_atom(residue, name, "backbone").index] for name in _BACKBONE_ATOMS)
        if not groups:
            raise MappingError("the topology has no amino-acid residue, so no backbone bead")
        return cls._from_topology(topology, groups)

    @classmethod
    @_accepts_structure_file
    def from_selection(cls, topology: Any, selection: str) -> CGMapping:
        """One bead per atom selected by an mdtraj selection string (e.g. ``"name CA or name CB"``).

        Beads follow atom order; consecutive beads of a chain are bonded.
        """
        topology = _as_mdtraj_topology(topology)
        try:
            indices = topology.select(selection)
        except Exception as error:
            raise MappingError(f"invalid mdtraj selection {selection!r}: {error}") from error
        if len(indices) == 0:
            raise MappingError(f"the selection {selection!r} matches no atom of the topology")
        return cls._from_topology(topology, [[int(index)] for index in indices])

    @classmethod
    @_accepts_structure_file
    def from_indices(
        cls,
        topology: Any,
        indices: Sequence[int | Sequence[int]],
        names: Sequence[str] | None = None,
        bonds: Sequence[tuple[int, int]] | None = None,
    ) -> CGMapping:
        """Beads from explicit atom indices.

        Parameters
        ----------
        topology
            All-atom mdtraj or OpenMM topology.
        indices
            One entry per bead: an atom index (slice bead) or a sequence of atom indices (bead
            at the centre of mass of those atoms).
        names
            Bead names; default: the atom name for slice beads, ``"B" + residue name`` otherwise.
        bonds
            CG bonds; default: consecutive beads of each chain.
        """
        groups = [[entry] if np.ndim(entry) == 0 else list(entry) for entry in indices]
        return cls._from_topology(topology, groups, names=names, bonds=bonds)

    @classmethod
    @_accepts_structure_file
    def center_of_mass(cls, topology: Any) -> CGMapping:
        """One bead per residue, at the residue's centre of mass, named ``"B" + residue name``."""
        topology = _as_mdtraj_topology(topology)
        groups = [[atom.index for atom in residue.atoms] for residue in topology.residues]
        groups = [group for group in groups if group]
        return cls._from_topology(topology, groups)

    # ---------------------------------------------------------------- coordinate map

    NAMED_MAPPINGS = {
        "backbone": "backbone",
        "alpha_carbons": "alpha_carbons",
        "ca": "alpha_carbons",
        "center_of_mass": "center_of_mass",
        "com": "center_of_mass",
    }
    """Names accepted by :meth:`from_name` (and by ``--mapping`` on the command line)."""

    @classmethod
    def from_name(cls, name: str, topology: Any) -> CGMapping:
        """Build a mapping by name: ``backbone``, ``alpha_carbons`` (``ca``) or ``center_of_mass`` (``com``).

        Raises
        ------
        MappingError
            If ``name`` is not one of :attr:`NAMED_MAPPINGS`.
        """
        constructor = cls.NAMED_MAPPINGS.get(str(name).lower())
        if constructor is None:
            raise MappingError(f"unknown mapping {name!r}; use one of {sorted(cls.NAMED_MAPPINGS)} or a CGMapping")
        return getattr(cls, constructor)(topology)

    def coordinate_matrix(self) -> np.ndarray:
        """The coordinate map ``M`` as a dense ``(n_beads, n_atoms)`` array; rows sum to 1."""
        matrix = np.zeros((self.n_beads, self.n_atoms))
        for bead, (atoms, weights) in enumerate(zip(self.bead_atoms, self.bead_weights)):
            matrix[bead, atoms] = weights
        return matrix

    def _check_atom_array(self, values: Any, what: str) -> np.ndarray:
        array = _as_array(values, what)
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3 or array.shape[-1] != 3:
            raise MappingError(
                f"{what} must have shape (atoms, 3) or (frames, atoms, 3), got {array.shape}"
            )
        if array.shape[1] != self.n_atoms:
            raise MappingError(
                f"{what} have {array.shape[1]} atoms but the mapping's topology has {self.n_atoms}; "
                "use the trajectory and topology of the same system"
            )
        finite = np.isfinite(array)
        if not finite.all():
            frame, atom, _ = np.argwhere(~finite)[0]
            raise MappingError(
                f"{what} contain NaN or infinite values (first at frame {frame}, "
                f"{self._atom_label(int(atom))}); the simulation probably blew up"
            )
        return array

    def map_positions(self, positions: Any) -> np.ndarray:
        """Map all-atom positions to bead positions.

        Parameters
        ----------
        positions
            ``(atoms, 3)`` or ``(frames, atoms, 3)`` in nm (array, ``openmm.unit`` quantity or
            ``mdtraj.Trajectory``).

        Returns
        -------
        numpy.ndarray
            ``(frames, beads, 3)`` bead positions in nm (``frames = 1`` for a single frame).
        """
        positions = self._check_atom_array(positions, "positions")
        return _apply_map(self.coordinate_matrix(), positions)

    # ---------------------------------------------------------------- force map

    def constraint_clusters(self, system: Any) -> list[list[int]]:
        """Groups of atoms joined by chains of constraints in ``system`` (size ≥ 2 only)."""
        self._check_system(system)
        sets = _DisjointSets(self.n_atoms)
        for index in range(system.getNumConstraints()):
            first, second, _ = system.getConstraintParameters(index)
            sets.union(int(first), int(second))
        clusters: dict[int, list[int]] = {}
        for atom in range(self.n_atoms):
            clusters.setdefault(sets.find(atom), []).append(atom)
        return [members for members in clusters.values() if len(members) > 1]

    def _check_system(self, system: Any) -> None:
        if system is None:
            return
        if not hasattr(system, "getNumParticles"):
            raise MappingError(f"expected an openmm.System, got {type(system).__name__}")
        if system.getNumParticles() != self.n_atoms:
            raise MappingError(
                f"the System has {system.getNumParticles()} particles but the mapping's topology has "
                f"{self.n_atoms} atoms; build the System from the same topology"
            )
        for atom in range(self.n_atoms):
            if system.isVirtualSite(atom) and any(atom in atoms for atoms in self.bead_atoms):
                raise MappingError(f"{self._atom_label(atom)} is a virtual site and cannot be a bead atom")

    def force_map(self, system: Any = None) -> np.ndarray:
        """Constraint-valid force map ``W`` (``f_CG = W · f_atoms``) for an all-atom System.

        Every atom of a bead, and every atom joined to one of them by a chain of constraints of
        ``system``, gets weight 1 in that bead; all other atoms get 0. Then ``W · Mᵀ = I`` and
        atoms joined by a constraint carry equal weights in every bead, so the mean of
        ``W · f`` is the CG mean force even though OpenMM's forces lack constraint forces.

        Parameters
        ----------
        system
            The all-atom ``openmm.System`` whose forces will be mapped (its constraints matter).
            ``None`` means a system without constraints.

        Returns
        -------
        numpy.ndarray
            ``(n_beads, n_atoms)`` weights.

        Raises
        ------
        MappingError
            If the System's particle count differs from the mapping's, or a constraint cluster
            joins atoms of two different beads.
        """
        owner = np.full(self.n_atoms, -1)
        for bead, atoms in enumerate(self.bead_atoms):
            owner[atoms] = bead
        weights = np.zeros((self.n_beads, self.n_atoms))
        for bead, atoms in enumerate(self.bead_atoms):
            weights[bead, atoms] = 1.0
        if system is None:
            return weights
        for cluster in self.constraint_clusters(system):
            beads = sorted({int(owner[atom]) for atom in cluster if owner[atom] >= 0})
            if len(beads) > 1:
                first = next(atom for atom in cluster if owner[atom] == beads[0])
                second = next(atom for atom in cluster if owner[atom] == beads[1])
                raise MappingError(
                    f"constraints join {self._atom_label(first)} (bead {beads[0]}, "
                    f"{self.bead_names[beads[0]]}) and {self._atom_label(second)} (bead {beads[1]}, "
                    f"{self.bead_names[beads[1]]}); no constraint-valid force map exists. Use fewer "
                    "constraints (e.g. constraints=None or HBonds) or put these atoms in one bead"
                )
            if beads:
                weights[beads[0], cluster] = 1.0
        return weights

    def map_forces(self, forces: Any, system: Any = None) -> np.ndarray:
        """Map all-atom forces to CG forces with :meth:`force_map`.

        Parameters
        ----------
        forces
            ``(atoms, 3)`` or ``(frames, atoms, 3)`` in kJ/mol/nm (array or quantity), as
            returned by OpenMM's ``getForces()`` (without constraint forces).
        system
            The all-atom ``openmm.System`` that produced the forces.

        Returns
        -------
        numpy.ndarray
            ``(frames, beads, 3)`` CG forces in kJ/mol/nm.
        """
        forces = self._check_atom_array(forces, "forces")
        return _apply_map(self.force_map(system), forces)

    # ---------------------------------------------------------------- CG topology

    def cg_topology(self):
        """The CG ``openmm.app.Topology``: one atom per bead, element-free.

        Chains follow the all-atom chains, one residue per all-atom residue that holds beads
        (residue names and numbers kept), one atom per bead named by its bead name with
        ``element=None`` (bead masses are carried by :attr:`masses`), bonds from :attr:`bonds`.
        """
        import openmm.app as app

        topology = app.Topology()
        chains: dict[int, Any] = {}
        residues: dict[int, Any] = {}
        atoms = []
        for bead in range(self.n_beads):
            chain_index = self.chain_indices[bead]
            if chain_index not in chains:
                chains[chain_index] = topology.addChain(id=chr(ord("A") + len(chains) % 26))
            residue_index = self.residue_indices[bead]
            if residue_index not in residues:
                residues[residue_index] = topology.addResidue(
                    self.residue_names[bead], chains[chain_index], id=str(self.residue_numbers[bead])
                )
            atoms.append(topology.addAtom(self.bead_names[bead], None, residues[residue_index]))
        for first, second in self.bonds:
            topology.addBond(atoms[first], atoms[second])
        return topology

    # ---------------------------------------------------------------- serialisation

    def topology_description(self) -> dict:
        """The CG topology as plain JSON: bead names, residue names, elements, masses (amu), bonds."""
        return {
            "bead_names": list(self.bead_names),
            "residue_names": list(self.residue_names),
            "elements": list(self.elements),
            "masses": [float(mass) for mass in self.masses],
            "bonds": [list(bond) for bond in self.bonds],
        }

    def to_dict(self) -> dict:
        """JSON-able description (goes into the artifact metadata)."""
        return {
            "format_version": MAPPING_FORMAT_VERSION,
            "n_atoms": self.n_atoms,
            "bead_atoms": [list(atoms) for atoms in self.bead_atoms],
            "bead_weights": [list(weights) for weights in self.bead_weights],
            "bead_names": list(self.bead_names),
            "residue_names": list(self.residue_names),
            "residue_indices": list(self.residue_indices),
            "residue_numbers": list(self.residue_numbers),
            "chain_indices": list(self.chain_indices),
            "elements": list(self.elements),
            "masses": [float(mass) for mass in self.masses],
            "bonds": [list(bond) for bond in self.bonds],
        }

    @classmethod
    def from_dict(cls, data: dict) -> CGMapping:
        """Inverse of :meth:`to_dict`."""
        version = data.get("format_version", MAPPING_FORMAT_VERSION)
        if version > MAPPING_FORMAT_VERSION:
            raise MappingError(
                f"mapping format version {version} is newer than this package understands "
                f"({MAPPING_FORMAT_VERSION}); update openmm_flowmatch"
            )
        try:
            return cls(
                n_atoms=data["n_atoms"],
                bead_atoms=data["bead_atoms"],
                bead_weights=data["bead_weights"],
                bead_names=data["bead_names"],
                residue_names=data["residue_names"],
                residue_indices=data["residue_indices"],
                chain_indices=data["chain_indices"],
                elements=data["elements"],
                masses=data["masses"],
                bonds=[tuple(bond) for bond in data["bonds"]],
                residue_numbers=data.get("residue_numbers"),
            )
        except KeyError as error:
            raise MappingError(f"mapping description lacks the field {error.args[0]!r}") from error

    def __repr__(self) -> str:
        return f"CGMapping(n_atoms={self.n_atoms}, n_beads={self.n_beads}, beads={self.bead_names})"
