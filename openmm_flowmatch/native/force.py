"""The CGNet of a force-field artifact as a native OpenMM force (``CGNetForce``, C++).

:func:`network_parameters` reads the weights, standardisation and feature index tables from the
artifact's TorchScript module (refusing networks the C++ kernel cannot evaluate exactly),
:func:`force_xml` writes them as the XML of a ``CGNetForce`` (weights as base64 float64, so they
are exact), and :func:`native_network_force` turns that into an ``openmm.Force`` through
``openmm.XmlSerializer`` (the plugin's serialization proxy creates the C++ object; no SWIG
wrapper is needed), then checks its energies and forces against the TorchScript module.
"""

from __future__ import annotations

import base64
import copy
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence
from xml.sax.saxutils import quoteattr

import numpy as np
import torch

__all__ = [
    "CHECK_TOLERANCE",
    "NativeMismatchError",
    "SUPPORTED_ACTIVATIONS",
    "UnsupportedNetworkError",
    "check_native_force",
    "force_xml",
    "native_network_force",
    "network_parameters",
    "check_configurations",
]

SUPPORTED_ACTIVATIONS = {"Tanh": "tanh", "SiLU": "silu", "Softplus": "softplus"}
"""torch.nn activation classes the kernel evaluates exactly (Softplus only with beta=1, threshold=20)."""

CHECK_TOLERANCE = 1e-10
"""Largest relative difference between native and TorchScript (float64) energies and forces at creation.

Energy: ``|E_native − E_torch| ≤ tol · max(|E_torch|, 1 kJ/mol)``; forces:
``max |F_native − F_torch| ≤ tol · max(max |F_torch|, 1 kJ/mol/nm)``.
"""


class UnsupportedNetworkError(ValueError):
    """The artifact's network is not one the native kernel evaluates exactly (use TorchForce)."""


class NativeMismatchError(RuntimeError):
    """Native energies or forces differ from the TorchScript module beyond :data:`CHECK_TOLERANCE`."""


_REMEDY = "use the TorchForce backend (create_system(backend='torchforce')) for this model"


def _class_name(module: Any) -> str:
    name = getattr(module, "original_name", None)  # ScriptModule: the Python class name
    return str(name) if name else type(module).__name__


def _network_of(force_field: Any) -> tuple[Any, dict]:
    """The float64 network module (scripted or eager) and the stored model config."""
    if isinstance(force_field, (str, os.PathLike)):
        from openmm_flowmatch.export import FlowMatchForceField

        force_field = FlowMatchForceField.load(force_field)
    module = force_field.module if hasattr(force_field, "module") else force_field
    config = (force_field.metadata.get("model") or {}) if hasattr(force_field, "metadata") else {}
    network = getattr(module, "double_model", None)
    if network is None:
        raise UnsupportedNetworkError(
            f"the force field's module ({_class_name(module)}) is not an openmm_flowmatch ForceFieldModule with a "
            f"double_model; {_REMEDY}"
        )
    return network, config


