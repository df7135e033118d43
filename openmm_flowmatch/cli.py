"""The ``openmm-flowmatch`` command.

Subcommands follow the data flow of the package::

    generate ──► fit-priors ──► train-flow ──► teacher ──► train-ff ──► export ──► simulate ──► analyze
    check-time-step   the largest time step at which an exported model integrates soundly
    demo        all of the above for alanine dipeptide, cached and resumable
    benchmark   run the scripts in benchmarks/

Errors are reported as one line on stderr with exit code 1 (``--debug`` shows the traceback).
This module only parses arguments, sets up logging and calls the library.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("openmm_flowmatch.cli")

PROGRAM = "openmm-flowmatch"
SMALL_NETWORK_COMMANDS = ("simulate", "demo", "check-time-step")
"""Commands that run PyTorch on one thread unless --torch-threads says otherwise."""


FEATURE_SET_NAMES = ("dihedrals_and_distances", "all_but_bonds", "all")
"""Names of forcefield.features.FEATURE_SETS, default first (kept here so that --help imports no torch)."""


class CLIError(ValueError):
    """Bad command-line input."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _read_data(paths: Sequence[str]) -> dict:
    """Concatenate CG data: HDF5 files or directories of them (through ``CGDataset``), or .npz with x/f."""
    import numpy as np

    from openmm_flowmatch.data.dataset import CGDataset

    for name in paths:
        if not Path(name).exists():
            raise CLIError(f"{name}: no such data file")
    archives = [Path(name) for name in paths if Path(name).suffix == ".npz"]
    hdf5 = [name for name in paths if Path(name).suffix != ".npz"]
    positions, forces, metadata = [], [], {}
    if hdf5:
        dataset = CGDataset.from_files(hdf5)
        positions.append(dataset.positions)
        if dataset.forces is not None:
            forces.append(dataset.forces)
        metadata = dict(dataset.metadata)
    for path in archives:
        with np.load(path) as archive:
            positions.append(archive["x"] if "x" in archive else archive["positions"])
            key = "f" if "f" in archive else ("forces" if "forces" in archive else None)
            if key is not None:
                forces.append(archive[key])
    return {
        "positions": np.concatenate(positions),
        "forces": np.concatenate(forces) if forces and len(forces) == len(positions) else None,
        "metadata": metadata,
    }


def _mapping_of(data: dict, reference: str | None = None):
    """The CGMapping stored in a data file's metadata (or in a reference data file's)."""
    from openmm_flowmatch.mapping import CGMapping

    metadata = data.get("metadata") or {}
    if "mapping" not in metadata and reference:
        metadata = _read_data([reference])["metadata"]
    if "mapping" not in metadata:
        return None
    return CGMapping.from_dict(metadata["mapping"])


def _temperature(option: float | None, metadata: dict, what: str) -> float:
    if option is not None:
        return float(option)
    if metadata.get("temperature") is not None:
        return float(metadata["temperature"])
    raise CLIError(f"the temperature of {what} is unknown; pass --temperature (K)")


TRAINING_SETTINGS = {
    "train-flow": ("batch_size", "learning_rate", "blocks", "hidden", "seed"),
    "train-ff": ("method", "width", "layers", "feature_set", "batch_size", "learning_rate", "seed"),
}
"""Options of the training commands that a resumed run must share with the checkpoint's run
(``--epochs`` may grow, ``--device`` may change); the data and priors files are compared by content."""


def _file_digest(names: Sequence[str | None]) -> list:
    """SHA-256 of each file (of each file inside a directory, in name order); ``None`` stays."""
    import hashlib

    digests = []
    for name in names:
        if name is None or not Path(name).exists():
            digests.append(None)
            continue
        files = sorted(p for p in Path(name).rglob("*") if p.is_file()) if Path(name).is_dir() else [Path(name)]
        digest = hashlib.sha256()
        for path in files:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        digests.append(digest.hexdigest())
    return digests


