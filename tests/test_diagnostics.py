"""Sound dynamics: kinetic and configurational temperature, bond widths, the time-step check.

Physics checks against exact results: a harmonic chain (kinetic temperature and bond width at a
small step), Boltzmann samples of a quadratic potential drawn with NumPy (configurational
temperature), and a deliberately stiff model (a bond potential with curvature spikes, as
flow-matching networks make them) that overheats at 4 fs but not at 1 fs.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import pytest
import torch

import openmm_flowmatch
from openmm_flowmatch import analysis, cli
from openmm_flowmatch import diagnostics as diag
from openmm_flowmatch import simulation as sim
from openmm_flowmatch.export import FlowMatchForceField, export_force_field
from openmm_flowmatch.mapping import CGMapping
from openmm_flowmatch.priors import HarmonicAngles, HarmonicBonds, Priors, bonded_triples
from openmm_flowmatch.units import BOLTZMANN_KJ_PER_MOL_PER_K, kT

openmmtorch = pytest.importorskip("openmmtorch")

TEMPERATURE = 300.0
MASS = 12.0  # amu per bead of the chains
REDUCED_MASS = MASS / 2


def force_constant(period_ps: float) -> float:
    """k (kJ/mol/nm², ½k convention) of a bond between two beads of MASS oscillating with this period."""
    return REDUCED_MASS * (2 * math.pi / period_ps) ** 2


def chain_topology(n: int) -> app.Topology:
    topology = app.Topology()
    chain = topology.addChain()
    atoms = [topology.addAtom(f"B{i}", app.element.carbon, topology.addResidue("CG", chain)) for i in range(n)]
    for first, second in zip(atoms[:-1], atoms[1:]):
        topology.addBond(first, second)
    return topology


def zigzag(n: int, length: float = 0.15) -> np.ndarray:
    positions = np.zeros((n, 3))
    for index in range(1, n):
        positions[index] = positions[index - 1] + length * np.array([math.sin(0.95), (-1) ** index * math.cos(0.95), 0])
    return positions


def bumpy_bond_expression() -> tuple[str, dict]:
    """Harmonic bond (period 40 fs) plus a cosine whose curvature is ±5 k, on the scale of the bond width."""
    k = force_constant(0.040)
    sigma = math.sqrt(kT(TEMPERATURE) / k)
    wavelength = 2 * sigma
    epsilon = 5 * k / (2 * math.pi / wavelength) ** 2
    return "0.5*k*(r-0.15)^2 + eps*cos(2*3.141592653589793*(r-0.15)/lam)", dict(k=k, eps=epsilon, lam=wavelength)


def chain_system(copies: int, n: int = 4, bond: str = "harmonic", angle_k: float = 0.0, cm_remover: bool = False):
    system = openmm.System()
    if bond == "harmonic":
        force = openmm.HarmonicBondForce()
    else:
        expression, parameters = bumpy_bond_expression()
        force = openmm.CustomBondForce(expression)
        for name, value in parameters.items():
            force.addGlobalParameter(name, value)
    angles = openmm.HarmonicAngleForce()
    for copy in range(copies):
        offset = copy * n
        for _ in range(n):
            system.addParticle(MASS)
        for i in range(n - 1):
            if bond == "harmonic":
                force.addBond(offset + i, offset + i + 1, 0.15, force_constant(0.100))
            else:
                force.addBond(offset + i, offset + i + 1, [])
        for i in range(n - 2):
            angles.addAngle(offset + i, offset + i + 1, offset + i + 2, 1.9, angle_k)
    system.addForce(force)
    if angle_k:
        system.addForce(angles)
    if cm_remover:
        system.addForce(openmm.CMMotionRemover())
    return system


# --------------------------------------------------------------------------------------------
# degrees of freedom and kinetic temperature of a harmonic chain
# --------------------------------------------------------------------------------------------


def test_degrees_of_freedom_counts():
    assert sim.degrees_of_freedom(chain_system(1)).tolist() == [12.0]
    assert sim.degrees_of_freedom(chain_system(1, cm_remover=True)).tolist() == [9.0]
    assert sim.degrees_of_freedom(chain_system(4), copies=4).tolist() == [12.0] * 4
    # the CMMotionRemover removes the centre of mass of the whole System: 3/R per replica
    assert sim.degrees_of_freedom(chain_system(4, cm_remover=True), copies=4).tolist() == [11.25] * 4
    constrained = chain_system(4, cm_remover=True)
    constrained.addConstraint(4, 5, 0.15)  # in replica 1
    assert sim.degrees_of_freedom(constrained, copies=4).tolist() == [11.25, 10.25, 11.25, 11.25]
    constrained.addConstraint(3, 4, 0.15)  # across replicas 0 and 1: not independent copies
    with pytest.raises(sim.SimulationError, match="different copies"):
        sim.degrees_of_freedom(constrained, copies=4)


def test_kinetic_temperature_formula():
    velocities = np.ones((2, 4, 3))  # 1 nm/ps in each direction
    velocities[1] *= 2.0
    masses = np.full(8, MASS)
    temperatures = sim.kinetic_temperatures(velocities, masses, np.array([12.0, 12.0]))
    expected = 2 * (0.5 * MASS * 3 * 4) / (BOLTZMANN_KJ_PER_MOL_PER_K * 12)
    np.testing.assert_allclose(temperatures, [expected, 4 * expected])


def test_harmonic_chain_kinetic_temperature_and_bond_width(tmp_path):
    """32 replicas of a 4-bead harmonic chain (bond period 100 fs) at 1 fs, friction 5/ps, 20 ps each:
    the mean kinetic temperature is the bath's and the bond width sqrt(kT/k) (18 ps sampled every 20 fs)."""
    replicas = 32
    result = sim.run_simulation(
        chain_system(replicas), chain_topology(4), zigzag(4), tmp_path, steps=20000, replicas=replicas,
        report_interval=20, time_step=0.001, friction=5.0, temperature=TEMPERATURE, platform="Reference",
        progress=False, min_distance=0.0,
    )
    summary = result.kinetic_temperature
    assert summary.degrees_of_freedom == [12.0] * replicas
    assert summary.reports == 900  # 1000 reports less the first 10 %
    assert abs(summary.mean - TEMPERATURE) <= 3 * summary.standard_error
    assert abs(summary.relative_deviation) <= 0.02 and summary.sound
    assert summary.replica_min < summary.mean < summary.replica_max
    stored = json.loads((tmp_path / "simulation.json").read_text())["kinetic_temperature"]
    assert stored["mean"] == pytest.approx(summary.mean)
    assert sim.result_summary(result)["kinetic_temperature"]["bath"] == TEMPERATURE
    table = np.loadtxt(tmp_path / "kinetic_000.csv", delimiter=",", comments="#")
    assert table.shape == (1000, 1 + replicas)

    topology = mdtraj.Topology.from_openmm(chain_topology(4))
    frames = np.concatenate([mdtraj.load(str(path), top=topology).xyz[100:] for path in result.trajectories])
    widths = analysis.bond_lengths(frames.astype(np.float64), [(0, 1), (1, 2), (2, 3)]).std(axis=0)
    np.testing.assert_allclose(widths, math.sqrt(kT(TEMPERATURE) / force_constant(0.100)), rtol=0.05)


