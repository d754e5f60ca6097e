"""Automatic choice of the regularisation weight ``lam`` of a dipole inversion
(METHODS.md section 4, "Regularization choice").

- ``lcurve``: the corner (maximum curvature) of the L-curve
  ``(log ||W (D chi_lam - f)||, log R(chi_lam))``. For the closed-form L2 inversion both
  norms are evaluated in k-space for every ``lam`` without further FFTs (the exact norms of
  the functional it minimises on its padded grid); other methods are run over a coarse
  ``lam`` grid.
- ``discrepancy``: Morozov's discrepancy principle, ``lam`` such that the weighted residual
  in the mask ``sum_mask ((D chi_lam - f) / sigma)^2`` equals ``tau^2`` times the number of
  mask voxels (``sigma`` the field noise, ppm; scalar or map).

Both return a ``LambdaChoice`` with the curve they looked at. Fields in ppm, voxel size in
mm, B0 direction a unit vector in voxel axes.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import scipy.fft
import scipy.interpolate
import scipy.optimize

from qsmprep.recon.dipole import dipole_kernel

from ._common import _check, _gradient_symbol, _Grid, data_weights

LOGGER = logging.getLogger("qsmprep")

__all__ = ["LambdaChoice", "discrepancy", "lcurve"]

#: lam grid of the closed-form L2 (gradient regulariser, mm^2 for ppm fields)
DEFAULT_L2_LAMBDAS = np.logspace(-4, 0, 33)
#: coarse grid for iterative methods, as multiples of the method's default lam
DEFAULT_RELATIVE_LAMBDAS = np.logspace(-1.5, 1.5, 7)


@dataclass(frozen=True)
class LambdaChoice:
    """The chosen regularisation weight and the curve it came from.

    ``lambdas`` (ascending), ``residual_norms`` = ``||W (D chi - f)||`` (ppm; W = 1, the
    method's data weights, or 1/sigma for the discrepancy principle, then unitless) and
    ``regulariser_norms`` (``R(chi)``: ``||grad chi||_2``, ``||grad chi||_1``, ``||chi||_2``
    or ``||lap chi||_2``, see ``regulariser``) at each of them; ``curvature`` of the L-curve
    there (``None`` for the discrepancy principle), ``target`` the discrepancy target
    (``None`` for the L-curve).
    """

    lam: float
    method: str
    criterion: str
    regulariser: str
    lambdas: np.ndarray
    residual_norms: np.ndarray
    regulariser_norms: np.ndarray
    curvature: np.ndarray | None = None
    target: float | None = None


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _methods() -> dict[str, Callable[..., np.ndarray]]:
    from . import METHODS  # the package registry (late import: no import cycle)

    return METHODS


def _check_local_field_method(method: str) -> None:
    from . import TOTAL_FIELD_METHODS

    if method in TOTAL_FIELD_METHODS:
        raise ValueError(
            f"method {method!r} inverts the total field: its returned chi leaves out the "
            "background sources it fitted, so the residual of a lambda rule is meaningless; "
            "choose lam yourself")


def _lambda_grid(lambdas, method: str, noise=None, mask=None) -> np.ndarray:
    """``lambdas`` validated, or the default grid: ``DEFAULT_L2_LAMBDAS`` for "l2", else
    the lam ``method`` would run with (``default_lambda``: noise-scaled for TV) times
    ``DEFAULT_RELATIVE_LAMBDAS``."""
    if lambdas is None:
        if method == "l2":
            return DEFAULT_L2_LAMBDAS.copy()
        from . import default_lambda  # the package's rule (late import: no import cycle)

        default = default_lambda(method, noise, mask)
        if default is None or not default > 0:
            raise ValueError(f"method {method!r} has no default lam; pass lambdas")
        return float(default) * DEFAULT_RELATIVE_LAMBDAS
    lam = np.unique(np.asarray(lambdas, dtype=float).ravel())
    if lam.size < 3 or not np.all(np.isfinite(lam)) or np.any(lam <= 0):
        raise ValueError(f"lambdas must hold >= 3 distinct positive values, got {lambdas!r}")
    return lam


def _half_weights(shape) -> np.ndarray:
    """Parseval weights of the rfftn half-space (last axis): 1 for the DC (and Nyquist)
    plane, 2 elsewhere, divided by the number of voxels."""
    n = shape[-1]
    w = np.full(n // 2 + 1, 2.0)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w / float(np.prod(shape))


def _regulariser_symbol(kind: str, shape, vox) -> np.ndarray | float:
    if kind == "identity":
        return 1.0
    e2 = _gradient_symbol(shape, vox).astype(np.float64)
    return e2 if kind == "gradient" else e2 * e2


def _gradient_pairs(chi: np.ndarray, mask: np.ndarray, vox, p: int) -> float:
    """``||grad chi||_p^p`` over forward differences between two mask voxels (ppm/mm)."""
    total = 0.0
    for axis, d in enumerate(vox):
        n = chi.shape[axis]
        lo = tuple(slice(0, n - 1) if i == axis else slice(None) for i in range(3))
        hi = tuple(slice(1, None) if i == axis else slice(None) for i in range(3))
        both = mask[lo] & mask[hi]
        diff = (chi[hi] - chi[lo])[both].astype(np.float64) / d
        total += float(np.sum(np.abs(diff) ** p))
    return total


def _regulariser_norm(chi: np.ndarray, mask: np.ndarray, vox, kind: str) -> float:
    if kind == "tv":
        return _gradient_pairs(chi, mask, vox, 1)
    if kind == "gradient":
        return float(np.sqrt(_gradient_pairs(chi, mask, vox, 2)))
    if kind == "identity":
        return float(np.linalg.norm(chi[mask]))
    raise ValueError(f"regulariser {kind!r} cannot be evaluated for an iterative method")


class _Forward:
    """``D chi`` on the mask's padded grid (for residuals of iterative methods)."""

    def __init__(self, mask, vox, b0, pad_fraction: float = 0.25):
        self.grid = _Grid(mask, pad_fraction)
        self.d = dipole_kernel(self.grid.shape, vox, b0)
        self.mask = mask

    def __call__(self, chi: np.ndarray) -> np.ndarray:
        spec = scipy.fft.rfftn(self.grid.embed(chi))
        spec *= self.d
        out = scipy.fft.irfftn(spec, s=self.grid.shape, overwrite_x=True)
        return self.grid.extract(out, self.mask)


def _method_regulariser(method: str, params: dict, regulariser: str | None) -> str:
    if regulariser is not None:
        if regulariser not in ("gradient", "tv", "identity", "laplacian"):
            raise ValueError(
                f"regulariser must be 'gradient', 'tv', 'identity' or 'laplacian', got "
                f"{regulariser!r}"
            )
        return regulariser
    if method == "l2":
        return str(params.get("regulariser", "gradient"))
    return "tv"


def _run_sweep(field, mask, vox, b0, method, lambdas, magnitude, noise, params):
    """Run ``method`` at every ``lam`` (from the largest down, warm-started when the method
    takes an initial guess ``chi0``); returns the list of chi maps in ``lambdas`` order."""
    methods = _methods()
    if method not in methods:
        raise ValueError(f"unknown dipole inversion method {method!r}; choose one of "
                         f"{sorted(methods)}")
    func = methods[method]
    accepted = inspect.signature(func).parameters
    if "lam" not in accepted:
        raise ValueError(f"method {method!r} has no regularisation weight lam")
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"method {method!r} does not accept {unknown}")
    kwargs = dict(params)
    if "magnitude" in accepted:
        kwargs["magnitude"] = magnitude
    if "noise" in accepted:
        kwargs["noise"] = noise
    warm = "chi0" in accepted
    chis: dict[int, np.ndarray] = {}
    previous = None
    for i in np.argsort(lambdas)[::-1]:
        if warm and previous is not None:
            kwargs["chi0"] = previous
        chi = func(field, mask, voxel_size=vox, b0_direction=b0, lam=float(lambdas[i]),
                   **kwargs)
        chis[int(i)] = chi
        previous = chi
    return [chis[i] for i in range(len(lambdas))]


