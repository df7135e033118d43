"""Internal coordinates of a coarse-grained chain and the Jacobian of the change of variables.

A chain of ``n`` beads (in chain order ``0 … n−1``) has ``3n`` Cartesian coordinates. Six of them
are the global translation and rotation; the other ``3n − 6`` are described exactly by

- ``n − 1`` bond lengths ``b_i = |x_{i+1} − x_i|`` (nm),
- ``n − 2`` angles ``θ_i`` at bead ``i + 1`` between beads ``i, i+1, i+2`` (rad, in ``[0, π]``),
- ``n − 3`` signed dihedrals ``φ_i`` of beads ``i, i+1, i+2, i+3`` (rad, in ``[−π, π)``, IUPAC
  sign convention, the same as ``mdtraj.compute_dihedrals``).

Volume element
--------------
Placing bead 0 by the translation, bead 1 by ``b_0`` and a direction on the sphere, bead 2 by
``b_1``, ``θ_0`` and a rotation about bond 0, and every later bead ``k ≥ 3`` in spherical
coordinates relative to beads ``k−3 … k−1`` gives::

    d³ⁿx = d³t · dμ(R) · Π_{i=0}^{n−2} b_i² · Π_{j=0}^{n−3} sin θ_j · Π db Π dθ Π dφ

where ``dμ(R)`` is the rotation-group volume element (exactly ``d³ω`` in exponential coordinates
at the identity). A density ``q_ic`` over internal coordinates therefore gives the Cartesian density
(up to the fixed frame, i.e. per unit volume of translations and rotations)::

    log q(x) = log q_ic(z(x)) − 2 Σ_i log b_i − Σ_j log sin θ_j

which :func:`log_det_jacobian` returns as ``log|det ∂z/∂x|`` over the ``3n − 6`` internal
degrees of freedom. Forces ``kT ∇ₓ log q(x)`` built from it are translation and rotation
invariant (they sum to zero and exert no torque).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "InternalCoordinateError",
    "internal_coordinate_sizes",
    "bond_lengths",
    "bond_angles",
    "dihedral_angles",
    "cartesian_to_internal",
    "internal_to_cartesian",
    "log_det_jacobian",
    "wrap_angle",
]


class InternalCoordinateError(ValueError):
    """Raised when positions or internal coordinates have the wrong shape or too few beads."""


def internal_coordinate_sizes(n_beads: int) -> tuple[int, int, int]:
    """Numbers of bonds, angles and dihedrals of a chain of ``n_beads`` beads.

    Raises
    ------
    InternalCoordinateError
        If the chain has fewer than 3 beads (no internal angle: nothing to model).
    """
    if n_beads < 3:
        raise InternalCoordinateError(
            f"a CG chain needs at least 3 beads for internal coordinates, got {n_beads}; "
            "use a mapping with more beads"
        )
    return n_beads - 1, n_beads - 2, max(n_beads - 3, 0)


def _check_positions(positions: Tensor) -> None:
    if positions.ndim != 3 or positions.shape[-1] != 3:
        raise InternalCoordinateError(
            f"positions must have shape (frames, beads, 3), got {tuple(positions.shape)}"
        )
    internal_coordinate_sizes(positions.shape[1])


def bond_lengths(positions: Tensor) -> Tensor:
    """Bond lengths ``|x_{i+1} − x_i|``, shape ``(B, n−1)``, nm."""
    return torch.linalg.vector_norm(positions[:, 1:] - positions[:, :-1], dim=-1)


def bond_angles(positions: Tensor) -> Tensor:
    """Angles at beads ``1 … n−2`` (between beads ``i, i+1, i+2``), shape ``(B, n−2)``, rad.

    Computed with ``atan2(|u × v|, u · v)``, which is accurate near 0 and π.
    """
    u = positions[:, :-2] - positions[:, 1:-1]
    v = positions[:, 2:] - positions[:, 1:-1]
    cross = torch.linalg.vector_norm(torch.cross(u, v, dim=-1), dim=-1)
    dot = (u * v).sum(-1)
    return torch.atan2(cross, dot)


def dihedral_angles(positions: Tensor) -> Tensor:
    """Signed dihedrals of beads ``i … i+3``, shape ``(B, n−3)``, rad in ``[−π, π]``.

    IUPAC convention (the same as ``mdtraj.compute_dihedrals``): looking along bond ``i+1 → i+2``,
    the dihedral is positive when bead ``i+3`` is rotated clockwise from bead ``i``.
    """
    b1 = positions[:, 1:-2] - positions[:, :-3]
    b2 = positions[:, 2:-1] - positions[:, 1:-2]
    b3 = positions[:, 3:] - positions[:, 2:-1]
    n1 = torch.cross(b1, b2, dim=-1)
    n2 = torch.cross(b2, b3, dim=-1)
    b2_norm = torch.linalg.vector_norm(b2, dim=-1)
    x = (n1 * n2).sum(-1)
    y = b2_norm * (b1 * n2).sum(-1)
    return torch.atan2(y, x)


def cartesian_to_internal(positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Bonds, angles and dihedrals of CG chains.

    Parameters
    ----------
    positions
        ``(B, n, 3)`` bead positions in nm, beads in chain order.

    Returns
    -------
    bonds, angles, dihedrals
        ``(B, n−1)`` nm, ``(B, n−2)`` rad, ``(B, n−3)`` rad.
    """
    _check_positions(positions)
    return bond_lengths(positions), bond_angles(positions), dihedral_angles(positions)


