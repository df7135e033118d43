"""Maximum-likelihood training of a :class:`~openmm_flowmatch.flows.model.CGFlow`.

``train_flow`` minimises the negative log-likelihood ``−mean log q(x)`` of CG frames with Adam,
watches the NLL of a validation block, stops early when it stops improving, and returns the flow
with the best validation NLL. With ``checkpoint_path`` it writes a checkpoint after every epoch
(model, optimizer, learning-rate schedule, shuffling generator, early-stopping state, history) and
resumes from it: an interrupted run that is resumed ends with the same weights as an
uninterrupted one (same seed, same platform).

Under ``torchrun`` (``WORLD_SIZE > 1``) each rank takes its share of the same global batch and
the gradients are summed with one ``all_reduce`` per step, so K processes give the one-process
result at the same ``batch_size``; rank 0 writes the checkpoint (see docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..distributed import (
    SINGLE_PROCESS, Ranks, all_reduce_gradients, check_consistent, resolve_device, setup_distributed, sum_over_chunks,
)
from ..safe_files import load_plain, save_plain
from .model import CGFlow, FlowConfig

__all__ = ["train_flow", "negative_log_likelihood", "FlowTrainingError"]

logger = logging.getLogger(__name__)


class FlowTrainingError(ValueError):
    """Raised for unusable training input (wrong shape, too few frames, bad checkpoint)."""


def _positions_of(data: Any, name: str) -> np.ndarray:
    """Positions ``(frames, beads, 3)`` from an array or an object with ``.positions``."""
    positions = getattr(data, "positions", data)
    if isinstance(positions, torch.Tensor):
        positions = positions.detach().cpu().numpy()
    positions = np.asarray(positions)
    if positions.ndim != 3 or positions.shape[-1] != 3:
        raise FlowTrainingError(
            f"{name} must be positions of shape (frames, beads, 3) in nm or an object with such a "
            f".positions attribute (e.g. a CGDataset), got shape {positions.shape}"
        )
    if not np.isfinite(positions).all():
        raise FlowTrainingError(f"{name} contains NaN or infinite positions; remove those frames first")
    return positions


def _split(positions: np.ndarray, validation_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Last contiguous block for validation (frames close in time are correlated)."""
    if not 0.0 < validation_fraction < 1.0:
        raise FlowTrainingError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    n_validation = max(1, int(round(validation_fraction * len(positions))))
    if len(positions) - n_validation < 2:
        raise FlowTrainingError(f"too few frames ({len(positions)}) to train a flow with a validation block")
    return positions[:-n_validation], positions[-n_validation:]


@torch.no_grad()
def negative_log_likelihood(flow: CGFlow, positions: Any, batch_size: int = 4096) -> tuple[float, int]:
    """Mean ``−log q(x)`` (nats per frame) over the frames inside the flow's support.

    Returns
    -------
    nll, n_outside
        The mean over finite log-densities, and the number of frames outside the support
        (``log q = −inf``), which the mean leaves out.
    """
    return _chunked_nll(flow, torch.as_tensor(_positions_of(positions, "positions")), batch_size, SINGLE_PROCESS)


@torch.no_grad()
def _chunked_nll(flow: CGFlow, positions: torch.Tensor, batch_size: int, ranks: Ranks) -> tuple[float, int]:
    """:func:`negative_log_likelihood` with the chunks spread over the ranks (same value everywhere)."""

    def chunk_sums(index: int) -> list[float]:
        batch = positions[index * batch_size : (index + 1) * batch_size]
        log_q = flow.log_prob(batch.to(device=flow.center.device, dtype=flow.center.dtype))
        finite = torch.isfinite(log_q)
        return [float(-log_q[finite].sum()), int(finite.sum()), int((~finite).sum())]

    total, count, outside = 0.0, 0, 0
    for chunk_total, chunk_count, chunk_outside in sum_over_chunks(
        math.ceil(len(positions) / batch_size), chunk_sums, 3, ranks
    ):
        total += chunk_total
        count += int(chunk_count)
        outside += int(chunk_outside)
    return (total / count if count else math.inf), outside


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlowTrainingError("device='cuda' was requested but torch sees no CUDA device; use device='cpu'")
    return device


def _build_flow(train: np.ndarray, config: dict[str, Any], seed: int) -> CGFlow:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CGFlow.from_data(train, **config)


