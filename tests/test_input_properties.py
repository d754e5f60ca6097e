"""Property-based tests of the input layer (discovery, sidecar and header checks, loading).

Whatever the sidecar metadata and the (small, random) images hold, the input layer either
accepts the acquisition or reports a documented error: a problem message naming the file
(``Acquisition.problems``), :class:`qsmprep.bids.BIDSInputError` with an exit code, or
:class:`qsmprep.interfaces.phase.InputDataError` when the voxel data cannot be used. It never
fails with any other exception, and what it accepts is consistent (positive, increasing echo
times in s, a positive field, known phase units, one 3D grid).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qsmprep import bids
from qsmprep.interfaces.phase import InputDataError, LoadEchoes

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=2),
                           max_leaves=5)


def mostly(common, rare, odds: int = 4):
    """``common`` ``odds`` times out of ``odds + 1``, else ``rare`` (both outcomes explored)."""
    return st.integers(0, odds).flatmap(lambda i: common if i < odds else rare)


echo_times = mostly(st.floats(1e-4, 0.08), st.one_of(st.floats(1.0, 80.0), json_values))
units = mostly(st.sampled_from(["rad", "arbitrary"]),
               st.one_of(st.sampled_from(["Radians", "deg", "", None]), json_values))


def _dataset(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "p", "BIDSVersion": "1.10.0"}))
    return root


def _image(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write with the affine as sform only (a qform cannot hold singular/NaN matrices)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = nb.Nifti1Header()
    header.set_sform(affine, code=1)  # stored as is; the image gets no affine to re-derive
    nb.Nifti1Image(data, None, header=header).to_filename(str(path))


def _sidecar(path: Path, meta: dict) -> None:
    path.with_name(path.name.split(".")[0] + ".json").write_text(json.dumps(meta))


def _check_accepted(acquisition: bids.Acquisition) -> None:
    times = acquisition.echo_times
    assert times and all(0 < t < 1 for t in times)
    assert times == sorted(times) and len(set(times)) == len(times)
    assert acquisition.b0_tesla is not None and math.isfinite(acquisition.b0_tesla)
    assert acquisition.b0_tesla > 0
    assert acquisition.phase_units in (None, "rad", "arbitrary")


@SETTINGS
@given(
    n_echoes=st.integers(1, 3),
    te=st.lists(echo_times, min_size=3, max_size=3),
    phase_units=st.lists(units, min_size=3, max_size=3),
    field=mostly(st.sampled_from([{"MagneticFieldStrength": 3}, {"ImagingFrequency": 297.2}]),
                 st.one_of(st.fixed_dictionaries({"MagneticFieldStrength": json_values}),
                           st.fixed_dictionaries({"ImagingFrequency": json_values}),
                           st.just({}))),
    extra=st.dictionaries(st.sampled_from(["EchoTime", "Units", "RepetitionTime", "Manufacturer"]),
                          json_values, max_size=2),
)
def test_sidecar_metadata_is_accepted_or_reported(n_echoes, te, phase_units, field, extra):
    with tempfile.TemporaryDirectory() as tmp:
        root = _dataset(Path(tmp) / "ds")
        (root / "MEGRE.json").write_text(json.dumps({**extra, **field}))
        anat = root / "sub-01" / "anat"
        data = np.arange(4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3)
        for n in range(n_echoes):
            stem = anat / f"sub-01_echo-{n + 1}"
            for part in ("mag", "phase"):
                path = Path(f"{stem}_part-{part}_MEGRE.nii.gz")
                _image(path, data, np.eye(4))
                meta = {"EchoTime": te[n]}
                if part == "phase" and phase_units[n] is not None:
                    meta["Units"] = phase_units[n]
                _sidecar(path, meta)
        try:
            acquisitions = bids.discover(bids.load_layout(root))
        except bids.BIDSInputError as error:
            event(f"BIDSInputError {error.exit_code}")
            assert error.exit_code in (16, 18, 64, 66) and str(error)
            return
        for acquisition in acquisitions:
            assert all(isinstance(p, str) and p for p in acquisition.problems)
            event("problems reported" if acquisition.problems else "accepted")
            if not acquisition.problems:
                assert bids.check_images(acquisition) == (4, 4, 3)
                _check_accepted(acquisition)


dtypes = st.sampled_from([np.int16, np.uint8, np.float32, np.float64, np.int32])
shapes = mostly(st.tuples(st.integers(2, 5), st.integers(2, 5), st.integers(2, 5)),
                st.lists(st.integers(1, 5), min_size=2, max_size=5).map(tuple))
affines = mostly(st.tuples(st.floats(0.2, 5), st.floats(0.2, 5), st.floats(0.2, 5)).map(
    lambda v: np.diag([*v, 1.0])), st.one_of(
    st.floats(1e-4, 1e4).map(lambda s: np.diag([s, s, s, 1.0])),
    st.lists(st.one_of(st.floats(-5, 5), st.sampled_from([np.nan, np.inf])), min_size=12,
             max_size=12).map(lambda v: np.vstack([np.reshape(v, (3, 4)), [0, 0, 0, 1]]))))


@settings(SETTINGS, max_examples=80)
@given(
    mag_shape=shapes, phase_shape=mostly(st.none(), shapes), dtype=dtypes,
    mag_affine=affines, phase_affine=mostly(st.none(), affines),
    fill=mostly(st.just("random"), st.sampled_from(["zeros", "nan", "inf", "constant"]), 2),
    corrupt=mostly(st.none(), st.sampled_from(["truncate", "garbage", "empty"])),
    seed=st.integers(0, 2**16),
)
def test_random_volumes_are_accepted_or_reported(mag_shape, phase_shape, dtype, mag_affine,
                                                 phase_affine, fill, corrupt, seed):
    rng = np.random.default_rng(seed)
    phase_shape = mag_shape if phase_shape is None else phase_shape
    phase_affine = mag_affine if phase_affine is None else phase_affine
    with tempfile.TemporaryDirectory() as tmp:
        root = _dataset(Path(tmp) / "ds")
        anat = root / "sub-01" / "anat"
        files = {}
        for part, shape, affine in (("mag", mag_shape, mag_affine),
                                    ("phase", phase_shape, phase_affine)):
            values = rng.normal(100, 30, size=shape)
            if fill == "zeros":
                values[:] = 0
            elif fill == "constant":
                values[:] = 7
            elif fill in ("nan", "inf") and np.dtype(dtype).kind == "f":
                values.flat[:: max(values.size // 3, 1)] = np.nan if fill == "nan" else np.inf
            if np.dtype(dtype).kind in "iu":
                values = np.nan_to_num(np.clip(values, 0, 127))
            files[part] = anat / f"sub-01_echo-1_part-{part}_MEGRE.nii.gz"
            _image(files[part], values.astype(dtype), affine)
        target = files["phase"]
        if corrupt == "truncate":
            target.write_bytes(target.read_bytes()[: max(target.stat().st_size // 2, 1)])
        elif corrupt == "garbage":
            target.write_bytes(rng.integers(0, 256, 200, dtype=np.uint8).tobytes())
        elif corrupt == "empty":
            target.write_bytes(b"")
        acquisition = bids.Acquisition(
            entities={"subject": "01"}, suffix="MEGRE", b0_tesla=3.0, b0_source="test",
            phase_units="arbitrary",
            echoes=[bids.Echo(1, 0.01, magnitude=str(files["mag"]), phase=str(files["phase"]))])
        shape = bids.check_images(acquisition)
        if shape is None:
            event("reported by check_images")
            assert acquisition.problems
            assert all(str(anat) in p for p in acquisition.problems), acquisition.problems
            return
        assert not acquisition.problems and corrupt is None
        assert len(shape) == 3 or all(n == 1 for n in shape[3:])
        assert min(shape[:3]) >= 2 and shape[:3] == phase_shape[:3]
        try:
            LoadEchoes(magnitude_files=[str(files["mag"])], phase_files=[str(files["phase"])],
                       phase_units="arbitrary").run(cwd=tmp)
            event("loaded")
        except InputDataError as error:
            event("reported by LoadEchoes")
            assert str(files["mag"]) in str(error) or str(files["phase"]) in str(error)
            assert fill in ("zeros", "constant", "nan", "inf") or np.dtype(dtype).kind in "iu"


def test_property_tests_can_fail():
    """The accepted-acquisition checks reject what the input layer must never accept."""
    bad = bids.Acquisition(entities={"subject": "01"}, suffix="MEGRE",
                           echoes=[bids.Echo(1, 20.0, "m.nii")], b0_tesla=3.0,
                           b0_source="x", phase_units=None)
    with pytest.raises(AssertionError):
        _check_accepted(bad)
