"""CGDataset: loading (CG files, trajectories, npz chunks), time-block splits, subsampling, loaders."""

from __future__ import annotations

import mdtraj
import numpy as np
import pytest
import torch

from openmm_flowmatch.data.dataset import CGDataset, DatasetError
from openmm_flowmatch.data.storage import read_cg_file, write_cg_file
from openmm_flowmatch.mapping import CGMapping


def _run(n_frames: int, n_beads: int = 5, offset: float = 0.0, seed: int = 0):
    """Positions that encode their own frame number (x of bead 0 = offset + frame), forces, time."""
    rng = np.random.default_rng(seed)
    positions = rng.normal(size=(n_frames, n_beads, 3)).astype(np.float32)
    positions[:, 0, 0] = offset + np.arange(n_frames)
    forces = rng.normal(size=(n_frames, n_beads, 3)).astype(np.float32) * 100
    time = 0.2 * np.arange(1, n_frames + 1)
    return positions, forces, time


@pytest.fixture
def two_run_files(tmp_path):
    first = write_cg_file(tmp_path / "replica_000.h5", *_run(50, offset=0), metadata={"temperature": 300.0})
    second = write_cg_file(tmp_path / "replica_001.h5", *_run(30, offset=1000, seed=1), metadata={"temperature": 300.0})
    return first, second


def test_from_files_concatenates_runs_and_remembers_boundaries(two_run_files, tmp_path):
    dataset = CGDataset.from_files(two_run_files)
    assert len(dataset) == 80 and dataset.n_beads == 5 and dataset.run_lengths == [50, 30]
    assert dataset.temperature == 300.0 and dataset.kT == pytest.approx(0.0083144626 * 300)
    first = read_cg_file(two_run_files[0])
    np.testing.assert_array_equal(dataset.positions[:50], first["positions"])
    np.testing.assert_array_equal(dataset.forces[:50], first["forces"])
    np.testing.assert_array_equal(dataset.time[50:], 0.2 * np.arange(1, 31))
    np.testing.assert_array_equal(dataset.run_starts, [0, 50])
    # a directory loads all its *.h5 files in name order
    assert CGDataset.from_files(tmp_path).run_lengths == [50, 30]
    # save and reload keeps the boundaries
    reloaded = CGDataset.from_files(dataset.save(tmp_path / "saved" / "all.h5"))
    assert reloaded.run_lengths == [50, 30]
    np.testing.assert_array_equal(reloaded.positions, dataset.positions)
    np.testing.assert_array_equal(reloaded.forces, dataset.forces)


def test_getitem_returns_float32_tensors_with_or_without_forces(two_run_files, tmp_path):
    dataset = CGDataset.from_files(two_run_files[0])
    positions, forces = dataset[3]
    assert positions.dtype == torch.float32 and positions.shape == (5, 3) and forces.shape == (5, 3)
    assert positions[0, 0].item() == 3.0
    batch_positions, batch_forces = dataset[[4, 7, 9]]
    assert batch_positions.shape == (3, 5, 3)
    np.testing.assert_array_equal(batch_positions[:, 0, 0].numpy(), [4, 7, 9])
    no_forces = CGDataset.from_files(write_cg_file(tmp_path / "positions_only.h5", _run(4)[0]))
    item = no_forces[1]
    assert isinstance(item, tuple) and len(item) == 1 and item[0].shape == (5, 3)


