"""The two file formats of a force-field artifact, and reading them without TorchScript.

An artifact is written as two files side by side (see docs/compatibility.md):

``model.pt``  (format version 1)
    TorchScript module + metadata JSON (``torch.jit.save(..., _extra_files=...)``), read by
    ``openmmtorch.TorchForce``; unchanged since the first release.
``model.pt2`` (format version 2)
    A PT2 archive (the ``torch.export.save`` container) holding two ``torch.export``
    ExportedPrograms of the network energy, ``"model"`` (float64) and ``"model_float32"``, each
    mapping positions ``(R·n_beads, 3)`` nm with R dynamic to the summed energy (0-d, kJ/mol), and
    the same metadata JSON under ``extra/openmm_flowmatch.json``. Loading it never touches
    ``torch.jit``. The weights lie in the archive as raw little-endian tensors described by
    ``data/weights/model_weights_config.json``; :func:`read_weights` reads them with ``zipfile``,
    ``json`` and NumPy only, and the metadata's ``"model"`` entry (``model.config()``) defines the
    features and layers: what a native kernel needs, without running any code from the file.

``"format_version"`` in a file's metadata is the oldest reader layout that reads that file; a
reader refuses versions above :data:`ARTIFACT_FORMAT_VERSION`.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ARTIFACT_FORMAT_VERSION",
    "EXPORTED_FORMAT_VERSION",
    "EXPORTED_SUFFIX",
    "METADATA_FILE",
    "PROGRAM_NAMES",
    "TORCHSCRIPT_FORMAT_VERSION",
    "ArtifactError",
    "EnergyProgram",
    "ExportedEnergy",
    "companion_path",
    "export_energy_programs",
    "file_format",
    "load_exported",
    "parse_metadata",
    "read_weights",
    "save_exported",
]

logger = logging.getLogger(__name__)

TORCHSCRIPT_FORMAT_VERSION = 1
"""Format version written into the TorchScript file (``.pt``); readable by every release."""

EXPORTED_FORMAT_VERSION = 2
"""Format version written into the ExportedProgram file (``.pt2``)."""

ARTIFACT_FORMAT_VERSION = 2
"""Newest format version this package reads."""

METADATA_FILE = "openmm_flowmatch.json"
"""Name of the metadata entry stored in both files."""

EXPORTED_SUFFIX = ".pt2"
"""Suffix of the ExportedProgram file written next to the TorchScript one."""

PROGRAM_NAMES = {torch.float64: "model", torch.float32: "model_float32"}
"""Program name inside the PT2 archive for each dtype (``"model"`` is what ``torch.export.load`` returns)."""

MAX_REPLICAS = 1_000_000

# torch.export.pt2_archive schema ScalarType codes → NumPy dtypes (little-endian raw bytes)
_SCALAR_TYPES = {4: "<i4", 5: "<i8", 6: "<f2", 7: "<f4", 8: "<f8", 12: "?"}


class ArtifactError(ValueError):
    """A file is not a valid force-field artifact, or does not fit the topology it is used with."""


def companion_path(path: str | os.PathLike) -> Path:
    """The ExportedProgram file that belongs to the TorchScript artifact ``path`` (``x.pt`` → ``x.pt2``)."""
    path = Path(path)
    return path.with_suffix(EXPORTED_SUFFIX) if path.suffix != EXPORTED_SUFFIX else path


# ---------------------------------------------------------------------------- the exported energy
class EnergyProgram(nn.Module):
    """The module that is exported: summed energy of R copies for one dtype.

    Parameters
    ----------
    network
        Network in one dtype mapping ``(batch, n_beads, 3)`` → ``(batch,)`` energies (kJ/mol).
    n_beads
        Beads of one copy.
    """

    def __init__(self, network: nn.Module, n_beads: int) -> None:
        super().__init__()
        self.net = network
        self.n_beads = int(n_beads)

    def forward(self, positions: Tensor) -> Tensor:
        """Summed energy (0-d, kJ/mol) of positions ``(R·n_beads, 3)`` nm."""
        return self.net(positions.reshape(-1, self.n_beads, 3)).sum()


def export_energy_programs(double_model: nn.Module, single_model: nn.Module, n_beads: int) -> dict:
    """ExportedPrograms of the energy in float64 and float32, with the replica count R dynamic.

    ``backed_size_oblivious`` keeps torch.export from specialising R = 1 away (it traces with
    R = 2), so that one program serves every R ≥ 1.

    Raises
    ------
    ArtifactError
        If ``torch.export`` cannot trace the network.
    """
    import torch.fx.experimental._config as fx_config

    replicas = torch.export.Dim("replicas", min=1, max=MAX_REPLICAS)
    programs = {}
    for dtype, network in ((torch.float64, double_model), (torch.float32, single_model)):
        example = torch.zeros(2 * n_beads, 3, dtype=dtype) + torch.arange(2 * n_beads, dtype=dtype)[:, None] * 0.1
        try:
            with fx_config.patch(backed_size_oblivious=True):
                programs[PROGRAM_NAMES[dtype]] = torch.export.export(
                    EnergyProgram(network, n_beads), (example,), dynamic_shapes={"positions": {0: n_beads * replicas}}
                )
        except Exception as error:  # noqa: BLE001 - torch.export raises many types
            raise ArtifactError(f"the model cannot be exported with torch.export: {str(error).splitlines()[0]}") from error
    return programs


class ExportedEnergy(nn.Module):
    """The loaded ExportedPrograms behind the artifact's signature: dtype dispatch, shape check.

    Calls ``program.module()`` (eager ATen graphs, autograd works through them); no TorchScript.
    """

    def __init__(self, programs: dict, n_beads: int) -> None:
        super().__init__()
        self.programs = programs
        self.n_beads = int(n_beads)
        self.double_module = programs[PROGRAM_NAMES[torch.float64]].module()
        single = programs.get(PROGRAM_NAMES[torch.float32])
        self.single_module = None if single is None else single.module()

    def forward(self, positions: Tensor) -> Tensor:
        """Summed network energy (0-d, kJ/mol, input dtype) of positions ``(R·n_beads, 3)`` nm."""
        if positions.dim() != 2 or positions.size(1) != 3 or positions.size(0) % self.n_beads != 0 or positions.size(0) == 0:
            raise ValueError(
                "openmm_flowmatch force field: positions must have shape (R*n_beads, 3) for R copies of the CG "
                "molecule; the System's particle count does not fit the model's bead count"
            )
        if positions.dtype == torch.float64 or self.single_module is None:
            return self.double_module(positions.to(torch.float64)).to(positions.dtype)
        return self.single_module(positions.to(torch.float32)).to(positions.dtype)

    def __reduce__(self) -> tuple:
        import io

        buffer = io.BytesIO()
        save_exported(buffer, self.programs, "{}")
        return (_exported_energy_from_bytes, (buffer.getvalue(), self.n_beads))


def _exported_energy_from_bytes(data: bytes, n_beads: int) -> ExportedEnergy:
    import io

    programs, _ = load_exported(io.BytesIO(data), "pickled ExportedEnergy")
    return ExportedEnergy(programs, n_beads)


# ---------------------------------------------------------------------------------- file I/O
def save_exported(target: Any, programs: dict, metadata_text: str) -> None:
    """Write the programs and the metadata JSON into one PT2 archive (path or binary file object)."""
    from torch.export.pt2_archive._package import package_pt2

    package_pt2(target, exported_programs=dict(programs), extra_files={METADATA_FILE: metadata_text})


def load_exported(source: Any, name: Any) -> tuple[dict, str]:
    """Programs (by name) and metadata text of a PT2 archive; never calls ``torch.jit``.

    Falls back to the public ``torch.export.load`` (float64 program only) should the archive
    reader of ``torch.export.pt2_archive`` move.
    """
    try:
        from torch.export.pt2_archive._package import load_pt2
    except ImportError:  # pragma: no cover - a future torch
        extra = {METADATA_FILE: ""}
        program = torch.export.load(source, extra_files=extra)
        return {PROGRAM_NAMES[torch.float64]: program}, extra[METADATA_FILE]
    try:
        with warnings.catch_warnings():  # torch.frombuffer on the read-only archive bytes; copied by torch
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            contents = load_pt2(source)
    except Exception as error:  # noqa: BLE001 - zip, pickle and deserialisation errors
        raise ArtifactError(
            f"{name}: cannot read the ExportedProgram archive ({_first_line(error)}); the file is damaged or "
            "was written by an incompatible torch — re-export it with openmm_flowmatch.export_force_field"
        ) from error
    if PROGRAM_NAMES[torch.float64] not in contents.exported_programs:
        raise ArtifactError(f"{name}: the archive holds no 'model' program; re-export it with export_force_field")
    return dict(contents.exported_programs), contents.extra_files.get(METADATA_FILE, "")


def file_format(path: Path) -> str:
    """``"torchscript"`` or ``"exported"``, from the archive's entries (not the suffix).

    Raises
    ------
    ArtifactError
        If the file is missing, not a zip archive (e.g. truncated), or neither format.
    """
    if not path.is_file():
        raise ArtifactError(f"{path}: no such force-field file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ArtifactError(
            f"{path} is not a TorchScript or ExportedProgram force-field artifact (not a complete zip archive: "
            f"{error}; a truncated copy?); copy the file again or re-export it with openmm_flowmatch.export_force_field"
        ) from error
    if any(name.endswith("/archive_format") or name == "archive_format" for name in names):
        return "exported"
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
        return "torchscript"
    raise ArtifactError(
        f"{path} is not a TorchScript or ExportedProgram force-field artifact (a zip archive of neither kind); "
        "write one with openmm_flowmatch.export_force_field"
    )


def parse_metadata(text: Any, path: Any) -> dict:
    """Parsed and version-checked metadata JSON of an artifact file.

    Raises
    ------
    ArtifactError
        If there is none, it is not JSON, its format version is newer than this package reads,
        or it lacks the keys every reader needs.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if not text:
        raise ArtifactError(
            f"{path} holds no {METADATA_FILE} metadata, so it is not an openmm_flowmatch artifact; export the model "
            "with openmm_flowmatch.export_force_field"
        )
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{path}: the {METADATA_FILE} metadata is not valid JSON ({error})") from error
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version!r} is newer than this openmm_flowmatch reads (up to "
            f"{ARTIFACT_FORMAT_VERSION}); update the package (pip install -U openmm-flowmatch)"
        )
    for key in ("n_beads", "masses", "bead_names"):
        if key not in metadata:
            raise ArtifactError(f"{path}: the metadata lacks {key!r}; re-export the model")
    return metadata


