"""Water-fat separation and field mapping against known truth (qsmprep.recon.waterfat)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.io
from conftest import shared_data
from scipy import ndimage

from qsmprep.recon import waterfat as wf
from qsmprep.recon.mask import body_mask
from qsmprep.simulate import body

B0 = 3.0
UNIFORM_TE = 1.2e-3 + 1.0e-3 * np.arange(6)
ISMRM12_TE = 1.744e-3 + 3.076e-3 * np.arange(4)  # ISMRM 2012 case 12 timing (1.5 T)


def _volume(echo_times, *, snr=50.0, field_scale=1.0, seed=0, shape=(48, 48, 10),
            fat_model="ismrm", offset_hz=0.0):
    """Cylinder with a fat ring, a water core and a marrow-like insert (PDFF 30-100%)."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x, y, z = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny),
                          np.linspace(-1, 1, nz), indexing="ij")
    r = np.hypot(x, y)
    mask = r < 0.9
    ff = np.zeros(shape)
    ff[r > 0.7] = 1.0
    core = r < 0.35
    ff[core] = 0.3 + 0.7 * (z[core] + 1) / 2
    field = field_scale * (120 * x + 80 * y ** 2 - 60 * z + 40 * x * y) + offset_hz
    r2 = np.where(ff > 0.5, 60.0, 30.0)
    te = np.asarray(echo_times)
    c = wf.fat_signal(te, B0, fat_model)
    signal = ((1 - ff)[..., None] + ff[..., None] * c) * np.exp(
        (-r2[..., None] + 2j * np.pi * field[..., None]) * te) * np.exp(0.7j)
    sigma = 1.0 / snr
    noise = sigma * (rng.standard_normal(signal.shape) + 1j * rng.standard_normal(signal.shape))
    signal = np.where(mask[..., None], signal, 0) + noise
    return signal.astype(np.complex64), mask, field, 100 * ff, r2


def _run(signal, te, mask, **kwargs):
    return wf.separate(signal, te, mask, b0_tesla=B0, voxel_size=(2.0, 2.0, 2.0), **kwargs)


# --------------------------------------------------------------------------- fat models

def test_fat_models_tables_and_frequencies():
    for name, model in wf.FAT_MODELS.items():
        assert sum(model.amplitude) == pytest.approx(1.0)
        assert len(model.ppm) == len(model.amplitude)
    assert len(wf.FAT_MODELS["ismrm"].ppm) == 6
    assert len(wf.FAT_MODELS["ren_marrow"].ppm) == 9
    assert len(wf.FAT_MODELS["scanner7"].ppm) == 7
    freqs = wf.fat_frequencies_hz("single", 3.0)
    assert freqs[0] == pytest.approx(-434.3, abs=0.5)
    # water at body temperature (4.65 ppm) moves 0.05 ppm towards the fat peaks
    shifted = wf.fat_frequencies_hz("single", 3.0, water_ppm=4.65)
    assert shifted[0] - freqs[0] == pytest.approx(0.05 * 42.57747892 * 3.0, rel=1e-6)
    c = wf.fat_signal([0.0, 1 / 434.3], 3.0, "single")
    assert np.allclose(c, [1.0, 1.0], atol=1e-3)


def test_user_fat_table_relative_and_absolute():
    relative = wf.parse_fat_table("-3.4:0.7, -2.6:0.2, 0.6:0.1")
    assert relative.ppm == (-3.4, -2.6, 0.6)
    assert sum(relative.amplitude) == pytest.approx(1.0)
    absolute = wf.parse_fat_table("ppm amplitude\n1.3 7\n2.1 2\n5.3 1\n", water_ppm=4.7)
    assert np.allclose(absolute.ppm, (-3.4, -2.6, 0.6))
    assert np.allclose(absolute.amplitude, relative.amplitude)
    with pytest.raises(ValueError, match="two numbers"):
        wf.parse_fat_table("1.3 7 3\n")
    with pytest.raises(ValueError, match="unknown fat model"):
        wf.get_fat_model("butter")
    with pytest.raises(ValueError, match="amplitudes"):
        wf.fat_model_from_table([-3.4], [-1.0])


# --------------------------------------------------------------------------- separation

def test_separation_uniform_echoes_accuracy_and_no_swaps():
    signal, mask, field, pdff, r2 = _volume(UNIFORM_TE)
    result = _run(signal, UNIFORM_TE, mask)
    error = result.field_hz - field
    assert np.median(np.abs(error[mask])) < 1.0
    assert np.mean(np.abs(error[mask]) > 100) == 0.0  # no swapped voxel
    assert np.mean(np.abs(result.pdff - pdff)[mask]) < 2.0
    assert np.median(np.abs(result.r2star - r2)[mask]) < 8.0
    assert result.swaps.verdict == "none"
    # noise map: calibrated within a factor 2 of the empirical error spread
    water = mask & (pdff == 0)
    spread = 1.4826 * np.median(np.abs(error[water] - np.median(error[water])))
    ratio = np.median(result.noise_hz[water]) / spread
    assert 0.5 < ratio < 2.0, ratio
    assert result.water.dtype == np.complex64 and result.pdff.dtype == np.float32


