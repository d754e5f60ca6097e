"""Multi-echo total field estimation (phase combination), METHODS.md section 1.

Signal model of echo ``n`` at echo time ``t_n`` (s): ``S_n = |S_n| exp(i (p0 + p1 t_n))`` with
the phase offset ``p0`` (rad, receiver/transmit phase) and the angular frequency ``p1``
(rad/s) of the total field. Sign convention: with ``phase_sign=+1`` (default) the phase grows
as ``+2 pi f TE`` and the returned field is ``f = p1 / (2 pi)`` Hz; ``phase_sign=-1`` (the
opposite precession/handedness convention of some vendors) returns ``-p1 / (2 pi)``. A wrong
sign flips the susceptibility, so check veins/globus pallidus are paramagnetic (positive).

Methods of :func:`estimate`:

``nlfit`` (default)
    Voxel-wise weighted Gauss-Newton fit of the complex signal (weights ``|S_n|^2``,
    arbitrary echo times, :func:`nonlinear_fit`), the frequency wrapped with period
    ``2 pi / dTE`` (``dTE = TE2 - TE1``) and one spatial unwrap of ``p1 dTE``. The unwrap
    picks the alias branch per voxel; with non-uniform echo spacing (where aliases are not
    exact optima) the fit is re-run from that branch. A continuous unwrapper (Laplacian)
    adds its smooth non-integer remainder, so the field is then exact up to a harmonic
    function.
    With ``unwrap_method="romeo"`` the spatial unwrap of ``p1 dTE`` adds ROMEO's
    phase-gradient coherence with the raw first echo (scaled by ``dTE / TE1``).
``linear``
    MCPC-3D-S phase-offset removal (:func:`mcpc3ds_offset`), spatial unwrapping of the first
    echo, temporal unwrapping of the later echoes (:func:`temporal_unwrap`, re-exported from
    :mod:`qsmprep.recon.unwrap`: each echo predicted from a fit through the origin of the
    earlier ones, so all echoes agree), and a weighted least-squares fit through the origin
    (:func:`linear_fit`). With ``unwrap_method`` ``"region_growing"`` or ``"romeo"`` this is
    ROMEO (:func:`qsmprep.recon.unwrap.romeo`): the first echo is unwrapped with the
    multi-echo weights (phase-gradient coherence with echo 2) and each mask component takes
    the global 2 pi multiple that makes all echoes consistent in time (ties, as for echo
    times at integer multiples of TE1, go to the branch with mean closest to 0).

Remaining ambiguity: each connected mask component is unwrapped up to one global multiple of
``2 pi / dTE`` in frequency; the branch whose mean field is closest to 0 Hz is taken (the
scanner is tuned on resonance for the imaged volume).

Noise maps: ``sqrt((A^T W A)^-1)_22`` (the frequency's standard error for unit noise) scaled
by the local noise level ``sigma^2`` of the complex data, estimated from the fit residuals
(``chi^2 / dof``, Gaussian-smoothed within the mask over a few voxels for a stable,
calibrated estimate) or, without residual degrees of freedom (one or two echoes), from the
spatial second differences of the frequency map (robust median, assumes a smooth field).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal, Sequence

import numpy as np
from scipy import ndimage

from . import unwrap as unwrap_module
from .dipole import check_voxel_size
from .phase import finite_mask, wrap
from .unwrap import temporal_unwrap  # public re-export

LOGGER = logging.getLogger("qsmprep")

FieldMethod = Literal["nlfit", "linear"]

#: Echo-combination methods of :func:`estimate`.
METHODS = ("nlfit", "linear")

#: Gaussian sigma (voxels) used to pool residual-based noise variances.
NOISE_SMOOTHING_VOXELS = 2.0

#: Median of the chi-square distribution with one degree of freedom.
_CHI2_1_MEDIAN = 0.454936423119572

_TWO_PI = 2.0 * np.pi


@dataclasses.dataclass
class FieldEstimate:
    """Result of :func:`estimate`.

    Attributes
    ----------
    field_hz
        Unwrapped total field (Hz), float32 ``[x, y, z]``, 0 outside the mask; sign per
        ``phase_sign``.
    noise_hz
        Standard deviation of the field estimate (Hz), float32, finite inside the mask, 0
        outside.
    phase_offset
        Phase at TE = 0, ``p0`` (rad, wrapped), float32, 0 outside the mask.
    unwrapped_phase
        Per-echo phase ``[x, y, z, echo]`` (rad) consistent with the field: the input phase
        plus exact multiples of 2 pi, ``phi_n + 2 pi round((p0 + p1 t_n - phi_n) / 2 pi)``
        inside the mask, the input phase outside.
    echo_times
        Echo times (s).
    method, unwrap_method, phase_sign
        How the estimate was made (for sidecars).
    """

    field_hz: np.ndarray
    noise_hz: np.ndarray
    phase_offset: np.ndarray
    unwrapped_phase: np.ndarray
    echo_times: np.ndarray
    method: str = "nlfit"
    unwrap_method: str = "region_growing"
    phase_sign: int = 1


# ---------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------


def _as_4d(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(f"{name} must be 3D or 4D [x, y, z, echo], got shape {array.shape}.")
    return array


def _check_echo_times(echo_times: Sequence[float], n_echoes: int) -> np.ndarray:
    times = np.asarray(echo_times, dtype=np.float64).ravel()
    if times.size != n_echoes:
        raise ValueError(f"{times.size} echo times given for {n_echoes} echoes.")
    if not np.all(np.isfinite(times)) or np.any(times <= 0):
        raise ValueError(f"echo times must be positive and finite (s), got {times.tolist()}.")
    if np.any(times >= 1.0):
        raise ValueError(
            f"echo times must be in seconds; {times.tolist()} look like milliseconds."
        )
    if np.any(np.diff(times) <= 0):
        raise ValueError(
            f"echo times must be strictly increasing, got {times.tolist()}; sort the echoes "
            "by EchoTime."
        )
    return times


def _check_data(
    magnitude: np.ndarray, phase: np.ndarray, echo_times: Sequence[float], mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    magnitude = _as_4d(magnitude, "magnitude")
    phase = _as_4d(phase, "phase")
    if magnitude.shape != phase.shape:
        raise ValueError(f"magnitude {magnitude.shape} and phase {phase.shape} differ in shape.")
    mask = np.asarray(mask)
    if mask.shape != phase.shape[:3]:
        raise ValueError(f"mask shape {mask.shape} does not match the data {phase.shape[:3]}.")
    times = _check_echo_times(echo_times, phase.shape[3])
    finite = finite_mask(magnitude, phase)
    mask = mask.astype(bool) & finite
    magnitude = magnitude.astype(np.float32, copy=False)
    phase = phase.astype(np.float32, copy=False)
    if not finite.all():  # full-size 4D passes cost seconds: only when needed
        magnitude, phase = np.nan_to_num(magnitude), np.nan_to_num(phase)
    if magnitude.min() < 0:
        magnitude = np.abs(magnitude)
    return magnitude, phase, times, mask


def _check_voxel_size(voxel_size: Sequence[float]) -> tuple[float, float, float]:
    return tuple(float(v) for v in check_voxel_size(voxel_size))


# ---------------------------------------------------------------------------------------
# noise helpers
# ---------------------------------------------------------------------------------------


def _smooth_in_mask(values: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian normalized convolution of ``values`` (3D) within ``mask``."""
    data = np.where(mask, values, 0).astype(np.float32)
    weight = mask.astype(np.float32)
    smooth = ndimage.gaussian_filter(data, sigma, mode="constant", truncate=3.0)
    norm = ndimage.gaussian_filter(weight, sigma, mode="constant", truncate=3.0)
    return np.where(mask, smooth / np.maximum(norm, 1e-6), 0).astype(np.float32)


