"""What a run leaves behind for its reports: run configs, the step run-time table, the log
file, crash files. Written by the command line during/after a run, read by the reports."""

from __future__ import annotations

import csv
import io
import logging
import logging.handlers
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

LOGGER = logging.getLogger("qsmprep")

RUNTIME_COLUMNS = ("participant", "acquisition", "step", "start", "duration_s", "peak_mem_gb",
                   "cached")


class RunLogHandler(logging.handlers.MemoryHandler):
    """Keeps the records of a run until its log file is known (:func:`open_run_log`), then
    writes them and every later record to ``logs/qsmprep-<run id>.log`` (the source of the
    warnings in the reports). Records of a run that never opens a file are dropped."""

    FORMAT = "%(asctime)s | %(levelname)-7s | %(name)s | %(message)s"

    def __init__(self) -> None:
        super().__init__(capacity=1_000_000, flushLevel=logging.CRITICAL + 10, target=None,
                         flushOnClose=False)
        self.setLevel(logging.INFO)

    def shouldFlush(self, record: logging.LogRecord) -> bool:  # noqa: N802 - logging API
        return self.target is not None

    def open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        target = logging.FileHandler(path, encoding="utf-8")
        target.setFormatter(logging.Formatter(self.FORMAT, "%y%m%d-%H:%M:%S"))
        self.setTarget(target)
        self.flush()

    def close(self) -> None:
        target = self.target
        super().close()
        if target is not None:
            target.close()


def attach_run_log(logger: logging.Logger) -> RunLogHandler:
    """Start buffering ``logger``'s records for the run's log file."""
    handler = RunLogHandler()
    logger.addHandler(handler)
    return handler


def open_run_log(logger: logging.Logger, path: Path) -> None:
    """Write the buffered and all later records of ``logger`` to ``path``."""
    for handler in logger.handlers:
        if isinstance(handler, RunLogHandler) and handler.target is None:
            handler.open(Path(path))


def detach_run_log(logger: logging.Logger, handler: RunLogHandler) -> None:
    """Stop logging to the run's file (end of :func:`qsmprep.cli.run.main`)."""
    logger.removeHandler(handler)
    handler.close()


def workflow_folder(acquisition_name: str) -> str:
    """The work-dir folder of an acquisition's workflow (as ``workflows.base`` names it)."""
    return re.sub(r"[^A-Za-z0-9]", "_", acquisition_name) + "_wf"


def write_runtime_log(work_dir: Path, path: Path, acquisitions: dict[str, str],
                      since: float) -> int:
    """Tabulate the nipype run time of every step of ``acquisitions`` (name -> participant
    label) from the result files in ``work_dir/qsmprep_wf``; write ``path`` (TSV).

    ``cached`` is 1 for steps whose result predates ``since`` (epoch s: reused from an
    earlier run). Returns the number of rows.
    """
    from nipype.utils.filemanip import loadpkl

    from qsmprep.bids import atomic_write_text

    root = Path(work_dir) / "qsmprep_wf"
    rows = []
    for name, participant in sorted(acquisitions.items()):
        folder = root / workflow_folder(name)
        if not folder.is_dir():
            continue
        for result_file in sorted(folder.rglob("result_*.pklz")):
            try:
                result = loadpkl(result_file)
                runtime = result.runtime
                if isinstance(runtime, list):  # MapNode: one runtime per item
                    runtime = runtime[0]
                duration = float(getattr(runtime, "duration", float("nan")))
                start = str(getattr(runtime, "startTime", ""))
                peak = getattr(runtime, "mem_peak_gb", None)
            except Exception as error:  # unreadable result: skip the row, keep the rest
                LOGGER.debug("cannot read %s: %s", result_file, error)
                continue
            step = ".".join(result_file.parent.relative_to(folder).parts)
            cached = int(result_file.stat().st_mtime < since - 1)
            rows.append((participant, name, step, start, f"{duration:.3f}",
                         "" if peak is None else f"{float(peak):.3f}", cached))
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(RUNTIME_COLUMNS)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
    return len(rows)