def _first_rank() -> bool:
    """False on the ranks > 0 of a ``torchrun`` job (``RANK`` set, ``WORLD_SIZE > 1``)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0


def _is_main_process() -> bool:
    """True unless this is a rank > 0 of a distributed job (which must not write the output)."""
    from openmm_flowmatch.distributed import is_main_process as main

    return main() and _first_rank()


@contextmanager
def _job_guard(args: argparse.Namespace):
    """Lock the output files of train-flow, teacher and train-ff, and refuse a resume with changed settings.

    ``generate`` and ``simulate`` lock their output directories in the library; see
    openmm_flowmatch/locking.py and docs/reliability.md.
    """
    if args.command not in ("train-flow", "teacher", "train-ff") or not _first_rank():
        yield  # under torchrun rank 0 alone locks and checks (it alone writes; see docs/distributed.md)
        return
    from openmm_flowmatch.locking import check_settings, lock_outputs

    checkpoint = getattr(args, "checkpoint", None)
    with lock_outputs(checkpoint, args.out):
        if checkpoint is not None:
            settings = {key: getattr(args, key) for key in TRAINING_SETTINGS[args.command]}
            settings.update(data=_file_digest(args.data), priors=_file_digest([getattr(args, "priors", None)])[0])
            check_settings(f"{checkpoint}.settings.json", settings, resuming=Path(checkpoint).exists())
        yield


# --------------------------------------------------------------------------------------------
# subcommands
# --------------------------------------------------------------------------------------------


def command_generate(args: argparse.Namespace) -> None:
    from openmm_flowmatch.data.reference import generate_reference

    files = generate_reference(
        args.pdb, args.out, args.mapping, temperature=args.temperature, duration_ps=args.duration,
        time_step_ps=args.time_step, save_interval_steps=args.save_interval, friction_per_ps=args.friction,
        equilibration_ps=args.equilibration, replicas=args.replicas, seed=args.seed, platform=args.platform,
        threads=args.threads, fix_pdb=args.fix_pdb, solvent=args.solvent, overwrite=args.overwrite,
        checkpoint_interval_frames=args.checkpoint_interval, progress=not args.quiet,
    )
    for path in files:
        logger.info("wrote %s", path)


def command_fit_priors(args: argparse.Namespace) -> None:
    from openmm_flowmatch.priors import Priors

    data = _read_data(args.data)
    mapping = _mapping_of(data)
    if mapping is None:
        raise CLIError("the data files hold no CG mapping; fit priors on files written by `generate`")
    temperature = _temperature(args.temperature, data["metadata"], "the data")
    repulsion = {"auto": "auto", "yes": True, "no": False}[args.repulsion]
    priors = Priors.fit(data["positions"], mapping.bonds, temperature, repulsion=repulsion, dihedrals=args.dihedrals)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(priors.to_dict(), indent=1) + "\n")
    logger.info("wrote %s: %r", out, priors)


def command_train_flow(args: argparse.Namespace) -> None:
    from openmm_flowmatch.flows.training import train_flow

    data = _read_data(args.data)
    flow = train_flow(
        data["positions"], epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        n_blocks=args.blocks, hidden_features=args.hidden, seed=args.seed, device=args.device,
        checkpoint_path=args.checkpoint, progress=not args.quiet,
    )
    if _is_main_process():
        flow.save(args.out)
    logger.info("wrote %s", args.out)


def command_teacher(args: argparse.Namespace) -> None:
    from openmm_flowmatch.flows.model import CGFlow
    from openmm_flowmatch.flows.teacher import sample_teacher

    metadata = _read_data([args.reference])["metadata"] if args.reference else {}
    temperature = _temperature(args.temperature, metadata, "the flow's training data (give --reference or --temperature)")
    extra = {"mapping": metadata["mapping"]} if "mapping" in metadata else None
    flow = CGFlow.load(args.flow)
    report = sample_teacher(
        flow, args.samples, args.out, temperature, batch_size=args.batch_size, force_threshold=args.force_threshold,
        seed=args.seed, metadata=extra, progress=not args.quiet,
    )
    logger.info(
        "wrote %s: %d samples, %.2f %% dropped as outliers", args.out, report.n_samples, 100 * report.dropped_fraction
    )


def command_train_ff(args: argparse.Namespace) -> None:
    from openmm_flowmatch.forcefield import save_network
    from openmm_flowmatch.forcefield.training import train_force_field
    from openmm_flowmatch.priors import Priors

    data = _read_data(args.data)
    if data["forces"] is None:
        raise CLIError("the data files hold no forces; train on teacher samples or on reference data with forces")
    mapping = _mapping_of(data, args.reference)
    priors = Priors.from_dict(json.loads(Path(args.priors).read_text())) if args.priors else None
    model = train_force_field(
        {"positions": data["positions"], "forces": data["forces"]}, priors, method=args.method,
        bonds=mapping.bonds if mapping is not None else None,
        model_kwargs={"hidden_width": args.width, "n_layers": args.layers, "feature_set": args.feature_set},
        epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, checkpoint_path=args.checkpoint,
        seed=args.seed, device=args.device, progress=not args.quiet,
    )
    if _is_main_process():
        save_network(model, args.out)
    logger.info("wrote %s", args.out)


def command_export(args: argparse.Namespace) -> None:
    from openmm_flowmatch.forcefield import load_network
    from openmm_flowmatch.export import export_force_field
    from openmm_flowmatch.priors import Priors

    reference = _read_data([args.reference])
    mapping = _mapping_of(reference)
    if mapping is None:
        raise CLIError(f"{args.reference} holds no CG mapping; pass the reference data written by `generate`")
    priors = Priors.from_dict(json.loads(Path(args.priors).read_text())) if args.priors else None
    temperature = _temperature(args.temperature, reference["metadata"], "the reference data")
    path = export_force_field(
        load_network(args.model), args.out, priors=priors, mapping=mapping, temperature=temperature,
        replicas=args.replicas,
    )
    logger.info("wrote %s", path)


def _rank_part_of_simulation(args: argparse.Namespace, starts, properties: dict):
    """Under torchrun or srun: this rank's replicas, output folder, seed and GPU (args updated)."""
    from openmm_flowmatch.distributed import environment_ranks, rank_seed, replica_slice

    ranks = environment_ranks()
    if not ranks.active:
        return starts
    part = replica_slice(args.replicas, ranks)
    args.out = str(Path(args.out) / f"rank_{ranks.rank:03d}")
    args.seed = rank_seed(args.seed, ranks.rank)
    args.replicas = part.stop - part.start
    if (args.platform or "").upper() in ("CUDA", "OPENCL", "HIP"):
        properties["DeviceIndex"] = str(ranks.local_rank)
    logger.info("rank %d of %d: replicas %d-%d into %s (seed %d)", ranks.rank, ranks.world_size, part.start,
                part.stop - 1, args.out, args.seed)
    return None if starts is None else starts[part]


