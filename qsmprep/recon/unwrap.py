"""Phase unwrapping (rad): spatial unwrapping of a 3D phase, ROMEO multi-echo unwrapping.

Methods (registry :data:`METHODS`, dispatcher :func:`unwrap`):

``region_growing`` (default)
    Quality-guided region growing in the spirit of ROMEO (Dymerska et al. 2021, MRM 85:2294):
    every edge between 6-neighbours inside the mask gets a quality weight in [0, 1], the
    product of

    * phase coherence ``1 - |wrap(phi_i - phi_j)| / pi``,
    * phase-gradient coherence across echoes ``max(0, 1 - |wrap(phi_i - phi_j) -
      wrap(phi2_i - phi2_j) TE / TE2|)`` (only when a second echo ``phase2`` with its echo
      time is given: the spatial gradient of the unwrapped phase scales with TE),
    * phase linearity ``1 - |wrap(phi_h - 2 phi_i + phi_j)| / 2`` (clipped at 0) on both ends
      of the edge (h, k the next voxels along the edge's axis),
    * magnitude coherence ``(min(M_i, M_j) / max(M_i, M_j))**2`` when a magnitude is given,

    binned to 255 levels. A maximum spanning tree is grown from the best voxel of each
    connected mask component with an O(N) bucket queue (Prim's algorithm); each newly
    reached voxel takes the 2 pi multiple that brings it closest to its tree neighbour. The
    result differs from the input by exact multiples of 2 pi (float32 arithmetic). Every
    component is unwrapped relative to its own seed, whose value stays in (-pi, pi]. The
    growing loop is compiled with numba (a dependency of qsmprep).

``romeo``
    Multi-echo ROMEO (:func:`romeo`): a 4D phase ``[x, y, z, echo]`` with echo times is
    unwrapped by region growing of a template echo with all the weights above (the second
    echo supplies the phase-gradient coherence), then the other echoes are unwrapped in time
    voxel by voxel (:func:`temporal_unwrap`). A 3D phase is unwrapped by ``region_growing``.
    :func:`unwrap` with a 4D phase and ``echo_times`` dispatches ``region_growing`` and
    ``romeo`` to :func:`romeo` (other methods unwrap each echo on its own).

``laplacian``
    Laplacian unwrapping (Schofield & Zhu 2003): the Laplacian of the true phase is computed
    from wrapped finite differences, ``sum_a [wrap(phi_{+a} - phi) - wrap(phi - phi_{-a})] /
    d_a**2`` (the discrete form of ``cos(phi) lap(sin(phi)) - sin(phi) lap(cos(phi))``, exact
    for gradients below pi per voxel), and the Poisson equation is solved with the discrete
    cosine transform (Neumann boundary, so no zero-padding is needed). With a mask, edges
    leaving the mask are dropped. The result is continuous, not 2 pi-consistent with the
    input, and inside the mask differs from the true phase by a harmonic function (zero
    Laplacian) that background-field removal takes away; it never fails topologically.

``reliability``
    scikit-image's 3D reliability-sorting unwrapper (Herraez et al. 2002;
    Abdul-Rahman et al. 2007) on a masked array.

Outside the mask every method returns the input phase.
"""

from __future__ import annotations

import logging
from typing import Callable, Literal, Mapping, Sequence

import numba
import numpy as np
import scipy.fft
from scipy import ndimage

from .dipole import check_voxel_size

LOGGER = logging.getLogger("qsmprep")

_TWO_PI = 2.0 * np.pi
_LEVELS = 255  # usable weight bins (0 marks "no edge")


def _wrap32(x: np.ndarray) -> np.ndarray:
    """Wrap float32 phase differences to [-pi, pi) (fast; the end point does not matter)."""
    return x - np.float32(_TWO_PI) * np.floor(x * np.float32(1.0 / _TWO_PI) + np.float32(0.5))


