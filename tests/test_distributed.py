"""Distributed training and sampling: K gloo processes on localhost give the one-process results.

Every multi-process test spawns 2 workers with ``torch.multiprocessing`` (start method spawn).
Each worker sets the environment ``torchrun`` would set (MASTER_ADDR, MASTER_PORT, RANK,
WORLD_SIZE, LOCAL_RANK) and calls the library function unchanged, which then starts the gloo
process group itself. Results come back through files in ``tmp_path``.

Tolerances: float64 training, validation-loss curves and parameters within 1e-10 relative of one
process at the same global batch (the only differences are the order in which the two halves of
a gradient are added, ~1e-16 per step).
"""

from __future__ import annotations

import math
import os
import signal
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from openmm_flowmatch.distributed import (
    SINGLE_PROCESS, DistributedError, Ranks, all_reduce_gradients, check_consistent, rank_seed, sum_over_chunks,
)

RELATIVE_TOLERANCE = 1e-10
N_BEADS = 5


# ------------------------------------------------------------------------------------ data, models
def chains(n_frames: int, seed: int) -> np.ndarray:
    """Random 5-bead chains with bonds of ~0.15 nm, (frames, 5, 3) nm."""
    generator = np.random.default_rng(seed)
    steps = generator.normal(size=(n_frames, N_BEADS, 3))
    lengths = 0.15 + 0.01 * generator.normal(size=(n_frames, N_BEADS, 1))
    return np.cumsum(lengths * steps / np.linalg.norm(steps, axis=-1, keepdims=True), axis=1)


