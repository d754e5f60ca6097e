"""Accuracy metrics: identities, scalings, demeaning and error handling."""

from __future__ import annotations

import numpy as np
import pytest

from qsmprep.analysis import metrics


def _maps(shape=(40, 40, 40), seed=0):
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = x**2 + y**2 + z**2 < 0.8
    ref = 0.1 * np.sin(4 * x) * np.cos(3 * y) + 0.05 * (z > 0.2) + 0.02
    ref = ref + 0.002 * rng.standard_normal(shape)
    labels = np.zeros(shape, dtype=int)
    labels[(x < -0.2) & mask] = 1
    labels[(x > 0.2) & mask] = 2
    labels[(np.abs(x) <= 0.2) & (y > 0.3) & mask] = 3
    labels[(np.abs(x) <= 0.2) & (y < -0.3) & mask] = 4
    return ref.astype(np.float32), mask, labels


def test_identities():
    ref, mask, labels = _maps()
    assert metrics.nrmse(ref, ref, mask) == pytest.approx(0.0, abs=1e-9)
    assert metrics.detrended_nrmse(ref, ref, mask) == pytest.approx(0.0, abs=1e-6)
    assert metrics.hfen(ref, ref, mask) == pytest.approx(0.0, abs=1e-9)
    assert metrics.xsim(ref, ref, mask) == pytest.approx(1.0, abs=1e-9)
    slope, intercept = metrics.roi_slope(ref, ref, labels, [1, 2, 3, 4])
    assert slope == pytest.approx(1.0, abs=1e-9)
    assert intercept == pytest.approx(0.0, abs=1e-9)


def test_scaled_input_gives_known_errors():
    ref, mask, labels = _maps()
    # demeaned NRMSE of a*ref is exactly 100|a-1|
    for a in (0.5, 0.8, 1.3):
        assert metrics.nrmse(a * ref, ref, mask) == pytest.approx(100 * abs(a - 1), rel=1e-6)
        assert metrics.hfen(a * ref, ref, mask) == pytest.approx(100 * abs(a - 1), rel=1e-6)
        # detrending removes any linear scaling
        assert metrics.detrended_nrmse(a * ref + 0.3, ref, mask) == pytest.approx(0, abs=1e-3)
        slope, intercept = metrics.roi_slope(a * ref + 0.01, ref, labels, [1, 2, 3, 4])
        assert slope == pytest.approx(a, rel=1e-6)
        assert intercept == pytest.approx(0.01, abs=1e-6)
    # XSIM falls with a contrast change, and falls more for a larger one
    assert metrics.xsim(0.8 * ref, ref, mask) < metrics.xsim(0.9 * ref, ref, mask) < 1.0
    # NRMSE of pure noise added: ||n|| / ||ref|| with everything demeaned
    rng = np.random.default_rng(1)
    noise = 0.01 * rng.standard_normal(ref.shape).astype(np.float32)
    r = ref[mask] - ref[mask].mean()
    n = noise[mask] - noise[mask].mean()
    expected = 100 * np.linalg.norm(n) / np.linalg.norm(r)
    assert metrics.nrmse(ref + noise, ref, mask) == pytest.approx(expected, rel=1e-5)


def test_demeaning():
    ref, mask, _ = _maps()
    shifted = ref + 0.05
    assert metrics.nrmse(shifted, ref, mask) == pytest.approx(0.0, abs=1e-4)
    assert metrics.xsim(shifted, ref, mask) == pytest.approx(1.0, abs=1e-6)
    raw = metrics.nrmse(shifted, ref, mask, demean=False)
    expected = 100 * 0.05 * np.sqrt(mask.sum()) / np.linalg.norm(ref[mask].astype(np.float64))
    assert raw == pytest.approx(expected, rel=1e-4)
    # without demeaning XSIM sees the offset through its luminance term
    assert metrics.xsim(shifted, ref, mask, demean=False) < 0.999
    # voxels outside the mask never matter
    other = ref.copy()
    other[~mask] = 10.0
    assert metrics.nrmse(other, ref, mask) == pytest.approx(0.0, abs=1e-9)
    assert metrics.hfen(other, ref, mask) == pytest.approx(0.0, abs=1e-9)
    assert metrics.xsim(other, ref, mask) == pytest.approx(1.0, abs=1e-9)


def test_hfen_sees_high_frequencies_more_than_nrmse():
    ref, mask, _ = _maps()
    x = np.linspace(-1, 1, ref.shape[0])[:, None, None] * np.ones(ref.shape)
    i = np.arange(ref.shape[0])
    # period 6 voxels: near the peak of the LoG (sigma 1.5 voxels) pass band
    rough = np.sin(2 * np.pi * i / 6)[:, None, None] * np.sin(2 * np.pi * i / 6)[None, :, None]
    rough = rough * np.ones(ref.shape)
    # two errors with the same (demeaned) norm in the mask: a ramp and a fine pattern
    smooth = x - x[mask].mean()
    rough = rough - rough[mask].mean()
    smooth *= 0.01 / np.linalg.norm(smooth[mask])
    rough *= 0.01 / np.linalg.norm(rough[mask])
    n_s = metrics.nrmse(ref + smooth, ref, mask)
    n_r = metrics.nrmse(ref + rough, ref, mask)
    assert n_s == pytest.approx(n_r, rel=1e-3)
    # measured ratio 1.95 (the masked ramp still has a step at the mask edge)
    assert metrics.hfen(ref + rough, ref, mask) > 1.5 * metrics.hfen(ref + smooth, ref, mask)
    assert metrics.xsim(ref + rough, ref, mask) < metrics.xsim(ref + smooth, ref, mask)


