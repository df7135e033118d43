"""All-atom reference simulations with OpenMM, saved as CG data (positions and mapped forces).

:func:`generate_reference` takes a PDB, optionally completes it with pdbfixer, builds the
all-atom system (default: amber14-all + GBn2 implicit solvent, no cutoff, HBonds constraints),
minimises, equilibrates and runs Langevin dynamics, and every ``save_interval_steps`` steps
saves the CG bead positions and the mapped all-atom forces ``W · f`` to one HDF5 file per
replica (format: :mod:`openmm_flowmatch.data.storage`).

Output directory layout::

    out_dir/
      topology.pdb                 all-atom solute structure the mapping refers to
      system.xml                   serialised all-atom openmm.System
      replica_000.h5               CG positions, mapped forces, time, metadata
      replica_000.checkpoint.json  resume point (OpenMM checkpoint + frame counts)
      replica_000.dcd|.xtc         optional all-atom solute trajectory
      replica_001.h5 ...

Forces and constraints
    OpenMM's ``getForces()`` omits constraint forces, so the force map must give atoms joined
    by a constraint equal weights (DESIGN.md, *Force maps*). The map is built by
    :meth:`CGMapping.force_map <openmm_flowmatch.mapping.CGMapping.force_map>` from the
    System's constraints; forces of the whole System are taken, then ``W · f``. With explicit
    solvent the map only involves solute atoms (solvent columns of ``W`` are zero).

Resuming
    Every ``checkpoint_interval_frames`` frames the new frames are appended to the HDF5 file,
    then an OpenMM checkpoint (which includes the integrator's random-number state) and the
    frame counts are written atomically (temporary file + rename) to
    ``replica_NNN.checkpoint.json``. Re-running the same call continues every replica from its
    checkpoint, after truncating the HDF5 (and all-atom) file to the checkpoint's frame count,
    so no frame is lost or duplicated and, on the same platform and machine, the frames are
    identical to those of an uninterrupted run. A checkpoint cannot be loaded on another
    platform; the run then continues from the saved state (positions, velocities) with a new
    random stream, which is statistically but not bitwise equivalent (a warning says so).
    The first checkpoint is written after equilibration; a run interrupted during minimisation
    or equilibration starts that replica again. Settings that change the trajectory (seed,
    temperature, time step, mapping, force field, ...) are stored in the checkpoint, and resuming
    with other values is refused; ``duration_ps`` may grow (the run is extended), and platform,
    threads and checkpoint interval may change. The HDF5 file is closed between chunks, so a
    kill can only hit it during a short write; frames written after the last checkpoint are
    dropped and recomputed on resume.
    Bitwise identical numbers for a seed (and bitwise exact resumes) need a deterministic
    platform: Reference, or CPU with ``threads=1``. The multi-threaded CPU platform and GPU
    platforms add forces in a varying order (measured here: 2 threads, chignolin, 500 steps:
    positions differ by up to 4e-7 nm between two runs with the same seed, with or without
    ``DeterministicForces``), so such runs agree to rounding at first and then diverge
    chaotically while staying statistically equivalent.

Hydrogen mass
    With the default ``hydrogen_mass="auto"``, hydrogens get 3 amu (mass taken from the bonded
    heavy atom, OpenMM's ``hydrogenMass``) when the time step exceeds 2.5 fs, the usual setting
    for 4 fs steps with HBonds constraints; with time steps up to 2.5 fs masses are not changed.
    The CG bead masses of the mapping always use standard element masses.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..locking import holds_directory_lock
from ..mapping import CGMapping
from ..units import kelvin, strip_unit
from .storage import CGTrajectoryFile, StorageError, ensure_writable_directory

logger = logging.getLogger(__name__)

__all__ = [
    "ReferenceGenerationError",
    "generate_reference",
    "load_structure",
    "create_all_atom_system",
    "solute_system",
    "resolve_mapping",
    "replica_seed",
    "DEFAULT_FORCEFIELDS",
]

DEFAULT_FORCEFIELDS: dict[str, tuple[str, ...]] = {
    "implicit": ("amber14-all.xml", "implicit/gbn2.xml"),
    "explicit": ("amber14-all.xml", "amber14/tip3pfb.xml"),
    "vacuum": ("amber14-all.xml",),
}
"""Force-field files used for each ``solvent`` choice when ``forcefield`` is not given."""

_AUTO_PLATFORMS = ("CUDA", "CPU", "Reference")
_CHECKPOINT_VERSION = 1


class ReferenceGenerationError(ValueError):
    """The all-atom reference run cannot be set up or continued; the message says what to do."""


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def replica_seed(seed: int, replica: int) -> int:
    """The OpenMM random seed of replica ``replica`` of a run with ``seed``.

    Different replicas get independent, reproducible seeds in ``1 .. 2**31 - 2`` (OpenMM treats
    a seed of 0 as "pick one at random", which would break reproducibility).
    """
    state = np.random.SeedSequence([int(seed), int(replica)]).generate_state(1, dtype=np.uint32)[0]
    return int(state % (2**31 - 2)) + 1


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written).

    A full disk fails the run with one line naming the file (the previous checkpoint is kept).
    """
    from ..safe_files import write_atomically  # imports torch: only when writing

    write_atomically(path, text, ReferenceGenerationError)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# structure, system, mapping, platform
# --------------------------------------------------------------------------------------------


_CAPPING_RESIDUES = {"ACE", "NME", "NMA", "NH2", "FOR"}


