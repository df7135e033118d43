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
(σ the largest singular value: exact for a weight with a short side, else estimated by a power
iteration warm-started from the previous step's singular vectors, with the exact value as
fallback when it has not converged). The weights themselves then satisfy the bound, so the
scripted and exported module is a plain MLP with no spectral-norm parametrisation inside.

Both networks also accept a single configuration ``(n_beads, 3)`` and then return a 0-d energy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .features import FeatureError, InvariantFeatures, _dihedral_quadruples, _validated_bonds

__all__ = [
    "CGNet", "MessagePassingNet", "network_from_config", "save_network", "load_network", "NetworkFileError",
    "ACTIVATIONS", "power_iteration_spectral_norm", "power_iteration_tolerance", "exact_spectral_norm", "largest_singular_value",
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


POWER_ITERATION_TOLERANCE: float = 1e-9
"""Relative change of the largest-singular-value estimate between two power iterations below
which the estimate of a float64 weight counts as converged (the estimate is then within about
half of it of the exact value: ≤ 4.3e-10 relative over 300 training steps of the alanine-dipeptide
CGNet, see tests/test_networks.py); for weights of a coarser dtype the
tolerance is that dtype's machine epsilon (see :func:`power_iteration_tolerance`)."""


def power_iteration_tolerance(dtype: torch.dtype) -> float:
    """The power-iteration tolerance for weights of ``dtype``: ``POWER_ITERATION_TOLERANCE`` or the
    dtype's machine epsilon, whichever is larger.

    The converged estimate is then within about half an epsilon of the exact norm (float32:
    ≤ 4.7e-8 relative over 300 training steps), so a projected weight equals the exactly
    projected one up to the rounding of its own dtype; a tighter tolerance only costs iterations
    (float32, the training-speed benchmark's first 200 steps: 4.5 iterations per step on average
    instead of 7.1 at 1e-9).
    """
    return max(POWER_ITERATION_TOLERANCE, float(torch.finfo(dtype).eps))


POWER_ITERATION_MAX_STEPS: int = 50
"""Power iterations per projection before the layers not yet converged fall back to the exact norm."""

EXACT_NORM_MAX_SIDE: int = 64
"""Weights with a side this short or shorter always get the exact norm (a tiny eigenproblem, see
:func:`largest_singular_value`), and no power iteration."""

_RIGHT_VECTOR = "_lipschitz_right_vector"


def exact_spectral_norm(weight: Tensor) -> tuple[float, Tensor, Tensor]:
    """Largest singular value of ``weight`` ``(out, in)`` and its unit singular vectors, exactly.

    Uses the float64 eigendecomposition of the Gram matrix of the shorter side (for the largest
    singular value as accurate as an SVD, and cheaper).

    Returns
    -------
    tuple
        ``(sigma, left (out,), right (in,))``, the vectors in float64.
    """
    matrix = weight.detach().double()
    transposed = matrix.shape[0] < matrix.shape[1]
    if transposed:
        matrix = matrix.t()
    values, vectors = torch.linalg.eigh(matrix.t() @ matrix)
    sigma = math.sqrt(max(float(values[-1]), 0.0))
    right = vectors[:, -1].contiguous()
    left = matrix.mv(right) / max(sigma, 1e-300)
    return (sigma, right, left) if transposed else (sigma, left, right)


def largest_singular_value(weight: Tensor) -> float:
    """Largest singular value of ``weight`` ``(out, in)``, exactly, without singular vectors.

    The norm for a vector (a side of 1), else the square root of the largest eigenvalue of the
    float64 Gram matrix of the shorter side (as accurate as an SVD for the largest singular
    value, and for a short side much cheaper than either).
    """
    matrix = weight.detach().to(torch.float64)
    if min(matrix.shape) == 1:
        return float(torch.linalg.vector_norm(matrix))
    gram = matrix @ matrix.t() if matrix.shape[0] < matrix.shape[1] else matrix.t() @ matrix
    return math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))


