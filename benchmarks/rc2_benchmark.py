"""Accuracy, run time and memory of every QSM step on the QSM challenge 2.0 (RC2) head phantom.

Usage (from the repository root; needs ``../shared/data/rc2_head_phantom`` or ``--data``)::

    python benchmarks/rc2_benchmark.py --quick    # 1.5 mm, 3 T, SNR 100 (~10 min on 2 cores)
    python benchmarks/rc2_benchmark.py            # 1 mm, 3 T and 7 T, SNR 100 and 40

What it does:

1. Builds the RC2 head phantom with :func:`qsmprep.datasets.rc2.rc2_phantom` (chi per label
   from the RC2 table, a 4 mm shell outside the brain mask that copies the nearest in-mask chi
   so there is no contrast across the mask boundary, air and bone outside the head) and
   simulates 4-echo GRE data (TE 4/12/20/28 ms, B0 along z, smooth phase offset, shim up to
   2nd order) with :func:`qsmprep.simulate.signal.multi_echo_gre` for every (B0, SNR)
   scenario; R2* (3 T values) is scaled by B0 / 3 T. SNR = mean m0 in the brain / noise sigma.
2. Cross-checks the forward model against the independent ``qsm-forward`` package (PyPI,
   ``pip install .[benchmark]``; skipped when absent): the field of the same chi on the same
   periodic grid, and a complete GRE simulation by qsm-forward run through the default
   pipeline.
3. Runs the public step API exactly as the CLI chains it (``workflows/qsm.py``): field
   estimation on the (provided) brain mask -> erosion by ``bfr_erode_mm`` = 3 mm ->
   background removal (V-SHARP radii from ``vsharp_max_radius_mm`` = 12, PDF weighted by the
   field noise) -> noise-weighted inversion with the first-echo magnitude -> mean referencing
   on the background-removal mask. Inversions are run from the TRUE local field (plus
   Gaussian noise of the scenario's field-noise map) with every method in
   ``inversion.METHODS``, and end to end from the simulated phase (every field-map x unwrap x
   background x {tkd, l2, tv} in the first scenario, one-factor-at-a-time around the default
   elsewhere; every other registered inversion on the default upstream).
4. Scores each map on the evaluation mask (the run's own mask within the true brain mask):
   NRMSE and detrended NRMSE of demeaned maps, HFEN, XSIM, deep-GM |1 - slope| (labels 1-7),
   calcification streaking and moment error (QSM challenge 2.0 definitions, see
   ``qsmprep.analysis.metrics``); wall time and peak memory per step (the largest increase
   of the process's resident set during the step, sampled every 5 ms).

The tables go to a marked section of ``benchmarks/RESULTS.md`` (``--no-write`` prints only).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import itertools
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy
import scipy.fft

from qsmprep.analysis import metrics
from qsmprep.config import WorkflowConfig
from qsmprep.recon import background, fieldmap, inversion, reference, unwrap
from qsmprep.recon import mask as mask_core
from qsmprep.recon.dipole import forward_field, hz_to_ppm, padded_shape
from qsmprep.datasets.rc2 import rc2_phantom
from qsmprep.simulate.signal import GreSimulation, multi_echo_gre

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers below
from _measure import Step, _release_freed_memory, load_average, measure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "rc2_head_phantom"
ECHO_TIMES = (0.004, 0.012, 0.020, 0.028)
DEEP_GRAY = (1, 2, 3, 4, 5, 6, 7)
CALCIFICATION = 16
# the CLI defaults, read from qsmprep/config.py so the "default pipeline" is the CLI's
_CLI = WorkflowConfig()
DEFAULT = {"fieldmap": _CLI.fieldmap_method, "unwrap": _CLI.unwrap_method,
           "bfr": _CLI.bfr_method, "inversion": _CLI.inversion_method}
BFR_ERODE_MM = _CLI.bfr_erode_mm
VSHARP_MAX_RADIUS_MM = _CLI.vsharp_max_radius_mm
FACTORIAL_INVERSIONS = ("tkd", "l2", "tv")
FACTORIAL_UNWRAPS = ("region_growing", "laplacian")
CROP_MARGIN = 8  # voxels around the brain kept after the simulation
LOGGER = logging.getLogger("qsmprep.benchmark")


# --------------------------------------------------------------------------------------
# measurement helpers
# --------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------
# phantom, simulation, truth
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Scenario:
    b0_tesla: float
    snr: float

    @property
    def name(self) -> str:
        return f"{self.b0_tesla:g} T, SNR {self.snr:g}"


@dataclasses.dataclass
class Case:
    """A cropped simulation with its truth."""

    scenario: Scenario
    sim: GreSimulation
    mask: np.ndarray  # true brain mask
    chi: np.ndarray  # true chi (ppm) inside the brain mask, 0 outside
    labels: np.ndarray
    voxel_size: tuple[float, float, float]
    sim_seconds: float


def crop_slices(mask: np.ndarray, margin: int = CROP_MARGIN) -> tuple[slice, ...]:
    box = background.mask_bounding_box(mask)
    return tuple(slice(max(b.start - margin, 0), min(b.stop + margin, n))
                 for b, n in zip(box, mask.shape))


def simulate(phantom, scenario: Scenario, seed: int) -> Case:
    """GRE simulation of ``phantom`` for ``scenario``, cropped around the brain."""
    scaled = dataclasses.replace(
        phantom, r2star=(phantom.r2star * np.float32(scenario.b0_tesla / 3.0)))
    start = time.perf_counter()
    sim = multi_echo_gre(scaled, echo_times=ECHO_TIMES, b0_tesla=scenario.b0_tesla,
                         snr=scenario.snr, seed=seed)
    seconds = time.perf_counter() - start
    sl = crop_slices(phantom.brain_mask)
    mask = phantom.brain_mask[sl]
    return Case(scenario, sim.crop(sl), mask, (phantom.chi_ppm[sl] * mask).astype(np.float32),
                phantom.labels[sl], phantom.voxel_size, seconds)


# --------------------------------------------------------------------------------------
# qsm-forward cross-check
# --------------------------------------------------------------------------------------
def _smooth_even(n: int) -> int:
    """Smallest m >= n whose 2 m is a fast real-FFT length (so both grids are 2 m)."""
    m = n
    while padded_shape((2 * m,))[0] != 2 * m:
        m += 1
    return m


def _nrmse_field(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    a = a[mask].astype(np.float64) - a[mask].mean()
    b = b[mask].astype(np.float64) - b[mask].mean()
    return float(100 * np.linalg.norm(a - b) / np.linalg.norm(b))


def forward_crosscheck(phantom, qsm_forward) -> list[dict]:
    """Field of the same chi by qsmprep and qsm-forward on the same 2N periodic grid."""
    rows = []
    vs = phantom.voxel_size
    sl = crop_slices(phantom.brain_mask)
    cases = {
        "local: chi x brain mask (brain crop)": (
            (phantom.chi_ppm * phantom.brain_mask)[sl], phantom.brain_mask[sl]),
        "total: chi - chi_air, whole head": (
            np.pad((phantom.chi_ppm - phantom.background_chi_ppm)[1:-1, 1:-1, 1:-1], 1),
            phantom.brain_mask),
    }
    for name, (source, mask) in cases.items():
        target = [_smooth_even(n) for n in source.shape]
        pad = [(0, t - n) for t, n in zip(target, source.shape)]
        src = np.pad(source.astype(np.float32), pad)
        msk = np.pad(mask, pad)
        ours = measure(lambda: forward_field(src, vs, (0.0, 0.0, 1.0), pad=list(src.shape)))
        # qsm-forward 0.32 pairs voxel_size[0] with the second axis: pass them swapped
        ref = measure(lambda: qsm_forward.generate_field(
            src.astype(np.float64), msk, voxel_size=[vs[1], vs[0], vs[2]], B0_dir=[0, 0, 1]))
        default = forward_field(src, vs, (0.0, 0.0, 1.0))  # qsmprep's default margin
        rows.append({
            "case": name, "grid": "x".join(str(2 * t) for t in target),
            "nrmse": _nrmse_field(ours.value, ref.value, msk),
            "nrmse_default_pad": _nrmse_field(default, ref.value, msk),
            "t_qsmprep": ours.seconds, "t_qsmforward": ref.seconds,
            "mem_qsmprep": ours.mem_mb, "mem_qsmforward": ref.mem_mb,
        })
        del ours, ref, default
    return rows


def qsm_forward_simulation(phantom, scenario: Scenario, qsm_forward, seed: int,
                           sigma: float) -> GreSimulation:
    """The same head simulated by qsm-forward (its field, shim, phase offset, signal, noise).

    ``sigma`` is qsmprep's per-channel noise of the same scenario; qsm-forward's ``peak_snr``
    is set per echo so its noise (max|s| / peak_snr) has that sigma.
    """
    mask = phantom.brain_mask
    chi = phantom.chi_ppm.astype(np.float64)
    vs = phantom.voxel_size
    field = qsm_forward.generate_field(chi, mask, voxel_size=[vs[1], vs[0], vs[2]],
                                       B0_dir=[0, 0, 1])
    _, field, _ = qsm_forward.generate_shimmed_field(field, mask, order=2)
    m0 = phantom.m0.astype(np.float64)
    offset = qsm_forward.generate_phase_offset(m0, mask, m0.shape)
    r2s = phantom.r2star.astype(np.float64) * scenario.b0_tesla / 3.0
    rng = np.random.default_rng(seed)
    sl = crop_slices(mask)
    mags, phases = [], []
    for te in ECHO_TIMES:
        signal = qsm_forward.generate_signal(field, B0=scenario.b0_tesla, TR=1.0, TE=te,
                                             flip_angle=90, phase_offset=offset, R1=1.0,
                                             R2star=r2s, M0=m0)
        # the SPGR factor (1 - exp(-TR R1)) scales the signal: match qsmprep's noise/m0
        scale = 1.0 - math.exp(-1.0)
        peak = float(np.abs(signal).max())
        noisy = qsm_forward.add_noise(signal, peak_snr=peak / (sigma * scale), rng=rng)[sl]
        mags.append(np.abs(noisy).astype(np.float32))
        phases.append(np.angle(noisy).astype(np.float32))
    zeros = np.zeros(mask[sl].shape, dtype=np.float32)
    return GreSimulation(
        magnitude=np.stack(mags, -1), phase=np.stack(phases, -1),
        total_field_ppm=field[sl].astype(np.float32), local_field_ppm=zeros,
        background_field_ppm=zeros, phase_offset=offset[sl].astype(np.float32),
        echo_times=np.asarray(ECHO_TIMES), b0_tesla=scenario.b0_tesla,
        b0_direction=np.array([0.0, 0.0, 1.0]), noise_sigma=sigma * scale)


# --------------------------------------------------------------------------------------
# the step API, as the CLI chains it
# --------------------------------------------------------------------------------------
def _accepts(func: Callable, name: str) -> bool:
    return name in inspect.signature(func).parameters


def inversion_params(method: str, b0_tesla: float, params: dict | None = None) -> dict:
    """The parameters interfaces/inversion.py adds: the phase scale (B0, mean echo time) of
    the methods with nonlinear data terms."""
    out = dict(params or {})
    if (_accepts(inversion.METHODS[method], "phase_scale") and "phase_scale" not in out
            and hasattr(inversion, "phase_scale")):
        out["phase_scale"] = inversion.phase_scale(b0_tesla, float(np.mean(ECHO_TIMES)))
    return out


def invert(case: "Case", local: np.ndarray, mask: np.ndarray, method: str, noise: np.ndarray,
           direction, **params) -> Step:
    """One timed inversion through the step API with the CLI's inputs."""
    kwargs = inversion_params(method, case.scenario.b0_tesla, params)
    magnitude = case.sim.magnitude[..., 0]
    return measure(lambda: inversion.invert(
        local, mask, voxel_size=case.voxel_size, b0_direction=direction, method=method,
        magnitude=magnitude, noise=noise, **kwargs))