def test_jump_move_is_the_exact_best_binary_move():
    """One max-flow jump move equals the brute-force best subset of voxels to move."""
    rng = np.random.default_rng(5)
    n = 9
    count = rng.integers(1, 4, n)
    psi_c = np.sort(rng.uniform(-500, 500, (n, 3)), axis=1)
    res_c = rng.uniform(0, 1, (n, 3))
    weight = rng.uniform(0.5, 2, n)
    p = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 2, 4])
    q = np.array([1, 2, 3, 4, 5, 6, 7, 8, 4, 6, 8])
    w_pq = rng.uniform(0, 2e-5, p.size)
    state = rng.integers(-3, 3, n)

    def energy(positions):
        psi, res = wf._candidate_state(psi_c, res_c, count, 1000.0, positions)
        return (weight * res).sum() + (w_pq * (psi[p] - psi[q]) ** 2).sum()

    for step in ((1, 0), (-2, 0), (0, 1)):
        moved, cuts = wf._jump_moves(psi_c, res_c, count, weight, p, q, w_pq, 1000.0,
                                     state.copy(), steps=(step,), max_sweeps=1)
        assert cuts == 1
        proposal = state + step[0] + step[1] * count
        best = min(energy(np.where(np.array([(k >> i) & 1 for i in range(n)], bool),
                                   proposal, state)) for k in range(2 ** n))
        assert energy(moved) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_pyramid_block_sums_and_blockwise_grid_search_are_exact(monkeypatch):
    """Level curves are the energy-weighted block means of their voxels' curves (odd sizes
    pad), and the graph cut gives the same maps whether its grid search and block sums run
    in blocks of 7 voxels or in one, and whatever the pair block size."""
    rng = np.random.default_rng(3)
    mask = rng.uniform(size=(20, 18, 15)) < 0.7
    levels, owners = wf._pyramid_levels(mask, 3)
    n = int(mask.sum())
    cost = rng.uniform(size=(n, 5)).astype(np.float32)
    energy = rng.uniform(0.5, 2.0, n).astype(np.float32)
    sums = wf._level1_sums(levels, 5)
    for start in range(0, n, 7):  # blockwise, as the graph cut accumulates
        block = slice(start, start + 7)
        wf._add_block_sums(sums, cost[block] * energy[block, None], owners[0][block])
    curves, energies = wf._coarse_curves(sums, energy, levels, owners)
    for level in (1, 2):
        coarse, _ = levels[level]
        factor = 2 ** level
        coords = np.argwhere(coarse)
        voxels = np.argwhere(mask)
        for row, block in enumerate(coords[:25]):
            inside = np.all(voxels // factor == block, axis=1)
            expected = (cost[inside] * energy[inside, None]).sum(0) / energy[inside].sum()
            np.testing.assert_allclose(curves[level][row], expected, rtol=1e-5)
            assert energies[level][row] == pytest.approx(energy[inside].sum(), rel=1e-5)
    signal, mask, *_ = _volume(UNIFORM_TE, shape=(24, 24, 6))
    whole = _run(signal, UNIFORM_TE, mask)
    monkeypatch.setattr(wf, "PAIR_CHUNK", 97)
    blocks = _run(signal, UNIFORM_TE, mask, chunk=7)
    np.testing.assert_allclose(blocks.field_hz, whole.field_hz, atol=1e-3)
    np.testing.assert_allclose(blocks.pdff, whole.pdff, atol=1e-3)


def test_graphcut_keeps_an_organ_behind_a_gas_gap():
    """An organ whose field jumps by 130 Hz across a dark ring (bowel gas, 1.5 T, 4 echoes as
    ISMRM case 12): its swapped field (-87 Hz) would be smoother; the graph cut's
    edge-stopping weights keep the organ water."""
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 64), indexing="ij")
    body_mask = (x / 0.95) ** 2 + (y / 0.8) ** 2 < 1
    rs = np.hypot(x - 0.3, y)
    organ, ring = rs < 0.3, (rs >= 0.3) & (rs < 0.38)
    ff = np.where((x / 0.95) ** 2 + (y / 0.8) ** 2 > 0.8, 0.9, 0.05)
    ff = np.where(organ, 0.03, ff)
    amplitude = np.where(ring, 0.05, 1.0) * body_mask
    field = 20 * x - 15 * y + 130 * np.clip((0.38 - rs) / 0.08, 0, 1) * (organ | ring)
    te = ISMRM12_TE
    c = wf.fat_signal(te, 1.5, "ismrm")
    signal = amplitude[..., None] * ((1 - ff)[..., None] + ff[..., None] * c) * np.exp(
        (-30 + 2j * np.pi * field[..., None]) * te)
    signal = np.repeat(signal[:, :, None], 4, axis=2)
    signal = signal + (rng.standard_normal(signal.shape)
                       + 1j * rng.standard_normal(signal.shape)) / 40
    mask = np.repeat(body_mask[:, :, None], 4, axis=2)
    result = wf.separate(signal.astype(np.complex64), te, mask, b0_tesla=1.5,
                         voxel_size=(1.5, 1.5, 5.0))
    period = 1 / 3.076e-3
    error = result.field_hz - field[:, :, None]
    error -= period * np.round(error / period)
    inside = np.repeat(organ[:, :, None], 4, axis=2)
    assert np.mean(np.abs(error[inside]) > 80) < 0.01
    assert np.mean(np.abs(result.pdff[inside] - 3)) < 5


def test_axis_weights_follow_the_field_roughness():
    """An axis whose neighbour fields differ much more than along the others is coupled
    less, whatever voxel size is given; a uniform gradient is not roughness; the weights
    never exceed the geometric ones."""
    rng = np.random.default_rng(3)
    shape = (40, 40, 12)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    smooth = 0.5 * rng.standard_normal(shape)
    rough_z = smooth + 8.0 * rng.standard_normal((1, 1, shape[2])) * np.sin(x / 7 + z)
    strong = np.ones(shape, bool)
    period = 300.0
    isotropic = wf._axis_weights(rough_z.astype(np.float32), strong, (1, 1, 1), period)
    assert isotropic[0] == isotropic[1] == 1.0 and isotropic[2] < 0.05
    # a 20 Hz/voxel ramp along x adds no roughness
    ramp = wf._axis_weights((smooth + 20.0 * x).astype(np.float32), strong, (1, 1, 1), period)
    assert np.all(ramp > 0.5)
    # the geometric weight is an upper bound: 5 mm slices keep (1/5)^2 for a smooth field
    thick = wf._axis_weights(smooth.astype(np.float32), strong, (1, 1, 5), period)
    np.testing.assert_allclose(thick[2], 0.04)
    # too few strong voxels to measure: the geometric weights
    few = np.zeros(shape, bool)
    few[:3, :3, :3] = True
    np.testing.assert_allclose(wf._axis_weights(rough_z.astype(np.float32), few, (1, 1, 2),
                                                period), [1.0, 1.0, 0.25])


def test_without_regularisation_swaps_are_detected(caplog):
    signal, mask, field, pdff, _ = _volume(UNIFORM_TE, seed=1)
    # without the field trend: centring the grid on it already favours the trend-consistent
    # minimum (8.0% of the voxels swap without it, 1.1% with it)
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        result = _run(signal, UNIFORM_TE, mask, regularization="none", detrend=False)
    swapped = np.mean(np.abs(result.field_hz - field)[mask] > 100)
    assert swapped > 0.02  # the per-voxel optimum swaps
    assert result.swaps.verdict in ("suspect", "swapped")
    assert result.swaps.fraction > 0.01
    assert "swap" in caplog.text


