"""Force matching: train U_net so that −∇(U_prior + U_net) matches target forces.

One trainer serves both data sources of DESIGN.md: teacher forces from the flow (flow-matching)
and mapped all-atom forces (the force-matching baseline). It only sees CG positions (nm) and
forces (kJ/mol/nm); ``method`` is recorded, nothing else changes.

The loss is the mean squared error over all force components, in (kJ/mol/nm)²,

    L = mean ‖ −∇U_net(x) − (F_target(x) − F_prior(x)) ‖²,

which equals MSE(−∇(U_prior + U_net), F_target) because the prior has no trainable parameters;
the prior forces are computed once per frame. Gradients of the forces with respect to the network
parameters go through ``torch.autograd.grad(..., create_graph=True)``.

Fast path (networks with ``energy_from_features``, i.e. :class:`CGNet`): the features never change
during training, so their values φ and Jacobians J = ∂φ/∂x are computed once per data set (float64,
then cast) and the forces are −Jᵀ ∂U/∂φ. ∂U/∂φ comes from :meth:`CGNet.energy_and_input_gradient`,
an explicit reverse pass through the MLP whose derivative with respect to the parameters is
written out as well (:mod:`~openmm_flowmatch.forcefield.input_gradient`), so a step is one forward
and one backward pass instead of a double back-propagation; the trainer takes the loss and its
parameter gradients from those passes directly, without an autograd graph
(:func:`~openmm_flowmatch.forcefield.input_gradient.force_matching_gradients`). The optimiser is Adam with torch's
fused kernel (:func:`adam_optimizer`); both give the autograd/default-Adam result up to rounding.
Budgets and patience can be given in optimiser steps (``max_steps``, ``patience_steps``,
``validation_interval``); checkpoints hold the position inside the epoch, so a resumed run gives
the uninterrupted result.

Under ``torchrun`` (``WORLD_SIZE > 1``) every rank takes its share of the same global batch and
the gradients are summed with one ``all_reduce`` per step (no DistributedDataParallel, which does
not support the double back-propagation), so K processes give the one-process result at the same
global batch; see :mod:`openmm_flowmatch.distributed` and docs/distributed.md.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..distributed import (
    SINGLE_PROCESS, Ranks, all_reduce_gradients, check_consistent, resolve_device, setup_distributed, sum_over_chunks,
)
from .features import DEFAULT_FEATURE_SETS, InvariantFeatures, feature_set_options
from .input_gradient import force_matching_gradients, mlp_parameters
from .networks import CGNet, autograd_input_gradient

__all__ = [
    "train_force_field", "TrainingError", "force_matching_loss", "forces_of", "METHODS", "feature_jacobians",
    "forces_from_features", "supports_precomputed_features", "published_schedule", "LEARNING_RATE_SCHEDULES",
    "adam_optimizer",
]

logger = logging.getLogger(__name__)

METHODS = ("flow-matching", "force-matching")
"""Accepted values of ``method`` (recorded in the training info and the artifact metadata)."""

CHECKPOINT_VERSION = 2
_READABLE_CHECKPOINT_VERSIONS = (1, 2)


class TrainingError(ValueError):
    """Bad input to :func:`train_force_field` (missing forces, shape mismatch, bad checkpoint)."""


# ---------------------------------------------------------------------------------------- data
def _positions_and_forces(data: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(positions, forces)`` from a CGDataset-like object, a dict or a pair of arrays."""
    if isinstance(data, dict):
        positions, forces = data.get("positions"), data.get("forces")
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        positions, forces = data
    elif hasattr(data, "positions"):
        positions, forces = data.positions, getattr(data, "forces", None)
    else:
        raise TrainingError(
            f"{what}: expected a CGDataset, a dict with 'positions' and 'forces', or a (positions, forces) "
            f"pair, got {type(data).__name__}"
        )
    if forces is None:
        raise TrainingError(
            f"{what} has no forces: force matching needs target forces (mapped all-atom forces, or teacher "
            "forces sampled from a trained flow)"
        )
    positions = np.asarray(positions.detach().cpu() if isinstance(positions, Tensor) else positions)
    forces = np.asarray(forces.detach().cpu() if isinstance(forces, Tensor) else forces)
    if positions.ndim != 3 or positions.shape[-1] != 3:
        raise TrainingError(f"{what}: positions must have shape (frames, beads, 3), got {positions.shape}")
    if forces.shape != positions.shape:
        raise TrainingError(f"{what}: forces have shape {forces.shape} but positions {positions.shape}")
    if positions.shape[0] == 0:
        raise TrainingError(f"{what} holds no frames")
    if not (np.all(np.isfinite(positions)) and np.all(np.isfinite(forces))):
        raise TrainingError(f"{what} contains NaN or infinite positions or forces; clean the data first")
    return positions, forces


def _temperature_of(data: Any) -> Optional[float]:
    temperature = getattr(data, "temperature", None)
    if temperature is None and isinstance(data, dict):
        temperature = data.get("temperature")
    return None if temperature is None else float(temperature)


