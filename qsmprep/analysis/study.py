"""Study designs on tidy ROI tables: association with a reference, reliability between raters
and scans, group comparison and the regularisation sweep (pure functions on DataFrames).

Input: the long ROI table of the participant level (one row per participant × scan × map ×
rater × ROI, columns of :data:`qsmprep.interfaces.roi.COLUMNS`), a reference table
(``participant_id``, optional ``session``, ``roi``, ``measure``, ``value``, ``unit``) and
``participants.tsv``. Every output is a tidy DataFrame (one row per comparison) whose columns
are described in :data:`DICTIONARIES`. Missing raters, scans, ROIs or participants reduce the
``n`` of a comparison (complete cases); comparisons with too few pairs are reported with a
``note`` instead of numbers — never an exception.

Conventions: a map is identified by ``map`` (suffix) and ``map_desc`` (``n/a``, or e.g.
``lambda0p0002`` for a λ-sweep map). The association regresses the map statistic (``y``) on
the reference (``x``): slope in map units per reference unit. Per participant × ROI the map
statistic is averaged over raters and scans (over scans of the same session when the
reference has sessions). "pooled" rows use every participant × ROI pair together.
"""

from __future__ import annotations

import itertools
import logging
from typing import Sequence

import numpy as np
import pandas as pd

from qsmprep.analysis import stats

LOGGER = logging.getLogger("qsmprep")

NA = "n/a"
POOLED = "pooled"
ALL_ROIS = "all"  # reference rows with roi n/a/all relate to the participant's ROI mean
STATISTICS = ("mean", "median", "min", "max", "p5", "p95")
KEYS = ["map", "map_desc", "units"]

