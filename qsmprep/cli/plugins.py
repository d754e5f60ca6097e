"""Nipype execution plugins: ``--use-plugin`` files, a lean MultiProc, batch-system settings.

- :func:`read_plugin_file` reads ``{plugin: SLURM, plugin_args: {...}}`` from YAML, TOML or
  JSON and refuses plugins that do not work here, naming the ones that do.
- :class:`QSMMultiProcPlugin` is Nipype's MultiProc without its full garbage collection in
  every scheduling round: Nipype calls ``gc.collect()`` before each round of submissions, which
  walks every object of the (deep-copied) execution graph, 0.25 s per round with 40
  participants and ~60% of a 40-participant run. The graph built before the run is frozen
  (``gc.freeze``) so the collections only walk what the run creates.
- :func:`prepare_batch` readies the blocking batch plugins (``SLURM``, ``SGE``): ``LOGNAME``
  (Nipype names SLURM jobs after it; unset under ``apptainer --cleanenv`` and in many job
  environments), the per-node CPUs and memory as ``sbatch`` options from the nodes'
  ``n_procs``/``mem_gb`` (Nipype's SLURM plugin passes none), and a poll interval fit for
  a shared scheduler.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import threading
import tomllib
from pathlib import Path
from typing import Any

from nipype.pipeline.plugins.multiproc import MultiProcPlugin

LOGGER = logging.getLogger("qsmprep")

#: Plugins qsmprep runs with (blocking ones: the call returns when every node finished).
SUPPORTED = ("MultiProc", "Linear", "SLURM", "SGE")
BATCH = ("SLURM", "SGE")
#: Nipype plugins that return before the jobs ran (the outputs would not exist yet).
REFUSED = {
    "SLURMGraph": "it returns before its jobs run; use SLURM",
    "SGEGraph": "it returns before its jobs run; use SGE",
    "PBSGraph": "it returns before its jobs run",
    "DAGMan": "it returns before its jobs run",
}
#: Seconds between checks of the batch queue (Nipype polls squeue/qstat once per job).
BATCH_POLL_S = 2.0


class PluginFileError(ValueError):
    """The ``--use-plugin`` file is unreadable or names an unusable plugin."""


def read_plugin_file(path: Path) -> tuple[str, dict[str, Any]]:
    """``(plugin, plugin_args)`` from a YAML (``.yml``/``.yaml``), TOML or JSON file."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise PluginFileError(f"cannot read plugin file {path}: {error}") from None
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yml", ".yaml", ""):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise PluginFileError(f"plugin file {path}: unknown format '{suffix}'; use .yml, "
                                  ".yaml, .toml or .json.")
    except PluginFileError:
        raise
    except Exception as error:  # yaml.YAMLError, TOMLDecodeError, JSONDecodeError
        kind = {".toml": "TOML", ".json": "JSON"}.get(suffix, "YAML")
        raise PluginFileError(f"plugin file {path} is not valid {kind}: {error}") from None
    if not isinstance(data, dict) or "plugin" not in data:
        raise PluginFileError(f"plugin file {path} needs a 'plugin' key, e.g. 'plugin: SLURM' "
                              f"(one of {', '.join(SUPPORTED)}).")
    unknown = sorted(set(data) - {"plugin", "plugin_args"})
    if unknown:
        raise PluginFileError(f"plugin file {path}: unknown key(s) {', '.join(unknown)}; only "
                              "'plugin' and 'plugin_args' are read.")
    name = str(data["plugin"]).strip()
    name = name.removesuffix("Plugin").removesuffix("plugin")
    canonical = {p.lower(): p for p in (*SUPPORTED, *REFUSED)}.get(name.lower())
    if canonical in REFUSED:
        raise PluginFileError(f"plugin file {path}: plugin '{canonical}' is not supported: "
                              f"{REFUSED[canonical]}.")
    if canonical is None:
        raise PluginFileError(f"plugin file {path}: unknown plugin '{data['plugin']}'; use one "
                              f"of {', '.join(SUPPORTED)}.")
    args = data.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise PluginFileError(f"plugin file {path}: 'plugin_args' must be a mapping of "
                              f"options, got {type(args).__name__}.")
    return canonical, dict(args)


def ensure_logname() -> str:
    """Set ``LOGNAME`` when it is unset (Nipype's SLURM plugin names jobs after it)."""
    if not os.environ.get("LOGNAME"):
        name = os.environ.get("USER")
        if not name:
            try:
                import pwd

                name = pwd.getpwuid(os.getuid()).pw_name
            except (KeyError, ImportError):  # a uid without a passwd entry (containers)
                name = f"uid{os.getuid()}" if hasattr(os, "getuid") else "qsmprep"
        os.environ["LOGNAME"] = name
    return os.environ["LOGNAME"]