def command_simulate(args: argparse.Namespace) -> None:
    import numpy as np

    from openmm_flowmatch.simulation import simulate_force_field

    starts = None
    if args.start_from:
        frames = _read_data([args.start_from])["positions"]
        starts = frames[np.linspace(0, len(frames) - 1, args.replicas).astype(int)]
    properties = {"Threads": str(args.threads)} if args.threads else {}
    starts = _rank_part_of_simulation(args, starts, properties)
    properties = properties or None
    if args.time_step is None:
        from openmm_flowmatch.export import FlowMatchForceField

        recorded = FlowMatchForceField.load(args.artifact).sound_time_step
        args.time_step = recorded or 0.002
        logger.info("time step %g fs (%s)", args.time_step * 1000,
                    "largest sound step recorded in the artifact" if recorded else "default; none recorded by check-time-step")
    result = simulate_force_field(
        args.artifact, args.pdb, args.out, args.steps, replicas=args.replicas, batched=not args.separate,
        initial_positions=starts, temperature=args.temperature, friction=args.friction, time_step=args.time_step,
        report_interval=args.report_interval, checkpoint_interval=args.checkpoint_interval,
        trajectory_format=args.format, platform=args.platform, platform_properties=properties, seed=args.seed,
        min_distance=args.min_distance, resume=not args.restart, progress=not args.quiet, backend=args.backend,
    )
    logger.info(
        "wrote %d trajectories of %d frames to %s (%.1f ns/day summed over replicas on %s)",
        result.replicas, result.frames_per_replica, args.out, result.ns_per_day, result.platform,
    )
    # the kinetic-temperature summary and the bond-width ratios were logged by the library (a WARNING if unsound)
    if result.kinetic_temperature is not None and not result.kinetic_temperature.sound:
        logger.info("run `%s check-time-step %s %s` to find a sound time step", PROGRAM, args.artifact, args.pdb)


def _starting_frames(structure: str, start_from: str | None, force_field):
    """CG start positions (frames, beads, 3): frames of a data file, else the structure's beads."""
    from openmm_flowmatch.simulation import cg_structure

    if start_from:
        return _read_data([start_from])["positions"]
    return cg_structure(force_field, structure)[1][None]


def command_check_time_step(args: argparse.Namespace) -> None:
    from openmm_flowmatch.analysis import write_metrics
    from openmm_flowmatch.diagnostics import check_time_step, record_sound_time_step
    from openmm_flowmatch.export import FlowMatchForceField

    force_field = FlowMatchForceField.load(args.artifact)
    properties = {"Threads": str(args.threads)} if args.threads else None
    report = check_time_step(
        force_field, _starting_frames(args.structure, args.start_from, force_field),
        time_steps=[step / 1000.0 for step in args.time_steps], replicas=args.replicas,
        equilibration_time=args.equilibration_time, production_time=args.production_time,
        temperature=args.temperature, friction=args.friction, platform=args.platform, seed=args.seed,
        progress=not args.quiet, configurational=not args.no_configurational, platform_properties=properties,
    )
    print(report.table())
    largest = report.largest_sound_time_step
    print(f"largest sound time step: {'none of those tested' if largest is None else f'{largest * 1000:g} fs'}")
    if args.json:
        write_metrics(args.json, report.to_dict())
        logger.info("wrote %s", args.json)
    if not args.no_record:
        record_sound_time_step(args.artifact, report)
        logger.info("recorded the largest sound time step in %s", args.artifact)