def network_parameters(force_field: Any) -> dict:
    """Weights, standardisation and feature tables of the artifact's CGNet, in float64 / int.

    Parameters
    ----------
    force_field
        A :class:`~openmm_flowmatch.export.FlowMatchForceField` (or the path of an artifact).

    Returns
    -------
    dict
        ``n_beads``, ``activation`` (``"tanh"``, ``"silu"`` or ``"softplus"``), ``bonds``,
        ``angles``, ``dihedrals``, ``pairs`` (int arrays ``(k, 2|3|4)``), ``mean``, ``std``
        (feature standardisation) and ``layers``: list of ``(weight (out, in), bias (out,))``,
        input layer first, then the residual layers, then the output layer.

    Raises
    ------
    UnsupportedNetworkError
        For a :class:`MessagePassingNet` or any other non-CGNet module, an activation the kernel
        does not implement (ReLU, unknown ones, Softplus with non-default beta/threshold), or a
        CGNet whose parameters are not exactly the expected set.
    """
    network, config = _network_of(force_field)
    kind = _class_name(network)
    if kind != "CGNet" or (config.get("class") not in (None, "CGNet")):
        what = config.get("class") or kind
        raise UnsupportedNetworkError(
            f"the native kernel evaluates only CGNet (residual MLP on invariant features); this force field holds "
            f"a {what}; {_REMEDY}"
        )
    activation = _checked_activation(network, config)
    state, n_residual = _checked_state(network)

    def table(key: str, width: int) -> np.ndarray:
        return state[key].to(torch.long).numpy().reshape(-1, width).astype(np.int64)

    def array(key: str) -> np.ndarray:
        return state[key].to(torch.float64).numpy().copy()

    layers = [(array("input_layer.weight"), array("input_layer.bias"))]
    layers += [
        (array(f"residual_layers.{i}.linear.weight"), array(f"residual_layers.{i}.linear.bias")) for i in range(n_residual)
    ]
    layers.append((array("output_layer.weight"), array("output_layer.bias")))
    parameters = {
        "n_beads": int(network.n_beads),
        "activation": activation,
        "bonds": table("features.bond_index", 2),
        "angles": table("features.angle_index", 3),
        "dihedrals": table("features.dihedral_index", 4),
        "pairs": table("features.pair_index", 2),
        "mean": array("features.mean"),
        "std": array("features.std"),
        "layers": layers,
    }
    _check_shapes(parameters)
    return parameters


def _checked_activation(network: Any, config: dict) -> str:
    """The kernel's name of the CGNet's one activation (:class:`UnsupportedNetworkError` otherwise)."""
    activation_modules = [network.input_activation] + [block.activation for block in network.residual_layers.children()]
    names = {_class_name(module) for module in activation_modules}
    if len(names) != 1 or next(iter(names)) not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedNetworkError(
            f"the native kernel supports the activations {sorted(SUPPORTED_ACTIVATIONS.values())}; this CGNet uses "
            f"{sorted(names)}; {_REMEDY}"
        )
    activation_class = next(iter(names))
    if activation_class == "Softplus":
        for module in activation_modules:
            if float(module.beta) != 1.0 or float(module.threshold) != 20.0:
                raise UnsupportedNetworkError(
                    f"the native kernel evaluates Softplus(beta=1, threshold=20) only, not beta={module.beta}, "
                    f"threshold={module.threshold}; {_REMEDY}"
                )
    activation = SUPPORTED_ACTIVATIONS[activation_class]
    if config.get("activation") is not None and str(config["activation"]).lower() != activation:
        raise UnsupportedNetworkError(
            f"the artifact's metadata names activation {config['activation']!r} but its module uses {activation_class}; "
            "re-export the model"
        )
    return activation


def _checked_state(network: Any) -> tuple[dict, int]:
    """The CGNet's state (on the CPU) and its number of residual layers, checked to hold exactly the
    parameters and buffers the kernel knows (the Lipschitz projection's warm-start vectors aside)."""
    state = {key: value.detach().cpu() for key, value in network.state_dict().items()}
    n_residual = len(list(network.residual_layers.children()))
    expected = {
        "features.bond_index", "features.angle_index", "features.dihedral_index", "features.pair_index",
        "features.vector_index", "features.mean", "features.std",
        "input_layer.weight", "input_layer.bias", "output_layer.weight", "output_layer.bias",
    } | {f"residual_layers.{i}.linear.{part}" for i in range(n_residual) for part in ("weight", "bias")}
    # warm-start vectors of the Lipschitz projection's power iteration: training state, not used by forward
    ignored = {key for key in state if key.endswith(("._lipschitz_left_vector", "._lipschitz_right_vector"))}
    extra = set(state) - expected - ignored
    missing = expected - set(state)
    if extra or missing:
        raise UnsupportedNetworkError(
            f"this CGNet's parameters differ from the layout the native kernel knows "
            f"(unexpected: {sorted(extra)}, missing: {sorted(missing)}); {_REMEDY}"
        )
    return state, n_residual