def train_flow(
    data: Any,
    *,
    validation_data: Any | None = None,
    validation_fraction: float = 0.1,
    flow: CGFlow | None = None,
    n_blocks: int = 4,
    bins: int = 8,
    hidden_features: int = 128,
    hidden_layers: int = 2,
    margin: float = 0.25,
    epochs: int = 50,
    batch_size: int = 512,
    learning_rate: float = 1e-3,
    learning_rate_decay: float = 0.95,
    weight_decay: float = 0.0,
    gradient_clip: float | None = 10.0,
    patience: int = 5,
    min_improvement: float = 1e-3,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = True,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    distributed: bool | None = None,
) -> CGFlow:
    """Train a :class:`CGFlow` on CG configurations by maximum likelihood.

    Parameters
    ----------
    data
        Training positions ``(frames, beads, 3)`` in nm (NumPy array or tensor), or an object with
        such a ``.positions`` attribute (e.g. ``CGDataset``, or the train part of its ``split()``).
    validation_data
        Validation positions (same forms). Default: the last ``validation_fraction`` of ``data``
        as one contiguous time block (frames close in time are correlated; never split at random);
        for a ``CGDataset`` the last block of every run (``data.split(validation_fraction, 0)``).
    validation_fraction
        Used only without ``validation_data``.
    flow
        A flow to continue training; default: a new ``CGFlow.from_data(train, n_blocks=…, …)``,
        its weights initialised with ``seed``.
    n_blocks, bins, hidden_features, hidden_layers, margin
        Architecture of a new flow (see :class:`~openmm_flowmatch.flows.model.FlowConfig`).
    epochs
        Maximum number of passes over the training frames.
    batch_size
        Frames per Adam step.
    learning_rate, learning_rate_decay
        Adam's initial learning rate, multiplied by ``learning_rate_decay`` after every epoch.
    weight_decay
        Adam's L2 weight decay.
    gradient_clip
        Clip the gradient norm of each step to this value (``None``: no clipping).
    patience, min_improvement
        Stop when the validation NLL has not improved by more than ``min_improvement`` nats for
        ``patience`` epochs; the returned flow holds the weights of the epoch with the lowest
        validation NLL.
    checkpoint_path
        File written after every epoch; with ``resume=True`` an existing one is continued.
    resume
        Continue from ``checkpoint_path`` if it exists (``False``: start over and overwrite it).
    seed
        Seeds the weights of a new flow and the shuffling of the training frames.
    device
        ``"cpu"``, ``"cuda"`` (or a ``torch.device``); ``None`` picks CUDA when available.
    dtype
        Floating-point type of the flow's weights and of training.
    progress
        Show a tqdm progress bar over epochs (rank 0 only).
    distributed
        ``None`` (default): data-parallel over the ranks of a ``torchrun`` job when
        ``WORLD_SIZE > 1`` or a process group is initialised; ``False``: train alone. Every rank
        takes its share of the same global batch of ``batch_size`` frames, so the result equals
        one process; all ranks must get the same data and arguments (else ``DistributedError``).

    Returns
    -------
    CGFlow
        The flow with the best validation NLL, in evaluation mode on ``device``. Its
        ``training_history`` attribute lists per-epoch ``{"epoch", "train_nll", "validation_nll",
        "learning_rate", "seconds"}`` (NLL in nats per frame).
    """
    train, validation = _training_and_validation_positions(data, validation_data, validation_fraction)
    if batch_size < 1 or epochs < 1 or patience < 1:
        raise FlowTrainingError("batch_size, epochs and patience must be ≥ 1")
    device = _resolve_device(device)
    ranks = setup_distributed(device, distributed)
    device = resolve_device(device, ranks)

    config = dict(n_blocks=n_blocks, bins=bins, hidden_features=hidden_features, hidden_layers=hidden_layers, margin=margin)
    if flow is None:
        flow = _build_flow(train, config, seed)
    flow = flow.to(device=device, dtype=dtype)
    optimizer = torch.optim.Adam(flow.parameters(), lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=learning_rate_decay)
    shuffle = torch.Generator().manual_seed(seed)

    state = {
        "epoch": 0,
        "best_validation": math.inf,
        "reference_validation": math.inf,
        "best_state": None,
        "stale_epochs": 0,
        "history": [],
        "done": False,
    }
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    if checkpoint_path is not None and resume and checkpoint_path.exists():
        state = _load_checkpoint(checkpoint_path, flow, optimizer, scheduler, shuffle, device)
        logger.info("resuming flow training from %s after epoch %d", checkpoint_path, state["epoch"])

    train_tensor = torch.as_tensor(train).to(device=device, dtype=dtype)
    validation_tensor = torch.as_tensor(validation)
    settings = dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, decay=learning_rate_decay,
                    weight_decay=weight_decay, gradient_clip=gradient_clip, patience=patience,
                    min_improvement=min_improvement, seed=seed, dtype=str(dtype), checkpoint=str(checkpoint_path))
    check_consistent(
        {"training data": train, "validation data": validation, "training data shape": train.shape,
         "validation data shape": validation.shape, "flow": dataclasses.asdict(flow.config),
         "initial parameters": flow.state_dict(), "configuration": settings, "checkpoint epoch": state["epoch"]},
        ranks, "flow training",
    )
    bar = tqdm(total=epochs, initial=state["epoch"], desc="flow training", unit="epoch",
               disable=not (progress and ranks.is_main))
    while state["epoch"] < epochs and not state["done"]:
        started = time.perf_counter()
        order = torch.randperm(len(train_tensor), generator=shuffle).to(device)
        train_nll = _train_one_epoch(flow, optimizer, train_tensor, order, batch_size, gradient_clip, ranks)
        flow.eval()
        validation_nll, outside = _chunked_nll(flow, validation_tensor, 4096, ranks)
        learning_rate_now = optimizer.param_groups[0]["lr"]
        scheduler.step()
        state["epoch"] += 1
        record = {
            "epoch": state["epoch"],
            "train_nll": train_nll,
            "validation_nll": validation_nll,
            "validation_outside_support": outside,
            "learning_rate": learning_rate_now,
            "seconds": time.perf_counter() - started,
        }
        _record_epoch(state, record, flow, min_improvement, patience)
        if outside:
            logger.warning("%d validation frames lie outside the flow's bond/angle intervals (log q = −inf)", outside)
        logger.info(
            "epoch %d: train NLL %.4f, validation NLL %.4f, %.1f s",
            record["epoch"], record["train_nll"], validation_nll, record["seconds"],
        )
        if checkpoint_path is not None and ranks.is_main:
            _save_checkpoint(checkpoint_path, flow, optimizer, scheduler, shuffle, state)
        bar.set_postfix(train=f"{record['train_nll']:.3f}", validation=f"{validation_nll:.3f}")
        bar.update(1)
    bar.close()

    if state["best_state"] is not None:
        flow.load_state_dict(state["best_state"])
    flow.eval()
    flow.training_history = list(state["history"])
    return flow


