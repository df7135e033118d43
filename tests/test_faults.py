"""Every bad input answered: planted pickles, truncated and bit-flipped files, NaN/Inf in data.

Each loader must refuse the file with the package's documented error, in one line naming the
file and saying what to do, and must never run code from it nor return half-read content.
The catalogue of these faults and their messages is docs/reliability.md.
"""

from __future__ import annotations

import pathlib
import shutil

import h5py
import numpy as np
import pytest
import torch

from openmm_flowmatch.data.dataset import CGDataset, DatasetError
from openmm_flowmatch.data.storage import StorageError, read_cg_file, write_cg_file
from openmm_flowmatch.flows import CGFlow, FlowTrainingError, train_flow
from openmm_flowmatch.flows.model import FlowFileError
from openmm_flowmatch.forcefield import CGNet, InvariantFeatures, TrainingError, train_force_field
from openmm_flowmatch.forcefield.networks import NetworkFileError, load_network, save_network

N_BEADS = 5


class PlantedPayload:
    """Unpickling this creates ``marker``: a harmless stand-in for code planted in a file."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def random_chains(n_frames: int, seed: int = 0) -> np.ndarray:
    generator = np.random.default_rng(seed)
    steps = generator.normal(size=(n_frames, N_BEADS, 3))
    lengths = 0.15 + 0.01 * generator.normal(size=(n_frames, N_BEADS, 1))
    return np.cumsum(lengths * steps / np.linalg.norm(steps, axis=-1, keepdims=True), axis=1)


def small_network(positions: np.ndarray) -> CGNet:
    torch.manual_seed(0)
    return CGNet(InvariantFeatures.from_positions(positions), hidden_width=16, n_layers=2)


# ------------------------------------------------------------------------------ genuine files
def train_ff(positions: np.ndarray, checkpoint: pathlib.Path, max_steps: int = 2):
    forces = -positions  # any finite target will do
    return train_force_field((positions, forces), model=small_network(positions), max_steps=max_steps, batch_size=10,
                             validation_interval=1, checkpoint_path=checkpoint, progress=False)


def train_small_flow(positions: np.ndarray, checkpoint: pathlib.Path, epochs: int = 1):
    return train_flow(positions, epochs=epochs, n_blocks=1, hidden_features=8, hidden_layers=1, batch_size=20,
                      checkpoint_path=checkpoint, progress=False)


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> dict[str, pathlib.Path]:
    """One genuine file of each kind, written by the package."""
    directory = tmp_path_factory.mktemp("genuine")
    positions = random_chains(60)
    files = {
        "network": directory / "network.pt",
        "ff_checkpoint": directory / "ff.ckpt",
        "flow_checkpoint": directory / "flow.ckpt",
        "flow": directory / "flow.pt",
        "data": directory / "run.h5",
        "chunk": directory / "chunks" / "chunk_0000.npz",
    }
    save_network(train_ff(positions, files["ff_checkpoint"]), files["network"])
    train_small_flow(positions, files["flow_checkpoint"]).save(files["flow"])
    write_cg_file(files["data"], positions, -positions, metadata={"temperature": 300.0})
    files["chunk"].parent.mkdir()
    np.savez(files["chunk"], x=positions.astype(np.float32), f=-positions.astype(np.float32))
    return files


def copy_of(genuine: dict, kind: str, tmp_path: pathlib.Path) -> pathlib.Path:
    source = genuine[kind]
    if kind == "chunk":
        target = tmp_path / "chunks" / source.name
        target.parent.mkdir()
    else:
        target = tmp_path / source.name
    shutil.copyfile(source, target)
    return target


def load(kind: str, path: pathlib.Path):
    """Read ``path`` the way a user's call does; returns what was read."""
    positions = random_chains(60)
    if kind == "network":
        return load_network(path)
    if kind == "ff_checkpoint":
        return train_ff(positions, path, max_steps=3)
    if kind == "flow_checkpoint":
        return train_small_flow(positions, path, epochs=2)
    if kind == "flow":
        return CGFlow.load(path)
    if kind == "data":
        return read_cg_file(path)
    if kind == "chunk":
        return CGDataset.from_npz_chunks(path.parent)
    raise AssertionError(kind)


ERRORS = {
    "network": NetworkFileError, "ff_checkpoint": TrainingError, "flow_checkpoint": FlowTrainingError,
    "flow": FlowFileError, "data": StorageError, "chunk": DatasetError,
}
TORCH_FILES = ("network", "ff_checkpoint", "flow_checkpoint", "flow")


