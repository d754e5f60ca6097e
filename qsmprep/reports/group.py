"""Group-level figures: scatter with the OLS line and its confidence band, Bland–Altman, and
correlation against the regularisation weight. matplotlib with the Agg backend; every figure
is saved as SVG (deterministic: fixed ``svg.hashsalt``, no date) and PNG."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from qsmprep.analysis import stats

LOGGER = logging.getLogger("qsmprep")

RC = {"svg.hashsalt": "qsmprep", "svg.fonttype": "none", "font.size": 9,
      "axes.spines.top": False, "axes.spines.right": False}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save(figure, path_stem: Path) -> list[Path]:
    """Write ``<stem>.svg`` and ``<stem>.png``; returns both paths."""
    plt = _pyplot()
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for extension, extra in ((".svg", {"metadata": {"Date": None}}),
                             (".png", {"dpi": 120, "metadata": {"Software": None}})):
        target = path_stem.with_suffix(extension)
        with plt.rc_context(RC):  # svg.hashsalt is read at save time (deterministic ids)
            figure.savefig(target, **extra)
        written.append(target)
    plt.close(figure)
    return written


def scatter(x: np.ndarray, y: np.ndarray, groups: Sequence[str], *, xlabel: str, ylabel: str,
            title: str, path_stem: Path, identity: bool = False) -> list[Path]:
    """Scatter of ``y`` against ``x`` coloured by ``groups`` (e.g. ROI), OLS line with its
    95% confidence band (mean response), optional identity line."""
    plt = _pyplot()
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    groups = np.asarray(groups, dtype=object)
    with plt.rc_context(RC):
        figure, axis = plt.subplots(figsize=(4.6, 3.8))
        for name in sorted(set(groups)):
            selection = groups == name
            axis.scatter(x[selection], y[selection], s=18, label=str(name), alpha=0.85)
        keep = np.isfinite(x) & np.isfinite(y)
        if keep.sum() >= 4 and np.ptp(x[keep]) > 0:
            grid = np.linspace(x[keep].min(), x[keep].max(), 100)
            line, low, high = stats.regression_band(x[keep], y[keep], grid)
            axis.fill_between(grid, low, high, color="0.5", alpha=0.25, lw=0,
                              label="95% CI")
            fit = stats.association(x[keep], y[keep])
            axis.plot(grid, line, color="k", lw=1.2,
                      label=f"OLS: slope {fit['slope']:.3g} [{fit['slope_ci_low']:.3g}, "
                      f"{fit['slope_ci_high']:.3g}]\nr = {fit['r']:.2f}, "
                      f"R² = {fit['r2']:.2f}, n = {fit['n']}")
        if identity:
            limits = [np.nanmin([x, y]), np.nanmax([x, y])]
            axis.plot(limits, limits, ls="--", color="0.4", lw=0.8, label="identity")
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=6.5, frameon=False, loc="best")
        figure.tight_layout()
        return save(figure, path_stem)


def bland_altman(a: np.ndarray, b: np.ndarray, *, unit: str, title: str,
                 path_stem: Path) -> list[Path]:
    """Bland–Altman plot: difference ``a - b`` against the mean, with the bias, the 95% limits
    of agreement and their 95% confidence intervals (shaded)."""
    plt = _pyplot()
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    result = stats.bland_altman(a, b)
    mean, difference = (a + b) / 2, a - b
    with plt.rc_context(RC):
        figure, axis = plt.subplots(figsize=(4.6, 3.6))
        axis.scatter(mean, difference, s=14, color="C0", alpha=0.85)
        for name, color in (("bias", "k"), ("loa_low", "C3"), ("loa_high", "C3")):
            axis.axhline(result[name], color=color, lw=1.0, ls="-" if name == "bias" else "--")
            axis.axhspan(result[f"{name}_ci_low"], result[f"{name}_ci_high"], color=color,
                         alpha=0.12, lw=0)
        axis.set_xlabel(f"mean of the pair ({unit})")
        axis.set_ylabel(f"difference ({unit})")
        axis.set_title(f"{title}\nbias {result['bias']:.3g}, LoA [{result['loa_low']:.3g}, "
                       f"{result['loa_high']:.3g}], n = {result['n']}", fontsize=8.5)
        figure.tight_layout()
        return save(figure, path_stem)


def correlation_vs_lambda(lambdas: np.ndarray, r: np.ndarray, low: np.ndarray,
                          high: np.ndarray, *, title: str, path_stem: Path) -> list[Path]:
    """Pearson r (95% CI) against λ on a log axis; the λ with the largest |r| is marked."""
    plt = _pyplot()
    lambdas = np.asarray(lambdas, float)
    r = np.asarray(r, float)
    order = np.argsort(lambdas)
    lambdas, r = lambdas[order], r[order]
    low, high = np.asarray(low, float)[order], np.asarray(high, float)[order]
    best = int(np.nanargmax(np.abs(r)))
    with plt.rc_context(RC):
        figure, axis = plt.subplots(figsize=(4.4, 3.4))
        axis.errorbar(lambdas, r, yerr=[r - low, high - r], marker="o", ms=4, capsize=3,
                      color="C0", lw=1)
        axis.plot(lambdas[best], r[best], marker="*", ms=12, color="C3",
                  label=f"max |r| at λ = {lambdas[best]:g}")
        axis.set_xscale("log")
        axis.set_xlabel("regularisation weight λ")
        axis.set_ylabel("Pearson r with the reference")
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=7, frameon=False)
        figure.tight_layout()
        return save(figure, path_stem)