def _load_many(paths: Sequence[str], topology: str | None, skip_fraction: float) -> list:
    from openmm_flowmatch import analysis

    arrays = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files = sorted(path.glob("replica_*.dcd")) + sorted(path.glob("replica_*.xtc")) + sorted(path.glob("replica_*.h5"))
            files = files or sorted(part for part in path.glob("rank_*") if part.is_dir())  # a simulate ensemble
            if not files:
                raise CLIError(f"{path}: no replica_* trajectories or data files in this directory")
            arrays.extend(_load_many([str(f) for f in files], topology, skip_fraction))
            continue
        top = topology
        if top is None and path.suffix in (".dcd", ".xtc") and (path.parent / "topology.pdb").exists():
            top = str(path.parent / "topology.pdb")
        positions = analysis.load_positions(path, top)
        arrays.append(positions[int(len(positions) * skip_fraction) :])
    return arrays


def command_analyze(args: argparse.Namespace) -> None:
    import numpy as np

    from openmm_flowmatch import analysis

    reference = _load_many(args.reference, args.topology, 0.0)
    model = _load_many(args.model, args.topology, args.skip)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = args.kind or ("tica" if args.native else "phi-psi")
    native = _native_structure(args, reference, model) if args.native else None
    _check_bead_counts(args, reference, model)
    if kind == "phi-psi":
        comparison = analysis.compare_phi_psi(
            np.concatenate(reference), np.concatenate(model), temperature=args.temperature, bins=args.bins
        )
        labels = ("φ (rad)", "ψ (rad)")
    else:
        comparison = analysis.compare_tica(reference, model, lag=args.lag, temperature=args.temperature, bins=args.bins)
        labels = ("TIC 1", "TIC 2")
    metrics = {kind: comparison.metrics}
    if kind == "tica":
        metrics["distance_histograms_mean_js"] = analysis.distance_histograms(
            np.concatenate(reference), np.concatenate(model)
        )["mean_js_divergence"]
    if native is not None:
        metrics.update(_protein_metrics(args, reference, model, native, out))
    metrics["bonded"] = _bonded_against_reference(args.reference, reference, model)
    analysis.plot_free_energy_comparison(comparison, out / f"{kind}.png", labels=labels)
    analysis.write_metrics(out / "metrics.json", metrics)
    logger.info(
        "%s: FES MSE %.4f (kcal/mol)², JS %.5f, KL %.5f over %d bins", kind, comparison.metrics["fes_mse"],
        comparison.metrics["js_divergence"], comparison.metrics["kl_divergence"], comparison.metrics["bins_compared"],
    )
    logger.info("wrote %s and %s", out / f"{kind}.png", out / "metrics.json")


def _check_bead_counts(args: argparse.Namespace, reference: list, model: list) -> None:
    counts = {"reference": sorted({array.shape[1] for array in reference}), "model": sorted({array.shape[1] for array in model})}
    if len(set(counts["reference"] + counts["model"])) > 1:
        raise CLIError(
            f"the reference ({' '.join(args.reference)}) has {counts['reference']} beads per frame but the model "
            f"({' '.join(args.model)}) {counts['model']}; compare trajectories of the same CG molecule"
        )


def _native_structure(args: argparse.Namespace, reference: list, model: list):
    """The native structure's beads, refused (one line) when a trajectory or --topology is of another protein."""
    from openmm_flowmatch import protein_analysis

    native = protein_analysis.load_native(args.native, reference[0].shape[1])
    for what, names, arrays in (("reference", args.reference, reference), ("model", args.model, model)):
        for array in arrays:
            protein_analysis.check_same_protein(array, native, f"the {what} {' '.join(names)}")
    if args.topology and Path(args.topology).suffix.lower() == ".pdb":
        import mdtraj

        protein_analysis.check_same_protein(mdtraj.load(args.topology, frame=0), native, f"the topology {args.topology}")
    return native


def _protein_metrics(args: argparse.Namespace, reference: list, model: list, native, out: Path) -> dict:
    """RMSD means (``rmsd_nm``) and every protein metric (``protein``); writes protein.png."""
    import numpy as np

    from openmm_flowmatch import analysis, protein_analysis

    if args.frame_interval is None:
        logger.warning("no --frame-interval given: transitions are counted without times and rates")
    options = dict(
        temperature=args.temperature, lag=args.lag, frame_interval_ps=args.frame_interval,
        model_frame_interval_ps=args.model_frame_interval, bins=args.bins,
    )
    protein = protein_analysis.compare_proteins(reference, model, native, **options)
    figure = protein_analysis.plot_protein_comparison(reference, model, native, out / "protein.png", **options)
    logger.info("wrote %s", figure)
    model_rmsd = analysis.rmsd_to_native(np.concatenate(model), native.positions)
    reference_rmsd = analysis.rmsd_to_native(np.concatenate(reference), native.positions)
    return {
        "protein": protein,
        "rmsd_nm": {"model_mean": float(model_rmsd.mean()), "reference_mean": float(reference_rmsd.mean())},
    }


