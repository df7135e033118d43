"""Sound dynamics of trained models: the feature sets, and a flow-matching model at 2 fs.

The cause found for hot flow-matching models (docs/benchmarks.md, "Time step"): the flow's
rational-quadratic splines are only C¹, so its forces F = kT∇log q jump at the spline knots along
every bond and angle; a network that sees bond lengths and angles learns those jumps as narrow
curvature spikes, stiffer than the bonds themselves. The default feature set leaves bonds and
angles to the harmonic priors.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from openmm_flowmatch.forcefield import (
    DEFAULT_FEATURE_SET,
    FEATURE_SETS,
    FeatureError,
    InvariantFeatures,
    feature_set_options,
    train_force_field,
)

TEMPERATURE = 300.0
RESOURCES = Path(__file__).resolve().parents[1] / "openmm_flowmatch" / "resources"


def test_default_feature_set_leaves_bonds_and_angles_to_the_priors():
    from openmm_flowmatch.forcefield import DEFAULT_FEATURE_SETS

    assert DEFAULT_FEATURE_SET == DEFAULT_FEATURE_SETS["flow-matching"] == "dihedrals_and_distances"
    assert DEFAULT_FEATURE_SETS["force-matching"] == "all"
    features = InvariantFeatures(5, **feature_set_options(DEFAULT_FEATURE_SET, 5))
    # alanine dipeptide's 5 beads: 2 dihedrals as (cos, sin) + the pairs 3 and 4 bonds apart (0-3, 1-4, 0-4)
    assert (features.n_bonds, features.n_angles, features.n_dihedrals, features.n_pairs) == (0, 0, 2, 3)
    every = InvariantFeatures(5, **feature_set_options("all", 5))
    assert (every.n_bonds, every.n_angles, every.n_dihedrals, every.n_pairs) == (4, 3, 2, 6)


def test_default_features_see_a_bond_stretch_only_through_far_distances():
    """Lengthening bond 0–1 of a 4-bead chain along itself leaves the dihedral's (cos, sin)
    unchanged; of the default features only the 0–3 distance moves (its spread is far wider than
    the bond's, so the network's curvature along the bond stays small)."""
    generator = torch.Generator().manual_seed(0)
    positions = torch.randn(64, 4, 3, generator=generator, dtype=torch.float64)
    features = InvariantFeatures.from_positions(positions, **feature_set_options(DEFAULT_FEATURE_SET, 4))
    assert features.n_features == 3  # cos φ, sin φ, d(0, 3)
    frame = positions[0].clone()
    direction = (frame[1] - frame[0]) / (frame[1] - frame[0]).norm()
    stretched = frame.clone()
    stretched[0] -= 0.01 * direction  # lengthen bond 0–1 along itself: the dihedral is unchanged
    before, after = features(frame), features(stretched)
    torch.testing.assert_close(before[:2], after[:2], rtol=0, atol=1e-12)
    assert not torch.allclose(before[2], after[2])


def test_feature_set_errors_and_short_chains():
    with pytest.raises(FeatureError, match="unknown feature set 'bonds_only'"):
        feature_set_options("bonds_only", 5)
    # three beads have no dihedral and no pair three bonds apart: fall back to all features
    assert feature_set_options(DEFAULT_FEATURE_SET, 3) == FEATURE_SETS["all"]


def _synthetic_alanine_like_data(n_frames: int, seed: int = 0) -> np.ndarray:
    """Exact samples of a 5-bead chain: Gaussian bonds and angles, two φ/ψ basins (nm)."""
    from openmm_flowmatch.flows.internal import internal_to_cartesian

    rng = np.random.default_rng(seed)
    bonds = rng.normal([0.133, 0.146, 0.152, 0.133], 0.0025, size=(n_frames, 4))
    angles = rng.normal([2.12, 1.94, 2.03], 0.06, size=(n_frames, 3))
    basin = rng.random(n_frames) < 0.6
    phi = np.where(basin, rng.normal(-1.4, 0.35, n_frames), rng.normal(-1.3, 0.3, n_frames))
    psi = np.where(basin, rng.normal(2.6, 0.35, n_frames), rng.normal(-0.6, 0.3, n_frames))
    dihedrals = np.stack([phi, psi], axis=1)
    positions = internal_to_cartesian(*(torch.as_tensor(v) for v in (bonds, angles, dihedrals)))
    return positions.numpy()


@pytest.mark.slow
def test_small_flow_matching_model_integrates_at_2_fs_within_2_percent(tmp_path):
    """Flow → teacher → default-feature network → OpenMM at 2 fs: kinetic T within 2 % of the bath
    (and within 3 standard errors), CG bond widths within 10 % of the data's."""
    from openmm_flowmatch import CGMapping
    from openmm_flowmatch.diagnostics import check_time_step
    from openmm_flowmatch.export import FlowMatchForceField, export_force_field
    from openmm_flowmatch.flows import train_flow
    from openmm_flowmatch.flows.teacher import draw_teacher_samples
    from openmm_flowmatch.priors import Priors

    mapping = CGMapping.backbone(str(RESOURCES / "alanine_dipeptide.pdb"))
    positions = _synthetic_alanine_like_data(8000)
    priors = Priors.fit(positions, mapping.bonds, TEMPERATURE)
    flow = train_flow(positions, n_blocks=2, hidden_features=64, epochs=6, batch_size=256, seed=0, progress=False)
    teacher_positions, teacher_forces, _ = draw_teacher_samples(
        flow, 8000, TEMPERATURE, force_threshold=1e12, seed=0, progress=False
    )
    model = train_force_field(
        (teacher_positions, teacher_forces), priors, method="flow-matching", bonds=mapping.bonds,
        model_kwargs=dict(hidden_width=64, n_layers=3, lipschitz_bound=4.0), max_steps=800, batch_size=256,
        learning_rate=1e-3, seed=0, progress=False,
    )
    path = export_force_field(model, tmp_path / "model.pt", priors=priors, mapping=mapping, temperature=TEMPERATURE)
    report = check_time_step(
        FlowMatchForceField.load(path), positions[:: len(positions) // 32][:32], time_steps=[0.002], replicas=32,
        production_time=20.0, platform="CPU", platform_properties={"Threads": "1"}, configurational=False,
        progress=False,
    )
    (result,) = report.results
    assert not result.blew_up
    assert abs(result.kinetic_temperature / TEMPERATURE - 1) <= 0.02
    assert abs(result.kinetic_temperature - TEMPERATURE) <= 3 * result.kinetic_temperature_error + 0.005 * TEMPERATURE
    assert 0.9 <= result.bonded["bond_width_ratio_min"] and result.bonded["bond_width_ratio_max"] <= 1.1
    assert report.largest_sound_time_step == pytest.approx(0.002)
    assert math.isfinite(result.steps_per_second)


def test_trainer_default_features_follow_the_method():
    """Flow-matching networks leave bonds and angles to the priors; force-matching ones see them."""
    from openmm_flowmatch.priors import Priors

    positions = _synthetic_alanine_like_data(200)
    priors = Priors.fit(positions, [(i, i + 1) for i in range(4)], TEMPERATURE)
    forces = priors.forces(torch.as_tensor(positions)).numpy()
    for method, expected_bonds in (("flow-matching", 0), ("force-matching", 4)):
        model = train_force_field((positions, forces), priors, method=method, epochs=0, progress=False,
                                  model_kwargs=dict(hidden_width=8, n_layers=1))
        assert model.features.n_bonds == expected_bonds