def load_structure(
    pdb: str | os.PathLike,
    fix_pdb: bool = False,
    ph: float = 7.0,
    work_dir: str | os.PathLike | None = None,
    keep_heterogens: bool | None = None,
):
    """Read an all-atom structure, optionally completing it with pdbfixer first.

    Parameters
    ----------
    pdb
        PDB (``.pdb``) or PDBx/mmCIF (``.cif``) file.
    fix_pdb
        Add missing heavy atoms and hydrogens (at ``ph``) with pdbfixer (through
        :func:`openmm_flowmatch.topology.fix_pdb`).
    ph
        pH for the hydrogens added by ``fix_pdb``.
    work_dir
        Where the fixed PDB is written (``fixed_input.pdb``); default: a temporary directory.
    keep_heterogens
        With ``fix_pdb``: keep non-standard residues, ligands and water. ``None`` (default):
        keep them when the structure has capping groups (ACE, NME, ...), which pdbfixer counts
        as heterogens, and remove them otherwise.

    Returns
    -------
    tuple
        ``(topology, positions)``: ``openmm.app.Topology`` and positions as an ``(atoms, 3)``
        array in nm.

    Raises
    ------
    ReferenceGenerationError
        If the file is missing or cannot be read.
    """
    import openmm.app as app

    path = Path(pdb)
    if not path.is_file():
        raise ReferenceGenerationError(f"structure file {str(path)!r} does not exist")
    if fix_pdb:
        from ..topology import fix_pdb as fix_pdb_file

        if work_dir is None:
            import tempfile

            work_dir = tempfile.mkdtemp(prefix="openmm_flowmatch_fix_")
        if keep_heterogens is None:
            keep_heterogens = _has_capping_groups(path)
        path = fix_pdb_file(path, Path(work_dir) / "fixed_input.pdb", ph=ph, keep_heterogens=keep_heterogens)
    try:
        reader = app.PDBxFile if path.suffix.lower() in (".cif", ".pdbx", ".mmcif") else app.PDBFile
        structure = reader(str(path))
    except Exception as error:
        raise ReferenceGenerationError(
            f"cannot read the structure {str(path)!r} ({type(error).__name__}: {error}); "
            "check the file, or pass fix_pdb=True (--fix-pdb) to let pdbfixer repair it"
        ) from error
    positions = np.asarray(structure.getPositions(asNumpy=True).value_in_unit(_nanometer()), dtype=float)
    return structure.topology, positions


def _has_capping_groups(path: Path) -> bool:
    with open(path) as handle:
        names = {line[17:20].strip() for line in handle if line.startswith(("ATOM", "HETATM"))}
    return bool(names & _CAPPING_RESIDUES)


def _nanometer():
    import openmm.unit as unit

    return unit.nanometer


def _describe_residue(residue) -> str:
    chain = residue.chain.id.strip() or str(residue.chain.index)
    return f"{residue.name}{residue.id} (chain {chain}, {len(list(residue.atoms()))} atoms)"


def create_all_atom_system(
    topology,
    positions: np.ndarray,
    forcefield: Sequence[str] | None = None,
    solvent: str = "implicit",
    constraints: str | None = "HBonds",
    hydrogen_mass: float | None = None,
    padding: float = 1.0,
    ionic_strength: float = 0.0,
    nonbonded_cutoff: float = 1.0,
    source: str = "the structure",
):
    """Build the all-atom ``openmm.System`` (adding water and ions for explicit solvent).

    Parameters
    ----------
    topology, positions
        Solute topology and positions (nm).
    forcefield
        Force-field XML files for ``openmm.app.ForceField``; default
        :data:`DEFAULT_FORCEFIELDS` ``[solvent]``.
    solvent
        ``"implicit"`` (no cutoff; GBn2 in the default force field), ``"explicit"``
        (TIP3P-FB water box with ``padding`` nm, neutralising ions plus ``ionic_strength`` molar
        NaCl, PME with ``nonbonded_cutoff`` nm) or ``"vacuum"`` (no cutoff).
    constraints
        ``"HBonds"`` (default), ``"AllBonds"``, ``"HAngles"`` or ``None``.
    hydrogen_mass
        Hydrogen mass in amu (repartitioned from the bonded heavy atom), or ``None`` for
        standard masses.
    padding, ionic_strength, nonbonded_cutoff
        Explicit solvent only: box padding (nm), salt concentration (mol/L), cutoff (nm).
    source
        Name of the input, used in error messages.

    Returns
    -------
    tuple
        ``(system, topology, positions, n_solute_atoms, forcefield_files)``; with explicit
        solvent the returned topology and positions include solvent, whose atoms follow the
        ``n_solute_atoms`` solute atoms.

    Raises
    ------
    ReferenceGenerationError
        If the force field has no template for a residue (the residue is named), or an option
        is invalid.
    """
    import openmm.app as app
    import openmm.unit as unit

    if solvent not in DEFAULT_FORCEFIELDS:
        raise ReferenceGenerationError(f"solvent must be one of {sorted(DEFAULT_FORCEFIELDS)}, got {solvent!r}")
    files = tuple(forcefield) if forcefield else DEFAULT_FORCEFIELDS[solvent]
    try:
        field = app.ForceField(*files)
    except Exception as error:
        raise ReferenceGenerationError(
            f"cannot load the force field {list(files)} ({type(error).__name__}: {error}); "
            "give files that openmm.app.ForceField can find"
        ) from error
    constraint_types = {None: None, "none": None, "hbonds": app.HBonds, "allbonds": app.AllBonds, "hangles": app.HAngles}
    key = constraints.lower() if isinstance(constraints, str) else constraints
    if key not in constraint_types:
        raise ReferenceGenerationError(f"constraints must be HBonds, AllBonds, HAngles or None, got {constraints!r}")
    unmatched = field.getUnmatchedResidues(topology)
    if unmatched:
        names = ", ".join(_describe_residue(residue) for residue in unmatched[:5])
        raise ReferenceGenerationError(
            f"the force field {list(files)} has no template for residue(s) {names} of {source}. "
            "If atoms or hydrogens are missing, pass fix_pdb=True (--fix-pdb) to complete the "
            "structure with pdbfixer; for a non-standard residue or ligand use another force "
            "field (forcefield=[...], --forcefield) that defines it"
        )
    n_solute = topology.getNumAtoms()
    positions_quantity = unit.Quantity(np.asarray(positions, dtype=float), unit.nanometer)
    arguments: dict[str, Any] = {"constraints": constraint_types[key], "rigidWater": True}
    if hydrogen_mass is not None:
        arguments["hydrogenMass"] = float(hydrogen_mass) * unit.amu
    try:
        if solvent == "explicit":
            modeller = app.Modeller(topology, positions_quantity)
            modeller.addSolvent(
                field,
                model="tip3p",
                padding=float(padding) * unit.nanometer,
                ionicStrength=float(ionic_strength) * unit.molar,
                neutralize=True,
            )
            topology, positions_quantity = modeller.getTopology(), modeller.getPositions()
            arguments.update(nonbondedMethod=app.PME, nonbondedCutoff=float(nonbonded_cutoff) * unit.nanometer)
        else:
            arguments.update(nonbondedMethod=app.NoCutoff)
        system = field.createSystem(topology, **arguments)
    except ValueError as error:
        raise ReferenceGenerationError(
            f"the force field {list(files)} cannot parametrise {source}: {error}. Pass fix_pdb=True "
            "(--fix-pdb) to complete the structure, or use another force field"
        ) from error
    positions = np.asarray(unit.Quantity(positions_quantity).value_in_unit(unit.nanometer), dtype=float)
    return system, topology, positions.reshape(-1, 3), n_solute, list(files)


