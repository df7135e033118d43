"""The force-field artifact: a TorchScript file and a torch.export file, and its OpenMM System.

:func:`export_force_field` writes the network term U_net twice, each file with the metadata JSON
of DESIGN.md ("The force-field artifact") inside it: ``model.pt``, a TorchScript module
(``torch.jit.save(..., _extra_files={"openmm_flowmatch.json": ...})``, format version 1), and
``model.pt2``, ``torch.export`` ExportedPrograms in float64 and float32 with the replica count
dynamic (format version 2, see :mod:`openmm_flowmatch.artifact_formats` and
docs/compatibility.md). :class:`FlowMatchForceField` reads either file and builds an
``openmm.System`` with bead masses, the prior terms as standard OpenMM forces and one network
force: ``openmmtorch.TorchForce`` (default; TorchScript, CUDA graphs), ``openmm.PythonForce``
running the TorchScript / eager / ``torch.compile``d model (``"pythonforce"``) or the exported
program (``"exported"``, no TorchScript anywhere), or openmm-torch's ``PythonTorchForce`` where
the installed openmm-torch has one.

The scripted module's ``forward(positions)`` takes ``(R·n_beads, 3)`` positions in nm (float32 or
float64) and returns the summed network energy (0-d, kJ/mol, input dtype) of R independent copies
of the molecule, evaluated in one batched call. It holds a float32 and a float64 copy of the
network, so that OpenMM's CPU platform (float64 positions) gets a double-precision energy and a
mixed-precision CUDA context (float32) a single-precision one.

Example
-------
>>> field = FlowMatchForceField.load("ala2_cg.pt")                      # doctest: +SKIP
>>> topology = field.mapping.cg_topology()                              # doctest: +SKIP
>>> system = field.create_system(topology, platform_hint="CUDA")        # doctest: +SKIP
"""

from __future__ import annotations

import copy
import datetime
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from openmm_flowmatch.artifact_formats import (
    ARTIFACT_FORMAT_VERSION,
    EXPORTED_FORMAT_VERSION,
    METADATA_FILE,
    PROGRAM_NAMES,
    TORCHSCRIPT_FORMAT_VERSION,
    ArtifactError,
    ExportedEnergy,
    companion_path,
    export_energy_programs,
    file_format,
    load_exported,
    parse_metadata,
    read_weights,
    save_exported,
)
from openmm_flowmatch.compatibility import (
    BACKENDS,
    TorchScriptDeprecationWarning,
    choose_default_backend,
    python_torch_force_class,
    warn_if_deprecated,
)
from openmm_flowmatch.topology import replicate_topology

