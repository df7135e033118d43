"""CG simulations: frame counts, restart reproduces the uninterrupted run, blow-ups are caught,
and the sampled bond lengths follow the Boltzmann distribution of the harmonic bonds."""

from __future__ import annotations

import math

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as u
import pytest

from openmm_flowmatch import simulation as sim
from openmm_flowmatch.units import kT

N_BEADS = 5
BOND_LENGTH = 0.15  # nm
BOND_K = 2000.0  # kJ/mol/nm²


def chain_topology(n: int = N_BEADS) -> app.Topology:
    topology = app.Topology()
    chain = topology.addChain()
    atoms = []
    for index in range(n):
        residue = topology.addResidue("CG", chain)
        atoms.append(topology.addAtom(f"B{index}", app.element.carbon, residue))
    for first, second in zip(atoms[:-1], atoms[1:]):
        topology.addBond(first, second)
    return topology


def chain_system(
    copies: int = 1, angles: bool = True, pull_ends: float = 0.0, bond_k: float = BOND_K
) -> openmm.System:
    """Harmonic chain(s) of 5 beads; ``pull_ends`` adds k·r² between the first and last bead."""
    system = openmm.System()
    bonds = openmm.HarmonicBondForce()
    angle_force = openmm.HarmonicAngleForce()
    pull = openmm.CustomBondForce("k_pull*r^2")
    pull.addGlobalParameter("k_pull", pull_ends)
    for copy in range(copies):
        offset = copy * N_BEADS
        for _ in range(N_BEADS):
            system.addParticle(12.0)
        for index in range(N_BEADS - 1):
            bonds.addBond(offset + index, offset + index + 1, BOND_LENGTH, bond_k)
        for index in range(N_BEADS - 2):
            angle_force.addAngle(offset + index, offset + index + 1, offset + index + 2, 1.9, 100.0)
        pull.addBond(offset, offset + N_BEADS - 1, [])
    system.addForce(bonds)
    if angles:
        system.addForce(angle_force)
    if pull_ends:
        system.addForce(pull)
    return system


def chain_positions() -> np.ndarray:
    # zig-zag with bond length 0.15 nm and angle ≈ 109°
    positions = np.zeros((N_BEADS, 3))
    for index in range(1, N_BEADS):
        positions[index] = positions[index - 1] + BOND_LENGTH * np.array(
            [math.sin(0.95), (-1) ** index * math.cos(0.95), 0.0]
        )
    return positions


def load(path) -> np.ndarray:
    return mdtraj.load(str(path), top=mdtraj.Topology.from_openmm(chain_topology())).xyz


def test_select_platform():
    assert sim.select_platform("reference").getName() == "Reference"
    assert sim.select_platform().getName() in ("CUDA", "CPU", "Reference", "OpenCL")
    with pytest.raises(sim.SimulationError, match="available"):
        sim.select_platform("NoSuchPlatform")


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("trajectory_format", ["dcd", "xtc"])
def test_frame_counts(tmp_path, batched, trajectory_format):
    system = chain_system(copies=3 if batched else 1)
    result = sim.run_simulation(
        system, chain_topology(), chain_positions(), tmp_path, steps=200, replicas=3,
        report_interval=20, trajectory_format=trajectory_format, platform="Reference", progress=False,
    )
    assert result.batched is batched
    assert len(result.trajectories) == 3
    frames = [load(path) for path in result.trajectories]
    assert [f.shape for f in frames] == [(10, N_BEADS, 3)] * 3
    # independent replicas: different trajectories from the same start
    assert not np.allclose(frames[0][-1], frames[1][-1])
    rows = [line for line in result.state_data[0].read_text().splitlines() if not line.startswith("#")]
    assert len(rows) == 10
    assert int(rows[-1].split(",")[0]) == 200


@pytest.mark.parametrize(
    "platform, trajectory_format, batched", [("Reference", "dcd", False), ("CPU", "dcd", True), ("Reference", "xtc", True)]
)
def test_restart_continues_the_same_trajectory(tmp_path, platform, trajectory_format, batched):
    options = dict(
        replicas=2, report_interval=10, checkpoint_interval=50, platform=platform, seed=7, progress=False,
        trajectory_format=trajectory_format,
    )
    copies = 2 if batched else 1
    topology, start = chain_topology(), chain_positions()
    straight = sim.run_simulation(chain_system(copies), topology, start, tmp_path / "straight", steps=300, **options)

    broken = tmp_path / "broken"
    sim.run_simulation(chain_system(copies), topology, start, broken, steps=100, **options)
    saved = {path.name: path.read_bytes() for path in broken.glob("checkpoint_*.chk")}
    # run on to step 150, then "crash": the checkpoints go back to step 100 while the
    # trajectories and state files already hold frames up to step 150
    sim.run_simulation(chain_system(copies), topology, start, broken, steps=150, **options)
    for name, content in saved.items():
        (broken / name).write_bytes(content)
    assert load(broken / f"replica_000.{trajectory_format}").shape[0] == 15
    resumed = sim.run_simulation(chain_system(copies), topology, start, broken, steps=300, **options)
    assert resumed.resumed_from_step == 100

    for reference_path, resumed_path in zip(straight.trajectories, resumed.trajectories):
        expected, actual = load(reference_path), load(resumed_path)
        assert actual.shape == expected.shape == (30, N_BEADS, 3)
        np.testing.assert_array_equal(actual, expected)
    rows = [line for line in resumed.state_data[0].read_text().splitlines() if not line.startswith("#")]
    assert [int(row.split(",")[0]) for row in rows] == list(range(10, 301, 10))
    # a finished run is not extended again
    again = sim.run_simulation(chain_system(copies), topology, start, broken, steps=300, **options)
    assert again.steps_run == 0


