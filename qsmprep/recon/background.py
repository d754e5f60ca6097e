"""Background field removal: total field (ppm) on a mask -> local (tissue) field (ppm).

Methods (METHODS.md section 3):

- ``vsharp``: variable-radius spherical mean value filtering with TSVD deconvolution.
- ``sharp``: single-radius SHARP (the V-SHARP machinery with one radius).
- ``pdf``: projection onto dipole fields, weighted least squares by CG on a padded grid.
- ``lbv``: Laplacian boundary value, a 7-point Poisson problem on the mask solved by
  preconditioned CG on a sparse matrix.

Every function takes the total field in ppm of B0 on the voxel grid ``[x, y, z]`` (values
outside ``mask`` are ignored), the voxel size in mm and returns ``(local_ppm, mask_out)``:
a float32 local field in ppm that is zero outside ``mask_out``, the (possibly eroded) mask
on which it is valid. ``remove`` dispatches on a method name (the CLI choice).
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable, Sequence

import numpy as np
import scipy.fft
import scipy.ndimage as ndi
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from qsmprep.recon.dipole import dipole_kernel, kspace_grid, padded_shape

LOGGER = logging.getLogger("qsmprep")

__all__ = [
    "METHODS",
    "lbv",
    "mask_bounding_box",
    "pdf",
    "remove",
    "sharp",
    "sphere_kernel",
    "vsharp",
]


# --------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------
def _check_inputs(field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float]):
    field = np.asarray(field)
    mask = np.asarray(mask)
    if field.ndim != 3:
        raise ValueError(f"field must be a 3D array [x, y, z], got shape {field.shape}")
    if mask.shape != field.shape:
        raise ValueError(f"mask shape {mask.shape} differs from field shape {field.shape}")
    vox = np.asarray(voxel_size, dtype=float).ravel()
    if vox.size != 3 or not np.all(np.isfinite(vox)) or np.any(vox <= 0):
        raise ValueError(f"voxel_size must be three positive numbers (mm), got {voxel_size!r}")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("mask is empty")
    field = np.where(mask, np.nan_to_num(field.astype(np.float32, copy=False)), 0).astype(
        np.float32
    )
    return field, mask, vox


def _check_b0(b0_direction: Sequence[float]) -> np.ndarray:
    b = np.asarray(b0_direction, dtype=float).ravel()
    if b.size != 3 or not np.all(np.isfinite(b)) or np.linalg.norm(b) == 0:
        raise ValueError(f"b0_direction must be a non-zero 3-vector, got {b0_direction!r}")
    return b / np.linalg.norm(b)


def mask_bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Slices of the smallest box holding every ``True`` voxel of ``mask``."""
    idx = np.nonzero(np.asarray(mask))
    if idx[0].size == 0:
        raise ValueError("mask is empty")
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)


def _embed(arr: np.ndarray, shape: Sequence[int], offset: Sequence[int]) -> np.ndarray:
    out = np.zeros(shape, dtype=arr.dtype)
    out[tuple(slice(o, o + n) for o, n in zip(offset, arr.shape))] = arr
    return out


def _uncrop(arr: np.ndarray, box: tuple[slice, ...], shape: Sequence[int]) -> np.ndarray:
    out = np.zeros(shape, dtype=arr.dtype)
    out[box] = arr
    return out


def sphere_kernel(
    shape: Sequence[int], voxel_size: Sequence[float], radius_mm: float
) -> tuple[np.ndarray, int]:
    """Normalised spherical mean value kernel of radius ``radius_mm`` (mm) on an FFT grid.

    The sphere (voxel centres with ``sum((i_k d_k)^2) <= r^2``) is centred at the grid origin
    with periodic wrap-around, so its FFT is real. Returns ``(kernel, n_voxels)``.
    """
    vox = np.asarray(voxel_size, dtype=float)
    half = np.floor(radius_mm / vox + 1e-9).astype(int)
    if np.any(2 * half + 1 > np.asarray(shape)):
        raise ValueError(f"sphere of radius {radius_mm} mm does not fit in the grid {shape}")
    axes = [np.arange(-h, h + 1) * d for h, d in zip(half, vox)]
    ball = (
        axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    ) <= radius_mm**2 * (1 + 1e-9)
    count = int(ball.sum())
    kernel = np.zeros(shape, dtype=np.float32)
    idx = np.nonzero(ball)
    coords = tuple((i - h) % n for i, h, n in zip(idx, half, shape))
    kernel[coords] = 1.0 / count
    return kernel, count