__all__ = [
    "ARTIFACT_FORMAT_VERSION",
    "METADATA_FILE",
    "ArtifactError",
    "ExportedEnergy",
    "ForceFieldModule",
    "FlowMatchForceField",
    "TorchComputation",
    "build_module",
    "export_force_field",
    "read_weights",
    "replicate_forces",
    "TorchScriptDeprecationWarning",
    "update_artifact_metadata",
    "replicate_topology",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the exported module
class ForceFieldModule(nn.Module):
    """Energy of R independent copies of a CG molecule, in the dtype of the input.

    Parameters
    ----------
    single_model, double_model
        The same network in float32 and in float64, each mapping ``(batch, n_beads, 3)`` →
        ``(batch,)`` energies in kJ/mol.
    n_beads
        Beads of one copy.
    """

    def __init__(self, single_model: nn.Module, double_model: nn.Module, n_beads: int) -> None:
        super().__init__()
        self.single_model = single_model
        self.double_model = double_model
        self.n_beads = int(n_beads)

    def forward(self, positions: Tensor) -> Tensor:
        """Summed network energy (0-d, kJ/mol) of positions ``(R·n_beads, 3)`` in nm."""
        if positions.dim() != 2 or positions.size(1) != 3 or positions.size(0) % self.n_beads != 0:
            raise ValueError(
                "openmm_flowmatch force field: positions must have shape (R*n_beads, 3) for R copies of the CG "
                "molecule; the System's particle count does not fit the model's bead count"
            )
        batch = positions.reshape(-1, self.n_beads, 3)
        if positions.dtype == torch.float64:
            return self.double_model(batch).sum()
        return self.single_model(batch.to(torch.float32)).sum().to(positions.dtype)


def _network_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A CPU copy of ``model`` in ``dtype`` with frozen parameters (no parameter gradients in MD)."""
    if isinstance(model, torch.jit.ScriptModule):
        buffer = io.BytesIO()
        torch.jit.save(model, buffer)
        buffer.seek(0)
        duplicate = torch.jit.load(buffer, map_location="cpu")
    else:
        duplicate = copy.deepcopy(model).cpu()
        if hasattr(duplicate, "training_info"):
            del duplicate.training_info
    with torch.no_grad():
        duplicate = duplicate.to(dtype)
    duplicate.eval()
    for parameter in duplicate.parameters():
        parameter.requires_grad_(False)
    return duplicate


def build_module(model: nn.Module, n_beads: int) -> ForceFieldModule:
    """Eager :class:`ForceFieldModule` around float32 and float64 copies of ``model``.

    The model's Lipschitz projection (if any) is applied first, so that the exported weights
    obey the bound. ``model`` itself is left unchanged.
    """
    if not isinstance(model, torch.jit.ScriptModule):
        model = copy.deepcopy(model).cpu()
        if hasattr(model, "project_lipschitz"):
            model.project_lipschitz()
    return ForceFieldModule(_network_copy(model, torch.float32), _network_copy(model, torch.float64), n_beads)


# ------------------------------------------------------------------------------------ metadata
def _mapping_description(mapping: Any) -> dict:
    if mapping is None:
        raise ArtifactError("export_force_field needs the CG mapping (a CGMapping or its to_dict())")
    description = mapping.to_dict() if hasattr(mapping, "to_dict") else dict(mapping)
    missing = [key for key in ("bead_names", "residue_names", "elements", "masses", "bonds") if key not in description]
    if missing:
        raise ArtifactError(f"the mapping description lacks {missing}; pass a CGMapping or CGMapping.to_dict()")
    return json.loads(json.dumps(description))


def _json_ready(value: Any) -> Any:
    """Round-trip through JSON, turning NumPy scalars and arrays into plain numbers and lists."""

    def default(item: Any) -> Any:
        if isinstance(item, np.ndarray):
            return item.tolist()
        if isinstance(item, np.generic):
            return item.item()
        if isinstance(item, (Path, torch.dtype, torch.device)):
            return str(item)
        raise TypeError(f"cannot store {type(item).__name__} in the artifact metadata")

    return json.loads(json.dumps(value, default=default))


def _check_module(module: torch.jit.ScriptModule, n_beads: int) -> None:
    """Evaluate the scripted module on a random chain in both dtypes; raise if not finite."""
    generator = torch.Generator().manual_seed(0)
    steps = 0.15 * torch.nn.functional.normalize(torch.randn(n_beads, 3, generator=generator, dtype=torch.float64), dim=-1)
    positions = torch.cumsum(steps, dim=0)
    energies = [module(positions), module(positions.float())]
    if energies[0].dim() != 0 or energies[0].dtype != torch.float64 or energies[1].dtype != torch.float32:
        raise ArtifactError("the exported module must return a 0-d energy in the dtype of its input")
    if not all(bool(torch.isfinite(energy)) for energy in energies):
        raise ArtifactError("the exported network gives a non-finite energy for a plain chain configuration")


def export_force_field(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    priors: Any,
    mapping: Any,
    temperature: Any,
    training: Optional[dict] = None,
    replicas: int = 1,
    data_statistics: Optional[dict] = None,
    exported_program: bool = True,
) -> Path:
    """Write the network term and everything needed to simulate it: a TorchScript file and a .pt2 file.

    Parameters
    ----------
    model
        Trained network mapping positions ``(batch, n_beads, 3)`` nm → energies ``(batch,)``
        kJ/mol (:class:`~openmm_flowmatch.forcefield.CGNet`,
        :class:`~openmm_flowmatch.forcefield.MessagePassingNet` or any scriptable module).
    path
        Output file (conventionally ``.pt``); parent folders are created.
    priors
        The prior terms the network was trained with (``Priors``, anything with ``to_dict()``),
        or ``None``. Stored with parameters in OpenMM units; ``create_system`` adds them as
        standard OpenMM forces.
    mapping
        The ``CGMapping`` (or its ``to_dict()``): bead names, residue names, elements, masses,
        CG bond graph and which atoms made each bead.
    temperature
        Temperature of the training data in K (or an ``openmm.unit`` quantity).
    training
        How the model was trained (method, frames, epochs, seed, losses …); default the
        ``training_info`` that :func:`~openmm_flowmatch.forcefield.train_force_field` attached
        to the model.
    replicas
        Number of independent copies the artifact is meant for (recorded as the default of
        :meth:`FlowMatchForceField.create_system`); the module itself evaluates any number
        R of copies, given ``(R·n_beads, 3)`` positions.
    data_statistics
        Optional bond and angle statistics of the training data (as returned by
        ``openmm_flowmatch.analysis.bonded_statistics``): ``bond_mean``, ``bond_std`` (nm, one
        per bond of ``bonds``, default the mapping's bond graph) and ``angle_mean``,
        ``angle_std`` (rad, one per triple of ``angles``, default the bonded triples). Stored
        under ``"data_statistics"``; simulations compare their bond widths against them
        (without them, against the widths the Boltzmann-inverted priors imply).
    exported_program
        Also write ``path`` with suffix ``.pt2``: the ``torch.export`` programs (float64 and
        float32, R dynamic) with the same metadata (format version 2), which load without
        TorchScript. Skipped, with a logged warning, for an already scripted model.

    Returns
    -------
    pathlib.Path
        The TorchScript file (its ``.pt2`` companion lies next to it).

    Raises
    ------
    ArtifactError
        If the model does not script or export, its bead count differs from the mapping's, it
        gives a non-finite energy, or the exported program disagrees with the scripted module.
    """
    from openmm_flowmatch import __version__
    from openmm_flowmatch.units import kelvin

    mapping_description = _mapping_description(mapping)
    n_beads = len(mapping_description["bead_names"])
    model_beads = getattr(model, "n_beads", n_beads)
    if model_beads != n_beads:
        raise ArtifactError(f"the model takes {model_beads} beads but the mapping defines {n_beads}")
    if int(replicas) < 1:
        raise ArtifactError(f"replicas must be >= 1, got {replicas}")
    if training is None:
        training = getattr(model, "training_info", None) or {}
    module = build_module(model, n_beads)
    try:
        scripted = torch.jit.script(module)
    except Exception as error:  # noqa: BLE001 - the TorchScript compiler raises many types
        raise ArtifactError(f"the model cannot be compiled with torch.jit.script: {error}") from error
    _check_module(scripted, n_beads)
    path = Path(path)
    programs = _exported_programs(module, scripted, n_beads) if exported_program else None

    metadata = {
        "format_version": TORCHSCRIPT_FORMAT_VERSION,
        "package": "openmm_flowmatch",
        "package_version": __version__,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "energy": "network term U_net only, kJ/mol; forward(positions (R*n_beads, 3) nm) -> summed energy",
        "units": {"length": "nm", "energy": "kJ/mol", "force": "kJ/mol/nm", "temperature": "K", "mass": "amu"},
        "n_beads": n_beads,
        "replicas": int(replicas),
        "bead_names": mapping_description["bead_names"],
        "residue_names": mapping_description["residue_names"],
        "elements": mapping_description["elements"],
        "masses": [float(mass) for mass in mapping_description["masses"]],
        "bonds": [list(map(int, bond)) for bond in mapping_description["bonds"]],
        "priors": None if priors is None else priors.to_dict(),
        "temperature": kelvin(temperature),
        "mapping": mapping_description,
        "model": model.config() if hasattr(model, "config") else {"class": type(model).__name__},
        "training": training,
    }
    if data_statistics is not None:
        metadata["data_statistics"] = _data_statistics(data_statistics, metadata["bonds"], n_beads)
    metadata["files"] = {"torchscript": path.name, "exported_program": None if programs is None else companion_path(path).name}
    metadata = _json_ready(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    # both files are written under temporary names and then renamed (the program first), so an
    # interrupted export never leaves a half-written artifact or a .pt without its .pt2
    temporary = path.with_name(f".{path.name}.partial")
    torch.jit.save(scripted, str(temporary), _extra_files={METADATA_FILE: json.dumps(metadata, indent=1)})
    if programs is not None:
        exported = companion_path(path)
        exported_temporary = exported.with_name(f".{exported.name}.partial")
        save_exported(str(exported_temporary), programs, _exported_metadata_text(metadata))
        os.replace(exported_temporary, exported)
    os.replace(temporary, path)
    logger.info("wrote the force-field artifact %s%s (%d beads)", path,
                "" if programs is None else f" and {companion_path(path).name}", n_beads)
    return path


def _exported_metadata_text(metadata: dict) -> str:
    """The metadata JSON of the .pt2 file: the TorchScript file's, with format version 2."""
    exported = dict(metadata, format_version=EXPORTED_FORMAT_VERSION, format="torch.export ExportedProgram (PT2 archive)")
    return json.dumps(exported, indent=1)


def _exported_programs(module: ForceFieldModule, scripted: torch.jit.ScriptModule, n_beads: int) -> Optional[dict]:
    """The float64/float32 ExportedPrograms of ``module``, checked against the scripted module."""
    if isinstance(module.double_model, torch.jit.ScriptModule):
        logger.warning("the model is already TorchScript, which torch.export cannot trace; no .pt2 file is written")
        return None
    programs = export_energy_programs(module.double_model, module.single_model, n_beads)
    exported = ExportedEnergy(programs, n_beads)
    generator = torch.Generator().manual_seed(1)
    positions = torch.cumsum(0.15 * torch.randn(3 * n_beads, 3, generator=generator, dtype=torch.float64), dim=0)
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        expected = float(scripted(positions.to(dtype)))
        if abs(float(exported(positions.to(dtype))) - expected) > tolerance * max(1.0, abs(expected)):
            raise ArtifactError(f"the exported program's {dtype} energy differs from the TorchScript module's")
    return programs


def _data_statistics(statistics: dict, bonds: list, n_beads: int) -> dict:
    """Checked copy of the optional ``data_statistics`` metadata (bonds/angles default from the bond graph)."""
    from openmm_flowmatch.priors import bonded_triples

    statistics = _json_ready(dict(statistics))
    statistics.setdefault("bonds", bonds)
    statistics.setdefault("angles", bonded_triples(statistics["bonds"], n_beads).tolist())
    for kind, key in (("bond", "bonds"), ("angle", "angles")):
        count = len(statistics[key])
        for name in (f"{kind}_mean", f"{kind}_std"):
            values = statistics.get(name)
            if values is None and kind == "angle":
                continue
            if values is None or len(values) != count:
                raise ArtifactError(
                    f"data_statistics[{name!r}] must hold one value per {kind} ({count}), got "
                    f"{None if values is None else len(values)}"
                )
    return statistics


def update_artifact_metadata(path: str | os.PathLike, updates: dict) -> dict:
    """Add or replace top-level entries of an artifact's metadata, keeping its module unchanged.

    The file is loaded with its metadata, the entries are updated, and the module is saved to a
    temporary file next to it that replaces the original (``os.replace``), so an interrupted
    update leaves the old artifact intact.

    Returns
    -------
    dict
        The new metadata.
    """
    path = Path(path)
    field = FlowMatchForceField.load(path)
    metadata = field.metadata
    metadata.update(_json_ready(updates))
    if field.has_torchscript:
        temporary = path.with_name(f".{path.name}.tmp")
        torch.jit.save(field.module, str(temporary), _extra_files={METADATA_FILE: json.dumps(metadata, indent=1)})
        os.replace(temporary, path)
    exported = companion_path(path)
    if exported.is_file():
        programs, text = load_exported(str(exported), exported)
        exported_metadata = dict(json.loads(text) if text else metadata)
        exported_metadata.update(_json_ready(updates))
        temporary = exported.with_name(f".{exported.name}.tmp")
        save_exported(str(temporary), programs, json.dumps(exported_metadata, indent=1))
        os.replace(temporary, exported)
        if not field.has_torchscript:
            metadata = exported_metadata
    logger.info("updated %s in the metadata of %s", ", ".join(map(str, updates)), path)
    return metadata


# -------------------------------------------------------------------------------- replication
def replicate_forces(forces: Sequence[Any], n_beads: int, replicas: int) -> list:
    """Copies of bonded OpenMM forces acting on each of ``replicas`` blocks of ``n_beads`` particles.

    Each returned force holds the terms of the input force for copy 0 (particles 0..n−1), copy 1
    (n..2n−1), and so on. Supported: HarmonicBond/HarmonicAngle/PeriodicTorsion forces and the
    Custom Bond/Angle/Torsion/CompoundBond/External forces.
    """
    import openmm

    adders = {
        openmm.HarmonicBondForce: ("getNumBonds", "getBondParameters", "addBond", 2),
        openmm.HarmonicAngleForce: ("getNumAngles", "getAngleParameters", "addAngle", 3),
        openmm.PeriodicTorsionForce: ("getNumTorsions", "getTorsionParameters", "addTorsion", 4),
        openmm.CustomBondForce: ("getNumBonds", "getBondParameters", "addBond", 2),
        openmm.CustomAngleForce: ("getNumAngles", "getAngleParameters", "addAngle", 3),
        openmm.CustomTorsionForce: ("getNumTorsions", "getTorsionParameters", "addTorsion", 4),
        openmm.CustomExternalForce: ("getNumParticles", "getParticleParameters", "addParticle", 1),
    }
    result = []
    for force in forces:
        replicated = copy.deepcopy(force)
        if replicas > 1 and isinstance(force, openmm.CustomCompoundBondForce):
            for replica in range(1, replicas):
                offset = replica * n_beads
                for term in range(force.getNumBonds()):
                    particles, parameters = force.getBondParameters(term)
                    replicated.addBond([int(p) + offset for p in particles], list(parameters))
        elif replicas > 1:
            kind = next((key for key in adders if type(force) is key), None)
            if kind is None:
                raise ArtifactError(
                    f"cannot replicate a prior force of type {type(force).__name__} ({force.getName()}); "
                    "use replicas=1 or a bonded prior term"
                )
            count, getter, adder, n_particles = adders[kind]
            for replica in range(1, replicas):
                offset = replica * n_beads
                for term in range(getattr(force, count)()):
                    values = list(getattr(force, getter)(term))
                    particles = [int(p) + offset for p in values[:n_particles]]
                    rest = values[n_particles:]
                    if kind in (openmm.CustomBondForce, openmm.CustomAngleForce, openmm.CustomTorsionForce,
                                openmm.CustomExternalForce):
                        getattr(replicated, adder)(*particles, list(rest[0]))
                    else:
                        getattr(replicated, adder)(*particles, *rest)
        result.append(replicated)
    return result


# ---------------------------------------------------------------------------- PythonForce backend
class TorchComputation:
    """The computation function of an ``openmm.PythonForce``: energy and autograd forces.

    Parameters
    ----------
    module
        A TorchScript or eager module with the artifact's signature (positions ``(N, 3)`` nm →
        0-d energy kJ/mol).
    compile
        Wrap an eager module with ``torch.compile`` (on first use).

    The object is picklable (so that ``XmlSerializer`` can store the PythonForce): a TorchScript
    module is pickled as its serialized bytes, an eager one with ``torch.save``.
    """

    def __init__(self, module: nn.Module, compile: bool = False) -> None:
        if compile and isinstance(module, torch.jit.ScriptModule):
            raise ArtifactError("torch.compile needs the eager model; use FlowMatchForceField.eager_module()")
        self.module = module
        self.compile = bool(compile)
        self._callable = None

    def _function(self):
        if self._callable is None:
            self._callable = torch.compile(self.module, dynamic=False) if self.compile else self.module
        return self._callable

    def __call__(self, state: Any) -> tuple[float, np.ndarray]:
        import openmm.unit as unit

        array = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
        positions = torch.from_numpy(array).requires_grad_(True)
        energy = self._function()(positions)
        (gradient,) = torch.autograd.grad(energy, positions)
        return float(energy.detach()), -gradient.numpy()

    def __getstate__(self) -> dict:
        buffer = io.BytesIO()
        if isinstance(self.module, torch.jit.ScriptModule):
            torch.jit.save(self.module, buffer)
            kind = "torchscript"
        else:
            torch.save(self.module, buffer)
            kind = "eager"
        return {"kind": kind, "module": buffer.getvalue(), "compile": self.compile}

    def __setstate__(self, state: dict) -> None:
        buffer = io.BytesIO(state["module"])
        if state["kind"] == "torchscript":
            self.module = torch.jit.load(buffer, map_location="cpu")
        else:
            self.module = torch.load(buffer, map_location="cpu", weights_only=False)
        self.compile = state["compile"]
        self._callable = None


def _python_force(computation: "TorchComputation") -> Any:
    """``openmm.PythonForce`` around ``computation``, or an ArtifactError on OpenMM < 8.5."""
    import openmm

    if not hasattr(openmm, "PythonForce"):
        raise ArtifactError(f"openmm {openmm.__version__} has no PythonForce (needs OpenMM >= 8.5); use backend='torchforce'")
    return openmm.PythonForce(computation)


# ---------------------------------------------------------------------------------- the reader
class FlowMatchForceField:
    """A loaded force-field artifact: the network, its metadata, and System building.

    Use :meth:`load`; the constructor takes an already loaded TorchScript module (or ``None``),
    the metadata, and optionally the loaded ExportedPrograms.
    """

    def __init__(
        self,
        module: Optional[torch.jit.ScriptModule],
        metadata: dict,
        path: Optional[Path] = None,
        programs: Optional[dict] = None,
    ) -> None:
        if module is None and programs is None:
            raise ArtifactError("a force field needs a TorchScript module or exported programs")
        self._module = module
        self._metadata = metadata
        self.path = path
        self._programs = programs
        self._exported: Optional[ExportedEnergy] = None

    # .......................................................................... reading
    @classmethod
    def load(cls, path: str | os.PathLike) -> "FlowMatchForceField":
        """Read an artifact written by :func:`export_force_field`: the ``.pt`` or the ``.pt2`` file.

        The format is recognised from the archive's contents. A ``.pt2`` file is read with
        ``torch.export`` only (``torch.jit`` is never called); its TorchScript sibling, if any, is
        not opened.

        Raises
        ------
        ArtifactError
            If the file does not exist, is truncated or of neither format, holds no
            ``openmm_flowmatch`` metadata, or comes from a newer format version.
        """
        path = Path(path)
        if file_format(path) == "exported":
            programs, text = load_exported(str(path), path)
            return cls(None, parse_metadata(text, path), path, programs)
        extra = {METADATA_FILE: ""}
        try:
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as error:  # noqa: BLE001 - torch raises RuntimeError/ValueError/pickle errors
            raise ArtifactError(
                f"{path} is not a TorchScript force-field artifact (torch.jit.load failed: {str(error).splitlines()[0]}); "
                "copy the file again or write one with openmm_flowmatch.export_force_field"
            ) from error
        return cls(module, parse_metadata(extra[METADATA_FILE], path), path)

    @property
    def metadata(self) -> dict:
        """The artifact's metadata (a copy)."""
        return copy.deepcopy(self._metadata)

    @property
    def module(self) -> nn.Module:
        """The network term: positions ``(R·n_beads, 3)`` nm → 0-d energy kJ/mol.

        The TorchScript module when the artifact was loaded from its ``.pt`` file, otherwise the
        :class:`ExportedEnergy` of the ``.pt2`` file.
        """
        return self._module if self._module is not None else self.exported_module()

    @property
    def has_torchscript(self) -> bool:
        """Whether the TorchScript module is loaded (the artifact was read from its ``.pt`` file)."""
        return self._module is not None

    @property
    def exported_programs(self) -> dict:
        """The ``torch.export`` programs by name (``"model"`` float64, ``"model_float32"``).

        Read from the ``.pt2`` file, or its companion next to the ``.pt`` file; for an artifact
        of format version 1 (no ``.pt2``) exported now from the eager rebuild of the network.
        """
        if self._programs is None:
            exported = None if self.path is None else companion_path(self.path)
            if exported is not None and exported.is_file() and exported != self.path:
                self._programs, _ = load_exported(str(exported), exported)
            else:
                logger.info("the artifact has no .pt2 file; exporting its network with torch.export now")
                eager = self.eager_module()
                self._programs = export_energy_programs(eager.double_model, eager.single_model, self.n_beads)
        return self._programs

    def exported_module(self) -> ExportedEnergy:
        """The exported programs as a module with the artifact's signature (eager, no TorchScript)."""
        if self._exported is None:
            self._exported = ExportedEnergy(self.exported_programs, self.n_beads)
        return self._exported

    @property
    def n_beads(self) -> int:
        return int(self._metadata["n_beads"])

    @property
    def masses(self) -> np.ndarray:
        """Bead masses in amu."""
        return np.asarray(self._metadata["masses"], dtype=float)

    @property
    def temperature(self) -> Optional[float]:
        """Temperature of the training data in K."""
        return self._metadata.get("temperature")

    @property
    def data_statistics(self) -> Optional[dict]:
        """Bond/angle means and widths of the training data stored at export, or ``None``.

        Keys ``bonds``, ``angles`` (bead indices), ``bond_mean``, ``bond_std`` (nm),
        ``angle_mean``, ``angle_std`` (rad).
        """
        statistics = self._metadata.get("data_statistics")
        return None if statistics is None else copy.deepcopy(statistics)

    @property
    def sound_time_step(self) -> Optional[float]:
        """Largest sound time step (ps) found by ``check-time-step`` and recorded in the artifact.

        ``None`` when the artifact was never checked, or no tested step was sound (see the
        ``"time_step_check"`` metadata entry for the full table).
        """
        check = self._metadata.get("time_step_check") or {}
        value = check.get("largest_sound_time_step")
        return None if value is None else float(value)

    @property
    def priors(self) -> Any:
        """The prior terms (``openmm_flowmatch.priors.Priors``) or ``None``."""
        if self._metadata.get("priors") is None:
            return None
        from openmm_flowmatch.priors import Priors

        return Priors.from_dict(self._metadata["priors"])

    @property
    def mapping(self) -> Any:
        """The ``CGMapping`` stored in the artifact."""
        from openmm_flowmatch.mapping import CGMapping

        return CGMapping.from_dict(self._metadata["mapping"])

    def fresh_module(self) -> torch.jit.ScriptModule:
        """An independent copy of :attr:`module` (reloaded from its serialized form).

        Each network force gets its own copy: TorchScript's profiling executor specialises a
        module to the input shapes it has seen, and a module shared between Systems of
        different replica counts falls back to a slow path.
        """
        if self._module is None:
            return torch.jit.script(self.eager_module())
        buffer = io.BytesIO()
        torch.jit.save(self._module, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer, map_location="cpu")

    def network_state_dict(self) -> dict:
        """The float64 network's ``state_dict`` (from the TorchScript module or the exported program)."""
        if self._module is not None:
            return self._module.double_model.state_dict()
        program = self.exported_programs[PROGRAM_NAMES[torch.float64]]
        return {name[len("net."):]: tensor for name, tensor in program.state_dict.items() if name.startswith("net.")}

    def eager_module(self) -> ForceFieldModule:
        """The network as an eager (non-TorchScript) module, rebuilt from the stored config.

        Needed for ``torch.compile`` in the PythonForce backend; only for networks of this
        package (:class:`CGNet`, :class:`MessagePassingNet`).
        """
        from openmm_flowmatch.forcefield.networks import network_from_config

        config = self._metadata.get("model") or {}
        try:
            network = network_from_config(config)
        except ValueError as error:
            raise ArtifactError(f"cannot rebuild an eager model from this artifact: {error}") from error
        network.load_state_dict(self.network_state_dict())
        return build_module(network, self.n_beads)

    # .......................................................................... systems
    def network_force(
        self,
        backend: Optional[str] = None,
        platform_hint: Optional[str] = None,
        python_module: Optional[nn.Module] = None,
        compile: bool = False,
        replicas: int = 1,
    ) -> Any:
        """The OpenMM force of the network term (no priors), for any number of copies.

        Parameters
        ----------
        backend
            ``"torchforce"``: ``openmmtorch.TorchForce`` holding the TorchScript module.
            ``"pythonforce"``: ``openmm.PythonForce`` calling ``python_module`` (default the
            TorchScript module, or with ``compile=True`` the ``torch.compile``d eager model).
            ``"exported"``: ``openmm.PythonForce`` calling the ``torch.export`` program (eager
            ``.module()``; no TorchScript). ``"pythontorchforce"``: openmm-torch's
            ``PythonTorchForce`` with the exported program, where openmm-torch has it.
            ``"native"``: the package's C++ OpenMM kernel for CGNet (Reference and CPU platforms;
            compiled on first use, checked against the TorchScript module at creation; see
            docs/native.md) — much faster for one or a few copies.
            ``"auto"`` (:meth:`create_system`'s default): :meth:`auto_backend` — native where the
            plugin is available, the network is one it evaluates exactly and the platform has a
            native kernel, else :meth:`default_backend`; the choice and its reason are logged.
            ``None``: :meth:`default_backend` (TorchForce where openmm-torch is installed).
            A backend that runs TorchScript under torch ≥ 2.10 issues a
            :class:`TorchScriptDeprecationWarning` (see docs/compatibility.md).
        platform_hint
            Name of the OpenMM platform the System will run on; ``"CUDA"`` switches on
            TorchForce's ``useCUDAGraphs``.
        python_module
            Module for the PythonForce backend (same signature as :attr:`module`).
        compile
            PythonForce backend only: ``torch.compile`` the eager model.
        replicas
            Number of copies the force acts on (the native backend needs it; the others take any).

        Notes
        -----
        All forces serialize with ``openmm.XmlSerializer``: TorchForce stores the TorchScript
        module itself; PythonForce pickles its :class:`TorchComputation` (the module's bytes), so
        deserializing it needs ``openmm_flowmatch`` importable, while a TorchForce System needs
        only OpenMM and openmm-torch.
        """
        if backend is not None and backend.lower() == "auto":
            return self._auto_network_force(platform_hint, python_module, compile, replicas)
        backend = self.default_backend() if backend is None else backend.lower()
        if backend not in BACKENDS:
            raise ArtifactError(f"unknown backend {backend!r}; choose one of {('auto',) + tuple(BACKENDS)}")
        uses_torchscript = backend == "torchforce" or (
            backend == "pythonforce" and python_module is None and not compile and self.has_torchscript)
        warn_if_deprecated(backend, uses_torchscript)
        if backend == "native":
            from openmm_flowmatch.native import native_network_force

            return native_network_force(self, int(replicas))
        if backend == "torchforce":
            force = self._torch_force(platform_hint)
        elif backend == "pythontorchforce":
            force_class = python_torch_force_class()
            if force_class is None:
                raise ArtifactError("the installed openmm-torch has no PythonTorchForce; use backend='exported'")
            force = force_class(self.exported_module())
        else:
            if backend == "exported":
                python_module = self.exported_module()
            elif python_module is None:
                python_module = self.eager_module() if compile else self.fresh_module()
            force = _python_force(TorchComputation(python_module, compile=compile))
        force.setUsesPeriodicBoundaryConditions(False)
        force.setName("FlowMatchNetwork")
        return force

    def auto_backend(self, platform_hint: Optional[str] = None) -> tuple[str, str]:
        """``(backend, reason)`` that ``backend="auto"`` (the default) picks for ``platform_hint``.

        ``"native"`` when :func:`openmm_flowmatch.native.native_choice` accepts this force field and
        platform, else :meth:`default_backend` (TorchForce where openmm-torch is installed).
        """
        from openmm_flowmatch.native import native_choice

        use_native, reason = native_choice(self, platform_hint)
        return ("native" if use_native else self.default_backend()), reason

    def _auto_network_force(self, platform_hint, python_module, compile, replicas) -> Any:
        """:meth:`network_force` for ``backend="auto"``: native if it is chosen and passes its check, else the default."""
        backend, reason = self.auto_backend(platform_hint)
        if backend == "native":
            from openmm_flowmatch.native import NativeBuildError, NativeMismatchError

            try:
                force = self.network_force("native", platform_hint, replicas=replicas)
                logger.info("network backend: native (%s)", reason)
                return force
            except (NativeBuildError, NativeMismatchError) as error:
                backend, reason = self.default_backend(), f"the native kernel failed: {error}"
                logger.warning("network backend: %s (%s)", backend, reason)
        else:
            logger.info("network backend: %s (native not used: %s)", backend, reason)
        return self.network_force(backend, platform_hint, python_module=python_module, compile=compile, replicas=replicas)

    def default_backend(self) -> str:
        """The backend ``"auto"`` falls back to when native is not used (see docs/compatibility.md)."""
        has_exported = self._programs is not None or (self.path is not None and companion_path(self.path).is_file())
        return choose_default_backend(has_torchscript=self.has_torchscript, has_exported=has_exported)

    def _torch_force(self, platform_hint: Optional[str]) -> Any:
        import openmmtorch

        force = openmmtorch.TorchForce(self.fresh_module())
        if platform_hint is not None and platform_hint.upper() == "CUDA":
            force.setProperty("useCUDAGraphs", "true")
        return force

    def create_system(
        self,
        cg_topology: Any,
        replicas: Optional[int] = None,
        backend: Optional[str] = None,
        platform_hint: Optional[str] = None,
        *,
        python_module: Optional[nn.Module] = None,
        compile: bool = False,
        network_force_group: int = 0,
    ) -> Any:
        """An ``openmm.System``: bead masses, prior forces and one network force.

        Parameters
        ----------
        cg_topology
            ``openmm.app.Topology`` of ``replicas`` copies of the CG molecule
            (``n_beads · replicas`` atoms, e.g. ``replicate_topology(mapping.cg_topology(), R)``).
        replicas
            Number of independent, non-interacting copies; default: atoms of the topology
            divided by the artifact's bead count. All copies go through one batched call of the
            network; the priors are added as standard forces for every copy.
        backend
            ``"auto"`` (default, also ``None``), ``"native"``, ``"torchforce"``, ``"pythonforce"``,
            ``"exported"`` or ``"pythontorchforce"``, see :meth:`network_force`. ``"auto"``: the
            native kernel where it is available and exact for this network and platform, else
            ``"torchforce"`` when openmm-torch is installed and the artifact was read from its
            ``.pt`` file, else ``"exported"`` (:meth:`auto_backend`, :meth:`default_backend`).
        platform_hint
            ``"CUDA"`` switches on CUDA graphs for TorchForce.
        python_module, compile
            PythonForce options, see :meth:`network_force`.
        network_force_group
            Force group of the network force (priors stay in group 0).

        Raises
        ------
        ArtifactError
            If the topology's atom count is not ``n_beads × replicas``.
        """
        from openmm_flowmatch.system import build_cg_system

        n_atoms = cg_topology.getNumAtoms()
        n_beads = self.n_beads
        if replicas is None:
            if n_atoms % n_beads != 0 or n_atoms == 0:
                raise ArtifactError(self._count_message(n_atoms, "a multiple of"))
            replicas = n_atoms // n_beads
        replicas = int(replicas)
        if replicas < 1:
            raise ArtifactError(f"replicas must be >= 1, got {replicas}")
        if n_atoms != n_beads * replicas:
            raise ArtifactError(self._count_message(n_atoms, f"{replicas} replicas ×"))
        self._check_copies(cg_topology, replicas)
        self._check_names(cg_topology)
        system = build_cg_system(cg_topology, None, np.tile(self.masses, replicas))
        priors = self.priors
        if priors is not None:
            for force in replicate_forces(priors.to_openmm_forces(), n_beads, replicas):
                force.setForceGroup(0)
                system.addForce(force)
        force = self.network_force(
            backend or "auto", platform_hint, python_module=python_module, compile=compile, replicas=replicas
        )
        force.setForceGroup(int(network_force_group))
        system.addForce(force)
        return system

    def _count_message(self, n_atoms: int, how: str) -> str:
        where = f" ({self.path})" if self.path is not None else ""
        return (
            f"the CG topology has {n_atoms} atoms but the force field{where} is for {self.n_beads} beads "
            f"({', '.join(self._metadata['bead_names'])}); the topology must hold {how} {self.n_beads} beads — "
            "build it with the artifact's mapping (FlowMatchForceField.mapping.cg_topology()) and "
            "openmm_flowmatch.export.replicate_topology for several copies"
        )

    def _check_copies(self, cg_topology: Any, replicas: int) -> None:
        """Refuse a topology whose chains or bonds join atoms of two copies: one molecule of another
        bead count (e.g. a 10-bead Cα chain given to a 5-bead force field), not ``replicas`` copies."""
        if replicas == 1:
            return
        n_beads = self.n_beads
        crossing = [a for a, b in cg_topology.bonds() if a.index // n_beads != b.index // n_beads]
        for chain in cg_topology.chains():
            atoms = list(chain.atoms())
            copies = {atom.index // n_beads for atom in atoms}
            if len(copies) > 1 or any(atom.residue.chain is chain for atom in crossing):
                residues = " ".join(residue.name for residue in chain.residues())
                where = f" ({self.path})" if self.path is not None else ""
                raise ArtifactError(
                    f"the CG topology is one molecule of {len(atoms)} beads in chain {chain.id} ({residues}), not "
                    f"{replicas} copies of the force field's {n_beads} beads{where} "
                    f"({' '.join(self._metadata.get('residue_names') or [])}); its CG map does not match this "
                    "force field: build the topology with the artifact's mapping "
                    "(FlowMatchForceField.mapping.cg_topology()) and replicate_topology for several copies"
                )

    def _check_names(self, cg_topology: Any) -> None:
        names = self._metadata.get("bead_names") or []
        atoms = list(cg_topology.atoms())
        for index, atom in enumerate(atoms[: len(names)]):
            if atom.name != names[index]:
                logger.warning(
                    "bead %d of the topology is named %s but the force field expects %s; check the bead order",
                    index,
                    atom.name,
                    names[index],
                )
                return
