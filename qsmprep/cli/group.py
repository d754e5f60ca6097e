"""The group level: study statistics from the participants' derivatives (reads the output
directory's ROI tables, the reference table and participants.tsv; writes ``group/``)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from qsmprep.bids import atomic_write_text
from qsmprep.config import Config
from qsmprep.study_io import (
    StudyInputError,
    parse_lambda_label,
    read_participants,
    read_reference_table,
    read_roi_tables,
)

LOGGER = logging.getLogger("qsmprep")


def _write_table(table, group_dir: Path, name: str, dictionary: dict) -> Path:
    path = group_dir / f"{name}.tsv"
    atomic_write_text(path, table.to_csv(sep="\t", index=False, na_rep="n/a",
                                         float_format="%.6g"))
    described = {c: {"Description": dictionary.get(c, c)} for c in table.columns}
    atomic_write_text(path.with_suffix(".json"), json.dumps(described, indent=2))
    return path


def run_group(config: Config) -> int:
    """Compute and write the study statistics; returns the exit code."""
    from qsmprep.analysis import study

    start = time.monotonic()
    execution, options = config.execution, config.group
    output_dir = Path(execution.output_dir)
    if not output_dir.is_dir():
        raise StudyInputError(f"{output_dir} does not exist: run the participant level into it "
                              "first.", 64)
    rois = read_roi_tables(output_dir)
    if execution.participant_label:
        rois = rois[rois["participant_id"].isin(
            [f"sub-{label}" for label in execution.participant_label])]
        if rois.empty:
            raise StudyInputError("none of the --participant-label participants has ROI "
                                  f"statistics in {output_dir}.", 64)
    participants = read_participants(execution.bids_dir)
    reference = (read_reference_table(options.reference_table)
                 if options.reference_table else None)
    main = rois[rois["map_desc"].map(lambda d: parse_lambda_label(d) is None)]
    group_dir = output_dir / "group"
    dictionaries = study.DICTIONARIES
    written = [_write_table(rois, group_dir, "rois_stats", {})]
    association = None
    if reference is not None:
        known = set(rois["participant_id"])
        unmatched = sorted(set(reference["participant_id"]) - known)
        if unmatched:
            LOGGER.warning("reference rows of %d participant(s) without ROI statistics are "
                           "left out: %s", len(unmatched), ", ".join(unmatched[:10]))
        association = study.association_table(rois, reference)
        written.append(_write_table(association, group_dir, "association",
                                    dictionaries["association"]))
        sweep = study.lambda_sweep_table(association, parse=parse_lambda_label)
        if not sweep.empty:
            written.append(_write_table(sweep, group_dir, "lambda_sweep",
                                        dictionaries["lambda_sweep"]))
            for _, row in sweep[sweep["is_best"] & (sweep["statistic"] == "mean")
                                & (sweep["roi"] == study.POOLED)].iterrows():
                LOGGER.info("lambda sweep: |r| with %s is largest at lambda = %g (r = %.3f)",
                            row["measure"], row["lambda"], row["r"])
    else:
        sweep = None
        LOGGER.warning("no --reference-table: association and lambda-sweep analyses skipped.")
    reliability = study.reliability_table(main)
    written.append(_write_table(reliability, group_dir, "reliability",
                                dictionaries["reliability"]))
    groups_table = _groups(main, participants, reference, options)
    if groups_table is not None:
        written.append(_write_table(groups_table, group_dir, "groups", dictionaries["groups"]))
    figures = _figures(main, reference, association, sweep, group_dir / "figures")
    LOGGER.info("group level: %d tables, %d figures in %s (%.1f s)", len(written),
                len(figures), group_dir, time.monotonic() - start)
    return 0


def _groups(rois, participants, reference, options):
    from qsmprep.analysis import study

    explicit = bool(options.group_by or options.group_measure)
    if not explicit and reference is None:
        return None
    try:
        groups, grouping = study.assign_groups(
            participants, reference, group_by=options.group_by, measure=options.group_measure,
            cutoffs=options.group_cutoffs, names=options.group_names)
        return study.group_table(rois, groups, grouping, participants=participants,
                                 covariates=options.covariates)
    except ValueError as error:
        if explicit or options.covariates:
            raise StudyInputError(str(error), 64) from None
        LOGGER.warning("group comparison skipped: %s", error)
        return None


def _figures(rois, reference, association, sweep, folder: Path) -> list[Path]:
    """Scatter per map x reference measure, Bland-Altman per design, correlation vs lambda."""
    from qsmprep.analysis import study
    from qsmprep.reports import group as plots

    written: list[Path] = []

    def attempt(function, *args, **kwargs):
        try:
            written.extend(function(*args, **kwargs))
        except Exception as error:  # a figure never hides the tables
            LOGGER.warning("figure %s failed: %s", kwargs.get("path_stem"), error)

    if reference is not None:
        pairs = study.paired_values(rois, reference, "mean")
        pairs = pairs[pairs["roi"] != study.ALL_ROIS]
        for (suffix, desc, units, measure), data in pairs.groupby(
                ["map", "map_desc", "units", "measure"]):
            unit = data["unit"].iloc[0]
            attempt(plots.scatter, data["value_ref"], data["value"], data["roi"],
                    xlabel=f"{measure} ({unit})", ylabel=f"{suffix} ROI mean ({units})",
                    title=f"{suffix} vs {measure}, all ROIs",
                    path_stem=folder / f"scatter_{suffix}_mean_vs_{measure}")
    for (suffix, desc, units), data in rois.groupby(["map", "map_desc", "units"]):
        raters = sorted(data["rater"].unique())
        if len(raters) > 1:
            wide = data.pivot_table(index=["participant_id", "scan", "roi"], columns="rater",
                                    values="mean").dropna(subset=raters[:2])
            if len(wide) >= 3:
                attempt(plots.bland_altman, wide[raters[0]], wide[raters[1]], unit=units,
                        title=f"{suffix} ROI mean: {raters[0]} - {raters[1]}",
                        path_stem=folder / f"blandaltman_{suffix}_interrater")
        scans = data[["participant_id", "scan"]].drop_duplicates().sort_values(
            ["participant_id", "scan"])
        scans["position"] = scans.groupby("participant_id").cumcount() + 1
        data = data.merge(scans, on=["participant_id", "scan"])
        if data["position"].max() > 1:
            rater = raters[0]
            wide = data[data["rater"] == rater].pivot_table(
                index=["participant_id", "roi"], columns="position", values="mean")
            wide = wide.reindex(columns=[1, 2]).dropna()
            if len(wide) >= 3:
                attempt(plots.bland_altman, wide[1], wide[2], unit=units,
                        title=f"{suffix} ROI mean ({rater}): scan 1 - scan 2",
                        path_stem=folder / f"blandaltman_{suffix}_interscan")
    if sweep is not None and not sweep.empty:
        pooled = sweep[(sweep["statistic"] == "mean") & (sweep["roi"] == study.POOLED)]
        for measure, data in pooled.groupby("measure"):
            attempt(plots.correlation_vs_lambda, data["lambda"], data["r"], data["r_ci_low"],
                    data["r_ci_high"], title=f"Chimap ROI mean vs {measure}",
                    path_stem=folder / f"lambda_sweep_{measure}")
    return written
