"""Training and sampling on several processes (``torchrun``, SLURM), data-parallel and exact.

``train_flow``, ``sample_teacher`` and ``train_force_field`` call :func:`setup_distributed`: when
the ``torch.distributed`` environment variables of ``torchrun`` are present (``WORLD_SIZE > 1``)
it starts the process group (``gloo`` on CPU, ``nccl`` on CUDA) unless one is already running,
and returns the :class:`Ranks` of this process. Without them everything runs as one process,
unchanged.

The scheme (see ``docs/distributed.md``):

- **Same global batch.** Every rank draws the same global permutation of the training frames
  (same seeded generator), cuts the same global batch, and takes its contiguous share
  (:meth:`Ranks.shard`, ``torch.tensor_split``: sizes differ by at most one, so no divisibility
  is required). Its loss is the local mean weighted by ``n_local / n_global``; the summed
  gradients (:func:`all_reduce_gradients`, one ``all_reduce`` of a flat buffer per step) are
  then the gradient of the global mean, whatever the number of ranks. DistributedDataParallel
  is not used: force matching differentiates forces (``create_graph=True``, double
  back-propagation), which DDP does not support, and a hand-made ``all_reduce`` is exact.
- **Identical state on every rank.** All ranks hold the same parameters and optimiser state
  and apply the same summed gradient, so the Lipschitz projection, the learning-rate schedule
  and early stopping run identically everywhere. Validation losses are summed per chunk
  (:func:`sum_over_chunks`) and added up in the single-process order, so they equal the
  single-process values bit for bit at equal parameters.
- **Checkpoints** are written by rank 0 (atomically, through ``safe_files``) and read by every
  rank from the same path, which must therefore lie on a file system all nodes share; a rank
  that resumed from another step raises :class:`DistributedError`.
- **Agreement.** :func:`check_consistent` compares digests of the data, the configuration and
  the initial parameters across ranks and raises :class:`DistributedError` naming what differs.
- **Logging.** Ranks other than 0 show no progress bars and log warnings and errors only.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "Ranks", "DistributedError", "SINGLE_PROCESS", "setup_distributed", "environment_world_size",
    "is_main_process", "all_reduce_gradients", "sum_over_chunks", "check_consistent", "digest",
    "run_on_rank_zero", "gather_to_rank_zero", "rank_seed", "resolve_device",
]

logger = logging.getLogger(__name__)

PACKAGE_LOGGER = "openmm_flowmatch"
"""Logger whose level is raised to WARNING on ranks other than 0."""


class DistributedError(RuntimeError):
    """Ranks disagree (data, configuration, checkpoint) or a rank failed a shared step."""


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a (possibly one-process) job.

    Attributes
    ----------
    rank
        Global rank, 0 … ``world_size − 1``.
    world_size
        Number of processes.
    local_rank
        Rank on this node (picks the CUDA device).
    communication_device
        Device of the tensors handed to collectives (``cuda:local_rank`` for nccl, else cpu).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    communication_device: str = "cpu"

    @property
    def active(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (writes files, shows progress, logs)."""
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch of indices (sizes differ by ≤ 1)."""
        if not self.active:
            return batch
        return torch.tensor_split(batch, self.world_size)[self.rank]

    def share(self, total: int) -> int:
        """This rank's part of ``total`` items split as evenly as possible (lower ranks get the rest)."""
        return total // self.world_size + int(self.rank < total % self.world_size)


SINGLE_PROCESS = Ranks()
"""The :class:`Ranks` of a run without ``torch.distributed``."""


