"""Body/bone phantom (a lower leg) and its multi-echo water-fat GRE forward simulation.

Geometry (mm, leg axis along z, arrays ``[x, y, z]``): an elliptical leg cross-section
(slightly tapering along z) in air, a subcutaneous fat layer, muscle, a tibia-like bone
(elliptical cortical shell around marrow) whose marrow is split along z into regions of
different trabecular density (bone volume fraction BV/TV) and fat fraction, and a smaller
fibula-like bone with fatty marrow. The leg continues beyond the field of view in z (the
phantom is built on a longer grid and cropped, so no air caps appear at the slab ends).

Tissue properties (3 T; susceptibility in ppm relative to water; proton density relative):

- muscle: chi 0, PD 0.80, R2* 30 1/s, PDFF 2%
- subcutaneous fat: chi +0.65 (fat relative to water), PD 0.90, R2* 45 1/s, PDFF 95%
- cortical bone: chi -2.2, PD 0.05, R2* 1000 1/s (no usable signal)
- marrow region with bone volume fraction ``b`` and marrow PDFF ``p``:
  ``chi = (1 - b) (p / 100) 0.65 + b (-2.2)``, PD ``(1 - b) 0.9``,
  ``R2* = 40 + 800 b`` (1/s; trabecular dephasing grows with BV/TV), fat fraction ``p``.

Signal (echo ``n`` at ``t_n`` s)::

    s_n = exp(i phi0) (W + F c_n) exp((-R2* + i 2 pi f) t_n) + noise

with ``W = PD (1 - PDFF/100)``, ``F = PD PDFF/100``, ``c_n`` the fat spectrum of
:func:`qsmprep.recon.waterfat.fat_signal`, ``f`` the total field (Hz: local field of the
tissue susceptibility plus the background of the air around the leg after a 2nd-order shim,
:func:`body_fields`) and complex Gaussian noise of standard
deviation ``mean(PD in the tissue mask) / snr`` per channel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from qsmprep.recon import waterfat
from qsmprep.recon.dipole import ppm_to_hz
from qsmprep.simulate.phantom import AIR_CHI_PPM, HeadPhantom
from qsmprep.simulate.signal import (
    GreSimulation,
    smooth_phase_offset,
    wrap_phase,
)

LOGGER = logging.getLogger("qsmprep")

FAT_CHI_PPM = 0.65
BONE_CHI_PPM = -2.2
MARROW_PD = 0.9

#: label id -> name (RC2-like numbering for the shared tissues, 20+ for marrow regions)
LABELS = {
    12: "subcutaneous_fat",
    13: "cortical_bone",
    14: "air",
    15: "muscle",
    21: "tibia_marrow_distal",
    22: "tibia_marrow_middle",
    23: "tibia_marrow_proximal",
    24: "fibula_marrow",
}

#: default marrow regions: label -> (BV/TV, PDFF %)
DEFAULT_MARROW = {21: (0.25, 40.0), 22: (0.14, 70.0), 23: (0.05, 92.0), 24: (0.10, 100.0)}

#: fixed tissues: label -> (chi ppm, proton density, R2* 1/s, PDFF %)
TISSUE_PROPERTIES = {
    12: (FAT_CHI_PPM, 0.90, 45.0, 95.0),
    13: (BONE_CHI_PPM, 0.05, 1000.0, 0.0),
    14: (AIR_CHI_PPM, 0.0, 0.0, 0.0),
    15: (0.0, 0.80, 30.0, 2.0),
}


@dataclass
class BodyPhantom:
    """A body phantom: the :class:`HeadPhantom`-compatible part (``phantom``: chi, labels,
    tissue mask as ``brain_mask``, total proton density ``m0``, R2*) plus ``pdff`` (%),
    ``bvtv`` (bone volume fraction, 0-1) and per-label properties ``regions``
    (label -> dict of chi, pdff, bvtv, r2star)."""

    phantom: HeadPhantom
    pdff: np.ndarray
    bvtv: np.ndarray
    regions: dict[int, dict[str, float]]

    @property
    def water(self) -> np.ndarray:
        """Water proton density (relative)."""
        return (self.phantom.m0 * (1 - self.pdff / 100.0)).astype(np.float32)

    @property
    def fat(self) -> np.ndarray:
        """Fat proton density (relative)."""
        return (self.phantom.m0 * self.pdff / 100.0).astype(np.float32)

    def crop(self, slices: Sequence[slice]) -> "BodyPhantom":
        """Sub-volume ``[slices]``."""
        sl = tuple(slices)
        return BodyPhantom(self.phantom.crop(sl), self.pdff[sl].copy(), self.bvtv[sl].copy(),
                           dict(self.regions))


def marrow_properties(bvtv: float, pdff: float) -> dict[str, float]:
    """chi (ppm), proton density, R2* (1/s) and PDFF (%) of marrow with bone fraction ``bvtv``."""
    if not 0 <= bvtv < 1:
        raise ValueError(f"BV/TV must lie in [0, 1), got {bvtv}.")
    if not 0 <= pdff <= 100:
        raise ValueError(f"PDFF must lie in [0, 100] %, got {pdff}.")
    chi = (1 - bvtv) * (pdff / 100.0) * FAT_CHI_PPM + bvtv * BONE_CHI_PPM
    return {"chi": float(chi), "pd": float((1 - bvtv) * MARROW_PD),
            "r2star": float(40.0 + 800.0 * bvtv), "pdff": float(pdff), "bvtv": float(bvtv)}


def leg_phantom(
    *,
    voxel_size: Sequence[float] = (2.0, 2.0, 2.0),
    fov_mm: Sequence[float] = (128.0, 128.0, 64.0),
    marrow: dict[int, tuple[float, float]] | None = None,
    leg_semi_mm: tuple[float, float] = (50.0, 43.0),
    fat_mm: float = 7.0,
    cortex_mm: float = 3.0,
    extend_factor: float = 3.0,
) -> tuple[BodyPhantom, tuple[slice, slice, slice]]:
    """Lower-leg phantom on a grid ``extend_factor`` times longer in z than ``fov_mm``.

    Returns the phantom on the extended grid and the slices of the field of view (crop the
    simulation with them: the leg then continues beyond the slab). ``marrow`` maps the
    marrow labels 21-24 to ``(BV/TV, PDFF %)`` (default :data:`DEFAULT_MARROW`); the tibia's
    regions 21/22/23 are consecutive thirds of the field of view along z.
    """
    vs = tuple(float(v) for v in voxel_size)
    fov = tuple(float(v) for v in fov_mm)
    if len(vs) != 3 or len(fov) != 3 or min(vs) <= 0 or min(fov) <= 0:
        raise ValueError(f"voxel_size and fov_mm need 3 positive values, got {voxel_size}, "
                         f"{fov_mm}.")
    if extend_factor < 1:
        raise ValueError(f"extend_factor must be >= 1, got {extend_factor}.")
    marrow = dict(DEFAULT_MARROW if marrow is None else marrow)
    unknown = set(marrow) - {21, 22, 23, 24}
    if unknown:
        raise ValueError(f"marrow labels must be 21-24, got {sorted(unknown)}.")
    for label, default in DEFAULT_MARROW.items():
        marrow.setdefault(label, default)
    fov_shape = tuple(max(8, int(round(f / v))) for f, v in zip(fov, vs))
    nz_total = int(round(fov_shape[2] * extend_factor))
    shape = (fov_shape[0], fov_shape[1], nz_total)
    z0 = (nz_total - fov_shape[2]) // 2
    fov_slices = (slice(0, shape[0]), slice(0, shape[1]), slice(z0, z0 + fov_shape[2]))

    x = (np.arange(shape[0]) - (shape[0] - 1) / 2) * vs[0]
    y = (np.arange(shape[1]) - (shape[1] - 1) / 2) * vs[1]
    z = (np.arange(shape[2]) - (z0 + (fov_shape[2] - 1) / 2)) * vs[2]
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    taper = 1.0 - 0.08 * np.clip(Z / max(fov[2], 1), -1.5, 1.5)  # thinner distally (z < 0)
    ax, ay = leg_semi_mm
    leg = (X / (ax * taper)) ** 2 + (Y / (ay * taper)) ** 2 <= 1.0
    inner = (X / (ax * taper - fat_mm)) ** 2 + (Y / (ay * taper - fat_mm)) ** 2 <= 1.0

    labels = np.full(shape, 14, dtype=np.int16)
    labels[leg] = 12
    labels[inner] = 15
    # tibia: anterior-medial ellipse; fibula: posterior-lateral circle
    tibia_c, tibia_semi = (-8.0, 12.0), (17.0, 14.0)
    fib_c, fib_r = (24.0, -8.0), 7.5
    tibia = ((X - tibia_c[0]) / tibia_semi[0]) ** 2 + ((Y - tibia_c[1]) / tibia_semi[1]) ** 2
    tib_outer = tibia <= 1.0
    tib_inner = ((X - tibia_c[0]) / (tibia_semi[0] - cortex_mm)) ** 2 + (
        (Y - tibia_c[1]) / (tibia_semi[1] - cortex_mm)) ** 2 <= 1.0
    fib_d = np.hypot(X - fib_c[0], Y - fib_c[1])
    fib_outer = fib_d <= fib_r
    fib_inner = fib_d <= fib_r - 0.7 * cortex_mm
    labels[(tib_outer | fib_outer) & inner] = 13
    third = fov[2] / 3.0
    zc = Z
    labels[tib_inner & inner & (zc < -third / 2)] = 21
    labels[tib_inner & inner & (zc >= -third / 2) & (zc < third / 2)] = 22
    labels[tib_inner & inner & (zc >= third / 2)] = 23
    labels[fib_inner & inner] = 24

    chi = np.zeros(shape, dtype=np.float32)
    m0 = np.zeros(shape, dtype=np.float32)
    r2 = np.zeros(shape, dtype=np.float32)
    pdff = np.zeros(shape, dtype=np.float32)
    bvtv = np.zeros(shape, dtype=np.float32)
    regions: dict[int, dict[str, float]] = {}
    for label, (c, pd, rate, ff) in TISSUE_PROPERTIES.items():
        sel = labels == label
        chi[sel], m0[sel], r2[sel], pdff[sel] = c, pd, rate, ff
        regions[label] = {"chi": c, "pdff": ff, "bvtv": 1.0 if label == 13 else 0.0,
                          "r2star": rate, "pd": pd}
    for label, (b, ff) in marrow.items():
        props = marrow_properties(b, ff)
        sel = labels == label
        chi[sel], m0[sel], r2[sel], pdff[sel], bvtv[sel] = (
            props["chi"], props["pd"], props["r2star"], props["pdff"], props["bvtv"])
        regions[label] = props
    bvtv[labels == 13] = 1.0
    tissue = labels != 14
    phantom = HeadPhantom(
        chi_ppm=chi, labels=labels, label_names=dict(LABELS), brain_mask=tissue,
        m0=m0, r2star=r2, voxel_size=vs, background_chi_ppm=AIR_CHI_PPM,
        description="lower-leg water-fat phantom (qsmprep.simulate.body)",
    )
    return BodyPhantom(phantom, pdff, bvtv, regions), fov_slices


def body_fields(
    phantom: HeadPhantom, b0_direction: Sequence[float], *, smoothing_vox: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Total, local and background fields (ppm, float32, no shim) of a body phantom whose
    tissue mask reaches the air.

    ``local = D * (chi * tissue)``; ``background = D * u`` with ``u = -chi_air`` in the tissue
    and the air's ``chi - chi_air = 0`` outside, anti-aliased by a Gaussian of
    ``smoothing_vox`` voxels on the AIR side only (``u`` is reset to ``-chi_air`` in the
    tissue), so the background is exactly harmonic in the tissue.  The two-sided smoothing
    of :func:`~qsmprep.simulate.signal.simulate_fields` (made for brain masks lined by CSF)
    would put ~4.6 ppm of spurious sources into the outer voxel layers of a limb, whose
    non-harmonic field no background removal can take out (PDF local-field error on the leg
    phantom 168 ppb rms against 65 ppb with this one-sided version; RESULTS.md "Body chi").
    """
    from scipy import ndimage

    from qsmprep.recon.dipole import forward_field

    vs = tuple(float(v) for v in phantom.voxel_size)
    tissue = np.asarray(phantom.brain_mask, dtype=bool)
    chi = np.asarray(phantom.chi_ppm, dtype=np.float32)
    air = np.float32(phantom.background_chi_ppm)
    margin = list(phantom.shape)
    local = forward_field(chi * tissue, vs, b0_direction, pad=margin)
    sources = np.where(tissue, -air, chi - air).astype(np.float32)
    if smoothing_vox > 0:
        sources = ndimage.gaussian_filter(sources, smoothing_vox, mode="constant")
        sources[tissue] = -air
    background = forward_field(sources, vs, b0_direction, pad=margin)
    return (local + background).astype(np.float32), local, background