def power_iteration_spectral_norm(
    weight: Tensor,
    left: Optional[Tensor],
    right: Tensor,
    max_iterations: int = POWER_ITERATION_MAX_STEPS,
    tolerance: float = POWER_ITERATION_TOLERANCE,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Estimate the largest singular value of one or several matrices by warm-started power iteration.

    Parameters
    ----------
    weight
        Matrix ``(out, in)`` or a stack ``(k, out, in)``; the iteration runs in float64.
    left, right
        Current estimates of the leading left ``(…, out)`` and right ``(…, in)`` singular
        vectors (the warm start; need not be normalised). Only ``right`` is used (the first
        iteration replaces ``left``); ``left`` may be ``None``.
    max_iterations
        Upper limit on the number of iterations (at least 2 are done).
    tolerance
        A matrix has converged when its estimate changes by less than ``tolerance`` relative
        between two iterations; the iteration stops when all have.

    Returns
    -------
    tuple of Tensor
        ``(sigma, left, right, converged)`` with the shapes of the input (``sigma`` and
        ``converged`` 0-d for one matrix): the estimates (lower bounds that approach the true
        values from below), the updated unit vectors (float64) and the convergence flags.
    """
    single = weight.dim() == 2
    matrices = weight.detach().to(torch.float64).reshape(-1, weight.shape[-2], weight.shape[-1])
    transposed = matrices.transpose(1, 2)  # a view: bmm takes either layout
    # row vectors (k, 1, n): a row vector times a stack of matrices is a fast bmm on CPU, unlike
    # a stack of matrices times column vectors
    right = right.detach().to(matrices).reshape(matrices.shape[0], 1, -1)
    previous = [-1.0] * matrices.shape[0]  # (the warm-start ``left`` is not needed: the first step replaces it)
    for _ in range(max(2, int(max_iterations))):
        left = torch.bmm(right, transposed)  # W r
        right = torch.bmm(left, matrices)  # Wᵀ W r
        left_norm = torch.linalg.vector_norm(left, dim=2, keepdim=True)
        right_norm = torch.linalg.vector_norm(right, dim=2, keepdim=True)
        right = right.div_(right_norm)
        sigma = (right_norm / left_norm).flatten()  # ‖Wᵀ W r‖ / ‖W r‖ ≤ σ
        # one transfer of k numbers per iteration, then plain floats (NaN, a zero matrix: never converged)
        values = sigma.tolist()
        converged = [abs(value - before) <= tolerance * value for value, before in zip(values, previous)]
        if all(converged):
            break
        previous = values
    left, right = (left / left_norm).flatten(1), right.flatten(1)
    flags = torch.tensor(converged, device=matrices.device)
    if single:
        return sigma[0], left[0], right[0], flags[0]
    return sigma, left, right, flags


def _store_vector(layer: nn.Linear, right: Tensor) -> None:
    """Keep the right singular-vector estimate (the next warm start) on the layer as a
    non-persistent buffer (so state_dicts and scripted modules are unchanged in content, and the
    vector moves with ``.to()``)."""
    vector = right.detach().to(device=layer.weight.device, dtype=layer.weight.dtype)
    if _RIGHT_VECTOR in layer._buffers:
        layer._buffers[_RIGHT_VECTOR] = vector
    else:
        layer.register_buffer(_RIGHT_VECTOR, vector, persistent=False)


def _has_vectors(layer: nn.Linear) -> bool:
    right = layer._buffers.get(_RIGHT_VECTOR)
    return right is not None and right.shape == (layer.weight.shape[1],)


def _spectral_norms(layers: List[nn.Linear], exact: bool) -> List[float]:
    """Spectral norms of the layers' weights: exact for a short side (a tiny eigenproblem), else one
    batched power iteration per weight shape, warm-started from the stored vectors; exact (with
    the vectors stored for the next warm start) for new layers, when asked, and for every layer
    whose iteration has not converged."""
    norms: dict[int, float] = {}
    groups: dict[tuple, List[int]] = {}
    for index, layer in enumerate(layers):
        if min(layer.weight.shape) <= EXACT_NORM_MAX_SIDE:
            norms[index] = largest_singular_value(layer.weight)
        elif not exact and _has_vectors(layer):
            groups.setdefault(tuple(layer.weight.shape), []).append(index)
    for members in groups.values():
        weights = torch.stack([layers[index].weight.detach() for index in members])
        rights = torch.stack([layers[index]._buffers[_RIGHT_VECTOR] for index in members])
        tolerance = power_iteration_tolerance(weights.dtype)
        sigma, _, rights, converged = power_iteration_spectral_norm(weights, None, rights, tolerance=tolerance)
        rights = rights.to(weights.dtype)  # one conversion for the whole group
        for position, (index, value, done) in enumerate(zip(members, sigma.tolist(), converged.tolist())):
            if done:
                norms[index] = value
                _store_vector(layers[index], rights[position])
    for index, layer in enumerate(layers):
        if index not in norms:
            norms[index], _, right = exact_spectral_norm(layer.weight)
            _store_vector(layer, right)
    return [norms[index] for index in range(len(layers))]


@torch.no_grad()
def _project_linear_layers(module: nn.Module, bound: float, exact: bool = False) -> None:
    """Rescale every ``nn.Linear`` weight of ``module`` to spectral norm ≤ ``bound``.

    The norms come from a warm-started power iteration (a few float64 matrix-vector products per
    layer, batched over layers of one shape) that falls back to the exact norm for layers whose
    estimate has not converged to :func:`power_iteration_tolerance`; ``exact=True`` always uses the
    exact norm (eigendecomposition of the float64 Gram matrix).
    """
    layers = [layer for layer in module.modules() if isinstance(layer, nn.Linear)]
    for layer, sigma in zip(layers, _spectral_norms(layers, exact)):
        scale = float(max(1.0, sigma / bound))
        if scale > 1.0:
            layer.weight.div_(scale)


def autograd_input_gradient(energy_from_features: Any, features: Tensor,
                            create_graph: bool) -> Tuple[Tensor, Tensor]:
    """Energies ``(batch,)`` and ∂U/∂φ ``(batch, F)`` of ``energy_from_features`` by autograd
    (differentiable once more, by double back-propagation, when ``create_graph``)."""
    with torch.enable_grad():
        inputs = features if features.requires_grad else features.detach().requires_grad_(True)
        energy = energy_from_features(inputs)
        (gradient,) = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph)
    return (energy if create_graph else energy.detach()), gradient


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
    def project_lipschitz(self, exact: bool = False) -> None:
        """Rescale every weight matrix to spectral norm ≤ ``lipschitz_bound`` (no-op without a bound).

        Parameters
        ----------
        exact
            Compute every norm by a float64 SVD instead of the warm-started power iteration
            (which itself falls back to the SVD when it has not converged).
        """
        if self.lipschitz_bound > 0:
            _project_linear_layers(self, self.lipschitz_bound, exact=exact)

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
        energy = self.energy_from_features(features)
        # reshape only the output (see InvariantFeatures.forward)
        shape: List[int] = list(positions.shape[:-2])
        return energy.reshape(shape)

    def energy_from_features(self, features: Tensor) -> Tensor:
        """Energy in kJ/mol ``(batch,)`` of standardised features ``(batch, n_features)``.

        The MLP part of :meth:`forward`, which calls it; the trainer uses it with precomputed
        features and feature Jacobians (see ``openmm_flowmatch.forcefield.training``).
        """
        hidden = self.input_activation(self.input_layer(features))
        hidden = self.residual_layers(hidden)
        return self.output_layer(hidden).squeeze(-1)

    @torch.jit.unused
    def energy_and_input_gradient(self, features: Tensor) -> Tuple[Tensor, Tensor]:
        """Energies ``(batch,)`` and their gradients ∂U/∂φ ``(batch, n_features)`` at ``features``.

        For the activations of :data:`~openmm_flowmatch.forcefield.input_gradient.DERIVATIVES`
        (all of ``ACTIVATIONS``) the gradient comes from an explicit reverse pass whose own
        backward pass is written out too, so a loss on it costs one backward pass instead of a
        double back-propagation (see :mod:`~openmm_flowmatch.forcefield.input_gradient`); other
        activations go through ``torch.autograd.grad``. Either way the result can be
        differentiated once more (parameters, features) when grad mode is on. Training only:
        not part of the scripted or exported network.

        Parameters
        ----------
        features
            Standardised features ``(batch, n_features)``.
        """
        from .input_gradient import explicit_input_gradient

        explicit = self.explicit_mlp()
        if explicit is not None:
            derivatives, output_layer, layers = explicit
            return explicit_input_gradient(derivatives, features, output_layer, layers)
        return autograd_input_gradient(self.energy_from_features, features, torch.is_grad_enabled())

    @torch.jit.unused
    def explicit_mlp(self) -> Optional[Tuple[Any, nn.Linear, List[nn.Linear]]]:
        """``(derivatives, output_layer, layers)`` for the explicit passes of
        :mod:`~openmm_flowmatch.forcefield.input_gradient` (``layers``: the input layer, then the
        residual layers), or ``None`` when the activation has no explicit derivatives there."""
        from .input_gradient import DERIVATIVES

        derivatives = DERIVATIVES.get(self.activation_name.lower())
        if derivatives is None:
            return None
        return derivatives, self.output_layer, [self.input_layer] + [block.linear for block in self.residual_layers]


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
    def project_lipschitz(self, exact: bool = False) -> None:
        """Rescale every weight matrix to spectral norm ≤ ``lipschitz_bound`` (no-op without a bound).

        Parameters
        ----------
        exact
            Compute every norm by a float64 SVD instead of the warm-started power iteration
            (which itself falls back to the SVD when it has not converged).
        """
        if self.lipschitz_bound > 0:
            _project_linear_layers(self, self.lipschitz_bound, exact=exact)

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


NETWORK_FILE_REMEDY = "re-run train-ff to regenerate it"
"""What a refused network file's message tells the user to do."""


def save_network(model: nn.Module, path: str | Path) -> Path:
    """Save a trained CG network (config, weights, training info) to ``path``.

    The file (``torch.save``, written atomically) holds plain content only — tensors, dicts, lists,
    numbers, strings — and its SHA-256 checksum, so :func:`load_network` reads it without unpickling
    code and refuses a corrupt copy.

    Raises
    ------
    NetworkFileError
        If the model has no ``config()`` (it is not a network of this package), or its config or
        ``training_info`` holds an object that cannot be stored without pickle.
    """
    if not hasattr(model, "config"):
        raise NetworkFileError(f"{type(model).__name__} has no config(); only networks of openmm_flowmatch can be saved")
    content = {
        "kind": NETWORK_FILE_KIND,
        "config": model.config(),
        "state_dict": model.state_dict(),
        "training_info": getattr(model, "training_info", None),
    }
    from ..safe_files import save_plain

    return save_plain(content, path, NetworkFileError)


def load_network(path: str | Path, trust_pickle: bool = False) -> nn.Module:
    """Read a network written by :func:`save_network` (in eval mode, ``training_info`` restored).

    The file is read with ``torch.load(weights_only=True)``: nothing in it is executed.

    Parameters
    ----------
    path
        The network file.
    trust_pickle
        Also read a file whose content needs unrestricted pickle (an older file with, e.g., NumPy
        scalars in its training info). Loading such a file can run code: pass ``True`` only for a
        file you wrote yourself. Default ``False``: such a file is refused.

    Raises
    ------
    NetworkFileError
        If the file is missing, truncated or corrupt (checksum mismatch), holds pickled objects
        (and ``trust_pickle`` is false), or is not a network file.
    """
    from ..safe_files import load_plain

    path = Path(path)
    content = load_plain(
        path, what="network file", remedy=NETWORK_FILE_REMEDY, error=NetworkFileError, trust_pickle=trust_pickle,
        pickle_hint=" (or, only for a file you wrote yourself, pass trust_pickle=True)",
    )
    if content.get("kind") != NETWORK_FILE_KIND:
        raise NetworkFileError(f"{path}: not a network file written by openmm-flowmatch train-ff")
    try:
        model = network_from_config(content["config"])
        model.load_state_dict(content["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        reason = " ".join(str(error).split())[:160]
        raise NetworkFileError(f"{path}: the network file is inconsistent ({reason}); {NETWORK_FILE_REMEDY}") from None
    model.training_info = content.get("training_info") or {}
    return model.eval()