_ASSOCIATION_DICT = {
    "map": "Map suffix", "map_desc": "desc of the map (n/a, or lambda<value>)",
    "units": "Unit of the map", "statistic": "ROI statistic of the map (mean, p95, ...)",
    "measure": "Reference measure", "reference_unit": "Unit of the reference measure",
    "roi": "ROI, or 'pooled' (all ROIs together)", "n": "Pairs used",
    "r": "Pearson correlation", "r_ci_low": "95% CI of r (Fisher z), lower",
    "r_ci_high": "95% CI of r, upper", "r_p": "Two-sided p of r",
    "rho": "Spearman rank correlation", "rho_p": "Two-sided p of rho",
    "slope": "OLS slope of the map statistic on the reference (map unit per reference unit)",
    "slope_se": "Standard error of the slope", "slope_ci_low": "95% CI of the slope, lower",
    "slope_ci_high": "95% CI of the slope, upper", "slope_p": "Two-sided p of the slope",
    "intercept": "OLS intercept (map unit)", "intercept_se": "Standard error of the intercept",
    "intercept_ci_low": "95% CI of the intercept, lower",
    "intercept_ci_high": "95% CI of the intercept, upper",
    "intercept_p": "Two-sided p of the intercept", "r2": "Coefficient of determination",
    "rmse": "Root mean squared residual (map unit)",
    "residual_se": "Residual standard error sqrt(SSE/(n-2)) (map unit)",
    "note": "Why a comparison has no numbers",
}
_RELIABILITY_DICT = {
    "design": "inter-rater (same scan, two raters) or inter-scan (same rater, two scans)",
    "map": "Map suffix", "map_desc": "desc of the map", "units": "Unit of the map",
    "statistic": "ROI statistic compared", "roi": "ROI, or 'pooled'",
    "rater": "Rater (inter-scan design)", "scan": "Scan (inter-rater design; 'all': every scan)",
    "a": "First of the pair (rater, or scan position 1 = first scan by label)",
    "b": "Second of the pair", "n": "Complete pairs (targets)",
    "n_incomplete": "Targets with only one of the pair (left out)",
    "icc2_1": "ICC(2,1): two-way random effects, absolute agreement, single measures",
    "icc2_1_ci_low": "95% CI of ICC(2,1) (McGraw & Wong), lower",
    "icc2_1_ci_high": "95% CI of ICC(2,1), upper",
    "icc3_1": "ICC(3,1): two-way mixed effects, consistency, single measures",
    "icc3_1_ci_low": "95% CI of ICC(3,1) (McGraw & Wong), lower",
    "icc3_1_ci_high": "95% CI of ICC(3,1), upper",
    "f": "F of the targets (MS targets / MS error)", "f_p": "p of F",
    "bias": "Bland-Altman bias mean(a - b) (map unit)", "bias_ci_low": "95% CI of the bias",
    "bias_ci_high": "95% CI of the bias, upper", "sd_diff": "SD of a - b",
    "loa_low": "Lower 95% limit of agreement bias - 1.96 SD",
    "loa_low_ci_low": "95% CI of the lower limit, lower",
    "loa_low_ci_high": "95% CI of the lower limit, upper",
    "loa_high": "Upper 95% limit of agreement bias + 1.96 SD",
    "loa_high_ci_low": "95% CI of the upper limit, lower",
    "loa_high_ci_high": "95% CI of the upper limit, upper",
    "note": "Why a comparison has no numbers",
}
_GROUP_DICT = {
    "map": "Map suffix", "map_desc": "desc of the map", "units": "Unit of the map",
    "statistic": "ROI statistic (participant value: mean over raters, scans)",
    "roi": "ROI, or 'pooled' (participant mean over ROIs)", "grouping": "Source of the groups",
    "test": "descriptives, shapiro, levene, anova, bonferroni or ancova",
    "group": "Group (descriptives, shapiro)", "group_a": "First group (bonferroni)",
    "group_b": "Second group (bonferroni)", "term": "Model term (ancova)",
    "n": "Participants", "mean": "Mean", "sd": "Standard deviation", "median": "Median",
    "min": "Minimum", "max": "Maximum", "statistic_value": "Test statistic (W, F or t)",
    "df1": "Degrees of freedom (numerator / t test)", "df2": "Degrees of freedom (denominator)",
    "p": "p-value", "p_adjusted": "Bonferroni-adjusted p (min(1, p x pairs))",
    "difference": "Mean difference group_a - group_b",
    "difference_ci_low": "Bonferroni-adjusted 95% CI of the difference, lower",
    "difference_ci_high": "Bonferroni-adjusted 95% CI of the difference, upper",
    "effect_size": "eta squared (anova), partial eta squared (ancova)", "note": "Remarks",
}
_SWEEP_DICT = {
    "lambda": "Regularisation weight of the sweep map", "map_desc": "desc of the map",
    "statistic": "ROI statistic", "measure": "Reference measure", "roi": "ROI or 'pooled'",
    "n": "Pairs", "r": "Pearson r with the reference", "r_ci_low": "95% CI of r, lower",
    "r_ci_high": "95% CI of r, upper", "slope": "OLS slope", "r2": "R squared",
    "is_best": "True for the lambda with the largest |r| of this measure/statistic/ROI",
}
DICTIONARIES = {"association": _ASSOCIATION_DICT, "reliability": _RELIABILITY_DICT,
                "groups": _GROUP_DICT, "lambda_sweep": _SWEEP_DICT}


def _safe(function, *args, **kwargs) -> dict:
    try:
        return function(*args, **kwargs)
    except ValueError as error:
        return {"note": str(error)}


def participant_values(rois: pd.DataFrame, statistic: str, *,
                       by_session: bool = False) -> pd.DataFrame:
    """Map statistic per participant [× session] × ROI: mean over raters and scans; also
    ROI ``all`` = the mean over the participant's ROIs. Columns: KEYS, participant_id,
    [session,] roi, value."""
    index = KEYS + ["participant_id"] + (["session"] if by_session else []) + ["roi"]
    table = rois.dropna(subset=[statistic])
    per_roi = table.groupby(index, dropna=False)[statistic].mean().rename("value").reset_index()
    overall = per_roi.groupby(index[:-1], dropna=False)["value"].mean().reset_index()
    overall["roi"] = ALL_ROIS
    return pd.concat([per_roi, overall], ignore_index=True)


