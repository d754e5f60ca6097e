"""Accuracy metrics of susceptibility maps against a reference (METHODS.md section 6).

Definitions follow the QSM reconstruction challenge 2.0 (Marques et al. 2021): all metrics
are evaluated inside a boolean ``mask``; ``chi`` and ``ref`` are in ppm on the same
``[x, y, z]`` grid. With ``demean=True`` (default) both maps are demeaned inside the mask
first, since the mean susceptibility is not observable.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import scipy.ndimage as ndi
import scipy.signal

from qsmprep.recon.dipole import check_voxel_size

__all__ = [
    "calcification_moment",
    "calcification_moment_error",
    "calcification_regions",
    "calcification_segment",
    "calcification_streaking",
    "detrended_nrmse",
    "hfen",
    "log_kernel",
    "nrmse",
    "roi_slope",
    "xsim",
]


def _prepare(chi, ref, mask, demean: bool):
    chi = np.asarray(chi, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if chi.shape != ref.shape or mask.shape != chi.shape:
        raise ValueError(
            f"chi {chi.shape}, ref {ref.shape} and mask {mask.shape} must share one shape"
        )
    if not mask.any():
        raise ValueError("mask is empty")
    if demean:
        chi = chi - chi[mask].mean()
        ref = ref - ref[mask].mean()
    return np.where(mask, chi, 0.0), np.where(mask, ref, 0.0), mask


def _ratio(err: float, norm: float) -> float:
    if norm == 0:
        raise ValueError("the reference is zero (after demeaning) inside the mask")
    return 100.0 * err / norm


def nrmse(chi: np.ndarray, ref: np.ndarray, mask: np.ndarray, *, demean: bool = True) -> float:
    """Normalised root-mean-square error (%): ``100 ||chi - ref|| / ||ref||`` in the mask."""
    c, r, m = _prepare(chi, ref, mask, demean)
    return _ratio(float(np.linalg.norm(c[m] - r[m])), float(np.linalg.norm(r[m])))


def detrended_nrmse(
    chi: np.ndarray, ref: np.ndarray, mask: np.ndarray, *, demean: bool = True
) -> float:
    """NRMSE (%) after the linear trend is removed: ``chi`` is replaced by the least-squares
    fit ``a chi + b`` to ``ref`` in the mask (challenge 2.0 "dNRMSE").

    This is ``compute_rmse_detrend_v0.m`` of the challenge's evaluation code as its header
    states it, ``P = argmin ||P(1) chi + P(2) - ref||`` (``polyfit(chi, ref, 1)``), on maps
    demeaned in the mask: it removes any linear scaling and offset of ``chi`` and is never
    larger than :func:`nrmse`. (Some copies of that file fit ``chi`` against ``ref``
    instead, which for a noisy ``chi`` gives a larger value.)"""
    c, r, m = _prepare(chi, ref, mask, demean)
    x, y = c[m], r[m]
    design = np.stack([x, np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return _ratio(float(np.linalg.norm(design @ coef - y)), float(np.linalg.norm(y)))


@lru_cache(maxsize=4)
def log_kernel(size: int = 15, sigma: float = 1.5) -> np.ndarray:
    """Zero-mean 3D Laplacian-of-Gaussian kernel (``size`` voxels per side, ``sigma`` voxels),
    as MATLAB ``fspecial3('log', size, sigma)``."""
    half = (size - 1) / 2.0
    ax = np.arange(size) - half
    r2 = ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2
    g = np.exp(-r2 / (2.0 * sigma**2))
    g /= g.sum()
    log = g * (r2 - 3.0 * sigma**2) / sigma**4
    log -= log.mean()
    log.setflags(write=False)
    return log


def hfen(
    chi: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray,
    *,
    demean: bool = True,
    size: int = 15,
    sigma: float = 1.5,
) -> float:
    """High-frequency error norm (%): NRMSE of LoG-filtered masked maps (``sigma`` = 1.5
    voxels, 15^3 zero-mean kernel, zero padding), evaluated in the mask."""
    c, r, m = _prepare(chi, ref, mask, demean)
    kernel = log_kernel(int(size), float(sigma))
    fc = scipy.signal.fftconvolve(c, kernel, mode="same")
    fr = scipy.signal.fftconvolve(r, kernel, mode="same")
    return _ratio(float(np.linalg.norm(fc[m] - fr[m])), float(np.linalg.norm(fr[m])))


def xsim(
    chi: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray,
    *,
    demean: bool = True,
    data_range: float = 1.0,
    k: Sequence[float] = (0.01, 0.001),
    sigma: float = 1.5,
    truncate_radius: int = 3,
) -> float:
    """XSIM: SSIM on native ppm values (no rescaling), dynamic range ``L = data_range`` (1),
    ``K = (0.01, 0.001)``, Gaussian window sigma 1.5 voxels truncated to 7^3, averaged over the
    mask. Maps are masked (and demeaned) before filtering."""
    c, r, m = _prepare(chi, ref, mask, demean)
    c1 = (k[0] * data_range) ** 2
    c2 = (k[1] * data_range) ** 2
    opts = dict(sigma=sigma, truncate=truncate_radius / sigma, mode="constant")
    mu_c = ndi.gaussian_filter(c, **opts)
    mu_r = ndi.gaussian_filter(r, **opts)
    s_cc = ndi.gaussian_filter(c * c, **opts) - mu_c * mu_c
    s_rr = ndi.gaussian_filter(r * r, **opts) - mu_r * mu_r
    s_cr = ndi.gaussian_filter(c * r, **opts) - mu_c * mu_r
    ssim = ((2 * mu_c * mu_r + c1) * (2 * s_cr + c2)) / (
        (mu_c**2 + mu_r**2 + c1) * (s_cc + s_rr + c2)
    )
    return float(ssim[m].mean())


def roi_slope(
    chi: np.ndarray, ref: np.ndarray, labels: np.ndarray, roi_ids: Sequence[int]
) -> tuple[float, float]:
    """OLS fit ``mean_chi = slope * mean_ref + intercept`` over ROI means (ppm).

    ``labels`` is an integer label image; ``roi_ids`` the labels to use (at least two, each
    present). The slope error of the challenge is ``|1 - slope|``.
    """
    chi = np.asarray(chi, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    labels = np.asarray(labels)
    if chi.shape != ref.shape or labels.shape != chi.shape:
        raise ValueError("chi, ref and labels must share one shape")
    ids = [int(i) for i in roi_ids]
    if len(set(ids)) < 2:
        raise ValueError("roi_slope needs at least two distinct ROI labels")
    missing = [i for i in ids if not np.any(labels == i)]
    if missing:
        raise ValueError(f"ROI labels {missing} are absent from the label image")
    mc = np.array(ndi.mean(chi, labels, ids))
    mr = np.array(ndi.mean(ref, labels, ids))
    if np.ptp(mr) == 0:
        raise ValueError("the reference ROI means are all equal; the slope is undefined")
    slope, intercept = np.polyfit(mr, mc, 1)
    return float(slope), float(intercept)


# --------------------------------------------------------------------------------------
# calcification metrics (QSM challenge 2.0, ``compute_calcification_metrics.m``)
# --------------------------------------------------------------------------------------


def _calc_inputs(chi, ref, calc_mask, mask):
    chi = np.asarray(chi, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    calc = np.asarray(calc_mask, dtype=bool)
    if chi.ndim != 3 or chi.shape != ref.shape or calc.shape != chi.shape:
        raise ValueError(
            f"chi {chi.shape}, ref {ref.shape} and calc_mask {calc.shape} must share one 3D shape"
        )
    if not calc.any():
        raise ValueError("calc_mask is empty")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != chi.shape:
            raise ValueError(f"mask {mask.shape} must have the shape of chi {chi.shape}")
        if not mask.any():
            raise ValueError("mask is empty")
        # the mean of chi is not observable: give chi the mean of ref in the mask
        chi = chi - chi[mask].mean() + ref[mask].mean()
    return chi, ref, calc, mask


def _box(shape, lo, hi) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[tuple(slice(max(int(a), 0), min(int(b), n)) for a, b, n in zip(lo, hi, shape))] = True
    return out


def calcification_regions(
    calc_mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    cube_mm: float = 3.0,
    rim_mm: float = 4.0,
    guard_mm: float = 4.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes of the challenge's calcification metrics: ``(cube, rim, surround)`` (bool).

    ``cube`` is the bounding box of ``calc_mask`` grown by ``cube_mm``; ``rim`` the box
    grown by a further ``rim_mm``, minus the cube; ``surround`` the box grown by another
    ``guard_mm``, minus the cube. Margins are rounded to whole voxels per axis (at least one);
    the defaults are the challenge's 3, 4 and 4 voxels at its 1 mm grid.
    """
    calc = np.asarray(calc_mask, dtype=bool)
    if calc.ndim != 3 or not calc.any():
        raise ValueError("calc_mask must be a non-empty 3D mask")
    vox = check_voxel_size(voxel_size)
    if min(cube_mm, rim_mm, guard_mm) < 0:
        raise ValueError("cube_mm, rim_mm and guard_mm must be >= 0")

    def grow(mm):
        return np.maximum(np.rint(mm / vox), 1 if mm > 0 else 0).astype(int)

    idx = np.nonzero(calc)
    lo = np.array([i.min() for i in idx])
    hi = np.array([i.max() + 1 for i in idx])
    n1, n2, n3 = grow(cube_mm), grow(rim_mm), grow(guard_mm)
    cube = _box(calc.shape, lo - n1, hi + n1)
    rim = _box(calc.shape, lo - n1 - n2, hi + n1 + n2) & ~cube
    surround = _box(calc.shape, lo - n1 - n2 - n3, hi + n1 + n2 + n3) & ~cube
    return cube, rim, surround


