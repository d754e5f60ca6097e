"""Phase scaling, wrapping and non-finite handling (qsmprep.recon.phase)."""

import numpy as np
import pytest

from qsmprep.recon import phase


def test_wrap_interval_and_dtype():
    values = np.linspace(-20, 20, 100001).astype(np.float32)
    wrapped = phase.wrap(values)
    assert wrapped.dtype == np.float32
    assert wrapped.min() > -np.pi and wrapped.max() <= np.float32(np.pi)
    # wrapping changes values by exact multiples of 2 pi
    turns = (values.astype(np.float64) - wrapped) / (2 * np.pi)
    assert np.abs(turns - np.round(turns)).max() < 1e-5
    assert phase.wrap(np.pi) == pytest.approx(np.pi)
    assert phase.wrap(-np.pi) == pytest.approx(np.pi)
    assert phase.wrap(3 * np.pi) == pytest.approx(np.pi)
    assert phase.wrap(-0.5) == pytest.approx(-0.5)
    assert phase.wrap(np.array([7.0]))[0] == pytest.approx(7.0 - 2 * np.pi)


def test_arbitrary_rescales_globally_over_echoes():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 4096, size=(6, 5, 4, 3)).astype(np.int16)
    raw.flat[0], raw.flat[1] = 0, 4095
    raw[..., 2] //= 2  # echo 3 spans only half the range: must not be rescaled on its own
    rad = phase.to_radians(raw, "arbitrary")
    assert rad.dtype == np.float32 and rad.shape == raw.shape
    expected = phase.wrap(raw.astype(np.float64) / 4095 * 2 * np.pi - np.pi)
    diff = phase.wrap(rad - expected)
    assert np.abs(diff).max() < 1e-5
    # min -> -pi and max -> +pi are the same angle after wrapping
    assert abs(abs(rad.flat[0]) - np.pi) < 1e-6 and abs(abs(rad.flat[1]) - np.pi) < 1e-6
    assert rad.min() > -np.pi and rad.max() <= np.float32(np.pi)


def test_arbitrary_vendor_range_midpoint_is_zero():
    raw = np.array([-4096.0, 0.0, 4094.0])[None, None, :]
    rad = phase.to_radians(raw, "arbitrary")
    assert rad[0, 0, 1] == pytest.approx(np.pi * 2 / 8190 * 1, abs=1e-6)  # 4096/8190*2pi-pi
    assert abs(rad[0, 0, 0]) == pytest.approx(np.pi, abs=1e-6)


def test_rad_validation_and_tolerance():
    good = np.array([-np.pi, -1.0, 0.0, 3.1416, np.pi])[None, None, :]
    rad = phase.to_radians(good, "rad")
    assert rad.dtype == np.float32
    assert np.allclose(rad[0, 0, 1:4], [-1.0, 0.0, phase.wrap(3.1416)], atol=1e-6)
    with pytest.raises(ValueError, match="arbitrary"):
        phase.to_radians(np.array([0.0, 4095.0])[None, None, :], "rad")
    with pytest.raises(ValueError, match="units"):
        phase.to_radians(good, "degrees")
    with pytest.raises(ValueError):
        phase.to_radians(np.full((2, 2, 2), 7.0), "arbitrary")  # constant


def test_nan_handling_and_finite_mask():
    data = np.zeros((4, 4, 3, 2), dtype=np.float32)
    data[..., 0] = 1.0
    data[..., 1] = -1.0
    data[1, 2, 0, 1] = np.nan
    data[3, 3, 2, 0] = np.inf
    rad = phase.to_radians(data, "rad")
    assert np.isfinite(rad).all()
    assert rad[1, 2, 0, 1] == 0 and rad[3, 3, 2, 0] == 0
    magnitude = np.ones((4, 4, 3, 2), dtype=np.float32)
    magnitude[0, 0, 0, 0] = np.nan
    finite = phase.finite_mask(magnitude, data)
    assert finite.shape == (4, 4, 3) and finite.dtype == bool
    assert not finite[1, 2, 0] and not finite[3, 3, 2] and not finite[0, 0, 0]
    assert finite.sum() == 4 * 4 * 3 - 3
    with pytest.raises(ValueError):
        phase.finite_mask(np.zeros((4, 4, 3)), np.zeros((4, 4, 2)))
    # arbitrary scaling ignores non-finite values for min/max
    raw = np.array([0.0, 100.0, np.nan, 50.0])[None, None, :]
    rad = phase.to_radians(raw, "arbitrary")
    assert rad[0, 0, 2] == 0 and rad[0, 0, 3] == pytest.approx(0.0, abs=1e-6)


def test_infer_units():
    assert phase.infer_units(np.linspace(-3.14159, 3.14159, 50)) == "rad"
    assert phase.infer_units(np.arange(4096)) == "arbitrary"
    assert phase.infer_units(np.linspace(-0.0036, 0.0036, 50)) == "arbitrary"
