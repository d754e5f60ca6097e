"""Susceptibility-weighted imaging (SWI) and sliding-slab intensity projections.

SWI (Haacke et al. 2004, MRM 52:612; multi-echo as in CLEAR-SWI, Eckstein et al. 2021,
NeuroImage 237:118175):

1. High-pass filtered phase of every echo ``n`` (rad): homodyne filtering, the angle of
   ``S_n conj(L_n)`` where ``S_n = |S_n| exp(i phi_n)`` is the complex image (inside the
   mask) and ``L_n`` its low-pass version, a separable Hanning window in k-space
   ``h(k) = (1 + cos(pi k / k_c)) / 2`` for ``|k| < k_c = 1 / filter_size_mm`` (cycles/mm) on
   every axis (zero-padded FFT). It removes the smooth background field and phase offset.
   Or, with ``field_hz`` (an unwrapped total field, Hz), the high-pass of the field:
   ``f - low-pass(f)`` (normalised within the mask) times ``2 pi t``.
2. Echo combination: the high-pass phases are unwrapped in time (they carry no offset, so
   ``phi_n = omega t_n``; :func:`qsmprep.recon.unwrap.temporal_unwrap`) and fitted through the
   origin, ``omega = sum w_n t_n phi_n / sum w_n t_n^2`` with ``w_n = |S_n|^2`` (rad/s); the
   combined phase is ``phi = omega * reference_te`` (default: the longest echo time), which
   does not wrap however strong the local field.
3. Negative phase mask (Haacke) on ``psi = phase_sign * phi``, the phase in qsmprep's
   convention (``+2 pi f TE``: paramagnetic veins parallel to B0 have positive ``psi``):
   ``m = 1 - psi / pi`` clipped to ``[0, 1]`` for ``psi > 0``, ``m = 1`` otherwise.
4. ``SWI = M * m**power`` with ``M = sqrt(sum_n |S_n|^2)`` the root-sum-of-squares magnitude
   over echoes. Outside the mask ``m = 1`` (SWI = magnitude).

Projections: :func:`minimum_intensity_projection` (mIP, the usual SWI display, veins as
continuous dark lines) and :func:`maximum_intensity_projection` (QSM venography: MIP of the
susceptibility map) over a sliding slab of ``slab_mm`` along one axis; same shape as the
input.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import scipy.fft
from scipy import ndimage

from .dipole import check_voxel_size, kspace_grid, padded_shape
from .unwrap import temporal_unwrap

LOGGER = logging.getLogger("qsmprep")

#: Default k-space window: half-width 1/12 cycles/mm (low-pass resolution about 12 mm).
DEFAULT_FILTER_SIZE_MM = 12.0


# ---------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------


def _filter_sizes(filter_size_mm: float | Sequence[float]) -> np.ndarray:
    sizes = np.broadcast_to(np.asarray(filter_size_mm, dtype=float), (3,)).copy()
    if not np.all(np.isfinite(sizes)) or np.any(sizes < 0) or not np.any(sizes > 0):
        raise ValueError(
            "filter_size_mm must be >= 0 (mm; 0 = no filtering along that axis) and positive "
            f"on at least one axis, got {filter_size_mm!r}."
        )
    return sizes


def _as_4d(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(f"{name} must be 3D or 4D [x, y, z, echo], got shape {array.shape}.")
    return array


# ---------------------------------------------------------------------------------------
# filters
# ---------------------------------------------------------------------------------------


def hanning_window(
    shape: Sequence[int], voxel_size: Sequence[float], filter_size_mm: float | Sequence[float]
) -> np.ndarray:
    """Separable k-space Hanning window (float32, full FFT grid of ``shape``).

    Per axis ``h(k) = (1 + cos(pi k / k_c)) / 2`` for ``|k| < k_c = 1 / filter_size_mm``
    (k in cycles/mm), 0 beyond; ``filter_size_mm`` 0 on an axis leaves it unfiltered.
    """
    sizes = _filter_sizes(filter_size_mm)
    window = np.ones((1, 1, 1), dtype=np.float32)
    for axis, k in enumerate(kspace_grid(shape, check_voxel_size(voxel_size), half=False)):
        if sizes[axis] == 0:
            continue
        scaled = np.abs(k) * sizes[axis]  # |k| / k_c
        h = np.where(scaled < 1.0, 0.5 * (1.0 + np.cos(np.pi * scaled)), 0.0)
        window = window * h.astype(np.float32)
    return window


def _lowpass(images: np.ndarray, voxel_size: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Low-pass of 3D images stacked on the last axis (complex or real) by the Hanning
    window on a zero-padded grid (margin: two filter widths per axis)."""
    shape = images.shape[:3]
    margin = [int(np.ceil(2.0 * s / d)) for s, d in zip(sizes, voxel_size)]
    padded = padded_shape(shape, margin)
    window = hanning_window(padded, voxel_size, sizes)[..., None]
    crop = tuple(slice(0, n) for n in shape)
    if np.iscomplexobj(images):
        spectrum = scipy.fft.fftn(images.astype(np.complex64), s=padded, axes=(0, 1, 2))
        spectrum *= window
        return scipy.fft.ifftn(spectrum, axes=(0, 1, 2))[crop].astype(np.complex64)
    half = window[:, :, : padded[2] // 2 + 1]
    spectrum = scipy.fft.rfftn(images.astype(np.float32), s=padded, axes=(0, 1, 2))
    spectrum *= half
    return scipy.fft.irfftn(spectrum, s=padded, axes=(0, 1, 2))[crop].astype(np.float32)


def highpass_phase(
    magnitude: np.ndarray,
    phase: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    voxel_size: Sequence[float],
    filter_size_mm: float | Sequence[float] = DEFAULT_FILTER_SIZE_MM,
) -> np.ndarray:
    """Homodyne high-pass filtered phase (rad, float32, same shape; 3D or 4D per echo).

    ``angle(S conj(L))`` with ``S = magnitude exp(i phase)`` inside ``mask`` (all voxels when
    None) and ``L`` its low-pass (:func:`hanning_window`, ``filter_size_mm`` mm). 0 outside
    the mask.
    """
    mag = _as_4d(magnitude, "magnitude")
    ph = _as_4d(phase, "phase")
    if mag.shape != ph.shape:
        raise ValueError(f"magnitude {mag.shape} and phase {ph.shape} differ in shape.")
    sizes_vox = check_voxel_size(voxel_size)
    sizes = _filter_sizes(filter_size_mm)
    shape = ph.shape[:3]
    if mask is None:
        mask = np.ones(shape, dtype=bool)
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"mask shape {mask.shape} does not match the data {shape}.")
    finite = np.isfinite(mag).all(axis=3) & np.isfinite(ph).all(axis=3)
    inside = mask & finite
    mag = np.where(inside[..., None], np.abs(np.nan_to_num(mag)), 0).astype(np.float32)
    ph = np.nan_to_num(ph).astype(np.float32)
    signal = (mag * np.exp(1j * ph)).astype(np.complex64)
    low = _lowpass(signal, sizes_vox, sizes)
    result = np.angle(signal * np.conj(low)).astype(np.float32)
    result[~inside] = 0.0
    return result if np.ndim(phase) == 4 else result[..., 0]


