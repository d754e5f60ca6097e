"""Susceptibility referencing: the mean of chi is unobservable (D(0) = 0), so every map is
shifted to a stated reference (METHODS.md section 0).

Methods (``METHODS``; susceptibility in ppm):

- "mean": the mean over the mask is zero.
- "roi": the mean over a boolean ROI (within the mask) is zero.
- "csf": the mean over the lateral ventricles' CSF is zero; the CSF is found on an R2* map
  (1/s) by ``csf_mask`` (low R2*, large central connected components, eroded).
- "label": the mean over the voxels of a label image equal to a given label index is zero.
- "water": body data -- the mean over water-dominant soft tissue (muscle) is zero: voxels
  whose proton-density fat fraction is below ``DEFAULT_WATER_PDFF`` percent, eroded by one
  voxel (partial volume with fat, bone and air), from the water-fat separation.
- "none": unchanged.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import scipy.ndimage as ndi

from .dipole import check_voxel_size

LOGGER = logging.getLogger("qsmprep")

__all__ = ["METHODS", "csf_mask", "reference"]

#: R2* (1/s) below which a voxel counts as CSF (CSF ~1-3 /s, tissue >= ~12 /s at 3 T)
DEFAULT_CSF_R2STAR = 5.0
#: fat fraction (%) below which a voxel counts as water-dominant soft tissue (muscle ~1-5%,
#: red marrow >= 30%, subcutaneous fat ~90%)
DEFAULT_WATER_PDFF = 10.0


# --------------------------------------------------------------------------------------
# CSF from R2*
# --------------------------------------------------------------------------------------
def _central_components(
    candidates: np.ndarray,
    mask: np.ndarray,
    central_fraction: float,
    keep_fraction: float,
    min_size: float,
) -> np.ndarray:
    """Union of the large connected components of ``candidates`` whose centroid lies near
    the centre of ``mask``.

    Centrality: the centroid's offset from the mask centroid, divided per axis by the mask's
    half-extent along that axis (so voxel sizes cancel), has norm < ``central_fraction``.
    Kept: central components of at least ``min_size`` voxels and at least ``keep_fraction``
    of the largest one's.
    """
    structure = ndi.generate_binary_structure(3, 1)
    labels, n = ndi.label(candidates, structure=structure)
    if n == 0:
        return np.zeros_like(candidates)
    index = np.arange(1, n + 1)
    sizes = ndi.sum_labels(np.ones(labels.shape, dtype=np.int32), labels, index)
    centroids = np.asarray(ndi.center_of_mass(candidates, labels, index), dtype=float)
    coords = np.nonzero(mask)
    centre = np.array([c.mean() for c in coords])
    half = np.array([(c.max() - c.min() + 1) / 2.0 for c in coords])
    dist = np.sqrt((((centroids - centre) / half) ** 2).sum(axis=1))
    central = (dist < central_fraction) & (sizes >= min_size)
    if not central.any():
        return np.zeros_like(candidates)
    largest = sizes[central].max()
    keep = index[central & (sizes >= keep_fraction * largest)]
    return np.isin(labels, keep)


def csf_mask(
    r2star: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    threshold: float = DEFAULT_CSF_R2STAR,
    min_volume_ml: float = 1.0,
    min_component_ml: float = 0.1,
    central_fraction: float = 0.5,
    keep_fraction: float = 0.2,
    erode: int = 1,
) -> np.ndarray:
    """Ventricular CSF from an R2* map: the reference region of "csf" and of MEDI+0.

    1. Candidates: mask voxels with finite ``r2star < threshold`` (1/s).
    2. Ventricles: 6-connected components of the candidates whose centroid lies within
       ``central_fraction`` of the mask's half-extents from its centroid (normalised per
       axis) and of at least ``min_component_ml`` (ml; smaller ones are noise); the largest
       of them and every other with at least ``keep_fraction`` of its size are kept (left
       and right lateral ventricles, third ventricle).
    3. Adaptive threshold: if those hold less than ``min_volume_ml`` (ml) the threshold is
       raised to the R2* quantiles 1%, 2%, ... 5% of the mask until they do (e.g. at low
       field or with an R2* bias); the threshold used is logged. If none reaches it, the
       largest region found is used with a warning.
    4. Partial volume: the result is eroded by ``erode`` voxels (6-connected); if that
       empties it, the uneroded region is returned with a warning.

    Parameters
    ----------
    r2star : R2* map (1/s), ``[x, y, z]``.  mask : brain mask.  voxel_size : mm.
    threshold : CSF R2* threshold (1/s), default 5.

    Returns a boolean CSF mask (a subset of ``mask``); ValueError if no central low-R2*
    region is found.
    """
    r2 = np.asarray(r2star, dtype=np.float32)
    mask = np.asarray(mask)
    if r2.ndim != 3:
        raise ValueError(f"r2star must be a 3D array [x, y, z], got shape {r2.shape}")
    if mask.shape != r2.shape:
        raise ValueError(f"mask shape {mask.shape} differs from r2star shape {r2.shape}")
    vox = check_voxel_size(voxel_size)
    if not (np.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive R2* (1/s), got {threshold!r}")
    if not 0 < central_fraction <= 1 or not 0 < keep_fraction <= 1:
        raise ValueError("central_fraction and keep_fraction must lie in (0, 1]")
    if int(erode) < 0 or min_volume_ml < 0 or min_component_ml < 0:
        raise ValueError(
            "erode, min_volume_ml and min_component_ml must be >= 0, got "
            f"{erode}, {min_volume_ml}, {min_component_ml}"
        )
    mask = mask.astype(bool)
    valid = mask & np.isfinite(r2)
    if not valid.any():
        raise ValueError("r2star has no finite values inside the mask")
    voxel_ml = float(np.prod(vox)) / 1000.0
    min_voxels = min_volume_ml / voxel_ml

    thresholds = [float(threshold)]
    quantiles = np.quantile(r2[valid], [0.01, 0.02, 0.03, 0.04, 0.05])
    thresholds += [float(q) for q in quantiles if q > threshold]
    csf, used = np.zeros_like(mask), thresholds[0]
    for t in thresholds:
        found = _central_components(
            valid & (r2 < t), mask, central_fraction, keep_fraction, min_component_ml / voxel_ml
        )
        if found.sum() > csf.sum():
            csf, used = found, t
        if csf.sum() >= min_voxels:
            break
    if not csf.any():
        raise ValueError(
            "no central low-R2* (CSF) region found (R2* thresholds tried up to "
            f"{thresholds[-1]:.3g} /s)"
        )
    if used != threshold:
        LOGGER.info("CSF mask: R2* threshold raised from %.3g to %.3g /s", threshold, used)
    if csf.sum() < min_voxels:
        LOGGER.warning(
            "CSF mask: only %.2f ml of central low-R2* voxels (R2* < %.3g /s)",
            csf.sum() * voxel_ml, used,
        )
    if erode:
        eroded = ndi.binary_erosion(
            csf, structure=ndi.generate_binary_structure(3, 1), iterations=int(erode)
        )
        if eroded.any():
            csf = eroded
        else:
            LOGGER.warning("CSF mask: erosion by %d voxel(s) leaves nothing; not eroded", erode)
    LOGGER.debug("CSF mask: %d voxels, R2* threshold %.3g /s", int(csf.sum()), used)
    return csf


# --------------------------------------------------------------------------------------
# methods: (chi, mask, inputs) -> offset (ppm)
# --------------------------------------------------------------------------------------
def _mean(chi: np.ndarray, mask: np.ndarray, **_) -> float:
    return float(chi[mask].mean(dtype=np.float64))


def _roi(chi: np.ndarray, mask: np.ndarray, *, roi=None, **_) -> float:
    if roi is None:
        raise ValueError("reference method 'roi' needs a boolean roi array")
    roi = np.asarray(roi)
    if roi.shape != chi.shape:
        raise ValueError(f"roi shape {roi.shape} differs from chi shape {chi.shape}")
    roi = roi.astype(bool) & mask
    if not roi.any():
        raise ValueError("the reference roi has no voxels inside the mask")
    return float(chi[roi].mean(dtype=np.float64))


def _csf(chi: np.ndarray, mask: np.ndarray, *, r2star=None, voxel_size=None, **_) -> float:
    if r2star is None:
        raise ValueError("reference method 'csf' needs an r2star map (1/s)")
    if voxel_size is None:
        raise ValueError("reference method 'csf' needs voxel_size (mm)")
    r2 = np.asarray(r2star)
    if r2.shape != chi.shape:
        raise ValueError(f"r2star shape {r2.shape} differs from chi shape {chi.shape}")
    return _roi(chi, mask, roi=csf_mask(r2, mask, voxel_size=voxel_size))


def _label(chi: np.ndarray, mask: np.ndarray, *, labels=None, label=None, **_) -> float:
    if labels is None or label is None:
        raise ValueError("reference method 'label' needs a labels image and a label index")
    labels = np.asarray(labels)
    if labels.shape != chi.shape:
        raise ValueError(f"labels shape {labels.shape} differs from chi shape {chi.shape}")
    roi = (labels == label) & mask
    if not roi.any():
        raise ValueError(f"label {label!r} has no voxels inside the mask")
    return float(chi[roi].mean(dtype=np.float64))


def _water(chi: np.ndarray, mask: np.ndarray, *, pdff=None, **_) -> float:
    if pdff is None:
        raise ValueError("reference method 'water' needs a fat-fraction map (%) from the "
                         "water-fat separation")
    fraction = np.asarray(pdff, dtype=np.float32)
    if fraction.shape != chi.shape:
        raise ValueError(f"pdff shape {fraction.shape} differs from chi shape {chi.shape}")
    water = mask & np.isfinite(fraction) & (fraction < DEFAULT_WATER_PDFF)
    eroded = ndi.binary_erosion(water, structure=ndi.generate_binary_structure(3, 1))
    if eroded.sum() >= 0.1 * water.sum() and eroded.any():
        water = eroded
    if not water.any():
        raise ValueError(f"no voxel of the mask has a fat fraction below {DEFAULT_WATER_PDFF}% "
                         "(no water-dominant tissue to reference to); use --reference mean "
                         "or roi")
    return float(chi[water].mean(dtype=np.float64))


def _none(chi: np.ndarray, mask: np.ndarray, **_) -> float:
    return 0.0


#: method name -> function returning the offset (ppm) to subtract
METHODS: dict[str, Callable[..., float]] = {
    "mean": _mean,
    "roi": _roi,
    "csf": _csf,
    "label": _label,
    "water": _water,
    "none": _none,
}


def reference(
    chi_ppm: np.ndarray,
    mask: np.ndarray,
    *,
    method: str = "mean",
    roi: np.ndarray | None = None,
    r2star: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    label: int | None = None,
    voxel_size: Sequence[float] | None = None,
    pdff: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Shift ``chi_ppm`` (ppm) so that its reference region has zero mean.

    ``method``: "mean" (the whole ``mask``), "roi" (``roi`` within the mask), "csf" (the
    ventricles found by ``csf_mask`` on ``r2star`` (1/s); needs ``voxel_size`` in mm),
    "label" (voxels of ``labels`` equal to ``label``, within the mask), "water" (soft tissue
    with a fat fraction ``pdff`` (%) below 10%, for body data) or "none".
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
    offset = func(
        chi, mask, roi=roi, r2star=r2star, labels=labels, label=label, voxel_size=voxel_size,
        pdff=pdff,
    )
    out = np.where(mask, chi - np.float32(offset), chi).astype(np.float32)
    return out, offset