def test_split_is_contiguous_per_run_and_never_overlaps(two_run_files):
    dataset = CGDataset.from_files(two_run_files)
    train, validation, test = dataset.split(validation=0.2, test=0.1)
    frame_ids = [set(part.positions[:, 0, 0].astype(int).tolist()) for part in (train, validation, test)]
    assert not frame_ids[0] & frame_ids[1] and not frame_ids[0] & frame_ids[2] and not frame_ids[1] & frame_ids[2]
    assert len(frame_ids[0] | frame_ids[1] | frame_ids[2]) == 80  # nothing lost without gaps
    # per run: train = first block, validation = next, test = last block of time
    assert train.run_lengths == [35, 21] and validation.run_lengths == [10, 6] and test.run_lengths == [5, 3]
    assert sorted(frame_ids[2]) == [45, 46, 47, 48, 49, 1027, 1028, 1029]
    assert sorted(frame_ids[1]) == list(range(35, 45)) + list(range(1021, 1027))
    assert np.all(np.diff(train.time[:35]) > 0)  # time order kept
    # gaps drop frames between blocks
    gapped = dataset.split(validation=0.2, test=0.1, gap_frames=2)
    ids = [part.positions[:, 0, 0].astype(int) for part in gapped]
    assert gapped[0].run_lengths == [31, 17]  # 50 - 10 - 5 - 2 gaps of 2, 30 - 6 - 3 - 4
    assert ids[0][:31].max() + 3 == ids[1][:10].min() and ids[1][:10].max() + 3 == ids[2][:5].min()
    with pytest.raises(DatasetError, match="sum to less than 1"):
        dataset.split(validation=0.5, test=0.5)


def test_subsample_is_evenly_spaced_in_time(two_run_files):
    dataset = CGDataset.from_files(two_run_files)
    subset = dataset.subsample(8)
    np.testing.assert_array_equal(subset.positions[:, 0, 0], dataset.positions[[0, 11, 23, 34, 45, 56, 68, 79], 0, 0])
    assert subset.run_lengths == [5, 3]
    assert len(dataset.subsample(1000)) == 80


def test_dataloader_batches_cover_every_frame_once_and_are_reproducible(two_run_files):
    dataset = CGDataset.from_files(two_run_files)
    loader = dataset.dataloader(batch_size=16, shuffle=True, seed=3)
    batches = list(loader)
    assert len(batches) == 5 and all(len(batch) == 2 for batch in batches)
    assert batches[0][0].shape == (16, 5, 3) and batches[0][1].dtype == torch.float32
    seen = np.concatenate([batch[0][:, 0, 0].numpy() for batch in batches])
    assert sorted(seen.tolist()) == sorted(dataset.positions[:, 0, 0].tolist())
    again = np.concatenate([batch[0][:, 0, 0].numpy() for batch in dataset.dataloader(batch_size=16, seed=3)])
    np.testing.assert_array_equal(seen, again)
    assert not np.array_equal(seen, dataset.positions[:, 0, 0])  # shuffled
    ordered = next(iter(dataset.dataloader(batch_size=4, shuffle=False)))
    np.testing.assert_array_equal(ordered[0][:, 0, 0].numpy(), [0, 1, 2, 3])


def test_files_of_another_bead_count_or_temperature_are_refused(two_run_files, tmp_path):
    other = write_cg_file(tmp_path / "ten.h5", *_run(5, n_beads=10), metadata={"temperature": 300.0})
    with pytest.raises(DatasetError, match="ten.h5.*10 beads"):
        CGDataset.from_files([two_run_files[0], other])
    hot = write_cg_file(tmp_path / "hot.h5", *_run(5), metadata={"temperature": 340.0})
    with pytest.raises(DatasetError, match="340.0 K"):
        CGDataset.from_files([two_run_files[0], hot])
    no_forces = write_cg_file(tmp_path / "noforces.h5", _run(5)[0], metadata={"temperature": 300.0})
    with pytest.raises(DatasetError, match="lacks forces"):
        CGDataset.from_files([two_run_files[0], no_forces])
    with pytest.raises(DatasetError, match="does not exist"):
        CGDataset.from_files(tmp_path / "missing.h5")
    with pytest.raises(DatasetError, match="do not match"):
        CGDataset(np.zeros((3, 5, 3)), np.zeros((3, 4, 3)))


def _noisy_trajectory(pdb, n_frames: int, seed: int = 0) -> mdtraj.Trajectory:
    structure = mdtraj.load(str(pdb))
    noise = np.random.default_rng(seed).normal(scale=0.01, size=(n_frames, structure.n_atoms, 3))
    return mdtraj.Trajectory(structure.xyz + noise.astype(np.float32), structure.topology, time=np.arange(n_frames) * 0.5)