def _field_highpass(
    field_hz: np.ndarray, mask: np.ndarray, voxel_size: np.ndarray, sizes: np.ndarray
) -> np.ndarray:
    """High-pass of a field (Hz): ``f - low-pass(f M) / low-pass(M)`` inside the mask."""
    weight = mask.astype(np.float32)
    stacked = np.stack([np.where(mask, field_hz, 0).astype(np.float32), weight], axis=-1)
    low = _lowpass(stacked, voxel_size, sizes)
    smooth = low[..., 0] / np.maximum(low[..., 1], np.float32(1e-3))
    return np.where(mask, field_hz - smooth, 0).astype(np.float32)


# ---------------------------------------------------------------------------------------
# SWI
# ---------------------------------------------------------------------------------------


def phase_mask(phase: np.ndarray, *, phase_sign: int = 1) -> np.ndarray:
    """Haacke's negative phase mask (float32 in [0, 1]) of a high-pass phase (rad).

    ``psi = phase_sign * phase``; ``1 - psi / pi`` clipped to [0, 1] where ``psi > 0`` (the
    paramagnetic side in qsmprep's ``+2 pi f TE`` convention), 1 elsewhere.
    """
    if phase_sign not in (1, -1):
        raise ValueError(f"phase_sign must be +1 or -1, got {phase_sign!r}.")
    psi = np.float32(phase_sign) * np.asarray(phase, dtype=np.float32)
    return np.clip(np.float32(1.0) - psi * np.float32(1.0 / np.pi), 0.0, 1.0).astype(
        np.float32
    )