def _sigma2_from_residuals(chi2: np.ndarray, dof: int, mask: np.ndarray) -> np.ndarray:
    """Local complex-noise variance (3D, in magnitude units^2) from per-voxel residuals."""
    local = np.zeros(mask.shape, dtype=np.float32)
    local[mask] = chi2 / dof
    return _smooth_in_mask(local, mask, NOISE_SMOOTHING_VOXELS)


def _sigma2_from_smoothness(
    frequency: np.ndarray, variance_unit: np.ndarray, mask: np.ndarray, period: float | None
) -> float:
    """Global noise variance from spatial second differences of a smooth frequency map.

    ``var(f_h - 2 f_i + f_j) = sigma^2 (c_h + 4 c_i + c_j)`` with ``c`` the unit-noise
    variance of each voxel's frequency; the median ratio over the mask, divided by the median
    of chi^2(1), estimates sigma^2. ``period`` (rad/s): differences are wrapped to it.
    """
    ratios = []
    for axis in range(3):
        if mask.shape[axis] < 3:
            continue
        lo = [slice(None)] * 3
        mid = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], mid[axis], hi[axis] = slice(0, -2), slice(1, -1), slice(2, None)
        lo, mid, hi = tuple(lo), tuple(mid), tuple(hi)
        valid = mask[lo] & mask[mid] & mask[hi]
        if not valid.any():
            continue
        second = frequency[lo][valid] - 2 * frequency[mid][valid] + frequency[hi][valid]
        if period is not None:
            second = second - period * np.round(second / period)
        denom = variance_unit[lo][valid] + 4 * variance_unit[mid][valid] + variance_unit[hi][valid]
        ratios.append(second.astype(np.float64) ** 2 / np.maximum(denom, 1e-30))
    if not ratios:
        return 0.0
    return float(np.median(np.concatenate(ratios)) / _CHI2_1_MEDIAN)


# ---------------------------------------------------------------------------------------
# nonlinear complex fit
# ---------------------------------------------------------------------------------------


