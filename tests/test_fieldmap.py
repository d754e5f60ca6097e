"""Multi-echo field estimation (qsmprep.recon.fieldmap) against a known field."""

from pathlib import Path

import numpy as np
import pytest
from conftest import romeo_small
from scipy import ndimage

from qsmprep.recon import fieldmap
from qsmprep.recon.phase import wrap
from qsmprep.recon.unwrap import discrete_laplacian

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TWO_PI = 2 * np.pi


def simulate(shape=(56, 56, 48), echo_times=(0.003, 0.007, 0.012, 0.018, 0.025), snr=50.0,
             field_scale=250.0, offset_scale=1.0, r2star=20.0, seed=0):
    """Complex multi-echo signal with a known field (Hz, wrapping several times) and offset.

    SNR = signal / sigma at echo 1, sigma the standard deviation of each of the real and
    imaginary parts of the complex noise."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = (x / 0.85) ** 2 + (y / 0.9) ** 2 + (z / 0.8) ** 2 < 1
    field = field_scale * (0.8 * x + 0.3 * y * z + 0.4 * (x**2 - 0.3) + 0.2 * np.sin(3 * y))
    field = (field - field[mask].mean()).astype(np.float32)
    offset = (offset_scale * (0.6 * x - 0.4 * y**2 + 0.25 * z) + 0.3).astype(np.float32)
    rho = (1.0 + 0.3 * np.cos(2 * x) * np.sin(2 * z)) * mask + 0.02
    times = np.asarray(echo_times)
    signal = rho[..., None] * np.exp(-r2star * times) * np.exp(
        1j * (offset[..., None] + TWO_PI * field[..., None] * times))
    sigma = np.mean(rho[mask]) * np.exp(-r2star * times[0]) / snr
    signal = signal + sigma * (rng.normal(size=signal.shape) + 1j * rng.normal(size=signal.shape))
    return (np.abs(signal).astype(np.float32), np.angle(signal).astype(np.float32), times, mask,
            field, offset)


def rmse(a, b, mask):
    return float(np.sqrt(np.mean((a - b)[mask] ** 2)))


@pytest.mark.parametrize("echo_times", [(0.003, 0.007, 0.012, 0.018, 0.025),
                                         (0.004, 0.008, 0.012, 0.016)])
def test_nlfit_recovers_wrapping_field(echo_times):
    magnitude, phase, times, mask, field, offset = simulate(echo_times=echo_times)
    delta = times[1] - times[0]
    assert np.abs(field[mask]).max() > 1 / (2 * delta)  # aliases in time and wraps in space
    result = fieldmap.estimate(magnitude, phase, times, mask, voxel_size=(1, 1, 1))
    assert result.field_hz.dtype == np.float32 and result.noise_hz.dtype == np.float32
    error = result.field_hz - field
    assert rmse(result.field_hz, field, mask) < 0.5
    assert np.all(result.field_hz[~mask] == 0)
    # noise map: finite, calibrated within a factor 1.5 of the empirical error
    assert np.isfinite(result.noise_hz[mask]).all() and (result.noise_hz[mask] > 0).all()
    z = error[mask] / result.noise_hz[mask]
    assert 1 / 1.5 < np.std(z) < 1.5
    # phase offset
    assert np.mean(np.abs(wrap(result.phase_offset - offset))[mask]) < 0.05
    # unwrapped phase: exact multiples of 2 pi of the input, consistent with the fit
    turns = (result.unwrapped_phase.astype(np.float64) - phase) / TWO_PI
    assert np.abs(turns - np.round(turns))[mask].max() < 1e-4
    model = offset[..., None] + TWO_PI * field[..., None] * times
    assert np.mean(np.abs(result.unwrapped_phase - model)[mask] < np.pi) > 0.999
    assert np.array_equal(result.unwrapped_phase[~mask], phase[~mask])
    assert np.allclose(result.echo_times, times)


def test_phase_sign_flips_field():
    magnitude, phase, times, mask, field, _ = simulate(shape=(40, 40, 32), field_scale=60)
    plus = fieldmap.estimate(magnitude, phase, times, mask, voxel_size=(1, 1, 1))
    minus = fieldmap.estimate(magnitude, phase, times, mask, voxel_size=(1, 1, 1),
                              phase_sign=-1)
    assert np.allclose(minus.field_hz, -plus.field_hz)
    assert np.allclose(minus.noise_hz, plus.noise_hz)
    assert rmse(plus.field_hz, field, mask) < 0.5
    # conjugated data (opposite handedness) with phase_sign=-1 gives the same field
    conj = fieldmap.estimate(magnitude, -phase, times, mask, voxel_size=(1, 1, 1),
                             phase_sign=-1)
    assert rmse(conj.field_hz, field, mask) < 0.5
    with pytest.raises(ValueError, match="phase_sign"):
        fieldmap.estimate(magnitude, phase, times, mask, voxel_size=(1, 1, 1), phase_sign=2)


@pytest.mark.parametrize("method", ["nlfit", "linear"])
def test_isolated_parts_share_one_smooth_field(method):
    """Two legs apart, a field gradient of 3 Hz/mm across them: the legs sit at about -144
    and +144 Hz, beyond half the 250 Hz period (echo spacing 4 ms). Centring each leg on
    0 Hz put both a period off; one quadratic through both legs places them right."""
    vs, shape = (2.0, 2.0, 4.0), (96, 80, 4)
    x, y = np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * v for n, v in zip(shape[:2], vs)],
                       indexing="ij")
    legs = ((x + 48) / 38) ** 2 + (y / 46) ** 2 <= 1, ((x - 48) / 38) ** 2 + (y / 46) ** 2 <= 1
    mask = np.repeat((legs[0] | legs[1])[..., None], shape[2], axis=2)
    field = np.repeat((3.0 * x + 0.02 * y * y)[..., None], shape[2], axis=2)
    te = 2e-3 + 4e-3 * np.arange(5)
    rng = np.random.default_rng(0)
    signal = np.exp((-30 + 2j * np.pi * field[..., None]) * te + 0.4j) * mask[..., None]
    signal += 0.02 * (rng.standard_normal(signal.shape) + 1j * rng.standard_normal(signal.shape))
    estimate = fieldmap.estimate(np.abs(signal), np.angle(signal), te, mask, voxel_size=vs,
                                 method=method)
    for leg in legs:
        inside = mask & leg[..., None]
        assert abs(field[inside].mean()) > 125
        assert np.median(np.abs(estimate.field_hz - field)[inside]) < 1.0


def test_align_components_with_many_small_parts():
    """Two legs plus 400 one-voxel islands (a noisy mask), each part shifted by a random
    number of periods: the 64 largest parts choose their shifts jointly, the rest follow the
    joint trend; every voxel comes back to the field."""
    vs, period = (2.0, 2.0, 4.0), 250.0
    x, y = np.meshgrid((np.arange(96) - 47.5) * 2.0, (np.arange(80) - 39.5) * 2.0,
                       indexing="ij")
    legs = (((x + 48) / 38) ** 2 + (y / 46) ** 2 <= 1) | (((x - 48) / 38) ** 2
                                                          + (y / 46) ** 2 <= 1)
    rng = np.random.default_rng(1)
    islands = np.zeros_like(legs)
    while islands.sum() < 400:
        a, b = rng.integers(0, [96, 80])
        islands[a, b] = not (legs | islands)[max(a - 1, 0):a + 2, max(b - 1, 0):b + 2].any()
    mask = np.repeat((legs | islands)[..., None], 4, axis=2)
    field = np.repeat((3.0 * x + 0.02 * y * y)[..., None], 4, axis=2)
    labels, count = ndimage.label(mask)
    shifts = rng.integers(-3, 4, count + 1) * period
    shifts[0] = 0
    shifted = ((field + shifts[labels]) * mask).astype(np.float32)
    aligned = fieldmap._align_components(shifted, mask, period, vs,
                                         np.ones(mask.shape, np.float32))
    assert count == 402
    assert np.abs(aligned - field)[mask].max() < 1e-3
    # no weight anywhere: each part centred on 0 on its own, no error
    unweighted = fieldmap._align_components(shifted, mask, period, vs,
                                            np.zeros(mask.shape, np.float32))
    centred = fieldmap._center_components(shifted, mask, period)
    assert np.array_equal(unweighted, centred)


def test_nonlinear_fit_outputs():
    magnitude, phase, times, mask, field, offset = simulate(
        shape=(40, 40, 32), echo_times=(0.004, 0.008, 0.012, 0.016, 0.020))
    frequency, p0, noise = fieldmap.nonlinear_fit(magnitude, phase, times, mask)
    delta = times[1] - times[0]
    assert np.abs(frequency).max() <= np.pi / delta * (1 + 1e-5)
    # the wrapped frequency equals the true one modulo 2 pi / dTE
    alias = wrap((frequency - TWO_PI * field) * delta)
    assert np.sqrt(np.mean(alias[mask] ** 2)) < TWO_PI * 0.5 * delta
    assert (noise[mask] > 0).all() and np.all(noise[~mask] == 0)
    # one echo: frequency = phase / TE, no offset
    one, p0_one, noise_one = fieldmap.nonlinear_fit(magnitude[..., :1], phase[..., :1],
                                                    times[:1], mask)
    assert np.allclose(one[mask], phase[..., 0][mask] / times[0], rtol=1e-5)
    assert np.all(p0_one == 0) and np.isfinite(noise_one[mask]).all()


def test_two_echoes_and_noise_without_residual_dof():
    magnitude, phase, times, mask, field, _ = simulate(echo_times=(0.004, 0.008),
                                                       field_scale=150)
    result = fieldmap.estimate(magnitude, phase, times, mask, voxel_size=(1, 1, 1))
    assert rmse(result.field_hz, field, mask) < 1.5
    z = (result.field_hz - field)[mask] / result.noise_hz[mask]
    assert 1 / 1.5 < np.std(z) < 1.5


def test_linear_fit_with_mcpc3ds():
    magnitude, phase, times, mask, field, offset = simulate(shape=(64, 64, 56),
                                                            offset_scale=0.5)
    offset_estimate = fieldmap.mcpc3ds_offset(magnitude, phase, times, mask,
                                              voxel_size=(1, 1, 1))
    assert np.mean(np.abs(wrap(offset_estimate - offset))[mask]) < 0.05
    result = fieldmap.estimate(magnitude, phase, times, mask, voxel_size=(1, 1, 1),
                               method="linear")
    assert rmse(result.field_hz, field, mask) < 1.0
    interior = ndimage.binary_erosion(mask, iterations=8)
    assert rmse(result.field_hz, field, interior) < 0.5
    turns = (result.unwrapped_phase.astype(np.float64) - phase) / TWO_PI
    assert np.abs(turns - np.round(turns))[mask].max() < 1e-4
    # linear_fit alone on the true unwrapped phase
    unwrapped = offset[..., None] + TWO_PI * field[..., None] * times
    noisy = unwrapped + wrap(phase - unwrapped)
    omega, noise = fieldmap.linear_fit(noisy, magnitude, times, mask, phase_offset=offset)
    assert rmse(omega / TWO_PI, field, mask) < 0.2
    z = (omega / TWO_PI - field)[mask] / (noise[mask] / TWO_PI)
    assert 1 / 1.5 < np.std(z) < 1.5


@pytest.mark.parametrize("echo_times", [(0.003, 0.007, 0.012, 0.018, 0.025),
                                         (0.004, 0.008, 0.012, 0.016)])
def test_laplacian_unwrapping_error_is_harmonic(echo_times):
    magnitude, phase, times, mask, field, _ = simulate(shape=(48, 48, 40),
                                                       echo_times=echo_times)
    exact = fieldmap.estimate(magnitude, phase, times, mask, voxel_size=(1, 1, 1))
    result = fieldmap.estimate(magnitude, phase, times, mask, voxel_size=(1, 1, 1),
                               unwrap_method="laplacian")
    # off by a harmonic function: the Laplacian of the difference vanishes inside
    interior = ndimage.binary_erosion(mask, iterations=2)
    residual = discrete_laplacian(result.field_hz - exact.field_hz, (1, 1, 1))[interior]
    signal = discrete_laplacian(field, (1, 1, 1))[interior]
    assert np.sqrt(np.mean(residual**2)) < 1e-3 * np.sqrt(np.mean(signal**2))
    turns = (result.unwrapped_phase.astype(np.float64) - phase) / TWO_PI
    assert np.abs(turns - np.round(turns))[mask].max() < 1e-4


def test_reliability_unwrapping_and_nan_voxels():
    magnitude, phase, times, mask, field, _ = simulate(shape=(40, 40, 32))
    phase = phase.copy()
    phase[20, 20, 16, 2] = np.nan
    result = fieldmap.estimate(magnitude, phase, times, mask, voxel_size=(1, 1, 1),
                               unwrap_method="reliability")
    keep = mask.copy()
    keep[20, 20, 16] = False
    assert rmse(result.field_hz, field, keep) < 0.5
    assert result.field_hz[20, 20, 16] == 0 and np.isfinite(result.unwrapped_phase).all()


def test_argument_errors():
    magnitude, phase, times, mask, _, _ = simulate(shape=(12, 12, 10))
    with pytest.raises(ValueError, match="milliseconds"):
        fieldmap.estimate(magnitude, phase, times * 1000, mask, voxel_size=(1, 1, 1))
    with pytest.raises(ValueError, match="increasing"):
        fieldmap.estimate(magnitude, phase, times[::-1], mask, voxel_size=(1, 1, 1))
    with pytest.raises(ValueError, match="nlfit"):
        fieldmap.estimate(magnitude, phase, times, mask, voxel_size=(1, 1, 1), method="x")
    with pytest.raises(ValueError, match="region_growing"):
        fieldmap.estimate(magnitude, phase, times, mask, voxel_size=(1, 1, 1),
                          unwrap_method="x")
    with pytest.raises(ValueError, match="echo times"):
        fieldmap.estimate(magnitude, phase, times[:3], mask, voxel_size=(1, 1, 1))


def test_real_romeo_small():
    phase, magnitude = romeo_small()
    mask = np.ones(phase.shape[:3], bool)
    times = [0.004, 0.008, 0.012]
    voxel = (0.46875, 0.46875, 1.0)
    fits = {m: fieldmap.estimate(magnitude, phase, times, mask, voxel_size=voxel, method=m)
            for m in ("nlfit", "linear")}
    for result in fits.values():
        turns = (result.unwrapped_phase.astype(np.float64) - phase) / TWO_PI
        assert np.abs(turns - np.round(turns)).max() < 1e-4
        assert np.isfinite(result.noise_hz).all()
    # both echo combinations agree on the field (Hz) in most voxels
    difference = fits["nlfit"].field_hz - fits["linear"].field_hz
    assert np.median(np.abs(difference - np.median(difference))) < 2.0


def test_inconsistent_voxels_flags_unwrapping_slips_only():
    """Alias slips (k/dTE) are flagged with their neighbours; a smooth field is not."""
    shape = (40, 40, 30)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = x**2 + y**2 + z**2 < 0.8
    smooth = (60 * x + 40 * y * z + 25 * x**2).astype(np.float32)  # Hz, strong but smooth
    assert not fieldmap.inconsistent_voxels(smooth, mask, threshold_hz=125 / 4).any()
    slipped = smooth.copy()
    slips = [(20, 20, 15), (12, 25, 10), (28, 14, 18)]
    for index in slips:
        slipped[index] += 125.0  # one alias period for dTE = 8 ms
    flagged = fieldmap.inconsistent_voxels(slipped, mask, threshold_hz=125 / 4)
    assert all(flagged[index] for index in slips)
    assert flagged.sum() <= len(slips) * 27


def test_temporal_unwrap_public():
    """Echoes aliasing in time are recovered exactly from the unwrapped first echo."""
    from qsmprep.recon import unwrap

    assert fieldmap.temporal_unwrap is unwrap.temporal_unwrap
    magnitude, phase, times, mask, field, offset = simulate(shape=(40, 40, 32), snr=200)
    truth = offset[..., None] + TWO_PI * field[..., None] * times
    assert np.abs(field[mask]).max() > 1 / (2 * np.diff(times).min())
    template = phase[..., 0] + TWO_PI * np.round((truth[..., 0] - phase[..., 0]) / TWO_PI)
    result = fieldmap.temporal_unwrap(phase, template, times, mask=mask, magnitude=magnitude,
                                      phase_offset=offset)
    turns = np.round((result - truth) / TWO_PI)
    assert np.all(turns[mask] == 0)
    assert np.array_equal(result[~mask], phase[~mask])


@pytest.mark.parametrize("method", ["nlfit", "linear"])
def test_romeo_unwrap_method(method):
    magnitude, phase, times, mask, field, _ = simulate(shape=(48, 48, 40),
                                                       echo_times=(0.003, 0.007, 0.012, 0.018))
    result = fieldmap.estimate(magnitude, phase, times, mask, voxel_size=(1, 1, 1),
                               method=method, unwrap_method="romeo")
    assert result.unwrap_method == "romeo"
    assert rmse(result.field_hz, field, mask) < (0.5 if method == "nlfit" else 1.0)
    turns = (result.unwrapped_phase.astype(np.float64) - phase) / TWO_PI
    assert np.abs(turns - np.round(turns))[mask].max() < 1e-4
    if method == "linear":  # region growing in the linear fit is the same ROMEO path
        same = fieldmap.estimate(magnitude, phase, times, mask, voxel_size=(1, 1, 1),
                                 method=method, unwrap_method="region_growing")
        assert np.array_equal(same.field_hz, result.field_hz)