def force_data(n_frames: int = 240, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Positions and forces of a pair potential k (d − 0.3)² + cos(d / 0.1) over all pairs."""
    from openmm_flowmatch.forcefield import forces_of

    first, second = torch.triu_indices(N_BEADS, N_BEADS, 2)

    def energy(x: torch.Tensor) -> torch.Tensor:
        distances = torch.linalg.vector_norm(x[..., second, :] - x[..., first, :], dim=-1)
        return (100.0 * (distances - 0.3) ** 2 + 5.0 * torch.cos(distances / 0.1)).sum(-1)

    positions = chains(n_frames, seed)
    return positions, forces_of(energy, torch.tensor(positions)).numpy()


FORCE_FIELD_OPTIONS = dict(
    validation_fraction=0.2, model_kwargs={"hidden_width": 16, "n_layers": 2, "lipschitz_bound": 3.0},
    epochs=3, batch_size=25, validation_interval=4, learning_rate=3e-3, dtype=torch.float64, seed=11,
    early_stopping_patience=0, progress=False,
)
"""192 training frames in global batches of 25 (shares 13 + 12, the last batch 17 = 9 + 8)."""

FLOW_OPTIONS = dict(n_blocks=1, bins=6, hidden_features=16, epochs=3, batch_size=50, dtype=torch.float64,
                    seed=5, progress=False)
"""270 training frames in global batches of 50 (the last one 20)."""


TEACHER_THRESHOLD = 3.0e4
"""(kT/nm)²: drops ~12 % of this flow's samples, so the dropped fraction is tested."""


def small_flow():
    """A 5-bead flow with random (not trained) conditioners, the same in every process."""
    from openmm_flowmatch.flows import CGFlow

    torch.manual_seed(2)
    flow = CGFlow.from_data(chains(400, 9), n_blocks=1, hidden_features=16, bins=6)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for coupling in flow.couplings:
            last = coupling.conditioner[-1]
            last.weight.copy_(0.3 * torch.randn(last.weight.shape, generator=generator))
            last.bias.copy_(0.3 * torch.randn(last.bias.shape, generator=generator))
    return flow


# ----------------------------------------------------------------------------------------- tasks
def task_force_field(rank: int, options: dict) -> dict:
    from openmm_flowmatch.forcefield import train_force_field

    positions, forces = force_data()
    if options.pop("perturb_on_rank", None) == rank:
        positions = positions.copy()
        positions[7, 2, 1] += 1e-6
    kill_after = options.pop("kill_rank_after_validations", None)
    if kill_after is not None and rank == kill_after[0]:
        _kill_after_validations(kill_after[1])
    variants = options.pop("variants", [{}])
    results = []
    for variant in variants:
        model = train_force_field((positions, forces), **(FORCE_FIELD_OPTIONS | options | variant))
        results.append({"info": model.training_info, "state": model.state_dict()})
    return results[0] if len(results) == 1 else {"variants": results}


def _kill_after_validations(count: int) -> None:
    """Make this process SIGKILL itself right after its ``count``-th validation."""
    from openmm_flowmatch.forcefield import training

    original, calls = training._validate, []

    def validate(*args, **kwargs):
        original(*args, **kwargs)
        calls.append(1)
        if len(calls) == count:
            os.kill(os.getpid(), signal.SIGKILL)

    training._validate = validate


def task_flow(rank: int, options: dict) -> dict:
    from openmm_flowmatch.flows import train_flow

    flow = train_flow(chains(300, 21), **(FLOW_OPTIONS | options))
    return {"history": flow.training_history, "state": flow.state_dict()}


def task_teacher(rank: int, options: dict) -> dict:
    from openmm_flowmatch.flows import sample_teacher

    report = sample_teacher(small_flow(), options["n_samples"], options["out"], 300.0, batch_size=128,
                            force_threshold=TEACHER_THRESHOLD, seed=options["seed"], progress=False)
    return {"report": {**report.__dict__, "path": str(report.path)}}


TASKS = {"force_field": task_force_field, "flow": task_flow, "teacher": task_teacher}


def _worker(rank: int, world_size: int, port: int, task: str, options: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        result = TASKS[task](rank, dict(options))
    except (DistributedError, ValueError) as error:
        result = {"error": f"{type(error).__name__}: {error}"}
    torch.save(result, os.path.join(out_dir, f"{task}-rank{rank}.pt"))
    # a multiprocessing child ends with os._exit, which skips the package's atexit shutdown of the
    # process group (what torchrun's ranks run): do it here, or gloo's threads may abort the exit
    from openmm_flowmatch.distributed import _shutdown

    _shutdown()


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def run_ranks(task: str, options: dict, out_dir, world_size: int = 2) -> list[dict]:
    """Run ``task`` on ``world_size`` spawned gloo ranks; the result of every rank."""
    mp.start_processes(_worker, args=(world_size, free_port(), task, options, str(out_dir)), nprocs=world_size,
                       start_method="spawn")
    return [torch.load(out_dir / f"{task}-rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def assert_same_states(first: dict, second: dict) -> None:
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=RELATIVE_TOLERANCE, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------------ unit tests
def test_shares_cover_the_global_batch_in_order():
    batch = torch.arange(17)
    parts = [Ranks(rank, 2).shard(batch) for rank in range(2)]
    assert [len(part) for part in parts] == [9, 8] and torch.equal(torch.cat(parts), batch)
    assert [Ranks(rank, 3).share(10) for rank in range(3)] == [4, 3, 3]
    assert SINGLE_PROCESS.shard(batch) is batch and not SINGLE_PROCESS.active


def test_one_process_collectives_change_nothing():
    layer = torch.nn.Linear(2, 1)
    layer(torch.ones(1, 2)).sum().backward()
    gradient = layer.weight.grad.clone()
    assert all_reduce_gradients(layer.parameters(), SINGLE_PROCESS, [2.5]) == [2.5]
    assert torch.equal(layer.weight.grad, gradient)
    assert sum_over_chunks(3, lambda index: [index, 1], 2, SINGLE_PROCESS) == [[0, 1], [1, 1], [2, 1]]
    check_consistent({"anything": 1}, SINGLE_PROCESS, "test")


def test_rank_seeds_keep_rank_zero_and_differ():
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(seed, rank) for seed in range(3) for rank in range(1, 4)}
    assert len(seeds) == 9 and not seeds & {0, 1, 2, 3}


# --------------------------------------------------------------------------------- multi-process
def test_two_ranks_train_the_force_field_like_one_process(tmp_path):
    """Both force paths: precomputed features (forces_from_features) and autograd through them."""
    from openmm_flowmatch.forcefield import train_force_field

    positions, forces = force_data()
    variants = [{"precompute_features": True}, {"precompute_features": False}]
    ranks = run_ranks("force_field", {"variants": variants}, tmp_path)
    for index, variant in enumerate(variants):
        single = train_force_field((positions, forces), **FORCE_FIELD_OPTIONS, **variant, distributed=False)
        assert single.training_info["precomputed_features"] == variant["precompute_features"]
        for result in ranks:
            info = result["variants"][index]["info"]
            assert info["world_size"] == 2 and info["steps"] == single.training_info["steps"] == 24
            assert info["precomputed_features"] == variant["precompute_features"]
            np.testing.assert_allclose(info["validation_loss"], single.training_info["validation_loss"],
                                       rtol=RELATIVE_TOLERANCE)
            np.testing.assert_allclose(info["train_loss"], single.training_info["train_loss"],
                                       rtol=RELATIVE_TOLERANCE)
            assert_same_states(single.state_dict(), result["variants"][index]["state"])
        # every rank holds the same model, bit for bit
        for name, value in ranks[0]["variants"][index]["state"].items():
            assert torch.equal(value, ranks[1]["variants"][index]["state"][name]), name


def test_two_ranks_train_the_flow_like_one_process(tmp_path):
    from openmm_flowmatch.flows import train_flow

    single = train_flow(chains(300, 21), **FLOW_OPTIONS, distributed=False)
    for result in run_ranks("flow", {}, tmp_path):
        assert len(result["history"]) == len(single.training_history) == 3
        for ours, theirs in zip(result["history"], single.training_history):
            assert ours["validation_nll"] == pytest.approx(theirs["validation_nll"], rel=RELATIVE_TOLERANCE)
            assert ours["train_nll"] == pytest.approx(theirs["train_nll"], rel=RELATIVE_TOLERANCE)
        assert_same_states(single.state_dict(), result["state"])


def test_a_killed_rank_resumes_to_the_uninterrupted_result(tmp_path):
    from openmm_flowmatch.forcefield import train_force_field

    options = {"checkpoint_path": str(tmp_path / "ff.ckpt"), "model_kwargs": {"hidden_width": 16, "n_layers": 2}}
    positions, forces = force_data()
    straight = FORCE_FIELD_OPTIONS | options | {"checkpoint_path": None}
    uninterrupted = train_force_field((positions, forces), **straight, distributed=False)
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        run_ranks("force_field", options | {"kill_rank_after_validations": (1, 3)}, tmp_path)
    assert (tmp_path / "ff.ckpt").exists()
    resumed = run_ranks("force_field", options, tmp_path)  # the same command again
    for result in resumed:
        np.testing.assert_allclose(result["info"]["validation_loss"], uninterrupted.training_info["validation_loss"],
                                   rtol=RELATIVE_TOLERANCE)
        assert_same_states(uninterrupted.state_dict(), result["state"])


def test_ranks_with_different_data_raise_the_documented_error(tmp_path):
    for result in run_ranks("force_field", {"perturb_on_rank": 1, "epochs": 1}, tmp_path):
        message = result["error"]
        assert message.startswith("DistributedError: the 2 ranks of this force-field training disagree about")
        assert "training data (rank 0: checksum" in message and "same data files" in message


def test_sharded_teacher_matches_one_process_statistics(tmp_path):
    from openmm_flowmatch.data.storage import read_cg_file
    from openmm_flowmatch.flows import sample_teacher
    from openmm_flowmatch.flows.teacher import draw_teacher_samples

    n_samples, seed = 1201, 3
    single = sample_teacher(small_flow(), n_samples, tmp_path / "single.h5", 300.0, batch_size=128, seed=seed,
                            force_threshold=TEACHER_THRESHOLD, progress=False, distributed=False)
    reports = [result["report"] for result in run_ranks(
        "teacher", {"n_samples": n_samples, "out": str(tmp_path / "sharded.h5"), "seed": seed}, tmp_path)]
    assert reports[0] == reports[1] and reports[0]["world_size"] == 2
    sharded = read_cg_file(tmp_path / "sharded.h5")
    reference = read_cg_file(single.path)
    assert sharded["positions"].shape == reference["positions"].shape == (n_samples, N_BEADS, 3)
    metadata = sharded["metadata"]
    assert metadata["rank_samples"] == [601, 600] and metadata["rank_seeds"] == [seed, rank_seed(seed, 1)]
    assert metadata["n_drawn"] == reports[0]["n_drawn"] == n_samples + reports[0]["n_dropped"]
    # fixed order: rank 0's samples, then rank 1's, each the stream of its seed
    flow = small_flow()
    for rank, (start, stop) in enumerate(((0, 601), (601, 1201))):
        positions, _, _ = draw_teacher_samples(flow, stop - start, 300.0, batch_size=128, seed=rank_seed(seed, rank),
                                               force_threshold=TEACHER_THRESHOLD, progress=False)
        np.testing.assert_array_equal(sharded["positions"][start:stop], positions)
    # the same distribution: dropped fraction and mean force per bead within 5 standard errors
    p_single, p_sharded = single.dropped_fraction, reports[0]["dropped_fraction"]
    pooled = (single.n_dropped + reports[0]["n_dropped"]) / (single.n_drawn + reports[0]["n_drawn"])
    assert 0.05 < p_single < 0.25
    assert abs(p_single - p_sharded) <= 5 * math.sqrt(pooled * (1 - pooled) * (2 / n_samples))
    ours, theirs = np.asarray(sharded["forces"], np.float64), np.asarray(reference["forces"], np.float64)
    error = np.sqrt(ours.var(0) / len(ours) + theirs.var(0) / len(theirs))
    assert np.all(np.abs(ours.mean(0) - theirs.mean(0)) <= 5 * error)


# ------------------------------------------------------------------------------------ torchrun CLI
def torchrun(arguments: list[str], cwd) -> None:
    """``torchrun --nproc_per_node 2 -m openmm_flowmatch.cli …`` on localhost; raise on failure."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "openmm_flowmatch.cli", "--quiet", *arguments]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    finished = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]


@pytest.mark.slow
def test_cli_pipeline_runs_unchanged_under_torchrun(tmp_path):
    from openmm_flowmatch.cli import main
    from openmm_flowmatch.data.storage import read_cg_file
    from openmm_flowmatch.forcefield import load_network

    positions, forces = force_data(300)
    np.savez(tmp_path / "data.npz", positions=positions.astype(np.float32), forces=forces.astype(np.float32))
    flow_options = ["--epochs", "2", "--blocks", "1", "--hidden", "16", "--batch-size", "64"]
    torchrun(["train-flow", "data.npz", "--out", "flow.pt", "--checkpoint", "flow.ckpt", *flow_options], tmp_path)
    torchrun(["teacher", "flow.pt", "--out", "teacher.h5", "--samples", "301", "--temperature", "300",
              "--batch-size", "64"], tmp_path)
    teacher = read_cg_file(tmp_path / "teacher.h5")
    assert teacher["positions"].shape == (301, N_BEADS, 3) and teacher["metadata"]["rank_samples"] == [151, 150]
    ff_options = ["--epochs", "2", "--width", "16", "--layers", "1", "--batch-size", "32"]
    torchrun(["train-ff", "teacher.h5", "--out", "net.pt", "--checkpoint", "ff.ckpt", *ff_options], tmp_path)
    assert main(["--quiet", "train-ff", str(tmp_path / "teacher.h5"), "--out", str(tmp_path / "single.pt"),
                 *ff_options]) == 0
    distributed, single = load_network(tmp_path / "net.pt"), load_network(tmp_path / "single.pt")
    assert distributed.training_info["world_size"] == 2 and single.training_info["world_size"] == 1
    # float32 training: the two halves of each gradient are added in another order
    np.testing.assert_allclose(distributed.training_info["validation_loss"], single.training_info["validation_loss"],
                               rtol=1e-4)