def _bonded_against_reference(reference_paths: Sequence[str], reference: list, model: list) -> dict:
    """Bond and angle widths of the model against the reference (bond graph from the data, else a chain)."""
    import numpy as np

    from openmm_flowmatch import analysis
    from openmm_flowmatch.priors import bonded_triples

    n_beads = reference[0].shape[1]
    mapping = None
    data_files = [name for name in reference_paths if Path(name).suffix in (".h5", ".hdf5")]
    if data_files:
        mapping = _mapping_of(_read_data(data_files[:1]))
    bonds = mapping.bonds if mapping is not None and mapping.n_beads == n_beads else [(i, i + 1) for i in range(n_beads - 1)]
    angles = bonded_triples(bonds, n_beads).tolist()
    comparison = analysis.compare_bonded_statistics(
        analysis.bonded_statistics(np.concatenate(model), bonds, angles),
        analysis.bonded_statistics(np.concatenate(reference), bonds, angles),
    )
    logger.info(
        "bond width ratios model/reference %.3f–%.3f, angle width ratios %.3f–%.3f, largest bond mean shift %.4f nm",
        comparison["bond_width_ratio_min"], comparison["bond_width_ratio_max"], comparison["angle_width_ratio_min"],
        comparison["angle_width_ratio_max"], comparison["bond_mean_shift_max"],
    )
    return comparison


def command_demo(args: argparse.Namespace) -> None:
    from openmm_flowmatch.demo import run_demo, sizes_from_options

    sizes = sizes_from_options(
        quick=args.quick, replicas=args.replicas, simulation_steps=args.steps, reference_ps=args.reference_ps,
        teacher_samples=args.teacher_samples, seed=args.seed,
    )
    report = run_demo(args.out, sizes, platform=args.platform, threads=args.threads, progress=not args.quiet)
    stages = report["stages"]
    logger.info("stage wall times: %s", ", ".join(f"{name} {stage['seconds']:.1f} s" for name, stage in stages.items()))
    logger.info("total %.1f s", report["total_seconds"])
    metrics = stages.get("analyze", {}).get("metrics", {})
    logger.info(
        "φ/ψ of the CG simulation against the reference: FES MSE %.3f (kcal/mol)², JS %.4f, KL %.4f",
        metrics.get("fes_mse", float("nan")), metrics.get("js_divergence", float("nan")),
        metrics.get("kl_divergence", float("nan")),
    )
    logger.info("figure: %s", report["outputs"]["figure"])


