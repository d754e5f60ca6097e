"""SWI and sliding-slab projections (qsmprep.recon.swi) against known truth."""

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from qsmprep.recon import swi
from qsmprep.recon.phase import wrap

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TWO_PI = 2 * np.pi


# ---------------------------------------------------------------------------------------
# filters and phase mask
# ---------------------------------------------------------------------------------------


def test_hanning_window():
    shape, voxel = (32, 24, 20), (1.0, 1.0, 2.0)
    window = swi.hanning_window(shape, voxel, 8.0)
    assert window.shape == shape and window.dtype == np.float32
    assert window[0, 0, 0] == pytest.approx(1.0)
    k = np.fft.fftfreq(32, d=1.0)
    expected = np.where(np.abs(k) < 1 / 8, 0.5 * (1 + np.cos(np.pi * np.abs(k) * 8)), 0)
    assert np.allclose(window[:, 0, 0], expected, atol=1e-6)
    assert np.all(window[:, :, 0][np.abs(k) >= 1 / 8] == 0)
    in_plane = swi.hanning_window(shape, voxel, (8.0, 8.0, 0.0))
    assert np.allclose(in_plane[0, 0, :], 1.0)  # no filtering along z
    with pytest.raises(ValueError, match="filter_size_mm"):
        swi.hanning_window(shape, voxel, (0, 0, 0))


