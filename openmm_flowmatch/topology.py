"""Reading structures: all-atom topologies, fixing raw PDBs, and CG topologies of beads.

This module is part of the package's ground floor: it imports no other module of the package.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["TopologyError", "load_topology", "fix_pdb", "read_cg_topology", "write_cg_pdb"]


class TopologyError(ValueError):
    """A structure file cannot be read or fixed; the message names the file and what to do."""


MAX_ALPHA_CARBON_DISTANCE_NM: float = 0.45
"""Consecutive Cα beads of one chain farther apart than this (nm) mean a missing residue (trans
peptides put them 0.38 nm apart, cis peptides 0.29 nm)."""


def load_topology(source: Any):
    """Return an ``mdtraj.Topology`` for a file, an mdtraj or an OpenMM topology.

    Parameters
    ----------
    source
        A path to any structure file mdtraj can read (PDB, mmCIF, GRO, ...), an
        ``mdtraj.Topology``/``mdtraj.Trajectory``, an ``openmm.app.Topology``, or an
        ``openmm.app.PDBFile``/``PDBxFile``.

    Raises
    ------
    TopologyError
        If the file does not exist or cannot be read as a structure.
    """
    import mdtraj

    if isinstance(source, mdtraj.Topology):
        return source
    if isinstance(source, mdtraj.Trajectory):
        return source.topology
    import openmm.app as app

    if isinstance(source, app.Topology):
        return mdtraj.Topology.from_openmm(source)
    if isinstance(source, (app.PDBFile, app.PDBxFile)):
        return mdtraj.Topology.from_openmm(source.topology)
    if not isinstance(source, (str, os.PathLike)):
        raise TopologyError(
            f"cannot make a topology from a {type(source).__name__}; pass a structure file path, "
            "an mdtraj.Topology or an openmm.app.Topology"
        )
    path = Path(source)
    if not path.is_file():
        raise TopologyError(f"structure file {str(path)!r} does not exist")
    try:
        return mdtraj.load_topology(str(path))
    except Exception as error:
        raise TopologyError(
            f"cannot read a topology from {str(path)!r} ({type(error).__name__}: {error}); "
            "check that it is a valid PDB/mmCIF/GRO file"
        ) from error


CAPPING_RESIDUES = frozenset({"ACE", "NME", "NMA", "NH2"})
"""Terminal caps that pdbfixer counts as heterogens but that belong to the peptide."""


def _remove_heterogens_keeping_caps(fixer: Any) -> None:
    """Delete ligands, ions and water from a PDBFixer, keeping the peptide's ACE/NME caps."""
    import openmm.app as app
    from pdbfixer.pdbfixer import proteinResidues, dnaResidues, rnaResidues

    kept = set(proteinResidues) | set(dnaResidues) | set(rnaResidues) | CAPPING_RESIDUES
    heterogens = [residue for residue in fixer.topology.residues() if residue.name not in kept]
    if heterogens:
        modeller = app.Modeller(fixer.topology, fixer.positions)
        modeller.delete(heterogens)
        fixer.topology, fixer.positions = modeller.topology, modeller.positions


def fix_pdb(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    ph: float = 7.0,
    keep_heterogens: bool = False,
    add_missing_residues: bool = False,
) -> Path:
    """Complete a raw PDB with pdbfixer: missing heavy atoms and hydrogens (at ``ph``).

    Non-standard residues are replaced by standard ones, heterogens (ligands, ions, water)
    are removed unless ``keep_heterogens`` is set. Missing residues inside a chain are only
    built when ``add_missing_residues`` is set (building loops changes the sequence that was
    resolved in the experiment); missing terminal residues are never added.

    Parameters
    ----------
    input_path
        Raw PDB (or PDBx/mmCIF) file.
    output_path
        Where to write the fixed PDB.
    ph
        pH for protonation states of the added hydrogens.
    keep_heterogens
        Keep ligands, ions and water (default: remove them all).
    add_missing_residues
        Build missing internal residues too.

    Returns
    -------
    pathlib.Path
        ``output_path``.

    Raises
    ------
    TopologyError
        If the input cannot be read or fixed.
    """
    import openmm.app as app
    from pdbfixer import PDBFixer

    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise TopologyError(f"PDB file {str(input_path)!r} does not exist")
    with _default_openmm_platform("CPU"):
        fixer, n_missing_atoms = _run_pdbfixer(PDBFixer, input_path, add_missing_residues, keep_heterogens, ph)
    logger.info("fixed %s: %d missing heavy atoms added, hydrogens at pH %.1f", input_path, n_missing_atoms, ph)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "w") as handle:
        app.PDBFile.writeFile(fixer.topology, fixer.positions, handle, keepIds=True)
    return output_path