def _normal_inverse(w: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries (11, 12, 22) of ``(A^T W A)^-1`` for ``A = [1, t]`` per voxel (float64)."""
    s0 = w.sum(axis=1, dtype=np.float64)
    s1 = np.einsum("ve,e->v", w, t)
    s2 = np.einsum("ve,e->v", w, t * t)
    det = s0 * s2 - s1 * s1
    det = np.maximum(det, 1e-30 * np.maximum(s0 * s2, 1e-300))
    return s2 / det, -s1 / det, s0 / det


def _offset_given_frequency(
    phase: np.ndarray, w: np.ndarray, t: np.ndarray, p1: np.ndarray
) -> np.ndarray:
    """Closed-form p0 (rad) for fixed p1: the angle of ``sum_n w_n exp(i(phi_n - p1 t_n))``."""
    residual = phase - p1[:, None] * t[None, :].astype(np.float32)
    return np.arctan2((w * np.sin(residual)).sum(1), (w * np.cos(residual)).sum(1)).astype(
        np.float32
    )


def _gauss_newton(
    phase: np.ndarray,
    w: np.ndarray,
    t: np.ndarray,
    p0: np.ndarray,
    p1: np.ndarray,
    inverse: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    max_iter: int,
    tol: float,
    p1_floor: float,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Weighted Gauss-Newton on ``sum_n w_n |exp(i phi_n) - exp(i(p0 + p1 t_n))|^2``.

    The Jacobian of the complex residual has constant modulus, so the normal matrix is
    ``A^T W A`` (fixed per voxel) and the step is ``(A^T W A)^-1 A^T W sin(phi - p0 - p1 t)``.
    Voxels stop individually when ``|dp1| < tol * max(|p1|, p1_floor)``.
    """
    inv11, inv12, inv22 = (x.astype(np.float32) for x in inverse)
    t32 = t.astype(np.float32)
    p0 = p0.astype(np.float32).copy()
    p1 = p1.astype(np.float32).copy()
    active = np.arange(p1.size)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        if active.size == 0:
            iterations -= 1
            break
        ph = phase[active]
        wa = w[active]
        a0 = p0[active]
        a1 = p1[active]
        residual = np.sin(ph - a0[:, None] - a1[:, None] * t32[None, :])
        residual *= wa
        b0 = residual.sum(axis=1)
        b1 = np.einsum("ve,e->v", residual, t32)
        d0 = inv11[active] * b0 + inv12[active] * b1
        d1 = inv12[active] * b0 + inv22[active] * b1
        p0[active] = a0 + d0
        p1[active] = a1 + d1
        done = np.abs(d1) < tol * np.maximum(np.abs(a1 + d1), p1_floor)
        active = active[~done]
    return p0, p1, iterations


def nonlinear_fit(
    magnitude: np.ndarray,
    phase: np.ndarray,
    echo_times: Sequence[float],
    mask: np.ndarray,
    *,
    max_iter: int = 30,
    tol: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted nonlinear complex fit of ``p0 + p1 t`` to multi-echo phase.

    Parameters
    ----------
    magnitude, phase
        4D ``[x, y, z, echo]`` magnitude (any units) and phase (rad).
    echo_times
        Echo times (s), strictly increasing; need not be uniformly spaced.
    mask
        Voxels to fit (non-finite voxels are dropped).
    max_iter, tol
        Gauss-Newton limits: stop a voxel when ``|dp1| < tol |p1|``.

    Returns
    -------
    frequency_rad_s, phase_offset_rad, noise_rad_s
        ``p1`` (rad/s) wrapped to ``(-pi/dTE, pi/dTE]`` with ``dTE = TE2 - TE1`` (ready for
        one spatial unwrap of ``p1 dTE``), ``p0`` (rad, re-fitted for the wrapped ``p1``),
        and the standard error of ``p1`` (rad/s), ``sqrt(sigma^2 (A^T W A)^-1_22)``; float32
        3D, 0 outside the mask. A single echo gives ``p1 = phi / TE`` and ``p0 = 0``.
    """
    magnitude, phase, times, mask = _check_data(magnitude, phase, echo_times, mask)
    return _nonlinear_fit(magnitude, phase, times, mask, max_iter=max_iter, tol=tol)


def _nonlinear_fit(
    magnitude: np.ndarray,
    phase: np.ndarray,
    times: np.ndarray,
    mask: np.ndarray,
    *,
    max_iter: int,
    tol: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`nonlinear_fit` on checked arrays."""
    if max_iter < 1 or not tol > 0:
        raise ValueError("max_iter must be >= 1 and tol > 0.")
    shape = mask.shape
    frequency = np.zeros(shape, dtype=np.float32)
    offset = np.zeros(shape, dtype=np.float32)
    noise = np.zeros(shape, dtype=np.float32)
    if not mask.any():
        return frequency, offset, noise
    mag = magnitude[mask]
    ph = wrap(phase[mask])
    w = mag * mag
    floor = np.float32(max(float(w.max()), 1e-30) * 1e-8)
    w = np.maximum(w, floor)
    n_echoes = times.size

    if n_echoes == 1:
        p1 = ph[:, 0] / np.float32(times[0])
        var_unit = 1.0 / (w[:, 0].astype(np.float64) * times[0] ** 2)
        frequency[mask] = p1
        var_map = np.zeros(shape, dtype=np.float32)
        var_map[mask] = var_unit
        sigma2 = _sigma2_from_smoothness(frequency, var_map, mask, _TWO_PI / times[0])
        noise[mask] = np.sqrt(sigma2 * var_unit)
        return frequency, offset, noise

    delta = times[1] - times[0]
    inverse = _normal_inverse(w, times)
    p1 = wrap(ph[:, 1] - ph[:, 0]) / np.float32(delta)
    p0 = _offset_given_frequency(ph, w, times, p1)
    p0, p1, iterations = _gauss_newton(
        ph, w, times, p0, p1, inverse, max_iter=max_iter, tol=tol, p1_floor=np.pi / delta
    )
    LOGGER.debug("nonlinear_fit: %d Gauss-Newton iterations", iterations)
    # Noise from the fitted optimum (before wrapping p1: with non-uniform echo spacing the
    # wrapped alias is not an optimum).
    noise[mask] = _fit_noise(ph, w, times, p0, p1, inverse[2], mask)
    p1 = (wrap(p1 * np.float32(delta)) / np.float32(delta)).astype(np.float32)
    p0 = _offset_given_frequency(ph, w, times, p1)
    frequency[mask] = p1
    offset[mask] = p0
    return frequency, offset, noise


def _fit_noise(
    ph: np.ndarray,
    w: np.ndarray,
    times: np.ndarray,
    p0: np.ndarray,
    p1: np.ndarray,
    var_unit: np.ndarray,
    mask: np.ndarray,
) -> np.ndarray:
    """Standard error of p1 (rad/s, voxel array): ``sqrt(sigma^2 (A^T W A)^-1_22)``.

    ``sigma^2`` from the weighted complex residual ``chi^2 / (N - 2)`` pooled locally, or with
    two echoes from the spatial smoothness of ``p1`` (no residual degrees of freedom).
    """
    n_echoes = times.size
    if n_echoes > 2:
        model = p0[:, None] + p1[:, None] * times[None, :].astype(np.float32)
        chi2 = (w * (2.0 - 2.0 * np.cos(ph - model))).sum(axis=1)
        sigma2 = _sigma2_from_residuals(chi2, n_echoes - 2, mask)[mask]
    else:
        frequency = np.zeros(mask.shape, dtype=np.float32)
        frequency[mask] = p1
        var_map = np.zeros(mask.shape, dtype=np.float32)
        var_map[mask] = var_unit
        delta = times[1] - times[0]
        sigma2 = _sigma2_from_smoothness(frequency, var_map, mask, _TWO_PI / delta)
    return np.sqrt(sigma2 * var_unit).astype(np.float32)


# ---------------------------------------------------------------------------------------
# MCPC-3D-S and the linear fit
# ---------------------------------------------------------------------------------------


def _center_components(unwrapped: np.ndarray, mask: np.ndarray, period: float,
                       components: tuple[np.ndarray, int] | None = None) -> np.ndarray:
    """Shift each 6-connected mask component by a multiple of ``period`` so its mean is
    closest to 0 (resolves the global ambiguity left by spatial unwrapping).
    ``components``: ``ndimage.label(mask)``, where the caller has it."""
    labels, n_labels = ndimage.label(mask) if components is None else components
    if n_labels == 0:
        return unwrapped
    flat = labels[mask]
    sums = np.bincount(flat, weights=unwrapped[mask].astype(np.float64), minlength=n_labels + 1)
    counts = np.bincount(flat, minlength=n_labels + 1)
    shifts = np.round(sums / np.maximum(counts, 1) / period) * period
    shifts[0] = 0.0
    result = unwrapped.copy()
    result[mask] -= shifts[flat].astype(unwrapped.dtype)
    return result


def grid_coordinates(shape: Sequence[int], voxel_size: Sequence[float]) -> list[np.ndarray]:
    """Per-axis voxel coordinates (dm, 0 at the grid centre) of the polynomial trends."""
    return [(np.arange(n) - (n - 1) / 2.0) * float(v) / 100.0 for n, v in zip(shape, voxel_size)]


def quadratic_terms(x, y, z) -> list:
    """The terms of a 2nd-order polynomial in ``x, y, z`` (arrays that broadcast), the
    constant first (as the scalar 1.0)."""
    return [1.0, x, y, z, x * x, y * y, z * z, x * y, x * z, y * z]


def _fit_samples(shape: Sequence[int]) -> tuple[slice, ...]:
    """Every other voxel along each axis longer than 8: the voxels a polynomial trend is
    fitted on (an eighth of the voxels is plenty)."""
    return tuple(slice(0, None, 2 if n > 8 else 1) for n in shape)


def _quadratic_design(coords, sub, inside: np.ndarray) -> np.ndarray:
    """Rows of the 2nd-order polynomial's terms at the sampled voxels ``inside`` (a boolean
    array over the ``sub`` sample of the grid with per-axis ``coords``)."""
    grids = np.meshgrid(*[c[s] for c, s in zip(coords, sub)], indexing="ij")
    return np.stack(np.broadcast_arrays(*quadratic_terms(*(g[inside] for g in grids))), 1)


def _quadratic_on_grid(coef: np.ndarray, coords, shape: Sequence[int]) -> np.ndarray:
    """The 2nd-order polynomial with coefficients ``coef`` on the whole grid (float32)."""
    trend = sum(cf * t for cf, t in zip(coef, quadratic_terms(*np.ix_(*coords))))
    return np.broadcast_to(trend, tuple(shape)).astype(np.float32)


def _polynomial_trend(values: np.ndarray, weight: np.ndarray, voxel_size) -> np.ndarray:
    """Weighted least-squares fit of a 2nd-order polynomial in x, y, z (mm) to ``values``."""
    coords = grid_coordinates(values.shape, voxel_size)
    sub = _fit_samples(values.shape)
    w_sub = weight[sub]
    inside = w_sub > 0
    if np.count_nonzero(inside) < 20:
        return np.zeros(values.shape, dtype=np.float32)
    design = _quadratic_design(coords, sub, inside)
    sw = np.sqrt(w_sub[inside].astype(np.float64))
    coef, *_ = np.linalg.lstsq(design * sw[:, None], values[sub][inside] * sw, rcond=None)
    return _quadratic_on_grid(coef, coords, values.shape)


#: components whose period multiple is chosen jointly (the largest by weight); smaller ones
#: continue the joint trend of those
ALIGNED_COMPONENTS = 64


def _align_components(unwrapped: np.ndarray, mask: np.ndarray, period: float,
                      voxel_size: Sequence[float], weight: np.ndarray,
                      components: tuple[np.ndarray, int] | None = None) -> np.ndarray:
    """Shift each 6-connected mask component by a multiple of ``period`` so that one smooth
    field, a 2nd-order polynomial fitted to all components jointly (``weight``: signal
    energy), runs through them, then the whole so its mean is closest to 0. An isolated part
    has no neighbour to unwrap against, and the field is smooth through air; fitted jointly,
    no one part's trend is extrapolated across a gap. The :data:`ALIGNED_COMPONENTS` largest
    components choose their multiples jointly; smaller ones take the multiple nearest the
    joint trend. ``components``: ``ndimage.label(mask)`` where the caller has it."""
    labels, n_labels = components = (ndimage.label(mask) if components is None
                                     else components)
    centred = _center_components(unwrapped, mask, period, components)
    if n_labels < 2:
        return centred
    sub = _fit_samples(mask.shape)
    sub_labels, sub_weight = labels[sub], weight[sub]
    inside = mask[sub] & (sub_weight > 0)
    mass = np.bincount(sub_labels[inside], weights=sub_weight[inside], minlength=n_labels + 1)
    mass[0] = 0.0
    largest = np.argsort(mass)[::-1][:ALIGNED_COMPONENTS]
    largest = largest[mass[largest] > 0]
    if largest.size == 0:  # no signal to fit a trend to
        return centred
    rank = np.full(n_labels + 1, -1)
    rank[largest] = np.arange(largest.size)
    inside &= rank[sub_labels] >= 0
    part = rank[sub_labels[inside]]
    coords = grid_coordinates(mask.shape, voxel_size)
    design = _quadratic_design(coords, sub, inside)
    sw = np.sqrt(sub_weight[inside].astype(np.float64))
    basis, singular, rows = np.linalg.svd(design * sw[:, None], full_matrices=False)
    keep = singular > 1e-9 * singular[0]
    basis, singular, rows = basis[:, keep], singular[keep], rows[keep]
    target = centred[sub][inside] * sw
    values = target - basis @ (basis.T @ target)  # off the joint trend
    # integer shifts k (periods) of the parts: minimise ||values + P (I - U U^T) A k||^2,
    # A the weighted part indicators; its Gram matrix and gradient need only part sums
    k = largest.size
    projected = np.stack([np.bincount(part, weights=column * sw, minlength=k)
                          for column in basis.T])
    gram = period**2 * (np.diag(np.bincount(part, weights=sw * sw, minlength=k))
                        - projected.T @ projected)
    gradient = period * np.bincount(part, weights=sw * values, minlength=k)
    shifts = np.zeros(k)
    tolerance = -1e-9 * max(float(values @ values), 1e-30)
    for _ in range(8 * k):  # coordinate descent from the per-part centring
        gains = np.concatenate([2 * gradient, -2 * gradient]) + np.tile(np.diag(gram), 2)
        best = int(np.argmin(gains))
        if gains[best] >= tolerance:
            break
        step = 1.0 if best < k else -1.0
        shifts[best % k] += step
        gradient += step * gram[:, best % k]
    per_label = np.zeros(n_labels + 1)
    per_label[largest] = period * shifts
    # the smaller components: the multiple nearest the joint trend through the larger ones
    fitted = basis.T @ (target + per_label[largest[part]] * sw)
    trend = _quadratic_on_grid(rows.T @ (fitted / singular), coords, mask.shape)[mask]
    flat = labels[mask]
    offset = np.bincount(flat, weights=centred[mask] - trend, minlength=n_labels + 1)
    nearest = -np.round(offset / np.maximum(np.bincount(flat, minlength=n_labels + 1), 1)
                        / period) * period
    per_label = np.where(rank >= 0, per_label, nearest)
    per_label[0] = 0.0
    shifted = centred.copy()
    shifted[mask] += per_label[flat].astype(centred.dtype)
    shifted[mask] -= np.float32(np.round(float(shifted[mask].mean()) / period) * period)
    return shifted


def _unwrap_aligned(
    wrapped: np.ndarray,
    mask: np.ndarray,
    *,
    method: str,
    magnitude: np.ndarray | None,
    voxel_size: Sequence[float],
    phase2: np.ndarray | None = None,
    te: Sequence[float] | None = None,
) -> np.ndarray:
    """Spatial unwrap (3D), each component shifted by whole turns so one smooth field runs
    through them all (:func:`_align_components`, weighted by ``magnitude`` squared); with
    ``method="romeo"`` and a second echo (``phase2``, ``te``) region growing uses the
    phase-gradient coherence."""
    if method == "romeo" and phase2 is not None:
        unwrapped = unwrap_module.region_growing(
            wrapped, mask, magnitude=magnitude, voxel_size=voxel_size, phase2=phase2, te=te
        )
    else:
        unwrapped = unwrap_module.unwrap(
            wrapped, mask, method=method, magnitude=magnitude, voxel_size=voxel_size
        )
    weight = np.ones(mask.shape, np.float32) if magnitude is None else np.square(magnitude)
    return _align_components(unwrapped, mask, _TWO_PI, voxel_size, weight)


def mcpc3ds_offset(
    magnitude: np.ndarray,
    phase: np.ndarray,
    echo_times: Sequence[float],
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    sigma_voxels: Sequence[float] = (10.0, 10.0, 5.0),
    unwrap_method: str = "region_growing",
    refine_iterations: int = 1,
) -> np.ndarray:
    """MCPC-3D-S phase offset (rad, float32 3D) from echoes 1 and 2 (Eckstein et al. 2018).

    ``phi0 = phi_1 - TE1 / dTE * unwrap(angle(S_2 conj(S_1)))``, smoothed as the complex
    field ``|S_1| exp(i phi0)`` with a Gaussian of ``sigma_voxels`` restricted to the mask.
    A one-sided window at the mask boundary biases a sloped offset towards the interior;
    ``refine_iterations`` residual passes (smooth ``exp(i(phi0 - smoothed))`` and add its
    angle: Tukey's "twicing") reduce that bias (about 2.5x for one pass) at a small cost in
    noise. 0 outside the mask. Needs at least two echoes.
    """
    magnitude, phase, times, mask = _check_data(magnitude, phase, echo_times, mask)
    voxel_size = _check_voxel_size(voxel_size)
    if times.size < 2:
        raise ValueError("MCPC-3D-S needs at least two echoes.")
    sigma = np.broadcast_to(np.asarray(sigma_voxels, dtype=float), (3,))
    if np.any(sigma < 0):
        raise ValueError(f"sigma_voxels must be >= 0, got {sigma_voxels!r}.")
    delta = times[1] - times[0]
    hip = wrap(phase[..., 1] - phase[..., 0])
    hip_unwrapped = _unwrap_aligned(
        hip, mask, method=unwrap_method, magnitude=magnitude[..., 0], voxel_size=voxel_size
    )
    offset = phase[..., 0] - np.float32(times[0] / delta) * hip_unwrapped
    if refine_iterations < 0:
        raise ValueError(f"refine_iterations must be >= 0, got {refine_iterations}.")
    weight = np.where(mask, magnitude[..., 0], 0).astype(np.float32)

    def smoothed_angle(angle: np.ndarray) -> np.ndarray:
        real = weight * np.cos(angle)
        imag = weight * np.sin(angle)
        if np.any(sigma > 0):
            real = ndimage.gaussian_filter(real, sigma, mode="constant", truncate=3.0)
            imag = ndimage.gaussian_filter(imag, sigma, mode="constant", truncate=3.0)
        return np.arctan2(imag, real).astype(np.float32)

    smooth = smoothed_angle(offset)
    if np.any(sigma > 0):
        for _ in range(refine_iterations):
            smooth = smooth + smoothed_angle(offset - smooth)
    return np.where(mask, wrap(smooth), 0).astype(np.float32)


def linear_fit(
    unwrapped_phase: np.ndarray,
    magnitude: np.ndarray,
    echo_times: Sequence[float],
    mask: np.ndarray,
    *,
    phase_offset: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares fit through the origin of temporally unwrapped phase.

    ``omega = sum_n w_n t_n phi_n / sum_n w_n t_n^2`` with ``w_n = |S_n|^2`` (the inverse
    phase-noise variance), after subtracting ``phase_offset`` (rad, e.g. from
    :func:`mcpc3ds_offset`) when given. Returns ``(omega_rad_s, noise_rad_s)`` float32 3D,
    0 outside the mask; the noise is ``sqrt(sigma^2 / sum_n w_n t_n^2)``.
    """
    phase = _as_4d(unwrapped_phase, "unwrapped_phase")
    magnitude, phase, times, mask = _check_data(magnitude, phase, echo_times, mask)
    shape = mask.shape
    omega = np.zeros(shape, dtype=np.float32)
    noise = np.zeros(shape, dtype=np.float32)
    if not mask.any():
        return omega, noise
    ph = phase[mask]
    if phase_offset is not None:
        phase_offset = np.asarray(phase_offset, dtype=np.float32)
        if phase_offset.shape != shape:
            raise ValueError(f"phase_offset shape {phase_offset.shape} does not match {shape}.")
        ph = ph - phase_offset[mask][:, None]
    mag = magnitude[mask]
    w = mag * mag
    w = np.maximum(w, np.float32(max(float(w.max()), 1e-30) * 1e-8))
    t32 = times.astype(np.float32)
    denom = np.einsum("ve,e->v", w, t32 * t32).astype(np.float64)
    fit = np.einsum("ve,e->v", w * ph, t32) / denom
    omega[mask] = fit
    var_unit = 1.0 / denom
    if times.size > 1:
        chi2 = (w * (ph - fit[:, None].astype(np.float32) * t32[None, :]) ** 2).sum(axis=1)
        sigma2 = _sigma2_from_residuals(chi2, times.size - 1, mask)[mask]
    else:
        var_map = np.zeros(shape, dtype=np.float32)
        var_map[mask] = var_unit
        sigma2 = _sigma2_from_smoothness(omega, var_map, mask, None)
    noise[mask] = np.sqrt(sigma2 * var_unit)
    return omega, noise


# ---------------------------------------------------------------------------------------
# the step: estimate
# ---------------------------------------------------------------------------------------


def _consistent_unwrapped_phase(
    phase: np.ndarray, mask: np.ndarray, p0: np.ndarray, p1: np.ndarray, times: np.ndarray
) -> np.ndarray:
    """``phi_n + 2 pi round((p0 + p1 t_n - phi_n) / 2 pi)`` in the mask, ``phi_n`` outside."""
    result = phase.copy()
    ph = phase[mask]
    model = p0[mask][:, None] + p1[mask][:, None] * times[None, :].astype(np.float32)
    turns = np.round((model - ph) / np.float32(_TWO_PI))
    result[mask] = ph + np.float32(_TWO_PI) * turns
    return result


def inconsistent_voxels(
    field_hz: np.ndarray, mask: np.ndarray, *, threshold_hz: float
) -> np.ndarray:
    """Voxels whose field disagrees with their 3x3x3 neighbourhood, and their neighbours.

    A voxel is flagged when it differs from the median of its neighbourhood (the field
    outside ``mask`` is extended from the nearest voxel inside) by more than
    ``threshold_hz``; a quarter of the alias period 1/dTE catches unwrapping slips and
    voxels next to strong sources (calcifications, air) whose field cannot be trusted.
    The flags are dilated by one voxel. Used to give such voxels no weight downstream.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    # work on the mask's bounding box + 1 voxel (the 3x3x3 median reaches no farther)
    extent = [np.flatnonzero(mask.any(axis=other)) for other in ((1, 2), (0, 2), (0, 1))]
    box = tuple(slice(max(int(idx[0]) - 1, 0), int(idx[-1]) + 2) for idx in extent)
    inside = mask[box]
    nearest = ndimage.distance_transform_edt(~inside, return_distances=False,
                                             return_indices=True)
    extended = np.asarray(field_hz)[box][tuple(nearest)]
    residual = np.abs(extended - ndimage.median_filter(extended, size=3))
    flags = np.zeros_like(mask)
    flags[box] = ndimage.binary_dilation(residual > threshold_hz, mask=inside) & inside
    return flags


def estimate(
    magnitude: np.ndarray,
    phase: np.ndarray,
    echo_times: Sequence[float],
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    method: str = "nlfit",
    unwrap_method: str = "region_growing",
    phase_sign: int = 1,
    max_iter: int = 30,
    tol: float = 1e-4,
) -> FieldEstimate:
    """Unwrapped total field (Hz) from multi-echo magnitude and phase.

    Parameters
    ----------
    magnitude, phase
        4D ``[x, y, z, echo]`` (3D for one echo); phase in rad.
    echo_times
        Echo times (s), strictly increasing.
    mask
        Region to fit and unwrap (voxels with non-finite data are dropped).
    voxel_size
        Voxel size (mm).
    method
        ``"nlfit"`` (nonlinear complex fit, then one spatial unwrap) or ``"linear"``
        (MCPC-3D-S, spatial + temporal unwrapping, weighted linear fit).
    unwrap_method
        Spatial unwrapper, a key of :data:`qsmprep.recon.unwrap.METHODS`. ``"laplacian"``
        gives a continuous field (off by a harmonic function inside the mask).
    phase_sign
        +1: phase = +2 pi f TE (default); -1 flips the sign of the returned field.
    max_iter, tol
        Gauss-Newton limits of the nonlinear fit.
    """
    if method not in METHODS:
        raise ValueError(f"unknown field estimation method {method!r}; choose one of {METHODS}.")
    if unwrap_method not in unwrap_module.METHODS:
        raise ValueError(
            f"unknown unwrapping method {unwrap_method!r}; choose one of "
            f"{sorted(unwrap_module.METHODS)}."
        )
    if phase_sign not in (1, -1):
        raise ValueError(f"phase_sign must be +1 or -1, got {phase_sign!r}.")
    voxel_size = _check_voxel_size(voxel_size)
    magnitude, phase, times, mask = _check_data(magnitude, phase, echo_times, mask)
    phase = wrap(phase)
    shape = mask.shape
    n_echoes = times.size
    exact = unwrap_method in unwrap_module.EXACT_METHODS
    unwrap_kwargs = dict(method=unwrap_method, magnitude=magnitude[..., 0], voxel_size=voxel_size)

    if n_echoes == 1 or method == "nlfit":
        p1, p0, noise = _nonlinear_fit(
            magnitude, phase, times, mask, max_iter=max_iter, tol=tol
        )
        delta = times[0] if n_echoes == 1 else times[1] - times[0]
        wrapped = (p1 * np.float32(delta)).astype(np.float32)
        # "romeo": the raw first echo supplies the phase-gradient coherence (its gradient is
        # that of p1 TE1 plus the smooth offset's).
        second = {"phase2": phase[..., 0], "te": (delta, times[0])} if n_echoes > 1 else {}
        unwrapped = _unwrap_aligned(wrapped, mask, **unwrap_kwargs, **second)
        # Split the spatial unwrap into whole turns (the alias branch) and, for continuous
        # unwrappers (Laplacian), a smooth remainder that is carried over unchanged.
        turns = np.round((unwrapped - wrapped) / np.float32(_TWO_PI))
        remainder = np.where(mask, unwrapped - wrapped - np.float32(_TWO_PI) * turns, 0)
        p0 = np.zeros(shape, dtype=np.float32)
        start = np.where(mask, (wrapped + np.float32(_TWO_PI) * turns) / np.float32(delta), 0)
        p1 = start.astype(np.float32)
        spacing = np.diff(times)
        uniform = n_echoes < 3 or np.ptp(spacing) <= 1e-6 * spacing.mean()
        if n_echoes > 1:
            ph = phase[mask]
            mag = magnitude[mask]
            w = np.maximum(mag * mag, np.float32(max(float((mag * mag).max()), 1e-30) * 1e-8))
            start0 = _offset_given_frequency(ph, w, times, p1[mask])
            if uniform:
                # The alias p1 + 2 pi k / dTE is an exact optimum: only the offset changes.
                p0[mask] = start0
            else:
                # Re-fit from the unwrapped branch: with non-uniform echo spacing the alias
                # is not an exact optimum.
                inverse = _normal_inverse(w, times)
                p0_fit, p1_fit, _ = _gauss_newton(
                    ph, w, times, start0, p1[mask], inverse,
                    max_iter=max_iter, tol=tol, p1_floor=np.pi / delta,
                )
                p1[mask] = p1_fit
                p0[mask] = wrap(p0_fit)
                noise = np.zeros(shape, dtype=np.float32)
                noise[mask] = _fit_noise(ph, w, times, p0_fit, p1_fit, inverse[2], mask)
        if not exact:
            p1 = (p1 + remainder / np.float32(delta)).astype(np.float32)
    else:
        offset = mcpc3ds_offset(
            magnitude, phase, times, mask, voxel_size=voxel_size, unwrap_method=unwrap_method
        )
        corrected = wrap(phase - offset[..., None])
        if unwrap_method in unwrap_module.MULTI_ECHO_METHODS:
            # ROMEO: template echo in space with multi-echo weights, global branch per
            # component from temporal consistency, the other echoes in time.
            stacked = unwrap_module.romeo(
                corrected, mask, echo_times=times, magnitude=magnitude, template=0,
                phase_offset="none", voxel_size=voxel_size,
            )
        else:
            template = _unwrap_aligned(corrected[..., 0], mask, **unwrap_kwargs)
            stacked = temporal_unwrap(
                corrected, template, times, mask=mask, magnitude=magnitude
            )
        p1, noise = linear_fit(stacked, magnitude, times, mask)
        p0 = offset

    field = (np.float32(phase_sign / _TWO_PI) * p1).astype(np.float32)
    field[~mask] = 0.0
    noise_hz = (noise / np.float32(_TWO_PI)).astype(np.float32)
    alias_hz = 1.0 / float(times[0] if n_echoes == 1 else times[1] - times[0])
    suspect = inconsistent_voxels(field, mask, threshold_hz=alias_hz / 4)
    noise_hz[suspect] = np.maximum(noise_hz[suspect], np.float32(alias_hz))
    noise_hz[~mask] = 0.0
    p0 = np.where(mask, p0, 0).astype(np.float32)
    unwrapped_phase = _consistent_unwrapped_phase(phase, mask, p0, p1, times)
    return FieldEstimate(
        field_hz=field,
        noise_hz=noise_hz,
        phase_offset=p0,
        unwrapped_phase=unwrapped_phase,
        echo_times=times,
        method=method,
        unwrap_method=unwrap_method,
        phase_sign=int(phase_sign),
    )