def solute_system(system, n_solute_atoms: int):
    """A bare ``openmm.System`` of the first ``n_solute_atoms`` particles and their constraints.

    The force map only depends on particle count and constraints, so the map of the solute of
    an explicit-solvent System is built from this reduced copy (forces are not needed).
    """
    import openmm

    reduced = openmm.System()
    for index in range(n_solute_atoms):
        reduced.addParticle(system.getParticleMass(index))
    for index in range(system.getNumConstraints()):
        first, second, distance = system.getConstraintParameters(index)
        if first < n_solute_atoms and second < n_solute_atoms:
            reduced.addConstraint(first, second, distance)
        elif (first < n_solute_atoms) != (second < n_solute_atoms):
            raise ReferenceGenerationError(
                f"a constraint joins solute atom {min(first, second)} and solvent atom {max(first, second)}; "
                "cannot build a force map of the solute"
            )
    return reduced


def resolve_mapping(mapping: str | CGMapping | dict | Callable, topology) -> CGMapping:
    """Turn the ``mapping`` argument of :func:`generate_reference` into a :class:`CGMapping`.

    Parameters
    ----------
    mapping
        ``"backbone"``, ``"alpha_carbons"`` (or ``"ca"``), ``"center_of_mass"`` (or ``"com"``),
        a :class:`CGMapping`, a dict from ``CGMapping.to_dict()``, or a callable
        ``topology -> CGMapping``.
    topology
        The all-atom solute topology the mapping must refer to.
    """
    if isinstance(mapping, str):
        if mapping.lower() not in CGMapping.NAMED_MAPPINGS:
            raise ReferenceGenerationError(
                f"unknown mapping {mapping!r}; use one of {sorted(CGMapping.NAMED_MAPPINGS)} or a CGMapping"
            )
        result = CGMapping.from_name(mapping, topology)
    elif isinstance(mapping, dict):
        result = CGMapping.from_dict(mapping)
    elif callable(mapping) and not hasattr(mapping, "force_map"):
        result = mapping(topology)
    else:
        result = mapping
    if not hasattr(result, "force_map") or not hasattr(result, "map_positions"):
        raise ReferenceGenerationError(f"mapping must be a CGMapping or a mapping name, got {type(result).__name__}")
    if result.n_atoms != topology.getNumAtoms():
        raise ReferenceGenerationError(
            f"the mapping refers to {result.n_atoms} atoms but the (fixed) structure has "
            f"{topology.getNumAtoms()}; build the mapping from the same structure, or pass its name "
            "(e.g. 'backbone') so that it is built after fixing"
        )
    return result


def _platform_properties(name: str, threads: int | None, precision: str | None, extra: dict | None) -> dict:
    properties: dict[str, str] = {}
    if name == "CPU" and threads is not None:
        properties["Threads"] = str(int(threads))
    if name in ("CUDA", "OpenCL", "HIP") and precision is not None:
        properties["Precision"] = precision
    for key, value in (extra or {}).items():
        properties[str(key)] = str(value)
    return properties


def _create_context(system, make_integrator: Callable, platform: str | None, threads, precision, extra):
    """Create a Context on the named platform, or the first that works of CUDA > CPU > Reference."""
    import openmm

    automatic = platform is None or str(platform).lower() == "auto"
    candidates = _AUTO_PLATFORMS if automatic else (str(platform),)
    failures = []
    for name in candidates:
        try:
            chosen = openmm.Platform.getPlatformByName(name)
        except Exception as error:
            failures.append(f"{name}: {error}")
            continue
        integrator = make_integrator()
        properties = _platform_properties(name, threads, precision, extra)
        try:
            context = openmm.Context(system, integrator, chosen, properties)
        except Exception as error:
            failures.append(f"{name}: {error}")
            continue
        return context, integrator
    available = [openmm.Platform.getPlatform(index).getName() for index in range(openmm.Platform.getNumPlatforms())]
    raise ReferenceGenerationError(
        f"cannot create an OpenMM context on platform {platform or 'auto'} ({'; '.join(failures)}). "
        f"Available platforms: {available}"
    )


# --------------------------------------------------------------------------------------------
# checkpoints and files of one replica
# --------------------------------------------------------------------------------------------


