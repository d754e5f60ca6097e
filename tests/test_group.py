"""Group level end to end on the bundled simulated vertebra study, and the study designs.

The participant level runs through the CLI with the observers' ROIs and a lambda sweep, the
group level reads only its outputs; recovered slope, correlations, ICCs and the best lambda
are checked against the simulation's truth (derivatives/groundtruth/study_truth.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from qsmprep import study_io
from qsmprep.analysis import study
from qsmprep.cli.run import main

DATASET = Path(__file__).resolve().parents[1] / "bids_examples" / "vertebra_study"
SWEEP = ("2e-5", "2e-4", "2e-3")


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False,
                       dtype={"session": str})


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    if not DATASET.exists():
        pytest.skip("bundled vertebra_study example missing")
    tmp = tmp_path_factory.mktemp("study")
    plugin = tmp / "linear.json"
    plugin.write_text('{"plugin": "Linear"}')  # in-process: no per-node process start-up
    out = tmp / "out"
    code = main([str(DATASET), str(out), "participant", "-w", str(tmp / "work"),
                 "--skip-bids-validation", "--use-plugin", str(plugin),
                 "--roi-dir", str(DATASET / "derivatives" / "rois"),
                 "--lambda-sweep", *SWEEP])
    assert code == 0
    code = main([str(DATASET), str(out), "group", "--reference-table",
                 str(DATASET / "derivatives" / "reference" / "qct.tsv"), "--covariates", "age"])
    assert code == 0
    truth = json.loads((DATASET / "derivatives" / "groundtruth" / "study_truth.json").read_text())
    return out, truth


def _truth_points(truth) -> pd.DataFrame:
    rows = []
    for p in truth["participants"]:
        for roi in ("L1", "L2", "L3", "L4"):
            rows.append({"participant_id": p["participant_id"], "roi": roi,
                         "bmd": p[f"{roi}_bmd"], "chi": p[f"{roi}_chi_ppm"],
                         "r2star": p[f"{roi}_r2star"]})
    return pd.DataFrame(rows)


def test_roi_statistics_equal_numpy_on_native_and_transferred_rois(study_run):
    out, _ = study_run
    anat = out / "sub-03" / "ses-2" / "anat"
    table = _read(anat / "sub-03_ses-2_desc-rois_stats.tsv")
    chi = nb.load(anat / "sub-03_ses-2_Chimap.nii.gz").get_fdata()
    valid = nb.load(anat / "sub-03_ses-2_desc-qsm_mask.nii.gz").get_fdata() > 0.5
    rois = DATASET / "derivatives" / "rois" / "sub-03"
    native = nb.load(rois / "ses-2/anat/sub-03_ses-2_desc-observer1_dseg.nii.gz").get_fdata()
    drawn_on_1 = nb.load(rois / "ses-1/anat/sub-03_ses-1_desc-observer2_dseg.nii.gz")
    # ses-2's grid starts one slice lower: the ses-1 ROI at slice k is slice k+1 on ses-2
    shift = np.linalg.inv(nb.load(anat / "sub-03_ses-2_Chimap.nii.gz").affine) @ drawn_on_1.affine
    assert np.allclose(shift[:3, 3], [0, 0, 1])
    transferred = np.zeros_like(native)
    transferred[:, :, 1:] = drawn_on_1.get_fdata()[:, :, :-1]
    for rater, labels, mapping in (("observer1", native, "native"),
                                   ("observer2", transferred, "transferred")):
        for index, roi in enumerate(("L1", "L2", "L3", "L4"), start=1):
            row = table[(table["map"] == "Chimap") & table["map_desc"].isna()
                        & (table["rater"] == rater) & (table["roi"] == roi)].iloc[0]
            assert row["roi_mapping"] == mapping
            values = chi[(labels == index) & valid]
            assert row["n_voxels"] == values.size > 10
            assert row["mean"] == pytest.approx(values.mean(), abs=2e-7)
            assert row["sd"] == pytest.approx(values.std(ddof=1), abs=2e-7)
            assert row["p95"] == pytest.approx(np.percentile(values, 95), abs=2e-7)
            assert row["max"] == pytest.approx(values.max(), abs=2e-7)
    # every map (Chimap, sweep Chimaps, R2*, T2*, S0) x 4 ROIs x 2 raters
    assert len(table) == (3 + 4) * 4 * 2
    assert set(table.loc[table["map"] == "Chimap", "map_desc"].fillna("n/a")) == {
        "n/a", "lambda0p00002", "lambda0p0002", "lambda0p002"}


def test_association_recovers_the_simulated_slope(study_run):
    out, truth = study_run
    association = _read(out / "group" / "association.tsv")
    points = _truth_points(truth)
    realised = np.polyfit(points["bmd"], points["chi"], 1)[0]  # truth slope of this sample
    model = truth["model"]["slope_ppm_per_mgcm3"]
    row = association[(association["map"] == "Chimap") & association["map_desc"].isna()
                      & (association["statistic"] == "mean")
                      & (association["roi"] == "pooled")].iloc[0]
    assert row["n"] == 32
    assert row["slope_ci_low"] <= realised <= row["slope_ci_high"]
    assert row["slope"] == pytest.approx(model, rel=0.15)
    assert row["r"] < -0.9 and row["r_ci_high"] < -0.8
    # R2* follows BMD exactly in the simulation (no scatter): slope 0.25 1/s per mg/cm3
    r2 = association[(association["map"] == "R2starmap") & (association["statistic"] == "mean")
                     & (association["roi"] == "pooled")].iloc[0]
    assert r2["slope_ci_low"] <= truth["model"]["r2star_slope"] <= r2["slope_ci_high"]
    assert r2["r"] > 0.99
    for roi in ("L1", "L2", "L3", "L4"):
        per_roi = association[(association["map"] == "Chimap") & association["map_desc"].isna()
                              & (association["statistic"] == "mean")
                              & (association["roi"] == roi)].iloc[0]
        assert per_roi["n"] == 8 and per_roi["r"] < -0.8


def test_reliability_and_groups(study_run):
    out, _ = study_run
    reliability = _read(out / "group" / "reliability.tsv")
    chi = reliability[(reliability["map"] == "Chimap") & (reliability["roi"] == "pooled")]
    inter_rater = chi[chi["design"] == "inter-rater"].iloc[0]
    assert inter_rater["n"] == 64 and inter_rater["icc2_1"] > 0.9
    assert inter_rater["icc2_1_ci_low"] <= inter_rater["icc2_1"] <= inter_rater["icc2_1_ci_high"]
    inter_scan = chi[chi["design"] == "inter-scan"]
    assert set(inter_scan["rater"]) == {"observer1", "observer2"}
    assert (inter_scan["n"] == 32).all() and (inter_scan["icc2_1"] > 0.9).all()
    assert (inter_scan["loa_low"] < inter_scan["bias"]).all()
    groups = _read(out / "group" / "groups.tsv")
    pooled = groups[(groups["map"] == "Chimap") & (groups["roi"] == "pooled")]
    described = pooled[pooled["test"] == "descriptives"].set_index("group")
    assert described.loc["normal", "n"] == 4 and described.loc["osteoporosis", "n"] == 2
    # chi falls with BMD: the normal group is the most diamagnetic
    assert described.loc["normal", "mean"] < described.loc["osteoporosis", "mean"]
    anova = pooled[pooled["test"] == "anova"].iloc[0]
    assert anova["p"] < 0.01 and (anova["df1"], anova["df2"]) == (2, 5)
    assert set(pooled.loc[pooled["test"] == "ancova", "term"]) == {"group", "age"}
    assert (pooled["test"] == "bonferroni").sum() == 3


def test_lambda_sweep_peaks_at_the_best_lambda_against_truth(study_run):
    out, truth = study_run
    sweep = _read(out / "group" / "lambda_sweep.tsv")
    pooled = sweep[(sweep["statistic"] == "mean") & (sweep["roi"] == "pooled")]
    assert sorted(pooled["lambda"]) == pytest.approx([2e-5, 2e-4, 2e-3])
    best = float(pooled.loc[pooled["is_best"], "lambda"].iloc[0])
    # against truth: the lambda whose ROI means correlate best with the true chi
    rois = study_io.read_roi_tables(out)
    points = _truth_points(truth).set_index(["participant_id", "roi"])["chi"]
    scores = {}
    for desc, data in rois[rois["map"] == "Chimap"].groupby("map_desc"):
        value = study_io.parse_lambda_label(desc)
        if value is None:
            continue
        means = data.groupby(["participant_id", "roi"])["mean"].mean()
        scores[value] = np.corrcoef(means, points.reindex(means.index))[0, 1]
    assert max(scores, key=scores.get) == pytest.approx(best)
    figures = out / "group" / "figures"
    for stem in ("lambda_sweep_qct_bmd", "scatter_Chimap_mean_vs_qct_bmd",
                 "blandaltman_Chimap_interrater", "blandaltman_Chimap_interscan"):
        assert (figures / f"{stem}.svg").exists() and (figures / f"{stem}.png").exists()
    svg = (figures / "lambda_sweep_qct_bmd.svg").read_text()
    assert "<dc:date>" not in svg  # deterministic files
    dictionary = json.loads((out / "group" / "association.json").read_text())
    assert "slope_ci_low" in dictionary


def _long_table(rng, *, drop=()):
    """Synthetic participant ROI table: 6 participants x 2 scans x 2 raters x 2 ROIs."""
    rows = []
    for p in range(1, 7):
        for scan in ("ses-1", "ses-2"):
            for rater in ("obs1", "obs2"):
                for roi in ("L1", "L2"):
                    if (p, scan, rater, roi) in drop:
                        continue
                    rows.append({"participant_id": f"sub-{p:02d}", "session": scan[-1],
                                 "acquisition": "n/a", "run": "n/a", "scan": scan,
                                 "map": "Chimap", "map_desc": "n/a", "units": "ppm",
                                 "rater": rater, "roi": roi,
                                 "mean": 0.05 * p + (roi == "L2") * 0.01
                                 + rng.normal(0, 0.002)})
    frame = pd.DataFrame(rows)
    for key in ("median", "min", "max", "p5", "p95"):
        frame[key] = frame["mean"]
    return frame


def test_pairing_with_missing_participants_scans_and_rois():
    rng = np.random.default_rng(0)
    drop = {(2, "ses-2", r, roi) for r in ("obs1", "obs2") for roi in ("L1", "L2")}  # no scan 2
    drop |= {(3, "ses-1", "obs2", "L1")}  # obs2 skipped one ROI
    table = _long_table(rng, drop=drop)
    reliability = study.reliability_table(table)
    rater = reliability[(reliability["design"] == "inter-rater") & (reliability["roi"] == "L1")]
    # 6 participants x 2 scans, minus the missing scan, minus the ROI obs2 did not draw
    assert int(rater["n"].iloc[0]) == 6 * 2 - 1 - 1 and int(rater["n_incomplete"].iloc[0]) == 1
    scan = reliability[(reliability["design"] == "inter-scan") & (reliability["roi"] == "L1")
                       & (reliability["rater"] == "obs1")]
    assert int(scan["n"].iloc[0]) == 5 and int(scan["n_incomplete"].iloc[0]) == 1
    assert (reliability.loc[reliability["roi"] == "pooled", "icc2_1"] > 0.95).all()
    # a reference with a participant missing and one without ROI statistics
    reference = pd.DataFrame({"participant_id": [f"sub-{p:02d}" for p in (1, 3, 4, 5, 6, 9)],
                              "roi": "L1", "measure": "bmd", "value": [1, 3, 4, 5, 6, 9.0],
                              "unit": "mg/cm3"})
    association = study.association_table(table, reference)
    row = association[(association["statistic"] == "mean") & (association["roi"] == "L1")]
    assert int(row["n"].iloc[0]) == 5 and row["r"].iloc[0] > 0.99
    # too few pairs: reported with a note, not raised
    small = study.association_table(table, reference.iloc[:3])
    assert small["note"].str.contains("at least 4").all()


def test_study_io_labels_rois_and_reference_errors(tmp_path):
    assert study_io.lambda_label(2e-4) == "lambda0p0002"
    assert study_io.lambda_label(1.5) == "lambda1p5"
    assert study_io.parse_lambda_label(study_io.lambda_label(7.5e-4)) == pytest.approx(7.5e-4)
    assert study_io.parse_lambda_label("observer1") is None
    # ROI discovery: dseg with names, masks with a label, per rater; other acquisitions
    from qsmprep.bids import Acquisition

    def write(path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        nb.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)).to_filename(str(path))

    anat1 = tmp_path / "rois" / "sub-01" / "ses-1" / "anat"
    write(anat1 / "sub-01_ses-1_desc-obs1_dseg.nii.gz")
    (anat1 / "sub-01_ses-1_desc-obs1_dseg.tsv").write_text("index\tname\n1\tL1\n2\tL2\n")
    write(anat1 / "sub-01_ses-1_label-GP_desc-obs2_mask.nii.gz")
    write(tmp_path / "rois/sub-01/ses-2/anat/sub-01_ses-2_desc-obs1_dseg.nii.gz")
    write(anat1 / "sub-01_ses-1_desc-brain_mask.nii.gz")  # not an ROI
    acquisitions = [Acquisition({"subject": "01", "session": s}, "MEGRE", [], 3.0, "", "rad",
                                output_entities={"subject": "01", "session": s})
                    for s in ("1", "2")]
    found = study_io.find_rois(acquisitions, [tmp_path / "rois"])
    first = {(r["rater"], r["mapping"]) for r in found[acquisitions[0].name]}
    second = {(r["rater"], r["mapping"]) for r in found[acquisitions[1].name]}
    assert first == {("obs1", "native"), ("obs2", "native")}
    assert second == {("obs1", "native"), ("obs2", "transferred")}
    masks = [r for r in found[acquisitions[0].name] if r["kind"] == "mask"]
    assert masks[0]["names"] == {"1": "GP"}
    dseg = [r for r in found[acquisitions[0].name] if r["kind"] == "dseg"][0]
    assert dseg["names"] == {"1": "L1", "2": "L2"}
    bad = tmp_path / "reference.tsv"
    bad.write_text("participant_id\troi\tvalue\n01\tL1\t3\n")
    with pytest.raises(study_io.StudyInputError, match="measure"):
        study_io.read_reference_table(bad)
    bad.write_text("participant_id\troi\tmeasure\tvalue\tunit\n01\tL1\tbmd\thigh\tmg\n")
    with pytest.raises(study_io.StudyInputError, match="non-numeric"):
        study_io.read_reference_table(bad)


def test_group_level_without_participant_outputs_is_a_clear_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code = main([str(DATASET), str(out), "group"])
    assert code == 66
