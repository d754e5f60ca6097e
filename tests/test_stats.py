"""Study statistics against published worked examples and independent implementations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from qsmprep.analysis import stats

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges
SHROUT_FLEISS = np.array([
    [9, 2, 5, 8],
    [6, 1, 3, 2],
    [8, 4, 6, 8],
    [7, 1, 2, 6],
    [10, 5, 6, 9],
    [6, 2, 4, 7],
], dtype=float)


def test_icc_shrout_fleiss_table():
    result = stats.icc(SHROUT_FLEISS)
    # published values (Shrout & Fleiss 1979, Table 4): ICC(2,1) = .29, ICC(3,1) = .71
    assert result["icc2_1"] == pytest.approx(0.29, abs=0.005)
    assert result["icc3_1"] == pytest.approx(0.71, abs=0.005)
    # their ANOVA table (Table 3): BMS 11.24, JMS 32.49, EMS 1.02
    assert result["ms_targets"] == pytest.approx(11.24, abs=0.005)
    assert result["ms_raters"] == pytest.approx(32.49, abs=0.005)
    assert result["ms_error"] == pytest.approx(1.02, abs=0.005)


def _pingouin_icc(ratings):
    pingouin = pytest.importorskip("pingouin")
    n, k = ratings.shape
    frame = pd.DataFrame({"target": np.repeat(np.arange(n), k),
                          "rater": np.tile(np.arange(k), n), "score": ratings.ravel()})
    previous = dict(pingouin.options)
    pingouin.options.update({"round": None, "round.column.CI95": None})  # full precision
    try:
        table = pingouin.intraclass_corr(frame, targets="target", raters="rater",
                                         ratings="score").set_index("Type")
    finally:
        pingouin.options.update(previous)
    return table


@pytest.mark.parametrize("seed", [0, 1])
def test_icc_matches_pingouin(seed):
    rng = np.random.default_rng(seed)
    truth = rng.normal(0, 1, 15)
    ratings = truth[:, None] + rng.normal([0.0, 0.3, -0.1], 0.4, (15, 3))
    ours = stats.icc(ratings)
    for data in (ratings, SHROUT_FLEISS):
        ours = stats.icc(data)
        reference = _pingouin_icc(data)
        for key, names in (("icc2_1", ("ICC(A,1)", "ICC2")), ("icc3_1", ("ICC(C,1)", "ICC3"))):
            model = next(name for name in names if name in reference.index)  # pingouin < 0.7
            assert ours[key] == pytest.approx(reference.loc[model, "ICC"], abs=1e-9)
            low, high = reference.loc[model, "CI95"]
            assert ours[f"{key}_ci_low"] == pytest.approx(low, abs=1e-6)
            assert ours[f"{key}_ci_high"] == pytest.approx(high, abs=1e-6)
        assert ours["f"] == pytest.approx(reference.loc[model, "F"], rel=1e-9)
        assert ours["f_p"] == pytest.approx(reference.loc[model, "pval"], rel=1e-6, abs=1e-12)


def test_icc_interval_coverage():
    """The McGraw-Wong intervals cover the true ICC about 95% of the time."""
    rng = np.random.default_rng(3)
    n, k, trials = 20, 2, 400
    sigma_t, sigma_e, bias = 1.0, 0.5, np.array([0.0, 0.2])
    true3 = sigma_t ** 2 / (sigma_t ** 2 + sigma_e ** 2)
    covered3 = covered2 = 0
    for _ in range(trials):
        ratings = rng.normal(0, sigma_t, (n, 1)) + bias + rng.normal(0, sigma_e, (n, k))
        r = stats.icc(ratings)
        covered3 += r["icc3_1_ci_low"] <= true3 <= r["icc3_1_ci_high"]
        # absolute agreement counts the fixed rater offset as disagreement: ICC(2,1) < ICC(3,1)
        covered2 += r["icc2_1_ci_low"] <= true3 + 0.05
    assert 0.91 <= covered3 / trials <= 0.99
    assert covered2 / trials > 0.9


def test_icc_drops_incomplete_rows_and_rejects_bad_input():
    ratings = SHROUT_FLEISS.copy()
    extra = np.vstack([ratings, [np.nan, 1, 2, 3]])
    assert stats.icc(extra)["icc2_1"] == pytest.approx(stats.icc(ratings)["icc2_1"])
    assert stats.icc(extra)["n"] == 6
    with pytest.raises(ValueError, match="2 targets"):
        stats.icc(ratings[:1])
    with pytest.raises(ValueError, match="2D"):
        stats.icc(ratings.ravel())


def test_association_matches_scipy_and_statsmodels():
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(5)
    x = rng.uniform(50, 200, 25)
    y = 0.1 - 0.002 * x + rng.normal(0, 0.03, 25)
    result = stats.association(x, y)
    scipy_r = sps.pearsonr(x, y)
    ci = scipy_r.confidence_interval(0.95)
    assert result["r"] == pytest.approx(scipy_r.statistic, abs=1e-12)
    assert result["r_ci_low"] == pytest.approx(ci.low, abs=1e-9)
    assert result["r_ci_high"] == pytest.approx(ci.high, abs=1e-9)
    assert result["rho"] == pytest.approx(sps.spearmanr(x, y).statistic, abs=1e-12)
    model = sm.OLS(y, sm.add_constant(x)).fit()
    (i_low, i_high), (s_low, s_high) = model.conf_int(0.05)
    assert result["slope"] == pytest.approx(model.params[1], rel=1e-9)
    assert result["intercept"] == pytest.approx(model.params[0], rel=1e-9)
    assert result["slope_ci_low"] == pytest.approx(s_low, rel=1e-7)
    assert result["slope_ci_high"] == pytest.approx(s_high, rel=1e-7)
    assert result["intercept_ci_low"] == pytest.approx(i_low, rel=1e-7)
    assert result["intercept_ci_high"] == pytest.approx(i_high, rel=1e-7)
    assert result["slope_p"] == pytest.approx(model.pvalues[1], rel=1e-6)
    assert result["r2"] == pytest.approx(model.rsquared, rel=1e-9)
    assert result["residual_se"] == pytest.approx(np.sqrt(model.mse_resid), rel=1e-9)
    assert result["rmse"] == pytest.approx(np.sqrt(np.mean(model.resid ** 2)), rel=1e-9)
    # the mean-response band equals statsmodels' prediction interval of the mean
    grid = np.linspace(40, 210, 7)
    line, low, high = stats.regression_band(x, y, grid)
    frame = model.get_prediction(sm.add_constant(grid)).summary_frame(alpha=0.05)
    assert np.allclose(line, frame["mean"], rtol=1e-9)
    assert np.allclose(low, frame["mean_ci_lower"], rtol=1e-7)
    assert np.allclose(high, frame["mean_ci_upper"], rtol=1e-7)


def test_association_ignores_missing_and_rejects_constant():
    x = np.array([1.0, 2.0, 3.0, 4.0, np.nan, 6.0])
    y = np.array([2.0, 4.1, 5.9, 8.2, 1.0, np.nan])
    assert stats.pearson(x, y)["n"] == 4
    with pytest.raises(ValueError, match="constant"):
        stats.pearson(np.ones(5), np.arange(5.0))
    with pytest.raises(ValueError, match="at least 4"):
        stats.pearson([1, 2, 3], [1, 2, 3])


def test_bland_altman_definition_and_coverage():
    a = np.array([10.2, 11.5, 9.8, 12.1, 10.9, 11.0])
    b = np.array([10.0, 11.9, 9.5, 12.0, 10.1, 11.4])
    d = a - b
    result = stats.bland_altman(a, b)
    assert result["bias"] == pytest.approx(d.mean(), abs=1e-12)
    assert result["loa_low"] == pytest.approx(d.mean() - 1.96 * d.std(ddof=1), abs=1e-12)
    assert result["loa_high"] == pytest.approx(d.mean() + 1.96 * d.std(ddof=1), abs=1e-12)
    ttest = sps.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert result["bias_ci_low"] == pytest.approx(ttest.low, abs=1e-12)
    assert result["bias_ci_high"] == pytest.approx(ttest.high, abs=1e-12)
    # coverage of the intervals of the bias and of the upper limit of agreement
    rng = np.random.default_rng(9)
    n, trials, mu, sigma = 30, 2000, 0.5, 2.0
    samples = rng.normal(mu, sigma, (trials, n))
    true_upper = mu + 1.96 * sigma
    hits_bias = hits_loa = 0
    for row in samples:
        r = stats.bland_altman(row, np.zeros(n))
        hits_bias += r["bias_ci_low"] <= mu <= r["bias_ci_high"]
        hits_loa += r["loa_high_ci_low"] <= true_upper <= r["loa_high_ci_high"]
    assert 0.93 <= hits_bias / trials <= 0.97
    assert 0.92 <= hits_loa / trials <= 0.975


def test_classify_qct_thresholds():
    groups = stats.classify([50.0, 79.99, 80.0, 119.9, 120.0, 180.0, np.nan])
    assert groups.tolist() == ["osteoporosis", "osteoporosis", "osteopenia", "osteopenia",
                               "normal", "normal", ""]
    with pytest.raises(ValueError, match="increasing"):
        stats.classify([1.0], cutoffs=(120, 80))
    with pytest.raises(ValueError, match="group names"):
        stats.classify([1.0], cutoffs=(80, 120), names=("a", "b"))


def _three_groups():
    rng = np.random.default_rng(11)
    groups = np.repeat(["normal", "osteopenia", "osteoporosis"], [8, 7, 6])
    age = rng.uniform(30, 80, groups.size)
    shift = {"normal": -0.05, "osteopenia": 0.0, "osteoporosis": 0.04}
    values = np.array([shift[g] for g in groups]) + 0.001 * age + rng.normal(0, 0.02, groups.size)
    return values, groups, age


def test_group_tests_match_scipy_and_statsmodels():
    sm = pytest.importorskip("statsmodels.formula.api")
    values, groups, age = _three_groups()
    anova = stats.anova_oneway(values, groups)
    reference = sps.f_oneway(*[values[groups == g] for g in sorted(set(groups))])
    assert anova["statistic"] == pytest.approx(reference.statistic, rel=1e-9)
    assert anova["p"] == pytest.approx(reference.pvalue, rel=1e-9)
    assert (anova["df1"], anova["df2"]) == (2, 18)
    lev = stats.levene(values, groups)
    assert lev["p"] == pytest.approx(
        sps.levene(*[values[groups == g] for g in sorted(set(groups))], center="mean").pvalue)
    shapiro = stats.shapiro_by_group(values, groups)
    assert [r["group"] for r in shapiro] == ["normal", "osteopenia", "osteoporosis"]
    assert shapiro[0]["p"] == pytest.approx(sps.shapiro(values[groups == "normal"]).pvalue)
    # Bonferroni pairwise on the pooled error = OLS contrasts of the one-way model
    frame = pd.DataFrame({"y": values, "g": groups})
    model = sm.ols("y ~ C(g)", data=frame).fit()
    pairs = {(r["group_a"], r["group_b"]): r for r in stats.bonferroni_pairwise(values, groups)}
    assert len(pairs) == 3
    contrast = model.t_test("C(g)[T.osteopenia] = 0")  # osteopenia - normal
    row = pairs[("normal", "osteopenia")]
    assert row["statistic"] == pytest.approx(-float(np.squeeze(contrast.tvalue)), rel=1e-9)
    assert row["p"] == pytest.approx(float(np.squeeze(contrast.pvalue)), rel=1e-7)
    assert row["p_adjusted"] == pytest.approx(min(1.0, 3 * float(np.squeeze(contrast.pvalue))), rel=1e-7)
    contrast = model.t_test("C(g)[T.osteoporosis] - C(g)[T.osteopenia] = 0")
    row = pairs[("osteopenia", "osteoporosis")]
    assert row["statistic"] == pytest.approx(-float(np.squeeze(contrast.tvalue)), rel=1e-9)


def test_ancova_matches_pingouin():
    pingouin = pytest.importorskip("pingouin")
    values, groups, age = _three_groups()
    frame = pd.DataFrame({"chi": values, "group": groups, "age": age})
    rows = {r["term"]: r for r in stats.ancova(frame, "chi", "group", ["age"])}
    previous = dict(pingouin.options)
    pingouin.options.update({"round": None, "round.column.CI95": None})
    try:
        reference = pingouin.ancova(data=frame, dv="chi", between="group",
                                    covar="age").set_index("Source")
    finally:
        pingouin.options.update(previous)
    p_column = "p_unc" if "p_unc" in reference.columns else "p-unc"
    for term in ("group", "age"):
        assert rows[term]["statistic"] == pytest.approx(reference.loc[term, "F"], rel=1e-6)
        assert rows[term]["p"] == pytest.approx(reference.loc[term, p_column], rel=1e-6)
        assert rows[term]["partial_eta2"] == pytest.approx(reference.loc[term, "np2"], rel=1e-6)
    assert rows["group"]["df2"] == 17
    with pytest.raises(ValueError, match="missing"):
        stats.ancova(frame, "chi", "group", ["height"])


def test_describe_groups():
    values, groups, _ = _three_groups()
    rows = stats.describe_groups(values, groups)
    normal = values[groups == "normal"]
    assert rows[0]["group"] == "normal" and rows[0]["n"] == 8
    assert rows[0]["mean"] == pytest.approx(normal.mean())
    assert rows[0]["sd"] == pytest.approx(normal.std(ddof=1))
