"""Region-of-interest statistics of quantitative maps (pure functions on arrays).

A map (susceptibility in ppm, R2* in 1/s, fat fraction in %, any quantity) and a label image
on the same ``[x, y, z]`` voxel grid give, per label: the drawn voxel count, the voxels used
(drawn, inside the optional ``valid`` mask, finite map value), their volume (mm³), mean,
sample standard deviation (ddof = 1), median, minimum, maximum, 5th and 95th percentiles
(numpy's default linear interpolation) and the coefficient of variation ``SD / |mean|``
(unitless ratio). Statistics are in the map's unit. All labels are computed together with one
sort and ``np.bincount`` (no loop over voxels or labels).

ROIs drawn on another acquisition of the same participant are brought to the map's grid with
:func:`resample_labels` (nearest neighbour through both voxel-to-scanner affines, no
registration: the two grids must share the scanner space).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from scipy import ndimage

LOGGER = logging.getLogger("qsmprep")

#: Output columns of :func:`roi_statistics`, in order.
STATISTICS = ("roi_voxels", "n_voxels", "volume_mm3", "mean", "sd", "median", "min", "max",
              "p5", "p95", "cv")

__all__ = ["STATISTICS", "roi_statistics", "resample_labels", "same_grid", "voxel_volume"]


def voxel_volume(affine: np.ndarray) -> float:
    """Volume of one voxel (mm³) from a 4×4 voxel-to-scanner affine (mm)."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    return float(abs(np.linalg.det(affine[:3, :3])))


def roi_statistics(
    values: np.ndarray,
    labels: np.ndarray,
    index: Sequence[int] | None = None,
    *,
    voxel_volume_mm3: float,
    valid: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Statistics of ``values`` in every label of ``labels``.

    ``values``: map [x, y, z] (any unit; results in the same unit). ``labels``: integer label
    image of the same shape (0 = background; a boolean mask is label 1). ``index``: label ids
    to report (default: every non-zero label present, ascending). ``voxel_volume_mm3``: volume
    of one voxel (mm³). ``valid``: boolean mask of voxels where the map is defined (e.g. the
    QSM mask); voxels outside it or with a non-finite value are not used.

    Returns a dict of float64 arrays (one entry per label, keys ``index`` and
    :data:`STATISTICS`); statistics of labels with no usable voxel are NaN (``sd`` and ``cv``
    need two voxels).
    """
    values = np.asarray(values)
    labels = np.asarray(labels)
    if values.shape != labels.shape:
        raise ValueError(f"map shape {values.shape} and label image shape {labels.shape} "
                         "differ; resample the labels to the map grid first")
    if values.ndim != 3:
        raise ValueError(f"map must be 3D [x, y, z], got {values.ndim}D")
    if not voxel_volume_mm3 > 0:
        raise ValueError(f"voxel_volume_mm3 must be positive, got {voxel_volume_mm3!r}")
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    elif not np.issubdtype(labels.dtype, np.integer):
        rounded = np.rint(labels)
        if not np.array_equal(rounded, labels):
            raise ValueError("label image holds non-integer values; give integer labels")
        labels = rounded.astype(np.int64)
    flat_labels = labels.ravel()
    if index is None:
        index = np.unique(flat_labels)
        index = index[index != 0]
    index = np.asarray(index, dtype=np.int64).ravel()
    if index.size and np.unique(index).size != index.size:
        raise ValueError(f"duplicate label ids in index {index.tolist()}")
    m = index.size
    if m == 0:
        return {key: np.zeros(0) for key in ("index", *STATISTICS)}
    order = np.argsort(index)
    sorted_index = index[order]
    # position of each voxel's label in ``index`` (-1: not reported)
    where = np.clip(np.searchsorted(sorted_index, flat_labels), 0, m - 1)
    position = np.where(sorted_index[where] == flat_labels, order[where], -1)
    drawn = position >= 0
    roi_voxels = np.bincount(position[drawn], minlength=m).astype(np.float64)

    flat_values = values.ravel().astype(np.float64)
    use = drawn & np.isfinite(flat_values)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != values.shape:
            raise ValueError(f"valid mask shape {valid.shape} differs from map {values.shape}")
        use &= valid.ravel()
    pos = position[use]
    v = flat_values[use]
    counts = np.bincount(pos, minlength=m)
    n = counts.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(pos, weights=v, minlength=m) / n
        squares = np.bincount(pos, weights=(v - mean[pos]) ** 2, minlength=m)
        sd = np.sqrt(squares / (n - 1.0))
        sd[counts < 2] = np.nan
        cv = sd / np.abs(mean)
    sort = np.lexsort((v, pos))
    v_sorted = v[sort]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    present = counts > 0

    def quantile(q: float) -> np.ndarray:
        out = np.full(m, np.nan)
        h = (counts[present] - 1) * q
        low = np.floor(h).astype(np.int64)
        high = np.minimum(low + 1, counts[present] - 1)
        frac = h - low
        a = v_sorted[starts[present] + low]
        b = v_sorted[starts[present] + high]
        # the same two-sided linear interpolation as numpy's 'linear' method
        out[present] = np.where(frac >= 0.5, b - (b - a) * (1 - frac), a + (b - a) * frac)
        return out

    minimum = np.full(m, np.nan)
    maximum = np.full(m, np.nan)
    minimum[present] = v_sorted[starts[present]]
    maximum[present] = v_sorted[starts[present] + counts[present] - 1]
    return {
        "index": index.astype(np.float64),
        "roi_voxels": roi_voxels,
        "n_voxels": n,
        "volume_mm3": n * float(voxel_volume_mm3),
        "mean": mean,
        "sd": sd,
        "median": quantile(0.5),
        "min": minimum,
        "max": maximum,
        "p5": quantile(0.05),
        "p95": quantile(0.95),
        "cv": cv,
    }


def same_grid(
    affine_a: np.ndarray,
    shape_a: Sequence[int],
    affine_b: np.ndarray,
    shape_b: Sequence[int],
    *,
    tol_mm: float = 1e-3,
) -> bool:
    """True when two images share shape and voxel-to-scanner affine (within ``tol_mm`` mm)."""
    if tuple(int(s) for s in shape_a[:3]) != tuple(int(s) for s in shape_b[:3]):
        return False
    return bool(np.allclose(np.asarray(affine_a, float), np.asarray(affine_b, float),
                            atol=tol_mm, rtol=0.0))


def resample_labels(
    labels: np.ndarray,
    source_affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: Sequence[int],
) -> np.ndarray:
    """Nearest-neighbour resampling of a label image onto another grid of the same space.

    ``labels`` [x, y, z] with voxel-to-scanner ``source_affine`` (4×4, mm) are sampled at the
    centres of the ``target_shape`` grid of ``target_affine``; target voxels outside the
    source field of view get 0. Integer dtype is kept (booleans return uint8).
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"label image must be 3D, got shape {labels.shape}")
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    source_affine = np.asarray(source_affine, dtype=np.float64)
    target_affine = np.asarray(target_affine, dtype=np.float64)
    if source_affine.shape != (4, 4) or target_affine.shape != (4, 4):
        raise ValueError("affines must be 4x4")
    if abs(np.linalg.det(source_affine[:3, :3])) < 1e-12:
        raise ValueError("the label image's affine is singular; fix its header")
    matrix = np.linalg.inv(source_affine) @ target_affine  # target voxel -> source voxel
    target_shape = tuple(int(s) for s in target_shape[:3])
    if np.allclose(matrix[:3, :3], np.eye(3), atol=1e-6) and np.allclose(
            matrix[:3, 3], np.round(matrix[:3, 3]), atol=1e-6):
        # pure integer shift: exact copy (no interpolation ties)
        shift = np.round(matrix[:3, 3]).astype(int)
        out = np.zeros(target_shape, dtype=labels.dtype)
        src = [slice(max(s, 0), min(s + t, n)) for s, t, n in zip(shift, target_shape,
                                                                     labels.shape)]
        dst = [slice(sl.start - s, sl.stop - s) for sl, s in zip(src, shift)]
        if all(sl.stop > sl.start for sl in src):
            out[tuple(dst)] = labels[tuple(src)]
        return out
    return ndimage.affine_transform(labels, matrix[:3, :3], offset=matrix[:3, 3],
                                    output_shape=target_shape, order=0, mode="constant",
                                    cval=0, prefilter=False)