def refused(kind: str, path: pathlib.Path, match: str) -> str:
    """Assert that loading ``path`` raises the documented error in one line naming the file."""
    with pytest.raises(ERRORS[kind], match=match) as caught:
        load(kind, path)
    message = str(caught.value)
    assert path.name in message and "\n" not in message, message
    return message


def test_genuine_files_load(genuine, tmp_path):
    for kind in ERRORS:
        assert load(kind, copy_of(genuine, kind, tmp_path)) is not None


# ------------------------------------------------------------------------------ planted pickles
def plant_torch(path: pathlib.Path, marker: pathlib.Path) -> None:
    """Re-save a genuine file with a planted object and no checksum (an attacker recomputes nothing)."""
    content = torch.load(path, weights_only=True)
    content.pop("sha256", None)
    content["extra"] = PlantedPayload(marker)
    torch.save(content, path)


def test_planted_payload_is_live(genuine, tmp_path):
    """Control: an unrestricted load of the planted file does run the payload."""
    marker = tmp_path / "marker"
    path = copy_of(genuine, "network", tmp_path)
    plant_torch(path, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", TORCH_FILES)
def test_planted_pickle_in_a_torch_file_is_refused_without_running(genuine, tmp_path, kind):
    marker = tmp_path / "marker"
    path = copy_of(genuine, kind, tmp_path)
    plant_torch(path, marker)
    refused(kind, path, "pickled Python objects")
    assert not marker.exists()


def test_planted_pickle_in_an_npz_chunk_is_refused_without_running(tmp_path):
    marker = tmp_path / "marker"
    chunk = tmp_path / "chunks" / "chunk_0000.npz"
    chunk.parent.mkdir()
    np.savez(chunk, x=np.array([PlantedPayload(marker)], dtype=object))
    refused("chunk", chunk, "object arrays")
    assert not marker.exists()
    with np.load(chunk, allow_pickle=True) as data:  # control: the payload is live
        data["x"]
    assert marker.exists()


def test_old_network_file_with_numpy_scalars_needs_trust_pickle(genuine, tmp_path):
    """An old-format file (no checksum, a NumPy scalar inside) is refused unless the user opts in."""
    path = copy_of(genuine, "network", tmp_path)
    content = torch.load(path, weights_only=True)
    content.pop("sha256")
    content["training_info"]["best_validation_loss"] = np.float64(1.5)
    torch.save(content, path)
    refused("network", path, "pickled Python objects.*trust_pickle=True")
    model = load_network(path, trust_pickle=True)
    assert model.training_info["best_validation_loss"] == 1.5


def test_old_network_file_without_checksum_still_loads(genuine, tmp_path):
    path = copy_of(genuine, "network", tmp_path)
    content = torch.load(path, weights_only=True)
    content.pop("sha256")
    torch.save(content, path)
    assert isinstance(load_network(path), CGNet)


def test_numpy_content_is_stored_as_plain_values(genuine, tmp_path):
    model = load_network(genuine["network"])
    model.training_info = {"losses": np.array([1.0, 2.0]), "best": np.float32(0.5)}
    save_network(model, tmp_path / "numpy.pt")
    info = load_network(tmp_path / "numpy.pt").training_info
    assert info["best"] == 0.5 and torch.equal(info["losses"], torch.tensor([1.0, 2.0], dtype=torch.float64))


# ------------------------------------------------------------------------------ truncated files
@pytest.mark.parametrize("kind", list(ERRORS))
def test_truncated_file_is_refused(genuine, tmp_path, kind):
    path = copy_of(genuine, kind, tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    refused(kind, path, "truncated")


# ------------------------------------------------------------------------------ flipped bits
def flip_a_bit_in_the_data(path: pathlib.Path, data: bytes) -> None:
    """Flip one bit in the middle of ``data`` where it first lies in the file (silent disk corruption)."""
    raw = bytearray(path.read_bytes())
    where = raw.find(data)
    assert where >= 0
    raw[where + len(data) // 2] ^= 0x04
    path.write_bytes(bytes(raw))


def largest_tensor(content) -> torch.Tensor:
    found = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(content)
    return max((tensor for tensor in found if tensor.dtype.is_floating_point), key=torch.Tensor.numel)


@pytest.mark.parametrize("kind", TORCH_FILES)
def test_bit_flip_in_a_torch_file_is_refused(genuine, tmp_path, kind):
    path = copy_of(genuine, kind, tmp_path)
    tensor = largest_tensor(torch.load(path, weights_only=True))
    flip_a_bit_in_the_data(path, tensor.contiguous().numpy().tobytes())
    refused(kind, path, "checksum does not match")


def test_bit_flip_in_a_data_file_is_refused(genuine, tmp_path):
    path = copy_of(genuine, "data", tmp_path)
    with h5py.File(path, "r") as file:
        positions = file["positions"][:]
    flip_a_bit_in_the_data(path, positions.tobytes()[:4096])
    refused("data", path, "corrupt.*checksum")


# ------------------------------------------------------------------------------ NaN / Inf in data
@pytest.mark.parametrize("name,value", [("positions", np.nan), ("forces", np.inf)])
def test_non_finite_values_in_a_data_file_are_refused(genuine, tmp_path, name, value):
    path = copy_of(genuine, "data", tmp_path)
    with h5py.File(path, "r+") as file:
        file[name][7, 2, 1] = value
    refused("data", path, f"{name} hold NaN or infinite values .*first at frame 7")
    with pytest.raises(StorageError, match=path.name):
        CGDataset.from_files(path)


@pytest.mark.parametrize("name", ["x", "f"])
def test_non_finite_values_in_an_npz_chunk_are_refused(genuine, tmp_path, name):
    chunk = copy_of(genuine, "chunk", tmp_path)
    with np.load(chunk) as data:
        arrays = {key: data[key].copy() for key in data.files}
    arrays[name][4, 0, 0] = np.nan
    np.savez(chunk, **arrays)
    refused("chunk", chunk, f"'{name}' hold NaN or infinite values .*frame 4")


def test_data_file_with_inconsistent_datasets_is_refused(genuine, tmp_path):
    path = copy_of(genuine, "data", tmp_path)
    with h5py.File(path, "r+") as file:
        file["forces"].resize(30, axis=0)
    refused("data", path, "forces have shape")


def test_npz_chunk_with_mismatched_forces_is_refused(genuine, tmp_path):
    chunk = copy_of(genuine, "chunk", tmp_path)
    with np.load(chunk) as data:
        positions = data["x"].copy()
    np.savez(chunk, x=positions, f=positions[:10])
    refused("chunk", chunk, "'f' has shape")


# ------------------------------------------------------------------------------ files of another kind
def test_network_file_with_inconsistent_weights_is_refused(genuine, tmp_path):
    path = copy_of(genuine, "network", tmp_path)
    content = torch.load(path, weights_only=True)
    content["state_dict"].popitem()
    content.pop("sha256")
    torch.save(content, path)
    refused("network", path, "inconsistent")


@pytest.mark.parametrize("kind", TORCH_FILES)
def test_a_file_of_another_kind_is_refused(genuine, tmp_path, kind):
    path = tmp_path / f"other_{kind}.pt"
    torch.save({"something": "else"}, path)
    refused(kind, path, "not a")


# ------------------------------------------------------------------------------ a full disk
def fill_the_disk(monkeypatch, only: str | None = None) -> list:
    """Atomic writes (of files named ``only``, default all) now fail with ENOSPC after half their bytes."""
    import errno
    import os

    from openmm_flowmatch import safe_files

    attempts, original = [], safe_files._write_temporary

    def full(temporary: pathlib.Path, data: bytes) -> None:
        if only is not None and temporary.name != f"{only}.tmp":
            return original(temporary, data)
        attempts.append(temporary)
        temporary.write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(temporary))

    monkeypatch.setattr(safe_files, "_write_temporary", full)
    return attempts


def simulate_chain(out: pathlib.Path, steps: int, **options):
    from test_simulation import chain_positions, chain_system, chain_topology

    from openmm_flowmatch.simulation import run_simulation

    options = {"report_interval": 20, "checkpoint_interval": 100, "platform": "Reference", "progress": False,
               "seed": 1, **options}
    return run_simulation(chain_system(), chain_topology(), chain_positions(), out, steps, **options)


def continue_on_a_full_disk(kind: str, checkpoint: pathlib.Path):
    """Write a first checkpoint, then continue the job on a full disk; returns the error's type."""
    positions = random_chains(60)
    if kind == "ff_checkpoint":
        return lambda: train_ff(positions, checkpoint, max_steps=2), lambda: train_ff(positions, checkpoint, 4), TrainingError
    if kind == "flow_checkpoint":
        return (lambda: train_small_flow(positions, checkpoint, 1), lambda: train_small_flow(positions, checkpoint, 2),
                FlowTrainingError)
    from openmm_flowmatch.simulation import SimulationError

    directory = checkpoint.parent
    return lambda: simulate_chain(directory, 100), lambda: simulate_chain(directory, 200), SimulationError


@pytest.mark.parametrize("kind", ["ff_checkpoint", "flow_checkpoint", "simulation_checkpoint"])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, kind):
    names = {"ff_checkpoint": "ff.ckpt", "flow_checkpoint": "flow.ckpt", "simulation_checkpoint": "checkpoint_000.chk"}
    checkpoint = tmp_path / "run" / names[kind]
    first, then, error = continue_on_a_full_disk(kind, checkpoint)
    first()
    before = checkpoint.read_bytes()
    attempts = fill_the_disk(monkeypatch, only=checkpoint.name)
    with pytest.raises(error, match="no space left on device") as caught:
        then()
    message = str(caught.value)
    assert attempts and "\n" not in message and f"cannot write {checkpoint}: no space left on device" in message, message
    assert checkpoint.read_bytes() == before  # the previous checkpoint is untouched ...
    assert not list(checkpoint.parent.glob("*.tmp"))  # ... and no half-written temporary is left
    monkeypatch.undo()
    first, then, _ = continue_on_a_full_disk(kind, checkpoint)
    then()  # ... and the job continues from it once there is space again


def test_full_disk_message_names_the_file(tmp_path, monkeypatch):
    from openmm_flowmatch.safe_files import FileWriteError, write_atomically

    target = tmp_path / "settings.json"
    target.write_text("old")
    fill_the_disk(monkeypatch)
    with pytest.raises(FileWriteError) as caught:
        write_atomically(target, "new")
    assert str(caught.value) == (
        f"cannot write {target}: no space left on device; the previous version of the file (if any) is kept, "
        "so free some space and run the same command again to continue"
    )
    assert target.read_text() == "old"


# ------------------------------------------------------------------------------ two processes, one output
HOLDER = """
import sys, time
from openmm_flowmatch.locking import lock_directory, lock_file
locks = [lock_directory(p).acquire() for p in sys.argv[1:3]] + [lock_file(p).acquire() for p in sys.argv[3:]]
print("ready", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the outputs of generate, simulate, train-flow, teacher and train-ff."""
    import subprocess
    import sys

    outputs = {"generate": tmp_path / "reference", "simulate": tmp_path / "simulation",
               "train-flow": tmp_path / "flow.ckpt", "teacher": tmp_path / "teacher.h5", "train-ff": tmp_path / "ff.ckpt"}
    process = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, outputs.values())], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "ready"
    yield outputs, process
    process.kill()
    process.wait()


