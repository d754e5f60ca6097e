"""Spatial phase unwrapping (qsmprep.recon.unwrap) against known smooth phase."""

from pathlib import Path

import numpy as np
import pytest
from conftest import romeo_small
from scipy import ndimage

from qsmprep.recon import unwrap
from qsmprep.recon.phase import wrap

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TWO_PI = 2 * np.pi


def smooth_phase(shape=(64, 64, 48), amplitude=40.0, seed=0):
    """A smooth phase (rad) with several wraps (gradients up to ~1.7 rad/voxel)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    truth = amplitude * (0.6 * x**2 + 0.4 * y * z - 0.5 * z + 0.3 * np.sin(2 * x + y))
    for _ in range(4):
        c = rng.uniform(-0.6, 0.6, 3)
        s = rng.uniform(0.1, 0.3)
        r2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2
        truth += rng.uniform(-10, 10) * np.exp(-r2 / (2 * s * s))
    return truth.astype(np.float32), (x, y, z)


def two_component_mask(coords, seed=1):
    """Two disconnected blobs with spherical holes."""
    x, y, z = coords
    rng = np.random.default_rng(seed)
    left = (x + 0.45) ** 2 + y**2 + z**2 < 0.32
    right = (x - 0.5) ** 2 / 0.35**2 + y**2 / 0.7**2 + z**2 / 0.7**2 < 1
    holes = np.zeros(x.shape, bool)
    for _ in range(10):
        c = rng.uniform(-0.6, 0.6, 3)
        holes |= (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < 0.07**2
    return (left | right) & ~holes


def assert_exact_multiples(unwrapped, wrapped, mask):
    turns = (unwrapped.astype(np.float64) - wrapped) / TWO_PI
    assert np.abs(turns - np.round(turns))[mask].max() < 1e-4
    assert np.array_equal(unwrapped[~mask], wrapped[~mask])


def wrong_voxels_per_component(unwrapped, truth, mask):
    """Voxels not equal to the truth up to one global 2 pi k per component."""
    labels, n = ndimage.label(mask)
    assert n >= 2
    wrong = []
    for label in range(1, n + 1):
        turns = np.round((unwrapped - truth)[labels == label] / TWO_PI)
        wrong.append(int(np.count_nonzero(turns != np.median(turns))))
    return wrong


@pytest.fixture(scope="module")
def problem():
    truth, coords = smooth_phase()
    noisy = truth + np.random.default_rng(2).normal(0, 0.2, truth.shape).astype(np.float32)
    mask = two_component_mask(coords)
    magnitude = (1.0 + 0.5 * coords[0]).astype(np.float32)
    return noisy, wrap(noisy), mask, magnitude


def test_region_growing_exact_and_correct(problem):
    truth, wrapped, mask, magnitude = problem
    assert np.abs(np.diff(truth, axis=0)).max() > 1.0  # steep enough to be hard
    assert (truth.max() - truth.min()) > 10 * TWO_PI  # many wraps
    for mag in (None, magnitude):
        result = unwrap.region_growing(wrapped, mask, magnitude=mag, voxel_size=(1, 1, 1))
        assert result.dtype == np.float32
        assert_exact_multiples(result, wrapped, mask)
        assert max(wrong_voxels_per_component(result, truth, mask)) == 0


def test_region_growing_edge_cases():
    rng = np.random.default_rng(3)
    phase = wrap(rng.uniform(-4, 4, (6, 5, 4)).astype(np.float32))
    empty = np.zeros(phase.shape, bool)
    assert np.array_equal(unwrap.region_growing(phase, empty), phase)
    single = empty.copy()
    single[2, 2, 2] = True  # an isolated voxel keeps its wrapped value
    assert np.array_equal(unwrap.region_growing(phase, single), phase)
    with pytest.raises(ValueError, match="shape"):
        unwrap.region_growing(phase, empty[:3])
    with pytest.raises(ValueError, match="3D"):
        unwrap.region_growing(phase[..., 0], empty[..., 0])


def test_edge_weights_range(problem):
    _, wrapped, mask, magnitude = problem
    weights = unwrap.edge_weights(wrapped, mask, magnitude=magnitude)
    assert weights.shape == (3,) + wrapped.shape and weights.dtype == np.uint8
    assert weights[0, -1].max() == 0 and weights[1, :, -1].max() == 0
    assert weights[2, :, :, -1].max() == 0
    assert weights[:, ~mask].max() == 0
    inside = weights[0, :-1][mask[:-1] & mask[1:]]
    assert inside.min() >= 1 and np.median(inside) > 50
    # noise lowers the quality: a constant phase gets the top weight everywhere
    flat = unwrap.edge_weights(np.zeros_like(wrapped), mask)
    assert flat[0, :-1][mask[:-1] & mask[1:]].min() == 255


def test_laplacian_is_exact_up_to_harmonic(problem):
    truth, wrapped, mask, _ = problem
    voxel = (1.0, 1.0, 1.5)
    # no mask: exact up to a constant
    result = unwrap.laplacian(wrapped, voxel_size=voxel)
    diff = result - truth
    assert np.std(diff) < 1e-3
    # masked: the error is harmonic inside the mask (its Laplacian vanishes)
    masked = unwrap.laplacian(wrapped, voxel_size=voxel, mask=mask)
    assert np.array_equal(masked[~mask], wrapped[~mask])
    interior = ndimage.binary_erosion(mask, iterations=2)
    residual = unwrap.discrete_laplacian(masked - truth, voxel)[interior]
    signal = unwrap.discrete_laplacian(truth, voxel)[interior]
    assert np.sqrt(np.mean(residual**2)) < 1e-3 * np.sqrt(np.mean(signal**2))


def test_reliability_matches_truth(problem):
    truth, wrapped, mask, _ = problem
    result = unwrap.reliability(wrapped, mask)
    assert result.dtype == np.float32
    assert_exact_multiples(result, wrapped, mask)
    assert sum(wrong_voxels_per_component(result, truth, mask)) <= 2e-5 * mask.sum()


def test_dispatcher(problem):
    _, wrapped, mask, magnitude = problem
    assert set(unwrap.METHODS) == {"region_growing", "laplacian", "reliability"}
    for method in unwrap.METHODS:
        result = unwrap.unwrap(wrapped, mask, method=method, magnitude=magnitude,
                               voxel_size=(1, 1, 1))
        assert result.shape == wrapped.shape and np.isfinite(result).all()
    with pytest.raises(ValueError, match="region_growing"):
        unwrap.unwrap(wrapped, mask, method="romeo2", voxel_size=(1, 1, 1))


def _jump_fraction(image, mask):
    """Fraction of 6-neighbour pairs inside the mask with |difference| > pi."""
    jumps = total = 0
    for axis in range(3):
        both = np.diff(mask.astype(np.int8), axis=axis) == 0
        both &= np.delete(mask, -1, axis=axis)
        jumps += np.count_nonzero(np.abs(np.diff(image, axis=axis))[both] > np.pi)
        total += np.count_nonzero(both)
    return jumps / total


def test_real_romeo_small():
    phase, magnitude = romeo_small()
    assert phase.shape == (51, 51, 41, 3)
    mask = np.ones(phase.shape[:3], bool)  # the crop is all tissue
    for echo in range(3):
        wrapped = phase[..., echo]
        result = unwrap.region_growing(wrapped, mask, magnitude=magnitude[..., echo],
                                       voxel_size=(0.46875, 0.46875, 1.0))
        assert_exact_multiples(result, wrapped, mask)
        before, after = _jump_fraction(wrapped, mask), _jump_fraction(result, mask)
        assert after < 1e-3 and after < 0.05 * before
        # agrees with scikit-image's unwrapper almost everywhere
        other = unwrap.reliability(wrapped, mask)
        turns = np.round((result - other) / TWO_PI)
        assert np.mean(turns == np.median(turns)) > 0.995
