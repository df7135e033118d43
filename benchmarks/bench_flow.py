"""Benchmark: the flow teacher on alanine dipeptide (5 backbone beads).

Trains a :class:`~openmm_flowmatch.flows.CGFlow` on the first ``--train-ns`` ns of one reference run
(``ala2_train/<train-run>/chunk_*.npz``; the last 10 % of those frames, one contiguous block, is the
validation set for early stopping), then reports

- the NLL (nats per frame, Cartesian density with the frame fixed, nm units) of held-out frames:
  a later block of the same run and the start of the independent run;
- training time per epoch;
- teacher samples per second with forces, and the fraction dropped by the force threshold;
- the φ/ψ Jensen-Shannon divergence (natural log, 60×60 histogram on [−π, π)², DESIGN.md Metrics)
  of flow samples vs the training frames and vs the held-out frames, next to the divergence
  between training and held-out frames themselves (the sampling-noise floor of the data).

Writes ``benchmarks/results/flow_ala2.json`` and ``benchmarks/results/flow_ala2_phipsi.png``.

Usage::

    python benchmarks/bench_flow.py [--data DIR] [--train-ns 20] [--epochs 40] [--device cpu]

``DIR`` defaults to ``$OPENMM_FLOWMATCH_DATA`` or ``../shared/data`` next to the repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
from pathlib import Path

import numpy as np
import torch

from openmm_flowmatch.flows import negative_log_likelihood, sample_teacher, train_flow
from openmm_flowmatch.flows.internal import dihedral_angles

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results"
TEMPERATURE = 300.0
BINS = 60

logger = logging.getLogger("bench_flow")


def default_data_directory() -> Path:
    return Path(os.environ.get("OPENMM_FLOWMATCH_DATA", REPOSITORY.parent / "shared" / "data"))


def load_chunks(directory: Path, first: int, count: int, key: str = "x") -> np.ndarray:
    files = sorted(directory.glob("chunk_*.npz"))[first : first + count]
    if len(files) < count:
        raise SystemExit(f"{directory} holds fewer than {first + count} chunk_*.npz files")
    return np.concatenate([np.load(f)[key] for f in files]).astype(np.float64)


def phi_psi(positions: np.ndarray) -> np.ndarray:
    """φ (ACE C, N, CA, C) and ψ (N, CA, C, NME N): CG dihedrals 0 and 1, ``(frames, 2)`` rad."""
    return dihedral_angles(torch.as_tensor(positions, dtype=torch.float64)).numpy()[:, :2]


def histogram(angles: np.ndarray) -> np.ndarray:
    """60×60 density histogram on [−π, π)² (DESIGN.md Metrics), normalised to sum 1."""
    wrapped = np.mod(angles + np.pi, 2 * np.pi) - np.pi
    counts, _, _ = np.histogram2d(wrapped[:, 0], wrapped[:, 1], bins=BINS, range=[[-np.pi, np.pi], [-np.pi, np.pi]])
    return counts / counts.sum()


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (natural log) of two normalised histograms."""
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log(a[mask] / b[mask])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def harmonic_model_mean_squared_force(positions: np.ndarray) -> np.ndarray:
    """Mean squared force component, (kT/nm)², of independent harmonic bonds and angles fitted to
    ``positions`` (plus the exact Jacobian term), evaluated at ``positions``.

    The force scale that stiff CG bonds alone imply: context for the teacher's dropped fraction.
    """
    from openmm_flowmatch.flows.internal import cartesian_to_internal, log_det_jacobian

    x = torch.as_tensor(positions, dtype=torch.float64).clone().requires_grad_(True)
    bonds, angles, _ = cartesian_to_internal(x)
    values = torch.cat([bonds, angles], -1)
    mean, std = values.mean(0).detach(), values.std(0).detach()
    log_density = (-0.5 * ((values - mean) / std) ** 2).sum(-1) + log_det_jacobian(bonds, angles)
    (gradient,) = torch.autograd.grad(log_density.sum(), x)
    return (gradient**2).mean(dim=(1, 2)).numpy()