def test_field_trend_follows_the_field_through_water_and_fat():
    signal, mask, field, _, _ = _volume(UNIFORM_TE, seed=4, field_scale=8.0)
    trend = wf.field_trend(signal, mask, UNIFORM_TE, (2.0, 2.0, 2.0), 1000.0,
                           wf.energy_map(signal, mask))
    energy = (np.abs(signal[mask]) ** 2).sum(axis=1)
    error = np.abs(trend[mask] - (field[mask] - np.average(field[mask], weights=energy)))
    assert np.ptp(field[mask]) > 2000
    # the fat ring and the marrow insert (PDFF 30-100% along z) do not enter the differences
    assert np.median(error) < 5.0 and error.max() < 15.0, (np.median(error), error.max())
    assert not np.any(trend[~mask])


def test_strong_b0_gradient_does_not_swap_regions():
    # about 60 Hz per voxel along x at 3 T: summed 2x2x2 blocks smear the residual curves
    signal, mask, field, pdff, _ = _volume(UNIFORM_TE, seed=4, field_scale=12.0)
    for detrend in (True, False):
        result = _run(signal, UNIFORM_TE, mask, detrend=detrend)
        error = np.abs(result.field_hz - field)[mask]
        if detrend:
            assert np.median(error) < 1.0 and np.mean(error > 100) < 0.002
            assert np.abs(result.pdff - pdff)[mask].mean() < 1.5
            assert result.parameters["FieldTrendRangeHz"] > 2000
            assert result.swaps.verdict == "none"  # checked on the field less its trend
        else:  # what the trend prevents
            assert np.mean(error > 100) > 0.3
            assert result.swaps.verdict == "swapped"


def test_non_uniform_echoes_three_and_sixteen():
    non_uniform = np.array([1.1, 2.0, 3.2, 4.0, 5.4, 6.1]) * 1e-3
    three = np.array([1.2, 2.3, 3.4]) * 1e-3
    sixteen = 1.3e-3 + 0.9e-3 * np.arange(16)
    for te, limit_hz, limit_pdff in ((non_uniform, 1.0, 2.0), (three, 3.0, 5.0),
                                     (sixteen, 0.5, 2.0)):
        signal, mask, field, pdff, _ = _volume(te, seed=2, shape=(40, 40, 8))
        result = _run(signal, te, mask)
        error = np.abs(result.field_hz - field)[mask]
        assert np.median(error) < limit_hz, (len(te), np.median(error))
        # a swap moves the field by about the fat frequency (434 Hz at 3 T); with three
        # echoes the noise alone scatters some voxels of the PDFF-60% slice by 100-200 Hz
        # (both regularisations: the fit has no residual degrees of freedom there)
        if len(te) > 3:
            assert np.mean(error > 100) < 0.002, (len(te), np.mean(error > 100))
        else:
            assert np.mean(error > 100) < 0.005, np.mean(error > 100)
        assert np.mean(error > 217) == 0.0, (len(te), np.mean(error > 217))
        assert np.mean(np.abs(result.pdff - pdff)[mask]) < limit_pdff, len(te)


def test_field_beyond_one_period_is_unwrapped():
    # period 1/dTE = 1000 Hz: a +-1100 Hz field needs spatial unwrapping
    signal, mask, field, _, _ = _volume(UNIFORM_TE, field_scale=4.0, offset_hz=300.0,
                                        shape=(64, 64, 8), seed=3)
    assert np.abs(field[mask]).max() > 900
    result = _run(signal, UNIFORM_TE, mask)
    error = result.field_hz - field
    # the global multiple of the period is fixed by the mean nearest 0 Hz
    error -= 1000.0 * np.round(np.median(error[mask]) / 1000.0)
    assert np.median(np.abs(error[mask])) < 1.5
    assert np.mean(np.abs(error[mask]) > 100) < 0.002


def _slab(fraction, field2d, area, nz, seed):
    """1.5 T, ISMRM 12 echo times: a 2D water-fat pattern (fraction, field Hz) repeated over
    ``nz`` slices, R2* 40/s, complex noise at SNR 50 -> (signal complex64, mask, field)."""
    rng = np.random.default_rng(seed)
    c = wf.fat_signal(ISMRM12_TE, 1.5, "ismrm")
    signal2d = ((1 - fraction)[..., None] + fraction[..., None] * c) * np.exp(
        (-40 + 2j * np.pi * field2d[..., None]) * ISMRM12_TE) * area[..., None]
    signal = np.repeat(signal2d[:, :, None], nz, axis=2)
    signal = signal + (rng.standard_normal(signal.shape)
                       + 1j * rng.standard_normal(signal.shape)) / 50 / np.sqrt(2)
    return (signal.astype(np.complex64), np.repeat(area[:, :, None], nz, axis=2),
            np.repeat(field2d[:, :, None], nz, axis=2))


def test_isolated_parts_continue_the_field_across_air():
    """Two limbs and an arm-like part with no voxel between them (1.5 T, 4 echoes, period
    325 Hz): the field runs from about -140 to +420 Hz, so each isolated part sits a period
    or more off 0 Hz. Each must continue the smooth field of the largest part; centring each
    part on 0 Hz on its own (as before) put them a whole period off."""
    nx, ny, nz = 96, 96, 8
    x, y = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), indexing="ij")
    parts = [np.hypot(x + 0.3, y) < 0.5, np.hypot(x - 0.55, y - 0.55) < 0.18,
             np.hypot(x - 0.6, y + 0.5) < 0.15]
    area = np.any(parts, axis=0)
    ring = area & ~np.any([np.hypot(x + 0.3, y) < 0.42, np.hypot(x - 0.55, y - 0.55) < 0.12,
                           np.hypot(x - 0.6, y + 0.5) < 0.1], axis=0)
    fraction = np.where(ring, 0.95, 0.1)  # muscle in a ring of subcutaneous fat
    field2d = 150 * x + 75 * y + 300 * (x * x + y * y) + 20
    signal, mask, field = _slab(fraction, field2d, area, nz, seed=5)
    assert ndimage.label(mask)[1] == 3 and field[mask].max() > 400
    result = wf.separate(signal, ISMRM12_TE, mask, b0_tesla=1.5, voxel_size=(2.0, 2.0, 4.0),
                         fat_model="ismrm")
    for part in parts:
        inside = np.repeat(part[:, :, None], nz, axis=2)
        assert np.median(np.abs(result.field_hz - field)[inside]) < 2.0
    pdff = np.repeat(100 * fraction[:, :, None], nz, axis=2)
    assert np.mean(np.abs(result.pdff - pdff)[mask]) < 2.0


