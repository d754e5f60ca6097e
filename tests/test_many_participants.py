"""Many participants in one run: all are processed with ``--nprocs 2``, failing participants
(one rejected before the run, one failing inside it) do not stop or change the others (exit
1), and the pybids index of ``--bids-database-dir`` is built once, reused, rebuilt when the
dataset changes and safe when array tasks build it at the same time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from qsmprep import layout_cache
from qsmprep.cli.plugins import default_omp_nthreads
from qsmprep.datasets.bids import save_nifti

import _tiny_bids as tiny

N_PARTICIPANTS = 40
RUNTIME_FAILURE = "bad"  # constant magnitude: fails inside the workflow (load_echoes)
PREFLIGHT_FAILURE = "grid"  # an echo on another voxel grid: rejected before the run
GOOD = [f"{n:02d}" for n in range(1, N_PARTICIPANTS - 1)]  # 38 participants


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tiny.new_dataset(tmp_path_factory.mktemp("many") / "bids")
    tiny.add_participant(root, GOOD[0], seed=3)
    for label in GOOD[1:]:
        tiny.clone_participant(root, GOOD[0], label)
    anat = tiny.clone_participant(root, GOOD[0], RUNTIME_FAILURE)
    for path in sorted(anat.glob("*_part-mag_MEGRE.nii.gz")):
        image = nb.load(path)
        save_nifti(path, np.zeros(image.shape, np.int16), image.affine)
    anat = tiny.clone_participant(root, GOOD[0], PREFLIGHT_FAILURE)
    path = anat / f"sub-{PREFLIGHT_FAILURE}_echo-2_part-phase_MEGRE.nii.gz"
    image = nb.load(path)
    save_nifti(path, np.asarray(image.dataobj)[2:-2, 2:-2, 2:-2], image.affine)
    return root


def _qsmprep(*args: str, timeout: float = 600) -> tuple[int, str, float]:
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "qsmprep", *args], capture_output=True,
                            text=True, timeout=timeout,
                            env={**os.environ, "PYTHONHASHSEED": "0"})
    return result.returncode, result.stdout + result.stderr, time.monotonic() - start


@pytest.fixture(scope="module")
def many_run(dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("many_run")
    out, work, database = base / "out", base / "work", base / "bids_db"
    before = tiny.checksums(dataset)
    code, log, seconds = _qsmprep(str(dataset), str(out), "participant", "--nprocs", "2",
                                  "--skip-bids-validation", "-w", str(work),
                                  "--bids-database-dir", str(database))
    print(f"{N_PARTICIPANTS} participants, --nprocs 2: {seconds:.1f} s")
    assert tiny.checksums(dataset) == before, "the run changed the input dataset"
    return {"code": code, "log": log, "seconds": seconds, "out": out, "work": work,
            "database": database}


def test_every_good_participant_is_processed_and_failures_are_contained(many_run):
    run, out = many_run, many_run["out"]
    assert run["code"] == 1, run["log"][-4000:]
    written = sorted(p.name.split("_")[0] for p in out.glob("sub-*/anat/*_Chimap.nii.gz"))
    assert written == [f"sub-{label}" for label in GOOD], run["log"][-4000:]
    reference = np.asarray(nb.load(out / f"sub-{GOOD[0]}/anat/sub-{GOOD[0]}_Chimap.nii.gz")
                           .dataobj)
    assert np.count_nonzero(reference) > 1000
    for label in GOOD[1:]:  # identical inputs: identical maps, nothing mixed up or cut short
        chi = np.asarray(nb.load(out / f"sub-{label}/anat/sub-{label}_Chimap.nii.gz").dataobj)
        np.testing.assert_array_equal(chi, reference, err_msg=f"sub-{label}")
        for suffix in ("R2starmap", "desc-brain_mask"):
            assert (out / f"sub-{label}/anat/sub-{label}_{suffix}.nii.gz").is_file()
        assert json.loads((out / f"sub-{label}/anat/sub-{label}_Chimap.json").read_text())
    for label in (RUNTIME_FAILURE, PREFLIGHT_FAILURE):  # no partial outputs of the failures
        assert not list(out.glob(f"sub-{label}/**/*.nii*")), label
    assert not list(out.rglob("*.tmp"))
    log = run["log"]
    assert f"cannot process sub-{PREFLIGHT_FAILURE}" in log
    assert "the magnitude is constant" in log and f"sub-{RUNTIME_FAILURE}" in log
    crashes = list((out / "logs" / "crash").glob("crash-*.txt"))
    assert len(crashes) == 1 and RUNTIME_FAILURE in crashes[0].read_text()
    # the whole run, 40 participants (38 maps) on 2 CPUs shared with other jobs: 472 s with
    # Nipype's own MultiProc (a full garbage collection every scheduling round), 45-70 s now
    assert run["seconds"] < 240, f"{run['seconds']:.0f} s"


def test_bids_database_is_built_once_and_reused(many_run, dataset):
    database = many_run["database"]
    indexes = [p for p in database.iterdir()]
    assert len(indexes) == 1 and (indexes[0] / layout_cache.DATABASE_FILE).is_file(), indexes
    assert indexes[0].name == layout_cache.dataset_fingerprint(dataset)[:20]
    built = (indexes[0] / layout_cache.DATABASE_FILE).stat().st_mtime_ns
    assert "saved the pybids index" in many_run["log"]
    code, log, _ = _qsmprep(str(dataset), str(many_run["out"]), "participant",
                            "--participant-label", GOOD[1], "--nprocs", "2",
                            "--skip-bids-validation", "-w", str(many_run["work"]),
                            "--bids-database-dir", str(database))
    assert code == 0, log[-3000:]
    assert "reusing the pybids index" in log
    assert sorted(database.iterdir()) == indexes
    assert (indexes[0] / layout_cache.DATABASE_FILE).stat().st_mtime_ns == built


def _small_dataset(root: Path, labels) -> Path:
    tiny.new_dataset(root)
    tiny.add_participant(root, labels[0], seed=1)
    for label in labels[1:]:
        tiny.clone_participant(root, labels[0], label)
    return root


def test_concurrent_tasks_build_one_index_and_a_changed_dataset_gets_a_new_one(tmp_path):
    root = _small_dataset(tmp_path / "bids", ["a", "b", "c", "d"])
    database = tmp_path / "db"
    script = (
        "import sys, time; from pathlib import Path\n"
        "from qsmprep.layout_cache import load_cached_layout\n"
        "start = float(sys.argv[3])\n"
        "time.sleep(max(0.0, start - time.time()))\n"  # all tasks index at the same moment
        "layout, reused = load_cached_layout(Path(sys.argv[1]), Path(sys.argv[2]))\n"
        "print(','.join(sorted(layout.get_subjects())), reused,"
        " len(layout.get(suffix='MEGRE', extension='.nii.gz')))\n"
    )
    start = time.time() + 6.0  # after every interpreter has imported pybids
    tasks = [subprocess.Popen([sys.executable, "-c", script, str(root), str(database),
                               str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    results = [task.communicate(timeout=120) for task in tasks]
    for task, (stdout, stderr) in zip(tasks, results):
        assert task.returncode == 0, stderr[-2000:]
        subjects, _, files = stdout.split()
        assert subjects == "a,b,c,d" and files == "24"
    entries = sorted(p.name for p in database.iterdir())
    assert entries == [layout_cache.dataset_fingerprint(root)[:20]], entries  # no .tmp-*
    layout, reused = layout_cache.load_cached_layout(root, database)
    assert reused and sorted(layout.get_subjects()) == ["a", "b", "c", "d"]
    tiny.clone_participant(root, "a", "e")  # the dataset changed: a new index, not a stale one
    layout, reused = layout_cache.load_cached_layout(root, database)
    assert not reused and sorted(layout.get_subjects()) == ["a", "b", "c", "d", "e"]
    assert len(list(database.iterdir())) == 2
    tiny.edit_sidecar(root / "sub-e" / "anat" / "sub-e_echo-1_part-mag_MEGRE.json",
                      EchoTime=0.0041)  # an edited sidecar changes the fingerprint too
    assert layout_cache.dataset_fingerprint(root)[:20] not in entries + [
        p.name for p in database.iterdir()]


def test_an_index_placed_by_hand_is_used_as_given(tmp_path):
    root = _small_dataset(tmp_path / "bids", ["a", "b"])
    layout, _ = layout_cache.load_cached_layout(root, tmp_path / "db")
    given = tmp_path / "given"
    layout.save(str(given))  # e.g. made by another BIDS App with --bids-database-dir
    tiny.clone_participant(root, "a", "c")
    layout, reused = layout_cache.load_cached_layout(root, given)
    assert reused and sorted(layout.get_subjects()) == ["a", "b"]


def test_default_threads_share_the_cpus_among_acquisitions():
    assert default_omp_nthreads(2, 40) == 1
    assert default_omp_nthreads(2, 1) == 2
    assert default_omp_nthreads(16, 1) == 8
    assert default_omp_nthreads(16, 4) == 4
    assert default_omp_nthreads(3, 2) == 1


def _increment(value):
    return value + 1


def test_scheduler_wakes_when_a_step_finishes(tmp_path):
    """A chain of 6 trivial steps with a 1 s poll interval: Nipype's MultiProc sleeps out the
    interval after every step (>= 6 s); qsmprep's wakes on the result callback, and on
    cached steps of a rerun. The frozen garbage collector and Nipype's sleep are restored
    afterwards."""
    import gc

    from nipype import Function, Node, Workflow
    from nipype.pipeline.plugins import base

    from qsmprep.cli.plugins import QSMMultiProcPlugin

    workflow = Workflow(name="chain", base_dir=str(tmp_path))
    previous = None
    for index in range(6):
        node = Node(Function(input_names=["value"], output_names=["value"],
                             function=_increment), name=f"step{index}")
        if previous is None:
            node.inputs.value = 0
        else:
            workflow.connect(previous, "value", node, "value")
        previous = node
    workflow.config["execution"]["poll_sleep_duration"] = 1.0
    original_sleep = base.sleep
    start = time.monotonic()
    graph = workflow.run(plugin=QSMMultiProcPlugin(plugin_args={"n_procs": 2}))
    seconds = time.monotonic() - start
    last = next(n for n in graph.nodes() if n.name == "step5")
    assert last.result.outputs.value == 6
    assert seconds < 4.5, f"{seconds:.1f} s"  # polling alone would take >= 6 s
    assert base.sleep is original_sleep and gc.get_freeze_count() == 0
    # a rerun over the same work dir: every step cached, checked in this process; Nipype
    # polls once per n_procs cached steps (>= 3 s here)
    start = time.monotonic()
    graph = workflow.run(plugin=QSMMultiProcPlugin(plugin_args={"n_procs": 2}))
    seconds = time.monotonic() - start
    assert next(n for n in graph.nodes() if n.name == "step5").result.outputs.value == 6
    assert seconds < 2.5, f"rerun {seconds:.1f} s"
