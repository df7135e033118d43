"""On-disk format of CG data: one appendable, chunked HDF5 file per run.

Every CG data set of the package — all-atom reference runs mapped to beads, a flow's teacher
samples, a :class:`~openmm_flowmatch.data.dataset.CGDataset` saved to disk — is stored in the
same simple layout, readable with plain ``h5py``:

``positions``
    ``(frames, beads, 3)`` float32, bead positions in nm.
``forces``
    ``(frames, beads, 3)`` float32, CG forces in kJ/mol/nm (optional: absent when a run
    saves positions only).
``time``
    ``(frames,)`` float64, time of each frame in ps. Data without a time axis (e.g. independent
    teacher samples) store the frame index.
attribute ``metadata``
    A JSON string: what made the data. Reference runs write the mapping (``CGMapping.to_dict``),
    the CG topology (``bead_names``, ``residue_names``, ``masses`` in amu, ``bonds``), the
    ``temperature`` in K, the force field, the seed, the package version and the ``source``.
    Any JSON-able dict is accepted.
attributes ``format`` and ``format_version``
    ``"openmm_flowmatch.cg"`` and :data:`FORMAT_VERSION`.

Frames can be appended to an existing file (:class:`CGTrajectoryFile`), and a file can be
truncated to a frame count (used to resume an interrupted run exactly at its last checkpoint).
The datasets are chunked along the frame axis and resizable, so appending never rewrites data.

Examples
--------
>>> write_cg_file("teacher.h5", positions, forces, metadata={"temperature": 300.0})  # doctest: +SKIP
>>> data = read_cg_file("teacher.h5")  # doctest: +SKIP
>>> data["positions"].shape, data["metadata"]["temperature"]  # doctest: +SKIP
((100000, 5, 3), 300.0)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "StorageError", "CGTrajectoryFile", "read_cg_file", "write_cg_file"]

FORMAT_NAME = "openmm_flowmatch.cg"
"""Value of the ``format`` attribute of every CG data file."""

FORMAT_VERSION = 1
"""Version of the on-disk layout; readers refuse files written by a newer version."""

_TARGET_CHUNK_BYTES = 256 * 1024

REGENERATE = "regenerate the file (e.g. re-run openmm-flowmatch generate or teacher) or leave it out of the input"
"""What the message of a refused (truncated, corrupt, non-finite) data file tells the user to do."""


class StorageError(ValueError):
    """A CG data file cannot be created, read or appended to; the message names the file."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _as_frames(values: Any, name: str, path: Path) -> np.ndarray:
    """Plain ``(frames, beads, 3)`` float32 array (a single ``(beads, 3)`` frame is promoted)."""
    if hasattr(values, "value_in_unit"):
        import openmm.unit as unit

        target = unit.nanometer if name == "positions" else unit.kilojoule_per_mole / unit.nanometer
        values = values.value_in_unit(target)
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[-1] != 3:
        raise StorageError(
            f"{name} for {str(path)!r} must have shape (frames, beads, 3) or (beads, 3), got {array.shape}"
        )
    return array


def _short(error: BaseException) -> str:
    """The first 200 characters of an error message, on one line."""
    return " ".join(str(error).split())[:200] or type(error).__name__


def _check_finite(values: np.ndarray, name: str, path: Path, start: int, stride: int) -> None:
    """Refuse NaN or infinite values read from a file, naming the file, dataset and first frame."""
    bad = ~np.isfinite(values)
    if bad.any():
        frame = start + stride * int(np.argwhere(bad)[0][0])
        raise StorageError(
            f"{str(path)!r}: {name} hold NaN or infinite values (in {int(bad.any(axis=(1, 2)).sum())} of "
            f"{values.shape[0]} frames read, the first at frame {frame}); {REGENERATE}"
        )


