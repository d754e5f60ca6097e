"""Morphology-enabled dipole inversions (MEDI family).

- ``medi``: MEDI (Liu et al. 2011/2012): ``min ||M_G grad chi||_1 + lam ||W (e^{i D chi} -
  e^{i phi})||^2`` by Gauss-Newton with lagged diffusivity and CG inner solves; options SMV
  preconditioning, merit re-weighting and the MEDI+0 CSF zero reference; starts from the
  closed-form L2 solution (or from zero, the toolbox's start, for wrapped fields).
- ``l2_medi``: ``min ||W (D chi - f)||^2 + lam ||M_G grad chi||^2`` by preconditioned CG.
- ``tv_medi``: ``min ||M_G grad chi||_1 + lam ||W (D chi - f)||^2`` by Nesterov's method on the
  Huber-smoothed L1 norm with continuation of the smoothing (NESTA, Becker et al. 2011),
  preconditioned in k-space.

The last two follow the calcaneus study (METHODS.md section 7): data weight = the
maximum-intensity projection of a multi-echo magnitude over TE, edge mask = the 40% of tissue
voxels with the strongest magnitude gradient, weighted 0.01.

Gradients are periodic forward differences on the padded FFT grid (ppm/mm); the TV terms are
anisotropic (sum over the three axes), as in the MEDI toolbox. The voxel-wise operators are
fused numba kernels when numba is installed (numpy otherwise, same results).
"""

from __future__ import annotations

import logging
from typing import Literal, Sequence

import numpy as np
import scipy.fft

from qsmprep.recon._jit import lazy_kernels
from qsmprep.recon.dipole import check_voxel_size, dipole_kernel

from ._common import _cg, _check, _gradient_symbol, _Grid, data_weights
from .nonlinear import DEFAULT_PHASE_SCALE, _check_phase_scale

LOGGER = logging.getLogger("qsmprep")

Backend = Literal["auto", "numba", "numpy"]

# Regularisation defaults for local fields in ppm, gradients in ppm/mm and data weights
# normalised to mean 1 in the mask; measured on the brain phantom of tests/_phantoms.py
# (64^3 2 mm, 96^3 1.5 mm; field noise 0.001-0.004 ppm / magnitude) and the QSM challenge 2.0
# head labels at 2.56 mm (see the docstrings and tests/test_inversion_medi.py).
DEFAULT_MEDI_LAMBDA = 1000.0
DEFAULT_L2MEDI_LAMBDA = 0.1
DEFAULT_TVMEDI_LAMBDA = 500.0
DEFAULT_MEDI_EDGE_FRACTION = 0.3
DEFAULT_CSF_RATIO = 0.1


# --------------------------------------------------------------------------------------
# voxel-wise operators: numba kernels (optional) and numpy fallbacks
# --------------------------------------------------------------------------------------


