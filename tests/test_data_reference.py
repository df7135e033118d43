"""All-atom reference generation: shapes, units, mapped forces against OpenMM, exact resume, errors.

Tiny runs of the bundled alanine dipeptide on OpenMM's CPU platform with one thread (the CPU
platform is deterministic for a given seed, which the resume tests rely on).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest

from openmm_flowmatch.data.dataset import CGDataset
from openmm_flowmatch.data.reference import ReferenceGenerationError, generate_reference, replica_seed
from openmm_flowmatch.data.storage import CGTrajectoryFile, read_cg_file
from openmm_flowmatch.mapping import CGMapping

RUN = dict(
    duration_ps=2.0,
    equilibration_ps=0.2,
    time_step_ps=0.004,
    save_interval_steps=50,
    platform="CPU",
    threads=1,
    checkpoint_interval_frames=3,
    all_atom_format="dcd",
    all_atom_interval_frames=2,
    seed=7,
    progress=False,
)
FORCE_UNIT = unit.kilojoule_per_mole / unit.nanometer


class Interrupted(Exception):
    """Raised from the progress callback to stop a run, as Ctrl-C or a kill would."""


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 2 ps run of two replicas (backbone map), shared by several tests."""
    pdb = Path(__file__).resolve().parents[1] / "openmm_flowmatch" / "resources" / "alanine_dipeptide.pdb"
    out_dir = tmp_path_factory.mktemp("reference")
    paths = generate_reference(pdb, out_dir, replicas=2, **RUN)
    return out_dir, paths


def _openmm_state_at_checkpoint(out_dir: Path, replica: int = 0):
    """Positions (nm) and forces (kJ/mol/nm) of the whole System at the replica's last checkpoint."""
    record = json.loads((out_dir / f"replica_{replica:03d}.checkpoint.json").read_text())
    system = openmm.XmlSerializer.deserialize((out_dir / "system.xml").read_text())
    context = openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"), {"Threads": "1"}
    )
    context.setState(openmm.XmlSerializer.deserialize(record["state_xml"]))
    state = context.getState(getPositions=True, getForces=True)
    positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    forces = state.getForces(asNumpy=True).value_in_unit(FORCE_UNIT)
    return record, system, positions, forces


def _atom_index(topology: app.Topology, residue_name: str, atom_name: str) -> int:
    matches = [atom.index for atom in topology.atoms() if atom.residue.name == residue_name and atom.name == atom_name]
    assert len(matches) == 1, (residue_name, atom_name, matches)
    return matches[0]


def test_two_picosecond_run_has_the_right_shapes_units_and_metadata(reference_run):
    out_dir, paths = reference_run
    assert [path.name for path in paths] == ["replica_000.h5", "replica_001.h5"]
    data = read_cg_file(paths[0])
    assert data["positions"].shape == (10, 5, 3) and data["positions"].dtype == np.float32
    assert data["forces"].shape == (10, 5, 3) and data["forces"].dtype == np.float32
    np.testing.assert_allclose(data["time"], 0.2 * np.arange(1, 11), rtol=1e-12)  # ps
    # positions in nm: backbone bond lengths of amber14 (N-CA 0.1449, CA-C 0.1522, C-N 0.1335 nm)
    bonds = np.linalg.norm(np.diff(data["positions"].astype(float), axis=1), axis=-1).mean(axis=0)
    np.testing.assert_allclose(bonds, [0.1335, 0.1449, 0.1522, 0.1335], atol=0.006)
    # forces in kJ/mol/nm: at 300 K the rms force on a backbone heavy atom is O(10^3) kJ/mol/nm
    rms = np.sqrt(np.mean(data["forces"].astype(float) ** 2))
    assert 100.0 < rms < 5000.0
    metadata = data["metadata"]
    assert metadata["temperature"] == 300.0
    assert metadata["topology"]["bead_names"] == ["C", "N", "CA", "C", "N"]
    assert metadata["topology"]["residue_names"] == ["ACE", "ALA", "ALA", "ALA", "NME"]
    assert metadata["topology"]["bonds"] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert metadata["forcefield"] == ["amber14-all.xml", "implicit/gbn2.xml"]
    assert metadata["hydrogen_mass_amu"] == 3.0 and metadata["constraints"] == "HBonds"
    assert metadata["seed"] == 7 and metadata["replica_seed"] == replica_seed(7, 0)
    assert metadata["mapping"]["bead_atoms"] == [[4], [6], [8], [14], [16]]
    assert metadata["platform"] == "CPU" and metadata["time_step_ps"] == 0.004
    assert "package_version" in metadata and metadata["units"]["forces"] == "kJ/mol/nm"
    # the System really uses 3 amu hydrogens and HBonds constraints, 4 fs steps
    system = openmm.XmlSerializer.deserialize((out_dir / "system.xml").read_text())
    assert system.getParticleMass(7).value_in_unit(unit.amu) == pytest.approx(3.0)
    assert system.getNumConstraints() == 12
    # replicas are independent runs
    other = read_cg_file(paths[1])
    assert np.abs(other["positions"] - data["positions"]).max() > 1e-3
    # and load as one dataset of two runs
    dataset = CGDataset.from_files(paths)
    assert dataset.run_lengths == [10, 10] and dataset.temperature == 300.0 and dataset.has_forces


