"""Reports: per-participant HTML pages with figures, the group page, methods boilerplate.

Pages are assembled after a run from the written derivatives, sidecars and logs
(``--reports-only`` rebuilds them); figures are deterministic SVG (group figures also PNG).
A report that fails is logged and counted (:data:`EXIT_REPORT_FAILED`); it never removes or
hides the maps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from .boilerplate import collect_descriptions, write_citation_files
from .participant import build_participant_report, participants_with_outputs

LOGGER = logging.getLogger("qsmprep")

#: Exit code when every map was written but a report (page, figure, boilerplate) failed.
EXIT_REPORT_FAILED = 3

__all__ = ["EXIT_REPORT_FAILED", "build_group_page", "build_participant_reports",
           "build_participant_report", "collect_descriptions", "participants_with_outputs",
           "write_citation_files"]


def build_participant_reports(output_dir: Path, participants: Iterable[str]) -> int:
    """Build ``sub-<label>.html`` for each participant; returns the number of failures
    (a page that could not be written, or a figure/summary missing from it)."""
    failures = 0
    for label in participants:
        try:
            result = build_participant_report(output_dir, label)
        except Exception:  # a report never stops the others nor hides results
            LOGGER.exception("the report of sub-%s could not be built", label)
            failures += 1
            continue
        for failure in result.failures:
            LOGGER.error("report of sub-%s: %s", label, failure)
        failures += len(result.failures)
        LOGGER.info("report: %s (%d figures)", result.html, len(result.figures))
    return failures


def build_group_page(output_dir: Path) -> int:
    """Build ``group/index.html``; returns the number of failures."""
    from .group_page import build_group_report

    try:
        result = build_group_report(output_dir)
    except Exception:
        LOGGER.exception("the group report could not be built")
        return 1
    for failure in result.failures:
        LOGGER.error("group report: %s", failure)
    LOGGER.info("group report: %s", result.html)
    return len(result.failures)
