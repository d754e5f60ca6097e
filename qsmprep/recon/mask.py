"""Brain (and later body) masks from the multi-echo magnitude.

Magnitude-only brain extraction for gradient-echo data, where the scalp is as bright as the
brain and the skull is dark:

1. combine the echoes (root-sum-of-squares, or the first echo) and smooth (Gaussian, mm);
2. threshold: Otsu's threshold of the smoothed image clipped at its 99.5th percentile
   (robust to bright outliers), or a user fraction of that robust maximum;
3. cut bridges (scalp <-> brain through partial-volume skull, face, neck) by eroding with a
   ball (exact Euclidean distance in mm, so anisotropic voxels are fine); the radius grows
   from ``open_mm`` until the main component's boundary avoids the outer band of the head;
4. keep the main connected component (the one holding most voxels in the central part of
   the foreground -- for a head this is the brain, not the hollow scalp shell);
5. dilate it back by the same radius, constrained to the thresholded image (an opening that
   keeps only the main component), close small gaps, fill holes in 3D and slice by slice;
6. optional final erosion ``erode_mm``.

All morphology radii are in mm. Results are boolean arrays ``[x, y, z]``.
"""

from __future__ import annotations

import logging
from typing import Literal, Sequence

import edt
import numpy as np
import scipy.fft
from scipy import ndimage

from .dipole import check_voxel_size

LOGGER = logging.getLogger("qsmprep")

EchoCombination = Literal["rss", "first"]


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D, got shape {mask.shape}.")
    return mask.astype(bool, copy=False)


def distance_mm(
    mask: np.ndarray, voxel_size: Sequence[float], *, border_is_outside: bool = False
) -> np.ndarray:
    """Euclidean distance (mm, float32) from every ``mask`` voxel to the nearest voxel
    outside it (0 outside the mask); with ``border_is_outside`` the space beyond the array
    counts as outside. Exact for anisotropic voxels; computed by the ``edt`` package
    (separable, 8x faster than scipy's feature transform at 256x256x176) with as many
    threads as ``scipy.fft.get_workers()`` grants the caller."""
    data = np.ascontiguousarray(mask, dtype=bool)
    return edt.edt(data, anisotropy=tuple(float(v) for v in check_voxel_size(voxel_size)),
                   black_border=border_is_outside, parallel=max(scipy.fft.get_workers(), 1))


def erode(mask: np.ndarray, radius_mm: float, *, voxel_size: Sequence[float]) -> np.ndarray:
    """Erode a 3D boolean mask by a ball of ``radius_mm`` (mm), exact Euclidean in mm.

    Voxels outside the array count as outside the mask.
    """
    mask = _check_mask(mask)
    sizes = check_voxel_size(voxel_size)
    if radius_mm < 0:
        raise ValueError(f"erosion radius must be >= 0 mm, got {radius_mm}.")
    if radius_mm == 0 or not mask.any():
        return mask.copy()
    return distance_mm(mask, sizes, border_is_outside=True) > radius_mm


def dilate(mask: np.ndarray, radius_mm: float, *, voxel_size: Sequence[float]) -> np.ndarray:
    """Dilate a 3D boolean mask by a ball of ``radius_mm`` (mm), exact Euclidean in mm."""
    mask = _check_mask(mask)
    sizes = check_voxel_size(voxel_size)
    if radius_mm < 0:
        raise ValueError(f"dilation radius must be >= 0 mm, got {radius_mm}.")
    if radius_mm == 0 or not mask.any():
        return mask.copy()
    return distance_mm(~mask, sizes) <= radius_mm


def _fill_enclosed(mask: np.ndarray, structure: np.ndarray, skip_axis: int | None) -> np.ndarray:
    """``mask`` plus every component of its complement (connectivity ``structure``) that
    touches no face of the array (faces normal to ``skip_axis`` excepted: with a planar
    structure each slice is its own 2D image). One labelling pass instead of the iterated
    dilations of ``ndimage.binary_fill_holes`` (same result, ~10x faster)."""
    labels, count = ndimage.label(~mask, structure=structure)
    enclosed = np.ones(count + 1, dtype=bool)  # per label: a hole, until it reaches a face
    enclosed[0] = False  # the mask itself
    for axis in range(3):
        if axis != skip_axis:
            for end in (0, -1):
                enclosed[labels.take(end, axis=axis)] = False
    return mask | enclosed[labels]


