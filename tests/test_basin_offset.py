"""analysis.alanine_basins on chains with known φ/ψ; benchmarks/basin_offset.py's residual summary."""

from __future__ import annotations

import pytest

from benchmark_helpers import alanine_like_run, load_benchmark

from openmm_flowmatch.analysis import alanine_basins


@pytest.fixture(scope="module")
def basin_offset():
    return load_benchmark("basin_offset")


def test_alanine_basins_find_the_two_basins_of_known_chains():
    positions, _ = alanine_like_run(4000, seed=3)  # 70 % at (φ, ψ) = (−2.5, 2.6), 30 % at (−1.4, −0.6), sd 0.3 rad
    masks = alanine_basins(positions)
    assert masks["beta_pII"].mean() == pytest.approx(0.70, abs=0.03)  # ψ ~ N(2.6, 0.3): ≥ 1.5 (or wrapped < −2.8)
    assert masks["alpha_R"].mean() == pytest.approx(0.30, abs=0.03)
    assert not (masks["beta_pII"] & masks["alpha_R"]).any()


def test_summary_recovers_a_known_offset_between_basins(basin_offset):
    positions, _ = alanine_like_run(3000, seed=4)
    masks = alanine_basins(positions)
    values = 7.0 + 1.5 * masks["alpha_R"]
    summary = basin_offset.summarize(values, masks)
    assert summary["alpha_R_minus_beta_kT"] == pytest.approx(1.5, abs=1e-12)
    assert summary["spread_within_beta_kT"] == 0.0 and summary["spread_within_alpha_R_kT"] == 0.0
    assert summary["samples_beta"] + summary["samples_alpha_R"] <= len(values)
    profile = summary["psi_profile_at_phi_negative"]
    assert profile and sum(row["samples"] for row in profile) <= int(masks["phi_negative"].sum())
    assert {round(row["median_residual_kT"], 9) for row in profile} <= {7.0, 8.5}


def test_shown_command_hides_the_demo_directory_path(basin_offset, tmp_path):
    demo = tmp_path / "somewhere" / "demo_output"
    shown = basin_offset.shown_command(["/x/benchmarks/basin_offset.py", "--demo", str(demo), "--samples", "10"], demo)
    assert shown == "basin_offset.py --demo demo_output --samples 10"
