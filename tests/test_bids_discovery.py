"""Input discovery on the BIDS specification's QSM-related examples and on edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from qsmprep import bids
from qsmprep.recon.dipole import GAMMA_BAR_MHZ_PER_T

from conftest import shared_data


def _discover(root: Path, **kwargs):
    return bids.discover(bids.load_layout(root), **kwargs)


def test_qmri_megre_magnitude_only_eight_echoes():
    root = shared_data("bids_examples_qsm", "qmri_megre")
    (acq,) = _discover(root)
    assert acq.subject == "01" and acq.suffix == "MEGRE"
    assert acq.echo_times == pytest.approx([0.02 * n for n in range(1, 9)])
    assert [e.number for e in acq.echoes] == list(range(1, 9))
    assert not acq.has_phase and all(e.magnitude for e in acq.echoes)
    # MagneticFieldStrength is inherited from the top-level MEGRE.json
    assert acq.b0_tesla == 3.0 and acq.b0_source == "MagneticFieldStrength"
    assert acq.metadata["Manufacturer"] == "Siemens"
    assert not acq.problems


def test_qmri_qsm_single_echo_t1w_with_parts():
    root = shared_data("bids_examples_qsm", "qmri_qsm")
    (acq,) = _discover(root)
    assert acq.suffix == "T1w" and acq.echo_times == [0.0081]
    assert acq.has_phase and acq.phase_units == "arbitrary"
    assert acq.echoes[0].magnitude.endswith("sub-01_part-mag_T1w.nii")
    assert acq.echoes[0].phase.endswith("sub-01_part-phase_T1w.nii")
    assert not acq.problems


def test_qmri_mese_has_no_gradient_echo_input():
    root = shared_data("bids_examples_qsm", "qmri_mese")
    with pytest.raises(bids.BIDSInputError) as error:
        _discover(root)
    assert error.value.exit_code == 66  # valid dataset without QSM inputs (no filters given)


def test_qmri_mp2rageme_uses_the_multi_echo_inversion():
    root = shared_data("bids_examples_qsm", "qmri_mp2rageme")
    (acq,) = _discover(root)
    assert acq.entities == {"subject": "1", "inv": "2"}
    assert acq.echo_times == pytest.approx([0.006, 0.0145, 0.023, 0.0315])
    assert acq.has_phase and acq.b0_tesla == 7.0 and acq.phase_units == "arbitrary"
    assert acq.output_entities == {"subject": "1"}


def test_swi_example_two_echoes_mag_phase():
    root = shared_data("bids_examples_qsm", "swi_PR541", "swi")
    (acq,) = _discover(root)
    assert acq.echo_times == pytest.approx([0.006, 0.012])
    assert acq.has_phase and acq.phase_units == "arbitrary"
    assert all("part-mag" in e.magnitude and "part-phase" in e.phase for e in acq.echoes)


def _write(path: Path, sidecar: dict | None = None, shape=(4, 4, 3), data=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros(shape, np.float32) if data is None else data
    nb.Nifti1Image(array, np.eye(4)).to_filename(str(path))
    if sidecar is not None:
        path.with_name(path.name.split(".")[0] + ".json").write_text(json.dumps(sidecar))


def _dataset(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "t", "BIDSVersion": "1.10.0"}))
    return root


def test_sessions_runs_are_separate_units_and_echoes_sorted_by_time(tmp_path):
    root = _dataset(tmp_path / "ds")
    (root / "MEGRE.json").write_text(json.dumps({"ImagingFrequency": 123.25}))
    # echo labels deliberately disagree with the time order: sorting must use EchoTime
    times = {"1": 0.012, "2": 0.004, "10": 0.02}
    for ses in ("1", "2"):
        for run in ("1", "2"):
            anat = root / "sub-01" / f"ses-{ses}" / "anat"
            for echo, te in times.items():
                stem = f"sub-01_ses-{ses}_run-{run}_echo-{echo}"
                _write(anat / f"{stem}_part-mag_MEGRE.nii.gz", {"EchoTime": te})
                _write(anat / f"{stem}_part-phase_MEGRE.nii.gz", {"EchoTime": te, "Units": "rad"})
    acquisitions = _discover(root)
    assert len(acquisitions) == 4
    names = {a.name for a in acquisitions}
    assert "sub-01_ses-2_run-1_MEGRE" in names
    for acq in acquisitions:
        assert acq.echo_times == [0.004, 0.012, 0.02]
        assert [e.number for e in acq.echoes] == [2, 1, 10]
        assert acq.b0_tesla == pytest.approx(123.25 / GAMMA_BAR_MHZ_PER_T)
        assert acq.b0_source == "ImagingFrequency"
        assert acq.phase_units == "rad"
    only = _discover(root, session_label=["ses-2"], filters={"run": "1"})
    assert [a.name for a in only] == ["sub-01_ses-2_run-1_MEGRE"]


def test_4d_file_with_echo_time_list(tmp_path):
    root = _dataset(tmp_path / "ds")
    anat = root / "sub-02" / "anat"
    meta = {"EchoTime": [0.003, 0.006, 0.009], "MagneticFieldStrength": 7}
    _write(anat / "sub-02_part-mag_MEGRE.nii.gz", meta, shape=(4, 4, 3, 3))
    _write(anat / "sub-02_part-phase_MEGRE.nii.gz", {**meta, "Units": "arbitrary"},
           shape=(4, 4, 3, 3))
    (acq,) = _discover(root)
    assert acq.echo_times == [0.003, 0.006, 0.009]
    assert [e.volume for e in acq.echoes] == [0, 1, 2]
    assert acq.b0_tesla == 7 and bids.image_shape(acq) == (4, 4, 3, 3)


@pytest.mark.parametrize(
    ("sidecar", "problem"),
    [
        ({"MagneticFieldStrength": 3}, "'EchoTime' is missing"),
        ({"MagneticFieldStrength": 3, "EchoTime": 20}, "milliseconds"),
        ({"EchoTime": 0.02}, "--b0-tesla"),
    ],
)
def test_problems_are_named(tmp_path, sidecar, problem):
    root = _dataset(tmp_path / "ds")
    anat = root / "sub-01" / "anat"
    _write(anat / "sub-01_echo-1_part-mag_MEGRE.nii.gz", sidecar)
    _write(anat / "sub-01_echo-1_part-phase_MEGRE.nii.gz", {**sidecar, "Units": "rad"})
    (acq,) = _discover(root)
    assert any(problem in p for p in acq.problems), acq.problems


def test_bad_phase_units_and_unknown_filter(tmp_path):
    root = _dataset(tmp_path / "ds")
    anat = root / "sub-01" / "anat"
    meta = {"EchoTime": 0.01, "MagneticFieldStrength": 3}
    _write(anat / "sub-01_echo-1_part-mag_MEGRE.nii.gz", meta)
    _write(anat / "sub-01_echo-1_part-phase_MEGRE.nii.gz", {**meta, "Units": "deg"})
    (acq,) = _discover(root)
    assert any("'rad' or 'arbitrary'" in p for p in acq.problems)
    with pytest.raises(bids.BIDSInputError) as error:
        _discover(root, filters={"acqusition": "x"})
    assert error.value.exit_code == 64 and "acqusition" in str(error.value)


def test_clashing_output_names_are_disambiguated(tmp_path):
    root = _dataset(tmp_path / "ds")
    anat = root / "sub-01" / "anat"
    meta = {"EchoTime": 0.01, "MagneticFieldStrength": 3}
    for suffix in ("MEGRE", "T2starw"):
        _write(anat / f"sub-01_part-mag_{suffix}.nii.gz", meta)
        _write(anat / f"sub-01_part-phase_{suffix}.nii.gz", {**meta, "Units": "rad"})
    acquisitions = _discover(root)
    labels = sorted(a.output_entities["acquisition"] for a in acquisitions)
    assert labels == ["MEGRE", "T2starw"]


def test_derivative_paths():
    entities = {"subject": "01", "session": "2", "run": "01"}
    assert bids.derivative_path(entities, "Chimap") == "sub-01/ses-2/anat/sub-01_ses-2_run-01_Chimap.nii.gz"
    assert bids.derivative_path(entities, "MEGRE", echo=3, part="phase", desc="unwrapped") == (
        "sub-01/ses-2/anat/sub-01_ses-2_run-01_echo-3_part-phase_desc-unwrapped_MEGRE.nii.gz")
    assert bids.derivative_path(entities, "fieldmap", desc="total", datatype="fmap").startswith(
        "sub-01/ses-2/fmap/")
    with pytest.raises(ValueError, match="alphanumeric"):
        bids.derivative_path({"subject": "../x"}, "Chimap")


def test_gamma_constant_in_sync():
    assert bids.GAMMA_BAR_MHZ_PER_T == GAMMA_BAR_MHZ_PER_T


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 1), (6, 5, 1, 3)])
def test_a_single_slice_is_refused_unless_allowed(tmp_path, shape):
    """One slice (2D image, [x, y, 1] or a 4D file of them) is no QSM input, but the
    water-fat maps can be made of it (``single_slice``); its shape reads as [x, y, 1, ...]."""
    root = _dataset(tmp_path / "ds")
    anat = root / "sub-01" / "anat"
    meta = {"EchoTime": [0.003, 0.006, 0.009] if len(shape) == 4 else 0.003,
            "MagneticFieldStrength": 3}
    stems = ["sub-01_part-{}_MEGRE"] if len(shape) == 4 else [
        f"sub-01_echo-{n}_part-{{}}_MEGRE" for n in (1, 2, 3)]
    for n, stem in enumerate(stems):
        echo_meta = meta if len(shape) == 4 else {**meta, "EchoTime": 0.003 * (n + 1)}
        _write(anat / f"{stem.format('mag')}.nii.gz", echo_meta, shape=shape)
        _write(anat / f"{stem.format('phase')}.nii.gz", {**echo_meta, "Units": "rad"},
               shape=shape)
    (acq,) = _discover(root)
    assert bids.check_images(acq) is None
    assert "is not a 3D volume" in acq.problems[0] and "waterfat" in acq.problems[0]
    (acq,) = _discover(root)
    assert bids.check_images(acq, single_slice=True)[:3] == (6, 5, 1)
    assert not acq.problems