def _curvature(t: np.ndarray, x: np.ndarray, y: np.ndarray):
    """Signed curvature of the curve ``(x(t), y(t))`` on smoothing cubic splines (GCV-chosen
    smoothing; interpolating splines for fewer than 5 points), oriented so that ``x`` grows
    along it: the L-curve corner is then a positive maximum. The smoothing keeps the corner
    stable against iterative methods' small non-monotonic wiggles. Returns
    ``(t_fine, kappa_fine, kappa_at_t)``."""
    sign = -1.0 if x[-1] < x[0] else 1.0  # e.g. lam a data weight: residual falls with lam
    if len(t) >= 5:
        sx = scipy.interpolate.make_smoothing_spline(t, x)
        sy = scipy.interpolate.make_smoothing_spline(t, y)
    else:
        sx = scipy.interpolate.CubicSpline(t, x)
        sy = scipy.interpolate.CubicSpline(t, y)

    def kappa(tt):
        dx, dy = sx(tt, 1), sy(tt, 1)
        ddx, ddy = sx(tt, 2), sy(tt, 2)
        return sign * (dx * ddy - ddx * dy) / np.maximum((dx * dx + dy * dy) ** 1.5, 1e-300)

    t_fine = np.linspace(t[0], t[-1], 50 * (len(t) - 1) + 1)
    return t_fine, kappa(t_fine), kappa(t)


