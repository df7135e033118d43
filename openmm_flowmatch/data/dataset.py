"""CG datasets: bead positions (and forces) of one or many runs, ready for PyTorch.

A :class:`CGDataset` holds ``positions`` ``(frames, beads, 3)`` in nm, optional ``forces`` of
the same shape in kJ/mol/nm, the ``time`` of each frame in ps, the ``temperature`` in K and a
``metadata`` dict. It remembers where one run ends and the next begins (``run_lengths``), so
that :meth:`CGDataset.split` can cut every run into contiguous blocks of time — frames a
fraction of a picosecond apart are strongly correlated, and a random split would leak
neighbours of the test frames into the training set.

Sources: CG data files (:meth:`CGDataset.from_files`, written by
:func:`~openmm_flowmatch.data.reference.generate_reference` or
:func:`~openmm_flowmatch.data.storage.write_cg_file`), any all-atom trajectory mdtraj reads
plus a :class:`~openmm_flowmatch.mapping.CGMapping` (:meth:`CGDataset.from_trajectory`,
positions only), and directories of ``chunk_*.npz`` files (:meth:`CGDataset.from_npz_chunks`).

Indexing returns a tuple of float32 tensors: ``(positions, forces)`` when the dataset has
forces, ``(positions,)`` otherwise; so ``batch[0]`` is always the positions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .storage import read_cg_file, write_cg_file

logger = logging.getLogger(__name__)

__all__ = ["CGDataset", "DatasetError", "evenly_spaced_indices"]


class DatasetError(ValueError):
    """A CG dataset cannot be built from the given input; the message names the file."""


def _as_paths(paths: str | os.PathLike | Sequence[str | os.PathLike], pattern: str) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    result: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = sorted(path.glob(pattern))
            if not found:
                raise DatasetError(f"the directory {str(path)!r} holds no {pattern} file")
            result.extend(found)
        elif path.is_file():
            result.append(path)
        else:
            raise DatasetError(f"{str(path)!r} does not exist")
    if not result:
        raise DatasetError("no input file given")
    return result


def evenly_spaced_indices(total: int, n_frames: int) -> np.ndarray:
    """``n_frames`` indices of ``range(total)`` evenly spaced in time (all of them if fewer).

    The rule of :meth:`CGDataset.subsample`: ``round(linspace(0, total − 1, n_frames))``, unique.
    """
    if n_frames >= total:
        return np.arange(total)
    return np.unique(np.round(np.linspace(0, total - 1, n_frames)).astype(np.int64))


class CGDataset(torch.utils.data.Dataset):
    """Bead positions and (optionally) forces of one or several runs.

    Parameters
    ----------
    positions
        ``(frames, beads, 3)`` bead positions in nm.
    forces
        ``(frames, beads, 3)`` CG forces in kJ/mol/nm, or ``None``.
    temperature
        Temperature of the data in K; default: ``metadata["temperature"]`` if present, else
        ``None`` (unknown).
    metadata
        JSON-able dict describing the data (mapping, topology, source, ...).
    time
        ``(frames,)`` time of each frame in ps (restarting in every run); default: frame index
        within each run.
    run_lengths
        Frames of each consecutive run (they must sum to the number of frames); default: one run.

    Attributes
    ----------
    positions : numpy.ndarray
        float32 ``(frames, beads, 3)``, nm.
    forces : numpy.ndarray or None
        float32 ``(frames, beads, 3)``, kJ/mol/nm.
    time : numpy.ndarray
        float64 ``(frames,)``, ps.
    temperature : float or None
        K.
    metadata : dict
    run_lengths : list of int
    """

    def __init__(
        self,
        positions: Any,
        forces: Any = None,
        temperature: float | None = None,
        metadata: dict | None = None,
        time: Any = None,
        run_lengths: Sequence[int] | None = None,
    ) -> None:
        positions = np.ascontiguousarray(positions, dtype=np.float32)
        if positions.ndim != 3 or positions.shape[-1] != 3:
            raise DatasetError(f"positions must have shape (frames, beads, 3), got {positions.shape}")
        if forces is not None:
            forces = np.ascontiguousarray(forces, dtype=np.float32)
            if forces.shape != positions.shape:
                raise DatasetError(f"forces of shape {forces.shape} do not match positions of shape {positions.shape}")
        n_frames = positions.shape[0]
        if run_lengths is None:
            run_lengths = [n_frames] if n_frames else []
        run_lengths = [int(length) for length in run_lengths if int(length) > 0]
        if sum(run_lengths) != n_frames:
            raise DatasetError(f"run lengths {run_lengths} do not add up to the {n_frames} frames")
        if time is None:
            time = np.concatenate([np.arange(length, dtype=np.float64) for length in run_lengths]) if run_lengths else np.zeros(0)
        time = np.asarray(time, dtype=np.float64).reshape(-1)
        if time.shape[0] != n_frames:
            raise DatasetError(f"got {time.shape[0]} times for {n_frames} frames")
        self.positions = positions
        self.forces = forces
        self.time = time
        self.run_lengths = run_lengths
        self.metadata = dict(metadata or {})
        if temperature is None:
            temperature = self.metadata.get("temperature")
        self.temperature = None if temperature is None else float(temperature)
        if self.temperature is not None:
            self.metadata["temperature"] = self.temperature

    # ---------------------------------------------------------------- basic properties

    @property
    def n_frames(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_beads(self) -> int:
        return int(self.positions.shape[1])

    @property
    def has_forces(self) -> bool:
        return self.forces is not None

    @property
    def run_starts(self) -> np.ndarray:
        """Index of the first frame of each run."""
        return np.concatenate([[0], np.cumsum(self.run_lengths)[:-1]]).astype(int) if self.run_lengths else np.zeros(0, int)

    @property
    def run_indices(self) -> np.ndarray:
        """``(frames,)`` index of the run each frame belongs to."""
        return np.repeat(np.arange(len(self.run_lengths)), self.run_lengths)

    @property
    def kT(self) -> float:
        """Thermal energy in kJ/mol at the dataset's temperature."""
        from ..units import kT

        if self.temperature is None:
            raise DatasetError("the dataset's temperature is unknown; pass temperature=... when loading it")
        return kT(self.temperature)

    def __len__(self) -> int:
        return self.n_frames

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, ...]:
        """Frames as float32 tensors: ``(positions, forces)`` or ``(positions,)``.

        ``index`` may be an int (one frame, ``(beads, 3)``), a slice, or a sequence/array/tensor
        of indices (a batch, ``(batch, beads, 3)``).
        """
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        if isinstance(index, (list, tuple)):
            index = np.asarray(index, dtype=np.int64)
        positions = torch.from_numpy(np.ascontiguousarray(self.positions[index]))
        if self.forces is None:
            return (positions,)
        return positions, torch.from_numpy(np.ascontiguousarray(self.forces[index]))

    def __repr__(self) -> str:
        return (
            f"CGDataset(n_frames={self.n_frames}, n_beads={self.n_beads}, forces={self.has_forces}, "
            f"runs={len(self.run_lengths)}, temperature={self.temperature})"
        )

    # ---------------------------------------------------------------- selections

    def select(self, indices: Any) -> CGDataset:
        """A new dataset of the frames ``indices`` (sorted, within-run order kept).

        Run boundaries follow the selected frames: frames of one run stay one run.
        """
        indices = np.sort(np.asarray(indices, dtype=np.int64).reshape(-1))
        if indices.size and (indices[0] < 0 or indices[-1] >= self.n_frames):
            raise DatasetError(f"frame indices must lie in 0..{self.n_frames - 1}")
        runs = np.bincount(self.run_indices[indices], minlength=len(self.run_lengths)) if indices.size else []
        return CGDataset(
            self.positions[indices],
            None if self.forces is None else self.forces[indices],
            temperature=self.temperature,
            metadata=self.metadata,
            time=self.time[indices],
            run_lengths=list(runs),
        )

    def split(self, validation: float = 0.1, test: float = 0.1, gap_frames: int = 0) -> tuple[CGDataset, CGDataset, CGDataset]:
        """Split every run into contiguous blocks of time: training, then validation, then test.

        Parameters
        ----------
        validation, test
            Fractions of each run's frames for validation and test (the rest trains).
        gap_frames
            Frames dropped between consecutive blocks (e.g. a decorrelation time), default 0.

        Returns
        -------
        tuple of CGDataset
            ``(train, validation, test)``; no frame is in two of them, and each keeps its runs'
            time order.

        Raises
        ------
        DatasetError
            If the fractions are negative or sum to 1 or more.
        """
        if validation < 0 or test < 0 or validation + test >= 1.0:
            raise DatasetError(f"validation ({validation}) and test ({test}) must be ≥ 0 and sum to less than 1")
        if gap_frames < 0:
            raise DatasetError("gap_frames must be ≥ 0")
        blocks: list[list[np.ndarray]] = [[], [], []]
        for start, length in zip(self.run_starts, self.run_lengths):
            n_test = int(round(length * test))
            n_validation = int(round(length * validation))
            n_gaps = gap_frames * ((n_validation > 0) + (n_test > 0))
            n_train = length - n_validation - n_test - n_gaps
            if n_train <= 0:
                raise DatasetError(
                    f"a run of {length} frames is too short to split with validation={validation}, "
                    f"test={test}, gap_frames={gap_frames}"
                )
            blocks[0].append(np.arange(start, start + n_train))
            cursor = start + n_train
            for block, size in ((1, n_validation), (2, n_test)):
                if size:
                    cursor += gap_frames
                    blocks[block].append(np.arange(cursor, cursor + size))
                    cursor += size
        train, validation_set, test_set = (
            self.select(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)) for parts in blocks
        )
        return train, validation_set, test_set

    def subsample(self, n_frames: int) -> CGDataset:
        """``n_frames`` frames evenly spaced in time over the whole dataset (all frames if fewer)."""
        if n_frames < 1:
            raise DatasetError(f"n_frames must be ≥ 1, got {n_frames}")
        return self.select(evenly_spaced_indices(self.n_frames, n_frames))

    @classmethod
    def concatenate(cls, datasets: Sequence[CGDataset]) -> CGDataset:
        """Join datasets of the same beads as consecutive runs.

        Raises
        ------
        DatasetError
            If bead counts, temperatures or the presence of forces differ.
        """
        datasets = list(datasets)
        if not datasets:
            raise DatasetError("nothing to concatenate")
        first = datasets[0]
        for index, dataset in enumerate(datasets[1:], start=1):
            if dataset.n_beads != first.n_beads:
                raise DatasetError(f"dataset {index} has {dataset.n_beads} beads, dataset 0 has {first.n_beads}")
            if dataset.has_forces != first.has_forces:
                raise DatasetError(f"dataset {index} {'has' if dataset.has_forces else 'lacks'} forces, unlike dataset 0")
            if dataset.temperature != first.temperature:
                raise DatasetError(f"dataset {index} is at {dataset.temperature} K, dataset 0 at {first.temperature} K")
        return cls(
            np.concatenate([dataset.positions for dataset in datasets]),
            np.concatenate([dataset.forces for dataset in datasets]) if first.has_forces else None,
            temperature=first.temperature,
            metadata=first.metadata,
            time=np.concatenate([dataset.time for dataset in datasets]),
            run_lengths=[length for dataset in datasets for length in dataset.run_lengths],
        )

    # ---------------------------------------------------------------- PyTorch

    def dataloader(
        self, batch_size: int = 256, shuffle: bool = True, seed: int = 0, drop_last: bool = False, num_workers: int = 0
    ) -> torch.utils.data.DataLoader:
        """A DataLoader yielding batches ``(positions, forces)`` or ``(positions,)``.

        Batches are gathered with one array index per batch (no per-frame collation).
        Shuffling is reproducible: ``seed`` fixes the order of every epoch.
        """
        if batch_size < 1:
            raise DatasetError(f"batch_size must be ≥ 1, got {batch_size}")
        if self.n_frames == 0:
            raise DatasetError("the dataset is empty; nothing to load (check the split fractions)")
        if shuffle:
            generator = torch.Generator().manual_seed(int(seed))
            sampler: torch.utils.data.Sampler = torch.utils.data.RandomSampler(self, generator=generator)
        else:
            sampler = torch.utils.data.SequentialSampler(self)
        batches = torch.utils.data.BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last)
        return torch.utils.data.DataLoader(self, sampler=batches, batch_size=None, num_workers=num_workers)

    # ---------------------------------------------------------------- files

    def save(self, path: str | os.PathLike) -> Path:
        """Write the dataset as one CG data file (HDF5, :mod:`~openmm_flowmatch.data.storage`).

        The run boundaries are stored in the metadata (``run_lengths``), so
        :meth:`from_files` restores them.
        """
        metadata = {**self.metadata, "run_lengths": list(self.run_lengths)}
        if self.temperature is not None:
            metadata["temperature"] = self.temperature
        return write_cg_file(path, self.positions, self.forces, self.time, metadata)

    @classmethod
    def from_files(cls, paths: str | os.PathLike | Sequence[str | os.PathLike], temperature: float | None = None) -> CGDataset:
        """Load one or many CG data files (``*.h5``), concatenated; each file is a run.

        Parameters
        ----------
        paths
            A file, a directory (all ``*.h5`` in it, sorted) or a sequence of them.
        temperature
            Temperature in K; default: the files' ``metadata["temperature"]``.

        Raises
        ------
        DatasetError
            If files differ in bead count, bead names, temperature or the presence of forces.
        StorageError
            If a file is missing, not a CG data file, truncated or corrupt, or holds NaN or
            infinite positions or forces (see :func:`~openmm_flowmatch.data.storage.read_cg_file`);
            no dataset is built from the other files.
        """
        files = _as_paths(paths, "*.h5")
        datasets = []
        for path in files:
            data = read_cg_file(path)
            metadata = data["metadata"]
            file_temperature = metadata.get("temperature")
            if temperature is not None and file_temperature is not None and not np.isclose(float(file_temperature), temperature):
                logger.warning("%s says %s K; using temperature=%s K as asked", path, file_temperature, temperature)
            run_lengths = metadata.get("run_lengths")
            if run_lengths is None or sum(run_lengths) != data["positions"].shape[0]:
                run_lengths = None
            datasets.append(
                cls(
                    data["positions"],
                    data["forces"],
                    temperature=temperature if temperature is not None else file_temperature,
                    metadata=metadata,
                    time=data["time"],
                    run_lengths=run_lengths,
                )
            )
        first = datasets[0]
        names = (first.metadata.get("topology") or {}).get("bead_names")
        for path, dataset in zip(files[1:], datasets[1:]):
            if dataset.n_beads != first.n_beads:
                raise DatasetError(
                    f"{str(path)!r} holds {dataset.n_beads} beads per frame but {str(files[0])!r} holds "
                    f"{first.n_beads}; load files of the same CG mapping together"
                )
            other_names = (dataset.metadata.get("topology") or {}).get("bead_names")
            if names is not None and other_names is not None and list(other_names) != list(names):
                raise DatasetError(f"{str(path)!r} has beads {other_names}, {str(files[0])!r} has {names}")
            if dataset.has_forces != first.has_forces:
                raise DatasetError(
                    f"{str(path)!r} {'has' if dataset.has_forces else 'lacks'} forces, unlike {str(files[0])!r}; "
                    "load files with and without forces separately"
                )
            if dataset.temperature != first.temperature:
                raise DatasetError(
                    f"{str(path)!r} is at {dataset.temperature} K but {str(files[0])!r} at {first.temperature} K; "
                    "pass temperature=... if that is intended"
                )
        result = cls.concatenate(datasets)
        result.metadata["files"] = [path.name for path in files]
        return result

    @classmethod
    def from_trajectory(
        cls,
        trajectory: str | os.PathLike | Sequence[str | os.PathLike],
        topology: str | os.PathLike,
        mapping: Any = "backbone",
        temperature: float | None = 300.0,
        stride: int = 1,
    ) -> CGDataset:
        """Map an all-atom trajectory (any format mdtraj reads) to CG positions (no forces).

        Parameters
        ----------
        trajectory
            Trajectory file(s) (DCD, XTC, TRR, NetCDF, HDF5, ...); each file is a run.
        topology
            Structure file with the trajectory's atoms (PDB, GRO, ...).
        mapping
            A :class:`~openmm_flowmatch.mapping.CGMapping` for that topology, its ``to_dict()``, or
            a name: ``"backbone"`` (default), ``"alpha_carbons"``, ``"center_of_mass"``.
        temperature
            Temperature of the simulation in K (trajectory files do not record it); default 300.
        stride
            Keep every ``stride``-th frame.

        Raises
        ------
        DatasetError
            If a file is missing or unreadable, or the trajectory's atom count differs from the
            topology's (or the mapping's).
        """
        import mdtraj

        from ..mapping import CGMapping

        files = _as_paths(trajectory, "*")
        topology_path = Path(topology)
        if not topology_path.is_file():
            raise DatasetError(f"topology file {str(topology_path)!r} does not exist")
        try:
            md_topology = mdtraj.load_topology(str(topology_path))
        except Exception as error:
            raise DatasetError(f"cannot read the topology {str(topology_path)!r}: {error}") from error
        cg_mapping = _resolve_mapping(mapping, md_topology, CGMapping)
        if cg_mapping.n_atoms != md_topology.n_atoms:
            raise DatasetError(
                f"the mapping refers to {cg_mapping.n_atoms} atoms but {str(topology_path)!r} has "
                f"{md_topology.n_atoms}; build the mapping from this topology"
            )
        _check_mapping_residues(cg_mapping, md_topology, topology_path)
        datasets = []
        for path in files:
            n_atoms = _trajectory_atom_count(path)
            if n_atoms is not None and n_atoms != md_topology.n_atoms:
                raise DatasetError(
                    f"the trajectory {str(path)!r} has {n_atoms} atoms but the topology {str(topology_path)!r} "
                    f"has {md_topology.n_atoms}; give the topology of the system that was simulated"
                )
            try:
                frames = mdtraj.load(str(path), top=md_topology, stride=stride)
            except Exception as error:
                raise DatasetError(
                    f"cannot read the trajectory {str(path)!r} with the topology {str(topology_path)!r} "
                    f"({type(error).__name__}: {error}); check that they belong to the same system"
                ) from error
            positions = cg_mapping.map_positions(frames.xyz)
            time = np.asarray(frames.time, dtype=np.float64)
            datasets.append(cls(positions, None, temperature=temperature, time=time))
        metadata = {
            "source": "trajectory",
            "trajectories": [path.name for path in files],
            "topology_file": topology_path.name,
            "mapping": cg_mapping.to_dict(),
            "topology": cg_mapping.topology_description(),
            "stride": int(stride),
        }
        result = cls.concatenate(datasets)
        result.metadata.update(metadata)
        return result

    @classmethod
    def from_npz_chunks(
        cls,
        directory: str | os.PathLike | Sequence[str | os.PathLike],
        temperature: float = 300.0,
        frame_interval_ps: float = 0.2,
        max_chunks: int | None = None,
    ) -> CGDataset:
        """Read a pregenerated set of ``chunk_*.npz`` files (``x`` positions nm, ``f`` forces kJ/mol/nm).

        Parameters
        ----------
        directory
            A directory of ``chunk_*.npz`` files (one run, chunks consecutive in time), a
            directory whose subdirectories hold such files (one run per subdirectory, sorted by
            name), or a sequence of run directories.
        temperature
            Temperature of the simulation in K; default 300.
        frame_interval_ps
            Time between frames in ps; default 0.2 (the alanine dipeptide set; the chignolin set
            saves every 2 ps).
        max_chunks
            Read at most this many chunks per run (default: all).

        Raises
        ------
        DatasetError
            If no chunk is found, a chunk lacks ``x``, bead counts differ, or a chunk is truncated,
            corrupt, holds object arrays (which would need pickle; never loaded) or NaN/infinite
            values (the message names the chunk).
        """
        directories = [Path(entry) for entry in ([directory] if isinstance(directory, (str, os.PathLike)) else directory)]
        runs: list[Path] = []
        for entry in directories:
            if not entry.is_dir():
                raise DatasetError(f"{str(entry)!r} is not a directory of chunk_*.npz files")
            if sorted(entry.glob("chunk_*.npz")):
                runs.append(entry)
            else:
                runs.extend(sub for sub in sorted(entry.iterdir()) if sub.is_dir() and sorted(sub.glob("chunk_*.npz")))
        if not runs:
            raise DatasetError(f"no chunk_*.npz files in {[str(entry) for entry in directories]}")
        datasets = []
        for run in runs:
            chunks = sorted(run.glob("chunk_*.npz"))[:max_chunks]
            positions, forces = [], []
            for chunk in chunks:
                chunk_positions, chunk_forces = _read_npz_chunk(chunk)
                positions.append(chunk_positions)
                forces.append(chunk_forces)
            if any(force is None for force in forces) and not all(force is None for force in forces):
                raise DatasetError(f"some chunks in {str(run)!r} have forces 'f' and some do not")
            stacked = np.concatenate(positions)
            stacked_forces = None if forces[0] is None else np.concatenate(forces)
            time = frame_interval_ps * np.arange(1, stacked.shape[0] + 1, dtype=np.float64)
            datasets.append(cls(stacked, stacked_forces, temperature=temperature, time=time))
        for run, dataset in zip(runs[1:], datasets[1:]):
            if dataset.n_beads != datasets[0].n_beads:
                raise DatasetError(f"{str(run)!r} has {dataset.n_beads} beads, {str(runs[0])!r} has {datasets[0].n_beads}")
        result = cls.concatenate(datasets)
        result.metadata.update(
            {"source": "npz_chunks", "runs": [run.name for run in runs], "frame_interval_ps": float(frame_interval_ps)}
        )
        return result