def _check_inputs(
    phase: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    phase = np.asarray(phase)
    if phase.ndim != 3:
        raise ValueError(f"phase must be a 3D array [x, y, z] (rad), got shape {phase.shape}.")
    if not np.issubdtype(phase.dtype, np.floating):
        phase = phase.astype(np.float32)
    phase = np.nan_to_num(phase.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    if mask is None:
        mask = np.ones(phase.shape, dtype=bool)
    else:
        mask = np.asarray(mask)
        if mask.shape != phase.shape:
            raise ValueError(f"mask shape {mask.shape} does not match phase {phase.shape}.")
        mask = mask.astype(bool, copy=False)
    return phase, mask


def _check_voxel_size(voxel_size: Sequence[float] | None) -> np.ndarray:
    if voxel_size is None:
        return np.ones(3)
    return check_voxel_size(voxel_size)


# ---------------------------------------------------------------------------------------
# Laplacian unwrapping
# ---------------------------------------------------------------------------------------


def _wrapped_gradients(phase: np.ndarray, mask: np.ndarray | None) -> list[np.ndarray]:
    """Wrapped forward differences per axis (length n-1 along the axis); 0 on cut edges."""
    grads = []
    for axis in range(3):
        diff = _wrap32(np.diff(phase, axis=axis))
        if mask is not None:
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis] = slice(0, -1)
            hi[axis] = slice(1, None)
            diff *= mask[tuple(lo)] & mask[tuple(hi)]
        grads.append(diff)
    return grads


def _divergence(grads: list[np.ndarray], shape: Sequence[int], sizes: np.ndarray) -> np.ndarray:
    """Neumann divergence of forward differences (the discrete Laplacian's right-hand side)."""
    out = np.zeros(shape, dtype=np.float32)
    for axis, diff in enumerate(grads):
        scale = np.float32(1.0 / sizes[axis] ** 2)
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[axis] = slice(1, None)
        lo[axis] = slice(0, -1)
        out[tuple(lo)] += diff * scale
        out[tuple(hi)] -= diff * scale
    return out


def _poisson_neumann(rhs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Solve the 7-point Laplacian ``L u = rhs`` with Neumann boundaries by DCT-II (mean 0)."""
    spectrum = scipy.fft.dctn(rhs, type=2, norm="ortho")
    eigen = np.zeros((1, 1, 1), dtype=np.float32)
    for axis, (n, d) in enumerate(zip(rhs.shape, sizes)):
        view = [1, 1, 1]
        view[axis] = n
        lam = (2.0 * np.cos(np.pi * np.arange(n) / n) - 2.0) / d**2
        eigen = eigen + lam.astype(np.float32).reshape(view)
    eigen[0, 0, 0] = 1.0
    spectrum /= eigen
    spectrum[0, 0, 0] = 0.0
    return scipy.fft.idctn(spectrum, type=2, norm="ortho").astype(np.float32, copy=False)


def discrete_laplacian(image: np.ndarray, voxel_size: Sequence[float]) -> np.ndarray:
    """7-point Laplacian (units of ``image`` per mm^2) with Neumann boundaries (float32)."""
    image = np.asarray(image, dtype=np.float32)
    sizes = _check_voxel_size(voxel_size)
    return _divergence([np.diff(image, axis=a) for a in range(3)], image.shape, sizes)


def laplacian(
    phase: np.ndarray, *, voxel_size: Sequence[float], mask: np.ndarray | None = None
) -> np.ndarray:
    """Laplacian phase unwrapping (Schofield & Zhu), DCT Poisson solve; float32 rad.

    The result is continuous and, inside the mask, equals the true phase up to a harmonic
    function (zero Laplacian; a constant when there is no mask and no phase residue). The
    free constant is chosen so that the result agrees with the input phase modulo 2 pi on
    average in the mask. Outside ``mask`` the input phase is returned.
    """
    phase, mask_arr = _check_inputs(phase, mask)
    sizes = _check_voxel_size(voxel_size)
    use_mask = None if mask is None else mask_arr
    grads = _wrapped_gradients(phase, use_mask)
    rhs = _divergence(grads, phase.shape, sizes)
    del grads
    unwrapped = _poisson_neumann(rhs, sizes)
    region = mask_arr if mask_arr.any() else np.ones_like(mask_arr)
    offset = np.angle(np.mean(np.exp(1j * (phase[region] - unwrapped[region]))))
    unwrapped += np.float32(offset)
    return np.where(mask_arr, unwrapped, phase).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------
# Quality-guided region growing
# ---------------------------------------------------------------------------------------


def _check_second_echo(
    phase: np.ndarray, phase2: np.ndarray | None, te: Sequence[float] | None
) -> tuple[np.ndarray | None, float]:
    """Validate ``phase2``/``te``; return the float32 second echo and ``TE / TE2``."""
    if phase2 is None:
        if te is not None:
            raise ValueError("te is given without phase2; pass both or neither.")
        return None, 1.0
    if te is None:
        raise ValueError(
            "phase2 needs te=(TE, TE2): the echo times (s) of phase and phase2."
        )
    phase2 = np.asarray(phase2)
    if phase2.shape != phase.shape:
        raise ValueError(f"phase2 shape {phase2.shape} does not match phase {phase.shape}.")
    times = np.asarray(te, dtype=float).ravel()
    if times.size != 2 or not np.all(np.isfinite(times)) or np.any(times <= 0):
        raise ValueError(f"te must be two positive echo times (s), got {te!r}.")
    phase2 = np.nan_to_num(phase2.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return phase2, float(times[0] / times[1])


def edge_weights(
    phase: np.ndarray,
    mask: np.ndarray,
    *,
    magnitude: np.ndarray | None = None,
    phase2: np.ndarray | None = None,
    te: Sequence[float] | None = None,
) -> np.ndarray:
    """Binned ROMEO edge qualities ``uint8[3, x, y, z]``.

    ``weights[a, i, j, k]`` belongs to the edge from voxel (i, j, k) to its +1 neighbour along
    axis ``a``: 0 = no edge (leaves the array or the mask), 1..255 = quality (higher is more
    reliable): the product of phase coherence, phase linearity, magnitude coherence (with
    ``magnitude``) and, with a second echo ``phase2`` (rad, same grid) and
    ``te = (TE, TE2)`` (s, echo times of ``phase`` and ``phase2``), the phase-gradient
    coherence ``max(0, 1 - |wrap(d phi) - wrap(d phi2) TE / TE2|)``.
    """
    phase, mask = _check_inputs(phase, mask)
    phase2, ratio = _check_second_echo(phase, phase2, te)
    if magnitude is not None:
        magnitude = np.asarray(magnitude, dtype=np.float32)
        if magnitude.shape != phase.shape:
            raise ValueError(
                f"magnitude shape {magnitude.shape} does not match phase {phase.shape}."
            )
        magnitude = np.nan_to_num(np.abs(magnitude))
    weights = np.zeros((3,) + phase.shape, dtype=np.uint8)
    one = np.float32(1.0)
    for axis in range(3):
        n = phase.shape[axis]
        if n < 2:
            continue

        def cut(start, stop, a=axis):
            index = [slice(None)] * 3
            index[a] = slice(start, stop)
            return tuple(index)

        diff = _wrap32(np.diff(phase, axis=axis))  # edge e: voxel e -> e+1
        quality = one - np.abs(diff) * np.float32(1.0 / np.pi)
        valid = mask[cut(0, -1)] & mask[cut(1, None)]
        if phase2 is not None:
            diff2 = _wrap32(np.diff(phase2, axis=axis))
            quality *= np.maximum(one - np.abs(diff - diff2 * np.float32(ratio)), 0)
        if n >= 3:
            # Second difference centred on voxel e+1 (edges e and e+1), both in the mask.
            second = np.abs(_wrap32(np.diff(diff, axis=axis)))
            linear = np.clip(one - np.float32(0.5) * second, 0.0, 1.0)
            linear[~(valid[cut(0, -1)] & valid[cut(1, None)])] = one
            # Edge e uses the second differences centred on its two ends (voxels e and e+1).
            quality[cut(1, None)] *= linear  # centred on voxel e (for e >= 1)
            quality[cut(0, -1)] *= linear  # centred on voxel e+1 (for e <= n-3)
        if magnitude is not None:
            m0 = magnitude[cut(0, -1)]
            m1 = magnitude[cut(1, None)]
            ratio_m = np.minimum(m0, m1) / np.maximum(np.maximum(m0, m1), np.float32(1e-30))
            quality *= ratio_m * ratio_m
        binned = np.floor(np.clip(quality, 0.0, 1.0) * np.float32(_LEVELS - 1)) + one
        binned[~valid] = 0
        weights[(axis,) + cut(0, -1)] = binned.astype(np.uint8)
    return weights


@numba.njit(cache=True, nogil=True)
def _grow(phase, weights, order, strides):  # pragma: no cover - compiled
    """Prim's maximum spanning tree with a bucket queue; returns the 2 pi multiples (int32).

    phase: float32[N]; weights: uint8[3, N] (edge i -> i + strides[a]); order: candidate
    seeds (mask voxels, best first); strides: int64[3]. Queue items pack the target voxel and
    the edge direction (``target * 8 + 2 * axis + backward``); each bucket is a LIFO list.
    Every edge is queued at most once (from whichever end is reached first).
    """
    n_vox = phase.size
    visited = np.zeros(n_vox, dtype=np.bool_)
    multiples = np.zeros(n_vox, dtype=np.int32)
    capacity = 1
    for a in range(3):
        for i in range(n_vox):
            if weights[a, i] > 0:
                capacity += 1
    head = np.full(256, -1, dtype=np.int32)
    nxt = np.empty(capacity, dtype=np.int32)
    payload = np.empty(capacity, dtype=np.int64)
    two_pi = 2.0 * np.pi
    inv_two_pi = 1.0 / two_pi
    n_items = 0
    n_seeds = 0
    for s in range(order.size):
        seed = order[s]
        if visited[seed]:
            continue
        n_seeds += 1
        visited[seed] = True
        top = 0
        current = seed
        while True:
            for a in range(3):
                stride = strides[a]
                w = np.int64(weights[a, current])
                if w > 0:
                    j = current + stride
                    if not visited[j]:
                        nxt[n_items] = head[w]
                        head[w] = n_items
                        payload[n_items] = j * 8 + 2 * a  # source = j - stride
                        n_items += 1
                        if w > top:
                            top = w
                j = current - stride
                if j >= 0:
                    w = np.int64(weights[a, j])
                    if w > 0 and not visited[j]:
                        nxt[n_items] = head[w]
                        head[w] = n_items
                        payload[n_items] = j * 8 + 2 * a + 1  # source = j + stride
                        n_items += 1
                        if w > top:
                            top = w
            found = False
            while top > 0:
                item = head[top]
                if item < 0:
                    top -= 1
                    continue
                head[top] = nxt[item]
                code = payload[item]
                j = code >> 3
                if visited[j]:
                    continue
                d = code & 7
                a = d >> 1
                if d & 1:
                    i = j + strides[a]
                else:
                    i = j - strides[a]
                reference = phase[i] + two_pi * multiples[i]
                multiples[j] = np.int32(np.floor((reference - phase[j]) * inv_two_pi + 0.5))
                visited[j] = True
                current = j
                found = True
                break
            if not found:
                break
    return multiples, n_seeds


def region_growing(
    phase: np.ndarray,
    mask: np.ndarray,
    *,
    magnitude: np.ndarray | None = None,
    voxel_size: Sequence[float] | None = None,
    phase2: np.ndarray | None = None,
    te: Sequence[float] | None = None,
) -> np.ndarray:
    """Quality-guided region-growing unwrapping (ROMEO-style); float32 rad.

    Parameters
    ----------
    phase
        Wrapped phase (rad), 3D.
    mask
        Voxels to unwrap; each 6-connected component is grown from its own best voxel.
    magnitude
        Optional magnitude (same shape) for the magnitude-coherence weight.
    voxel_size
        Voxel size (mm); the weights are dimensionless and per edge, so it only validates
        the argument (kept for a uniform signature across methods).
    phase2, te
        Optional second echo (wrapped phase, rad, same shape) and ``te = (TE, TE2)``, the
        echo times (s) of ``phase`` and ``phase2``: adds the multi-echo phase-gradient
        coherence weight (see :func:`edge_weights`).

    Returns ``phase + 2 pi k`` with integer ``k`` inside the mask and the input outside.
    """
    phase, mask = _check_inputs(phase, mask)
    _check_voxel_size(voxel_size)
    _check_second_echo(phase, phase2, te)
    if not mask.any():
        return phase.copy()
    weights = edge_weights(phase, mask, magnitude=magnitude, phase2=phase2, te=te)
    return _grow_from_weights(phase, mask, weights)


def _grow_from_weights(phase: np.ndarray, mask: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Region growing on precomputed edge weights (checked float32 phase, bool mask)."""
    # Seed quality: sum of the voxel's edge weights (uint16); best first, stable radix sort.
    score = weights.sum(axis=0, dtype=np.uint16)
    score[:, :, 1:] += weights[2, :, :, :-1]
    score[:, 1:, :] += weights[1, :, :-1, :]
    score[1:, :, :] += weights[0, :-1, :, :]
    flat_mask = np.flatnonzero(mask)
    keys = np.uint16(6 * 255) - score.ravel()[flat_mask]
    order = flat_mask[np.argsort(keys, kind="stable")]
    strides = np.array([phase.shape[1] * phase.shape[2], phase.shape[2], 1], dtype=np.int64)
    multiples, n_seeds = _grow(
        phase.ravel(), weights.reshape(3, -1), order.astype(np.int64), strides
    )
    LOGGER.debug("region_growing: %d seeds (mask components)", n_seeds)
    result = phase + np.float32(_TWO_PI) * multiples.reshape(phase.shape).astype(np.float32)
    return np.where(mask, result, phase).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------
# Multi-echo ROMEO: template echo in space, the other echoes in time
# ---------------------------------------------------------------------------------------

TemporalReference = Literal["fit", "template"]


def _check_echo_stack(
    phase: np.ndarray, echo_times: Sequence[float], magnitude: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    phase = np.asarray(phase)
    if phase.ndim != 4:
        raise ValueError(
            f"phase must be a 4D array [x, y, z, echo] (rad), got shape {phase.shape}."
        )
    phase = np.nan_to_num(phase.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    times = np.asarray(echo_times, dtype=np.float64).ravel()
    if times.size != phase.shape[3]:
        raise ValueError(f"{times.size} echo times given for {phase.shape[3]} echoes.")
    if not np.all(np.isfinite(times)) or np.any(times <= 0):
        raise ValueError(f"echo times must be positive and finite (s), got {times.tolist()}.")
    if np.unique(times).size != times.size:
        raise ValueError(f"echo times must be distinct, got {times.tolist()}.")
    if magnitude is not None:
        magnitude = np.asarray(magnitude)
        if magnitude.shape != phase.shape:
            raise ValueError(
                f"magnitude shape {magnitude.shape} does not match phase {phase.shape}."
            )
        magnitude = np.abs(np.nan_to_num(magnitude.astype(np.float32)))
    return phase, times, magnitude


def _check_template(template: int, n_echoes: int) -> int:
    if isinstance(template, bool) or not isinstance(template, (int, np.integer)):
        raise ValueError(f"template must be an echo index (int), got {template!r}.")
    if not 0 <= int(template) < n_echoes:
        raise ValueError(f"template echo {template} is outside 0..{n_echoes - 1}.")
    return int(template)


def _echo_order(template: int, n_echoes: int) -> list[int]:
    """Temporal unwrapping order: the later echoes outwards, then the earlier ones inwards."""
    return list(range(template + 1, n_echoes)) + list(range(template - 1, -1, -1))


def temporal_unwrap(
    phase: np.ndarray,
    template_unwrapped: np.ndarray,
    echo_times: Sequence[float],
    *,
    mask: np.ndarray | None = None,
    template: int = 0,
    magnitude: np.ndarray | None = None,
    phase_offset: np.ndarray | None = None,
    reference: TemporalReference = "fit",
) -> np.ndarray:
    """Unwrap echoes in time from a spatially unwrapped template echo; float32 rad 4D.

    Every echo ``n`` (phase ``phi_n``, rad, echo time ``t_n`` s) takes the 2 pi multiple
    closest to a prediction: ``phi_n + 2 pi round((pred_n - phi_n) / 2 pi)`` with, for
    ``reference="template"``, ``pred_n = phi0 + (phi_T - phi0) t_n / t_T`` (ROMEO; ``phi_T``
    the unwrapped template, ``phi0`` the phase offset, 0 when not given), or, for
    ``reference="fit"`` (default), ``pred_n = phi0 + omega t_n`` with ``omega = sum w_m t_m
    (phi_m - phi0) / sum w_m t_m^2`` fitted through the origin over the echoes unwrapped so
    far (the same as "template" for the first echo; later echoes profit from the averaged
    noise). Weights ``w_m = |S_m|^2`` with ``magnitude`` (4D), else 1. Order: the echoes after
    the template outwards, then those before it inwards. The field may alias between
    echoes (``|omega dTE| > pi``): the unwrapped template fixes the branch, so only the
    prediction's error (noise scaled by ``t_n / t_T``, a wrong ``phase_offset``) must stay
    below pi.

    Returns ``[x, y, z, echo]``: the template echo is ``template_unwrapped`` as given, the
    others the input plus exact multiples of 2 pi inside ``mask`` (all voxels when None); the
    input phase outside.
    """
    phase, times, magnitude = _check_echo_stack(phase, echo_times, magnitude)
    n_echoes = times.size
    template = _check_template(template, n_echoes)
    if reference not in ("fit", "template"):
        raise ValueError(f"reference must be 'fit' or 'template', got {reference!r}.")
    shape = phase.shape[:3]
    template_unwrapped = np.asarray(template_unwrapped, dtype=np.float32)
    if template_unwrapped.shape != shape:
        raise ValueError(
            f"template_unwrapped shape {template_unwrapped.shape} does not match {shape}."
        )
    if mask is None:
        mask = np.ones(shape, dtype=bool)
    else:
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise ValueError(f"mask shape {mask.shape} does not match the phase {shape}.")
        mask = mask.astype(bool, copy=False)
    if phase_offset is not None:
        phase_offset = np.asarray(phase_offset, dtype=np.float32)
        if phase_offset.shape != shape:
            raise ValueError(f"phase_offset shape {phase_offset.shape} does not match {shape}.")
    result = phase.copy()
    result[..., template] = np.where(mask, template_unwrapped, phase[..., template])
    if not mask.any() or n_echoes == 1:
        return result
    ph = phase[mask]
    offset = np.float32(0.0) if phase_offset is None else phase_offset[mask]
    if magnitude is None:
        weights = np.ones(ph.shape, dtype=np.float32)
    else:
        weights = magnitude[mask] ** 2
        floor = np.float32(max(float(weights.max()), 1e-30) * 1e-8)
        weights = np.maximum(weights, floor)
    t = times.astype(np.float32)
    anchored = template_unwrapped[mask] - offset
    numerator = weights[:, template] * t[template] * anchored
    denominator = weights[:, template] * t[template] ** 2
    slope_template = anchored / t[template]
    two_pi = np.float32(_TWO_PI)
    for n in _echo_order(template, n_echoes):
        slope = slope_template if reference == "template" else numerator / denominator
        predicted = offset + slope * t[n]
        turns = np.round((predicted - ph[:, n]) / two_pi)
        unwrapped = ph[:, n] + two_pi * turns
        result[..., n][mask] = unwrapped
        numerator = numerator + weights[:, n] * t[n] * (unwrapped - offset)
        denominator = denominator + weights[:, n] * t[n] ** 2
    return result


def _component_branches(
    spatial: np.ndarray,
    corrected: np.ndarray,
    weights: np.ndarray,
    times: np.ndarray,
    template: int,
    mask: np.ndarray,
    search: int = 3,
    max_samples: int = 100_000,
) -> np.ndarray:
    """Shift each mask component of the spatially unwrapped template by the 2 pi multiple
    that makes the echoes most consistent in time (offset-free phase ``omega t``).

    Candidates ``k0 + d`` (``|d| <= search``) around the branch ``k0`` whose component mean is
    closest to 0; the score is ``sum_voxels sum_n w_n (1 - cos(phi_n - phi_T t_n / t_T))``
    over a regular subsample of about ``max_samples`` mask voxels.
    Ties (echo times that are integer multiples of ``t_T`` make aliases exactly consistent)
    go to the smallest ``|d|``.
    """
    labels, n_labels = ndimage.label(mask)
    if n_labels == 0:
        return spatial
    flat = labels[mask]
    values = spatial[mask].astype(np.float64)
    counts = np.bincount(flat, minlength=n_labels + 1)
    means = np.bincount(flat, weights=values, minlength=n_labels + 1) / np.maximum(counts, 1)
    k0 = -np.round(means / _TWO_PI)
    others = [n for n in range(times.size) if n != template]
    ratios = (times[others] / times[template]).astype(np.float32)
    # Score on a regular subsample (about max_samples voxels; small components may be
    # skipped and then keep the centred branch).
    step = max(1, flat.size // max_samples)
    sample = slice(None, None, step)
    echoes = corrected[mask][sample][:, others]
    w = weights[sample][:, others]
    shifts = np.arange(-search, search + 1)
    scores = np.empty((shifts.size, n_labels + 1))
    base = (spatial[mask] + np.float32(_TWO_PI) * k0[flat].astype(np.float32))[sample]
    flat_sample = flat[sample]
    counts = np.bincount(flat_sample, minlength=n_labels + 1)
    for index, d in enumerate(shifts):
        candidate = base + np.float32(_TWO_PI * d)
        residual = echoes - candidate[:, None] * ratios[None, :]
        cost = (w * (np.float32(1.0) - np.cos(residual))).sum(axis=1, dtype=np.float64)
        scores[index] = np.bincount(flat_sample, weights=cost, minlength=n_labels + 1)
    best = scores.min(axis=0)
    tolerance = 1e-4 * best + 1e-9 * np.maximum(counts, 1)
    eligible = scores <= best[None, :] + tolerance[None, :]
    penalty = np.where(eligible, np.abs(shifts)[:, None], np.inf)
    chosen = shifts[np.argmin(penalty, axis=0)]
    total = (k0 + chosen).astype(np.float32)
    total[0] = 0.0
    LOGGER.debug("romeo: component branch shifts %s", total[1:].tolist())
    result = spatial.copy()
    result[mask] += np.float32(_TWO_PI) * total[flat]
    return result


def _wrapped_jumps(image: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Neighbour differences (rad) per axis between voxels both inside ``mask``."""
    jumps = []
    for axis in range(3):
        both = np.delete(mask, -1, axis=axis) & np.delete(mask, 0, axis=axis)
        jumps.append(np.diff(image, axis=axis)[both])
    return jumps


def romeo(
    phase: np.ndarray,
    mask: np.ndarray,
    *,
    echo_times: Sequence[float],
    magnitude: np.ndarray | None = None,
    template: int = 0,
    phase_offset: np.ndarray | Literal["mcpc3ds", "none"] = "mcpc3ds",
    voxel_size: Sequence[float] | None = None,
    reference: TemporalReference = "fit",
) -> np.ndarray:
    """ROMEO multi-echo unwrapping (Dymerska et al. 2021); float32 rad ``[x, y, z, echo]``.

    1. The phase offset ``phi0`` (rad; "mcpc3ds": estimated by
       :func:`qsmprep.recon.fieldmap.mcpc3ds_offset` from echoes 1-2, "none": 0, or an
       array) is removed: ``psi_n = wrap(phi_n - phi0)``.
    2. The template echo is unwrapped in space by :func:`region_growing` with all ROMEO
       weights; the phase-gradient coherence uses the next echo (the previous one for the
       last echo) and the magnitude coherence the template's magnitude.
    3. Each mask component takes the global 2 pi multiple that makes the echoes most
       consistent with ``psi = omega t`` (ties, e.g. echo times at integer multiples of the
       template's, go to the branch whose mean is closest to 0 rad).
    4. The other echoes are unwrapped in time (:func:`temporal_unwrap` with ``reference``)
       and the offset is added back (made continuous first, so every echo is continuous).

    Parameters: ``phase`` wrapped phase (rad) 4D; ``mask`` bool 3D; ``echo_times`` (s);
    ``magnitude`` 4D (optional; weights and magnitude coherence); ``template`` echo index
    (0-based; ROMEO's own default is the second echo, ``template=1``); ``voxel_size`` (mm,
    only validated; MCPC-3D-S smooths over fixed voxel counts). With one echo this is
    :func:`region_growing`.

    A wrong offset breaks step 4 (the prediction error ``phi0 (t_n / t_T - 1)`` must stay
    below pi): keep "mcpc3ds" unless the offset is known or negligible. MCPC-3D-S centres
    the echo-1/2 difference per component; with uniformly spaced echoes
    ``(phi0, f)`` and ``(phi0 - 2 pi k TE1 / dTE, f + k / dTE)`` fit all echoes equally, so a
    component whose mean field is beyond ``1 / (2 dTE)`` keeps such an alias.

    Returns the input phase plus exact multiples of 2 pi inside the mask, the input outside.
    """
    phase, times, magnitude = _check_echo_stack(phase, echo_times, magnitude)
    template = _check_template(template, times.size)
    shape = phase.shape[:3]
    _, mask = _check_inputs(phase[..., 0], mask)
    sizes = _check_voxel_size(voxel_size)
    n_echoes = times.size
    mag_t = None if magnitude is None else magnitude[..., template]
    if n_echoes == 1:
        single = region_growing(phase[..., 0], mask, magnitude=mag_t)
        return single[..., None]
    if isinstance(phase_offset, str):
        if phase_offset == "none":
            offset = np.zeros(shape, dtype=np.float32)
        elif phase_offset == "mcpc3ds":
            from .fieldmap import mcpc3ds_offset  # here: fieldmap imports this module

            order = np.argsort(times)
            mag = np.ones(phase.shape, np.float32) if magnitude is None else magnitude
            offset = mcpc3ds_offset(
                mag[..., order], phase[..., order], times[order], mask,
                voxel_size=tuple(sizes),
            )
        else:
            raise ValueError(
                f"phase_offset must be 'mcpc3ds', 'none' or an array, got {phase_offset!r}."
            )
    else:
        offset = np.asarray(phase_offset, dtype=np.float32)
        if offset.shape != shape:
            raise ValueError(f"phase_offset shape {offset.shape} does not match {shape}.")
        offset = np.nan_to_num(offset)
    corrected = _wrap32(phase - offset[..., None])
    if not mask.any():
        return phase.copy()
    second = template + 1 if template + 1 < n_echoes else template - 1
    spatial = region_growing(
        corrected[..., template], mask, magnitude=mag_t,
        phase2=corrected[..., second], te=(times[template], times[second]),
    )
    if magnitude is None:
        weights = np.ones((int(mask.sum()), n_echoes), dtype=np.float32)
    else:
        weights = magnitude[mask] ** 2
        weights /= np.float32(max(float(weights.max()), 1e-30))
    spatial = _component_branches(spatial, corrected, weights, times, template, mask)
    unwrapped = temporal_unwrap(
        corrected, spatial, times, mask=mask, template=template, magnitude=magnitude,
        reference=reference,
    )
    # A wrapped offset jumps by 2 pi where it crosses +-pi: add it back continuously (it is
    # smooth, so region growing is exact) to keep every echo continuous in space.
    if any(np.abs(g).max(initial=0) > np.pi for g in _wrapped_jumps(offset, mask)):
        offset = region_growing(offset, mask)
    turns = np.round((unwrapped + offset[..., None] - phase) / np.float32(_TWO_PI))
    result = phase + np.float32(_TWO_PI) * turns
    return np.where(mask[..., None], result, phase).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------
# scikit-image reliability sorting
# ---------------------------------------------------------------------------------------


def reliability(phase: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """scikit-image 3D reliability-sorting unwrapping on the masked phase; float32 rad.

    Components of the mask are unwrapped independently; outside the mask the input phase is
    returned.
    """
    from skimage.restoration import unwrap_phase

    phase, mask = _check_inputs(phase, mask)
    if not mask.any():
        return phase.copy()
    masked = np.ma.masked_array(phase.astype(np.float64), mask=~mask)
    result = unwrap_phase(masked)
    filled = np.ma.getdata(result).astype(np.float32)
    return np.where(mask, filled, phase).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------
# Registry and dispatcher
# ---------------------------------------------------------------------------------------

UnwrapFunction = Callable[..., np.ndarray]


def _run_region_growing(phase, mask, *, magnitude, voxel_size):
    return region_growing(phase, mask, magnitude=magnitude, voxel_size=voxel_size)


def _run_romeo(phase, mask, *, magnitude, voxel_size, echo_times=None, **options):
    if np.ndim(phase) == 3:
        return region_growing(phase, mask, magnitude=magnitude, voxel_size=voxel_size)
    if echo_times is None:
        raise ValueError("romeo with a 4D phase needs echo_times (s).")
    return romeo(phase, mask, echo_times=echo_times, magnitude=magnitude,
                 voxel_size=voxel_size, **options)


def _run_laplacian(phase, mask, *, magnitude, voxel_size):
    return laplacian(phase, voxel_size=voxel_size, mask=mask)


def _run_reliability(phase, mask, *, magnitude, voxel_size):
    return reliability(phase, mask)


#: Method name -> function ``(phase, mask, *, magnitude, voxel_size) -> unwrapped (rad)``
#: for a 3D phase (``romeo`` also takes a 4D phase with ``echo_times=``).
METHODS: Mapping[str, UnwrapFunction] = {
    "region_growing": _run_region_growing,
    "romeo": _run_romeo,
    "laplacian": _run_laplacian,
    "reliability": _run_reliability,
}

#: Methods whose result differs from the input by exact multiples of 2 pi.
EXACT_METHODS = frozenset({"region_growing", "romeo", "reliability"})

#: Methods that use the multi-echo ROMEO path for a 4D phase.
MULTI_ECHO_METHODS = frozenset({"region_growing", "romeo"})


def unwrap(
    phase: np.ndarray,
    mask: np.ndarray,
    *,
    method: str = "region_growing",
    magnitude: np.ndarray | None = None,
    voxel_size: Sequence[float],
    echo_times: Sequence[float] | None = None,
    template: int = 0,
    phase_offset: np.ndarray | Literal["mcpc3ds", "none"] = "mcpc3ds",
) -> np.ndarray:
    """Unwrap phase (rad) inside ``mask`` with the named method (float32 rad).

    A 3D phase is unwrapped in space. A 4D phase ``[x, y, z, echo]`` needs ``echo_times``
    (s): ``region_growing`` and ``romeo`` dispatch to :func:`romeo` (template echo in space,
    the others in time; ``template``, ``phase_offset`` as there), the other methods unwrap
    each echo on its own (``magnitude`` 4D, per echo).
    """
    try:
        function = METHODS[method]
    except KeyError:
        raise ValueError(
            f"unknown unwrapping method {method!r}; choose one of {sorted(METHODS)}."
        ) from None
    ndim = np.ndim(phase)
    if ndim == 4:
        if echo_times is None:
            raise ValueError("a 4D phase [x, y, z, echo] needs echo_times (s).")
        if method in MULTI_ECHO_METHODS:
            return romeo(phase, mask, echo_times=echo_times, magnitude=magnitude,
                         template=template, phase_offset=phase_offset, voxel_size=voxel_size)
        phase, times, magnitude = _check_echo_stack(phase, echo_times, magnitude)
        echoes = [
            function(phase[..., n], mask, voxel_size=voxel_size,
                     magnitude=None if magnitude is None else magnitude[..., n])
            for n in range(times.size)
        ]
        return np.stack(echoes, axis=-1).astype(np.float32, copy=False)
    if ndim != 3:
        raise ValueError(f"phase must be 3D or 4D [x, y, z(, echo)], got shape {np.shape(phase)}.")
    return function(phase, mask, magnitude=magnitude, voxel_size=voxel_size)