def test_from_trajectory_maps_positions_with_the_mapping(alanine_dipeptide_pdb, tmp_path):
    trajectory = _noisy_trajectory(alanine_dipeptide_pdb, 6)
    trajectory.save_dcd(str(tmp_path / "ala2.dcd"))
    dataset = CGDataset.from_trajectory(tmp_path / "ala2.dcd", alanine_dipeptide_pdb, mapping="backbone", temperature=300.0)
    assert dataset.positions.shape == (6, 5, 3) and dataset.forces is None
    beads = [4, 6, 8, 14, 16]  # ACE C, ALA N, CA, C, NME N
    np.testing.assert_allclose(dataset.positions, trajectory.xyz[:, beads], atol=1e-5)
    assert dataset.metadata["topology"]["bead_names"] == ["C", "N", "CA", "C", "N"]
    # a centre-of-mass mapping object works too
    mapping = CGMapping.center_of_mass(mdtraj.load_topology(str(alanine_dipeptide_pdb)))
    com = CGDataset.from_trajectory(tmp_path / "ala2.dcd", alanine_dipeptide_pdb, mapping=mapping)
    np.testing.assert_allclose(com.positions, mapping.map_positions(trajectory.xyz), atol=1e-5)
    # two files are two runs
    trajectory.save_dcd(str(tmp_path / "second.dcd"))
    both = CGDataset.from_trajectory([tmp_path / "ala2.dcd", tmp_path / "second.dcd"], alanine_dipeptide_pdb, stride=2)
    assert both.run_lengths == [3, 3]


def test_mismatched_topology_and_trajectory_is_a_clear_error(alanine_dipeptide_pdb, chignolin_pdb, tmp_path):
    _noisy_trajectory(alanine_dipeptide_pdb, 2).save_dcd(str(tmp_path / "ala2.dcd"))
    _noisy_trajectory(alanine_dipeptide_pdb, 2).save_xtc(str(tmp_path / "ala2.xtc"))
    for name in ("ala2.dcd", "ala2.xtc"):
        with pytest.raises(DatasetError, match=rf"{name}.* 22 atoms .*chignolin_cln025.pdb.* 166"):
            CGDataset.from_trajectory(tmp_path / name, chignolin_pdb, mapping="alpha_carbons")
    ala_mapping = CGMapping.backbone(mdtraj.load_topology(str(alanine_dipeptide_pdb)))
    _noisy_trajectory(chignolin_pdb, 2).save_dcd(str(tmp_path / "cln.dcd"))
    with pytest.raises(DatasetError, match="mapping refers to 22 atoms"):
        CGDataset.from_trajectory(tmp_path / "cln.dcd", chignolin_pdb, mapping=ala_mapping)


def test_from_npz_chunks_reads_runs_in_time_order(tmp_path):
    for run, offset in (("seed101", 0), ("seed102", 1000)):
        (tmp_path / run).mkdir()
        for chunk in range(3):
            positions, forces, _ = _run(4, offset=offset + 4 * chunk, seed=chunk)
            np.savez(tmp_path / run / f"chunk_{chunk:04d}.npz", x=positions, f=forces, state_pos=np.zeros((22, 3)))
    dataset = CGDataset.from_npz_chunks(tmp_path)
    assert dataset.run_lengths == [12, 12] and dataset.temperature == 300.0 and dataset.has_forces
    np.testing.assert_array_equal(dataset.positions[:12, 0, 0], np.arange(12))
    np.testing.assert_array_equal(dataset.positions[12:, 0, 0], 1000 + np.arange(12))
    np.testing.assert_allclose(dataset.time[:3], [0.2, 0.4, 0.6])
    single = CGDataset.from_npz_chunks(tmp_path / "seed102", temperature=340.0, frame_interval_ps=2.0, max_chunks=2)
    assert single.run_lengths == [8] and single.temperature == 340.0 and single.time[1] == 4.0
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no chunk_"):
        CGDataset.from_npz_chunks(empty)
