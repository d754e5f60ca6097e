"""Study statistics: association, reliability and group comparison (scipy + statsmodels).

Pure functions on arrays (and, for ANCOVA, a DataFrame); every result is a flat dict so a
list of them is a tidy table. Units: statistics of a quantity keep its unit (slope: unit of
``y`` per unit of ``x``); correlation coefficients, ICCs and p-values are unitless.

Definitions (METHODS.md §7, CONVENTIONS.md §7):

* Pearson r with a Fisher-z confidence interval (z = atanh r ± z_{1-α/2}/√(n-3));
  Spearman ρ; ordinary least squares ``y = intercept + slope·x`` with t-based intervals
  (n-2 degrees of freedom), R², ``rmse`` = √(mean squared residual) and ``residual_se`` =
  √(SSE/(n-2)).
* ICC(2,1) (two-way random effects, absolute agreement, single measures) and ICC(3,1)
  (two-way mixed effects, consistency, single measures) of Shrout & Fleiss (1979) from the
  two-way ANOVA mean squares, with the F-based confidence intervals of McGraw & Wong (1996).
* Bland–Altman: bias = mean(a - b), limits of agreement bias ± 1.96·SD(a - b), a t-based
  interval for the bias and the approximate interval of the limits
  SE = SD·√(1/n + 1.96²/(2(n-1))) (Bland & Altman 1999).
* One-way ANOVA, Bonferroni-corrected pairwise t-tests on the pooled ANOVA error (the SPSS
  post-hoc test), Shapiro–Wilk per group, Levene's test (centred on the mean, as SPSS),
  ANCOVA with type-II sums of squares (statsmodels).
"""

from __future__ import annotations

import itertools
import logging
from typing import Sequence

import numpy as np
from scipy import stats as sps

LOGGER = logging.getLogger("qsmprep")

#: The model names printed with every ICC.
ICC_MODELS = {
    "ICC(2,1)": "two-way random effects, absolute agreement, single measures",
    "ICC(3,1)": "two-way mixed effects, consistency, single measures",
}
#: QCT bone mineral density categories (mg/cm³, ACR 2018): < 80, 80–120, ≥ 120.
QCT_CUTOFFS = (80.0, 120.0)
QCT_GROUPS = ("osteoporosis", "osteopenia", "normal")

__all__ = [
    "ICC_MODELS", "QCT_CUTOFFS", "QCT_GROUPS", "ancova", "anova_oneway", "association",
    "bland_altman", "bonferroni_pairwise", "classify", "describe_groups", "icc",
    "levene", "linear_regression", "pearson", "regression_band", "shapiro_by_group",
    "spearman",
]


