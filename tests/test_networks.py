"""CG networks: TorchScript, dtypes, invariances, chirality, Lipschitz bound, cutoff, configs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from openmm_flowmatch.forcefield.features import FeatureError, InvariantFeatures
from openmm_flowmatch.forcefield.networks import CGNet, MessagePassingNet, network_from_config


def random_chains(n_frames: int, n_beads: int, seed: int = 0) -> torch.Tensor:
    generator = np.random.default_rng(seed)
    steps = generator.normal(size=(n_frames, n_beads, 3))
    lengths = 0.15 + 0.01 * generator.normal(size=(n_frames, n_beads, 1))
    steps = lengths * steps / np.linalg.norm(steps, axis=-1, keepdims=True)
    steps[:, 0] = 0.5 * generator.normal(size=(n_frames, 3))
    return torch.tensor(np.cumsum(steps, axis=1))


def random_rotation(seed: int) -> torch.Tensor:
    generator = np.random.default_rng(seed)
    q, r = np.linalg.qr(generator.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return torch.tensor(q)


def forces(model, positions: torch.Tensor) -> torch.Tensor:
    positions = positions.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(model(positions).sum(), positions)
    return -gradient


def make_cgnet(n_beads: int = 5, **kwargs) -> CGNet:
    features = InvariantFeatures.from_positions(random_chains(64, n_beads, seed=11))
    kwargs.setdefault("hidden_width", 32)
    kwargs.setdefault("n_layers", 3)
    return CGNet(features, **kwargs).double()


def make_message_passing(n_beads: int = 5, **kwargs) -> MessagePassingNet:
    kwargs.setdefault("hidden_width", 16)
    kwargs.setdefault("n_interactions", 2)
    kwargs.setdefault("n_radial", 8)
    return MessagePassingNet([index % 3 for index in range(n_beads)], **kwargs).double()


NETWORKS = {
    "cgnet": make_cgnet,
    "cgnet_silu_bound": lambda: make_cgnet(activation="silu", lipschitz_bound=10.0),
    "message_passing": make_message_passing,
    "message_passing_cutoff": lambda: make_message_passing(cutoff=0.6),
}


@pytest.mark.parametrize("name", NETWORKS)
def test_scripted_network_equals_eager_in_both_dtypes(name):
    model = NETWORKS[name]()
    scripted = torch.jit.script(model)
    positions = random_chains(4, 5, seed=1)
    energies = model(positions)
    assert energies.shape == (4,) and energies.dtype == torch.float64
    torch.testing.assert_close(scripted(positions), energies)
    torch.testing.assert_close(scripted(positions[2]), energies[2])
    assert scripted(positions[2]).dim() == 0
    # forces after calls without gradients (TorchScript's profiling executor once dropped them)
    torch.testing.assert_close(forces(scripted, positions), forces(model, positions))
    torch.testing.assert_close(forces(scripted, positions[1]), forces(model, positions)[1])
    single = torch.jit.script(model.float())
    assert single(positions.float()).dtype == torch.float32
    torch.testing.assert_close(single(positions.float()).double(), energies, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NETWORKS)
def test_rotation_translation_invariance(name):
    model = NETWORKS[name]()
    positions = random_chains(3, 5, seed=2)
    energies, reference_forces = model(positions), forces(model, positions)
    for seed in range(3):
        rotation = random_rotation(seed)
        shift = torch.tensor(np.random.default_rng(seed).normal(size=3))
        moved = positions @ rotation.T + shift
        torch.testing.assert_close(model(moved), energies, rtol=1e-10, atol=1e-10)
        # forces rotate with the molecule
        torch.testing.assert_close(forces(model, moved), reference_forces @ rotation.T, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", NETWORKS)
def test_mirror_image_gets_a_different_energy(name):
    model = NETWORKS[name]()
    positions = random_chains(8, 5, seed=3)
    mirrored = positions * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    difference = (model(positions) - model(mirrored)).abs()
    assert difference.min() > 1e-6, difference


def test_distance_only_network_is_blind_to_mirror_images():
    """Without the dihedral head, a pair-distance network cannot tell enantiomers apart."""
    model = make_message_passing(chirality_head=False)
    positions = random_chains(4, 5, seed=4)
    mirrored = positions * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(model(mirrored), model(positions))


@pytest.mark.parametrize("name", ["cgnet", "message_passing"])
def test_forces_match_finite_differences(name):
    model = NETWORKS[name]()
    positions = random_chains(1, 5, seed=5)[0].requires_grad_(True)
    assert torch.autograd.gradcheck(model, (positions,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_lipschitz_projection_bounds_every_layer():
    model = make_cgnet(hidden_width=48, n_layers=4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(10.0)
    norms = [torch.linalg.matrix_norm(layer.weight, 2) for layer in model.modules() if isinstance(layer, torch.nn.Linear)]
    assert max(norms) > 4.0
    model.lipschitz_bound = 4.0
    model.project_lipschitz()
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            assert torch.linalg.matrix_norm(layer.weight, 2) <= 4.0 + 1e-9
    # a layer already inside the bound is left alone
    bounded = make_cgnet(lipschitz_bound=1e6)
    before = [parameter.clone() for parameter in bounded.parameters()]
    bounded.project_lipschitz()
    for old, new in zip(before, bounded.parameters()):
        torch.testing.assert_close(old, new, rtol=0, atol=0)


def test_lipschitz_bound_limits_the_energy_slope():
    """Through the z-scored features, a bound λ per layer limits |ΔU| ≤ λ^L ‖Δfeature‖ (+ residual)."""
    model = make_cgnet(hidden_width=32, n_layers=1, lipschitz_bound=0.5)
    features = random_chains(200, 5, seed=6)
    z = model.features(features)
    energies = model(features)
    # one hidden layer (tanh, 1-Lipschitz) and an output layer, both ≤ 0.5: |ΔU| ≤ 0.25 ‖Δz‖
    difference_u = (energies[:, None] - energies[None, :]).abs()
    difference_z = torch.cdist(z, z)
    assert bool(torch.all(difference_u <= 0.25 * difference_z + 1e-12))


def test_cutoff_makes_distant_pairs_irrelevant():
    model = MessagePassingNet([0, 1], cutoff=0.5, hidden_width=8, n_radial=6).double()
    energies = [float(model(torch.tensor([[0.0, 0.0, 0.0], [d, 0.0, 0.0]], dtype=torch.float64)).detach()) for d in (0.6, 0.9, 3.0)]
    assert energies[0] == pytest.approx(energies[1], abs=1e-12) == pytest.approx(energies[2], abs=1e-12)
    near = float(model(torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0]], dtype=torch.float64)).detach())
    assert abs(near - energies[0]) > 1e-6
    # and the envelope is smooth: the force vanishes as d → cutoff
    positions = torch.tensor([[0.0, 0.0, 0.0], [0.4999, 0.0, 0.0]], dtype=torch.float64)
    assert forces(model, positions).abs().max() < 1e-3


@pytest.mark.parametrize("name", ["cgnet_silu_bound", "message_passing_cutoff"])
def test_config_round_trip(name):
    model = NETWORKS[name]()
    rebuilt = network_from_config(model.config()).double()
    rebuilt.load_state_dict(model.state_dict())
    positions = random_chains(3, 5, seed=7)
    torch.testing.assert_close(rebuilt(positions), model(positions))
    assert rebuilt.config() == model.config()


def test_bad_network_arguments():
    features = InvariantFeatures(5)
    with pytest.raises(FeatureError, match="activation"):
        CGNet(features, activation="sigmoid-ish")
    with pytest.raises(FeatureError, match="lipschitz_bound"):
        CGNet(features, lipschitz_bound=-1.0)
    with pytest.raises(FeatureError, match="n_bead_types"):
        MessagePassingNet([0, 3], n_bead_types=2)
    with pytest.raises(FeatureError, match="network class"):
        network_from_config({"class": "Unknown"})


# ------------------------------------------------------------ power-iteration Lipschitz projection
def trained_like_matrix(n: int, seed: int) -> torch.Tensor:
    """A matrix with a decaying spectrum and a small top gap, like a trained layer at its bound."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    values = 4.0 * torch.linspace(1.0, 0.05, n, dtype=torch.float64) ** 2
    values[1] = 0.97 * values[0]
    return left @ torch.diag(values) @ right.T


