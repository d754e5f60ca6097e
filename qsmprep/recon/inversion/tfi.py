"""Total field inversion: susceptibility from the total field, without background removal.

Two-step QSM (background removal, then inversion) assigns every part of the field that
sources outside the mask *could* produce to the background, including the part of the
tissue's own field with that property. Where strong sources border the tissue (air, cortical
bone, fat around a limb cut by the field of view) that part is large: on the leg phantom of
``qsmprep.simulate.body`` PDF, LBV and V-SHARP removed 25-56% of the exact tissue field, and
the trabecular ROI means came out 0.17-0.35 ppm off. Total field inversion (Liu Z et al.,
Magn Reson Med 2017;78:303-315) estimates the tissue and the background sources together, so
the prior on the tissue decides how the ambiguous part is shared.

Here the total field ``f`` (ppm) is inverted by the weighted-TV ADMM of ``tv_admm`` on a
padded grid on which chi is free everywhere::

    min_chi 1/2 ||W (D chi - f)||^2 + lam ||G grad chi||_1

with data weights ``W`` only in the mask, ``G = 1`` where the mask has signal and
``G = source_weight`` (default 0) on the voxels without data: outside the mask (air, the
body beyond the field of view) and on the mask's signal voids (cortical bone, whose data
weight from the field noise is below ``void_fraction`` of the mean). Those voxels hold the
background sources and are constrained by nothing but the field they explain, as in PDF.
TFI's preconditioner, which lets the background sources grow faster than the tissue in
its Gauss-Newton iterations, is replaced by this weighting (ADMM's chi update is exact
in k-space, so a preconditioner would not change its iterates).
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from qsmprep.recon.background import PdfSolution, pdf_sources

from ._common import _check, _Grid, data_weights
from .tv import DEFAULT_TV_MU2, _admm_tv, _check_admm, linear_z2_step

#: margin of background sources around the mask's box (fraction per axis; cut axes 1.0)
DEFAULT_TFI_PAD_FRACTION = 0.5
#: ADMM penalty of the gradient split, times lam (``tv_admm``: 300). Its proximal term holds
#: the free background sources near their previous value, so a smaller one lets them move:
#: RC2 head (1.5 mm, 3 T, TFI on the 3 mm-eroded mask, 500 iterations) NRMSE on the whole
#: mask / 3 mm inside it 118 / 46% at 300, 73 / 27% at 30, 58 / 26% at 10; on the legs the
#: trabecular ROI errors stay 0.03 ppm (rms over the leg 0.031 / 0.059 ppm at 30).
TFI_MU1_FACTOR = 30.0


def signal_voids(weight: np.ndarray, mask: np.ndarray, void_fraction: float) -> np.ndarray:
    """Mask voxels whose (mean-1) data weight is below ``void_fraction``."""
    return np.asarray(mask, dtype=bool) & (weight < np.float32(void_fraction))


def tfi(
    total_ppm: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    magnitude: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    lam: float | None = None,
    source_weight: float = 0.0,
    void_fraction: float = 0.1,
    mu1: float | None = None,
    mu2: float = DEFAULT_TV_MU2,
    max_iter: int = 500,
    tol: float = 1e-4,
    edge_fraction: float | None = None,
    edge_weight: float = 0.1,
    pad_fraction: float = DEFAULT_TFI_PAD_FRACTION,
    warm_start: bool = False,
    backend: Literal["auto", "numba", "numpy"] = "auto",
) -> np.ndarray:
    """Total field inversion by weighted-TV ADMM (see the module docstring).

    Parameters
    ----------
    total_ppm : total field (ppm) inside ``mask``; no background removal.
    mask : the object's mask (signal voids such as cortical bone included).
    voxel_size : mm.  b0_direction : unit B0 vector in voxel axes.
    magnitude, noise : data weights W (``data_weights``: 1/noise, else magnitude, else mask;
        mean 1 in the mask).
    lam : TV weight; default ``noise_scaled_lambda`` (0.15 x median field noise in ppm).
    source_weight : TV weight, relative to the tissue's, on the voxels without data (outside
        the mask and the signal voids); 0 leaves the background sources free.
    void_fraction : mask voxels with W below this (of mean-1 weights) are signal voids.
    mu1 : ADMM penalty of the gradient split (default ``TFI_MU1_FACTOR`` x lam).
    mu2, edge_fraction, edge_weight, backend : as ``tv_admm``.
    max_iter, tol : ADMM stops after ``max_iter`` iterations or at a relative chi change
        below ``tol`` (leg phantom chain, trabecular ROI error 0.023 / 0.021 / 0.022 /
        0.023 ppm after 150 / 300 / 500 / 1000 iterations; before the TV weight of a
        difference became the lesser of its two voxels', 0.074 / 0.048 / 0.036 / 0.030).
    pad_fraction : margin for background sources around the mask's bounding box.
    warm_start : start the background sources from PDF's fit (``pdf_sources`` with the data
        weights; ~5 s at 1.5 mm). ADMM moves the free sources slowly (see
        ``TFI_MU1_FACTOR``), which matters at a brain's boundary: RC2 head, 1.5 mm, 3 T,
        250 / 500 iterations, NRMSE on the whole 3 mm-eroded mask 135 / 73% from zero,
        33.5 / 32.7% from PDF's sources (on the voxels iSMV keeps 23%; iSMV + TV 33.6%). But
        PDF's sources carry part of the tissue field, which stays: on the legs the trabecular
        ROI error rose 0.031 -> 0.055 ppm (48 mm) and 0.009 -> 0.033 (96 mm, true field), so
        it is off by default (body data).

    Returns float32 chi (ppm) in ``mask`` (the voids hold their source estimate), zero
    outside. Like every inversion, its mean is arbitrary: reference it.
    """
    field, mask, vox, b0 = _check(total_ppm, mask, voxel_size, b0_direction)
    if not (np.isfinite(source_weight) and source_weight >= 0):
        raise ValueError(f"source_weight must be >= 0, got {source_weight}")
    if not 0.0 <= void_fraction < 1.0:
        raise ValueError(f"void_fraction must be in [0, 1), got {void_fraction}")
    lam, mu1, kernels = _check_admm(lam, noise, mask, mu1, mu2, max_iter, tol, backend,
                                    mu1_factor=TFI_MU1_FACTOR)
    weight = data_weights(mask, magnitude, noise)
    voids = signal_voids(weight, mask, void_fraction)
    tv_weight = np.where(voids, np.float32(source_weight), np.float32(1.0))
    chi0 = None
    if warm_start:
        sources = pdf_sources(field, mask, voxel_size=vox, b0_direction=b0, weight=weight)
        chi0 = _on_grid(sources, _Grid(mask, pad_fraction))
    return _admm_tv(
        field, mask, vox, b0, weight=weight, magnitude=magnitude, lam=lam, mu1=mu1, mu2=mu2,
        max_iter=max_iter, tol=tol, edge_fraction=edge_fraction, edge_weight=edge_weight,
        pad_fraction=pad_fraction, kernels=kernels, z2_step=linear_z2_step(mu2, kernels),
        label="TFI", tv_weight=tv_weight, outside_weight=float(source_weight), chi0=chi0,
    )


def _on_grid(sources: PdfSolution, grid: _Grid) -> np.ndarray:
    """PDF's sources copied onto the inversion's padded grid (zero where it has none)."""
    out = np.zeros(grid.shape, dtype=np.float32)
    src, dst = [], []
    for axis in range(3):
        start = grid.box[axis].start - grid.offset[axis]  # volume index of grid voxel 0
        lo = max(sources.origin[axis], start)
        hi = min(sources.origin[axis] + sources.chi.shape[axis], start + grid.shape[axis])
        src.append(slice(lo - sources.origin[axis], hi - sources.origin[axis]))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = sources.chi[tuple(src)]
    return out