def free_energy(p: np.ndarray) -> np.ndarray:
    kT_kcal = 0.0083144626 * TEMPERATURE / 4.184
    with np.errstate(divide="ignore"):
        f = -kT_kcal * np.log(p)
    return f - f[np.isfinite(f)].min()


def plot(histograms: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histograms), figsize=(4.2 * len(histograms), 4), constrained_layout=True)
    for axis, (title, p) in zip(axes, histograms.items()):
        image = axis.imshow(
            free_energy(p).T, origin="lower", extent=[-np.pi, np.pi, -np.pi, np.pi], vmin=0, vmax=8, cmap="viridis"
        )
        axis.set_title(title)
        axis.set_xlabel("φ (rad)")
        axis.set_ylabel("ψ (rad)")
    fig.colorbar(image, ax=axes, label="free energy (kcal/mol)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=default_data_directory(), help="directory holding ala2_train/")
    parser.add_argument("--train-run", default="seed101")
    parser.add_argument("--test-run", default="seed102")
    parser.add_argument("--train-ns", type=int, default=20, help="ns (chunks) of the train run used for training")
    parser.add_argument("--test-ns", type=int, default=20, help="ns of held-out frames from each source")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--teacher-samples", type=int, default=100_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--checkpoint", type=Path, default=None, help="training checkpoint (resumed if present)")
    parser.add_argument("--save-flow", type=Path, default=None, help="also save the trained flow (CGFlow.save) here")
    arguments = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(arguments.threads)
    arguments.out.mkdir(parents=True, exist_ok=True)
    train_directory = arguments.data / "ala2_train" / arguments.train_run
    test_directory = arguments.data / "ala2_train" / arguments.test_run

    train = load_chunks(train_directory, 0, arguments.train_ns)
    train_forces = load_chunks(train_directory, 0, arguments.train_ns, key="f")
    n_chunks = len(sorted(train_directory.glob("chunk_*.npz")))
    held_out_same_run = load_chunks(train_directory, n_chunks - arguments.test_ns, arguments.test_ns)
    held_out_other_run = load_chunks(test_directory, 0, arguments.test_ns)
    logger.info("train %s, held out %s + %s frames", train.shape, held_out_same_run.shape, held_out_other_run.shape)

    flow = train_flow(
        train,
        epochs=arguments.epochs,
        batch_size=arguments.batch_size,
        seed=arguments.seed,
        device=arguments.device,
        checkpoint_path=arguments.checkpoint,
        progress=False,
    )
    history = flow.training_history
    epoch_seconds = [record["seconds"] for record in history]
    training_seconds = float(np.sum(epoch_seconds))  # also right when resumed from a finished checkpoint
    if arguments.save_flow is not None:
        flow.save(arguments.save_flow)
    flow = flow.to("cpu") if arguments.device == "cpu" else flow

    nll = {}
    for name, frames in [
        ("train", train),
        (f"held_out_{arguments.train_run}_last_{arguments.test_ns}ns", held_out_same_run),
        (f"held_out_{arguments.test_run}_first_{arguments.test_ns}ns", held_out_other_run),
    ]:
        value, outside = negative_log_likelihood(flow, frames)
        nll[name] = {"nll_nats_per_frame": value, "frames_outside_support": outside, "frames": len(frames)}

    report = sample_teacher(
        flow,
        arguments.teacher_samples,
        arguments.out / "flow_ala2_teacher.h5",
        TEMPERATURE,
        batch_size=4096,
        seed=arguments.seed + 1,
        progress=False,
    )
    from openmm_flowmatch.data.storage import read_cg_file

    teacher = read_cg_file(report.path)
    samples = np.asarray(teacher["positions"], dtype=np.float64)
    raw_samples = flow.sample(arguments.teacher_samples, seed=arguments.seed + 2).detach().cpu().double().numpy()

    h_train = histogram(phi_psi(train))
    h_same = histogram(phi_psi(held_out_same_run))
    h_other = histogram(phi_psi(held_out_other_run))
    h_teacher = histogram(phi_psi(samples))
    h_raw = histogram(phi_psi(raw_samples))
    js = {
        "teacher_vs_train": js_divergence(h_train, h_teacher),
        "flow_samples_vs_train": js_divergence(h_train, h_raw),
        f"teacher_vs_held_out_{arguments.train_run}": js_divergence(h_same, h_teacher),
        f"teacher_vs_held_out_{arguments.test_run}": js_divergence(h_other, h_teacher),
        f"train_vs_held_out_{arguments.train_run}": js_divergence(h_train, h_same),
        f"train_vs_held_out_{arguments.test_run}": js_divergence(h_train, h_other),
        f"held_out_{arguments.train_run}_vs_held_out_{arguments.test_run}": js_divergence(h_same, h_other),
    }
    plot(
        {
            f"training data ({arguments.train_ns} ns)": h_train,
            f"flow teacher ({report.n_samples} samples)": h_teacher,
            f"held out ({arguments.test_run}, {arguments.test_ns} ns)": h_other,
        },
        arguments.out / "flow_ala2_phipsi.png",
    )

    results = {
        "machine": f"{platform.machine()} CPU with {os.cpu_count()} cores shared with other jobs, torch threads "
        f"{arguments.threads}, load average {os.getloadavg()[0]:.2f} at end"
        if arguments.device == "cpu"
        else str(arguments.device),
        "command": "python benchmarks/bench_flow.py " + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(arguments).items()
            if k not in ("data", "out", "checkpoint", "save_flow")
        ),
        "data": {
            "train": f"{arguments.train_run} chunks 0..{arguments.train_ns - 1} ({len(train)} frames, last 10% validation)",
            "held_out": [
                f"{arguments.train_run} last {arguments.test_ns} chunks ({len(held_out_same_run)} frames)",
                f"{arguments.test_run} first {arguments.test_ns} chunks ({len(held_out_other_run)} frames)",
            ],
        },
        "flow_config": flow.config.__dict__,
        "n_parameters": sum(p.numel() for p in flow.parameters()),
        "epochs_run": len(history),
        "best_validation_nll": min(r["validation_nll"] for r in history),
        "training_seconds_total": training_seconds,
        "seconds_per_epoch_mean": float(np.mean(epoch_seconds)),
        "seconds_per_epoch_median": float(np.median(epoch_seconds)),
        "nll": nll,
        "teacher": {
            "n_samples": report.n_samples,
            "n_drawn": report.n_drawn,
            "dropped_fraction": report.dropped_fraction,
            "force_threshold_kT_per_nm_squared": report.force_threshold,
            "samples_per_second_with_forces": report.samples_per_second,
            "rms_force_kJ_per_mol_per_nm": float(np.sqrt(np.mean(np.asarray(teacher["forces"], dtype=np.float64) ** 2))),
            # context: the same threshold applied to a harmonic bond/angle model fitted to the
            # training frames (at those frames), and to the mapped all-atom forces of those frames
            "harmonic_model_fraction_above_threshold": float(
                np.mean(harmonic_model_mean_squared_force(train[:20000]) > report.force_threshold)
            ),
            "mapped_all_atom_forces_fraction_above_threshold": float(
                np.mean(np.mean((train_forces / (0.0083144626 * TEMPERATURE)) ** 2, axis=(1, 2)) > report.force_threshold)
            ),
        },
        "phi_psi_js_divergence": js,
        "history": history,
    }
    path = arguments.out / "flow_ala2.json"
    path.write_text(json.dumps(results, indent=2))
    (arguments.out / "flow_ala2_teacher.h5").unlink(missing_ok=True)  # 12 MB: not a result to keep
    logger.info("wrote %s\n%s", path, json.dumps({k: v for k, v in results.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
