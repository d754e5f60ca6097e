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

__all__ = ["detrended_nrmse", "hfen", "log_kernel", "nrmse", "roi_slope", "xsim"]


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
    fit ``a chi + b`` to ``ref`` in the mask (challenge 2.0 "dNRMSE")."""
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
