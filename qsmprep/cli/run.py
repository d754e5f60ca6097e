"""``qsmprep`` entry point: checks, discovery, workflow build and execution, exit codes."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("NIPYPE_NO_ET", "1")  # offline always: no telemetry check
os.environ.setdefault("MPLBACKEND", "Agg")

from qsmprep import __version__  # noqa: E402
from qsmprep.config import Config  # noqa: E402

from .parser import parse_args  # noqa: E402

LOGGER = logging.getLogger("qsmprep")


class RunError(Exception):
    """A run-stopping problem with its exit code (the message says what to fix)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def main(argv: list[str] | None = None) -> int:
    """Run qsmprep; returns the process exit code."""
    config, namespace = parse_args(argv)
    _setup_logging(config.execution.verbosity)
    from qsmprep.reports import runlog

    run_log = runlog.attach_run_log(LOGGER)  # logs/qsmprep-<run id>.log, for the reports
    try:
        if namespace.reports_only:
            return run_reports_only(config)
        if namespace.boilerplate_only and config.execution.analysis_level == "group":
            raise RunError("--boilerplate-only applies to the participant level.", 64)
        if config.execution.analysis_level == "group":
            from qsmprep.study_io import StudyInputError

            from .group import run_group

            try:
                code = run_group(config)
            except StudyInputError as error:
                raise RunError(str(error), error.exit_code) from None
            return _group_report(config, code)
        _check_paths(config)
        plugin, plugin_args = _plugin_settings(config, namespace.use_plugin)
        return run_participant(config, plugin, plugin_args,
                               boilerplate_only=namespace.boilerplate_only)
    except RunError as error:
        LOGGER.error("%s", error)
        return error.exit_code
    finally:
        runlog.detach_run_log(LOGGER, run_log)


def run_reports_only(config: Config) -> int:
    """``--reports-only``: rebuild the pages from the outputs already in output_dir."""
    from qsmprep import reports

    output_dir = config.execution.output_dir
    if not Path(output_dir).is_dir():
        raise RunError(f"{output_dir} does not exist: run the participant level first.", 64)
    if config.execution.analysis_level == "group":
        return _group_report(config, 0)
    available = reports.participants_with_outputs(output_dir)
    labels = config.execution.participant_label or available
    missing = sorted(set(labels) - set(available))
    if missing:
        raise RunError(f"no outputs of {', '.join('sub-' + m for m in missing)} in "
                       f"{output_dir}; run the participant level first.", 64)
    if not labels:
        raise RunError(f"{output_dir} holds no participant outputs to report on.", 64)
    failures = reports.build_participant_reports(output_dir, labels)
    return reports.EXIT_REPORT_FAILED if failures else 0


def _group_report(config: Config, code: int) -> int:
    """Build group/index.html after the group level; a failure is counted (exit 3)."""
    from qsmprep import reports

    failures = reports.build_group_page(config.execution.output_dir)
    return code or (reports.EXIT_REPORT_FAILED if failures else 0)


def _setup_logging(verbosity: int) -> None:
    level = max(logging.WARNING - 10 * min(verbosity + 1, 2), logging.DEBUG)
    if not LOGGER.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(
            "%(asctime)s | %(levelname)-7s | %(name)s | %(message)s", "%y%m%d-%H:%M:%S"))
        LOGGER.addHandler(handler)
    LOGGER.setLevel(level)
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).setLevel(logging.INFO if verbosity > 1 else logging.WARNING)


