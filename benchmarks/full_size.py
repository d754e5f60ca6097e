"""Full-size subject through the CLI: wall time, peak memory of the whole process tree and
time per pipeline step.

    python benchmarks/full_size.py                       # 256 x 256 x 176, 6 echoes, defaults
    python benchmarks/full_size.py --options --low-mem   # extra CLI options after --options
    python benchmarks/full_size.py --body --echoes 8     # water-fat thigh, --preset body

The head phantom is simulated at 1 mm on a 256 x 256 x 176 grid (field of view 256 x 256 x
176 mm), 6 echoes from 4 ms every 5 ms, 3 T, SNR 100, 12 degrees oblique, written as BIDS
(int16 magnitude, arbitrary-unit phase) to a temporary folder, then ``python -m qsmprep``
runs on it with ``--nprocs`` (default 2). Peak memory is the largest sum of the proportional
set sizes (PSS: shared pages of forked workers counted once) of the CLI process and all its
descendants, sampled every 0.2 s from /proc -- the memory the run occupies, which cgroup
limits of cluster schedulers enforce; per-step times come from the nodes' Nipype result
files. The table goes into RESULTS.md between markers (``--no-write`` prints only).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from qsmprep.datasets.bids import RunSpec, SubjectSpec, write_bids_dataset
from qsmprep.simulate.phantom import head_phantom
from qsmprep.simulate.signal import multi_echo_gre, oblique_affine

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers below
from _measure import write_section, load_average  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def make_dataset(root: Path, shape: tuple[int, int, int], echoes: int) -> Path:
    voxel = (1.0, 1.0, 1.0)
    phantom = head_phantom(voxel_size=voxel, fov_mm=tuple(float(n) for n in shape), seed=3)
    affine, direction = oblique_affine(voxel, (12.0, 0.0, 0.0), shape=phantom.shape)
    times = 0.004 + 0.005 * np.arange(echoes)
    sim = multi_echo_gre(phantom, echo_times=times, b0_direction=direction, snr=100.0, seed=7)
    subject = SubjectSpec("01", [RunSpec(phantom, sim, affine)])
    return write_bids_dataset(root, [subject], name="qsmprep full-size benchmark",
                              readme="Simulated full-size subject for benchmarks/full_size.py.",
                              background_margin_mm=8.0, groundtruth=False, overwrite=True)


def make_body_dataset(root: Path, shape: tuple[int, int, int], echoes: int) -> Path:
    """The water-fat leg phantom (qsmprep.simulate.body) scaled to a thigh that fills most of
    the field of view, 1 mm, TE 1.25 + 0.9 n ms, 3 T, SNR 100 (run with ``--preset body``)."""
    from qsmprep.datasets.body import leg_affine, write_body_dataset
    from qsmprep.simulate.body import leg_dataset

    voxel = (1.0, 1.0, 1.0)
    semi = (0.42 * shape[0], 0.36 * shape[1])  # mm
    simulation, body = leg_dataset(voxel_size=voxel, fov_mm=tuple(float(n) for n in shape),
                                   echo_times=tuple(1.25e-3 + 0.9e-3 * np.arange(echoes)),
                                   snr=100.0, seed=7, leg_semi_mm=semi)
    return write_body_dataset(root, simulation, body, leg_affine(body.phantom.shape, voxel),
                              readme="Simulated full-size thigh for benchmarks/full_size.py.",
                              overwrite=True, fat_model="ren_marrow")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def _pss_mb(pid: int) -> float:
    """Proportional set size (MB): private pages plus a share of the pages shared with the
    other processes (forked workers share the parent's), so the sum over a process tree is
    the memory it occupies; summed RSS would count shared pages once per process."""
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _tree_pss_mb(pid: int) -> float:
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        try:
            total += _pss_mb(current)
        except OSError:
            continue
        stack.extend(_children(current))
    return total


def run_cli(dataset: Path, out: Path, work: Path, nprocs: int, options: list[str]):
    """(exit code, wall seconds, peak process-tree PSS MB, stderr tail)."""
    command = [sys.executable, "-m", "qsmprep", str(dataset), str(out), "participant",
               "-w", str(work), "--nprocs", str(nprocs), "--skip-bids-validation", *options]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_pss_mb(proc.pid))
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    elapsed = time.perf_counter() - start
    thread.join()
    return proc.returncode, elapsed, peak[0], err[-3000:]


def node_times(work: Path) -> list[tuple[str, float]]:
    """(node name, seconds) from the Nipype result files under ``work``."""
    from nipype.utils.filemanip import loadpkl

    rows = []
    for result in sorted(work.rglob("result_*.pklz")):
        try:
            runtime = loadpkl(result).runtime
        except Exception:  # noqa: BLE001 - a file from an interrupted node
            continue
        seconds = getattr(runtime, "duration", None)
        if seconds is not None:
            rows.append((result.parent.name, float(seconds)))
    return sorted(rows, key=lambda row: -row[1])


def report(shape, echoes, nprocs, options, sim_s, code, wall, peak, steps, *,
           body: bool = False) -> str:
    section = "full_size_body" if body else "full_size"
    subject = "water-fat thigh, `--preset body`" if body else "head"
    lines = [
        f"<!-- {section}:start -->",
        f"## Full-size subject through the CLI ({'×'.join(map(str, shape))}, {echoes} echoes, "
        f"{subject})",
        "",
        f"Command: `python benchmarks/full_size.py{' --body' if body else ''}"
        f"{f' --echoes {echoes}' if echoes != 6 else ''} --nprocs {nprocs}"
        f"{' --options ' + ' '.join(options) if options else ''}` — {datetime.date.today()}, "
        f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"simulation {sim_s:.0f} s; load average at the end {load_average()}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| exit code | {code} |",
        f"| wall time, whole CLI run | {wall:.1f} s |",
        f"| peak memory, CLI process tree (sum of PSS, sampled every 0.2 s) | {peak / 1024:.2f} GB |",
        "",
        "| node | seconds |",
        "|---|---|",
    ]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in steps]
    lines += ["", f"<!-- {section}:end -->"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 176))
    parser.add_argument("--echoes", type=int, default=6)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep dataset, outputs and work dir here")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--body", action="store_true",
                        help="the water-fat thigh phantom with --preset body instead of the head")
    parser.add_argument("--options", nargs=argparse.REMAINDER, default=[],
                        help="further qsmprep options (last on the line)")
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        start = time.perf_counter()
        make = make_body_dataset if args.body else make_dataset
        dataset = make(base / "bids", shape, args.echoes)
        sim_s = time.perf_counter() - start
        options = (["--preset", "body"] if args.body else []) + args.options
        code, wall, peak, err = run_cli(dataset, base / "out", base / "work", args.nprocs,
                                        options)
        steps = node_times(base / "work")
    if code != 0:
        print(err, file=sys.stderr)
    text = report(shape, args.echoes, args.nprocs, args.options, sim_s, code, wall, peak, steps,
                  body=args.body)
    print(text)
    if not args.no_write:
        write_section(RESULTS, "full_size_body" if args.body else "full_size", text)


if __name__ == "__main__":
    main()