def fill_mask_holes(mask: np.ndarray, *, slicewise: bool = True) -> np.ndarray:
    """Fill enclosed holes in 3D, then (``slicewise``) in every 2D slice along each axis."""
    structure = ndimage.generate_binary_structure(3, 1)
    filled = _fill_enclosed(_check_mask(mask), structure, None)
    if slicewise:
        for axis in range(3):
            # A 2D structuring element in the plane orthogonal to ``axis``: fills holes of
            # every slice at once without a Python loop over slices.
            plane = structure.copy()
            index = [slice(None)] * 3
            index[axis] = [0, 2]
            plane[tuple(index)] = False
            filled = _fill_enclosed(filled, plane, axis)
    return filled


def combine_echoes(magnitude: np.ndarray, how: EchoCombination = "rss") -> np.ndarray:
    """Echo-combined magnitude (float32): root-sum-of-squares over echoes, or the first echo."""
    magnitude = np.asarray(magnitude)
    if magnitude.ndim == 3:
        combined = np.abs(magnitude.astype(np.float32, copy=False))
    elif magnitude.ndim == 4:
        if how == "rss":
            mag = magnitude.astype(np.float32, copy=False)
            combined = np.sqrt(np.einsum("xyze,xyze->xyz", mag, mag))
        elif how == "first":
            combined = np.abs(magnitude[..., 0].astype(np.float32))
        else:
            raise ValueError(f"unknown echo combination {how!r}; choose 'rss' or 'first'.")
    else:
        raise ValueError(f"magnitude must be 3D or 4D [x, y, z, echo], got {magnitude.shape}.")
    return np.nan_to_num(combined, nan=0.0, posinf=0.0, neginf=0.0)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample (maximises the between-class variance)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < 2 or values.max() <= values.min():
        raise ValueError("Otsu threshold needs at least two distinct values.")
    counts, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight1 = np.cumsum(counts)
    weight2 = weight1[-1] - weight1
    sum1 = np.cumsum(counts * centres)
    mean1 = sum1 / np.maximum(weight1, 1)
    mean2 = (sum1[-1] - sum1) / np.maximum(weight2, 1)
    between = weight1 * weight2 * (mean1 - mean2) ** 2
    return float(edges[1:][np.argmax(between[:-1])])


