"""Susceptibility referencing: the mean of chi is unobservable (D(0) = 0), so every map is
shifted to a stated reference (METHODS.md section 0).

Methods: "mean" (mean over the mask = 0), "roi" (mean over a boolean ROI, e.g. CSF = 0),
"none" (unchanged). Susceptibility in ppm.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["METHODS", "reference"]


def _mean(chi: np.ndarray, mask: np.ndarray, roi: np.ndarray | None) -> float:
    return float(chi[mask].mean(dtype=np.float64))


def _roi(chi: np.ndarray, mask: np.ndarray, roi: np.ndarray | None) -> float:
    if roi is None:
        raise ValueError("reference method 'roi' needs a boolean roi array")
    roi = np.asarray(roi)
    if roi.shape != chi.shape:
        raise ValueError(f"roi shape {roi.shape} differs from chi shape {chi.shape}")
    roi = roi.astype(bool) & mask
    if not roi.any():
        raise ValueError("the reference roi has no voxels inside the mask")
    return float(chi[roi].mean(dtype=np.float64))


def _none(chi: np.ndarray, mask: np.ndarray, roi: np.ndarray | None) -> float:
    return 0.0


#: method name -> function returning the offset (ppm) to subtract
METHODS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray | None], float]] = {
    "mean": _mean,
    "roi": _roi,
    "none": _none,
}


def reference(
    chi_ppm: np.ndarray,
    mask: np.ndarray,
    *,
    method: str = "mean",
    roi: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Shift ``chi_ppm`` (ppm) so that its reference region has zero mean.

    ``method``: "mean" (the whole ``mask``), "roi" (``roi`` within the mask) or "none".
    Returns ``(chi_referenced_ppm, offset_ppm)``: float32 ``chi - offset`` inside the mask,
    voxels outside the mask unchanged.
    """
    try:
        func = METHODS[method]
    except KeyError:
        raise ValueError(
            f"unknown reference method {method!r}; choose one of {sorted(METHODS)}"
        ) from None
    chi = np.asarray(chi_ppm, dtype=np.float32)
    mask = np.asarray(mask)
    if mask.shape != chi.shape:
        raise ValueError(f"mask shape {mask.shape} differs from chi shape {chi.shape}")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("mask is empty")
    offset = func(chi, mask, roi)
    out = np.where(mask, chi - np.float32(offset), chi).astype(np.float32)
    return out, offset