def _pair(x, y, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y need the same length, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < minimum:
        raise ValueError(f"need at least {minimum} complete pairs, got {int(keep.sum())}")
    return x[keep], y[keep]


def _check_confidence(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return 1.0 - confidence


def pearson(x, y, *, confidence: float = 0.95) -> dict[str, float]:
    """Pearson r, its Fisher-z confidence interval and two-sided p (needs n ≥ 4)."""
    alpha = _check_confidence(confidence)
    x, y = _pair(x, y, 4)
    n = x.size
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        raise ValueError("x or y is constant: the correlation is undefined")
    r, p = sps.pearsonr(x, y)
    r = float(np.clip(r, -1.0, 1.0))
    z = np.arctanh(np.clip(r, -1 + 1e-15, 1 - 1e-15))
    half = sps.norm.ppf(1 - alpha / 2) / np.sqrt(n - 3)
    return {"n": n, "r": r, "r_ci_low": float(np.tanh(z - half)),
            "r_ci_high": float(np.tanh(z + half)), "r_p": float(p)}


def spearman(x, y) -> dict[str, float]:
    """Spearman rank correlation ρ and its two-sided p (t approximation, scipy)."""
    x, y = _pair(x, y, 3)
    rho, p = sps.spearmanr(x, y)
    return {"rho": float(rho), "rho_p": float(p)}


def linear_regression(x, y, *, confidence: float = 0.95) -> dict[str, float]:
    """OLS fit ``y = intercept + slope·x`` with t-based intervals, R², RMSE (needs n ≥ 3)."""
    alpha = _check_confidence(confidence)
    x, y = _pair(x, y, 3)
    n = x.size
    xm, ym = x.mean(), y.mean()
    sxx = np.sum((x - xm) ** 2)
    if sxx == 0:
        raise ValueError("x is constant: the regression slope is undefined")
    slope = np.sum((x - xm) * (y - ym)) / sxx
    intercept = ym - slope * xm
    residual = y - (intercept + slope * x)
    sse = float(np.sum(residual ** 2))
    sst = float(np.sum((y - ym) ** 2))
    dof = n - 2
    s2 = sse / dof if dof > 0 else np.nan
    se_slope = np.sqrt(s2 / sxx)
    se_intercept = np.sqrt(s2 * (1.0 / n + xm ** 2 / sxx))
    t = sps.t.ppf(1 - alpha / 2, dof) if dof > 0 else np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        t_slope = slope / se_slope
        t_intercept = intercept / se_intercept
    return {
        "slope": float(slope), "slope_se": float(se_slope),
        "slope_ci_low": float(slope - t * se_slope), "slope_ci_high": float(slope + t * se_slope),
        "slope_p": float(2 * sps.t.sf(abs(t_slope), dof)) if dof > 0 else np.nan,
        "intercept": float(intercept), "intercept_se": float(se_intercept),
        "intercept_ci_low": float(intercept - t * se_intercept),
        "intercept_ci_high": float(intercept + t * se_intercept),
        "intercept_p": float(2 * sps.t.sf(abs(t_intercept), dof)) if dof > 0 else np.nan,
        "r2": float(1.0 - sse / sst) if sst > 0 else np.nan,
        "rmse": float(np.sqrt(sse / n)),
        "residual_se": float(np.sqrt(s2)),
    }


def regression_band(x, y, grid, *, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray,
                                                                       np.ndarray]:
    """OLS line on ``grid`` with the confidence band of the mean response: (fit, low, high)."""
    alpha = _check_confidence(confidence)
    x, y = _pair(x, y, 3)
    fit = linear_regression(x, y, confidence=confidence)
    grid = np.asarray(grid, dtype=np.float64)
    n = x.size
    line = fit["intercept"] + fit["slope"] * grid
    se = fit["residual_se"] * np.sqrt(1.0 / n + (grid - x.mean()) ** 2
                                      / np.sum((x - x.mean()) ** 2))
    half = sps.t.ppf(1 - alpha / 2, n - 2) * se
    return line, line - half, line + half


def association(x, y, *, confidence: float = 0.95) -> dict[str, float]:
    """Pearson (with CI), Spearman and OLS of ``y`` (a map statistic) on ``x`` (reference)."""
    return {**pearson(x, y, confidence=confidence), **spearman(x, y),
            **linear_regression(x, y, confidence=confidence)}


def _two_way_mean_squares(ratings: np.ndarray) -> tuple[float, float, float, int, int]:
    n, k = ratings.shape
    grand = ratings.mean()
    ss_rows = k * np.sum((ratings.mean(axis=1) - grand) ** 2)
    ss_cols = n * np.sum((ratings.mean(axis=0) - grand) ** 2)
    ss_error = np.sum((ratings - grand) ** 2) - ss_rows - ss_cols
    msr = ss_rows / (n - 1)
    msc = ss_cols / (k - 1)
    mse = ss_error / ((n - 1) * (k - 1))
    return float(msr), float(msc), float(mse), n, k


def icc(ratings, *, confidence: float = 0.95) -> dict[str, float]:
    """ICC(2,1) and ICC(3,1) with McGraw & Wong confidence intervals.

    ``ratings``: array [targets, raters] (e.g. participants × observers, or ROIs × scans);
    rows with a missing value are dropped (complete cases; ``n`` reports how many remain).
    Needs n ≥ 2 targets and k ≥ 2 raters. Returns ``n``, ``k``, the mean squares, the F test
    of the targets (``f``, ``df1``, ``df2``, ``f_p``) and for each model its value and
    interval (``icc2_1``, ``icc2_1_ci_low``, ``icc2_1_ci_high``, ``icc3_1``, ...).
    """
    alpha = _check_confidence(confidence)
    ratings = np.asarray(ratings, dtype=np.float64)
    if ratings.ndim != 2:
        raise ValueError(f"ratings must be a 2D array [targets, raters], got {ratings.shape}")
    ratings = ratings[np.all(np.isfinite(ratings), axis=1)]
    n, k = ratings.shape
    if n < 2 or k < 2:
        raise ValueError(f"ICC needs at least 2 targets and 2 raters with complete ratings, "
                         f"got {n} x {k}")
    msr, msc, mse, n, k = _two_way_mean_squares(ratings)
    df1, df2 = n - 1, (n - 1) * (k - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        icc3 = (msr - mse) / (msr + (k - 1) * mse)
        icc2 = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
        f_rows = msr / mse
        # ICC(3,1): McGraw & Wong case 3 (consistency)
        f_low = f_rows / sps.f.ppf(1 - alpha / 2, df1, df2)
        f_high = f_rows * sps.f.ppf(1 - alpha / 2, df2, df1)
        icc3_low = (f_low - 1) / (f_low + k - 1)
        icc3_high = (f_high - 1) / (f_high + k - 1)
        # ICC(2,1): McGraw & Wong case 2A (absolute agreement), Satterthwaite degrees
        a = k * icc2 / (n * (1 - icc2))
        b = 1 + k * icc2 * (n - 1) / (n * (1 - icc2))
        v = (a * msc + b * mse) ** 2 / ((a * msc) ** 2 / (k - 1) + (b * mse) ** 2 / df2)
        f_star = sps.f.ppf(1 - alpha / 2, df1, v)
        f_star2 = sps.f.ppf(1 - alpha / 2, v, df1)
        icc2_low = n * (msr - f_star * mse) / (
            f_star * (k * msc + (k * n - k - n) * mse) + n * msr)
        icc2_high = n * (f_star2 * msr - mse) / (
            k * msc + (k * n - k - n) * mse + n * f_star2 * msr)
    return {
        "n": n, "k": k, "ms_targets": msr, "ms_raters": msc, "ms_error": mse,
        "f": float(f_rows), "df1": df1, "df2": df2, "f_p": float(sps.f.sf(f_rows, df1, df2)),
        "icc2_1": float(icc2), "icc2_1_ci_low": float(icc2_low),
        "icc2_1_ci_high": float(icc2_high),
        "icc3_1": float(icc3), "icc3_1_ci_low": float(icc3_low),
        "icc3_1_ci_high": float(icc3_high),
    }


def bland_altman(a, b, *, confidence: float = 0.95, limits_z: float = 1.96) -> dict[str, float]:
    """Bland–Altman agreement of paired measurements ``a`` and ``b`` (same unit; needs n ≥ 3).

    Differences are ``a - b``. Returns ``n``, ``bias`` with its t interval, ``sd_diff``,
    ``loa_low``/``loa_high`` = bias ∓ ``limits_z``·SD with their approximate intervals, and
    the mean of the pairs' means (``mean_of_means``).
    """
    alpha = _check_confidence(confidence)
    a, b = _pair(a, b, 3)
    difference = a - b
    n = difference.size
    bias = float(difference.mean())
    sd = float(difference.std(ddof=1))
    t = sps.t.ppf(1 - alpha / 2, n - 1)
    se_bias = sd / np.sqrt(n)
    se_loa = sd * np.sqrt(1.0 / n + limits_z ** 2 / (2.0 * (n - 1)))
    low, high = bias - limits_z * sd, bias + limits_z * sd
    return {
        "n": n, "bias": bias, "bias_ci_low": float(bias - t * se_bias),
        "bias_ci_high": float(bias + t * se_bias), "sd_diff": sd,
        "loa_low": float(low), "loa_low_ci_low": float(low - t * se_loa),
        "loa_low_ci_high": float(low + t * se_loa),
        "loa_high": float(high), "loa_high_ci_low": float(high - t * se_loa),
        "loa_high_ci_high": float(high + t * se_loa),
        "mean_of_means": float(((a + b) / 2).mean()),
    }


def classify(values, cutoffs: Sequence[float] = QCT_CUTOFFS,
             names: Sequence[str] = QCT_GROUPS) -> np.ndarray:
    """Group names from thresholds: ``values < cutoffs[0]`` → ``names[0]``, ...,
    ``values ≥ cutoffs[-1]`` → ``names[-1]`` (default: QCT BMD in mg/cm³ → osteoporosis,
    osteopenia, normal). Non-finite values give ``""``."""
    cutoffs = np.asarray(cutoffs, dtype=np.float64)
    if cutoffs.ndim != 1 or cutoffs.size < 1 or np.any(np.diff(cutoffs) <= 0):
        raise ValueError(f"cutoffs must be strictly increasing numbers, got {cutoffs.tolist()}")
    if len(names) != cutoffs.size + 1:
        raise ValueError(f"{cutoffs.size} cutoffs need {cutoffs.size + 1} group names, got "
                         f"{len(names)}")
    values = np.asarray(values, dtype=np.float64)
    index = np.digitize(values, cutoffs, right=False)
    out = np.asarray(names, dtype=object)[index]
    out[~np.isfinite(values)] = ""
    return out


def _groups(values, groups) -> tuple[list[str], list[np.ndarray]]:
    values = np.asarray(values, dtype=np.float64).ravel()
    groups = np.asarray(groups, dtype=object).ravel()
    if values.shape != groups.shape:
        raise ValueError("values and groups need the same length")
    keep = np.isfinite(values) & np.array([g not in ("", None) and g == g for g in groups])
    names = sorted({str(g) for g in groups[keep]})
    labels = groups[keep].astype(str)
    return names, [values[keep][labels == name] for name in names]


def describe_groups(values, groups) -> list[dict]:
    """n, mean, SD (ddof 1), median, min, max per group (groups sorted by name)."""
    names, samples = _groups(values, groups)
    return [{"group": name, "n": s.size, "mean": float(s.mean()),
             "sd": float(s.std(ddof=1)) if s.size > 1 else np.nan,
             "median": float(np.median(s)), "min": float(s.min()), "max": float(s.max())}
            for name, s in zip(names, samples)]


def shapiro_by_group(values, groups) -> list[dict]:
    """Shapiro–Wilk W and p per group (NaN where a group has fewer than 3 values)."""
    names, samples = _groups(values, groups)
    rows = []
    for name, s in zip(names, samples):
        if s.size >= 3 and np.ptp(s) > 0:
            w, p = sps.shapiro(s)
        else:
            w, p = np.nan, np.nan
        rows.append({"group": name, "n": s.size, "statistic": float(w), "p": float(p)})
    return rows


def levene(values, groups) -> dict[str, float]:
    """Levene's test of equal variances (absolute deviations from the group means)."""
    names, samples = _groups(values, groups)
    if len(samples) < 2:
        raise ValueError("Levene's test needs at least 2 groups")
    statistic, p = sps.levene(*samples, center="mean")
    n = sum(s.size for s in samples)
    return {"statistic": float(statistic), "df1": len(samples) - 1, "df2": n - len(samples),
            "p": float(p)}


def anova_oneway(values, groups) -> dict[str, float]:
    """One-way ANOVA F, degrees of freedom, p, η² and the pooled error mean square."""
    names, samples = _groups(values, groups)
    if len(samples) < 2 or any(s.size < 1 for s in samples):
        raise ValueError("one-way ANOVA needs at least 2 non-empty groups")
    n = sum(s.size for s in samples)
    k = len(samples)
    if n <= k:
        raise ValueError("one-way ANOVA needs more observations than groups")
    statistic, p = sps.f_oneway(*samples)
    grand = np.concatenate(samples).mean()
    ss_between = sum(s.size * (s.mean() - grand) ** 2 for s in samples)
    ss_within = sum(np.sum((s - s.mean()) ** 2) for s in samples)
    return {"statistic": float(statistic), "df1": k - 1, "df2": n - k, "p": float(p),
            "eta2": float(ss_between / (ss_between + ss_within)),
            "ms_error": float(ss_within / (n - k))}


def bonferroni_pairwise(values, groups) -> list[dict]:
    """Pairwise mean differences with t-tests on the pooled ANOVA error, Bonferroni-adjusted.

    ``p_adjusted`` = min(1, p × number of pairs); ``difference`` = mean(group_a) -
    mean(group_b) with its Bonferroni-adjusted 95% interval.
    """
    names, samples = _groups(values, groups)
    anova = anova_oneway(values, groups)
    mse, dof = anova["ms_error"], anova["df2"]
    pairs = list(itertools.combinations(range(len(names)), 2))
    m = len(pairs)
    t_crit = sps.t.ppf(1 - 0.05 / (2 * m), dof)
    rows = []
    for i, j in pairs:
        a, b = samples[i], samples[j]
        difference = a.mean() - b.mean()
        se = np.sqrt(mse * (1.0 / a.size + 1.0 / b.size))
        t = difference / se
        p = 2 * sps.t.sf(abs(t), dof)
        rows.append({"group_a": names[i], "group_b": names[j], "difference": float(difference),
                     "difference_ci_low": float(difference - t_crit * se),
                     "difference_ci_high": float(difference + t_crit * se),
                     "statistic": float(t), "df": dof, "p": float(p),
                     "p_adjusted": float(min(1.0, p * m))})
    return rows


def ancova(frame, value: str, group: str, covariates: Sequence[str]) -> list[dict]:
    """ANCOVA ``value ~ C(group) + covariates`` (statsmodels OLS, type-II sums of squares).

    ``frame``: a pandas DataFrame with the named columns (numeric covariates; categorical
    ones are used as factors). One row per term: F, df1 (term), df2 (residual), p and
    partial η².
    """
    import pandas as pd
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    columns = [value, group, *covariates]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"ANCOVA columns {missing} are missing; available: "
                         f"{', '.join(map(str, frame.columns))}")
    data = frame[columns].dropna().copy()
    data.columns = [f"v{i}" for i in range(len(columns))]
    terms = ["C(v1)"]
    for i, name in enumerate(covariates, start=2):
        column = data[f"v{i}"]
        numeric = pd.to_numeric(column, errors="coerce")
        if numeric.notna().all():
            data[f"v{i}"] = numeric.astype(float)
            terms.append(f"v{i}")
        else:
            terms.append(f"C(v{i})")
    if data["v1"].nunique() < 2:
        raise ValueError("ANCOVA needs at least 2 groups")
    data["v0"] = pd.to_numeric(data["v0"], errors="raise").astype(float)
    model = smf.ols("v0 ~ " + " + ".join(terms), data=data).fit()
    table = anova_lm(model, typ=2)
    names = {"C(v1)": group, **{t: c for t, c in zip(terms[1:], covariates)}}
    residual_ss = float(table.loc["Residual", "sum_sq"])
    rows = []
    for term in terms:
        ss = float(table.loc[term, "sum_sq"])
        rows.append({"term": names[term], "statistic": float(table.loc[term, "F"]),
                     "df1": float(table.loc[term, "df"]), "df2": float(model.df_resid),
                     "p": float(table.loc[term, "PR(>F)"]),
                     "partial_eta2": ss / (ss + residual_ss)})
    return rows
