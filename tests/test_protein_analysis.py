"""Protein metrics (protein_analysis.py) against mdtraj and hand-computed values; `analyze --native`."""

from __future__ import annotations

import json
from pathlib import Path

import mdtraj
import numpy as np
import pytest

from openmm_flowmatch import cli, protein_analysis
from openmm_flowmatch.analysis import AnalysisError, rmsd_to_native
from openmm_flowmatch.mapping import CGMapping

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHIGNOLIN_SEQUENCE = ["TYR", "TYR", "ASP", "PRO", "GLU", "THR", "GLY", "THR", "TRP", "TYR"]


@pytest.fixture(scope="module")
def chignolin_frames() -> np.ndarray:
    """425 Cα frames (nm) of the chignolin reference, 80 ps apart (tests/fixtures/README.md)."""
    with np.load(FIXTURES / "chignolin_ca_every_80ps.npz") as archive:
        return archive["x"].astype(np.float64)


@pytest.fixture(scope="module")
def chignolin_native(chignolin_pdb_path) -> np.ndarray:
    structure = mdtraj.load(str(chignolin_pdb_path))
    return CGMapping.alpha_carbons(structure.topology).map_positions(structure.xyz)[0]


@pytest.fixture(scope="module")
def chignolin_pdb_path() -> Path:
    return Path(protein_analysis.__file__).resolve().parent / "resources" / "chignolin_cln025.pdb"


def alpha_carbon_trajectory(positions: np.ndarray, residue_names) -> mdtraj.Trajectory:
    """A CG mdtraj Trajectory: one CA atom per residue."""
    topology = mdtraj.Topology()
    chain = topology.add_chain()
    for name in residue_names:
        topology.add_atom("CA", mdtraj.element.carbon, topology.add_residue(name, chain))
    return mdtraj.Trajectory(np.asarray(positions, dtype=np.float32), topology)


# ------------------------------------------------------------------------------ RMSD and Rg


def test_radius_of_gyration_and_rmsd_equal_mdtraj(chignolin_frames, chignolin_native):
    frames = chignolin_frames[::5]
    trajectory = alpha_carbon_trajectory(frames, CHIGNOLIN_SEQUENCE)
    np.testing.assert_allclose(protein_analysis.radius_of_gyration(frames), mdtraj.compute_rg(trajectory), rtol=1e-5)
    native = alpha_carbon_trajectory(chignolin_native[None], CHIGNOLIN_SEQUENCE)
    np.testing.assert_allclose(rmsd_to_native(frames, chignolin_native), mdtraj.rmsd(trajectory, native), atol=2e-5)
    # the fixture holds folded and unfolded frames, so the comparison spans the RMSD range
    assert rmsd_to_native(frames, chignolin_native).min() < 0.1 < 0.4 < rmsd_to_native(frames, chignolin_native).max()