def _check_shapes(parameters: dict) -> None:
    """The layer and standardisation shapes must fit the number of features the tables give."""
    n_features = (
        len(parameters["bonds"]) + len(parameters["angles"]) + 2 * len(parameters["dihedrals"]) + len(parameters["pairs"])
    )
    layers = parameters["layers"]
    width = layers[0][0].shape[0]
    shapes_ok = layers[0][0].shape == (width, n_features) and layers[-1][0].shape == (1, width)
    shapes_ok = shapes_ok and all(weight.shape == (width, width) for weight, _ in layers[1:-1])
    if not shapes_ok or parameters["mean"].shape != (n_features,) or parameters["std"].shape != (n_features,):
        raise UnsupportedNetworkError(f"this CGNet's layer shapes are inconsistent with its {n_features} features; {_REMEDY}")


def _b64(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f8").tobytes()).decode("ascii")


def _ints(values: np.ndarray) -> str:
    return " ".join(str(int(value)) for value in np.asarray(values).reshape(-1))


def force_xml(parameters: dict, replicas: int, name: str = "FlowMatchNetwork", force_group: int = 0) -> str:
    """The ``XmlSerializer`` text of a ``CGNetForce`` (serialization version 1) for ``replicas`` copies."""
    attributes = {
        "type": "CGNetForce",
        "version": "1",
        "forceGroup": str(int(force_group)),
        "name": name,
        "replicas": str(int(replicas)),
        "beads": str(int(parameters["n_beads"])),
        "activation": parameters["activation"],
        "bonds": _ints(parameters["bonds"]),
        "angles": _ints(parameters["angles"]),
        "dihedrals": _ints(parameters["dihedrals"]),
        "pairs": _ints(parameters["pairs"]),
        "features": str(len(parameters["mean"])),
        "mean": _b64(parameters["mean"]),
        "std": _b64(parameters["std"]),
    }
    head = "<Force " + " ".join(f"{key}={quoteattr(value)}" for key, value in attributes.items()) + ">"
    layers = [
        f'<Layer rows="{weight.shape[0]}" cols="{weight.shape[1]}" weight="{_b64(weight)}" bias="{_b64(bias)}"/>'
        for weight, bias in parameters["layers"]
    ]
    return "\n".join([head, "<Layers>", *layers, "</Layers>", "</Force>"]) + "\n"


def check_configurations(n_beads: int, replicas: int, n_configurations: int = 3, bond_length: float = 0.15,
                        seed: int = 20240917) -> np.ndarray:
    """Random-walk chains ``(n_configurations, replicas·n_beads, 3)`` nm, deterministic (for the creation check)."""
    generator = np.random.default_rng(seed)
    steps = generator.normal(size=(n_configurations, replicas, n_beads, 3))
    steps /= np.linalg.norm(steps, axis=-1, keepdims=True)
    steps *= bond_length * generator.uniform(0.8, 1.2, size=steps.shape[:-1])[..., None]
    steps[:, :, 0] = generator.uniform(-1.0, 1.0, size=(n_configurations, replicas, 3))  # copies spread out
    return np.cumsum(steps, axis=2).reshape(n_configurations, replicas * n_beads, 3)




def _torch_energy_and_forces(module: Any, positions: np.ndarray) -> tuple[float, np.ndarray]:
    x = torch.tensor(positions, dtype=torch.float64, requires_grad=True)
    energy = module(x)
    (gradient,) = torch.autograd.grad(energy, x)
    return float(energy.detach()), -gradient.numpy()


def check_native_force(
    force: Any,
    force_field: Any,
    replicas: int,
    configurations: Optional[np.ndarray] = None,
    platforms: Sequence[str] = ("Reference",),
    tolerance: float = CHECK_TOLERANCE,
) -> dict:
    """Compare a native force with the artifact's TorchScript module (float64 autograd).

    Returns the largest relative energy and force differences found; raises
    :class:`NativeMismatchError` when one exceeds ``tolerance`` (see :data:`CHECK_TOLERANCE`).
    """
    n_beads = int(force_field.n_beads)
    if configurations is None:
        configurations = check_configurations(n_beads, replicas)
    module = force_field.fresh_module() if hasattr(force_field, "fresh_module") else force_field.module
    worst = {"energy": 0.0, "forces": 0.0}
    for platform_name in platforms:
        for positions, (energy, forces) in zip(configurations, force_energies_and_forces(
                force, n_beads * replicas, platform_name, configurations)):
            expected_energy, expected_forces = _torch_energy_and_forces(module, positions)
            energy_error = abs(energy - expected_energy) / max(abs(expected_energy), 1.0)
            force_error = float(np.max(np.abs(np.asarray(forces) - expected_forces))) / max(
                float(np.max(np.abs(expected_forces))), 1.0
            )
            worst["energy"] = max(worst["energy"], energy_error)
            worst["forces"] = max(worst["forces"], force_error)
            if not (energy_error <= tolerance and force_error <= tolerance):
                raise NativeMismatchError(
                    f"the native CGNet force differs from the TorchScript module on the {platform_name} platform: "
                    f"energy {energy!r} vs {expected_energy!r} kJ/mol (relative {energy_error:.3g}), largest force "
                    f"difference {force_error:.3g} relative (tolerance {tolerance:g}); {_REMEDY} and report this"
                )
    return worst


def force_energies_and_forces(force: Any, n_particles: int, platform_name: str,
                              configurations: Sequence[np.ndarray]) -> Iterator[tuple[float, np.ndarray]]:
    """Energy (kJ/mol) and forces (kJ/mol/nm) of ``force`` alone (a copy, in a System of ``n_particles``)
    at each configuration (nm) on one OpenMM platform."""
    import openmm

    system = openmm.System()
    for _ in range(n_particles):
        system.addParticle(1.0)
    duplicate = copy.deepcopy(force)
    duplicate.setForceGroup(0)
    system.addForce(duplicate)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform_name))
    try:
        for positions in configurations:
            context.setPositions(positions)
            state = context.getState(getEnergy=True, getForces=True)
            yield (state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole),
                   np.asarray(state.getForces(asNumpy=True).value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer)))
    finally:
        del context


