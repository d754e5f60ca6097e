"""Dipole inversion: local field (ppm) -> susceptibility (ppm).

Methods (METHODS.md section 4), CLI names in brackets:

- ``tkd`` ["tkd"]: truncated k-space division.
- ``closed_form_l2`` ["l2"]: Tikhonov closed form (Bilgic et al. 2014) with an identity,
  gradient or Laplacian regulariser.
- ``tv_admm`` ["tv"]: weighted total variation by ADMM / split Bregman with a split
  ``z2 = D chi`` of the data term (FANSI wTV, Milovic et al. 2018).
- ``tsvd`` ["tsvd"], ``ilsqr`` ["ilsqr"] (Li et al. 2015), ``nonlinear_tv`` ["nltv"]
  (FANSI nlTV), ``ndi`` ["ndi"] (Polak et al. 2020), ``medi`` ["medi"] (Liu et al., with
  MEDI+0), ``l2_medi`` ["l2medi"] and ``tv_medi`` ["tvmedi"] (the calcaneus study's CG and
  Nesterov solvers), ``tgv`` ["tgv"] (Langkammer et al. 2015), ``rts`` ["rts"] (Kames
  et al. 2018), ``tfi`` ["tfi"]: total field inversion (Liu Z et al. 2017) of the field
  before background removal (``background`` method "none").

All take the local field in ppm of B0 on ``[x, y, z]`` (values outside ``mask`` are
ignored), the voxel size in mm and the unit B0 direction in voxel axes, and return float32
susceptibility in ppm with the input's shape and zeros outside ``mask``. The mean of chi is
not observable (D(0) = 0): reference the result (``qsmprep.recon.reference``).

The field is cropped to the mask's bounding box and zero-padded by ``pad_fraction`` of the
box on each axis (then to a fast FFT size) against wrap-around: 0.25 for TKD and TV (a
margin of 0.5 changed their phantom NRMSE by < 0.5 and < 2 points at 1.8-3.4x the TV
cost), 0.5 for closed-form L2, whose smooth solution is more sensitive.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import numpy as np

from ._common import data_weights, edge_weights
from .direct import DEFAULT_L2_LAMBDA, closed_form_l2, tkd, tsvd
from .iterative import ilsqr, rts
from .medi import edge_mask, l2_medi, medi, tv_medi
from .nonlinear import ndi, nonlinear_tv, phase_scale
from .tfi import signal_voids as tfi_signal_voids
from .tfi import tfi
from .tgv import tgv
from .tv import DEFAULT_TV_LAMBDA, TV_LAMBDA_PER_NOISE, noise_scaled_lambda, tv_admm

__all__ = [
    "DEFAULT_L2_LAMBDA",
    "DEFAULT_TV_LAMBDA",
    "METHODS",
    "NOISE_SCALED_LAMBDA",
    "TOTAL_FIELD_METHODS",
    "TV_LAMBDA_PER_NOISE",
    "default_lambda",
    "noise_scaled_lambda",
    "closed_form_l2",
    "edge_mask",
    "ilsqr",
    "l2_medi",
    "medi",
    "ndi",
    "nonlinear_tv",
    "phase_scale",
    "rts",
    "tfi",
    "tfi_signal_voids",
    "tgv",
    "tsvd",
    "tv_medi",
    "data_weights",
    "edge_weights",
    "effective_parameters",
    "invert",
    "tkd",
    "tv_admm",
]

METHODS: dict[str, Callable[..., np.ndarray]] = {
    "tkd": tkd,
    "tsvd": tsvd,
    "l2": closed_form_l2,
    "ilsqr": ilsqr,
    "tv": tv_admm,
    "nltv": nonlinear_tv,
    "ndi": ndi,
    "medi": medi,
    "l2medi": l2_medi,
    "tvmedi": tv_medi,
    "tgv": tgv,
    "rts": rts,
    "tfi": tfi,
}

#: methods whose default ``lam`` is ``noise_scaled_lambda`` of the field noise map
NOISE_SCALED_LAMBDA = ("tv", "nltv", "tfi")
#: methods that invert the total field (run with background removal "none")
TOTAL_FIELD_METHODS = ("tfi",)


def invert(
    local_field_ppm: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    method: str = "tv",
    magnitude: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    **params,
) -> np.ndarray:
    """Dipole inversion with ``method`` ("tkd", "l2" or "tv").

    ``magnitude``/``noise`` are passed to methods that use data weights and ignored by the
    others; ``params`` must be keyword arguments of the chosen method. Returns float32 chi
    (ppm) with the field's shape, zero outside ``mask``.
    """
    try:
        func = METHODS[method]
    except KeyError:
        raise ValueError(
            f"unknown dipole inversion method {method!r}; choose one of {sorted(METHODS)}"
        ) from None
    accepted = inspect.signature(func).parameters
    fixed = {"local_ppm", "mask", "voxel_size", "b0_direction", "magnitude", "noise"}
    unknown = sorted(set(params) - set(accepted) | (set(params) & fixed))
    if unknown:
        raise ValueError(
            f"dipole inversion method {method!r} does not accept {unknown} as extra "
            f"parameters; it accepts {sorted(set(accepted) - fixed)}"
        )
    kwargs = dict(params)
    if "magnitude" in accepted:
        kwargs["magnitude"] = magnitude
    if "noise" in accepted:
        kwargs["noise"] = noise
    return func(
        local_field_ppm, mask, voxel_size=voxel_size, b0_direction=b0_direction, **kwargs
    )


def default_lambda(
    method: str, noise: np.ndarray | float | None = None, mask: np.ndarray | None = None
) -> float | None:
    """The ``lam`` that ``method`` runs with when none is given (``None``: it has none):
    for TV, nonlinear TV and TFI ``noise_scaled_lambda(noise, mask)`` (0.15 x the median field
    noise in ppm; 2e-4 without a noise map), else the method's default."""
    if method in NOISE_SCALED_LAMBDA:
        return noise_scaled_lambda(noise, mask)
    value = effective_parameters(method).get("lam")
    return float(value) if isinstance(value, (int, float)) else None


def effective_parameters(method: str, **params) -> dict[str, float]:
    """The scalar parameters ``method`` runs with: its defaults updated by ``params``."""
    if method not in METHODS:
        raise ValueError(f"unknown dipole inversion method {method!r}; choose one of "
                         f"{sorted(METHODS)}")
    signature = inspect.signature(METHODS[method])
    values = {name: p.default for name, p in signature.parameters.items()
              if p.kind is p.KEYWORD_ONLY and isinstance(p.default, (int, float, str))
              and not isinstance(p.default, bool)}
    values.update(params)
    return values