def test_two_legs_share_one_smooth_field():
    """Two legs side by side, B0 in-plane across them (3 T, 6 echoes, period 1000 Hz), the
    field forward-simulated from the air-tissue susceptibility step: inside each leg it
    bends (-106 to +181 Hz), so one leg's own quadratic, carried across the gap, put the
    other leg a whole period (1000 Hz) off. One quadratic fitted through both legs at once
    places each leg right."""
    from qsmprep.recon.dipole import forward_field, ppm_to_hz

    vs, shape = (2.0, 2.0, 5.0), (96, 80, 20)
    x, y, _ = np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * v for n, v in zip(shape, vs)],
                          indexing="ij")
    legs = [((x - cx) / 38) ** 2 + (y / 46) ** 2 <= 1 for cx in (-48, 48)]
    muscle = [((x - cx) / 31) ** 2 + (y / 39) ** 2 <= 1 for cx in (-48, 48)]
    tissue = legs[0] | legs[1]
    fraction = np.where(tissue & ~(muscle[0] | muscle[1]), 0.95, 0.03) * tissue
    chi = np.where(tissue, -9.4 + 0.6 * fraction, 0.0).astype(np.float32)  # ppm vs air
    slab = (slice(None), slice(None), slice(8, 12))  # the legs run on beyond the slab
    field = ppm_to_hz(forward_field(chi, vs, (0, 1, 0), pad=list(shape)), B0)[slab]
    tissue, fraction = tissue[slab], fraction[slab]
    field -= np.median(field[tissue])
    c = wf.fat_signal(UNIFORM_TE, B0, "ismrm")
    rng = np.random.default_rng(0)
    signal = ((1 - fraction)[..., None] + fraction[..., None] * c) * np.exp(
        (-40 + 2j * np.pi * field[..., None]) * UNIFORM_TE) * tissue[..., None]
    signal += 0.01 * (rng.standard_normal(signal.shape) + 1j * rng.standard_normal(signal.shape))
    result = wf.separate(signal.astype(np.complex64), UNIFORM_TE, tissue, b0_tesla=B0,
                         voxel_size=vs)
    labels, count = ndimage.label(tissue)
    assert count == 2 and np.ptp(field[tissue]) > 250
    for part in range(1, count + 1):
        assert np.median(np.abs(result.field_hz - field)[labels == part]) < 1.0
    assert np.mean(np.abs(result.pdff - 100 * fraction)[tissue]) < 1.5


def test_isolated_pure_fat_and_water_parts_are_not_swapped():
    """A pure-fat and a pure-water disc apart from the body (1.5 T, 4 echoes, a 300 Hz field
    gradient): nothing links them to the rest and within each the swapped field is as smooth
    as the true one, so only the data can decide. The coarse levels of the cut swapped the fat
    disc (PDFF off by 93 points, field by 101 Hz); the final whole-part move tries each
    part's water/fat aliases at full resolution and keeps the lower energy."""
    nx, nz = 96, 4
    x, y = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, nx), indexing="ij")
    body = np.hypot(x + 0.35, y) < 0.5
    fat_disc, water_disc = np.hypot(x - 0.6, y + 0.6) < 0.15, np.hypot(x - 0.6, y - 0.6) < 0.15
    fraction = np.where(body & (np.hypot(x + 0.35, y) > 0.42), 0.95, 0.05)
    fraction[fat_disc], fraction[water_disc] = 1.0, 0.0
    area = body | fat_disc | water_disc
    signal, mask, truth = _slab(fraction, 20 + 300 * (x + y / 2), area, nz, seed=0)
    result = wf.separate(signal, ISMRM12_TE, mask, b0_tesla=1.5, voxel_size=(2.0, 2.0, 4.0))
    for part in (body, fat_disc, water_disc):
        inside = np.repeat(part[:, :, None], nz, axis=2)
        assert np.median(np.abs(result.field_hz - truth)[inside]) < 2.0
        pdff = np.repeat(100 * fraction[:, :, None], nz, axis=2)
        assert np.median(np.abs(result.pdff - pdff)[inside]) < 2.0


def test_phase_sign_conjugates_data():
    signal, mask, field, pdff, _ = _volume(UNIFORM_TE, seed=4, shape=(32, 32, 6))
    result = _run(np.conj(signal), UNIFORM_TE, mask, phase_sign=-1)
    assert np.median(np.abs(result.field_hz - field)[mask]) < 1.0
    assert np.mean(np.abs(result.pdff - pdff)[mask]) < 2.5


def test_phase_sign_is_told_by_the_fat_signal(caplog):
    """The multi-peak fat spectrum fits only with the right handedness: 'auto' finds it,
    a wrong given sign is kept but warned about, and without fat the check abstains."""
    signal, mask, field, pdff, _ = _volume(UNIFORM_TE, seed=4, shape=(32, 32, 6))
    mirrored = np.conj(signal)  # the opposite handedness
    assert wf.check_phase_sign(signal, UNIFORM_TE, mask, b0_tesla=B0).preferred == 1
    check = wf.check_phase_sign(mirrored, UNIFORM_TE, mask, b0_tesla=B0)
    assert check.preferred == -1 and check.excess < 0
    assert "contradicts" in check.message
    result = _run(mirrored, UNIFORM_TE, mask)  # phase_sign="auto" is the default
    assert result.parameters["PhaseSign"] == -1
    assert np.median(np.abs(result.field_hz - field)[mask]) < 1.0
    assert np.mean(np.abs(result.pdff - pdff)[mask]) < 2.5
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        wrong = _run(mirrored, UNIFORM_TE, mask, phase_sign=1)
    assert wrong.parameters["PhaseSign"] == 1 and "--phase-sign" in caplog.text
    # water only: both signs fit alike
    te = np.asarray(UNIFORM_TE)
    water = (np.exp((-30.0 + 2j * np.pi * field[..., None] / 2) * te) * mask[..., None])
    water = (water + 0.01 * np.random.default_rng(1).standard_normal(water.shape)).astype(
        np.complex64)
    for given in (np.conj(water), water):
        assert wf.check_phase_sign(given, te, mask, b0_tesla=B0).preferred is None
    assert _run(np.conj(water), te, mask, phase_sign="auto").parameters["PhaseSign"] == 1
    with pytest.raises(ValueError, match="phase_sign"):
        _run(signal, UNIFORM_TE, mask, phase_sign=0)