def test_kinetic_series_is_cut_back_on_restart(tmp_path):
    options = dict(replicas=2, report_interval=10, checkpoint_interval=50, platform="Reference", seed=3,
                   progress=False, min_distance=0.0)
    topology, start = chain_topology(4), zigzag(4)
    straight = sim.run_simulation(chain_system(2), topology, start, tmp_path / "a", steps=200, **options)
    broken = tmp_path / "b"
    sim.run_simulation(chain_system(2), topology, start, broken, steps=100, **options)
    saved = (broken / "checkpoint_000.chk").read_bytes()
    sim.run_simulation(chain_system(2), topology, start, broken, steps=150, **options)
    (broken / "checkpoint_000.chk").write_bytes(saved)  # "crash" back to step 100
    resumed = sim.run_simulation(chain_system(2), topology, start, broken, steps=200, **options)
    assert (broken / "kinetic_000.csv").read_text() == (tmp_path / "a" / "kinetic_000.csv").read_text()
    assert resumed.kinetic_temperature.mean == straight.kinetic_temperature.mean


def test_warning_for_a_stiff_model(tmp_path, caplog):
    """Curvature spikes of ±5 k along the bond: sound at 1 fs, heated far above the bath at 4 fs."""
    system = chain_system(8, bond="bumpy", angle_k=400.0)
    with caplog.at_level(logging.WARNING, logger="openmm_flowmatch"):
        result = sim.run_simulation(
            system, chain_topology(4), zigzag(4), tmp_path, steps=2000, replicas=8, report_interval=20,
            time_step=0.004, platform="Reference", progress=False, min_distance=0.0,
        )
    assert result.kinetic_temperature.mean > 2 * TEMPERATURE
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("4 fs" in message and "check-time-step" in message for message in messages)