def _moment_correction(voxel_size: np.ndarray, radius_mm: float) -> np.ndarray:
    """Coefficients ``c_a`` that make the discrete sphere's second moments isotropic.

    For a harmonic field ``h`` the spherical mean error ``S * h - h ~ 1/2 sum_a M_a h_aa``
    (``h_aa`` the second derivative along axis ``a``) vanishes only if the second moments
    ``M_a = sum S x_a^2`` (mm^2) are equal, which a voxelised sphere on an anisotropic grid
    violates. Subtracting ``sum_a c_a D_a`` (``D_a``
    the unscaled second difference along axis ``a``) with ``c_a = (M_a - mean M) / (2 d_a^2)``
    restores the mean value property to second order.
    """
    half = np.floor(radius_mm / voxel_size + 1e-9).astype(int)
    axes = [np.arange(-h, h + 1) * d for h, d in zip(half, voxel_size)]
    sq = [a**2 for a in axes]
    ball = (sq[0][:, None, None] + sq[1][None, :, None] + sq[2][None, None, :]) <= radius_mm**2 * (
        1 + 1e-9
    )
    count = ball.sum()
    moments = np.array(
        [
            (ball.sum(axis=(1, 2)) * sq[0]).sum() / count,
            (ball.sum(axis=(0, 2)) * sq[1]).sum() / count,
            (ball.sum(axis=(0, 1)) * sq[2]).sum() / count,
        ]
    )
    return 0.5 * (moments - moments.mean()) / voxel_size**2


def _correction_symbol(shape, voxel_size, coeffs) -> np.ndarray:
    """rfftn-space symbol of ``-sum_a c_a D_a``: ``sum_a 2 c_a (1 - cos(2 pi k_a d_a))``."""
    out = np.zeros([1, 1, 1], dtype=np.float64)
    for k, d, c in zip(kspace_grid(shape, voxel_size), voxel_size, coeffs):
        out = out + 2.0 * c * (1.0 - np.cos(2.0 * np.pi * k * d))
    return out.astype(np.float32)


def default_radii(voxel_size: Sequence[float], r_max_mm: float = 12.0) -> np.ndarray:
    """V-SHARP radii (mm): ``r_max_mm`` down to one (largest) voxel edge, in steps of one
    voxel edge but >= 1 mm."""
    r_min = float(np.max(voxel_size))
    step = max(r_min, 1.0)
    radii = np.arange(r_max_mm, r_min - 1e-6, -step)
    if radii.size == 0 or radii[-1] > r_min + 1e-6:
        radii = np.append(radii, r_min)
    return radii


