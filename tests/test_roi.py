"""ROI statistics equal a direct numpy computation; label resampling between grids."""

from __future__ import annotations

import numpy as np
import pytest

from qsmprep.analysis import roi


def _direct(values, selection):
    v = values[selection]
    return {"n_voxels": v.size, "mean": v.mean(), "sd": v.std(ddof=1), "median": np.median(v),
            "min": v.min(), "max": v.max(), "p5": np.percentile(v, 5),
            "p95": np.percentile(v, 95), "cv": v.std(ddof=1) / abs(v.mean())}


def test_statistics_equal_numpy_per_label():
    rng = np.random.default_rng(0)
    values = rng.normal(0.05, 0.1, (30, 28, 26)).astype(np.float32)
    labels = rng.integers(0, 6, values.shape).astype(np.int16)
    labels[labels == 3] = 0  # label 3 absent
    valid = rng.random(values.shape) > 0.1
    values[0, 0, :5] = np.nan
    result = roi.roi_statistics(values, labels, [1, 2, 3, 4, 5], voxel_volume_mm3=2.5,
                                valid=valid)
    assert result["index"].tolist() == [1, 2, 3, 4, 5]
    for position, label in enumerate([1, 2, 3, 4, 5]):
        drawn = labels == label
        assert result["roi_voxels"][position] == drawn.sum()
        if label == 3:
            assert result["n_voxels"][position] == 0 and np.isnan(result["mean"][position])
            continue
        selection = drawn & valid & np.isfinite(values)
        expected = _direct(values.astype(np.float64), selection)
        for key, value in expected.items():
            assert result[key][position] == pytest.approx(value, rel=1e-12, abs=1e-15), key
        assert result["volume_mm3"][position] == pytest.approx(2.5 * selection.sum())


def test_boolean_mask_default_index_and_small_rois():
    values = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    mask = np.zeros((3, 3, 3), bool)
    mask[1, 1, 1] = True
    result = roi.roi_statistics(values, mask, voxel_volume_mm3=1.0)
    assert result["index"].tolist() == [1]
    assert result["mean"][0] == 13 and result["median"][0] == 13 and result["p95"][0] == 13
    assert np.isnan(result["sd"][0])  # one voxel: no SD
    empty = roi.roi_statistics(values, np.zeros((3, 3, 3), int), voxel_volume_mm3=1.0)
    assert all(v.size == 0 for v in empty.values())


def test_bad_inputs_are_refused():
    values = np.zeros((4, 4, 4))
    with pytest.raises(ValueError, match="resample"):
        roi.roi_statistics(values, np.zeros((4, 4, 5), int), voxel_volume_mm3=1.0)
    with pytest.raises(ValueError, match="non-integer"):
        roi.roi_statistics(values, np.full((4, 4, 4), 0.5), voxel_volume_mm3=1.0)
    with pytest.raises(ValueError, match="positive"):
        roi.roi_statistics(values, np.zeros((4, 4, 4), int), voxel_volume_mm3=0.0)


def test_vectorised_speed():
    """One million voxels, 20 labels: well under a second."""
    import time

    rng = np.random.default_rng(1)
    values = rng.normal(size=(100, 100, 100)).astype(np.float32)
    labels = rng.integers(0, 21, values.shape)
    start = time.perf_counter()
    roi.roi_statistics(values, labels, voxel_volume_mm3=1.0)
    assert time.perf_counter() - start < 3.0


def _affine(voxel, origin, angle_deg=0.0):
    c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(voxel)
    affine[:3, 3] = origin
    return affine


def test_resample_integer_shift_is_exact():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, (12, 10, 8)).astype(np.int16)
    source = _affine((2.0, 2.0, 3.0), (-10.0, 4.0, 7.0))
    # target grid: shifted by (+3, -2, +1) voxels and larger
    target = source.copy()
    target[:3, 3] = source[:3, :3] @ np.array([3, -2, 1]) + source[:3, 3]
    out = roi.resample_labels(labels, source, target, (12, 14, 8))
    assert out.dtype == labels.dtype
    assert np.array_equal(out[:9, 2:12, :7], labels[3:, :, 1:])
    assert np.all(out[9:] == 0) and np.all(out[:, :2] == 0)
    assert roi.same_grid(source, labels.shape, source.copy(), (12, 10, 8))
    assert not roi.same_grid(source, labels.shape, target, (12, 10, 8))


def test_resample_finer_rotated_grid_keeps_volume():
    """A sphere drawn on a 2 mm grid, read on a rotated 1 mm grid: same place and volume."""
    shape = (32, 32, 32)
    source = _affine((2.0, 2.0, 2.0), (-32.0, -32.0, -32.0))
    centre = np.array([4.0, -6.0, 2.0])  # mm, scanner space
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    xyz = ijk @ source[:3, :3].T + source[:3, 3]
    labels = (np.linalg.norm(xyz - centre, axis=-1) < 12.0).astype(np.uint8)
    target = _affine((1.0, 1.0, 1.0), (-30.0, -30.0, -30.0), angle_deg=20.0)
    target[:3, 3] = -(target[:3, :3] @ np.array([30.0, 30.0, 30.0]))
    out = roi.resample_labels(labels, source, target, (60, 60, 60))
    volume_source = labels.sum() * 8.0
    volume_target = out.sum() * 1.0
    assert volume_target == pytest.approx(volume_source, rel=0.05)
    ijk_t = np.argwhere(out > 0)
    centroid = (ijk_t @ target[:3, :3].T + target[:3, 3]).mean(axis=0)
    assert np.allclose(centroid, centre, atol=0.5)


def test_voxel_volume():
    assert roi.voxel_volume(_affine((1.0, 2.0, 3.0), (0, 0, 0), 30.0)) == pytest.approx(6.0)
