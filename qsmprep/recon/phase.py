"""Phase scaling and wrapping.

All phase inside qsmprep is in radians, wrapped to ``(-pi, pi]``, float32. Raw phase comes
either in radians (BIDS ``Units: rad``) or with an arbitrary scaling (``Units: arbitrary``,
e.g. int16 or 0..4095 vendor phase), which is rescaled min -> -pi, max -> +pi over the whole
(multi-echo) array. Non-finite input values are replaced by 0; :func:`finite_mask` tells which
voxels were finite so that callers can exclude them from the analysis mask.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np

LOGGER = logging.getLogger("qsmprep")

PhaseUnits = Literal["rad", "arbitrary"]

#: Accepted slack (rad) beyond +-pi for phase declared in radians (float rounding, 3.1416).
RAD_TOLERANCE = 1e-2

_TWO_PI = 2.0 * np.pi


def wrap(phase: np.ndarray | float) -> np.ndarray | float:
    """Wrap phase (rad) to ``(-pi, pi]``; keeps float32/float64 dtype of arrays."""
    array = np.asarray(phase)
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    two_pi = array.dtype.type(_TWO_PI)
    pi = array.dtype.type(np.pi)
    if array.ndim and array.size and array.min() > -pi and array.max() <= pi:
        return array.copy()  # already wrapped: two reductions instead of five full passes
    wrapped = array - two_pi * np.ceil((array - pi) / two_pi)
    # float rounding may leave values a hair outside the interval: fold them back.
    wrapped = np.where(wrapped <= -pi, wrapped + two_pi, wrapped)
    wrapped = np.where(wrapped > pi, wrapped - two_pi, wrapped)
    if np.ndim(phase) == 0 and not isinstance(phase, np.ndarray):
        return float(wrapped)
    return wrapped.astype(array.dtype, copy=False)


def finite_mask(*arrays: np.ndarray) -> np.ndarray:
    """Boolean 3D mask of voxels whose values are finite in every array.

    Arrays are 3D ``[x, y, z]`` or 4D ``[x, y, z, echo]`` on the same spatial grid; for 4D
    arrays a voxel must be finite in every echo.
    """
    if not arrays:
        raise ValueError("finite_mask needs at least one array.")
    result = None
    for array in arrays:
        array = np.asarray(array)
        if array.ndim < 3:
            raise ValueError(f"finite_mask expects 3D or 4D arrays, got shape {array.shape}.")
        finite = np.isfinite(array)
        if array.ndim > 3:
            finite = finite.reshape(array.shape[:3] + (-1,)).all(axis=-1)
        if result is None:
            result = finite
        elif finite.shape != result.shape:
            raise ValueError(
                f"finite_mask: spatial shapes differ ({finite.shape} vs {result.shape})."
            )
        else:
            result &= finite
    return result


def infer_units(phase: np.ndarray) -> PhaseUnits:
    """Guess the units of raw phase from its value range.

    ``"rad"`` when the finite values span more than pi and lie within ``[-pi, pi]`` (plus
    :data:`RAD_TOLERANCE`), else ``"arbitrary"``. Only a fallback for missing metadata.
    """
    values = np.asarray(phase, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("cannot infer phase units: no finite phase values.")
    low, high = float(values.min()), float(values.max())
    limit = np.pi + RAD_TOLERANCE
    if low >= -limit and high <= limit and high - low > np.pi:
        return "rad"
    return "arbitrary"


def to_radians(phase: np.ndarray, units: str) -> np.ndarray:
    """Convert raw phase to float32 radians wrapped to ``(-pi, pi]``.

    Parameters
    ----------
    phase
        Raw phase, any shape (3D or 4D ``[x, y, z, echo]``), any real dtype.
    units
        ``"rad"``: values must lie within ``[-pi, pi]`` (up to :data:`RAD_TOLERANCE`), else a
        ValueError suggests ``"arbitrary"``. ``"arbitrary"``: the global minimum of the finite
        values maps to -pi and the maximum to +pi (over the whole multi-echo array); after
        wrapping +pi and -pi are the same angle, as expected for vendor integer phase.

    NaN/Inf values are replaced by 0; use :func:`finite_mask` to exclude them.
    """
    key = str(units).strip().lower()
    values = np.asarray(phase)
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise ValueError(f"phase must be a real-valued array, got dtype {values.dtype}.")
    finite = np.isfinite(values)
    n_bad = int(finite.size - np.count_nonzero(finite))
    if n_bad:
        LOGGER.debug("to_radians: %d non-finite phase values set to 0.", n_bad)
    if not finite.any():
        raise ValueError("phase holds no finite values.")
    if key not in ("rad", "arbitrary"):
        raise ValueError(f"unknown phase units {units!r}; choose 'rad' or 'arbitrary'.")
    # float32 work in place: full-size 4D stacks are 10^8 values (float64 copies cost seconds)
    result = np.array(values, dtype=np.float32)
    if n_bad:
        result[~finite] = 0.0
        low, high = float(result[finite].min()), float(result[finite].max())
    else:
        low, high = float(result.min()), float(result.max())
    if key == "rad":
        limit = np.pi + RAD_TOLERANCE
        if low < -limit or high > limit:
            raise ValueError(
                f"phase declared in 'rad' spans [{low:.6g}, {high:.6g}], outside [-pi, pi]; "
                "if the phase has an arbitrary (vendor/integer) scaling use units='arbitrary' "
                "(BIDS 'Units': 'arbitrary') to rescale min/max to -pi/+pi."
            )
    else:
        if not high > low:
            raise ValueError(
                f"phase with arbitrary units is constant ({low:.6g}); cannot rescale to radians."
            )
        result -= np.float32(low)
        result *= np.float32(_TWO_PI / (high - low))
        result -= np.float32(np.pi)
    # every value now lies within RAD_TOLERANCE of [-pi, pi]: fold the edges into (-pi, pi]
    pi, two_pi = np.float32(np.pi), np.float32(_TWO_PI)
    result[result <= -pi] += two_pi
    result[result > pi] -= two_pi
    if n_bad:
        result[~finite] = 0.0
    return result