def paired_values(rois: pd.DataFrame, reference: pd.DataFrame, statistic: str) -> pd.DataFrame:
    """Participant [× session] × ROI values of a map statistic (``value``) next to the
    reference (``value_ref``, ``measure``, ``unit``); ROI ``all`` rows pair participant means."""
    by_session = "session" in reference.columns and bool((reference["session"] != NA).any())
    ref = reference.rename(columns={"value": "value_ref"}).copy()
    ref["roi"] = ref["roi"].replace({NA: ALL_ROIS})
    join = ["participant_id"] + (["session"] if by_session else []) + ["roi"]
    ref = ref[join + ["measure", "value_ref", "unit"]]
    values = participant_values(rois, statistic, by_session=by_session)
    return values.merge(ref, on=join, how="inner")


def association_table(rois: pd.DataFrame, reference: pd.DataFrame, *,
                      statistics: Sequence[str] = STATISTICS,
                      confidence: float = 0.95) -> pd.DataFrame:
    """Association of every map statistic with every reference measure, per ROI and pooled."""
    rows = []
    for statistic in statistics:
        merged = paired_values(rois, reference, statistic)
        for key, group in merged.groupby(KEYS + ["measure"], dropna=False):
            unit = group["unit"].dropna().iloc[0] if group["unit"].notna().any() else NA
            base = dict(zip(KEYS + ["measure"], key), statistic=statistic, reference_unit=unit)
            rois_present = sorted(r for r in group["roi"].unique() if r != ALL_ROIS)
            selections = [(roi, group["roi"] == roi) for roi in rois_present]
            if ALL_ROIS in set(group["roi"]):
                selections.append((ALL_ROIS, group["roi"] == ALL_ROIS))
            if len(rois_present) > 1:
                selections.append((POOLED, group["roi"] != ALL_ROIS))
            for roi, selection in selections:
                subset = group[selection]
                result = _safe(stats.association, subset["value_ref"].to_numpy(float),
                               subset["value"].to_numpy(float), confidence=confidence)
                rows.append({**base, "roi": roi, "n": int(len(subset)), **result})
    return pd.DataFrame(rows).reindex(columns=list(_ASSOCIATION_DICT))


def _pair_rows(wide: pd.DataFrame, a, b, confidence: float) -> dict:
    pair = wide[[a, b]]
    complete = pair.dropna()
    row = {"n": int(len(complete)), "n_incomplete": int(pair.notna().sum(axis=1).eq(1).sum())}
    icc = _safe(stats.icc, complete.to_numpy(float), confidence=confidence)
    agreement = _safe(stats.bland_altman, complete[a].to_numpy(float),
                      complete[b].to_numpy(float), confidence=confidence)
    notes = [d.pop("note") for d in (icc, agreement) if "note" in d]
    for key in ("n", "k", "ms_targets", "ms_raters", "ms_error", "df1", "df2", "mean_of_means"):
        icc.pop(key, None)
        agreement.pop(key, None)
    row.update(icc)
    row.update(agreement)
    if notes:
        row["note"] = "; ".join(dict.fromkeys(notes))
    return row


