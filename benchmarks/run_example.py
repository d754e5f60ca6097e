"""End-to-end benchmark on a bundled example: run time, peak memory and accuracy vs truth.

Usage (from the repository root):

    python benchmarks/run_example.py                       # default pipeline, timed
    python benchmarks/run_example.py --sweep               # every method combination

Each run is the real CLI (``python -m qsmprep``) in a subprocess; the sweep shares one work
directory so unchanged upstream steps are reused (only the first default run is timed).
Accuracy follows METHODS.md section 6 on the evaluation mask (qsmprep's eroded mask within
the true brain mask): demeaned NRMSE, HFEN, XSIM and the deep-gray-matter slope.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nb
import numpy as np

from qsmprep.analysis import metrics

REPO = Path(__file__).resolve().parents[1]
DEEP_GRAY = (1, 2, 3, 4, 5, 6, 7)
METHODS = {
    "fieldmap": ("nlfit", "linear"),
    "unwrap": ("region_growing", "laplacian"),
    "bfr": ("vsharp", "pdf", "lbv"),
    "inversion": ("tv", "l2", "tkd"),
}


def _load(path: Path) -> np.ndarray:
    return np.asarray(nb.load(str(path)).dataobj, dtype=np.float32)


def run(dataset: Path, out: Path, work: Path, options: list[str]) -> tuple[int, float, float]:
    """Run the CLI; returns exit code, wall time (s) and peak RSS of the children (MB)."""
    command = [sys.executable, "-m", "qsmprep", str(dataset), str(out), "participant",
               "-w", str(work), "--nprocs", "2", "--skip-bids-validation", *options]
    start = time.perf_counter()
    code = subprocess.run(command, check=False, capture_output=True).returncode
    elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return code, elapsed, peak_mb


def accuracy(dataset: Path, out: Path, subject: str = "01") -> dict[str, float]:
    """Metrics of the Chimap in ``out`` against the dataset's ground truth."""
    truth = dataset / "derivatives" / "groundtruth" / f"sub-{subject}" / "anat"
    anat = out / f"sub-{subject}" / "anat"
    chi_true = _load(truth / f"sub-{subject}_Chimap.nii.gz")
    labels = _load(truth / f"sub-{subject}_desc-phantom_dseg.nii.gz").astype(int)
    mask = (_load(anat / f"sub-{subject}_desc-qsm_mask.nii.gz") > 0) & (
        _load(truth / f"sub-{subject}_desc-brain_mask.nii.gz") > 0)
    chi = _load(anat / f"sub-{subject}_Chimap.nii.gz")
    rois = [r for r in DEEP_GRAY if np.count_nonzero((labels == r) & mask) >= 5]
    slope, _ = metrics.roi_slope(chi, chi_true, labels * mask, rois)
    return {
        "nrmse": metrics.nrmse(chi, chi_true, mask, demean=True),
        "hfen": metrics.hfen(chi, chi_true, mask),
        "xsim": metrics.xsim(chi, chi_true, mask),
        "slope_error": abs(1 - slope),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=REPO / "bids_examples" / "brain_megre")
    parser.add_argument("--sweep", action="store_true", help="every method combination")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        code, elapsed, peak = run(args.dataset, tmp / "out", tmp / "work", [])
        scores = accuracy(args.dataset, tmp / "out")
        print(f"default pipeline on {args.dataset.name}: exit {code}, {elapsed:.1f} s wall, "
              f"peak RSS {peak:.0f} MB (2 CPUs)")
        print("| fieldmap | unwrap | bfr | inversion | NRMSE % | HFEN % | XSIM | DGM |1-slope| |")
        print("|---|---|---|---|---|---|---|---|")
        print(_row(("default",) * 4, scores))
        if not args.sweep:
            return
        for combo in itertools.product(*METHODS.values()):
            options = []
            for flag, value in zip(("--fieldmap-method", "--unwrap-method", "--bfr-method",
                                    "--inversion-method"), combo):
                options += [flag, value]
            out = tmp / ("out_" + "_".join(combo))
            code, _, _ = run(args.dataset, out, tmp / "work", options)
            if code != 0:
                print(f"| {' | '.join(combo)} | failed (exit {code}) | | | |")
                continue
            print(_row(combo, accuracy(args.dataset, out)), flush=True)


def _row(combo, scores) -> str:
    return (f"| {' | '.join(combo)} | {scores['nrmse']:.1f} | {scores['hfen']:.1f} | "
            f"{scores['xsim']:.3f} | {scores['slope_error']:.3f} |")


if __name__ == "__main__":
    main()