def test_phase_sign_from_four_echoes_of_the_leg():
    """Leg phantom, 4 echoes at 3 T (SNR 100): on the grid residuals alone the grid steps
    outweighed the mirrored spectrum's misfit (excess 0.08, inconclusive: +1 taken, water and
    fat swapped everywhere for -1 data); refined by VARPRO, both handednesses are told."""
    te = 1.2e-3 + 1.0e-3 * np.arange(4)
    leg, crop = body.leg_phantom()
    simulation, cropped = body.simulate_waterfat_gre(leg, echo_times=te, crop=crop, snr=100)
    signal = (simulation.magnitude * np.exp(1j * simulation.phase)).astype(np.complex64)
    mask = cropped.phantom.brain_mask
    for sign, data in ((1, signal), (-1, np.conj(signal))):
        check = wf.check_phase_sign(data, te, mask, b0_tesla=3.0)
        assert check.preferred == sign and abs(check.excess) > 0.3


def test_three_echoes_cannot_tell_the_phase_sign(caplog):
    """Water, fat, a field and an R2* (6 real unknowns) fit 3 complex echoes exactly with
    either handedness, the wrong one as water and fat swapped everywhere: 'auto' keeps +1 and
    warns; a given sign separates correctly."""
    signal, mask, field, pdff, _ = _volume(UNIFORM_TE[:3], seed=4, shape=(32, 32, 6))
    mirrored = np.conj(signal)
    check = wf.check_phase_sign(mirrored, UNIFORM_TE[:3], mask, b0_tesla=B0)
    assert check.preferred is None and not check.identifiable
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        guessed = _run(mirrored, UNIFORM_TE[:3], mask)
    assert guessed.parameters["PhaseSign"] == 1 and "not possible with 3 echoes" in caplog.text
    assert "--phase-sign" in caplog.text
    given = _run(mirrored, UNIFORM_TE[:3], mask, phase_sign=-1)
    assert np.median(np.abs(given.field_hz - field)[mask]) < 5.0  # 3 echoes: noisier
    assert np.mean(np.abs(given.pdff - pdff)[mask]) < 3.0


def test_an_unconfirmed_phase_sign_is_a_warning(caplog):
    """Without fat the check is inconclusive; 'auto' then guesses +1, which a user must hear
    about (a wrong guess swaps water and fat everywhere where fat does exist)."""
    rng = np.random.default_rng(2)
    mask = np.ones((24, 24, 4), bool)
    x = np.linspace(-1, 1, 24)[:, None, None, None]
    water = np.exp((-30.0 + 2j * np.pi * 50.0 * x) * UNIFORM_TE) + 0.02 * (
        rng.standard_normal(mask.shape + UNIFORM_TE.shape)
        + 1j * rng.standard_normal(mask.shape + UNIFORM_TE.shape))
    water = water.astype(np.complex64)
    check = wf.check_phase_sign(water, UNIFORM_TE, mask, b0_tesla=B0)
    assert check.identifiable and check.preferred is None
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        result = _run(water, UNIFORM_TE, mask)
    assert result.parameters["PhaseSign"] == 1
    assert "inconclusive" in caplog.text and "--phase-sign" in caplog.text



def test_leg_phantom_marrow_pdff_field_r2star():
    sim, leg = body.leg_dataset(snr=50, fov_mm=(128.0, 128.0, 48.0))
    tissue = leg.phantom.m0 > 0.2
    signal = wf.as_complex(sim.magnitude, sim.phase)
    result = wf.separate(signal, sim.echo_times, tissue, b0_tesla=3.0,
                         voxel_size=leg.phantom.voxel_size, fat_model="ren_marrow")
    error = result.field_hz - sim.total_field_hz
    assert np.median(np.abs(error[tissue])) < 1.0
    assert np.mean(np.abs(error[tissue]) > 100) == 0.0
    for label in (21, 22, 23, 24):
        region = (leg.phantom.labels == label) & tissue
        assert abs(np.mean(result.pdff[region]) - leg.regions[label]["pdff"]) < 2.0, label
        r2_true = leg.regions[label]["r2star"]
        assert abs(np.median(result.r2star[region]) - r2_true) < 0.1 * r2_true, label


# --------------------------------------------------------------------------- inphase mode

def test_inphase_echo_selection():
    # the lumbar-spine protocol: all four echoes are (near) in phase at 3 T
    assert wf.inphase_echoes([0.142e-3, 2.4e-3, 4.6e-3, 6.8e-3], 3.0) == [0, 1, 2, 3]
    # 1.15 ms is opposed phase (0.5 cycles of 434 Hz), 2.3 ms in phase
    assert wf.inphase_echoes([1.15e-3, 2.3e-3, 3.45e-3, 4.6e-3], 3.0) == [1, 3]
    with pytest.raises(ValueError, match="in phase"):
        wf.inphase_echoes([1.15e-3, 3.45e-3], 3.0)


def test_inphase_mode_is_biased_with_fat_fraction():
    """Single-frequency fit on in-phase echoes: bias grows with PDFF (METHODS.md 5)."""
    te = np.array([0.142, 2.4, 4.6, 6.8]) * 1e-3
    fractions = np.array([0.0, 0.3, 0.6, 0.9])
    shape = (16, 16, fractions.size)
    ff = np.broadcast_to(fractions, shape)
    field = 25.0
    c = wf.fat_signal(te, B0, "ren_marrow")
    signal = ((1 - ff)[..., None] + ff[..., None] * c) * np.exp(
        (-50.0 + 2j * np.pi * field) * te)
    mask = np.ones(shape, bool)
    estimate, used = wf.inphase_field(np.abs(signal), np.angle(signal), te, mask,
                                      voxel_size=(1, 1, 2), b0_tesla=B0)
    assert used == [0, 1, 2, 3]
    bias = [np.median(estimate.field_hz[..., k]) - field for k in range(fractions.size)]
    assert abs(bias[0]) < 0.1
    assert np.all(np.diff(np.abs(bias)) > 0), bias  # grows with PDFF
    ppm = np.abs(bias[-1]) / (42.57747892 * B0)
    assert 0.005 < ppm < 0.2, ppm  # METHODS.md: +0.005 to +0.16 ppm
    # the water-fat fit on the same data is unbiased
    signal4 = np.broadcast_to(signal, shape + (te.size,)).astype(np.complex64)
    result = wf.separate(signal4, te, mask, b0_tesla=B0, voxel_size=(1, 1, 2),
                         fat_model="ren_marrow")
    for k in range(fractions.size):
        assert abs(np.median(result.field_hz[..., k]) - field) < 0.1


