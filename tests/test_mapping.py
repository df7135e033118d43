"""Tests of CGMapping: coordinate maps, constraint-valid force maps, CG topologies, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest

from openmm_flowmatch.mapping import CGMapping, MappingError

RESOURCES = Path(__file__).resolve().parents[1] / "openmm_flowmatch" / "resources"
ALANINE_PDB = RESOURCES / "alanine_dipeptide.pdb"
CHIGNOLIN_PDB = RESOURCES / "chignolin_cln025.pdb"


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def forcefield():
    return app.ForceField("amber14-all.xml", "implicit/gbn2.xml")


@pytest.fixture(scope="module")
def alanine():
    return app.PDBFile(str(ALANINE_PDB))


@pytest.fixture(scope="module")
def chignolin():
    return app.PDBFile(str(CHIGNOLIN_PDB))


def all_atom_system(forcefield, pdb, constraints):
    return forcefield.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=constraints)


def constraint_pairs(system):
    return [tuple(system.getConstraintParameters(i)[:2]) for i in range(system.getNumConstraints())]


def assert_constraint_valid(weights, coordinate_matrix, system):
    """The two conditions of DESIGN.md: W·Mᵀ = I and equal weights across every constraint."""
    np.testing.assert_allclose(weights @ coordinate_matrix.T, np.eye(len(weights)), atol=1e-12)
    for first, second in constraint_pairs(system):
        np.testing.assert_array_equal(weights[:, first], weights[:, second])


def constraints_are_respected(weights, system):
    return all(np.array_equal(weights[:, i], weights[:, j]) for i, j in constraint_pairs(system))


def atom_index(topology, residue_name, atom_name):
    return next(a.index for a in topology.atoms() if a.residue.name == residue_name and a.name == atom_name)


def dihedral(points):
    b1, b2, b3 = points[1] - points[0], points[2] - points[1], points[3] - points[2]
    n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
    return np.arctan2(np.linalg.norm(b2) * np.dot(b1, n2), np.dot(n1, n2))


# ----------------------------------------------------------------------------------- coordinate maps


def test_alanine_backbone_beads_and_dihedrals(alanine):
    mapping = CGMapping.backbone(alanine.topology)
    topology = alanine.topology
    expected = [
        atom_index(topology, "ACE", "C"),
        atom_index(topology, "ALA", "N"),
        atom_index(topology, "ALA", "CA"),
        atom_index(topology, "ALA", "C"),
        atom_index(topology, "NME", "N"),
    ]
    assert mapping.n_beads == 5 and mapping.n_atoms == 22
    assert mapping.bead_atoms == [[index] for index in expected]
    assert mapping.bead_names == ["C", "N", "CA", "C", "N"]
    assert mapping.residue_names == ["ACE", "ALA", "ALA", "ALA", "NME"]
    assert mapping.elements == ["C", "N", "C", "C", "N"]
    assert mapping.bonds == [(0, 1), (1, 2), (2, 3), (3, 4)]
    carbon, nitrogen = app.element.carbon.mass._value, app.element.nitrogen.mass._value
    np.testing.assert_allclose(mapping.masses, [carbon, nitrogen, carbon, carbon, nitrogen])

    # φ and ψ of the all-atom structure (mdtraj) are the CG dihedrals (0,1,2,3) and (1,2,3,4).
    trajectory = mdtraj.load(str(ALANINE_PDB))
    _, phi = mdtraj.compute_phi(trajectory)
    _, psi = mdtraj.compute_psi(trajectory)
    beads = mapping.map_positions(trajectory.xyz)[0]
    assert dihedral(beads[[0, 1, 2, 3]]) == pytest.approx(float(phi[0, 0]), abs=1e-5)
    assert dihedral(beads[[1, 2, 3, 4]]) == pytest.approx(float(psi[0, 0]), abs=1e-5)


def test_mdtraj_and_openmm_topologies_give_the_same_map(alanine):
    from_openmm = CGMapping.backbone(alanine.topology)
    from_mdtraj = CGMapping.backbone(mdtraj.load_topology(str(ALANINE_PDB)))
    assert from_openmm.to_dict() == from_mdtraj.to_dict()


def test_chignolin_alpha_carbons(chignolin):
    mapping = CGMapping.alpha_carbons(chignolin.topology)
    assert mapping.n_beads == 10
    assert mapping.residue_names == ["TYR", "TYR", "ASP", "PRO", "GLU", "THR", "GLY", "THR", "TRP", "TYR"]
    assert mapping.bead_names == ["CA"] * 10
    np.testing.assert_allclose(mapping.masses, np.full(10, app.element.carbon.mass._value))
    assert mapping.bonds == [(i, i + 1) for i in range(9)]
    positions = np.array(chignolin.positions.value_in_unit(unit.nanometer))
    calphas = [a.index for a in chignolin.topology.atoms() if a.name == "CA"]
    np.testing.assert_allclose(mapping.map_positions(positions)[0], positions[calphas])
    # consecutive Cα are 0.38 nm apart (trans peptides), or ~0.30 nm before a cis proline
    distances = np.linalg.norm(np.diff(positions[calphas], axis=0), axis=1)
    assert np.all((distances > 0.28) & (distances < 0.40))


def test_backbone_of_a_longer_peptide(chignolin):
    mapping = CGMapping.backbone(chignolin.topology)
    assert mapping.n_beads == 30
    assert mapping.bead_names == ["N", "CA", "C"] * 10
    assert len(mapping.bonds) == 29


def test_selection_and_indices_agree_with_alpha_carbons(chignolin):
    by_name = CGMapping.alpha_carbons(chignolin.topology)
    by_selection = CGMapping.from_selection(chignolin.topology, "name CA")
    calphas = [a.index for a in chignolin.topology.atoms() if a.name == "CA"]
    by_indices = CGMapping.from_indices(chignolin.topology, calphas)
    assert by_name.to_dict() == by_selection.to_dict() == by_indices.to_dict()


def test_center_of_mass_positions_match_mdtraj(chignolin):
    mapping = CGMapping.center_of_mass(chignolin.topology)
    trajectory = mdtraj.load(str(CHIGNOLIN_PDB))
    assert mapping.n_beads == 10
    assert mapping.elements == [None] * 10
    assert mapping.bead_names[0] == "BTYR"
    np.testing.assert_allclose(mapping.coordinate_matrix().sum(1), 1.0)
    beads = mapping.map_positions(trajectory)[0]
    for residue in trajectory.topology.residues:
        atoms = [atom.index for atom in residue.atoms]
        expected = mdtraj.compute_center_of_mass(trajectory.atom_slice(atoms))[0]
        np.testing.assert_allclose(beads[residue.index], expected, atol=1e-6)
    total_mass = sum(atom.element.mass for atom in trajectory.topology.atoms)
    assert mapping.masses.sum() == pytest.approx(total_mass)


def test_map_positions_shapes_and_units(alanine):
    mapping = CGMapping.backbone(alanine.topology)
    positions = np.array(alanine.positions.value_in_unit(unit.nanometer))
    single = mapping.map_positions(positions)
    assert single.shape == (1, 5, 3)
    np.testing.assert_allclose(mapping.map_positions(alanine.positions), single)
    np.testing.assert_allclose(mapping.map_positions(positions * 10.0 * unit.angstrom), single)
    frames = np.stack([positions, positions + 1.0])
    mapped = mapping.map_positions(frames)
    assert mapped.shape == (2, 5, 3)
    np.testing.assert_allclose(mapped[1], single[0] + 1.0)


# ----------------------------------------------------------------------------------- force maps


@pytest.mark.parametrize("constraints", [app.HBonds, None], ids=["HBonds", "no-constraints"])
@pytest.mark.parametrize("structure,build", [("alanine", CGMapping.backbone), ("chignolin", CGMapping.alpha_carbons)])
def test_force_map_is_constraint_valid(request, forcefield, structure, build, constraints):
    pdb = request.getfixturevalue(structure)
    system = all_atom_system(forcefield, pdb, constraints)
    mapping = build(pdb.topology)
    weights = mapping.force_map(system)
    assert_constraint_valid(weights, mapping.coordinate_matrix(), system)

    naive = mapping.coordinate_matrix()  # bead atoms only
    np.testing.assert_allclose(naive @ mapping.coordinate_matrix().T, np.eye(mapping.n_beads))
    if constraints is None:
        np.testing.assert_array_equal(weights, naive)
    else:
        assert system.getNumConstraints() > 0
        assert not constraints_are_respected(naive, system)


def test_alanine_force_map_takes_the_constrained_hydrogens(alanine, forcefield):
    system = all_atom_system(forcefield, alanine, app.HBonds)
    mapping = CGMapping.backbone(alanine.topology)
    weights = mapping.force_map(system)
    topology = alanine.topology
    expected = [
        ["ACE C"],
        ["ALA N", "ALA H"],
        ["ALA CA", "ALA HA"],
        ["ALA C"],
        ["NME N", "NME H"],
    ]
    for bead, names in enumerate(expected):
        indices = sorted(atom_index(topology, *name.split()) for name in names)
        assert np.flatnonzero(weights[bead]).tolist() == indices


def test_chignolin_alpha_carbon_force_map_takes_ha_and_glycine_ha2_ha3(chignolin, forcefield):
    system = all_atom_system(forcefield, chignolin, app.HBonds)
    weights = CGMapping.alpha_carbons(chignolin.topology).force_map(system)
    atoms = list(chignolin.topology.atoms())
    for bead, residue in enumerate(chignolin.topology.residues()):
        names = sorted(atoms[index].name for index in np.flatnonzero(weights[bead]))
        assert all(atoms[index].residue is residue for index in np.flatnonzero(weights[bead]))
        assert names == (["CA", "HA2", "HA3"] if residue.name == "GLY" else ["CA", "HA"])


def test_constraint_forces_cancel_in_the_mapped_force(alanine, forcefield):
    """Any constraint force (equal and opposite along a constraint) drops out of W·f, not of naive·f."""
    system = all_atom_system(forcefield, alanine, app.HBonds)
    mapping = CGMapping.backbone(alanine.topology)
    positions = np.array(alanine.positions.value_in_unit(unit.nanometer))
    rng = np.random.default_rng(1)
    constraint_force = np.zeros_like(positions)
    for first, second in constraint_pairs(system):
        multiplier = rng.normal(scale=100.0)
        direction = positions[first] - positions[second]
        constraint_force[first] += multiplier * direction
        constraint_force[second] -= multiplier * direction
    mapped = mapping.map_forces(constraint_force, system)
    np.testing.assert_allclose(mapped, 0.0, atol=1e-10)
    naive = mapping.coordinate_matrix() @ constraint_force
    assert np.abs(naive).max() > 1.0


def test_map_forces_sums_openmm_forces(alanine, forcefield):
    system = all_atom_system(forcefield, alanine, app.HBonds)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(alanine.positions)
    forces = context.getState(getForces=True).getForces(asNumpy=True)
    mapping = CGMapping.backbone(alanine.topology)
    mapped = mapping.map_forces(forces, system)
    plain = np.asarray(forces.value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    topology = alanine.topology
    expected_n = plain[atom_index(topology, "ALA", "N")] + plain[atom_index(topology, "ALA", "H")]
    assert mapped.shape == (1, 5, 3)
    np.testing.assert_allclose(mapped[0, 1], expected_n)
    np.testing.assert_allclose(mapped[0, 3], plain[atom_index(topology, "ALA", "C")])


@pytest.mark.parametrize("constraints", [app.HBonds, None], ids=["HBonds", "no-constraints"])
def test_center_of_mass_force_map_conserves_total_force(chignolin, forcefield, constraints):
    system = all_atom_system(forcefield, chignolin, constraints)
    mapping = CGMapping.center_of_mass(chignolin.topology)
    weights = mapping.force_map(system)
    assert_constraint_valid(weights, mapping.coordinate_matrix(), system)
    forces = np.random.default_rng(2).normal(size=(3, mapping.n_atoms, 3))
    mapped = mapping.map_forces(forces, system)
    np.testing.assert_allclose(mapped.sum(1), forces.sum(1), atol=1e-10)


def test_constraint_across_beads_is_an_error(alanine, forcefield):
    system = all_atom_system(forcefield, alanine, app.AllBonds)
    with pytest.raises(MappingError, match="constraints join .*ALA"):
        CGMapping.backbone(alanine.topology).force_map(system)


def test_force_map_of_a_system_of_another_size(alanine, chignolin, forcefield):
    system = all_atom_system(forcefield, chignolin, None)
    with pytest.raises(MappingError, match="166 particles .* 22 atoms"):
        CGMapping.backbone(alanine.topology).force_map(system)


# ----------------------------------------------------------------------------------- CG topology, serialisation


def test_cg_topology(chignolin):
    mapping = CGMapping.backbone(chignolin.topology)
    topology = mapping.cg_topology()
    assert isinstance(topology, app.Topology)
    assert topology.getNumAtoms() == 30 and topology.getNumResidues() == 10 and topology.getNumChains() == 1
    assert [a.name for a in topology.atoms()] == mapping.bead_names
    assert all(atom.element is None for atom in topology.atoms())
    assert [r.name for r in topology.residues()] == [r.name for r in chignolin.topology.residues()]
    assert [(b[0].index, b[1].index) for b in topology.bonds()] == mapping.bonds
    assert topology.getPeriodicBoxVectors() is None


def test_json_round_trip(chignolin):
    for mapping in (CGMapping.backbone(chignolin.topology), CGMapping.center_of_mass(chignolin.topology)):
        copy = CGMapping.from_dict(json.loads(json.dumps(mapping.to_dict())))
        assert copy.to_dict() == mapping.to_dict()
        np.testing.assert_array_equal(copy.coordinate_matrix(), mapping.coordinate_matrix())
        np.testing.assert_array_equal(copy.force_map(None), mapping.force_map(None))


def test_from_indices_groups_and_names(alanine):
    groups = [[0, 1, 2, 3, 4, 5], 8, [14, 15]]
    mapping = CGMapping.from_indices(alanine.topology, groups, names=["ACE", "CA", "CO"])
    assert mapping.bead_atoms == [[0, 1, 2, 3, 4, 5], [8], [14, 15]]
    assert mapping.bead_names == ["ACE", "CA", "CO"]
    assert mapping.elements == [None, "C", None]
    masses = np.array([atom.element.mass._value for atom in alanine.topology.atoms()])
    np.testing.assert_allclose(mapping.masses, [masses[:6].sum(), masses[8], masses[14:16].sum()])


# ----------------------------------------------------------------------------------- bad input


def test_pdb_lacking_an_atom_the_map_needs(tmp_path):
    lines = ALANINE_PDB.read_text().splitlines()
    without_calpha = [line for line in lines if not (line.startswith("ATOM") and line[12:16].strip() == "CA")]
    path = tmp_path / "no_calpha.pdb"
    path.write_text("\n".join(without_calpha) + "\n")
    topology = app.PDBFile(str(path)).topology
    with pytest.raises(MappingError, match=r"residue ALA2 .* no atom 'CA'"):
        CGMapping.backbone(topology)
    with pytest.raises(MappingError, match=r"no_calpha.pdb: residue ALA2 .* no atom 'CA'"):
        CGMapping.alpha_carbons(path)
    with pytest.raises(MappingError, match=r"no_calpha.pdb: residue ALA2 .* no atom 'CA'"):
        CGMapping.backbone(str(path))


def test_constructors_take_a_file_path(tmp_path):
    assert CGMapping.backbone(ALANINE_PDB).to_dict() == CGMapping.backbone(app.PDBFile(str(ALANINE_PDB)).topology).to_dict()
    with pytest.raises(MappingError, match="missing.pdb' does not exist"):
        CGMapping.alpha_carbons(tmp_path / "missing.pdb")
    with pytest.raises(MappingError, match=r"bad.pdb: atom index 99 .* out of range"):
        (tmp_path / "bad.pdb").write_text(ALANINE_PDB.read_text())
        CGMapping.from_indices(tmp_path / "bad.pdb", [4, 99])


def test_cg_only_use_needs_only_the_mapped_atoms(tmp_path):
    """A PDB of Cα atoms alone is enough for a Cα map."""
    lines = CHIGNOLIN_PDB.read_text().splitlines()
    calpha_lines = [line for line in lines if line.startswith("ATOM") and line[12:16].strip() == "CA"]
    path = tmp_path / "calpha.pdb"
    path.write_text("\n".join(calpha_lines + ["END"]) + "\n")
    mapping = CGMapping.alpha_carbons(mdtraj.load_topology(str(path)))
    assert mapping.n_beads == 10 and mapping.n_atoms == 10


def test_index_out_of_range(alanine):
    with pytest.raises(MappingError, match="atom index 22 .* out of range .* 22 atoms"):
        CGMapping.from_indices(alanine.topology, [4, 6, 22])
    with pytest.raises(MappingError, match="out of range"):
        CGMapping.from_indices(alanine.topology, [[4, -1]])


def test_atom_count_mismatch(alanine, chignolin):
    mapping = CGMapping.backbone(alanine.topology)
    with pytest.raises(MappingError, match="166 atoms but the mapping's topology has 22"):
        mapping.map_positions(chignolin.positions)
    with pytest.raises(MappingError, match="forces have 21 atoms"):
        mapping.map_forces(np.zeros((2, 21, 3)))


def test_nan_positions(alanine):
    mapping = CGMapping.backbone(alanine.topology)
    positions = np.repeat(np.array(alanine.positions.value_in_unit(unit.nanometer))[None], 3, axis=0)
    positions[2, 8, 1] = np.nan
    with pytest.raises(MappingError, match=r"NaN .* frame 2, atom CA \(index 8\) of residue ALA2"):
        mapping.map_positions(positions)


def test_bad_selection_and_topology(alanine):
    with pytest.raises(MappingError, match="matches no atom"):
        CGMapping.from_selection(alanine.topology, "name XYZ")
    with pytest.raises(MappingError, match="invalid mdtraj selection"):
        CGMapping.from_selection(alanine.topology, "name CA and and")
    with pytest.raises(MappingError, match="expected an mdtraj.Topology, an openmm.app.Topology or a structure file"):
        CGMapping.backbone(42)
    with pytest.raises(MappingError, match="belongs to beads 0 and 1"):
        CGMapping.from_indices(alanine.topology, [[4, 6], [6, 8]])


def test_from_name_builds_the_named_mapping_and_rejects_unknown_names(alanine_dipeptide_pdb):
    from openmm_flowmatch.mapping import CGMapping, MappingError

    assert CGMapping.from_name("CA", alanine_dipeptide_pdb).bead_atoms == CGMapping.alpha_carbons(
        alanine_dipeptide_pdb
    ).bead_atoms
    assert CGMapping.from_name("backbone", alanine_dipeptide_pdb).n_beads == 5
    with pytest.raises(MappingError, match="unknown mapping 'sidechains'"):
        CGMapping.from_name("sidechains", alanine_dipeptide_pdb)
