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
    assert set(unwrap.METHODS) == {"region_growing", "romeo", "laplacian", "reliability"}
    assert unwrap.EXACT_METHODS == {"region_growing", "romeo", "reliability"}
    for method in unwrap.METHODS:
        result = unwrap.unwrap(wrapped, mask, method=method, magnitude=magnitude,
                               voxel_size=(1, 1, 1))
        assert result.shape == wrapped.shape and np.isfinite(result).all()
    # a 3D phase: romeo is single-echo region growing
    assert np.array_equal(
        unwrap.unwrap(wrapped, mask, method="romeo", magnitude=magnitude, voxel_size=(1, 1, 1)),
        unwrap.region_growing(wrapped, mask, magnitude=magnitude))
    with pytest.raises(ValueError, match="region_growing"):
        unwrap.unwrap(wrapped, mask, method="romeo2", voxel_size=(1, 1, 1))


def test_dispatcher_4d():
    field, offset, mask, times = multi_echo_problem(shape=(32, 30, 24))
    phase = wrap(offset[..., None] + TWO_PI * field[..., None] * times).astype(np.float32)
    romeo = unwrap.romeo(phase, mask, echo_times=times)
    for method in ("romeo", "region_growing"):
        result = unwrap.unwrap(phase, mask, method=method, voxel_size=(1, 1, 1),
                               echo_times=times)
        assert np.array_equal(result, romeo)
    per_echo = unwrap.unwrap(phase, mask, method="reliability", voxel_size=(1, 1, 1),
                             echo_times=times)
    for echo in range(times.size):
        assert np.array_equal(per_echo[..., echo], unwrap.reliability(phase[..., echo], mask))
    with pytest.raises(ValueError, match="echo_times"):
        unwrap.unwrap(phase, mask, method="romeo", voxel_size=(1, 1, 1))
    with pytest.raises(ValueError, match="echo times"):
        unwrap.unwrap(phase, mask, method="romeo", voxel_size=(1, 1, 1), echo_times=times[:2])


# ---------------------------------------------------------------------------------------
# multi-echo (ROMEO)
# ---------------------------------------------------------------------------------------


