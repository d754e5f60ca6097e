"""Two sessions x two runs: every acquisition is its own unit; failures stay contained."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from qsmprep.cli.run import main

pytestmark = pytest.mark.slow

DATASET = Path(__file__).resolve().parents[1] / "bids_examples" / "brain_sessions"


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def broken_copy(tmp_path_factory):
    """The dataset with run 2 of session 2 missing an EchoTime (a user error)."""
    if not DATASET.exists():
        pytest.skip("bundled example missing")
    root = tmp_path_factory.mktemp("sessions") / "bids"
    shutil.copytree(DATASET, root, ignore=shutil.ignore_patterns("derivatives"))
    sidecar = root / "sub-01/ses-02/anat/sub-01_ses-02_run-2_echo-2_part-mag_MEGRE.json"
    meta = json.loads(sidecar.read_text())
    meta.pop("EchoTime")
    sidecar.write_text(json.dumps(meta))
    return root


def test_every_session_and_run_processed_and_failure_contained(broken_copy, tmp_path):
    before = _checksums(broken_copy)
    out = tmp_path / "out"
    code = main([str(broken_copy), str(out), "participant", "-w", str(tmp_path / "work"),
                 "--nprocs", "2", "--skip-bids-validation"])
    assert code == 1  # one acquisition failed, the others completed
    chimaps = sorted(p.name for p in out.rglob("*_Chimap.nii.gz"))
    assert chimaps == ["sub-01_ses-01_run-1_Chimap.nii.gz", "sub-01_ses-01_run-2_Chimap.nii.gz",
                       "sub-01_ses-02_run-1_Chimap.nii.gz"]
    assert _checksums(broken_copy) == before  # inputs never modified
    # two runs of one session (same truth, new noise) agree closely
    anat = out / "sub-01" / "ses-01" / "anat"
    run1 = nb.load(anat / "sub-01_ses-01_run-1_Chimap.nii.gz").get_fdata()
    run2 = nb.load(anat / "sub-01_ses-01_run-2_Chimap.nii.gz").get_fdata()
    both = (run1 != 0) & (run2 != 0)
    assert np.corrcoef(run1[both], run2[both])[0, 1] > 0.8


def test_session_filter_selects_one_unit(broken_copy, tmp_path):
    out = tmp_path / "out"
    code = main([str(broken_copy), str(out), "participant", "-w", str(tmp_path / "work"),
                 "--session-label", "01", "--skip-bids-validation", "--inversion-method", "l2",
                 "--swi", "--unwrap-method", "romeo"])
    assert code == 0
    anat = out / "sub-01" / "ses-01" / "anat"
    for name in ("swi", "minIP", "desc-mip_Chimap"):
        assert (anat / f"sub-01_ses-01_run-1_{name}.nii.gz").exists(), name
    swi = nb.load(anat / "sub-01_ses-01_run-1_swi.nii.gz").get_fdata()
    minip = nb.load(anat / "sub-01_ses-01_run-1_minIP.nii.gz").get_fdata()
    assert np.all(minip <= swi + 1e-3)
    assert sorted(p.name for p in out.rglob("*_run-?_Chimap.nii.gz")) == [
        "sub-01_ses-01_run-1_Chimap.nii.gz", "sub-01_ses-01_run-2_Chimap.nii.gz"]
    sidecar = json.loads((out / "sub-01/ses-01/anat/sub-01_ses-01_run-1_Chimap.json").read_text())
    assert sidecar["DipoleInversion"] == "l2"


def test_provided_masks_from_mask_dir(broken_copy, tmp_path):
    """--mask-dir: <entities>_desc-brain_mask images replace the computed masks."""
    truth = DATASET / "derivatives" / "groundtruth" / "sub-01" / "ses-01" / "anat"
    masks = tmp_path / "masks" / "sub-01" / "ses-01" / "anat"
    masks.mkdir(parents=True)
    shutil.copyfile(truth / "sub-01_ses-01_desc-brain_mask.nii.gz",
                    masks / "sub-01_ses-01_run-1_desc-brain_mask.nii.gz")
    out = tmp_path / "out"
    code = main([str(broken_copy), str(out), "participant", "-w", str(tmp_path / "work"),
                 "--session-label", "01", "--skip-bids-validation", "--mask-dir",
                 str(tmp_path / "masks")])
    assert code == 0
    anat = out / "sub-01" / "ses-01" / "anat"
    provided = json.loads((anat / "sub-01_ses-01_run-1_desc-brain_mask.json").read_text())
    computed = json.loads((anat / "sub-01_ses-01_run-2_desc-brain_mask.json").read_text())
    assert provided["Description"] == "Provided mask."
    assert computed["Description"].startswith("Magnitude-based")
    # provenance: the provided mask, through the 'masks' dataset link; the computed one
    # comes from the raw echoes
    assert provided["Sources"] == ["bids:masks:sub-01/ses-01/anat/"
                                   "sub-01_ses-01_run-1_desc-brain_mask.nii.gz"]
    assert all(source.startswith("bids:raw:sub-01/ses-01/anat/sub-01_ses-01_run-2_")
               for source in computed["Sources"])
    links = json.loads((out / "dataset_description.json").read_text())["DatasetLinks"]
    assert links["masks"] == (tmp_path / "masks").resolve().as_uri()
    written = nb.load(anat / "sub-01_ses-01_run-1_desc-brain_mask.nii.gz").get_fdata() > 0
    expected = nb.load(truth / "sub-01_ses-01_desc-brain_mask.nii.gz").get_fdata() > 0
    np.testing.assert_array_equal(written, expected)
