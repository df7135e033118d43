"""The CG data file format: round trips, appending, truncation, clear errors."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from openmm_flowmatch.data.storage import (
    FORMAT_NAME,
    CGTrajectoryFile,
    StorageError,
    read_cg_file,
    write_cg_file,
)


def _frames(n_frames: int, n_beads: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n_frames, n_beads, 3)).astype(np.float32)


def test_write_read_round_trip_keeps_values_dtypes_and_metadata(tmp_path):
    positions, forces = _frames(7, 5, 0), _frames(7, 5, 1) * 100
    time = np.linspace(0.2, 1.4, 7)
    metadata = {"temperature": 300.0, "topology": {"bead_names": ["C", "N", "CA", "C", "N"]}, "seed": np.int64(3)}
    path = write_cg_file(tmp_path / "run.h5", positions, forces, time, metadata)
    data = read_cg_file(path)
    assert data["positions"].dtype == np.float32 and data["forces"].dtype == np.float32
    assert data["time"].dtype == np.float64
    np.testing.assert_array_equal(data["positions"], positions)
    np.testing.assert_array_equal(data["forces"], forces)
    np.testing.assert_array_equal(data["time"], time)
    assert data["metadata"] == {"temperature": 300.0, "topology": {"bead_names": ["C", "N", "CA", "C", "N"]}, "seed": 3}
    with h5py.File(path, "r") as handle:  # plain h5py sees the documented layout
        assert handle.attrs["format"] == FORMAT_NAME
        assert handle["positions"].attrs["units"] == "nm"
        assert handle["forces"].attrs["units"] == "kJ/mol/nm"
        assert json.loads(handle.attrs["metadata"])["temperature"] == 300.0
        assert handle["positions"].chunks is not None and handle["positions"].maxshape[0] is None


def test_positions_only_and_default_time_is_frame_index(tmp_path):
    positions = _frames(4, 3, 2)
    data = read_cg_file(write_cg_file(tmp_path / "samples.h5", positions))
    assert data["forces"] is None
    np.testing.assert_array_equal(data["time"], [0.0, 1.0, 2.0, 3.0])


def test_unit_quantities_are_converted_at_the_boundary(tmp_path):
    import openmm.unit as unit

    positions = _frames(2, 3, 3)
    forces = _frames(2, 3, 4)
    path = write_cg_file(
        tmp_path / "q.h5",
        unit.Quantity(positions * 10.0, unit.angstrom),
        unit.Quantity(forces / 4.184, unit.kilocalorie_per_mole / unit.nanometer),
    )
    data = read_cg_file(path)
    np.testing.assert_allclose(data["positions"], positions, rtol=1e-6)
    np.testing.assert_allclose(data["forces"], forces, rtol=1e-6)


def test_appending_in_pieces_equals_one_write_and_truncate_drops_the_tail(tmp_path):
    positions, forces = _frames(10, 4, 5), _frames(10, 4, 6)
    time = 0.2 * np.arange(1, 11)
    path = tmp_path / "append.h5"
    with CGTrajectoryFile(path, "a", metadata={"temperature": 340.0}) as file:
        assert file.n_frames == 0 and file.n_beads is None
        assert file.append(positions[:3], forces[:3], time[:3]) == 3
    with CGTrajectoryFile.open(path, "a", metadata={"ignored": True}) as file:  # reopen: metadata kept
        assert file.metadata == {"temperature": 340.0}
        file.append(positions[3], forces[3], time[3:4])  # a single (beads, 3) frame
        file.append(positions[4:], forces[4:], time[4:])
        file.flush()
        assert file.n_frames == 10 and file.n_beads == 4 and file.has_forces
    data = read_cg_file(path)
    np.testing.assert_array_equal(data["positions"], positions)
    np.testing.assert_array_equal(data["forces"], forces)
    np.testing.assert_array_equal(data["time"], time)
    with CGTrajectoryFile(path, "a") as file:
        file.truncate(6)
        file.update_metadata({"note": "truncated"})
        file.append(positions[:1], forces[:1], [99.0])
    data = read_cg_file(path)
    assert data["positions"].shape == (7, 4, 3)
    np.testing.assert_array_equal(data["positions"][:6], positions[:6])
    np.testing.assert_array_equal(data["positions"][6], positions[0])
    assert data["time"][-1] == 99.0 and data["metadata"]["note"] == "truncated"
    assert read_cg_file(path, start=2, stop=6, stride=2)["positions"].shape == (2, 4, 3)


def test_appending_another_bead_count_is_refused(tmp_path):
    path = write_cg_file(tmp_path / "five.h5", _frames(3, 5, 0), _frames(3, 5, 1))
    with CGTrajectoryFile(path, "a") as file:
        with pytest.raises(StorageError, match="10 beads.*holds 5 beads"):
            file.append(_frames(2, 10, 0), _frames(2, 10, 1))
        assert file.n_frames == 3


def test_forces_presence_must_match_the_file(tmp_path):
    with_forces = write_cg_file(tmp_path / "f.h5", _frames(2, 3, 0), _frames(2, 3, 1))
    without = write_cg_file(tmp_path / "nof.h5", _frames(2, 3, 0))
    with CGTrajectoryFile(with_forces, "a") as file, pytest.raises(StorageError, match="stores forces"):
        file.append(_frames(1, 3, 2))
    with CGTrajectoryFile(without, "a") as file, pytest.raises(StorageError, match="positions only"):
        file.append(_frames(1, 3, 2), _frames(1, 3, 3))


def test_bad_shapes_and_non_finite_values_are_refused(tmp_path):
    with pytest.raises(StorageError, match=r"\(frames, beads, 3\)"):
        write_cg_file(tmp_path / "bad.h5", np.zeros((2, 5, 2)))
    with pytest.raises(StorageError, match="do not match"):
        write_cg_file(tmp_path / "bad.h5", np.zeros((2, 5, 3)), np.zeros((2, 4, 3)))
    positions = _frames(3, 2, 0)
    positions[1, 0, 0] = np.nan
    with pytest.raises(StorageError, match="NaN"):
        write_cg_file(tmp_path / "nan.h5", positions)
    assert not (tmp_path / "nan.h5").exists() and not (tmp_path / "nan.h5.tmp").exists()


def test_unwritable_directory_gives_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="cannot create the directory|not a directory"):
        write_cg_file(blocker / "sub" / "run.h5", _frames(1, 2, 0))
    with pytest.raises(StorageError, match="does not exist"):
        read_cg_file(tmp_path / "missing.h5")


def test_foreign_hdf5_file_is_refused(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as handle:
        handle["something"] = np.zeros(3)
    with pytest.raises(StorageError, match="not an openmm_flowmatch CG data file"):
        read_cg_file(path)
