"""The group page ``group/index.html``: every statistics table (``group/*.tsv`` with its JSON
data dictionary) and every figure (``group/figures/*.svg``, with its PNG twin) that the group
level wrote, plus links to the participant pages. Built from the files only, so it renders
whatever exists; an unreadable table or a figure without a file is listed as an error."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .html import esc, page

LOGGER = logging.getLogger("qsmprep")

#: Order and captions of the known tables; others follow alphabetically.
TABLES = {
    "association": "Agreement of every map's ROI statistics with the reference measurements "
    "(Pearson r with Fisher-z CI, Spearman ρ, OLS slope with CI, RMSE).",
    "reliability": "Inter-observer and inter-scan reliability (ICC with McGraw–Wong CIs, "
    "Bland–Altman bias and limits of agreement).",
    "groups": "Group comparison (ANOVA, Bonferroni pairwise tests, ANCOVA).",
    "lambda_sweep": "Correlation with the reference against the regularisation weight λ.",
    "rois_stats": "ROI statistics of every participant (input of the tables above).",
}
FIGURE_KINDS = {
    "scatter": "Scatter with the identity and OLS lines and the 95% confidence band",
    "blandaltman": "Bland–Altman plot: bias and 95% limits of agreement",
    "lambda": "Correlation against the regularisation weight λ with 95% CIs",
    "lcurve": "L-curve on log-log axes with the chosen corner",
}
MAX_ROWS = 200


@dataclass
class GroupReport:
    html: Path
    tables: list[Path]
    figures: list[Path]
    failures: list[str]


def _table_html(path: Path, failures: list[str]) -> str:
    try:
        with path.open(newline="") as stream:
            rows = list(csv.reader(stream, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        failures.append(f"table {path.name}: {error}")
        return f'<div class="error">{esc(path.name)} could not be read: {esc(error)}</div>'
    if not rows:
        return f"<p><code>{esc(path.name)}</code> is empty.</p>"
    descriptions = {}
    sidecar = path.with_suffix(".json")
    if sidecar.exists():
        try:
            data = json.loads(sidecar.read_text())
            descriptions = {k: (v.get("Description", "") if isinstance(v, dict) else str(v))
                            for k, v in data.items()}
        except (OSError, ValueError) as error:
            failures.append(f"data dictionary {sidecar.name}: {error}")
    header, body = rows[0], rows[1:]
    head = "".join(f'<th title="{esc(descriptions.get(c, ""))}">{esc(c)}</th>' for c in header)
    lines = []
    for row in body[:MAX_ROWS]:
        cells = []
        for value in row:
            try:
                number = float(value)
                cells.append(f'<td class="num">{esc(f"{number:.4g}")}</td>')
            except ValueError:
                short = value if len(value) <= 60 else value[:57] + "..."
                cells.append(f'<td title="{esc(value)}">{esc(short)}</td>')
        lines.append("<tr>" + "".join(cells) + "</tr>")
    note = (f"<p>First {MAX_ROWS} of {len(body)} rows; the full table is "
            f'<a href="{esc(path.name)}">{esc(path.name)}</a>.</p>' if len(body) > MAX_ROWS
            else f'<p>{len(body)} rows · <a href="{esc(path.name)}">{esc(path.name)}</a>'
            + (f' · <a href="{esc(sidecar.name)}">data dictionary</a>' if sidecar.exists()
               else "") + "</p>")
    return (f'<div class="tablewrap" style="overflow-x: auto; white-space: nowrap">'
            f'<table id="table-{esc(path.stem)}">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table></div>"
            + note)


def _caption(stem: str) -> str:
    kind = next((text for key, text in FIGURE_KINDS.items() if stem.startswith(key)), "")
    words = stem.replace("_", " ")
    return f"{kind}: {words}" if kind else words


def build_group_report(output_dir: Path) -> GroupReport:
    """Write ``group/index.html`` from the files in ``output_dir/group``."""
    from qsmprep import __version__
    from qsmprep.bids import atomic_write_text

    output_dir = Path(output_dir)
    group_dir = output_dir / "group"
    failures: list[str] = []
    tables = sorted(group_dir.glob("*.tsv"),
                    key=lambda p: (list(TABLES).index(p.stem) if p.stem in TABLES
                                   else len(TABLES), p.name))
    figure_dir = group_dir / "figures"
    svgs = sorted(figure_dir.glob("*.svg"))
    pngs_alone = [p for p in sorted(figure_dir.glob("*.png"))
                  if not p.with_suffix(".svg").exists()]
    sections = []
    participants = sorted(p.name for p in output_dir.glob("sub-*.html"))
    overview = [f"<p>Study statistics computed by qsmprep {esc(__version__)} from the "
                f"derivatives in this folder: {len(tables)} table(s), "
                f"{len(svgs) + len(pngs_alone)} figure(s).</p>"]
    if participants:
        overview.append("<p>Participant reports: " + " · ".join(
            f'<a href="../{esc(name)}">{esc(name[:-5])}</a>' for name in participants)
            + "</p>")
    if not tables and not svgs and not pngs_alone:
        overview.append('<div class="warning">The group level wrote no tables or figures '
                        "(no ROI statistics or reference table?).</div>")
    sections.append(("overview", "Overview", "\n".join(overview)))
    table_html = []
    for path in tables:
        caption = TABLES.get(path.stem, "")
        opened = " open" if path.stem != "rois_stats" else ""  # the input table: folded
        table_html.append(f"<details{opened}><summary><b>{esc(path.stem)}</b>"
                          + (f" — {esc(caption)}" if caption else "") + "</summary>"
                          + _table_html(path, failures) + "</details>")
    if table_html:
        sections.append(("tables", "Statistics tables", "\n".join(table_html)))
    figure_html = []
    for path in svgs + pngs_alone:
        png = path.with_suffix(".png")
        link = (f' · <a href="figures/{esc(png.name)}">PNG</a>' if path.suffix == ".svg"
                and png.exists() else "")
        if path.stat().st_size == 0:
            failures.append(f"figure {path.name} is empty")
            continue
        figure_html.append(
            f'<figure class="plot"><img src="figures/{esc(path.name)}" alt="{esc(path.stem)}"'
            f' loading="eager"><figcaption>{esc(_caption(path.stem))}{link}</figcaption>'
            "</figure>")
    if figure_html:
        sections.append(("figures", "Figures", "\n".join(figure_html)))
    errors = "\n".join(f'<div class="error">{esc(f)}</div>' for f in failures) or \
        '<div class="ok">No errors while building this page.</div>'
    sections.append(("errors", "Errors", errors))
    path = group_dir / "index.html"
    atomic_write_text(path, page("qsmprep: group report", f"qsmprep {__version__} · "
                                 f"{len(participants)} participant report(s)", sections))
    return GroupReport(path, tables, svgs + pngs_alone, failures)
