"""The bad-input catalogue: every case gives a message naming the file, the problem and the
fix, the documented exit code, and never stops the other participants.

One dataset holds one participant per defective input plus a good one, processed by a single
``qsmprep`` run (the acquisition-level cases); dataset- and command-level cases (empty
dataset, unknown label, output folders, filter and config files) are separate quick runs.
The input tree is checksummed before and after every run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from qsmprep.cli.run import main
from qsmprep.datasets.bids import save_nifti

import _tiny_bids as tiny


def _anat(root: Path, label: str) -> Path:
    return root / f"sub-{label}" / "anat"


def _file(root: Path, label: str, echo: int, part: str, ext: str = "nii.gz") -> Path:
    return _anat(root, label) / f"sub-{label}_echo-{echo}_part-{part}_MEGRE.{ext}"


def _rewrite(path: Path, data=None, affine=None, keep_slope: bool = True) -> None:
    image = nb.load(path)
    values = np.asarray(image.dataobj) if data is None else data
    save_nifti(path, values, tiny.AFFINE if affine is None else affine)


def _sidecars(root, label, part=None, **changes):
    for echo in (1, 2, 3):
        for p in ([part] if part else ["mag", "phase"]):
            tiny.edit_sidecar(_file(root, label, echo, p, "json"), **changes)


# --------------------------------------------------------------------- defect builders
def _missing_echo_time(root, label):
    for part in ("mag", "phase"):
        tiny.edit_sidecar(_file(root, label, 2, part, "json"), EchoTime=None)


def _echo_time_ms(root, label):
    for echo, te in enumerate(tiny.ECHO_TIMES, start=1):
        for part in ("mag", "phase"):
            tiny.edit_sidecar(_file(root, label, echo, part, "json"), EchoTime=te * 1000)


def _phase_without_units(root, label):
    _sidecars(root, label, "phase", Units=None)


def _phase_in_degrees(root, label):
    _sidecars(root, label, "phase", Units="deg")


def _shape_mismatch(root, label):
    _rewrite(_file(root, label, 2, "phase"), data=np.zeros((24, 24, 20), np.int16))


def _affine_mismatch(root, label):
    shifted = tiny.AFFINE.copy()
    shifted[0, 3] += 10.0
    _rewrite(_file(root, label, 2, "phase"), affine=shifted)


def _echo_grids_differ(root, label):
    for part in ("mag", "phase"):
        _rewrite(_file(root, label, 3, part), data=np.zeros((20, 24, 24), np.int16))


def _duplicate_echo_time(root, label):
    for part in ("mag", "phase"):
        tiny.edit_sidecar(_file(root, label, 3, part, "json"), EchoTime=tiny.ECHO_TIMES[1])


def _echo_labels_not_increasing(root, label):
    """echo-1 and echo-3 swapped (files and sidecars): the labels decrease with EchoTime."""
    for part in ("mag", "phase"):
        for ext in ("nii.gz", "json"):
            first, third = _file(root, label, 1, part, ext), _file(root, label, 3, part, ext)
            first.rename(first.with_name("swap"))
            third.rename(first)
            first.with_name("swap").rename(third)


def _single_echo_megre(root, label):
    for path in _anat(root, label).glob("*_echo-[23]_*"):
        path.unlink()


def _nan_inf_voxels(root, label):
    path = _file(root, label, 2, "mag")
    data = np.asarray(nb.load(path).dataobj, dtype=np.float32)
    data[10:12, 10:12, 10:12] = np.nan
    data[0, 0, 0] = np.inf
    _rewrite(path, data=data)


def _zero_magnitude(root, label):
    for echo in (1, 2, 3):
        _rewrite(_file(root, label, echo, "mag"), data=np.zeros(tiny.SHAPE, np.int16))


def _constant_magnitude(root, label):
    for echo in (1, 2, 3):
        _rewrite(_file(root, label, echo, "mag"), data=np.full(tiny.SHAPE, 100, np.int16))


def _truncated_gzip(root, label):
    path = _file(root, label, 2, "phase")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _not_nifti(root, label):
    _file(root, label, 1, "mag").write_text("this is not an image\n")


def _single_slice(root, label):
    for echo in (1, 2, 3):
        for part in ("mag", "phase"):
            path = _file(root, label, echo, part)
            _rewrite(path, data=np.asarray(nb.load(path).dataobj)[:, :, 12:13])


def _five_d(root, label):
    for echo in (1, 2, 3):
        for part in ("mag", "phase"):
            path = _file(root, label, echo, part)
            data = np.asarray(nb.load(path).dataobj)[..., None, None]
            _rewrite(path, data=np.repeat(data, 2, axis=4))


def _absurd_voxel_size(root, label):
    huge = tiny.AFFINE.copy()
    huge[:3, :3] *= 1000.0  # 2 m voxels: a header in the wrong units
    for echo in (1, 2, 3):
        for part in ("mag", "phase"):
            _rewrite(_file(root, label, echo, part), affine=huge)


def _field_strength_in_mhz(root, label):
    _sidecars(root, label, MagneticFieldStrength=127.7)


def _imaging_frequency_in_hz(root, label):
    _sidecars(root, label, ImagingFrequency=127.7e6)


#: participant label -> (defect, outcome, (file fragment, problem fragment, fix fragment)).
#: "fail": the acquisition is refused (exit 1 for the run); "warn": processed, with a warning.
CASES = {
    "noecho": (_missing_echo_time, "fail",
               ("sub-noecho_echo-2_part-mag_MEGRE.nii.gz", "'EchoTime' is missing",
                "add it (in s)")),
    "tems": (_echo_time_ms, "fail",
             ("sub-tems_echo-1_part-mag_MEGRE.nii.gz", "look like milliseconds",
              "divide them by 1000")),
    "nounits": (_phase_without_units, "warn",
                ("sub-nounits_echo-1_part-phase_MEGRE.nii.gz", "'Units' missing",
                 "Add \"Units\" to the phase sidecars")),
    "degunits": (_phase_in_degrees, "fail",
                 ("sub-degunits_echo-1_part-phase_MEGRE.nii.gz", "'Units' is 'deg'",
                  "fix the phase sidecars")),
    "shape": (_shape_mismatch, "fail",
              ("sub-shape_echo-2_part-phase_MEGRE.nii.gz", "voxel grid (24, 24, 20) differs",
               "re-export them from the same series")),
    "affine": (_affine_mismatch, "fail",
               ("sub-affine_echo-2_part-phase_MEGRE.nii.gz", "affine (voxel-to-scanner "
                "matrix) differs", "re-export them from the same series")),
    "grids": (_echo_grids_differ, "fail",
              ("sub-grids_echo-3_part-mag_MEGRE.nii.gz", "voxel grid (20, 24, 24) differs",
               "must share one grid")),
    "mhzfield": (_field_strength_in_mhz, "fail",
                 ("sub-mhzfield_echo-1_part-mag_MEGRE.nii.gz",
                  "127.7 MHz is the proton frequency at 3 T", "Fix the sidecars")),
    "hzfreq": (_imaging_frequency_in_hz, "fail",
               ("sub-hzfreq_echo-1_part-mag_MEGRE.nii.gz", "'ImagingFrequency' 1.277e+08",
                "ImagingFrequency is in MHz")),
    "dupte": (_duplicate_echo_time, "fail",
              ("sub-dupte_echo-3_part-mag_MEGRE.nii.gz", "duplicate EchoTime [0.01]",
               "fix the sidecars")),
    "order": (_echo_labels_not_increasing, "warn",
              ("sub-order_echo-3_part-mag_MEGRE.nii.gz", "not increasing",
               "orders echoes by EchoTime")),
    "single": (_single_echo_megre, "warn",
               ("sub-single_echo-1_part-mag_MEGRE.nii.gz", "single echo although labelled "
                "MEGRE", "'T2starw'")),
    "nan": (_nan_inf_voxels, "warn",
            ("sub-nan_echo-1_part-mag_MEGRE.nii.gz", "9 voxels hold NaN/Inf values",
             "masked out of every map")),
    "zero": (_zero_magnitude, "fail",
             ("sub-zero_echo-1_part-mag_MEGRE.nii.gz", "magnitude is constant (every voxel "
              "is 0)", "re-export them")),
    "const": (_constant_magnitude, "fail",
              ("sub-const_echo-1_part-mag_MEGRE.nii.gz", "every voxel is 100",
               "re-export them")),
    "trunc": (_truncated_gzip, "fail",
              ("sub-trunc_echo-2_part-phase_MEGRE.nii.gz", "the header needs 28000",
               "truncated or corrupt: copy or convert it again")),
    "notnii": (_not_nifti, "fail",
               ("sub-notnii_echo-1_part-mag_MEGRE.nii.gz", "cannot be read as NIfTI",
                "re-export it from DICOM")),
    "flat": (_single_slice, "fail",
             ("sub-flat_echo-1_part-mag_MEGRE.nii.gz", "shape (24, 24, 1) is not a 3D volume",
              "convert the whole series")),
    "fived": (_five_d, "fail",
              ("sub-fived_echo-1_part-mag_MEGRE.nii.gz", "5D image",
               "split the extra dimensions")),
    "voxel": (_absurd_voxel_size, "fail",
              ("sub-voxel_echo-1_part-mag_MEGRE.nii.gz", "voxel size (2000, 2000, 2000) mm is "
               "implausible", "fix the conversion or the header units")),
}


def _blocked_network(*args, **kwargs):
    raise AssertionError("qsmprep tried to open a network connection")


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """All acquisition-level cases + a good participant in one run (network blocked)."""
    base = tmp_path_factory.mktemp("catalogue")
    root = tiny.new_dataset(base / "bids")
    tiny.add_participant(root, "good")
    for label, (defect, _, _) in CASES.items():
        tiny.clone_participant(root, "good", label)
        defect(root, label)
    before = tiny.checksums(root)
    log_file = base / "qsmprep.log"
    handler = logging.FileHandler(log_file)  # forked node processes inherit it
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("qsmprep")
    logger.addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(socket.socket, "connect", _blocked_network)
            patch.setattr(socket, "create_connection", _blocked_network)
            code = main([str(root), str(base / "out"), "participant", "-w", str(base / "work"),
                         "--nprocs", "2", "--skip-bids-validation"])
    finally:
        logger.removeHandler(handler)
        handler.close()
    after = tiny.checksums(root)
    return {"root": root, "out": base / "out", "code": code, "log": log_file.read_text(),
            "inputs_unchanged": before == after}


def test_run_contains_every_failure(catalogue):
    assert catalogue["code"] == 1  # CONVENTIONS §1: a participant failed, others completed
    assert catalogue["inputs_unchanged"]
    chimap = catalogue["out"] / "sub-good" / "anat" / "sub-good_Chimap.nii.gz"
    assert chimap.exists() and np.isfinite(nb.load(chimap).get_fdata()).all()


@pytest.mark.parametrize("label", sorted(CASES))
def test_case_message_and_outcome(catalogue, label):
    _, outcome, (name, problem, fix) = CASES[label]
    lines = [line for line in catalogue["log"].splitlines() if name in line]
    level = "WARNING" if outcome == "warn" else "ERROR"
    assert any(problem in line and fix in line for line in lines), (
        f"no {level} line naming {name} with '{problem}' and '{fix}':\n" + catalogue["log"])
    assert any(line.startswith(level) or line.startswith("  - ") for line in lines)
    chimap = catalogue["out"] / f"sub-{label}" / "anat" / f"sub-{label}_Chimap.nii.gz"
    if outcome == "fail":
        assert not chimap.exists()
        assert not list(catalogue["out"].glob(f"sub-{label}/anat/*.nii.gz"))
    else:
        chi = nb.load(chimap).get_fdata()
        assert np.isfinite(chi).all() and np.count_nonzero(chi) > 100


def test_handled_cases_are_recorded(catalogue):
    out = catalogue["out"]
    nan_sidecar = json.loads((out / "sub-nan/anat/sub-nan_Chimap.json").read_text())
    assert nan_sidecar["NonFiniteVoxels"] == 9
    for name in ("R2starmap", "T2starmap", "S0map"):
        assert np.isfinite(nb.load(out / f"sub-nan/anat/sub-nan_{name}.nii.gz").get_fdata()).all()
    inferred = json.loads((out / "sub-nounits/anat/sub-nounits_Chimap.json").read_text())
    assert inferred["PhaseUnits"] == "arbitrary"
    # the single echo has no R2* (needs 2 echoes); the echo order follows EchoTime
    assert not list(out.glob("sub-single/anat/*R2starmap*"))
    order = json.loads((out / "sub-order/anat/sub-order_Chimap.json").read_text())
    assert order["EchoTime"] == list(tiny.ECHO_TIMES)
    good = nb.load(out / "sub-good/anat/sub-good_Chimap.nii.gz").get_fdata()
    reordered = nb.load(out / "sub-order/anat/sub-order_Chimap.nii.gz").get_fdata()
    np.testing.assert_allclose(reordered, good, atol=1e-6)  # same data, same map


# ---------------------------------------------------------- dataset- and command-level
@pytest.fixture
def small(tmp_path):
    root = tiny.new_dataset(tmp_path / "bids")
    tiny.add_participant(root, "01")
    return root


def _run(root: Path, out: Path, *args: str) -> int:
    before = tiny.checksums(root)
    code = main([str(root), str(out), "participant", "--skip-bids-validation",
                 "-w", str(out.parent / "work"), *args])
    assert tiny.checksums(root) == before
    return code


def test_single_bad_participant_alone_exits_1(tmp_path, caplog):
    root = tiny.new_dataset(tmp_path / "bids")
    tiny.add_participant(root, "good")
    tiny.clone_participant(root, "good", "tems")
    _echo_time_ms(root, "tems")
    assert _run(root, tmp_path / "out", "--participant-label", "tems") == 1
    assert "no acquisition can be processed" in caplog.text
    assert not (tmp_path / "out" / "sub-tems").exists()


def test_empty_dataset_exits_66(tmp_path, caplog):
    root = tiny.new_dataset(tmp_path / "bids")
    assert _run(root, tmp_path / "out") == 66
    assert "holds no gradient-echo QSM input" in caplog.text and "_MEGRE.nii" in caplog.text


def test_unknown_participant_exits_64(small, tmp_path, caplog):
    assert _run(small, tmp_path / "out", "--participant-label", "99") == 64
    assert "sub-99 not found" in caplog.text and "available: sub-01" in caplog.text


@pytest.mark.parametrize("where", ["same", "inside", "work-inside"])
def test_output_or_work_dir_in_the_dataset_exits_64(small, tmp_path, caplog, where):
    out = {"same": small, "inside": small / "sub-01" / "out"}.get(where, tmp_path / "out")
    extra = ["-w", str(small / "work")] if where == "work-inside" else []
    before = tiny.checksums(small)
    assert main([str(small), str(out), "participant", "--skip-bids-validation", *extra]) == 64
    assert tiny.checksums(small) == before
    expected = {"same": "is the BIDS dataset itself; choose another folder",
                "inside": "is inside the BIDS dataset; write derivatives under",
                "work-inside": "is inside the BIDS dataset; pass -w"}[where]
    assert expected in caplog.text
    assert not (small / "sub-01" / "out").exists() and not (small / "work").exists()


def test_unwritable_output_dir_exits_64(small, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert _run(small, blocker / "out") == 64
    assert "cannot create the output_dir" in caplog.text and str(blocker / "out") in caplog.text
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert _run(small, locked) == 64
        assert "is not writable" in caplog.text


@pytest.mark.parametrize(
    ("content", "code", "named"),
    [
        ("{not json", 64, "cannot read BIDS filter file"),
        ('{"acqusition": "x"}', 64, "'acqusition'"),
        ('{"session": {"a": 1}}', 64, "'session' has the value {'a': 1}"),
        ('{"subject": "../x"}', 64, "'subject' has the value '../x'"),
        ('["subject"]', 64, "must hold a JSON object"),
        ('{"acquisition": "nothere"}', 18, "matched the requested participants"),
    ],
)
def test_invalid_filter_file(small, tmp_path, caplog, content, code, named):
    filters = tmp_path / "filters.json"
    filters.write_text(content)
    assert _run(small, tmp_path / "out", "--bids-filter-file", str(filters)) == code
    assert named in caplog.text
    assert str(filters) in caplog.text or code == 18


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ('[workflow]\ninversion_methd = "tv"\n', "inversion_methd"),
        ('[workflw]\n', "[workflw]"),
        ('[workflow]\nbfr_erode_mm = "three"\n', "'bfr_erode_mm': expected a number"),
        ('[workflow\n', "cannot read config file"),
        ('[execution]\nparticipant_label = ["../x"]\n', "participant_label"),
    ],
)
def test_invalid_config_file_names_the_key(small, tmp_path, capsys, content, named):
    config = tmp_path / "bad.toml"
    config.write_text(content)
    with pytest.raises(SystemExit) as stop:
        main([str(small), str(tmp_path / "out"), "participant", "--config-file", str(config)])
    assert stop.value.code == 64
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("content", "problem"), [("{bad json", "is not valid JSON"),
                                                   ("[1, 2]", "holds a JSON list")])
def test_broken_sidecar_exits_16(small, tmp_path, caplog, content, problem):
    sidecar = _file(small, "01", 2, "phase", "json")
    sidecar.write_text(content)
    assert _run(small, tmp_path / "out") == 16  # not valid BIDS (found without the validator)
    assert f"{sidecar} {problem}" in caplog.text and "must be JSON objects" in caplog.text


def test_a_problem_shared_by_every_image_is_one_line(catalogue):
    """Six single-slice echo files give one error line naming the first, not six lines."""
    lines = [line for line in catalogue["log"].splitlines()
             if "sub-flat_" in line and "is not a 3D volume" in line]
    assert len(lines) == 1, "\n".join(lines)
    assert "sub-flat_echo-1_part-mag_MEGRE.nii.gz (and 5 more of its images)" in lines[0]