@lazy_kernels()
def _numba_kernels(jit):
    """Compile-on-demand kernels; ``None`` when numba is unavailable."""

    @jit
    def wlap(x, p, inv_d, out):  # pragma: no cover
        # out = sum_j D_j^T (p_j D_j x); D_j x = (x[i + e_j] - x[i]) / d_j, periodic
        nx, ny, nz = x.shape
        npj = p.shape[0]
        for i in range(nx):
            ip = i + 1 if i + 1 < nx else 0
            im = i - 1 if i > 0 else nx - 1
            for j in range(ny):
                jp = j + 1 if j + 1 < ny else 0
                jm = j - 1 if j > 0 else ny - 1
                for k in range(nz):
                    kp = k + 1 if k + 1 < nz else 0
                    km = k - 1 if k > 0 else nz - 1
                    c = x[i, j, k]
                    a0 = 0
                    a1 = 1 if npj > 1 else 0
                    a2 = 2 if npj > 1 else 0
                    s = (p[a0, im, j, k] * (c - x[im, j, k])
                         - p[a0, i, j, k] * (x[ip, j, k] - c)) * inv_d[0] * inv_d[0]
                    s += (p[a1, i, jm, k] * (c - x[i, jm, k])
                          - p[a1, i, j, k] * (x[i, jp, k] - c)) * inv_d[1] * inv_d[1]
                    s += (p[a2, i, j, km] * (c - x[i, j, km])
                          - p[a2, i, j, k] * (x[i, j, kp] - c)) * inv_d[2] * inv_d[2]
                    out[i, j, k] = s

    @jit
    def diffusivity(x, g, eps, inv_d, p):  # pragma: no cover
        # p_j = g^2 / sqrt((g D_j x)^2 + eps); returns sum_j |g D_j x| (the weighted TV)
        nx, ny, nz = x.shape
        tv = 0.0
        for i in range(nx):
            ip = i + 1 if i + 1 < nx else 0
            for j in range(ny):
                jp = j + 1 if j + 1 < ny else 0
                for k in range(nz):
                    kp = k + 1 if k + 1 < nz else 0
                    gg = g[i, j, k]
                    c = x[i, j, k]
                    u0 = gg * (x[ip, j, k] - c) * inv_d[0]
                    u1 = gg * (x[i, jp, k] - c) * inv_d[1]
                    u2 = gg * (x[i, j, kp] - c) * inv_d[2]
                    p[0, i, j, k] = gg * gg / np.sqrt(u0 * u0 + eps)
                    p[1, i, j, k] = gg * gg / np.sqrt(u1 * u1 + eps)
                    p[2, i, j, k] = gg * gg / np.sqrt(u2 * u2 + eps)
                    tv += abs(u0) + abs(u1) + abs(u2)
        return tv

    @jit
    def huber(x, g, mu, inv_d, out):  # pragma: no cover
        # out = sum_j D_j^T (g clip(g D_j x / mu, -1, 1)); returns sum_j h_mu(g D_j x)
        nx, ny, nz = x.shape
        inv_mu = 1.0 / mu
        val = 0.0
        for i in range(nx):
            ip = i + 1 if i + 1 < nx else 0
            im = i - 1 if i > 0 else nx - 1
            for j in range(ny):
                jp = j + 1 if j + 1 < ny else 0
                jm = j - 1 if j > 0 else ny - 1
                for k in range(nz):
                    kp = k + 1 if k + 1 < nz else 0
                    km = k - 1 if k > 0 else nz - 1
                    c = x[i, j, k]
                    gg = g[i, j, k]
                    s = 0.0
                    # own forward differences
                    u = gg * (x[ip, j, k] - c) * inv_d[0]
                    q = min(max(u * inv_mu, -1.0), 1.0)
                    val += u * u * 0.5 * inv_mu if abs(u) <= mu else abs(u) - 0.5 * mu
                    s -= gg * q * inv_d[0]
                    u = gg * (x[i, jp, k] - c) * inv_d[1]
                    q = min(max(u * inv_mu, -1.0), 1.0)
                    val += u * u * 0.5 * inv_mu if abs(u) <= mu else abs(u) - 0.5 * mu
                    s -= gg * q * inv_d[1]
                    u = gg * (x[i, j, kp] - c) * inv_d[2]
                    q = min(max(u * inv_mu, -1.0), 1.0)
                    val += u * u * 0.5 * inv_mu if abs(u) <= mu else abs(u) - 0.5 * mu
                    s -= gg * q * inv_d[2]
                    # backward neighbours' forward differences
                    gm = g[im, j, k]
                    u = gm * (c - x[im, j, k]) * inv_d[0]
                    s += gm * min(max(u * inv_mu, -1.0), 1.0) * inv_d[0]
                    gm = g[i, jm, k]
                    u = gm * (c - x[i, jm, k]) * inv_d[1]
                    s += gm * min(max(u * inv_mu, -1.0), 1.0) * inv_d[1]
                    gm = g[i, j, km]
                    u = gm * (c - x[i, j, km]) * inv_d[2]
                    s += gm * min(max(u * inv_mu, -1.0), 1.0) * inv_d[2]
                    out[i, j, k] = s
        return val

    @jit
    def nesta_step(x, grad, acc, x0, step, weight, tau):  # pragma: no cover
        # NESTA: y = x - step g; acc += weight g; z = x0 - step acc; x = tau z + (1 - tau) y
        for n in range(x.size):
            g = grad[n]
            a = acc[n] + weight * g
            acc[n] = a
            x[n] = tau * (x0[n] - step * a) + (1.0 - tau) * (x[n] - step * g)

    return (wlap, diffusivity, huber, nesta_step)


def _fdiff(x, axis, inv_d):
    return (np.roll(x, -1, axis=axis) - x) * np.float32(inv_d)


def _fdiff_t(q, axis, inv_d):
    return (np.roll(q, 1, axis=axis) - q) * np.float32(inv_d)


def _np_wlap(x, p, inv_d, out):
    out.fill(0)
    for j in range(3):
        out += _fdiff_t(p[j if p.shape[0] > 1 else 0] * _fdiff(x, j, inv_d[j]), j, inv_d[j])


def _np_diffusivity(x, g, eps, inv_d, p):
    tv = 0.0
    g2 = g * g
    for j in range(3):
        u = g * _fdiff(x, j, inv_d[j])
        tv += float(np.abs(u).sum(dtype=np.float64))
        p[j] = g2 / np.sqrt(u * u + np.float32(eps))
    return tv


def _np_nesta_step(x, grad, acc, x0, step, weight, tau):
    acc += weight * grad
    y = x - step * grad
    y *= 1 - tau
    x[...] = x0 - step * acc
    x *= tau
    x += y


