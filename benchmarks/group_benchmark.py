#!/usr/bin/env python
"""Group-level speed for a large study: N participants x 2 scans x 2 observers x 4 ROIs x
5 maps (Chimap, 3 lambda-sweep Chimaps, R2starmap), written as participant ROI tables, then
``qsmprep <bids> <out> group`` with a reference table and an age covariate.

    python benchmarks/group_benchmark.py [--participants 100]

Prints the time of the whole group level (reading, statistics, tables, figures) and of the
statistics alone.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from qsmprep.interfaces.roi import COLUMNS


def make_study(root: Path, n: int, seed: int = 0) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(seed)
    bids, out = root / "bids", root / "out"
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "bench", "BIDSVersion": "1.10.0"}')
    ages = rng.uniform(30, 85, n).round()
    pd.DataFrame({"participant_id": [f"sub-{i:03d}" for i in range(n)], "age": ages}).to_csv(
        bids / "participants.tsv", sep="\t", index=False)
    reference = []
    for i in range(n):
        bmd = rng.uniform(45, 185)
        chis = {}
        for roi in ("L1", "L2", "L3", "L4"):
            value = bmd + rng.normal(0, 8)
            reference.append((f"sub-{i:03d}", roi, "qct_bmd", round(value, 1), "mg/cm3"))
            chis[roi] = 0.02 - 0.0012 * value + rng.normal(0, 0.012)
        for session in ("1", "2"):
            rows = []
            for desc, noise in (("n/a", 0.004), ("lambda0p00002", 0.03),
                                ("lambda0p0002", 0.004), ("lambda0p002", 0.008)):
                for rater in ("observer1", "observer2"):
                    for index, roi in enumerate(chis, start=1):
                        mean = chis[roi] + rng.normal(0, noise)
                        rows.append(_row(i, session, "Chimap", desc, "ppm", rater, roi, index,
                                         mean, 0.01))
            for rater in ("observer1", "observer2"):
                for index, roi in enumerate(chis, start=1):
                    mean = 40 + 0.25 * (chis[roi] - 0.02) / -0.0012 + rng.normal(0, 1)
                    rows.append(_row(i, session, "R2starmap", "n/a", "1/s", rater, roi, index,
                                     mean, 3.0))
            anat = out / f"sub-{i:03d}" / f"ses-{session}" / "anat"
            anat.mkdir(parents=True)
            pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(
                anat / f"sub-{i:03d}_ses-{session}_desc-rois_stats.tsv", sep="\t", index=False,
                na_rep="n/a")
    table = root / "reference.tsv"
    pd.DataFrame(reference, columns=["participant_id", "roi", "measure", "value", "unit"]
                 ).to_csv(table, sep="\t", index=False)
    return bids, out, table


def _row(i, session, suffix, desc, units, rater, roi, index, mean, sd):
    return {"participant_id": f"sub-{i:03d}", "session": session, "acquisition": "n/a",
            "run": "n/a", "scan": f"ses-{session}", "map": suffix, "map_desc": desc,
            "units": units, "rater": rater, "roi": roi, "roi_index": index,
            "roi_source": "x", "roi_mapping": "native", "roi_voxels": 100, "n_voxels": 100,
            "volume_mm3": 2700.0, "mean": mean, "sd": sd, "median": mean, "min": mean - 2 * sd,
            "max": mean + 2 * sd, "p5": mean - 1.6 * sd, "p95": mean + 1.6 * sd,
            "cv": sd / abs(mean)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--participants", type=int, default=100)
    args = parser.parse_args(argv)
    from qsmprep import study_io
    from qsmprep.analysis import study
    from qsmprep.cli.run import main as qsmprep

    root = Path(tempfile.mkdtemp(prefix="qsmprep_group_bench_"))
    try:
        bids, out, table = make_study(root, args.participants)
        start = time.perf_counter()
        code = qsmprep([str(bids), str(out), "group", "--reference-table", str(table),
                        "--covariates", "age"])
        total = time.perf_counter() - start
        rois = study_io.read_roi_tables(out)
        reference = study_io.read_reference_table(table)
        start = time.perf_counter()
        study.association_table(rois, reference)
        main_maps = rois[rois["map_desc"] == "n/a"]
        study.reliability_table(main_maps)
        groups, grouping = study.assign_groups(None, reference)
        study.group_table(main_maps, groups, grouping)
        statistics = time.perf_counter() - start
        figures = len(list((out / "group" / "figures").glob("*.svg")))
        print(f"participants {args.participants}, ROI rows {len(rois)}, exit {code}")
        print(f"group level (read, statistics, tables, {figures} SVG+PNG figures): {total:.1f} s")
        print(f"statistics alone (association, reliability, groups): {statistics:.1f} s")
        return code
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