def test_second_process_on_the_same_output_is_refused(holder, tmp_path, capsys):
    from openmm_flowmatch import cli
    from openmm_flowmatch.data.reference import generate_reference
    from openmm_flowmatch.locking import OutputLockedError

    outputs, process = holder
    expected = f"is in use by another openmm-flowmatch process (PID {process.pid}: "
    with pytest.raises(OutputLockedError) as caught:
        generate_reference("missing.pdb", outputs["generate"])
    assert str(caught.value).startswith(f"{outputs['generate']} {expected}") and "\n" not in str(caught.value)
    with pytest.raises(OutputLockedError, match=expected.replace("(", r"\(")):
        simulate_chain(outputs["simulate"], 100)
    data = tmp_path / "data.h5"
    commands = {
        "train-flow": ["train-flow", str(data), "--out", str(tmp_path / "flow.pt"), "--checkpoint", str(outputs["train-flow"])],
        "teacher": ["teacher", "flow.pt", "--out", str(outputs["teacher"]), "--temperature", "300"],
        "train-ff": ["train-ff", str(data), "--out", str(tmp_path / "network.pt"), "--checkpoint", str(outputs["train-ff"])],
    }
    for name, arguments in commands.items():
        assert cli.main(["--quiet", *arguments]) == 1
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"openmm-flowmatch {name}: error: {outputs[name]} {expected}"), line
        assert "\n" not in line


