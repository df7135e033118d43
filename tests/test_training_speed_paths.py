"""The fast force-matching path equals the autograd path: explicit input gradient with its
hand-written backward, the direct loss gradients, tanh via the sigmoid, fused Adam, and the
Lipschitz projection's norms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from openmm_flowmatch.forcefield import CGNet, InvariantFeatures, forces_of
from openmm_flowmatch.forcefield.input_gradient import DERIVATIVES, ExplicitInputGradient
from openmm_flowmatch.forcefield.networks import ACTIVATIONS, largest_singular_value
from openmm_flowmatch.forcefield.training import (
    _force_data, adam_optimizer, feature_jacobians, forces_from_features,
)

N_BEADS = 5


def random_chains(n_frames: int, seed: int) -> torch.Tensor:
    generator = np.random.default_rng(seed)
    steps = generator.normal(size=(n_frames, N_BEADS, 3))
    lengths = 0.15 + 0.01 * generator.normal(size=(n_frames, N_BEADS, 1))
    return torch.tensor(np.cumsum(lengths * steps / np.linalg.norm(steps, axis=-1, keepdims=True), axis=1))


def cgnet(activation: str, n_layers: int, width: int = 24, seed: int = 0, bound: float | None = 2.0) -> CGNet:
    """A float64 CGNet whose weights are large enough that the activations are far from linear."""
    torch.manual_seed(seed)
    model = CGNet(InvariantFeatures.from_positions(random_chains(64, 1)), hidden_width=width, n_layers=n_layers,
                  activation=activation, lipschitz_bound=bound).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)
    return model


def autograd_input_gradient(model: CGNet, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = features.detach().requires_grad_(True)
    energy = model.energy_from_features(inputs)
    (gradient,) = torch.autograd.grad(energy.sum(), inputs)
    return energy.detach(), gradient


@pytest.mark.parametrize("activation", sorted(DERIVATIVES))
@pytest.mark.parametrize("n_layers", [1, 2, 6])  # residual depth 0, 1, 5
def test_explicit_input_gradient_equals_autograd(activation, n_layers):
    model = cgnet(activation, n_layers)
    features = model.features.standardized(random_chains(50, 2))
    energy, gradient = model.energy_and_input_gradient(features)
    expected_energy, expected = autograd_input_gradient(model, features)
    assert float(expected.abs().max()) > 0.1  # not a vanishing gradient
    torch.testing.assert_close(energy, expected_energy, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


@pytest.mark.parametrize("activation", sorted(DERIVATIVES))
def test_hand_written_backward_matches_finite_differences(activation):
    """gradcheck of (U, ∂U/∂φ) with respect to φ and every parameter: checks σ' and σ''."""
    model = cgnet(activation, 3, width=6)
    features = model.features.standardized(random_chains(4, 3))
    layers = [model.input_layer] + [block.linear for block in model.residual_layers]
    inputs = [features, model.output_layer.weight, model.output_layer.bias]
    inputs += [parameter for layer in layers for parameter in (layer.weight, layer.bias)]
    inputs = [tensor.detach().clone().requires_grad_(True) for tensor in inputs]
    derivatives = DERIVATIVES[activation]
    assert torch.autograd.gradcheck(lambda *args: ExplicitInputGradient.apply(derivatives, *args), inputs,
                                    eps=1e-6, atol=1e-7, rtol=1e-6)


def test_explicit_forces_equal_autograd_forces_through_the_positions():
    positions = random_chains(40, 4)
    for activation in ("tanh", "silu"):
        model = cgnet(activation, 5)
        features, jacobian = feature_jacobians(model.features, positions)
        expected = forces_of(model, positions).flatten(1)
        for explicit in (True, False):
            got = forces_from_features(model, features, jacobian, explicit=explicit)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