def _chunk_frames(n_beads: int) -> int:
    """Frames per HDF5 chunk: about 256 kB per chunk, at least one frame."""
    return int(max(1, min(4096, _TARGET_CHUNK_BYTES // (12 * max(n_beads, 1)))))


def ensure_writable_directory(
    directory: Path, error_type: type[ValueError] = StorageError, description: str = "directory"
) -> None:
    """Create ``directory`` if needed and check that files can be written there.

    Raises ``error_type`` with a message naming the directory (called ``description``) and
    saying what to do; the reference generator passes its own error type.
    """
    directory = Path(directory) if str(directory) else Path(".")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise error_type(
            f"cannot create the {description} {str(directory)!r} ({error.strerror or error}); "
            "choose a writable output directory"
        ) from error
    if not directory.is_dir():
        raise error_type(f"{str(directory)!r} is not a directory; choose a writable output directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise error_type(f"the {description} {str(directory)!r} is not writable; choose a writable output directory")


def _decode_metadata(raw: Any, path: Path) -> dict:
    if raw is None:
        return {}
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as error:
        raise StorageError(f"the metadata attribute of {str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(metadata, dict):
        raise StorageError(f"the metadata attribute of {str(path)!r} is not a JSON object")
    return metadata


def _encode_metadata(metadata: dict | None, path: Path) -> str:
    try:
        return json.dumps(metadata or {}, default=_json_default, sort_keys=True)
    except TypeError as error:
        raise StorageError(f"metadata for {str(path)!r} is not JSON-serialisable: {error}") from error


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"object of type {type(value).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------------------------
# CGTrajectoryFile
# --------------------------------------------------------------------------------------------


class CGTrajectoryFile:
    """An appendable CG data file (HDF5, see the module docstring for the layout).

    Parameters
    ----------
    path
        File path (conventionally ``*.h5``).
    mode
        ``"r"`` read only; ``"a"`` read/append, creating the file if missing (default);
        ``"w"`` create, overwriting an existing file.
    metadata
        JSON-able dict stored when the file is created (ignored when an existing file is opened
        for append; use :meth:`update_metadata` to change it).

    Notes
    -----
    The datasets are created by the first :meth:`append` (that fixes the bead count and
    whether the file holds forces). The file is not safe against concurrent writers. Close it
    (or use it as a context manager) to make sure everything is on disk; :meth:`flush` pushes
    the written frames to the file without closing it.

    Examples
    --------
    >>> with CGTrajectoryFile("run.h5", "a", metadata={"temperature": 300.0}) as file:  # doctest: +SKIP
    ...     file.append(positions, forces, time)
    ...     print(file.n_frames)
    """

    def __init__(self, path: str | os.PathLike, mode: str = "a", metadata: dict | None = None) -> None:
        import h5py

        self.path = Path(path)
        if mode not in ("r", "a", "w"):
            raise StorageError(f"mode must be 'r', 'a' or 'w', got {mode!r}")
        self.mode = mode
        if mode == "r" and not self.path.is_file():
            raise StorageError(f"CG data file {str(self.path)!r} does not exist")
        if mode != "r":
            ensure_writable_directory(self.path.parent)
        creating = mode == "w" or not self.path.exists()
        try:
            self._file = h5py.File(self.path, "w" if creating else mode)
        except OSError as error:
            raise StorageError(
                f"cannot open {str(self.path)!r} as a CG data file (HDF5) in mode {mode!r}: it is truncated, "
                f"corrupt or not HDF5 ({_short(error)}); {REGENERATE}"
            ) from None
        if creating:
            self._file.attrs["format"] = FORMAT_NAME
            self._file.attrs["format_version"] = FORMAT_VERSION
            self._file.attrs["metadata"] = _encode_metadata(metadata, self.path)
        else:
            try:
                self._check_format()
            except StorageError:
                self._file.close()
                raise

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "a", metadata: dict | None = None) -> CGTrajectoryFile:
        """Open (or create) a CG data file; the same as the constructor."""
        return cls(path, mode, metadata)

    # ---------------------------------------------------------------- context manager

    def __enter__(self) -> CGTrajectoryFile:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close the file (idempotent)."""
        if getattr(self, "_file", None) is not None and self._file.id.valid:
            self._file.close()

    def flush(self) -> None:
        """Write buffered frames and metadata to disk."""
        self._file.flush()

    # ---------------------------------------------------------------- properties

    def _check_format(self) -> None:
        attrs = self._file.attrs
        name = attrs.get("format")
        if isinstance(name, bytes):
            name = name.decode()
        plain_h5_with_positions = name is None and "positions" in self._file
        if name != FORMAT_NAME and not plain_h5_with_positions:
            raise StorageError(
                f"{str(self.path)!r} is not an openmm_flowmatch CG data file "
                f"(format attribute {name!r}, datasets {sorted(self._file.keys())})"
            )
        version = int(attrs.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise StorageError(
                f"{str(self.path)!r} has format version {version}, newer than this package "
                f"understands ({FORMAT_VERSION}); update openmm_flowmatch"
            )

    @property
    def n_frames(self) -> int:
        """Number of frames stored."""
        return int(self._file["positions"].shape[0]) if "positions" in self._file else 0

    @property
    def n_beads(self) -> int | None:
        """Number of beads, or ``None`` before the first :meth:`append`."""
        return int(self._file["positions"].shape[1]) if "positions" in self._file else None

    @property
    def has_forces(self) -> bool | None:
        """Whether the file stores forces (``None`` before the first :meth:`append`)."""
        if "positions" not in self._file:
            return None
        return "forces" in self._file

    @property
    def metadata(self) -> dict:
        """The metadata dict (a copy; change it with :meth:`update_metadata`)."""
        return _decode_metadata(self._file.attrs.get("metadata"), self.path)

    def update_metadata(self, values: dict) -> None:
        """Merge ``values`` into the stored metadata (top-level keys are replaced)."""
        self._require_writable()
        metadata = self.metadata
        metadata.update(values)
        self._file.attrs["metadata"] = _encode_metadata(metadata, self.path)

    # ---------------------------------------------------------------- writing

    def _require_writable(self) -> None:
        if self.mode == "r":
            raise StorageError(f"{str(self.path)!r} was opened read-only (mode 'r')")

    def _create_datasets(self, n_beads: int, with_forces: bool) -> None:
        chunks = (_chunk_frames(n_beads), n_beads, 3)
        # fletcher32: every chunk carries a checksum, so a bit flipped on disk is refused on read
        self._file.create_dataset(
            "positions", shape=(0, n_beads, 3), maxshape=(None, n_beads, 3), dtype="float32", chunks=chunks,
            fletcher32=True,
        )
        self._file["positions"].attrs["units"] = "nm"
        if with_forces:
            self._file.create_dataset(
                "forces", shape=(0, n_beads, 3), maxshape=(None, n_beads, 3), dtype="float32", chunks=chunks,
                fletcher32=True,
            )
            self._file["forces"].attrs["units"] = "kJ/mol/nm"
        self._file.create_dataset(
            "time", shape=(0,), maxshape=(None,), dtype="float64", chunks=(chunks[0],), fletcher32=True
        )
        self._file["time"].attrs["units"] = "ps"

    def append(self, positions: Any, forces: Any = None, time: Any = None) -> int:
        """Append frames.

        Parameters
        ----------
        positions
            ``(frames, beads, 3)`` or ``(beads, 3)`` bead positions in nm.
        forces
            Same shape, kJ/mol/nm. Required if and only if the file stores forces (decided by the
            first append).
        time
            ``(frames,)`` times in ps; default: the frame indices ``n_frames, n_frames+1, ...``.

        Returns
        -------
        int
            The number of frames in the file after appending.

        Raises
        ------
        StorageError
            If shapes are inconsistent, the bead count differs from the file's, forces are
            given to a file without forces (or missing for one with forces), or values are not
            finite.
        """
        self._require_writable()
        positions = _as_frames(positions, "positions", self.path)
        n_new, n_beads = positions.shape[:2]
        if forces is not None:
            forces = _as_frames(forces, "forces", self.path)
            if forces.shape != positions.shape:
                raise StorageError(
                    f"forces of shape {forces.shape} do not match positions of shape {positions.shape} "
                    f"for {str(self.path)!r}"
                )
        if time is None:
            time = np.arange(self.n_frames, self.n_frames + n_new, dtype=np.float64)
        else:
            time = np.asarray(getattr(time, "_value", time), dtype=np.float64).reshape(-1)
            if time.shape[0] != n_new:
                raise StorageError(f"got {time.shape[0]} times for {n_new} frames in {str(self.path)!r}")
        for name, values in (("positions", positions), ("forces", forces)):
            if values is not None and not np.isfinite(values).all():
                frame = int(np.argwhere(~np.isfinite(values))[0][0])
                raise StorageError(
                    f"{name} appended to {str(self.path)!r} contain NaN or infinite values "
                    f"(first in new frame {frame}); the simulation probably blew up"
                )
        if "positions" not in self._file:
            self._create_datasets(n_beads, forces is not None)
        if n_beads != self.n_beads:
            raise StorageError(
                f"cannot append frames of {n_beads} beads to {str(self.path)!r}, which holds "
                f"{self.n_beads} beads per frame; write data of another mapping to another file"
            )
        if self.has_forces and forces is None:
            raise StorageError(f"{str(self.path)!r} stores forces; append forces with the positions")
        if not self.has_forces and forces is not None:
            raise StorageError(
                f"{str(self.path)!r} stores positions only (its first frames had no forces); "
                "cannot append forces to it"
            )
        start = self.n_frames
        stop = start + n_new
        for name, values in (("positions", positions), ("forces", forces), ("time", time)):
            if values is None:
                continue
            dataset = self._file[name]
            dataset.resize(stop, axis=0)
            dataset[start:stop] = values
        return stop

    def truncate(self, n_frames: int) -> None:
        """Drop every frame from index ``n_frames`` on (used when resuming a run).

        Raises
        ------
        StorageError
            If ``n_frames`` is negative or larger than the number of stored frames.
        """
        self._require_writable()
        if not 0 <= n_frames <= self.n_frames:
            raise StorageError(
                f"cannot truncate {str(self.path)!r} to {n_frames} frames: it holds {self.n_frames}"
            )
        if n_frames == self.n_frames:
            return
        for name in ("positions", "forces", "time"):
            if name in self._file:
                self._file[name].resize(n_frames, axis=0)

    # ---------------------------------------------------------------- reading

    def read(self, start: int = 0, stop: int | None = None, stride: int = 1) -> dict:
        """Read frames ``start:stop:stride``.

        Returns
        -------
        dict
            ``positions`` (frames, beads, 3) float32 nm, ``forces`` (same, kJ/mol/nm) or
            ``None``, ``time`` (frames,) float64 ps, ``metadata`` dict.

        Raises
        ------
        StorageError
            If the datasets disagree in shape, a chunk cannot be read (truncated file, failed
            checksum) or positions or forces hold NaN or infinite values; nothing is returned
            half-read.
        """
        selection = slice(start, stop, stride)
        if "positions" not in self._file:
            empty = np.zeros((0, 0, 3), dtype=np.float32)
            return {"positions": empty, "forces": None, "time": np.zeros(0), "metadata": self.metadata}
        self._check_layout()
        try:
            data = {
                "positions": np.asarray(self._file["positions"][selection], dtype=np.float32),
                "forces": np.asarray(self._file["forces"][selection], dtype=np.float32) if self.has_forces else None,
                "time": self._read_time(selection),
            }
        except (OSError, KeyError, ValueError, RuntimeError) as error:  # h5py: truncated data, bad checksum
            raise StorageError(
                f"cannot read the frames of {str(self.path)!r}: the file is corrupt (a data chunk is damaged or fails "
                f"its checksum: {_short(error)}); {REGENERATE}"
            ) from None
        first = selection.indices(self.n_frames)[0]
        for name in ("positions", "forces"):
            if data[name] is not None:
                _check_finite(data[name], name, self.path, first, stride)
        return data | {"metadata": self.metadata}

    def _check_layout(self) -> None:
        """Refuse a file whose datasets disagree in frame count or shape (e.g. an interrupted hand-made write)."""
        positions = self._file["positions"]
        expected = {"positions": positions.shape, "forces": positions.shape, "time": positions.shape[:1]}
        if len(positions.shape) != 3 or positions.shape[-1] != 3:
            raise StorageError(f"{str(self.path)!r}: positions have shape {positions.shape}, not (frames, beads, 3); {REGENERATE}")
        for name in ("forces", "time"):
            if name in self._file and self._file[name].shape != expected[name]:
                raise StorageError(
                    f"{str(self.path)!r}: {name} have shape {self._file[name].shape} but positions {positions.shape}; "
                    f"{REGENERATE}"
                )

    def _read_time(self, selection: slice) -> np.ndarray:
        """Times in ps; the frame indices for a plain HDF5 file without a ``time`` dataset."""
        if "time" in self._file:
            return np.asarray(self._file["time"][selection], dtype=np.float64)
        return np.arange(self.n_frames, dtype=np.float64)[selection]

    def __len__(self) -> int:
        return self.n_frames

    def __repr__(self) -> str:
        return f"CGTrajectoryFile({str(self.path)!r}, mode={self.mode!r}, n_frames={self.n_frames}, n_beads={self.n_beads})"


# --------------------------------------------------------------------------------------------
# one-call helpers
# --------------------------------------------------------------------------------------------


def write_cg_file(
    path: str | os.PathLike,
    positions: Any,
    forces: Any = None,
    time: Any = None,
    metadata: dict | None = None,
) -> Path:
    """Write a complete CG data file in one call (overwriting ``path``).

    This is how teacher samples of a flow and saved datasets are written, so that
    :meth:`CGDataset.from_files <openmm_flowmatch.data.dataset.CGDataset.from_files>` reads them.

    Parameters
    ----------
    path
        Output file (``*.h5``); its directory is created if needed.
    positions
        ``(frames, beads, 3)`` bead positions in nm (NumPy array, torch tensor or quantity).
    forces
        ``(frames, beads, 3)`` CG forces in kJ/mol/nm, or ``None``.
    time
        ``(frames,)`` in ps; default: frame indices (for samples without a time axis).
    metadata
        JSON-able dict, e.g. ``{"temperature": 300.0, "mapping": mapping.to_dict(), "source": "teacher"}``.
        Readers of CG data rely on ``"temperature"`` (K) when it is present.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    StorageError
        For an unwritable directory, inconsistent shapes or non-finite values.
    """
    path = Path(path)
    positions = _as_frames(positions, "positions", path)
    tmp_path = path.with_name(path.name + ".tmp")
    try:
        with CGTrajectoryFile(tmp_path, "w", metadata=metadata) as file:
            file.append(positions, forces, time)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    logger.info("wrote %d frames of %d beads to %s", positions.shape[0], positions.shape[1], path)
    return path


def read_cg_file(path: str | os.PathLike, start: int = 0, stop: int | None = None, stride: int = 1) -> dict:
    """Read a CG data file.

    Parameters
    ----------
    path
        File written by :func:`write_cg_file` or :class:`CGTrajectoryFile`.
    start, stop, stride
        Frame selection (default: all frames).

    Returns
    -------
    dict
        ``positions`` ``(frames, beads, 3)`` float32 nm; ``forces`` same shape float32
        kJ/mol/nm or ``None``; ``time`` ``(frames,)`` float64 ps; ``metadata`` dict.

    Raises
    ------
    StorageError
        If the file is missing, not a CG data file, truncated or corrupt, or holds NaN or
        infinite positions or forces (the message names the file and what to do).
    """
    with CGTrajectoryFile(path, "r") as file:
        return file.read(start, stop, stride)