def _np_huber(x, g, mu, inv_d, out):
    out.fill(0)
    val = 0.0
    for j in range(3):
        u = g * _fdiff(x, j, inv_d[j])
        a = np.abs(u)
        val += float(np.where(a <= mu, u * u / (2 * mu), a - mu / 2).sum(dtype=np.float64))
        out += _fdiff_t(g * np.clip(u / np.float32(mu), -1, 1), j, inv_d[j])
    return val


class _Ops:
    """Voxel-wise operators with the chosen backend."""

    def __init__(self, backend: Backend):
        if backend not in ("auto", "numba", "numpy"):
            raise ValueError(f"backend must be 'auto', 'numba' or 'numpy', got {backend!r}")
        kernels = None if backend == "numpy" else _numba_kernels()
        if backend == "numba" and kernels is None:
            raise ValueError("backend='numba' requested but numba is not installed")
        if kernels is None:
            self.wlap, self.diffusivity, self.huber = _np_wlap, _np_diffusivity, _np_huber
            self.nesta_step = _np_nesta_step
        else:
            self.wlap, self.diffusivity, self.huber, self.nesta_step = kernels


# --------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------
def _magnitude_3d(magnitude, mask_shape, combine: str) -> np.ndarray | None:
    """A 3D magnitude from a 3D or 4D ``[x, y, z, echo]`` one: RSS or maximum over echoes."""
    if magnitude is None:
        return None
    mag = np.asarray(magnitude, dtype=np.float32)
    if mag.ndim == 4 and mag.shape[:3] == tuple(mask_shape):
        mag = np.nan_to_num(mag)
        if combine == "max":
            return np.abs(mag).max(axis=3)
        return np.sqrt(np.sum(mag * mag, axis=3, dtype=np.float32))
    if mag.shape != tuple(mask_shape):
        raise ValueError(
            f"magnitude shape {mag.shape} differs from the mask shape {tuple(mask_shape)} "
            "(3D, or 4D with echoes last)"
        )
    return np.nan_to_num(mag)


def edge_mask(
    magnitude: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    edge_fraction: float = DEFAULT_MEDI_EDGE_FRACTION,
) -> np.ndarray:
    """Binary edge mask from the magnitude gradient (True = edge).

    The magnitude (3D, or 4D ``[x, y, z, echo]``: root-sum-of-squares over echoes) is set to
    zero outside ``mask``; the edges are the ``edge_fraction`` of mask voxels with the largest
    forward-difference gradient norm (per mm). Ties at the threshold (e.g. a noise-free
    piecewise-constant image with fewer edges) count as non-edges, so the fraction can be
    smaller. MEDI's "percentage 0.9" (gradient components above the threshold = 90% of the
    mask voxels) corresponds to ``edge_fraction = 0.3``.
    """
    mask = np.asarray(mask, dtype=bool)
    if not 0 < edge_fraction < 1:
        raise ValueError(f"edge_fraction must lie in (0, 1), got {edge_fraction}")
    if not mask.any():
        raise ValueError("mask is empty")
    mag = _magnitude_3d(magnitude, mask.shape, "rss")
    vox = check_voxel_size(voxel_size)
    mag = np.where(mask, mag, 0).astype(np.float32)
    g2 = np.zeros(mag.shape, dtype=np.float32)
    for axis, d in enumerate(vox):
        diff = np.zeros_like(mag)
        sl = [slice(None)] * 3
        sl[axis] = slice(0, -1)
        diff[tuple(sl)] = np.diff(mag, axis=axis) / np.float32(d)
        g2 += diff * diff
    thresh = np.quantile(g2[mask], 1.0 - edge_fraction)
    return mask & (g2 > thresh)


def _regularisation_weight(
    magnitude, mask, grid, vox, edge_fraction, edge_weight, edge_image=None
) -> np.ndarray:
    """M_G on the padded grid: ``edge_weight`` on edge voxels, 1 elsewhere (also outside)."""
    source = edge_image if edge_image is not None else magnitude
    g = np.ones(grid.shape, dtype=np.float32)
    if source is None or edge_fraction == 0:
        return g
    edges = edge_mask(source, mask, voxel_size=vox, edge_fraction=edge_fraction)
    g[grid.core] = np.where(edges[grid.box], np.float32(edge_weight), np.float32(1.0))
    return g


class _DipoleOp:
    """``x -> D x`` (real FFT convolution) on the padded grid, optionally with an SMV
    high-pass ``(1 - S) D``."""

    def __init__(self, shape, vox, b0, smv_symbol=None):
        self.shape = shape
        d = dipole_kernel(shape, vox, b0)
        if smv_symbol is not None:
            d = (d * (1 - smv_symbol)).astype(np.float32)
        self.d = d
        self.dmax = float(np.abs(d).max())

    def __call__(self, x: np.ndarray) -> np.ndarray:
        spec = scipy.fft.rfftn(x)
        spec *= self.d
        return scipy.fft.irfftn(spec, s=self.shape, overwrite_x=True)


