"""Shared pieces of the dipole inversions: padded FFT grid, input checks, weights."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from qsmprep.recon.background import mask_bounding_box
from qsmprep.recon.dipole import check_voxel_size, kspace_grid, padded_shape

# --------------------------------------------------------------------------------------
#: zero-padding margin (fraction of the mask box) on axes where the mask touches the volume
#: edge. Leg phantom (qsmprep.simulate.body, 64x64x24, slab cut in z), TV from the exact
#: field of the phantom: trabecular ROI errors 0.16 ppm with 0.25, 0.009 ppm with 1.0
#: (benchmarks/body_chi_benchmark.py, RESULTS.md "Body chi").
TRUNCATED_PAD_FRACTION = 1.0


class _Grid:
    """Mask bounding box embedded in a zero-padded FFT grid."""

    def __init__(self, mask: np.ndarray, pad_fraction: float):
        if pad_fraction < 0:
            raise ValueError(f"pad_fraction must be >= 0, got {pad_fraction}")
        self.full_shape = mask.shape
        self.box = mask_bounding_box(mask)
        self.box_shape = tuple(s.stop - s.start for s in self.box)
        # an axis on which the mask reaches the volume's first or last slice is an object cut
        # by the field of view (limb or trunk slab): the cut faces' fields wrap around the
        # periodic grid unless the margin is about the box length (TRUNCATED_PAD_FRACTION)
        self.truncated = tuple(s.start == 0 or s.stop == n
                               for s, n in zip(self.box, self.full_shape))
        margin = [int(np.ceil((max(pad_fraction, TRUNCATED_PAD_FRACTION) if cut
                               else pad_fraction) * n))
                  for n, cut in zip(self.box_shape, self.truncated)]
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
    vox = check_voxel_size(voxel_size)
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




def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Inner product of two float32 arrays (BLAS sdot, blocked accumulation)."""
    return float(np.dot(a.ravel(), b.ravel()))


def _cg(apply_a, b: np.ndarray, x0: np.ndarray | None = None, *, tol: float,
        max_iter: int, precond=None) -> tuple[np.ndarray, int, float]:
    """(Preconditioned) conjugate gradients for a symmetric positive (semi)definite
    operator ``apply_a`` on float32 arrays.

    Stops at ``||b - A x|| <= tol ||b||`` or after ``max_iter`` iterations. ``precond``
    applies an approximate inverse of A. Returns ``(x, iterations, relative residual)``.
    """
    x = np.zeros_like(b) if x0 is None else x0.astype(b.dtype, copy=True)
    r = b - apply_a(x) if x0 is not None else b.copy()
    bnorm = np.sqrt(_dot(b, b))
    if bnorm == 0:
        return x, 0, 0.0
    z = precond(r) if precond is not None else r
    p = z.copy()
    rz = _dot(r, z)
    relres, it = np.sqrt(_dot(r, r)) / bnorm, 0
    while it < max_iter and relres > tol:
        it += 1
        ap = apply_a(p)
        pap = _dot(p, ap)
        if not pap > 0:
            break
        alpha = np.float32(rz / pap)
        x += alpha * p
        r -= alpha * ap
        relres = np.sqrt(_dot(r, r)) / bnorm
        if relres <= tol:
            break
        z = precond(r) if precond is not None else r
        rz_new = _dot(r, z)
        beta = np.float32(rz_new / rz)
        rz = rz_new
        p *= beta
        p += z
    return x, it, float(relres)

# --------------------------------------------------------------------------------------
# finite differences and Krylov least-squares solvers on arrays (float32 FFT operators)
# --------------------------------------------------------------------------------------
def _axis_slices(ndim: int, axis: int, a, b) -> tuple[slice, ...]:
    return tuple(slice(a, b) if i == axis else slice(None) for i in range(ndim))


def forward_gradient(u: np.ndarray, voxel_size, out: np.ndarray | None = None) -> np.ndarray:
    """Periodic forward differences ``(u[i+1] - u[i]) / d`` along each axis, stacked on a new
    first axis (ppm/mm for chi in ppm and ``voxel_size`` in mm)."""
    if out is None:
        out = np.empty((u.ndim,) + u.shape, dtype=np.float32)
    for j in range(u.ndim):
        n = u.shape[j]
        lo, hi = _axis_slices(u.ndim, j, 0, n - 1), _axis_slices(u.ndim, j, 1, None)
        np.subtract(u[hi], u[lo], out=out[j][lo])
        np.subtract(
            u[_axis_slices(u.ndim, j, 0, 1)], u[_axis_slices(u.ndim, j, n - 1, n)],
            out=out[j][_axis_slices(u.ndim, j, n - 1, n)],
        )
        out[j] *= np.float32(1.0 / voxel_size[j])
    return out


def forward_gradient_adjoint(
    g: np.ndarray, voxel_size, out: np.ndarray | None = None
) -> np.ndarray:
    """Adjoint of ``forward_gradient`` (minus the backward-difference divergence):
    ``sum_j (g_j[i-1] - g_j[i]) / d_j``."""
    nd = g.ndim - 1
    if out is None:
        out = np.empty(g.shape[1:], dtype=np.float32)
    out.fill(0)
    for j in range(nd):
        n = g.shape[j + 1]
        gj = g[j]
        lo, hi = _axis_slices(nd, j, 0, n - 1), _axis_slices(nd, j, 1, None)
        first, last = _axis_slices(nd, j, 0, 1), _axis_slices(nd, j, n - 1, n)
        s = np.float32(1.0 / voxel_size[j])
        out[hi] += s * (gj[lo] - gj[hi])
        out[first] += s * (gj[last] - gj[first])
    return out


def _norm(a: np.ndarray) -> float:
    return float(np.sqrt(np.vdot(a.ravel(), a.ravel()).real))


