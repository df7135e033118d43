"""Tests of structure reading: load_topology, fix_pdb (pdbfixer), CG PDB round trips."""

from __future__ import annotations

from pathlib import Path

import mdtraj
import numpy as np
import openmm.app as app
import openmm.unit as unit
import pytest

from openmm_flowmatch.mapping import CGMapping
from openmm_flowmatch.topology import TopologyError, fix_pdb, load_topology, read_cg_topology, write_cg_pdb

RESOURCES = Path(__file__).resolve().parents[1] / "openmm_flowmatch" / "resources"
CHIGNOLIN_PDB = RESOURCES / "chignolin_cln025.pdb"


def test_load_topology_from_path_mdtraj_and_openmm(alanine_dipeptide_pdb):
    from_path = load_topology(alanine_dipeptide_pdb)
    from_string = load_topology(str(alanine_dipeptide_pdb))
    from_mdtraj = load_topology(mdtraj.load(str(alanine_dipeptide_pdb)))
    from_openmm = load_topology(app.PDBFile(str(alanine_dipeptide_pdb)).topology)
    for topology in (from_path, from_string, from_mdtraj, from_openmm):
        assert isinstance(topology, mdtraj.Topology)
        assert topology.n_atoms == 22 and topology.n_residues == 3
        assert [r.name for r in topology.residues] == ["ACE", "ALA", "NME"]


def test_load_topology_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.pdb"
    with pytest.raises(TopologyError, match="missing.pdb.* does not exist"):
        load_topology(missing)
    garbage = tmp_path / "garbage.xyzzy"
    garbage.write_text("not a structure\n")
    with pytest.raises(TopologyError, match="garbage.xyzzy"):
        load_topology(garbage)
    with pytest.raises(TopologyError, match="cannot make a topology from a int"):
        load_topology(42)


def test_fix_pdb_restores_hydrogens_and_missing_atoms(tmp_path, chignolin_pdb):
    """Strip hydrogens and a side chain atom from the bundled CLN025; pdbfixer puts them back."""
    original = app.PDBFile(str(chignolin_pdb))
    lines = chignolin_pdb.read_text().splitlines()
    heavy = [
        line
        for line in lines
        if not (line.startswith("ATOM") and line[76:78].strip() == "H")
        and not (line.startswith("ATOM") and line[17:20] == "GLU" and line[12:16].strip() == "OE2")
    ]
    raw = tmp_path / "raw.pdb"
    raw.write_text("\n".join(heavy) + "\n")
    n_raw = app.PDBFile(str(raw)).topology.getNumAtoms()
    assert n_raw < original.topology.getNumAtoms()

    fixed_path = fix_pdb(raw, tmp_path / "fixed.pdb", ph=7.0)
    fixed = app.PDBFile(str(fixed_path))

    def composition(topology):
        return sorted((atom.residue.index, atom.residue.name, atom.name) for atom in topology.atoms())

    assert fixed.topology.getNumAtoms() == original.topology.getNumAtoms() == 166
    assert composition(fixed.topology) == composition(original.topology)
    # the fixed structure is complete enough for the all-atom force field
    forcefield = app.ForceField("amber14-all.xml", "implicit/gbn2.xml")
    system = forcefield.createSystem(fixed.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    assert system.getNumParticles() == 166
    # heavy atoms that were present keep their coordinates
    original_ca = np.array([p for a, p in zip(original.topology.atoms(), original.positions.value_in_unit(unit.nanometer)) if a.name == "CA"])
    fixed_ca = np.array([p for a, p in zip(fixed.topology.atoms(), fixed.positions.value_in_unit(unit.nanometer)) if a.name == "CA"])
    np.testing.assert_allclose(fixed_ca, original_ca, atol=1e-3)


def test_fix_pdb_missing_input(tmp_path):
    with pytest.raises(TopologyError, match="nothere.pdb.* does not exist"):
        fix_pdb(tmp_path / "nothere.pdb", tmp_path / "out.pdb")


def test_cg_pdb_round_trip(tmp_path, chignolin_pdb):
    pdb = app.PDBFile(str(chignolin_pdb))
    mapping = CGMapping.backbone(pdb.topology)
    positions = mapping.map_positions(pdb.positions)[0]
    path = write_cg_pdb(mapping.cg_topology(), positions, tmp_path / "cg.pdb")
    topology = read_cg_topology(path)
    assert topology.getNumAtoms() == 30 and topology.getNumResidues() == 10
    assert [atom.name for atom in topology.atoms()] == mapping.bead_names
    assert all(atom.element is None for atom in topology.atoms())
    assert sorted((b[0].index, b[1].index) for b in topology.bonds()) == mapping.bonds
    read_positions = app.PDBFile(str(path)).positions.value_in_unit(unit.nanometer)
    np.testing.assert_allclose(np.array(read_positions), positions, atol=1e-4)


def test_read_cg_topology_without_conect_and_with_bonds(tmp_path, chignolin_pdb):
    calpha = [line for line in chignolin_pdb.read_text().splitlines() if line.startswith("ATOM") and line[12:16].strip() == "CA"]
    path = tmp_path / "calpha.pdb"
    path.write_text("\n".join(calpha + ["END"]) + "\n")
    chain = read_cg_topology(path)
    assert [(b[0].index, b[1].index) for b in chain.bonds()] == [(i, i + 1) for i in range(9)]
    ring = read_cg_topology(path, bonds=[(0, 9)])
    assert [(b[0].index, b[1].index) for b in ring.bonds()] == [(0, 9)]
    with pytest.raises(TopologyError, match=r"bond \(0, 10\) is out of range for 10 beads"):
        read_cg_topology(path, bonds=[(0, 10)])
    with pytest.raises(TopologyError, match="absent.pdb.* does not exist"):
        read_cg_topology(tmp_path / "absent.pdb")


def test_fix_pdb_keeps_peptide_caps_and_rebuilds_hydrogens(tmp_path, alanine_dipeptide_pdb):
    import openmm.app as app

    from openmm_flowmatch.topology import fix_pdb

    heavy_only = [
        line
        for line in alanine_dipeptide_pdb.read_text().splitlines(keepends=True)
        if not (line.startswith("ATOM") and line[12:16].strip().lstrip("0123456789").startswith("H"))
    ]
    (tmp_path / "heavy.pdb").write_text("".join(heavy_only))
    fixed = app.PDBFile(str(fix_pdb(tmp_path / "heavy.pdb", tmp_path / "fixed.pdb")))
    assert [residue.name for residue in fixed.topology.residues()] == ["ACE", "ALA", "NME"]
    assert fixed.topology.getNumAtoms() == 22