def _closed_form_l2(dop: _DipoleOp, f: np.ndarray, vox, lam: float) -> np.ndarray:
    """Closed-form Tikhonov (gradient) inversion of the padded field ``f`` (ppm)."""
    den = dop.d * dop.d + np.float32(lam) * _gradient_symbol(dop.shape, vox)
    with np.errstate(divide="ignore", invalid="ignore"):
        filt = np.where(den > 0, dop.d / den, 0).astype(np.float32)
    spec = scipy.fft.rfftn(f)
    spec *= filt
    return scipy.fft.irfftn(spec, s=dop.shape, overwrite_x=True)


def _check_common(lam, max_iter, tol):
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if int(max_iter) < 1 or not tol >= 0:
        raise ValueError(f"max_iter must be >= 1 and tol >= 0, got {max_iter}, {tol}")


def _check_edges(edge_fraction, edge_weight):
    if not 0 <= edge_fraction < 1:
        raise ValueError(f"edge_fraction must lie in [0, 1), got {edge_fraction}")
    if not 0 <= edge_weight <= 1:
        raise ValueError(f"edge_weight must lie in [0, 1], got {edge_weight}")


# --------------------------------------------------------------------------------------
# MEDI (nonlinear data term, Gauss-Newton)
# --------------------------------------------------------------------------------------
def medi(
    local_ppm: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    magnitude: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    lam: float = DEFAULT_MEDI_LAMBDA,
    phase_scale: float = DEFAULT_PHASE_SCALE,
    edge_fraction: float = DEFAULT_MEDI_EDGE_FRACTION,
    epsilon: float = 1e-7,
    max_iter: int = 10,
    tol: float = 0.1,
    cg_max_iter: int = 100,
    cg_tol: float = 0.01,
    smv_radius_mm: float | None = None,
    merit: bool = False,
    csf_mask: np.ndarray | None = None,
    lam_csf: float | None = None,
    init: Literal["l2", "zero"] = "l2",
    pad_fraction: float = 0.25,
    backend: Backend = "auto",
) -> np.ndarray:
    """Morphology-enabled dipole inversion (MEDI, Liu et al. 2012) with a nonlinear data term.

    Solves ``min_chi ||M_G grad chi||_1 + lam / s^2 ||W (e^{i s D chi} - e^{i s f})||^2``
    (``f`` local field in ppm, ``s = phase_scale`` rad/ppm, so that ``lam`` acts like the
    weight of ``||W (D chi - f)||^2`` in ppm and does not depend on ``s``; ``s`` sets only
    the nonlinearity: phase wraps of ``s f`` are harmless) by Gauss-Newton: each outer
    iteration solves ``(R + 2 lam D W^2 D) dchi = -(R chi + 2 lam D W^2 sin(s(D chi - f))/s)``
    with ``R = grad^T M_G diag(1/sqrt(|M_G grad chi|^2 + epsilon)) M_G grad`` (lagged
    diffusivity, per axis) by CG (``cg_tol``, ``cg_max_iter``), and stops after ``max_iter``
    iterations or when ``||dchi|| / ||chi|| < tol`` (MEDI toolbox: 0.01, 100, 10, 0.1).

    Parameters
    ----------
    local_ppm : local field (ppm).  mask : tissue mask.  voxel_size : mm.
    b0_direction : unit B0 vector in voxel axes.
    magnitude : 3D or 4D ``[x, y, z, echo]`` (RSS over echoes); gives the edge mask M_G
        (``edge_mask``: the ``edge_fraction`` of mask voxels with the strongest magnitude
        gradient are not regularised) and, without ``noise``, the data weight. Without a
        magnitude M_G = 1 (plain TV).
    noise : field noise standard deviation map (any unit); W = mask / noise normalised to
        mean 1 (``data_weights``), else the normalised magnitude, else the mask.
    lam : data-term weight for ppm fields and mean-1 weights (default 1000: the NRMSE
        optimum on the QSM challenge 2.0 head labels at 2.56 mm, field noise ~ 0.0025 ppm,
        and on the brain phantom at 0.001 ppm; noisier data want less, e.g. 250 at
        0.003 ppm). Comparable to ``1 / (2 lam)`` of ``tv_admm``. MEDI toolbox lambdas
        (phase in rad over ``delta_TE``) convert as ``lam = lam_toolbox * s_toolbox`` with
        ``s_toolbox = 2 pi CF delta_TE`` (rad/ppm).
    phase_scale : rad per ppm of the phase the data term sees, ``2 pi gamma_bar B0 TE``
        (``nonlinear.phase_scale(b0_tesla, te_s)``); default 3 T, TE 20 ms (16.05 rad/ppm).
    epsilon : lagged-diffusivity floor ((ppm/mm)^2); default 1e-7, the toolbox's 1e-6 in its
        rad units at ``s_toolbox`` ~ 3 rad/ppm. On the phantoms 1e-7 beat 1e-6 by 0.2-8
        points of NRMSE and 1e-5 was worse still.
    smv_radius_mm : SMV preconditioning (MEDI "smv"): the data term becomes
        ``W_e ((1 - S) D chi - (f - S f))`` with the sphere S of this radius and W restricted
        to the mask eroded by the sphere; removes residual background fields.
    merit : model-error re-weighting (MEDI "merit"): after each outer iteration, voxels whose
        weighted residual exceeds 6 standard deviations get W divided by (residual / 6 sd)^2.
    csf_mask : MEDI+0 (Liu et al. 2018): adds ``lam_csf ||M_CSF (chi - mean_CSF chi)||^2``
        (uniform CSF) and references the result to zero mean in the CSF.
    lam_csf : default ``0.1 lam`` (the toolbox's lambda_CSF / lambda = 100 / 1000, which is
        invariant to the ppm/rad units change).
    init : start of the Gauss-Newton iterations. "l2" (default): the closed-form L2 solution
        of the field (gradient regulariser, 0.02 mm^2); it trusts the field to be unwrapped
        (as any background-removed local field is) and keeps the iterations in the right
        2 pi branch where ``s f`` exceeds pi: QSM challenge 2.0 labels at 1.28 mm (a
        -3.3 ppm calcification, 27 voxels with ``|s f| > pi``): NRMSE 25.4% against 40.1%
        from zero (tv_admm 28.2%). "zero" (the toolbox's start) depends on ``e^{i s f}``
        only: use it for wrapped fields. From zero the toolbox's loose stopping rule acts
        as extra regularisation (brain phantom at 0.003 ppm noise: 19.7% vs 31.5%).
    pad_fraction : zero-padding margin, a fraction of the mask's bounding box per axis.
    backend : "numba" (fused kernels), "numpy", or "auto".

    Returns float32 chi (ppm), zero outside ``mask``.
    """
    field, mask, vox, b0 = _check(local_ppm, mask, voxel_size, b0_direction)
    _check_common(lam, max_iter, tol)
    s = _check_phase_scale(phase_scale)
    _check_edges(edge_fraction, 0.0)
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if int(cg_max_iter) < 1 or not cg_tol > 0:
        raise ValueError(f"cg_max_iter must be >= 1 and cg_tol > 0, got {cg_max_iter}, {cg_tol}")
    if init not in ("l2", "zero"):
        raise ValueError(f"init must be 'l2' or 'zero', got {init!r}")
    ops = _Ops(backend)
    csf = None
    if csf_mask is not None:
        csf = np.asarray(csf_mask)
        if csf.shape != mask.shape:
            raise ValueError(f"csf_mask shape {csf.shape} differs from mask shape {mask.shape}")
        csf = csf.astype(bool) & mask
        if not csf.any():
            raise ValueError("csf_mask has no voxels inside the mask")
        lam_csf = DEFAULT_CSF_RATIO * lam if lam_csf is None else float(lam_csf)
        if not lam_csf >= 0:
            raise ValueError(f"lam_csf must be >= 0, got {lam_csf}")
    elif lam_csf is not None:
        raise ValueError("lam_csf needs a csf_mask")
    mag3 = _magnitude_3d(magnitude, mask.shape, "rss")

    grid = _Grid(mask, pad_fraction)
    shape = grid.shape
    f = grid.embed(field)
    data_mask = mask
    smv_symbol = None
    if smv_radius_mm is not None:
        from qsmprep.recon.background import sphere_kernel

        if not smv_radius_mm > 0:
            raise ValueError(f"smv_radius_mm must be > 0, got {smv_radius_mm}")
        kernel, _ = sphere_kernel(shape, vox, float(smv_radius_mm))
        smv_symbol = scipy.fft.rfftn(kernel).real.astype(np.float32)
        smooth = lambda a: scipy.fft.irfftn(
            scipy.fft.rfftn(a) * smv_symbol, s=shape
        ).astype(np.float32)
        f = f - smooth(f)
        eroded = smooth(grid.embed(mask)) > 0.999
        data_mask = grid.extract(eroded.astype(np.float32), mask) > 0.5
        if not data_mask.any():
            raise ValueError(f"the SMV sphere of {smv_radius_mm} mm erodes the whole mask")
        if noise is not None:
            n2 = np.where(mask, np.nan_to_num(np.asarray(noise, np.float32), posinf=0), 0) ** 2
            noise = np.sqrt(grid.extract(smooth(grid.embed(n2)), mask) + n2)
    weight = data_weights(data_mask, None if noise is not None else mag3, noise)
    w2 = grid.embed(weight)
    w2 *= w2
    g = _regularisation_weight(mag3, mask, grid, vox, edge_fraction, 0.0)
    dop = _DipoleOp(shape, vox, b0, smv_symbol)
    inv_d = np.asarray([1.0 / v for v in vox], dtype=np.float32)
    inside = grid.embed(mask, dtype=bool)
    csf_p = grid.embed(csf, dtype=bool) if csf is not None else None
    two_lam = np.float32(2 * lam)
    p = np.empty((3,) + shape, dtype=np.float32)
    scratch = np.empty(shape, dtype=np.float32)

    def csf_term(x):
        out = np.zeros(shape, dtype=np.float32)
        vals = x[csf_p]
        out[csf_p] = np.float32(2 * lam_csf) * (vals - vals.mean(dtype=np.float64))
        return out

    def apply_a(x):
        ops.wlap(x, p, inv_d, scratch)
        out = dop(w2 * dop(x))
        out *= two_lam
        out += scratch
        if csf_p is not None:
            out += csf_term(x)
        return out

    if init == "l2":  # of the field where there are data (the SMV-eroded mask with SMV)
        chi = np.ascontiguousarray(_closed_form_l2(dop, np.where(w2 > 0, f, 0), vox, 0.02))
    else:
        chi = np.zeros(shape, dtype=np.float32)
    it, ratio = 0, np.inf
    for it in range(1, int(max_iter) + 1):
        tv = ops.diffusivity(chi, g, np.float32(epsilon), inv_d, p)
        dchi = dop(chi)
        res = np.sin(np.float32(s) * (dchi - f)) / np.float32(s)
        grad = dop(w2 * res)
        grad *= two_lam
        ops.wlap(chi, p, inv_d, scratch)
        grad += scratch
        if csf_p is not None:
            grad += csf_term(chi)
        step, n_cg, relres = _cg(apply_a, -grad, tol=cg_tol, max_iter=int(cg_max_iter))
        chi += step
        norm = float(np.linalg.norm(chi[inside]))
        ratio = float(np.linalg.norm(step[inside])) / max(norm, 1e-30)
        if LOGGER.isEnabledFor(logging.DEBUG):
            data = float(np.sum(w2 * (1 - np.cos(s * (dchi - f))))) * 2 / s**2
            LOGGER.debug(
                "MEDI: iteration %d, TV %.4g, data %.4g, CG %d (residual %.2e), update %.3e",
                it, tv, data, n_cg, relres, ratio,
            )
        if merit:
            w2 = _merit_weights(w2, dop(chi) - f, s, grid.embed(data_mask, dtype=bool))
        if ratio < tol:
            break
    LOGGER.debug("MEDI: %d Gauss-Newton iterations, last update %.3e", it, ratio)
    out = grid.extract(chi, mask)
    if csf is not None:
        out = np.where(mask, out - np.float32(out[csf].mean(dtype=np.float64)), 0)
    return out.astype(np.float32)


