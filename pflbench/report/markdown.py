"""Markdown rendering of report tables (GitHub-flavoured pipe tables, no extra dependency)."""

from __future__ import annotations

from .tables import MARKER_TEXT, Table


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(table: Table, with_caption: bool = True) -> str:
    """Pipe table with **best**, <u>second</u> and ▲/▼ markers, caption below in italics."""
    bold, under, marks = table.mask("bold"), table.mask("underline"), table.marker()
    header = [table.index_name] + [str(c) for c in table.cells.columns]
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "| "
        + " | ".join(
            [":--"]
            + [":--" if c == "Verdict" or c in table.widths else "--:" for c in table.cells.columns]
        )
        + " |",
    ]
    for idx, row in table.cells.iterrows():
        out = [_cell(idx)]
        for col, text in row.items():
            t = _cell(text)
            if bold.loc[idx, col]:
                t = f"**{t}**"
            elif under.loc[idx, col]:
                t = f"<u>{t}</u>"
            mk = marks.loc[idx, col]
            if mk:
                t += MARKER_TEXT[mk]
            out.append(t)
        lines.append("| " + " | ".join(out) + " |")
    text = "\n".join(lines)
    if with_caption and table.caption:
        text += f"\n\n*{table.caption}*"
    return text


def key_values(rows: list[tuple[str, str]], header: tuple[str, str] = ("Field", "Value")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| :-- | :-- |"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
    return "\n".join(lines)
