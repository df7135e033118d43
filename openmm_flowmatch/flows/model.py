"""``CGFlow``: a normalizing flow over coarse-grained chain configurations.

Pipeline (density direction, Cartesian → base)::

    x (B, n, 3) nm
      └─ internal coordinates: bonds (n−1), angles (n−2), dihedrals (n−3)     + log|det|, internal.py
          └─ bonds, angles rescaled to [−1, 1] from the data range with a margin   − Σ log(half-width)
              └─ spline couplings (bounded RQS, circular RQS for dihedrals)      + Σ ladj, couplings.py
                  └─ base: truncated normal on [−1, 1] per bond/angle (mean and std fitted to
                     the data), uniform on [−π, π) per dihedral

so that ``log q(x)`` is an exact density over Cartesian coordinates with the 6 global degrees of
freedom held fixed (per unit volume of translations and rotations). Its gradient gives forces
``F = kT ∇ₓ log q(x)`` on the Cartesian beads that sum to zero and exert no torque.

The support of the bond/angle part is the interval fitted to the data (the data range widened by
``margin`` × range on each side, angles clipped to ``(0, π)``): frames outside it have
``log q = −inf``. Samples always lie inside it. Samples are returned in the canonical frame of
:func:`~openmm_flowmatch.flows.internal.internal_to_cartesian` (bead 0 at the origin, bead 1 on +x,
bead 2 in the xy-plane).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..units import kT as thermal_energy
from .couplings import SplineCoupling, wrap_to_circle
from .internal import (
    InternalCoordinateError,
    cartesian_to_internal,
    internal_coordinate_sizes,
    internal_to_cartesian,
    log_det_jacobian,
)

__all__ = ["FlowConfig", "CGFlow", "FlowFileError"]

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 1


class FlowFileError(ValueError):
    """Raised when a saved flow file cannot be read back."""


@dataclass
class FlowConfig:
    """Architecture of a :class:`CGFlow`.

    Attributes
    ----------
    n_beads
        Number of CG beads in the chain (≥ 3).
    n_blocks
        Number of coupling blocks. Each block has one coupling for the even dihedrals, one for the
        odd dihedrals (if any), one for the bonds and one for the angles, each conditioned on all
        other internal coordinates: 4 couplings per block for chains of ≥ 5 beads.
    bins
        Rational-quadratic spline bins per transformed coordinate.
    hidden_features, hidden_layers
        Width and depth of each coupling's conditioner MLP (SiLU).
    margin
        Bond and angle intervals are the data range widened by ``margin`` × range on each side.
    slope
        Minimum slope of the splines.
    """

    n_beads: int
    n_blocks: int = 4
    bins: int = 8
    hidden_features: int = 128
    hidden_layers: int = 2
    margin: float = 0.25
    slope: float = 1e-3

    def __post_init__(self) -> None:
        internal_coordinate_sizes(self.n_beads)
        if self.n_blocks < 1:
            raise ValueError(f"n_blocks must be ≥ 1, got {self.n_blocks}")
        if self.margin < 0:
            raise ValueError(f"margin must be ≥ 0, got {self.margin}")


def _coupling_masks(n_bonds: int, n_angles: int, n_dihedrals: int) -> list[Tensor]:
    """Masks of one coupling block over the features [bonds, angles, dihedrals]."""
    n_features = n_bonds + n_angles + n_dihedrals
    groups = []
    dihedral_index = torch.arange(n_bonds + n_angles, n_features)
    for part in (dihedral_index[0::2], dihedral_index[1::2]):
        if len(part):
            groups.append(part)
    groups.append(torch.arange(0, n_bonds))
    groups.append(torch.arange(n_bonds, n_bonds + n_angles))
    masks = []
    for index in groups:
        mask = torch.zeros(n_features, dtype=torch.bool)
        mask[index] = True
        masks.append(mask)
    return masks


def _as_positions(x: Any, reference: Tensor) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        x = torch.as_tensor(np.asarray(x))
    return x.to(device=reference.device, dtype=reference.dtype)


class CGFlow(nn.Module):
    """Normalizing flow over the internal coordinates of a CG chain, with a Cartesian density.

    Build it from data with :meth:`from_data` (which fits the intervals and base densities), or
    from a :class:`FlowConfig` and then call :meth:`fit_base`.

    Parameters
    ----------
    config
        Architecture; see :class:`FlowConfig`.
    """

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        n_bonds, n_angles, n_dihedrals = internal_coordinate_sizes(config.n_beads)
        self.n_bonds, self.n_angles, self.n_dihedrals = n_bonds, n_angles, n_dihedrals
        n_bounded = n_bonds + n_angles
        circular = torch.zeros(n_bounded + n_dihedrals, dtype=torch.bool)
        circular[n_bounded:] = True
        layers = []
        for _ in range(config.n_blocks):
            for mask in _coupling_masks(n_bonds, n_angles, n_dihedrals):
                layers.append(
                    SplineCoupling(
                        mask,
                        circular,
                        bins=config.bins,
                        hidden_features=config.hidden_features,
                        hidden_layers=config.hidden_layers,
                        slope=config.slope,
                    )
                )
        self.couplings = nn.ModuleList(layers)
        # fitted statistics (buffers: saved in the state_dict, moved with .to())
        self.register_buffer("center", torch.zeros(n_bounded))
        self.register_buffer("half_width", torch.ones(n_bounded))
        self.register_buffer("base_mean", torch.zeros(n_bounded))
        self.register_buffer("base_std", torch.ones(n_bounded) * 0.3)
        self.register_buffer("is_fitted", torch.tensor(False))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_data(cls, positions: Any, **config: Any) -> "CGFlow":
        """A flow whose intervals and base densities are fitted to ``positions``.

        Parameters
        ----------
        positions
            ``(frames, n_beads, 3)`` array or tensor in nm.
        **config
            Other :class:`FlowConfig` fields (``n_blocks``, ``bins``, ``hidden_features``, …).
        """
        positions = torch.as_tensor(np.asarray(positions), dtype=torch.float64)
        if positions.ndim != 3 or positions.shape[-1] != 3:
            raise InternalCoordinateError(
                f"positions must have shape (frames, beads, 3), got {tuple(positions.shape)}"
            )
        flow = cls(FlowConfig(n_beads=positions.shape[1], **config))
        flow.fit_base(positions)
        return flow

    @torch.no_grad()
    def fit_base(self, positions: Any) -> None:
        """Fit the bond/angle intervals and the truncated-normal base parameters to ``positions``.

        The interval of each bond/angle is ``[min − m·r, max + m·r]`` with ``r = max − min`` and
        ``m = config.margin`` (bonds kept > 0, angles inside ``(0, π)``); the base of each is a
        normal with the data's mean and standard deviation in the rescaled coordinate, truncated to
        ``[−1, 1]``.
        """
        positions = torch.as_tensor(np.asarray(positions), dtype=torch.float64)
        if positions.ndim != 3 or positions.shape[1] != self.config.n_beads or positions.shape[-1] != 3:
            raise InternalCoordinateError(
                f"positions must have shape (frames, {self.config.n_beads}, 3), got {tuple(positions.shape)}"
            )
        if positions.shape[0] < 2:
            raise InternalCoordinateError("fitting the flow's base needs at least 2 frames")
        bonds, angles, _ = cartesian_to_internal(positions)
        values = torch.cat([bonds, angles], dim=-1)
        low, high = values.min(0).values, values.max(0).values
        spread = (high - low).clamp_min(1e-6)
        low = low - self.config.margin * spread
        high = high + self.config.margin * spread
        low[: self.n_bonds] = low[: self.n_bonds].clamp_min(1e-6)
        low[self.n_bonds :] = low[self.n_bonds :].clamp_min(1e-6)
        high[self.n_bonds :] = high[self.n_bonds :].clamp_max(math.pi - 1e-6)
        center, half_width = (high + low) / 2, (high - low) / 2
        scaled = (values - center) / half_width
        dtype = self.center.dtype
        self.center.copy_(center.to(dtype))
        self.half_width.copy_(half_width.to(dtype))
        self.base_mean.copy_(scaled.mean(0).to(dtype))
        self.base_std.copy_(scaled.std(0).clamp_min(1e-3).to(dtype))
        self.is_fitted.fill_(True)

    # ------------------------------------------------------------------ feature maps
    def _features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian → flow features ``u`` and the log-Jacobian of that map (B,)."""
        bonds, angles, dihedrals = cartesian_to_internal(x)
        bounded = (torch.cat([bonds, angles], dim=-1) - self.center) / self.half_width
        u = torch.cat([bounded, wrap_to_circle(dihedrals)], dim=-1)
        ladj = log_det_jacobian(bonds, angles) - torch.log(self.half_width).sum()
        return u, ladj

    def _positions(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Flow features → Cartesian (canonical frame), and the log-Jacobian of the *forward* map."""
        n_bounded = self.n_bonds + self.n_angles
        bounded = u[:, :n_bounded] * self.half_width + self.center
        bonds, angles = bounded[:, : self.n_bonds], bounded[:, self.n_bonds :]
        dihedrals = u[:, n_bounded:]
        x = internal_to_cartesian(bonds, angles, dihedrals)
        ladj = log_det_jacobian(bonds, angles) - torch.log(self.half_width).sum()
        return x, ladj

    def _base_log_prob(self, z: Tensor) -> Tensor:
        n_bounded = self.n_bonds + self.n_angles
        bounded = z[:, :n_bounded]
        mean, std = self.base_mean, self.base_std
        standard = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(std))
        normalizer = standard.cdf((1 - mean) / std) - standard.cdf((-1 - mean) / std)
        log_density = (
            -0.5 * ((bounded - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi) - torch.log(normalizer)
        )
        inside = (bounded.abs() <= 1).all(-1)
        log_p = log_density.sum(-1) - self.n_dihedrals * math.log(2 * math.pi)
        return torch.where(inside, log_p, torch.full_like(log_p, -math.inf))

    def _base_sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        """Base samples, drawn in float64 on the CPU (exact inverse-CDF for the truncated normals)."""
        n_bounded = self.n_bonds + self.n_angles
        mean = self.base_mean.detach().cpu().double()
        std = self.base_std.detach().cpu().double()
        standard = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(std))
        low, high = standard.cdf((-1 - mean) / std), standard.cdf((1 - mean) / std)
        uniform = torch.rand(n, n_bounded, generator=generator, dtype=torch.float64)
        probability = (low + uniform * (high - low)).clamp(1e-300, 1 - 1e-16)
        bounded = (mean + std * torch.special.ndtri(probability)).clamp(-1.0, 1.0)
        dihedrals = (torch.rand(n, self.n_dihedrals, generator=generator, dtype=torch.float64) * 2 - 1) * math.pi
        z = torch.cat([bounded, dihedrals], dim=-1)
        return z.to(device=self.center.device, dtype=self.center.dtype)

    # ------------------------------------------------------------------ public API
    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of Cartesian configurations with the global frame fixed.

        Parameters
        ----------
        x
            ``(B, n_beads, 3)`` positions in nm.

        Returns
        -------
        torch.Tensor
            ``(B,)`` log q(x) in nats (density per nm^(3n−6)); ``−inf`` outside the bond/angle
            intervals.
        """
        x = _as_positions(x, self.center)
        self._check_input(x)
        u, ladj = self._features(x)
        for coupling in self.couplings:
            u, layer_ladj = coupling(u)
            ladj = ladj + layer_ladj
        return self._base_log_prob(u) + ladj

    def sample_with_log_prob(
        self, n: int, generator: torch.Generator | None = None, seed: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``n`` configurations and their log-density computed along the sampling path.

        Parameters
        ----------
        n
            Number of samples.
        generator, seed
            A CPU ``torch.Generator`` to draw from, or a seed for a fresh one (default: torch's
            global generator).

        Returns
        -------
        positions, log_prob
            ``(n, n_beads, 3)`` nm in the canonical frame, and ``(n,)`` log q.
        """
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        z = self._base_sample(int(n), generator)
        log_p = self._base_log_prob(z)
        u = z
        ladj = torch.zeros_like(log_p)
        for coupling in reversed(self.couplings):
            u, layer_ladj = coupling.inverse(u)
            ladj = ladj + layer_ladj
        x, feature_ladj = self._positions(u)
        return x, log_p + ladj + feature_ladj

    def sample(self, n: int, generator: torch.Generator | None = None, seed: int | None = None) -> Tensor:
        """Draw ``n`` configurations, ``(n, n_beads, 3)`` in nm (canonical frame), detached; see
        :meth:`sample_with_log_prob` (which keeps the autograd graph)."""
        with torch.no_grad():
            return self.sample_with_log_prob(n, generator=generator, seed=seed)[0]

    def forces(self, x: Any, temperature: Any) -> Tensor:
        """Flow forces ``F = kT ∇ₓ log q(x)`` in kJ/mol/nm.

        Parameters
        ----------
        x
            ``(B, n_beads, 3)`` positions in nm (tensor or array).
        temperature
            Temperature in K (or an ``openmm.unit`` quantity); kT from ``openmm_flowmatch.units``.

        Returns
        -------
        torch.Tensor
            ``(B, n_beads, 3)`` forces, detached, in the flow's dtype and device.
        """
        energy_scale = thermal_energy(temperature)
        x = _as_positions(x, self.center).detach().requires_grad_(True)
        with torch.enable_grad():
            log_q = self.log_prob(x)
            (gradient,) = torch.autograd.grad(log_q.sum(), x)
        return energy_scale * gradient

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the configuration and weights to ``path`` (``torch.save``, atomically).

        The file holds plain content only (tensors, dicts, numbers, strings) and its SHA-256
        checksum, so :meth:`load` reads it without unpickling code and refuses a corrupt copy.
        """
        from ..safe_files import save_plain

        content = {
            "format_version": _FORMAT_VERSION,
            "kind": "openmm_flowmatch.CGFlow",
            "config": dataclasses.asdict(self.config),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        return save_plain(content, path, FlowFileError)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "CGFlow":
        """Read a flow written by :meth:`save` (``torch.load(weights_only=True)``: nothing is executed).

        Raises
        ------
        FlowFileError
            If the file is missing, truncated or corrupt (checksum mismatch), holds pickled
            objects, or is not a saved ``CGFlow``.
        """
        from ..safe_files import load_plain

        path = Path(path)
        if not path.exists():
            raise FlowFileError(f"flow file {path} does not exist; train one with train_flow first")
        remedy = "re-run train-flow to regenerate it"
        payload = load_plain(path, what="flow file", remedy=remedy, error=FlowFileError, map_location=map_location)
        if payload.get("kind") != "openmm_flowmatch.CGFlow":
            raise FlowFileError(f"{path} is not a CGFlow file written by CGFlow.save")
        try:
            flow = cls(FlowConfig(**payload["config"]))
            state = payload["state_dict"]
            flow.to(state["center"].dtype)
            flow.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
            reason = " ".join(str(error).split())[:160]
            raise FlowFileError(f"{path}: the flow file is inconsistent ({reason}); {remedy}") from None
        return flow

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 3 or x.shape[1] != self.config.n_beads or x.shape[2] != 3:
            raise InternalCoordinateError(
                f"this flow models {self.config.n_beads} beads: positions must have shape "
                f"(frames, {self.config.n_beads}, 3), got {tuple(x.shape)}"
            )
        if not bool(self.is_fitted):
            raise InternalCoordinateError(
                "the flow's intervals and base are not fitted: build it with CGFlow.from_data or call fit_base"
            )