def test_lock_is_released_when_its_holder_is_killed(holder):
    from openmm_flowmatch.locking import lock_directory, lock_file

    outputs, process = holder
    process.kill()
    process.wait()
    with lock_directory(outputs["simulate"]), lock_file(outputs["train-ff"]):
        pass
    assert not (outputs["train-ff"].parent / ".ff.ckpt.lock").exists()  # file locks leave nothing behind


# ------------------------------------------------------------------------------ changed settings on resume
@pytest.mark.parametrize("option,value,shown", [("seed", 2, "seed: saved 1, now 2"),
                                                ("temperature", 310.0, "temperature: saved 300.0, now 310.0")])
def test_generate_refuses_changed_settings(tmp_path, option, value, shown):
    from openmm_flowmatch.data.reference import ReferenceGenerationError, generate_reference

    pdb = pathlib.Path(__file__).resolve().parents[1] / "openmm_flowmatch" / "resources" / "alanine_dipeptide.pdb"
    options = dict(duration_ps=0.1, equilibration_ps=0.0, time_step_ps=0.002, save_interval_steps=10,
                   platform="Reference", solvent="vacuum", progress=False, seed=1)
    generate_reference(pdb, tmp_path, **options)
    with pytest.raises(ReferenceGenerationError, match=shown) as caught:
        generate_reference(pdb, tmp_path, **{**options, option: value})
    assert "\n" not in str(caught.value) and "replica_000.checkpoint.json" in str(caught.value)