def combined_highpass_frequency(
    magnitude: np.ndarray,
    phase: np.ndarray,
    mask: np.ndarray | None,
    *,
    echo_times: Sequence[float],
    voxel_size: Sequence[float],
    filter_size_mm: float | Sequence[float] = DEFAULT_FILTER_SIZE_MM,
) -> np.ndarray:
    """Echo-combined local (high-pass) angular frequency ``omega`` (rad/s, float32 3D).

    Homodyne high-pass phase per echo (:func:`highpass_phase`), unwrapped in time from the
    first echo (offset-free model ``phi_n = omega t_n``), weighted fit through the origin
    with ``w_n = |S_n|^2``. 0 outside the mask.
    """
    mag = _as_4d(magnitude, "magnitude")
    ph = _as_4d(phase, "phase")
    times = _echo_times(echo_times, ph.shape[3])
    shape = ph.shape[:3]
    mask = np.ones(shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    hp = _as_4d(
        highpass_phase(mag, ph, mask, voxel_size=voxel_size, filter_size_mm=filter_size_mm),
        "phase",
    )
    inside = mask & np.isfinite(mag).all(axis=3) & np.isfinite(ph).all(axis=3)
    mag = np.abs(np.nan_to_num(mag)).astype(np.float32)
    order = np.argsort(times)
    hp, mag, times = hp[..., order], mag[..., order], times[order]
    if times.size > 1:
        hp = temporal_unwrap(hp, hp[..., 0], times, mask=inside, magnitude=mag)
    weights = mag * mag + np.float32(1e-30)
    t = times.astype(np.float32)
    omega = (weights * hp * t).sum(axis=3) / (weights * t * t).sum(axis=3)
    return np.where(inside, omega, 0).astype(np.float32)


def _echo_times(echo_times: Sequence[float], n_echoes: int) -> np.ndarray:
    times = np.asarray(echo_times, dtype=np.float64).ravel()
    if times.size != n_echoes:
        raise ValueError(f"{times.size} echo times given for {n_echoes} echoes.")
    if not np.all(np.isfinite(times)) or np.any(times <= 0):
        raise ValueError(f"echo times must be positive and finite (s), got {times.tolist()}.")
    if np.any(times >= 1.0):
        raise ValueError(f"echo times must be in seconds; {times.tolist()} look like ms.")
    if np.unique(times).size != times.size:
        raise ValueError(f"echo times must be distinct, got {times.tolist()}.")
    return times


def swi(
    magnitude: np.ndarray,
    phase: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    echo_times: Sequence[float],
    voxel_size: Sequence[float],
    filter_size_mm: float | Sequence[float] = DEFAULT_FILTER_SIZE_MM,
    power: int = 4,
    phase_sign: int = 1,
    reference_te: float | None = None,
    field_hz: np.ndarray | None = None,
) -> np.ndarray:
    """Susceptibility-weighted image (float32 3D, units of ``magnitude``).

    Parameters
    ----------
    magnitude, phase
        3D or 4D ``[x, y, z, echo]`` magnitude (any units) and phase (rad, wrapped).
    mask
        Region whose phase is filtered and masked (bool 3D; None = all voxels). Outside it
        the SWI is the combined magnitude.
    echo_times
        Echo times (s).
    voxel_size
        Voxel size (mm).
    filter_size_mm
        Low-pass scale (mm) of the homodyne filter: Hanning window half-width
        ``1 / filter_size_mm`` cycles/mm; one value or one per axis (0: no filtering along
        that axis, e.g. in-plane 2D filtering of thick slices). Larger keeps more of wide
        structures' phase (and more background).
    power
        Number of times the phase mask multiplies the magnitude (Haacke: 4).
    phase_sign
        +1 when the phase grows as ``+2 pi f TE`` (qsmprep's convention, as
        :func:`qsmprep.recon.fieldmap.estimate`): positive-frequency (paramagnetic) voxels are
        darkened; -1 for the opposite handedness.
    reference_te
        Echo time (s) at which the combined high-pass phase is evaluated for the mask
        (default: the longest echo time).
    field_hz
        Optional unwrapped total field (Hz, 3D, same sign convention as ``phase_sign``
        = +1 data, e.g. ``FieldEstimate.field_hz``): its high-pass replaces the homodyne
        phase (no phase wraps, no aliasing of strong local fields in single echoes).

    Returns ``M * m**power`` with ``M`` the root-sum-of-squares magnitude over echoes and
    ``m`` the negative phase mask (:func:`phase_mask`) of ``omega * reference_te``.
    """
    mag = _as_4d(magnitude, "magnitude")
    ph = _as_4d(phase, "phase")
    if mag.shape != ph.shape:
        raise ValueError(f"magnitude {mag.shape} and phase {ph.shape} differ in shape.")
    times = _echo_times(echo_times, ph.shape[3])
    sizes_vox = check_voxel_size(voxel_size)
    sizes = _filter_sizes(filter_size_mm)
    if isinstance(power, bool) or not isinstance(power, (int, np.integer)) or power < 0:
        raise ValueError(f"power must be a non-negative integer, got {power!r}.")
    if phase_sign not in (1, -1):
        raise ValueError(f"phase_sign must be +1 or -1, got {phase_sign!r}.")
    if reference_te is None:
        reference_te = float(times.max())
    elif not (np.isfinite(reference_te) and 0 < reference_te < 1.0):
        raise ValueError(f"reference_te must be a positive echo time in s, got {reference_te!r}.")
    shape = ph.shape[:3]
    if mask is None:
        mask = np.ones(shape, dtype=bool)
    else:
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise ValueError(f"mask shape {mask.shape} does not match the data {shape}.")
        mask = mask.astype(bool)
    finite_mag = np.nan_to_num(np.abs(mag.astype(np.float32)))
    combined = np.sqrt((finite_mag * finite_mag).sum(axis=3)).astype(np.float32)

    if field_hz is not None:
        field = np.asarray(field_hz, dtype=np.float32)
        if field.shape != shape:
            raise ValueError(f"field_hz shape {field.shape} does not match the data {shape}.")
        inside = mask & np.isfinite(field)
        omega = np.float32(2.0 * np.pi) * _field_highpass(
            np.nan_to_num(field), inside, sizes_vox, sizes
        )
        # field_hz follows the +2 pi f TE convention already
        sign = 1
    else:
        omega = combined_highpass_frequency(
            mag, ph, mask, echo_times=times, voxel_size=sizes_vox, filter_size_mm=sizes
        )
        sign = phase_sign
    weights = phase_mask(omega * np.float32(reference_te), phase_sign=sign)
    weights[~mask] = 1.0
    LOGGER.debug(
        "swi: %d echoes, filter %s mm, power %d, reference TE %.4g s",
        times.size, sizes.tolist(), power, reference_te,
    )
    return (combined * weights**power).astype(np.float32)


# ---------------------------------------------------------------------------------------
# projections
# ---------------------------------------------------------------------------------------


def _slab_voxels(image: np.ndarray, slab_mm: float, voxel_size: Sequence[float], axis: int) -> int:
    if image.ndim != 3:
        raise ValueError(f"image must be 3D [x, y, z], got shape {image.shape}.")
    if axis not in (0, 1, 2, -1, -2, -3):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}.")
    sizes = check_voxel_size(voxel_size)
    if not (np.isfinite(slab_mm) and slab_mm > 0):
        raise ValueError(f"slab_mm must be a positive thickness (mm), got {slab_mm!r}.")
    return max(1, round(float(slab_mm) / float(sizes[axis])))


