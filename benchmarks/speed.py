"""Run time and peak memory of every QSM step through the public step API.

    python benchmarks/speed.py                      # 128^3, 5 echoes, every registered method
    python benchmarks/speed.py --shape 256 256 176 --echoes 6 --methods default

The head phantom of ``qsmprep.simulate.phantom`` is simulated on the requested grid (field of
view 176 x 216 x 192 mm divided by the shape, so voxels are anisotropic when the shape is
cubic), 3 T, SNR 100, echoes from 4 ms every 6 ms. Each step then runs on the outputs of the
default chain (nlfit -> region growing -> 3 mm erosion -> iSMV -> TV) the way
``workflows/qsm.py`` chains them; fast steps report the best of ``--repeat`` calls,
iterative inversions one call (after a warm-up on a small grid compiles the numba kernels).
Peak memory: the largest resident-set increase of the process during the call, sampled every
5 ms. The table goes into RESULTS.md between markers (``--no-write`` prints only).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.fft

from qsmprep.config import WorkflowConfig
from qsmprep.recon import background, fieldmap, inversion, mask as mask_module, relaxometry
from qsmprep.recon import unwrap as unwrap_module
from qsmprep.recon.dipole import hz_to_ppm
from qsmprep.simulate.phantom import head_phantom
from qsmprep.simulate.signal import multi_echo_gre

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers below
from _measure import write_section, _release_freed_memory, load_average, measure  # noqa: E402

#: the project's speed targets at 128^3 on 2 cores (issue: methods), seconds
TARGETS = {
    "fieldmap nlfit": 1.5, "unwrap region_growing (one echo)": 1.0, "inversion tkd": 0.3,
    "inversion l2": 0.3, "bfr vsharp": 1.0, "bfr lbv": 1.0, "bfr pdf": 10.0,
    "inversion tv": 10.0, "inversion medi": 30.0,
}
RESULTS = Path(__file__).with_name("RESULTS.md")


def measure_best(func: Callable[[], object], repeat: int) -> tuple[object, float, float]:
    """(value, best wall seconds, largest peak RSS increase MB) of ``repeat`` calls."""
    steps = [measure(func) for _ in range(repeat)]
    failed = [step.error for step in steps if step.error]
    if failed:
        raise RuntimeError(failed[0])
    return (steps[-1].value, min(step.seconds for step in steps),
            max(step.mem_mb for step in steps))


def simulate(shape: tuple[int, int, int], echoes: int):
    fov = np.array([176.0, 216.0, 192.0])
    voxel = tuple(float(v) for v in fov / np.array(shape))
    phantom = head_phantom(voxel_size=voxel, fov_mm=tuple(fov))
    times = 0.004 + 0.006 * np.arange(echoes)
    sim = multi_echo_gre(phantom, echo_times=times, snr=100.0)
    return phantom, sim, voxel


def warm_up(methods: list[str]) -> None:
    """Compile the numba kernels (cached on disk afterwards) on a tiny problem."""
    rng = np.random.default_rng(0)
    small = np.zeros((16, 16, 16), dtype=bool)
    small[4:12, 4:12, 4:12] = True
    field = np.where(small, rng.standard_normal(small.shape) * 1e-3, 0).astype(np.float32)
    for method in methods:
        inversion.invert(field, small, voxel_size=(1, 1, 1), b0_direction=(0, 0, 1),
                         method=method, magnitude=small.astype(np.float32), **_few(method))
    background.remove(field, small, voxel_size=(1, 1, 1), b0_direction=(0, 0, 1),
                      method="lbv")


def _few(method: str) -> dict:
    names = set(inversion.effective_parameters(method))
    return {"max_iter": 2} if "max_iter" in names else {}


def run(shape, echoes: int, methods: str, repeat: int) -> tuple[list[tuple], dict]:
    defaults = WorkflowConfig()
    load_start = load_average()
    t0 = time.perf_counter()
    phantom, sim, voxel = simulate(shape, echoes)
    info = {"simulation_s": time.perf_counter() - t0, "voxel": voxel,
            "workers": scipy.fft.get_workers(), "load_start": load_start}
    direction = tuple(float(v) for v in sim.b0_direction)
    inv_methods = list(inversion.METHODS) if methods == "all" else [defaults.inversion_method]
    bfr_methods = list(background.METHODS) if methods == "all" else [defaults.bfr_method]
    warm_up(inv_methods)
    rows = []

    def step(name, func, n=repeat):
        value, seconds, mem = measure_best(func, n)
        rows.append((name, seconds, mem))
        print(f"{name:40s} {seconds:8.2f} s {mem:8.0f} MB", flush=True)
        return value

    mag, phase, times = sim.magnitude, sim.phase, sim.echo_times
    brain = step("brain mask", lambda: mask_module.brain_mask(mag[..., 0], voxel_size=voxel))
    step("R2* nlls", lambda: relaxometry.r2star(mag, times, brain, method="nlls"))
    step("unwrap region_growing (one echo)", lambda: unwrap_module.unwrap(
        phase[..., 0], brain, method="region_growing", magnitude=mag[..., 0], voxel_size=voxel))
    est = step("fieldmap nlfit", lambda: fieldmap.estimate(
        mag, phase, times, brain, voxel_size=voxel, method=defaults.fieldmap_method,
        unwrap_method=defaults.unwrap_method))
    if methods == "all":
        step("fieldmap linear", lambda: fieldmap.estimate(
            mag, phase, times, brain, voxel_size=voxel, method="linear",
            unwrap_method=defaults.unwrap_method))
    field_ppm = hz_to_ppm(est.field_hz, sim.b0_tesla)
    noise_ppm = hz_to_ppm(est.noise_hz, sim.b0_tesla)
    eroded = step("mask erosion", lambda: mask_module.erode(
        brain, defaults.bfr_erode_mm, voxel_size=voxel))
    local = None
    for method in bfr_methods:
        params = dict(defaults.bfr_params) if method == defaults.bfr_method else {}
        out = step(f"bfr {method}", lambda: background.remove(
            field_ppm, eroded, voxel_size=voxel, b0_direction=direction, method=method,
            **params), n=1 if method == "pdf" else repeat)
        if method == defaults.bfr_method:
            local = out
    local_ppm, local_mask = local
    for method in inv_methods:
        params = {"tol": 0.0} if method == "tv" else {}  # the target is for 150 iterations
        fast = method in ("tkd", "tsvd", "l2")
        step(f"inversion {method}", lambda: inversion.invert(
            local_ppm, local_mask, voxel_size=voxel, b0_direction=direction, method=method,
            magnitude=mag[..., 0], noise=noise_ppm, **params), n=repeat if fast else 1)
    return rows, info


def table(rows, info, shape, echoes, command) -> str:
    lines = [
        "<!-- speed:start -->",
        f"## Step run times at {'×'.join(map(str, shape))}, {echoes} echoes (step API)",
        "",
        f"Command: `{command}` — {datetime.date.today()}, {platform.machine()} "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, numpy {np.__version__}, "
        f"FFT workers {info['workers']}; load average at the start {info['load_start']}, "
        f"at the end {load_average()}; voxel "
        f"{' × '.join(f'{v:.3g}' for v in info['voxel'])} mm; simulation "
        f"{info['simulation_s']:.1f} s; process peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB.",
        "",
        "| step | seconds | peak memory increase MB | target at 128³ |",
        "|---|---|---|---|",
    ]
    for name, seconds, mem in rows:
        target = TARGETS.get(name)
        lines.append(f"| {name} | {seconds:.2f} | {mem:.0f} | "
                     f"{'≤ %g s' % target if target else ''} |")
    lines += ["", "<!-- speed:end -->"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 128))
    parser.add_argument("--echoes", type=int, default=5)
    parser.add_argument("--methods", choices=("all", "default"), default="all")
    parser.add_argument("--repeat", type=int, default=3, help="calls of the fast steps")
    parser.add_argument("--threads", type=int, default=2, help="FFT workers")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    _release_freed_memory()
    with scipy.fft.set_workers(args.threads):
        rows, info = run(tuple(args.shape), args.echoes, args.methods, args.repeat)
    command = "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(rows, info, tuple(args.shape), args.echoes, command.strip())
    print(text)
    if not args.no_write:
        write_section(RESULTS, "speed", text)


if __name__ == "__main__":
    main()
