"""Explicit input gradient ∂U/∂φ of the CGNet MLP, with a hand-written backward pass.

The force-matching loss needs ∂U/∂φ and then its derivative with respect to the parameters.
Through autograd that is a double back-propagation (``autograd.grad(..., create_graph=True)``,
then ``loss.backward()``). Here the reverse pass of the MLP

    a_0 = W_0 φ + b_0,  h_0 = σ(a_0);   a_l = W_l h_{l−1} + b_l,  h_l = h_{l−1} + σ(a_l);
    U = w·h_L + c;
    g_L = w;  d_l = σ'(a_l) ⊙ g_l;  g_{l−1} = g_l + W_lᵀ d_l;  ∂U/∂φ = W_0ᵀ d_0

is written out with ordinary tensor operations, and :class:`ExplicitInputGradient` also writes
out its derivative with respect to φ and the parameters (it needs σ''), so training takes one
forward and one backward pass with the same matrix products autograd would do, without autograd's
bookkeeping for the second derivatives. :func:`force_matching_gradients` goes one step further
for the trainer: it computes the force-matching loss and its parameter gradients from the same
passes directly, with no autograd graph at all. :data:`DERIVATIVES` lists the activations for which this
is available (all of ``networks.ACTIVATIONS``); :meth:`CGNet.energy_and_input_gradient` falls back
to autograd for any other.

This module is training-only: the scripted and exported networks never use it.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "ActivationDerivatives", "DERIVATIVES", "ExplicitInputGradient", "explicit_input_gradient",
    "force_matching_gradients", "mlp_parameters",
]


class ActivationDerivatives(NamedTuple):
    """An activation σ with its first and second derivatives.

    ``first(a, σ(a))`` returns σ'(a); ``curvature(a, σ(a), g, d)``, with ``d`` = σ'(a) ⊙ g,
    returns ``c`` such that σ''(a) ⊙ g = ``curvature_factor`` · c, or ``None`` where σ'' = 0
    (the constant factor saves a pass over the array). Both return new tensors.
    """

    function: Callable[[Tensor], Tensor]
    first: Callable[[Optional[Tensor], Tensor], Tensor]
    curvature: Callable[[Optional[Tensor], Tensor, Optional[Tensor], Tensor], Optional[Tensor]]
    curvature_factor: float = 1.0
    needs_pre: bool = True
    """Whether ``first`` and ``curvature`` use ``a`` (else they get ``None``; saves memory)."""
    needs_upstream: bool = True
    """Whether ``curvature`` uses ``g`` (else it gets ``None``)."""
    inplace_function: Optional[Callable[[Tensor], Tensor]] = None
    """``function`` in place (the same values), used when ``a`` is not kept."""


def _tanh_via_sigmoid_(pre: Tensor) -> Tensor:
    """tanh(a) = 2 s(2a) − 1 (s the logistic sigmoid), in place of ``a``.

    The same function as ``torch.tanh``, evaluated differently: within 2e-7 of it in float32
    (``torch.tanh`` itself is within 3e-8 of the exact value), 4e-16 in float64, and on CPU about
    three times cheaper (``torch.tanh`` takes ~0.1 ms for a 256 × 160 batch, a tenth of a training
    step's matrix products). Saturates to ±1 without overflow.
    """
    # a + a and −1 + 2 s: no Python-number operands, which torch would wrap in tensors first
    minus_one = torch.full((), -1.0, dtype=pre.dtype, device=pre.device)
    return torch.add(minus_one, pre.add_(pre).sigmoid_(), alpha=2.0, out=pre)


def _tanh_via_sigmoid(pre: Tensor) -> Tensor:
    """:func:`_tanh_via_sigmoid_` on a copy."""
    return _tanh_via_sigmoid_(pre.clone())


def _tanh_first(pre: Tensor, value: Tensor) -> Tensor:
    """1 − tanh², as autograd's ``tanh_backward``."""
    return torch.addcmul(torch.ones((), dtype=value.dtype, device=value.device), value, value, value=-1.0)


def _tanh_curvature(pre: Tensor, value: Tensor, upstream: Tensor, scaled: Tensor) -> Tensor:
    """tanh'' ⊙ g = −2 tanh ⊙ (1 − tanh²) ⊙ g = −2 · (tanh ⊙ d)."""
    return value * scaled


def _silu_first(pre: Tensor, value: Tensor) -> Tensor:
    """silu'(a) = s (1 + a (1 − s)), s the logistic sigmoid."""
    sigmoid = torch.sigmoid(pre)
    return sigmoid * (1.0 + pre * (1.0 - sigmoid))


def _silu_curvature(pre: Tensor, value: Tensor, upstream: Tensor, scaled: Tensor) -> Tensor:
    """silu''(a) ⊙ g = s (1 − s) (2 + a (1 − 2 s)) ⊙ g."""
    sigmoid = torch.sigmoid(pre)
    return (sigmoid * (1.0 - sigmoid)).mul_(2.0 + pre * (1.0 - 2.0 * sigmoid)).mul_(upstream)


SOFTPLUS_THRESHOLD = 20.0
"""``nn.Softplus``'s default threshold, above which it is the identity."""


def _softplus_first(pre: Tensor, value: Tensor) -> Tensor:
    """softplus'(a) = s(a), 1 above the threshold."""
    return torch.where(pre > SOFTPLUS_THRESHOLD, torch.ones_like(pre), torch.sigmoid(pre))


def _softplus_curvature(pre: Tensor, value: Tensor, upstream: Tensor, scaled: Tensor) -> Tensor:
    """softplus''(a) ⊙ g = s (1 − s) ⊙ g, 0 above the threshold."""
    sigmoid = torch.sigmoid(pre)
    second = torch.where(pre > SOFTPLUS_THRESHOLD, torch.zeros_like(pre), sigmoid * (1.0 - sigmoid))
    return second.mul_(upstream)


def _relu_first(pre: Tensor, value: Tensor) -> Tensor:
    return (value > 0).to(value.dtype)


def _relu_curvature(pre: Tensor, value: Tensor, upstream: Tensor, scaled: Tensor) -> None:
    return None


DERIVATIVES: dict[str, ActivationDerivatives] = {
    "tanh": ActivationDerivatives(_tanh_via_sigmoid, _tanh_first, _tanh_curvature, -2.0, needs_pre=False,
                                  needs_upstream=False, inplace_function=_tanh_via_sigmoid_),
    "silu": ActivationDerivatives(F.silu, _silu_first, _silu_curvature),
    "softplus": ActivationDerivatives(F.softplus, _softplus_first, _softplus_curvature),
    "relu": ActivationDerivatives(F.relu, _relu_first, _relu_curvature),
}
"""Activations (keys of ``networks.ACTIVATIONS``, lower case) with explicit σ' and σ''; each
``function`` is the operation the ``nn`` module of that name applies (default arguments), except
tanh, evaluated as 2 s(2a) − 1 (:func:`_tanh_via_sigmoid_`, equal to ``torch.tanh`` up to float
rounding and much cheaper on CPU; ``torch.tanh`` and ``torch.tanh_`` in its place give
``torch.tanh``'s values)."""


class _Saved(NamedTuple):
    """Forward-pass intermediates of layer l, kept for the backward pass."""

    inputs: Tensor  # φ for the input layer, h_{l−1} for residual layers
    pre: Optional[Tensor]  # a_l (if the derivatives need it)
    value: Tensor  # σ(a_l)
    first: Tensor  # σ'(a_l)
    upstream: Optional[Tensor]  # g_l (if the curvature needs it)
    scaled: Tensor  # d_l = σ'(a_l) ⊙ g_l


class ExplicitInputGradient(torch.autograd.Function):
    """``(U, ∂U/∂φ)`` of the CGNet MLP, with an explicit backward pass to φ and all parameters.

    ``apply(derivatives, features, output_weight, output_bias, W_0, b_0, W_1, b_1, …)``: the input
    layer first, then the residual layers; ``features`` ``(batch, F)``. Returns the energies
    ``(batch,)`` and the input gradients ``(batch, F)``. Differentiable once (a loss on the
    gradients, as in force matching); the intermediates are kept on ``ctx`` (not through
    ``save_for_backward``, so saved-tensor hooks do not see them).
    """

    @staticmethod
    def forward(ctx, derivatives: ActivationDerivatives, features: Tensor, output_weight: Tensor,
                output_bias: Tensor, *layer_parameters: Tensor) -> tuple[Tensor, Tensor]:
        weights, biases = layer_parameters[0::2], layer_parameters[1::2]
        energy, gradient, layers, last_hidden = _forward_pass(derivatives, features, output_weight, output_bias,
                                                              weights, biases)
        ctx.set_materialize_grads(False)
        ctx.derivatives = derivatives
        ctx.layers = layers
        ctx.last_hidden = last_hidden
        ctx.save_for_backward(output_weight, *weights)
        return energy, gradient

    @staticmethod
    @once_differentiable
    def backward(ctx, energy_bar: Optional[Tensor], gradient_bar: Optional[Tensor]) -> tuple:
        output_weight, *weights = ctx.saved_tensors
        adjoints = _adjoints(ctx.derivatives, ctx.layers, weights, output_weight, ctx.last_hidden, energy_bar,
                             gradient_bar, features_needed=ctx.needs_input_grad[1])
        return (None, *adjoints)


def _forward_pass(derivatives: ActivationDerivatives, features: Tensor, output_weight: Tensor, output_bias: Tensor,
                  weights: Sequence[Tensor], biases: Sequence[Tensor]) -> tuple[Tensor, Tensor, List[_Saved], Tensor]:
    """Energies U and input gradients ∂U/∂φ (forward and reverse pass), with what the adjoints need:
    ``(energy, gradient, layers, last_hidden)``."""
    saved: List[dict] = []
    hidden = features
    for index, (weight, bias) in enumerate(zip(weights, biases)):
        pre: Optional[Tensor] = F.linear(hidden, weight, bias)
        if derivatives.needs_pre or derivatives.inplace_function is None:
            value = derivatives.function(pre)
        else:  # a_l is not needed: σ(a_l) in its place, while it is in the cache
            value, pre = derivatives.inplace_function(pre), None
        pre = pre if derivatives.needs_pre else None
        first = derivatives.first(pre, value)  # here, while σ(a_l) is in the cache
        saved.append({"inputs": hidden, "pre": pre, "value": value, "first": first})
        hidden = value if index == 0 else hidden + value
    energy = F.linear(hidden, output_weight, output_bias).squeeze(-1)
    gradient = output_weight.expand_as(hidden)
    for index in reversed(range(len(weights))):
        layer = saved[index]
        scaled = layer["first"] * gradient
        layer.update(upstream=gradient if derivatives.needs_upstream else None, scaled=scaled)
        gradient = scaled @ weights[index] if index == 0 else torch.addmm(gradient, scaled, weights[index])
    return energy, gradient, [_Saved(**layer) for layer in saved], hidden


def _adjoints(derivatives: ActivationDerivatives, layers: Sequence[_Saved], weights: Sequence[Tensor],
              output_weight: Tensor, last_hidden: Tensor, energy_bar: Optional[Tensor], gradient_bar: Optional[Tensor],
              features_needed: bool) -> tuple[Optional[Tensor], ...]:
    """∂L/∂(φ, w, c, W_0, b_0, W_1, b_1, …) from ∂L/∂U (``energy_bar``) and ∂L/∂(∂U/∂φ) (``gradient_bar``),
    either may be ``None``; ``None`` for an input on which L does not depend (and for φ unless
    ``features_needed``)."""
    n_layers = len(layers)
    weight_bars: List[Optional[Tensor]] = [None] * n_layers
    pre_bars: List[Optional[tuple[Tensor, Tensor]]] = [None] * n_layers
    output_weight_bar = output_bias_bar = None
    if gradient_bar is not None:
        upstream_bar = _reverse_pass_adjoint(derivatives, layers, weights, gradient_bar, weight_bars, pre_bars)
        output_weight_bar = upstream_bar.sum(0, keepdim=True)
    hidden_bar = None
    if energy_bar is not None:
        hidden_bar = energy_bar.unsqueeze(-1) * output_weight
        energy_weight_bar = energy_bar.unsqueeze(0) @ last_hidden
        output_weight_bar = energy_weight_bar if output_weight_bar is None else output_weight_bar + energy_weight_bar
        output_bias_bar = energy_bar.sum(0, keepdim=True)
    layer_bars: List[Optional[Tensor]] = []
    features_bar = None
    for index in reversed(range(n_layers)):
        pre_bar = _pre_activation_adjoint(layers[index], pre_bars[index], derivatives.curvature_factor, hidden_bar)
        weight_bar, bias_bar = _linear_parameter_adjoints(pre_bar, layers[index].inputs, weight_bars[index])
        layer_bars = [weight_bar, bias_bar] + layer_bars
        if pre_bar is None:
            continue
        if index > 0:  # hidden_bar is a tensor of this backward pass: accumulate in place
            hidden_bar = pre_bar @ weights[index] if hidden_bar is None else hidden_bar.addmm_(pre_bar, weights[index])
        elif features_needed:
            features_bar = pre_bar @ weights[0]
    return (features_bar, output_weight_bar, output_bias_bar, *layer_bars)


def _reverse_pass_adjoint(derivatives: ActivationDerivatives, layers: Sequence[_Saved], weights: Sequence[Tensor],
                          gradient_bar: Tensor, weight_bars: List[Optional[Tensor]],
                          pre_bars: List[Optional[tuple[Tensor, Tensor]]]) -> Tensor:
    """Back-propagate ``gradient_bar`` = ∂L/∂(∂U/∂φ) through the reverse pass, input layer first.

    Fills ``weight_bars`` with ∂L/∂W_l through g_{l−1} = g_l + W_lᵀ d_l, and ``pre_bars`` with
    ∂L/∂a_l through d_l = σ'(a_l) ⊙ g_l, i.e. σ''(a_l) ⊙ g_l ⊙ ∂L/∂d_l (``None`` where σ'' = 0);
    returns ∂L/∂g_L.
    """
    upstream_bar = gradient_bar  # ∂L/∂(W_lᵀ d_l): of ∂U/∂φ for the input layer, then of g_{l−1}
    for index, layer in enumerate(layers):
        scaled_bar = upstream_bar @ weights[index].t()
        weight_bars[index] = layer.scaled.t() @ upstream_bar
        curvature = derivatives.curvature(layer.pre, layer.value, layer.upstream, layer.scaled)
        if curvature is not None:
            pre_bars[index] = (curvature, scaled_bar)
        if index == 0:  # from here on upstream_bar is a tensor of this backward pass: update in place
            upstream_bar = layer.first * scaled_bar
        else:
            upstream_bar = upstream_bar.addcmul_(layer.first, scaled_bar)
    return upstream_bar


def _pre_activation_adjoint(layer: _Saved, reverse_part: Optional[tuple[Tensor, Tensor]], factor: float,
                            hidden_bar: Optional[Tensor]) -> Optional[Tensor]:
    """∂L/∂a_l = factor · c ⊙ ∂L/∂d_l + σ'(a_l) ⊙ ∂L/∂h_l, ``reverse_part`` = (c, ∂L/∂d_l)
    (either term may be absent)."""
    if hidden_bar is None:
        return None if reverse_part is None else reverse_part[0].mul_(reverse_part[1]).mul_(factor)
    direct = layer.first * hidden_bar
    return direct if reverse_part is None else direct.addcmul_(*reverse_part, value=factor)


def _linear_parameter_adjoints(pre_bar: Optional[Tensor], inputs: Tensor,
                               weight_bar: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(∂L/∂W, ∂L/∂b)`` of a_l = W x + b, adding the reverse-pass part ``weight_bar`` to ∂L/∂W.

    Where L depends on the layer through the reverse pass only and σ'' = 0 (ReLU), ∂L/∂b is a
    zero tensor, as autograd's double back-propagation gives it (so Adam treats b the same way).
    """
    if pre_bar is None:
        return weight_bar, None if weight_bar is None else weight_bar.new_zeros(weight_bar.shape[0])
    if weight_bar is None:
        weight_bar = pre_bar.t() @ inputs
    else:
        weight_bar = weight_bar.addmm_(pre_bar.t(), inputs)
    return weight_bar, pre_bar.sum(0)


def explicit_input_gradient(derivatives: ActivationDerivatives, features: Tensor, output_layer: torch.nn.Linear,
                            layers: Sequence[torch.nn.Linear]) -> tuple[Tensor, Tensor]:
    """``(U, ∂U/∂φ)`` of the MLP given by its linear ``layers`` (input layer first) and ``output_layer``.

    Parameters
    ----------
    derivatives
        The activation and its derivatives, see :data:`DERIVATIVES`.
    features
        ``(batch, F)``.
    output_layer, layers
        The ``nn.Linear`` layers of :class:`~openmm_flowmatch.forcefield.networks.CGNet`.

    Returns
    -------
    tuple of Tensor
        Energies ``(batch,)`` and input gradients ``(batch, F)``, differentiable (once) with
        respect to ``features`` and all parameters when grad mode is on.
    """
    return ExplicitInputGradient.apply(derivatives, features, *mlp_parameters(output_layer, layers))


def mlp_parameters(output_layer: torch.nn.Linear, layers: Sequence[torch.nn.Linear]) -> List[Tensor]:
    """The parameters in the order of :func:`force_matching_gradients`' gradients: ``w, c, W_0, b_0, W_1, b_1, …``."""
    parameters = [output_layer.weight, output_layer.bias]
    for layer in layers:
        parameters += [layer.weight, layer.bias]
    return parameters


@torch.no_grad()
def force_matching_gradients(derivatives: ActivationDerivatives, features: Tensor, jacobian: Tensor, target: Tensor,
                             output_layer: torch.nn.Linear,
                             layers: Sequence[torch.nn.Linear]) -> tuple[Tensor, List[Optional[Tensor]]]:
    """The force-matching loss of the MLP and its gradient with respect to every parameter, without autograd.

    The forces are F = −Jᵀ ∂U/∂φ and the loss L = mean((F − target)²) over all components, as in
    training; ∂L/∂F = 2 (F − target) / n, ∂L/∂(∂U/∂φ) = −J ∂L/∂F, and the parameter gradients are
    the adjoints of :class:`ExplicitInputGradient`'s backward pass. The same numbers as
    ``loss.backward()`` through that class, up to float rounding, without building an autograd
    graph (which cost a training step 0.5–0.7 ms of its 6–7 ms on one CPU thread,
    benchmarks/results/training_speed.json).

    Parameters
    ----------
    derivatives
        The activation and its derivatives, see :data:`DERIVATIVES`.
    features, jacobian, target
        Standardised features ``(batch, F)``, their Jacobians ``(batch, F, D)`` and the target
        forces ``(batch, D)``.
    output_layer, layers
        The ``nn.Linear`` layers of :class:`~openmm_flowmatch.forcefield.networks.CGNet` (input layer first).

    Returns
    -------
    tuple
        The loss (0-d tensor) and the gradients in the order of :func:`mlp_parameters`; ``None``
        for the output bias, on which the forces do not depend.
    """
    weights = [layer.weight.detach() for layer in layers]
    biases = [layer.bias.detach() for layer in layers]
    output_weight = output_layer.weight.detach()
    _, gradient, saved, last_hidden = _forward_pass(derivatives, features, output_weight, output_layer.bias.detach(),
                                                    weights, biases)
    error = torch.bmm(gradient.unsqueeze(1), jacobian).squeeze(1).neg_().sub_(target)  # F − target
    loss = error.square().mean()
    error_bar = error.mul_(2.0 / error.numel())  # ∂L/∂F
    gradient_bar = torch.bmm(error_bar.unsqueeze(1), jacobian.transpose(1, 2)).squeeze(1).neg_()
    adjoints = _adjoints(derivatives, saved, weights, output_weight, last_hidden, None, gradient_bar,
                         features_needed=False)
    return loss, list(adjoints[1:])