def native_network_force(force_field: Any, replicas: int, *, check: bool = True, name: str = "FlowMatchNetwork",
                         check_platforms: Sequence[str] = ("Reference",)) -> Any:
    """The artifact's CGNet as a native ``openmm.Force`` (a ``CGNetForce``) for ``replicas`` copies.

    Particles ``r·n_beads … (r+1)·n_beads − 1`` are copy ``r`` (the layout of
    :meth:`FlowMatchForceField.create_system`); the energy is the sum over copies, like the
    artifact's TorchScript module. Builds and loads the plugin on first use
    (:func:`~openmm_flowmatch.native.load_native_plugin`).

    Parameters
    ----------
    force_field
        A :class:`~openmm_flowmatch.export.FlowMatchForceField` (or an artifact path).
    replicas
        Number of copies (``≥ 1``).
    check
        Compare energy and forces with the TorchScript module (float64 autograd) on three
        random-walk configurations before returning (default on; see :data:`CHECK_TOLERANCE`).
    name
        ``Force.getName()`` of the result.
    check_platforms
        OpenMM platforms on which the check runs.

    Returns
    -------
    openmm.Force
        Usable with ``System.addForce``, ``XmlSerializer`` and ``copy.deepcopy``; deserializing a
        System that holds it needs the plugin loaded first (``load_native_plugin()``).

    Raises
    ------
    UnsupportedNetworkError
        For networks the kernel does not evaluate (see :func:`network_parameters`).
    NativeBuildError
        When the plugin cannot be compiled (no C++ compiler …).
    NativeMismatchError
        When the check fails.
    """
    from . import load_native_plugin

    replicas = int(replicas)
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if isinstance(force_field, (str, os.PathLike)):
        from openmm_flowmatch.export import FlowMatchForceField

        force_field = FlowMatchForceField.load(Path(force_field))
    parameters = network_parameters(force_field)
    load_native_plugin()
    import openmm

    force = openmm.XmlSerializer.deserialize(force_xml(parameters, replicas, name=name))
    if check:
        check_native_force(force, force_field, replicas, platforms=check_platforms)
    return force