@pytest.mark.parametrize("kind", ["random", "trained_like", "rectangular"])
def test_power_iteration_equals_the_largest_singular_value(kind):
    from openmm_flowmatch.forcefield.networks import exact_spectral_norm, power_iteration_spectral_norm

    generator = torch.Generator().manual_seed(3)
    if kind == "random":
        matrix = torch.randn(160, 160, generator=generator, dtype=torch.float64) / 12.0
    elif kind == "trained_like":
        matrix = trained_like_matrix(160, 4)
    else:
        matrix = torch.randn(160, 17, generator=generator, dtype=torch.float64)
    exact = float(torch.linalg.svdvals(matrix)[0])
    left, right = torch.randn(matrix.shape[0], generator=generator), torch.randn(matrix.shape[1], generator=generator)
    sigma, left, right, converged = power_iteration_spectral_norm(matrix, left, right, max_iterations=20000)
    assert bool(converged)
    assert float(sigma) == pytest.approx(exact, rel=1e-6)
    # warm start after a small perturbation: converges quickly and to the new value
    perturbed = matrix + 1e-3 * torch.randn(matrix.shape, generator=generator, dtype=torch.float64)
    sigma, *_ = power_iteration_spectral_norm(perturbed, left, right, max_iterations=20000)
    assert float(sigma) == pytest.approx(float(torch.linalg.svdvals(perturbed)[0]), rel=1e-6)
    assert exact_spectral_norm(matrix)[0] == pytest.approx(exact, rel=1e-12)