def _replica_paths(out_dir: Path, replica: int, all_atom_format: str | None) -> dict[str, Path | None]:
    stem = f"replica_{replica:03d}"
    return {
        "data": out_dir / f"{stem}.h5",
        "checkpoint": out_dir / f"{stem}.checkpoint.json",
        "all_atom": out_dir / f"{stem}.{all_atom_format}" if all_atom_format else None,
    }


def _write_checkpoint(path: Path, context, n_frames: int, n_all_atom_frames: int, settings: dict) -> None:
    import openmm

    state = context.getState(getPositions=True, getVelocities=True, getParameters=True)
    record = {
        "checkpoint_version": _CHECKPOINT_VERSION,
        "n_frames": int(n_frames),
        "n_all_atom_frames": int(n_all_atom_frames),
        "platform": context.getPlatform().getName(),
        "settings": settings,
        "openmm_checkpoint": base64.b64encode(context.createCheckpoint()).decode("ascii"),
        "state_xml": openmm.XmlSerializer.serialize(state),
    }
    _write_atomically(path, json.dumps(record))


def _read_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ReferenceGenerationError(
            f"the checkpoint {str(path)!r} cannot be read ({error}); delete it and the replica's "
            "files, or pass overwrite=True, to start the replica again"
        ) from error
    if record.get("checkpoint_version", 0) > _CHECKPOINT_VERSION:
        raise ReferenceGenerationError(f"the checkpoint {str(path)!r} was written by a newer openmm_flowmatch")
    return record


def _compare_settings(saved: dict, current: dict, path: Path) -> None:
    differing = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
    if differing:
        details = "; ".join(f"{key}: saved {saved.get(key)!r}, now {current.get(key)!r}" for key in differing[:6])
        raise ReferenceGenerationError(
            f"cannot resume from {str(path)!r}: the run was started with other settings ({details}). "
            "Use the same settings, another output directory, or overwrite=True to start again"
        )


def _restore_checkpoint(context, make_context: Callable, record: dict, path: Path):
    """Load the OpenMM checkpoint, or fall back to the saved state on another platform."""
    import openmm

    try:
        context.loadCheckpoint(base64.b64decode(record["openmm_checkpoint"]))
        return context, None
    except Exception as error:
        logger.warning(
            "cannot load the OpenMM checkpoint of %s on platform %s (%s); continuing from the saved "
            "positions and velocities with a new random stream: statistically equivalent, not "
            "bitwise identical to an uninterrupted run",
            path,
            context.getPlatform().getName(),
            error,
        )
    new_seed = replica_seed(int(record["settings"]["replica_seed"]), int(record["n_frames"]))
    new_context, new_integrator = make_context(new_seed)
    new_context.setState(openmm.XmlSerializer.deserialize(record["state_xml"]))
    return new_context, new_integrator


def _truncate_dcd(path: Path, n_frames: int, n_atoms: int) -> None:
    """Cut a DCD file (as written by OpenMM's ``DCDFile``) to its first ``n_frames`` frames, in place."""
    import struct

    with open(path, "r+b") as handle:
        header = handle.read(104)
        if len(header) < 104 or header[4:8] != b"CORD":
            raise ValueError("invalid DCD header")
        first_step, interval = struct.unpack("<2i", header[12:20])
        has_box = struct.unpack("<i", header[48:52])[0] != 0
        comments_bytes = struct.unpack("<i", header[92:96])[0]
        header_bytes = 104 + comments_bytes + 8
        frame_bytes = (56 if has_box else 0) + 3 * (8 + 4 * n_atoms)
        n_present = (path.stat().st_size - header_bytes) // frame_bytes
        if n_present < n_frames:
            raise ValueError(f"it holds {n_present} complete frames")
        handle.truncate(header_bytes + n_frames * frame_bytes)
        handle.seek(8)
        handle.write(struct.pack("<i", n_frames))
        handle.seek(20)
        handle.write(struct.pack("<i", first_step + max(n_frames - 1, 0) * interval))


def _truncate_xtc(path: Path, n_frames: int) -> None:
    """Cut an XTC file to its first ``n_frames`` frames, in place (byte offsets from mdtraj)."""
    from mdtraj.formats import XTCTrajectoryFile

    with XTCTrajectoryFile(str(path), "r") as handle:
        offsets = list(handle.offsets)
    if len(offsets) < n_frames:
        raise ValueError(f"it holds {len(offsets)} frames")
    if len(offsets) > n_frames:
        with open(path, "r+b") as handle:
            handle.truncate(offsets[n_frames] if n_frames < len(offsets) else path.stat().st_size)


