"""Benchmark: does the flow-matching CG network reproduce its teacher's basin balance, per feature set?

Flow-matching trains the CG network U_net on the flow's forces kT ∇ log q; if it learned them
exactly, U_prior + U_net = −kT log q + const, so the residual

    r(x) = (U_prior(x) + U_net(x) + kT log q(x)) / kT

would be one constant everywhere. This script measures r on the flow's own teacher samples, by
φ/ψ region (β/PII and αR of ``analysis.alanine_basins``, as the demo's basin populations, and
in ψ bins at φ < 0): a
difference of the basin medians of Δr kT means the CG model puts αR Δr kT too high (negative:
too low) relative to β/PII compared with its own teacher — a basin-balance error that no
simulation length removes. It takes a finished demo directory (``openmm-flowmatch demo --out
DIR``: ``flow.pt``, ``teacher.h5``, ``priors.json``, ``reference/``, ``forcefield_network.pt``),
evaluates the demo's own network (feature set ``dihedrals_and_distances``, the flow-matching
default), and trains one network per ``--feature-sets`` entry on the same
teacher samples with the demo's settings (50 epochs of batch 256, Adam 3e-3, CGNet 160 × 5,
seed 0; ``--epochs`` changes the budget; cached in ``--work``, so a rerun only evaluates). No
simulation is run.

Writes ``benchmarks/results/basin_offset.json`` (or ``--output``).

Usage::

    python benchmarks/basin_offset.py --demo demo_output [--feature-sets all_but_bonds all]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from openmm_flowmatch.analysis import alanine_basins
from openmm_flowmatch.data.storage import read_cg_file
from openmm_flowmatch.demo import FULL
from openmm_flowmatch.flows.model import CGFlow
from openmm_flowmatch.forcefield.networks import load_network, save_network
from openmm_flowmatch.forcefield.training import train_force_field
from openmm_flowmatch.mapping import CGMapping
from openmm_flowmatch.priors import Priors
from openmm_flowmatch.units import BOLTZMANN_KJ_PER_MOL_PER_K

PSI_BINS = np.linspace(-np.pi, np.pi, 13)


def network_free_part(priors: Priors, flow: CGFlow, positions: np.ndarray, temperature: float) -> np.ndarray:
    """(U_prior + kT log q) / kT at ``positions`` (float64): the part of the residual that is the
    same for every network."""
    kt = BOLTZMANN_KJ_PER_MOL_PER_K * temperature
    x = torch.tensor(positions, dtype=torch.float64)
    with torch.no_grad():
        return ((priors.energy(x) + kt * flow.double().eval().log_prob(x)) / kt).numpy()


def residuals(network, common: np.ndarray, positions: np.ndarray, temperature: float) -> np.ndarray:
    """(U_prior + U_net + kT log q) / kT at ``positions``, from ``common`` = :func:`network_free_part`."""
    x = torch.tensor(positions, dtype=torch.float64)
    with torch.no_grad():
        return network.double().eval()(x).numpy() / (BOLTZMANN_KJ_PER_MOL_PER_K * temperature) + common


def summarize(values: np.ndarray, masks: dict[str, np.ndarray]) -> dict:
    """Basin medians of the residual, their difference (αR − β/PII), spreads and the ψ profile."""
    beta, alpha = values[masks["beta_pII"]], values[masks["alpha_R"]]
    left, psi = values[masks["phi_negative"]], masks["psi"][masks["phi_negative"]]
    index = np.digitize(psi, PSI_BINS)
    profile = []
    for k in range(1, len(PSI_BINS)):
        members = left[index == k]
        if len(members) >= 20:
            profile.append({"psi_centre": float((PSI_BINS[k - 1] + PSI_BINS[k]) / 2), "samples": int(len(members)),
                            "median_residual_kT": float(np.median(members))})
    return {
        "alpha_R_minus_beta_kT": float(np.median(alpha) - np.median(beta)),
        "median_residual_beta_kT": float(np.median(beta)), "median_residual_alpha_R_kT": float(np.median(alpha)),
        "spread_within_beta_kT": float(beta.std()), "spread_within_alpha_R_kT": float(alpha.std()),
        "samples_beta": int(len(beta)), "samples_alpha_R": int(len(alpha)),
        "psi_profile_at_phi_negative": profile,
    }


def trained_network(work: Path, feature_set: str, epochs: int, teacher: dict, priors: Priors, bonds):
    """The network of ``feature_set`` trained on the demo's teacher with the demo's settings, for
    ``epochs`` epochs (cached)."""
    suffix = "" if epochs == FULL.forcefield_epochs else f"_{epochs}_epochs"
    path = work / f"network_{feature_set}{suffix}.pt"
    if path.exists():
        return load_network(path)
    started = time.perf_counter()
    model = train_force_field(
        {"positions": teacher["positions"], "forces": teacher["forces"]}, priors, method="flow-matching",
        bonds=bonds, epochs=epochs, batch_size=FULL.forcefield_batch_size,
        learning_rate=FULL.forcefield_learning_rate, seed=FULL.seed, progress=False,
        model_kwargs={"hidden_width": FULL.forcefield_width, "n_layers": FULL.forcefield_layers, "feature_set": feature_set},
        checkpoint_path=work / f"checkpoint_{feature_set}{suffix}.pt",
    )
    model.training_info["wall_seconds"] = time.perf_counter() - started
    save_network(model, path)
    return model


def shown_command(argv: list[str], demo: Path) -> str:
    """The command line as recorded: the script's name, and the demo directory by its name only
    (no paths of the machine it ran on)."""
    shown = [Path(argv[0]).name] + [demo.name if argument == str(demo) else argument for argument in argv[1:]]
    return " ".join(shown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished demo output directory")
    parser.add_argument("--feature-sets", nargs="*", default=["all_but_bonds", "all"],
                        help="feature sets to train besides the demo's own network (the package default, dihedrals_and_distances)")
    parser.add_argument("--epochs", type=int, default=FULL.forcefield_epochs,
                        help="training epochs of the networks trained here (default the demo's; 2x to see whether "
                        "doubling the budget changes the offset)")
    parser.add_argument("--samples", type=int, default=20000, help="teacher samples evaluated")
    parser.add_argument("--work", type=Path, default=None, help="where trained networks are cached (default DEMO/basin_offset)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "basin_offset.json")
    arguments = parser.parse_args()
    demo = arguments.demo
    work = arguments.work or demo / "basin_offset"
    work.mkdir(parents=True, exist_ok=True)
    teacher = read_cg_file(demo / "teacher.h5")
    reference = read_cg_file(sorted((demo / "reference").glob("replica_*.h5"))[0])
    temperature = float(reference["metadata"]["temperature"])
    priors = Priors.from_dict(json.loads((demo / "priors.json").read_text()))
    bonds = CGMapping.from_dict(reference["metadata"]["mapping"]).bonds
    flow = CGFlow.load(demo / "flow.pt")
    positions = teacher["positions"][: arguments.samples]
    masks = alanine_basins(positions)
    common = network_free_part(priors, flow, positions, temperature)
    demo_network = load_network(demo / "forcefield_network.pt")
    results = {"demo network": summarize(residuals(demo_network, common, positions, temperature), masks)}
    results["demo network"]["features"] = {key: value for key, value in demo_network.config()["features"].items()
                                           if key.startswith(("include_", "min_"))}
    results["demo network"]["best_validation_loss"] = demo_network.training_info.get("best_validation_loss")
    for feature_set in arguments.feature_sets:
        network = trained_network(work, feature_set, arguments.epochs, teacher, priors, bonds)
        summary = summarize(residuals(network, common, positions, temperature), masks)
        summary["best_validation_loss"] = network.training_info.get("best_validation_loss")
        summary["epochs"], summary["steps"] = arguments.epochs, network.training_info.get("steps")
        results[feature_set] = summary
    teacher_masks = alanine_basins(teacher["positions"])
    output = {
        "benchmark": "basin balance of flow-matching CG networks against their own teacher (benchmarks/basin_offset.py)",
        "command": shown_command(sys.argv, demo),
        "machine": platform.platform(), "torch_version": torch.__version__,
        "residual": "(U_prior + U_net + kT log q) / kT on the flow's teacher samples; constant if U_net learned the flow exactly",
        "teacher_samples_evaluated": int(len(positions)), "temperature": temperature,
        "teacher_fractions": {"beta_pII": float(teacher_masks["beta_pII"].mean()), "alpha_R": float(teacher_masks["alpha_R"].mean())},
        "demo_sizes": FULL.describe(),
        "networks": results,
    }
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(output, indent=1) + "\n")
    for name, summary in results.items():
        print(f"{name}: αR − β/PII {summary['alpha_R_minus_beta_kT']:+.2f} kT "
              f"(spread within basins {summary['spread_within_beta_kT']:.2f}, {summary['spread_within_alpha_R_kT']:.2f} kT)")


if __name__ == "__main__":
    main()