def bfr_params(method: str, voxel_size, mask: np.ndarray, noise_hz: np.ndarray) -> dict:
    """The parameters interfaces/background.py passes (V-SHARP radii, PDF noise weight)."""
    func = background.METHODS[method]
    params: dict = {}
    if method == "vsharp" and _accepts(func, "radii_mm"):
        params["radii_mm"] = background.default_radii(voxel_size, VSHARP_MAX_RADIUS_MM)
    if method == "pdf" and _accepts(func, "weight"):
        params["weight"] = background.weight_from_noise(noise_hz, mask)
    return params


class Pipeline:
    """Cached steps of one simulated acquisition (field -> BFR -> inversion -> reference)."""

    def __init__(self, case: Case, sim: GreSimulation | None = None, mask=None):
        self.case = case
        self.sim = sim if sim is not None else case.sim
        self.mask = case.mask if mask is None else mask
        self.vs = case.voxel_size
        self.b0 = self.case.scenario.b0_tesla
        self.direction = tuple(self.sim.b0_direction)
        self.fields: dict[tuple, Step] = {}
        self.locals: dict[tuple, Step] = {}
        self.eroded = mask_core.erode(self.mask, BFR_ERODE_MM, voxel_size=self.vs)
        self.common: np.ndarray | None = None  # set by run_e2e

    def field(self, fm: str, uw: str) -> Step:
        key = (fm, uw)
        if key not in self.fields:
            sim = self.sim
            self.fields[key] = measure(lambda: fieldmap.estimate(
                sim.magnitude, sim.phase, sim.echo_times, self.mask, voxel_size=self.vs,
                method=fm, unwrap_method=uw, phase_sign=sim.phase_sign))
        return self.fields[key]

    def local(self, fm: str, uw: str, bfr: str) -> Step:
        key = (fm, uw, bfr)
        if key not in self.locals:
            est = self.field(fm, uw)
            if est.error:
                self.locals[key] = Step(error="field estimation failed")
            else:
                params = bfr_params(bfr, self.vs, self.eroded, est.value.noise_hz)
                total = hz_to_ppm(est.value.field_hz, self.b0)
                self.locals[key] = measure(lambda: background.remove(
                    total, self.eroded, voxel_size=self.vs, b0_direction=self.direction,
                    method=bfr, **params))
        return self.locals[key]

    def chi(self, fm: str, uw: str, bfr: str, inv: str, **params) -> tuple[Step, np.ndarray]:
        """Referenced chi and its mask; the step holds the inversion time and memory."""
        loc = self.local(fm, uw, bfr)
        if loc.error:
            return Step(error="upstream failed"), self.eroded
        est = self.field(fm, uw).value
        local_ppm, bfr_mask = loc.value
        noise = hz_to_ppm(est.noise_hz, self.b0)
        case = dataclasses.replace(self.case, sim=self.sim)  # this pipeline's magnitude
        step = invert(case, local_ppm, bfr_mask, inv, noise, self.direction, **params)
        if not step.error:
            step.value, _ = reference.reference(step.value, bfr_mask, method="mean")
        return step, bfr_mask