def _benchmark_directory(option: str | None) -> Path | None:
    candidates = [Path(option)] if option else [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[1] / "benchmarks"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


def command_benchmark(args: argparse.Namespace) -> None:
    directory = _benchmark_directory(args.directory)
    available = sorted(p.stem for p in directory.glob("*.py")) if directory else []
    if not args.name:
        if not available:
            logger.info("no benchmarks found (looked for a benchmarks/ folder; give --directory)")
        else:
            logger.info("benchmarks in %s:\n  %s", directory, "\n  ".join(name.replace("_", "-") for name in available))
        return
    name = (args.name[:-3] if args.name.endswith(".py") else args.name).replace("-", "_")
    if name not in available:
        raise CLIError(
            f"no benchmark {args.name!r}"
            + (
                f" in {directory}; available: {', '.join(item.replace('_', '-') for item in available)}"
                if available
                else "; no benchmarks/ folder found"
            )
        )
    command = [sys.executable, str(directory / f"{name}.py"), *args.arguments]
    logger.info("running %s", " ".join(command))
    completed = subprocess.run(command, check=False)
    if completed.returncode:
        raise CLIError(f"benchmark {name} failed with exit code {completed.returncode}")


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Append "(default: X)" to option help unless the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


def _add_platform(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--platform", default=default,
        help="OpenMM platform (CUDA, CPU, Reference)" + ("; default: CUDA > CPU > Reference" if default is None else ""),
    )
    parser.add_argument("--threads", type=int, default=None, help="threads of OpenMM's CPU platform (default: all cores)")


def _add_training_options(sub: argparse.ArgumentParser, epochs: int, batch_size: int) -> None:
    """The options every training command shares (budget, optimiser, checkpoint, device, seed)."""
    sub.add_argument("--epochs", type=int, default=epochs, help="maximum epochs")
    sub.add_argument("--batch-size", type=int, default=batch_size, help="frames per step")
    sub.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate")
    sub.add_argument("--checkpoint", default=None, help="checkpoint file (resumed if it exists)")
    sub.add_argument("--device", default="cpu", help="torch device")
    sub.add_argument("--seed", type=int, default=0, help="random seed")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``openmm-flowmatch`` (one subparser per subcommand)."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM, formatter_class=_Formatter,
        description="Flow-matching coarse-grained force fields for OpenMM (units: nm, ps, K, kJ/mol).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logging")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors; no progress bars")
    parser.add_argument(
        "--torch-threads", type=int, default=None,
        help="threads for PyTorch (default: 1 for simulate and demo, whose CG networks are too small to gain from "
        "more, and PyTorch's choice otherwise)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def add(name: str, function, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter)
        sub.set_defaults(function=function)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        sub.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
        return sub

    _generate_arguments(add(
        "generate", command_generate,
        "All-atom reference MD with OpenMM, saved as CG positions and mapped forces (HDF5).",
    ))
    _fit_priors_arguments(add(
        "fit-priors", command_fit_priors,
        "Fit prior terms (harmonic bonds/angles, repulsion) to CG data by Boltzmann inversion.",
    ))
    _train_flow_arguments(add(
        "train-flow", command_train_flow,
        "Train the normalizing-flow teacher on CG positions (maximum likelihood).",
    ))
    _teacher_arguments(add(
        "teacher", command_teacher,
        "Draw flow samples with forces kT∇log q (kJ/mol/nm), drop outliers, write HDF5.",
    ))
    _train_ff_arguments(add(
        "train-ff", command_train_ff,
        "Train the CG network by force matching (teacher forces: flow-matching).",
    ))
    _export_arguments(add(
        "export", command_export,
        "Write the TorchScript force-field artifact (.pt with metadata) for OpenMM.",
    ))
    _simulate_arguments(add(
        "simulate", command_simulate,
        "Simulate an exported force field in OpenMM (Langevin, replicas, DCD/XTC, checkpoints).",
    ))
    _check_time_step_arguments(add(
        "check-time-step", command_check_time_step,
        "Find the largest time step at which a force field integrates soundly (kinetic T within 2 percent of the bath, "
        "bond widths within 10 percent of the data) and record it in the artifact.",
    ))
    _analyze_arguments(add(
        "analyze", command_analyze,
        "Free-energy surfaces (φ/ψ or TICA), FES MSE, JS and KL divergences, PNG + JSON.",
    ))
    _demo_arguments(add(
        "demo", command_demo,
        "End-to-end alanine-dipeptide demo (reference → flow → teacher → force field → OpenMM → φ/ψ).",
    ))
    _benchmark_arguments(add("benchmark", command_benchmark, "Run a script from benchmarks/ by name, or list them."))
    return parser


def _generate_arguments(sub: argparse.ArgumentParser) -> None:
    """The options of `generate`."""
    sub.add_argument("pdb", help="all-atom structure (PDB/mmCIF)")
    sub.add_argument("--out", required=True, help="output directory (resumed if it holds checkpoints)")
    sub.add_argument("--mapping", default="backbone", choices=["backbone", "alpha_carbons", "center_of_mass"], help="CG map")
    sub.add_argument("--temperature", type=float, default=300.0, help="temperature (K)")
    sub.add_argument("--duration", type=float, default=1000.0, help="production length per replica (ps)")
    sub.add_argument("--equilibration", type=float, default=100.0, help="equilibration, not saved (ps)")
    sub.add_argument("--time-step", type=float, default=0.004, help="time step (ps)")
    sub.add_argument("--save-interval", type=int, default=50, help="steps between saved frames")
    sub.add_argument("--friction", type=float, default=1.0, help="Langevin friction (1/ps)")
    sub.add_argument("--replicas", type=int, default=1, help="independent replicas")
    sub.add_argument("--solvent", default="implicit", choices=["implicit", "explicit", "vacuum"], help="solvent model")
    sub.add_argument("--fix-pdb", action="store_true", help="complete the structure with pdbfixer first")
    sub.add_argument("--checkpoint-interval", type=int, default=500, help="frames between checkpoints (file writes)")
    sub.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    sub.add_argument("--seed", type=int, default=0, help="random seed")
    _add_platform(sub)


def _fit_priors_arguments(sub: argparse.ArgumentParser) -> None:
    """The options of `fit-priors`."""
    sub.add_argument("data", nargs="+", help="CG data files or directories from `generate`")
    sub.add_argument("--out", required=True, help="output JSON file")
    sub.add_argument("--temperature", type=float, default=None, help="temperature (K); default: from the data")
    sub.add_argument("--repulsion", default="auto", choices=["auto", "yes", "no"], help="repulsion between beads > 2 bonds apart (auto: not for 5 beads)")
    sub.add_argument("--dihedrals", action="store_true", help="add periodic dihedral priors")


def _train_flow_arguments(sub: argparse.ArgumentParser) -> None:
    """The options of `train-flow`."""
    sub.add_argument("data", nargs="+", help="CG data files or directories")
    sub.add_argument("--out", required=True, help="output flow file (.pt)")
    _add_training_options(sub, epochs=50, batch_size=256)
    sub.add_argument("--blocks", type=int, default=4, help="coupling blocks")
    sub.add_argument("--hidden", type=int, default=128, help="hidden units of the conditioners")


def _teacher_arguments(sub: argparse.ArgumentParser) -> None:
    """The options of `teacher`."""
    sub.add_argument("flow", help="flow file from `train-flow`")
    sub.add_argument("--out", required=True, help="output HDF5 file")
    sub.add_argument("--samples", type=int, default=100000, help="samples to keep")
    sub.add_argument("--reference", default=None, help="reference data file: temperature and mapping go into the metadata")
    sub.add_argument("--temperature", type=float, default=None, help="temperature (K); default: from --reference")
    sub.add_argument("--force-threshold", type=float, default=1.5e5, help="keep samples with mean (F/kT)² ≤ this ((kT/nm)²)")
    sub.add_argument("--batch-size", type=int, default=1024, help="samples per batch")
    sub.add_argument("--seed", type=int, default=0, help="random seed")


def _train_ff_arguments(sub: argparse.ArgumentParser) -> None:
    """The options of `train-ff`."""
    sub.add_argument("data", nargs="+", help="CG data with forces (teacher file, or reference data for the force-matching baseline)")
    sub.add_argument("--out", required=True, help="output network file (.pt)")
    sub.add_argument("--priors", default=None, help="priors JSON from `fit-priors`")
    sub.add_argument("--reference", default=None, help="reference data file for the CG bond graph when the data lacks it")
    sub.add_argument("--method", default="flow-matching", choices=["flow-matching", "force-matching"], help="what the forces are")
    _add_training_options(sub, epochs=100, batch_size=128)
    sub.add_argument("--width", type=int, default=160, help="hidden width of the CGnet")
    sub.add_argument("--layers", type=int, default=5, help="residual layers of the CGnet")
    sub.add_argument(
        "--feature-set", default=None, choices=FEATURE_SET_NAMES,
        help="network features: dihedrals and distances (bonds and angles left to the priors; the default for "
        "flow-matching, which it keeps integrable at 5 fs), all but bonds (angles too; for Cα proteins, whose "
        "angles are soft) or all of CGnet's (bonds and angles too; the default for force matching)",
    )


def _export_arguments(sub: argparse.ArgumentParser) -> None:
    """The options of `export`."""
    sub.add_argument("model", help="network file from `train-ff`")
    sub.add_argument("--reference", required=True, help="reference data file (mapping, temperature)")
    sub.add_argument("--priors", default=None, help="priors JSON the network was trained with")
    sub.add_argument("--out", required=True, help="output artifact (.pt)")
    sub.add_argument("--temperature", type=float, default=None, help="training temperature (K); default: from --reference")
    sub.add_argument("--replicas", type=int, default=1, help="default number of replicas recorded in the artifact")


def _simulate_arguments(sub: argparse.ArgumentParser) -> None:
    """The options of `simulate`."""
    sub.add_argument("artifact", help="force-field artifact from `export`")
    sub.add_argument("pdb", help="start structure: CG PDB (one atom per bead) or the all-atom PDB")
    sub.add_argument("--out", required=True, help="output directory (continued if it holds checkpoints)")
    sub.add_argument("--steps", type=int, default=100000, help="total steps per replica")
    sub.add_argument("--replicas", type=int, default=1, help="independent replicas")
    sub.add_argument("--separate", action="store_true", help="one Context per replica instead of one batched System")
    sub.add_argument("--start-from", default=None, help="CG data file: start the replicas from frames spread over it")
    sub.add_argument("--temperature", type=float, default=None, help="temperature (K); default: the artifact's")
    sub.add_argument("--friction", type=float, default=1.0, help="Langevin friction (1/ps)")
    sub.add_argument(
        "--time-step", type=float, default=None,
        help="time step (ps); default: the largest sound step recorded by `check-time-step` in the artifact, else 0.002",
    )
    sub.add_argument("--report-interval", type=int, default=100, help="steps between frames")
    sub.add_argument("--checkpoint-interval", type=int, default=None, help="steps between checkpoints (default 10 frames)")
    sub.add_argument("--format", default="dcd", choices=["dcd", "xtc"], help="trajectory format")
    sub.add_argument(
        "--backend", default="auto", choices=["auto", "torchforce", "native", "exported", "pythonforce", "pythontorchforce"],
        help="network backend (default auto: the native C++ kernel where it is built and exact for the network and "
             "platform, else TorchForce; the choice is logged; see docs/native.md, docs/compatibility.md)",
    )
    sub.add_argument("--min-distance", type=float, default=0.05, help="beads closer than this (nm) stop the run as a blow-up")
    sub.add_argument("--restart", action="store_true", help="start again instead of continuing from checkpoints")
    sub.add_argument("--seed", type=int, default=0, help="random seed")
    _add_platform(sub)


def _check_time_step_arguments(sub: argparse.ArgumentParser) -> None:
    """The options of `check-time-step`."""
    sub.add_argument("artifact", help="force-field artifact from `export`")
    sub.add_argument("structure", help="start structure: CG PDB (one atom per bead) or the all-atom PDB")
    sub.add_argument("--time-steps", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0, 5.0], help="time steps to try (fs)")
    sub.add_argument("--replicas", type=int, default=32, help="independent replicas per time step")
    sub.add_argument("--equilibration-time", type=float, default=2.0, help="equilibration per replica (ps)")
    sub.add_argument("--production-time", type=float, default=20.0, help="production per replica (ps)")
    sub.add_argument("--start-from", default=None, help="CG data file: start the replicas from its frames")
    sub.add_argument("--temperature", type=float, default=None, help="bath temperature (K); default: the artifact's")
    sub.add_argument("--friction", type=float, default=1.0, help="Langevin friction (1/ps)")
    sub.add_argument("--seed", type=int, default=0, help="random seed")
    sub.add_argument("--no-configurational", action="store_true", help="skip the configurational temperature")
    sub.add_argument("--no-record", action="store_true", help="do not store the result in the artifact")
    sub.add_argument("--json", default=None, help="also write the report as JSON to this file")
    _add_platform(sub)


