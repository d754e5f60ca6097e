"""Forward simulation of multi-echo gradient-echo (GRE) magnitude and phase.

Signal model for echo ``n`` at echo time ``t_n`` (s)::

    s_n = m0 * exp(-R2* t_n) * exp(i (phi0 + sign * 2 pi f t_n)) + noise

with ``f`` the total field in Hz (``f = gamma_bar * B0 * field_ppm``), ``phi0`` a smooth
transmit/receive phase offset (rad) and complex Gaussian noise of standard deviation
``sigma = mean(m0 in the brain mask) / snr`` in each of the real and imaginary channels.
Default phase convention: ``sign = +1``, i.e. the phase grows as ``+2 pi f t`` so a
positive susceptibility (paramagnetic, e.g. veins) gives positive phase where its field is
positive.  Arrays are ``[x, y, z]`` / ``[x, y, z, echo]`` in the acquisition voxel grid.

Fields (see :func:`simulate_fields`): the head sits in an infinite medium of air (zero
padding of ``chi - chi_air`` stands for air).  ``local_field_ppm = D * (chi * brain_mask)``,
not demeaned; ``background_field_ppm`` is the field of the (anti-aliased) sources outside the
mask minus a least-squares solid-harmonic fit up to ``shim_order`` over the mask (scanner
shimming); ``total_field_ppm = local + background`` exactly, and the background is harmonic
inside the mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import numpy as np
from scipy import ndimage

from qsmprep.recon.dipole import (
    b0_direction_from_affine,
    forward_field,
    ppm_to_hz,
)
from qsmprep.simulate.phantom import HeadPhantom

LOGGER = logging.getLogger("qsmprep")


@dataclass
class GreSimulation:
    """Result of :func:`multi_echo_gre`.

    ``magnitude`` (float32, [x, y, z, echo], units of ``m0``), ``phase`` (float32 rad wrapped
    to (-pi, pi]), ``total_field_ppm``/``local_field_ppm``/``background_field_ppm`` (ppm of
    B0), ``phase_offset`` (phi0, rad), ``echo_times`` (s), ``b0_tesla`` (T), ``b0_direction``
    (unit vector in voxel axes), ``noise_sigma`` (per real/imaginary channel, ``m0`` units),
    ``phase_sign`` (+1: phase = +2 pi f t), ``shim_coefficients`` (ppm per basis function).
    """

    magnitude: np.ndarray
    phase: np.ndarray
    total_field_ppm: np.ndarray
    local_field_ppm: np.ndarray
    background_field_ppm: np.ndarray
    phase_offset: np.ndarray
    echo_times: np.ndarray
    b0_tesla: float
    b0_direction: np.ndarray
    noise_sigma: float
    phase_sign: int = 1
    shim_coefficients: np.ndarray | None = None

    @property
    def total_field_hz(self) -> np.ndarray:
        """Total field in Hz (float32)."""
        return ppm_to_hz(self.total_field_ppm, self.b0_tesla).astype(np.float32)

    @property
    def local_field_hz(self) -> np.ndarray:
        """Local field in Hz (float32)."""
        return ppm_to_hz(self.local_field_ppm, self.b0_tesla).astype(np.float32)

    @property
    def imaging_frequency_mhz(self) -> float:
        """Proton Larmor frequency (MHz) at ``b0_tesla``."""
        return float(ppm_to_hz(1.0, self.b0_tesla))

    def crop(self, slices: Sequence[slice]) -> "GreSimulation":
        """Sub-volume ``[slices]`` of every map (fields keep the sources outside the crop)."""
        sl = tuple(slices)
        if len(sl) != 3 or not all(isinstance(s, slice) for s in sl):
            raise ValueError("crop needs three slice objects")
        return replace(
            self,
            magnitude=self.magnitude[sl].copy(), phase=self.phase[sl].copy(),
            total_field_ppm=self.total_field_ppm[sl].copy(),
            local_field_ppm=self.local_field_ppm[sl].copy(),
            background_field_ppm=self.background_field_ppm[sl].copy(),
            phase_offset=self.phase_offset[sl].copy(),
        )

    def complex_signal(self) -> np.ndarray:
        """Complex64 signal ``magnitude * exp(i phase)``."""
        return (self.magnitude * np.exp(1j * self.phase)).astype(np.complex64)


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation ``Rz @ Ry @ Rx`` for angles (degrees) about the x, y and z axes."""
    ax, ay, az = np.radians(np.asarray(angles_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_affine(
    voxel_size: Sequence[float],
    angles_deg: Sequence[float] = (0.0, 0.0, 0.0),
    *,
    shape: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Voxel-to-scanner affine of a (possibly oblique) acquisition and its B0 direction.

    The voxel axes are rotated by ``angles_deg`` (degrees about scanner x, y, z; applied
    x first) relative to the scanner axes; ``voxel_size`` in mm.  With ``shape`` the grid
    centre is placed at the scanner origin.  Returns ``(affine, b0_direction)`` with the
    B0 direction (scanner z) as a unit vector in voxel axes, equal to
    ``dipole.b0_direction_from_affine(affine)``.
    """
    vs = np.asarray(voxel_size, dtype=float)
    if vs.shape != (3,) or np.any(vs <= 0):
        raise ValueError(f"voxel_size must be 3 positive values (mm), got {voxel_size!r}")
    if len(angles_deg) != 3:
        raise ValueError(f"angles_deg must have 3 values, got {angles_deg!r}")
    rot = rotation_matrix(angles_deg)
    affine = np.eye(4)
    affine[:3, :3] = rot * vs[None, :]
    if shape is not None:
        centre = (np.asarray(shape, dtype=float) - 1.0) / 2.0
        affine[:3, 3] = -affine[:3, :3] @ centre
    return affine, b0_direction_from_affine(affine)


def crop_affine(affine: np.ndarray, slices: Sequence[slice]) -> np.ndarray:
    """Affine of the sub-volume ``[slices]`` of a grid with voxel-to-scanner ``affine``."""
    start = np.array([s.start or 0 for s in slices], dtype=float)
    out = np.array(affine, dtype=float, copy=True)
    out[:3, 3] = out[:3, :3] @ start + out[:3, 3]
    return out


def _centred_coords(shape, voxel_size, mask: np.ndarray | None, scale_mm: float = 100.0):
    """Broadcastable coordinates (units of ``scale_mm``) centred on the mask's centre of mass
    (on the grid centre without a mask)."""
    if mask is not None and mask.any():
        centre = ndimage.center_of_mass(mask)
    else:
        centre = [(n - 1) / 2.0 for n in shape]
    return np.ix_(*[(np.arange(n) - c) * v / scale_mm
                    for n, c, v in zip(shape, centre, voxel_size)])


def harmonic_basis(shape, voxel_size, order: int, mask: np.ndarray | None = None):
    """Solid harmonics (real, unnormalised, broadcastable arrays) up to ``order`` (0-2).

    Coordinates in mm / 100 centred on the mask's centre of mass.  Every function has zero
    Laplacian, so shimming with them keeps background fields harmonic.
    """
    if order not in (0, 1, 2):
        raise ValueError(f"shim order must be 0, 1 or 2, got {order!r}")
    x, y, z = _centred_coords(shape, voxel_size, mask)
    basis = [np.ones((1, 1, 1))]
    if order >= 1:
        basis += [x, y, z]
    if order >= 2:
        basis += [x * y, x * z, y * z, x**2 - y**2, 2 * z**2 - x**2 - y**2]
    return basis


def shim(field_ppm: np.ndarray, mask: np.ndarray, voxel_size, order: int):
    """Least-squares solid-harmonic fit of ``field_ppm`` over ``mask``.

    Returns ``(shim_field_ppm, coefficients)``: the fitted field on the whole grid (float32)
    and its coefficients (ppm per basis function of :func:`harmonic_basis`).  Subtracting it
    mimics scanner shimming.
    """
    shape = field_ppm.shape
    basis = harmonic_basis(shape, voxel_size, order, mask)
    design = np.stack([np.broadcast_to(f, shape)[mask] for f in basis], axis=1)
    coef, *_ = np.linalg.lstsq(design, field_ppm[mask].astype(np.float64), rcond=None)
    fitted = np.zeros(shape, dtype=np.float64)
    for c, f in zip(coef, basis):
        fitted += c * f
    return fitted.astype(np.float32), coef


def smooth_phase_offset(
    shape: Sequence[int], voxel_size: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """Random smooth phase offset phi0 (rad): a low-order polynomial across the FOV.

    A constant in [-pi, pi) plus linear (about 1 rad across the head) and quadratic terms,
    as produced by transmit/receive phase of a coil combination.
    """
    x, y, z = _centred_coords(shape, voxel_size, None)
    lin = rng.normal(0.0, 0.6, size=3)
    quad = rng.normal(0.0, 0.8, size=6)
    phi0 = (
        rng.uniform(-np.pi, np.pi)
        + lin[0] * x + lin[1] * y + lin[2] * z
        + quad[0] * x * x + quad[1] * y * y + quad[2] * z * z
        + quad[3] * x * y + quad[4] * x * z + quad[5] * y * z
    )
    return np.broadcast_to(phi0, tuple(shape)).astype(np.float32)


def wrap_phase(phase: np.ndarray) -> np.ndarray:
    """Wrap phase (rad) to (-pi, pi]."""
    return (np.pi - np.mod(np.pi - phase, 2.0 * np.pi)).astype(np.float32)


def simulate_fields(
    phantom: HeadPhantom,
    b0_direction: Sequence[float],
    *,
    shim_order: int | None = 2,
    pad_factor: float = 1.0,
    background_smoothing_vox: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Total, local and background fields (ppm, float32) of ``phantom`` and shim coefficients.

    ``local = D * (chi * mask)`` (sharp chi: consistent with the chi ground truth).
    ``background = D * u`` with ``u`` the sources outside the mask relative to air
    (``chi - chi_air`` outside, ``-chi_air`` inside the mask, so ``u`` is uniform across the
    CSF-lined mask boundary), smoothed by a Gaussian of ``background_smoothing_vox`` voxels.
    The smoothing anti-aliases the sharp 9 ppm air/tissue and 2 ppm bone steps, whose
    continuous-kernel convolution otherwise rings at the Nyquist frequency (worst for oblique
    B0) with non-harmonic ripples of several Hz deep inside the brain.  As ``u`` is uniform
    in the mask and its CSF lining, the background is harmonic inside the mask except within
    about two smoothing widths of bone or air (a phantom with a CSF layer of >= 2 voxels
    outside the mask, as :func:`~qsmprep.simulate.phantom.head_phantom`, keeps that tail
    below about 1% of the bone contrast).
    ``total = local + background - shim`` where the shim is the solid-harmonic fit up to
    ``shim_order`` (None: none) of ``local + background`` over the mask.  Convolutions are
    zero-padded by ``pad_factor`` times the grid size on each axis (padding = air).
    """
    b0 = np.asarray(b0_direction, dtype=float)
    if b0.shape != (3,) or not np.isfinite(b0).all() or np.linalg.norm(b0) == 0:
        raise ValueError(f"b0_direction must be a non-zero 3-vector, got {b0_direction!r}")
    if pad_factor < 0:
        raise ValueError(f"pad_factor must be >= 0, got {pad_factor!r}")
    if background_smoothing_vox < 0:
        raise ValueError(
            f"background_smoothing_vox must be >= 0, got {background_smoothing_vox!r}")
    if shim_order is not None and shim_order not in (0, 1, 2):
        raise ValueError(f"shim_order must be None, 0, 1 or 2, got {shim_order!r}")
    vs = tuple(float(v) for v in phantom.voxel_size)
    mask = np.asarray(phantom.brain_mask, dtype=bool)
    chi = np.asarray(phantom.chi_ppm, dtype=np.float32)
    air = np.float32(phantom.background_chi_ppm)
    margin = [int(np.ceil(pad_factor * n)) for n in phantom.shape]

    local = forward_field(chi * mask, vs, b0, pad=margin)
    sources = chi - air
    sources[mask] = -air
    if background_smoothing_vox > 0:
        sources = ndimage.gaussian_filter(sources, background_smoothing_vox, mode="constant")
    background = forward_field(sources, vs, b0, pad=margin)
    total = local + background
    coef = None
    if shim_order is not None and mask.any():
        fitted, coef = shim(total, mask, vs, shim_order)
        total -= fitted
        background -= fitted
    return total, local, background, coef


def multi_echo_gre(
    phantom: HeadPhantom,
    *,
    echo_times: Sequence[float],
    b0_tesla: float = 3.0,
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    snr: float | None = 100.0,
    phase_offset: Literal["smooth", "zero"] | np.ndarray = "smooth",
    seed: int = 0,
    shim_order: int | None = 2,
    phase_sign: int = 1,
    pad_factor: float = 1.0,
    background_smoothing_vox: float = 1.0,
    intravoxel_dephasing: bool = False,
) -> GreSimulation:
    """Simulate multi-echo GRE magnitude and wrapped phase of ``phantom``.

    ``echo_times`` in s (strictly positive, < 1 s), ``b0_tesla`` in T, ``b0_direction`` a
    vector in voxel axes (use :func:`oblique_affine` for oblique slabs), ``snr`` =
    mean(m0 in the brain mask) / sigma (``None`` or ``inf``: noise-free), ``phase_offset``
    ``"smooth"`` (random low-order polynomial), ``"zero"`` or an array (rad) of the grid
    shape, ``seed`` for the offset and the noise, ``shim_order`` None (no shim) or 0-2
    (solid harmonics fitted over the brain mask and removed from the total field),
    ``phase_sign`` +1 (phase = +2 pi f t) or -1, ``pad_factor`` and
    ``background_smoothing_vox`` see :func:`simulate_fields`, ``intravoxel_dephasing`` multiplies
    the magnitude by the sinc attenuation of the local field gradient across each voxel
    (off by default: then magnitude = m0 exp(-R2* t) exactly).
    """
    te = np.asarray(echo_times, dtype=np.float64).ravel()
    if te.size == 0 or not np.all(np.isfinite(te)) or np.any(te <= 0):
        raise ValueError(f"echo_times must be positive finite values in s, got {echo_times!r}")
    if np.any(te >= 1.0):
        raise ValueError(f"echo_times must be in seconds (< 1 s), got {echo_times!r}")
    if not (np.isfinite(b0_tesla) and b0_tesla > 0):
        raise ValueError(f"b0_tesla must be positive (T), got {b0_tesla!r}")
    b0 = np.asarray(b0_direction, dtype=float)
    if b0.shape != (3,) or not np.isfinite(b0).all() or np.linalg.norm(b0) == 0:
        raise ValueError(f"b0_direction must be a non-zero 3-vector, got {b0_direction!r}")
    b0 = b0 / np.linalg.norm(b0)
    if snr is not None and not (snr > 0):
        raise ValueError(f"snr must be positive or None, got {snr!r}")
    if phase_sign not in (1, -1):
        raise ValueError(f"phase_sign must be +1 or -1, got {phase_sign!r}")

    shape = phantom.shape
    vs = tuple(float(v) for v in phantom.voxel_size)
    mask = np.asarray(phantom.brain_mask, dtype=bool)
    total, local, background, coef = simulate_fields(
        phantom, b0, shim_order=shim_order, pad_factor=pad_factor,
        background_smoothing_vox=background_smoothing_vox,
    )

    rng = np.random.default_rng(seed)
    if isinstance(phase_offset, str):
        if phase_offset == "smooth":
            phi0 = smooth_phase_offset(shape, vs, rng)
        elif phase_offset == "zero":
            phi0 = np.zeros(shape, dtype=np.float32)
        else:
            raise ValueError(
                f"phase_offset must be 'smooth', 'zero' or an array, got {phase_offset!r}")
    else:
        phi0 = np.asarray(phase_offset, dtype=np.float32)
        if phi0.shape != shape:
            raise ValueError(f"phase_offset array has shape {phi0.shape}, expected {shape}")

    f_hz = ppm_to_hz(total.astype(np.float64), b0_tesla)
    m0 = np.asarray(phantom.m0, dtype=np.float32)
    r2s = np.asarray(phantom.r2star, dtype=np.float32)
    gradients = np.gradient(f_hz, *vs) if intravoxel_dephasing else None
    ref = float(m0[mask].mean()) if mask.any() else float(m0.mean())
    sigma = 0.0 if snr is None or not np.isfinite(snr) else ref / float(snr)

    magnitude = np.empty(shape + (te.size,), dtype=np.float32)
    phase = np.empty(shape + (te.size,), dtype=np.float32)
    for n, t in enumerate(te):  # loop over echoes only
        amp = m0 * np.exp(-r2s * np.float32(t))
        if gradients is not None:
            for g, d in zip(gradients, vs):
                amp = amp * np.sinc(g * d * t).astype(np.float32)
        phi = phi0.astype(np.float64) + phase_sign * 2.0 * np.pi * f_hz * t
        signal = amp * np.exp(1j * phi)
        if sigma > 0:
            noise = rng.standard_normal(shape + (2,), dtype=np.float32)
            signal = signal + sigma * (noise[..., 0] + 1j * noise[..., 1])
        magnitude[..., n] = np.abs(signal)
        phase[..., n] = np.angle(signal)
    LOGGER.debug("multi_echo_gre: %d echoes, sigma %.4g, B0 %.3f T", te.size, sigma, b0_tesla)
    return GreSimulation(
        magnitude=magnitude,
        phase=phase,
        total_field_ppm=total.astype(np.float32),
        local_field_ppm=local.astype(np.float32),
        background_field_ppm=background.astype(np.float32),
        phase_offset=phi0,
        echo_times=te,
        b0_tesla=float(b0_tesla),
        b0_direction=b0,
        noise_sigma=float(sigma),
        phase_sign=int(phase_sign),
        shim_coefficients=None if coef is None else np.asarray(coef),
    )
