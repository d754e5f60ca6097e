"""Phase correction of bipolar multi-echo readouts.

With alternating readout polarity the echoes read with the second polarity (2nd, 4th, ...)
carry an extra phase ``phi(r)``: gradient delays shift k-space along the readout (a phase
ramp in the image) and eddy currents add a constant (Yu H, et al. JMRI 2010;32:1264-1271;
Peterson P, Mansson S. MRM 2014;71:219-229). Uncorrected, a fit that assumes one frequency
(or water plus fat) per voxel reads the alternation as a field error and, because it sits
at half the echo rate, as spurious fat.

Model: ``s_n(r) = exp(i q_n phi(r)) m_n(r)`` with ``q_n`` = 0 for the 1st, 3rd, ... echo
and 1 for the 2nd, 4th, ...; ``m_n`` the signal model (water, optionally the multi-peak fat
spectrum, one field and one R2*), and ``phi(r) = offset + gradient . (r - centre)`` (rad, r
in mm). The estimate is a profile likelihood: for a sample of strong voxels the best
VARPRO grid residual is computed at :data:`PHASE_SAMPLES` values of ``phi`` over one turn,
interpolated by its Fourier series, and the energy-weighted sum over voxels is minimised
over the global parameters (coarse grid, then Nelder-Mead). Voxels whose residual does not
depend on ``phi`` (noise, or fat at half the echo rate) weigh nothing. With uniform echo
spacing ``phi`` and ``phi + pi`` fit alike (a field shift of half the echo rate), so the
offset is reported in (-pi/2, pi/2].
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Literal, Sequence

import numpy as np
from scipy import optimize

from qsmprep.recon import waterfat

LOGGER = logging.getLogger("qsmprep")

#: ``phi`` samples over one turn for the residual profile of each voxel
PHASE_SAMPLES = 24
#: strong voxels in the estimate
BIPOLAR_VOXELS = 10000
#: ``auto`` corrects when the bipolar model removes this fraction of the monopolar residual
#: (measured: bipolar liver and phantom 0.59 / 0.58; monopolar ISMRM 2012 cases 12 and 15,
#: low-field liver and the leg phantom < 0.01; an oil phantom with a fat spectrum unlike the
#: model 0.16)
BIPOLAR_MIN_GAIN = 0.25
#: fewest echoes (unknowns per voxel: water, fat, field, R2* and the bipolar phase)
BIPOLAR_MIN_ECHOES = 4


@dataclasses.dataclass(frozen=True)
class BipolarEstimate:
    """Phase of the second-polarity echoes: ``offset`` (rad) at ``centre`` (mm, voxel axes
    times voxel size) plus ``gradient`` (rad/mm per voxel axis); the energy-weighted relative
    residuals of the monopolar and bipolar models and whether the correction applies."""

    offset: float
    gradient: tuple[float, float, float]
    centre: tuple[float, float, float]
    residual_monopolar: float
    residual_bipolar: float
    applied: bool
    message: str

    @property
    def gain(self) -> float:
        """Fraction of the monopolar residual the bipolar model removes."""
        return 1.0 - self.residual_bipolar / max(self.residual_monopolar, 1e-30)

    def phase(self, shape: Sequence[int], voxel_size: Sequence[float]) -> np.ndarray:
        """``phi`` (rad, float32) on a grid of ``shape`` (3D)."""
        axes = [(np.arange(n, dtype=np.float32) * np.float32(h) - np.float32(c)) * np.float32(g)
                for n, h, c, g in zip(shape, voxel_size, self.centre, self.gradient)]
        return (np.float32(self.offset) + axes[0][:, None, None] + axes[1][None, :, None]
                + axes[2][None, None, :]).astype(np.float32)

    def metadata(self) -> dict:
        """Sidecar fields."""
        return {"ReadoutPolarityCorrection": {
            "Applied": self.applied,
            "EvenEchoPhaseOffsetRad": round(self.offset, 4),
            "EvenEchoPhaseGradientRadPerMm": [round(g, 6) for g in self.gradient],
            "CentreMm": [round(c, 2) for c in self.centre],
            "ResidualMonopolar": round(self.residual_monopolar, 6),
            "ResidualBipolar": round(self.residual_bipolar, 6),
            "Message": self.message,
        }}


def polarity(n_echoes: int) -> np.ndarray:
    """``q_n``: 0 for the 1st, 3rd, ... echo, 1 for the 2nd, 4th, ... (float32)."""
    return (np.arange(n_echoes) % 2).astype(np.float32)


def _profiles(voxels: np.ndarray, times: np.ndarray, c: np.ndarray, r2star_max: float):
    """Residual of each voxel at PHASE_SAMPLES values of phi: Fourier coefficients (N, K)
    of the profile over [-pi, pi), and the voxels' energy."""
    psis, _ = waterfat.psi_grid(times)
    r2s = waterfat.default_r2star_grid(r2star_max)
    phis = np.arange(PHASE_SAMPLES) * (2 * np.pi / PHASE_SAMPLES) - np.pi
    q = polarity(times.size)
    profile = np.empty((voxels.shape[0], PHASE_SAMPLES), dtype=np.float32)
    energy = None
    for k, phi in enumerate(phis):
        turned = voxels * np.exp(-1j * q * phi).astype(np.complex64)
        cost, _, energy = waterfat.grid_residuals(turned, times, c, psis, r2s)
        profile[:, k] = cost.min(axis=1)
    coefficients = np.fft.rfft(profile, axis=1) / PHASE_SAMPLES
    coefficients[:, 1:] *= 2  # real profile: one-sided series
    if PHASE_SAMPLES % 2 == 0:
        coefficients[:, -1] /= 2
    return coefficients.astype(np.complex64), energy


