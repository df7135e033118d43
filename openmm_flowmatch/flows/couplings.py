"""Spline coupling layers over mixed bounded / circular features.

The flow works on a feature vector ``u`` of internal coordinates in which each entry is either

- *bounded*: a bond length or angle rescaled to the interval ``[−1, 1]``, or
- *circular*: a dihedral in ``[−π, π)``.

A :class:`SplineCoupling` transforms the entries selected by a mask with rational-quadratic
splines (Durkan et al. 2019; :class:`zuko.transforms.MonotonicRQSTransform`) whose parameters an
MLP computes from the other entries. The conditioner sees circular entries as ``(cos φ, sin φ)``
so that it is continuous on the circle.

Circular entries use a *circular* spline: a conditioned rotation ``φ ↦ wrap(φ + s)`` followed by a
spline on ``[−π, π]`` that fixes both end points and has the same slope (1) at both ends, so the
map is a C¹ diffeomorphism of the circle (Rezende et al. 2020, "Normalizing flows on tori and
spheres"). The rotation removes the otherwise fixed point at ±π.

Direction: ``forward`` maps data features to base features (the normalizing direction, used for
density evaluation and training); ``inverse`` maps base to data (sampling). Both return the
log-absolute-determinant of the *forward* map's Jacobian at the data point, so that
``log q(u) = log p_base(z) + ladj`` in either case.

The conditioner uses SiLU activations: the flow's forces are gradients of ``log q``, and a
smooth activation keeps them smooth (ReLU would make them piecewise constant in the network's
part).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from zuko.transforms import MonotonicRQSTransform

__all__ = ["ConditionerMLP", "SplineCoupling", "wrap_to_circle"]


def wrap_to_circle(angle: Tensor) -> Tensor:
    """Wrap angles to ``[−π, π)``."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


