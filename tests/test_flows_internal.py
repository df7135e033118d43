"""Internal coordinates of CG chains: exact inverse, IUPAC dihedral sign, exact log-Jacobian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openmm_flowmatch.flows.internal import (
    InternalCoordinateError,
    cartesian_to_internal,
    internal_to_cartesian,
    log_det_jacobian,
    wrap_angle,
)


def random_internal(n_beads: int, batch: int, generator: torch.Generator):
    bonds = 0.1 + 0.4 * torch.rand(batch, n_beads - 1, generator=generator, dtype=torch.float64)
    angles = 0.4 + 2.3 * torch.rand(batch, n_beads - 2, generator=generator, dtype=torch.float64)
    dihedrals = (2 * torch.rand(batch, n_beads - 3, generator=generator, dtype=torch.float64) - 1) * math.pi
    return bonds, angles, dihedrals


def skew(omega: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=omega.dtype)
    return torch.stack(
        [
            torch.stack([zero, -omega[2], omega[1]]),
            torch.stack([omega[2], zero, -omega[0]]),
            torch.stack([-omega[1], omega[0], zero]),
        ]
    )


def random_rotation(generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


@pytest.mark.parametrize("n_beads", [3, 4, 5, 10])
def test_inverse_round_trip_to_1e_8(n_beads):
    generator = torch.Generator().manual_seed(n_beads)
    bonds, angles, dihedrals = random_internal(n_beads, 64, generator)
    positions = internal_to_cartesian(bonds, angles, dihedrals)
    # move the chains to a random frame: internal coordinates must not change
    rotation = random_rotation(generator)
    moved = positions @ rotation.T + torch.randn(1, 1, 3, generator=generator, dtype=torch.float64)
    b, a, d = cartesian_to_internal(moved)
    assert torch.allclose(b, bonds, atol=1e-8, rtol=0)
    assert torch.allclose(a, angles, atol=1e-8, rtol=0)
    assert torch.all(wrap_angle(d - dihedrals).abs() < 1e-8)
    # and Cartesian -> internal -> Cartesian gives back the chain up to the rigid motion
    rebuilt = internal_to_cartesian(b, a, d)
    aligned = (moved - moved[:, :1]) @ rotation
    assert torch.allclose(rebuilt, aligned, atol=1e-8, rtol=0)


def test_canonical_frame():
    generator = torch.Generator().manual_seed(1)
    positions = internal_to_cartesian(*random_internal(6, 8, generator))
    assert torch.all(positions[:, 0] == 0)
    assert torch.all(positions[:, 1, 1:] == 0) and torch.all(positions[:, 1, 0] > 0)
    assert torch.all(positions[:, 2, 2] == 0) and torch.all(positions[:, 2, 1] > 0)


def test_dihedral_sign_matches_mdtraj():
    mdtraj = pytest.importorskip("mdtraj")
    generator = torch.Generator().manual_seed(2)
    positions = torch.randn(16, 6, 3, generator=generator, dtype=torch.float64)
    topology = mdtraj.Topology()
    residue = topology.add_residue("GLY", topology.add_chain())
    for _ in range(6):
        topology.add_atom("CA", mdtraj.element.carbon, residue)
    trajectory = mdtraj.Trajectory(positions.numpy(), topology)
    quadruples = [[i, i + 1, i + 2, i + 3] for i in range(3)]
    triples = [[i, i + 1, i + 2] for i in range(4)]
    bonds, angles, dihedrals = cartesian_to_internal(positions)
    # mdtraj computes in float32
    assert np.allclose(mdtraj.compute_dihedrals(trajectory, quadruples), dihedrals.numpy(), atol=1e-5)
    assert np.allclose(mdtraj.compute_angles(trajectory, triples), angles.numpy(), atol=1e-5)


def test_dihedral_sign_iupac_example():
    # Viewed along bead 1 -> 2 (+y) with z up, x points right: the front bond (to bead 0) points to
    # 3 o'clock (+x), the back bond (to bead 3) to 12 o'clock (+z). Eclipsing the back bond turns the
    # front one counter-clockwise by 90 degrees, so the IUPAC dihedral is -90 degrees.
    positions = torch.tensor([[[1.0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 1, 1]]], dtype=torch.float64)
    _, _, dihedral = cartesian_to_internal(positions)
    assert math.isclose(float(dihedral[0, 0]), -math.pi / 2, abs_tol=1e-12)
    mirrored = positions * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    assert math.isclose(float(cartesian_to_internal(mirrored)[2][0, 0]), math.pi / 2, abs_tol=1e-12)


@pytest.mark.parametrize("n_beads", [3, 4, 5, 10])
def test_log_det_equals_autograd_jacobian(n_beads):
    """Full 3n x 3n Jacobian of (translation, rotation, internal) -> Cartesian, via autograd.

    With the rotation in exponential coordinates about the identity (Haar density 1 there),
    log|det ∂x/∂(t, ω, z)| = −log_det_jacobian(bonds, angles).
    """
    generator = torch.Generator().manual_seed(10 + n_beads)
    for _ in range(3):
        bonds, angles, dihedrals = random_internal(n_beads, 1, generator)
        z0 = torch.cat([bonds[0], angles[0], dihedrals[0]])
        frame = random_rotation(generator)

        def positions_of(parameters: torch.Tensor) -> torch.Tensor:
            translation, omega, z = parameters[:3], parameters[3:6], parameters[6:]
            b = z[: n_beads - 1][None]
            a = z[n_beads - 1 : 2 * n_beads - 3][None]
            d = z[2 * n_beads - 3 :][None]
            chain = internal_to_cartesian(b, a, d)[0]
            rotation = frame @ torch.linalg.matrix_exp(skew(omega))
            return (chain @ rotation.T + translation).reshape(-1)

        parameters = torch.cat([torch.randn(3, generator=generator, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), z0])
        jacobian = torch.autograd.functional.jacobian(positions_of, parameters)
        assert jacobian.shape == (3 * n_beads, 3 * n_beads)
        sign, log_abs_det = torch.linalg.slogdet(jacobian)
        expected = -log_det_jacobian(bonds, angles)[0]
        assert abs(float(log_abs_det - expected)) < 1e-9, (float(log_abs_det), float(expected))
        # and the analytic form: 2 Σ log b + Σ log sin θ
        assert math.isclose(
            float(expected), float(2 * torch.log(bonds).sum() + torch.log(torch.sin(angles)).sum()), rel_tol=1e-12
        )


@pytest.mark.parametrize("n_beads", [4, 5, 10])
def test_log_det_on_reduced_coordinates(n_beads):
    """Autograd Jacobian of internal → the 3n−6 free Cartesian coordinates of the canonical frame.

    In the canonical frame bead 1 has one free coordinate (x), bead 2 two (x, y), later beads three;
    that Jacobian is Π_{k≥3} b² sin θ · b_1 (polar coordinates of bead 2) · 1 (bead 1), i.e. the
    full volume element without the orientation part b_0² · b_1 sin θ_0.
    """
    generator = torch.Generator().manual_seed(20 + n_beads)
    bonds, angles, dihedrals = random_internal(n_beads, 1, generator)
    z0 = torch.cat([bonds[0], angles[0], dihedrals[0]])

    def reduced(z: torch.Tensor) -> torch.Tensor:
        chain = internal_to_cartesian(
            z[: n_beads - 1][None], z[n_beads - 1 : 2 * n_beads - 3][None], z[2 * n_beads - 3 :][None]
        )[0]
        return torch.cat([chain[1, :1], chain[2, :2], chain[3:].reshape(-1)])

    jacobian = torch.autograd.functional.jacobian(reduced, z0)
    assert jacobian.shape == (3 * n_beads - 6, 3 * n_beads - 6)
    _, log_abs_det = torch.linalg.slogdet(jacobian)
    orientation = 2 * torch.log(bonds[0, 0]) + torch.log(bonds[0, 1]) + torch.log(torch.sin(angles[0, 0]))
    expected = -log_det_jacobian(bonds, angles)[0] - orientation
    assert abs(float(log_abs_det - expected)) < 1e-9


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(InternalCoordinateError, match="at least 3 beads"):
        cartesian_to_internal(torch.zeros(2, 2, 3))
    with pytest.raises(InternalCoordinateError, match=r"\(frames, beads, 3\)"):
        cartesian_to_internal(torch.zeros(4, 3))
    with pytest.raises(InternalCoordinateError, match="inconsistent"):
        internal_to_cartesian(torch.ones(1, 4), torch.ones(1, 2), torch.ones(1, 2))