def score(chi: np.ndarray, case: Case, mask: np.ndarray) -> dict[str, float]:
    """Metrics of ``chi`` against the truth on ``mask`` (within the true brain mask)."""
    mask = mask & case.mask
    truth = case.chi
    out = {
        "nrmse": metrics.nrmse(chi, truth, mask),
        "dnrmse": metrics.detrended_nrmse(chi, truth, mask),
        "hfen": metrics.hfen(chi, truth, mask),
        "xsim": metrics.xsim(chi, truth, mask),
        "coverage": 100.0 * mask.sum() / case.mask.sum(),
    }
    rois = [r for r in DEEP_GRAY if np.count_nonzero((case.labels == r) & mask) >= 5]
    slope, _ = metrics.roi_slope(chi, truth, case.labels * mask, rois)
    out["slope_error"] = abs(1.0 - slope)
    calc = (case.labels == CALCIFICATION) & mask
    if calc.any():
        kw = dict(voxel_size=case.voxel_size, mask=mask)
        out["streak"] = metrics.calcification_streaking(chi, truth, calc, **kw)
        out["moment"] = 100.0 * metrics.calcification_moment_error(chi, truth, calc, **kw)
    else:
        out["streak"] = out["moment"] = math.nan
    return out


def noisy_true_local(case: Case, noise_ppm: np.ndarray, seed: int) -> np.ndarray:
    """True local field plus Gaussian noise of the field-noise map (capped at 5x median)."""
    sigma = np.where(case.mask, noise_ppm, 0).astype(np.float32)
    sigma = np.minimum(sigma, 5 * np.median(sigma[case.mask]))
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(sigma.shape, dtype=np.float32) * sigma
    return np.where(case.mask, case.sim.local_field_ppm + noise, 0).astype(np.float32)


# --------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------
def auto_lambda(noise_ppm: np.ndarray, mask: np.ndarray) -> float:
    """TV weight from the field noise: 0.08 x median noise (ppm), the optimum that tv.py's
    comment reports on the label phantom (lam_opt ~ 0.08 x median field noise)."""
    return float(0.08 * np.median(noise_ppm[mask]))


def inversion_variants(noise_ppm: np.ndarray, mask: np.ndarray,
                       methods: list[str]) -> list[tuple[str, str, dict]]:
    """(label, method, params): every method of ``methods`` with its defaults, plus TV with
    the noise-scaled weight."""
    out = [(name, name, {}) for name in methods]
    if "tv" in inversion.METHODS:
        lam = auto_lambda(noise_ppm, mask)
        out.append((f"tv (λ {lam:.1e} = 0.08·median σ)", "tv", {"lam": lam}))
    return out


def lambda_rules() -> tuple[str, ...]:
    """The ``--lambda auto`` rules of the CLI (``inversion.lambda_choice``), if present."""
    try:
        from qsmprep.recon.inversion import lambda_choice  # noqa: F401
    except ImportError:
        return ()
    return ("discrepancy", "lcurve")


def invert_auto(case: Case, local: np.ndarray, mask: np.ndarray, rule: str, noise: np.ndarray,
                direction) -> Step:
    """The default inversion with λ chosen by ``rule`` as ``--lambda auto`` does (the time
    includes the choice); the step's value is ``(chi, lam)``."""
    from qsmprep.recon.inversion import lambda_choice

    method = DEFAULT["inversion"]
    params = inversion_params(method, case.scenario.b0_tesla)
    magnitude = case.sim.magnitude[..., 0]

    def run():
        choice = lambda_choice.choose(local, mask, rule=rule, voxel_size=case.voxel_size,
                                      b0_direction=direction, method=method,
                                      magnitude=magnitude, noise=noise, **params)
        lam = float(choice.lam)
        chi = inversion.invert(local, mask, voxel_size=case.voxel_size, b0_direction=direction,
                               method=method, magnitude=magnitude, noise=noise, lam=lam,
                               **params)
        return chi, lam

    return measure(run)