@pytest.mark.parametrize("option,value", [("temperature", 320.0), ("friction", 2.0), ("seed", 7),
                                          ("time_step", 0.001), ("report_interval", 10)])
def test_simulate_refuses_changed_settings(tmp_path, option, value):
    from openmm_flowmatch.simulation import SimulationError

    simulate_chain(tmp_path, 100)
    with pytest.raises(SimulationError, match=f"holds a run with {option}=") as caught:
        simulate_chain(tmp_path, 200, **{option: value})
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def training_data(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("training") / "data.h5"
    positions = random_chains(60)
    write_cg_file(path, positions, -positions, metadata={"temperature": 300.0})
    return path


TRAINING_COMMANDS = {
    "train-flow": ["--epochs", "1", "--batch-size", "20", "--blocks", "1", "--hidden", "8"],
    "train-ff": ["--epochs", "1", "--batch-size", "20", "--width", "8", "--layers", "1", "--method", "force-matching"],
}


@pytest.mark.parametrize("command,option,value,setting", [
    ("train-flow", "--learning-rate", "0.002", "learning_rate"),
    ("train-flow", "--seed", "1", "seed"),
    ("train-flow", "--hidden", "16", "hidden"),
    ("train-ff", "--batch-size", "10", "batch_size"),
    ("train-ff", "--width", "16", "width"),
    ("train-ff", "data", None, "data"),
])
def test_training_commands_refuse_changed_settings(tmp_path, training_data, capsys, command, option, value, setting):
    from openmm_flowmatch import cli

    checkpoint = tmp_path / "run.ckpt"
    arguments = [command, str(training_data), "--out", str(tmp_path / "out.pt"), "--checkpoint", str(checkpoint),
                 *TRAINING_COMMANDS[command]]
    assert cli.main(["--quiet", "--torch-threads", "1", *arguments]) == 0
    if option == "data":
        other = tmp_path / "other.h5"
        positions = random_chains(60, seed=1)
        write_cg_file(other, positions, -positions, metadata={"temperature": 300.0})
        arguments[1] = str(other)
    else:
        arguments += [option, value]
    capsys.readouterr()
    assert cli.main(["--quiet", "--torch-threads", "1", *arguments]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"openmm-flowmatch {command}: error: cannot continue the run recorded in {checkpoint}.settings.json: "
                           f"its settings changed ({setting}: was "), line
    assert "\n" not in line


def test_training_command_continues_with_a_longer_budget(tmp_path, training_data):
    from openmm_flowmatch import cli

    arguments = ["train-flow", str(training_data), "--out", str(tmp_path / "out.pt"), "--checkpoint",
                 str(tmp_path / "run.ckpt"), *TRAINING_COMMANDS["train-flow"]]
    assert cli.main(["--quiet", "--torch-threads", "1", *arguments]) == 0
    assert cli.main(["--quiet", "--torch-threads", "1", *arguments, "--epochs", "2", "--device", "cpu"]) == 0
