"""Run a native library once in a child process before any process of the user loads it.

A library that crashes the process (a segmentation fault in the plugin, for example from a
compiler or OpenMM build that does not match) must not take the user's simulation script with it:
``backend="auto"`` should fall back to TorchForce instead. So, before :func:`load_native_plugin
<openmm_flowmatch.native.load_native_plugin>` loads a library, the library is loaded in a child
process (``python -m openmm_flowmatch.native.selftest LIBRARY RECORD``) that deserializes a small
``CGNetForce`` and evaluates it on the Reference and CPU platforms and on every GPU platform whose
kernel library was built, writing after each stage what it passed. A stage that raises or crashes
marks the main library (load, deserialize, Reference, CPU) or only that GPU platform as unusable.

The outcome is kept in ``<cache>/selftest/<key>.json`` (``<cache>`` as in :mod:`.build`), keyed by
the library file (path, size, modification time) and the OpenMM version, so it runs once per build.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from .build import cache_directory, gpu_libraries

SELFTEST_VERSION = 1
CRASH_ENV = "OPENMM_FLOWMATCH_SELFTEST_CRASH"
"""Testing hook: a stage name at which the child process kills itself with SIGSEGV (never cached)."""
TIMEOUT_SECONDS = 300.0
MAIN_STAGES = ("load", "deserialize", "Reference", "CPU")


def record_path(library: Path) -> Path:
    """Where the outcome for ``library`` is kept."""
    import openmm

    stat = Path(library).stat()
    key = f"{SELFTEST_VERSION}|{Path(library).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{openmm.__version__}"
    return cache_directory() / "selftest" / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")


def recorded_outcome(library: Path) -> Optional[dict]:
    """The kept outcome of ``library``'s self-test (see :func:`library_selftest`), or ``None`` if none was kept."""
    path = record_path(library)
    return json.loads(path.read_text()) if path.is_file() else None


def library_selftest(library: Path, timeout: float = TIMEOUT_SECONDS) -> dict:
    """``{"main": reason or None, "gpu": {platform: reason or None}}`` for ``library`` (cached).

    ``main`` is ``None`` when the library loads, deserializes a ``CGNetForce`` and evaluates it on
    Reference and CPU in a child process; a GPU platform's entry is ``None`` when its kernel did too.
    """
    path = record_path(library)
    hooked = bool(os.environ.get(CRASH_ENV))
    recorded = recorded_outcome(library)
    if recorded is not None and not hooked:
        return recorded
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writable = os.access(path.parent, os.W_OK)
    except OSError:
        writable = False
    folder = path.parent if writable else Path(tempfile.gettempdir())  # unwritable cache: run, do not record
    progress = folder / f".{path.stem}.{os.getpid()}.progress.json"
    command = [sys.executable, "-m", "openmm_flowmatch.native.selftest", str(library), str(progress)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        failure = None if result.returncode == 0 else _describe_exit(result.returncode, result.stderr)
    except subprocess.TimeoutExpired:
        failure = f"did not finish within {timeout:.0f} s"
    done = json.loads(progress.read_text()) if progress.is_file() else {"passed": [], "stage": "load", "gpu": {}}
    progress.unlink(missing_ok=True)
    outcome = _outcome(done, failure)
    if writable and not hooked:
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(outcome, indent=1))
        os.replace(temporary, path)
    return outcome


def _describe_exit(returncode: int, stderr: str) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the process crashed ({name})"
    lines = [line for line in (stderr or "").strip().splitlines() if line.strip()]
    return f"exit status {returncode}: {lines[-1] if lines else 'no message'}"