def run_true_local(case: Case, pipe: Pipeline, seed: int,
                   methods: list[str], rules: tuple[str, ...] = ()) -> list[dict]:
    """Every inversion from the true local field (+ the scenario's noise) on the true mask;
    with ``rules`` also the default inversion with λ chosen by each rule."""
    est = pipe.field(DEFAULT["fieldmap"], DEFAULT["unwrap"])
    noise = hz_to_ppm(est.value.noise_hz, case.scenario.b0_tesla)
    local = noisy_true_local(case, noise, seed)
    rows = []
    for label, method, params in inversion_variants(noise, case.mask, methods):
        LOGGER.info("true local field: %s", label)
        step = invert(case, local, case.mask, method, noise, pipe.direction, **params)
        row = {"inversion": label, "t_inv": step.seconds, "mem_inv": step.mem_mb,
               "error": step.error}
        if not step.error:
            row.update(score(step.value, case, case.mask))
        rows.append(row)
    for rule in rules:
        LOGGER.info("true local field: %s with λ by %s", DEFAULT["inversion"], rule)
        step = invert_auto(case, local, case.mask, rule, noise, pipe.direction)
        row = {"inversion": f"{DEFAULT['inversion']} (λ by {rule})", "t_inv": step.seconds,
               "mem_inv": step.mem_mb, "error": step.error}
        if not step.error:
            chi, lam = step.value
            row["inversion"] = f"{DEFAULT['inversion']} (λ {lam:.1e} by {rule})"
            row.update(score(chi, case, case.mask))
        rows.append(row)
    return rows


def run_sensitivity(case: Case, pipe: Pipeline, seed: int) -> list[dict]:
    """Regularisation sensitivity of TKD, closed-form L2 and TV from the true local field."""
    est = pipe.field(DEFAULT["fieldmap"], DEFAULT["unwrap"])
    noise = hz_to_ppm(est.value.noise_hz, case.scenario.b0_tesla)
    local = noisy_true_local(case, noise, seed)
    lam = auto_lambda(noise, case.mask)
    grid = [("tkd", {"threshold": t}) for t in (0.1, 0.15, 0.19, 0.25)]
    grid += [("l2", {"lam": v}) for v in (0.02, 0.01, 0.005, 0.002, 0.001)]
    grid += [("tv", {"lam": v}) for v in (0.5 * lam, 2e-4)]
    rows = []
    for method, params in grid:
        if method not in inversion.METHODS:
            continue
        step = invert(case, local, case.mask, method, noise, pipe.direction, **params)
        label = f"{method} " + ", ".join(f"{k} {v:.3g}" for k, v in params.items())
        row = {"inversion": label, "t_inv": step.seconds, "mem_inv": step.mem_mb,
               "error": step.error}
        if not step.error:
            row.update(score(step.value, case, case.mask))
        rows.append(row)
    return rows


def e2e_combos(factorial: bool, other_unwraps: bool = True,
               methods: list[str] | None = None) -> list[tuple[str, str, str, str]]:
    """(fieldmap, unwrap, bfr, inversion) combinations to run end to end; unwrappers other
    than region growing and Laplacian (scikit-image's is slow) only with ``other_unwraps``."""
    fms = list(fieldmap.METHODS)
    bfrs = list(background.METHODS)
    invs = list(inversion.METHODS) if methods is None else list(methods)
    d = DEFAULT
    combos: list[tuple[str, str, str, str]] = []
    if factorial:
        uws = [u for u in FACTORIAL_UNWRAPS if u in unwrap.METHODS]
        base_invs = [m for m in FACTORIAL_INVERSIONS if m in inversion.METHODS]
        combos += list(itertools.product(fms, uws, bfrs, base_invs))
    else:
        combos += [(fm, uw, d["bfr"], d["inversion"]) for fm in fms
                   for uw in FACTORIAL_UNWRAPS if uw in unwrap.METHODS]
        combos += [(d["fieldmap"], d["unwrap"], b, d["inversion"]) for b in bfrs]
        combos += [(d["fieldmap"], d["unwrap"], d["bfr"], m)
                   for m in FACTORIAL_INVERSIONS if m in inversion.METHODS]
    # other unwrappers and every other registered inversion on the default upstream
    if other_unwraps:
        combos += [(d["fieldmap"], u, d["bfr"], d["inversion"]) for u in unwrap.METHODS]
    combos += [(d["fieldmap"], d["unwrap"], d["bfr"], m) for m in invs]
    seen, out = set(), []
    for c in combos:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def common_mask(masks: list[np.ndarray], truth: np.ndarray) -> np.ndarray:
    """Voxels every background method keeps (a fair mask to rank them on)."""
    out = truth.copy()
    for m in masks:
        out &= m
    return out


def run_e2e(case: Case, pipe: Pipeline, factorial: bool, other_unwraps: bool,
            methods: list[str], rules: tuple[str, ...] = ()) -> list[dict]:
    rows = []
    combos = e2e_combos(factorial, other_unwraps, methods)
    d = DEFAULT
    masks = [pipe.local(d["fieldmap"], d["unwrap"], b) for b in background.METHODS]
    pipe.common = common_mask([m.value[1] for m in masks if not m.error], case.mask)
    for fm, uw, bfr, inv in combos:
        LOGGER.info("end to end: %s / %s / %s / %s", fm, uw, bfr, inv)
        step, bfr_mask = pipe.chi(fm, uw, bfr, inv)
        rows.append(_e2e_row(case, pipe, (fm, uw, bfr, inv), step, bfr_mask))
    # the default inversion with λ by the CLI's --lambda auto rules
    d = DEFAULT
    loc = pipe.local(d["fieldmap"], d["unwrap"], d["bfr"])
    est = pipe.field(d["fieldmap"], d["unwrap"])
    for rule in rules:
        if loc.error or est.error:
            break
        LOGGER.info("end to end: default with λ by %s", rule)
        local_ppm, bmask = loc.value
        step = invert_auto(case, local_ppm, bmask, rule,
                           hz_to_ppm(est.value.noise_hz, case.scenario.b0_tesla), pipe.direction)
        label = f"{d['inversion']} (λ by {rule})"
        if not step.error:
            chi, lam = step.value
            step.value, _ = reference.reference(chi, bmask, method="mean")
            label = f"{d['inversion']} (λ {lam:.1e} by {rule})"
        rows.append(_e2e_row(case, pipe, (d["fieldmap"], d["unwrap"], d["bfr"], label), step,
                             bmask))
    # TV with the noise-scaled weight on the default upstream
    est = pipe.field(DEFAULT["fieldmap"], DEFAULT["unwrap"])
    if not est.error and "tv" in inversion.METHODS:
        lam = auto_lambda(hz_to_ppm(est.value.noise_hz, case.scenario.b0_tesla), case.mask)
        step, bfr_mask = pipe.chi(DEFAULT["fieldmap"], DEFAULT["unwrap"], DEFAULT["bfr"], "tv",
                                  lam=lam)
        rows.append(_e2e_row(case, pipe, (DEFAULT["fieldmap"], DEFAULT["unwrap"],
                                          DEFAULT["bfr"], f"tv (λ {lam:.1e})"), step,
                             bfr_mask))
    return rows