def prepare_batch(workflow, plugin: str, plugin_args: dict[str, Any]) -> None:
    """Batch plugins: ``LOGNAME``, per-node resources, poll interval (changes ``workflow``)."""
    if plugin not in BATCH:
        return
    ensure_logname()
    from nipype import config as nipype_config

    poll = float(plugin_args.pop("poll_sleep_duration", BATCH_POLL_S))
    nipype_config.set("execution", "poll_sleep_duration", str(poll))
    if plugin == "SLURM":
        given = str(plugin_args.get("sbatch_args", ""))
        for node in _all_nodes(workflow):
            if node.run_without_submitting:
                continue
            extra = slurm_resources(node.n_procs, node.mem_gb, given)
            if extra and "sbatch_args" not in node.plugin_args:
                node.plugin_args = {**node.plugin_args, "sbatch_args": extra}


def slurm_resources(n_procs: int, mem_gb: float, given: str = "") -> str:
    """``sbatch`` options for a node's CPUs and memory, leaving those ``given`` alone."""
    options = []
    if not re.search(r"(^|\s)(-c|--cpus-per-task)(=|\s|$)", given):
        options.append(f"--cpus-per-task={max(1, int(n_procs))}")
    if not re.search(r"(^|\s)--mem(-per-cpu|-per-gpu)?(=|\s|$)", given):
        options.append(f"--mem={max(100, int(round(float(mem_gb) * 1024)))}M")
    return " ".join(options)


def _all_nodes(workflow):
    """Every node of a workflow and its sub-workflows."""
    return workflow._get_all_nodes()


def memory_limit_gb(proc_cgroup: str = "/proc/self/cgroup",
                    sysfs: str = "/sys/fs/cgroup") -> float | None:
    """Memory this process may use (GB): the physical memory or the tightest limit of its
    control groups (cgroup v1 or v2, e.g. a SLURM job's or a container's allocation).

    Nipype's MultiProc assumes 90% of the physical memory when no ``--mem`` is given; inside a
    job limited to a fraction of a large node that schedules steps the kernel then kills.
    """
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, group = parts
        if controllers == "":  # cgroup v2
            base, name = Path(sysfs), "memory.max"
        elif "memory" in controllers.split(","):  # cgroup v1
            base, name = Path(sysfs) / "memory", "memory.limit_in_bytes"
        else:
            continue
        folder = base / group.lstrip("/")
        while True:  # the group and its ancestors (a parent's limit applies too)
            try:
                text = (folder / name).read_text().strip()
                if text.isdigit() and int(text) < 2**60:
                    limits.append(int(text))
            except OSError:
                pass
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(limits) / 1e9 if limits else None


def default_omp_nthreads(nprocs: int, n_acquisitions: int) -> int:
    """Threads per process when ``--omp-nthreads`` is not given: the CPUs shared among the
    acquisitions that can run at once (one acquisition: all CPUs), at most 8.

    With more CPUs than one step can use (small images gain little from FFT threads; many
    steps are single-threaded), several acquisitions' steps then run side by side instead
    of one multi-threaded step at a time. On 2 CPUs it makes no difference (40 participants
    of 24^3 voxels: 22.7 s of workflow with 1 thread per step, 23.4 s with 2;
    benchmarks/many_participants.py).
    """
    concurrent = max(1, min(int(n_acquisitions), int(nprocs)))
    return max(1, min(8, int(nprocs) // concurrent))


def runner(plugin: str, plugin_args: dict[str, Any]):
    """The plugin to pass to ``Workflow.run``: a name, or the lean MultiProc instance."""
    if plugin == "MultiProc":
        return QSMMultiProcPlugin(plugin_args=plugin_args)
    return plugin


class QSMMultiProcPlugin(MultiProcPlugin):
    """MultiProc whose per-round ``gc.collect()`` skips the graph built before the run, and
    whose scheduler wakes as soon as a step finishes.

    Nipype's scheduling loop sleeps out its poll interval (``poll_sleep_duration``) in every
    round, so each finished step waits up to that long before its successors start; with
    many short steps (small images, many participants) that idle time dominates, and a rerun
    over a full work dir waits the interval for every few cached steps. During the run the
    loop's sleep waits on an event that finished steps set instead (still at most the poll
    interval).
    """

    def __init__(self, plugin_args=None):
        super().__init__(plugin_args=plugin_args)
        self._finished = threading.Event()

    def run(self, graph, config, updatehash=False):
        from nipype.pipeline.plugins import base

        gc.collect()
        gc.freeze()  # the execution graph: alive for the whole run, no garbage to find
        original_sleep = base.sleep
        base.sleep = self._sleep  # the loop's only sleep; restored below
        try:
            return super().run(graph, config, updatehash=updatehash)
        finally:
            base.sleep = original_sleep
            gc.unfreeze()

    def _sleep(self, seconds: float) -> None:
        self._finished.wait(seconds)
        self._finished.clear()

    def _async_callback(self, args):
        super()._async_callback(args)
        self._finished.set()

    def _task_finished_cb(self, jobid, cached=False):
        super()._task_finished_cb(jobid, cached=cached)
        # a step done in this process (cached from an earlier run, or a sink) frees its
        # dependents: schedule them now, not after the poll interval (a rerun over a full
        # work dir otherwise waits the interval for every ~n_procs cached steps)
        self._finished.set()