def _corner(lambdas, res, reg) -> tuple[float, np.ndarray]:
    t = np.log10(lambdas)
    x = np.log(np.maximum(res, 1e-300))
    y = np.log(np.maximum(reg, 1e-300))
    t_fine, k_fine, k_at = _curvature(t, x, y)
    # ignore the outermost interval at each end (spline end effects)
    inner = (t_fine > t[1]) & (t_fine < t[-2]) if len(t) > 4 else np.ones_like(t_fine, bool)
    best = int(np.argmax(np.where(inner, k_fine, -np.inf)))
    if not k_fine[best] > 0:
        LOGGER.warning("L-curve: no corner (curvature <= 0 everywhere); check the lam range")
    lam = float(10.0 ** t_fine[best])
    if abs(t_fine[best] - t[1]) < 1e-9 or abs(t_fine[best] - t[-2]) < 1e-9:
        LOGGER.warning("L-curve: the corner is at the edge of the lam range (%.3g)", lam)
    return lam, k_at


# --------------------------------------------------------------------------------------
# L-curve
# --------------------------------------------------------------------------------------
def lcurve(
    local_ppm: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    method: str = "l2",
    lambdas: Sequence[float] | None = None,
    magnitude: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    regulariser_norm: str | None = None,
    **params,
) -> LambdaChoice:
    """``lam`` at the corner of the L-curve of ``method`` (maximum curvature).

    The curve ``(log ||W (D chi_lam - f)||, log R(chi_lam))`` over ``lambdas`` is fitted by
    smoothing cubic splines in ``log10 lam`` (GCV) and its curvature evaluated on a 50x finer
    grid; the maximum (excluding the outermost interval at each end) is the chosen ``lam``,
    which may lie between grid points; a corner at the edge of that range is logged as a
    warning (extend ``lambdas``).

    - ``method="l2"``: the closed-form Tikhonov inversion; residual and regulariser norms are
      the exact k-space norms of its functional on its padded grid (W = 1; R = ``||E chi||``
      of its ``regulariser``), so a dense grid (default 33 values, 1e-4..1) costs a few
      array passes per ``lam``.
    - any other method of ``inversion.METHODS`` with a ``lam`` parameter: it is run at every
      ``lam`` (default: the lam it runs with, noise-scaled for TV, x 10^(-1.5..1.5),
      7 values), from the largest down,
      warm-started when it accepts ``chi0``; the residual is ``||W (D chi - f)||`` in the
      mask with the method's data weights (``data_weights(mask, magnitude, noise)``) and
      ``R`` = ``||grad chi||_1`` over mask voxel pairs (``regulariser_norm`` may choose
      "gradient" or "identity" instead). Methods whose ``lam`` weights the data term
      (MEDI) are handled: the curve is oriented by the residual.

    ``params`` go to the method (e.g. ``max_iter``, ``regulariser``); ``magnitude`` and
    ``noise`` to those that take them. Returns a ``LambdaChoice``.
    """
    field, mask, vox, b0 = _check(local_ppm, mask, voxel_size, b0_direction)
    _check_local_field_method(method)
    kind = _method_regulariser(method, params, regulariser_norm)
    if method == "l2":
        lam_grid = _lambda_grid(lambdas, "l2")
        res, reg = _l2_norms(field, mask, vox, b0, lam_grid, kind, params)
    else:
        func = _methods().get(method)
        if func is None:
            raise ValueError(f"unknown dipole inversion method {method!r}; choose one of "
                             f"{sorted(_methods())}")
        if "lam" not in inspect.signature(func).parameters:
            raise ValueError(f"method {method!r} has no regularisation weight lam")
        lam_grid = _lambda_grid(lambdas, method, noise, mask)
        chis = _run_sweep(field, mask, vox, b0, method, lam_grid, magnitude, noise, params)
        weight = data_weights(mask, magnitude, noise)
        forward = _Forward(mask, vox, b0)
        res = np.array([np.linalg.norm((weight * (forward(c) - field))[mask]) for c in chis])
        reg = np.array([_regulariser_norm(c, mask, vox, kind) for c in chis])
    lam, curvature = _corner(lam_grid, res, reg)
    LOGGER.info("L-curve (%s): lam = %.3g", method, lam)
    return LambdaChoice(lam=lam, method=method, criterion="lcurve", regulariser=kind,
                        lambdas=lam_grid, residual_norms=res, regulariser_norms=reg,
                        curvature=curvature)