def reliability_table(rois: pd.DataFrame, *, statistics: Sequence[str] = ("mean",),
                      confidence: float = 0.95) -> pd.DataFrame:
    """Inter-rater (per scan pooled over scans) and inter-scan (per rater) ICC(2,1), ICC(3,1)
    and Bland–Altman, per ROI and pooled. Targets: participant × scan × ROI (inter-rater),
    participant × ROI (inter-scan; scans taken in label order: first vs second)."""
    rows = []
    table = rois.copy()
    order = (table[["participant_id", "scan"]].drop_duplicates()
             .sort_values(["participant_id", "scan"]))
    order["scan_position"] = order.groupby("participant_id").cumcount() + 1
    table = table.merge(order, on=["participant_id", "scan"], how="left")
    for statistic in statistics:
        for key, group in table.groupby(KEYS, dropna=False):
            base = dict(zip(KEYS, key), statistic=statistic)
            roi_names = sorted(group["roi"].unique())
            selections = [(roi, group["roi"] == roi) for roi in roi_names]
            if len(roi_names) > 1:
                selections.append((POOLED, pd.Series(True, index=group.index)))
            raters = sorted(r for r in group["rater"].unique())
            for roi, selection in selections:
                subset = group[selection]
                if len(raters) > 1:
                    wide = subset.pivot_table(index=["participant_id", "scan", "roi"],
                                              columns="rater", values=statistic,
                                              aggfunc="mean")
                    for a, b in itertools.combinations(raters, 2):
                        rows.append({"design": "inter-rater", **base, "roi": roi,
                                     "rater": NA, "scan": "all", "a": a, "b": b,
                                     **_pair_rows(wide.reindex(columns=raters), a, b,
                                                  confidence)})
                if subset["scan_position"].max() > 1:
                    for rater in raters:
                        mine = subset[subset["rater"] == rater]
                        wide = mine.pivot_table(index=["participant_id", "roi"],
                                                columns="scan_position", values=statistic,
                                                aggfunc="mean").reindex(columns=[1, 2])
                        rows.append({"design": "inter-scan", **base, "roi": roi,
                                     "rater": rater, "scan": NA, "a": "scan1", "b": "scan2",
                                     **_pair_rows(wide.rename(columns={1: "scan1",
                                                                       2: "scan2"}),
                                                  "scan1", "scan2", confidence)})
    return pd.DataFrame(rows).reindex(columns=list(_RELIABILITY_DICT))


def assign_groups(participants: pd.DataFrame | None, reference: pd.DataFrame | None, *,
                  group_by: str | None = None, measure: str | None = None,
                  cutoffs: Sequence[float] = stats.QCT_CUTOFFS,
                  names: Sequence[str] = stats.QCT_GROUPS) -> tuple[pd.Series, str]:
    """Group of every participant (index participant_id) and a description of the grouping:
    the ``group_by`` column of participants.tsv, else ``measure`` of the reference (its mean
    over ROIs and sessions) cut at ``cutoffs``. Raises ValueError naming what is missing."""
    if group_by:
        if participants is None or group_by not in participants.columns:
            available = [] if participants is None else list(participants.columns)
            raise ValueError(f"--group-by {group_by}: no such participants.tsv column "
                             f"(available: {', '.join(map(str, available)) or 'no file'}).")
        groups = participants.set_index("participant_id")[group_by].dropna().astype(str)
        return groups, f"participants.tsv column '{group_by}'"
    if reference is None:
        raise ValueError("groups need --group-by COLUMN or a --reference-table")
    measures = sorted(reference["measure"].dropna().unique())
    if measure is None:
        if len(measures) != 1:
            raise ValueError(f"the reference table has several measures ({', '.join(measures)})"
                             "; choose the one that defines the groups with --group-measure.")
        measure = measures[0]
    if measure not in measures:
        raise ValueError(f"--group-measure {measure} is not in the reference table (measures: "
                         f"{', '.join(measures)}).")
    per_participant = reference[reference["measure"] == measure].groupby(
        "participant_id")["value"].mean()
    labels = stats.classify(per_participant.to_numpy(), cutoffs, names)
    groups = pd.Series(labels, index=per_participant.index, name="group")
    bounds = ", ".join(f"{c:g}" for c in cutoffs)
    return groups[groups != ""], (f"reference '{measure}' (participant mean) cut at {bounds} "
                                  f"into {', '.join(names)}")