def calcification_segment(
    chi: np.ndarray,
    calc_mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    polarity: int = -1,
    step: float = 0.01,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """The calcification as the reconstruction shows it (bool), by the challenge's rule.

    Inside the ``cube`` of :func:`calcification_regions`, voxels below a threshold ``t``
    (``polarity=-1``, diamagnetic calcification; ``+1`` looks for values above ``-t``)
    where ``t`` is the largest of 0, -step, -2 step, ... (ppm) that no voxel of the
    ``surround`` goes below, so nothing outside the cube would be segmented (the challenge's
    scan stops at -1.5 ppm; this one does not). ``mask`` restricts the cube and the
    surround (e.g. to the evaluation mask).
    """
    if polarity not in (1, -1):
        raise ValueError(f"polarity must be +1 or -1, got {polarity!r}")
    if not step > 0:
        raise ValueError(f"step must be positive (ppm), got {step!r}")
    chi = np.asarray(chi, dtype=np.float64)
    if chi.shape != np.shape(calc_mask):
        raise ValueError(f"chi {chi.shape} and calc_mask {np.shape(calc_mask)} differ in shape")
    cube, _, surround = calcification_regions(calc_mask, voxel_size=voxel_size)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        cube, surround = cube & mask, surround & mask
    signed = polarity * chi  # calcification values become positive
    top = float(signed[surround].max()) if surround.any() else 0.0
    # the smallest multiple of step >= top (and >= 0); 1e-9 absorbs float rounding
    threshold = step * max(np.ceil(top / step - 1e-9), 0.0)
    return cube & (signed > threshold)


def calcification_moment(
    chi: np.ndarray, region: np.ndarray, *, voxel_size: Sequence[float]
) -> float:
    """Susceptibility moment of ``region``: ``sum(chi) * voxel volume`` (ppm mm^3)."""
    chi = np.asarray(chi, dtype=np.float64)
    region = np.asarray(region, dtype=bool)
    if region.shape != chi.shape:
        raise ValueError(f"region {region.shape} and chi {chi.shape} differ in shape")
    return float(chi[region].sum() * np.prod(check_voxel_size(voxel_size)))


def calcification_moment_error(
    chi: np.ndarray,
    ref: np.ndarray,
    calc_mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    mask: np.ndarray | None = None,
    relative: bool = True,
) -> float:
    """Calcification moment error (challenge 2.0 "DeviationFromCalcMoment").

    Each moment is ``sum(chi) * voxel volume`` over :func:`calcification_segment` of the
    map: of ``chi`` for the reconstruction, of ``ref`` for the reference (``calc_mask``
    only locates the calcification; segmenting ``ref`` the same way also counts the
    partial-volume voxels around a sub-voxel calcification that a label mask misses, e.g.
    the RC2 calcification at 1 mm: 11 label voxels hold 48 % of its moment, the segmented
    65 voxels 96 %). Returns ``|m - m_ref| / |m_ref|`` (``relative=True``; 0.5 means 50 %)
    or ``|m - m_ref|`` in ppm mm^3 (the challenge reports the latter in ppm voxel at 1 mm).
    With ``mask`` the regions are restricted to it and ``chi`` gets the mean of ``ref`` in
    it first.
    """
    chi, ref, calc, mask = _calc_inputs(chi, ref, calc_mask, mask)
    polarity = -1 if ref[calc].sum() < 0 else 1
    kw = dict(voxel_size=voxel_size, polarity=polarity, mask=mask)
    m_ref = calcification_moment(ref, calcification_segment(ref, calc, **kw),
                                 voxel_size=voxel_size)
    if m_ref == 0:
        raise ValueError("the reference calcification moment is zero")
    m = calcification_moment(chi, calcification_segment(chi, calc, **kw),
                             voxel_size=voxel_size)
    return abs(m - m_ref) / abs(m_ref) if relative else abs(m - m_ref)


def calcification_streaking(
    chi: np.ndarray,
    ref: np.ndarray,
    calc_mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    mask: np.ndarray | None = None,
) -> float:
    """Calcification streaking (challenge 2.0 "CalcStreak"), dimensionless.

    In the ``rim`` of :func:`calcification_regions` (a box shell 3-7 mm from the
    calcification's bounding box), ``chi`` is regressed on ``ref`` (``chi ~ a ref + b``,
    which removes true anatomy and any global scaling); the standard deviation (N - 1) of
    the residual is divided by ``|mean(chi)|`` over :func:`calcification_segment`, so that
    an over-regularised, faded calcification is not rewarded. NaN when the reconstruction
    shows no calcification. With ``mask`` the regions are restricted to it.
    """
    chi, ref, calc, mask = _calc_inputs(chi, ref, calc_mask, mask)
    _, rim, _ = calcification_regions(calc, voxel_size=voxel_size)
    if mask is not None:
        rim &= mask
    if np.count_nonzero(rim) < 3:
        raise ValueError("the rim around the calcification has fewer than 3 voxels")
    x, y = ref[rim], chi[rim]
    design = np.stack([x, np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    spread = float(np.std(y - design @ coef, ddof=1))
    polarity = -1 if ref[calc].sum() < 0 else 1
    region = calcification_segment(chi, calc, voxel_size=voxel_size, polarity=polarity,
                                   mask=mask)
    if not region.any():
        return float("nan")
    return spread / abs(float(chi[region].mean()))
