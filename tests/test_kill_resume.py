"""Kill every long job with SIGKILL and run the same command again: nothing lost, nothing duplicated.

Each job — ``generate``, ``train-flow``, ``teacher``, ``train-ff``, ``simulate`` and the
``data-efficiency`` benchmark (``quick`` preset) — runs in a subprocess that is killed at three
points:

* ``early``: before its first checkpoint;
* ``mid``: in the middle of a chunk / epoch, after at least one checkpoint;
* ``write``: while it writes a checkpoint (or its output): the temporary file is cut to half its
  size and the process killed before the rename.

Then the same command runs again without any fault, and its output must equal that of an
uninterrupted run. Every job here is deterministic (Reference platform, fixed seeds, one torch
thread), so "equal" is exact (``np.testing.assert_array_equal``) unless a test says otherwise.
Jobs whose three tests take more than about 20 s together (teacher, simulate, the benchmark) are
marked ``slow``.

The faults are injected by this file run as a script (``python tests/test_kill_resume.py SPEC --
cli ARGS``): it patches the process (an optimiser step hook, a method, ``os.replace``), then calls
the CLI; nothing in the package knows about it. SPEC is ``call:<module>:<attribute path>:<n>``
(kill at the n-th call), ``step:<n>`` (at the n-th optimiser step) or ``replace:<suffix>:<n>``
(at the n-th rename onto a file whose name ends with suffix, after cutting the temporary file).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
REPOSITORY = HERE.parents[1]
PDB = REPOSITORY / "openmm_flowmatch" / "resources" / "alanine_dipeptide.pdb"
CLI_PREFIX = ("--quiet", "--torch-threads", "1")
TIMEOUT = 600


# ------------------------------------------------------------------------------ fault injection
def _kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _counter(n: int):
    calls = {"count": 0}

    def tick() -> None:
        calls["count"] += 1
        if calls["count"] == n:
            _kill_now()

    return tick


def _install_call(module: str, attribute: str, n: int) -> None:
    owner = importlib.import_module(module)
    *parents, name = attribute.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original, tick = getattr(owner, name), _counter(n)

    def patched(*args, **kwargs):
        tick()
        return original(*args, **kwargs)

    setattr(owner, name, patched)


def _install_step(n: int) -> None:
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    tick = _counter(n)
    register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: tick())


def _install_replace(suffix: str, n: int) -> None:
    original, calls = os.replace, {"count": 0}

    def patched(source, destination, *args, **kwargs):
        if str(destination).endswith(suffix):
            calls["count"] += 1
            if calls["count"] == n:
                size = os.path.getsize(source)
                os.truncate(source, size // 2)  # a torn write of the temporary file
                _kill_now()
        return original(source, destination, *args, **kwargs)

    os.replace = patched


def install_fault(spec: str) -> None:
    """Arm the fault described by ``spec`` in this process (see the module docstring)."""
    kind, *fields = spec.split(":")
    if kind == "call":
        _install_call(fields[0], fields[1], int(fields[2]))
    elif kind == "step":
        _install_step(int(fields[0]))
    elif kind == "replace":
        _install_replace(fields[0], int(fields[1]))
    else:
        raise SystemExit(f"unknown fault {spec!r}")


def _main(argv: list[str]) -> int:
    spec, separator, target, *arguments = argv
    assert separator == "--"
    install_fault(spec)
    if target == "cli":
        from openmm_flowmatch import cli

        return cli.main(arguments)
    import runpy

    sys.argv = arguments
    runpy.run_path(arguments[0], run_name="__main__")
    return 0


# ------------------------------------------------------------------------------ running jobs
def run_cli(arguments: list[str], fault: str | None = None, cwd: Path = REPOSITORY) -> subprocess.CompletedProcess:
    """Run ``openmm-flowmatch ARGUMENTS`` in a subprocess, with ``fault`` armed if given."""
    if fault is None:
        command = [sys.executable, "-m", "openmm_flowmatch.cli", *CLI_PREFIX, *arguments]
    else:
        command = [sys.executable, str(HERE), fault, "--", "cli", *CLI_PREFIX, *arguments]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def kill_and_resume(arguments: list[str], fault: str) -> subprocess.CompletedProcess:
    """Run with ``fault`` (it must be killed), then the same command again (it must succeed)."""
    killed = run_cli(arguments, fault)
    assert killed.returncode == -signal.SIGKILL, f"the fault {fault} did not fire:\n{killed.stderr[-3000:]}"
    resumed = run_cli(arguments)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return resumed


def in_process(arguments: list[str]) -> None:
    """An uninterrupted run (in this process: same numbers, no interpreter start-up)."""
    from openmm_flowmatch import cli

    assert cli.main([*CLI_PREFIX, *arguments]) == 0


# ------------------------------------------------------------------------------ the pipeline
GENERATE = ["--duration", "2", "--equilibration", "0.04", "--time-step", "0.002", "--save-interval", "10",
            "--checkpoint-interval", "20", "--platform", "Reference", "--solvent", "vacuum", "--seed", "1"]
FLOW = ["--epochs", "3", "--batch-size", "20", "--blocks", "1", "--hidden", "8", "--seed", "2"]
TEACHER = ["--samples", "120", "--batch-size", "30", "--force-threshold", "1e12", "--seed", "3"]
FORCE_FIELD = ["--epochs", "3", "--batch-size", "30", "--width", "16", "--layers", "2", "--seed", "4"]
SIMULATE = ["--steps", "400", "--report-interval", "20", "--checkpoint-interval", "100", "--replicas", "2",
            "--platform", "Reference", "--seed", "5", "--time-step", "0.002"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    """Uninterrupted runs of every job: the inputs of the next job and the expected outputs."""
    root = tmp_path_factory.mktemp("uninterrupted")
    paths = {"root": root, "reference": root / "reference", "flow": root / "flow.pt", "teacher": root / "teacher.h5",
             "network": root / "network.pt", "priors": root / "priors.json", "artifact": root / "forcefield.pt",
             "simulation": root / "simulation"}
    in_process(["generate", str(PDB), "--out", str(paths["reference"]), *GENERATE])
    data = str(paths["reference"] / "replica_000.h5")
    paths["data"] = data
    in_process(["fit-priors", data, "--out", str(paths["priors"])])
    in_process(["train-flow", data, "--out", str(paths["flow"]), "--checkpoint", str(root / "flow.ckpt"), *FLOW])
    in_process(["teacher", str(paths["flow"]), "--out", str(paths["teacher"]), "--reference", data, *TEACHER])
    in_process(["train-ff", str(paths["teacher"]), "--out", str(paths["network"]), "--priors", str(paths["priors"]),
                "--reference", data, "--checkpoint", str(root / "ff.ckpt"), *FORCE_FIELD])
    in_process(["export", str(paths["network"]), "--reference", data, "--priors", str(paths["priors"]),
                "--out", str(paths["artifact"])])
    in_process(["simulate", str(paths["artifact"]), str(PDB), "--out", str(paths["simulation"]), *SIMULATE])
    return paths


def read_data(path: Path) -> dict:
    from openmm_flowmatch.data.storage import read_cg_file

    return read_cg_file(path)


def assert_same_data(actual: Path, expected: Path) -> None:
    got, want = read_data(actual), read_data(expected)
    for key in ("positions", "forces", "time"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{actual}: {key}")


def assert_same_weights(actual: Path, expected: Path) -> None:
    import torch

    got, want = torch.load(actual, weights_only=True), torch.load(expected, weights_only=True)
    state_key = next(key for key in ("state_dict", "model_state", "model", "state") if key in want)
    assert got[state_key].keys() == want[state_key].keys()
    for name, tensor in want[state_key].items():
        torch.testing.assert_close(got[state_key][name], tensor, rtol=0, atol=0, msg=f"{actual}: {name}")


POINTS = ("early", "mid", "write")


# ------------------------------------------------------------------------------ generate
GENERATE_FAULTS = {
    # 1 equilibration call, then one integrator call per frame; checkpoints every 20 frames
    "early": "call:openmm:LangevinMiddleIntegrator.step:1",
    "mid": "call:openmm:LangevinMiddleIntegrator.step:32",  # frame 31 of 100: 11 frames after checkpoint 1
    "write": "replace:replica_000.checkpoint.json:3",  # the second chunk is in the HDF5 file, its checkpoint torn
}


@pytest.mark.parametrize("point", POINTS)
def test_generate_killed_and_resumed(pipeline, tmp_path, point):
    out = tmp_path / "reference"
    kill_and_resume(["generate", str(PDB), "--out", str(out), *GENERATE], GENERATE_FAULTS[point])
    assert_same_data(out / "replica_000.h5", Path(pipeline["data"]))
    time = read_data(out / "replica_000.h5")["time"]
    assert len(time) == 100 and np.all(np.diff(time) > 0)  # no frame lost or duplicated


# ------------------------------------------------------------------------------ train-flow
FLOW_FAULTS = {
    "early": "step:1",
    "mid": "step:5",  # 4 steps an epoch: the middle of epoch 2
    "write": "replace:flow.ckpt:2",
}


@pytest.mark.parametrize("point", POINTS)
def test_train_flow_killed_and_resumed(pipeline, tmp_path, point):
    arguments = ["train-flow", pipeline["data"], "--out", str(tmp_path / "flow.pt"), "--checkpoint",
                 str(tmp_path / "flow.ckpt"), *FLOW]
    kill_and_resume(arguments, FLOW_FAULTS[point])
    assert_same_weights(tmp_path / "flow.pt", pipeline["flow"])
    import torch

    history = torch.load(tmp_path / "flow.ckpt", weights_only=True)["state"]["history"]
    assert len(history) == 3  # one entry per epoch: none lost or run twice


# ------------------------------------------------------------------------------ teacher
TEACHER_FAULTS = {
    "early": "call:openmm_flowmatch.flows.model:CGFlow.sample:1",
    "mid": "call:openmm_flowmatch.flows.model:CGFlow.sample:3",
    "write": "replace:teacher.h5:1",
}


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_teacher_killed_and_rerun(pipeline, tmp_path, point):
    out = tmp_path / "teacher.h5"
    kill_and_resume(["teacher", str(pipeline["flow"]), "--out", str(out), "--reference", pipeline["data"], *TEACHER],
                    TEACHER_FAULTS[point])
    assert_same_data(out, pipeline["teacher"])
    assert len(read_data(out)["positions"]) == 120


# ------------------------------------------------------------------------------ train-ff
FORCE_FIELD_FAULTS = {
    "early": "step:1",
    "mid": "step:6",  # 4 steps an epoch: the middle of epoch 2
    "write": "replace:ff.ckpt:2",
}


@pytest.mark.parametrize("point", POINTS)
def test_train_ff_killed_and_resumed(pipeline, tmp_path, point):
    arguments = ["train-ff", str(pipeline["teacher"]), "--out", str(tmp_path / "network.pt"), "--priors",
                 str(pipeline["priors"]), "--reference", pipeline["data"], "--checkpoint", str(tmp_path / "ff.ckpt"),
                 *FORCE_FIELD]
    kill_and_resume(arguments, FORCE_FIELD_FAULTS[point])
    assert_same_weights(tmp_path / "network.pt", pipeline["network"])
    import torch

    steps = torch.load(tmp_path / "ff.ckpt", weights_only=True)["history"]["step"]
    assert steps == sorted(set(steps))  # every validation once, in order


# ------------------------------------------------------------------------------ simulate
SIMULATE_FAULTS = {
    "early": "call:openmm.app:Simulation.step:1",
    "mid": "call:openmm.app:Simulation.step:8",  # step 140: 2 frames after the checkpoint at step 100
    "write": "replace:checkpoint_000.chk:2",
}


def trajectory(directory: Path, replica: int) -> np.ndarray:
    import mdtraj

    return mdtraj.load(str(directory / f"replica_{replica:03d}.dcd"), top=str(directory / "topology.pdb")).xyz


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_simulate_killed_and_resumed(pipeline, tmp_path, point):
    out = tmp_path / "simulation"
    kill_and_resume(["simulate", str(pipeline["artifact"]), str(PDB), "--out", str(out), *SIMULATE],
                    SIMULATE_FAULTS[point])
    for replica in range(2):
        got = trajectory(out, replica)
        assert len(got) == 20  # 400 steps / 20: no frame lost or duplicated
        np.testing.assert_array_equal(got, trajectory(pipeline["simulation"], replica))
    steps = np.loadtxt(out / "state_000.csv", delimiter=",", usecols=0)
    np.testing.assert_array_equal(steps, np.arange(20, 401, 20))


# ------------------------------------------------------------------------------ benchmark
BENCHMARK_FAULTS = {
    "early": "step:1",  # the first unit's force-field training
    "mid": "call:openmm.app:Simulation.step:15",  # inside the first unit's simulation (checkpoint every 20 reports)
    "write": "replace:force_field_checkpoint.pt:1",
}


@pytest.fixture(scope="module")
def benchmark_reference(tmp_path_factory) -> dict:
    """Synthetic chunks and an uninterrupted quick data-efficiency run."""
    from benchmark_helpers import write_alanine_like_runs

    root = tmp_path_factory.mktemp("benchmark")
    (root / "runs").mkdir()
    write_alanine_like_runs(root / "runs")
    completed = run_cli(benchmark_arguments(root, "uninterrupted"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {"root": root}


def benchmark_arguments(root: Path, name: str) -> list[str]:
    return ["benchmark", "data-efficiency", "--data", str(root / "runs"), "--work", str(root / name / "work"),
            "--results", str(root / name / "results"), "--preset", "quick", "--methods", "force-matching"]


def unit_metrics(work: Path) -> dict:
    return {str(path.relative_to(work)): json.loads(path.read_text())
            for path in sorted(work.rglob("metrics.json"))}


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_data_efficiency_benchmark_killed_and_resumed(benchmark_reference, point):
    root = benchmark_reference["root"]
    arguments = benchmark_arguments(root, point)
    script = [str(REPOSITORY / "benchmarks" / "data_efficiency.py"), *arguments[2:]]
    killed = subprocess.run([sys.executable, str(HERE), BENCHMARK_FAULTS[point], "--", "script", *script],
                            cwd=REPOSITORY, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_cli(arguments)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = unit_metrics(root / point / "work"), unit_metrics(root / "uninterrupted" / "work")
    assert got.keys() == want.keys() and got
    for name in want:
        np.testing.assert_allclose(flatten(got[name]), flatten(want[name]), rtol=1e-9, atol=0, err_msg=name)


def flatten(record, prefix: str = "") -> list:
    """The numbers of a metrics record, wall times left out, in key order."""
    if isinstance(record, dict):
        return [value for key in sorted(record) if "seconds" not in key and "wall" not in key
                for value in flatten(record[key], f"{prefix}.{key}")]
    if isinstance(record, list):
        return [value for item in record for value in flatten(item, prefix)]
    return [float(record)] if isinstance(record, (int, float)) and not isinstance(record, bool) else []


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
