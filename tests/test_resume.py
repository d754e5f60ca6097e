"""Resume: a run killed mid-way and rerun with the same work dir reuses the nodes that had
finished (Nipype's hashed cache) and produces the same outputs, bit for bit, as a run that
was never interrupted."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import _tiny_bids as tiny


def _command(root: Path, out: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "qsmprep", str(root), str(out), "participant", "-w", str(work),
            "--skip-bids-validation", "--nprocs", "1"]


def _results(work: Path) -> dict[str, int]:
    """Result file of every finished node -> its modification time (ns)."""
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in work.rglob("result_*.pklz")}


def _maps(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("sub-*/*/*.nii.gz"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tiny.new_dataset(tmp_path_factory.mktemp("resume") / "bids")
    tiny.add_participant(root, "r", seed=11)
    return root


def test_killed_run_resumes_from_finished_nodes_with_identical_outputs(dataset, tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    reference_out = tmp_path / "reference"
    done = subprocess.run(_command(dataset, reference_out, tmp_path / "work-ref"), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = _maps(reference_out)
    assert any(name.endswith("_Chimap.nii.gz") for name in reference)

    out, work = tmp_path / "out", tmp_path / "work"
    task = subprocess.Popen(_command(dataset, out, work), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and task.poll() is None:
        # kill once the field map is done but before the inversion has finished
        names = " ".join(_results(work))
        if "field" in names and "invert" not in names:
            break
        time.sleep(0.01)
    assert task.poll() is None, "the run finished before it could be interrupted"
    os.killpg(task.pid, signal.SIGKILL)  # the run and every worker process
    task.wait()
    finished = _results(work)
    assert finished, "no node had finished when the run was killed"
    assert not any("invert" in name for name in finished)

    rerun = subprocess.run(_command(dataset, out, work), env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = _results(work)
    reused = {name: mtime for name, mtime in finished.items() if after.get(name) == mtime}
    assert reused == finished, "finished nodes were run again"
    assert len(after) > len(finished)
    assert _maps(out) == reference