def test_backbone_forces_follow_the_constraint_valid_map(reference_run):
    """Bead N = f(N) + f(H), CA = f(CA) + f(HA), carbonyl C = f(C), from OpenMM's own forces."""
    out_dir, paths = reference_run
    data = read_cg_file(paths[0])
    record, _, positions, forces = _openmm_state_at_checkpoint(out_dir)
    assert record["n_frames"] == 10  # the checkpoint holds the state of the last frame
    topology = app.PDBFile(str(out_dir / "topology.pdb")).topology
    index = lambda residue, atom: _atom_index(topology, residue, atom)  # noqa: E731
    expected = np.stack(
        [
            forces[index("ACE", "C")],
            forces[index("ALA", "N")] + forces[index("ALA", "H")],
            forces[index("ALA", "CA")] + forces[index("ALA", "HA")],
            forces[index("ALA", "C")],
            forces[index("NME", "N")] + forces[index("NME", "H")],
        ]
    )
    np.testing.assert_allclose(data["forces"][-1], expected, rtol=1e-5, atol=2e-3)
    # the hydrogens' share is large, so taking f(N) alone would fail the comparison above
    assert np.linalg.norm(forces[index("ALA", "H")]) > 10.0
    bead_atoms = [index("ACE", "C"), index("ALA", "N"), index("ALA", "CA"), index("ALA", "C"), index("NME", "N")]
    np.testing.assert_allclose(data["positions"][-1], positions[bead_atoms], atol=1e-6)


def test_center_of_mass_map_forces_are_sums_of_atom_forces(alanine_dipeptide_pdb, tmp_path):
    paths = generate_reference(
        alanine_dipeptide_pdb, tmp_path, mapping="center_of_mass", **{**RUN, "duration_ps": 0.6, "all_atom_format": None}
    )
    data = read_cg_file(paths[0])
    assert data["positions"].shape == (3, 3, 3)
    _, _, positions, forces = _openmm_state_at_checkpoint(tmp_path)
    topology = app.PDBFile(str(tmp_path / "topology.pdb")).topology
    summed = np.zeros((3, 3))
    centres = np.zeros((3, 3))
    for residue in topology.residues():
        atoms = [atom.index for atom in residue.atoms()]
        masses = np.array([atom.element.mass.value_in_unit(unit.amu) for atom in residue.atoms()])
        summed[residue.index] = forces[atoms].sum(axis=0)
        centres[residue.index] = masses @ positions[atoms] / masses.sum()  # standard element masses
    np.testing.assert_allclose(data["forces"][-1], summed, rtol=1e-5, atol=2e-3)
    np.testing.assert_allclose(data["positions"][-1], centres, atol=1e-6)