# --------------------------------------------------------------------------- checks

def test_bad_inputs_are_refused():
    signal, mask, *_ = _volume(UNIFORM_TE, shape=(8, 8, 4))
    with pytest.raises(ValueError, match=">= 3 echoes"):
        _run(signal[..., :2], UNIFORM_TE[:2], mask)
    with pytest.raises(ValueError, match="increasing"):
        _run(signal, UNIFORM_TE[::-1], mask)
    with pytest.raises(ValueError, match="complex"):
        _run(np.abs(signal), UNIFORM_TE, mask)
    with pytest.raises(ValueError, match="echo times"):
        _run(signal, UNIFORM_TE[:5], mask)
    with pytest.raises(ValueError, match="mask"):
        _run(signal, UNIFORM_TE, mask[:4])


# --------------------------------------------------------------------------- real data

def _ismrm_case(name: str):
    folder = shared_data("ismrm2012_fatwater")
    params = scipy.io.loadmat(str(folder / f"{name}_ISMRM.mat"), squeeze_me=True,
                              struct_as_record=False)["imDataParams"]
    images = np.asarray(params.images).astype(np.complex64)
    if images.ndim == 3:
        images = images[:, :, None, :]
    reference = np.asarray(params.ref, dtype=float)
    evaluation = np.asarray(params.eval_mask) > 0
    # the organisers' toolbox conjugates data unless PrecessionIsClockwise: it is our +1
    sign = 1 if params.PrecessionIsClockwise else -1
    return images, np.asarray(params.TE, float), float(params.FieldStrength), sign, \
        reference, evaluation


@pytest.mark.parametrize("voxel_size", [(1.5, 1.5, 5.0), (1.0, 1.0, 1.0)])
@pytest.mark.parametrize("case", ["12", "15"])
def test_ismrm2012_challenge_fat_fraction(case, voxel_size, record_property):
    """Issue 4 acceptance: PDFF MAE <= 3 points in the organisers' eval_mask, no swaps.

    The challenge files carry no voxel size: the result must not hinge on it (with
    geometric smoothness weights alone, isotropic 1 mm swapped the spleen of case 12 in two
    of its three slices: 3578 voxels).

    A swapped region is a connected patch (in the eval mask) of voxels whose PDFF is off by
    more than 30 points. The model-limited oracle (the local minimum per voxel closest to
    the reference) still leaves such patches of up to 10 voxels at tissue edges; the graph
    cut leaves one of 27-32 voxels in case 12 (61 mm^2 in edge slice 0, next to bowel gas:
    echo magnitudes that fit no water-fat signal, a swap partner the data reject; RESULTS.md,
    session 17), the multi-resolution ICM 1103-1184 (a spleen/liver swap): up to 40 pass.
    """
    images, te, b0, sign, reference, evaluation = _ismrm_case(case)
    result, mae, largest = _separate_and_score(images, te, b0, reference, evaluation,
                                               voxel_size=voxel_size)
    assert result.parameters["PhaseSign"] == sign  # read off the fat signal by default
    record_property("mae_points", mae)
    print(f"ISMRM 2012 case {case}: PDFF MAE {mae:.2f} points, largest patch off by > 30 "
          f"points {largest} voxels")
    assert mae <= 3.0
    assert largest <= 40, largest


def _separate_and_score(images, te, b0, reference, evaluation, *, voxel_size=(1.5, 1.5, 5.0)):
    """Separate a challenge case; PDFF MAE (points) in the scored voxels and the largest
    in-plane patch of voxels off by > 30 points."""
    magnitude = np.sqrt((np.abs(images) ** 2).sum(axis=-1))
    mask = magnitude > 0.05 * np.percentile(magnitude, 99)
    result = wf.separate(images, te, mask, b0_tesla=b0, voxel_size=voxel_size,
                         fat_model="ismrm")
    scored = evaluation & mask & np.isfinite(reference)
    assert scored.sum() > 0.95 * evaluation.sum()
    error = np.abs(result.pdff - 100 * reference)
    wrong = scored & (error > 30)
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = True
    labels, count = ndimage.label(wrong, structure=in_plane)
    largest = int(np.bincount(labels[wrong]).max()) if count else 0
    return result, float(error[scored].mean()), largest


def test_ismrm2012_field_a_quadratic_cannot_follow(monkeypatch):
    """Case 12 plus +-300 Hz, two sine periods across x (up to 24 Hz per voxel at 1.5 T):
    the trend's node field follows it and nothing swaps; the quadratic alone (the node
    field disabled) leaves the coarse levels smeared residual curves (measured: MAE 30.1)."""
    images, te, b0, sign, reference, evaluation = _ismrm_case("12")
    x = np.linspace(-1.0, 1.0, images.shape[0])[:, None, None, None]
    added = 300.0 * np.sin(2 * np.pi * x)
    images = images * np.exp(sign * 2j * np.pi * added * te).astype(np.complex64)
    result, mae, largest = _separate_and_score(images, te, b0, reference, evaluation)
    assert mae <= 3.0 and largest <= 40, (mae, largest)
    assert result.parameters["FieldTrendRangeHz"] > 500
    monkeypatch.setattr(wf, "TREND_NODE_MIN_GAIN", np.inf)
    _, mae, _ = _separate_and_score(images, te, b0, reference, evaluation)
    assert mae > 10.0, mae


def test_refinement_stays_near_the_chosen_minimum():
    """LM steps that leave the grid minimum's neighbourhood are refused (pure-noise voxels
    have residuals nearly flat in psi)."""
    rng = np.random.default_rng(5)
    noise = (rng.standard_normal((2000, 6)) + 1j * rng.standard_normal((2000, 6)))
    start = rng.uniform(-400, 400, 2000)
    c = wf.fat_signal(UNIFORM_TE, B0)
    psi = wf.varpro_refine(noise.astype(np.complex64), UNIFORM_TE, c, start,
                           np.full(2000, 30.0), max_shift_hz=5.0)[0]
    assert np.abs(psi - start).max() <= 5.0 + 1e-9


