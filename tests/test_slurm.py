"""A real one-node SLURM cluster (Debian ``slurm-wlm`` + ``munge`` on 127.0.0.1): two
participants through ``scripts/qsmprep_array.sbatch`` as an array job, one through Nipype's
blocking SLURM plugin (``--use-plugin``, every step a SLURM job, ``LOGNAME`` unset). All
three participants have identical inputs, so both routes must give identical maps.

Skips where the SLURM/munge binaries are absent or the test does not run as root (the
daemons switch to the job owner). ``.ci/run`` installs the packages."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

import _tiny_bids as tiny
from _slurm_cluster import SlurmCluster, missing_binaries
from conftest import REPO

SCRIPT = REPO / "scripts" / "qsmprep_array.sbatch"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM/munge not installed ({', '.join(missing)}): "
                    "apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the one-node SLURM test cluster needs root (slurmd runs jobs as their "
                    "owner)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()  # by PID: the daemons this fixture started
    for name, process in cluster.processes.items():
        assert process.poll() is not None, f"{name} still running"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tiny.new_dataset(tmp_path_factory.mktemp("slurm_bids") / "bids")
    tiny.add_participant(root, "01", seed=7)
    for label in ("02", "03"):
        tiny.clone_participant(root, "01", label)
    return root


def _chimap(out: Path, label: str) -> np.ndarray:
    return np.asarray(nb.load(out / f"sub-{label}" / "anat" / f"sub-{label}_Chimap.nii.gz")
                      .dataobj)


@pytest.fixture(scope="module")
def array_run(cluster, dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("array")
    participants = base / "participants.txt"
    participants.write_text("sub-01\n# a comment\n\n02\n")
    node_local = base / "node_local"
    env = cluster.env()
    env.update(QSMPREP_WORK_ROOT=str(node_local), QSMPREP_BIDS_DB=str(base / "bids_db"))
    env.pop("QSMPREP_CONTAINER", None)
    before = tiny.checksums(dataset)
    start = time.monotonic()
    # the script asks for 4 CPUs and 8 GB; this node has fewer: override on the command line
    result = subprocess.run(
        ["sbatch", "--wait", "--array=1-2", "--cpus-per-task=1", "--mem=1G",
         "-o", str(base / "task_%A_%a.log"), str(SCRIPT), str(dataset), str(base / "out"),
         str(participants), "--skip-bids-validation"],
        capture_output=True, text=True, env=env, timeout=300, cwd=base)
    seconds = time.monotonic() - start
    logs = "\n".join(p.read_text() for p in sorted(base.glob("task_*.log")))
    return {"result": result, "logs": logs, "base": base, "out": base / "out",
            "node_local": node_local, "before": before, "seconds": seconds}


def test_array_job_runs_one_participant_per_task(array_run, dataset):
    result, logs = array_run["result"], array_run["logs"]
    assert result.returncode == 0, result.stdout + result.stderr + logs[-4000:]
    assert "task 1 -> sub-01" in logs and "task 2 -> sub-02" in logs, logs[-3000:]
    assert logs.count("finished with exit status 0") == 2
    out = array_run["out"]
    assert sorted(p.name for p in out.glob("sub-*") if p.is_dir()) == ["sub-01", "sub-02"]
    chi = _chimap(out, "01")
    assert np.count_nonzero(chi) > 1000
    np.testing.assert_array_equal(_chimap(out, "02"), chi)
    assert len(list((out / "logs").glob("config-*.toml"))) == 2
    # nothing written into the BIDS dataset; the node-local work dirs are removed
    assert tiny.checksums(dataset) == array_run["before"]
    assert array_run["node_local"].is_dir() and not list(array_run["node_local"].iterdir())
    # the first task built the shared pybids index, the other reused or raced it safely
    indexes = list((array_run["base"] / "bids_db").iterdir())
    assert len(indexes) == 1 and (indexes[0] / "layout_index.sqlite").is_file()
    print(f"array job, 2 tasks: {array_run['seconds']:.1f} s")


def test_nipype_slurm_plugin_runs_every_step_as_a_job(cluster, dataset, array_run, tmp_path):
    plugin_file = tmp_path / "slurm.yml"
    plugin_file.write_text("plugin: SLURM\nplugin_args:\n  sbatch_args: --time=10\n"
                           "  poll_sleep_duration: 0.5\n")
    env = cluster.env()
    for name in ("LOGNAME", "USER"):  # as under apptainer --cleanenv or a bare job shell
        env.pop(name, None)
    work, out = tmp_path / "work", tmp_path / "out"
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "qsmprep", str(dataset), str(out), "participant",
         "--participant-label", "03", "--skip-bids-validation", "--use-plugin",
         str(plugin_file), "-w", str(work), "--nprocs", "2"],
        capture_output=True, text=True, env=env, timeout=400)
    seconds = time.monotonic() - start
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert "with SLURM" in log
    # every compute step ran as a SLURM job (a job output file per step) ...
    job_outputs = list(work.rglob("slurm-*.out"))
    scripts = list(work.rglob("batchscript_*.sh"))
    steps = {re.sub(r"^.*qsm_wf_", "", p.stem) for p in scripts}
    assert {"load_echoes", "brain_mask", "estimate_field", "remove_background",
            "invert_dipole", "reference_chi"} <= steps, steps
    assert len(job_outputs) == len(scripts)
    # ... with the CPUs of its node: the threaded steps asked for 2 (--nprocs 2, one
    # acquisition), the others for 1
    controller = (cluster.root / "log" / "slurmctld.log").read_text()
    allocations = re.findall(r"Allocate JobId=\d+ NodeList=\S+ #CPUs=(\d+)", controller)
    assert "2" in allocations and "1" in allocations, allocations
    # identical inputs: the same map as the array job's MultiProc runs (to float32 rounding)
    np.testing.assert_allclose(_chimap(out, "03"), _chimap(array_run["out"], "01"), rtol=0,
                               atol=1e-5)
    print(f"Nipype SLURM plugin, 1 participant: {seconds:.1f} s, {len(scripts)} jobs")