def minimum_intensity_projection(
    image: np.ndarray, *, slab_mm: float, voxel_size: Sequence[float], axis: int = 2
) -> np.ndarray:
    """Sliding-slab minimum intensity projection (mIP), same shape and units as ``image``.

    Slice ``i`` holds the minimum over ``n = max(1, round(slab_mm / voxel_size[axis]))``
    slices ``i - n // 2 ... i - n // 2 + n - 1`` along ``axis`` (clipped to the volume).
    Non-finite values are ignored unless a whole slab is non-finite (float32 result).
    """
    image = np.asarray(image, dtype=np.float32)
    n = _slab_voxels(image, slab_mm, voxel_size, axis)
    work = np.where(np.isfinite(image), image, np.float32(np.inf))
    result = ndimage.minimum_filter1d(work, size=n, axis=axis, mode="nearest")
    return np.where(np.isinf(result), np.float32(np.nan), result).astype(np.float32)


def maximum_intensity_projection(
    image: np.ndarray, *, slab_mm: float, voxel_size: Sequence[float], axis: int = 2
) -> np.ndarray:
    """Sliding-slab maximum intensity projection (MIP; QSM venography of a Chimap, ppm),
    same shape and units as ``image``; the slab as in :func:`minimum_intensity_projection`.
    """
    image = np.asarray(image, dtype=np.float32)
    n = _slab_voxels(image, slab_mm, voxel_size, axis)
    work = np.where(np.isfinite(image), image, np.float32(-np.inf))
    result = ndimage.maximum_filter1d(work, size=n, axis=axis, mode="nearest")
    return np.where(np.isinf(result), np.float32(np.nan), result).astype(np.float32)
