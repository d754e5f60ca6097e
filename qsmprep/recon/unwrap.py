"""Spatial phase unwrapping of a 3D phase image (rad).

Methods (registry :data:`METHODS`, dispatcher :func:`unwrap`):

``region_growing`` (default)
    Quality-guided region growing in the spirit of ROMEO (Dymerska et al. 2021, MRM 85:2294):
    every edge between 6-neighbours inside the mask gets a quality weight in [0, 1],

    * phase coherence ``1 - |wrap(phi_i - phi_j)| / pi``,
    * phase linearity ``1 - |wrap(phi_h - 2 phi_i + phi_j)| / 2`` (clipped at 0) on both ends
      of the edge (h, k the next voxels along the edge's axis),
    * magnitude coherence ``(min(M_i, M_j) / max(M_i, M_j))**2`` when a magnitude is given,

    (the multi-echo phase-gradient coherence needs a second echo and is not used for a single
    3D phase), binned to 255 levels. A maximum spanning tree is grown from the best voxel of
    each connected mask component with an O(N) bucket queue (Prim's algorithm); each newly
    reached voxel takes the 2 pi multiple that brings it closest to its tree neighbour. The
    result differs from the input by exact multiples of 2 pi (float32 arithmetic). Every
    component is unwrapped relative to its own seed, whose value stays in (-pi, pi]. The
    growing loop is compiled with numba (a dependency of qsmprep).

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
from typing import Callable, Mapping, Sequence

import numba
import numpy as np
import scipy.fft

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
    sizes = np.asarray(voxel_size, dtype=float).ravel()
    if sizes.size != 3 or not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise ValueError(f"voxel_size must be three positive numbers (mm), got {voxel_size!r}.")
    return sizes


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


def edge_weights(
    phase: np.ndarray,
    mask: np.ndarray,
    *,
    magnitude: np.ndarray | None = None,
) -> np.ndarray:
    """Binned edge qualities ``uint8[3, x, y, z]`` (ROMEO-style, single echo).

    ``weights[a, i, j, k]`` belongs to the edge from voxel (i, j, k) to its +1 neighbour along
    axis ``a``: 0 = no edge (leaves the array or the mask), 1..255 = quality (higher is more
    reliable).
    """
    phase, mask = _check_inputs(phase, mask)
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
            ratio = np.minimum(m0, m1) / np.maximum(np.maximum(m0, m1), np.float32(1e-30))
            quality *= ratio * ratio
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

    Returns ``phase + 2 pi k`` with integer ``k`` inside the mask and the input outside.
    """
    phase, mask = _check_inputs(phase, mask)
    _check_voxel_size(voxel_size)
    if not mask.any():
        return phase.copy()
    weights = edge_weights(phase, mask, magnitude=magnitude)
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


def _run_laplacian(phase, mask, *, magnitude, voxel_size):
    return laplacian(phase, voxel_size=voxel_size, mask=mask)


def _run_reliability(phase, mask, *, magnitude, voxel_size):
    return reliability(phase, mask)


#: Method name -> function ``(phase, mask, *, magnitude, voxel_size) -> unwrapped (rad)``.
METHODS: Mapping[str, UnwrapFunction] = {
    "region_growing": _run_region_growing,
    "laplacian": _run_laplacian,
    "reliability": _run_reliability,
}

#: Methods whose result differs from the input by exact multiples of 2 pi.
EXACT_METHODS = frozenset({"region_growing", "reliability"})


def unwrap(
    phase: np.ndarray,
    mask: np.ndarray,
    *,
    method: str = "region_growing",
    magnitude: np.ndarray | None = None,
    voxel_size: Sequence[float],
) -> np.ndarray:
    """Unwrap a 3D phase image (rad) inside ``mask`` with the named method (float32 rad)."""
    try:
        function = METHODS[method]
    except KeyError:
        raise ValueError(
            f"unknown unwrapping method {method!r}; choose one of {sorted(METHODS)}."
        ) from None
    return function(phase, mask, magnitude=magnitude, voxel_size=voxel_size)