NPZ_REMEDY = "regenerate or re-download the chunk, or move it out of the directory"
"""What the message of a refused ``chunk_*.npz`` file tells the user to do."""


def _read_npz_chunk(chunk: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions ``x`` and forces ``f`` (or ``None``) of one chunk, read without pickle and checked.

    Raises
    ------
    DatasetError
        One line naming the chunk: unreadable (truncated, corrupt, object arrays that would need
        pickle), no ``x``, wrong shapes, or NaN/infinite values.
    """
    try:
        with np.load(chunk, allow_pickle=False) as data:
            if "x" not in data.files:
                raise DatasetError(f"{str(chunk)!r} has no array 'x' (positions); found {data.files}")
            positions = np.asarray(data["x"], dtype=np.float32)
            forces = np.asarray(data["f"], dtype=np.float32) if "f" in data.files else None
    except DatasetError:
        raise
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise DatasetError(
                f"{str(chunk)!r} holds object arrays, which are pickled and can run code when loaded, so it was not "
                f"read; {NPZ_REMEDY}"
            ) from None
        raise DatasetError(f"cannot read {str(chunk)!r}: it is truncated or corrupt ({_short(error)}); {NPZ_REMEDY}") from None
    except Exception as error:  # noqa: BLE001 - zipfile/zlib/OSError/EOFError for damaged archives
        raise DatasetError(f"cannot read {str(chunk)!r}: it is truncated or corrupt ({_short(error)}); {NPZ_REMEDY}") from None
    _check_chunk_arrays(chunk, positions, forces)
    return positions, forces


def _check_chunk_arrays(chunk: Path, positions: np.ndarray, forces: np.ndarray | None) -> None:
    """Shapes ``(frames, beads, 3)`` that agree, and finite values."""
    if positions.ndim != 3 or positions.shape[-1] != 3:
        raise DatasetError(f"{str(chunk)!r}: 'x' has shape {positions.shape}, not (frames, beads, 3); {NPZ_REMEDY}")
    if forces is not None and forces.shape != positions.shape:
        raise DatasetError(f"{str(chunk)!r}: 'f' has shape {forces.shape} but 'x' {positions.shape}; {NPZ_REMEDY}")
    for name, values in (("positions 'x'", positions), ("forces 'f'", forces)):
        if values is not None and not np.isfinite(values).all():
            frame = int(np.argwhere(~np.isfinite(values))[0][0])
            raise DatasetError(
                f"{str(chunk)!r}: {name} hold NaN or infinite values (first in frame {frame} of the chunk); {NPZ_REMEDY}"
            )


def _short(error: BaseException) -> str:
    """The first 200 characters of an error message, on one line."""
    return " ".join(str(error).split())[:200] or type(error).__name__


def _resolve_mapping(mapping: Any, topology, mapping_class):
    if isinstance(mapping, str):
        if mapping.lower() not in mapping_class.NAMED_MAPPINGS:
            raise DatasetError(
                f"unknown mapping {mapping!r}; use one of {sorted(mapping_class.NAMED_MAPPINGS)} or a CGMapping"
            )
        return mapping_class.from_name(mapping, topology)
    if isinstance(mapping, dict):
        return mapping_class.from_dict(mapping)
    return mapping


def _check_mapping_residues(mapping: Any, topology, topology_path: Path) -> None:
    """Refuse a mapping of another protein: its beads' residue names must be those of the topology's atoms."""
    atoms = list(topology.atoms)
    found = [atoms[bead_atoms[0]].residue.name for bead_atoms in mapping.bead_atoms]
    if found != list(mapping.residue_names):
        bead = next(index for index, (a, b) in enumerate(zip(found, mapping.residue_names)) if a != b)
        raise DatasetError(
            f"the mapping is of another molecule than {str(topology_path)!r}: its beads sit on residues "
            f"{' '.join(mapping.residue_names)}, the topology's atoms there are in {' '.join(found)} (first at bead "
            f"{bead}: {mapping.residue_names[bead]} vs {found[bead]}); build the mapping from this topology"
        )


def _trajectory_atom_count(path: Path) -> int | None:
    """Atoms per frame of a trajectory file, read without a topology (``None`` if unknown)."""
    import mdtraj

    try:
        with mdtraj.open(str(path)) as handle:
            frame = handle.read(n_frames=1)
    except Exception:
        return None
    xyz = frame[0] if isinstance(frame, tuple) else getattr(frame, "coordinates", None)
    if xyz is None or np.ndim(xyz) != 3:
        return None
    return int(np.shape(xyz)[1])