def test_explicit_path_gives_the_double_backpropagation_gradients():
    positions, target = random_chains(64, 5), 50.0 * torch.randn(64, N_BEADS, 3, dtype=torch.float64)
    model = cgnet("tanh", 5)
    data = _force_data(model, positions, target, precompute=True)
    batch = torch.arange(0, 64, 2)
    gradients = []
    for explicit in (False, True):
        model.zero_grad(set_to_none=True)
        data.explicit_gradient = explicit
        data.loss(model, batch, create_graph=True).backward()
        gradients.append({name: parameter.grad for name, parameter in model.named_parameters()})
    old, new = gradients
    assert old.keys() == new.keys() and old["output_layer.bias"] is None and new["output_layer.bias"] is None
    for name, value in old.items():
        if value is not None:
            torch.testing.assert_close(new[name], value, rtol=1e-11, atol=1e-11 * float(value.abs().max()), msg=name)


@pytest.mark.parametrize("activation", sorted(DERIVATIVES))
def test_direct_gradients_equal_double_backpropagation(activation):
    """force_matching_gradients (no autograd graph), as the trainer accumulates them, against
    loss.backward() through autograd's double back-propagation: loss and every gradient, float64."""
    positions, target = random_chains(48, 11), 50.0 * torch.randn(48, N_BEADS, 3, dtype=torch.float64)
    model = cgnet(activation, 4)
    data = _force_data(model, positions, target, precompute=True)
    batch = torch.arange(1, 48, 3)
    model.zero_grad(set_to_none=True)
    data.explicit_gradient = False
    expected_loss = data.accumulate_gradients(model, batch)
    expected = {name: parameter.grad for name, parameter in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    data.explicit_gradient = True
    loss = data.accumulate_gradients(model, batch, weight=0.25)
    assert loss == pytest.approx(0.25 * expected_loss, rel=1e-13)
    data.accumulate_gradients(model, batch, weight=0.75)  # accumulates, as backward() does
    got = {name: parameter.grad for name, parameter in model.named_parameters()}
    assert got.keys() == expected.keys() and got["output_layer.bias"] is None and expected["output_layer.bias"] is None
    if activation != "relu":  # (ReLU: σ'' = 0, the biases get zero gradients along both paths)
        assert all(value is None or float(value.abs().max()) > 1e-3 for value in expected.values())
    for name, value in expected.items():
        if value is not None:
            torch.testing.assert_close(got[name], value, rtol=1e-11, atol=1e-11 * float(value.abs().max()), msg=name)


def test_direct_gradients_skip_frozen_parameters():
    positions, target = random_chains(16, 12), torch.randn(16, N_BEADS, 3, dtype=torch.float64)
    model = cgnet("tanh", 3)
    model.input_layer.weight.requires_grad_(False)
    data = _force_data(model, positions, target, precompute=True)
    data.accumulate_gradients(model, torch.arange(16))
    assert model.input_layer.weight.grad is None and model.input_layer.bias.grad is not None


def run_steps(model: CGNet, data, optimizer: torch.optim.Optimizer, n_steps: int) -> None:
    generator = torch.Generator().manual_seed(7)
    for _ in range(n_steps):
        batch = torch.randint(len(data), (32,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        data.accumulate_gradients(model, batch)
        optimizer.step()
        model.project_lipschitz()


def test_training_steps_along_the_old_and_new_paths_agree():
    """Autograd double back-propagation + default Adam vs the trainer's direct gradients + fused
    Adam, float64."""
    positions, target = random_chains(128, 6), 50.0 * torch.randn(128, N_BEADS, 3, dtype=torch.float64)
    models = []
    for explicit in (False, True):
        model = cgnet("tanh", 5, bound=1.0)
        data = _force_data(model, positions, target, precompute=True)
        data.explicit_gradient = explicit
        optimizer = adam_optimizer(model.parameters(), 3e-3) if explicit else torch.optim.Adam(model.parameters(), lr=3e-3)
        run_steps(model, data, optimizer, 8)
        models.append(model)
    initial = cgnet("tanh", 5, bound=1.0)
    for (name, old), new in zip(models[0].named_parameters(), models[1].parameters()):
        # all moved but the output bias (∂U/∂φ does not depend on it: no gradient)
        assert torch.equal(old, initial.get_parameter(name)) is (name == "output_layer.bias"), name
        torch.testing.assert_close(new, old, rtol=1e-12, atol=1e-12, msg=name)


def test_fallback_activation_goes_through_autograd(monkeypatch):
    monkeypatch.setitem(ACTIVATIONS, "gelu", nn.GELU)
    assert "gelu" not in DERIVATIVES
    model = cgnet("gelu", 3)
    features = model.features.standardized(random_chains(20, 8))
    energy, gradient = model.energy_and_input_gradient(features)
    expected_energy, expected = autograd_input_gradient(model, features)
    torch.testing.assert_close(energy, expected_energy, rtol=0, atol=0)
    torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-12)
    # and it trains: gradients of a loss on the input gradient, along both force paths
    positions, target = random_chains(16, 9), torch.randn(16, N_BEADS, 3, dtype=torch.float64)
    data = _force_data(model, positions, target, precompute=True)
    gradients = []
    for explicit in (True, False):
        model.zero_grad(set_to_none=True)
        data.explicit_gradient = explicit
        data.loss(model, torch.arange(16), create_graph=True).backward()
        gradients.append(model.input_layer.weight.grad.clone())
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-12, atol=1e-12)


def test_no_graph_without_grad_mode():
    model = cgnet("tanh", 3)
    features = model.features.standardized(random_chains(8, 10))
    with torch.no_grad():
        energy, gradient = model.energy_and_input_gradient(features)
    assert energy.grad_fn is None and gradient.grad_fn is None
    energy, gradient = model.energy_and_input_gradient(features)
    assert gradient.grad_fn is not None
    with pytest.raises(RuntimeError):  # differentiable once only: no silent wrong second derivatives
        (gradient_of_loss,) = torch.autograd.grad(gradient.square().sum(), model.input_layer.weight, create_graph=True)
        torch.autograd.grad(gradient_of_loss.sum(), model.input_layer.weight)


def test_tanh_via_the_sigmoid_is_tanh_up_to_rounding():
    tanh = DERIVATIVES["tanh"]
    for dtype, tolerance in ((torch.float32, 2.5e-7), (torch.float64, 1e-15)):
        values = torch.cat([torch.linspace(-12.0, 12.0, 200_001, dtype=dtype), torch.tensor([-1e4, 1e4, 0.0], dtype=dtype)])
        exact = torch.tanh(values.double())
        for function in (tanh.function, tanh.inplace_function):
            got = function(values.clone())
            assert float((got.double() - exact).abs().max()) <= tolerance
        assert tanh.function(values)[-3:].tolist() == [-1.0, 1.0, 0.0]
    assert torch.isnan(tanh.function(torch.tensor([float("nan")]))).all()


def test_fused_adam_equals_the_default_adam_in_float64():
    generator = torch.Generator().manual_seed(1)
    shapes = [(24, 17), (24,), (24, 24), (24,), (1, 24)]
    runs = []
    for fused in (False, True):
        parameters = [nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(index), dtype=torch.float64))
                      for index, shape in enumerate(shapes)]
        optimizer = adam_optimizer(parameters, 3e-3) if fused else torch.optim.Adam(parameters, lr=3e-3)
        assert optimizer.defaults["fused"] is (True if fused else None)
        generator.manual_seed(1)
        for _ in range(20):
            for parameter in parameters:
                parameter.grad = 10.0 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            optimizer.step()
        runs.append(parameters)
    for old, new in zip(*runs):
        torch.testing.assert_close(new, old, rtol=0, atol=1e-14)


@pytest.mark.parametrize("shape", [(160, 17), (17, 160), (1, 160), (160, 1), (64, 64)])
def test_largest_singular_value_is_exact(shape):
    matrix = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert largest_singular_value(matrix) == pytest.approx(float(torch.linalg.svdvals(matrix)[0]), rel=1e-12)
    assert largest_singular_value(matrix.float()) == pytest.approx(float(torch.linalg.svdvals(matrix)[0]), rel=1e-6)