def _l2_setup(field, mask, vox, b0, kind, params):
    unknown = sorted(set(params) - {"regulariser", "pad_fraction"})
    if unknown:
        raise ValueError(f"method 'l2' does not accept {unknown} here")
    if kind not in ("gradient", "identity", "laplacian"):
        raise ValueError(f"the closed-form L2 has no {kind!r} regulariser")
    grid = _Grid(mask, float(params.get("pad_fraction", 0.5)))
    d = dipole_kernel(grid.shape, vox, b0).astype(np.float64)
    spec = scipy.fft.rfftn(grid.embed(field))
    reg_symbol = _regulariser_symbol(kind, grid.shape, vox)
    return grid, d, spec, reg_symbol


def _l2_norms(field, mask, vox, b0, lambdas, kind, params):
    """Exact k-space norms ``||D chi - f||`` and ``||E chi||`` of the closed-form L2 on its
    padded grid for every ``lam``."""
    grid, d, spec, r = _l2_setup(field, mask, vox, b0, kind, params)
    power = (spec.real.astype(np.float64) ** 2 + spec.imag.astype(np.float64) ** 2)
    power *= _half_weights(grid.shape)
    d2 = d * d
    r = np.broadcast_to(np.asarray(r, dtype=np.float64), d2.shape)
    res, reg = [], []
    for lam in lambdas:
        den = d2 + lam * r
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(den > 0, 1.0 / den, 0.0)
        # residual: (D^2/den - 1) F = -lam r/den F (the unfittable D = 0 bins count fully)
        resid = np.where(den > 0, lam * r * inv, 1.0)
        res.append(np.sqrt(np.sum(power * resid * resid)))
        reg.append(np.sqrt(np.sum(power * r * d2 * inv * inv)))
    return np.array(res), np.array(reg)