def test_warm_started_projection_keeps_the_bound_during_training():
    """Projection after optimiser steps: every layer ≤ bound·(1 + 1e-6), exact norms or not."""
    torch.manual_seed(0)
    model = make_cgnet(hidden_width=64, n_layers=4, lipschitz_bound=1.0)
    positions = random_chains(128, 5, seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(30):
        optimizer.zero_grad()
        moving = positions.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(model(moving).sum(), moving, create_graph=True)
        (gradient**2).mean().neg().backward()  # push the weights up
        optimizer.step()
        model.project_lipschitz()
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                assert float(torch.linalg.svdvals(layer.weight.detach().double())[0]) <= 1.0 * (1 + 1e-6)
    norms = [float(torch.linalg.svdvals(layer.weight.detach())[0]) for layer in model.modules() if isinstance(layer, torch.nn.Linear)]
    assert max(norms) == pytest.approx(1.0, rel=1e-6)  # the bound is active, not over-shot


def test_power_iteration_tolerance_is_the_weights_epsilon_and_keeps_float32_projection_exact():
    """float32 weights iterate to float32's epsilon (the estimate within ~half of it), float64 to
    POWER_ITERATION_TOLERANCE; the projected float32 weights equal the exactly projected ones up
    to their own rounding, float64 ones to the tolerance."""
    from openmm_flowmatch.forcefield.networks import POWER_ITERATION_TOLERANCE, power_iteration_tolerance

    assert power_iteration_tolerance(torch.float64) == POWER_ITERATION_TOLERANCE == 1e-9
    assert power_iteration_tolerance(torch.float32) == float(torch.finfo(torch.float32).eps)
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(1)
        model = make_cgnet(hidden_width=96, n_layers=4, lipschitz_bound=1.0).to(dtype)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        positions = random_chains(64, 5, seed=4).to(dtype)
        model.project_lipschitz(exact=True)  # stores the warm-start vectors
        for _ in range(15):
            optimizer.zero_grad()
            moving = positions.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(model(moving).sum(), moving, create_graph=True)
            (gradient**2).mean().neg().backward()  # push the weights up: the bound stays active
            optimizer.step()
            exact = copy.deepcopy(model)
            exact.project_lipschitz(exact=True)
            model.project_lipschitz()  # the warm-started power iteration
            # float32: two ulps (the dtype's rounding); float64: the tolerance itself
            tolerance = max(2 * float(torch.finfo(dtype).eps), power_iteration_tolerance(dtype))
            for estimated, reference in zip(model.parameters(), exact.parameters()):
                torch.testing.assert_close(estimated, reference, rtol=tolerance, atol=tolerance * float(reference.detach().abs().max()))


def test_projection_state_leaves_state_dict_and_scripting_alone():
    model = make_cgnet(lipschitz_bound=4.0)
    plain = make_cgnet()
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())  # strict: no extra keys
    model.load_state_dict(plain.state_dict())
    model.project_lipschitz()
    scripted = torch.jit.script(model)
    positions = random_chains(4, 5, seed=5)
    torch.testing.assert_close(scripted(positions), model(positions))


def test_energy_from_features_is_the_mlp_part_of_forward():
    model = make_cgnet(lipschitz_bound=4.0)
    positions = random_chains(6, 5, seed=6)
    torch.testing.assert_close(model.energy_from_features(model.features.standardized(positions)), model(positions))