def test_phase_mask_values():
    phase = np.array([-2.0, 0.0, np.pi / 2, np.pi, 4.0], dtype=np.float32)
    assert np.allclose(swi.phase_mask(phase), [1.0, 1.0, 0.5, 0.0, 0.0])
    assert np.allclose(swi.phase_mask(phase, phase_sign=-1), [1 - 2 / np.pi, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="phase_sign"):
        swi.phase_mask(phase, phase_sign=0)


def test_homodyne_highpass_removes_smooth_phase():
    """A wrapping smooth background and offset are removed; a small local source stays."""
    shape, voxel = (64, 64, 40), (1.0, 1.0, 1.5)
    x, y, z = np.meshgrid(*[np.arange(n) * d for n, d in zip(shape, voxel)], indexing="ij")
    background = 0.15 * x + 0.002 * (y - 30) ** 2 - 0.05 * z + 1.0  # rad, wraps many times
    r2 = (x - 32) ** 2 + (y - 30) ** 2 + (z - 30) ** 2
    local = 0.8 * np.exp(-r2 / (2 * 1.5**2))  # rad, ~3.5 mm wide bump
    mask = ((x - 32) ** 2 + (y - 32) ** 2) / 28**2 + (z - 30) ** 2 / 26**2 < 1
    phase = wrap(background + local).astype(np.float32)
    magnitude = np.ones(shape, np.float32)
    hp = swi.highpass_phase(magnitude, phase, mask, voxel_size=voxel, filter_size_mm=12.0)
    assert hp.dtype == np.float32 and np.all(hp[~mask] == 0)
    # homodyne filtering leaves an edge band (one-sided averages) of about 2/3 the filter
    # size, and a small constant from the background's curvature
    depth = ndimage.distance_transform_edt(mask, sampling=voxel)
    far = (depth > 8.0) & (r2 > 10**2)
    assert np.sqrt(np.mean(hp[far] ** 2)) < 0.05  # background (tens of rad) removed
    assert np.sqrt(np.mean(wrap(phase[far] - phase[far].mean()) ** 2)) > 1.0
    centre = (32, 30, 20)  # x = 32 mm, y = 30 mm, z = 30 mm
    assert hp[centre] == pytest.approx(0.8, abs=0.2)  # the local peak survives


# ---------------------------------------------------------------------------------------
# SWI on a simulated head
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head():
    from qsmprep.simulate.phantom import head_phantom
    from qsmprep.simulate.signal import multi_echo_gre

    phantom = head_phantom(voxel_size=(2.0, 2.0, 2.0), seed=0)
    times = np.array([0.005, 0.015, 0.025])
    sim = multi_echo_gre(phantom, echo_times=times, snr=50, seed=1)
    return phantom, sim


def test_swi_darkens_veins(head):
    phantom, sim = head
    mask = phantom.brain_mask
    times, voxel = sim.echo_times, phantom.voxel_size
    veins = (phantom.labels == 11) & mask
    shell = ndimage.binary_dilation(veins, iterations=2) & mask & ~veins
    image = swi.swi(sim.magnitude, sim.phase, mask, echo_times=times, voxel_size=voxel)
    assert image.dtype == np.float32 and image.shape == mask.shape
    assert np.isfinite(image).all()
    rss = np.sqrt((sim.magnitude.astype(np.float64) ** 2).sum(axis=-1))
    assert np.allclose(image[~mask], rss[~mask], rtol=1e-5)  # magnitude outside the mask
    assert np.all(image <= rss * (1 + 1e-5))

    def contrast(img, sel=veins):
        return img[sel].mean() / img[shell].mean()

    # veins are darker than their surroundings, and more so than in the magnitude
    assert contrast(image) < 0.5 and contrast(image) < contrast(rss) - 0.04
    # the phase mask darkens veins with a positive local field (parallel-ish to B0) ...
    weight = image / rss
    local = sim.local_field_hz
    positive = veins & (local > 5)
    assert positive.sum() > 100
    assert weight[positive].mean() < 0.2 and np.median(weight[positive]) < 0.1
    assert contrast(image, positive) < 0.5 * contrast(rss, positive)
    # ... but barely touches white matter, and the flipped sign spares those veins
    assert weight[(phantom.labels == 8) & mask].mean() > 0.9
    flipped = swi.swi(sim.magnitude, sim.phase, mask, echo_times=times, voxel_size=voxel,
                      phase_sign=-1)
    assert (flipped / rss)[positive].mean() > 0.95
    # power 0 is the magnitude
    plain = swi.swi(sim.magnitude, sim.phase, mask, echo_times=times, voxel_size=voxel,
                    power=0)
    assert np.allclose(plain, rss, rtol=1e-5)


def test_swi_from_unwrapped_field_and_single_echo(head):
    phantom, sim = head
    mask = phantom.brain_mask
    veins = (phantom.labels == 11) & mask & (sim.local_field_hz > 5)
    wm = (phantom.labels == 8) & mask
    rss = np.sqrt((sim.magnitude ** 2).sum(axis=-1))
    image = swi.swi(sim.magnitude, sim.phase, mask, echo_times=sim.echo_times,
                    voxel_size=phantom.voxel_size, field_hz=sim.total_field_hz)
    weight = image / rss
    assert weight[veins].mean() < 0.2 and weight[wm].mean() > 0.9
    # one echo (3D input)
    single = swi.swi(sim.magnitude[..., 2], sim.phase[..., 2], mask,
                     echo_times=sim.echo_times[2:], voxel_size=phantom.voxel_size)
    weight = single / sim.magnitude[..., 2]
    assert single.shape == mask.shape and np.isfinite(single).all()
    assert weight[veins].mean() < 0.3 and weight[wm].mean() > 0.9


def test_combined_frequency_beyond_single_echo_aliasing():
    """Local phase beyond pi at the last echo: the combined frequency is still right."""
    shape, voxel = (48, 48, 32), (1.0, 1.0, 1.0)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r2 = (x - 24) ** 2 + (y - 24) ** 2 + (z - 16) ** 2
    local_hz = 60.0 * np.exp(-r2 / (2 * 2.0**2))  # 60 Hz peak
    times = np.array([0.004, 0.012, 0.020])
    assert 2 * np.pi * 60 * times[-1] > np.pi  # the last echo aliases
    background = 0.3 * x - 0.2 * y + 0.8
    phase = wrap(background[..., None] + TWO_PI * local_hz[..., None] * times)
    magnitude = np.ones(phase.shape, np.float32)
    omega = swi.combined_highpass_frequency(magnitude, phase.astype(np.float32), None,
                                            echo_times=times, voxel_size=voxel,
                                            filter_size_mm=16.0)
    # the low-pass keeps part of the bump; the peak is within 25% and above the alias
    assert omega[24, 24, 16] / TWO_PI == pytest.approx(60.0, rel=0.25)
    assert omega[24, 24, 16] * times[-1] > np.pi


def test_swi_argument_errors(head):
    _, sim = head
    mag, ph = sim.magnitude[:8, :8, :8], sim.phase[:8, :8, :8]
    kw = {"echo_times": sim.echo_times, "voxel_size": (2, 2, 2)}
    with pytest.raises(ValueError, match="echo times"):
        swi.swi(mag, ph, None, echo_times=sim.echo_times[:2], voxel_size=(2, 2, 2))
    with pytest.raises(ValueError, match="seconds"):
        swi.swi(mag, ph, None, echo_times=sim.echo_times * 1000, voxel_size=(2, 2, 2))
    with pytest.raises(ValueError, match="power"):
        swi.swi(mag, ph, None, power=-1, **kw)
    with pytest.raises(ValueError, match="phase_sign"):
        swi.swi(mag, ph, None, phase_sign=0, **kw)
    with pytest.raises(ValueError, match="shape"):
        swi.swi(mag, ph[..., :2], None, **kw)
    with pytest.raises(ValueError, match="mask"):
        swi.swi(mag, ph, np.ones((8, 8, 7), bool), **kw)
    with pytest.raises(ValueError, match="voxel_size"):
        swi.swi(mag, ph, None, echo_times=sim.echo_times, voxel_size=(2, 2))


# ---------------------------------------------------------------------------------------
# projections
# ---------------------------------------------------------------------------------------


def _brute_projection(image, n, axis, reduce):
    out = np.empty_like(image)
    length = image.shape[axis]
    for i in range(length):
        lo, hi = max(0, i - n // 2), min(length, i - n // 2 + n)
        slab = np.take(image, np.arange(lo, hi), axis=axis)
        index = [slice(None)] * 3
        index[axis] = i
        out[tuple(index)] = reduce(slab, axis=axis)
    return out


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("slab_mm", [1.0, 4.0, 5.0, 9.0, 40.0])
def test_projections_equal_brute_force(axis, slab_mm):
    rng = np.random.default_rng(axis)
    image = rng.normal(size=(9, 7, 11)).astype(np.float32)
    voxel = (1.0, 1.5, 2.0)
    n = max(1, round(slab_mm / voxel[axis]))
    mip = swi.minimum_intensity_projection(image, slab_mm=slab_mm, voxel_size=voxel, axis=axis)
    assert mip.shape == image.shape and mip.dtype == np.float32
    assert np.array_equal(mip, _brute_projection(image, n, axis, np.min))
    mxp = swi.maximum_intensity_projection(image, slab_mm=slab_mm, voxel_size=voxel, axis=axis)
    assert np.array_equal(mxp, _brute_projection(image, n, axis, np.max))


def test_projections_nan_and_errors():
    image = np.arange(2 * 3 * 6, dtype=np.float32).reshape(2, 3, 6)
    image[0, 0, 2] = np.nan
    image[1, 1, :] = np.nan
    mip = swi.minimum_intensity_projection(image, slab_mm=3, voxel_size=(1, 1, 1))
    assert mip[0, 0, 2] == image[0, 0, 1] and mip[0, 0, 3] == image[0, 0, 3]
    assert np.isnan(mip[1, 1]).all()  # all-NaN slabs stay NaN
    mxp = swi.maximum_intensity_projection(image, slab_mm=3, voxel_size=(1, 1, 1))
    assert mxp[0, 0, 2] == image[0, 0, 3] and np.isnan(mxp[1, 1]).all()
    with pytest.raises(ValueError, match="slab_mm"):
        swi.minimum_intensity_projection(image, slab_mm=0, voxel_size=(1, 1, 1))
    with pytest.raises(ValueError, match="axis"):
        swi.maximum_intensity_projection(image, slab_mm=2, voxel_size=(1, 1, 1), axis=3)
    with pytest.raises(ValueError, match="3D"):
        swi.minimum_intensity_projection(image[0], slab_mm=2, voxel_size=(1, 1, 1))


def test_venography_mip_of_chimap(head):
    """QSM venography: a slab MIP of the true susceptibility shows every vein voxel."""
    phantom, _ = head
    chi = np.where(phantom.brain_mask, phantom.chi_ppm, 0).astype(np.float32)
    veins = (phantom.labels == 11) & phantom.brain_mask
    mip = swi.maximum_intensity_projection(chi, slab_mm=16, voxel_size=phantom.voxel_size)
    assert np.all(mip[veins] >= 0.2)  # veins 0.22-0.30 ppm dominate their slabs
    assert np.all(mip >= chi)


# ---------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------


def test_real_clearswi_small():
    """CLEAR-SWI test crop (3 echoes, nominal TEs 4/8/12 ms, 0.47 x 0.47 x 1 mm): finite
    SWI; the large in-plane vessel (x ~ 22, along y) is darker than its surroundings."""
    import nibabel as nb

    from qsmprep.recon.phase import to_radians

    path = DATA / "megre_small_crops" / "CLEARSWI_small"
    if not path.exists():
        pytest.skip(f"real data folder {path} is absent")
    magnitude = np.asarray(nb.load(str(path / "Mag.nii")).dataobj, dtype=np.float32)
    phase = to_radians(np.asarray(nb.load(str(path / "Phase.nii")).dataobj), "arbitrary")
    times, voxel = [0.004, 0.008, 0.012], (0.46875, 0.46875, 1.0)
    rss = np.sqrt((magnitude**2).sum(axis=-1))
    # the vessel: the darkest magnitude voxel of x in [18, 28) per (y, z) row
    centre = np.argmin(rss[18:28], axis=0) + 18
    y, z = np.meshgrid(np.arange(rss.shape[1]), np.arange(rss.shape[2]), indexing="ij")

    def contrast(image):
        vessel = image[centre, y, z]
        around = np.concatenate([image[np.clip(centre + o, 0, rss.shape[0] - 1), y, z]
                                 for o in (-7, -6, -5, 5, 6, 7)])
        return vessel.mean() / around.mean()

    results = {}
    for sign in (1, -1):
        image = swi.swi(magnitude, phase, None, echo_times=times, voxel_size=voxel,
                        filter_size_mm=(8.0, 8.0, 0.0), phase_sign=sign)
        assert image.dtype == np.float32 and np.isfinite(image).all()
        assert np.all(image >= 0) and np.all(image <= rss * (1 + 1e-5))
        results[sign] = contrast(image)
    assert contrast(rss) < 0.9
    assert max(results.values()) < 0.9  # darker than the surroundings either way
    # with the sign that darkens this vessel (-1: its phase is negative in this data; an
    # in-plane vessel, perpendicular to B0, has a negative inside frequency) the phase mask
    # adds contrast to the magnitude's
    assert results[-1] < contrast(rss) - 0.05
    mip = swi.minimum_intensity_projection(rss, slab_mm=8.0, voxel_size=voxel)
    assert np.isfinite(mip).all() and np.all(mip <= rss)