# --------------------------------------------------------------------------------------------
# configurational temperature
# --------------------------------------------------------------------------------------------


def coupled_stiffness(n_beads: int) -> np.ndarray:
    """A positive-definite 3n×3n matrix: springs between neighbours plus a weak tether (kJ/mol/nm²)."""
    generator = np.random.default_rng(1)
    size = 3 * n_beads
    matrix = np.diag(np.full(size, 50.0))
    for i in range(size - 3):
        matrix[i, i] += 1000.0
        matrix[i + 3, i + 3] += 1000.0
        matrix[i, i + 3] -= 1000.0
        matrix[i + 3, i] -= 1000.0
    noise = generator.normal(scale=30.0, size=(size, size))
    return matrix + noise @ noise.T / size


def test_configurational_temperature_of_boltzmann_samples():
    n_beads = 5
    stiffness = coupled_stiffness(n_beads)
    covariance = kT(TEMPERATURE) * np.linalg.inv(stiffness)
    samples = np.random.default_rng(0).multivariate_normal(np.zeros(3 * n_beads), covariance, size=20000)
    positions = samples.reshape(-1, n_beads, 3)
    matrix = torch.tensor(stiffness)

    def energy(x):
        flat = x.reshape(x.shape[0], -1)
        return 0.5 * torch.einsum("bi,ij,bj->b", flat, matrix, flat)

    measured = diag.configurational_temperature(energy, positions, batch_size=4096)
    assert measured == pytest.approx(TEMPERATURE, rel=0.03)
    # exactly: |∇U|² = |Kx|², ∇²U = tr K for a quadratic U
    exact = np.sum((samples @ stiffness) ** 2) / (BOLTZMANN_KJ_PER_MOL_PER_K * len(samples) * np.trace(stiffness))
    assert measured == pytest.approx(exact, rel=1e-10)


def test_configurational_temperature_one_dimensional_exact():
    x = np.array([[[0.1, 0.0, 0.0]], [[-0.2, 0.0, 0.0]], [[0.05, 0.0, 0.0]]])
    k = 300.0

    def energy(positions):
        return 0.5 * k * positions[..., 0].pow(2).sum(-1) + 0.0 * positions.sum()

    expected = (k**2 * np.sum(x[..., 0] ** 2)) / (BOLTZMANN_KJ_PER_MOL_PER_K * 3 * k)
    assert diag.configurational_temperature(energy, x) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(diag.DiagnosticsError, match="not defined"):
        diag.configurational_temperature(lambda p: p.sum(), x)
    with pytest.raises(diag.DiagnosticsError, match="shape"):
        diag.configurational_temperature(energy, np.zeros((3, 2)))


# --------------------------------------------------------------------------------------------
# bond and angle statistics
# --------------------------------------------------------------------------------------------


def test_bond_lengths_angles_and_comparison():
    positions = np.array([[[0, 0, 0], [0.1, 0, 0], [0.1, 0.2, 0]], [[0, 0, 0], [0.3, 0, 0], [0.3, 0, 0.1]]], float)
    np.testing.assert_allclose(analysis.bond_lengths(positions, [(0, 1), (1, 2)]), [[0.1, 0.2], [0.3, 0.1]])
    np.testing.assert_allclose(analysis.bond_angles(positions, [(0, 1, 2)]), [[math.pi / 2], [math.pi / 2]])
    statistics = analysis.bonded_statistics(positions, [(0, 1), (1, 2)], [(0, 1, 2)])
    np.testing.assert_allclose(statistics["bond_std"], [0.1, 0.05])
    reference = {"bond_mean": [0.2, 0.1], "bond_std": [0.05, 0.05], "angle_mean": [1.5], "angle_std": [0.1]}
    comparison = analysis.compare_bonded_statistics(statistics, reference)
    np.testing.assert_allclose(comparison["bond_width_ratio"], [2.0, 1.0])
    np.testing.assert_allclose(comparison["bond_mean_shift"], [0.0, 0.05], atol=1e-12)
    assert comparison["bond_width_ratio_min"] == pytest.approx(1.0) and comparison["angle_width_ratio_max"] == 0.0
    with pytest.raises(analysis.AnalysisError, match="out of range"):
        analysis.bond_lengths(positions, [(0, 3)])