def _total(coefficients, weight, coordinates, params) -> float:
    """Energy-weighted mean residual for phi = params[0] + coordinates @ params[1:]
    (the Fourier series of each profile summed by Horner's rule in exp(i (phi + pi)))."""
    z = np.exp(1j * (params[0] + np.pi + coordinates @ params[1:])).astype(np.complex64)
    value = coefficients[:, -1].copy()
    for k in range(coefficients.shape[1] - 2, -1, -1):
        value *= z
        value += coefficients[:, k]
    return float(weight @ value.real)


def estimate_bipolar_phase(
    signal: np.ndarray,
    echo_times: Sequence[float],
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_tesla: float | None = None,
    fat_model: str | waterfat.FatModel | None = None,
    water_ppm: float | None = None,
    phase_sign: int = 1,
    mode: Literal["auto", "bipolar"] = "auto",
    r2star_max: float = 500.0,
) -> BipolarEstimate:
    """Estimate the phase of the second-polarity echoes of complex ``signal`` [x, y, z, echo].

    ``fat_model`` None fits water only (brain); otherwise water plus the fat spectrum at
    ``b0_tesla`` (T) with ``phase_sign`` (+1 or -1, the data's handedness). ``mode``:
    ``"bipolar"`` always applies the estimate; ``"auto"`` only where it removes
    :data:`BIPOLAR_MIN_GAIN` of the monopolar residual. Needs >= 4 echoes.
    """
    if mode not in ("auto", "bipolar"):
        raise ValueError(f"mode must be 'auto' or 'bipolar', got {mode!r}.")
    if phase_sign not in (1, -1):
        raise ValueError(f"phase_sign must be +1 or -1, got {phase_sign!r}.")
    data = np.asarray(signal)
    if data.ndim != 4 or not np.iscomplexobj(data):
        raise ValueError(f"signal must be 4D complex [x, y, z, echo], got {data.dtype} "
                         f"{data.shape}.")
    times = np.asarray(echo_times, dtype=np.float64).ravel()
    if times.size != data.shape[3]:
        raise ValueError(f"{times.size} echo times for {data.shape[3]} echoes.")
    if times.size < BIPOLAR_MIN_ECHOES:
        raise ValueError(f"bipolar readout correction needs >= {BIPOLAR_MIN_ECHOES} echoes "
                         f"(water, fat, field, R2* and the polarity phase), got {times.size}.")
    if np.any(np.diff(times) <= 0):
        raise ValueError(f"echo times must be strictly increasing, got {times.tolist()}.")
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != data.shape[:3]:
        raise ValueError(f"mask shape {mask.shape} differs from the data {data.shape[:3]}.")
    finite = np.isfinite(data).all(axis=3)
    index = waterfat.strong_sample(data, mask & finite, BIPOLAR_VOXELS)
    if index.size < 10:
        raise ValueError(f"bipolar readout correction: only {index.size} voxels with signal "
                         "in the mask.")
    voxels = data.reshape(-1, times.size)[index].astype(np.complex64)
    if phase_sign == -1:
        voxels = np.conj(voxels)
    if fat_model is None:
        c = np.zeros(times.size, dtype=np.complex128)
    else:
        c = waterfat.fat_signal(times, b0_tesla, fat_model, water_ppm=water_ppm)
    coefficients, energy = _profiles(voxels, times, c, r2star_max)
    weight = (energy / max(float(energy.sum()), 1e-30)).astype(np.float32)

    size = np.asarray(voxel_size, dtype=np.float64)
    position = np.stack(np.unravel_index(index, mask.shape), axis=1) * size
    centre = weight.astype(np.float64) @ position
    offsets = position - centre
    half_extent = np.ptp(position, axis=0) / 2
    free = np.flatnonzero(half_extent >= size)  # axes the mask spans
    scaled = (offsets[:, free] / half_extent[free]).astype(np.float32)  # [-1, 1]
    harmonics = np.arange(coefficients.shape[1], dtype=np.float32)

    def total(params):
        return _total(coefficients, weight, scaled, np.asarray(params, np.float32))

    # coarse grid: ramps of up to +-pi across each half extent, for each the offset over one
    # turn at once (exp(i k (a + ramp)) = exp(i k a) exp(i k ramp))
    offsets_grid = np.arange(12) * (np.pi / 6)
    turns = np.exp(1j * np.outer(offsets_grid, harmonics))  # (A, K), phi + pi = a
    scores = []
    for ramp in itertools.product(np.linspace(-np.pi, np.pi, 5), repeat=free.size):
        along = scaled @ np.asarray(ramp, np.float32) if free.size else np.zeros(len(weight))
        summed = weight @ (coefficients * np.exp(1j * np.outer(along, harmonics)))  # (K,)
        for a, value in zip(offsets_grid - np.pi, (turns @ summed).real):
            scores.append((float(value), np.array((a, *ramp))))
    starts = [p for _, p in sorted(scores, key=lambda item: item[0])[:3]]
    best = min((optimize.minimize(total, p, method="Nelder-Mead",
                                  options={"xatol": 1e-4, "fatol": 1e-8, "maxiter": 2000})
                for p in starts), key=lambda r: r.fun)
    residual_monopolar = total(np.zeros(1 + free.size))
    residual_bipolar = min(float(best.fun), residual_monopolar)
    params = best.x if best.fun < residual_monopolar else np.zeros(1 + free.size)

    gradient = np.zeros(3)
    gradient[free] = params[1:] / half_extent[free]
    sign = float(phase_sign)
    spacing = np.diff(times)
    period = np.pi if np.allclose(spacing, spacing[0], rtol=1e-3) else 2 * np.pi
    offset = sign * float(params[0])
    offset = float(offset - period * np.round(offset / period))
    gain = 1.0 - residual_bipolar / max(residual_monopolar, 1e-30)
    applied = mode == "bipolar" or gain >= BIPOLAR_MIN_GAIN
    ramp = ", ".join(f"{g:+.4f}" for g in sign * gradient)
    message = (f"readout polarity: the even echoes' phase is {offset:+.3f} rad at the centre "
               f"with a ramp of ({ramp}) rad/mm along the voxel axes; the bipolar model "
               f"removes {100 * gain:.0f}% of the monopolar residual "
               f"({residual_monopolar:.4f} -> {residual_bipolar:.4f}): "
               + ("corrected" if applied else
                  f"not corrected (auto needs {100 * BIPOLAR_MIN_GAIN:.0f}%)"))
    return BipolarEstimate(
        offset=offset, gradient=tuple(float(g) for g in sign * gradient),
        centre=tuple(float(c) for c in centre), residual_monopolar=residual_monopolar,
        residual_bipolar=residual_bipolar, applied=applied, message=message)


def correct_bipolar_phase(
    phase: np.ndarray, estimate: BipolarEstimate, voxel_size: Sequence[float]
) -> np.ndarray:
    """``phase`` (rad) [x, y, z, echo] with the second-polarity echoes' phase removed,
    wrapped to (-pi, pi] (float32); unchanged where ``estimate.applied`` is False."""
    phase = np.asarray(phase, dtype=np.float32)
    if not estimate.applied:
        return phase
    phi = estimate.phase(phase.shape[:3], voxel_size)
    corrected = phase.copy()
    turned = corrected[..., 1::2]  # a view: only these echoes change and need wrapping
    turned -= phi[..., None]
    turned -= np.float32(2 * np.pi) * np.round(turned / np.float32(2 * np.pi))
    return corrected