def _merit_weights(w2, residual_ppm, s, inside) -> np.ndarray:
    """MEDI's model-error re-weighting: ``W /= max(1, |r - mean r| / (6 sd |r|))^2`` with the
    complex weighted residual ``r = W (e^{i s D chi} - e^{i s f})``."""
    w = np.sqrt(w2[inside])
    r = w * (np.exp(1j * s * residual_ppm[inside]) - 1)  # |e^{ia}-e^{ib}| = |e^{i(a-b)}-1|
    r = np.abs(r - r.mean())
    sd = float(r.std())
    if not sd > 0:
        return w2
    factor = np.maximum(r / (6 * sd), 1.0).astype(np.float32)
    out = w2.copy()
    out[inside] = w2[inside] / factor**4
    return out


# --------------------------------------------------------------------------------------
# linear MEDI variants of the calcaneus study
# --------------------------------------------------------------------------------------
def _study_weights(mask, magnitude, noise, grid):
    """Data weight W^2 on the padded grid: 1/noise, else the echo MIP of the magnitude,
    normalised to mean 1 in the mask, else the mask."""
    mip = _magnitude_3d(magnitude, mask.shape, "max")
    w = data_weights(mask, None if noise is not None else mip, noise)
    w2 = grid.embed(w)
    w2 *= w2
    return w2