@dataclass
class WaterFatSimulation:
    """A :class:`GreSimulation` of a body phantom plus the fat model used."""

    simulation: GreSimulation
    fat_model: str
    water_ppm: float | None


def simulate_waterfat_gre(
    body: BodyPhantom,
    *,
    echo_times: Sequence[float],
    b0_tesla: float = 3.0,
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    fat_model: str | waterfat.FatModel = "ren_marrow",
    water_ppm: float | None = None,
    snr: float | None = 100.0,
    seed: int = 0,
    shim_order: int | None = 2,
    phase_sign: int = 1,
    crop: Sequence[slice] | None = None,
) -> tuple[GreSimulation, BodyPhantom]:
    """Multi-echo water-fat GRE of ``body`` (fields on the full grid, then ``crop``ped).

    ``echo_times`` (s), ``b0_tesla`` (T), ``b0_direction`` (voxel axes), ``fat_model``
    (name or :class:`~qsmprep.recon.waterfat.FatModel`), ``snr`` = mean proton density in
    the tissue / noise sigma per channel (None: noise-free), ``phase_sign`` +1 (phase grows
    as ``+2 pi f t``) or -1. Returns the simulation and the (cropped) phantom.
    """
    te = np.asarray(echo_times, dtype=np.float64).ravel()
    if te.size < 1 or np.any(te <= 0) or np.any(te >= 1) or not np.all(np.isfinite(te)):
        raise ValueError(f"echo_times must be positive values in s (< 1 s), got {echo_times!r}")
    if snr is not None and not snr > 0:
        raise ValueError(f"snr must be positive or None, got {snr!r}")
    if phase_sign not in (1, -1):
        raise ValueError(f"phase_sign must be +1 or -1, got {phase_sign!r}")
    b0 = np.asarray(b0_direction, dtype=float)
    b0 = b0 / np.linalg.norm(b0)
    phantom = body.phantom
    total, local, background = body_fields(phantom, b0)
    coef = None
    if crop is not None:
        sl = tuple(crop)
        body = body.crop(sl)
        phantom = body.phantom
        total, local, background = total[sl], local[sl], background[sl]
    if shim_order is not None:
        from qsmprep.simulate.signal import shim

        fitted, coef = shim(total, phantom.brain_mask & (phantom.m0 > 0.2), phantom.voxel_size,
                            shim_order)
        total = total - fitted
        background = background - fitted
    shape = phantom.shape
    rng = np.random.default_rng(seed)
    phi0 = smooth_phase_offset(shape, phantom.voxel_size, rng)
    f_hz = ppm_to_hz(total.astype(np.float64), b0_tesla)
    c = waterfat.fat_signal(te, b0_tesla, fat_model, water_ppm=water_ppm)
    water, fat = body.water, body.fat
    tissue = phantom.brain_mask & (phantom.m0 > 0.2)
    sigma = 0.0 if snr is None else float(phantom.m0[tissue].mean()) / float(snr)
    magnitude = np.empty(shape + (te.size,), dtype=np.float32)
    phase = np.empty(shape + (te.size,), dtype=np.float32)
    for n, t in enumerate(te):  # loop over echoes only
        amplitude = (water + fat * c[n]) * np.exp(-phantom.r2star * t)
        signal = amplitude * np.exp(1j * (phi0 + 2 * np.pi * f_hz * t))
        if sigma > 0:
            noise = rng.standard_normal(shape + (2,), dtype=np.float32)
            signal = signal + sigma * (noise[..., 0] + 1j * noise[..., 1])
        if phase_sign == -1:
            signal = np.conj(signal)
        magnitude[..., n] = np.abs(signal)
        phase[..., n] = wrap_phase(np.angle(signal))
    simulation = GreSimulation(
        magnitude=magnitude, phase=phase, total_field_ppm=total.astype(np.float32),
        local_field_ppm=local.astype(np.float32),
        background_field_ppm=background.astype(np.float32),
        phase_offset=(phi0 if phase_sign == 1 else -phi0).astype(np.float32), echo_times=te,
        b0_tesla=float(b0_tesla), b0_direction=b0, noise_sigma=sigma,
        phase_sign=int(phase_sign), shim_coefficients=None if coef is None else np.asarray(coef),
    )
    return simulation, body


def leg_dataset(
    *,
    voxel_size: Sequence[float] = (2.0, 2.0, 2.0),
    fov_mm: Sequence[float] = (128.0, 128.0, 64.0),
    echo_times: Sequence[float] = tuple(1.25e-3 + 0.9e-3 * n for n in range(6)),
    b0_tesla: float = 3.0,
    fat_model: str = "ren_marrow",
    snr: float | None = 100.0,
    seed: int = 0,
    marrow: dict[int, tuple[float, float]] | None = None,
    leg_semi_mm: tuple[float, float] = (50.0, 43.0),
) -> tuple[GreSimulation, BodyPhantom]:
    """Leg phantom and its simulation cropped to the field of view (see the functions above)."""
    body, fov = leg_phantom(voxel_size=voxel_size, fov_mm=fov_mm, marrow=marrow,
                            leg_semi_mm=leg_semi_mm)
    return simulate_waterfat_gre(body, echo_times=echo_times, b0_tesla=b0_tesla,
                                 fat_model=fat_model, snr=snr, seed=seed, crop=fov)