def test_interrupted_run_resumes_without_lost_or_duplicated_frames(reference_run, alanine_dipeptide_pdb, tmp_path):
    """Interrupt replica 1 after the h5 append but before its checkpoint, then resume."""
    reference_dir, reference_paths = reference_run
    checkpoint = tmp_path / "replica_001.checkpoint.json"
    saved = {}

    def interrupt(replica: int, n_frames: int, n_total: int) -> None:
        if replica == 1 and n_frames == 3:
            saved["bytes"] = checkpoint.read_bytes()
        if replica == 1 and n_frames == 6:
            checkpoint.write_bytes(saved["bytes"])  # as if killed before the checkpoint's rename
            raise Interrupted

    with pytest.raises(Interrupted):
        generate_reference(alanine_dipeptide_pdb, tmp_path, replicas=2, progress_callback=interrupt, **RUN)
    with CGTrajectoryFile(tmp_path / "replica_001.h5", "r") as file:
        assert file.n_frames == 6  # three frames more than the checkpoint knows
    calls = []
    paths = generate_reference(
        alanine_dipeptide_pdb, tmp_path, replicas=2, progress_callback=lambda *args: calls.append(args), **RUN
    )
    assert [args[:2] for args in calls] == [(1, 6), (1, 9), (1, 10)]  # replica 0 was complete
    for path, reference_path in zip(paths, reference_paths):
        resumed, uninterrupted = read_cg_file(path), read_cg_file(reference_path)
        np.testing.assert_array_equal(resumed["positions"], uninterrupted["positions"])
        np.testing.assert_array_equal(resumed["forces"], uninterrupted["forces"])
        np.testing.assert_array_equal(resumed["time"], uninterrupted["time"])
    for replica in range(2):
        resumed = mdtraj.load(tmp_path / f"replica_{replica:03d}.dcd", top=tmp_path / "topology.pdb")
        uninterrupted = mdtraj.load(reference_dir / f"replica_{replica:03d}.dcd", top=reference_dir / "topology.pdb")
        assert resumed.n_frames == uninterrupted.n_frames == 5
        np.testing.assert_array_equal(resumed.xyz, uninterrupted.xyz)


