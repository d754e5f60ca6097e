"""R2*/T2*/S0 mapping (qsmprep.recon.relaxometry) against known mono-exponential decay."""

import numpy as np
import pytest

from qsmprep.recon import relaxometry


def decay(r2star_levels, echo_times, snr=100.0, s0=1000.0, shape=(8, 30, 20), seed=0):
    """Magnitude with R2* varying along x (one level per x index); complex Gaussian noise,
    SNR = S(TE1) / sigma per voxel."""
    rng = np.random.default_rng(seed)
    r2 = np.broadcast_to(np.asarray(r2star_levels, float)[:, None, None],
                         (len(r2star_levels),) + shape[1:])
    times = np.asarray(echo_times)
    signal = s0 * np.exp(-r2[..., None] * times)
    sigma = s0 * np.exp(-r2[..., None] * times[0]) / snr
    noisy = signal + sigma * (rng.normal(size=signal.shape) + 1j * rng.normal(size=signal.shape))
    return np.abs(noisy).astype(np.float32), r2, np.ones(r2.shape, bool)


LEVELS = [10.0, 20.0, 35.0, 50.0, 70.0, 100.0]
UNIFORM = np.arange(1, 7) * 0.005  # 5 ... 30 ms


@pytest.mark.parametrize("method", ["nlls", "loglinear", "arlo"])
def test_recovers_known_r2star(method):
    magnitude, truth, mask = decay(LEVELS, UNIFORM, shape=(6, 30, 20))
    r2, s0 = relaxometry.r2star(magnitude, UNIFORM, mask, method=method)
    assert r2.dtype == np.float32 and s0.dtype == np.float32
    for index, level in enumerate(LEVELS):
        # unbiased: region mean within 1 %; per-voxel error within a few %
        assert abs(np.mean(r2[index]) / level - 1) < 0.01
        assert np.median(np.abs(r2[index] / level - 1)) < 0.05
        assert abs(np.median(s0[index]) / 1000 - 1) < 0.01


def test_nlls_default_nonuniform_echoes_and_accuracy_ranking():
    times = np.array([0.003, 0.006, 0.010, 0.015, 0.022, 0.030])
    magnitude, truth, mask = decay(LEVELS, times, snr=100, shape=(6, 30, 20), seed=1)
    r2, _ = relaxometry.r2star(magnitude, times, mask)  # default method
    error_nlls = np.sqrt(np.mean((r2 / truth - 1) ** 2))
    assert error_nlls < 0.03
    r2_log, _ = relaxometry.r2star(magnitude, times, mask, method="loglinear")
    assert error_nlls <= np.sqrt(np.mean((r2_log / truth - 1) ** 2)) * 1.02
    with pytest.raises(ValueError, match="equally spaced"):
        relaxometry.r2star(magnitude, times, mask, method="arlo")


def test_clipping_mask_and_t2star():
    times = UNIFORM[:4]
    magnitude, _, mask = decay([50.0], times, shape=(1, 4, 4))
    magnitude = magnitude.copy()
    magnitude[0, 0, 0] = [1.0, 2.0, 4.0, 8.0]  # growing signal -> R2* clipped at 0
    mask[0, 3, 3] = False
    for method in ("nlls", "loglinear", "arlo"):
        r2, s0 = relaxometry.r2star(magnitude, times, mask, method=method)
        assert r2[0, 0, 0] == 0 and s0[0, 0, 0] > 0
        assert r2[0, 3, 3] == 0 and s0[0, 3, 3] == 0
        assert np.all((r2 >= relaxometry.R2STAR_RANGE[0]) & (r2 <= relaxometry.R2STAR_RANGE[1]))
    # R2* = 5000 1/s on ultra-short echoes is clipped to the maximum
    short = np.array([1e-4, 3e-4, 5e-4, 7e-4])
    fast = (1000 * np.exp(-5000 * short)).astype(np.float32)[None, None, None, :]
    for method in ("nlls", "loglinear", "arlo"):
        r2, s0 = relaxometry.r2star(fast, short, np.ones((1, 1, 1), bool), method=method)
        assert r2[0, 0, 0] == relaxometry.R2STAR_RANGE[1] and s0[0, 0, 0] > 0
    t2 = relaxometry.t2star_from_r2star(np.array([0.0, -5.0, 20.0, 50.0], np.float32))
    assert t2.dtype == np.float32
    assert np.allclose(t2, [0.0, 0.0, 0.05, 0.02])


def test_argument_errors():
    magnitude, _, mask = decay([20.0], UNIFORM, shape=(1, 3, 3))
    with pytest.raises(ValueError, match="choose"):
        relaxometry.r2star(magnitude, UNIFORM, mask, method="magic")
    with pytest.raises(ValueError, match="ms"):
        relaxometry.r2star(magnitude, UNIFORM * 1000, mask)
    with pytest.raises(ValueError, match="echo times"):
        relaxometry.r2star(magnitude, UNIFORM[:3], mask)
    with pytest.raises(ValueError, match="two echoes"):
        relaxometry.r2star(magnitude[..., :1], UNIFORM[:1], mask)
    with pytest.raises(ValueError, match="three"):
        relaxometry.r2star(magnitude[..., :2], UNIFORM[:2], mask, method="arlo")
