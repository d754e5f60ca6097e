"""Bipolar readout phase: estimate against a known phase, correction, real data verdicts."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
from conftest import shared_data
from test_waterfat import B0, UNIFORM_TE, _ismrm_case, _run, _volume

from qsmprep.recon import bipolar
from qsmprep.recon import waterfat as wf

VOXEL = (2.0, 2.0, 2.0)
NON_UNIFORM_TE = np.array([1.2, 2.0, 3.1, 4.0, 5.3, 6.1, 7.4, 8.2]) * 1e-3


def _with_bipolar_phase(signal, offset, gradient):
    """``signal`` with the 2nd, 4th, ... echoes turned by offset + gradient . (r - centre)."""
    truth = bipolar.BipolarEstimate(offset, gradient, (47.0, 47.0, 9.0), 0.0, 0.0, True, "")
    phi = truth.phase(signal.shape[:3], VOXEL)
    turned = signal.copy()
    turned[..., 1::2] *= np.exp(1j * phi)[..., None]
    return turned.astype(np.complex64), phi


def _phase_error(estimate, phi, mask, echo_times):
    """Largest error of the estimated phase in the mask (rad), modulo the phase's ambiguity
    (pi for uniform echo spacing: a field shift of half the echo rate)."""
    period = np.pi if np.allclose(np.diff(echo_times), np.diff(echo_times)[0]) else 2 * np.pi
    error = estimate.phase(mask.shape, VOXEL) - phi
    error -= period * np.round(error / period)
    return float(np.abs(error[mask]).max())


@pytest.mark.parametrize("echo_times, offset, gradient", [
    (UNIFORM_TE, 0.4, (0.02, 0.0, 0.0)),
    (NON_UNIFORM_TE, -1.0, (0.0, -0.015, 0.01)),
])
@pytest.mark.parametrize("sign", [1, -1])
def test_bipolar_phase_is_estimated_and_removed(echo_times, offset, gradient, sign):
    signal, mask, field, pdff, _ = _volume(echo_times)
    turned, phi = _with_bipolar_phase(signal, offset, gradient)
    data = turned if sign == 1 else np.conj(turned)
    estimate = bipolar.estimate_bipolar_phase(data, echo_times, mask, voxel_size=VOXEL,
                                              b0_tesla=B0, fat_model="ismrm", phase_sign=sign)
    assert estimate.applied and estimate.gain > 0.5, estimate.message
    assert _phase_error(estimate, sign * phi, mask, echo_times) < 0.03
    before = _run(data, echo_times, mask, phase_sign=sign)
    corrected = bipolar.correct_bipolar_phase(np.angle(data), estimate, VOXEL)
    after = _run(wf.as_complex(np.abs(data), corrected), echo_times, mask, phase_sign=sign)
    # the error the step removes: 7.7 / 32 points (uniform / non-uniform echoes; the plain
    # 100 |F| / (|W| + |F|) gave 15 / 33, magnitude discrimination halves the first)
    assert np.mean(np.abs(before.pdff - pdff)[mask]) > 5
    assert np.mean(np.abs(after.pdff - pdff)[mask]) < 2.0
    error = after.field_hz - field
    error -= np.median(error[mask])  # uniform spacing: phi + pi shifts the field uniformly
    assert np.median(np.abs(error[mask])) < 1.0


def test_monopolar_data_are_left_alone():
    signal, mask, *_ = _volume(UNIFORM_TE)
    estimate = bipolar.estimate_bipolar_phase(signal, UNIFORM_TE, mask, voxel_size=VOXEL,
                                              b0_tesla=B0, fat_model="ismrm")
    assert not estimate.applied and estimate.gain < 0.05, estimate.message
    phase = np.angle(signal).astype(np.float32)
    assert bipolar.correct_bipolar_phase(phase, estimate, VOXEL) is phase
    forced = bipolar.estimate_bipolar_phase(signal, UNIFORM_TE, mask, voxel_size=VOXEL,
                                            b0_tesla=B0, fat_model="ismrm", mode="bipolar")
    assert forced.applied
    assert np.abs(forced.phase(mask.shape, VOXEL)[mask]).max() < 0.03
    assert forced.metadata()["ReadoutPolarityCorrection"]["Applied"] is True


def test_water_only_model():
    """Brain-like data (no fat) with the water-only model."""
    rng = np.random.default_rng(3)
    shape = (40, 40, 12)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    mask = x ** 2 + y ** 2 + z ** 2 < 0.8
    te = 4e-3 + 5e-3 * np.arange(5)
    field = 30 * x - 20 * y * z + 10 * x ** 2
    r2 = 20 + 10 * (y > 0)
    signal = np.exp((-r2[..., None] + 2j * np.pi * field[..., None]) * te + 0.5j)
    signal = np.where(mask[..., None], signal, 0)
    signal = signal + 0.02 * (rng.standard_normal(signal.shape)
                              + 1j * rng.standard_normal(signal.shape))
    turned, phi = _with_bipolar_phase(signal, 0.3, (0.0, 0.01, -0.02))
    estimate = bipolar.estimate_bipolar_phase(turned, te, mask, voxel_size=VOXEL)
    assert estimate.applied, estimate.message
    assert _phase_error(estimate, phi, mask, te) < 0.03


def test_bad_inputs_are_refused():
    signal, mask, *_ = _volume(UNIFORM_TE[:3])
    with pytest.raises(ValueError, match=">= 4 echoes"):
        bipolar.estimate_bipolar_phase(signal, UNIFORM_TE[:3], mask, voxel_size=VOXEL)
    signal, mask, *_ = _volume(UNIFORM_TE)
    with pytest.raises(ValueError, match="mode"):
        bipolar.estimate_bipolar_phase(signal, UNIFORM_TE, mask, voxel_size=VOXEL,
                                       mode="monopolar")
    with pytest.raises(ValueError, match="voxels with signal"):
        bipolar.estimate_bipolar_phase(signal, UNIFORM_TE, np.zeros_like(mask),
                                       voxel_size=VOXEL)


def _bydder_slice(name: str):
    """A 2D multi-echo slice of marcsous/pdff (skips where the shared data are absent)."""
    path = shared_data("fatwater_slices") / f"{name}.mat"
    if not path.exists():
        pytest.skip(f"{path} not available")
    data = scipy.io.loadmat(str(path))
    signal = data["data"].astype(np.complex64)[:, :, None, :]
    echo_times = np.ravel(data["te"]).astype(float)
    energy = np.sqrt((np.abs(signal) ** 2).sum(axis=-1))
    mask = energy > 0.1 * np.percentile(energy, 99)
    return signal, echo_times, float(np.ravel(data["Tesla"])[0]), mask


@pytest.mark.parametrize("name, sign, bipolar_readout", [
    ("phantom_16echo_bipolar", 1, True),
    ("liver_12echo_bipolar", 1, True),
    ("PHANTOM_NDB_OILS", -1, False),
    ("invivo", 1, False),
])
def test_public_multi_echo_slices(name, sign, bipolar_readout, record_property):
    """Bipolar data are found and corrected; monopolar or nearly error-free data are left
    alone."""
    signal, echo_times, b0, mask = _bydder_slice(name)
    estimate = bipolar.estimate_bipolar_phase(signal, echo_times, mask, voxel_size=(1.5, 1.5, 5),
                                              b0_tesla=b0, fat_model="ismrm", phase_sign=sign)
    record_property("gain", round(estimate.gain, 3))
    assert estimate.applied == bipolar_readout, estimate.message
    assert estimate.gain > 0.5 if bipolar_readout else estimate.gain < 0.1


def test_bipolar_phantom_agrees_with_its_single_polarity_halves(record_property):
    """The odd and the even echoes of the 16-echo bipolar phantom are each a monopolar
    acquisition (8 echoes, 2.9 ms apart at 1.5 T): their field maps carry no polarity error.
    The full fit moves towards them once corrected."""
    signal, echo_times, b0, mask = _bydder_slice("phantom_16echo_bipolar")
    voxel = (1.5, 1.5, 5.0)
    kwargs = {"b0_tesla": b0, "voxel_size": voxel, "fat_model": "ismrm", "phase_sign": 1}
    halves = [wf.separate(signal[..., k::2], echo_times[k::2], mask, **kwargs) for k in (0, 1)]
    estimate = bipolar.estimate_bipolar_phase(signal, echo_times, mask, voxel_size=voxel,
                                              b0_tesla=b0, fat_model="ismrm")
    corrected = bipolar.correct_bipolar_phase(np.angle(signal), estimate, voxel)
    deviation = []
    for data in (signal, wf.as_complex(np.abs(signal), corrected)):
        full = wf.separate(data, echo_times, mask, **kwargs)
        errors = [full.field_hz[mask] - half.field_hz[mask] for half in halves]
        deviation.append(np.mean([np.median(np.abs(e - np.median(e))) for e in errors]))
    record_property("field_deviation_hz", [round(float(d), 3) for d in deviation])
    assert deviation[1] < 0.6 * deviation[0]  # measured 0.39 -> 0.17 Hz


def test_ismrm_monopolar_cases_are_left_alone():
    for case in ("12", "15"):
        img, te, b0, sign, *_ = _ismrm_case(case)
        energy = np.sqrt((np.abs(img) ** 2).sum(axis=-1))
        mask = energy > 0.1 * np.percentile(energy, 99)
        estimate = bipolar.estimate_bipolar_phase(img, te, mask, voxel_size=(1.5, 1.5, 5),
                                                  b0_tesla=b0, fat_model="ismrm",
                                                  phase_sign=sign)
        assert not estimate.applied and estimate.gain < 0.05, estimate.message