def _e2e_row(case, pipe, combo, step, bfr_mask) -> dict:
    fm, uw, bfr = combo[:3]
    field, local = pipe.fields.get((fm, uw), Step()), pipe.locals.get((fm, uw, bfr), Step())
    row = {"fieldmap": fm, "unwrap": uw, "bfr": bfr, "inversion": combo[3],
           "t_field": field.seconds, "t_bfr": local.seconds, "t_inv": step.seconds,
           "mem_field": field.mem_mb, "mem_bfr": local.mem_mb, "mem_inv": step.mem_mb,
           "error": step.error or field.error or local.error}
    if not row["error"]:
        row.update(score(step.value, case, bfr_mask))
        common = pipe.common
        if common is not None and (common & bfr_mask).any():
            row["nrmse_common"] = metrics.nrmse(step.value, case.chi, common & bfr_mask)
    return row


def run_auto_mask(case: Case) -> dict:
    """The default pipeline with qsmprep's own magnitude-based brain mask (no provided mask)."""
    mask_step = measure(lambda: mask_core.brain_mask(case.sim.magnitude, voxel_size=case.voxel_size))
    if mask_step.error:
        return {"inversion": "auto mask", "error": mask_step.error}
    pipe = Pipeline(case, mask=mask_step.value)
    step, bfr_mask = pipe.chi(*DEFAULT.values())
    row = _e2e_row(case, pipe, tuple(DEFAULT.values()), step, bfr_mask)
    row["mask_voxels"] = int(mask_step.value.sum())
    return row


def run_diagnosis(case: Case, pipe: Pipeline, seed: int) -> list[dict]:
    """Where the end-to-end error comes from: the default TV from progressively less ideal
    inputs, all scored on the default pipeline's evaluation mask."""
    d = DEFAULT
    loc = pipe.local(d["fieldmap"], d["unwrap"], d["bfr"])
    est = pipe.field(d["fieldmap"], d["unwrap"])
    if loc.error or est.error:
        return []
    _, eval_mask = loc.value
    b0 = case.scenario.b0_tesla
    noise = hz_to_ppm(est.value.noise_hz, b0)
    vs, direction = case.voxel_size, pipe.direction
    noisy_local = noisy_true_local(case, noise, seed)
    rng = np.random.default_rng(seed + 1)
    sigma = np.minimum(np.where(case.mask, noise, 0), 5 * np.median(noise[case.mask]))
    noisy_total = np.where(case.mask, case.sim.total_field_ppm
                           + rng.standard_normal(sigma.shape).astype(np.float32) * sigma, 0)

    def tv(field, mask, label):
        step = invert(case, field, mask, d["inversion"], noise, direction)
        row = {"input": label, "t_inv": step.seconds, "error": step.error}
        if not step.error:
            row.update(score(step.value, case, eval_mask))
        return row

    rows = [
        tv(case.sim.local_field_ppm * case.mask, case.mask,
           "true local field, noise-free, true mask"),
        tv(noisy_local, case.mask, "true local field + noise, true mask"),
        tv(noisy_local, eval_mask, "true local field + noise, BFR mask"),
    ]
    for label, total in (("true total field, noise-free", case.sim.total_field_ppm),
                         ("true total field + noise", noisy_total),
                         ("estimated total field (default pipeline)",
                          hz_to_ppm(est.value.field_hz, b0))):
        params = bfr_params(d["bfr"], vs, pipe.eroded, est.value.noise_hz)
        bfr = measure(lambda: background.remove(total, pipe.eroded, voxel_size=vs,
                                                b0_direction=direction, method=d["bfr"],
                                                **params))
        if bfr.error:
            rows.append({"input": f"{label} -> {d['bfr']}", "error": bfr.error})
            continue
        rows.append(tv(bfr.value[0], bfr.value[1], f"{label} -> {d['bfr']}"))
    return rows


def run_bfr_isolated(case: Case, pipe: Pipeline) -> list[dict]:
    """Every background method on the TRUE (noise-free) total field, then the default TV;
    scored on each method's own mask and on the common default mask."""
    d = DEFAULT
    est = pipe.field(d["fieldmap"], d["unwrap"])
    noise = hz_to_ppm(est.value.noise_hz, case.scenario.b0_tesla)
    rows, maps = [], []
    for bfr in background.METHODS:
        params = bfr_params(bfr, case.voxel_size, pipe.eroded, est.value.noise_hz)
        step = measure(lambda: background.remove(
            case.sim.total_field_ppm, pipe.eroded, voxel_size=case.voxel_size,
            b0_direction=pipe.direction, method=bfr, **params))
        row = {"bfr": bfr, "t_bfr": step.seconds, "mem_bfr": step.mem_mb, "error": step.error}
        if not step.error:
            local, bmask = step.value
            # local-field error against the field of the sources inside the BFR mask
            ideal = forward_field((case.chi - case.chi[bmask].mean()) * bmask, case.voxel_size,
                                  pipe.direction, pad=list(bmask.shape))
            row["field_nrmse"] = _nrmse_field(local, ideal, bmask)
            inv = invert(case, local, bmask, d["inversion"], noise, pipe.direction)
            if inv.error:
                row["error"] = inv.error
            else:
                row.update(score(inv.value, case, bmask))
                maps.append((row, inv.value, bmask))
        rows.append(row)
    common = common_mask([m for _, _, m in maps], case.mask)
    for row, chi, _ in maps:
        row["nrmse_common"] = metrics.nrmse(chi, case.chi, common)
        row["xsim_common"] = metrics.xsim(chi, case.chi, common)
    if maps:
        rows.append({"bfr": "(common mask)", "coverage_common":
                     100.0 * common.sum() / case.mask.sum()})
    return rows