def test_log_kernel():
    k = metrics.log_kernel(15, 1.5)
    assert k.shape == (15, 15, 15)
    assert abs(k.sum()) < 1e-12
    assert k[7, 7, 7] == k.min() < 0  # negative centre
    np.testing.assert_allclose(k, np.transpose(k, (1, 0, 2)))


def test_errors():
    ref, mask, labels = _maps()
    with pytest.raises(ValueError, match="share one shape"):
        metrics.nrmse(ref, ref[:-1], mask)
    with pytest.raises(ValueError, match="empty"):
        metrics.nrmse(ref, ref, np.zeros_like(mask))
    with pytest.raises(ValueError, match="zero"):
        metrics.nrmse(ref, np.full_like(ref, 0.3), mask)
    with pytest.raises(ValueError, match="absent"):
        metrics.roi_slope(ref, ref, labels, [1, 9])
    with pytest.raises(ValueError, match="two"):
        metrics.roi_slope(ref, ref, labels, [1])


def test_detrended_nrmse_is_the_challenge_fit_of_ref_on_chi():
    # compute_rmse_detrend_v0.m: P = polyfit(chi, ref, 1) on demeaned maps, res = P(chi)
    ref, mask, _ = _maps()
    rng = np.random.default_rng(3)
    chi = 0.6 * ref + 0.01 + 0.01 * rng.standard_normal(ref.shape)
    c = chi[mask] - chi[mask].mean()
    r = ref[mask].astype(np.float64) - ref[mask].mean()
    fit = np.polyval(np.polyfit(c, r, 1), c)
    expected = 100 * np.linalg.norm(fit - r) / np.linalg.norm(r)
    assert metrics.detrended_nrmse(chi, ref, mask) == pytest.approx(expected, rel=1e-6)
    # removing the fitted scaling never increases the error
    assert metrics.detrended_nrmse(chi, ref, mask) < metrics.nrmse(chi, ref, mask)


def _calcified(shape=(48, 48, 48), calc_ppm=-3.0):
    """Smooth anatomy (a ramp) with a 3x3x3 calcification in the middle."""
    x = np.arange(shape[0])[:, None, None] * np.ones(shape)
    ref = 0.002 * (x - shape[0] / 2) + 0.01
    calc = np.zeros(shape, dtype=bool)
    calc[22:25, 22:25, 22:25] = True
    ref = np.where(calc, calc_ppm, ref)
    return ref, calc


def test_calcification_regions_follow_the_challenge_boxes():
    _, calc = _calcified()
    cube, rim, surround = metrics.calcification_regions(calc, voxel_size=(1, 1, 1))
    # bounding box 3^3 grown by 3, 3+4 and 3+4+4 voxels at 1 mm
    assert cube.sum() == 9**3
    assert rim.sum() == 17**3 - 9**3
    assert surround.sum() == 25**3 - 9**3
    assert not (cube & rim).any() and not (cube & surround).any()
    # margins are in mm: at 2 mm voxels 3 mm -> 2 voxels (rounded), 4 mm -> 2 voxels
    cube2, rim2, _ = metrics.calcification_regions(calc, voxel_size=(2, 2, 2))
    assert cube2.sum() == 7**3 and rim2.sum() == 11**3 - 7**3