def test_killed_process_resumes_exactly(alanine_dipeptide_pdb, tmp_path):
    """SIGKILL a generating subprocess after its first checkpoint; the rerun completes it exactly."""
    settings = {**RUN, "duration_ps": 6.0, "checkpoint_interval_frames": 4, "all_atom_format": "xtc"}
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    script = (
        "from openmm_flowmatch.data.reference import generate_reference\n"
        f"generate_reference({str(alanine_dipeptide_pdb)!r}, {str(killed_dir)!r}, **{settings!r})\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    checkpoint = killed_dir / "replica_000.checkpoint.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if checkpoint.exists() and json.loads(checkpoint.read_text())["n_frames"] >= 4:
                break
            time.sleep(0.01)
        process.kill()
    finally:
        process.wait()
    assert process.returncode == -9, "the run ended before it could be killed; make it longer"
    frames_at_kill = json.loads(checkpoint.read_text())["n_frames"]
    assert 4 <= frames_at_kill < 30
    resumed = read_cg_file(generate_reference(alanine_dipeptide_pdb, killed_dir, **settings)[0])
    clean = read_cg_file(generate_reference(alanine_dipeptide_pdb, clean_dir, **settings)[0])
    assert resumed["positions"].shape == (30, 5, 3)
    np.testing.assert_array_equal(resumed["positions"], clean["positions"])
    np.testing.assert_array_equal(resumed["forces"], clean["forces"])
    np.testing.assert_array_equal(resumed["time"], clean["time"])
    killed_xtc = mdtraj.load(killed_dir / "replica_000.xtc", top=killed_dir / "topology.pdb")
    clean_xtc = mdtraj.load(clean_dir / "replica_000.xtc", top=clean_dir / "topology.pdb")
    assert killed_xtc.n_frames == clean_xtc.n_frames == 15
    np.testing.assert_array_equal(killed_xtc.xyz, clean_xtc.xyz)


def test_longer_duration_extends_a_finished_run(reference_run, alanine_dipeptide_pdb, tmp_path):
    reference_dir, reference_paths = reference_run
    short = {**RUN, "duration_ps": 1.2, "all_atom_format": None}
    generate_reference(alanine_dipeptide_pdb, tmp_path, **short)
    assert read_cg_file(tmp_path / "replica_000.h5")["positions"].shape[0] == 6
    extended = read_cg_file(generate_reference(alanine_dipeptide_pdb, tmp_path, **{**short, "duration_ps": 2.0})[0])
    np.testing.assert_array_equal(extended["positions"], read_cg_file(reference_paths[0])["positions"])


def test_resuming_with_other_settings_is_refused(reference_run, alanine_dipeptide_pdb):
    out_dir, _ = reference_run
    with pytest.raises(ReferenceGenerationError, match="other settings.*temperature"):
        generate_reference(alanine_dipeptide_pdb, out_dir, replicas=2, **{**RUN, "temperature": 310.0})


def test_explicit_solvent_maps_solute_forces_of_the_whole_system(alanine_dipeptide_pdb, tmp_path):
    paths = generate_reference(
        alanine_dipeptide_pdb,
        tmp_path,
        solvent="explicit",
        padding=0.5,
        nonbonded_cutoff=0.5,
        minimization_tolerance=100.0,
        **{**RUN, "duration_ps": 0.08, "time_step_ps": 0.002, "save_interval_steps": 20, "equilibration_ps": 0.0},
    )
    data = read_cg_file(paths[0])
    assert data["positions"].shape == (2, 5, 3)
    assert data["metadata"]["hydrogen_mass_amu"] is None  # 2 fs: standard masses
    _, system, positions, forces = _openmm_state_at_checkpoint(tmp_path)
    assert system.getNumParticles() > 100 and system.usesPeriodicBoundaryConditions()
    topology = app.PDBFile(str(tmp_path / "topology.pdb")).topology
    assert topology.getNumAtoms() == 22  # the solute only
    index = lambda residue, atom: _atom_index(topology, residue, atom)  # noqa: E731
    expected_n = forces[index("ALA", "N")] + forces[index("ALA", "H")]
    np.testing.assert_allclose(data["forces"][-1, 1], expected_n, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(data["positions"][-1, 2], positions[index("ALA", "CA")], atol=1e-6)
    trajectory = mdtraj.load(tmp_path / "replica_000.dcd", top=tmp_path / "topology.pdb")
    assert trajectory.n_atoms == 22 and trajectory.n_frames == 1


def _strip_hydrogens(source: Path, target: Path) -> Path:
    lines = [
        line
        for line in source.read_text().splitlines()
        if not (line.startswith("ATOM") and line[12:16].strip().lstrip("0123456789").startswith("H"))
    ]
    target.write_text("\n".join(lines) + "\n")
    return target


def test_unknown_residue_names_the_residue_and_suggests_a_fix(alanine_dipeptide_pdb, tmp_path):
    renamed = tmp_path / "xyz.pdb"
    renamed.write_text(alanine_dipeptide_pdb.read_text().replace(" ALA ", " XYZ "))
    with pytest.raises(ReferenceGenerationError, match=r"no template for residue\(s\).*XYZ2 \(chain 0, 10 atoms\).*fix_pdb.*another force field"):
        generate_reference(renamed, tmp_path / "out", **RUN)
    assert not list((tmp_path / "out").glob("*.h5"))


def test_missing_hydrogens_fail_clearly_and_fix_pdb_repairs_them(alanine_dipeptide_pdb, tmp_path):
    heavy = _strip_hydrogens(alanine_dipeptide_pdb, tmp_path / "heavy.pdb")
    with pytest.raises(ReferenceGenerationError, match="ALA2.*fix_pdb=True"):
        generate_reference(heavy, tmp_path / "raw", **RUN)
    paths = generate_reference(
        heavy, tmp_path / "fixed", fix_pdb=True, **{**RUN, "duration_ps": 0.2, "all_atom_format": None}
    )
    data = read_cg_file(paths[0])
    assert data["positions"].shape == (1, 5, 3)
    assert data["metadata"]["n_solute_atoms"] == 22


def test_unwritable_output_directory_is_refused(alanine_dipeptide_pdb, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ReferenceGenerationError, match="output directory"):
        generate_reference(alanine_dipeptide_pdb, blocker / "out", **RUN)


def test_missing_structure_and_bad_options_are_refused(alanine_dipeptide_pdb, chignolin_pdb, tmp_path):
    with pytest.raises(ReferenceGenerationError, match="does not exist"):
        generate_reference(tmp_path / "nothing.pdb", tmp_path, **RUN)
    with pytest.raises(ReferenceGenerationError, match="solvent"):
        generate_reference(alanine_dipeptide_pdb, tmp_path, solvent="water", **RUN)
    with pytest.raises(ReferenceGenerationError, match="unknown mapping"):
        generate_reference(alanine_dipeptide_pdb, tmp_path, mapping="beads", **RUN)
    chignolin_mapping = CGMapping.alpha_carbons(mdtraj.load_topology(str(chignolin_pdb)))
    with pytest.raises(ReferenceGenerationError, match="mapping refers to 166 atoms but the .*structure has 22"):
        generate_reference(alanine_dipeptide_pdb, tmp_path, mapping=chignolin_mapping, **RUN)
    with pytest.raises(ReferenceGenerationError, match="platform Nonexistent"):
        generate_reference(alanine_dipeptide_pdb, tmp_path, **{**RUN, "platform": "Nonexistent"})


def test_replica_seeds_are_distinct_positive_and_reproducible():
    seeds = [replica_seed(0, replica) for replica in range(50)]
    assert len(set(seeds)) == 50 and all(0 < seed < 2**31 - 1 for seed in seeds)
    assert seeds == [replica_seed(0, replica) for replica in range(50)]
    assert replica_seed(1, 0) != replica_seed(0, 0)


@pytest.mark.parametrize("suffix, periodic", [("dcd", False), ("dcd", True), ("xtc", False)])
def test_all_atom_trajectory_is_cut_to_the_checkpoint_byte_exactly(alanine_dipeptide_pdb, tmp_path, suffix, periodic):
    from openmm_flowmatch.data.reference import _AllAtomWriter

    structure = app.PDBFile(str(alanine_dipeptide_pdb))
    topology = structure.topology
    if periodic:
        topology.setPeriodicBoxVectors(np.eye(3) * 3.0 * unit.nanometer)
    frames = 2.0 + np.random.default_rng(0).normal(scale=0.3, size=(7, 22, 3))
    path = tmp_path / f"trajectory.{suffix}"
    writer = _AllAtomWriter(path, topology, frame_interval_ps=0.4, interval_steps=100)
    writer.write(frames[:4], first_step=100)
    writer.write(frames[4:], first_step=100)  # appends
    whole = mdtraj.load(str(path), top=str(alanine_dipeptide_pdb))
    assert whole.n_frames == 7
    writer.truncate(3)
    cut = mdtraj.load(str(path), top=str(alanine_dipeptide_pdb))
    assert cut.n_frames == 3
    np.testing.assert_array_equal(cut.xyz, whole.xyz[:3])
    writer.write(frames[5:6], first_step=100)  # appending after the cut works
    again = mdtraj.load(str(path), top=str(alanine_dipeptide_pdb))
    assert again.n_frames == 4
    np.testing.assert_array_equal(again.xyz[3], whole.xyz[5])
    with pytest.raises(ReferenceGenerationError, match="cannot cut"):
        writer.truncate(10)


def test_resume_on_another_platform_continues_from_the_saved_state(alanine_dipeptide_pdb, tmp_path, caplog):
    """A CPU checkpoint cannot be loaded on Reference: the run goes on from the saved state."""
    settings = {**RUN, "duration_ps": 1.2, "all_atom_format": None}

    def interrupt(replica: int, n_frames: int, n_total: int) -> None:
        if n_frames == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        generate_reference(alanine_dipeptide_pdb, tmp_path / "moved", progress_callback=interrupt, **settings)
    with caplog.at_level("WARNING", logger="openmm_flowmatch.data.reference"):
        moved = generate_reference(alanine_dipeptide_pdb, tmp_path / "moved", **{**settings, "platform": "Reference"})
    assert "different Platform" in caplog.text and "not bitwise identical" in caplog.text
    stayed = generate_reference(alanine_dipeptide_pdb, tmp_path / "stayed", **settings)
    moved_positions, stayed_positions = read_cg_file(moved[0])["positions"], read_cg_file(stayed[0])["positions"]
    assert moved_positions.shape == (6, 5, 3)
    np.testing.assert_array_equal(moved_positions[:3], stayed_positions[:3])
    # a new random stream: frame 4 differs, but it continues from frame 3 (0.2 ps later, < 0.1 nm)
    assert np.abs(moved_positions[3] - stayed_positions[3]).max() > 1e-4
    assert np.linalg.norm(moved_positions[3] - moved_positions[2], axis=-1).max() < 0.1
