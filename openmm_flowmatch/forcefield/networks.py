"""Coarse-grained neural network energies U_net(x).

Two TorchScript-scriptable networks map bead positions ``(batch, n_beads, 3)`` (nm) to energies
``(batch,)`` in kJ/mol:

- :class:`CGNet`, the CGnet-style residual MLP on z-scored invariant features (the paper's
  default: width 160; alanine dipeptide 5 layers tanh, Lipschitz bound 4; proteins 8 layers SiLU,
  bound 10);
- :class:`MessagePassingNet`, a SchNet-like continuous-filter network over all bead pairs with a
  learned embedding per bead type, plus a small head on signed dihedrals that keeps chirality.

The Lipschitz bound follows CGnet: after every optimiser step the trainer calls
:meth:`project_lipschitz`, which rescales each weight matrix W to W / max(1, σ(W)/bound)
(σ the largest singular value). The weights themselves then satisfy the bound, so the scripted
and exported module is a plain MLP with no spectral-norm parametrisation inside.

Both networks also accept a single configuration ``(n_beads, 3)`` and then return a 0-d energy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .features import FeatureError, InvariantFeatures, _dihedral_quadruples, _validated_bonds

__all__ = [
    "CGNet", "MessagePassingNet", "network_from_config", "save_network", "load_network", "NetworkFileError",
    "ACTIVATIONS",
]

NETWORK_FILE_KIND = "openmm_flowmatch.network"
"""The ``kind`` entry of a network file written by :func:`save_network`."""


class NetworkFileError(ValueError):
    """A network file that cannot be written or read (missing, unreadable, or of another kind)."""

ACTIVATIONS = {"tanh": nn.Tanh, "silu": nn.SiLU, "softplus": nn.Softplus, "relu": nn.ReLU}
"""Activation functions by name (``relu`` is offered but gives discontinuous forces)."""


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name.lower()]()
    except KeyError:
        raise FeatureError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


@torch.no_grad()
def _project_linear_layers(module: nn.Module, bound: float) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            sigma = torch.linalg.matrix_norm(layer.weight.double(), ord=2)
            scale = float(max(1.0, float(sigma) / bound))
            if scale > 1.0:
                layer.weight.div_(scale)


class ResidualBlock(nn.Module):
    """``h + activation(W h + b)`` at constant width."""

    def __init__(self, width: int, activation: str) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.activation = _activation(activation)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + self.activation(self.linear(hidden))


class CGNet(nn.Module):
    """CGnet-style residual MLP energy on invariant features.

    Parameters
    ----------
    features
        The (standardised) feature module, see :class:`InvariantFeatures`.
    hidden_width
        Width of the hidden layers (paper: 160).
    n_layers
        Number of hidden layers: one input layer features → width, then ``n_layers − 1``
        residual layers (paper: 5 for alanine dipeptide, 8 for proteins).
    activation
        ``"tanh"`` (alanine dipeptide) or ``"silu"`` (proteins), or another key of ``ACTIVATIONS``.
    lipschitz_bound
        Bound on the spectral norm of every weight matrix, enforced by :meth:`project_lipschitz`
        after each optimiser step (paper: 4 for alanine dipeptide, 10 for proteins); ``None``
        for no bound.

    Energies are in kJ/mol.
    """

    def __init__(
        self,
        features: InvariantFeatures,
        hidden_width: int = 160,
        n_layers: int = 5,
        activation: str = "tanh",
        lipschitz_bound: Optional[float] = None,
    ) -> None:
        super().__init__()
        if n_layers < 1 or hidden_width < 1:
            raise FeatureError(f"CGNet needs n_layers >= 1 and hidden_width >= 1, got {n_layers}, {hidden_width}")
        if lipschitz_bound is not None and not lipschitz_bound > 0:
            raise FeatureError(f"lipschitz_bound must be positive or None, got {lipschitz_bound}")
        self.features = features
        self.n_beads = features.n_beads
        self.hidden_width = int(hidden_width)
        self.n_layers = int(n_layers)
        self.activation_name = str(activation)
        self.lipschitz_bound = 0.0 if lipschitz_bound is None else float(lipschitz_bound)
        self.input_layer = nn.Linear(features.n_features, hidden_width)
        self.input_activation = _activation(activation)
        self.residual_layers = nn.Sequential(*[ResidualBlock(hidden_width, activation) for _ in range(n_layers - 1)])
        self.output_layer = nn.Linear(hidden_width, 1)
        self.project_lipschitz()

    @torch.jit.unused
    def project_lipschitz(self) -> None:
        """Rescale every weight matrix to spectral norm ≤ ``lipschitz_bound`` (no-op without a bound)."""
        if self.lipschitz_bound > 0:
            _project_linear_layers(self, self.lipschitz_bound)

    @torch.jit.unused
    def config(self) -> dict[str, Any]:
        """JSON-able description from which :func:`network_from_config` rebuilds the network."""
        return {
            "class": "CGNet",
            "features": self.features.config(),
            "hidden_width": self.hidden_width,
            "n_layers": self.n_layers,
            "activation": self.activation_name,
            "lipschitz_bound": self.lipschitz_bound if self.lipschitz_bound > 0 else None,
        }

    def forward(self, positions: Tensor) -> Tensor:
        """Energy in kJ/mol: ``(batch,)`` for ``(batch, n_beads, 3)``, 0-d for ``(n_beads, 3)``."""
        if positions.dim() < 2 or positions.dim() > 3 or positions.size(-2) != self.n_beads or positions.size(-1) != 3:
            raise ValueError("CGNet: positions must have shape (n_beads, 3) or (batch, n_beads, 3)")
        features = self.features.standardized(positions.reshape(-1, self.n_beads, 3))
        hidden = self.input_activation(self.input_layer(features))
        hidden = self.residual_layers(hidden)
        energy = self.output_layer(hidden)
        # reshape only the output (see InvariantFeatures.forward)
        shape: List[int] = list(positions.shape[:-2])
        return energy.reshape(shape)


class MessagePassingNet(nn.Module):
    """SchNet-like message passing over all bead pairs, plus a signed-dihedral head for chirality.

    Parameters
    ----------
    bead_types
        Integer type of every bead (e.g. amino-acid index per Cα bead), length ``n_beads``.
    n_bead_types
        Size of the embedding table; default ``max(bead_types) + 1``.
    bonds
        CG bond graph (for the dihedrals of the chirality head); default a linear chain.
    hidden_width
        Width of embeddings, filters and updates.
    n_interactions
        Number of message-passing (interaction) blocks.
    n_radial
        Number of Gaussian radial basis functions, centred evenly on [0, ``radial_max``] nm.
    radial_max
        Largest radial-basis centre in nm.
    cutoff
        Smooth cosine cutoff in nm applied to the filters, or ``None`` for no cutoff (all pairs).
    activation
        Activation name, see ``ACTIVATIONS`` (default SiLU).
    chirality_head
        Add an MLP on (cos φ, sin φ) of the bonded dihedrals, which makes the energy sensitive
        to mirror images (the pair distances alone are not). On by default.
    lipschitz_bound
        Optional spectral-norm bound, applied like in :class:`CGNet`.
    """

    def __init__(
        self,
        bead_types: Sequence[int],
        n_bead_types: Optional[int] = None,
        bonds: Optional[Sequence[Sequence[int]]] = None,
        hidden_width: int = 64,
        n_interactions: int = 3,
        n_radial: int = 32,
        radial_max: float = 1.5,
        cutoff: Optional[float] = None,
        activation: str = "silu",
        chirality_head: bool = True,
        lipschitz_bound: Optional[float] = None,
    ) -> None:
        super().__init__()
        types = [int(value) for value in bead_types]
        n_beads = len(types)
        if n_beads < 2 or min(types) < 0:
            raise FeatureError("bead_types needs at least two non-negative integers")
        self.n_beads = n_beads
        self.bead_type_list = types
        self.n_bead_types = int(n_bead_types) if n_bead_types is not None else max(types) + 1
        if max(types) >= self.n_bead_types:
            raise FeatureError(f"bead type {max(types)} exceeds n_bead_types={self.n_bead_types}")
        self.hidden_width = int(hidden_width)
        self.n_interactions = int(n_interactions)
        self.n_radial = int(n_radial)
        self.radial_max = float(radial_max)
        self.cutoff = 0.0 if cutoff is None else float(cutoff)
        self.activation_name = str(activation)
        self.lipschitz_bound = 0.0 if lipschitz_bound is None else float(lipschitz_bound)
        self.register_buffer("bead_types", torch.tensor(types, dtype=torch.long))
        first, second = zip(*[(i, j) for i in range(n_beads) for j in range(n_beads) if i != j])
        self.register_buffer("receivers", torch.tensor(first, dtype=torch.long))
        self.register_buffer("senders", torch.tensor(second, dtype=torch.long))
        self.register_buffer("radial_centres", torch.linspace(0.0, radial_max, n_radial, dtype=torch.float32))
        spacing = radial_max / max(n_radial - 1, 1)
        self.radial_gamma = 1.0 / (2.0 * spacing * spacing)
        self.embedding = nn.Embedding(self.n_bead_types, hidden_width)
        self.filters = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(n_radial, hidden_width), _activation(activation), nn.Linear(hidden_width, hidden_width))
                for _ in range(n_interactions)
            ]
        )
        self.inputs = nn.ModuleList([nn.Linear(hidden_width, hidden_width, bias=False) for _ in range(n_interactions)])
        self.updates = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(hidden_width, hidden_width), _activation(activation), nn.Linear(hidden_width, hidden_width))
                for _ in range(n_interactions)
            ]
        )
        self.readout = nn.Sequential(
            nn.Linear(hidden_width, hidden_width // 2 or 1), _activation(activation), nn.Linear(hidden_width // 2 or 1, 1)
        )
        self.bonds_config = None if bonds is None else [[int(bond[0]), int(bond[1])] for bond in bonds]
        has_dihedrals = chirality_head and len(_dihedral_quadruples(n_beads, _validated_bonds(n_beads, bonds))) > 0
        # dihedral (cos, sin) only, unstandardised (they are bounded already)
        self.dihedral_features = (
            InvariantFeatures(n_beads, bonds=bonds, include_bonds=False, include_angles=False, include_distances=False)
            if has_dihedrals
            else None
        )
        self.use_chirality_head = self.dihedral_features is not None
        n_dihedral_features = self.dihedral_features.n_features if self.dihedral_features is not None else 1
        self.chirality_mlp = nn.Sequential(
            nn.Linear(n_dihedral_features, hidden_width), _activation(activation), nn.Linear(hidden_width, 1)
        )
        self.project_lipschitz()

    @torch.jit.unused
    def project_lipschitz(self) -> None:
        """Rescale every weight matrix to spectral norm ≤ ``lipschitz_bound`` (no-op without a bound)."""
        if self.lipschitz_bound > 0:
            _project_linear_layers(self, self.lipschitz_bound)

    @torch.jit.unused
    def config(self) -> dict[str, Any]:
        """JSON-able description from which :func:`network_from_config` rebuilds the network."""
        return {
            "class": "MessagePassingNet",
            "bead_types": self.bead_type_list,
            "n_bead_types": self.n_bead_types,
            "bonds": self.bonds_config,
            "hidden_width": self.hidden_width,
            "n_interactions": self.n_interactions,
            "n_radial": self.n_radial,
            "radial_max": self.radial_max,
            "cutoff": self.cutoff if self.cutoff > 0 else None,
            "activation": self.activation_name,
            "chirality_head": self.use_chirality_head,
            "lipschitz_bound": self.lipschitz_bound if self.lipschitz_bound > 0 else None,
        }

    def forward(self, positions: Tensor) -> Tensor:
        """Energy in kJ/mol: ``(batch,)`` for ``(batch, n_beads, 3)``, 0-d for ``(n_beads, 3)``."""
        if positions.dim() < 2 or positions.dim() > 3 or positions.size(-2) != self.n_beads or positions.size(-1) != 3:
            raise ValueError("MessagePassingNet: positions must have shape (n_beads, 3) or (batch, n_beads, 3)")
        batch = positions.reshape(-1, self.n_beads, 3)
        n_frames = batch.shape[0]
        vectors = batch[:, self.senders] - batch[:, self.receivers]
        distances = torch.linalg.vector_norm(vectors, dim=-1)
        centres = self.radial_centres.to(batch.dtype)
        radial = torch.exp(-self.radial_gamma * (distances.unsqueeze(-1) - centres) ** 2)
        if self.cutoff > 0:
            envelope = 0.5 * (torch.cos(distances * (math.pi / self.cutoff)) + 1.0)
            envelope = envelope * (distances < self.cutoff).to(batch.dtype)
        else:
            envelope = torch.ones_like(distances)
        hidden = self.embedding(self.bead_types).to(batch.dtype).unsqueeze(0).expand(n_frames, -1, -1)
        for filter_network, input_layer, update in zip(self.filters, self.inputs, self.updates):
            filters = filter_network(radial) * envelope.unsqueeze(-1)
            messages = filters * input_layer(hidden)[:, self.senders]
            aggregated = torch.zeros_like(hidden).index_add(1, self.receivers, messages)
            hidden = hidden + update(aggregated)
        energy = self.readout(hidden).squeeze(-1).sum(-1)
        if self.dihedral_features is not None:
            energy = energy + self.chirality_mlp(self.dihedral_features.standardized(batch)).squeeze(-1)
        # reshape rather than branch on the input rank (see InvariantFeatures.forward)
        shape: List[int] = list(positions.shape[:-2])
        return energy.reshape(shape)


def network_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild an untrained :class:`CGNet` or :class:`MessagePassingNet` from its ``config()``.

    The parameters and standardisation buffers are then loaded with ``load_state_dict``.
    """
    config = dict(config)
    name = config.pop("class", None)
    if name == "CGNet":
        features = InvariantFeatures(**config.pop("features"))
        return CGNet(features, **config)
    if name == "MessagePassingNet":
        return MessagePassingNet(**config)
    raise FeatureError(f"unknown network class {name!r} in the network config (expected CGNet or MessagePassingNet)")


