"""The OpenMM + openmm-torch stack: a TorchScript energy inside ``TorchForce``.

A module with a known analytic energy (harmonic springs between consecutive particles) is wrapped
in ``openmmtorch.TorchForce``. OpenMM's energies and forces on the Reference and CPU platforms
must equal the analytic values and the module's own autograd forces, and a System serialized with
``XmlSerializer`` must give the same energy. A wrong sign, a unit slip or a broken wiring fails.
"""

from __future__ import annotations

import numpy as np
import openmm
import openmm.unit as unit
import pytest
import torch

openmmtorch = pytest.importorskip("openmmtorch")

SPRING_CONSTANT = 350.0  # kJ/mol/nm^2, E = 1/2 k (r - r0)^2
REST_LENGTH = 0.15  # nm
N_PARTICLES = 6


class HarmonicChain(torch.nn.Module):
    """E = Σ ½ k (|x_{i+1} − x_i| − r0)² over consecutive particles (kJ/mol, positions in nm)."""

    def __init__(self, spring_constant: float, rest_length: float):
        super().__init__()
        self.spring_constant = spring_constant
        self.rest_length = rest_length

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        bond_vectors = positions[1:] - positions[:-1]
        lengths = torch.linalg.norm(bond_vectors, dim=-1)
        return 0.5 * self.spring_constant * torch.sum((lengths - self.rest_length) ** 2)


def analytic_energy_and_forces(positions: np.ndarray) -> tuple[float, np.ndarray]:
    bond_vectors = positions[1:] - positions[:-1]
    lengths = np.linalg.norm(bond_vectors, axis=1)
    energy = 0.5 * SPRING_CONSTANT * np.sum((lengths - REST_LENGTH) ** 2)
    # dE/dx_{i+1} = k (r - r0) u, dE/dx_i = -k (r - r0) u; force = -dE/dx
    pull = (SPRING_CONSTANT * (lengths - REST_LENGTH))[:, None] * bond_vectors / lengths[:, None]
    forces = np.zeros_like(positions)
    forces[1:] -= pull
    forces[:-1] += pull
    return float(energy), forces


@pytest.fixture(scope="module")
def scripted_module_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("torchforce") / "harmonic_chain.pt"
    torch.jit.script(HarmonicChain(SPRING_CONSTANT, REST_LENGTH)).save(str(path))
    return str(path)


@pytest.fixture
def positions() -> np.ndarray:
    generator = np.random.default_rng(7)
    steps = generator.normal(scale=0.1, size=(N_PARTICLES, 3))
    return np.cumsum(steps, axis=0) + 0.2


def make_system(module_path: str) -> openmm.System:
    system = openmm.System()
    for _ in range(N_PARTICLES):
        system.addParticle(12.0)
    system.addForce(openmmtorch.TorchForce(module_path))
    return system


def openmm_energy_and_forces(system: openmm.System, positions: np.ndarray, platform_name: str):
    integrator = openmm.VerletIntegrator(0.001)
    platform = openmm.Platform.getPlatformByName(platform_name)
    properties = {"Threads": "1"} if platform_name == "CPU" else {}
    context = openmm.Context(system, integrator, platform, properties)
    context.setPositions(positions * unit.nanometer)
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return energy, np.asarray(forces)


def autograd_energy_and_forces(module_path: str, positions: np.ndarray):
    module = torch.jit.load(module_path)
    x = torch.tensor(positions, dtype=torch.float64, requires_grad=True)
    energy = module(x)
    (gradient,) = torch.autograd.grad(energy, x)
    return float(energy.detach()), -gradient.numpy()


@pytest.mark.parametrize("platform_name", ["Reference", "CPU"])
def test_torchforce_matches_analytic_and_autograd(scripted_module_path, positions, platform_name):
    energy, forces = openmm_energy_and_forces(make_system(scripted_module_path), positions, platform_name)
    expected_energy, expected_forces = analytic_energy_and_forces(positions)
    autograd_energy, autograd_forces = autograd_energy_and_forces(scripted_module_path, positions)

    assert energy > 1.0  # a configuration far from the rest length: the check is not vacuous
    np.testing.assert_allclose(energy, expected_energy, rtol=1e-5)
    np.testing.assert_allclose(forces, expected_forces, rtol=1e-5, atol=1e-6 * np.abs(expected_forces).max())
    np.testing.assert_allclose(autograd_energy, expected_energy, rtol=1e-10)
    np.testing.assert_allclose(forces, autograd_forces, rtol=1e-5, atol=1e-6 * np.abs(expected_forces).max())


def test_forces_are_minus_energy_gradient_by_finite_differences(scripted_module_path, positions):
    system = make_system(scripted_module_path)
    _, forces = openmm_energy_and_forces(system, positions, "Reference")
    step = 1e-5
    numerical = np.zeros_like(positions)
    for particle in range(N_PARTICLES):
        for axis in range(3):
            shifted = positions.copy()
            shifted[particle, axis] += step
            up, _ = analytic_energy_and_forces(shifted)
            shifted[particle, axis] -= 2 * step
            down, _ = analytic_energy_and_forces(shifted)
            numerical[particle, axis] = -(up - down) / (2 * step)
    np.testing.assert_allclose(forces, numerical, rtol=1e-4, atol=1e-4)


def test_system_xml_round_trip_gives_same_energy(scripted_module_path, positions):
    system = make_system(scripted_module_path)
    restored = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    # Plugin forces come back as generic Force proxies in Python; their XML names the type.
    assert 'type="TorchForce"' in openmm.XmlSerializer.serialize(restored.getForce(0))
    original_energy, original_forces = openmm_energy_and_forces(system, positions, "Reference")
    restored_energy, restored_forces = openmm_energy_and_forces(restored, positions, "Reference")
    np.testing.assert_allclose(restored_energy, original_energy, rtol=1e-12)
    np.testing.assert_allclose(restored_forces, original_forces, rtol=1e-12)


@pytest.mark.gpu
def test_torchforce_on_cuda_with_graphs(scripted_module_path, positions):
    system = make_system(scripted_module_path)
    system.getForce(0).setProperty("useCUDAGraphs", "true")
    energy, forces = openmm_energy_and_forces(system, positions, "CUDA")
    expected_energy, expected_forces = analytic_energy_and_forces(positions)
    np.testing.assert_allclose(energy, expected_energy, rtol=1e-4)
    np.testing.assert_allclose(forces, expected_forces, rtol=1e-3, atol=1e-3)
