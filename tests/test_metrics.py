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