@contextlib.contextmanager
def _default_openmm_platform(name: str):
    """Make ``name`` OpenMM's default platform inside the block, unless the user chose one.

    pdbfixer creates Contexts without naming a platform; OpenMM then picks the fastest it finds,
    which is OpenCL wherever an OpenCL driver is installed, also a CPU one such as pocl (on which
    pdbfixer's minimisation crashed the process). ``$OPENMM_DEFAULT_PLATFORM`` set by the user wins.
    """
    if os.environ.get("OPENMM_DEFAULT_PLATFORM"):
        yield
        return
    os.environ["OPENMM_DEFAULT_PLATFORM"] = name
    try:
        yield
    finally:
        os.environ.pop("OPENMM_DEFAULT_PLATFORM", None)


def _run_pdbfixer(fixer_class, input_path: Path, add_missing_residues: bool, keep_heterogens: bool, ph: float):
    """pdbfixer's steps: missing residues (inner only), nonstandard residues, heterogens, atoms, hydrogens."""
    try:
        fixer = fixer_class(filename=str(input_path))
        fixer.findMissingResidues()
        if not add_missing_residues:
            fixer.missingResidues = {}
        else:
            chains = list(fixer.topology.chains())
            fixer.missingResidues = {
                key: residues
                for key, residues in fixer.missingResidues.items()
                if 0 < key[1] < len(list(chains[key[0]].residues()))
            }
        fixer.findNonstandardResidues()
        fixer.replaceNonstandardResidues()
        if not keep_heterogens:
            _remove_heterogens_keeping_caps(fixer)
        fixer.findMissingAtoms()
        n_missing_atoms = sum(len(atoms) for atoms in fixer.missingAtoms.values())
        fixer.addMissingAtoms()
        fixer.addMissingHydrogens(ph)
    except Exception as error:
        raise TopologyError(
            f"pdbfixer could not fix {str(input_path)!r} ({type(error).__name__}: {error})"
        ) from error
    return fixer, n_missing_atoms


def _read_conect_records(path: Path) -> list[tuple[int, int]]:
    """Bonds (0-based serial order) from the CONECT records of a PDB file."""
    serial_to_index: dict[int, int] = {}
    bonds: set[tuple[int, int]] = set()
    index = 0
    with open(path) as handle:
        lines = handle.readlines()
    for line in lines:
        if line.startswith(("ATOM", "HETATM")):
            try:
                serial_to_index[int(line[6:11])] = index
            except ValueError:
                pass
            index += 1
        elif line.startswith("ENDMDL"):
            break
    for line in lines:
        if not line.startswith("CONECT"):
            continue
        fields = [line[start : start + 5] for start in range(6, 31, 5)]
        serials = [int(field) for field in fields if field.strip()]
        if not serials:
            continue
        origin = serial_to_index.get(serials[0])
        for partner in serials[1:]:
            target = serial_to_index.get(partner)
            if origin is not None and target is not None and origin != target:
                bonds.add((min(origin, target), max(origin, target)))
    return sorted(bonds)


def read_cg_topology(pdb: str | os.PathLike, bonds: list[tuple[int, int]] | None = None):
    """Read a CG structure (one ATOM record per bead) into an element-free ``openmm.app.Topology``.

    Chains, residues and atom (bead) names are kept; every atom gets ``element=None`` (bead
    masses are carried separately). Bonds are, in order of preference: ``bonds`` if given,
    the file's CONECT records, or consecutive beads within each chain.

    Parameters
    ----------
    pdb
        PDB file of beads.
    bonds
        CG bonds as pairs of bead indices (overrides the file).

    Returns
    -------
    openmm.app.Topology

    Raises
    ------
    TopologyError
        If the file is missing or unreadable, or a bond index is out of range.
    """
    import openmm.app as app

    path = Path(pdb)
    if not path.is_file():
        raise TopologyError(f"CG structure file {str(path)!r} does not exist")
    try:
        structure = app.PDBFile(str(path))
    except Exception as error:
        raise TopologyError(
            f"cannot read CG structure {str(path)!r} ({type(error).__name__}: {error})"
        ) from error
    source = structure.topology
    _check_alpha_carbon_chains(source, structure.getPositions(asNumpy=True), path)
    topology = app.Topology()
    atoms = []
    chain_of_atom = []
    for chain_index, chain in enumerate(source.chains()):
        new_chain = topology.addChain(id=chain.id)
        for residue in chain.residues():
            new_residue = topology.addResidue(residue.name, new_chain, id=residue.id)
            for atom in residue.atoms():
                atoms.append(topology.addAtom(atom.name, None, new_residue))
                chain_of_atom.append(chain_index)
    if not atoms:
        raise TopologyError(f"CG structure {str(path)!r} holds no atoms")
    if bonds is None:
        bonds = _read_conect_records(path)
        if not bonds:
            bonds = [(index, index + 1) for index in range(len(atoms) - 1) if chain_of_atom[index] == chain_of_atom[index + 1]]
    for first, second in bonds:
        if not (0 <= first < len(atoms) and 0 <= second < len(atoms)):
            raise TopologyError(f"bond ({first}, {second}) is out of range for {len(atoms)} beads in {str(path)!r}")
        topology.addBond(atoms[first], atoms[second])
    box = source.getPeriodicBoxVectors()
    if box is not None:
        logger.info("%s has a periodic box; CG models are non-periodic and ignore it", path)
    return topology


