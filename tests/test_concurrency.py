"""Nothing lost: concurrent participant runs into one output (and work) folder, as cluster
array tasks do, never corrupt the shared files; a killed run never leaves an output that
looks complete but is not; writes are atomic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from qsmprep import bids
from qsmprep.interfaces import bids as sink_module

import _tiny_bids as tiny

LABELS = ("a", "b", "c")


def _command(root: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "qsmprep", str(root), str(out), "participant",
            "--skip-bids-validation", "--nprocs", "1", *args]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tiny.new_dataset(tmp_path_factory.mktemp("concurrent") / "bids")
    tiny.add_participant(root, LABELS[0], seed=5)
    for label in LABELS[1:]:
        tiny.clone_participant(root, LABELS[0], label)
    return root


def test_three_array_tasks_share_one_output_dir(dataset, tmp_path):
    before = tiny.checksums(dataset)
    out = tmp_path / "out"  # no -w: all three share the default work dir, as array tasks
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    tasks = [subprocess.Popen(_command(dataset, out, "--participant-label", label),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
             for label in LABELS]
    logs = [task.communicate(timeout=600)[0].decode() for task in tasks]
    for task, log in zip(tasks, logs):
        assert task.returncode == 0, log[-3000:]
    assert tiny.checksums(dataset) == before
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "qsmprep"
    ignore = (out / ".bidsignore").read_text().split("\n")
    assert ignore[-1] == "" and sorted(ignore[:-1]) == sorted(set(bids.BIDSIGNORE))
    assert (out / "README.md").read_text().startswith("# qsmprep derivatives")
    assert len(list((out / "logs").glob("config-*.toml"))) == 3
    assert not list(out.rglob("*.tmp")) and not (out / "logs" / "crash").exists()
    maps = [np.asarray(nb.load(out / f"sub-{l}/anat/sub-{l}_Chimap.nii.gz").dataobj)
            for l in LABELS]
    assert maps[0].any()
    for other in maps[1:]:  # identical inputs -> identical maps: no cross-talk between tasks
        np.testing.assert_array_equal(other, maps[0])


def _complete_outputs(out: Path) -> int:
    """Every visible image reads fully and has a sidecar; every visible JSON parses."""
    images = [p for p in out.rglob("*.nii.gz") if not p.name.startswith(".")]
    for image in images:
        np.asarray(nb.load(image).dataobj)  # raises on a partial file
        sidecar = image.with_name(image.name.removesuffix(".nii.gz") + ".json")
        assert sidecar.exists(), f"{image} has no sidecar"
    for sidecar in out.rglob("*.json"):
        if not sidecar.name.startswith("."):
            json.loads(sidecar.read_text())
    return len(images)


def test_killed_run_leaves_no_complete_looking_partial_file(dataset, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    task = subprocess.Popen(_command(dataset, out, "-w", str(work), "--participant-label",
                                     LABELS[0]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and task.poll() is None:
        if list(out.glob("sub-*/anat/*")):  # the sinks have started writing
            break
        time.sleep(0.005)
    os.killpg(task.pid, signal.SIGKILL)  # the run and its worker processes
    task.wait()
    _complete_outputs(out)
    # the rerun resumes from the work dir and completes every output
    code = subprocess.run(_command(dataset, out, "-w", str(work), "--participant-label",
                                   LABELS[0]), capture_output=True, timeout=600).returncode
    assert code == 0
    assert _complete_outputs(out) >= 10
    assert (out / f"sub-{LABELS[0]}/anat/sub-{LABELS[0]}_Chimap.nii.gz").exists()


def test_sink_copy_interrupted_leaves_nothing(tmp_path, monkeypatch):
    source = tmp_path / "in.nii.gz"
    nb.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)).to_filename(source)
    destination = tmp_path / "out" / "sub-01_Chimap.nii.gz"

    def half_copy(src, dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:50])
        raise KeyboardInterrupt  # e.g. the job is cancelled mid-copy

    monkeypatch.setattr(sink_module.shutil, "copyfile", half_copy)
    with pytest.raises(KeyboardInterrupt):
        sink_module._atomic_copy(str(source), destination)
    assert list(destination.parent.iterdir()) == []


def test_atomic_text_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "dataset_description.json"
    bids.atomic_write_text(target, '{"Name": "old"}')

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(bids.os, "replace", failing_replace)
    with pytest.raises(OSError):
        bids.atomic_write_text(target, '{"Name": "new"}')
    assert json.loads(target.read_text()) == {"Name": "old"}
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
