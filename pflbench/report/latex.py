"""LaTeX tables via :meth:`pandas.io.formats.style.Styler.to_latex` (booktabs).

Cells keep their "mean ± std" text with ``$\\pm$``; best is ``\\textbf``, second ``\\underline``
(``textbf:--rwrap;`` / ``underline:--rwrap;``), markers are ``$^{\\blacktriangle}$`` /
``$^{\\blacktriangledown}$`` (amssymb). Every label and caption is escaped. Needs booktabs and
amssymb in the document preamble (:data:`PREAMBLE`).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pandas as pd

from .tables import DOWN, UP, Table

# default OT1 encoding on purpose: T1 without cm-super/lmodern makes TeX generate bitmap fonts
PACKAGES = r"""\usepackage[utf8]{inputenc}
\usepackage{booktabs}
\usepackage{amssymb}
\usepackage{graphicx}
"""
PREAMBLE = "\\documentclass{article}\n" + PACKAGES
#: A table with more rows is split into parts ("(part 2 of 4)"), each fitting a page, or a
#: column of a two-column paper, in small type.
MAX_ROWS = 24
#: Estimated natural width (pt) above which a table spans both columns of a paper (table*).
COLUMN_PT = 240.0

MARKER_TEX = {UP: r"$^{\blacktriangle}$", DOWN: r"$^{\blacktriangledown}$"}

_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
}
_UNICODE = {
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "χ²": r"$\chi^2$",
    "χ": r"$\chi$",
    "≥": r"$\geq$",
    "≤": r"$\leq$",
    "≠": r"$\neq$",
    "×": r"$\times$",
    "−": "-",
    "–": "--",
    "—": "---",
    "↑": r"$\uparrow$",
    "↓": r"$\downarrow$",
    "▲": r"$\blacktriangle$",
    "▼": r"$\blacktriangledown$",
    "T⁺": r"$T^{+}$",
    "T⁻": r"$T^{-}$",
    "²": r"$^2$",
    "“": "``",
    "”": "''",
    "’": "'",
    "…": r"\ldots{}",
    "†": r"$^{\dagger}$",
    "α": r"$\alpha$",
    "β": r"$\beta$",
    "μ": r"$\mu$",
    "σ": r"$\sigma$",
    "≈": r"$\approx$",
    "→": r"$\rightarrow$",
    "←": r"$\leftarrow$",
    "·": r"$\cdot$",
    "√": r"$\surd$",
    "₀.₀₅": r"$_{0.05}$",
    "⁺": r"$^{+}$",
    "⁻": r"$^{-}$",
    "‘": "`",
    "|": r"$|$",  # in text mode, OT1 typesets "|" as an em dash
}
_SPECIAL_RE = re.compile("|".join(re.escape(k) for k in _SPECIAL))
_UNICODE_RE = re.compile("|".join(re.escape(k) for k in sorted(_UNICODE, key=len, reverse=True)))


def _ascii_fallback(ch: str) -> str:
    if ord(ch) < 256:  # Latin-1: utf8 inputenc handles it
        return ch
    return unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode() or "?"


def tex_escape(text: object) -> str:
    """Escape LaTeX specials and turn the Unicode symbols the report uses into math macros.

    Other characters beyond Latin-1 (which pdflatex's utf8 inputenc cannot typeset by default)
    are reduced to ASCII, so a label can never break compilation.
    """
    s = _SPECIAL_RE.sub(lambda m: _SPECIAL[m.group(0)], str(text))
    s = _UNICODE_RE.sub(lambda m: _UNICODE[m.group(0)], s)
    s = "".join(_ascii_fallback(ch) for ch in s)
    s = re.sub(r'"([^"]*)"', r"``\1''", s)  # straight quotes → TeX quotes
    return s


def _natural_width(table: Table) -> float:
    """Rough width in pt of the table in small type (about 4.6 pt a character)."""
    cols = [[str(table.index_name), *map(str, table.cells.index)]]
    cols += [[str(c), *map(str, table.cells[c])] for c in table.cells.columns]
    return sum(max(map(len, col)) * 4.6 + 6.0 for col in cols)


def _lines_per_row(table: Table) -> int:
    """Most lines a row's wrapped (``widths``) cells take, about 4.6 pt a character."""
    lines = 1
    for col, width in table.widths.items():
        if col in table.cells.columns and width.endswith("cm"):
            chars = max(1, int(float(width[:-2]) * 28.45 / 4.6))
            longest = max((len(str(v)) for v in table.cells[col]), default=0)
            lines = max(lines, -(-longest // chars))
    return lines


def _fit(tabular: str) -> str:
    """The tabular at its natural size, shrunk to the line width only when wider: never an
    overfull box, never a narrow table blown up (plain LaTeX and graphicx, no extra package)."""
    return (
        "\\sbox0{%\n" + tabular.strip() + "%\n}%\n"
        "\\ifdim\\wd0>\\linewidth\\resizebox{\\linewidth}{!}{\\usebox0}\\else\\usebox0\\fi\n"
    )


def to_latex(table: Table) -> str:
    """The table as booktabs floats with caption and label, sized to fit a page.

    ``table*`` when it is wider than a column (a two-column paper spans it; in one column it
    is a plain float), the tabular shrunk to the line width only if still too wide, and more
    than :data:`MAX_ROWS` rows split into parts with the same columns and caption.
    """
    n = len(table.cells)
    env = "table*" if _natural_width(table) > COLUMN_PT else "table"
    max_rows = max(4, MAX_ROWS // _lines_per_row(table))
    if n <= max_rows:
        return _float(table, table.cells.index, env, "", "")
    parts = -(-n // max_rows)
    size = -(-n // parts)
    out = []
    for i in range(parts):
        idx = table.cells.index[i * size : (i + 1) * size]
        out.append(_float(table, idx, env, f" (part {i + 1} of {parts})", f"-{i + 1}"))
    return "\n".join(out)


def _float(table: Table, index: pd.Index, env: str, part: str, suffix: str) -> str:
    cells = table.cells.loc[index].apply(lambda col: col.map(tex_escape))
    marks = table.marker().loc[index]
    for col in cells.columns:
        for idx in cells.index:
            mk = marks.loc[idx, col]
            if mk:
                cells.loc[idx, col] = cells.loc[idx, col] + MARKER_TEX[mk]
    bold, under = table.mask("bold").loc[index], table.mask("underline").loc[index]
    css = pd.DataFrame("", index=cells.index, columns=cells.columns)
    css = css.mask(bold, "textbf:--rwrap;").mask(under & ~bold, "underline:--rwrap;")
    first = table.index_name
    frame = cells.copy()
    frame.insert(0, first, [tex_escape(i) for i in cells.index])
    css.insert(0, first, "")
    frame.columns = [tex_escape(c) for c in frame.columns]
    css.columns = frame.columns
    frame = frame.reset_index(drop=True)
    css = css.reset_index(drop=True)
    styler = frame.style.hide(axis="index").apply(lambda _: css, axis=None)
    tabular = styler.to_latex(
        hrules=True,
        column_format="l" + "".join(_column(table, c) for c in table.cells.columns),
    )
    return (
        f"\\begin{{{env}}}\n\\centering\n\\small\n\\setlength{{\\tabcolsep}}{{3pt}}\n"
        f"\\caption{{{tex_escape(table.caption + part)}}}\n\\label{{tab:{table.name}{suffix}}}\n"
        + _fit(tabular)
        + f"\\end{{{env}}}\n"
    )


def _column(table: Table, col: str) -> str:
    if col in table.widths:
        return rf"p{{{table.widths[col]}}}"
    return r"p{3.3cm}" if col == "Verdict" else "c"


def write_tables(tables: list[Table], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for t in tables:
        p = folder / f"{t.name}.tex"
        p.write_text(to_latex(t), encoding="utf-8")
        out.append(p)
    return out


def document(tex_files: list[Path], options: str = "") -> str:
    """A plain ``article`` (``options="twocolumn"``: a two-column paper) that inputs the tables,
    with the default page geometry, so a table that fits here fits a paper."""
    body = "\n".join(rf"\input{{{p.name}}}" + "\n\\clearpage" for p in tex_files)
    cls = rf"\documentclass[{options}]{{article}}" if options else r"\documentclass{article}"
    return cls + "\n" + PACKAGES + "\\begin{document}\n" + body + "\n\\end{document}\n"
