"""Small HTML helpers shared by the participant and group pages (no template engine)."""

from __future__ import annotations

import html
from typing import Iterable, Sequence

CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Arial, sans-serif; margin: 0;
       color: #1d1d1f; background: #fafafa; line-height: 1.4; }
header { background: #20252d; color: #fff; padding: 14px 28px; }
header h1 { margin: 0; font-size: 22px; }
header p { margin: 4px 0 0; color: #c8ccd2; font-size: 13px; }
nav { background: #2f3640; padding: 6px 28px; position: sticky; top: 0; z-index: 2; }
nav a { color: #dfe6ee; margin-right: 16px; font-size: 13px; text-decoration: none; }
main { padding: 8px 28px 40px; max-width: 1200px; }
h2 { border-bottom: 2px solid #20252d; padding-bottom: 3px; margin-top: 28px; }
h3 { margin-top: 22px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13px; }
th, td { border: 1px solid #d0d4da; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eceff3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 12px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid #ccc; background: #000; }
figure.plot img { background: #fff; }
figcaption { font-size: 13px; color: #444; margin-top: 4px; max-width: 1000px; }
.warning { background: #fff4d6; border-left: 4px solid #e0a800; padding: 4px 10px; margin: 4px 0;
           white-space: pre-wrap; font-size: 13px; }
.error { background: #fde2e1; border-left: 4px solid #c9302c; padding: 4px 10px; margin: 4px 0;
         font-size: 13px; }
.ok { background: #e3f4e1; border-left: 4px solid #3c9a35; padding: 4px 10px; margin: 4px 0;
      font-size: 13px; }
.verdict-none { color: #2c7a25; font-weight: bold; }
.verdict-suspect { color: #b37400; font-weight: bold; }
.verdict-swapped { color: #b3261e; font-weight: bold; }
pre { background: #f0f0f0; padding: 8px; overflow-x: auto; font-size: 12px; }
code { font-size: 12px; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 4px;
          vertical-align: middle; border: 1px solid #555; }
ol.references { font-size: 13px; }
.methods p { max-width: 1000px; }
"""


def esc(value: object) -> str:
    """HTML-escaped text of ``value``."""
    return html.escape(str(value), quote=True)


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """A complete page; ``sections`` are (anchor id, heading, inner HTML)."""
    nav = "".join(f'<a href="#{esc(anchor)}">{esc(heading)}</a>'
                  for anchor, heading, _ in sections)
    body = "\n".join(f'<section id="{esc(anchor)}">\n<h2>{esc(heading)}</h2>\n{inner}\n'
                     "</section>" for anchor, heading, inner in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>\n"
            f"<nav>{nav}</nav>\n<main>\n{body}\n</main>\n</body>\n</html>\n")


def table(header: Sequence[str], rows: Iterable[Sequence[object]], *,
          numeric: Sequence[int] = (), raw: bool = False, css_id: str = "") -> str:
    """An HTML table; cells are escaped unless ``raw``; ``numeric`` columns right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    lines = []
    for row in rows:
        cells = []
        for index, cell in enumerate(row):
            text = str(cell) if raw else esc(cell)
            cls = ' class="num"' if index in numeric else ""
            cells.append(f"<td{cls}>{text}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{esc(css_id)}"' if css_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def key_values(pairs: Sequence[tuple[str, object]], *, raw_values: bool = False,
               css_id: str = "") -> str:
    """A two-column table of (name, value)."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v if raw_values else esc(v)}</td></tr>"
                   for k, v in pairs)
    ident = f' id="{esc(css_id)}"' if css_id else ""
    return f"<table class=\"summary\"{ident}><tbody>{rows}</tbody></table>"


def figure(src: str, caption: str, *, alt: str, plot: bool = False) -> str:
    """An image with its caption (``src`` relative to the page)."""
    cls = ' class="plot"' if plot else ""
    return (f'<figure{cls}><img src="{esc(src)}" alt="{esc(alt)}" loading="eager">'
            f"<figcaption>{caption}</figcaption></figure>")
