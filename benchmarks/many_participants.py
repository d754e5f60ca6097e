"""Many small participants in one run, and the pybids index of ``--bids-database-dir``.

Builds N participants of the tests' tiny dataset (24^3 voxels of 2 mm, 3 echoes; clones of
one simulated participant) and runs ``qsmprep ... participant --nprocs P`` in fresh work
folders with several execution settings:

- ``default``: qsmprep's lean MultiProc, threads per step shared among the acquisitions;
- ``omp2``: the same with ``--omp-nthreads P`` (the former default, all CPUs per step);
- ``nipype-multiproc``: Nipype's own MultiProc (a full ``gc.collect()`` every scheduling
  round), qsmprep's plugin swapped out in the process;
- ``linear``: Nipype's in-process ``Linear`` plugin;
- ``rerun``: qsmprep again over the first run's output and work folders (every step
  cached).

It prints wall time, the workflow time ("finished in ... s" of the log) and the rest
(indexing, reports), and the time to build and to reuse the pybids index for N and 10·N
participants. Usage: ``python benchmarks/many_participants.py [--participants 40]
[--nprocs 2] [--modes default,omp2,nipype-multiproc,linear]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import _tiny_bids as tiny  # noqa: E402

RUNNER = """
import sys
mode = sys.argv[1]
if mode == "nipype-multiproc":
    import qsmprep.cli.plugins as plugins
    plugins.runner = lambda name, args: name
from qsmprep.cli.run import main
sys.exit(main(sys.argv[2:]))
"""


def make_dataset(root: Path, count: int) -> Path:
    tiny.new_dataset(root)
    tiny.add_participant(root, "001", seed=3)
    for index in range(2, count + 1):
        tiny.clone_participant(root, "001", f"{index:03d}")
    return root


def run_mode(mode: str, bids_dir: Path, base: Path, nprocs: int, index: int = 0) -> dict:
    """One run in fresh output and work folders (``rerun``: in those of the first run)."""
    out, work = base / f"out_{mode}_{index}", base / f"work_{mode}_{index}"
    if mode == "rerun":
        out, work = sorted(base.glob("out_*_0"))[0], sorted(base.glob("work_*_0"))[0]
    args = [str(bids_dir), str(out), "participant", "--skip-bids-validation",
            "--nprocs", str(nprocs), "-w", str(work)]
    if mode == "omp2":
        args += ["--omp-nthreads", str(nprocs)]
    if mode == "linear":
        plugin = base / "linear.json"
        plugin.write_text(json.dumps({"plugin": "Linear"}))
        args += ["--use-plugin", str(plugin)]
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    runner_mode = "default" if mode == "rerun" else mode
    result = subprocess.run([sys.executable, "-c", RUNNER, runner_mode, *args],
                            capture_output=True,
                            text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    log = result.stdout + result.stderr
    match = re.search(r"finished in ([\d.]+) s", log)
    maps = len(list(out.glob("sub-*/anat/*_Chimap.nii.gz")))
    return {"mode": mode, "exit": result.returncode, "wall_s": wall,
            "workflow_s": float(match.group(1)) if match else float("nan"), "maps": maps,
            "load": load, "cpu_s": cpu}


def index_times(bids_dir: Path, base: Path) -> tuple[float, float, int]:
    """Seconds to build (and save) and to reuse the index; number of subjects."""
    script = ("import sys, time; from pathlib import Path\n"
              "from qsmprep.layout_cache import load_cached_layout\n"
              "t = time.monotonic(); layout, reused = load_cached_layout(Path(sys.argv[1]), "
              "Path(sys.argv[2]))\n"
              "print(time.monotonic() - t, reused, len(layout.get_subjects()))\n")
    database = base / f"db_{bids_dir.name}"
    times = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script, str(bids_dir), str(database)],
                             capture_output=True, text=True, check=True).stdout.split()
        times.append(float(out[0]))
    return times[0], times[1], int(out[2])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--participants", type=int, default=40)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--modes", default="default,omp2,nipype-multiproc,linear")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qsmprep-many-") as folder:
        base = Path(folder)
        bids_dir = make_dataset(base / "bids", options.participants)
        print(f"{options.participants} participants of {tiny.SHAPE} voxels, "
              f"{len(tiny.ECHO_TIMES)} echoes, --nprocs {options.nprocs}")
        print("| execution | exit | maps | wall (s) | workflow (s) | rest (s) | CPU (s) | load |")
        print("|---|---|---|---|---|---|---|---|")
        for index, mode in enumerate(options.modes.split(",")):
            row = run_mode(mode, bids_dir, base, options.nprocs, index)
            print(f"| {row['mode']} | {row['exit']} | {row['maps']} | {row['wall_s']:.1f} | "
                  f"{row['workflow_s']:.1f} | {row['wall_s'] - row['workflow_s']:.1f} | "
                  f"{row['cpu_s']:.0f} | {row['load']:.1f} |", flush=True)
        big = make_dataset(base / "bids_big", options.participants * 10)
        print("| participants | index build + save (s) | reuse (s) |")
        print("|---|---|---|")
        for dataset in (bids_dir, big):
            built, reused, subjects = index_times(dataset, base)
            print(f"| {subjects} | {built:.2f} | {reused:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