# --------------------------------------------------------------------------------------------
# a stiff artifact: the time-step check, recording, CLI
# --------------------------------------------------------------------------------------------


class BumpyBonds(torch.nn.Module):
    """Network stand-in: ε cos(2π(r − r₀)/λ) on every bond (curvature ±5 k of the prior)."""

    def __init__(self, pairs, lengths, epsilon: float, wavelength: float, n_beads: int) -> None:
        super().__init__()
        self.register_buffer("pairs", torch.tensor(pairs, dtype=torch.long))
        self.register_buffer("lengths", torch.tensor(lengths, dtype=torch.float64))
        self.epsilon = float(epsilon)
        self.wavelength = float(wavelength)
        self.n_beads = n_beads

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        difference = positions[:, self.pairs[:, 1]] - positions[:, self.pairs[:, 0]]
        deviation = torch.linalg.vector_norm(difference, dim=-1) - self.lengths.to(positions.dtype)
        return (self.epsilon * torch.cos(2 * math.pi * deviation / self.wavelength)).sum(-1)


@pytest.fixture(scope="module")
def stiff(tmp_path_factory):
    """An artifact of the alanine-dipeptide backbone map: harmonic priors + the bumpy network, and a start."""
    pdb = Path(openmm_flowmatch.__file__).parent / "resources" / "alanine_dipeptide.pdb"
    trajectory = mdtraj.load(str(pdb))
    mapping = CGMapping.backbone(trajectory.topology)
    start = np.asarray(mapping.map_positions(trajectory.xyz.astype(np.float64)))[0]
    pairs = np.asarray(mapping.bonds)
    triples = bonded_triples(mapping.bonds, mapping.n_beads)
    lengths = analysis.bond_lengths(start, pairs)[0]
    angles = analysis.bond_angles(start, triples)[0]
    k = 150000.0
    sigma = math.sqrt(kT(TEMPERATURE) / k)
    priors = Priors([HarmonicBonds(pairs, lengths, np.full(len(pairs), k)),
                     HarmonicAngles(triples, angles, np.full(len(triples), 400.0))], temperature=TEMPERATURE)
    network = BumpyBonds(pairs, lengths, 5 * k * (2 * sigma / (2 * math.pi)) ** 2, 2 * sigma, mapping.n_beads)
    path = tmp_path_factory.mktemp("stiff") / "stiff.pt"
    export_force_field(network, path, priors=priors, mapping=mapping, temperature=TEMPERATURE)
    return {"path": path, "start": start, "sigma": sigma, "pdb": pdb, "mapping": mapping}


@pytest.fixture(scope="module")
def stiff_report(stiff):
    return diag.check_time_step(
        stiff["path"], stiff["start"], time_steps=(0.004, 0.001), replicas=32, equilibration_time=1.0,
        production_time=10.0, friction=10.0, platform="Reference", progress=False,
    )