# --------------------------------------------------------------------------------------
# discrepancy principle
# --------------------------------------------------------------------------------------
def discrepancy(
    local_ppm: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    noise: float | np.ndarray,
    method: str = "l2",
    lambdas: Sequence[float] | None = None,
    magnitude: np.ndarray | None = None,
    tau: float = 1.0,
    refine: int = 2,
    regulariser_norm: str | None = None,
    **params,
) -> LambdaChoice:
    """``lam`` by Morozov's discrepancy principle: the weighted residual in the mask
    ``chi2(lam) = sum_mask ((D chi_lam - f) / sigma)^2`` equals ``tau^2 N`` (``N`` mask
    voxels), i.e. the fit is as close to the data as the noise allows and no closer.

    ``noise``: field noise standard deviation ``sigma`` (ppm), a scalar or a map (mask
    voxels with a non-finite or non-positive value are left out, and ``N`` with them).
    ``chi2`` is evaluated over ``lambdas`` (defaults as in ``lcurve``) and the crossing of
    ``tau^2 N`` located by interpolation in ``log lam``, then refined: for "l2" by a root
    search on the closed form (one inverse FFT per evaluation; ``D chi`` of the closed-form
    solution on its whole padded grid, i.e. the residual of the functional it minimises),
    for other methods (``D chi`` of the returned, masked chi) by ``refine`` regula-falsi
    steps that each run the method once more. If the curve does not cross
    the target within the grid the nearest end is returned with a warning. The iterative
    methods receive ``noise`` as their data weight when it is a map.

    Returns a ``LambdaChoice`` whose ``residual_norms`` are ``sqrt(chi2)`` (unitless) and
    ``target`` is ``tau sqrt(N)``.
    """
    field, mask, vox, b0 = _check(local_ppm, mask, voxel_size, b0_direction)
    _check_local_field_method(method)
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be > 0, got {tau}")
    sigma = np.asarray(noise, dtype=np.float64)
    if sigma.ndim == 0:
        if not (np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"noise must be a positive standard deviation (ppm), got {noise}")
        inv_sigma = np.where(mask, 1.0 / float(sigma), 0.0)
        noise_map = None
    else:
        if sigma.shape != mask.shape:
            raise ValueError(f"noise shape {sigma.shape} differs from mask shape {mask.shape}")
        ok = mask & np.isfinite(sigma) & (sigma > 0)
        if not ok.any():
            raise ValueError("noise has no positive finite values inside the mask")
        inv_sigma = np.where(ok, 1.0 / np.where(ok, sigma, 1.0), 0.0)
        noise_map = sigma.astype(np.float32)
    used = inv_sigma > 0
    target = float(tau) * np.sqrt(float(used.sum()))
    kind = _method_regulariser(method, params, regulariser_norm)
    inv_sigma = inv_sigma.astype(np.float32)

    if method == "l2":
        lam_grid = _lambda_grid(lambdas, "l2")
        grid, d, spec, r = _l2_setup(field, mask, vox, b0, kind, params)
        d2 = d * d

        def residual(lam: float) -> float:
            # D chi - f = F^-1[(D^2 / den - 1) F(f)] on the padded grid, taken in the mask
            den = d2 + lam * r
            with np.errstate(divide="ignore", invalid="ignore"):
                filt = np.where(den > 0, d2 / den - 1.0, -1.0).astype(np.float32)
            out = scipy.fft.irfftn(spec * filt, s=grid.shape)
            return float(np.linalg.norm((inv_sigma * grid.extract(out, mask))[used]))

        res = np.array([residual(lam) for lam in lam_grid])
        reg = _l2_norms(field, mask, vox, b0, lam_grid, kind, params)[1]
    else:
        func = _methods().get(method)
        if func is None:
            raise ValueError(f"unknown dipole inversion method {method!r}; choose one of "
                             f"{sorted(_methods())}")
        if "lam" not in inspect.signature(func).parameters:
            raise ValueError(f"method {method!r} has no regularisation weight lam")
        lam_grid = _lambda_grid(lambdas, method, noise, mask)
        forward = _Forward(mask, vox, b0)

        def residual(lam: float, chi: np.ndarray | None = None) -> float:
            if chi is None:
                chi = _run_sweep(field, mask, vox, b0, method, np.array([lam]), magnitude,
                                 noise_map, params)[0]
            return float(np.linalg.norm((inv_sigma * (forward(chi) - field))[used]))

        chis = _run_sweep(field, mask, vox, b0, method, lam_grid, magnitude, noise_map, params)
        res = np.array([residual(0.0, c) for c in chis])
        reg = np.array([_regulariser_norm(c, mask, vox, kind) for c in chis])
    lam = _crossing(lam_grid, res, target, residual, method, refine)
    LOGGER.info("discrepancy principle (%s): lam = %.3g", method, lam)
    return LambdaChoice(lam=lam, method=method, criterion="discrepancy", regulariser=kind,
                        lambdas=lam_grid, residual_norms=res, regulariser_norms=reg,
                        target=target)


