"""A self-contained HTML page: inline CSS, tables, figures embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from .tables import MARKER_TEXT, Table

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1, h2, h3 { line-height: 1.2; }
table { border-collapse: collapse; margin: 1em 0 0.3em 0; font-size: 0.92em; }
th, td { padding: 0.25em 0.7em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { border-top: 2px solid #222; border-bottom: 1px solid #222; }
tbody tr:last-child td { border-bottom: 2px solid #222; }
td.verdict { white-space: normal; text-align: left; min-width: 16em; }
p.caption { font-size: 0.88em; color: #444; margin-top: 0.2em; max-width: 70em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; }
figcaption { font-size: 0.88em; color: #444; }
.note { background: #fff7e0; border-left: 4px solid #e0a800; padding: 0.4em 0.8em; }
code, pre { background: #f4f4f4; } pre { padding: 0.6em; overflow-x: auto; white-space: pre-wrap; }
"""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def table_html(table: Table) -> str:
    bold, under, marks = table.mask("bold"), table.mask("underline"), table.marker()
    head = "".join(f"<th>{esc(c)}</th>" for c in [table.index_name, *table.cells.columns])
    rows = []
    for idx, row in table.cells.iterrows():
        tds = [f"<td>{esc(idx)}</td>"]
        for col, text in row.items():
            t = esc(text)
            if bold.loc[idx, col]:
                t = f"<b>{t}</b>"
            elif under.loc[idx, col]:
                t = f"<u>{t}</u>"
            mk = marks.loc[idx, col]
            if mk:
                t += f"<sup>{MARKER_TEXT[mk]}</sup>"
            cls = ' class="verdict"' if str(col) == "Verdict" else ""
            tds.append(f"<td{cls}>{t}</td>")
        rows.append("<tr>" + "".join(tds) + "</tr>")
    return (
        f'<table id="{esc(table.name)}"><thead><tr>{head}</tr></thead><tbody>'
        + "".join(rows)
        + f'</tbody></table>\n<p class="caption">{esc(table.caption)}</p>'
    )


def figure_html(png: Path, caption: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{esc(png.stem)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def key_values_html(
    rows: list[tuple[str, str]], header: tuple[str, str] = ("Field", "Value")
) -> str:
    body = "".join(
        f'<tr><td>{esc(k)}</td><td style="text-align:left;white-space:normal">'
        f"<code>{esc(v)}</code></td></tr>"
        for k, v in rows
    )
    return (
        f"<table><thead><tr><th>{esc(header[0])}</th><th>{esc(header[1])}</th></tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def page(title: str, body: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