def _finite_values(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The finite values of ``image`` (float64, flat) and their 99.5th percentile."""
    values = np.asarray(image, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    return values, float(np.percentile(values, 99.5))


def robust_threshold(image: np.ndarray) -> float:
    """Automatic foreground threshold of a (smoothed) magnitude image.

    Otsu's threshold of the values clipped to their 99.5th percentile, so that a few very
    bright voxels (vessels, fat, artefacts) do not pull it up; the dark class collects the
    noise background and the skull, the bright class the tissue.
    """
    values, top = _finite_values(image)
    return otsu_threshold(np.minimum(values, top))


def log_threshold(image: np.ndarray, floor: float = 1e-3) -> float:
    """Automatic tissue threshold of a (smoothed) body magnitude image: Otsu's threshold of
    the log intensity.

    Body tissue spans a wide range of signal: fat is bright; muscle, organs, iron-laden
    tissue, low-proton-density phantom vials and regions far from a surface coil are dark.
    On a linear scale Otsu splits that range into bright and dark tissue and drops the dark
    tissue; on a log scale (multiplicative shading is a shift) the two classes are the noise
    background and the tissue. Values are clipped to ``[floor, 1] x`` their 99.5th
    percentile, so zero-filled backgrounds form one bin.
    """
    values, top = _finite_values(image)
    if top <= 0:
        raise ValueError("magnitude has no signal; cannot threshold it.")
    return float(np.exp(otsu_threshold(np.log(np.clip(values, floor * top, top)))))


def _main_component(labels: np.ndarray, n_labels: int, foreground: np.ndarray) -> int:
    """Label of the component dominating the central half of the foreground's bounding box."""
    sizes = np.bincount(labels.ravel(), minlength=n_labels + 1)
    sizes[0] = 0
    coords = np.nonzero(foreground)
    central = []
    for axis, c in enumerate(coords):
        low, high = int(c.min()), int(c.max())
        quarter = (high - low) // 4
        central.append(slice(low + quarter, high - quarter + 1))
    central_counts = np.bincount(labels[tuple(central)].ravel(), minlength=n_labels + 1)
    central_counts[0] = 0
    if central_counts.max() > 0:
        return int(np.argmax(central_counts))
    return int(np.argmax(sizes))


def _outer_band_fraction(mask: np.ndarray, depth: np.ndarray, band_mm: float) -> float:
    """Fraction of the boundary voxels of ``mask`` lying within ``band_mm`` of the head surface."""
    surface = mask & ~ndimage.binary_erosion(mask)
    if not surface.any():
        return 1.0
    return float(np.count_nonzero(depth[surface] < band_mm) / np.count_nonzero(surface))


def brain_mask(
    magnitude: np.ndarray,
    *,
    voxel_size: Sequence[float],
    threshold: float | None = None,
    erode_mm: float = 0.0,
    fill_holes: bool = True,
    largest_component: bool = True,
    open_mm: float = 4.0,
    max_open_mm: float = 16.0,
    scalp_mm: float = 6.0,
    close_mm: float = 2.0,
    smooth_mm: float = 1.0,
    combine: EchoCombination = "rss",
) -> np.ndarray:
    """Magnitude-based brain mask (boolean ``[x, y, z]``).

    Parameters
    ----------
    magnitude
        3D or 4D ``[x, y, z, echo]`` magnitude (any units).
    voxel_size
        Voxel edge lengths (mm).
    threshold
        Foreground threshold as a fraction (0-1) of the robust maximum (99.5th percentile)
        of the smoothed, echo-combined magnitude; ``None`` chooses it automatically
        (:func:`robust_threshold`).
    erode_mm
        Final erosion radius (mm); 0 keeps the boundary found by the threshold.
    fill_holes
        Fill enclosed holes (3D, then slice-wise along each axis).
    largest_component
        Keep only the main connected component (brain). False keeps every component that
        survives the ``open_mm`` opening (bodies with several parts) and skips the adaptive
        radius search.
    open_mm, max_open_mm
        Radius range (mm) of the ball used to cut bridges (brain <-> scalp, face, neck). The
        smallest radius in ``open_mm, open_mm + 2, ... <= max_open_mm`` whose main component
        stays away from the head surface (at most 5% of its boundary within ``scalp_mm`` of
        the outside of the head) is used; ``max_open_mm <= open_mm`` fixes the radius.
    scalp_mm
        Depth (mm) of the outer band of the head (scalp) that a brain boundary should avoid.
    close_mm
        Radius (mm) of a closing that smooths the boundary and bridges small gaps.
    smooth_mm
        Gaussian sigma (mm) applied before thresholding.
    combine
        ``"rss"`` (root-sum-of-squares over echoes) or ``"first"`` echo.

    Images without scalp (skull-stripped, cropped) keep the smallest radius: their boundary
    touches the head surface at every radius, so no larger one is preferred.
    """
    sizes = check_voxel_size(voxel_size)
    image = combine_echoes(magnitude, combine)
    if min(smooth_mm, open_mm, max_open_mm, close_mm, erode_mm, scalp_mm) < 0:
        raise ValueError("smooth_mm, open_mm, max_open_mm, scalp_mm, close_mm and erode_mm "
                         "must be >= 0 mm.")
    if smooth_mm > 0:
        image = ndimage.gaussian_filter(image, sigma=smooth_mm / sizes, mode="nearest")
    if not np.any(image > image.min()):
        raise ValueError("magnitude is constant; cannot build a brain mask.")
    top = float(np.percentile(image, 99.5))
    if threshold is None:
        level = robust_threshold(image)
    else:
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(
                f"threshold is a fraction of the robust maximum in (0, 1), got {threshold}."
            )
        level = float(threshold) * top
    LOGGER.debug("brain_mask: threshold %.4g (%.3f of robust max)", level, level / top)
    foreground = image > level
    if not foreground.any():
        raise ValueError("no voxel above the mask threshold; lower the threshold.")

    structure = ndimage.generate_binary_structure(3, 1)
    if open_mm > 0:
        # Depth of every foreground voxel (mm): eroding by r keeps depth > r.
        inside = distance_mm(foreground, sizes, border_is_outside=True)
    radii = [open_mm]
    if largest_component and open_mm > 0 and max_open_mm > open_mm:
        radii = list(np.arange(open_mm, max_open_mm + 1e-6, 2.0))
        head = fill_mask_holes(foreground)
        head_depth = distance_mm(head, sizes, border_is_outside=True)

    candidates = []
    for radius in radii:
        core = inside > radius if radius > 0 else foreground
        labels, n_labels = ndimage.label(core, structure=structure)
        if n_labels == 0:
            break
        if largest_component and n_labels > 1:
            core = labels == _main_component(labels, n_labels, foreground)
        mask = dilate(core, radius, voxel_size=sizes) & foreground if radius > 0 else core
        if largest_component:
            # Dilation may touch a neighbouring fragment: keep the component of the core.
            labels, n_labels = ndimage.label(mask, structure=structure)
            if n_labels > 1:
                keep = np.bincount(labels[core & mask], minlength=n_labels + 1)
                keep[0] = 0
                mask = labels == int(np.argmax(keep))
        if len(radii) == 1:
            candidates.append((radius, 0.0, mask))
            break
        fraction = _outer_band_fraction(mask, head_depth, scalp_mm)
        candidates.append((radius, fraction, mask))
        LOGGER.debug("brain_mask: opening %.1f mm, outer-band boundary fraction %.3f",
                     radius, fraction)
        if fraction <= 0.05:
            break
    if not candidates:
        LOGGER.warning("brain_mask: the %.1f mm opening removed everything; skipping it.",
                       open_mm)
        candidates.append((0.0, 0.0, foreground))
    radius, fraction, mask = candidates[-1]
    if len(candidates) > 1 and fraction > 0.05:
        best = min(candidates, key=lambda item: item[1])
        radius, fraction, mask = best if best[1] <= 0.5 * candidates[0][1] else candidates[0]
    LOGGER.info("brain_mask: threshold %.4g, opening radius %.1f mm", level, radius)

    if close_mm > 0:
        margin = int(np.ceil(close_mm / sizes.min())) + 1
        padded = np.pad(mask, margin, constant_values=False)
        closed = erode(dilate(padded, close_mm, voxel_size=sizes), close_mm, voxel_size=sizes)
        inner = tuple(slice(margin, -margin) for _ in range(3))
        mask = closed[inner] | mask
    if fill_holes:
        mask = fill_mask_holes(mask)
    if erode_mm > 0:
        mask = erode(mask, erode_mm, voxel_size=sizes)
    return mask


def mask_from_image(image: np.ndarray) -> np.ndarray:
    """Boolean mask from a provided mask image (voxels > 0.5; NaN counts as outside)."""
    data = np.asarray(image, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"a mask image must be 3D, got shape {data.shape}.")
    return np.nan_to_num(data, nan=0.0) > 0.5


def body_mask(
    magnitude: np.ndarray,
    *,
    voxel_size: Sequence[float],
    threshold: float | None = None,
    erode_mm: float = 0.0,
    fill_holes: bool = True,
    min_part_ml: float = 1.0,
    smooth_mm: float = 1.0,
    combine: EchoCombination = "rss",
) -> np.ndarray:
    """Signal mask of limbs and trunks (boolean ``[x, y, z]``), several disconnected parts.

    Threshold of the smoothed, echo-combined magnitude (automatic :func:`log_threshold`,
    or ``threshold`` as a fraction of the 99.5th percentile), connected parts smaller than
    ``min_part_ml`` (mL) removed (noise specks), enclosed holes filled (3D, then slice-wise
    along each axis: marrow inside a dark cortical shell, vessels) when ``fill_holes``, and a
    final erosion of ``erode_mm`` (mm). Unlike :func:`brain_mask` nothing is cut: no scalp.
    """
    sizes = check_voxel_size(voxel_size)
    if min(smooth_mm, erode_mm, min_part_ml) < 0:
        raise ValueError("smooth_mm, erode_mm and min_part_ml must be >= 0.")
    image = combine_echoes(magnitude, combine)
    if smooth_mm > 0:
        image = ndimage.gaussian_filter(image, sigma=smooth_mm / sizes, mode="nearest")
    if not np.any(image > image.min()):
        raise ValueError("magnitude is constant; cannot build a body mask.")
    if threshold is None:
        level = log_threshold(image)
    else:
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(
                f"threshold is a fraction of the robust maximum in (0, 1), got {threshold}.")
        level = float(threshold) * float(np.percentile(image, 99.5))
    mask = image > level
    labels, n_labels = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 1))
    if n_labels > 1:
        counts = np.bincount(labels.ravel())
        counts[0] = 0
        keep = counts * float(np.prod(sizes)) / 1000.0 >= min_part_ml
        if not keep.any():
            keep[np.argmax(counts)] = True
        mask = keep[labels]
    if fill_holes:
        mask = fill_mask_holes(mask)
    if erode_mm > 0:
        mask = erode(mask, erode_mm, voxel_size=sizes)
    n_parts = ndimage.label(mask)[1]
    LOGGER.info("body_mask: threshold %.4g, %d part(s), %d voxels", level, n_parts,
                int(mask.sum()))
    return mask