def test_reference_statistics_from_priors_and_from_data(stiff, tmp_path):
    field = FlowMatchForceField.load(stiff["path"])
    assert field.data_statistics is None and field.sound_time_step is None
    reference = diag.reference_statistics(field)
    assert reference["source"] == "priors"
    np.testing.assert_allclose(reference["bond_std"], stiff["sigma"])
    np.testing.assert_allclose(reference["angle_std"], math.sqrt(kT(TEMPERATURE) / 400.0))
    # explicit data statistics take precedence and are checked at export
    data = analysis.bonded_statistics(stiff["start"] + 0.001 * np.random.default_rng(0).normal(size=(50, 5, 3)),
                                      stiff["mapping"].bonds, bonded_triples(stiff["mapping"].bonds, 5))
    network = torch.jit.load(str(stiff["path"])).double_model
    path = export_force_field(network, tmp_path / "with_data.pt", priors=field.priors, mapping=stiff["mapping"],
                              temperature=TEMPERATURE, data_statistics=data)
    with_data = FlowMatchForceField.load(path)
    assert with_data.data_statistics["bond_std"] == pytest.approx(data["bond_std"])
    assert diag.reference_statistics(with_data)["source"] == "data_statistics"
    with pytest.raises(openmm_flowmatch.export.ArtifactError, match="one value per bond"):
        export_force_field(network, tmp_path / "bad.pt", priors=None, mapping=stiff["mapping"], temperature=300.0,
                           data_statistics={"bond_mean": [0.1], "bond_std": [0.01]})


def test_check_time_step_finds_the_stiff_limit(stiff_report):
    small, large = stiff_report.results  # sorted by time step
    assert (small.time_step, large.time_step) == (0.001, 0.004)
    assert small.sound, stiff_report.table()
    assert abs(small.relative_deviation) <= 0.02 and small.kinetic_temperature_error < 3.0
    assert 0.9 <= small.bonded["bond_width_ratio_min"] <= small.bonded["bond_width_ratio_max"] <= 1.1
    assert small.configurational_temperature == pytest.approx(TEMPERATURE, rel=0.1)
    assert not large.sound
    assert large.blew_up or large.kinetic_temperature > 1.5 * TEMPERATURE
    assert stiff_report.largest_sound_time_step == 0.001
    assert small.steps == 11000 and small.steps_per_second > 0
    text = stiff_report.table()
    assert "largest sound time step: 1 fs" in text and text.count("\n") >= 3
    data = json.loads(json.dumps(stiff_report.to_dict()))
    assert data["largest_sound_time_step"] == 0.001 and len(data["rows"]) == 2


def test_record_sound_time_step_round_trip(stiff, stiff_report, tmp_path):
    path = tmp_path / "copy.pt"
    shutil.copy(stiff["path"], path)
    before = FlowMatchForceField.load(path)
    entry = diag.record_sound_time_step(path, stiff_report)
    after = FlowMatchForceField.load(path)
    assert after.sound_time_step == 0.001 == entry["largest_sound_time_step"]
    check = after.metadata["time_step_check"]
    assert check["replicas"] == 32 and len(check["rows"]) == 2 and check["package_version"]
    assert {k: v for k, v in after.metadata.items() if k != "time_step_check"} == before.metadata
    x = torch.tensor(stiff["start"]) + 0.01
    assert float(after.module(x)) == float(before.module(x))
    system = after.create_system(after.mapping.cg_topology())
    assert system.getNumParticles() == 5


@pytest.mark.parametrize(
    "options, message",
    [({"time_steps": (0.0,)}, "0.0"), ({"time_steps": (-0.001,)}, "-0.001"), ({"time_steps": (0.05,)}, "0.05"),
     ({"temperature": 0.0}, "temperature"), ({"temperature": -3.0}, "-3.0"), ({"replicas": 0}, "replicas")],
)
def test_check_time_step_bad_input(stiff, options, message):
    with pytest.raises(sim.SimulationError, match="must") as caught:
        diag.check_time_step(stiff["path"], stiff["start"], progress=False, **options)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_cli_check_time_step(stiff, tmp_path, capsys):
    path = tmp_path / "cli.pt"
    shutil.copy(stiff["path"], path)
    code = cli.main([
        "--quiet", "check-time-step", str(path), str(stiff["pdb"]), "--time-steps", "1", "2", "--replicas", "2",
        "--production-time", "0.2", "--equilibration-time", "0.05", "--platform", "Reference",
        "--json", str(tmp_path / "report.json"),
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "kinetic T (K)" in out and "bond width ratio" in out and "largest sound time step" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert [row["time_step"] for row in report["rows"]] == [0.001, 0.002]
    assert "time_step_check" in FlowMatchForceField.load(path).metadata
    code = cli.main(["check-time-step", str(path), str(stiff["pdb"]), "--time-steps", "50"])
    assert code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "0.05" in error[0]
