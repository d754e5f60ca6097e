"""Cluster support without a cluster: ``--use-plugin`` files (YAML/TOML/JSON, refused
plugins), ``LOGNAME``, per-node SLURM resources, nodes that unpickle in a bare interpreter
(as batch jobs do), and ``scripts/qsmprep_array.sbatch`` run by hand, including its container
route through a stand-in ``apptainer``, and Nipype's SGE plugin against stand-in
``qsub``/``qstat``. The real SLURM runs are in test_slurm.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import nibabel as nb
import pytest

from qsmprep.cli import plugins

import _tiny_bids as tiny
from conftest import REPO

SCRIPT = REPO / "scripts" / "qsmprep_array.sbatch"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tiny.new_dataset(tmp_path_factory.mktemp("clusters") / "bids")
    tiny.add_participant(root, "01", seed=11)
    tiny.clone_participant(root, "01", "02")
    return root


@pytest.mark.parametrize("name, text", [
    ("p.yml", "plugin: SLURM\nplugin_args:\n  sbatch_args: --time=60 -p short\n  max_jobs: 20\n"),
    ("p.yaml", "plugin: slurm\nplugin_args: {sbatch_args: '--time=60 -p short', max_jobs: 20}\n"),
    ("p.toml", 'plugin = "SLURMPlugin"\n[plugin_args]\nsbatch_args = "--time=60 -p short"\n'
               "max_jobs = 20\n"),
    ("p.json", json.dumps({"plugin": "SLURM", "plugin_args": {
        "sbatch_args": "--time=60 -p short", "max_jobs": 20}})),
])
def test_plugin_file_formats(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    plugin, args = plugins.read_plugin_file(path)
    assert plugin == "SLURM"
    assert args == {"sbatch_args": "--time=60 -p short", "max_jobs": 20}


@pytest.mark.parametrize("name, text, message", [
    ("g.yml", "plugin: SLURMGraph\n", "returns before its jobs run; use SLURM"),
    ("u.yml", "plugin: Torque\n", "unknown plugin 'Torque'; use one of MultiProc, Linear"),
    ("k.yml", "plugin: SGE\nargs: {}\n", "unknown key(s) args"),
    ("n.json", '{"plugin_args": {}}', "needs a 'plugin' key"),
    ("b.yml", "plugin: [SLURM\n", "is not valid YAML"),
    ("b.toml", "plugin = SLURM\n", "is not valid TOML"),
    ("a.yml", "plugin: SGE\nplugin_args: [1, 2]\n", "'plugin_args' must be a mapping"),
    ("p.ini", "plugin=SLURM\n", "unknown format '.ini'"),
])
def test_bad_plugin_files_are_usage_errors(tmp_path, dataset, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(plugins.PluginFileError) as error:
        plugins.read_plugin_file(path)
    assert message in str(error.value) and str(path) in str(error.value)
    if name == "g.yml":  # through the command line: exit 64 with the same message
        result = subprocess.run(
            [sys.executable, "-m", "qsmprep", str(dataset), str(tmp_path / "out"),
             "participant", "--skip-bids-validation", "--use-plugin", str(path)],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 64, result.stderr[-2000:]
        assert message in result.stderr
        assert not (tmp_path / "out" / "sub-01").exists()


def test_logname_is_set_when_missing(monkeypatch):
    import pwd

    monkeypatch.delenv("LOGNAME", raising=False)
    monkeypatch.delenv("USER", raising=False)
    assert plugins.ensure_logname() == pwd.getpwuid(os.getuid()).pw_name
    assert os.environ["LOGNAME"] == pwd.getpwuid(os.getuid()).pw_name
    monkeypatch.setenv("LOGNAME", "someone")
    assert plugins.ensure_logname() == "someone"


def test_slurm_resources_respect_the_users_options():
    assert plugins.slurm_resources(2, 1.5) == "--cpus-per-task=2 --mem=1536M"
    assert plugins.slurm_resources(1, 0.01) == "--cpus-per-task=1 --mem=100M"
    assert plugins.slurm_resources(4, 3.0, "--mem=32G -p long") == "--cpus-per-task=4"
    assert plugins.slurm_resources(4, 3.0, "-c 8 --time=60") == "--mem=3072M"
    assert plugins.slurm_resources(4, 3.0, "--cpus-per-task=8 --mem-per-cpu=2G") == ""


def _workflow(dataset: Path, tmp_path: Path, omp_nthreads: int = 2):
    from qsmprep import bids
    from qsmprep.config import Config
    from qsmprep.workflows.base import init_qsmprep_wf

    config = Config()
    config.execution.bids_dir = dataset
    config.execution.output_dir = tmp_path / "out"
    config.execution.work_dir = tmp_path / "work"
    config.nipype.omp_nthreads = omp_nthreads
    acquisitions = bids.discover(bids.load_layout(dataset), participant_label=["01"])
    shapes = {a.name: bids.check_images(a) for a in acquisitions}
    return init_qsmprep_wf(config, acquisitions, shapes=shapes)


def test_prepare_batch_gives_every_submitted_node_its_resources(dataset, tmp_path):
    from nipype import config as nipype_config

    workflow = _workflow(dataset, tmp_path)
    args = {"sbatch_args": "--time=30", "poll_sleep_duration": 0.5}
    poll = nipype_config.get("execution", "poll_sleep_duration")
    try:
        plugins.prepare_batch(workflow, "SLURM", args)
        assert nipype_config.get("execution", "poll_sleep_duration") == "0.5"
    finally:
        nipype_config.set("execution", "poll_sleep_duration", poll)
    assert args == {"sbatch_args": "--time=30"}  # qsmprep's key is not passed to Nipype
    nodes = {node.name: node for node in workflow._get_all_nodes()}
    submitted = [n for n in nodes.values() if not n.run_without_submitting]
    assert {"load_echoes", "invert_dipole", "remove_background"} <= {n.name for n in submitted}
    for node in submitted:
        expected = f"--cpus-per-task={node.n_procs} --mem={round(node.mem_gb * 1024)}M"
        assert node.plugin_args == {"sbatch_args": expected}, node.name
    assert nodes["invert_dipole"].n_procs == 2 and nodes["load_echoes"].n_procs == 1
    assert all(not n.plugin_args for n in nodes.values() if n.run_without_submitting)


def test_nodes_unpickle_in_a_bare_interpreter(dataset, tmp_path):
    """Batch jobs unpickle their node in a new Python on another machine: every interface
    must come from an installed package (qsmprep.* or nipype.*), never from the repository
    folder or __main__."""
    from nipype.utils.filemanip import savepkl

    workflow = _workflow(dataset, tmp_path, omp_nthreads=1)
    folder = tmp_path / "pickles"
    folder.mkdir()
    modules = set()
    for index, node in enumerate(workflow._get_all_nodes()):
        savepkl(str(folder / f"node_{index}.pklz"), {"node": node})
        modules.add(type(node.interface).__module__)
    assert any(m.startswith("qsmprep.interfaces.") for m in modules), modules
    assert all(m.split(".")[0] in ("qsmprep", "nipype") for m in modules), modules
    script = ("import glob, sys\nfrom nipype.utils.filemanip import loadpkl\n"
              "names = sorted(type(loadpkl(p)['node'].interface).__module__ "
              "for p in glob.glob('node_*.pklz'))\n"
              "assert not any(m.startswith('interfaces') for m in sys.modules), 'repo import'\n"
              "print(len(names))\n")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "NIPYPE_NO_ET": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout) == len(list(folder.glob("node_*.pklz")))


def _run_script(args, env_extra, tmp_path, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "QSMPREP_"))}
    env.update(env_extra)
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=tmp_path)


def test_array_script_refuses_bad_submissions(dataset, tmp_path):
    listing = tmp_path / "participants.txt"
    listing.write_text("01\n02\n")
    out = tmp_path / "out"
    result = _run_script([dataset, out, listing], {}, tmp_path)
    assert result.returncode == 64 and "submit with sbatch --array=1-N" in result.stderr
    result = _run_script([dataset, out, listing], {"SLURM_ARRAY_TASK_ID": "3"}, tmp_path)
    assert result.returncode == 64 and "fewer entries" in result.stderr
    result = _run_script([dataset, out], {"SLURM_ARRAY_TASK_ID": "1"}, tmp_path)
    assert result.returncode == 64 and "usage:" in result.stderr
    result = _run_script([dataset, out, listing], {
        "SLURM_ARRAY_TASK_ID": "1", "QSMPREP_CONTAINER": str(tmp_path / "q.sif"),
        "PATH": "/usr/bin:/bin"}, tmp_path)
    assert result.returncode == 69 and "neither apptainer nor singularity" in result.stderr
    result = _run_script([dataset, out, tmp_path / "missing.txt"],
                         {"SLURM_ARRAY_TASK_ID": "1"}, tmp_path)
    assert result.returncode == 66 and "missing.txt does not exist" in result.stderr
    assert not out.joinpath("sub-01").exists()


def test_array_script_memory_per_cpu_and_plain_list(dataset, tmp_path):
    bin_dir = _fake_apptainer(tmp_path)
    listing = tmp_path / "participants.txt"
    listing.write_text("# cohort A\nsub-01\n\n  02  \r\n")
    log = tmp_path / "args"
    result = _run_script([dataset, tmp_path / "out", listing, "--swi"], {
        "SLURM_ARRAY_TASK_ID": "2", "SLURM_CPUS_PER_TASK": "3", "SLURM_MEM_PER_CPU": "1000",
        "QSMPREP_CONTAINER": str(tmp_path / "q.sif"), "FAKE_APPTAINER_LOG": str(log),
        "FAKE_APPTAINER_DRY": "1", "QSMPREP_WORK_ROOT": str(tmp_path / "scratch"),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, tmp_path)
    assert result.returncode == 0, result.stderr
    args = log.read_text().splitlines()
    assert args[args.index("--participant-label") + 1] == "02"
    assert args[args.index("--nprocs") + 1] == "3" and args[args.index("--mem") + 1] == "2700"
    assert args[-1] == "--swi"
    assert not list((tmp_path / "scratch").iterdir())  # work dir removed


def _fake_apptainer(tmp_path) -> Path:
    """A folder holding the ``apptainer`` stand-in below (put it first on PATH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(FAKE_APPTAINER)
    (bin_dir / "apptainer").chmod(0o755)
    return bin_dir


FAKE_APPTAINER = """#!/bin/bash
# stand-in for apptainer: records its arguments, then runs qsmprep with those after the image
printf '%s\\n' "$@" > "$FAKE_APPTAINER_LOG"
[[ -n "${FAKE_APPTAINER_DRY:-}" ]] && exit 0
[[ "$1" == run ]] || exit 2
shift
while [[ $# -gt 0 && "$1" != *.sif ]]; do
    if [[ "$1" == -B ]]; then shift 2; else shift; fi
done
shift
exec qsmprep "$@"
"""


def test_array_script_container_route_with_participants_tsv(dataset, tmp_path):
    """Task 2 of a participants.tsv runs sub-02 through `apptainer run --cleanenv` with
    the dataset bound read-only, a node-local work dir (removed afterwards) and --nprocs
    from SLURM_CPUS_PER_TASK."""
    bin_dir = _fake_apptainer(tmp_path)
    table = tmp_path / "participants.tsv"
    table.write_text("participant_id\tage\nsub-01\t30\nsub-02\t41\n")
    node_local, out, log = tmp_path / "scratch", tmp_path / "out", tmp_path / "apptainer.args"
    before = tiny.checksums(dataset)
    result = _run_script([dataset, out, table, "--skip-bids-validation"], {
        "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_JOB_ID": "77", "SLURM_CPUS_PER_TASK": "1",
        "SLURM_MEM_PER_NODE": "2000", "QSMPREP_CONTAINER": str(tmp_path / "qsmprep.sif"),
        "QSMPREP_WORK_ROOT": str(node_local), "FAKE_APPTAINER_LOG": str(log),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    args = log.read_text().splitlines()
    work = f"{node_local}/qsmprep_77_2_sub-02"
    assert args[:2] == ["run", "--cleanenv"]
    assert f"{dataset}:{dataset}:ro" in args and f"{out}:{out}" in args
    image = args.index(str(tmp_path / "qsmprep.sif"))
    assert args[image + 1:] == [str(dataset), str(out), "participant", "--participant-label",
                                "02", "--nprocs", "1", "-w", work, "--mem", "1800",
                                "--skip-bids-validation"]
    assert "task 2 -> sub-02" in result.stdout
    chi = np.asarray(nb.load(out / "sub-02" / "anat" / "sub-02_Chimap.nii.gz").dataobj)
    assert np.count_nonzero(chi) > 1000
    assert not (out / "sub-01").exists()
    assert not Path(work).exists() and node_local.is_dir()
    assert tiny.checksums(dataset) == before



FAKE_QSUB = """#!/bin/bash
# stand-in for SGE's qsub: runs the job script at once, then reports it as SGE does
args=("$@"); script=${args[-1]}; out=.; name=job
while [[ $# -gt 1 ]]; do
    case "$1" in -o) out=$2; shift 2;; -N) name=$2; shift 2;; *) shift;; esac
done
id=$(( $(cat "$FAKE_SGE_DIR/next" 2>/dev/null || echo 0) + 1 ))
echo "$id" > "$FAKE_SGE_DIR/next"
echo "$id $name ${args[*]}" >> "$FAKE_SGE_DIR/jobs"
/bin/sh "$script" > "$out/$name.o$id" 2>&1
echo "Your job $id (\\"$name\\") has been submitted"
"""

FAKE_QSTAT = """#!/bin/bash
# stand-in for `qstat -u USER -xml -s psrz`: every submitted job, finished (zombie)
echo "<?xml version='1.0'?><job_info><queue_info></queue_info><job_info>"
while read -r id rest; do
    echo "<job_list state=\\"zombie\\"><JB_job_number>$id</JB_job_number>"
    echo "<slots>1</slots></job_list>"
done < <(cat "$FAKE_SGE_DIR/jobs" 2>/dev/null)
echo "</job_info></job_info>"
"""


def test_sge_plugin_runs_every_step_through_qsub(dataset, tmp_path):
    """Nipype's blocking SGE plugin end to end against stand-in qsub/qstat (no SGE here):
    every compute step is submitted as a job script that unpickles its node in a new
    Python, results are collected, and LOGNAME (unset) names the jobs. The map equals the
    one of a plain MultiProc run of the identical participant."""
    import pwd

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("qsub", FAKE_QSUB), ("qstat", FAKE_QSTAT)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "sge").mkdir()
    plugin_file = tmp_path / "sge.json"
    plugin_file.write_text(json.dumps({"plugin": "SGE", "plugin_args": {
        "qsub_args": "-q all.q", "poll_sleep_duration": 0.2}}))
    env = {k: v for k, v in os.environ.items() if k not in ("LOGNAME", "USER")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_SGE_DIR=str(tmp_path / "sge"))
    common = [sys.executable, "-m", "qsmprep", str(dataset)]
    result = subprocess.run(
        [*common, str(tmp_path / "out"), "participant", "--participant-label", "01",
         "--skip-bids-validation", "--use-plugin", str(plugin_file), "-w",
         str(tmp_path / "work"), "--nprocs", "1"],
        capture_output=True, text=True, env=env, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    jobs = (tmp_path / "sge" / "jobs").read_text().splitlines()
    names = [line.split()[1] for line in jobs]
    for step in ("load_echoes", "brain_mask", "estimate_field", "remove_background",
                 "invert_dipole", "reference_chi"):
        assert any(n.startswith(step) for n in names), names
    user = pwd.getpwuid(os.getuid()).pw_name
    assert all(n.endswith("." + user) for n in names), names  # jobs named after LOGNAME
    assert all("-q all.q" in line for line in jobs)
    reference = subprocess.run(
        [*common, str(tmp_path / "out_mp"), "participant", "--participant-label", "02",
         "--skip-bids-validation", "-w", str(tmp_path / "work_mp"), "--nprocs", "1"],
        capture_output=True, text=True, timeout=400)
    assert reference.returncode == 0, reference.stderr[-3000:]
    chi = nb.load(tmp_path / "out" / "sub-01" / "anat" / "sub-01_Chimap.nii.gz").get_fdata()
    expected = nb.load(tmp_path / "out_mp" / "sub-02" / "anat" / "sub-02_Chimap.nii.gz")
    # same inputs, same code: the same map to float32 rounding (1e-5 ppm; the map's values
    # are ~0.1 ppm, a wrong participant or echo order differs by ~1e-2 ppm)
    np.testing.assert_allclose(chi, expected.get_fdata(), rtol=0, atol=1e-5)
    assert np.count_nonzero(chi) > 1000


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_memory_limit_follows_the_tightest_cgroup(tmp_path, version):
    """A SLURM job or container limited to 3 GB on a large node: MultiProc's budget comes
    from the control group (its own or a parent's limit), not from the node's RAM."""
    sysfs = tmp_path / "cgroup"
    if version == "v1":
        (tmp_path / "proc").write_text("5:cpuset:/slurm/job_1\n4:memory:/slurm/job_1/step_0\n")
        group = sysfs / "memory" / "slurm" / "job_1"
        name, unlimited = "memory.limit_in_bytes", "9223372036854771712"
    else:
        (tmp_path / "proc").write_text("0::/system.slice/job_1/step_0\n")
        group = sysfs / "system.slice" / "job_1"
        name, unlimited = "memory.max", "max"
    (group / "step_0").mkdir(parents=True)
    (group / "step_0" / name).write_text(unlimited + "\n")
    (group / name).write_text(f"{3 * 10**9}\n")
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9
    limit = plugins.memory_limit_gb(str(tmp_path / "proc"), str(sysfs))
    assert limit == pytest.approx(min(3.0, physical))
    (group / name).write_text(unlimited + "\n")  # no limit: the physical memory
    assert plugins.memory_limit_gb(str(tmp_path / "proc"), str(sysfs)) == pytest.approx(physical)