# --------------------------------------------------------------------------------------
# SHARP / V-SHARP
# --------------------------------------------------------------------------------------
def vsharp(
    field_ppm: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    radii_mm: Sequence[float] | None = None,
    threshold: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """V-SHARP background removal (Wu et al. 2012; Li et al. 2011).

    For radii ``r_max > ... > r_min`` (mm; default 12 mm down to the largest voxel edge in
    steps of that edge, at least 1 mm) each voxel takes the high-passed field
    ``(delta - S_r) * f`` of the largest sphere that fits inside the mask; the result is
    deconvolved with the TSVD inverse of the largest kernel ``1 - S_rmax(k)`` (zero where
    ``|1 - S| <= threshold``). Spheres are voxel sets in mm; on anisotropic grids their
    second moments are equalised by a small 7-point correction so that harmonic (background)
    fields are still removed exactly to second order.

    Parameters
    ----------
    field_ppm : total field (ppm), ``[x, y, z]``.
    mask : tissue mask.
    voxel_size : voxel edge lengths (mm); spheres are built in mm on the anisotropic grid.
    radii_mm : sphere radii (mm), any order; each must hold more than the centre voxel.
    threshold : TSVD truncation of the deconvolution kernel.

    Returns
    -------
    local_ppm : float32 local field (ppm), zero outside the eroded mask.
    eroded_mask : ``mask`` eroded by the smallest sphere.
    """
    field, mask, vox = _check_inputs(field_ppm, mask, voxel_size)
    if radii_mm is None:
        radii = default_radii(vox)
    else:
        radii = np.unique(np.asarray(radii_mm, dtype=float).ravel())[::-1]
        if radii.size == 0 or np.any(~np.isfinite(radii)) or radii.min() < vox.min():
            raise ValueError(
                f"radii_mm must be finite and >= the smallest voxel edge ({vox.min()} mm), "
                f"got {radii_mm!r}"
            )
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")

    box = mask_bounding_box(mask)
    f = field[box]
    m = mask[box]
    # Margin: the largest sphere on each side keeps the erosion test and the high-pass free
    # of wrap-around (a wider margin changed the local field by < 1% on the test phantoms)
    r_vox = np.ceil(radii.max() / vox).astype(int)
    shape = padded_shape(f.shape, 2 * r_vox)
    offset = r_vox
    f_pad = _embed(f, shape, offset)
    m_pad = _embed(m.astype(np.float32), shape, offset)

    f_k = scipy.fft.rfftn(f_pad)
    m_k = scipy.fft.rfftn(m_pad)
    local = np.zeros(shape, dtype=np.float32)
    assigned = np.zeros(shape, dtype=bool)
    inverse = None
    eroded = None
    for r in radii:
        kernel, count = sphere_kernel(shape, vox, float(r))
        if count < 2:
            raise ValueError(f"radius {r} mm holds a single voxel; use a larger radius")
        s_k = scipy.fft.rfftn(kernel).real.astype(np.float32)
        del kernel
        # erosion: voxels whose whole (binary) sphere lies inside the mask
        eroded = scipy.fft.irfftn(m_k * s_k, s=shape, overwrite_x=True) > 1.0 - 0.5 / count
        eroded &= m_pad > 0.5
        # high-pass with the moment-corrected sphere (identical for isotropic voxels)
        coeffs = _moment_correction(vox, float(r))
        if np.any(np.abs(coeffs) > 1e-12):
            s_k = s_k + _correction_symbol(shape, vox, coeffs)
        high = f_pad - scipy.fft.irfftn(f_k * s_k, s=shape, overwrite_x=True)
        new = eroded & ~assigned
        local[new] = high[new]
        assigned |= new
        if inverse is None:
            c_k = 1.0 - s_k
            with np.errstate(divide="ignore"):
                inverse = np.where(np.abs(c_k) > threshold, 1.0 / c_k, 0.0).astype(np.float32)
    assert inverse is not None and eroded is not None
    if not eroded.any():
        raise ValueError(
            f"the mask vanishes after erosion by {radii.min()} mm; use smaller radii"
        )
    local = scipy.fft.irfftn(scipy.fft.rfftn(local) * inverse, s=shape, overwrite_x=True)
    core = tuple(slice(o, o + n) for o, n in zip(offset, f.shape))
    final_mask = eroded[core]
    out = np.where(final_mask, local[core], 0).astype(np.float32)
    return _uncrop(out, box, mask.shape), _uncrop(final_mask, box, mask.shape)


def sharp(
    field_ppm: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    radius_mm: float = 6.0,
    threshold: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """SHARP (Schweser et al. 2011): one sphere of ``radius_mm`` (mm), TSVD ``threshold``.

    Returns the float32 local field (ppm) and the mask eroded by the sphere.
    """
    return vsharp(
        field_ppm, mask, voxel_size=voxel_size, radii_mm=[radius_mm], threshold=threshold
    )


# --------------------------------------------------------------------------------------
# PDF
# --------------------------------------------------------------------------------------
def _normalised_weight(weight: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
    if weight is None:
        return mask.astype(np.float32)
    w = np.asarray(weight, dtype=np.float32)
    if w.shape != mask.shape:
        raise ValueError(f"weight shape {w.shape} differs from mask shape {mask.shape}")
    w = np.where(mask & np.isfinite(w), np.abs(w), 0).astype(np.float32)
    mean = float(w[mask].mean())
    if mean <= 0:
        raise ValueError("weight is zero everywhere inside the mask")
    return w / mean


def weight_from_noise(noise: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """PDF data weight: 1/noise inside ``mask`` (noise in any field unit), 0 elsewhere."""
    noise = np.asarray(noise, dtype=np.float32)
    usable = np.asarray(mask, dtype=bool) & np.isfinite(noise) & (noise > 0)
    return np.where(usable, 1.0 / np.where(usable, noise, 1.0), 0.0).astype(np.float32)


def pdf(
    field_ppm: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    weight: np.ndarray | None = None,
    tol: float = 1e-3,
    max_iter: int = 100,
    pad: int = 40,
) -> tuple[np.ndarray, np.ndarray]:
    """Projection onto dipole fields (Liu et al. 2011).

    Solves ``min_x ||W M (f - D * (Mbar x))||^2`` for background sources ``x`` (ppm) outside
    the mask by conjugate gradients on the normal equations, on the mask's bounding box
    padded by ``pad`` voxels per side (then to a fast FFT size), and returns
    ``f_l = M (f - D * Mbar x)``.

    Parameters
    ----------
    field_ppm : total field (ppm).
    mask : tissue mask.
    voxel_size : mm.  b0_direction : unit B0 vector in voxel axes.
    weight : data weight inside the mask (e.g. 1/noise or magnitude), normalised to mean 1.
    tol : stop when the normal-equation residual falls below ``tol`` times its start value.
    max_iter : CG iteration cap.  pad : background-source margin (voxels), at least 40.

    Returns
    -------
    local_ppm : float32 local field (ppm), zero outside ``mask``; and ``mask``.
    """
    field, mask, vox = _check_inputs(field_ppm, mask, voxel_size)
    b0 = _check_b0(b0_direction)
    if int(pad) < 0:
        raise ValueError(f"pad must be >= 0 voxels, got {pad}")
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"tol must be > 0 and max_iter >= 1, got {tol}, {max_iter}")
    w_full = _normalised_weight(weight, mask)

    box = mask_bounding_box(mask)
    f = field[box]
    m = mask[box]
    pad = int(pad)
    shape = padded_shape(f.shape, 2 * pad)
    offset = [(s - n) // 2 for s, n in zip(shape, f.shape)]
    m_pad = _embed(m, shape, offset)
    outside = ~m_pad
    w_pad = _embed(w_full[box], shape, offset)
    w2 = w_pad * w_pad
    kernel = dipole_kernel(shape, vox, b0)

    def conv(x: np.ndarray) -> np.ndarray:
        return scipy.fft.irfftn(scipy.fft.rfftn(x) * kernel, s=shape, overwrite_x=True)

    def normal(x: np.ndarray) -> np.ndarray:
        # Mbar D M W^2 M D Mbar x
        y = conv(x * outside) * w2
        return conv(y) * outside

    b = conv(_embed(f, shape, offset) * w2) * outside
    x = np.zeros(shape, dtype=np.float32)
    r = b.copy()
    p = r.copy()
    rr = float(np.vdot(r, r))
    rr0 = rr
    it = 0
    if rr0 > 0:
        for it in range(1, max_iter + 1):
            q = normal(p)
            alpha = rr / float(np.vdot(p, q))
            x += np.float32(alpha) * p
            r -= np.float32(alpha) * q
            rr_new = float(np.vdot(r, r))
            if np.sqrt(rr_new / rr0) < tol:
                rr = rr_new
                break
            p *= np.float32(rr_new / rr)
            p += r
            rr = rr_new
    LOGGER.debug(
        "PDF: %d CG iterations, relative residual %.2e", it, np.sqrt(rr / max(rr0, 1e-300))
    )
    background = conv(x)
    core = tuple(slice(o, o + n) for o, n in zip(offset, f.shape))
    local = np.where(m, f - background[core], 0).astype(np.float32)
    return _uncrop(local, box, mask.shape), mask.copy()


# --------------------------------------------------------------------------------------
# LBV
# --------------------------------------------------------------------------------------
def lbv(
    field_ppm: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    tol: float = 1e-3,
    max_iter: int = 500,
    peel: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Laplacian boundary value background removal (Zhou et al. 2014).

    The background field is harmonic inside the mask and equals the total field on the
    mask's boundary layer: ``lap f_b = 0`` on the interior voxels (whose six neighbours lie
    in the mask), ``f_b = f`` on the boundary layer; equivalently ``lap f_l = lap f`` inside
    and ``f_l = 0`` on the boundary layer. The anisotropic 7-point Laplacian (mm spacing) is
    a sparse SPD system solved by CG (relative residual ``tol``, at most ``max_iter``
    iterations) with an additive multilevel preconditioner (Jacobi on a hierarchy of 2x2x2
    aggregations, direct solve on the coarsest). The interior is then peeled by ``peel``
    voxel layers.

    Returns the float32 local field (ppm), zero outside the returned interior mask.
    """
    field, mask, vox = _check_inputs(field_ppm, mask, voxel_size)
    if peel < 0:
        raise ValueError(f"peel must be >= 0, got {peel}")
    box = mask_bounding_box(mask)
    # one voxel of zero margin so every neighbour index exists
    f = np.pad(field[box], 1)
    m = np.pad(mask[box], 1)
    interior = ndi.binary_erosion(m, structure=ndi.generate_binary_structure(3, 1))
    if not interior.any():
        raise ValueError("the mask has no interior voxels")
    local = _lbv_solve(f, m, interior, vox, tol=tol, max_iter=max_iter)
    out_mask = interior
    if peel:
        out_mask = ndi.binary_erosion(
            interior, structure=ndi.generate_binary_structure(3, 1), iterations=int(peel)
        )
    local = np.where(out_mask, local, 0).astype(np.float32)
    inner = tuple(slice(1, -1) for _ in range(3))
    return (
        _uncrop(local[inner], box, mask.shape),
        _uncrop(out_mask[inner], box, mask.shape),
    )


def _lbv_solve(
    f: np.ndarray,
    m: np.ndarray,
    interior: np.ndarray,
    vox: np.ndarray,
    *,
    tol: float,
    max_iter: int,
) -> np.ndarray:
    """Solve ``lap f_l = lap f`` on ``interior`` with ``f_l = 0`` elsewhere (float64 CG)."""
    shape = f.shape
    n = int(interior.sum())
    index = np.full(shape, -1, dtype=np.int32 if n < 2**31 - 1 else np.int64)
    index[interior] = np.arange(n)
    idx_flat = index.ravel()
    h2 = 1.0 / vox**2
    flat_idx = np.flatnonzero(interior)
    strides = [shape[1] * shape[2], shape[2], 1]
    f_flat = f.ravel()
    # right-hand side: -lap f at interior voxels (f known on the whole mask)
    rhs = 2.0 * h2.sum() * f_flat[flat_idx].astype(np.float64)
    # CSR rows with up to 7 entries in increasing column order (index is monotone in the
    # flat position): -axis0, -axis1, -axis2, centre, +axis2, +axis1, +axis0
    offsets = [(-strides[0], 0), (-strides[1], 1), (-strides[2], 2), (0, -1)]
    offsets += [(strides[2], 2), (strides[1], 1), (strides[0], 0)]
    cols = np.empty((n, 7), dtype=idx_flat.dtype)
    vals = np.empty((n, 7), dtype=np.float64)
    for slot, (step, axis) in enumerate(offsets):
        nb = flat_idx + step
        if axis < 0:
            cols[:, slot] = idx_flat[nb]
            vals[:, slot] = 2.0 * h2.sum()
            continue
        rhs -= h2[axis] * f_flat[nb]
        cols[:, slot] = idx_flat[nb]
        vals[:, slot] = -h2[axis]
    valid = cols >= 0
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(valid.sum(axis=1), out=indptr[1:])
    a = sp.csr_matrix((vals[valid], cols[valid], indptr), shape=(n, n))
    precond = _lbv_preconditioner(a, interior, index, vox)
    iterations = [0]

    def count(_):
        iterations[0] += 1

    sol, info = spla.cg(a, rhs, rtol=tol, maxiter=max_iter, M=precond, callback=count)
    if info > 0:
        LOGGER.warning("LBV: CG did not reach tol=%g in %d iterations", tol, max_iter)
    LOGGER.debug("LBV: %d unknowns, %d CG iterations", n, iterations[0])
    out = np.zeros(shape, dtype=np.float32)
    out[interior] = sol.astype(np.float32)
    return out


def _lbv_preconditioner(a: sp.csr_matrix, interior, index, vox) -> spla.LinearOperator:
    """Additive multilevel preconditioner: Jacobi on every level of a hierarchy of 2x2x2
    aggregations (Galerkin coarse operators) and a direct solve on the coarsest level."""
    levels = []  # (diag_inv, prolongation to the finer level)
    coords = np.stack(np.nonzero(interior), axis=1)
    mat = a
    while mat.shape[0] > 20000 and len(levels) < 8:
        coords = coords // 2
        dims = coords.max(axis=0) + 1
        uniq, agg = np.unique(np.ravel_multi_index(coords.T, dims), return_inverse=True)
        n_fine = mat.shape[0]
        p = sp.csr_matrix(
            (np.ones(n_fine), agg.ravel(), np.arange(n_fine + 1)), shape=(n_fine, uniq.size)
        )
        levels.append((1.0 / mat.diagonal(), p))
        mat = (p.T @ mat @ p).tocsr()
        coords = np.stack(np.unravel_index(uniq, dims), axis=1)
    coarse_solve = spla.factorized(mat.tocsc())

    def apply(r: np.ndarray) -> np.ndarray:
        residuals = [r]
        for _, p in levels:
            residuals.append(p.T @ residuals[-1])
        z = coarse_solve(residuals[-1])
        for (diag_inv, p), res in zip(reversed(levels), reversed(residuals[:-1])):
            z = diag_inv * res + p @ z
        return z

    n = a.shape[0]
    return spla.LinearOperator((n, n), matvec=apply, dtype=np.float64)


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------
METHODS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "vsharp": vsharp,
    "sharp": sharp,
    "pdf": pdf,
    "lbv": lbv,
}


def remove(
    field_ppm: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    method: str = "vsharp",
    **params,
) -> tuple[np.ndarray, np.ndarray]:
    """Remove the background field with ``method`` (one of ``METHODS``).

    ``voxel_size`` (mm) and ``b0_direction`` are passed to the methods that take them;
    ``params`` must be keyword arguments that the chosen method accepts.
    Returns ``(local_ppm, mask_out)``.
    """
    try:
        func = METHODS[method]
    except KeyError:
        raise ValueError(
            f"unknown background removal method {method!r}; choose one of {sorted(METHODS)}"
        ) from None
    accepted = inspect.signature(func).parameters
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"background removal method {method!r} does not accept {unknown}; "
            f"it accepts {sorted(k for k in accepted if k not in ('field_ppm', 'mask'))}"
        )
    kwargs = dict(params)
    kwargs["voxel_size"] = voxel_size
    if "b0_direction" in accepted:
        kwargs["b0_direction"] = b0_direction
    return func(field_ppm, mask, **kwargs)