def _crossing(lambdas, res, target, residual, method, refine) -> float:
    """``lam`` where the residual crosses ``target`` (interpolated in log-log, refined)."""
    t = np.log(lambdas)
    g = np.log(np.maximum(res, 1e-300)) - np.log(target)
    sign_change = np.nonzero(np.sign(g[:-1]) != np.sign(g[1:]))[0]
    if sign_change.size == 0:
        end = int(np.argmin(np.abs(g)))
        LOGGER.warning(
            "discrepancy principle: the residual does not reach the noise level within "
            "lam %.3g..%.3g (residual/target %.3g..%.3g); returning %.3g",
            lambdas[0], lambdas[-1], np.exp(g.min()), np.exp(g.max()), lambdas[end],
        )
        return float(lambdas[end])
    i = int(sign_change[0])
    a, b, ga, gb = t[i], t[i + 1], g[i], g[i + 1]

    def h(tt: float) -> float:
        return float(np.log(max(residual(float(np.exp(tt))), 1e-300)) - np.log(target))

    if method == "l2":
        return float(np.exp(scipy.optimize.brentq(h, a, b, xtol=1e-3)))
    tt = a - ga * (b - a) / (gb - ga)
    for _ in range(int(refine)):
        gt = h(tt)
        if abs(gt) < 1e-3:
            break
        if np.sign(gt) == np.sign(ga):
            a, ga = tt, gt
        else:
            b, gb = tt, gt
        tt = a - ga * (b - a) / (gb - ga)
    return float(np.exp(tt))


def choose(
    local_ppm: np.ndarray,
    mask: np.ndarray,
    *,
    rule: str,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    method: str,
    magnitude: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    **params,
) -> LambdaChoice:
    """``lam`` for ``--lambda auto``: ``rule`` "discrepancy" (needs the field noise map,
    ppm) or "lcurve"; without a noise map the discrepancy rule falls back to the L-curve."""
    if rule not in ("discrepancy", "lcurve"):
        raise ValueError(f"unknown lambda rule {rule!r}; choose 'discrepancy' or 'lcurve'.")
    common = dict(voxel_size=voxel_size, b0_direction=b0_direction, method=method,
                  magnitude=magnitude, **params)
    if rule == "discrepancy":
        if noise is not None:
            return discrepancy(local_ppm, mask, noise=noise, **common)
        LOGGER.warning("no field noise map for the discrepancy principle: using the L-curve.")
    return lcurve(local_ppm, mask, noise=noise, **common)