def l2_medi(
    local_ppm: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    magnitude: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    lam: float = DEFAULT_L2MEDI_LAMBDA,
    edge_fraction: float = 0.4,
    edge_weight: float = 0.01,
    edge_image: np.ndarray | None = None,
    max_iter: int = 200,
    tol: float = 1e-3,
    pad_fraction: float = 0.25,
    backend: Backend = "auto",
) -> np.ndarray:
    """L2-MEDI: ``min_chi ||W (D chi - f)||^2 + lam ||M_G grad chi||^2`` by CG.

    Solves the normal equations ``(D W^2 D + lam grad^T M_G^2 grad) chi = D W^2 f`` with
    conjugate gradients preconditioned by the closed-form inverse
    ``F^-1 (D^2 + lam |E|^2)^-1 F`` (the exact inverse for W = M_G = 1); stops at relative
    residual ``tol`` or after ``max_iter`` iterations.

    Parameters
    ----------
    local_ppm : local field (ppm).  mask : tissue mask.  voxel_size : mm.
    b0_direction : unit B0 vector in voxel axes.
    magnitude : 3D or 4D ``[x, y, z, echo]``. Data weight W: ``1/noise`` if ``noise`` is
        given, else the maximum-intensity projection over echoes (the study's MIP scaled to
        [0, 1]; here normalised to mean 1 in the mask like every data weight, so ``lam``
        does not depend on the image scale), else the mask.
    lam : regularisation weight (mm^2 for ppm fields, mean-1 weights; default 0.1, the
        study's value, which is also the NRMSE optimum on the QSM challenge 2.0 head labels
        at 2.56 mm, field noise ~ 0.0025 ppm (0.03: +4.7, 0.3: +1.5 points). On the
        piecewise-constant brain phantom, whose magnitude edges are exactly the chi edges,
        larger values (0.3-3) do better still.
    edge_fraction, edge_weight : M_G = ``edge_weight`` on the ``edge_fraction`` of mask
        voxels with the strongest gradient of ``edge_image`` (default: the magnitude, RSS
        over echoes; the study used the opposed-phase |W - F| image), 1 elsewhere.
    pad_fraction : zero-padding margin, a fraction of the mask's bounding box per axis.

    Returns float32 chi (ppm), zero outside ``mask``.
    """
    field, mask, vox, b0 = _check(local_ppm, mask, voxel_size, b0_direction)
    _check_common(lam, max_iter, tol)
    _check_edges(edge_fraction, edge_weight)
    ops = _Ops(backend)
    grid = _Grid(mask, pad_fraction)
    shape = grid.shape
    f = grid.embed(field)
    w2 = _study_weights(mask, magnitude, noise, grid)
    g = _regularisation_weight(
        _magnitude_3d(magnitude, mask.shape, "rss"), mask, grid, vox, edge_fraction,
        edge_weight, _magnitude_3d(edge_image, mask.shape, "rss"),
    )
    g2 = (g * g)[None]
    dop = _DipoleOp(shape, vox, b0)
    inv_d = np.asarray([1.0 / v for v in vox], dtype=np.float32)
    scratch = np.empty(shape, dtype=np.float32)
    lam32 = np.float32(lam)
    den = dop.d * dop.d + lam32 * _gradient_symbol(shape, vox)
    with np.errstate(divide="ignore"):
        pre = np.where(den > 0, 1.0 / den, 0).astype(np.float32)

    def apply_a(x):
        ops.wlap(x, g2, inv_d, scratch)
        out = dop(w2 * dop(x))
        out += lam32 * scratch
        return out

    def precond(r):
        spec = scipy.fft.rfftn(r)
        spec *= pre
        return scipy.fft.irfftn(spec, s=shape, overwrite_x=True)

    b = dop(w2 * f)
    chi, it, relres = _cg(apply_a, b, tol=tol, max_iter=int(max_iter), precond=precond)
    LOGGER.debug("L2-MEDI: %d CG iterations, relative residual %.2e", it, relres)
    return grid.extract(chi, mask)


