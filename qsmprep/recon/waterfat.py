"""Chemical-shift-encoded water-fat separation and field mapping (METHODS.md section 5).

Signal of echo ``n`` at echo time ``t_n`` (s)::

    s_n = (rho_W + rho_F c_n) exp((-R2* + i 2 pi psi) t_n),   c_n = sum_p a_p exp(i 2 pi f_p t_n)

with complex water/fat amplitudes ``rho_W``, ``rho_F``, one R2* (1/s), the field map ``psi``
(Hz) and the fat spectrum ``f_p = gamma_bar B0 (ppm_p - ppm_water) 1e-6`` Hz with relative
amplitudes ``a_p`` (sum 1). ``phase_sign=+1`` takes the data as this model writes them
(the ISMRM 2012 challenge toolbox's ``PrecessionIsClockwise = 1``); ``phase_sign=-1``, the
opposite handedness (``PrecessionIsClockwise = 0``, which that toolbox conjugates),
conjugates the data first, so the returned field is always the physical one in the
convention of :mod:`qsmprep.recon.fieldmap`. ``"auto"`` reads the sign off the fat signal.

Pipeline of :func:`separate`:

0. **Field trend.** A quadratic polynomial of position plus a trilinear field on nodes
   about 16 mm apart, fitted to the field differences between neighbours, read off the phase
   evolution of their echo products (a shared water/fat composition does not enter them;
   :func:`field_trend`). The echoes are demodulated by it and it is added back to the field
   at the end, so the steps below see a field without its large-scale variation (ISMRM
   2012 case 12 with a linear field of 1000 Hz across x: PDFF MAE 17.3 points without,
   2.59 with; with +-300 Hz, two sine periods across x: 30.1 with the quadratic alone,
   2.59 with the nodes; RESULTS.md).
1. **Grid search (VARPRO).** For fixed ``(psi, R2*)`` the amplitudes follow by linear least
   squares; the relative residual is ``1 - y^H P(R2*) y / ||s||^2`` with ``y_n = s_n
   exp(-i 2 pi psi t_n)`` and the projector ``P`` onto the two basis vectors. It is a real
   bilinear form in the echo products ``conj(s_m) s_n``: one float32 matrix product
   ``[voxels x E^2] @ [E^2 x (n_R2* n_psi)]`` evaluates every grid point for every voxel.
   The psi grid spans one period ``1/min(dTE)`` (the residual's period for uniform echoes).
   The graph cut runs it in blocks of voxels and keeps only each voxel's candidates (below)
   and the blocks' summed curves for its pyramid: 256x256x176 x 8 echoes then needs 3.4 GB,
   not 7.4 (RESULTS.md).
2. **Candidates.** The (up to ``n_candidates``) lowest local minima over psi (minimised over
   R2*, between the R2* grid points by parabolic interpolation) per voxel, refined to
   sub-grid precision in psi by parabolic interpolation. Water/fat
   ambiguity: pure water and pure fat voxels have two near-equal minima about the main fat
   frequency apart.
3. **Spatial regularisation** (``regularization=``, default ``"graphcut"``). A graph cut
   over the discretised field (Hernando et al., MRM 2010;63:79-90): each voxel takes one of
   its candidates plus whole periods, and binary "jump" moves (every voxel keeps its field
   or moves one/two candidates or one period up, resp. down), each solved exactly by
   max-flow (PyMaxflow), minimise the residuals weighted by signal energy plus a quadratic
   smoothness of the field between 6-neighbours, weighted per axis by the voxel size and by
   the field's measured roughness along it (thick slices or a wrong voxel size cannot force
   slices to agree: :func:`_axis_weights`). It runs coarse to fine
   on a pyramid of 2x2x2 block sums of the residual curves (like hmrGC): coarse levels use
   edge-stopping pair weights (links through partial-volume voxels next to air are cut, as
   the field may jump there by more than the water/fat alias), the finest level refines
   locally with plain signal weights (:func:`graphcut_field`); a last move tries each
   connected part of the mask whole at its water/fat aliases (an isolated pure-fat part
   otherwise keeps what the coarse levels chose). ``"multires"`` is
   the earlier iterated-conditional-modes pyramid (:func:`regularized_field`): each voxel
   takes the candidate minimising ``residual + smoothness (d(psi, psi_smooth) / f_fat)^2``
   against a Gaussian phasor average of its neighbourhood. ``"none"``: best minimum per
   voxel (swaps). Measured in ``benchmarks/RESULTS.md``: ISMRM 2012 challenge case 12
   (abdomen, 1.5 T, 4 echoes) PDFF MAE 2.58 points with the graph cut (multires 5.66,
   swapped spleen/liver patches), case 15 0.57 (0.57); leg phantom no swaps with either.
4. **Spatial unwrapping.** The graph cut chooses unwrapped fields; ``multires`` unwraps
   ``2 pi psi / period`` by region growing (exact multiples). The connected parts of the
   mask (the other leg, an arm: nothing links them) then take the multiples of the period
   that let one quadratic, fitted through all of them at once, run through them (the B0
   field is smooth through air; one part's own trend carried across the gap put a leg a
   period off), and the whole the multiple with mean nearest 0 Hz.
5. **Continuous refinement**: Levenberg-Marquardt on the variable-projection functional in
   ``(psi, R2*)`` (Kaufman's Jacobian ``-(I - P) dA/dtheta rho``), amplitudes by linear
   least squares; non-uniform echo spacing needs nothing special. The psi column of the
   Jacobian is ``-2 pi i`` times the R2* column, so ``Re(J^H J)`` is diagonal and each LM
   step is two divisions. Compiled (numba) and run in threads over blocks of voxels, like
   the grid search's maximum over R2*: 96x96x48 x 9 echoes in 6.4-7.3 s, not 18.7, on a
   2-core host (RESULTS.md).
6. **Noise and swaps.** Field standard deviation ``sqrt(sigma^2 [Re(J^H J)]^-1_psi)`` with
   ``sigma^2`` from the local residuals (``||r||^2 / (2E - 6)``; three echoes: from the
   map's spatial smoothness); :func:`detect_swaps` flags voxels whose field departs from its
   robust smooth surrounding by more than half the main fat frequency and field jumps
   between neighbours, and logs a warning.

The seed-000 baseline ``inphase`` (:func:`inphase_field`) ignores chemical shift: a
single-frequency nonlinear fit (:func:`qsmprep.recon.fieldmap.estimate`) on the echoes where
the main fat peak is in phase with water. The other fat peaks are not in phase there, so the
field is biased in proportion to the fat fraction (tens of Hz, i.e. 0.05-0.2 ppm at 3 T for
PDFF 50-100%, the size of the bone signal): use it only to reproduce that study.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal, Sequence

import numba
import numpy as np
import scipy.sparse
import scipy.sparse.linalg
from scipy import ndimage

from . import fieldmap
from . import mask as mask_module
from . import unwrap as unwrap_module
from ._jit import run_in_blocks
from .dipole import GAMMA_BAR_MHZ_PER_T, check_b0_tesla

LOGGER = logging.getLogger("qsmprep")

_TWO_PI = 2.0 * np.pi


# ---------------------------------------------------------------------------------------
# fat spectra
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FatModel:
    """A fat spectrum: peak shifts (ppm relative to water at ``water_ppm``) and amplitudes.

    ``water_ppm`` is the water chemical shift (ppm) the table was defined with; the absolute
    fat shifts are ``ppm + water_ppm``. :func:`fat_frequencies_hz` re-references them to the
    water shift of the scan (temperature: about 4.65 ppm at body, 4.7 at room temperature).
    Amplitudes are normalised to sum 1.
    """

    name: str
    ppm: tuple[float, ...]
    amplitude: tuple[float, ...]
    water_ppm: float = 4.7

    @property
    def main_ppm(self) -> float:
        """Shift (ppm, relative to water) of the strongest peak."""
        return float(self.ppm[int(np.argmax(self.amplitude))])


def _normalised(amplitudes: Sequence[float]) -> tuple[float, ...]:
    values = np.asarray(amplitudes, dtype=float)
    return tuple(float(v) for v in values / values.sum())


#: Built-in fat spectra (METHODS.md section 5 table).
FAT_MODELS: dict[str, FatModel] = {
    "ismrm": FatModel(
        "ismrm", (-3.80, -3.40, -2.60, -1.94, -0.39, 0.60),
        _normalised((0.087, 0.693, 0.128, 0.004, 0.039, 0.048)), 4.7,
    ),
    "ren_marrow": FatModel(
        "ren_marrow", (-3.80, -3.40, -3.10, -2.68, -2.46, -1.95, -0.50, 0.49, 0.59),
        _normalised((0.0899, 0.5834, 0.0599, 0.0849, 0.0599, 0.0150, 0.0400, 0.0100, 0.0569)),
        4.7,
    ),
    "scanner7": FatModel(
        "scanner7", (-3.30, -2.57, 0.71, -3.70, -3.01, -2.35, -1.83),
        _normalised((0.625, 0.095, 0.042, 0.085, 0.071, 0.066, 0.016)), 4.60,
    ),
    "single": FatModel("single", (-3.40,), (1.0,), 4.7),
}

FAT_MODEL_DESCRIPTIONS = {
    "ismrm": "ISMRM fat-water toolbox 6-peak liver spectrum (Hamilton et al. 2011)",
    "ren_marrow": "9-peak bone-marrow spectrum (Ren et al. 2008)",
    "scanner7": "7-peak scanner spectrum (water at 4.60 ppm)",
    "single": "single fat peak at -3.4 ppm",
}


def fat_model_from_table(
    ppm: Sequence[float],
    amplitude: Sequence[float],
    *,
    water_ppm: float = 4.7,
    absolute: bool = False,
    name: str = "table",
) -> FatModel:
    """A user fat spectrum from peak shifts (ppm) and relative amplitudes.

    ``absolute=False``: shifts relative to water (e.g. -3.4 for methylene); ``absolute=True``:
    chemical shifts on the ppm scale (e.g. 1.3), converted with ``water_ppm``.
    """
    shifts = np.asarray(ppm, dtype=float).ravel()
    amps = np.asarray(amplitude, dtype=float).ravel()
    if shifts.size == 0 or shifts.size != amps.size:
        raise ValueError(f"a fat table needs as many shifts as amplitudes (>= 1), got "
                         f"{shifts.size} shifts and {amps.size} amplitudes.")
    if not (np.isfinite(shifts).all() and np.isfinite(amps).all()):
        raise ValueError("fat table shifts and amplitudes must be finite numbers.")
    if np.any(amps < 0) or amps.sum() <= 0:
        raise ValueError("fat table amplitudes must be >= 0 with a positive sum.")
    if absolute:
        shifts = shifts - water_ppm
    if np.any(np.abs(shifts) > 10):
        raise ValueError(f"fat peak shifts {shifts.tolist()} ppm are not relative to water "
                         "(|shift| <= 10 ppm); pass absolute=True for ppm-scale values.")
    return FatModel(name, tuple(float(v) for v in shifts), _normalised(amps), float(water_ppm))


def parse_fat_table(text: str, *, water_ppm: float = 4.7) -> FatModel:
    """A fat spectrum from ``"ppm:amplitude,ppm:amplitude,..."`` or from the text of a table
    with two columns (ppm, amplitude; whitespace/comma/tab separated, ``#`` comments, an
    optional header line). Shifts above 0.9 ppm on average are taken as absolute ppm values."""
    rows = []
    chunks = text.replace(";", "\n").replace(",", "\n" if ":" in text else ",").splitlines()
    for line in chunks:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p for p in line.replace(":", " ").replace(",", " ").replace("\t", " ").split()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            if rows:
                raise ValueError(f"cannot read fat table line {line!r}: expected two numbers "
                                 "(ppm, amplitude).") from None
            continue  # header
        if len(values) != 2:
            raise ValueError(f"fat table line {line!r}: expected two numbers (ppm, amplitude).")
        rows.append(values)
    if not rows:
        raise ValueError("the fat table is empty: give lines of 'ppm amplitude'.")
    table = np.asarray(rows)
    absolute = float(np.mean(table[:, 0])) > 0.9
    return fat_model_from_table(table[:, 0], table[:, 1], water_ppm=water_ppm,
                                absolute=absolute, name="table")


def get_fat_model(model: str | FatModel) -> FatModel:
    """A :class:`FatModel` from a built-in name (:data:`FAT_MODELS`) or a model."""
    if isinstance(model, FatModel):
        return model
    key = str(model).strip().lower().replace("-", "_")
    aliases = {"ismrm6": "ismrm", "hamilton": "ismrm", "ren": "ren_marrow", "marrow": "ren_marrow",
               "scanner": "scanner7", "siemens7": "scanner7", "single_peak": "single"}
    key = aliases.get(key, key)
    if key not in FAT_MODELS:
        raise ValueError(f"unknown fat model {model!r}; choose one of {sorted(FAT_MODELS)} or "
                         "give a table of (ppm, amplitude) pairs.")
    return FAT_MODELS[key]


def fat_frequencies_hz(
    model: str | FatModel, b0_tesla: float, *, water_ppm: float | None = None
) -> np.ndarray:
    """Fat peak frequencies (Hz) relative to water at ``b0_tesla`` (T).

    ``water_ppm``: the water shift of the scan (None: the model's own reference).
    """
    model = get_fat_model(model)
    check_b0_tesla(b0_tesla)
    shift = np.asarray(model.ppm, dtype=float)
    if water_ppm is not None:
        if not 3.0 < float(water_ppm) < 6.0:
            raise ValueError(f"water_ppm {water_ppm} is not a water shift (about 4.6-4.7 ppm).")
        shift = shift + model.water_ppm - float(water_ppm)
    return GAMMA_BAR_MHZ_PER_T * float(b0_tesla) * shift


def fat_signal(
    echo_times: Sequence[float],
    b0_tesla: float,
    model: str | FatModel = "ismrm",
    *,
    water_ppm: float | None = None,
) -> np.ndarray:
    """Normalised fat signal ``c_n = sum_p a_p exp(i 2 pi f_p t_n)`` (complex128, per echo)."""
    model = get_fat_model(model)
    times = np.asarray(echo_times, dtype=float).ravel()
    freqs = fat_frequencies_hz(model, b0_tesla, water_ppm=water_ppm)
    amps = np.asarray(model.amplitude, dtype=float)
    return np.exp(1j * _TWO_PI * times[:, None] * freqs[None, :]) @ amps


# ---------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class SwapReport:
    """Verdict of :func:`detect_swaps`.

    ``verdict``: ``"none"`` (no evidence of water/fat swaps), ``"suspect"`` or ``"swapped"``;
    ``fraction``: fraction of mask voxels whose field departs from its robust surrounding by
    more than half the main fat frequency; ``jump_fraction``: fraction of neighbouring voxel
    pairs in the mask with a field step above that; ``message``: one line for logs/reports.
    """

    verdict: str
    fraction: float
    jump_fraction: float
    message: str


@dataclasses.dataclass
class PhaseSignCheck:
    """Verdict of :func:`check_phase_sign`.

    ``given`` the sign tested; ``preferred`` the sign the fat signal supports (None:
    inconclusive, e.g. no fat); ``excess`` how much larger the energy-weighted residual of
    the other sign is than that of the given one, relative (negative: the other sign fits
    better); ``vote`` the fraction of the voxels that tell the signs apart which fit better
    with the given sign; ``message`` one line for logs/reports; ``identifiable`` False for 3
    echoes, which either sign fits exactly (water and fat swapped everywhere).
    """

    given: int
    preferred: int | None
    excess: float
    vote: float
    message: str
    identifiable: bool = True


@dataclasses.dataclass
class WaterFatResult:
    """Result of :func:`separate` (all maps float32/complex64 with the signal's spatial shape,
    0 outside the mask).

    ``field_hz`` total field (Hz, unwrapped); ``r2star`` (1/s); ``water``, ``fat`` complex
    amplitudes at TE = 0 (units of the signal); ``pdff`` proton-density fat fraction (%,
    by magnitude discrimination, :func:`fat_fraction`);
    ``noise_hz`` field standard deviation (Hz); ``residual`` relative residual
    ``||s - model||^2 / ||s||^2``; ``mask`` the voxels fitted (boolean); ``swaps`` the
    :class:`SwapReport`; ``parameters`` the settings (for sidecars).
    """

    field_hz: np.ndarray
    r2star: np.ndarray
    water: np.ndarray
    fat: np.ndarray
    pdff: np.ndarray
    noise_hz: np.ndarray
    residual: np.ndarray
    mask: np.ndarray
    swaps: SwapReport
    fat_model: FatModel
    echo_times: np.ndarray
    b0_tesla: float
    parameters: dict

    @property
    def opposed_phase(self) -> np.ndarray:
        """Opposed-phase-like image ``| |W| - |F| |`` (edge image of the calcaneus study)."""
        return np.abs(np.abs(self.water) - np.abs(self.fat)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------


def as_complex(magnitude: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Complex64 signal ``magnitude exp(i phase)`` (phase in rad)."""
    magnitude = np.asarray(magnitude, dtype=np.float32)
    phase = np.asarray(phase, dtype=np.float32)
    if magnitude.shape != phase.shape:
        raise ValueError(f"magnitude {magnitude.shape} and phase {phase.shape} shapes differ.")
    return (magnitude * np.exp(1j * phase)).astype(np.complex64)


def _echo_volume(signal, echo_times, mask, voxel_size, b0_tesla):
    """The signal as ``[x, y, z, echo]``, its mask, voxel size and the caller's spatial shape.

    Accepts ``[x, y, z, echo]``, one slice ``[x, y, echo]`` and the ISMRM 2012 toolbox's
    ``[x, y, z, coil, echo]`` with one coil; ``mask`` None: :func:`mask.body_mask` of the
    echo magnitudes; a slice may come with an in-plane voxel size (2 values).
    """
    data = np.asarray(signal)
    spatial = data.shape[:2] if data.ndim == 3 else data.shape[:3]
    if data.ndim == 5:
        if data.shape[3] != 1:
            raise ValueError(
                f"signal [x, y, z, coil, echo] {data.shape} has {data.shape[3]} coils; combine "
                "the coils first (water-fat separation needs one complex signal per voxel).")
        data = data[:, :, :, 0, :]
    elif data.ndim == 3:
        data = data[:, :, None, :]
    sizes = [float(v) for v in np.ravel(voxel_size)]
    if len(sizes) == 2 and data.ndim == 4 and data.shape[2] == 1:
        sizes.append(max(sizes))  # one slice: no neighbours through the plane, and
        # the smallest size (the smoothness weights' reference) stays an in-plane one
    if mask is None:
        data, _, _ = _check_inputs(data, echo_times, np.ones(data.shape[:3], bool), b0_tesla, 1)
        mask = mask_module.body_mask(np.nan_to_num(np.abs(data)),
                                     voxel_size=fieldmap._check_voxel_size(sizes))
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim == 2 and data.ndim == 4 and data.shape[2] == 1:
            mask = mask[:, :, None]
    return data, mask, sizes, spatial


def _check_inputs(signal, echo_times, mask, b0_tesla, phase_sign):
    data = np.asarray(signal)
    if data.ndim != 4:
        raise ValueError(f"signal must be complex [x, y, z, echo] (or one slice [x, y, echo]), "
                         f"got shape {np.shape(signal)}.")
    if not np.iscomplexobj(data):
        raise ValueError("signal must be complex (use as_complex(magnitude, phase)).")
    times = np.asarray(echo_times, dtype=np.float64).ravel()
    n_echoes = data.shape[3]
    if times.size != n_echoes:
        raise ValueError(f"{times.size} echo times for {n_echoes} echoes.")
    if n_echoes < 3:
        raise ValueError(f"water-fat separation with R2* needs >= 3 echoes, got {n_echoes}; "
                         "use the inphase or nlfit field map for fewer echoes.")
    if not np.all(np.isfinite(times)) or np.any(times <= 0) or np.any(times >= 1):
        raise ValueError(f"echo times must be in seconds in (0, 1), got {times.tolist()}.")
    if np.any(np.diff(times) <= 0):
        raise ValueError(f"echo times must be strictly increasing, got {times.tolist()}.")
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != data.shape[:3]:
        raise ValueError(f"mask shape {mask.shape} differs from the data {data.shape[:3]}.")
    check_b0_tesla(b0_tesla)
    if phase_sign not in (1, -1):
        raise ValueError(f"phase_sign must be +1 or -1, got {phase_sign!r}.")
    data = np.ascontiguousarray(data, dtype=np.complex64)  # views of a slice: one layout
    finite = np.isfinite(data.real).all(axis=3) & np.isfinite(data.imag).all(axis=3)
    mask = mask & finite
    if phase_sign == -1:
        data = np.conj(data)
    return data, times, mask


# ---------------------------------------------------------------------------------------
# grid search
# ---------------------------------------------------------------------------------------


def default_r2star_grid(r2star_max: float = 500.0) -> np.ndarray:
    """R2* values (1/s) of the grid search: denser at low R2*."""
    if not r2star_max > 0:
        raise ValueError(f"r2star_max must be positive (1/s), got {r2star_max}.")
    base = np.array([0.0, 15, 30, 50, 75, 100, 140, 200, 280, 400, 550, 750, 1000, 1400])
    grid = base[base < r2star_max]
    return np.append(grid, r2star_max).astype(np.float64)


def psi_grid(
    echo_times: Sequence[float], *, step_hz: float | None = None
) -> tuple[np.ndarray, float]:
    """Field values (Hz) of the grid search over one period and the period (Hz).

    Period ``1/min(dTE)``; default step ``min(period / 48, 1 / (6 (t_N - t_1)))`` (the
    residual's minima are about ``1 / (t_N - t_1)`` wide).
    """
    times = np.asarray(echo_times, dtype=float)
    period = 1.0 / float(np.min(np.diff(times)))
    span = float(times[-1] - times[0])
    if step_hz is None:
        step_hz = min(period / 48.0, 1.0 / (6.0 * span))
    if not step_hz > 0:
        raise ValueError(f"psi step must be positive (Hz), got {step_hz}.")
    count = int(min(max(np.ceil(period / step_hz), 16), 512))
    return (np.arange(count) * (period / count) - period / 2.0), period


def _features(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel real features of the echo products and the signal energy.

    ``s`` (N, E) complex64 -> X (N, E^2) float32: ``|s_m|^2`` (E), then ``Re``/``Im`` of
    ``conj(s_m) s_n`` for m < n, all divided by ``||s||^2``.
    """
    energy = np.einsum("ne,ne->n", s.real, s.real) + np.einsum("ne,ne->n", s.imag, s.imag)
    scale = np.where(energy > 0, 1.0 / np.maximum(energy, 1e-30), 0.0).astype(np.float32)
    m_idx, n_idx = np.triu_indices(s.shape[1], k=1)
    products = np.conj(s[:, m_idx]) * s[:, n_idx]
    diag = (s.real * s.real + s.imag * s.imag)
    features = np.concatenate([diag, products.real, products.imag], axis=1)
    features *= scale[:, None]
    return features.astype(np.float32, copy=False), energy.astype(np.float32)


def _kernel(times: np.ndarray, c: np.ndarray, psis: np.ndarray, r2s: np.ndarray) -> np.ndarray:
    """K (E^2, R*Q) with ``X @ K = y^H P y / ||s||^2`` for every (R2*, psi) pair."""
    n_e = times.size
    m_idx, n_idx = np.triu_indices(n_e, k=1)
    dt = times[n_idx] - times[m_idx]
    blocks = []
    for r2 in r2s:
        decay = np.exp(-r2 * times)
        basis = np.stack([decay, c * decay], axis=1)  # (E, 2)
        projector = basis @ np.linalg.pinv(basis)  # (E, E) Hermitian
        phasor = np.exp(-1j * _TWO_PI * np.outer(dt, psis))  # (pairs, Q)
        pair = projector[m_idx, n_idx][:, None] * phasor
        diag = np.repeat(projector.diagonal().real[:, None], psis.size, axis=1)
        blocks.append(np.concatenate([diag, 2 * pair.real, -2 * pair.imag], axis=0))
    return np.concatenate(blocks, axis=1).astype(np.float32)


def _grid_chunks(s, times, c, psis, r2s, chunk):
    """Blocks of :func:`grid_residuals`: ``(start, stop, cost, index, energy)`` for every
    ``chunk`` voxels of ``s``."""
    kernel = _kernel(times, c, psis, r2s)
    n_q, n_r = psis.size, r2s.size
    r2_grid = np.asarray(r2s, np.float64)
    for start in range(0, s.shape[0], chunk):
        stop = min(start + chunk, s.shape[0])
        features, energy = _features(s[start:stop])
        projected = (features @ kernel).reshape(stop - start, n_r, n_q)
        best = np.empty((stop - start, n_q), np.float32)
        index = np.empty((stop - start, n_q), np.int16)
        run_in_blocks(_best_over_r2star, (projected, best, index), r2_grid)
        cost = np.clip(1.0 - best, 0.0, 1.0, out=best)
        cost[energy <= 0] = 1.0
        yield start, stop, cost, index, energy


def grid_residuals(
    s: np.ndarray,
    times: np.ndarray,
    c: np.ndarray,
    psis: np.ndarray,
    r2s: np.ndarray,
    *,
    chunk: int = 16384,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relative VARPRO residual on the (R2*, psi) grid, minimised over R2*.

    ``s`` (N, E) complex voxels; returns ``cost`` (N, Q) float32 in [0, 1], the R2* index of
    the minimum (N, Q) int16 and the signal energy (N,).
    """
    cost = np.empty((s.shape[0], psis.size), dtype=np.float32)
    index = np.empty((s.shape[0], psis.size), dtype=np.int16)
    energy = np.empty(s.shape[0], dtype=np.float32)
    for start, stop, *block in _grid_chunks(s, times, c, psis, r2s, chunk):
        cost[start:stop], index[start:stop], energy[start:stop] = block
    return cost, index, energy


def _grid_best(voxels, times, c, psis, r2s, chunk: int = 16384):
    """Each voxel's best point of the (field, R2*) grid: field (Hz), R2* (1/s), relative
    residual, and the signal energy."""
    cost, index, energy = grid_residuals(voxels, times, c, psis, r2s, chunk=chunk)
    best = np.argmin(cost, axis=1)
    rows = np.arange(best.size)
    return psis[best], r2s[index[rows, best]], cost[rows, best], energy


@numba.njit(cache=True, nogil=True)
def _best_over_r2star(projected, value, index, r2s):  # pragma: no cover - compiled
    """Maximum over R2* of ``projected`` (N, R, Q) into ``value`` (N, Q), its grid index into
    ``index``: between grid points, the vertex of the parabola through the best R2* point and
    its two neighbours (non-uniform grid), at least the grid maximum; at the grid's ends the
    grid maximum."""
    n_vox, n_r, n_q = projected.shape
    for v in range(n_vox):
        for q in range(n_q):
            value[v, q] = projected[v, 0, q]
            index[v, q] = 0
        for r in range(1, n_r):
            for q in range(n_q):
                if projected[v, r, q] > value[v, q]:
                    value[v, q] = projected[v, r, q]
                    index[v, q] = r
        for q in range(n_q):
            best = index[v, q]
            if best == 0 or best == n_r - 1:
                continue
            y0, y1, y2 = projected[v, best - 1, q], value[v, q], projected[v, best + 1, q]
            x0, x1, x2 = r2s[best - 1], r2s[best], r2s[best + 1]
            slope01 = (y1 - y0) / (x1 - x0)
            curvature = ((y2 - y1) / (x2 - x1) - slope01) / (x2 - x0)
            if curvature < 0:
                vertex = min(max(0.5 * (x0 + x1) - slope01 / (2.0 * curvature), x0), x2)
                top = y0 + (vertex - x0) * (slope01 + curvature * (vertex - x1))
                if top > value[v, q]:
                    value[v, q] = top


def _vertex_offset(left, centre, right, valid) -> np.ndarray:
    """Offset (grid steps, within +-0.5) of the vertex of the parabola through three equally
    spaced samples ``left, centre, right``; 0 where not ``valid`` (``centre`` no extremum)."""
    curvature = left - 2 * centre + right
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(valid, 0.5 * (left - right) / np.where(valid, curvature, 1.0), 0.0)
    return np.clip(np.nan_to_num(offset), -0.5, 0.5)


#: voxels per block of the candidate search (its temporaries take ~25 bytes per grid point)
CANDIDATE_CHUNK = 32768


def _candidates(
    cost: np.ndarray, index: np.ndarray, psis: np.ndarray, r2s: np.ndarray, n_candidates: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lowest periodic local minima over psi: (N, K) psi (Hz), residual, R2* (1/s).

    Missing minima have residual ``inf``; the global minimum is always the first candidate.
    Computed in blocks of ``CANDIDATE_CHUNK`` voxels.
    """
    if cost.shape[0] > CANDIDATE_CHUNK:
        blocks = [_candidates(cost[a:a + CANDIDATE_CHUNK], index[a:a + CANDIDATE_CHUNK],
                              psis, r2s, n_candidates)
                  for a in range(0, cost.shape[0], CANDIDATE_CHUNK)]
        return tuple(np.concatenate(parts) for parts in zip(*blocks))
    step = float(psis[1] - psis[0])
    left = np.roll(cost, 1, axis=1)
    right = np.roll(cost, -1, axis=1)
    is_min = (cost <= left) & (cost < right)
    masked = np.where(is_min, cost, np.inf)
    k = min(n_candidates, cost.shape[1])
    order = np.argsort(masked, axis=1)[:, :k]
    glob = np.argmin(cost, axis=1)
    order[:, 0] = glob
    values = np.take_along_axis(masked, order, axis=1)
    values[:, 0] = cost[np.arange(cost.shape[0]), glob]
    # drop duplicates of the global minimum in later columns
    for j in range(1, k):
        values[:, j] = np.where(order[:, j] == glob, np.inf, values[:, j])
    c0 = np.take_along_axis(cost, order, axis=1)
    cl = np.take_along_axis(left, order, axis=1)
    cr = np.take_along_axis(right, order, axis=1)
    offset = _vertex_offset(cl, c0, cr, cl - 2 * c0 + cr > 0)
    refined = np.where(np.isfinite(values), c0 - 0.25 * (cl - cr) * offset, np.inf)
    psi = psis[order] + offset * step
    r2 = r2s[np.take_along_axis(index, order, axis=1)]
    return psi.astype(np.float32), refined.astype(np.float32), r2.astype(np.float32)


# ---------------------------------------------------------------------------------------
# multi-resolution regularisation
# ---------------------------------------------------------------------------------------


def _wrap_hz(x: np.ndarray, period: float) -> np.ndarray:
    return x - period * np.round(x / period)


def _smooth_psi(psi, weight, mask, period, sigma):
    """Weighted Gaussian average of the periodic field (phasor average within ``mask``)."""
    angle = (_TWO_PI / period) * psi
    w = np.where(mask, weight, 0).astype(np.float32)
    re = ndimage.gaussian_filter(w * np.cos(angle), sigma, mode="constant", truncate=2.5)
    im = ndimage.gaussian_filter(w * np.sin(angle), sigma, mode="constant", truncate=2.5)
    return (np.arctan2(im, re) * (period / _TWO_PI)).astype(np.float32), np.hypot(re, im)


def _upsample(values: np.ndarray, shape: Sequence[int], axes: Sequence[bool]) -> np.ndarray:
    out = values
    for axis, doubled in enumerate(axes):
        if doubled:
            out = np.repeat(out, 2, axis=axis)
    return out[tuple(slice(0, n) for n in shape)]


def _confidence(cost: np.ndarray, psis, r2s, n_candidates: int) -> np.ndarray:
    """Gap between the best and the second-best local minimum of each residual curve."""
    index0 = np.zeros((1, cost.shape[1]), dtype=np.int16)
    _, cost_c, _ = _candidates(cost, np.broadcast_to(index0, cost.shape), psis, r2s,
                               max(n_candidates, 2))
    second = np.where(np.isfinite(cost_c[:, 1:]), cost_c[:, 1:], 1.0).min(axis=1)
    return np.clip(second - cost_c[:, 0], 0, None)


def _icm(curve, psis, weight_v, mask, period, fat_hz, smoothness, prior, iterations, sigma):
    """Iterated conditional modes over the full residual curves of one level.

    Every voxel takes the grid field minimising ``curve + smoothness (d / f_fat)^2`` with
    ``d`` the periodic distance to the weighted neighbourhood average (first: the coarser
    level's field, or the voxel's own best). Returns the chosen grid index per voxel.
    """
    weight = np.zeros(mask.shape, dtype=np.float32)
    weight[mask] = weight_v
    if prior is None:
        choice = np.argmin(curve, axis=1)
    else:
        choice = _choose(curve, psis, prior[mask], period, fat_hz, smoothness)
    field = np.zeros(mask.shape, dtype=np.float32)
    for _ in range(iterations):
        field[mask] = psis[choice]
        smooth, _ = _smooth_psi(field, weight, mask, period, sigma)
        target = smooth[mask]
        new_choice = _choose(curve, psis, target, period, fat_hz, smoothness)
        changed = int(np.count_nonzero(new_choice != choice))
        choice = new_choice
        if changed <= 1e-4 * choice.size:
            break
    return choice


def _choose(curve, psis, target, period, fat_hz, smoothness):
    distance = _wrap_hz(psis[None, :] - target[:, None], period) * np.float32(1 / abs(fat_hz))
    total = curve + np.float32(smoothness) * distance * distance
    return np.argmin(total, axis=1)


def _pyramid_levels(mask: np.ndarray, max_levels: int):
    """Masks of a pyramid of 2x2x2 blocks: ``(mask, halved axes)`` per level (level 0 the
    voxels; an axis is halved while longer than 6, at most ``max_levels`` levels, none below
    64 voxels) and, per level but the last, each voxel's block in the next level (an index
    into that level's voxels)."""
    levels = [(mask, None)]
    owners = []
    m = mask
    while len(levels) < max_levels:
        axes = [n > 6 for n in m.shape]
        if not any(axes) or np.count_nonzero(m) < 64:
            break
        block = tuple(c // 2 if halved else c for c, halved in zip(np.nonzero(m), axes))
        coarse = np.zeros([(n + 1) // 2 if halved else n for n, halved in zip(m.shape, axes)],
                          dtype=bool)
        coarse[block] = True
        index = np.full(coarse.shape, -1, dtype=np.int64)
        index[coarse] = np.arange(int(np.count_nonzero(coarse)))
        owners.append(index[block])
        levels.append((coarse, axes))
        m = coarse
    return levels, owners


def _add_block_sums(out: np.ndarray, values: np.ndarray, owner: np.ndarray) -> None:
    """Add each row of ``values`` (N, ...) to row ``owner`` (N,) of ``out`` (sparse sum)."""
    if owner.size == 0:
        return
    low, high = int(owner.min()), int(owner.max()) + 1
    summing = scipy.sparse.csr_matrix(
        (np.ones(owner.size, dtype=values.dtype), (owner - low, np.arange(owner.size))),
        shape=(high - low, owner.size))
    out[low:high] += summing @ values


def _level1_sums(levels, n_psi: int) -> np.ndarray:
    """Zeroed level-1 block sums of the absolute residual curves (none for one level)."""
    n_blocks = int(np.count_nonzero(levels[1][0])) if len(levels) > 1 else 0
    return np.zeros((n_blocks, n_psi), dtype=np.float32)


def _coarse_curves(sums: np.ndarray, energy: np.ndarray, levels, owners):
    """Relative residual curves and signal energies of every pyramid level from ``sums``,
    level 1's block sums of the absolute residual curves (relative residual x energy), and
    the voxels' ``energy``: a block's curve is its voxels' summed absolute curve over their
    summed energy (the level-0 curve entry is None: the caller has the voxels' curves)."""
    curves, energies = [None], [energy]
    for level in range(1, len(levels)):
        n_blocks = int(np.count_nonzero(levels[level][0]))
        block_energy = np.zeros(n_blocks, dtype=np.float32)
        _add_block_sums(block_energy, energies[-1], owners[level - 1])
        if level > 1:
            coarser = np.zeros((n_blocks, sums.shape[1]), dtype=np.float32)
            _add_block_sums(coarser, sums, owners[level - 1])
            sums = coarser
        curves.append(sums / np.maximum(block_energy, 1e-30)[:, None])
        energies.append(block_energy)
    return curves, energies


def regularized_field(
    signal: np.ndarray,
    mask: np.ndarray,
    times: np.ndarray,
    c: np.ndarray,
    *,
    fat_hz: float,
    psis: np.ndarray,
    period: float,
    r2s: np.ndarray,
    smoothness: float = 0.1,
    n_candidates: int = 4,
    max_levels: int = 6,
    iterations: int = 10,
    chunk: int = 16384,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Field (Hz, wrapped to one period), grid R2* (1/s) and relative residual per voxel.

    Multi-resolution ICM over the residual curves (see the module docstring). The pyramid
    sums the absolute residual curves (relative residual x signal energy) of the voxels of
    2x2x2 blocks, so a block's curve is that of a joint fit with one field; this is
    insensitive to field variation inside the block (it only broadens the minima). A
    block's data term sums ``8^l`` voxels and its interfaces ``4^l`` voxel faces, so the
    smoothness weight halves per level ``l``.
    """
    voxels = signal[mask]
    cost, index, energy = grid_residuals(voxels, times, c, psis, r2s, chunk=chunk)
    levels, owners = _pyramid_levels(mask, max_levels)
    sums = _level1_sums(levels, psis.size)
    if owners:
        _add_block_sums(sums, cost * energy[:, None], owners[0])
    curves, energies = _coarse_curves(sums, energy, levels, owners)
    curves[0] = cost
    del sums
    prior = None
    psis32 = psis.astype(np.float32)
    for level in range(len(levels) - 1, -1, -1):
        m, axes = levels[level]
        curve = curves[level]
        weight = np.sqrt(np.maximum(energies[level], 0)) * (
            _confidence(curve, psis, r2s, n_candidates) + 0.02)
        choice = _icm(curve, psis32, weight, m, period, fat_hz, smoothness / 2.0**level,
                      prior, iterations, 1.0)
        field = np.zeros(m.shape, dtype=np.float32)
        field[m] = psis32[choice]
        if level > 0:
            # prior of the next finer level: the coarse field, empty blocks filled from the
            # nearest block with signal, nearest-neighbour upsampled
            filled = field
            if (~m).any() and m.any():
                nearest = ndimage.distance_transform_edt(
                    ~m, return_distances=False, return_indices=True)
                filled = field[tuple(nearest)]
            prior = _upsample(filled, levels[level - 1][0].shape, axes)
            curves[level] = None
            LOGGER.debug("waterfat: level %d, %d voxels", level, curve.shape[0])
    # sub-grid position where the chosen grid point is a local minimum of the residual
    rows = np.arange(cost.shape[0])
    n_q = psis.size
    c0 = cost[rows, choice]
    cl = cost[rows, (choice - 1) % n_q]
    cr = cost[rows, (choice + 1) % n_q]
    offset = _vertex_offset(cl, c0, cr, (c0 <= cl) & (c0 <= cr) & (cl - 2 * c0 + cr > 0))
    step = float(psis[1] - psis[0])
    field = np.zeros(mask.shape, dtype=np.float32)
    field[mask] = _wrap_hz(psis32[choice] + offset * step, period)
    r2 = np.zeros(mask.shape, dtype=np.float32)
    r2[mask] = r2s[index[rows, choice]]
    res = np.zeros(mask.shape, dtype=np.float32)
    res[mask] = c0
    return field, r2, res


# ---------------------------------------------------------------------------------------
# graph-cut regularisation (jump moves, Hernando et al. 2010; hierarchical like hmrGC)
# ---------------------------------------------------------------------------------------


def _axis_slices(axis: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Index tuples of the first and second voxel of the neighbour pairs along ``axis``."""
    first = [slice(None)] * 3
    second = [slice(None)] * 3
    first[axis], second[axis] = slice(0, -1), slice(1, None)
    return tuple(first), tuple(second)


def _neighbour_pairs(
    mask: np.ndarray, axis_weight: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """6-neighbour pairs of ``mask`` voxels: indices ``p``, ``q`` (into ``mask`` order) and
    the weight ``axis_weight[axis]`` of the pair's axis."""
    index = np.full(mask.shape, -1, dtype=np.int64)
    index[mask] = np.arange(int(np.count_nonzero(mask)))
    slices = {axis: _axis_slices(axis) for axis in range(3) if mask.shape[axis] > 1}
    both = {axis: mask[a] & mask[b] for axis, (a, b) in slices.items()}
    total = sum(int(np.count_nonzero(pairs)) for pairs in both.values())
    p = np.empty(total, dtype=np.int64)  # filled in place: no per-axis lists to concatenate
    q = np.empty(total, dtype=np.int64)
    weight = np.empty(total, dtype=np.float64)
    start = 0
    for axis, (a, b) in slices.items():
        block = slice(start, start + int(np.count_nonzero(both[axis])))
        p[block] = index[a][both[axis]]
        q[block] = index[b][both[axis]]
        weight[block] = float(axis_weight[axis])
        start = block.stop
    return p, q, weight


#: neighbour pairs per axis sampled for :func:`field_trend`
TREND_PAIRS_PER_AXIS = 20000
#: :func:`field_trend` is used where it explains at least this fraction of the weighted
#: absolute neighbour field differences (measured with the node field: 0.51-0.86 on the ISMRM
#: 2012 cases with and without added fields of 150-2000 Hz, 0.09-0.13 on the RC2 head,
#: whose field varies at air boundaries rather than smoothly; RESULTS.md)
TREND_MIN_EXPLAINED = 0.3
#: node spacing (mm) and most nodes per axis of the flexible part of :func:`field_trend`
TREND_NODE_MM = 16.0
TREND_MAX_NODES = 16
#: the node field is used where it explains this much more than the quadratic alone (it
#: otherwise follows local biases, e.g. of pairs along a steep PDFF gradient, by 5-15 Hz)
TREND_NODE_MIN_GAIN = 0.1
#: curvature penalty of the node field, relative to the mean data weight per node (fills
#: nodes without strong pairs; barely damps fields that vary over 50 mm or more)
TREND_CURVATURE = 1e-3


def _pair_field_differences(
    first: np.ndarray, second: np.ndarray, times: np.ndarray, period: float, *, max_lag: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Field difference (Hz, within +-period/2) and coherence (0-1) of neighbour pairs.

    ``first``, ``second`` (N, E) complex: the two voxels' echoes. Their product
    ``w_n = second_n conj(first_n)`` evolves as ``exp(i 2 pi d t_n)`` whatever the shared
    water/fat composition and R2*, ``d`` the field difference; ``d`` maximises the
    periodogram ``Re sum_(m<n<=m+max_lag) w_n conj(w_m) exp(-i 2 pi d (t_n - t_m))`` on a grid
    of ``period / 128`` refined by a parabola. Coherence: that maximum over
    ``sum |w_n conj(w_m)|`` (1 for a pure tone; a water/fat boundary lowers it).
    """
    w = second * np.conj(first)
    m_idx, n_idx = np.triu_indices(times.size, k=1)
    near = n_idx - m_idx <= max_lag
    m_idx, n_idx = m_idx[near], n_idx[near]
    z = w[:, n_idx] * np.conj(w[:, m_idx])
    grid = (np.arange(128) / 128.0 - 0.5) * period
    phase = _TWO_PI * np.outer(times[n_idx] - times[m_idx], grid)
    kernel = np.concatenate([np.cos(phase), np.sin(phase)]).astype(np.float32)
    power = np.concatenate([z.real, z.imag], axis=1).astype(np.float32) @ kernel
    peak = np.argmax(power, axis=1)
    rows = np.arange(peak.size)
    left, centre, right = (power[rows, (peak + k) % grid.size] for k in (-1, 0, 1))
    offset = _vertex_offset(left, centre, right, left - 2 * centre + right < 0)
    difference = grid[peak] + offset * (period / grid.size)
    coherence = centre / np.maximum(np.abs(z).sum(axis=1), 1e-30)
    return difference, np.clip(coherence, 0.0, 1.0)


def _tent_weights(index: np.ndarray, step: float, nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation from nodes every ``step`` voxels along an axis: the two node
    indices and weights (2, N) of each voxel ``index``."""
    if nodes == 1:
        return np.zeros((2, index.size), np.int64), np.stack([np.ones(index.size),
                                                              np.zeros(index.size)])
    u = index / step
    low = np.minimum(np.floor(u).astype(np.int64), nodes - 2)
    frac = u - low
    return np.stack([low, low + 1]), np.stack([1.0 - frac, frac])


def _node_rows(voxels: tuple[np.ndarray, ...], steps, node_shape) -> scipy.sparse.csr_matrix:
    """Trilinear interpolation matrix (N, nodes) from the node grid to the voxels (a tuple
    of 3 index arrays)."""
    count = voxels[0].size
    columns = np.zeros((1, count), np.int64)
    values = np.ones((1, count))
    for index, step, nodes in zip(voxels, steps, node_shape):
        c, v = _tent_weights(index, step, nodes)
        columns = (columns[:, None, :] * nodes + c[None]).reshape(-1, count)
        values = (values[:, None, :] * v[None]).reshape(-1, count)
    rows = np.tile(np.arange(count), columns.shape[0])
    return scipy.sparse.csr_matrix((values.ravel(), (rows, columns.ravel())),
                                   shape=(count, int(np.prod(node_shape))))


def _node_curvature(node_shape: Sequence[int]) -> scipy.sparse.csr_matrix:
    """Sum over axes of the squared second differences of a node field, ``sum L^T L``."""
    identities = [scipy.sparse.identity(n, format="csr") for n in node_shape]
    penalty = scipy.sparse.csr_matrix((int(np.prod(node_shape)),) * 2)
    for axis, n in enumerate(node_shape):
        if n < 3:
            continue
        factors = list(identities)
        factors[axis] = scipy.sparse.diags([1.0, -2.0, 1.0], [0, 1, 2], shape=(n - 2, n))
        second = factors[0]
        for factor in factors[1:]:
            second = scipy.sparse.kron(second, factor, format="csr")
        penalty = penalty + second.T @ second
    return penalty.tocsr()


def _irls_l1(fit, predict, target, base, floor, iterations):
    """Least absolute deviations by iteratively reweighted least squares: ``fit(w)`` solves
    the problem weighted by ``w`` (base weight over the absolute residual, at least
    ``floor``); returns the parameters and the residual ``target - predict(parameters)``."""
    residual = target
    parameters = None
    for _ in range(max(int(iterations), 1)):
        parameters = fit(base / np.maximum(np.abs(residual), floor))
        residual = target - predict(parameters)
    return parameters, residual


def field_trend(
    signal: np.ndarray, mask: np.ndarray, times: np.ndarray, voxel_size: Sequence[float],
    period: float, energy: np.ndarray, *, iterations: int = 10,
) -> np.ndarray:
    """Smooth trend of the field (Hz, float32, zero signal-weighted mean in ``mask``): a
    quadratic polynomial of position plus a trilinear field on nodes every
    :data:`TREND_NODE_MM` mm, fitted to neighbour field differences.

    Differences between 6-neighbours follow from the phase evolution of their echo products
    (:func:`_pair_field_differences`), which a shared water/fat composition does not enter,
    so they need no water/fat decision. Up to :data:`TREND_PAIRS_PER_AXIS` strong pairs per
    axis (``energy``: the signal energy map, :func:`energy_map`), weighted by signal and
    coherence, fit by iteratively reweighted least absolute deviations (pairs across
    water/fat boundaries are outliers) first the quadratic's gradient, then, on what it
    leaves, the node field's differences with a weak curvature penalty
    (:data:`TREND_CURVATURE`): fields a quadratic cannot follow (the ISMRM 2012 cases plus
    a sinusoid of +-300 Hz or a 600 Hz bump) are followed within tens of Hz.
    Zero where the fit explains less than :data:`TREND_MIN_EXPLAINED` of the weighted
    absolute differences (no large-scale structure, e.g. a head whose field varies at air
    boundaries). Demodulating the echoes by it leaves a field whose 2x2x2 blocks the graph
    cut's coarse levels can sum without smearing their residual curves: a B0 gradient of
    15 Hz/mm at 1.5 T (about 30 Hz per 2 mm voxel) otherwise swaps whole regions.
    """
    zero = np.zeros(mask.shape, dtype=np.float32)
    strong = mask.copy()
    strong[mask] = _strong(energy[mask])
    if np.count_nonzero(strong) < 10:
        return zero
    coords = fieldmap.grid_coordinates(mask.shape, voxel_size)
    # nodes evenly from the first to the last voxel of each axis, about TREND_NODE_MM apart
    node_shape = tuple(1 if n == 1 else min(TREND_MAX_NODES, int(np.ceil(
        (n - 1) * float(v) / TREND_NODE_MM)) + 1) for n, v in zip(mask.shape, voxel_size))
    steps = [(n - 1) / max(count - 1, 1) for n, count in zip(mask.shape, node_shape)]

    def terms(flat_index: np.ndarray) -> np.ndarray:
        """The quadratic's terms at voxels (N, 10)."""
        x, y, z = (c[i] for c, i in zip(coords, np.unravel_index(flat_index, mask.shape)))
        return np.stack(np.broadcast_arrays(*fieldmap.quadratic_terms(x, y, z)), axis=1)

    def nodes_at(flat_index: np.ndarray):
        return _node_rows(np.unravel_index(flat_index, mask.shape), steps, node_shape)

    rows, node_rows, differences, pair_weights = [], [], [], []
    flat = signal.reshape(-1, signal.shape[-1])
    flat_energy = energy.ravel()
    for axis in range(3):
        if mask.shape[axis] < 2:
            continue
        a, b = _axis_slices(axis)
        both = np.zeros(mask.shape, dtype=bool)
        both[a] = strong[a] & strong[b]
        first = np.flatnonzero(both)
        first = first[:: max(1, first.size // TREND_PAIRS_PER_AXIS)]
        if first.size == 0:
            continue
        second = first + int(np.prod(mask.shape[axis + 1:]))
        difference, coherence = _pair_field_differences(flat[first], flat[second], times,
                                                        period)
        rows.append(terms(second) - terms(first))
        node_rows.append(nodes_at(second) - nodes_at(first))
        differences.append(difference)
        pair_weights.append(np.sqrt(flat_energy[first] * flat_energy[second]) * coherence)
    if not rows:
        return zero
    design = np.concatenate(rows)  # the constant's column is 0: differences cancel it
    target = np.concatenate(differences)
    base = np.concatenate(pair_weights)
    base = base / max(float(base.max()), 1e-30)
    used = np.linalg.norm(design, axis=0) > 0
    floor = period / 100.0

    def fit_quadratic(w):
        coef = np.zeros(design.shape[1])
        root = np.sqrt(w)
        coef[used] = np.linalg.lstsq(design[:, used] * root[:, None], target * root,
                                     rcond=None)[0]
        return coef

    coef, rest = _irls_l1(fit_quadratic, lambda cf: design @ cf, target, base, floor,
                          iterations)
    differ = scipy.sparse.vstack(node_rows).tocsr()
    curvature = _node_curvature(node_shape)
    ridge = scipy.sparse.identity(differ.shape[1], format="csr")  # the constant: no data

    def fit_nodes(w):
        normal = (differ.T @ scipy.sparse.diags(w) @ differ).tocsr()
        scale = max(float(normal.diagonal().mean()), 1e-30)
        system = normal + scale * (TREND_CURVATURE * curvature + 1e-6 * ridge)
        return scipy.sparse.linalg.spsolve(system.tocsc(), differ.T @ (w * rest))

    nodes, residual = _irls_l1(fit_nodes, lambda v: differ @ v, rest, base, floor, iterations)
    total = max(float(base @ np.abs(target)), 1e-30)
    explained = 1.0 - float(base @ np.abs(residual)) / total
    by_quadratic = 1.0 - float(base @ np.abs(rest)) / total
    LOGGER.info("waterfat field trend: the quadratic explains %.2f of the neighbour field "
                "differences, with the %s nodes %.2f", by_quadratic, node_shape, explained)
    if explained - by_quadratic < TREND_NODE_MIN_GAIN:
        nodes[:] = 0.0  # the quadratic alone: nodes would only follow local biases
        explained = by_quadratic
    if explained < TREND_MIN_EXPLAINED:
        LOGGER.info("waterfat field trend: not used (< %.2f)", TREND_MIN_EXPLAINED)
        return zero
    grid = sum(cf * t for cf, t in zip(coef, fieldmap.quadratic_terms(*np.ix_(*coords))))
    node_field = nodes.reshape(node_shape)
    for axis, (n, step, count) in enumerate(zip(mask.shape, steps, node_shape)):
        columns, values = _tent_weights(np.arange(n), step, count)
        interpolate = np.zeros((n, count))
        np.add.at(interpolate, (np.tile(np.arange(n), 2), columns.ravel()), values.ravel())
        node_field = np.moveaxis(np.tensordot(interpolate, node_field, axes=([1], [axis])),
                                 0, axis)
    trend = np.where(mask, grid + node_field, 0).astype(np.float32)
    trend[mask] -= np.float32(np.average(trend[mask], weights=energy[mask] + 1e-30))
    LOGGER.info("waterfat field trend: %.0f Hz range (%s); demodulated", np.ptp(trend[mask]),
                "quadratic and nodes" if nodes.any() else "quadratic")
    return trend


#: fewest neighbour pairs with strong signal along an axis to measure its roughness
MIN_ROUGHNESS_PAIRS = 100


def _axis_weights(
    best_psi: np.ndarray, strong: np.ndarray, voxel_size: Sequence[float], period: float
) -> np.ndarray:
    """Smoothness weight per axis: the smaller of the geometric ``(h / d)^2`` (``h`` the
    smallest voxel size, ``d`` the axis' one) and the measured ``min(1, (tau_ref / tau)^2)``.

    ``tau`` is an axis' roughness: the median absolute deviation (about their median, so a
    uniform gradient does not count) of the field differences (Hz) between neighbours along
    it, both in ``strong`` voxels, taken from each voxel's best local minimum ``best_psi``
    (neighbours mostly take the same water/fat branch); ``tau_ref`` is the median over the
    axes (the smaller of two). An axis along which the field varies much more than along the
    others is coupled less: thick or gapped slices, or a wrong voxel size in the header,
    then cannot force the slices' water/fat choices to agree (ISMRM 2012 case 12 swaps its
    spleen with isotropic weights). Axes with fewer than :data:`MIN_ROUGHNESS_PAIRS` pairs
    keep the geometric weight.
    """
    sizes = np.asarray(voxel_size, dtype=float)
    geometric = (sizes.min() / sizes) ** 2
    tau = np.full(3, np.nan)
    for axis in range(3):
        if best_psi.shape[axis] < 2:
            continue
        a, b = _axis_slices(axis)
        both = strong[a] & strong[b]
        if np.count_nonzero(both) < MIN_ROUGHNESS_PAIRS:
            continue
        difference = _wrap_hz(best_psi[a] - best_psi[b], period)[both]
        tau[axis] = max(float(np.median(np.abs(difference - np.median(difference)))), 1e-3)
    measured = np.isfinite(tau)
    if not measured.any():
        return geometric
    reference = np.sort(tau[measured])[(np.count_nonzero(measured) - 1) // 2]
    ratio = reference / np.where(measured, tau, reference)
    relative = np.minimum(1.0, ratio**2)
    return np.minimum(geometric, relative)


def _sorted_candidates(psi, res, r2):
    """The local minima of :func:`_candidates` sorted by field: psi (N, K) float64 Hz within
    one period (missing ones last), relative residual (N, K), R2* (N, K) 1/s, count (N,)."""
    order = np.argsort(np.where(np.isfinite(res), psi, np.inf), axis=1)
    psi = np.take_along_axis(psi, order, axis=1).astype(np.float64)
    res = np.take_along_axis(res, order, axis=1).astype(np.float64)
    r2 = np.take_along_axis(r2, order, axis=1)
    count = np.maximum(np.count_nonzero(np.isfinite(res), axis=1), 1)
    return psi, res, r2, count


def _candidate_state(psi_c, res_c, count, period, state):
    """Unwrapped field (Hz) and residual of candidate position ``state``: position ``j`` is
    candidate ``j mod n`` shifted by ``(j div n)`` periods (``n`` the voxel's count)."""
    rows = np.arange(state.size)
    k = state % count
    return psi_c[rows, k] + (state // count) * period, res_c[rows, k]


def _nearest_state(prior, psi_c, count, period):
    """Candidate position whose unwrapped field is nearest the ``prior`` field (Hz)."""
    best = np.zeros(prior.size, dtype=np.int64)
    distance = np.full(prior.size, np.inf)
    for k in range(psi_c.shape[1]):
        turns = np.round((prior - psi_c[:, k]) / period)
        d = np.abs(psi_c[:, k] + turns * period - prior)
        better = (k < count) & (d < distance)
        best = np.where(better, k + turns.astype(np.int64) * count, best)
        distance = np.where(better, d, distance)
    return best


_JUMP_STEPS = ((1, 0), (-1, 0), (2, 0), (-2, 0), (0, 1), (0, -1))


def _pair_terms(psi, psi1, p, q, w_pq):
    """Pairwise energies of a binary move: A (keep, keep), B (keep, move), C (move, keep),
    D (move, move) for every pair."""
    return (w_pq * (psi[p] - psi[q]) ** 2, w_pq * (psi[p] - psi1[q]) ** 2,
            w_pq * (psi1[p] - psi[q]) ** 2, w_pq * (psi1[p] - psi1[q]) ** 2)


#: neighbour pairs per block of the whole-mask energy sums (temporaries of 32 MB each)
PAIR_CHUNK = 1 << 22


def _pair_blocks(size: int):
    """Slices of :data:`PAIR_CHUNK` pairs covering ``size`` pairs."""
    return (slice(start, min(start + PAIR_CHUNK, size)) for start in range(0, size, PAIR_CHUNK))


def _unstable(state, psi, data, psi_c, res_c, count, data_weight, p, q, w_pq, period, steps):
    """Voxels that alone lower the energy by some move (their neighbours kept)."""
    n = state.size
    found = np.zeros(n, dtype=bool)
    for step, turns in steps:
        psi1, res1 = _candidate_state(psi_c, res_c, count, period, state + step + turns * count)
        gain = data_weight * res1 - data
        for block in _pair_blocks(p.size):
            pb, qb = p[block], q[block]
            kept = psi[pb] - psi[qb]
            kept *= kept
            for end, moved in ((pb, psi1[pb] - psi[qb]), (qb, psi[pb] - psi1[qb])):
                moved *= moved
                moved -= kept
                moved *= w_pq[block]
                gain += np.bincount(end, moved, minlength=n)
        found |= gain < -1e-12 * np.abs(data).max(initial=1.0)
    return found


def _jump_moves(psi_c, res_c, count, data_weight, p, q, w_pq, period, state, *,
                steps=_JUMP_STEPS, max_sweeps=8, tol=1e-5, band=None):
    """Minimise ``sum_p D_p res_p + sum_pq w_pq (psi_p - psi_q)^2`` over candidate positions
    by binary jump moves solved with max-flow (PyMaxflow).

    A move ``(s, k)`` proposes, for every voxel at once, the candidate ``s`` positions up
    (``s > 0``) or down the voxel's unwrapped list of local minima plus ``k`` whole periods;
    each voxel keeps its field or takes the proposal. All proposals move in the same
    direction, so the quadratic pairwise term is submodular (``B + C - A - D = 2 w dp dq
    >= 0``) and the cut is the exact best move. Sweeps over ``steps`` repeat until the
    energy decreases by less than ``tol`` (relative).

    ``band``: None (every voxel may move) or ``(mask, radius, fixed)``: only the voxels
    within ``radius`` voxels of one that alone could lower the energy may move (the others
    enter as constants), for fine levels started from a coarse solution; ``fixed``: that
    set is found once from the starting positions (moves stay within ``radius`` of them),
    else anew every sweep. Returns the positions and the number of cuts.
    """
    import maxflow  # PyMaxflow (C++ Boykov-Kolmogorov max-flow)

    n = state.size
    psi, res = _candidate_state(psi_c, res_c, count, period, state)
    data = data_weight * res
    energy = float(data.sum() + np.dot(w_pq, (psi[p] - psi[q]) ** 2))
    cuts = 0
    active = None
    if band is not None:
        band_mask, radius, fixed = band
    for _ in range(max_sweeps):
        start_energy = energy
        if band is None:
            active = None
            ids, pe, qe = np.arange(n), p, q
            n_active = n
        elif active is None or not fixed:
            seeds = _unstable(state, psi, data, psi_c, res_c, count, data_weight, p, q, w_pq,
                              period, steps)
            if not seeds.any():
                break
            grid = np.zeros(band_mask.shape, dtype=bool)
            grid[band_mask] = seeds
            grid = ndimage.binary_dilation(grid, iterations=radius, mask=band_mask)
            active = grid[band_mask]
            ids = np.nonzero(active)[0]
            n_active = ids.size
            local = np.full(n, -1, dtype=np.int64)
            local[ids] = np.arange(n_active)
            inner = active[p] & active[q]
            pe, qe = local[p[inner]], local[q[inner]]
            p_only = active[p] & ~active[q]
            q_only = active[q] & ~active[p]
        for step, turns in steps:
            proposal = state + step + turns * count
            psi1, res1 = _candidate_state(psi_c, res_c, count, period, proposal)
            data1 = data_weight * res1
            if active is None:
                a, b, c, d = _pair_terms(psi, psi1, p, q, w_pq)
                # E(x_p, x_q) = A + (C - A) x_p + (D - C) x_q + (B + C - A - D)(1 - x_p) x_q
                unary = (data1 - data + np.bincount(p, c - a, minlength=n)
                         + np.bincount(q, d - c, minlength=n))
            else:
                a, b, c, d = _pair_terms(psi, psi1, p[inner], q[inner], w_pq[inner])
                unary = (data1 - data)[ids] + np.bincount(pe, c - a, minlength=n_active) \
                    + np.bincount(qe, d - c, minlength=n_active)
                # pairs with one fixed end: E = A + (C - A) x_p, resp. A + (B - A) x_q
                a1, _, c1, _ = _pair_terms(psi, psi1, p[p_only], q[p_only], w_pq[p_only])
                unary += np.bincount(local[p[p_only]], c1 - a1, minlength=n_active)
                a2, b2, _, _ = _pair_terms(psi, psi1, p[q_only], q[q_only], w_pq[q_only])
                unary += np.bincount(local[q[q_only]], b2 - a2, minlength=n_active)
            graph = maxflow.Graph[float](n_active, pe.size)
            nodes = graph.add_nodes(n_active)
            graph.add_edges(pe, qe, np.maximum(b + c - a - d, 0.0), np.zeros(pe.size))
            graph.add_grid_tedges(nodes, np.maximum(unary, 0.0), np.maximum(-unary, 0.0))
            graph.maxflow()
            cuts += 1
            moved = graph.get_grid_segments(nodes)  # sink side: take the proposal
            if moved.any():
                state = state.copy()
                state[ids[moved]] = proposal[ids[moved]]
                psi, res = _candidate_state(psi_c, res_c, count, period, state)
                data = data_weight * res
                energy = float(data.sum() + np.dot(w_pq, (psi[p] - psi[q]) ** 2))
        if start_energy - energy <= tol * abs(start_energy):
            break
    return state, cuts


def _coarse_pairs(p, q, w_pq, owner, n_coarse):
    """Pairs of the next pyramid level: the fine pairs ``(p, q, w)`` mapped to the blocks
    ``owner`` of their voxels (``n_coarse`` blocks), pairs inside a block dropped, weights
    of parallel pairs summed."""
    bp, bq = owner[p], owner[q]
    keep = bp != bq
    lo = np.minimum(bp[keep], bq[keep])
    hi = np.maximum(bp[keep], bq[keep])
    keys, inverse = np.unique(lo * n_coarse + hi, return_inverse=True)
    weights = np.bincount(inverse, w_pq[keep], minlength=keys.size)
    return keys // n_coarse, keys % n_coarse, weights


def graphcut_field(
    signal: np.ndarray,
    mask: np.ndarray,
    times: np.ndarray,
    c: np.ndarray,
    *,
    fat_hz: float,
    psis: np.ndarray,
    period: float,
    r2s: np.ndarray,
    voxel_size: Sequence[float],
    smoothness: float = 0.1,
    n_candidates: int = 4,
    max_levels: int = 6,
    edge_power: float = 3.0,
    local_levels: int = 1,
    max_sweeps: int = 8,
    full_graph_voxels: int = 20000,
    band_radius: int = 3,
    chunk: int = 16384,
    parts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unwrapped field (Hz), grid R2* (1/s) and relative residual by hierarchical graph cuts.

    Energy over the local minima ``psi_p`` of each voxel's VARPRO residual curve::

        sum_p E_p r_p(psi_p) + lambda sum_(p,q) w_pq a_pq ((psi_p - psi_q) / f_fat)^2

    ``E_p`` the signal energy ``||s_p||^2`` (over its median), ``r_p`` the relative residual,
    6-neighbour pairs with the axis weight ``a_pq`` of :func:`_axis_weights` (at most
    ``(h / d)^2``, ``d`` the voxel size along the pair's axis and ``h`` the smallest one,
    less along an axis where the field is measurably rougher), ``f_fat`` the main fat
    frequency, ``lambda = GRAPHCUT_SCALE x smoothness``. Fields are unwrapped
    values (a local minimum plus whole periods), so the cut also unwraps.

    Jump moves (:func:`_jump_moves`) run on a pyramid of 2x2x2 block sums of the absolute
    residual curves, coarse to fine, each level starting from the coarser result. A coarse
    pair's weight is the sum of the fine pair weights crossing between the two blocks (the
    fine energy of a blockwise-constant field), so weak links stay weak at every scale.

    * Coarse levels decide which regions are water and which fat, with edge-stopping
      weights ``w = m (min(1, m / E_tissue))^(edge_power - 1)``, ``m = min(E_p, E_q)``,
      ``E_tissue`` the typical tissue energy: links through partial-volume voxels next to
      air (bowel gas, lung) are cut, as the field can jump there by more than the
      water/fat alias (case 12 of the ISMRM 2012 challenge: the spleen).
    * The ``local_levels`` finest levels use ``w = min(E_p, E_q)`` and may only change
      voxels within ``band_radius`` voxels of those that alone would lower the energy at
      the start: dim tissue next to air follows its neighbours, regions decided above are
      kept (with 2 local levels a 10-voxel organ behind a gas gap was eroded and swapped,
      tests/test_waterfat.py). Coarse levels with more than ``full_graph_voxels`` voxels
      are band-limited too (the band found anew every sweep), for speed.
    * Last, each connected part of the mask moves whole to its candidates nearest the
      field plus a water/fat alias shift where that lowers its energy (:func:`_move_parts`;
      ``parts``: the labels of ``ndimage.label(mask)`` where the caller has them).
    """
    voxels = signal[mask]
    levels, owners = _pyramid_levels(mask, max_levels)
    # the grid search block by block: each block's candidates, and its residual curves
    # summed into level 1 (the full curves of every voxel are never held at once)
    sums = _level1_sums(levels, psis.size)
    energy = np.empty(voxels.shape[0], dtype=np.float32)
    blocks = []
    for start, stop, cost, index, block_energy in _grid_chunks(voxels, times, c, psis, r2s,
                                                                chunk):
        energy[start:stop] = block_energy
        blocks.append(_candidates(cost, index, psis, r2s, n_candidates))
        if owners:
            _add_block_sums(sums, cost * block_energy[:, None], owners[0][start:stop])
    finest = tuple(np.concatenate(column) for column in zip(*blocks))  # column 0: the best
    del blocks, voxels
    curves, energies = _coarse_curves(sums, energy, levels, owners)
    del sums
    scale = float(np.median(energy[energy > 0])) if np.any(energy > 0) else 1.0
    energies = [level_energy / scale for level_energy in energies]
    lam = GRAPHCUT_SCALE * float(smoothness) / float(fat_hz) ** 2
    # pair weights of every level (docstring): edge-stopping for the coarse levels, plain
    # signal weights for the local ones; coarse pairs sum the fine pairs between blocks
    best = np.zeros(mask.shape, dtype=np.float32)
    best[mask] = finest[0][:, 0]
    strong = np.zeros(mask.shape, dtype=bool)
    strong[mask] = _strong(energies[0])
    axis_weight = _axis_weights(best, strong, voxel_size, period)
    del best, strong
    LOGGER.info("waterfat graph cut: smoothness weights per axis %s",
                np.round(axis_weight, 4).tolist())
    p, q, geometry = _neighbour_pairs(mask, axis_weight)
    weak = np.minimum(energies[0][p], energies[0][q])
    ratio = np.minimum(weak / _tissue_energy(energies[0]), 1.0)
    weak *= lam
    ratio **= edge_power - 1.0
    ratio *= weak
    stopping = [(p, q, ratio * geometry)]
    plain = [(p, q, weak * geometry)]
    del weak, ratio, geometry
    for level in range(1, len(levels)):
        args = (owners[level - 1], int(np.count_nonzero(levels[level][0])))
        stopping.append(_coarse_pairs(*stopping[-1], *args))
        if level < local_levels:
            plain.append(_coarse_pairs(*plain[-1], *args))
    if local_levels > 0:
        stopping[0] = None  # the finest level uses the plain weights
    prior = None
    total_cuts = 0
    for level in range(len(levels) - 1, -1, -1):
        m, axes = levels[level]
        raw = finest if level == 0 else _candidates(
            curves[level], np.zeros(curves[level].shape, np.int16), psis, r2s, n_candidates)
        psi_c, res_c, r2_c, count = _sorted_candidates(*raw)
        del raw
        if level == 0:
            finest = None  # its sorted copy is all the level needs
        e = energies[level]
        local = level < local_levels
        p, q, w_pq = plain[level] if local else stopping[level]
        if prior is None:
            state = np.argmin(res_c, axis=1).astype(np.int64)
        else:
            state = _nearest_state(prior[m], psi_c, count, period)
        band = None
        if prior is not None and (local or e.size > full_graph_voxels):
            band = (m, band_radius, local)
        state, cuts = _jump_moves(psi_c, res_c, count, e, p, q, w_pq, period, state,
                                  max_sweeps=max_sweeps, band=band)
        total_cuts += cuts
        psi, res = _candidate_state(psi_c, res_c, count, period, state)
        if level > 0:
            field = np.zeros(m.shape, dtype=np.float64)
            field[m] = psi
            if (~m).any():
                nearest = ndimage.distance_transform_edt(
                    ~m, return_distances=False, return_indices=True)
                field = field[tuple(nearest)]
            prior = _upsample(field, levels[level - 1][0].shape, axes)
            curves[level] = None
    alias = float(fat_hz) % period  # water <-> fat, either way, within one period
    aliases = (alias, alias - period, -alias, period - alias)
    if parts is None:
        parts = ndimage.label(mask)[0]
    state, moved = _move_parts(psi_c, res_c, count, e, p, q, w_pq, period, state,
                               parts[mask], aliases)
    psi, res = _candidate_state(psi_c, res_c, count, period, state)
    LOGGER.debug("waterfat graph cut: %d levels, %d cuts, %d parts moved whole", len(levels),
                  total_cuts, moved)
    rows = np.arange(state.size)
    k = state % count
    field = np.zeros(mask.shape, dtype=np.float32)
    field[mask] = psi
    r2 = np.zeros(mask.shape, dtype=np.float32)
    r2[mask] = r2_c[rows, k]
    relative = np.zeros(mask.shape, dtype=np.float32)
    relative[mask] = res
    return field, r2, relative


def _move_parts(psi_c, res_c, count, data_weight, p, q, w_pq, period, state, labels, shifts):
    """Move each connected part of the mask as a whole to the candidates nearest its field
    plus a shift (the water/fat aliases) where that lowers the part's energy. Parts share no
    pair, so each part's choice is exact; the band-limited finest level cannot flip a part
    that the coarse levels decided. Returns the states and the number of parts moved."""
    n_parts = int(labels.max(initial=0)) + 1

    def part_energy(psi, res):
        energy = np.bincount(labels, data_weight * res, minlength=n_parts)
        for block in _pair_blocks(p.size):
            pair = psi[p[block]] - psi[q[block]]
            pair *= pair
            pair *= w_pq[block]
            energy += np.bincount(labels[p[block]], pair, minlength=n_parts)
        return energy

    psi, res = _candidate_state(psi_c, res_c, count, period, state)
    best = part_energy(psi, res)
    chosen = np.zeros(n_parts, dtype=np.int64)
    trials = [state]
    for index, shift in enumerate(shifts, start=1):
        trials.append(_nearest_state(psi + shift, psi_c, count, period))
        energy = part_energy(*_candidate_state(psi_c, res_c, count, period, trials[-1]))
        better = energy < best - 1e-9 * np.abs(best)
        chosen[better] = index
        best = np.where(better, energy, best)
    result = state.copy()
    for index in range(1, len(trials)):
        take = chosen[labels] == index
        result[take] = trials[index][take]
    return result, int(np.count_nonzero(chosen[1:]))


def _strong(energy: np.ndarray) -> np.ndarray:
    """Voxels with signal energy above 10% of its 99th percentile (tissue, not noise)."""
    top = float(np.percentile(energy, 99)) if energy.size else 0.0
    return energy > 0.1 * top


def strong_sample(signal: np.ndarray, mask: np.ndarray, count: int) -> np.ndarray:
    """Flat indices of about ``count`` evenly spaced :func:`_strong` voxels of ``mask`` in a
    4D ``signal`` (a deterministic sample for global estimates)."""
    index = np.flatnonzero(mask)
    index = index[:: max(1, index.size // (4 * count))]
    voxels = signal.reshape(-1, signal.shape[-1])[index]
    index = index[_strong((np.abs(voxels) ** 2).sum(axis=1))]
    return index[:: max(1, index.size // count)]


def _tissue_energy(energy: np.ndarray) -> float:
    """Typical tissue signal energy: the median over the :func:`_strong` voxels (noise-only
    voxels of a generous mask excluded)."""
    strong = energy[_strong(energy)]
    return float(np.median(strong)) if strong.size else max(float(energy.max(initial=0)), 1e-30)


#: The continuous refinement moves the field at most this many grid steps from the
#: regularised grid value (at 0.35 T one voxel of a public in vivo slice walked to -17.5 kHz)
REFINE_MAX_SHIFT_STEPS = 3.0

#: Spatial regularisations of :func:`separate`.
REGULARIZATIONS = ("graphcut", "multires", "none")

#: Scale of the graph cut's smoothness weight, ``lambda = GRAPHCUT_SCALE x smoothness``: the
#: default ``smoothness=0.1`` (the CLI's ``--waterfat-smoothness``) is then inside the range
#: measured best for both methods (benchmarks/RESULTS.md).
GRAPHCUT_SCALE = 300.0


# ---------------------------------------------------------------------------------------
# continuous refinement (variable projection)
# ---------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _basis_fit(s, t, c, psi, r2, a1, a2, res):  # pragma: no cover - compiled
    """VARPRO at one voxel and (psi Hz, R2* 1/s): fills the water and fat bases ``a1``, ``a2``
    and the residual ``res``; returns rho_w, rho_f, the normal matrix (h11, h22, h12, det)
    and ``||res||^2``. A singular basis (det <= 1e-12 h11 h22) gives zero amplitudes."""
    h11 = 0.0
    h22 = 0.0
    h12 = 0j
    b1 = 0j
    b2 = 0j
    for e in range(t.size):
        a1[e] = np.exp(complex(-r2 * t[e], _TWO_PI * psi * t[e]))
        a2[e] = a1[e] * c[e]
        h11 += a1[e].real ** 2 + a1[e].imag ** 2
        h22 += a2[e].real ** 2 + a2[e].imag ** 2
        h12 += a1[e].conjugate() * a2[e]
        b1 += a1[e].conjugate() * s[e]
        b2 += a2[e].conjugate() * s[e]
    det = h11 * h22 - (h12.real ** 2 + h12.imag ** 2)
    if not det > 1e-12 * h11 * h22:
        det = np.inf
    rho_w = (h22 * b1 - h12 * b2) / det
    rho_f = (h11 * b2 - h12.conjugate() * b1) / det
    cost = 0.0
    for e in range(t.size):
        res[e] = s[e] - rho_w * a1[e] - rho_f * a2[e]
        cost += res[e].real ** 2 + res[e].imag ** 2
    return rho_w, rho_f, h11, h22, h12, det, cost


@numba.njit(cache=True, nogil=True)
def _r2star_jacobian(s, t, a1, a2, res, h11, h22, h12, det):  # pragma: no cover - compiled
    """``(H, z)`` of the VARPRO Jacobian's R2* column ``j = (I - P)(t * model)``:
    ``H = ||j||^2`` and ``z = j^H res``.

    The psi column is ``-2 pi i j`` (the projector is complex-linear), so the Gauss-Newton
    matrix ``Re(J^H J)`` is ``diag(4 pi^2 H, H)`` and the gradient of ``||res||^2 / 2`` is
    ``(2 pi Im z, -Re z)``: psi and R2* decouple."""
    q1 = 0j
    q2 = 0j
    for e in range(t.size):
        u = t[e] * (s[e] - res[e])
        q1 += a1[e].conjugate() * u
        q2 += a2[e].conjugate() * u
    x1 = (h22 * q1 - h12 * q2) / det
    x2 = (h11 * q2 - h12.conjugate() * q1) / det
    norm = 0.0
    z = 0j
    for e in range(t.size):
        j = t[e] * (s[e] - res[e]) - x1 * a1[e] - x2 * a2[e]
        norm += j.real ** 2 + j.imag ** 2
        z += j.conjugate() * res[e]
    return norm, z


@numba.njit(cache=True, nogil=True)
def _refine_voxels(s, psi, r2, out_psi, out_r2, out_w, out_f, out_cost,  # pragma: no cover
                   out_var_psi, out_var_r2, t, c, max_iter, r2_lo, r2_hi, tol_hz,
                   max_shift_hz):
    """Levenberg-Marquardt over the voxels of ``s`` (N, E); writes the ``out_*`` arrays
    (see :func:`varpro_refine`)."""
    n_vox, n_e = s.shape
    sv = np.empty(n_e, np.complex128)
    a1 = np.empty(n_e, np.complex128)
    a2 = np.empty(n_e, np.complex128)
    res = np.empty(n_e, np.complex128)
    t1 = np.empty(n_e, np.complex128)
    t2 = np.empty(n_e, np.complex128)
    t_res = np.empty(n_e, np.complex128)
    for v in range(n_vox):
        for e in range(n_e):
            sv[e] = s[v, e]
        p = psi[v]
        r = min(max(r2[v], r2_lo), r2_hi)
        w, f, h11, h22, h12, det, cost = _basis_fit(sv, t, c, p, r, a1, a2, res)
        damping = 1e-3
        for _ in range(max_iter):
            norm, z = _r2star_jacobian(sv, t, a1, a2, res, h11, h22, h12, det)
            step_psi = 0.0
            step_r2 = 0.0
            if norm > 0:
                step_psi = z.imag / (_TWO_PI * norm * (1.0 + damping))
                step_r2 = -z.real / (norm * (1.0 + damping))
            new_psi = p + step_psi
            new_r2 = min(max(r + step_r2, r2_lo), r2_hi)
            trial = _basis_fit(sv, t, c, new_psi, new_r2, t1, t2, t_res)
            better = trial[6] <= cost and abs(new_psi - psi[v]) <= max_shift_hz
            if better:
                p, r = new_psi, new_r2
                w, f, h11, h22, h12, det, cost = trial
                a1[:] = t1
                a2[:] = t2
                res[:] = t_res
                damping = max(damping / 3.0, 1e-7)
            else:
                damping *= 4.0
            if (better and abs(step_psi) < tol_hz) or damping > 1e6:
                break
        norm = _r2star_jacobian(sv, t, a1, a2, res, h11, h22, h12, det)[0]
        out_psi[v] = p
        out_r2[v] = r
        out_w[v] = w
        out_f[v] = f
        out_cost[v] = cost
        out_var_psi[v] = 1.0 / (_TWO_PI ** 2 * norm) if norm > 0 else np.inf
        out_var_r2[v] = 1.0 / norm if norm > 0 else np.inf


def varpro_refine(
    s: np.ndarray,
    times: np.ndarray,
    c: np.ndarray,
    psi: np.ndarray,
    r2: np.ndarray,
    *,
    max_iter: int = 20,
    r2star_bounds: tuple[float, float] = (0.0, 2000.0),
    tol_hz: float = 1e-3,
    max_shift_hz: float = np.inf,
) -> tuple[np.ndarray, ...]:
    """Levenberg-Marquardt refinement of (psi Hz, R2* 1/s) per voxel by variable projection.

    Steps that would move psi more than ``max_shift_hz`` from its start are refused: the
    refinement stays at the local minimum the grid search and the regularisation chose
    (a voxel whose residual is nearly flat in psi could otherwise walk off by kHz).
    ``max_iter=0`` evaluates the start. Compiled (numba), threads over blocks of voxels
    (:func:`qsmprep.recon._jit.run_in_blocks`), O(E) memory per thread.

    ``s`` (N, E) complex. Returns ``psi, r2, rho_w, rho_f, cost, var_psi_unit, var_r2_unit``
    with ``cost = ||r||^2`` and ``var_*_unit`` the diagonal of ``[Re(J^H J)]^-1`` (multiply
    by the per-channel noise variance for the parameter variance).
    """
    n_vox = s.shape[0]
    outputs = [np.empty(n_vox, dtype) for dtype in (np.float64, np.float64, np.complex128,
                                                    np.complex128, np.float64, np.float64,
                                                    np.float64)]
    run_in_blocks(_refine_voxels, (np.ascontiguousarray(s), np.asarray(psi, np.float64),
                                   np.asarray(r2, np.float64), *outputs),
                  np.asarray(times, np.float64), np.asarray(c, np.complex128), int(max_iter),
                  float(r2star_bounds[0]), float(r2star_bounds[1]), float(tol_hz),
                  float(max_shift_hz))
    return tuple(outputs)


# ---------------------------------------------------------------------------------------
# swaps
# ---------------------------------------------------------------------------------------


def detect_swaps(
    field_hz: np.ndarray,
    mask: np.ndarray,
    *,
    fat_hz: float,
    weight: np.ndarray | None = None,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    scale_mm: float = 12.0,
    suspect_fraction: float = 0.002,
    swapped_fraction: float = 0.02,
) -> SwapReport:
    """Look for water/fat swaps in a field map (Hz) and log a warning when found.

    A swap moves the field by about the main fat frequency ``fat_hz`` (Hz): voxels whose field
    differs from a robust smooth version of the map (weighted median-like: the weighted
    Gaussian average of the field after one round of excluding such outliers, ``scale_mm``)
    by more than ``|fat_hz| / 2`` are counted, and neighbouring pairs with a step of more
    than ``|fat_hz| / 2``. Verdict ``"swapped"`` above ``swapped_fraction`` of the mask,
    ``"suspect"`` above ``suspect_fraction`` (of voxels or of pairs), else ``"none"``.
    """
    mask = np.asarray(mask, dtype=bool)
    field = np.where(mask, np.asarray(field_hz, dtype=np.float32), 0)
    limit = 0.5 * abs(float(fat_hz))
    count = int(np.count_nonzero(mask))
    if count == 0:
        return SwapReport("none", 0.0, 0.0, "empty mask: no swap check")
    w = np.where(mask, 1.0 if weight is None else np.asarray(weight, np.float32), 0)
    w = w.astype(np.float32)
    sigma = [scale_mm / max(float(v), 1e-6) for v in voxel_size]
    keep = mask.copy()
    for _ in range(3):
        # remove a weighted 2nd-order polynomial (shim-like gradients), then smooth locally
        trend = fieldmap._polynomial_trend(field, np.where(keep, w, 0), voxel_size)
        detrended = np.where(mask, field - trend, 0)
        wk = np.where(keep, w, 0)
        num = ndimage.gaussian_filter(wk * detrended, sigma, mode="constant", truncate=2.5)
        den = ndimage.gaussian_filter(wk, sigma, mode="constant", truncate=2.5)
        smooth = num / np.maximum(den, 1e-12)
        outlier = mask & (np.abs(detrended - smooth) > limit)
        keep = mask & ~outlier
    # count only voxels with signal (no-signal voxels inside a mask, e.g. cortical bone,
    # have random fields): weight above 20% of the median weight
    w_in = w[mask]
    strong = mask & (w >= 0.2 * float(np.median(w_in[w_in > 0])) if np.any(w_in > 0) else mask)
    count = max(int(np.count_nonzero(strong)), 1)
    fraction = float(np.count_nonzero(outlier & strong)) / count
    mask = strong
    jumps = pairs = 0
    for axis in range(3):
        if mask.shape[axis] < 2:
            continue
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(0, -1), slice(1, None)
        both = mask[tuple(a)] & mask[tuple(b)]
        step = np.abs(field[tuple(a)] - field[tuple(b)])[both]
        pairs += step.size
        jumps += int(np.count_nonzero(step > limit))
    jump_fraction = jumps / max(pairs, 1)
    if fraction > swapped_fraction:
        verdict = "swapped"
    elif fraction > suspect_fraction or jump_fraction > suspect_fraction:
        verdict = "suspect"
    else:
        verdict = "none"
    message = (f"water/fat swap check: {verdict} ({100 * fraction:.2f}% of voxels off the "
               f"smooth field by > {limit:.0f} Hz, {100 * jump_fraction:.2f}% neighbour jumps)")
    if verdict != "none":
        LOGGER.warning("%s: inspect the field and PDFF maps; a swap adds about %.0f Hz "
                       "(%.1f ppm) of spurious field and streaks in chi.", message,
                       abs(float(fat_hz)), 3.4)
    else:
        LOGGER.info(message)
    return SwapReport(verdict, fraction, float(jump_fraction), message)


# ---------------------------------------------------------------------------------------
# main entry points
# ---------------------------------------------------------------------------------------


#: a sign is decided when the other sign's residual is this much larger (relative) ...
PHASE_SIGN_EXCESS = 0.1
#: ... and this fraction of the informative voxels agrees
PHASE_SIGN_VOTE = 0.55
#: voxels (evenly spaced strong ones) the check uses
PHASE_SIGN_VOXELS = 50000


def _best_fit(voxels, times, c, psis, r2s) -> tuple[np.ndarray, np.ndarray]:
    """Relative residual of each voxel's best grid minimum after VARPRO refinement, and the
    signal energy. Unrefined, the grid steps leave residuals that at high SNR outweigh the
    misfit of a mirrored fat spectrum."""
    psi, r2, grid_cost, energy = _grid_best(voxels, times, c, psis, r2s)
    refined = varpro_refine(voxels, times, c, psi, r2,
                            max_shift_hz=REFINE_MAX_SHIFT_STEPS * float(psis[1] - psis[0]))[4]
    return np.minimum(refined / np.maximum(energy, 1e-30), grid_cost), energy


def check_phase_sign(
    signal: np.ndarray,
    echo_times: Sequence[float],
    mask: np.ndarray,
    *,
    b0_tesla: float,
    fat_model: str | FatModel = "ismrm",
    water_ppm: float | None = None,
    phase_sign: int | Literal["auto"] = 1,
    r2star_max: float = 500.0,
) -> PhaseSignCheck:
    """Which phase handedness the fat signal supports (``phase_sign`` the one to test;
    ``"auto"`` tests +1).

    Conjugating the data mirrors every frequency: water stays a single line (pure water fits
    either sign equally), but the multi-peak fat spectrum then sits on the wrong side of
    water and fits worse. Each strong voxel's (up to :data:`PHASE_SIGN_VOXELS`) best grid
    minimum is refined by VARPRO for ``phase_sign`` and its opposite; a sign is preferred
    when the other's energy-weighted residual is :data:`PHASE_SIGN_EXCESS` larger and
    :data:`PHASE_SIGN_VOTE` of the voxels whose residuals differ (by > 10% of the median
    residual) agree. Measured (excess, vote): ISMRM 2012 cases 12 / 15 (1.85, 0.69) /
    (44.5, 0.97); leg phantom at SNR 100 with 4 echoes (1.25, 0.72), with 6 (3.42, 0.94);
    random body sections (``benchmarks/waterfat_random.py`` generator, 55 with 4-9 echoes,
    each sign) 110 of 110 right. On the unrefined grid residuals the grid steps outweighed
    the misfit: the leg with 4 echoes and 9-echo sections at SNR 20 were inconclusive (+1
    taken, water and fat swapped everywhere when it was wrong). Without fat, and with 3
    echoes, always inconclusive.
    """
    if phase_sign not in (1, -1, "auto"):
        raise ValueError(f"phase_sign must be +1, -1 or 'auto', got {phase_sign!r}.")
    phase_sign = 1 if phase_sign == "auto" else phase_sign
    # checked with +1 (no conjugated copy of the data); the sample takes the given sign
    data, times, mask = _check_inputs(signal, echo_times, mask, b0_tesla, 1)
    if times.size <= 3:  # an exact fit either way: any difference would be round-off
        return PhaseSignCheck(
            given=int(phase_sign), preferred=None, excess=0.0, vote=0.5, identifiable=False,
            message="phase sign check: not possible with 3 echoes (water and fat with a "
                    "field and an R2* fit them exactly with either sign)")
    model = get_fat_model(fat_model)
    c = fat_signal(times, b0_tesla, model, water_ppm=water_ppm)
    psis, _ = psi_grid(times)
    r2s = default_r2star_grid(r2star_max)
    voxels = data.reshape(-1, times.size)[strong_sample(data, mask, PHASE_SIGN_VOXELS)]
    if phase_sign == -1:
        voxels = np.conj(voxels)
    given, weight = _best_fit(voxels, times, c, psis, r2s)
    other = _best_fit(np.conj(voxels), times, c, psis, r2s)[0]
    given_total = float(np.dot(weight, given))
    other_total = float(np.dot(weight, other))
    difference = other - given
    informative = np.abs(difference) > 0.1 * (np.median(np.minimum(given, other))
                                              if given.size else 0.0)
    count = int(np.count_nonzero(informative))
    vote = float(np.mean(difference[informative] > 0)) if count else 0.5
    excess = (other_total - given_total) / max(given_total, 1e-30)
    deficit = (given_total - other_total) / max(other_total, 1e-30)
    preferred = None
    if excess >= PHASE_SIGN_EXCESS and vote >= PHASE_SIGN_VOTE:
        preferred = int(phase_sign)
        message = (f"phase sign check: the fat signal confirms phase sign {phase_sign:+d} (the "
                   f"other sign fits {100 * excess:.0f}% worse; {100 * vote:.0f}% of {count} "
                   "informative voxels agree)")
    elif deficit >= PHASE_SIGN_EXCESS and vote <= 1 - PHASE_SIGN_VOTE:
        preferred = -int(phase_sign)
        message = (f"phase sign check: the fat signal contradicts phase sign {phase_sign:+d}: "
                   f"the data fit {100 * deficit:.0f}% better with {-phase_sign:+d} "
                   f"({100 * (1 - vote):.0f}% of {count} informative voxels agree)")
    else:
        message = (f"phase sign check: inconclusive (residual of the other sign "
                   f"{100 * excess:+.0f}%, {100 * vote:.0f}% of {count} informative voxels "
                   f"for {phase_sign:+d}; little or no fat, or too few echoes)")
    return PhaseSignCheck(given=int(phase_sign), preferred=preferred, excess=float(excess),
                          vote=vote, message=message)


def resolve_phase_sign(requested: int | Literal["auto"], check: PhaseSignCheck) -> int:
    """The phase sign to use given the ``requested`` one and the :func:`check_phase_sign`
    verdict: for ``"auto"`` the sign the fat signal supports, +1 where inconclusive; a given
    sign (+1 or -1) is kept, with a warning when the fat signal contradicts it. An ``"auto"``
    sign the check could not confirm (3 echoes, or inconclusive) is logged as a warning."""
    if requested == "auto":
        sign = check.preferred or 1
        if check.preferred is not None:
            LOGGER.info("%s; using %+d", check.message, sign)
        else:  # not confirmed: a wrong guess swaps water and fat everywhere, unannounced
            LOGGER.warning("%s; using %+d. With the other handedness water and fat come out "
                           "swapped everywhere (fat where muscle is): give the scanner's "
                           "phase sign (--phase-sign, phase_sign=).", check.message, sign)
        return sign
    if check.preferred == -requested:
        LOGGER.warning("%s. A wrong sign swaps water and fat everywhere and flips the field: "
                       "check the scanner's phase convention (--phase-sign).", check.message)
    return int(requested)


def separate(
    signal: np.ndarray,
    echo_times: Sequence[float],
    mask: np.ndarray | None = None,
    *,
    b0_tesla: float,
    voxel_size: Sequence[float],
    fat_model: str | FatModel = "ismrm",
    water_ppm: float | None = None,
    phase_sign: int | Literal["auto"] = "auto",
    smoothness: float = 0.1,
    r2star_max: float = 500.0,
    psi_step_hz: float | None = None,
    n_candidates: int = 4,
    regularization: Literal["graphcut", "multires", "none"] = "graphcut",
    unwrap: bool = True,
    refine: bool = True,
    max_iter: int = 20,
    detrend: bool = True,
    chunk: int = 16384,
) -> WaterFatResult:
    """Water-fat separation with field and R2* mapping from multi-echo complex data.

    Parameters
    ----------
    signal
        Complex ``[x, y, z, echo]`` (3-16 echoes; see :func:`as_complex`); also one slice
        ``[x, y, echo]`` and the ISMRM 2012 toolbox's ``[x, y, z, coil, echo]`` with one coil.
        The maps come back with the signal's spatial shape.
    echo_times
        Echo times (s), strictly increasing, uniform or not.
    mask
        Voxels to fit (non-finite voxels are dropped); None: the signal mask of
        :func:`qsmprep.recon.mask.body_mask` (several parts, holes filled).
    b0_tesla
        Main field (T); sets the fat frequencies.
    voxel_size
        Voxel size (mm), for unwrapping and the swap check (in-plane only for one slice).
    fat_model
        Built-in name (:data:`FAT_MODELS`: ``ismrm``, ``ren_marrow``, ``scanner7``,
        ``single``) or a :class:`FatModel` (:func:`fat_model_from_table`).
    water_ppm
        Water shift of the scan (ppm; None: the fat table's own reference).
    phase_sign
        +1: phase grows as ``+2 pi f t`` (ISMRM 2012 toolbox ``PrecessionIsClockwise =
        1``); -1: the opposite handedness (``PrecessionIsClockwise = 0``), conjugates the
        data; ``"auto"`` (default): the sign the fat signal supports
        (:func:`check_phase_sign`), +1 where it is inconclusive (always with 3 echoes, which
        fit either sign exactly: a warning asks for the sign). The check also runs for a
        given sign and warns when the fat signal contradicts it (a wrong sign swaps water
        and fat everywhere).
    smoothness
        Weight of the field-smoothness term of the regularisation (``graphcut``: times
        :data:`GRAPHCUT_SCALE`, per squared main-fat-frequency step between neighbours
        relative to the energy-weighted residual; ``multires``: relative residual per
        squared main-fat-frequency distance); 0 picks the best minimum per voxel. Default
        0.1 for both; ISMRM case 12 stays below 3 PDFF points for 0.01-0.3 with the graph
        cut (the spleen swaps at 1).
    r2star_max
        Largest R2* (1/s) of the grid search.
    psi_step_hz
        Field grid step (Hz); default see :func:`psi_grid`.
    n_candidates
        Local minima kept per voxel.
    regularization
        ``"graphcut"`` (default, hierarchical jump-move graph cut), ``"multires"``
        (multi-resolution ICM) or ``"none"`` (best grid minimum per voxel: swaps).
    unwrap
        Spatially unwrap the field beyond one period.
    refine, max_iter
        Continuous VARPRO refinement and its iteration limit.
    detrend
        Demodulate the echoes by a smooth field trend (:func:`field_trend`, measured from
        neighbour phase evolution without a water/fat decision) before the grid search and
        regularisation, and add it back to the field; a strong B0 gradient otherwise smears
        the coarse levels of the graph cut.
    chunk
        Voxels per block of the grid search (memory: about ``chunk x 4 x n_psi x n_R2*``
        bytes).
    """
    signal, mask, voxel_size, spatial_shape = _echo_volume(signal, echo_times, mask,
                                                           voxel_size, b0_tesla)
    model = get_fat_model(fat_model)
    sign_check = check_phase_sign(signal, echo_times, mask, b0_tesla=b0_tesla,
                                  fat_model=model, water_ppm=water_ppm,
                                  phase_sign=phase_sign, r2star_max=r2star_max)
    phase_sign = resolve_phase_sign(phase_sign, sign_check)
    data, times, mask = _check_inputs(signal, echo_times, mask, b0_tesla, phase_sign)
    sizes = fieldmap._check_voxel_size(voxel_size)
    if smoothness < 0:
        raise ValueError(f"smoothness must be >= 0, got {smoothness}.")
    if not 1 <= int(n_candidates) <= 16:
        raise ValueError(f"n_candidates must be 1-16, got {n_candidates}.")
    if regularization not in REGULARIZATIONS:
        raise ValueError(f"regularization must be one of {list(REGULARIZATIONS)}, got "
                         f"{regularization!r}.")
    if int(max_iter) < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}.")
    c = fat_signal(times, b0_tesla, model, water_ppm=water_ppm)
    freqs = fat_frequencies_hz(model, b0_tesla, water_ppm=water_ppm)
    fat_hz = float(freqs[int(np.argmax(model.amplitude))])
    psis, period = psi_grid(times, step_hz=psi_step_hz)
    r2s = default_r2star_grid(r2star_max)
    shape = mask.shape
    parameters = {
        "FatModel": model.name, "FatPeaksPpm": list(model.ppm),
        "FatPeakAmplitudes": [round(a, 6) for a in model.amplitude],
        "WaterPpm": model.water_ppm if water_ppm is None else float(water_ppm),
        "PhaseSign": int(phase_sign), "PhaseSignCheck": sign_check.message,
        "Regularization": regularization,
        "Smoothness": float(smoothness), "FieldGridStepHz": round(float(psis[1] - psis[0]), 4),
        "FieldGridPeriodHz": round(period, 4), "R2starGridMax": float(r2star_max),
        "Unwrapped": bool(unwrap), "Refined": bool(refine),
    }
    empty = np.zeros(shape, dtype=np.float32)
    if not mask.any():
        raise ValueError("the water-fat mask is empty (or all voxels are non-finite).")
    signal_energy = energy_map(data, mask)  # demodulation keeps it
    trend = (field_trend(data, mask, times, sizes, period, signal_energy) if detrend
             else empty)
    parameters["FieldTrendRangeHz"] = round(float(np.ptp(trend[mask])), 2)
    if trend.any():  # one echo at a time: a single copy of the echoes
        demodulated = np.empty_like(data)
        for n, t in enumerate(times):
            demodulated[..., n] = data[..., n] * np.exp(np.complex64(-1j * _TWO_PI * t) * trend)
        data = demodulated

    components = ndimage.label(mask)  # the mask's parts, for the graph cut and unwrapping
    if regularization == "graphcut":
        field, r2_grid, residual = graphcut_field(
            data, mask, times, c, fat_hz=fat_hz, psis=psis, period=period, r2s=r2s,
            voxel_size=sizes, smoothness=smoothness, n_candidates=n_candidates, chunk=chunk,
            parts=components[0])
    elif regularization == "multires":
        field, r2_grid, residual = regularized_field(
            data, mask, times, c, fat_hz=fat_hz, psis=psis, period=period, r2s=r2s,
            smoothness=smoothness, n_candidates=n_candidates, chunk=chunk)
    else:
        field, r2_grid, residual = empty.copy(), empty.copy(), empty.copy()
        field[mask], r2_grid[mask], residual[mask], _ = _grid_best(data[mask], times, c, psis,
                                                                   r2s, chunk=chunk)

    if regularization == "graphcut":
        # the cut chose unwrapped fields; fix each component's multiple of the period
        if unwrap:
            field = fieldmap._align_components(field, mask, period, sizes, signal_energy,
                                               components)
        else:
            field = np.where(mask, _wrap_hz(field, period), 0).astype(np.float32)
    elif unwrap:
        magnitude = np.sqrt(signal_energy)
        wrapped = (field * np.float32(_TWO_PI / period)).astype(np.float32)
        unwrapped = unwrap_module.unwrap(wrapped, mask, method="region_growing",
                                         magnitude=magnitude, voxel_size=sizes)
        unwrapped = fieldmap._align_components(unwrapped, mask, _TWO_PI, sizes,
                                               signal_energy, components)
        turns = np.round((unwrapped - wrapped) / _TWO_PI)
        field = np.where(mask, field + turns * np.float32(period), 0).astype(np.float32)

    voxels = data[mask]
    psi_v, r2_v, rho_w, rho_f, cost, var_psi, _ = varpro_refine(
        voxels, times, c, field[mask], r2_grid[mask], max_iter=max_iter if refine else 0,
        max_shift_hz=REFINE_MAX_SHIFT_STEPS * float(psis[1] - psis[0]))

    field = empty.copy()
    field[mask] = psi_v + trend[mask]
    r2star = empty.copy()
    r2star[mask] = r2_v
    water = np.zeros(shape, dtype=np.complex64)
    fat = np.zeros(shape, dtype=np.complex64)
    water[mask] = rho_w
    fat[mask] = rho_f
    energy = (np.abs(voxels) ** 2).sum(axis=1)
    residual = empty.copy()
    residual[mask] = np.where(energy > 0, cost / np.maximum(energy, 1e-30), 0)

    # field noise: per-channel noise variance from the residuals (2E real values, 6 real
    # parameters); three echoes leave no residual degrees of freedom
    n_echoes = times.size
    var_map = empty.copy()
    var_map[mask] = np.where(np.isfinite(var_psi), var_psi, 0)
    dof = 2 * n_echoes - 6
    if dof > 0:
        sigma2 = fieldmap._sigma2_from_residuals(cost.astype(np.float32), dof, mask)
        noise = np.sqrt(np.maximum(sigma2 * var_map, 0))
    else:
        sigma2 = fieldmap._sigma2_from_smoothness(field, var_map, mask, None)
        noise = np.sqrt(sigma2 * var_map)
    water_sd, fat_sd = _amplitude_sd(r2_v, times, c,
                                     sigma2[mask] if np.ndim(sigma2) else sigma2)
    pdff = empty.copy()
    pdff[mask] = fat_fraction(rho_w, rho_f, water_sd=water_sd, fat_sd=fat_sd)
    noise = np.where(mask, noise, 0).astype(np.float32)
    noise[mask & ~np.isfinite(var_map)] = np.float32(period)

    # on the field without its trend: a strong gradient is neither a departure from the
    # smooth surroundings nor a neighbour jump
    swaps = detect_swaps(field - trend, mask, fat_hz=fat_hz, weight=np.sqrt(signal_energy),
                         voxel_size=sizes)
    parameters["SwapCheck"] = swaps.verdict
    parameters["SwapFraction"] = round(swaps.fraction, 6)
    maps = {"field_hz": field, "r2star": r2star, "water": water, "fat": fat, "pdff": pdff,
            "noise_hz": noise, "residual": residual, "mask": mask}
    return WaterFatResult(
        **{name: image.reshape(spatial_shape) for name, image in maps.items()}, swaps=swaps,
        fat_model=model, echo_times=times, b0_tesla=float(b0_tesla), parameters=parameters)


#: a voxel's smaller amplitude is signal, not noise, above this many of its standard
#: deviations (per real component; pure noise exceeds 3 in 1.1% of voxels)
SIGNIFICANT_AMPLITUDE_SD = 3.0


def fat_fraction(
    water: np.ndarray,
    fat: np.ndarray,
    *,
    water_sd: np.ndarray | None = None,
    fat_sd: np.ndarray | None = None,
) -> np.ndarray:
    """Proton-density fat fraction (%) from complex water and fat amplitudes.

    ``100 |F| / (|W| + |F|)`` overstates small fractions (and understates large ones): noise
    adds to the smaller amplitude's magnitude. Magnitude discrimination (Liu et al., MRM
    2007;58:354) measures the dominant species against the sum signal instead,
    ``100 (1 - |W| / |W + F|)`` where ``|W| >= |F|`` and ``100 |F| / |W + F|`` elsewhere,
    clipped to [0, 100]; without noise both give the same.

    Magnitude discrimination presumes water and fat in phase. Where they are more than 90
    degrees apart, ``|W + F|`` nearly cancels and it reads 0 or 100: partial volume across a
    field step, or a model that does not fit (ISMRM 2012 case 12: water and fat 150 degrees
    apart, 100% read where the reference is 33%, the plain ratio 58%). ``water_sd``,
    ``fat_sd``: standard deviations of the amplitude estimates (per real component, e.g. from
    the fit's noise); where both are given, such a voxel whose smaller amplitude exceeds
    :data:`SIGNIFICANT_AMPLITUDE_SD` of its standard deviation (signal, not noise, whose
    phase would be random) keeps the plain ratio. Float32, 0 where both amplitudes are 0.
    """
    water_abs, fat_abs = np.abs(water), np.abs(fat)
    total = np.abs(water + fat)
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(water_abs >= fat_abs, 1.0 - water_abs / total, fat_abs / total)
        if water_sd is not None and fat_sd is not None:
            minor_z = np.where(water_abs >= fat_abs, fat_abs / fat_sd, water_abs / water_sd)
            opposed = (np.real(water * np.conj(fat)) < 0) & (minor_z > SIGNIFICANT_AMPLITUDE_SD)
            fraction = np.where(opposed, fat_abs / (water_abs + fat_abs), fraction)
    fraction = np.where(total > 0, np.clip(np.nan_to_num(fraction), 0.0, 1.0), 0.0)
    return (100.0 * fraction).astype(np.float32)


def _amplitude_sd(
    r2star: np.ndarray, times: np.ndarray, c: np.ndarray, sigma2: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """Standard deviations (per real component) of the water and fat amplitudes of the
    linear fit ``s_n = (W + F c_n) exp(-R2* t_n)`` (the field's phase drops out): ``sigma2``
    (per real channel) times the diagonal of ``(A^H A)^-1``; ``r2star`` (N,) 1/s."""
    r2star = np.asarray(r2star, dtype=np.float32)
    water_power = np.zeros(r2star.shape, np.float32)  # sum of exp(-2 R2* t_n)
    fat_power = np.zeros_like(water_power)  # ... times |c_n|^2
    cross = np.zeros(r2star.shape, np.complex64)  # ... times c_n
    for t, c_n in zip(times, c):  # echo by echo: O(N) memory
        decay = np.exp(np.float32(-2.0 * t) * r2star)
        water_power += decay
        fat_power += abs(c_n) ** 2 * decay
        cross += c_n * decay
    det = np.maximum(water_power * fat_power - np.abs(cross) ** 2, 1e-30)
    return np.sqrt(sigma2 * fat_power / det), np.sqrt(sigma2 * water_power / det)


def energy_map(signal: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sum of squared echo magnitudes (float32) inside ``mask``."""
    energy = (np.abs(signal) ** 2).sum(axis=3).astype(np.float32)
    return np.where(mask, energy, 0).astype(np.float32)


def inphase_echoes(
    echo_times: Sequence[float],
    b0_tesla: float,
    fat_model: str | FatModel = "single",
    *,
    water_ppm: float | None = None,
    tolerance: float = 0.2,
) -> list[int]:
    """Indices (0-based) of the echoes where the main fat peak is in phase with water.

    An echo is in phase when ``t f_fat`` is within ``tolerance`` cycles of an integer (a UTE
    first echo near 0 counts). Raises when none is.
    """
    model = get_fat_model(fat_model)
    freqs = fat_frequencies_hz(model, b0_tesla, water_ppm=water_ppm)
    main = abs(float(freqs[int(np.argmax(model.amplitude))]))
    times = np.asarray(echo_times, dtype=float)
    cycles = times * main
    off = np.abs(cycles - np.round(cycles))
    chosen = [int(i) for i in np.nonzero(off <= tolerance)[0]]
    if not chosen:
        raise ValueError(
            f"no echo is in phase with the main fat peak ({main:.0f} Hz at {b0_tesla} T; "
            f"in-phase times are multiples of {1e3 / main:.2f} ms); choose echoes explicitly.")
    return chosen


def inphase_field(
    magnitude: np.ndarray,
    phase: np.ndarray,
    echo_times: Sequence[float],
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_tesla: float,
    echoes: Sequence[int] | None = None,
    fat_model: str | FatModel = "single",
    water_ppm: float | None = None,
    phase_sign: int = 1,
    unwrap_method: str = "region_growing",
) -> tuple[fieldmap.FieldEstimate, list[int]]:
    """Seed-000 baseline: single-frequency field fit on a subset of echoes (no fat model).

    ``echoes``: 0-based indices to use (default :func:`inphase_echoes`). Returns the
    :class:`~qsmprep.recon.fieldmap.FieldEstimate` of the subset (nonlinear complex fit and
    spatial unwrapping) and the indices used. Biased where fat is present (module docstring);
    the bias grows with the fat fraction.
    """
    magnitude = np.asarray(magnitude)
    times = np.asarray(echo_times, dtype=float).ravel()
    if magnitude.ndim != 4 or magnitude.shape[3] != times.size:
        raise ValueError(f"magnitude must be 4D with {times.size} echoes, got {magnitude.shape}.")
    if echoes is None:
        chosen = inphase_echoes(times, b0_tesla, fat_model, water_ppm=water_ppm)
    else:
        chosen = sorted({int(e) for e in echoes})
        if not chosen or chosen[0] < 0 or chosen[-1] >= times.size:
            raise ValueError(f"echo indices {list(echoes)} out of range 0-{times.size - 1}.")
    LOGGER.info("inphase field map from echoes %s (TE %s ms)", [e + 1 for e in chosen],
                [round(1e3 * times[e], 3) for e in chosen])
    estimate = fieldmap.estimate(
        magnitude[..., chosen], np.asarray(phase)[..., chosen], times[chosen], mask,
        voxel_size=voxel_size, method="nlfit", unwrap_method=unwrap_method,
        phase_sign=phase_sign,
    )
    return estimate, chosen