def _refined_field(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = wf.fat_signal(UNIFORM_TE, B0)
    signal = np.exp((-30 + 2j * np.pi * 25.0) * UNIFORM_TE) * (0.6 + 0.4 * c)
    noisy = signal + 0.01 * (rng.standard_normal((5000, 6)) + 1j * rng.standard_normal((5000, 6)))
    return wf.varpro_refine(noisy.astype(np.complex64), UNIFORM_TE, c, np.full(5000, 20.0),
                            np.full(5000, 50.0))[0]


def test_refinement_runs_in_a_forked_child_after_the_parent():
    """Nipype's MultiProc forks its workers: the threaded kernels must run in a child after
    they ran in the parent (numba's GNU OpenMP layer terminates such a child)."""
    import multiprocessing

    parent = _refined_field(1)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply_async(_refined_field, (1,)).get(timeout=120)
    np.testing.assert_array_equal(child, parent)
    assert abs(np.median(parent) - 25.0) < 0.1


def test_refinement_matches_a_generic_optimiser_and_the_full_jacobian():
    """The compiled VARPRO refinement against an independent route: scipy's Nelder-Mead on
    the full model (psi, R2*, complex water and fat) finds the same minimum, and the
    returned unit-noise variances equal the (psi, R2*) diagonal of the full model's
    ``(J^T J)^-1`` by finite differences."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(11)
    c = wf.fat_signal(UNIFORM_TE, B0)
    truth = np.array([[37.0, 45.0, 0.7, 0.3], [-120.0, 150.0, 0.2, 0.8], [5.0, 20.0, 1.0, 0.0]])

    def model(p):
        decay = np.exp((-p[1] + 2j * np.pi * p[0]) * UNIFORM_TE)
        return decay * (complex(p[2], p[3]) + complex(p[4], p[5]) * c)

    signal = np.stack([model([f, r2, w, 0.0, fat, 0.0]) for f, r2, w, fat in truth])
    signal = (signal + 0.01 * (rng.standard_normal(signal.shape)
                               + 1j * rng.standard_normal(signal.shape)))
    psi, r2, water, fat, cost, var_psi, var_r2 = wf.varpro_refine(
        signal.astype(np.complex64), UNIFORM_TE, c, truth[:, 0] + 4.0, truth[:, 1] + 15.0)
    for k in range(len(truth)):
        start = [psi[k], r2[k], water[k].real, water[k].imag, fat[k].real, fat[k].imag]

        def full_cost(p, k=k):
            return np.sum(np.abs(signal[k] - model(p)) ** 2)

        direct = minimize(full_cost, np.add(start, [2.0, 10.0, 0.02, 0.0, 0.0, 0.02]),
                          method="Nelder-Mead",
                          options={"xatol": 1e-7, "fatol": 1e-14, "maxiter": 40000})
        assert direct.fun >= cost[k] * (1 - 1e-6)
        assert abs(direct.x[0] - psi[k]) < 0.05 and abs(direct.x[1] - r2[k]) < 0.5
        steps = np.array([1e-4, 1e-3, 1e-6, 1e-6, 1e-6, 1e-6])
        columns = [(model(start + np.eye(6)[i] * h) - model(start - np.eye(6)[i] * h)) / (2 * h)
                   for i, h in enumerate(steps)]
        jac = np.concatenate([np.real(columns), np.imag(columns)], axis=1).T
        covariance = np.linalg.inv(jac.T @ jac)
        np.testing.assert_allclose([var_psi[k], var_r2[k]], np.diag(covariance)[:2], rtol=1e-3)


def test_low_field_in_vivo_slice_has_no_runaway_voxel():
    """marcsous/pdff 0.35 T in vivo slice (6 echoes, 3.9 ms apart): one voxel's refinement
    used to walk from -31 Hz to -17.5 kHz."""
    path = shared_data("fatwater_slices") / "invivo.mat"
    data = scipy.io.loadmat(str(path))
    signal = data["data"].astype(np.complex64)[:, :, None, :]
    echo_times = np.ravel(data["te"]).astype(float)
    mask = body_mask(np.abs(signal), voxel_size=(1.5, 1.5, 5.0))
    result = wf.separate(signal, echo_times, mask, b0_tesla=float(np.ravel(data["Tesla"])[0]),
                         voxel_size=(1.5, 1.5, 5.0), fat_model="ismrm")
    assert np.abs(result.field_hz[mask]).max() < 1000


def test_fat_fraction_by_magnitude_discrimination_removes_the_noise_bias():
    """At SNR 20, 100 |F| / (|W| + |F|) puts pure water at 2.9% and pure fat at 98.0% (noise
    adds to the smaller amplitude); magnitude discrimination: 0.9% and 99.3%. Without noise
    both are exact."""
    rng = np.random.default_rng(0)
    te = np.asarray(UNIFORM_TE)
    c = wf.fat_signal(te, B0, "ismrm")
    shape = (64, 64, 1, te.size)
    for fraction in (0.0, 0.3, 1.0):
        clean = ((1 - fraction) + fraction * c) * np.exp((-30 + 2j * np.pi * 15) * te)
        noise = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / 20 / np.sqrt(2)
        signal = (np.broadcast_to(clean, noise.shape) + noise).astype(np.complex64)
        result = wf.separate(signal, te, np.ones(shape[:3], bool), b0_tesla=B0,
                             voxel_size=(1, 1, 1))
        plain = 100 * np.abs(result.fat) / (np.abs(result.water) + np.abs(result.fat))
        bias, plain_bias = result.pdff.mean() - 100 * fraction, plain.mean() - 100 * fraction
        assert abs(bias) < 1.2, bias
        if fraction in (0.0, 1.0):
            assert abs(bias) < 0.5 * abs(plain_bias), (bias, plain_bias)
    water = np.array([1.0, 0.7, 0.0, 0.0]) * np.exp(0.4j)
    fat = np.array([0.0, 0.3, 0.5, 0.0]) * np.exp(0.4j)
    np.testing.assert_allclose(wf.fat_fraction(water, fat), [0.0, 30.0, 100.0, 0.0], atol=1e-4)


def test_water_and_fat_out_of_phase_keep_the_plain_fat_fraction():
    """Magnitude discrimination reads 0 or 100 where water and fat lie more than 90 degrees
    apart (|W + F| nearly cancels; ISMRM 2012 case 12's boundary voxels); where the smaller
    amplitude is well above the noise the plain ratio is kept. Noise-level minors, and
    amplitudes in phase, keep magnitude discrimination."""
    rng = np.random.default_rng(3)
    te = np.asarray(UNIFORM_TE)
    c = wf.fat_signal(te, B0, "ismrm")
    shape = (32, 32, 1, te.size)
    for angle, expected in ((150.0, 40.0), (0.0, 40.0)):
        amplitudes = 0.6 + 0.4 * np.exp(1j * np.deg2rad(angle)) * c
        clean = amplitudes * np.exp((-30 + 2j * np.pi * 15) * te)
        noise = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / 50 / np.sqrt(2)
        signal = (np.broadcast_to(clean, noise.shape) + noise).astype(np.complex64)
        result = wf.separate(signal, te, np.ones(shape[:3], bool), b0_tesla=B0,
                             voxel_size=(1, 1, 1))
        discrimination = wf.fat_fraction(result.water, result.fat)
        assert abs(np.median(result.pdff) - expected) < 2.0, (angle, np.median(result.pdff))
        if angle > 90:
            assert np.median(discrimination) < 5.0  # what the plain ratio avoids
    # the minor 40, 0.4, 5 and 2 standard deviations from 0, all 150 degrees from the major
    water = np.array([0.6, 0.6, 1.0, 1.0])
    fat = np.array([0.4, 0.4, 0.05, 0.02]) * np.exp(1j * np.deg2rad(150))
    sd = np.array([0.01, 1.0, 0.01, 0.01])
    plain = 100 * np.abs(fat) / (np.abs(water) + np.abs(fat))
    both = wf.fat_fraction(water, fat, water_sd=sd, fat_sd=sd)
    np.testing.assert_allclose(both[[0, 2]], plain[[0, 2]], atol=1e-4)
    np.testing.assert_allclose(both[[1, 3]], 0.0)  # noise-level minors: discrimination
    np.testing.assert_allclose(wf.fat_fraction(water, fat), 0.0)  # without the sds


def test_slice_and_toolbox_layouts_and_the_default_mask():
    """One slice ``[x, y, echo]`` (2D mask, in-plane voxel size) and the ISMRM 2012 toolbox's
    ``[x, y, z, coil=1, echo]`` give the ``[x, y, z, echo]`` result in the caller's shape;
    without a mask the body mask of the magnitudes is fitted and returned."""
    signal, mask, field, pdff, _ = _volume(UNIFORM_TE, shape=(40, 40, 4))
    reference = _run(signal, UNIFORM_TE, mask)
    toolbox = _run(signal[:, :, :, None, :], UNIFORM_TE, mask)
    for name in ("field_hz", "pdff", "r2star", "water", "mask"):
        np.testing.assert_array_equal(getattr(toolbox, name), getattr(reference, name))
    one = signal[:, :, 1]
    single = wf.separate(one, UNIFORM_TE, mask[:, :, 1], b0_tesla=B0, voxel_size=(2.0, 2.0))
    stacked = _run(one[:, :, None], UNIFORM_TE, mask[:, :, 1:2])
    assert single.pdff.shape == single.field_hz.shape == (40, 40)
    np.testing.assert_array_equal(single.pdff, stacked.pdff[:, :, 0])
    assert np.median(np.abs(single.field_hz - field[:, :, 1])[mask[:, :, 1]]) < 1.0
    automatic = _run(signal, UNIFORM_TE, None)
    assert automatic.mask.dtype == bool
    assert np.mean(automatic.mask == mask) > 0.99  # measured: identical
    inside = automatic.mask & mask
    assert np.mean(np.abs(automatic.pdff - pdff)[inside]) < 2.0
    assert not automatic.pdff[~automatic.mask].any()
    with pytest.raises(ValueError, match="2 coils"):
        _run(np.repeat(signal[:, :, :, None, :], 2, axis=3), UNIFORM_TE, mask)


def test_rc2_head_with_fat_is_close_to_the_oracle():
    """A realistic head (RC2 with subcutaneous fat and skull marrow, fields from its air
    spaces, signals averaged from 1 mm to 2 mm, 3 T, 6 echoes, SNR 40): the graph cut is
    within 0.3 PDFF points of the oracle (the VARPRO minimum nearest the true field) and
    leaves no swapped region (measured: MAE 1.37 against 1.35, largest patch 12 voxels,
    0.21% of the tissue off by > 30 points, nearly all next to air)."""
    from qsmprep.datasets.rc2 import rc2_phantom
    from qsmprep.simulate.rc2 import add_head_fat, simulate_waterfat_head

    head = rc2_phantom(shared_data("rc2_head_phantom"), voxel_size=(1.0, 1.0, 1.0),
                       shell_mm=0.0)
    head, pdff = add_head_fat(head.crop((slice(None), slice(None), slice(6, None))))
    assert 0.05 < np.mean(pdff[head.m0 > 0.2] > 0) < 0.3  # fat in 5-30% of the tissue
    te = UNIFORM_TE
    sim = simulate_waterfat_head(head, pdff, te, b0_tesla=3.0, snr=40.0, seed=1)
    tissue = sim.proton_density > 0.2
    assert np.percentile(np.abs(sim.field_hz[tissue]), 99) > 150  # strong fields at the air
    result = wf.separate(sim.signal, te, tissue, b0_tesla=3.0, voxel_size=sim.voxel_size,
                         fat_model="ismrm")
    c = wf.fat_signal(te, 3.0, "ismrm")
    _, _, water, fat, *_ = wf.varpro_refine(sim.signal[tissue], te, c, sim.field_hz[tissue],
                                            np.full(int(tissue.sum()), 50.0),
                                            max_shift_hz=40.0)
    error = np.abs(result.pdff - sim.pdff)[tissue]
    oracle = np.abs(wf.fat_fraction(water, fat) - sim.pdff[tissue])
    assert error.mean() <= oracle.mean() + 0.3, (error.mean(), oracle.mean())
    wrong = np.zeros(tissue.shape, dtype=bool)
    wrong[tissue] = error > 30
    labels, count = ndimage.label(wrong)
    assert count == 0 or np.bincount(labels[wrong]).max() <= 40
    assert np.mean(error > 30) < 0.005


def test_a_frequency_given_for_the_field_is_refused():
    te = np.asarray(UNIFORM_TE)
    signal = np.ones((4, 4, 2, te.size), np.complex64)
    with pytest.raises(ValueError, match="127.7 MHz is the proton frequency at 3 T"):
        wf.separate(signal, te, None, b0_tesla=127.7, voxel_size=(1, 1, 1))