@dataclass
class RunRecord:
    """One participant-level run as recorded in ``logs/``."""

    run_id: str
    config_file: Path
    config: dict
    command: str = ""
    versions: list[str] = field(default_factory=list)

    @property
    def workflow(self) -> dict:
        return self.config.get("workflow", {})

    def covers(self, participant: str) -> bool:
        labels = self.config.get("execution", {}).get("participant_label") or []
        return not labels or participant in labels


def run_records(output_dir: Path) -> list[RunRecord]:
    """Participant-level runs in ``logs/config-<run id>.toml``, newest first."""
    records = []
    for path in sorted((Path(output_dir) / "logs").glob("config-*.toml"), reverse=True):
        try:
            text = path.read_text()
            config = tomllib.loads(text)
        except (OSError, tomllib.TOMLDecodeError) as error:
            LOGGER.warning("cannot read the run configuration %s: %s", path, error)
            continue
        if config.get("execution", {}).get("analysis_level", "participant") != "participant":
            continue
        command = versions = None
        for line in text.splitlines():
            if line.startswith("# command:"):
                command = line.split(":", 1)[1].strip()
            elif line.startswith("# versions:"):
                versions = [v.strip() for v in line.split(":", 1)[1].split(",")]
        records.append(RunRecord(path.stem[len("config-"):], path, config, command or "",
                                 versions or []))
    return records


def latest_run(output_dir: Path, participant: str) -> RunRecord | None:
    """The newest participant-level run that included ``participant``."""
    return next((r for r in run_records(output_dir) if r.covers(participant)), None)


def read_runtime(output_dir: Path, run_id: str, participant: str) -> list[dict[str, str]]:
    """Rows of ``logs/runtime-<run id>.tsv`` for ``participant`` (empty if not recorded)."""
    path = Path(output_dir) / "logs" / f"runtime-{run_id}.tsv"
    if not path.exists():
        return []
    with path.open(newline="") as stream:
        return [row for row in csv.DictReader(stream, delimiter="\t")
                if row.get("participant") == participant]


def log_messages(output_dir: Path, run_id: str, participant: str,
                 levels: tuple[str, ...] = ("WARNING", "ERROR")) -> list[tuple[str, str]]:
    """(level, message) of ``logs/qsmprep-<run id>.log`` lines at ``levels`` that name
    ``sub-<participant>`` or no participant at all (run-wide messages)."""
    path = Path(output_dir) / "logs" / f"qsmprep-{run_id}.log"
    if not path.exists():
        return []
    own = re.compile(rf"sub-{re.escape(participant)}(?![A-Za-z0-9])")
    messages: list[tuple[str, str]] = []
    current: list[str] | None = None
    for line in path.read_text(errors="replace").splitlines():
        match = re.match(r"^\S+ \| (\w+)\s*\| [\w.]+ \| (.*)$", line)
        if match:
            current = None
            level, message = match.groups()
            if level in levels:
                current = [level, message]
                messages.append(current)  # type: ignore[arg-type]
        elif current is not None:  # continuation line of a multi-line message
            current[1] += "\n" + line
    kept = []
    for level, message in messages:
        if own.search(message) or not re.search(r"sub-[A-Za-z0-9]+", message):
            kept.append((level, message))
    return kept


@dataclass
class Crash:
    """A nipype crash file: the failed node, its last error line and the traceback."""

    path: Path
    node: str
    message: str
    text: str


def crashes(output_dir: Path, participant: str, since: float | None = None) -> list[Crash]:
    """Crash files in ``logs/crash`` of ``participant``'s nodes (newer than ``since``)."""
    out = []
    pattern = re.compile(rf"(^|\.)sub_{re.escape(participant)}(_|\.)")
    for path in sorted((Path(output_dir) / "logs" / "crash").glob("crash-*")):
        try:
            if since is not None and path.stat().st_mtime < since - 1:
                continue
            text = path.read_text(errors="replace")
        except OSError:
            continue
        node = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                     if line.startswith("Node:")), path.name)
        if not pattern.search(node):
            continue
        errors = [line.strip() for line in text.splitlines()
                  if re.match(r"\s*[A-Za-z_][\w.]*(Error|Exception)\b.*:", line)]
        out.append(Crash(path, node, errors[-1] if errors else "see the crash file", text))
    return out