def group_table(rois: pd.DataFrame, groups: pd.Series, grouping: str, *,
                participants: pd.DataFrame | None = None,
                covariates: Sequence[str] = (),
                statistics: Sequence[str] = ("mean",)) -> pd.DataFrame:
    """Descriptives, Shapiro–Wilk, Levene, one-way ANOVA, Bonferroni pairs and (with
    ``covariates`` from participants.tsv) ANCOVA of the participant values, per ROI and
    pooled (participant mean over ROIs)."""
    rows = []
    frame_covariates = None
    if covariates:
        if participants is None:
            raise ValueError("covariates need participants.tsv")
        missing = [c for c in covariates if c not in participants.columns]
        if missing:
            raise ValueError(f"--covariates {', '.join(missing)}: not in participants.tsv "
                             f"(available: {', '.join(map(str, participants.columns))}).")
        frame_covariates = participants.set_index("participant_id")[list(covariates)]
    for statistic in statistics:
        values = participant_values(rois, statistic)
        for key, group in values.groupby(KEYS, dropna=False):
            base = dict(zip(KEYS, key), statistic=statistic, grouping=grouping)
            for roi in sorted(group["roi"].unique()):
                subset = group[group["roi"] == roi].set_index("participant_id")
                roi_name = POOLED if roi == ALL_ROIS else roi
                data = subset.join(groups.rename("group"), how="inner")
                head = {**base, "roi": roi_name}
                y, g = data["value"].to_numpy(float), data["group"].to_numpy(object)
                for row in stats.describe_groups(y, g):
                    rows.append({**head, "test": "descriptives", **row})
                for row in stats.shapiro_by_group(y, g):
                    rows.append({**head, "test": "shapiro", "group": row["group"],
                                 "n": row["n"], "statistic_value": row["statistic"],
                                 "p": row["p"]})
                tests = (("levene", stats.levene), ("anova", stats.anova_oneway))
                for name, function in tests:
                    result = _safe(function, y, g)
                    rows.append({**head, "test": name, "n": len(y),
                                 "statistic_value": result.get("statistic"),
                                 "df1": result.get("df1"), "df2": result.get("df2"),
                                 "p": result.get("p"), "effect_size": result.get("eta2"),
                                 "note": result.get("note")})
                pairs = _safe(stats.bonferroni_pairwise, y, g)
                for row in pairs if isinstance(pairs, list) else []:
                    rows.append({**head, "test": "bonferroni", "group_a": row["group_a"],
                                 "group_b": row["group_b"], "statistic_value": row["statistic"],
                                 "df1": row["df"], "p": row["p"],
                                 "p_adjusted": row["p_adjusted"],
                                 "difference": row["difference"],
                                 "difference_ci_low": row["difference_ci_low"],
                                 "difference_ci_high": row["difference_ci_high"]})
                if frame_covariates is not None:
                    frame = data.join(frame_covariates, how="inner").reset_index()
                    try:
                        terms = stats.ancova(frame, "value", "group", list(covariates))
                    except (ValueError, np.linalg.LinAlgError) as error:
                        rows.append({**head, "test": "ancova", "note": str(error)})
                        continue
                    for term in terms:
                        rows.append({**head, "test": "ancova", "term": term["term"],
                                     "n": len(frame), "statistic_value": term["statistic"],
                                     "df1": term["df1"], "df2": term["df2"], "p": term["p"],
                                     "effect_size": term["partial_eta2"]})
    return pd.DataFrame(rows).reindex(columns=list(_GROUP_DICT))


def lambda_sweep_table(association: pd.DataFrame, *, parse) -> pd.DataFrame:
    """Correlation with the reference as a function of λ (rows of ``association`` whose
    ``map_desc`` ``parse`` turns into a λ), with ``is_best`` marking the largest |r| per
    measure × statistic × ROI."""
    table = association.copy()
    table["lambda"] = [parse(str(d)) for d in table["map_desc"]]
    table = table[table["lambda"].notna() & table["r"].notna()]
    if table.empty:
        return pd.DataFrame(columns=list(_SWEEP_DICT))
    table = table.sort_values(["measure", "statistic", "roi", "lambda"])
    best = table.groupby(["map", "measure", "statistic", "roi"])["r"].transform(
        lambda r: r.abs() == r.abs().max())
    table["is_best"] = best.astype(bool)
    return table.reindex(columns=list(_SWEEP_DICT)).reset_index(drop=True)