def tv_medi(
    local_ppm: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    magnitude: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    lam: float = DEFAULT_TVMEDI_LAMBDA,
    edge_fraction: float = 0.4,
    edge_weight: float = 0.01,
    edge_image: np.ndarray | None = None,
    mu: float = 1e-4,
    mu0: float = 1e-3,
    stages: int = 2,
    max_iter: int = 200,
    tol: float = 1e-5,
    pad_fraction: float = 0.25,
    backend: Backend = "auto",
) -> np.ndarray:
    """TV-MEDI: ``min_chi ||M_G grad chi||_1 + lam ||W (D chi - f)||^2`` by NESTA.

    Nesterov's method as in NESTA (Becker, Bobin & Candes 2011; unconstrained form) on the
    Huber-smoothed objective ``F_mu = sum h_mu(M_G grad chi) + lam ||W (D chi - f)||^2``
    (``h_mu(u) = u^2 / 2 mu`` for ``|u| <= mu``, ``|u| - mu / 2`` else; anisotropic): per
    iteration ``y = x - Q^-1 g``, ``z = x0 - Q^-1 sum_i (i + 1) / 2 g_i``,
    ``x = tau z + (1 - tau) y`` with ``tau = 2 / (k + 3)``. The prox-function is
    ``||x - x0||_Q^2 / 2`` with the k-space majoriser of the Hessian
    ``Q = max(M_G)^2 |E|^2 / mu + 2 lam max(W^2) D^2`` (instead of NESTA's ``L ||.||^2``):
    one more FFT pair per iteration, ~8x fewer iterations on the phantoms. Continuation:
    ``stages`` smoothing levels from ``mu0`` down to ``mu`` (ppm/mm), each warm-started
    (prox-centre) at the last, each stopped once the objective's mean relative change over
    the last 10 iterations is below ``tol`` or after ``max_iter / stages`` iterations. The
    first stage starts from the closed-form L2 solution (gradient regulariser, 0.02 mm^2).

    Parameters as ``l2_medi``, except ``lam``: data-term weight for ppm fields (default 500:
    the NRMSE optimum on the QSM challenge 2.0 head labels at field noise ~ 0.0025 ppm; 1000
    on the brain phantom at 0.001 ppm). The study's 0.03 belongs to another field scaling
    and is not transferable. ``mu``/``mu0``: final/initial smoothing (ppm/mm).

    Returns float32 chi (ppm), zero outside ``mask``.
    """
    field, mask, vox, b0 = _check(local_ppm, mask, voxel_size, b0_direction)
    _check_common(lam, max_iter, tol)
    _check_edges(edge_fraction, edge_weight)
    if not (0 < mu <= mu0):
        raise ValueError(f"need 0 < mu <= mu0, got mu={mu}, mu0={mu0}")
    if int(stages) < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    ops = _Ops(backend)
    grid = _Grid(mask, pad_fraction)
    shape = grid.shape
    f = grid.embed(field)
    w2 = _study_weights(mask, magnitude, noise, grid)
    g = _regularisation_weight(
        _magnitude_3d(magnitude, mask.shape, "rss"), mask, grid, vox, edge_fraction,
        edge_weight, _magnitude_3d(edge_image, mask.shape, "rss"),
    )
    dop = _DipoleOp(shape, vox, b0)
    inv_d = np.asarray([1.0 / v for v in vox], dtype=np.float32)
    e2 = _gradient_symbol(shape, vox) * np.float32(float(g.max()) ** 2)
    d2 = np.float32(2.0 * lam * float(w2.max())) * dop.d * dop.d
    two_lam = np.float32(2 * lam)
    tv_grad = np.empty(shape, dtype=np.float32)

    def objective_and_grad(x, mu_k):
        val = ops.huber(x, g, np.float32(mu_k), inv_d, tv_grad)
        res = dop(x) - f
        r = w2 * res  # W^2 (D x - f)
        data = float(np.dot(r.ravel(), res.ravel()))
        grad = dop(r)
        grad *= two_lam
        grad += tv_grad
        return val + lam * data, grad

    x = np.ascontiguousarray(_closed_form_l2(dop, f, vox, 0.02))  # warm start
    n_stage = int(stages)
    per_stage = max(1, int(max_iter) // n_stage)
    total = 0
    for stage in range(n_stage):
        mu_k = mu0 * (mu / mu0) ** ((stage + 1) / n_stage)
        q = e2 / np.float32(mu_k) + d2
        with np.errstate(divide="ignore"):
            q_inv = np.where(q > 0, 1.0 / q, 0).astype(np.float32)  # DC: zero gradient
        del q
        x0 = x.copy()
        acc = np.zeros(shape, dtype=np.float32)  # sum_i alpha_i Q^-1 grad F(x_i)
        history: list[float] = []
        for k in range(per_stage):
            fval, grad = objective_and_grad(x, mu_k)
            spec = scipy.fft.rfftn(grad)
            spec *= q_inv
            pgrad = scipy.fft.irfftn(spec, s=shape, overwrite_x=True)
            total += 1
            ops.nesta_step(
                x.ravel(), pgrad.ravel(), acc.ravel(), x0.ravel(), np.float32(1.0),
                np.float32((k + 1) / 2.0), np.float32(2.0 / (k + 3)),
            )
            history.append(fval)
            if len(history) > 10:
                mean = float(np.mean(history[-11:-1]))
                if abs(fval - mean) / max(abs(fval), 1e-30) < tol:
                    break
        LOGGER.debug(
            "TV-MEDI: stage %d, mu %.2e, %d iterations, objective %.6g", stage + 1, mu_k,
            k + 1, history[-1],
        )
    LOGGER.debug("TV-MEDI: %d iterations in total", total)
    return grid.extract(x, mask)
