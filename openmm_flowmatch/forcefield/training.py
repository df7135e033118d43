"""Force matching: train U_net so that −∇(U_prior + U_net) matches target forces.

One trainer serves both data sources of DESIGN.md: teacher forces from the flow (flow-matching)
and mapped all-atom forces (the force-matching baseline). It only sees CG positions (nm) and
forces (kJ/mol/nm); ``method`` is recorded, nothing else changes.

The loss is the mean squared error over all force components, in (kJ/mol/nm)²,

    L = mean ‖ −∇U_net(x) − (F_target(x) − F_prior(x)) ‖²,

which equals MSE(−∇(U_prior + U_net), F_target) because the prior has no trainable parameters;
the prior forces are computed once per frame. Gradients of the forces with respect to the network
parameters go through ``torch.autograd.grad(..., create_graph=True)``.
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

from .features import InvariantFeatures
from .networks import CGNet

__all__ = ["train_force_field", "TrainingError", "force_matching_loss", "forces_of", "METHODS"]

logger = logging.getLogger(__name__)

METHODS = ("flow-matching", "force-matching")
"""Accepted values of ``method`` (recorded in the training info and the artifact metadata)."""

CHECKPOINT_VERSION = 1


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


# ------------------------------------------------------------------------------------ checkpoints
def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def _load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise TrainingError(f"cannot read the training checkpoint {path}: {error}; delete it to start afresh") from error
    if not isinstance(state, dict) or state.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise TrainingError(f"{path} is not a force-field training checkpoint of this package; delete it or pick another path")
    return state


# ---------------------------------------------------------------------------------------- trainer
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
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    learning_rate_factor: float = 0.5,
    learning_rate_patience: int = 5,
    minimum_learning_rate: float = 1e-6,
    weight_decay: float = 0.0,
    early_stopping_patience: int = 15,
    minimum_improvement: float = 0.0,
    checkpoint_path: Optional[str | os.PathLike] = None,
    resume: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
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
        ``activation``, ``lipschitz_bound``), plus ``min_separation`` for its features.
    epochs
        Maximum number of passes over the training frames (default 100), counting the epochs
        of a resumed checkpoint.
    batch_size
        Frames per optimiser step (default 128).
    learning_rate
        Initial Adam learning rate (default 1e-3).
    learning_rate_factor, learning_rate_patience, minimum_learning_rate
        The learning rate is multiplied by ``learning_rate_factor`` when the validation loss has
        not improved for ``learning_rate_patience`` epochs, down to ``minimum_learning_rate``
        (``torch.optim.lr_scheduler.ReduceLROnPlateau``; defaults 0.5, 5, 1e-6).
    weight_decay
        Adam weight decay (default 0).
    early_stopping_patience
        Stop when the validation loss has not improved by more than ``minimum_improvement``
        ((kJ/mol/nm)²) for this many epochs (default 15; 0 switches early stopping off).
    checkpoint_path
        File written after every epoch (model, optimiser, scheduler, history, random state).
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
    progress
        Show a tqdm progress bar over epochs.

    Returns
    -------
    torch.nn.Module
        The model with the weights of the best validation epoch, in eval mode, on ``device``.
        Its attribute ``training_info`` (a JSON-able dict: method, frames, epochs, seed,
        per-epoch losses in (kJ/mol/nm)², …) is meant for ``export_force_field(training=…)``.

    Raises
    ------
    TrainingError
        Missing forces, inconsistent shapes, non-finite data, a bead count the model does not
        take, an unknown ``method`` or an unreadable checkpoint.
    """
    if method not in METHODS:
        raise TrainingError(f"method must be one of {METHODS}, got {method!r}")
    if epochs < 0 or batch_size < 1 or not learning_rate > 0:
        raise TrainingError("epochs must be >= 0, batch_size >= 1 and learning_rate > 0")
    positions, forces = _positions_and_forces(data, "training data")
    if validation_data is not None:
        train_positions, train_forces = positions, forces
        validation_positions, validation_forces = _positions_and_forces(validation_data, "validation data")
    else:
        if not 0.0 < validation_fraction < 1.0:
            raise TrainingError(f"validation_fraction must lie in (0, 1), got {validation_fraction}")
        n_validation = max(1, int(round(validation_fraction * positions.shape[0])))
        if n_validation >= positions.shape[0]:
            raise TrainingError(f"{positions.shape[0]} frames are too few to hold out a validation block")
        split = positions.shape[0] - n_validation
        train_positions, train_forces = positions[:split], forces[:split]
        validation_positions, validation_forces = positions[split:], forces[split:]
    if validation_positions.shape[1:] != train_positions.shape[1:]:
        raise TrainingError("validation and training data have different numbers of beads")
    n_beads = train_positions.shape[1]

    device = torch.device(device)
    if model is None:
        model = _default_model(train_positions, bonds, model_kwargs or {}, seed)
    model_beads = getattr(model, "n_beads", n_beads)
    if model_beads != n_beads:
        raise TrainingError(f"the model takes {model_beads} beads but the data has {n_beads}")
    model = model.to(device=device, dtype=dtype)

    def as_tensor(array: np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(array), dtype=dtype, device=device)

    train_x = as_tensor(train_positions)
    train_residual = as_tensor(train_forces - _prior_forces(priors, train_positions))
    validation_x = as_tensor(validation_positions)
    validation_residual = as_tensor(validation_forces - _prior_forces(priors, validation_positions))

    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=learning_rate_factor, patience=learning_rate_patience, min_lr=minimum_learning_rate
    )
    generator = torch.Generator().manual_seed(int(seed))
    history: dict[str, list[float]] = {"train_loss": [], "validation_loss": [], "learning_rate": []}
    best_loss, best_epoch, best_state = math.inf, -1, copy.deepcopy(model.state_dict())
    epochs_without_improvement, start_epoch, stopped_early = 0, 0, False

    fingerprint = {
        "frames": int(train_positions.shape[0]),
        "validation_frames": int(validation_positions.shape[0]),
        "beads": int(n_beads),
        "parameters": int(sum(parameter.numel() for parameter in model.parameters())),
        "seed": int(seed),
        "method": method,
    }
    checkpoint = Path(checkpoint_path) if checkpoint_path is not None else None
    if checkpoint is not None and resume and checkpoint.exists():
        state = _load_checkpoint(checkpoint)
        if state.get("fingerprint") != fingerprint:
            raise TrainingError(
                f"the checkpoint {checkpoint} was written for another run ({state.get('fingerprint')}, this one: "
                f"{fingerprint}); pass resume=False to overwrite it or choose another checkpoint_path"
            )
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        generator.set_state(state["generator_state"])
        history = state["history"]
        best_loss, best_epoch, best_state = state["best_loss"], state["best_epoch"], state["best_state"]
        epochs_without_improvement, stopped_early = state["epochs_without_improvement"], state["stopped_early"]
        start_epoch = state["epoch"] + 1
        logger.info("resuming force-field training from %s at epoch %d", checkpoint, start_epoch)

    initial_validation = history.get("initial_validation_loss")
    if initial_validation is None:
        initial_validation = [_evaluate(model, validation_x, validation_residual, batch_size)]
        history["initial_validation_loss"] = initial_validation

    from tqdm.auto import tqdm

    started = time.perf_counter()
    epoch_range = range(start_epoch, epochs) if not stopped_early else range(0)
    bar = tqdm(epoch_range, desc="force matching", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        order = torch.randperm(train_x.shape[0], generator=generator).to(device)
        total, count = 0.0, 0
        for batch in order.split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = force_matching_loss(model, train_x[batch], train_residual[batch], create_graph=True)
            loss.backward()
            optimizer.step()
            if hasattr(model, "project_lipschitz"):
                model.project_lipschitz()
            total += float(loss.detach()) * batch.numel()
            count += batch.numel()
        train_loss = total / count
        validation_loss = _evaluate(model, validation_x, validation_residual, batch_size)
        scheduler.step(validation_loss)
        history["train_loss"].append(train_loss)
        history["validation_loss"].append(validation_loss)
        history["learning_rate"].append(float(optimizer.param_groups[0]["lr"]))
        if validation_loss < best_loss - minimum_improvement:
            best_loss, best_epoch = validation_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
            epochs_without_improvement = 0
        else:
            epochs_without_improvement += 1
        bar.set_postfix(train=f"{train_loss:.4g}", validation=f"{validation_loss:.4g}")
        logger.info("epoch %d: train %.6g, validation %.6g (kJ/mol/nm)^2", epoch, train_loss, validation_loss)
        stopped_early = early_stopping_patience > 0 and epochs_without_improvement >= early_stopping_patience
        if checkpoint is not None:
            _save_checkpoint(
                checkpoint,
                {
                    "checkpoint_version": CHECKPOINT_VERSION,
                    "fingerprint": fingerprint,
                    "epoch": epoch,
                    "model_state": model.state_dict(),
                    "optimizer_state": optimizer.state_dict(),
                    "scheduler_state": scheduler.state_dict(),
                    "generator_state": generator.get_state(),
                    "history": history,
                    "best_loss": best_loss,
                    "best_epoch": best_epoch,
                    "best_state": best_state,
                    "epochs_without_improvement": epochs_without_improvement,
                    "stopped_early": stopped_early,
                },
            )
        if stopped_early:
            logger.info("early stopping after epoch %d (best epoch %d)", epoch, best_epoch)
            break
    bar.close()

    model.load_state_dict(best_state)
    model.eval()
    model.training_info = {
        "method": method,
        "frames": int(train_positions.shape[0]),
        "validation_frames": int(validation_positions.shape[0]),
        "epochs": len(history["train_loss"]),
        "best_epoch": int(best_epoch),
        "stopped_early": bool(stopped_early),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "learning_rate": float(learning_rate),
        "weight_decay": float(weight_decay),
        "dtype": str(dtype).replace("torch.", ""),
        "temperature": _temperature_of(data),
        "loss": "mean squared force error, (kJ/mol/nm)^2",
        "initial_validation_loss": float(initial_validation[0]),
        "best_validation_loss": float(best_loss) if math.isfinite(best_loss) else None,
        "train_loss": [float(value) for value in history["train_loss"]],
        "validation_loss": [float(value) for value in history["validation_loss"]],
        "training_seconds": time.perf_counter() - started,
        "model": model.config() if hasattr(model, "config") else {"class": type(model).__name__},
    }
    return model


def _default_model(positions: np.ndarray, bonds: Any, model_kwargs: dict, seed: int) -> CGNet:
    kwargs = dict(model_kwargs)
    min_separation = kwargs.pop("min_separation", 2)
    features = InvariantFeatures.from_positions(positions, bonds=bonds, min_separation=min_separation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return CGNet(features, **kwargs)


def _evaluate(model: nn.Module, positions: Tensor, residual_forces: Tensor, batch_size: int) -> float:
    """Mean squared force error over a data set, (kJ/mol/nm)²."""
    model.eval()
    total = 0.0
    for start in range(0, positions.shape[0], batch_size):
        chunk = slice(start, start + batch_size)
        loss = force_matching_loss(model, positions[chunk], residual_forces[chunk], create_graph=False)
        total += float(loss.detach()) * positions[chunk].shape[0]
    return total / positions.shape[0]
