"""The OpenMM ``System`` of a CG model: bead masses and prior forces.

:func:`build_cg_system` makes a non-periodic ``openmm.System`` with one particle per bead of a
CG topology, explicit bead masses (a bead read from a PDB has no element, and a zero-mass
particle is frozen in OpenMM) and the prior terms as standard OpenMM forces. The export step
(``FlowMatchForceField.create_system``) adds the network's ``TorchForce`` to the same System.

All prior forces are left in force group 0, the OpenMM default, so that a plain
``getState(getEnergy=True)`` includes them; callers who want to decompose energies can move a
force with ``force.setForceGroup(group)`` after building the System (the prior forces carry
names ``PriorHarmonicBonds``, ``PriorHarmonicAngles``, ``PriorRepulsion``, ``PriorDihedrals``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["CGSystemError", "build_cg_system"]


class CGSystemError(ValueError):
    """A CG System cannot be built from the given topology, priors and masses."""



def _masses_in_amu(masses: Any) -> np.ndarray:
    if hasattr(masses, "value_in_unit"):
        import openmm.unit as unit

        masses = masses.value_in_unit(unit.dalton)
    elif isinstance(masses, (list, tuple)) and masses and hasattr(masses[0], "value_in_unit"):
        import openmm.unit as unit

        masses = [mass.value_in_unit(unit.dalton) for mass in masses]
    return np.asarray(masses, dtype=float).reshape(-1)


def build_cg_system(cg_topology: Any, priors: Any | None, masses: Sequence[float] | Any) -> Any:
    """Build a non-periodic CG ``openmm.System`` with bead masses and prior forces.

    Parameters
    ----------
    cg_topology
        ``openmm.app.Topology`` with one atom per bead (e.g. ``CGMapping.cg_topology()`` or
        ``openmm_flowmatch.topology.read_cg_topology``).
    priors
        ``openmm_flowmatch.priors.Priors`` (anything with ``to_openmm_forces()``), or ``None``
        for a System without forces.
    masses
        Bead masses in amu (``(n_beads,)``, plain numbers or ``openmm.unit`` quantities), e.g.
        ``CGMapping.masses``.

    Returns
    -------
    openmm.System

    Raises
    ------
    CGSystemError
        If the number of masses differs from the number of beads, a mass is not a positive
        finite number, or a prior force refers to a bead the topology does not have.
    """
    import openmm

    n_beads = cg_topology.getNumAtoms()
    masses = _masses_in_amu(masses)
    if masses.size != n_beads:
        raise CGSystemError(
            f"got {masses.size} masses for a CG topology of {n_beads} beads; pass one mass per bead "
            "(e.g. CGMapping.masses)"
        )
    bad = np.flatnonzero(~(np.isfinite(masses) & (masses > 0.0)))
    if bad.size:
        atom = list(cg_topology.atoms())[int(bad[0])]
        raise CGSystemError(
            f"bead {int(bad[0])} ({atom.name} of residue {atom.residue.name}{atom.residue.id}) has mass "
            f"{masses[bad[0]]} amu; every bead needs a positive mass (a zero-mass particle is frozen)"
        )
    system = openmm.System()
    for mass in masses:
        system.addParticle(float(mass))
    if priors is not None:
        for force in priors.to_openmm_forces():
            _check_force_particles(force, n_beads)
            force.setForceGroup(0)
            system.addForce(force)
    if system.usesPeriodicBoundaryConditions():  # pragma: no cover - the prior forces are non-periodic
        raise CGSystemError("the CG System must be non-periodic, but a prior force uses periodic boundaries")
    logger.debug("built a CG System of %d beads with %d forces", n_beads, system.getNumForces())
    return system


def _check_force_particles(force: Any, n_beads: int) -> None:
    """Raise if a bonded OpenMM force refers to a particle index ≥ n_beads."""
    import openmm

    if isinstance(force, openmm.HarmonicBondForce):
        indices = [force.getBondParameters(i)[:2] for i in range(force.getNumBonds())]
    elif isinstance(force, openmm.HarmonicAngleForce):
        indices = [force.getAngleParameters(i)[:3] for i in range(force.getNumAngles())]
    elif isinstance(force, openmm.PeriodicTorsionForce):
        indices = [force.getTorsionParameters(i)[:4] for i in range(force.getNumTorsions())]
    elif isinstance(force, openmm.CustomBondForce):
        indices = [force.getBondParameters(i)[:2] for i in range(force.getNumBonds())]
    elif isinstance(force, openmm.CustomTorsionForce):
        indices = [force.getTorsionParameters(i)[:4] for i in range(force.getNumTorsions())]
    else:
        return
    for particles in indices:
        if max(particles, default=-1) >= n_beads:
            raise CGSystemError(
                f"{force.getName()} acts on beads {tuple(particles)} but the CG topology has {n_beads} beads; "
                "the priors were fitted for another mapping"
            )