def forces_of(energy_function: Any, positions: Tensor, create_graph: bool = False) -> Tensor:
    """−∇ of ``energy_function(positions)`` (energies ``(batch,)``) with respect to ``positions``."""
    with torch.enable_grad():
        positions = positions.detach().requires_grad_(True)
        energy = energy_function(positions)
        (gradient,) = torch.autograd.grad(energy.sum(), positions, create_graph=create_graph)
    return -gradient


def _prior_forces(priors: Any, positions: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Prior forces of every frame, computed once in float64 (zero without priors)."""
    if priors is None:
        return np.zeros_like(positions, dtype=np.float64)
    chunks = []
    for chunk in torch.as_tensor(positions, dtype=torch.float64).split(batch_size):
        chunks.append(forces_of(priors.energy, chunk).detach().numpy())
    return np.concatenate(chunks)


def force_matching_loss(model: nn.Module, positions: Tensor, residual_forces: Tensor, create_graph: bool) -> Tensor:
    """Mean squared error between −∇U_net and the residual target forces F_target − F_prior."""
    predicted = forces_of(model, positions, create_graph=create_graph)
    return torch.mean((predicted - residual_forces) ** 2)


# ----------------------------------------------------------------------- precomputed features
DEFAULT_FEATURE_MEMORY_LIMIT: float = 2e9
"""Bytes the precomputed feature Jacobians of training and validation data may take together."""


def supports_precomputed_features(model: nn.Module) -> bool:
    """Whether ``model`` has the split ``features`` → ``energy_from_features`` of :class:`CGNet`."""
    return hasattr(model, "energy_from_features") and hasattr(getattr(model, "features", None), "standardized")


def feature_jacobians(features: nn.Module, positions: Tensor, batch_size: int = 2048) -> tuple[Tensor, Tensor]:
    """Standardised features φ and their Jacobians J = ∂φ/∂x of every frame, in float64.

    Parameters
    ----------
    features
        A feature module with ``standardized(positions (batch, n, 3)) -> (batch, F)``
        (e.g. :class:`InvariantFeatures`, any configuration); a float64 copy is used.
    positions
        ``(frames, n_beads, 3)`` in nm; the computation runs on their device.
    batch_size
        Frames per vectorised Jacobian evaluation.

    Returns
    -------
    tuple of Tensor
        ``φ`` of shape ``(frames, F)`` and ``J`` of shape ``(frames, F, n_beads·3)``, float64.
    """
    module = copy.deepcopy(features).to(device=positions.device, dtype=torch.float64)
    positions = positions.detach().double()

    def single(frame: Tensor) -> Tensor:
        return module.standardized(frame.unsqueeze(0)).squeeze(0)

    jacobian_of_batch = torch.func.vmap(torch.func.jacrev(single))
    values, jacobians = [], []
    with torch.no_grad():
        for chunk in positions.split(batch_size):
            values.append(module.standardized(chunk))
            jacobians.append(jacobian_of_batch(chunk).flatten(-2))
    return torch.cat(values), torch.cat(jacobians)


def forces_from_features(model: nn.Module, features: Tensor, jacobian: Tensor, create_graph: bool = False,
                         explicit: bool = True) -> Tensor:
    """Forces −Jᵀ ∂U/∂φ ``(batch, n_beads·3)`` from precomputed features and feature Jacobians.

    Parameters
    ----------
    model
        A network with ``energy_from_features(features (batch, F)) -> (batch,)`` (:class:`CGNet`).
    features
        Standardised features ``(batch, F)``.
    jacobian
        ``∂φ/∂x``, ``(batch, F, n_beads·3)``.
    create_graph
        Keep the graph for a backward pass to the parameters (training).
    explicit
        Take ∂U/∂φ from ``model.energy_and_input_gradient`` when the model has it (an explicit
        reverse pass with a hand-written backward: one backward pass in training); ``False``
        differentiates ``energy_from_features`` with autograd (double back-propagation in
        training). Same forces up to rounding.
    """
    if explicit and hasattr(model, "energy_and_input_gradient"):
        with torch.set_grad_enabled(create_graph):
            _, gradient = model.energy_and_input_gradient(features.detach())
    else:
        _, gradient = autograd_input_gradient(model.energy_from_features, features.detach(), create_graph)
    return -torch.bmm(gradient.unsqueeze(1), jacobian).squeeze(1)


class _ForceData:
    """Training or validation frames: positions, or precomputed (φ, J), with residual forces."""

    def __init__(self, positions: Tensor, residual: Tensor, features: Optional[Tensor] = None,
                 jacobian: Optional[Tensor] = None, explicit_gradient: bool = True, direct_gradients: bool = True) -> None:
        self.positions, self.features, self.jacobian = positions, features, jacobian
        self.residual = residual if jacobian is None else residual.flatten(1)
        self.explicit_gradient = explicit_gradient  # see forces_from_features(explicit=...)
        self.direct_gradients = direct_gradients  # see accumulate_gradients

    def __len__(self) -> int:
        return int(self.residual.shape[0])

    def loss(self, model: nn.Module, index: Tensor | slice, create_graph: bool) -> Tensor:
        """Mean squared force error on the frames ``index``."""
        if self.jacobian is None:
            predicted = forces_of(model, _rows(self.positions, index), create_graph=create_graph)
        else:
            predicted = forces_from_features(model, _rows(self.features, index), _rows(self.jacobian, index),
                                             create_graph, explicit=self.explicit_gradient)
        return torch.mean((predicted - _rows(self.residual, index)) ** 2)

    def accumulate_gradients(self, model: nn.Module, index: Tensor | slice, weight: float = 1.0) -> float:
        """Add ∂(weight · loss)/∂θ on the frames ``index`` to the parameters' ``.grad``; return weight · loss.

        With precomputed features, the explicit input gradient and ``direct_gradients``, the loss
        and its gradients come from :func:`~.input_gradient.force_matching_gradients`, without an
        autograd graph; otherwise from ``loss.backward()``. The same gradients up to rounding.
        """
        explicit = None
        if self.jacobian is not None and self.explicit_gradient and self.direct_gradients:
            explicit = model.explicit_mlp() if hasattr(model, "explicit_mlp") else None
        if explicit is None:
            loss = self.loss(model, index, create_graph=True)
            loss = loss if weight == 1.0 else loss * weight
            loss.backward()
            return float(loss.detach())
        derivatives, output_layer, layers = explicit
        loss, gradients = force_matching_gradients(derivatives, _rows(self.features, index), _rows(self.jacobian, index),
                                                   _rows(self.residual, index), output_layer, layers)
        for parameter, gradient in zip(mlp_parameters(output_layer, layers), gradients):
            if gradient is None or not parameter.requires_grad:
                continue
            gradient = gradient if weight == 1.0 else gradient.mul_(weight)
            parameter.grad = gradient if parameter.grad is None else parameter.grad.add_(gradient)
        return float(loss) * weight


def _rows(tensor: Tensor, index: Tensor | slice) -> Tensor:
    """``tensor[index]``; ``index_select`` for an index tensor (the same rows, a faster gather)."""
    return tensor.index_select(0, index) if isinstance(index, Tensor) else tensor[index]


def _force_data(model: nn.Module, positions: Tensor, residual: Tensor, precompute: bool) -> _ForceData:
    if not precompute:
        return _ForceData(positions, residual)
    features, jacobian = feature_jacobians(model.features, positions)
    as_model = dict(dtype=positions.dtype, device=positions.device)
    return _ForceData(positions, residual, features.to(**as_model), jacobian.to(**as_model))


def _use_precomputed(model: nn.Module, requested: Optional[bool], n_frames: int, n_coordinates: int,
                     itemsize: int, memory_limit: float) -> bool:
    """Decide the training path: precomputed features and Jacobians, or autograd through them."""
    if requested is False:
        return False
    if not supports_precomputed_features(model):
        if requested:
            logger.warning("%s has no energy_from_features(); training through the features", type(model).__name__)
        return False
    n_features = int(getattr(model.features, "n_features", 0)) or int(
        model.features.standardized(torch.zeros(1, n_coordinates // 3, 3)).shape[-1]
    )
    needed = n_frames * n_features * n_coordinates * max(itemsize, 8)
    if needed > memory_limit:
        logger.warning(
            "precomputed feature Jacobians would take %.3g GB (limit %.3g GB); training through the features "
            "instead (slower, same result)", needed / 1e9, memory_limit / 1e9,
        )
        return False
    return True


# ------------------------------------------------------------------------------------ checkpoints
CHECKPOINT_REMEDY = "delete it (or pass resume=False) to start the training afresh"
"""What a refused force-field checkpoint's message tells the user to do."""


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write a checkpoint atomically: plain content plus its SHA-256 checksum (no pickled objects)."""
    from ..safe_files import save_plain

    save_plain(state, path, TrainingError)


def _load_checkpoint(path: Path) -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``, verifying its checksum.

    Raises
    ------
    TrainingError
        One line naming the file, for a truncated, corrupt or pickled file or one of another kind.
    """
    from ..safe_files import load_plain

    state = load_plain(path, what="force-field training checkpoint", remedy=CHECKPOINT_REMEDY, error=TrainingError)
    if state.get("checkpoint_version") not in _READABLE_CHECKPOINT_VERSIONS:
        raise TrainingError(f"{path} is not a force-field training checkpoint of this package; delete it or pick another path")
    return state


# ---------------------------------------------------------------------------------------- trainer
LEARNING_RATE_SCHEDULES = ("plateau", "published")
"""Accepted values of ``learning_rate_schedule`` of :func:`train_force_field`."""

PUBLISHED_LEARNING_RATES = (3e-3, 1e-5)
"""Initial and final Adam learning rate of the published schedule."""

PUBLISHED_MILESTONES = (0.3, 0.45, 0.6, 0.75, 0.9)
"""Fractions of the step budget at which the published schedule multiplies the learning rate by
``(1e-5 / 3e-3) ** (1 / 5) ≈ 0.3195``: 3e-3 until 30 % of the steps, then 9.59e-4, 3.06e-4,
9.79e-5, 3.13e-5 and from 90 % of the steps on 1e-5."""


def adam_optimizer(parameters: Any, learning_rate: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam with torch's fused kernel where it has one for the parameters (CPU, CUDA), else the default.

    The fused update is the default one up to float rounding (float64: parameters within ~1e-15
    after 20 steps, see benchmarks/bench_training_speed.py) at a fraction of its cost on CPU.
    A checkpoint's optimiser state restores the setting it was written with.
    """
    parameters = list(parameters)
    try:
        return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay)


def published_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.MultiStepLR:
    """The published step-wise decay 3e-3 → 1e-5 over ``total_steps`` optimiser steps.

    The scheduler is stepped after every optimiser step; see ``PUBLISHED_MILESTONES``.
    """
    first, last = PUBLISHED_LEARNING_RATES
    factor = (last / first) ** (1.0 / len(PUBLISHED_MILESTONES))
    milestones = sorted({max(1, int(round(fraction * total_steps))) for fraction in PUBLISHED_MILESTONES})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=factor)


def train_force_field(
    data: Any,
    priors: Any = None,
    model: Optional[nn.Module] = None,
    *,
    validation_data: Any = None,
    validation_fraction: float = 0.1,
    method: str = "force-matching",
    bonds: Optional[Sequence[Sequence[int]]] = None,
    model_kwargs: Optional[dict] = None,
    epochs: int = 100,
    max_steps: Optional[int] = None,
    batch_size: int = 128,
    learning_rate: Optional[float] = None,
    learning_rate_schedule: str = "plateau",
    learning_rate_factor: float = 0.5,
    learning_rate_patience: int = 5,
    minimum_learning_rate: float = 1e-6,
    weight_decay: float = 0.0,
    early_stopping_patience: int = 15,
    patience_steps: Optional[int] = None,
    validation_interval: Optional[int] = None,
    minimum_improvement: float = 0.0,
    checkpoint_path: Optional[str | os.PathLike] = None,
    resume: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    precompute_features: Optional[bool] = None,
    feature_memory_limit: float = DEFAULT_FEATURE_MEMORY_LIMIT,
    progress: bool = True,
    distributed: Optional[bool] = None,
) -> nn.Module:
    """Train a CG network energy by force matching.

    Parameters
    ----------
    data
        Training data: a ``CGDataset`` (or any object with ``positions`` and ``forces`` arrays),
        a dict with ``"positions"`` and ``"forces"``, or a ``(positions, forces)`` pair.
        Positions ``(frames, n_beads, 3)`` in nm, forces the same shape in kJ/mol/nm: mapped
        all-atom forces (force matching) or teacher forces kT∇log q (flow-matching).
    priors
        Prior energy with ``energy(positions (..., n, 3) Tensor) -> (...) Tensor`` in kJ/mol
        (``openmm_flowmatch.priors.Priors``), or ``None``. The network learns the remainder.
    model
        Network to train, mapping ``(batch, n, 3)`` → ``(batch,)`` kJ/mol. Default: a
        :class:`CGNet` whose features are standardised on the training positions,
        built with ``bonds`` and ``model_kwargs``.
    validation_data
        Held-out data in any form accepted for ``data``. Default: the last
        ``validation_fraction`` of the frames of ``data`` (a contiguous block, since
        consecutive MD frames are correlated).
    validation_fraction
        Fraction of frames held out when ``validation_data`` is not given (default 0.1).
    method
        ``"force-matching"`` (mapped all-atom forces) or ``"flow-matching"`` (teacher forces);
        only recorded in the training info.
    bonds
        CG bond graph for the default model's features (default: a linear chain).
    model_kwargs
        Keyword arguments of the default :class:`CGNet` (``hidden_width``, ``n_layers``,
        ``activation``, ``lipschitz_bound``), plus for its features ``feature_set`` (a key of
        :data:`~openmm_flowmatch.forcefield.features.FEATURE_SETS`; default by ``method``:
        ``"dihedrals_and_distances"`` for flow-matching (bonds and angles left to the priors,
        which keeps the network integrable at 5 fs), ``"all"`` for force matching) and
        ``min_separation`` (overrides the set's).
    epochs
        Maximum number of passes over the training frames (default 100), counting the epochs
        of a resumed checkpoint. Ignored when ``max_steps`` is given.
    max_steps
        Budget in optimiser steps (overrides ``epochs``); the batches run on through reshuffled
        epochs until this many steps are done. Default ``None``: ``epochs`` passes.
    batch_size
        Frames per optimiser step (default 128, the published value).
    learning_rate
        Initial Adam learning rate (default 1e-3 with the ``"plateau"`` schedule, 3e-3 with
        ``"published"``).
    learning_rate_schedule
        ``"plateau"`` (default): multiply by ``learning_rate_factor`` when the validation loss has
        not improved for ``learning_rate_patience`` validations, down to
        ``minimum_learning_rate`` (``ReduceLROnPlateau``). ``"published"``: step-wise decay
        3e-3 → 1e-5 at fixed fractions of the step budget, see :data:`PUBLISHED_MILESTONES`.
    learning_rate_factor, learning_rate_patience, minimum_learning_rate
        Settings of the ``"plateau"`` schedule (defaults 0.5, 5, 1e-6).
    weight_decay
        Adam weight decay (default 0).
    early_stopping_patience
        Stop when the validation loss has not improved by more than ``minimum_improvement``
        ((kJ/mol/nm)²) for this many validations (epochs by default; default 15; 0 switches
        early stopping off). Ignored when ``patience_steps`` is given.
    patience_steps
        Early-stopping patience in optimiser steps (0 switches it off); default
        ``early_stopping_patience × validation_interval``.
    validation_interval
        Validate (and checkpoint) every this many optimiser steps; default once per epoch.
    minimum_improvement
        Smallest decrease of the validation loss that counts as an improvement.
    checkpoint_path
        File written after every validation (model, optimiser, scheduler, history, random state,
        position in the epoch), so a run resumes exactly where it was interrupted.
    resume
        Continue from ``checkpoint_path`` when it exists (default True; the checkpoint must come
        from the same data sizes, model size, seed and method); False starts afresh and
        overwrites it.
    seed
        Seed of the default model's initialisation and of the batch shuffling.
    device
        Torch device to train on (``"cpu"``, ``"cuda"``).
    dtype
        Floating-point type of the training (default float32).
    precompute_features
        Compute the standardised features φ and their Jacobians J = ∂φ/∂x of all frames once (in
        float64, then cast to ``dtype``) and train with forces −Jᵀ ∂U/∂φ through the MLP only —
        the same loss, several times faster. Default ``None``: whenever the model offers
        ``energy_from_features`` (:class:`CGNet`) and J fits in ``feature_memory_limit``;
        ``False`` differentiates through the features at every step.
    feature_memory_limit
        Bytes (default 2e9) the Jacobians of training and validation frames may take; above it
        training falls back to the slower path with a warning.
    progress
        Show a tqdm progress bar over optimiser steps (rank 0 only).
    distributed
        ``None`` (default): data-parallel over the ranks of a ``torchrun`` job when
        ``WORLD_SIZE > 1`` or a process group is initialised (gloo on CPU, nccl on CUDA, see
        :func:`~openmm_flowmatch.distributed.setup_distributed`); ``False``: train alone. Each
        rank takes ``batch_size / K`` frames (remainders spread exactly) of the same global
        batch, so the result equals one process with the same ``batch_size``. Every rank must get
        the same data and arguments; rank 0 writes the checkpoint, which all ranks resume from.

    Returns
    -------
    torch.nn.Module
        The model with the weights of the best validation, in eval mode, on ``device``.
        Its attribute ``training_info`` (a JSON-able dict: method, frames, epochs, steps, seed,
        losses at every validation in (kJ/mol/nm)², …) is meant for ``export_force_field(training=…)``.

    Raises
    ------
    TrainingError
        Missing forces, inconsistent shapes, non-finite data, a bead count the model does not
        take, an unknown ``method`` or schedule, or an unreadable checkpoint.
    DistributedError
        Ranks of a distributed run that were handed different data, arguments or models, or
        resumed from different checkpoints.
    """
    ranks = setup_distributed(device, distributed)
    device = resolve_device(device, ranks)
    _check_arguments(method, epochs, max_steps, batch_size, learning_rate, learning_rate_schedule, validation_interval)
    (train_positions, train_forces), (validation_positions, validation_forces) = _split_data(
        data, validation_data, validation_fraction
    )
    n_beads = train_positions.shape[1]
    device = torch.device(device)
    if model is None:
        model = _default_model(train_positions, bonds, model_kwargs or {}, seed, method)
    model_beads = getattr(model, "n_beads", n_beads)
    if model_beads != n_beads:
        raise TrainingError(f"the model takes {model_beads} beads but the data has {n_beads}")
    model = model.to(device=device, dtype=dtype)
    n_frames = train_positions.shape[0] + validation_positions.shape[0]
    precompute = _use_precomputed(
        model, precompute_features, n_frames, 3 * n_beads, torch.finfo(dtype).bits // 8, feature_memory_limit
    )

    def as_data(positions: np.ndarray, forces: np.ndarray) -> _ForceData:
        residual = np.asarray(forces) - _prior_forces(priors, positions)
        as_tensor = lambda array: torch.as_tensor(np.asarray(array), dtype=dtype, device=device)  # noqa: E731
        return _force_data(model, as_tensor(positions), as_tensor(residual), precompute)

    train, validation = as_data(train_positions, train_forces), as_data(validation_positions, validation_forces)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps = int(max_steps) if max_steps is not None else int(epochs) * steps_per_epoch
    interval = int(validation_interval) if validation_interval is not None else steps_per_epoch
    patience = int(patience_steps) if patience_steps is not None else int(early_stopping_patience) * interval
    schedule_name = learning_rate_schedule
    if learning_rate is None:
        learning_rate = PUBLISHED_LEARNING_RATES[0] if schedule_name == "published" else 1e-3
    optimizer = adam_optimizer(model.parameters(), learning_rate, weight_decay)
    scheduler = _learning_rate_scheduler(optimizer, schedule_name, total_steps, learning_rate_factor,
                                         learning_rate_patience, minimum_learning_rate)
    fingerprint = {
        "frames": len(train),
        "validation_frames": len(validation),
        "beads": int(n_beads),
        "parameters": int(sum(parameter.numel() for parameter in model.parameters())),
        "seed": int(seed),
        "method": method,
    }
    run = _RunState(model, seed, device)
    checkpoint = Path(checkpoint_path) if checkpoint_path is not None else None
    if checkpoint is not None and resume and checkpoint.exists():
        run.restore(_load_checkpoint(checkpoint), fingerprint, checkpoint, model, optimizer, scheduler, steps_per_epoch)
    settings = dict(batch_size=batch_size, total_steps=total_steps, interval=interval, patience=patience,
                    learning_rate=learning_rate, schedule=schedule_name, factor=learning_rate_factor,
                    schedule_patience=learning_rate_patience, minimum_learning_rate=minimum_learning_rate,
                    weight_decay=weight_decay, minimum_improvement=minimum_improvement, dtype=str(dtype),
                    precompute=precompute, checkpoint=str(checkpoint))
    check_consistent(_agreement(train, validation, model, fingerprint | settings, run), ranks, "force-field training")
    if run.history.get("initial_validation_loss") is None:
        run.history["initial_validation_loss"] = [_evaluate(model, validation, batch_size, ranks)]

    started = time.perf_counter()
    _training_loop(
        run, model, optimizer, scheduler, train, validation,
        dict(batch_size=batch_size, total_steps=total_steps, interval=interval, patience=patience,
             minimum_improvement=minimum_improvement, plateau=schedule_name == "plateau",
             steps_per_epoch=steps_per_epoch, checkpoint=checkpoint, fingerprint=fingerprint, progress=progress,
             ranks=ranks),
    )
    model.load_state_dict(run.best_state)
    model.eval()
    step_mode = max_steps is not None or validation_interval is not None
    model.training_info = _training_info(model, run, fingerprint | settings, steps_per_epoch, step_mode,
                                         ranks.world_size, _temperature_of(data), time.perf_counter() - started)
    return model


def _learning_rate_scheduler(optimizer: torch.optim.Optimizer, schedule_name: str, total_steps: int, factor: float,
                             patience: int, minimum_learning_rate: float) -> Any:
    """The published step-wise decay over ``total_steps``, or ReduceLROnPlateau (``"plateau"``)."""
    if schedule_name == "published":
        return published_schedule(optimizer, total_steps)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=factor, patience=patience,
                                                      min_lr=minimum_learning_rate)


def _training_info(model: nn.Module, run: "_RunState", configuration: dict, steps_per_epoch: int, step_mode: bool,
                   world_size: int, temperature: Optional[float], seconds: float) -> dict:
    """``model.training_info``: the run's settings (``configuration``: fingerprint and settings), its
    history and where the kept weights come from."""
    return {
        "method": configuration["method"],
        "frames": configuration["frames"],
        "validation_frames": configuration["validation_frames"],
        "epochs": math.ceil(run.step / steps_per_epoch) if step_mode else len(run.history["train_loss"]),
        "steps": int(run.step),
        "best_epoch": int(run.best_step // steps_per_epoch if step_mode else run.best_validation),
        "best_step": int(run.best_step),
        "validation_interval": int(configuration["interval"]),
        "validation_steps": [int(value) for value in run.history.get("step", [])],
        "stopped_early": bool(run.stopped_early),
        "seed": int(configuration["seed"]),
        "batch_size": int(configuration["batch_size"]),
        "learning_rate": float(configuration["learning_rate"]),
        "learning_rate_schedule": configuration["schedule"],
        "weight_decay": float(configuration["weight_decay"]),
        "dtype": configuration["dtype"].replace("torch.", ""),
        "precomputed_features": bool(configuration["precompute"]),
        "world_size": int(world_size),
        "temperature": temperature,
        "loss": "mean squared force error, (kJ/mol/nm)^2",
        "initial_validation_loss": float(run.history["initial_validation_loss"][0]),
        "best_validation_loss": float(run.best_loss) if math.isfinite(run.best_loss) else None,
        "train_loss": [float(value) for value in run.history["train_loss"]],
        "validation_loss": [float(value) for value in run.history["validation_loss"]],
        "training_seconds": seconds,
        "model": model.config() if hasattr(model, "config") else {"class": type(model).__name__},
    }


def _check_arguments(method: str, epochs: int, max_steps: Optional[int], batch_size: int,
                     learning_rate: Optional[float], schedule: str, validation_interval: Optional[int]) -> None:
    if method not in METHODS:
        raise TrainingError(f"method must be one of {METHODS}, got {method!r}")
    if epochs < 0 or batch_size < 1 or (learning_rate is not None and not learning_rate > 0):
        raise TrainingError("epochs must be >= 0, batch_size >= 1 and learning_rate > 0")
    if max_steps is not None and max_steps < 0:
        raise TrainingError(f"max_steps must be >= 0, got {max_steps}")
    if validation_interval is not None and validation_interval < 1:
        raise TrainingError(f"validation_interval must be >= 1, got {validation_interval}")
    if schedule not in LEARNING_RATE_SCHEDULES:
        raise TrainingError(f"learning_rate_schedule must be one of {LEARNING_RATE_SCHEDULES}, got {schedule!r}")


def _split_data(data: Any, validation_data: Any, validation_fraction: float) -> tuple[tuple, tuple]:
    """``((train positions, forces), (validation positions, forces))`` as NumPy arrays."""
    positions, forces = _positions_and_forces(data, "training data")
    if validation_data is not None:
        train = (positions, forces)
        validation = _positions_and_forces(validation_data, "validation data")
    else:
        if not 0.0 < validation_fraction < 1.0:
            raise TrainingError(f"validation_fraction must lie in (0, 1), got {validation_fraction}")
        n_validation = max(1, int(round(validation_fraction * positions.shape[0])))
        if n_validation >= positions.shape[0]:
            raise TrainingError(f"{positions.shape[0]} frames are too few to hold out a validation block")
        split = positions.shape[0] - n_validation
        train, validation = (positions[:split], forces[:split]), (positions[split:], forces[split:])
    if validation[0].shape[1:] != train[0].shape[1:]:
        raise TrainingError("validation and training data have different numbers of beads")
    return train, validation


class _RunState:
    """Everything a checkpoint holds besides model, optimiser and scheduler."""

    def __init__(self, model: nn.Module, seed: int, device: torch.device) -> None:
        self.generator = torch.Generator().manual_seed(int(seed))
        self.device = device
        self.history: dict[str, list[float]] = {"train_loss": [], "validation_loss": [], "learning_rate": [], "step": []}
        self.best_loss, self.best_validation, self.best_step = math.inf, -1, 0
        self.best_state = copy.deepcopy(model.state_dict())
        self.step, self.position, self.order = 0, 0, None
        self.steps_without_improvement, self.stopped_early = 0, False

    def restore(self, state: dict, fingerprint: dict, path: Path, model: nn.Module, optimizer: Any,
                scheduler: Any, steps_per_epoch: int) -> None:
        saved = state.get("fingerprint") or {}
        if saved != fingerprint:
            changed = ", ".join(
                f"{key}: was {saved.get(key)!r}, now {fingerprint.get(key)!r}"
                for key in sorted(set(saved) | set(fingerprint)) if saved.get(key) != fingerprint.get(key)
            )
            raise TrainingError(
                f"the checkpoint {path} was written for another run ({changed}); pass resume=False to "
                "overwrite it or choose another checkpoint_path"
            )
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        self.generator.set_state(state["generator_state"])
        self.history = state["history"]
        self.best_loss, self.best_state = state["best_loss"], state["best_state"]
        self.stopped_early = state["stopped_early"]
        if state["checkpoint_version"] == 1:  # epoch-based checkpoints: resume at the next epoch
            self.best_validation = state["best_epoch"]
            self.best_step = (state["best_epoch"] + 1) * steps_per_epoch
            self.step = self.position = (state["epoch"] + 1) * steps_per_epoch
            self.steps_without_improvement = state["epochs_without_improvement"] * steps_per_epoch
            self.history.setdefault("step", [(index + 1) * steps_per_epoch for index in range(len(self.history["train_loss"]))])
        else:
            for name in ("best_validation", "best_step", "step", "position", "order", "steps_without_improvement"):
                setattr(self, name, state[name])
        logger.info("resuming force-field training from %s at step %d", path, self.step)

    def state(self) -> dict:
        names = ("history", "best_loss", "best_validation", "best_step", "best_state", "step", "position", "order",
                 "steps_without_improvement", "stopped_early")
        return {name: getattr(self, name) for name in names} | {"generator_state": self.generator.get_state()}

    def next_batch(self, n_frames: int, batch_size: int) -> Tensor:
        """Indices of the next batch; a new shuffled order at the start of every epoch."""
        if self.order is None or self.position * batch_size >= n_frames:
            self.order = torch.randperm(n_frames, generator=self.generator)
            self.position = 0
        batch = self.order[self.position * batch_size:(self.position + 1) * batch_size]
        self.position += 1
        return batch.to(self.device)


def _training_loop(run: _RunState, model: nn.Module, optimizer: Any, scheduler: Any, train: _ForceData,
                   validation: _ForceData, settings: dict) -> None:
    """Optimiser steps until the budget is spent or early stopping; validate every ``interval``."""
    from tqdm.auto import tqdm

    total_steps = settings["total_steps"]
    remaining = 0 if run.stopped_early else max(0, total_steps - run.step)
    ranks = settings["ranks"]
    bar = tqdm(total=remaining, desc="force matching", unit="step", leave=False,
               disable=not (settings["progress"] and ranks.is_main))
    total, count = 0.0, 0
    model.train()
    while run.step < total_steps and not run.stopped_early:
        batch = run.next_batch(len(train), settings["batch_size"])
        optimizer.zero_grad(set_to_none=True)
        loss = _batch_gradients(model, train, batch, ranks)
        optimizer.step()
        if hasattr(model, "project_lipschitz"):
            model.project_lipschitz()
        if not settings["plateau"]:
            scheduler.step()
        total, count = total + loss * batch.numel(), count + batch.numel()
        run.step += 1
        bar.update(1)
        if run.step % settings["interval"] == 0 or run.step == total_steps:
            _validate(run, model, optimizer, scheduler, validation, total / count, settings)
            bar.set_postfix(train=f"{total / count:.4g}", validation=f"{run.history['validation_loss'][-1]:.4g}")
            total, count = 0.0, 0
            model.train()
    bar.close()


def _batch_gradients(model: nn.Module, train: _ForceData, batch: Tensor, ranks: Ranks) -> float:
    """Back-propagate the mean loss of the global ``batch``; return it (summed over ranks).

    On K ranks each takes its share and weights its mean by ``n_local / n_global``; the summed
    gradient is the gradient of the global mean.
    """
    if not ranks.active:
        return train.accumulate_gradients(model, batch)
    local = ranks.shard(batch)
    value = 0.0
    if local.numel():
        value = train.accumulate_gradients(model, local, local.numel() / batch.numel())
    (summed,) = all_reduce_gradients(model.parameters(), ranks, [value])
    return summed


def _agreement(train: _ForceData, validation: _ForceData, model: nn.Module, configuration: dict,
               run: _RunState) -> dict:
    """What every rank of a distributed run must share: data, model, configuration, resumed step."""
    return {
        "training data shape": tuple(train.residual.shape),
        "validation data shape": tuple(validation.residual.shape),
        "training data": (train.positions, train.residual),
        "validation data": (validation.positions, validation.residual),
        "model": model.config() if hasattr(model, "config") else type(model).__name__,
        "initial parameters": model.state_dict(),
        "configuration": configuration,
        "checkpoint step": int(run.step),
    }


def _validate(run: _RunState, model: nn.Module, optimizer: Any, scheduler: Any, validation: _ForceData,
              train_loss: float, settings: dict) -> None:
    """Record losses, update the best state, the plateau schedule and early stopping; checkpoint."""
    validation_loss = _evaluate(model, validation, settings["batch_size"], settings["ranks"])
    if settings["plateau"]:
        scheduler.step(validation_loss)
    steps_since = run.step - (run.history["step"][-1] if run.history["step"] else 0)
    run.history["train_loss"].append(train_loss)
    run.history["validation_loss"].append(validation_loss)
    run.history["learning_rate"].append(float(optimizer.param_groups[0]["lr"]))
    run.history["step"].append(run.step)
    if validation_loss < run.best_loss - settings["minimum_improvement"]:
        run.best_loss, run.best_validation, run.best_step = validation_loss, len(run.history["step"]) - 1, run.step
        run.best_state = copy.deepcopy(model.state_dict())
        run.steps_without_improvement = 0
    else:
        run.steps_without_improvement += steps_since
    logger.info("step %d: train %.6g, validation %.6g (kJ/mol/nm)^2", run.step, train_loss, validation_loss)
    patience = settings["patience"]
    run.stopped_early = patience > 0 and run.steps_without_improvement >= patience
    if settings["checkpoint"] is not None and settings["ranks"].is_main:
        _save_checkpoint(
            settings["checkpoint"],
            {
                "checkpoint_version": CHECKPOINT_VERSION,
                "fingerprint": settings["fingerprint"],
                "model_state": model.state_dict(),
                "optimizer_state": optimizer.state_dict(),
                "scheduler_state": scheduler.state_dict(),
            } | run.state(),
        )
    if run.stopped_early:
        logger.info("early stopping at step %d (best at step %d)", run.step, run.best_step)


def _default_model(positions: np.ndarray, bonds: Any, model_kwargs: dict, seed: int, method: str) -> CGNet:
    kwargs = dict(model_kwargs)
    feature_set = kwargs.pop("feature_set", None) or DEFAULT_FEATURE_SETS[method]
    options = feature_set_options(feature_set, positions.shape[1], bonds)
    if "min_separation" in kwargs:
        options["min_separation"] = kwargs.pop("min_separation")
    features = InvariantFeatures.from_positions(positions, bonds=bonds, **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return CGNet(features, **kwargs)


def _evaluate(model: nn.Module, data: _ForceData, batch_size: int, ranks: Ranks = SINGLE_PROCESS) -> float:
    """Mean squared force error over a data set, (kJ/mol/nm)².

    The chunks are spread over the ranks and their sums added in chunk order, so the value is
    the same on every rank and equal to the one-process value.
    """
    model.eval()

    def chunk_total(index: int) -> list[float]:
        chunk = slice(index * batch_size, min((index + 1) * batch_size, len(data)))
        loss = data.loss(model, chunk, create_graph=False)
        return [float(loss.detach()) * (chunk.stop - chunk.start)]

    total = 0.0
    for (value,) in sum_over_chunks(math.ceil(len(data) / batch_size), chunk_total, 1, ranks):
        total += value
    return total / len(data)