def save_network(model: nn.Module, path: str | Path) -> Path:
    """Save a trained CG network (config, weights, training info) to ``path`` (``torch.save``).

    Raises
    ------
    NetworkFileError
        If the model has no ``config()`` (it is not a network of this package).
    """
    if not hasattr(model, "config"):
        raise NetworkFileError(f"{type(model).__name__} has no config(); only networks of openmm_flowmatch can be saved")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "kind": NETWORK_FILE_KIND,
            "config": model.config(),
            "state_dict": model.state_dict(),
            "training_info": getattr(model, "training_info", None),
        },
        path,
    )
    return path


def load_network(path: str | Path) -> nn.Module:
    """Read a network written by :func:`save_network` (in eval mode, ``training_info`` restored).

    Raises
    ------
    NetworkFileError
        If the file is missing, unreadable or not a network file.
    """
    path = Path(path)
    if not path.exists():
        raise NetworkFileError(f"{path}: no such network file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for unreadable files
        raise NetworkFileError(f"{path}: not a network file written by openmm-flowmatch train-ff ({error})") from error
    if not isinstance(content, dict) or content.get("kind") != NETWORK_FILE_KIND:
        raise NetworkFileError(f"{path}: not a network file written by openmm-flowmatch train-ff")
    model = network_from_config(content["config"])
    model.load_state_dict(content["state_dict"])
    model.training_info = content.get("training_info") or {}
    return model.eval()