def test_calcification_moment_error_known_values():
    ref, calc = _calcified()
    vox = (0.5, 0.5, 0.5)
    # the moment is chi summed over the region times the voxel volume (ppm mm^3)
    assert metrics.calcification_moment(ref, calc, voxel_size=vox) == pytest.approx(
        -3.0 * 27 * 0.125)
    assert metrics.calcification_moment_error(ref, ref, calc, voxel_size=vox) == 0.0
    # a calcification at half its susceptibility: 50 % error, 0.5 * 81 * 0.125 absolute
    half = np.where(calc, 0.5 * ref, ref)
    assert metrics.calcification_moment_error(half, ref, calc, voxel_size=vox) == (
        pytest.approx(0.5))
    assert metrics.calcification_moment_error(
        half, ref, calc, voxel_size=vox, relative=False) == pytest.approx(0.5 * 81 * 0.125)
    # blurred over twice the volume at half the value: the moment is kept
    spread = ref.copy()
    spread[22:25, 22:25, 21:27] = np.where(calc[22:25, 22:25, 21:27], -1.5, -1.5)
    assert metrics.calcification_moment_error(spread, ref, calc, voxel_size=vox) == (
        pytest.approx(0.0, abs=1e-9))
    # the adaptive threshold: a -0.2 ppm artefact outside the cube moves the threshold to
    # -0.2, so a -0.1 ppm blur halo inside the cube is not counted
    halo = ref.copy()
    halo[21, 22:25, 22:25] = -0.1
    halo[12, 23, 23] = -0.2  # in the surround, outside the cube
    seg = metrics.calcification_segment(halo, calc, voxel_size=(1, 1, 1))
    assert seg.sum() == 27 and (seg == calc).all()
    assert metrics.calcification_segment(ref, calc, voxel_size=(1, 1, 1))[21, 23, 23] == (
        False)
    # no calcification visible: the whole moment is missing
    flat = np.where(calc, 0.05, ref)
    assert metrics.calcification_moment_error(flat, ref, calc, voxel_size=vox) == 1.0
    # a sub-voxel calcification: the label holds one voxel, partial volume spreads the rest
    # of its moment over the 6 neighbours; the reference moment counts them too
    anatomy, _ = _calcified(calc_ppm=0.0)
    anatomy = np.where(calc, 0.002 * (np.arange(48)[:, None, None] - 24) + 0.01, anatomy)
    pv = anatomy.copy()
    centre = np.zeros_like(calc)
    centre[23, 23, 23] = True
    pv[23, 23, 23] = -2.0
    for axis in range(3):
        for d in (-1, 1):
            idx = [23, 23, 23]
            idx[axis] += d
            pv[tuple(idx)] = -0.5
    assert metrics.calcification_moment_error(pv, pv, centre, voxel_size=vox) == 0.0
    core_only = pv.copy()
    halo = np.abs(pv + 0.5) < 1e-9
    core_only[halo] = anatomy[halo]
    # the map misses the 6 x -0.5 ppm halo: 3 of the 5 ppm voxel moment
    assert metrics.calcification_moment_error(core_only, pv, centre, voxel_size=vox) == (
        pytest.approx(3.0 / 5.0, rel=1e-9))
    # a paramagnetic inclusion is handled by its sign
    para = np.where(calc, 2.0, ref)
    assert metrics.calcification_moment_error(
        np.where(calc, 1.0, para), para, calc, voxel_size=vox) == pytest.approx(0.5)


def test_calcification_streaking_known_values():
    ref, calc = _calcified()
    vox = (1.0, 1.0, 1.0)
    assert metrics.calcification_streaking(ref, ref, calc, voxel_size=vox) == (
        pytest.approx(0.0, abs=1e-9))
    # any linear rescaling of the anatomy is regressed out
    scaled = np.where(calc, ref, 0.5 * ref + 0.02)
    assert metrics.calcification_streaking(scaled, ref, calc, voxel_size=vox) == (
        pytest.approx(0.0, abs=1e-9))
    # a streak pattern of known amplitude, normalised by the calcification's mean (-3 ppm)
    _, rim, _ = metrics.calcification_regions(calc, voxel_size=vox)
    i, j, _ = np.indices(ref.shape)
    pattern = np.where(rim, 0.03 * np.cos(np.arctan2(j - 23, i - 23) * 4), 0.0)
    streaked = ref + pattern
    x = ref[rim]
    design = np.stack([x, np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(design, streaked[rim], rcond=None)
    expected = np.std(streaked[rim] - design @ coef, ddof=1) / 3.0
    assert expected > 0.005
    got = metrics.calcification_streaking(streaked, ref, calc, voxel_size=vox)
    assert got == pytest.approx(expected, rel=1e-9)
    # the same streaks around a calcification reconstructed at half its value count double
    faded = np.where(calc, 0.5 * ref, streaked)
    assert metrics.calcification_streaking(faded, ref, calc, voxel_size=vox) == (
        pytest.approx(2 * expected, rel=1e-9))
    # a constant offset of the whole map (the unobservable mean) changes nothing with a mask
    mask = np.ones(ref.shape, dtype=bool)
    assert metrics.calcification_streaking(streaked + 0.3, ref, calc, voxel_size=vox,
                                           mask=mask) == pytest.approx(
        metrics.calcification_streaking(streaked, ref, calc, voxel_size=vox, mask=mask))
    assert metrics.calcification_moment_error(ref + 0.3, ref, calc, voxel_size=vox,
                                              mask=mask) == pytest.approx(0, abs=1e-9)
    # nothing visible: undefined
    flat = np.where(calc, 0.05, ref)
    assert np.isnan(metrics.calcification_streaking(flat, ref, calc, voxel_size=vox))


def test_calcification_errors():
    ref, calc = _calcified()
    with pytest.raises(ValueError, match="calc_mask is empty"):
        metrics.calcification_streaking(ref, ref, np.zeros_like(calc), voxel_size=(1, 1, 1))
    with pytest.raises(ValueError, match="voxel_size"):
        metrics.calcification_moment_error(ref, ref, calc, voxel_size=(1, 1))
    with pytest.raises(ValueError, match="shape"):
        metrics.calcification_streaking(ref[:-1], ref, calc, voxel_size=(1, 1, 1))
    with pytest.raises(ValueError, match="zero"):
        metrics.calcification_moment_error(ref, np.where(calc, 0.0, ref), calc,
                                           voxel_size=(1, 1, 1))