def read_weights(path: str | os.PathLike, program: str = "model") -> dict[str, np.ndarray]:
    """Weights of an ExportedProgram artifact as NumPy arrays, read with ``zipfile`` and ``json`` only.

    No pickle, no TorchScript, no code from the file runs: each tensor is raw little-endian
    bytes described by ``data/weights/<program>_weights_config.json`` (name → file, dtype code,
    shape, strides). Keys are the network's ``state_dict`` names prefixed by ``"net."``.

    Parameters
    ----------
    path
        The ``.pt2`` file.
    program
        ``"model"`` (float64) or ``"model_float32"``.
    """
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        root = names[0].split("/")[0]
        config = json.loads(archive.read(f"{root}/data/weights/{program}_weights_config.json"))["config"]
        weights = {}
        for name, entry in config.items():
            meta = entry["tensor_meta"]
            if entry.get("use_pickle") or meta["dtype"] not in _SCALAR_TYPES:
                raise ArtifactError(f"{path}: weight {name!r} is not stored as raw bytes; read it with torch.export.load")
            raw = archive.read(f"{root}/data/weights/{entry['path_name']}")
            flat = np.frombuffer(raw, dtype=_SCALAR_TYPES[meta["dtype"]])
            shape = [size["as_int"] for size in meta["sizes"]]
            strides = [stride["as_int"] for stride in meta["strides"]]
            offset = meta["storage_offset"]["as_int"]
            itemsize = flat.itemsize
            weights[name] = np.lib.stride_tricks.as_strided(
                flat[offset:], shape=shape, strides=[s * itemsize for s in strides]
            ).copy()
    return weights


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