def _outcome(done: dict, failure: Optional[str]) -> dict:
    """Turn the child's progress record (and how it ended) into the per-library / per-platform verdict."""
    gpu = dict(done.get("gpu", {}))
    stage = done.get("stage")
    main = None
    if failure is not None:
        if stage in MAIN_STAGES or stage is None:
            where = f"at stage {stage!r}" if stage is not None else "after its last stage (at exit)"
            main = f"the native library failed its self-test {where} in a child process: {failure}"
        else:
            gpu[stage] = f"the {stage} kernel failed its self-test in a child process: {failure}"
    return {"main": main, "gpu": gpu, "passed": done.get("passed", [])}


# ------------------------------------------------------------------------------------- child process


def tiny_parameters() -> dict:
    """A 5-bead CGNet (width 8, two layers, tanh) with fixed weights, as :func:`~.force.network_parameters` gives."""
    generator = np.random.default_rng(7)
    bonds = [(0, 1), (1, 2), (2, 3), (3, 4)]
    angles = [(0, 1, 2), (1, 2, 3), (2, 3, 4)]
    dihedrals = [(0, 1, 2, 3), (1, 2, 3, 4)]
    pairs = [(0, 3), (0, 4), (1, 4)]
    features = len(bonds) + len(angles) + 2 * len(dihedrals) + len(pairs)
    layers = [(generator.normal(size=(8, features)), generator.normal(size=8)),
              (generator.normal(size=(8, 8)) / 3, generator.normal(size=8)),
              (generator.normal(size=(1, 8)), generator.normal(size=1))]
    return {"n_beads": 5, "activation": "tanh", "bonds": bonds, "angles": angles, "dihedrals": dihedrals,
            "pairs": pairs, "mean": np.zeros(features), "std": np.ones(features), "layers": layers}


def run_child(library: Path, progress: Path) -> None:
    """The child's stages; after each, ``progress`` says what passed and which stage runs next."""
    import openmm

    from .force import check_configurations, force_energies_and_forces, force_xml

    record: dict = {"passed": [], "stage": None, "gpu": {}}

    def enter(stage: str) -> None:
        record["stage"] = stage
        progress.write_text(json.dumps(record))
        if os.environ.get(CRASH_ENV) == stage:
            os.kill(os.getpid(), signal.SIGSEGV)

    def passed() -> None:
        record["passed"].append(record["stage"])
        record["stage"] = None
        progress.write_text(json.dumps(record))

    enter("load")
    openmm.Platform.loadPluginLibrary(str(library))
    passed()
    enter("deserialize")
    force = openmm.XmlSerializer.deserialize(force_xml(tiny_parameters(), 2))
    passed()
    positions = check_configurations(5, 2, n_configurations=1)[0]
    results = {}
    for platform_name in ("Reference", "CPU"):
        enter(platform_name)
        (results[platform_name],) = force_energies_and_forces(force, len(positions), platform_name, [positions])
        if not np.isfinite(results[platform_name][0]) or not np.all(np.isfinite(results[platform_name][1])):
            raise RuntimeError(f"non-finite energy or forces on {platform_name}")
        passed()
    found, _ = gpu_libraries(library)
    platforms = {openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())}
    for platform_name, path in found.items():
        if platform_name not in platforms:
            continue
        enter(platform_name)
        try:
            openmm.Platform.loadPluginLibrary(str(path))
            ((energy, forces),) = force_energies_and_forces(force, len(positions), platform_name, [positions])
            reference_energy, reference_forces = results["Reference"]
            if abs(energy - reference_energy) > 1e-3 * max(abs(reference_energy), 1.0) or \
                    np.abs(forces - reference_forces).max() > 1e-3 * max(np.abs(reference_forces).max(), 1.0):
                raise RuntimeError(f"energy {energy} vs Reference {reference_energy}")
            record["gpu"][platform_name] = None
        except Exception as error:  # noqa: BLE001 - any failure disables this platform only
            record["gpu"][platform_name] = f"the {platform_name} kernel failed its self-test: {error}"
        passed()


if __name__ == "__main__":  # pragma: no cover - run as the child process
    run_child(Path(sys.argv[1]), Path(sys.argv[2]))