def log_det_jacobian(bonds: Tensor, angles: Tensor) -> Tensor:
    """``log|det ∂(internal)/∂x|`` over the ``3n − 6`` internal degrees of freedom, shape ``(B,)``.

    Equals ``−2 Σ log b_i − Σ log sin θ_j`` (see the module docstring), so that
    ``log q(x) = log q_ic(z) + log_det_jacobian(bonds, angles)``.
    """
    return -2.0 * torch.log(bonds).sum(-1) - torch.log(torch.sin(angles)).sum(-1)


def _place_next(a: Tensor, b: Tensor, c: Tensor, bond: Tensor, angle: Tensor, dihedral: Tensor) -> Tensor:
    """Place bead ``d`` from ``a, b, c`` with ``|d − c| = bond``, angle(b, c, d), dihedral(a, b, c, d)."""
    bc = c - b
    bc = bc / torch.linalg.vector_norm(bc, dim=-1, keepdim=True)
    normal = torch.cross(b - a, bc, dim=-1)
    normal = normal / torch.linalg.vector_norm(normal, dim=-1, keepdim=True)
    m = torch.cross(normal, bc, dim=-1)
    along = -torch.cos(angle)
    perpendicular = torch.sin(angle)
    d_local = (
        along[..., None] * bc
        + (perpendicular * torch.cos(dihedral))[..., None] * m
        + (perpendicular * torch.sin(dihedral))[..., None] * normal
    )
    return c + bond[..., None] * d_local


def internal_to_cartesian(bonds: Tensor, angles: Tensor, dihedrals: Tensor) -> Tensor:
    """Chain positions from internal coordinates, in the canonical frame.

    The canonical frame puts bead 0 at the origin, bead 1 on the +x axis and bead 2 in the xy-plane
    with y > 0. It inverts :func:`cartesian_to_internal` up to that rigid motion.

    Parameters
    ----------
    bonds, angles, dihedrals
        ``(B, n−1)`` nm, ``(B, n−2)`` rad, ``(B, n−3)`` rad.

    Returns
    -------
    torch.Tensor
        ``(B, n, 3)`` positions in nm.
    """
    n_beads = bonds.shape[-1] + 1
    if angles.shape[-1] != n_beads - 2 or dihedrals.shape[-1] != max(n_beads - 3, 0):
        raise InternalCoordinateError(
            f"inconsistent internal coordinates: {bonds.shape[-1]} bonds, {angles.shape[-1]} angles, "
            f"{dihedrals.shape[-1]} dihedrals (need n−1, n−2, n−3 for n beads)"
        )
    internal_coordinate_sizes(n_beads)
    zeros = torch.zeros_like(bonds[:, 0])
    x0 = torch.stack([zeros, zeros, zeros], dim=-1)
    x1 = torch.stack([bonds[:, 0], zeros, zeros], dim=-1)
    # bead 2: angle θ_0 at bead 1 between beads 0 and 2
    x2 = torch.stack(
        [
            bonds[:, 0] - bonds[:, 1] * torch.cos(angles[:, 0]),
            bonds[:, 1] * torch.sin(angles[:, 0]),
            zeros,
        ],
        dim=-1,
    )
    beads = [x0, x1, x2]
    for k in range(3, n_beads):
        beads.append(
            _place_next(beads[k - 3], beads[k - 2], beads[k - 1], bonds[:, k - 1], angles[:, k - 2], dihedrals[:, k - 3])
        )
    return torch.stack(beads, dim=1)


def wrap_angle(angle: Tensor) -> Tensor:
    """Wrap angles to ``[−π, π)``."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi
