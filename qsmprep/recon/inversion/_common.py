"""Shared pieces of the dipole inversions: padded FFT grid, input checks, weights."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmprep.recon.background import mask_bounding_box
from qsmprep.recon.dipole import kspace_grid, padded_shape

# --------------------------------------------------------------------------------------
class _Grid:
    """Mask bounding box embedded in a zero-padded FFT grid."""

    def __init__(self, mask: np.ndarray, pad_fraction: float):
        if pad_fraction < 0:
            raise ValueError(f"pad_fraction must be >= 0, got {pad_fraction}")
        self.full_shape = mask.shape
        self.box = mask_bounding_box(mask)
        self.box_shape = tuple(s.stop - s.start for s in self.box)
        margin = [int(np.ceil(pad_fraction * n)) for n in self.box_shape]
        self.shape = padded_shape(self.box_shape, margin)
        self.offset = tuple((s - n) // 2 for s, n in zip(self.shape, self.box_shape))
        self.core = tuple(slice(o, o + n) for o, n in zip(self.offset, self.box_shape))

    def embed(self, arr: np.ndarray, dtype=np.float32) -> np.ndarray:
        out = np.zeros(self.shape, dtype=dtype)
        out[self.core] = arr[self.box]
        return out

    def extract(self, arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = np.zeros(self.full_shape, dtype=np.float32)
        out[self.box] = arr[self.core]
        out[~mask] = 0
        return out


def _check(local_ppm, mask, voxel_size, b0_direction):
    field = np.asarray(local_ppm)
    if field.ndim != 3:
        raise ValueError(f"local field must be a 3D array [x, y, z], got shape {field.shape}")
    mask = np.asarray(mask)
    if mask.shape != field.shape:
        raise ValueError(f"mask shape {mask.shape} differs from field shape {field.shape}")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("mask is empty")
    vox = np.asarray(voxel_size, dtype=float).ravel()
    if vox.size != 3 or not np.all(np.isfinite(vox)) or np.any(vox <= 0):
        raise ValueError(f"voxel_size must be three positive numbers (mm), got {voxel_size!r}")
    b0 = np.asarray(b0_direction, dtype=float).ravel()
    if b0.size != 3 or not np.all(np.isfinite(b0)) or np.linalg.norm(b0) == 0:
        raise ValueError(f"b0_direction must be a non-zero 3-vector, got {b0_direction!r}")
    field = np.where(mask, np.nan_to_num(field.astype(np.float32, copy=False)), 0)
    return field.astype(np.float32), mask, vox, b0 / np.linalg.norm(b0)


def _gradient_symbol(shape, vox) -> np.ndarray:
    """``|E(k)|^2 = sum_j (2 - 2 cos(2 pi k_j d_j)) / d_j^2`` (1/mm^2), rfftn half-space."""
    axes = kspace_grid(shape, vox)
    out = 0.0
    for k, d in zip(axes, vox):
        out = out + ((2.0 - 2.0 * np.cos(2.0 * np.pi * k * d)) / d**2).astype(np.float32)
    return np.asarray(out, dtype=np.float32)


def _normalised_weight(w, mask, name) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.shape != mask.shape:
        raise ValueError(f"{name} shape {w.shape} differs from mask shape {mask.shape}")
    w = np.where(mask & np.isfinite(w), np.abs(w), 0).astype(np.float32)
    mean = float(w[mask].mean())
    if not mean > 0:
        raise ValueError(f"{name} is zero everywhere inside the mask")
    return w / np.float32(mean)


def data_weights(
    mask: np.ndarray, magnitude: np.ndarray | None = None, noise: np.ndarray | None = None
) -> np.ndarray:
    """Data-fidelity weights inside ``mask``, normalised to mean 1 (zero outside).

    ``noise`` (field noise standard deviation, any unit) gives ``1/noise``; otherwise
    ``magnitude`` gives the magnitude itself; otherwise the mask.
    """
    mask = np.asarray(mask, dtype=bool)
    if noise is not None:
        n = np.asarray(noise, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(np.isfinite(n) & (n > 0), 1.0 / n, 0.0)
        # cap at 5x the median so that a few near-zero noise values do not dominate
        med = float(np.median(inv[mask])) if mask.any() else 0.0
        if med > 0:
            inv = np.minimum(inv, 5.0 * med)
        return _normalised_weight(inv, mask, "1/noise")
    if magnitude is not None:
        return _normalised_weight(magnitude, mask, "magnitude")
    return mask.astype(np.float32)


def edge_weights(
    magnitude: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    edge_fraction: float = 0.1,
    edge_weight: float = 0.1,
) -> np.ndarray:
    """Gradient (TV) weight from the magnitude image: ``edge_weight`` on the
    ``edge_fraction`` of mask voxels with the largest magnitude gradient, 1 elsewhere."""
    if not 0 < edge_fraction < 1 or not 0 <= edge_weight <= 1:
        raise ValueError("edge_fraction must lie in (0, 1) and edge_weight in [0, 1]")
    mag = np.where(mask, np.asarray(magnitude, dtype=np.float32), 0)
    vox = np.asarray(voxel_size, dtype=float)
    grads = np.gradient(mag, *vox)
    gnorm = np.sqrt(sum(g * g for g in grads))
    thresh = np.quantile(gnorm[mask], 1.0 - edge_fraction)
    return np.where(mask & (gnorm > thresh), edge_weight, 1.0).astype(np.float32)