def test_restart_with_other_options_is_refused(tmp_path):
    sim.run_simulation(
        chain_system(), chain_topology(), chain_positions(), tmp_path, steps=20, report_interval=10,
        platform="Reference", progress=False,
    )
    with pytest.raises(sim.SimulationError, match="report_interval"):
        sim.run_simulation(
            chain_system(), chain_topology(), chain_positions(), tmp_path, steps=40, report_interval=20,
            platform="Reference", progress=False,
        )


def test_overlap_blow_up_keeps_trajectory(tmp_path):
    # a strong spring pulls the chain ends onto each other (no angle terms to stop it)
    system = chain_system(angles=False, pull_ends=2.0e5)
    with pytest.raises(sim.BlowUpError) as caught:
        sim.run_simulation(
            system, chain_topology(), chain_positions(), tmp_path, steps=20000, report_interval=10,
            platform="Reference", progress=False, min_distance=0.05,
        )
    error = caught.value
    assert "apart" in error.reason and "replica 0" in str(error)
    assert error.step % 10 == 0 and error.step > 0
    frames = load(tmp_path / "replica_000.dcd")
    assert frames.shape[0] == error.step // 10 - 1
    # every kept frame is above the threshold
    ends = np.linalg.norm(frames[:, 0] - frames[:, -1], axis=-1)
    assert ends.min() >= 0.05


def test_nan_blow_up_from_huge_time_step(tmp_path):
    # the largest allowed step (20 fs) on bonds with a period of ~5 fs
    with pytest.raises(sim.BlowUpError, match="NaN|nan|infinite") as caught:
        sim.run_simulation(
            chain_system(bond_k=1.0e7), chain_topology(), chain_positions(), tmp_path, steps=5000,
            report_interval=5, time_step=sim.MAX_TIME_STEP, platform="Reference", progress=False, min_distance=0.0,
        )
    assert caught.value.step <= 5000


@pytest.mark.parametrize(
    "option, value, name",
    [("time_step", 0.0, "time step"), ("time_step", -0.001, "time step"), ("time_step", 2.0, "time step"),
     ("temperature", 0.0, "temperature"), ("temperature", -5.0, "temperature"), ("friction", -1.0, "friction")],
)
def test_bad_dynamics_parameters_are_one_line_errors(tmp_path, option, value, name):
    with pytest.raises(sim.SimulationError, match=name) as caught:
        sim.run_simulation(chain_system(), chain_topology(), chain_positions(), tmp_path, 10,
                           report_interval=10, platform="Reference", progress=False, **{option: value})
    assert str(value) in str(caught.value) and "\n" not in str(caught.value)


def test_bad_inputs(tmp_path):
    with pytest.raises(sim.SimulationError, match="particles"):
        sim.run_simulation(chain_system(copies=2), chain_topology(), chain_positions(), tmp_path, 10,
                           replicas=3, report_interval=10, platform="Reference", progress=False)
    with pytest.raises(sim.SimulationError, match="shape"):
        sim.run_simulation(chain_system(), chain_topology(), np.zeros((4, 3)), tmp_path, 10,
                           report_interval=10, platform="Reference", progress=False)
    massless = chain_system()
    massless.setParticleMass(2, 0.0)
    with pytest.raises(sim.SimulationError, match="zero mass"):
        sim.run_simulation(massless, chain_topology(), chain_positions(), tmp_path, 10,
                           report_interval=10, platform="Reference", progress=False)


def test_bond_lengths_follow_boltzmann(tmp_path):
    """Batched replicas sample var(r) = kT/k for stiff harmonic bonds (r0 ≫ σ)."""
    stiff = 20000.0  # kJ/mol/nm²: σ = 0.011 nm
    result = sim.run_simulation(
        chain_system(copies=4, bond_k=stiff), chain_topology(), chain_positions(), tmp_path, steps=20000,
        replicas=4, report_interval=20, time_step=0.002, friction=5.0, platform="Reference", progress=False,
        temperature=300.0 * u.kelvin, min_distance=0.0,  # no repulsion here: the chain ends may meet
    )
    frames = np.concatenate([load(path)[100:] for path in result.trajectories])
    bonds = np.linalg.norm(frames[:, 1:] - frames[:, :-1], axis=-1)
    variance = bonds.var()
    expected = kT(300.0) / stiff
    assert variance == pytest.approx(expected, rel=0.15)
    assert bonds.mean() == pytest.approx(BOND_LENGTH + 2 * expected / BOND_LENGTH, rel=0.002)