def multi_echo_problem(shape=(48, 44, 36), times=(0.003, 0.007, 0.011, 0.015), scale=200.0,
                       two_components=False):
    """A smooth field (Hz) aliasing in time (|f| > 1 / (2 dTE)), a smooth offset (rad)."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    field = scale * (0.9 * x + 0.5 * y * z + 0.4 * np.sin(2 * y + z) + 0.3 * x**2)
    offset = 0.8 * x - 0.6 * y**2 + 0.4 * z + 2.5  # crosses +-pi: wraps itself
    mask = x**2 / 0.9 + y**2 / 0.8 + z**2 / 0.7 < 1
    if two_components:
        mask &= np.abs(x) > 0.1
    return field.astype(np.float32), offset.astype(np.float32), mask, np.asarray(times)


def test_edge_weights_phase_gradient_coherence(problem):
    truth, wrapped, mask, _ = problem
    times = (0.004, 0.010)
    consistent = wrap(truth * np.float32(times[1] / times[0]))
    with_coherent = unwrap.edge_weights(wrapped, mask, phase2=consistent, te=times)
    alone = unwrap.edge_weights(wrapped, mask)
    inside = alone > 0
    assert np.array_equal(with_coherent > 0, inside)
    # a consistent second echo (gradients below pi) keeps most weights, noise lowers them
    steep = np.abs(np.diff(truth * times[1] / times[0], axis=0)) > np.pi
    assert np.mean(with_coherent[0, :-1][~steep & inside[0, :-1]] >=
                   alone[0, :-1][~steep & inside[0, :-1]] - 60) > 0.95
    rng = np.random.default_rng(5)
    noise2 = rng.uniform(-np.pi, np.pi, truth.shape).astype(np.float32)
    incoherent = unwrap.edge_weights(wrapped, mask, phase2=noise2, te=times)
    assert np.median(incoherent[inside]) < 0.5 * np.median(alone[inside])
    with pytest.raises(ValueError, match="te"):
        unwrap.edge_weights(wrapped, mask, phase2=noise2)
    with pytest.raises(ValueError, match="phase2"):
        unwrap.edge_weights(wrapped, mask, te=times)
    with pytest.raises(ValueError, match="shape"):
        unwrap.region_growing(wrapped, mask, phase2=noise2[:-1], te=times)


@pytest.mark.parametrize("reference", ["fit", "template"])
def test_temporal_unwrap_beyond_temporal_aliasing(reference):
    field, offset, mask, times = multi_echo_problem()
    delta = np.diff(times).min()
    assert np.abs(field[mask]).max() > 1.5 / (2 * delta)  # neighbouring echoes alias
    truth = offset[..., None] + TWO_PI * field[..., None] * times
    rng = np.random.default_rng(1)
    noisy = (truth + rng.normal(0, 0.1, truth.shape)).astype(np.float32)
    phase = wrap(noisy)
    for template in (0, 2):
        result = unwrap.temporal_unwrap(phase, noisy[..., template], times, mask=mask,
                                        template=template, phase_offset=offset,
                                        reference=reference)
        assert result.dtype == np.float32
        assert_exact_multiples(result, phase, mask[..., None] & np.ones(times.size, bool))
        assert np.array_equal(np.round((result - noisy) / TWO_PI)[mask], 0 * noisy[mask])
    # without the offset the echoes are predicted wrongly in the voxels where it matters
    wrong = unwrap.temporal_unwrap(phase, noisy[..., 0], times, mask=mask)
    assert np.mean(np.round((wrong - noisy) / TWO_PI)[mask] != 0) > 0.05
    with pytest.raises(ValueError, match="reference"):
        unwrap.temporal_unwrap(phase, noisy[..., 0], times, reference="previous")
    with pytest.raises(ValueError, match="template"):
        unwrap.temporal_unwrap(phase, noisy[..., 0], times, template=4)


def test_romeo_exact_with_offset_and_branch_choice():
    """Offset removal (given or MCPC-3D-S), temporal unwrapping beyond aliasing and, with
    the offset known and echo times that are not multiples of the template's, the right
    global branch even for a component whose mean field is far from 0 Hz. (With uniform
    echo spacing, (phi0, f) and (phi0 - 2 pi k TE1 / dTE, f + k / dTE) fit every echo
    equally: MCPC-3D-S then resolves each component up to such an alias only.)"""
    field, offset, mask, times = multi_echo_problem(two_components=True)
    labels, n_labels = ndimage.label(mask)
    assert n_labels == 2
    field = field + np.where(labels == 2, 1.2 / times[0], 0).astype(np.float32)  # +400 Hz
    truth = offset[..., None] + TWO_PI * field[..., None] * times
    rng = np.random.default_rng(2)
    signal = np.exp(1j * truth) + rng.normal(0, 0.05, truth.shape + (2,)).view(complex)[..., 0]
    phase = np.angle(signal).astype(np.float32)
    magnitude = np.abs(signal).astype(np.float32)
    for phase_offset in (offset, "mcpc3ds"):
        result = unwrap.romeo(phase, mask, echo_times=times, magnitude=magnitude,
                              phase_offset=phase_offset)
        assert result.dtype == np.float32 and result.shape == phase.shape
        assert_exact_multiples(result, phase, mask[..., None] & np.ones(times.size, bool))
        turns = np.round((result - truth) / TWO_PI)
        for label in (1, 2):  # one 2 pi multiple per echo and component
            inside = turns[labels == label]
            assert np.all(inside == inside[0])
        if phase_offset is offset:  # the right branch everywhere
            assert np.all(turns[mask] == 0)
    # the wrapped offset alone (none given) breaks the temporal step
    bad = unwrap.romeo(phase, mask, echo_times=times, magnitude=magnitude, phase_offset="none")
    turns = np.round((bad - truth) / TWO_PI)[..., 1:][mask]
    assert np.mean(turns != np.median(turns)) > 0.01
    # single echo: region growing
    one = unwrap.romeo(phase[..., :1], mask, echo_times=times[:1])
    assert np.array_equal(one[..., 0], unwrap.region_growing(phase[..., 0], mask))
    with pytest.raises(ValueError, match="4D"):
        unwrap.romeo(phase[..., 0], mask, echo_times=times[:1])
    with pytest.raises(ValueError, match="phase_offset"):
        unwrap.romeo(phase, mask, echo_times=times, phase_offset="mcpc")


@pytest.fixture(scope="module")
def calcification_head():
    """Head phantom at 2 mm, a -5 ppm calcification, strong veins, SNR 40, 4 echoes."""
    from qsmprep.simulate.phantom import head_phantom
    from qsmprep.simulate.signal import multi_echo_gre

    phantom = head_phantom(voxel_size=(2.0, 2.0, 2.0), calcification_ppm=-5.0,
                           chi_overrides={11: 0.45}, seed=1)
    times = np.array([0.004, 0.012, 0.020, 0.028])
    sim = multi_echo_gre(phantom, echo_times=times, snr=40, seed=3,
                         b0_direction=(0.2, 0.1, 1.0))
    truth = sim.phase_offset[..., None] + TWO_PI * sim.total_field_hz[..., None] * times
    return phantom, sim, truth


def _wrong_turns(unwrapped, truth, wrapped, mask):
    """Voxels off the majority 2 pi multiple, counted where the noise leaves the true
    multiple defined (|wrap(measured - true)| < pi / 2)."""
    turns = np.round((unwrapped - truth) / TWO_PI)
    valid = mask & (np.abs(wrap(wrapped - truth)) < np.pi / 2)
    return int(np.count_nonzero((turns != np.median(turns[mask])) & valid))


def test_romeo_beats_single_echo_near_strong_sources(calcification_head):
    phantom, sim, truth = calcification_head
    mask = phantom.brain_mask
    times = sim.echo_times
    result = unwrap.romeo(sim.phase, mask, echo_times=times, magnitude=sim.magnitude)
    assert_exact_multiples(result, sim.phase, mask[..., None] & np.ones(times.size, bool))
    near_calcification = ndimage.distance_transform_edt(phantom.labels != 16) * 2.0 < 8.0
    single = []
    for echo in range(times.size):
        wrapped = sim.phase[..., echo]
        wrong = _wrong_turns(result[..., echo], truth[..., echo], wrapped, mask)
        alone = unwrap.region_growing(wrapped, mask, magnitude=sim.magnitude[..., echo])
        single.append(_wrong_turns(alone, truth[..., echo], wrapped, mask))
        # ROMEO's few errors all sit next to the calcification (field jumps > pi/voxel)
        turns = np.round((result[..., echo] - truth[..., echo]) / TWO_PI)
        off = (turns != np.median(turns[mask])) & mask & ~near_calcification
        assert wrong <= 20 and not off.any()
    # single-echo region growing on the late echo: an order of magnitude more errors
    assert single[-1] >= 5 * max(1, max(_wrong_turns(result[..., e], truth[..., e],
                                                     sim.phase[..., e], mask)
                                        for e in range(times.size)))


def _jump_fraction(image, mask):
    """Fraction of 6-neighbour pairs inside the mask with |difference| > pi."""
    jumps = total = 0
    for axis in range(3):
        both = np.diff(mask.astype(np.int8), axis=axis) == 0
        both &= np.delete(mask, -1, axis=axis)
        jumps += np.count_nonzero(np.abs(np.diff(image, axis=axis))[both] > np.pi)
        total += np.count_nonzero(both)
    return jumps / total


def test_real_romeo_small_multi_echo():
    phase, magnitude = romeo_small()
    mask = np.ones(phase.shape[:3], bool)
    times = np.array([0.004, 0.008, 0.012])  # nominal
    for template in (0, 1):
        result = unwrap.romeo(phase, mask, echo_times=times, magnitude=magnitude,
                              template=template, voxel_size=(0.46875, 0.46875, 1.0))
        assert_exact_multiples(result, phase, np.ones(phase.shape, bool))
        for echo in range(3):
            single = unwrap.region_growing(phase[..., echo], mask,
                                           magnitude=magnitude[..., echo])
            turns = np.round((result[..., echo] - single) / TWO_PI)
            assert np.mean(turns == np.median(turns)) > 0.999
        # the echoes are linear in TE (offset + slope): few voxels deviate by > 1 rad
        design = np.stack([np.ones(3), times], axis=1)
        values = result.reshape(-1, 3).T
        coef, *_ = np.linalg.lstsq(design, values, rcond=None)
        assert np.mean(np.abs(values - design @ coef).max(axis=0) > 1.0) < 1e-3


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