class _AllAtomWriter:
    """Appends solute frames to a DCD or XTC file through OpenMM's writers."""

    def __init__(self, path: Path, topology, frame_interval_ps: float, interval_steps: int) -> None:
        self.path = path
        self.topology = topology
        self.dt = frame_interval_ps / interval_steps
        self.interval_steps = interval_steps

    def write(self, frames: np.ndarray, first_step: int = 0) -> None:
        import openmm.app as app

        if len(frames) == 0:
            return
        append = self.path.exists() and self.path.stat().st_size > 0
        if self.path.suffix == ".dcd":
            with open(self.path, "r+b" if append else "wb") as handle:
                writer = app.DCDFile(handle, self.topology, self.dt, first_step, self.interval_steps, append=append)
                for frame in frames:
                    writer.writeModel(frame)
        else:
            writer = app.XTCFile(str(self.path), self.topology, self.dt, first_step, self.interval_steps, append=append)
            for frame in frames:
                writer.writeModel(frame)

    def truncate(self, n_frames: int) -> None:
        """Keep only the first ``n_frames`` frames (byte-exact, no re-encoding)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            if n_frames:
                raise ReferenceGenerationError(
                    f"the all-atom trajectory {str(self.path)!r} is missing but the checkpoint expects "
                    f"{n_frames} frames; delete the replica's files or pass overwrite=True"
                )
            return
        try:
            if self.path.suffix == ".dcd":
                _truncate_dcd(self.path, n_frames, self.topology.getNumAtoms())
            else:
                _truncate_xtc(self.path, n_frames)
        except Exception as error:
            raise ReferenceGenerationError(
                f"cannot cut the all-atom trajectory {str(self.path)!r} to the checkpoint's {n_frames} "
                f"frames ({error}); delete the replica's files or pass overwrite=True"
            ) from error


# --------------------------------------------------------------------------------------------
# generate_reference
# --------------------------------------------------------------------------------------------


def _check_output_directory(out_dir: Path) -> None:
    ensure_writable_directory(out_dir, ReferenceGenerationError, "output directory")


@holds_directory_lock("out_dir", check=_check_output_directory)
def generate_reference(
    pdb: str | os.PathLike,
    out_dir: str | os.PathLike,
    mapping: str | CGMapping | dict | Callable = "backbone",
    *,
    temperature: Any = 300.0,
    duration_ps: Any = 1000.0,
    time_step_ps: Any = 0.004,
    save_interval_steps: int = 50,
    friction_per_ps: Any = 1.0,
    equilibration_ps: Any = 100.0,
    minimize: bool = True,
    minimization_tolerance: float = 10.0,
    replicas: int = 1,
    seed: int = 0,
    platform: str | None = None,
    threads: int | None = None,
    precision: str | None = "mixed",
    platform_properties: dict | None = None,
    fix_pdb: bool = False,
    ph: float = 7.0,
    keep_heterogens: bool | None = None,
    forcefield: Sequence[str] | None = None,
    solvent: str = "implicit",
    constraints: str | None = "HBonds",
    hydrogen_mass: float | str | None = "auto",
    padding: Any = 1.0,
    ionic_strength: float = 0.0,
    nonbonded_cutoff: Any = 1.0,
    all_atom_format: str | None = None,
    all_atom_interval_frames: int = 10,
    checkpoint_interval_frames: int = 500,
    overwrite: bool = False,
    progress: bool = True,
    progress_callback: Callable[[int, int, int], None] | None = None,
) -> list[Path]:
    """Run all-atom MD with OpenMM and save CG positions and mapped forces, one file per replica.

    Re-running the same call after an interruption resumes every replica from its last
    checkpoint; replicas already complete are skipped; a longer ``duration_ps`` extends them.
    The output directory is locked while the call runs (:mod:`openmm_flowmatch.locking`): a
    second process started on it is refused with ``OutputLockedError``.

    Parameters
    ----------
    pdb
        All-atom structure (PDB or PDBx/mmCIF) of the solute.
    out_dir
        Output directory (created if missing); see the module docstring for its contents.
    mapping
        ``"backbone"`` (default; for ACE-ALA-NME: ACE C, ALA N, CA, C, NME N),
        ``"alpha_carbons"``, ``"center_of_mass"``, a :class:`~openmm_flowmatch.mapping.CGMapping`
        built from the (fixed) structure, its ``to_dict()``, or a callable ``topology -> CGMapping``.
    temperature
        Temperature in K (float or ``openmm.unit`` quantity); default 300.
    duration_ps
        Production length per replica in ps (after equilibration); default 1000 (1 ns).
    time_step_ps
        Integration time step in ps; default 0.004 (4 fs, with HBonds and 3 amu hydrogens).
    save_interval_steps
        Save a CG frame every this many steps; default 50 (0.2 ps at 4 fs).
    friction_per_ps
        Langevin friction coefficient in 1/ps; default 1.
    equilibration_ps
        Equilibration after minimisation in ps (not saved); default 100.
    minimize
        Minimise the energy first (default ``True``), to ``minimization_tolerance`` kJ/mol/nm.
    replicas
        Number of independent replicas, each with its own seed (:func:`replica_seed`); default 1.
    seed
        Base random seed (velocities and Langevin noise); the same seed gives identical numbers
        on the Reference platform and on CPU with ``threads=1`` (see the module docstring).
    platform
        ``"CUDA"``, ``"CPU"``, ``"Reference"``, ``"OpenCL"``, or ``None``/``"auto"`` for the
        first that works of CUDA > CPU > Reference.
    threads
        Threads of the CPU platform (default: OpenMM's choice, all cores).
    precision
        Precision of GPU platforms (``"single"``, ``"mixed"`` (default), ``"double"``).
    platform_properties
        Extra OpenMM platform properties, e.g. ``{"DeviceIndex": "1"}``.
    fix_pdb
        Complete the structure with pdbfixer first (missing atoms, hydrogens at ``ph``);
        default ``False``.
    ph
        pH for the hydrogens added by ``fix_pdb``; default 7.
    keep_heterogens
        With ``fix_pdb``: keep ligands, water and non-standard residues; default ``None``: keep
        them only when the structure has capping groups (ACE, NME), which pdbfixer counts as
        heterogens.
    forcefield
        Force-field XML files; default amber14-all + implicit/gbn2 (implicit), amber14-all +
        amber14/tip3pfb (explicit), amber14-all (vacuum).
    solvent
        ``"implicit"`` (default, NoCutoff), ``"explicit"`` (water box, PME, NVT) or ``"vacuum"``.
        With explicit solvent the CG map and the all-atom trajectory cover the solute only.
    constraints
        ``"HBonds"`` (default), ``"AllBonds"``, ``"HAngles"`` or ``None``.
    hydrogen_mass
        Hydrogen mass in amu; ``"auto"`` (default): 3 amu if the time step exceeds 2.5 fs, else
        standard masses; ``None``: standard masses.
    padding
        Explicit solvent: minimum distance solute–box edge in nm; default 1.
    ionic_strength
        Explicit solvent: NaCl concentration in mol/L on top of neutralising ions; default 0.
    nonbonded_cutoff
        Explicit solvent: real-space cutoff in nm; default 1.
    all_atom_format
        ``"dcd"`` or ``"xtc"`` to also save the all-atom solute trajectory (``topology.pdb`` is its
        topology); ``None`` (default) to save CG data only.
    all_atom_interval_frames
        Save an all-atom frame every this many CG frames; default 10.
    checkpoint_interval_frames
        Frames between checkpoints (file writes); default 500 (100 ps at 0.2 ps a frame).
    overwrite
        Delete the existing files of each replica and start again (default: resume).
    progress
        Show a tqdm progress bar; default ``True``.
    progress_callback
        Called as ``progress_callback(replica, n_frames, n_frames_total)`` after every checkpoint.

    Returns
    -------
    list of pathlib.Path
        The HDF5 files of the replicas (``replica_000.h5``, ...).

    Raises
    ------
    ReferenceGenerationError
        For a missing/unreadable structure, a residue the force field cannot template, an
        unwritable output directory, a checkpoint written with other settings, a full disk, or
        a simulation that blew up (non-finite coordinates).
    openmm_flowmatch.locking.OutputLockedError
        When another process is writing to ``out_dir``.
    """
    import openmm
    import openmm.unit as unit

    out_dir = Path(out_dir)
    ensure_writable_directory(out_dir, ReferenceGenerationError, "output directory")
    temperature = kelvin(temperature)
    duration_ps = float(strip_unit(duration_ps, unit.picosecond))
    time_step_ps = float(strip_unit(time_step_ps, unit.picosecond))
    friction_per_ps = float(strip_unit(friction_per_ps, unit.picosecond**-1))
    equilibration_ps = float(strip_unit(equilibration_ps, unit.picosecond))
    padding = float(strip_unit(padding, unit.nanometer))
    nonbonded_cutoff = float(strip_unit(nonbonded_cutoff, unit.nanometer))
    _check_run_lengths(time_step_ps, save_interval_steps, duration_ps, equilibration_ps, replicas,
                       checkpoint_interval_frames, all_atom_interval_frames)
    all_atom_format = _checked_all_atom_format(all_atom_format)
    hydrogen_mass = _resolved_hydrogen_mass(hydrogen_mass, time_step_ps)
    frame_interval_ps = save_interval_steps * time_step_ps

    solute_topology, solute_positions = load_structure(
        pdb, fix_pdb=fix_pdb, ph=ph, work_dir=out_dir, keep_heterogens=keep_heterogens
    )
    cg_mapping = resolve_mapping(mapping, solute_topology)
    system, topology, positions, n_solute, forcefield_files = create_all_atom_system(
        solute_topology, solute_positions, forcefield=forcefield, solvent=solvent, constraints=constraints,
        hydrogen_mass=hydrogen_mass, padding=padding, ionic_strength=ionic_strength,
        nonbonded_cutoff=nonbonded_cutoff, source=str(pdb),
    )
    force_map, coordinate_map = cg_mapping.force_map(solute_system(system, n_solute)), cg_mapping.coordinate_matrix()
    _write_structure(out_dir / "topology.pdb", solute_topology, solute_positions)
    _write_atomically(out_dir / "system.xml", openmm.XmlSerializer.serialize(system))

    explicit = solvent == "explicit"
    settings = {
        "pdb_sha256": _file_digest(Path(pdb)),
        "fix_pdb": bool(fix_pdb),
        "ph": float(ph) if fix_pdb else None,
        "keep_heterogens": keep_heterogens if fix_pdb else None,
        "mapping": cg_mapping.to_dict(),
        "forcefield": forcefield_files,
        "solvent": solvent,
        "padding_nm": padding if explicit else None,
        "ionic_strength_molar": float(ionic_strength) if explicit else None,
        "nonbonded_cutoff_nm": nonbonded_cutoff if explicit else None,
        "constraints": str(constraints),
        "hydrogen_mass_amu": hydrogen_mass,
        "temperature": temperature,
        "friction_per_ps": friction_per_ps,
        "time_step_ps": time_step_ps,
        "save_interval_steps": int(save_interval_steps),
        "frame_interval_ps": frame_interval_ps,
        "equilibration_ps": equilibration_ps,
        "minimize": bool(minimize),
        "seed": int(seed),
        "all_atom_format": all_atom_format,
        "all_atom_interval_frames": int(all_atom_interval_frames) if all_atom_format else None,
    }
    metadata = _reference_metadata(settings, Path(pdb).name, cg_mapping, int(topology.getNumAtoms()), int(n_solute))
    contexts = _ContextFactory(system, positions, temperature, friction_per_ps, time_step_ps, seed,
                               (platform, threads, precision, platform_properties), minimize, minimization_tolerance)
    paths = []
    for replica in range(replicas):
        per_replica = {"replica": replica, "replica_seed": replica_seed(seed, replica)}
        run = _ReplicaRun(
            replica=replica,
            paths=_replica_paths(out_dir, replica, all_atom_format),
            settings={**settings, **per_replica},
            metadata={**metadata, **per_replica},
            solute_topology=solute_topology,
            n_solute=n_solute,
            coordinate_map=coordinate_map,
            force_map=force_map,
            n_frames_total=int(round(duration_ps / frame_interval_ps)),
            frame_interval_ps=frame_interval_ps,
            save_interval_steps=save_interval_steps,
            all_atom_interval_frames=all_atom_interval_frames,
            checkpoint_interval_frames=checkpoint_interval_frames,
        )
        paths.append(
            run.execute(
                make_context=contexts.make_context,
                start_positions=contexts.start_positions,
                temperature=temperature,
                equilibration_steps=int(round(equilibration_ps / time_step_ps)),
                overwrite=overwrite,
                progress=progress,
                progress_callback=progress_callback,
            )
        )
    return paths


def _check_run_lengths(time_step_ps: float, save_interval_steps: int, duration_ps: float, equilibration_ps: float,
                       replicas: int, checkpoint_interval_frames: int, all_atom_interval_frames: int) -> None:
    if time_step_ps <= 0 or save_interval_steps < 1 or duration_ps < 0 or equilibration_ps < 0:
        raise ReferenceGenerationError(
            "time_step_ps must be positive, save_interval_steps ≥ 1, duration_ps and equilibration_ps ≥ 0"
        )
    if replicas < 1 or checkpoint_interval_frames < 1 or all_atom_interval_frames < 1:
        raise ReferenceGenerationError("replicas, checkpoint_interval_frames and all_atom_interval_frames must be ≥ 1")


def _checked_all_atom_format(all_atom_format: str | None) -> str | None:
    if all_atom_format is None:
        return None
    all_atom_format = all_atom_format.lower().lstrip(".")
    if all_atom_format not in ("dcd", "xtc"):
        raise ReferenceGenerationError(f"all_atom_format must be 'dcd', 'xtc' or None, got {all_atom_format!r}")
    return all_atom_format


def _resolved_hydrogen_mass(hydrogen_mass: Any, time_step_ps: float) -> float | None:
    """Hydrogen mass in amu, or ``None`` for standard masses; ``"auto"``: 3 amu above 2.5 fs."""
    import openmm.unit as unit

    if isinstance(hydrogen_mass, str):
        if hydrogen_mass.lower() != "auto":
            raise ReferenceGenerationError(f"hydrogen_mass must be a mass in amu, 'auto' or None, got {hydrogen_mass!r}")
        return 3.0 if time_step_ps > 0.0025 else None
    return None if hydrogen_mass is None else float(strip_unit(hydrogen_mass, unit.amu))


def _reference_metadata(settings: dict, pdb_name: str, cg_mapping: CGMapping, n_atoms: int, n_solute: int) -> dict:
    """The metadata every replica's file carries (its settings without the mapping, plus provenance)."""
    import openmm

    from .. import __version__

    return {
        "source": "openmm_flowmatch.data.reference.generate_reference",
        "pdb": pdb_name,
        "temperature": settings["temperature"],
        "mapping": cg_mapping.to_dict(),
        "topology": cg_mapping.topology_description(),
        "force_map": "constraint-valid (CGMapping.force_map of the all-atom System)",
        "n_atoms": n_atoms,
        "n_solute_atoms": n_solute,
        "package_version": __version__,
        "openmm_version": openmm.__version__,
        "units": {"positions": "nm", "forces": "kJ/mol/nm", "time": "ps", "temperature": "K", "masses": "amu"},
        **{key: value for key, value in settings.items() if key not in ("mapping",)},
    }


class _ContextFactory:
    """Langevin Contexts of the all-atom System for the replicas, and their common start: the
    structure's positions, energy-minimised once (on first use) when asked."""

    def __init__(self, system, positions, temperature: float, friction_per_ps: float, time_step_ps: float, seed: int,
                 platform_options: tuple, minimize: bool, minimization_tolerance: float) -> None:
        self.system, self.positions = system, positions
        self.temperature, self.friction_per_ps, self.time_step_ps = temperature, friction_per_ps, time_step_ps
        self.seed, self.platform_options = seed, platform_options
        self.minimize, self.minimization_tolerance = minimize, minimization_tolerance
        self._start: np.ndarray | None = None

    def make_context(self, random_seed: int):
        """``(context, integrator)`` from :func:`_create_context`, the integrator seeded with ``random_seed``."""
        import openmm

        def make_integrator():
            integrator = openmm.LangevinMiddleIntegrator(self.temperature, self.friction_per_ps, self.time_step_ps)
            integrator.setRandomNumberSeed(random_seed)
            return integrator

        return _create_context(self.system, make_integrator, *self.platform_options)

    def start_positions(self) -> np.ndarray:
        """The replicas' start positions in nm (minimised once, then kept)."""
        if self._start is None:
            import openmm
            import openmm.unit as unit

            context, _ = self.make_context(replica_seed(self.seed, 0))
            context.setPositions(self.positions)
            if self.minimize:
                logger.info("minimising the energy on platform %s", context.getPlatform().getName())
                openmm.LocalEnergyMinimizer.minimize(context, float(self.minimization_tolerance), 0)
            state = context.getState(getPositions=True)
            self._start = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            del context
        return self._start


def _write_structure(path: Path, topology, positions: np.ndarray) -> None:
    import io

    import openmm.app as app
    import openmm.unit as unit

    buffer = io.StringIO()
    app.PDBFile.writeFile(topology, unit.Quantity(positions, unit.nanometer), buffer, keepIds=True)
    _write_atomically(path, buffer.getvalue())


@dataclass
class _ReplicaRun:
    """One replica: fresh start or resume, production loop, checkpoints."""

    replica: int
    paths: dict
    settings: dict
    metadata: dict
    solute_topology: Any
    n_solute: int
    coordinate_map: np.ndarray
    force_map: np.ndarray
    n_frames_total: int
    frame_interval_ps: float
    save_interval_steps: int
    all_atom_interval_frames: int
    checkpoint_interval_frames: int

    def _remove_files(self) -> None:
        for path in self.paths.values():
            if path is not None and path.exists():
                path.unlink()

    def _all_atom_writer(self) -> _AllAtomWriter | None:
        if self.paths["all_atom"] is None:
            return None
        interval_steps = self.save_interval_steps * self.all_atom_interval_frames
        return _AllAtomWriter(
            self.paths["all_atom"], self.solute_topology, self.frame_interval_ps * self.all_atom_interval_frames, interval_steps
        )

    def execute(self, make_context, start_positions, temperature, equilibration_steps, overwrite, progress, progress_callback) -> Path:
        data_path, checkpoint_path = self.paths["data"], self.paths["checkpoint"]
        if overwrite:
            self._remove_files()
        record = _read_checkpoint(checkpoint_path)
        writer = self._all_atom_writer()
        seed = self.settings["replica_seed"]
        if record is None:
            if data_path.exists():
                raise ReferenceGenerationError(
                    f"{str(data_path)!r} exists but has no checkpoint {checkpoint_path.name!r}, so the run "
                    "cannot be resumed; pass overwrite=True or choose another output directory"
                )
            if writer is not None and writer.path.exists():
                writer.path.unlink()
            context, integrator = make_context(seed)
            context.setPositions(start_positions())
            context.setVelocitiesToTemperature(temperature, seed)
            self._equilibrate(integrator, equilibration_steps, progress)
            context.setTime(0.0)
            context.setStepCount(0)
            n_frames, n_all_atom = 0, 0
            _write_checkpoint(checkpoint_path, context, 0, 0, self.settings)
        else:
            _compare_settings(record["settings"], self.settings, checkpoint_path)
            n_frames, n_all_atom = int(record["n_frames"]), int(record["n_all_atom_frames"])
            self._truncate_files(n_frames, n_all_atom, writer)
            if n_frames >= self.n_frames_total:
                logger.info("replica %d already holds %d frames; nothing to do", self.replica, n_frames)
                return data_path
            context, integrator = make_context(seed)
            context, new_integrator = _restore_checkpoint(context, make_context, record, checkpoint_path)
            integrator = new_integrator or integrator
            logger.info("replica %d: resuming at frame %d of %d", self.replica, n_frames, self.n_frames_total)
        self._produce(context, integrator, n_frames, n_all_atom, writer, progress, progress_callback)
        return data_path

    def _equilibrate(self, integrator, n_steps: int, progress: bool) -> None:
        """Unsaved dynamics before production (not resumable: an interrupted one starts again)."""
        from tqdm.auto import tqdm

        if n_steps <= 0:
            return
        logger.info("replica %d: equilibrating for %d steps", self.replica, n_steps)
        block = max(1, min(self.save_interval_steps * 10, n_steps))
        with tqdm(total=n_steps, disable=not progress, desc=f"replica {self.replica} equilibration", unit="step") as bar:
            done = 0
            while done < n_steps:
                steps = min(block, n_steps - done)
                integrator.step(steps)
                done += steps
                bar.update(steps)

    def _truncate_files(self, n_frames: int, n_all_atom: int, writer: _AllAtomWriter | None) -> None:
        data_path = self.paths["data"]
        if n_frames or data_path.exists():
            try:
                with CGTrajectoryFile(data_path, "a") as file:
                    if file.n_frames < n_frames:
                        raise ReferenceGenerationError(
                            f"{str(data_path)!r} holds {file.n_frames} frames but its checkpoint expects "
                            f"{n_frames}; frames were lost. Pass overwrite=True to start the replica again"
                        )
                    if file.n_frames > n_frames:
                        logger.info("%s: dropping %d frames written after the last checkpoint", data_path, file.n_frames - n_frames)
                    file.truncate(n_frames)
            except StorageError as error:
                raise ReferenceGenerationError(
                    f"cannot resume {str(data_path)!r}: {error}. Pass overwrite=True to start the replica again"
                ) from error
        if writer is not None:
            writer.truncate(n_all_atom)

    def _produce(self, context, integrator, n_frames, n_all_atom, writer, progress, progress_callback) -> None:
        import openmm.unit as unit
        from tqdm.auto import tqdm

        force_unit = unit.kilojoule_per_mole / unit.nanometer
        bar = tqdm(
            total=self.n_frames_total,
            initial=n_frames,
            disable=not progress,
            desc=f"replica {self.replica}",
            unit="frame",
        )
        try:
            while n_frames < self.n_frames_total:
                chunk = min(self.checkpoint_interval_frames, self.n_frames_total - n_frames)
                positions = np.empty((chunk, self.n_solute, 3))
                forces = np.empty((chunk, self.n_solute, 3))
                for index in range(chunk):
                    integrator.step(self.save_interval_steps)
                    state = context.getState(getPositions=True, getForces=True)
                    positions[index] = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)[: self.n_solute]
                    forces[index] = state.getForces(asNumpy=True).value_in_unit(force_unit)[: self.n_solute]
                    bar.update(1)
                self._check_finite(positions, forces, n_frames)
                frame_numbers = n_frames + 1 + np.arange(chunk)
                metadata = {**self.metadata, "platform": context.getPlatform().getName()}
                with CGTrajectoryFile(self.paths["data"], "a", metadata=metadata) as file:
                    file.append(
                        np.matmul(self.coordinate_map, positions),
                        np.matmul(self.force_map, forces),
                        frame_numbers * self.frame_interval_ps,
                    )
                if writer is not None:
                    selected = frame_numbers % self.all_atom_interval_frames == 0
                    writer.write(positions[selected], first_step=self.save_interval_steps * self.all_atom_interval_frames)
                    n_all_atom += int(selected.sum())
                n_frames += chunk
                _write_checkpoint(self.paths["checkpoint"], context, n_frames, n_all_atom, self.settings)
                if progress_callback is not None:
                    progress_callback(self.replica, n_frames, self.n_frames_total)
        finally:
            bar.close()

    def _check_finite(self, positions: np.ndarray, forces: np.ndarray, n_frames: int) -> None:
        bad = ~(np.isfinite(positions).all(axis=(1, 2)) & np.isfinite(forces).all(axis=(1, 2)))
        if bad.any():
            frame = n_frames + int(np.flatnonzero(bad)[0])
            raise ReferenceGenerationError(
                f"replica {self.replica}: the simulation blew up (non-finite coordinates or forces at "
                f"frame {frame}); use a smaller time step, minimise the structure, or fix the PDB. "
                "The frames before the last checkpoint are kept"
            )