def test_radius_of_gyration_with_masses_by_hand():
    # two beads 1 nm apart, masses 3 and 1: centre 0.25 nm from the heavy one
    positions = np.array([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    expected = np.sqrt((3 * 0.25**2 + 1 * 0.75**2) / 4)
    assert protein_analysis.radius_of_gyration(positions, masses=[3.0, 1.0])[0] == pytest.approx(expected)
    assert protein_analysis.radius_of_gyration(positions)[0] == pytest.approx(0.5)


# ------------------------------------------------------------------------------ folding and transitions


def synthetic_rmsd() -> np.ndarray:
    """Hand-built RMSD series (nm): 2 folding and 2 unfolding events, plus excursions that must not count.

    unfolded (0.4) → dip to 0.2 and back (no event) → folded (0.05): folding 1 → rise to 0.25 and
    back (no event) → unfolded 0.5: unfolding 1 → folded 0.08 through the gap: folding 2 →
    unfolded 0.35: unfolding 2 → ends in the transition region 0.2 (no event).
    """
    pieces = [
        [0.4] * 10, [0.2] * 5, [0.45] * 5, [0.15] * 3, [0.05] * 10, [0.25] * 4, [0.07] * 6, [0.5] * 8,
        [0.2, 0.12], [0.08] * 7, [0.2] * 2, [0.35] * 6, [0.2] * 4,
    ]
    return np.concatenate([np.asarray(piece, dtype=float) for piece in pieces])


def test_count_transitions_core_to_core():
    series = synthetic_rmsd()
    result = protein_analysis.count_transitions(series, frame_interval_ps=2.0)
    assert (result["folding_events"], result["unfolding_events"], result["transitions"]) == (2, 2, 4)
    assert result["simulated_time_us"] == pytest.approx(series.size * 2.0e-6)
    assert result["transitions_per_us"] == pytest.approx(4 / (series.size * 2.0e-6))
    # a dip that reaches 0.12 nm (between the folded core 0.1 and the unfolded core 0.3) is no event
    dip = np.array([0.4] * 5 + [0.12] * 5 + [0.4] * 5)
    assert protein_analysis.count_transitions(dip, 1.0)["transitions"] == 0
    # with a looser folded core the same dip counts as folding and unfolding
    assert protein_analysis.count_transitions(dip, 1.0, folded_below=0.13)["transitions"] == 2


def test_count_transitions_over_replicas_sums_times_not_joins():
    unfolded_end = np.array([0.05] * 4 + [0.4] * 4)  # unfolding 1
    folded_start = np.array([0.05] * 4)  # no event; joined to the end above it would be a folding event
    result = protein_analysis.count_transitions([unfolded_end, folded_start], frame_interval_ps=10.0)
    assert (result["folding_events"], result["unfolding_events"]) == (0, 1)
    assert result["folding_events_per_replica"] == [0, 0] and result["unfolding_events_per_replica"] == [1, 0]
    assert result["simulated_time_us"] == pytest.approx(12 * 10.0e-6)
    assert protein_analysis.count_transitions(np.concatenate([unfolded_end, folded_start]), 10.0)["folding_events"] == 1
    without_time = protein_analysis.count_transitions(unfolded_end, None)
    assert without_time["transitions"] == 1 and without_time["transitions_per_us"] is None


def test_fraction_folded_threshold():
    series = synthetic_rmsd()
    assert protein_analysis.fraction_folded(series) == pytest.approx(np.mean(series < 0.15))
    assert protein_analysis.fraction_folded(series) == pytest.approx((10 + 6 + 1 + 7) / series.size)
    # 0.15 itself is not folded (strictly below), lists of replicas are pooled
    assert protein_analysis.fraction_folded([np.array([0.15, 0.1]), np.array([0.3])]) == pytest.approx(1 / 3)


def test_bad_transition_settings_are_refused():
    with pytest.raises(AnalysisError, match="below the unfolded core"):
        protein_analysis.count_transitions(synthetic_rmsd(), 2.0, folded_below=0.3, unfolded_above=0.1)
    with pytest.raises(AnalysisError, match="frame_interval_ps"):
        protein_analysis.count_transitions(synthetic_rmsd(), 0.0)


# ------------------------------------------------------------------------------ contacts and histograms


def test_contact_map_three_beads_by_hand():
    # frame 1: beads on a line 0.5 nm apart (0-2 at 1.0 nm); frame 2: bead 2 folded back to 0.6 nm of bead 0
    frames = np.array([
        [[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [1.0, 0.0, 0.0]],
        [[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.6, 0.0, 0.0]],
    ])
    expected = np.array([[1.0, 1.0, 0.5], [1.0, 1.0, 1.0], [0.5, 1.0, 1.0]])
    np.testing.assert_allclose(protein_analysis.contact_map(frames, cutoff=0.8), expected)
    np.testing.assert_allclose(protein_analysis.contact_map(frames, cutoff=0.55)[0, 1], 1.0)
    np.testing.assert_allclose(protein_analysis.contact_map(frames, cutoff=0.55)[0, 2], 0.0)
    difference = protein_analysis.contact_map_difference(protein_analysis.contact_map(frames[1:]), expected)
    np.testing.assert_allclose(difference, [[0, 0, 0.5], [0, 0, 0], [0.5, 0, 0]])


def test_histogram_comparison_conventions():
    values = np.linspace(0.0, 1.0, 101)
    same = protein_analysis.histogram_comparison(values, values, bins=10, value_range=(0.0, 1.0), temperature=300.0)
    assert same["js_divergence"] == 0.0 and same["kl_divergence"] == 0.0 and same["fes_mse"] == 0.0
    # disjoint halves: JS is ln 2, its largest value (natural log)
    apart = protein_analysis.histogram_comparison(values[:40], values[60:], bins=10, value_range=(0.0, 1.0))
    assert apart["js_divergence"] == pytest.approx(np.log(2.0))
    # model values beyond the range land in the border bin instead of vanishing
    clipped = protein_analysis.histogram_comparison([0.05, 0.95], [5.0], bins=2, value_range=(0.0, 1.0))
    np.testing.assert_allclose(clipped["model"], [0.0, 1.0])


# ------------------------------------------------------------------------------ comparisons


def test_compare_proteins_with_itself_is_zero_and_tells_halves_apart(chignolin_frames, chignolin_pdb_path):
    runs = [chignolin_frames[:213], chignolin_frames[213:]]
    itself = protein_analysis.compare_proteins(runs, runs, chignolin_pdb_path, 340.0, lag=10, frame_interval_ps=80.0)
    assert itself["tica"]["js_divergence"] == 0.0 and itself["tica"]["fes_mse"] == 0.0
    assert itself["rmsd"]["js_divergence"] == 0.0 and itself["radius_of_gyration"]["js_divergence"] == 0.0
    assert itself["contact_map_difference"]["max_abs"] == 0.0
    assert itself["fraction_folded"]["model"] == itself["fraction_folded"]["reference"] == pytest.approx(0.176, abs=0.001)
    assert itself["transitions"]["model"] == itself["transitions"]["reference"]
    assert itself["transitions"]["reference"]["simulated_time_us"] == pytest.approx(425 * 80e-6)
    renamed = protein_analysis.compare_proteins(runs, runs, chignolin_pdb_path, 340.0, lag=10, reference_frame_interval_ps=80.0)
    assert renamed["transitions"] == itself["transitions"]
    # only the unfolded frames (weight w of the reference) as a "model": where the model is the reference
    # restricted to a region, JS = ½[w ln(2w/(1+w)) + (1−w) ln 2 + ln(2/(1+w))] on the RMSD histogram
    rmsd = rmsd_to_native(chignolin_frames, protein_analysis.load_native(chignolin_pdb_path).positions)
    unfolded = chignolin_frames[rmsd > 0.3]
    weight = np.mean(rmsd > 0.3)
    expected = 0.5 * (weight * np.log(2 * weight / (1 + weight)) + (1 - weight) * np.log(2) + np.log(2 / (1 + weight)))
    other = protein_analysis.compare_proteins(runs, unfolded, chignolin_pdb_path, 340.0, lag=10, frame_interval_ps=80.0)
    assert other["fraction_folded"]["model"] == 0.0
    assert other["rmsd"]["js_divergence"] == pytest.approx(expected, abs=0.01)
    assert other["tica"]["js_divergence"] > 0.1
    assert other["contact_map_difference"]["max_abs"] > 0.2


def test_plot_protein_comparison_writes_png(chignolin_frames, chignolin_pdb_path, tmp_path):
    runs = [chignolin_frames[:213], chignolin_frames[213:]]
    path = protein_analysis.plot_protein_comparison(
        runs, {"first run": runs[:1], "second run": runs[1:]}, chignolin_pdb_path, tmp_path / "protein.png", 340.0,
        lag=10, frame_interval_ps=80.0,
    )
    assert path.read_bytes()[:4] == b"\x89PNG"
    single = protein_analysis.plot_protein_comparison(
        runs, runs[1], chignolin_pdb_path, tmp_path / "single.png", 340.0, lag=10, label="second run",
    )
    assert single.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(AnalysisError, match=r"model 'short' \(5 beads\)"):
        protein_analysis.plot_protein_comparison(
            runs, {"short": runs[1][:, :5]}, chignolin_pdb_path, tmp_path / "bad.png", 340.0, lag=10,
        )


def test_another_protein_is_refused_naming_both(chignolin_frames, chignolin_pdb_path):
    with pytest.raises(AnalysisError, match=r"the model \(5 beads\).*chignolin_cln025.pdb.*10 beads: TYR TYR ASP"):
        protein_analysis.compare_proteins(chignolin_frames, chignolin_frames[:, :5], chignolin_pdb_path, 340.0, lag=10)
    other = alpha_carbon_trajectory(chignolin_frames, ["ALA"] * 10)
    with pytest.raises(AnalysisError, match=r"ALA ALA.*TYR TYR.*first at bead 0: ALA vs TYR"):
        protein_analysis.check_same_protein(other, chignolin_pdb_path, "the model")
    protein_analysis.check_same_protein(alpha_carbon_trajectory(chignolin_frames, CHIGNOLIN_SEQUENCE), chignolin_pdb_path)


# ------------------------------------------------------------------------------ command line


def test_analyze_native_protein_mode(chignolin_frames, chignolin_pdb_path, tmp_path, capsys):
    reference, model = tmp_path / "reference.npz", tmp_path / "model.npz"
    np.savez(reference, x=chignolin_frames[:213])
    np.savez(model, x=chignolin_frames[213:])
    arguments = [
        "--quiet", "analyze", "--reference", str(reference), "--model", str(model), "--out", str(tmp_path / "out"),
        "--native", str(chignolin_pdb_path), "--lag", "10", "--skip", "0", "--temperature", "340",
        "--frame-interval", "80",
    ]
    assert cli.main(arguments) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics) >= {"tica", "protein", "rmsd_nm", "bonded", "distance_histograms_mean_js"}
    assert metrics["protein"]["tica"] == metrics["tica"] | {"lag_frames": 10}
    assert 0.0 < metrics["protein"]["fraction_folded"]["reference"] < 0.5
    assert metrics["protein"]["transitions"]["model"]["simulated_time_us"] == pytest.approx(212 * 80e-6)
    assert (tmp_path / "out" / "protein.png").read_bytes()[:4] == b"\x89PNG"
    # a five-bead model against the chignolin structure: one line naming both
    np.savez(model, x=chignolin_frames[:, :5])
    assert cli.main(arguments) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "5 beads" in error[0] and "chignolin_cln025.pdb" in error[0]


# ------------------------------------------------------------------------------ bad structures and maps


def write_without_residue(source: Path, target: Path, residue_number: int, shift_after: np.ndarray | None = None) -> Path:
    """Copy a PDB without one residue, or (``shift_after``, Å) with the residues after it moved rigidly."""
    lines = []
    for line in source.read_text().splitlines():
        if line.startswith(("ATOM", "HETATM")):
            number = int(line[22:26])
            if shift_after is None and number == residue_number:
                continue
            if shift_after is not None and number > residue_number:
                xyz = np.array([float(line[30:38]), float(line[38:46]), float(line[46:54])]) + shift_after
                line = f"{line[:30]}{xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}{line[54:]}"
        elif line.startswith("CONECT"):
            continue
        lines.append(line)
    target.write_text("\n".join(lines) + "\n")
    return target


def test_chain_break_is_refused_naming_the_residues(chignolin_pdb_path, tmp_path):
    from openmm_flowmatch.mapping import MappingError

    assert CGMapping.alpha_carbons(str(chignolin_pdb_path)).n_beads == 10  # the intact chain passes
    gap = write_without_residue(chignolin_pdb_path, tmp_path / "no_glu5.pdb", 5)
    with pytest.raises(MappingError, match=r"no_glu5.pdb: chain break between residue PRO4 .* and residue THR6 .*C–N 0.40 nm"):
        CGMapping.alpha_carbons(str(gap))
    structure = mdtraj.load(str(gap))
    with pytest.raises(MappingError, match="PRO4.*THR6"):
        CGMapping.alpha_carbons(structure)  # a Trajectory brings its coordinates
    with pytest.raises(MappingError, match="PRO4.*THR6"):
        CGMapping.alpha_carbons(structure.topology, positions=structure.xyz[0])
    # a stretched peptide bond (residues 6-10 moved 0.09 nm along C(5)→N(6)): no missing residue, still no chain
    intact = mdtraj.load(str(chignolin_pdb_path))
    carbon = intact.topology.select("resSeq 5 and name C")[0]
    nitrogen = intact.topology.select("resSeq 6 and name N")[0]
    direction = intact.xyz[0, nitrogen] - intact.xyz[0, carbon]
    shift = 0.9 * direction / np.linalg.norm(direction)  # Å
    stretched = write_without_residue(chignolin_pdb_path, tmp_path / "stretched.pdb", 5, shift_after=shift)
    with pytest.raises(MappingError, match=r"GLU5 .* and residue THR6 .*C–N 0\.2\d nm > 0.2 nm"):
        CGMapping.alpha_carbons(str(stretched))


def test_cg_topology_with_a_chain_break_is_refused(chignolin_native, tmp_path):
    from openmm_flowmatch.topology import TopologyError, read_cg_topology, write_cg_pdb

    mapping = CGMapping.alpha_carbons(str(Path(protein_analysis.__file__).parent / "resources" / "chignolin_cln025.pdb"))
    intact = write_cg_pdb(mapping.cg_topology(), chignolin_native, tmp_path / "cln025_ca.pdb")
    assert read_cg_topology(intact).getNumAtoms() == 10
    broken = write_without_residue(intact, tmp_path / "cln025_ca_gap.pdb", 5)
    with pytest.raises(TopologyError, match=r"chain break between residue PRO4 and THR6 .*Cα–Cα"):
        read_cg_topology(broken)


def test_cg_map_of_another_bead_count_is_refused_at_create_system(chignolin_pdb_path, tmp_path):
    import torch

    from openmm_flowmatch.artifact_formats import ArtifactError
    from openmm_flowmatch.export import FlowMatchForceField, export_force_field
    from openmm_flowmatch.forcefield import CGNet, InvariantFeatures
    from openmm_flowmatch.priors import Priors
    from openmm_flowmatch.topology import replicate_topology

    alanine = CGMapping.backbone(str(chignolin_pdb_path.parent / "alanine_dipeptide.pdb"))
    positions = alanine.map_positions(mdtraj.load(str(chignolin_pdb_path.parent / "alanine_dipeptide.pdb")).xyz)
    frames = positions + 0.01 * np.random.default_rng(0).normal(size=(20, 5, 3))
    torch.manual_seed(0)
    model = CGNet(InvariantFeatures.from_positions(frames, alanine.bonds), hidden_width=8, n_layers=1)
    path = export_force_field(
        model, tmp_path / "ala2.pt", priors=Priors.fit(frames, alanine.bonds, 300.0), mapping=alanine,
        temperature=300.0, exported_program=False,
    )
    force_field = FlowMatchForceField.load(path)
    chignolin = CGMapping.alpha_carbons(str(chignolin_pdb_path)).cg_topology()  # 10 beads = 2 × 5, one chain
    with pytest.raises(ArtifactError, match=r"one molecule of 10 beads .*TYR TYR ASP.* not 2 copies .*5 beads.*ACE"):
        force_field.create_system(chignolin)
    with pytest.raises(ArtifactError, match=r"one molecule of 10 beads"):
        force_field.create_system(chignolin, replicas=2)
    assert force_field.create_system(replicate_topology(alanine.cg_topology(), 2), backend=None).getNumParticles() == 10


def test_mapping_of_another_protein_is_refused_by_from_trajectory(chignolin_pdb_path, tmp_path):
    from openmm_flowmatch.data.dataset import CGDataset, DatasetError

    structure = mdtraj.load(str(chignolin_pdb_path))
    structure.save_dcd(str(tmp_path / "native.dcd"))
    mapping = CGMapping.alpha_carbons(structure.topology).to_dict()
    assert CGDataset.from_trajectory(tmp_path / "native.dcd", chignolin_pdb_path, mapping, temperature=340.0).n_beads == 10
    mapping["residue_names"] = ["ALA"] * 10  # a map written for another decapeptide with the same atom count
    with pytest.raises(DatasetError, match=r"another molecule .*ALA ALA.*TYR TYR.*first at bead 0: ALA vs TYR"):
        CGDataset.from_trajectory(tmp_path / "native.dcd", chignolin_pdb_path, mapping, temperature=340.0)
