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
PREAMBLE = r"""\documentclass{article}
\usepackage[utf8]{inputenc}
\usepackage{booktabs}
\usepackage{amssymb}
\usepackage{graphicx}
\usepackage[margin=1.5cm,landscape]{geometry}
"""

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


def to_latex(table: Table) -> str:
    """The table as a floating booktabs ``table`` environment with caption and label."""
    cells = table.cells.apply(lambda col: col.map(tex_escape))
    marks = table.marker()
    for col in cells.columns:
        for idx in cells.index:
            mk = marks.loc[idx, col]
            if mk:
                cells.loc[idx, col] = cells.loc[idx, col] + MARKER_TEX[mk]
    bold, under = table.mask("bold"), table.mask("underline")
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
    tex = styler.to_latex(
        hrules=True,
        caption=tex_escape(table.caption),
        label=f"tab:{table.name}",
        position_float="centering",
        column_format="l"
        + "".join(r"p{3.3cm}" if c == "Verdict" else "c" for c in table.cells.columns),
    )
    if table.cells.shape[1] >= 7 or "Verdict" in table.cells.columns:  # wide: smaller type
        tex = tex.replace(
            "\\centering\n", "\\centering\n\\small\n\\setlength{\\tabcolsep}{3pt}\n", 1
        )
    return tex


def write_tables(tables: list[Table], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for t in tables:
        p = folder / f"{t.name}.tex"
        p.write_text(to_latex(t), encoding="utf-8")
        out.append(p)
    return out


def document(tex_files: list[Path]) -> str:
    """A minimal document that \\input{}s the tables (for compiling checks)."""
    body = "\n".join(rf"\input{{{p.name}}}" + "\n\\clearpage" for p in tex_files)
    return PREAMBLE + "\\begin{document}\n" + body + "\n\\end{document}\n"