def run_timing(case: Case, pipe: Pipeline, repeats: int = 3) -> list[dict]:
    """Best-of-``repeats`` wall time of the default pipeline's steps."""
    d = DEFAULT
    sim, vs, b0 = case.sim, case.voxel_size, case.scenario.b0_tesla
    est = pipe.field(d["fieldmap"], d["unwrap"]).value
    params = bfr_params(d["bfr"], vs, pipe.eroded, est.noise_hz)
    total = hz_to_ppm(est.field_hz, b0)
    local, bmask = pipe.local(d["fieldmap"], d["unwrap"], d["bfr"]).value
    noise = hz_to_ppm(est.noise_hz, b0)
    steps = {
        f"field estimation ({d['fieldmap']}, {d['unwrap']}, {len(ECHO_TIMES)} echoes)":
            lambda: fieldmap.estimate(sim.magnitude, sim.phase, sim.echo_times, case.mask,
                                      voxel_size=vs, method=d["fieldmap"],
                                      unwrap_method=d["unwrap"]),
        f"mask erosion {BFR_ERODE_MM:g} mm": lambda: mask_core.erode(case.mask, BFR_ERODE_MM,
                                                                    voxel_size=vs),
        f"background removal ({d['bfr']})": lambda: background.remove(
            total, pipe.eroded, voxel_size=vs, b0_direction=pipe.direction, method=d["bfr"],
            **params),
        f"dipole inversion ({d['inversion']})": lambda: inversion.invert(
            local, bmask, voxel_size=vs, b0_direction=pipe.direction, method=d["inversion"],
            magnitude=sim.magnitude[..., 0], noise=noise,
            **inversion_params(d["inversion"], b0)),
    }
    rows = []
    for name, fn in steps.items():
        runs = [measure(fn) for _ in range(repeats)]
        rows.append({"step": name, "best": min(r.seconds for r in runs),
                     "all": [r.seconds for r in runs], "mem": max(r.mem_mb for r in runs)})
    return rows


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
def _f(value, fmt="{:.1f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt.format(value)


METRIC_HEAD = "NRMSE % | dNRMSE % | HFEN % | XSIM | DGM \\|1−slope\\| | calc. streak | calc. moment err % | coverage %"


def _metric_cells(row: dict) -> str:
    if row.get("error"):
        return f"failed: {row['error']} |" + " |" * 7
    return " | ".join([
        _f(row["nrmse"]), _f(row["dnrmse"]), _f(row["hfen"]), _f(row["xsim"], "{:.3f}"),
        _f(row["slope_error"], "{:.3f}"), _f(row["streak"], "{:.3f}"), _f(row["moment"]),
        _f(row["coverage"], "{:.0f}")])


def render(report: dict) -> str:
    """Markdown of the whole report."""
    lines = []
    out = lines.append
    meta = report["meta"]
    out(f"Command: `{meta['command']}` — {meta['date']}, {meta['machine']}, "
        f"{meta['threads']} FFT/numba threads; load average at start {meta['load_start']}, "
        f"at end {meta['load_end']}; total {meta['total_minutes']:.1f} min "
        f"({meta['done']}).")
    out("")
    out(f"Phantom: RC2 labels at {meta['voxel_mm']:g} mm ({meta['shape']}), brain mask "
        f"{meta['brain_voxels']} voxels, calcification {meta['calc_voxels']} voxels; crop to "
        f"the brain box + {CROP_MARGIN} voxels after simulation ({meta['crop_shape']}). "
        f"Registered methods: fieldmap {meta['registry']['fieldmap']}, unwrap "
        f"{meta['registry']['unwrap']}, background {meta['registry']['background']}, "
        f"inversion {meta['registry']['inversion']}.")
    out("")
    out("Metrics on the evaluation mask (the run's mask within the true brain mask; "
        "'coverage' = its share of the brain mask): NRMSE/HFEN of maps demeaned in the mask, "
        "dNRMSE after the least-squares linear fit of the truth on the map, XSIM, deep-GM "
        "|1 − slope| (labels 1–7), calcification streaking (residual SD in the 3–7 mm box "
        "rim / |mean χ of the segmented calcification|) and moment error (relative, %). "
        "Times: wall seconds of one call; memory: peak RSS increase of the process during "
        "the step (MB, sampled every 5 ms, with glibc set to return freed blocks >= 128 kB "
        "to the OS so the resident set follows live memory; includes FFT and numba "
        "buffers; the step's inputs are not counted).")
    out("")
    xc = report.get("crosscheck")
    if xc:
        out("### Forward model vs qsm-forward")
        out("")
        out("Same χ, B0 along z, both on the same 2N periodic grid (zero padding), fields "
            "demeaned in the brain mask (qsm-forward's D(0) = 1/3 and its padding with the "
            "last voxel's χ only add a constant), qsm-forward given the voxel sizes of its "
            "first two axes swapped (its v0.32 k-grid pairs `voxel_size[0]` with axis 1).")
        out("")
        out("| χ | grid | NRMSE % (brain mask) | NRMSE % with qsmprep's default margin (N/2) | "
            "time qsmprep / qsm-forward s | memory qsmprep / qsm-forward MB |")
        out("|---|---|---|---|---|---|")
        for r in xc:
            out(f"| {r['case']} | {r['grid']} | {r['nrmse']:.2e} | {r['nrmse_default_pad']:.2f} "
                f"| {r['t_qsmprep']:.1f} / {r['t_qsmforward']:.1f} | "
                f"{r['mem_qsmprep']:.0f} / {r['mem_qsmforward']:.0f} |")
        out("")
    elif report.get("crosscheck_skipped"):
        out(f"Forward cross-check skipped: {report['crosscheck_skipped']}")
        out("")
    if report.get("skipped"):
        out("After the first scenario, inversions that failed or took longer than `--slow` "
            "from the true local field there are not repeated: "
            + ", ".join(f"{m} ({why})" for m, why in report["skipped"].items())
            + " (`--all-methods` runs them everywhere).")
        out("")
    for sc in report["scenarios"]:
        out(f"### {sc['name']}")
        out("")
        out(f"Simulation {sc['sim_seconds']:.1f} s; load average {sc['load']}; median field "
            f"noise {sc['median_noise_ppm']:.2e} ppm ({sc['median_noise_hz']:.3f} Hz).")
        out("")
        out("**Dipole inversion from the true local field** (+ Gaussian noise of the "
            "scenario's field-noise map, true brain mask, noise-weighted, method defaults):")
        out("")
        out(f"| inversion | {METRIC_HEAD} | time s | memory MB |")
        out("|---|" + "---|" * 10)
        for r in sc["true_local"]:
            out(f"| {r['inversion']} | {_metric_cells(r)} | {_f(r['t_inv'])} | "
                f"{_f(r['mem_inv'], '{:.0f}')} |")
        out("")
        out("**End to end from the simulated phase** (provided true brain mask; erosion "
            f"{BFR_ERODE_MM:g} mm; the CLI default is {' → '.join(DEFAULT.values())}; times "
            "and memory per step: field estimation / background removal / inversion):")
        out("")
        cov = sc.get("common_coverage")
        out(f"| fieldmap | unwrap | bfr | inversion | {METRIC_HEAD} | NRMSE % on the common "
            f"mask ({_f(cov, '{:.0f}')} %) | time s | memory MB |")
        out("|---|---|---|---|" + "---|" * 11)
        rows = sc["e2e"] + ([sc["auto_mask"]] if sc.get("auto_mask") else [])
        for r in rows:
            name = r["inversion"] + (" (qsmprep's own brain mask, "
                                     f"{r.get('mask_voxels', 0)} voxels)" if "mask_voxels" in r
                                     else "")
            out(f"| {r.get('fieldmap', '')} | {r.get('unwrap', '')} | {r.get('bfr', '')} | {name} | "
                f"{_metric_cells(r)} | {_f(r.get('nrmse_common'))} | {_f(r.get('t_field'))} / "
                f"{_f(r.get('t_bfr'))} / "
                f"{_f(r.get('t_inv'))} | {_f(r.get('mem_field'), '{:.0f}')} / "
                f"{_f(r.get('mem_bfr'), '{:.0f}')} / {_f(r.get('mem_inv'), '{:.0f}')} |")
        out("")
        if sc.get("diagnosis"):
            out("**Where the end-to-end error comes from** (default inversion, all scored on "
                "the default pipeline's evaluation mask):")
            out("")
            out(f"| input to the inversion | {METRIC_HEAD} | inversion s |")
            out("|---|" + "---|" * 9)
            for r in sc["diagnosis"]:
                out(f"| {r['input']} | {_metric_cells(r)} | {_f(r.get('t_inv'))} |")
            out("")
        if sc.get("bfr_isolated"):
            out("**Background removal alone**: each method on the true noise-free total field "
                "(3 mm eroded mask), then the default inversion; 'field NRMSE' against the "
                "field of the (demeaned) sources inside the method's mask:")
            out("")
            common = next((r for r in sc["bfr_isolated"] if r["bfr"] == "(common mask)"), {})
            out(f"| bfr | field NRMSE % | {METRIC_HEAD} | NRMSE % / XSIM on the common mask "
                f"({_f(common.get('coverage_common'), '{:.0f}')} %) | bfr s | bfr MB |")
            out("|---|---|" + "---|" * 11)
            for r in sc["bfr_isolated"]:
                if r is common:
                    continue
                out(f"| {r['bfr']} | {_f(r.get('field_nrmse'))} | {_metric_cells(r)} | "
                    f"{_f(r.get('nrmse_common'))} / {_f(r.get('xsim_common'), '{:.3f}')} | "
                    f"{_f(r['t_bfr'])} | {_f(r['mem_bfr'], '{:.0f}')} |")
            out("")
        if sc.get("sensitivity"):
            out("**Regularisation sensitivity from the true local field** (as above; λ of TV "
                "in ppm, of L2 in mm²):")
            out("")
            out(f"| inversion | {METRIC_HEAD} | time s |")
            out("|---|" + "---|" * 9)
            for r in sc["sensitivity"]:
                out(f"| {r['inversion']} | {_metric_cells(r)} | {_f(r['t_inv'])} |")
            out("")
        if sc.get("qsm_forward_e2e"):
            r = sc["qsm_forward_e2e"]
            out("**The same head simulated by qsm-forward** (its field with its padding and "
                "D(0), 2nd-order shim, its phase offset and signal model, noise of the same "
                "sigma), default pipeline:")
            out("")
            out(f"| data | {METRIC_HEAD} | time s |")
            out("|---|" + "---|" * 9)
            own = next((x for x in sc["e2e"] if (x["fieldmap"], x["unwrap"], x["bfr"],
                                                 x["inversion"]) == tuple(DEFAULT.values())),
                       None)
            if own:
                out(f"| qsmprep simulation | {_metric_cells(own)} | "
                    f"{_f(own['t_field'])} / {_f(own['t_bfr'])} / {_f(own['t_inv'])} |")
            out(f"| qsm-forward simulation (sim {r.get('sim_seconds', math.nan):.0f} s) | "
                f"{_metric_cells(r)} | {_f(r.get('t_field'))} / {_f(r.get('t_bfr'))} / "
                f"{_f(r.get('t_inv'))} |")
            out("")
        if sc.get("timing"):
            out("**Default pipeline step times, best of 3** (same process, load as above):")
            out("")
            out("| step | best s | all s | peak memory MB |")
            out("|---|---|---|---|")
            for r in sc["timing"]:
                out(f"| {r['step']} | {r['best']:.2f} | "
                    f"{', '.join(f'{s:.2f}' for s in r['all'])} | {r['mem']:.0f} |")
            out("")
    return "\n".join(lines)


def write_results(markdown: str, quick: bool, path: Path, settings: str) -> None:
    """Replace (or append) this benchmark's marked section (quick or full) of RESULTS.md."""
    tag = "quick" if quick else "full"
    start, end = f"<!-- rc2_benchmark:{tag}:start -->", f"<!-- rc2_benchmark:{tag}:end -->"
    title = ("## RC2 head phantom: every method, end to end and from the true local field "
             f"({tag}: {settings})")
    block = f"{start}\n{title}\n\n{markdown}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


# --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1.5 mm, 3 T, SNR 100 only (for iteration)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="RC2 phantom folder (SegmentedModel, BrainMask, SusceptibilityValues)")
    parser.add_argument("--voxel", type=float, help="voxel size (mm) overriding the mode's")
    parser.add_argument("--b0", type=float, nargs="+", help="field strengths (T)")
    parser.add_argument("--snr", type=float, nargs="+", help="SNRs")
    parser.add_argument("--factorial", choices=("first", "all", "none"), default="first",
                        help="full fieldmap x unwrap x bfr x {tkd,l2,tv} in the first scenario "
                             "(default), every scenario or none (one factor at a time)")
    parser.add_argument("--inversions", nargs="+",
                        help="inversion methods to run (default: every registered one)")
    parser.add_argument("--slow", type=float, default=60.0,
                        help="after the first scenario, skip inversions that took longer (s) "
                             "from the true local field there, except the default (60)")
    parser.add_argument("--all-methods", action="store_true",
                        help="run every inversion in every scenario (no --slow skipping)")
    parser.add_argument("--threads", type=int, default=2, help="FFT/numba threads (2)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-qsm-forward", action="store_true", help="skip the cross-check")
    parser.add_argument("--json", type=Path, help="also write the raw numbers as JSON")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("qsmprep").setLevel(logging.WARNING)
    LOGGER.setLevel(logging.INFO)

    args.voxel = args.voxel or (1.5 if args.quick else 1.0)
    args.b0_list = args.b0 or ([3.0] if args.quick else [3.0, 7.0])
    args.snr_list = args.snr or ([100.0] if args.quick else [100.0, 40.0])
    with scipy.fft.set_workers(args.threads):  # FFT workers for every step
        run_benchmark(args)


def run_benchmark(args: argparse.Namespace) -> None:
    """Every scenario of ``args`` (parsed by ``main``), written to RESULTS.md."""
    voxel, b0s, snrs = args.voxel, args.b0_list, args.snr_list
    try:
        import numba

        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # pragma: no cover
        pass

    _release_freed_memory()
    t0 = time.perf_counter()
    load_start = load_average()
    phantom = rc2_phantom(args.data, voxel_size=(voxel,) * 3)
    sl = crop_slices(phantom.brain_mask)
    report: dict[str, Any] = {"scenarios": []}
    try:
        import qsm_forward
    except ImportError:
        qsm_forward = None
    if args.no_qsm_forward or qsm_forward is None:
        report["crosscheck_skipped"] = ("--no-qsm-forward" if args.no_qsm_forward else
                                        "qsm-forward is not installed (pip install .[benchmark])")
        qsm_forward = None
    else:
        LOGGER.info("forward-model cross-check with qsm-forward")
        report["crosscheck"] = forward_crosscheck(phantom, qsm_forward)

    scenarios = [Scenario(b, s) for b in b0s for s in snrs]
    methods = [m for m in (args.inversions or inversion.METHODS) if m in inversion.METHODS]
    if DEFAULT["inversion"] not in methods:
        methods.insert(0, DEFAULT["inversion"])
    report["skipped"] = {}
    for index, scenario in enumerate(scenarios):
        LOGGER.info("scenario %s", scenario.name)
        first = index == 0
        case = simulate(phantom, scenario, args.seed)
        pipe = Pipeline(case)
        est = pipe.field(DEFAULT["fieldmap"], DEFAULT["unwrap"])
        if est.error:
            raise SystemExit(f"default field estimation failed: {est.error}")
        noise_ppm = hz_to_ppm(est.value.noise_hz, scenario.b0_tesla)
        sc: dict[str, Any] = {
            "name": scenario.name, "b0": scenario.b0_tesla, "snr": scenario.snr,
            "sim_seconds": case.sim_seconds,
            "median_noise_ppm": float(np.median(noise_ppm[case.mask])),
            "median_noise_hz": float(np.median(est.value.noise_hz[case.mask])),
        }
        rules = lambda_rules() if first else ()
        sc["true_local"] = run_true_local(case, pipe, args.seed, methods, rules)
        factorial = args.factorial == "all" or (args.factorial == "first" and first)
        sc["e2e"] = run_e2e(case, pipe, factorial, other_unwraps=first, methods=methods,
                            rules=rules)
        if first and not args.all_methods:
            slow = {r["inversion"]: r["t_inv"] for r in sc["true_local"]
                    if r["inversion"] in methods and r["inversion"] != DEFAULT["inversion"]
                    and (r.get("error") or r["t_inv"] > args.slow)}
            report["skipped"] = {m: ("failed" if not math.isfinite(t) else f"{t:.0f} s")
                                 for m, t in slow.items()}
            methods = [m for m in methods if m not in slow]
        if pipe.common is not None:
            sc["common_coverage"] = 100.0 * pipe.common.sum() / case.mask.sum()
        LOGGER.info("default pipeline with qsmprep's own brain mask")
        sc["auto_mask"] = run_auto_mask(case)
        if first:
            LOGGER.info("diagnosis")
            sc["diagnosis"] = run_diagnosis(case, pipe, args.seed)
            LOGGER.info("background removal alone")
            sc["bfr_isolated"] = run_bfr_isolated(case, pipe)
            LOGGER.info("regularisation sensitivity")
            sc["sensitivity"] = run_sensitivity(case, pipe, args.seed)
            LOGGER.info("best-of-3 timing")
            sc["timing"] = run_timing(case, pipe)
            if qsm_forward is not None:
                LOGGER.info("qsm-forward simulation")
                sim_step = measure(lambda: qsm_forward_simulation(
                    phantom, scenario, qsm_forward, args.seed, case.sim.noise_sigma))
                if sim_step.error:
                    sc["qsm_forward_e2e"] = {"error": sim_step.error}
                else:
                    other = Pipeline(case, sim=sim_step.value)
                    step, bmask = other.chi(*DEFAULT.values())
                    row = _e2e_row(case, other, tuple(DEFAULT.values()), step, bmask)
                    row["sim_seconds"] = sim_step.seconds
                    sc["qsm_forward_e2e"] = row
        sc["load"] = load_average()
        report["scenarios"].append(sc)
        case = pipe = None  # free the arrays before the next scenario
        _finish(report, args, phantom, sl, voxel, t0, load_start,
                done=f"{index + 1} of {len(scenarios)} scenarios")


def _reproducible(argv: list[str]) -> list[str]:
    """The command-line options that change the numbers (not where they are written)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--json", "--results"):
            skip = True
            continue
        if arg == "--no-write" or arg.startswith(("--json=", "--results=")):
            continue
        out.append(arg)
    return out


def _finish(report, args, phantom, sl, voxel, t0, load_start, done: str) -> None:
    """Render the report so far; write it to RESULTS.md / JSON unless told not to."""
    report["meta"] = {
        "command": " ".join(["python benchmarks/rc2_benchmark.py", *_reproducible(sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python "
                   f"{platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}",
        "threads": args.threads, "load_start": load_start, "load_end": load_average(),
        "total_minutes": (time.perf_counter() - t0) / 60, "voxel_mm": voxel,
        "shape": "×".join(map(str, phantom.shape)),
        "crop_shape": "×".join(str(s.stop - s.start) for s in sl),
        "brain_voxels": int(phantom.brain_mask.sum()),
        "calc_voxels": int((phantom.labels == CALCIFICATION).sum()),
        "registry": {"fieldmap": list(fieldmap.METHODS), "unwrap": list(unwrap.METHODS),
                     "background": list(background.METHODS),
                     "inversion": list(inversion.METHODS)},
    }
    report["meta"]["done"] = done
    markdown = render(report)
    print(markdown, flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))
    if not args.no_write:
        settings = (f"{voxel:g} mm, {' and '.join(f'{b:g} T' for b in args.b0_list)}, SNR "
                    f"{' and '.join(f'{v:g}' for v in args.snr_list)}")
        write_results(markdown, args.quick, args.results, settings)


if __name__ == "__main__":
    main()