def environment_world_size() -> int:
    """``WORLD_SIZE`` from the environment (set by ``torchrun``), 1 when absent."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def _current_ranks() -> Ranks:
    import torch.distributed as dist

    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    return Ranks(rank, world_size, local_rank, device)


def setup_distributed(device: Any = "cpu", distributed: Optional[bool] = None) -> Ranks:
    """Join (or start) the process group of a ``torchrun`` job; one process otherwise.

    Parameters
    ----------
    device
        The device the caller computes on: CUDA selects the ``nccl`` backend (and the device
        ``LOCAL_RANK``), anything else ``gloo``.
    distributed
        ``None`` (default): distributed when a process group is already initialised or the
        environment has ``WORLD_SIZE > 1``. ``False``: always one process, ignoring both.
        ``True``: like ``None``, but raise when there is no multi-process environment.

    Returns
    -------
    Ranks
        :data:`SINGLE_PROCESS` or this process's place in the group.

    Raises
    ------
    DistributedError
        ``distributed=True`` without ``torch.distributed`` or without a ``torchrun`` environment.
    """
    if distributed is False:
        return SINGLE_PROCESS
    import torch.distributed as dist

    if not dist.is_available():
        if distributed:
            raise DistributedError("this PyTorch build has no torch.distributed; install a build with it")
        return SINGLE_PROCESS
    if dist.is_initialized():
        return _current_ranks()
    if environment_world_size() <= 1:
        if distributed:
            raise DistributedError(
                "distributed=True but WORLD_SIZE is not > 1: start the command with torchrun --nproc_per_node K"
            )
        return SINGLE_PROCESS
    _init_process_group(torch.device(device) if device is not None else torch.device("cpu"))
    return _current_ranks()


def _init_process_group(device: torch.device) -> None:
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    atexit.register(_shutdown)
    if dist.get_rank() != 0:
        package = logging.getLogger(PACKAGE_LOGGER)
        package.setLevel(max(package.getEffectiveLevel(), logging.WARNING))
    logger.info("joined a %s process group of %d ranks", backend, dist.get_world_size())


def _shutdown() -> None:
    """Destroy the process group this module started (at interpreter exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()  # no rank tears down its connections while another still uses them
        except Exception:  # noqa: BLE001 - a rank that died already: destroy anyway
            pass
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True unless this process is a rank other than 0 of an initialised process group."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def resolve_device(device: Any, ranks: Ranks) -> Any:
    """``cuda`` without an index becomes ``cuda:LOCAL_RANK`` on a multi-process run."""
    if device is None or not ranks.active:
        return device
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", ranks.local_rank)
    return resolved


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s random stream for sharded sampling.

    Rank 0 uses ``seed`` itself (so one process and rank 0 of many draw the same stream); rank
    ``r > 0`` uses a 63-bit integer from ``numpy.random.SeedSequence([seed, r])``, so the streams of
    different ranks and seeds do not overlap the way ``seed + rank`` would (rank 1 of seed 0 would
    repeat one process with seed 1).
    """
    if rank == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


# ---------------------------------------------------------------------------------- collectives
def all_reduce_gradients(parameters: Iterable[torch.Tensor], ranks: Ranks,
                         extras: Sequence[float] = ()) -> list[float]:
    """Sum the gradients of ``parameters`` (and the numbers ``extras``) over all ranks, in place.

    One ``all_reduce`` of a flat float64 buffer (two for lower precision: the gradients in the
    parameters' dtype, flags and extras in float64). A parameter without a gradient on one rank
    counts as zero there; it keeps no gradient only when no rank has one (as in one
    process). Each rank must weight its loss so that the sum is the global loss (local mean ×
    ``n_local / n_global``).

    Returns
    -------
    list of float
        ``extras`` summed over ranks.
    """
    parameters = [parameter for parameter in parameters if parameter.requires_grad]
    if not ranks.active:
        return [float(value) for value in extras]
    import torch.distributed as dist

    dtype = parameters[0].dtype if parameters else torch.float64
    device = parameters[0].device if parameters else torch.device(ranks.communication_device)
    pieces = [p.grad.reshape(-1).to(dtype) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype, device=device)
              for p in parameters]
    present = [1.0 if p.grad is not None else 0.0 for p in parameters]
    tail = torch.tensor(present + [float(value) for value in extras], dtype=torch.float64, device=device)
    if dtype == torch.float64:  # one collective for gradients, flags and extras
        flat = torch.cat(pieces + [tail])
        dist.all_reduce(flat)
        flat, tail = flat[: flat.numel() - tail.numel()], flat[flat.numel() - tail.numel():]
    else:
        flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=dtype, device=device)
        dist.all_reduce(flat)
        dist.all_reduce(tail)
    return _unpack_gradients(parameters, flat, tail.cpu(), len(extras))


def _unpack_gradients(parameters: list, flat: torch.Tensor, tail: torch.Tensor, n_extras: int) -> list[float]:
    offset = 0
    for index, parameter in enumerate(parameters):
        size = parameter.numel()
        if float(tail[index]) > 0:
            parameter.grad = flat[offset:offset + size].view_as(parameter).to(parameter.dtype).clone()
        offset += size
    return [float(value) for value in tail[len(parameters):len(parameters) + n_extras]]


def sum_over_chunks(n_chunks: int, compute: Callable[[int], Sequence[float]], width: int,
                    ranks: Ranks) -> list[list[float]]:
    """Per-chunk sums, computed round-robin over ranks and shared with every rank.

    Parameters
    ----------
    n_chunks
        Number of chunks (e.g. validation batches).
    compute
        ``compute(index) -> width numbers`` for chunk ``index``; rank ``r`` computes the chunks
        ``index ≡ r (mod world_size)``.
    width
        How many numbers each chunk gives.
    ranks
        The job.

    Returns
    -------
    list of list of float
        ``n_chunks`` rows in chunk order, identical on every rank. All-reducing rows that are
        zero on every rank but one is exact, so a caller that adds the rows in order gets the
        single-process result bit for bit.
    """
    rows = torch.zeros(n_chunks, width, dtype=torch.float64)
    for index in range(ranks.rank, n_chunks, ranks.world_size):
        rows[index] = torch.tensor([float(value) for value in compute(index)], dtype=torch.float64)
    if ranks.active:
        import torch.distributed as dist

        shared = rows.to(ranks.communication_device)
        dist.all_reduce(shared)
        rows = shared.cpu()
    return rows.tolist()


# ------------------------------------------------------------------------------------ agreement
def digest(value: Any) -> str:
    """SHA-256 (hex) of a value: arrays and tensors by dtype, shape and bytes, containers by content."""
    from .safe_files import content_digest, to_plain

    return content_digest({"value": to_plain(value)})


def _short(value: Any, limit: int = 200) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_consistent(entries: dict[str, Any], ranks: Ranks, what: str) -> None:
    """Raise on every rank when the ranks disagree about any of ``entries``.

    Parameters
    ----------
    entries
        Named values every rank must share: data arrays (compared by digest), shapes,
        configuration dicts, checkpoint positions. Every rank must pass the same names.
    ranks
        The job (nothing is done for one process).
    what
        What the entries describe, for the message (e.g. ``"force-field training"``).

    Raises
    ------
    DistributedError
        Naming each entry that differs and its value (or digest) on every rank.
    """
    if not ranks.active:
        return
    import torch.distributed as dist

    names = sorted(entries)
    hashes = {name: digest(entries[name]) for name in names}
    local = torch.tensor([int(hashes[name][:15], 16) for name in names] + [len(names)], dtype=torch.int64)
    local = local.to(ranks.communication_device)
    gathered = [torch.zeros_like(local) for _ in range(ranks.world_size)]
    dist.all_gather(gathered, local)
    gathered = [tensor.cpu() for tensor in gathered]
    if all(torch.equal(gathered[0], other) for other in gathered):
        return
    summaries: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(summaries, {name: (hashes[name], _summary(entries[name], hashes[name])) for name in names})
    raise DistributedError(_disagreement(summaries, what))


def _holds_arrays(value: Any) -> bool:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return True
    if isinstance(value, dict):
        return any(_holds_arrays(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_arrays(item) for item in value)
    return False


def _summary(value: Any, hashed: str) -> str:
    """A short repr of small plain values, the checksum of arrays and long values."""
    if _holds_arrays(value) or len(repr(value)) > 200:
        return f"checksum {hashed[:12]}"
    return _short(value)


def _disagreement(summaries: list[dict], what: str) -> str:
    names = sorted(set().union(*summaries))
    differing = [name for name in names if len({str(summary.get(name, ("",))[0]) for summary in summaries}) > 1]
    parts = []
    for name in differing:
        values = ", ".join(f"rank {rank}: {summary.get(name, (None, None))[1]}" for rank, summary in enumerate(summaries))
        parts.append(f"{name} ({values})")
    return (
        f"the {len(summaries)} ranks of this {what} disagree about {'; '.join(parts)}; every rank must be "
        "started with the same data files, options and checkpoint (a checkpoint must lie on a file system "
        "all nodes share)"
    )


# ------------------------------------------------------------------------------- rank-0 actions
def run_on_rank_zero(function: Callable[[], Any], ranks: Ranks) -> Any:
    """Run ``function`` on rank 0 only and hand its result (or its exception) to every rank.

    Rank 0 re-raises its own exception; the other ranks raise the same exception object, so no
    rank is left waiting when rank 0 fails to write a file.
    """
    if not ranks.active:
        return function()
    import torch.distributed as dist

    message: list[Any] = [None]
    failure: Optional[BaseException] = None
    if ranks.is_main:
        try:
            message[0] = ("ok", function())
        except Exception as error:  # noqa: BLE001 - forwarded to the other ranks, then re-raised
            failure, message[0] = error, ("error", _picklable(error))
    dist.broadcast_object_list(message, src=0)
    if failure is not None:
        raise failure
    status, payload = message[0]
    if status == "error":
        raise payload
    return payload


def _picklable(error: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return DistributedError(f"rank 0 failed: {type(error).__name__}: {error}")


def gather_to_rank_zero(value: Any, ranks: Ranks) -> Optional[list]:
    """``[value of rank 0, value of rank 1, …]`` on rank 0, ``None`` on the others."""
    if not ranks.active:
        return [value]
    import torch.distributed as dist

    gathered: Optional[list] = [None] * ranks.world_size if ranks.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


# ------------------------------------------------------------------------ ensembles without a group
def environment_ranks() -> Ranks:
    """This process's place in a multi-process job, read from the launcher's environment.

    Independent simulation replicas need no process group: ``torchrun`` sets ``RANK``,
    ``WORLD_SIZE`` and ``LOCAL_RANK``; SLURM's ``srun`` sets ``SLURM_PROCID``, ``SLURM_NTASKS``
    and ``SLURM_LOCALID`` (used when the ``torchrun`` variables are absent). One process otherwise.

    Raises
    ------
    DistributedError
        If the variables are not integers or the rank is outside ``0 … world_size − 1``.
    """
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK") if "WORLD_SIZE" in os.environ else (
        "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    try:
        rank, world_size = int(os.environ.get(names[0], "0")), int(os.environ.get(names[1], "1"))
        local_rank = int(os.environ.get(names[2], rank))
    except ValueError:
        raise DistributedError(f"{', '.join(names)} must be integers, got "
                               f"{[os.environ.get(name) for name in names]}") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"{names[0]}={rank} is not a rank of {names[1]}={world_size}")
    return Ranks(rank, world_size, local_rank)


def replica_slice(total: int, ranks: Ranks) -> slice:
    """The replicas ``start:stop`` of ``total`` that rank ``ranks.rank`` simulates (in rank order).

    Raises
    ------
    DistributedError
        If there are fewer replicas than ranks (a rank would have nothing to do).
    """
    if total < ranks.world_size:
        raise DistributedError(
            f"{total} replicas cannot be split over {ranks.world_size} processes; ask for at least one replica per process"
        )
    start = sum(Ranks(rank, ranks.world_size).share(total) for rank in range(ranks.rank))
    return slice(start, start + ranks.share(total))