def _analyze_arguments(sub: argparse.ArgumentParser) -> None:
    """The options of `analyze`."""
    sub.add_argument("--reference", nargs="+", required=True, help="reference data files/trajectories (or directories)")
    sub.add_argument("--model", nargs="+", required=True, help="model trajectories/data (or simulation directories)")
    sub.add_argument("--out", required=True, help="output directory for metrics.json and the PNG")
    sub.add_argument(
        "--kind", default=None, choices=["phi-psi", "tica"],
        help="φ/ψ (5-bead alanine dipeptide) or TICA (proteins); default: tica with --native, else phi-psi",
    )
    sub.add_argument("--topology", default=None, help="CG PDB for DCD/XTC files (default: topology.pdb next to them)")
    sub.add_argument("--temperature", type=float, default=300.0, help="temperature for kT (K)")
    sub.add_argument("--bins", type=int, default=60, help="histogram bins per axis")
    sub.add_argument("--lag", type=int, default=100, help="TICA lag (frames)")
    sub.add_argument("--skip", type=float, default=0.1, help="fraction of each model trajectory dropped as equilibration")
    sub.add_argument(
        "--native", default=None,
        help="native structure (all-atom PDB, mapped to Cα, or CG PDB): protein mode, adding RMSD, fraction folded, "
        "transitions, Rg, contact maps and protein.png (docs/proteins.md)",
    )
    sub.add_argument("--frame-interval", type=float, default=None, help="time between reference frames (ps), for transition rates")
    sub.add_argument("--model-frame-interval", type=float, default=None, help="time between model frames (ps); default --frame-interval")