def _check_alpha_carbon_chains(topology: Any, positions: Any, path: Path) -> None:
    """Refuse a Cα bead chain with a gap (a missing residue) between consecutive CA beads."""
    import openmm.unit as unit

    coordinates = np.asarray(positions.value_in_unit(unit.nanometer))
    for chain in topology.chains():
        atoms = [atom for atom in chain.atoms()]
        for previous, following in zip(atoms[:-1], atoms[1:]):
            if previous.name != "CA" or following.name != "CA":
                continue
            distance = float(np.linalg.norm(coordinates[following.index] - coordinates[previous.index]))
            if distance > MAX_ALPHA_CARBON_DISTANCE_NM:
                raise TopologyError(
                    f"{str(path)!r}: chain break between residue {previous.residue.name}{previous.residue.id} and "
                    f"{following.residue.name}{following.residue.id} of chain {chain.id} (Cα–Cα {distance:.2f} nm > "
                    f"{MAX_ALPHA_CARBON_DISTANCE_NM} nm): a residue is missing; use a complete structure or put the "
                    "two parts in separate chains"
                )


def write_cg_pdb(topology: Any, positions: Any, path: str | os.PathLike) -> Path:
    """Write a CG topology and bead positions (nm) as PDB, with CONECT records for every bond.

    OpenMM's ``PDBFile.writeFile`` omits CONECT records for bonds between standard residues;
    this writer adds them, so that :func:`read_cg_topology` reads back the same bond graph.
    """
    import openmm.unit as unit

    path = Path(path)
    if hasattr(positions, "value_in_unit"):
        positions = positions.value_in_unit(unit.nanometer)
    positions = np.asarray(positions, dtype=float).reshape(-1, 3)
    n_atoms = topology.getNumAtoms()
    if positions.shape[0] != n_atoms:
        raise TopologyError(f"{positions.shape[0]} positions for a topology of {n_atoms} beads")
    atoms = list(topology.atoms())
    records = []
    for line in _pdb_atom_lines(topology, positions * 10.0):
        records.append(line)
    neighbours: dict[int, list[int]] = {}
    for bond in topology.bonds():
        first, second = atoms.index(bond[0]), atoms.index(bond[1])
        neighbours.setdefault(first, []).append(second)
        neighbours.setdefault(second, []).append(first)
    for atom in sorted(neighbours):
        partners = neighbours[atom]
        for start in range(0, len(partners), 4):
            chunk = partners[start : start + 4]
            records.append("CONECT" + f"{atom + 1:5d}" + "".join(f"{partner + 1:5d}" for partner in chunk))
    records.append("END")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(records) + "\n")
    return path


def _pdb_atom_lines(topology: Any, positions_angstrom: np.ndarray) -> list[str]:
    lines = []
    serial = 0
    for chain in topology.chains():
        chain_id = (chain.id or "A")[:1]
        for residue_number, residue in enumerate(chain.residues(), start=1):
            try:
                number = int(residue.id)
            except (TypeError, ValueError):
                number = residue_number
            for atom in residue.atoms():
                x, y, z = positions_angstrom[serial]
                serial += 1
                name = atom.name if len(atom.name) >= 4 else f" {atom.name:<3s}"
                symbol = atom.element.symbol if atom.element is not None else ""
                lines.append(
                    f"ATOM  {serial:5d} {name:4s} {residue.name[:3]:>3s} {chain_id}{number:4d}    "
                    f"{x:8.3f}{y:8.3f}{z:8.3f}{1.0:6.2f}{0.0:6.2f}          {symbol:>2s}"
                )
        lines.append("TER")
    return lines


def replicate_topology(cg_topology: Any, replicas: int) -> Any:
    """A topology of ``replicas`` independent copies of ``cg_topology`` (each copy in new chains).

    Bead ``i`` of copy ``r`` becomes atom ``r·n_beads + i``; bonds are copied within each copy.
    This is the topology that ``FlowMatchForceField.create_system(..., replicas=R)`` expects.

    Raises
    ------
    TopologyError
        If ``replicas`` is smaller than 1.
    """
    import openmm.app as app

    if int(replicas) < 1:
        raise TopologyError(f"replicas must be >= 1, got {replicas}")
    result = app.Topology()
    for _ in range(int(replicas)):
        new_atoms = {}
        for chain in cg_topology.chains():
            new_chain = result.addChain(id=chain.id)
            for residue in chain.residues():
                new_residue = result.addResidue(residue.name, new_chain, id=residue.id)
                for atom in residue.atoms():
                    new_atoms[atom.index] = result.addAtom(atom.name, atom.element, new_residue)
        for first, second in cg_topology.bonds():
            result.addBond(new_atoms[first.index], new_atoms[second.index])
    return result
