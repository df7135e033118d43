"""Unit conventions of the package.

Inside the package every number is a plain float in OpenMM's MD units: nm, ps, kJ/mol,
kJ/mol/nm, K and amu. ``openmm.unit`` quantities are accepted at the public boundary and
converted here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BOLTZMANN_KJ_PER_MOL_PER_K: float = 0.0083144626
"""Molar Boltzmann constant in kJ/mol/K (DESIGN.md: kT = 0.0083144626 · T)."""

KJ_PER_KCAL: float = 4.184
"""Kilojoules per thermochemical kilocalorie."""


def strip_unit(value: Any, unit: Any) -> Any:
    """Return ``value`` as a plain number (or array) expressed in ``unit``.

    Parameters
    ----------
    value
        A plain number/array (assumed to be in ``unit`` already) or an ``openmm.unit.Quantity``.
    unit
        The ``openmm.unit`` unit to express ``value`` in.

    Returns
    -------
    float or numpy.ndarray
        The value without units.

    Raises
    ------
    TypeError
        If ``value`` is a quantity whose unit is not compatible with ``unit``.
    """
    if hasattr(value, "value_in_unit"):
        if not value.unit.is_compatible(unit):
            raise TypeError(f"expected a quantity in units compatible with {unit}, got {value.unit}")
        value = value.value_in_unit(unit)
    if isinstance(value, (list, tuple)):
        return np.asarray(value, dtype=float)
    return value


def kelvin(temperature: Any) -> float:
    """Temperature as a float in kelvin (accepts a plain number or an ``openmm.unit`` quantity).

    Raises
    ------
    ValueError
        If the temperature is not positive.
    """
    import openmm.unit as u

    value = float(strip_unit(temperature, u.kelvin))
    if not value > 0.0:
        raise ValueError(f"temperature must be positive (in K), got {value}")
    return value


def kT(temperature: Any) -> float:
    """Thermal energy kT in kJ/mol at ``temperature`` (K or an ``openmm.unit`` quantity)."""
    return BOLTZMANN_KJ_PER_MOL_PER_K * kelvin(temperature)