def _demo_arguments(sub: argparse.ArgumentParser) -> None:
    """The options of `demo`."""
    from openmm_flowmatch.demo import FULL

    sub.add_argument("--out", required=True, help="output directory; stages done before are skipped")
    sub.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for tests, not meaningful)")
    sub.add_argument("--reference-ps", type=float, default=None, help=f"all-atom reference length (ps); default {FULL.reference_ps:g}")
    sub.add_argument("--teacher-samples", type=int, default=None, help=f"teacher samples; default {FULL.teacher_samples}")
    sub.add_argument("--replicas", type=int, default=None, help=f"CG replicas; default {FULL.replicas}")
    sub.add_argument(
        "--steps", type=int, default=None,
        help=f"CG steps per replica ({FULL.time_step_ps * 1000:g} fs each); default {FULL.simulation_steps}",
    )
    sub.add_argument("--seed", type=int, default=None, help=f"random seed; default {FULL.seed}")
    _add_platform(sub, default="CPU")


def _benchmark_arguments(sub: argparse.ArgumentParser) -> None:
    """The options of `benchmark`."""
    sub.add_argument("name", nargs="?", default=None, help="benchmark name (file name without .py); none: list")
    sub.add_argument("arguments", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    sub.add_argument("--directory", default=None, help="benchmarks folder (default: ./benchmarks)")


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s" if not debug else "%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("openmm_flowmatch").setLevel(level)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, (ValueError, OSError, RuntimeError)) else f"{type(error).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``openmm-flowmatch``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    _setup_logging(debug, getattr(args, "quiet", False))
    torch_threads = args.torch_threads or (1 if args.command in SMALL_NETWORK_COMMANDS else None)
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    try:
        with _job_guard(args):
            args.function(args)
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every error becomes one line unless --debug
        if debug:
            raise
        print(f"{PROGRAM} {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