def lsqr(
    aprod: Callable[[np.ndarray], np.ndarray],
    rprod: Callable[[np.ndarray], np.ndarray],
    b: np.ndarray,
    *,
    max_iter: int,
    atol: float = 0.0,
    btol: float = 0.0,
) -> tuple[np.ndarray, int]:
    """LSQR (Paige & Saunders 1982) for ``min ||A x - b||`` with ``A`` given by the products
    ``aprod(x) = A x`` and ``rprod(u) = A^T u`` on arrays of any shape (float32 work arrays).

    Stops after ``max_iter`` iterations or at the standard tests
    ``||r|| <= btol ||b|| + atol ||A|| ||x||`` or ``||A^T r|| <= atol ||A|| ||r||``.
    Returns ``(x, iterations)``; ``x`` starts at zero.
    """
    u = np.array(b, dtype=np.float32)
    beta = _norm(u)
    v = rprod(u / np.float32(beta)) if beta > 0 else rprod(u)
    x = np.zeros_like(v)
    if beta == 0:
        return x, 0
    u /= np.float32(beta)
    alpha = _norm(v)
    if alpha == 0:
        return x, 0
    v /= np.float32(alpha)
    w = v.copy()
    phibar, rhobar = beta, alpha
    bnorm, anorm2, xnorm2 = beta, 0.0, 0.0
    it = 0
    for it in range(1, max_iter + 1):
        u = aprod(v) - np.float32(alpha) * u
        beta = _norm(u)
        if beta > 0:
            u /= np.float32(beta)
        anorm2 += alpha * alpha + beta * beta
        v = rprod(u) - np.float32(beta) * v
        alpha = _norm(v)
        if alpha > 0:
            v /= np.float32(alpha)
        rho = float(np.hypot(rhobar, beta))
        c, s = rhobar / rho, beta / rho
        theta = s * alpha
        rhobar = -c * alpha
        phi = c * phibar
        phibar = s * phibar
        x += np.float32(phi / rho) * w
        w = v - np.float32(theta / rho) * w
        xnorm2 = _norm(x) ** 2
        rnorm, arnorm, anorm = phibar, phibar * alpha * abs(c), np.sqrt(anorm2)
        if rnorm <= btol * bnorm + atol * anorm * np.sqrt(xnorm2):
            break
        if arnorm <= atol * anorm * rnorm:
            break
    return x, it


def lsmr(
    aprod: Callable[[np.ndarray], np.ndarray],
    rprod: Callable[[np.ndarray], np.ndarray],
    b: np.ndarray,
    *,
    max_iter: int,
    atol: float = 0.0,
    btol: float = 0.0,
) -> tuple[np.ndarray, int]:
    """LSMR (Fong & Saunders 2011) for ``min ||A x - b||``; same interface and stopping
    tests as ``lsqr`` (``||A^T r||`` decreases monotonically, safer for early stopping)."""
    u = np.array(b, dtype=np.float32)
    beta = _norm(u)
    if beta > 0:
        u /= np.float32(beta)
    v = rprod(u)
    x = np.zeros_like(v)
    alpha = _norm(v)
    if beta == 0 or alpha == 0:
        return x, 0
    v /= np.float32(alpha)
    zetabar, alphabar = alpha * beta, alpha
    rho, rhobar, cbar, sbar = 1.0, 1.0, 1.0, 0.0
    h = v.copy()
    hbar = np.zeros_like(v)
    # ||r|| estimation
    betadd, betad, rhodold, tautildeold, thetatilde, zeta = beta, 0.0, 1.0, 0.0, 0.0, 0.0
    anorm2 = alpha * alpha
    bnorm = beta
    it = 0
    for it in range(1, max_iter + 1):
        u = aprod(v) - np.float32(alpha) * u
        beta = _norm(u)
        if beta > 0:
            u /= np.float32(beta)
            v = rprod(u) - np.float32(beta) * v
            alpha = _norm(v)
            if alpha > 0:
                v /= np.float32(alpha)
        rhoold = rho
        rho = float(np.hypot(alphabar, beta))
        c, s = alphabar / rho, beta / rho
        thetanew = s * alpha
        alphabar = c * alpha
        rhobarold, zetaold = rhobar, zeta
        thetabar = sbar * rho
        rhotemp = cbar * rho
        rhobar = float(np.hypot(rhotemp, thetanew))
        cbar, sbar = rhotemp / rhobar, thetanew / rhobar
        zeta = cbar * zetabar
        zetabar = -sbar * zetabar
        hbar *= np.float32(-thetabar * rho / (rhoold * rhobarold))
        hbar += h
        x += np.float32(zeta / (rho * rhobar)) * hbar
        h *= np.float32(-thetanew / rho)
        h += v
        # estimate ||r||
        betahat, betadd = c * betadd, -s * betadd
        thetatildeold = thetatilde
        rhotildeold = float(np.hypot(rhodold, thetabar))
        ctildeold, stildeold = rhodold / rhotildeold, thetabar / rhotildeold
        thetatilde = stildeold * rhobar
        rhodold = ctildeold * rhobar
        betad = -stildeold * betad + ctildeold * betahat
        tautildeold = (zetaold - thetatildeold * tautildeold) / rhotildeold
        taud = (zeta - thetatilde * tautildeold) / rhodold
        rnorm = np.sqrt((betad - taud) ** 2 + betadd * betadd)
        anorm2 += beta * beta
        anorm = np.sqrt(anorm2)
        anorm2 += alpha * alpha
        arnorm = abs(zetabar)
        if rnorm <= btol * bnorm + atol * anorm * _norm(x):
            break
        if arnorm <= atol * anorm * rnorm:
            break
    return x, it