class ConditionerMLP(nn.Sequential):
    """A plain MLP with SiLU activations whose last layer starts at zero (identity coupling).

    Parameters
    ----------
    in_features, out_features
        Input and output widths.
    hidden_features
        Width of the hidden layers.
    hidden_layers
        Number of hidden layers (≥ 1).
    """

    def __init__(self, in_features: int, out_features: int, hidden_features: int = 128, hidden_layers: int = 2):
        if hidden_layers < 1:
            raise ValueError(f"hidden_layers must be ≥ 1, got {hidden_layers}")
        modules: list[nn.Module] = [nn.Linear(in_features, hidden_features), nn.SiLU()]
        for _ in range(hidden_layers - 1):
            modules += [nn.Linear(hidden_features, hidden_features), nn.SiLU()]
        last = nn.Linear(hidden_features, out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        modules.append(last)
        super().__init__(*modules)


class SplineCoupling(nn.Module):
    """Coupling layer: RQ splines on the masked features, conditioned on the others.

    Parameters
    ----------
    transformed
        Boolean mask ``(D,)``: which features this layer transforms (at least one; at least one
        other feature must stay to condition on, unless ``D`` is 1).
    circular
        Boolean mask ``(D,)``: which features are angles on the circle ``[−π, π)``; the others
        are bounded in ``[−1, 1]``.
    bins
        Number of spline bins ``K``.
    hidden_features, hidden_layers
        Size of the conditioner MLP.
    slope
        Minimum slope of the splines (zuko's ``slope``), bounds the log-det from below.
    """

    def __init__(
        self,
        transformed: Tensor,
        circular: Tensor,
        bins: int = 8,
        hidden_features: int = 128,
        hidden_layers: int = 2,
        slope: float = 1e-3,
    ):
        super().__init__()
        transformed = torch.as_tensor(transformed, dtype=torch.bool)
        circular = torch.as_tensor(circular, dtype=torch.bool)
        if transformed.shape != circular.shape or transformed.ndim != 1:
            raise ValueError("transformed and circular must be boolean masks of the same length (D,)")
        if not transformed.any():
            raise ValueError("a coupling layer must transform at least one feature")
        if bins < 2:
            raise ValueError(f"bins must be ≥ 2, got {bins}")
        self.bins = bins
        self.slope = slope
        self.register_buffer("transformed", transformed, persistent=False)
        self.register_buffer("circular", circular, persistent=False)
        conditioning = ~transformed
        self.register_buffer("conditioning_index", torch.nonzero(conditioning & ~circular).flatten(), persistent=False)
        self.register_buffer(
            "conditioning_circular_index", torch.nonzero(conditioning & circular).flatten(), persistent=False
        )
        self.register_buffer("bounded_index", torch.nonzero(transformed & ~circular).flatten(), persistent=False)
        self.register_buffer("circular_index", torch.nonzero(transformed & circular).flatten(), persistent=False)
        in_features = len(self.conditioning_index) + 2 * len(self.conditioning_circular_index)
        self._constant_input = in_features == 0
        # per transformed feature: K widths, K heights, K−1 inner derivatives, 1 rotation (circular only)
        self.parameters_per_feature = 3 * bins
        out_features = self.parameters_per_feature * int(transformed.sum())
        self.conditioner = ConditionerMLP(max(in_features, 1), out_features, hidden_features, hidden_layers)

    def _conditioner_input(self, u: Tensor) -> Tensor:
        if self._constant_input:
            return torch.ones_like(u[:, :1])
        angles = u[:, self.conditioning_circular_index]
        return torch.cat([u[:, self.conditioning_index], torch.cos(angles), torch.sin(angles)], dim=-1)

    def _splines(self, u: Tensor) -> tuple[MonotonicRQSTransform | None, MonotonicRQSTransform | None, Tensor | None]:
        """Spline transforms for the bounded and the circular features, and the rotations."""
        params = self.conditioner(self._conditioner_input(u))
        params = params.view(u.shape[0], -1, self.parameters_per_feature)
        k = self.bins
        n_bounded = len(self.bounded_index)
        bounded_params, circular_params = params[:, :n_bounded], params[:, n_bounded:]
        bounded = circular = shift = None
        if n_bounded:
            p = bounded_params
            bounded = MonotonicRQSTransform(
                p[..., :k], p[..., k : 2 * k], p[..., 2 * k : 3 * k - 1], bound=1.0, slope=self.slope
            )
        if len(self.circular_index):
            p = circular_params
            circular = MonotonicRQSTransform(
                p[..., :k], p[..., k : 2 * k], p[..., 2 * k : 3 * k - 1], bound=math.pi, slope=self.slope
            )
            shift = p[..., 3 * k - 1]
        return bounded, circular, shift

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Data → base. Returns ``(z, ladj)`` with ``ladj`` of shape ``(B,)``."""
        bounded, circular, shift = self._splines(u)
        z = u.clone()
        ladj = torch.zeros_like(u[:, 0])
        if bounded is not None:
            values, jac = bounded.call_and_ladj(u[:, self.bounded_index])
            z[:, self.bounded_index] = values
            ladj = ladj + jac.sum(-1)
        if circular is not None:
            rotated = wrap_to_circle(u[:, self.circular_index] + shift)
            values, jac = circular.call_and_ladj(rotated)
            z[:, self.circular_index] = values
            ladj = ladj + jac.sum(-1)
        return z, ladj

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Base → data. Returns ``(u, ladj)`` with ``ladj`` of the forward map at ``u``, shape ``(B,)``."""
        # the conditioning features are untouched, so the splines computed from z are those of u
        bounded, circular, shift = self._splines(z)
        u = z.clone()
        ladj = torch.zeros_like(z[:, 0])
        if bounded is not None:
            values = bounded.inv(z[:, self.bounded_index])
            _, jac = bounded.call_and_ladj(values)
            u[:, self.bounded_index] = values
            ladj = ladj + jac.sum(-1)
        if circular is not None:
            rotated = circular.inv(z[:, self.circular_index])
            _, jac = circular.call_and_ladj(rotated)
            u[:, self.circular_index] = wrap_to_circle(rotated - shift)
            ladj = ladj + jac.sum(-1)
        return u, ladj
