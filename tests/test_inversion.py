"""Dipole inversion against a forward-simulated phantom with known susceptibility.

Phantom (tests/_phantoms.py): brain-like mask with white matter (-0.03 ppm), deep grey
nuclei (0.05-0.15 ppm), a vein (0.3 ppm) and a calcification (-0.2 ppm); the local field is
simulated on a 2x finer grid and block-averaged (no inverse crime), plus Gaussian noise of
0.001 ppm / magnitude. Inversions use their default parameters.

Measured NRMSE % (TKD / L2 / TV), demeaned in the mask, two noise seeds agree to 0.2
(referencing, qsmprep.recon.reference, is tested here too):
  64^3 2 mm iso        42.1 / 30.3 / 13.0   (TV: HFEN 9.1, XSIM 0.961, DGM slope 0.95)
  64x64x48 2x2x2.5 mm  42.9 / 31.4 / 14.4
  64^3 oblique 20 deg  42.4 / 34.9 / 14.0   (wrong B0 direction: 73.5 / 70.0 / 77.9)
  96^3 1.5 mm iso      41.2 / 28.7 / 11.3
  QSM challenge 2.0 head labels at 2.56 mm (skipped without ../shared/data):
                       58.0 / 53.2 / 38.5   (noise 0.002 ppm / magnitude)
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft

from qsmprep.analysis import metrics
from qsmprep.recon import inversion
from _phantoms import RC2_DGM, brain_phantom, rc2_phantom

B20 = (0.0, float(np.sin(np.radians(20))), float(np.cos(np.radians(20))))
GEOMETRIES = {
    "iso": dict(shape=(64, 64, 64), voxel_size=(2.0, 2.0, 2.0)),
    "aniso": dict(shape=(64, 64, 48), voxel_size=(2.0, 2.0, 2.5)),
    "oblique": dict(shape=(64, 64, 64), voxel_size=(2.0, 2.0, 2.0), b0_direction=B20),
}
MAX_NRMSE = {"tkd": 50.0, "l2": 40.0, "tv": 18.0}


@pytest.fixture(autouse=True)
def _two_fft_workers():
    with scipy.fft.set_workers(2):
        yield


def _run(p, method, field=None, **kw):
    field = p.local_noisy() if field is None else field
    kw.setdefault("b0_direction", p.b0_direction)
    return inversion.invert(
        field, p.mask, voxel_size=p.voxel_size, method=method, magnitude=p.magnitude, **kw
    )


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_accuracy_and_ranking(geometry):
    p = brain_phantom(**GEOMETRIES[geometry])
    errors = {}
    for method in ("tkd", "l2", "tv"):
        chi = _run(p, method)
        assert chi.dtype == np.float32 and chi.shape == p.mask.shape
        assert np.all(chi[~p.mask] == 0) and np.all(np.isfinite(chi))
        errors[method] = metrics.nrmse(chi, p.chi, p.mask)
        assert errors[method] < MAX_NRMSE[method], (method, errors[method])
    assert errors["tv"] < errors["l2"] < errors["tkd"]
    assert errors["tv"] < 0.5 * errors["l2"]


def test_tv_quality_metrics_at_96():
    p = brain_phantom(shape=(96, 96, 96), voxel_size=(1.5, 1.5, 1.5))
    chi = _run(p, "tv")
    assert metrics.nrmse(chi, p.chi, p.mask) < 15.0  # measured 11.3
    assert metrics.hfen(chi, p.chi, p.mask) < 12.0  # 7.9
    assert metrics.xsim(chi, p.chi, p.mask) > 0.94  # 0.969
    slope, _ = metrics.roi_slope(chi, p.chi, p.labels, [1, 2, 3, 4, 5])
    assert abs(1 - slope) < 0.1  # 0.954


def test_rc2_head_phantom():
    """Realistic anatomy: QSM challenge 2.0 labels, forward-simulated (skips without data)."""
    from conftest import shared_data

    folder = shared_data("rc2_head_phantom", "from_neuropoly_SSP")
    p = rc2_phantom(str(folder), 4)
    errors = {}
    for method, limit in [("tkd", 65.0), ("l2", 60.0), ("tv", 45.0)]:
        chi = inversion.invert(
            p.local_noisy(), p.mask, voxel_size=p.voxel_size, b0_direction=p.b0_direction,
            method=method, noise=p.noise_std,
        )
        errors[method] = metrics.nrmse(chi, p.chi, p.mask)
        assert errors[method] < limit, (method, errors[method])
    assert errors["tv"] < errors["l2"] < errors["tkd"]
    slope, _ = metrics.roi_slope(chi, p.chi, p.labels, RC2_DGM)
    assert abs(1 - slope) < 0.1  # measured 0.955
    assert metrics.xsim(chi, p.chi, p.mask) > 0.8  # 0.835


def test_oblique_b0_must_be_used():
    p = brain_phantom(**GEOMETRIES["oblique"])
    for method in ("tkd", "l2", "tv"):
        right = metrics.nrmse(_run(p, method), p.chi, p.mask)
        wrong = metrics.nrmse(_run(p, method, b0_direction=(0, 0, 1)), p.chi, p.mask)
        assert wrong > 1.5 * right, method


def test_sign_and_linearity():
    p = brain_phantom(**GEOMETRIES["iso"])
    f = p.local_noisy()
    for method in ("tkd", "l2"):
        a = _run(p, method, field=f)
        np.testing.assert_allclose(_run(p, method, field=-2 * f), -2 * a, atol=1e-6)
    # TV is odd: chi(-f) = -chi(f)
    a = _run(p, "tv", field=f, max_iter=20)
    np.testing.assert_allclose(_run(p, "tv", field=-f, max_iter=20), -a, atol=1e-6)
    # a paramagnetic structure comes out positive
    gp = p.labels == 3
    assert _run(p, "tkd")[gp].mean() > 0.05


def test_l2_regularisers_and_tkd_threshold():
    p = brain_phantom(**GEOMETRIES["iso"])
    f = p.local_noisy()
    kw = dict(voxel_size=p.voxel_size, b0_direction=p.b0_direction)
    for reg, limit in [("gradient", 42.0), ("laplacian", 45.0), ("identity", 55.0)]:
        lam = {"gradient": 0.02, "laplacian": 0.1, "identity": 0.01}[reg]
        chi = inversion.closed_form_l2(f, p.mask, lam=lam, regulariser=reg, **kw)
        assert metrics.nrmse(chi, p.chi, p.mask) < limit, reg
    # heavy regularisation shrinks contrast: the DGM slope falls
    s_small = metrics.roi_slope(
        inversion.closed_form_l2(f, p.mask, lam=0.01, **kw), p.chi, p.labels, [2, 3, 4]
    )[0]
    s_big = metrics.roi_slope(
        inversion.closed_form_l2(f, p.mask, lam=1.0, **kw), p.chi, p.labels, [2, 3, 4]
    )[0]
    assert s_big < 0.5 * s_small
    # lam = 0 with the identity is plain division (== TKD with a tiny threshold on the
    # well-conditioned part); TKD with a larger threshold underestimates more
    t1 = inversion.tkd(f, p.mask, threshold=0.1, **kw)
    t2 = inversion.tkd(f, p.mask, threshold=0.4, **kw)
    s1 = metrics.roi_slope(t1, p.chi, p.labels, [2, 3, 4])[0]
    s2 = metrics.roi_slope(t2, p.chi, p.labels, [2, 3, 4])[0]
    assert s2 < s1


def test_tv_weights_and_edges():
    p = brain_phantom(**GEOMETRIES["iso"])
    f = p.local_noisy()
    kw = dict(voxel_size=p.voxel_size, b0_direction=p.b0_direction)
    for extra in (dict(noise=p.noise_std), dict(), dict(magnitude=p.magnitude, edge_fraction=0.1)):
        chi = inversion.tv_admm(f, p.mask, **kw, **extra)
        assert metrics.nrmse(chi, p.chi, p.mask) < 18.0, extra
    weights = inversion.data_weights(p.mask, noise=p.noise_std)
    assert weights[p.mask].mean() == pytest.approx(1.0, rel=1e-5)
    assert np.all(weights[~p.mask] == 0)
    rng = np.random.default_rng(0)
    noisy_mag = p.magnitude + 0.01 * rng.standard_normal(p.mask.shape).astype(np.float32)
    edges = inversion.edge_weights(noisy_mag, p.mask, voxel_size=p.voxel_size)
    assert (edges[p.mask] < 1).mean() == pytest.approx(0.1, abs=0.01)
    assert set(np.unique(edges[p.mask])) == {np.float32(0.1), np.float32(1.0)}
    # the strongest edges are the magnitude steps (e.g. around the white matter)
    flat = inversion.edge_weights(p.magnitude, p.mask, voxel_size=p.voxel_size)
    assert 0 < (flat[p.mask] < 1).mean() <= 0.1


def test_tv_stops_early_and_backends_agree():
    p = brain_phantom(**GEOMETRIES["iso"])
    f = p.local_noisy()
    kw = dict(voxel_size=p.voxel_size, b0_direction=p.b0_direction, magnitude=p.magnitude)
    loose = inversion.tv_admm(f, p.mask, tol=0.05, **kw)
    assert metrics.nrmse(loose, p.chi, p.mask) > metrics.nrmse(
        inversion.tv_admm(f, p.mask, **kw), p.chi, p.mask
    )
    pytest.importorskip("numba")
    a = inversion.tv_admm(f, p.mask, max_iter=15, backend="numba", **kw)
    b = inversion.tv_admm(f, p.mask, max_iter=15, backend="numpy", **kw)
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_dispatch_and_errors():
    p = brain_phantom(**GEOMETRIES["iso"])
    f = p.local_noisy()
    kw = dict(voxel_size=p.voxel_size, b0_direction=p.b0_direction)
    from typing import get_args

    from qsmprep.config import InversionMethod

    assert set(inversion.METHODS) == set(get_args(InversionMethod))  # every method on the CLI
    np.testing.assert_array_equal(
        inversion.invert(f, p.mask, method="tkd", threshold=0.2, magnitude=p.magnitude, **kw),
        inversion.tkd(f, p.mask, threshold=0.2, **kw),
    )
    np.testing.assert_array_equal(
        inversion.invert(f, p.mask, method="l2", lam=0.05, **kw),
        inversion.closed_form_l2(f, p.mask, lam=0.05, **kw),
    )
    with pytest.raises(ValueError, match="choose one of.*l2.*tkd.*tv"):
        inversion.invert(f, p.mask, method="magic", **kw)
    with pytest.raises(ValueError, match="does not accept.*lam"):
        inversion.invert(f, p.mask, method="tkd", lam=0.1, **kw)
    with pytest.raises(ValueError, match="regulariser"):
        inversion.closed_form_l2(f, p.mask, regulariser="tv", **kw)
    with pytest.raises(ValueError, match="lam"):
        inversion.tv_admm(f, p.mask, lam=-1.0, **kw)
    with pytest.raises(ValueError, match="threshold"):
        inversion.tkd(f, p.mask, threshold=0.0, **kw)
    with pytest.raises(ValueError, match="empty"):
        inversion.tkd(f, np.zeros_like(p.mask), **kw)
    with pytest.raises(ValueError, match="shape"):
        inversion.tkd(f[:-1], p.mask, **kw)
    with pytest.raises(ValueError, match="edge_fraction needs a magnitude"):
        inversion.tv_admm(f, p.mask, edge_fraction=0.1, **kw)
    with pytest.raises(ValueError, match="backend"):
        inversion.tv_admm(f, p.mask, backend="cuda", **kw)
    # NaNs in the field are ignored (treated as no data), the output stays finite
    g = f.copy()
    g[~p.mask] = np.nan
    assert np.all(np.isfinite(inversion.tkd(g, p.mask, **kw)))


def test_reference():
    from qsmprep.recon import reference as ref

    p = brain_phantom(**GEOMETRIES["iso"])
    chi = _run(p, "tkd") + np.float32(0.05) * p.mask
    out, offset = ref.reference(chi, p.mask)
    assert out.dtype == np.float32
    assert offset == pytest.approx(float(chi[p.mask].mean()), abs=1e-7)
    assert abs(out[p.mask].mean()) < 1e-6
    np.testing.assert_allclose(out[p.mask], chi[p.mask] - offset, atol=1e-7)
    assert np.all(out[~p.mask] == chi[~p.mask])
    # a named ROI (e.g. CSF) gets mean zero
    roi = p.labels == 2
    out, offset = ref.reference(chi, p.mask, method="roi", roi=roi)
    assert abs(out[roi].mean()) < 1e-6 and offset == pytest.approx(chi[roi].mean(), abs=1e-7)
    # referencing removes the unobservable offset: the truth referenced the same way matches
    truth_ref, _ = ref.reference(p.chi, p.mask, method="roi", roi=roi)
    assert metrics.nrmse(out, truth_ref, p.mask, demean=False) < 50.0
    out, offset = ref.reference(chi, p.mask, method="none")
    assert offset == 0.0 and np.array_equal(out, chi)
    assert set(ref.METHODS) == {"mean", "roi", "csf", "label", "water", "none"}
    with pytest.raises(ValueError, match="choose one of"):
        ref.reference(chi, p.mask, method="ventricles")
    with pytest.raises(ValueError, match="needs a boolean roi"):
        ref.reference(chi, p.mask, method="roi")
    with pytest.raises(ValueError, match="no voxels inside the mask"):
        ref.reference(chi, p.mask, method="roi", roi=~p.mask)
    with pytest.raises(ValueError, match="shape"):
        ref.reference(chi, p.mask[:-1])


def test_tv_lambda_scales_with_the_field_noise(caplog):
    """Without ``lam``, TV runs with 0.15 x the median field noise (ppm) in the mask; 2e-4
    without a noise map or when the noise is not plausibly in ppm (with a warning)."""
    p = brain_phantom(**GEOMETRIES["iso"])
    f = p.local_noisy()
    kw = dict(voxel_size=p.voxel_size, b0_direction=p.b0_direction, max_iter=20)
    sigma = float(np.median(p.noise_std[p.mask]))
    assert inversion.noise_scaled_lambda(p.noise_std, p.mask) == pytest.approx(0.15 * sigma)
    assert inversion.noise_scaled_lambda(2 * p.noise_std, p.mask) == pytest.approx(
        0.3 * sigma)
    assert inversion.noise_scaled_lambda(None, p.mask) == inversion.DEFAULT_TV_LAMBDA
    np.testing.assert_array_equal(
        inversion.tv_admm(f, p.mask, noise=p.noise_std, **kw),
        inversion.tv_admm(f, p.mask, noise=p.noise_std, lam=0.15 * sigma, **kw))
    assert inversion.default_lambda("tv", p.noise_std, p.mask) == pytest.approx(0.15 * sigma)
    assert inversion.default_lambda("nltv") == inversion.DEFAULT_TV_LAMBDA
    assert inversion.default_lambda("tkd") is None
    # noise in Hz (x 128 at 3 T) is not taken for ppm
    with caplog.at_level("WARNING", logger="qsmprep"):
        lam = inversion.noise_scaled_lambda(128 * p.noise_std, p.mask)
    assert lam == inversion.DEFAULT_TV_LAMBDA and "not a field noise in ppm" in caplog.text