def _check_paths(config: Config) -> None:
    execution = config.execution
    bids_dir = execution.bids_dir.resolve()
    output_dir = execution.output_dir.resolve()
    if output_dir == bids_dir:
        raise RunError("output_dir is the BIDS dataset itself; choose another folder "
                       f"(e.g. {bids_dir}/derivatives/qsmprep).", 64)
    if bids_dir in output_dir.parents and (bids_dir / "derivatives") not in (
        output_dir, *output_dir.parents
    ):
        raise RunError(f"output_dir {output_dir} is inside the BIDS dataset; write derivatives "
                       f"under {bids_dir}/derivatives/ or outside the dataset.", 64)
    if output_dir in bids_dir.parents:
        raise RunError(f"output_dir {output_dir} contains the BIDS dataset; choose a folder "
                       "outside it.", 64)
    if execution.work_dir is None:
        execution.work_dir = output_dir.parent / "qsmprep_work"
    work_dir = execution.work_dir.resolve()
    if bids_dir == work_dir or bids_dir in work_dir.parents:
        raise RunError(f"the work dir {work_dir} is inside the BIDS dataset; pass -w with a "
                       "folder outside it.", 64)
    for folder, what in ((output_dir, "output_dir"), (work_dir, "work dir")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunError(f"cannot create the {what} {folder}: {error.strerror}.", 64) from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise RunError(f"the {what} {folder} is not writable; fix its permissions or "
                           "choose another folder.", 64)


#: MultiProc memory budget (GB) of ``--low-mem`` for the nodes (workflows/resources.py gives
#: their estimates); with the scheduler process the run stays within about 3 GB
LOW_MEM_BUDGET_GB = 2.5


def _plugin_settings(config: Config, plugin_file: Path | None) -> tuple[str, dict]:
    """Nipype plugin and its arguments (``--use-plugin`` file, else MultiProc)."""
    nipype = config.nipype
    from . import plugins

    if plugin_file is not None:
        try:
            nipype.plugin, nipype.plugin_args = plugins.read_plugin_file(plugin_file)
        except plugins.PluginFileError as error:
            raise RunError(str(error), 64) from None
    if nipype.plugin not in plugins.SUPPORTED:  # also from --config-file
        raise RunError(f"nipype plugin '{nipype.plugin}' is not supported; use one of "
                       f"{', '.join(plugins.SUPPORTED)} (--use-plugin FILE).", 64)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    nipype.nprocs = nipype.nprocs or cpus or 1
    if nipype.omp_nthreads > nipype.nprocs:  # 0: automatic, set once the inputs are known
        raise RunError(f"--omp-nthreads {nipype.omp_nthreads} exceeds --nprocs "
                       f"{nipype.nprocs}.", 64)
    args = dict(nipype.plugin_args)
    if nipype.plugin == "MultiProc":
        args.setdefault("n_procs", nipype.nprocs)
        budget = nipype.mem_gb / 1000 if nipype.mem_gb else None
        if budget is None:  # the job's or container's memory limit, not the node's RAM
            limit = plugins.memory_limit_gb()
            budget = 0.9 * limit if limit else None
        if config.execution.low_mem:  # heavy nodes then run one at a time
            budget = min(budget or LOW_MEM_BUDGET_GB, LOW_MEM_BUDGET_GB)
        if budget:
            args.setdefault("memory_gb", budget)
        args.setdefault("raise_insufficient", False)
    if nipype.plugin in plugins.BATCH:
        plugins.ensure_logname()  # Nipype's SLURM plugin names jobs after LOGNAME
    return nipype.plugin, args


def run_participant(config: Config, plugin: str, plugin_args: dict, *,
                    boilerplate_only: bool = False) -> int:
    """Discover, build and run (or only write the methods boilerplate); returns the exit
    code."""
    from qsmprep import bids

    execution = config.execution
    if not execution.skip_bids_validation:
        validate_input(execution.bids_dir)
    database_dir = execution.bids_database_dir
    # without --bids-database-dir the index stays in memory; with it, concurrent array tasks
    # build it once (atomic rename) and reuse it while the dataset is unchanged
    try:
        if database_dir is None:
            layout = bids.load_layout(execution.bids_dir)
        else:
            from qsmprep.layout_cache import load_cached_layout

            layout, _ = load_cached_layout(execution.bids_dir, database_dir)
    except bids.BIDSInputError as error:
        raise RunError(str(error), error.exit_code) from None
    except OSError as error:
        raise RunError(f"cannot use --bids-database-dir {database_dir}: {error}; choose a "
                       "writable folder.", 64) from None
    available = set(layout.get_subjects())
    missing = sorted(set(execution.participant_label) - available)
    if missing:
        raise RunError(f"participant(s) {', '.join('sub-' + m for m in missing)} not found in "
                       f"{execution.bids_dir}; available: "
                       f"{', '.join(sorted('sub-' + s for s in available)) or 'none'}.", 64)
    try:
        filter_file = execution.bids_filter_file
        filters = bids.read_filters(filter_file) if filter_file else {}
        acquisitions = bids.discover(
            layout,
            participant_label=execution.participant_label,
            session_label=execution.session_label,
            filters=filters,
            b0_tesla=config.workflow.b0_tesla,
            filter_source=f"BIDS filter file {filter_file}" if filter_file else "filters",
        )
    except bids.BIDSInputError as error:
        raise RunError(str(error), error.exit_code) from None
    runnable, failed = [], 0
    shapes: dict[str, tuple[int, ...]] = {}
    for acquisition in acquisitions:
        if len(acquisition.echoes) == 1 and config.workflow.reference == "csf":
            acquisition.problems.append(
                f"{acquisition.source_files[0]}: --reference csf finds CSF by R2*, which needs "
                "at least 2 echoes; use --reference mean for this single-echo acquisition.")
        # a single slice is no QSM, but its water-fat maps (field, PDFF, R2*) are useful
        single_slice = acquisition.has_phase and config.workflow.fieldmap_method == "waterfat"
        if not acquisition.problems:
            # headers only: fast, names every file
            shape = bids.check_images(acquisition, single_slice=single_slice)
            if shape is not None:
                shapes[acquisition.name] = shape
        if acquisition.problems:
            failed += 1
            LOGGER.error("cannot process %s:\n  - %s", acquisition.name,
                         "\n  - ".join(acquisition.problems))
            continue
        if not acquisition.has_phase:
            LOGGER.warning("%s has no phase images: only R2*/T2*/S0 maps and the mask are "
                           "computed (QSM needs part-phase images).", acquisition.name)
        runnable.append(acquisition)
    if not runnable:
        raise RunError("no acquisition can be processed (see the errors above).",
                       1 if failed else 66)
    if not config.nipype.omp_nthreads:
        from .plugins import default_omp_nthreads

        config.nipype.omp_nthreads = default_omp_nthreads(config.nipype.nprocs, len(runnable))
    masks = (bids.find_masks(execution.mask_dir, runnable, desc=config.workflow.mask_type)
             if execution.mask_dir else {})
    reference_masks = {}
    if config.workflow.reference == "roi":
        if not execution.mask_dir:
            raise RunError("--reference roi needs --mask-dir with "
                           "<entities>_desc-reference_mask images.", 64)
        reference_masks = bids.find_masks(execution.mask_dir, runnable, desc="reference")
    from qsmprep.study_io import StudyInputError, find_rois

    try:
        rois = find_rois(runnable, [execution.bids_dir, execution.roi_dir])
    except StudyInputError as error:
        raise RunError(str(error), error.exit_code) from None
    if execution.roi_dir and not rois:
        raise RunError(f"--roi-dir {execution.roi_dir} holds no ROI of the selected "
                       "participants: expected sub-<l>/[ses-<s>/]anat/<entities>[_desc-<rater>]"
                       "_dseg.nii.gz (+ .tsv) or <entities>_label-<roi>_mask.nii.gz.", 64)
    run_id = time.strftime("%Y%m%d-%H%M%S") + "_" + uuid.uuid4().hex[:8]
    output_dir = execution.output_dir
    if not boilerplate_only:
        from qsmprep.reports import runlog

        runlog.open_run_log(LOGGER, output_dir / "logs" / f"qsmprep-{run_id}.log")
        bids.write_dataset_files(output_dir, execution.bids_dir, execution.mask_dir)
        bids.atomic_write_text(output_dir / "logs" / f"config-{run_id}.toml",
                               _provenance_header(run_id) + config.to_toml())
    try:
        from qsmprep.workflows.base import init_qsmprep_wf

        _configure_nipype(config, output_dir / "logs" / "crash", run_id)
        workflow = init_qsmprep_wf(config, runnable, shapes=shapes, provided_masks=masks,
                                   reference_masks=reference_masks, rois=rois)
    except Exception as error:  # any failure to build is exit 70
        LOGGER.exception("the workflow could not be built")
        raise RunError(f"the workflow could not be built: {error}", 70) from None
    if execution.write_graph:
        try:
            workflow.write_graph(graph2use="colored", format="svg", simple_form=True)
        except Exception as error:  # graphviz missing is not fatal
            LOGGER.warning("could not write the workflow graph: %s", error)
    report_failures = _write_boilerplate(output_dir, workflow)
    if boilerplate_only:
        from qsmprep.reports import EXIT_REPORT_FAILED

        return EXIT_REPORT_FAILED if report_failures else 0
    LOGGER.info("processing %d acquisition(s) with %s (%s)", len(runnable), plugin, plugin_args)
    start = time.monotonic()
    started = time.time()
    from . import plugins

    plugins.prepare_batch(workflow, plugin, plugin_args)
    try:
        workflow.run(plugin=plugins.runner(plugin, plugin_args), plugin_args=plugin_args)
    except Exception as error:  # nipype raises after running every node it could
        crash_dir = output_dir / "logs" / "crash"
        for node, message in _crash_summary(crash_dir, started):
            LOGGER.error("%s failed: %s", node, message)
        LOGGER.error("some steps failed (%s); crash files are in %s. Outputs of the other "
                     "acquisitions were written.", error, crash_dir)
        failed += 1
    else:
        LOGGER.info("finished in %.1f s; outputs in %s", time.monotonic() - start, output_dir)
    report_failures += _write_reports(config, runnable, run_id, started)
    if failed:
        return 1
    if execution.clean_workdir:
        shutil.rmtree(execution.work_dir, ignore_errors=True)
    from qsmprep.reports import EXIT_REPORT_FAILED

    return EXIT_REPORT_FAILED if report_failures else 0


def _write_boilerplate(output_dir: Path, workflow) -> int:
    """logs/CITATION.md and .bib from the workflows' descriptions; returns failures (0/1)."""
    from qsmprep.reports import collect_descriptions, write_citation_files

    try:
        paths = write_citation_files(output_dir, collect_descriptions(workflow))
    except Exception:  # the boilerplate never stops processing
        LOGGER.exception("the methods boilerplate could not be written")
        return 1
    LOGGER.info("methods boilerplate: %s", paths[0])
    return 0


def _write_reports(config: Config, runnable: list, run_id: str, started: float) -> int:
    """After the run, from the files: the step run-time table and the participants' pages.
    Returns the number of report failures (logged; the maps are already written)."""
    from qsmprep import reports
    from qsmprep.reports import runlog

    output_dir = config.execution.output_dir
    failures = 0
    try:
        runlog.write_runtime_log(config.execution.work_dir,
                                 output_dir / "logs" / f"runtime-{run_id}.tsv",
                                 {a.name: a.subject for a in runnable}, started)
    except Exception:
        LOGGER.exception("the run-time table could not be written")
        failures += 1
    labels = sorted({a.subject for a in runnable})
    return failures + reports.build_participant_reports(output_dir, labels)


def _provenance_header(run_id: str) -> str:
    """TOML comments: run id, command line and the versions that produced the outputs."""
    from importlib import metadata
    import platform

    versions = [f"qsmprep {__version__}", f"python {platform.python_version()}"]
    for package in ("numpy", "scipy", "nibabel", "nipype", "pybids", "numba", "scikit-image"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    command = " ".join(sys.argv) if sys.argv and sys.argv[0] else "qsmprep"
    return (f"# qsmprep run {run_id}; reproduce with: qsmprep <bids_dir> <output_dir> "
            f"participant --config-file <this file>\n# command: {command}\n"
            f"# versions: {', '.join(versions)}\n\n")


def _crash_summary(crash_dir: Path, since: float) -> list[tuple[str, str]]:
    """(node, last error line) of the crash files written since ``since`` (epoch s)."""
    summary = []
    for path in sorted(crash_dir.glob("crash-*.txt")):
        try:
            if path.stat().st_mtime < since - 1:
                continue
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        node = next((line.split(":", 1)[1].strip() for line in lines
                     if line.startswith("Node:")), path.name)
        errors = [line.strip() for line in lines
                  if re.match(r"\s*[A-Za-z_][\w.]*(Error|Exception)\b.*:", line)]
        message = errors[-1] if errors else "see " + str(path)
        message = re.sub(r"^[\w.]*\.(?=\w+:)", "", message)  # module path of the class
        summary.append((node, message))
    return summary


def _configure_nipype(config: Config, crash_dir: Path, run_id: str) -> None:
    from nipype import config as nipype_config

    nipype_config.update_config({
        "execution": {
            "crashdump_dir": str(crash_dir),
            "crashfile_format": "txt",
            "stop_on_first_crash": config.execution.stop_on_first_crash,
            "remove_unnecessary_outputs": False,
            "hash_method": "content",
            "check_version": False,
            # nipype waits this long between scheduling rounds (default 2 s: ~15 s idle per
            # acquisition); batch plugins keep a longer poll in their plugin_args
            "poll_sleep_duration": 0.2,
        },
        "monitoring": {"enabled": config.execution.resource_monitor},
        "logging": {"workflow_level": "INFO" if config.execution.verbosity > 1 else "WARNING"},
    })
    if config.execution.resource_monitor:
        nipype_config.enable_resource_monitor()
    from nipype import logging as nipype_logging

    nipype_logging.update_logging(nipype_config)


def validate_input(bids_dir: Path) -> None:
    """Run ``bids-validator-deno`` on the input; exit 16 on errors (skipped if absent)."""
    executable = shutil.which("bids-validator-deno")
    if executable is None:
        LOGGER.warning("bids-validator-deno is not installed: the input is not validated "
                       "(pip install bids-validator-deno).")
        return
    command = [executable, str(bids_dir), "--ignoreWarnings", "--json"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                                check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        LOGGER.warning("could not run the BIDS validator (%s); continuing.", error)
        return
    if result.returncode == 0:
        return
    issues = _validator_errors(result.stdout)
    raise RunError(f"{bids_dir} is not a valid BIDS dataset:\n  - " + "\n  - ".join(issues)
                   + "\nFix these, or pass --skip-bids-validation.", 16)


def _validator_errors(output: str, limit: int = 10) -> list[str]:
    try:
        issues = json.loads(output)["issues"]["issues"]
    except (ValueError, KeyError, TypeError):
        return [output.strip()[-2000:] or "the validator reported errors"]
    errors = [i for i in issues if i.get("severity") == "error"]
    lines = [f"{i.get('code')}: {i.get('location', '')} {i.get('issueMessage') or ''}".strip()
             for i in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"... and {len(errors) - limit} more")
    return lines or ["the validator reported errors"]


if __name__ == "__main__":
    sys.exit(main())