def _training_and_validation_positions(data: Any, validation_data: Any,
                                       validation_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation frames: ``validation_data`` when given, else a CGDataset's split
    (the last block of every run validates), else the last ``validation_fraction`` of ``data``."""
    if validation_data is not None:
        train = _positions_of(data, "data")
        validation = _positions_of(validation_data, "validation_data")
    elif hasattr(data, "split") and hasattr(data, "positions"):
        train_set, validation_set, _ = data.split(validation=validation_fraction, test=0.0)
        train = _positions_of(train_set, "data")
        validation = _positions_of(validation_set, "validation_data")
        if len(validation) == 0:
            raise FlowTrainingError(f"validation_fraction={validation_fraction} leaves no validation frames")
    else:
        train, validation = _split(_positions_of(data, "data"), validation_fraction)
    if train.shape[1:] != validation.shape[1:]:
        raise FlowTrainingError(
            f"training frames have {train.shape[1]} beads but validation frames have {validation.shape[1]}"
        )
    return train, validation


def _train_one_epoch(flow: CGFlow, optimizer: torch.optim.Optimizer, train: Tensor, order: Tensor, batch_size: int,
                     gradient_clip: Optional[float], ranks: Ranks) -> float:
    """One pass over ``train`` in the order ``order``; the mean training NLL (nats per frame)."""
    flow.train()
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = _batch_gradients(flow, train, batch, ranks)
        if gradient_clip is not None:
            torch.nn.utils.clip_grad_norm_(flow.parameters(), gradient_clip)
        optimizer.step()
        total += loss * len(batch)
        count += len(batch)
    return total / count


def _record_epoch(state: dict, record: dict, flow: CGFlow, min_improvement: float, patience: int) -> None:
    """Add the epoch's record to ``state``: keep the best weights, count epochs without an
    improvement of ``min_improvement`` and stop after ``patience`` of them."""
    state["history"].append(record)
    validation_nll = record["validation_nll"]
    if validation_nll < state["best_validation"]:
        state["best_validation"] = validation_nll
        state["best_state"] = {k: v.detach().cpu().clone() for k, v in flow.state_dict().items()}
    if validation_nll < state["reference_validation"] - min_improvement:
        state["reference_validation"] = validation_nll
        state["stale_epochs"] = 0
    else:
        state["stale_epochs"] += 1
        if state["stale_epochs"] >= patience:
            state["done"] = True
            logger.info("early stopping after epoch %d (best validation NLL %.4f)", state["epoch"], state["best_validation"])


OUTSIDE_SUPPORT_MESSAGE = (
    "a training frame has log q = −inf (outside the flow's bond/angle intervals): the flow was fitted to other "
    "data; build it from these training frames"
)


def _batch_gradients(flow: CGFlow, frames: torch.Tensor, batch: torch.Tensor, ranks: Ranks) -> float:
    """Back-propagate −mean log q over the global ``batch`` of frame indices; return the loss.

    On K ranks each takes its share, weights its mean by ``n_local / n_global`` and the gradients
    are summed; a frame outside the support on any rank raises on every rank.
    """
    local = ranks.shard(batch)
    value, outside = 0.0, 0.0
    if local.numel():
        log_q = flow.log_prob(frames[local])
        if torch.isfinite(log_q).all():
            loss = -log_q.mean() * (local.numel() / batch.numel()) if ranks.active else -log_q.mean()
            loss.backward()
            value = float(loss.detach())
        else:
            outside = 1.0
    if ranks.active:
        value, outside = all_reduce_gradients(flow.parameters(), ranks, [value, outside])
    if outside:
        raise FlowTrainingError(OUTSIDE_SUPPORT_MESSAGE)
    return value


CHECKPOINT_KIND = "openmm_flowmatch.train_flow checkpoint"
CHECKPOINT_REMEDY = "delete it or pass resume=False to start the training afresh"
"""What a refused flow checkpoint's message tells the user to do."""


def _save_checkpoint(path: Path, flow, optimizer, scheduler, shuffle: torch.Generator, state: dict) -> None:
    """Write a checkpoint atomically: plain content plus its SHA-256 checksum (no pickled objects)."""
    payload = {
        "kind": CHECKPOINT_KIND,
        "config": dataclasses.asdict(flow.config),
        "model": {k: v.detach().cpu() for k, v in flow.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "shuffle": shuffle.get_state(),
        "state": state,
    }
    save_plain(payload, path, FlowTrainingError)


def _load_checkpoint(path: Path, flow, optimizer, scheduler, shuffle: torch.Generator, device) -> dict:
    """Restore flow, optimiser, schedule and shuffling from a checkpoint; return the loop state.

    The file is read with ``torch.load(weights_only=True)`` and its checksum verified.

    Raises
    ------
    FlowTrainingError
        One line naming the file, for a truncated, corrupt, pickled or foreign file, or a
        checkpoint of another architecture.
    """
    payload = load_plain(path, what="flow training checkpoint", remedy=CHECKPOINT_REMEDY,
                         error=FlowTrainingError, map_location=device)
    if payload.get("kind") != CHECKPOINT_KIND:
        raise FlowTrainingError(f"{path} is not a train_flow checkpoint; delete it or pass resume=False")
    try:
        config = FlowConfig(**payload["config"])
    except (KeyError, TypeError) as error:
        raise FlowTrainingError(f"{path}: the flow training checkpoint is inconsistent ({error}); {CHECKPOINT_REMEDY}") from None
    if config != flow.config:
        raise FlowTrainingError(
            f"checkpoint {path} was written for a different flow ({payload['config']}); "
            "delete it, pass resume=False, or use the same architecture"
        )
    flow.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    shuffle.set_state(payload["shuffle"].cpu())
    return payload["state"]
