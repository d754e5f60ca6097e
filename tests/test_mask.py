"""Magnitude-based brain masks (qsmprep.recon.mask) against simulated heads with known brain."""

from pathlib import Path

import numpy as np
import pytest

from qsmprep.recon import mask as mask_core

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _ellipsoid(grid, axes, centre=(0.0, 0.0, 0.0)):
    return sum(((g - c) / a) ** 2 for g, a, c in zip(grid, axes, centre))


def simulated_head(shape=(72, 88, 64), voxel=(2.0, 2.0, 2.0), sigma=0.05, seed=0,
                   echo_times=(0.004, 0.012, 0.020), bridge=False):
    """Multi-echo magnitude of a head: bright brain (WM/GM/ventricles, dark nuclei), a thin
    CSF rim, a dark skull shell, a bright scalp shell, a bias field and Rician noise.
    Returns (magnitude [x, y, z, echo], true brain mask, voxel size)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * d for n, d in zip(shape, voxel)],
                       indexing="ij")
    axes = np.array([58.0, 72.0, 52.0])
    brain = _ellipsoid(grid, axes) <= 1
    csf = _ellipsoid(grid, axes + 2) <= 1
    skull = _ellipsoid(grid, axes + 8) <= 1
    scalp = _ellipsoid(grid, axes + 14) <= 1
    rho = np.zeros(shape, np.float32)
    t2s = np.full(shape, 0.03, np.float32)
    rho[scalp], t2s[scalp] = 0.9, 0.035
    rho[skull], t2s[skull] = 0.04, 0.002
    rho[csf & ~brain], t2s[csf & ~brain] = 0.6, 0.08
    rho[brain], t2s[brain] = 1.0, 0.05
    wm = _ellipsoid(grid, axes * 0.68) <= 1
    rho[wm], t2s[wm] = 0.8, 0.045
    ventricles = _ellipsoid(grid, (8, 20, 10), (0, 5, 5)) <= 1
    rho[ventricles], t2s[ventricles] = 1.0, 0.08
    nuclei = (_ellipsoid(grid, (6, 6, 6), (15, 0, -5)) <= 1) | (
        _ellipsoid(grid, (6, 6, 6), (-15, 0, -5)) <= 1)
    t2s[nuclei] = 0.012
    if bridge:  # a bright 6 mm wide tube from the brain through the skull to the scalp
        tube = (np.hypot(grid[0] - 10, grid[2]) < 3) & (grid[1] > 0)
        rho[tube & scalp], t2s[tube & scalp] = 0.9, 0.04
    bias = (1 + 0.3 * grid[0] / 80 - 0.2 * grid[2] / 60).astype(np.float32)
    echoes = []
    for te in echo_times:
        signal = rho * np.exp(-te / t2s) * bias
        noise = rng.normal(0, sigma, shape) + 1j * rng.normal(0, sigma, shape)
        echoes.append(np.abs(signal + noise))
    return np.stack(echoes, -1).astype(np.float32), brain, np.asarray(voxel)


def dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.mark.parametrize(
    "voxel, shape, sigma, bridge",
    [((2.0, 2.0, 2.0), (72, 88, 64), 0.05, False),
     ((1.5, 1.5, 3.0), (96, 116, 44), 0.08, True)],
)
def test_brain_mask_separates_brain_from_scalp(voxel, shape, sigma, bridge):
    magnitude, brain, voxel_size = simulated_head(shape, voxel, sigma, bridge=bridge)
    mask = mask_core.brain_mask(magnitude, voxel_size=voxel_size)
    assert mask.dtype == bool and mask.shape == brain.shape
    assert dice(mask, brain) >= 0.95
    # nothing of the scalp shell
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * d for n, d in zip(shape, voxel)],
                       indexing="ij")
    outer = _ellipsoid(grid, np.array([58.0, 72.0, 52.0]) + 8) > 1
    assert np.count_nonzero(mask & outer) < 0.001 * np.count_nonzero(brain)


def test_brain_mask_options():
    magnitude, brain, voxel_size = simulated_head(sigma=0.05)
    first = mask_core.brain_mask(magnitude, voxel_size=voxel_size, combine="first")
    assert dice(first, brain) >= 0.95
    fixed = mask_core.brain_mask(magnitude, voxel_size=voxel_size, threshold=0.3)
    assert dice(fixed, brain) >= 0.9
    eroded = mask_core.brain_mask(magnitude, voxel_size=voxel_size, erode_mm=4.0)
    assert eroded.sum() < first.sum() and not (eroded & ~first).any()
    with pytest.raises(ValueError, match="fraction"):
        mask_core.brain_mask(magnitude, voxel_size=voxel_size, threshold=5.0)
    with pytest.raises(ValueError, match="voxel_size"):
        mask_core.brain_mask(magnitude, voxel_size=(1.0, 1.0))


def test_keep_all_components_for_bodies():
    shape = (40, 40, 40)
    grid = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    blobs = (_ellipsoid(grid, (7, 7, 7), (12, 20, 20)) <= 1) | (
        _ellipsoid(grid, (6, 6, 6), (29, 20, 20)) <= 1)
    rng = np.random.default_rng(1)
    image = np.where(blobs, 1.0, 0.0) + rng.normal(0, 0.05, shape) ** 2
    both = mask_core.brain_mask(image, voxel_size=(1, 1, 1), largest_component=False,
                                open_mm=2.0)
    one = mask_core.brain_mask(image, voxel_size=(1, 1, 1), open_mm=2.0, max_open_mm=2.0)
    assert dice(both, blobs) > 0.95
    assert one.sum() < 0.75 * both.sum()


def test_morphology_in_mm():
    shape = (41, 41, 41)
    point = np.zeros(shape, bool)
    point[20, 20, 20] = True
    ball = mask_core.dilate(point, 10.0, voxel_size=(1.0, 1.0, 2.0))
    # an ellipsoid of semi-axes 10, 10, 5 voxels
    assert ball[30, 20, 20] and not ball[31, 20, 20]
    assert ball[20, 20, 25] and not ball[20, 20, 26]
    assert abs(ball.sum() - 4 / 3 * np.pi * 10 * 10 * 5) < 0.05 * 4 / 3 * np.pi * 500
    shrunk = mask_core.erode(ball, 4.0, voxel_size=(1.0, 1.0, 2.0))
    assert shrunk[26, 20, 20] and not shrunk[27, 20, 20]
    hollow = ball & ~mask_core.erode(ball, 3.0, voxel_size=(1.0, 1.0, 2.0))
    assert np.array_equal(mask_core.fill_mask_holes(hollow), ball)


def test_mask_from_image():
    image = np.array([[[0.0, 0.4, 0.6], [1.0, np.nan, 2.0]]], dtype=np.float32)
    mask = mask_core.mask_from_image(image)
    assert mask.dtype == bool
    assert mask.tolist() == [[[False, False, True], [True, False, True]]]
    assert mask_core.mask_from_image(image[..., None]).shape == image.shape
    with pytest.raises(ValueError):
        mask_core.mask_from_image(np.zeros((3, 3)))


def test_real_brain_mask_volume():
    folder = DATA / "philips_dualecho_brain"
    if not folder.exists():
        pytest.skip(f"{folder} absent")
    nib = pytest.importorskip("nibabel")
    echoes = [nib.load(str(folder / f"2001_WIP_fcMRI_Field_Mapping_cl_e{n}.nii.gz"))
              for n in (1, 2)]
    magnitude = np.stack([np.asarray(e.dataobj, dtype=np.float32) for e in echoes], -1)
    voxel_size = echoes[0].header.get_zooms()[:3]
    mask = mask_core.brain_mask(magnitude, voxel_size=voxel_size)
    litres = mask.sum() * np.prod(voxel_size) / 1e6
    assert 1.1 < litres < 2.0  # intracranial volume; the whole head is ~4 L


def test_body_mask_keeps_dark_parts_and_shaded_tissue():
    """Vials at 100%, 35% and 12% of the brightest signal under a surface coil below the
    field of view (the bright vial, farthest, at 9-19% of the coil's peak; the dark one at 3-9%
    of the brightest voxel), Rician noise 0.5%: the body mask keeps every vial whole and
    leaves the background out. A linear Otsu threshold kept 7.5% of the dark vial."""
    shape, voxel = (96, 96, 8), (1.5, 1.5, 3.0)
    grid = np.meshgrid(*[(np.arange(n) - n / 2) * d for n, d in zip(shape, voxel)],
                       indexing="ij")
    vials = [np.hypot(grid[0] - cx, grid[1] - cy) < 22 for cx, cy in ((0, 35), (-35, -30),
                                                                      (35, -30))]
    signal = sum(level * vial for level, vial in zip((1.0, 0.35, 0.12), vials))
    receive = 1 / (1 + ((grid[1] + 90) / 70) ** 2) ** 1.5
    rng = np.random.default_rng(3)
    magnitude = np.abs(signal * receive / receive.max() + rng.normal(0, 0.005, shape)
                       + 1j * rng.normal(0, 0.005, shape))
    mask = mask_core.body_mask(magnitude, voxel_size=voxel)
    for vial in vials:
        assert mask[vial].mean() > 0.99
    background = ~mask_core.dilate(np.any(vials, axis=0), 3.0, voxel_size=voxel)
    assert mask[background].mean() < 0.005


def test_body_mask_covers_the_organisers_evaluation_mask():
    """ISMRM 2012 cases 12 (abdomen) and 15 (breasts, dark chest wall): the automatic body
    mask holds >= 97% of the organisers' eval_mask (linear Otsu: 98.9% and 84.1%)."""
    folder = DATA / "ismrm2012_fatwater"
    if not folder.exists():
        pytest.skip(f"{folder} absent")
    scipy_io = pytest.importorskip("scipy.io")
    for case in (12, 15):
        data = scipy_io.loadmat(str(folder / f"{case}_ISMRM.mat"), squeeze_me=True,
                                struct_as_record=False)["imDataParams"]
        magnitude = np.abs(np.asarray(data.images))
        mask = mask_core.body_mask(magnitude, voxel_size=(1.5, 1.5, 5.0))
        evaluated = np.asarray(data.eval_mask) > 0
        assert mask[evaluated].mean() >= 0.97, case
        assert mask.mean() < 0.75, case  # the air around the body stays out
