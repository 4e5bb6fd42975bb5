"""Report generator on fabricated tidy results (written with pflbench.results.write_run).

Golden .tex files in tests/golden/ only detect changes (they are written by the code under test;
test_main_table_cells_are_the_fabricated_client_macro_means recomputes the main table's numbers
independently). Regenerate them with
``PFLBENCH_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_report.py``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pflbench import stats
from pflbench.report import ReportError, build_report
from pflbench.report import latex as rlatex
from pflbench.report import tables as rtables
from pflbench.results import RunRecords, write_run

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("PFLBENCH_UPDATE_GOLDEN") == "1"

# 3 datasets with 5 + 6 + 7 sites = 18 blocks; planted effects on the client scores
DATASETS = {"prostate": 5, "fundus": 6, "polyp_x": 7}
EFFECTS = {"fedavg": 0.0, "fedprox": 0.0, "ditto": 0.06, "fed_rep": 0.03, "local": -0.04}
STRUCTS = ["gland", "zone_b"]


def fabricate(
    out: Path,
    datasets: dict[str, int] = DATASETS,
    effects: dict[str, float] = EFFECTS,
    seeds: tuple[int, ...] = (0, 1, 2),
    rounds: int = 4,
    cases: int = 3,
    tuned: tuple[str, ...] = ("ditto",),
) -> None:
    """Write one finished run per (dataset, method, label, seed) with planted differences."""
    rng = np.random.default_rng(12345)
    site_base = {d: rng.uniform(0.62, 0.85, n) for d, n in datasets.items()}
    inter = {(d, m): rng.normal(0, 0.004, n) for d, n in datasets.items() for m in effects}
    for d, n in datasets.items():
        sites = [f"site_{chr(65 + i)}" for i in range(n)]
        for m, eff in effects.items():
            labels = [("tuned", 0.0), ("default", -0.02)] if m in tuned else [("fixed", 0.0)]
            for label, shift in labels:
                for seed in seeds:
                    r = np.random.default_rng(zlib.crc32(f"{d}|{m}|{label}|{seed}".encode()))
                    base = site_base[d] + inter[(d, m)] + eff + shift + r.normal(0, 0.004, n)
                    _write(out, d, sites, m, label, seed, base, r, rounds, cases)


def _write(out, d, sites, m, label, seed, base, r, rounds, cases):
    rows_c, rows_r, rows_comm = [], [], []
    for i, site in enumerate(sites):
        for c in range(cases):
            for s_i, st in enumerate(STRUCTS):
                v = float(np.clip(base[i] + (0.02 if s_i else -0.02) + r.normal(0, 0.01), 0, 1))
                for sel in ("best", "last"):
                    rows_c.append(
                        dict(
                            selection=sel, round=rounds, client=site, split="test",
                            case_id=f"{site}-{c}", structure=st, dice=v, iou=v / (2 - v),
                            hd95=(1 - v) * 40 if sel == "best" else 99.0, assd=(1 - v) * 10,
                        )
                    )  # fmt: skip
        for rd in range(1, rounds + 1):
            frac = 1 - 0.5**rd
            for split in ["val", "test"] if rd == rounds else ["val"]:
                for st in [*STRUCTS, "mean"]:
                    val = float(base[i] * frac + r.normal(0, 0.005))
                    for metric, x in (("dice", val), ("iou", val / (2 - val)), ("loss", 1 - val)):
                        rows_r.append(
                            dict(round=rd, client=site, split=split, structure=st,
                                 metric=metric, value=x)
                        )  # fmt: skip
            b = 0 if m == "local" else (150_000 if m == "fed_rep" else 200_000)
            rows_comm.append(
                dict(round=rd, client=site, bytes_up=b, bytes_down=b, sampled=True)
            )  # fmt: skip
    key = f"{d}-{m}-{label}-s{seed}"
    manifest = dict(
        run_key=key, dataset=d, method=m, label=label, seed=seed,
        params={"lr": 0.003 if label == "tuned" else 0.01, "local_epochs": 1},
        protocol={"rounds": rounds, "eval_every": 1}, model={"name": "unet", "width": 8},
        data_fingerprint=f"fp-{d}", versions={"torch": "2.5.0", "pflbench": "0.1.0"},
        threads=2, device="cpu", git={"sha": "abc1234", "dirty": False},
        timings={"total_s": 12.5}, peak_memory_mb=512.0, budget={"trials": 0},
        bytes_up=0, bytes_down=0, sites=sites, structures=STRUCTS,
        finished_at="2026-01-01T00:00:00",
    )  # fmt: skip
    write_run(
        out,
        key,
        RunRecords(pd.DataFrame(rows_r), pd.DataFrame(rows_comm), pd.DataFrame(rows_c), manifest),
    )


# ---------------------------------------------------------------------------------- fixtures

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # inert unless a test sets _OPENED


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """Fabricated runs plus things a report must never need, and the report built from them."""
    global _OPENED
    run_dir = tmp_path_factory.mktemp("run")
    fabricate(run_dir)
    # not tidy results: must be ignored (no model files are needed, unfinished runs are skipped)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "model.pt").write_bytes(b"not a model")
    junk = run_dir / "results" / "prostate-sneaky-fixed-s0"
    junk.mkdir()
    (junk / "cases.parquet").write_bytes(b"garbage")
    (junk / "manifest.json").write_text("{ not json")  # no DONE: an unfinished run
    _OPENED = []
    try:
        out = build_report(run_dir)
    finally:
        opened, _OPENED = _OPENED, None
    return run_dir, out, opened


# ---------------------------------------------------------------------------------- tests


def test_every_output_exists(built):
    run_dir, out, _ = built
    assert out == run_dir / "report"
    assert (out / "report.md").stat().st_size > 0 and (out / "report.html").stat().st_size > 0
    tex = {p.stem for p in (out / "tables").glob("*.tex")}
    expected = {"main", "comparison", "pairs", "per_dataset", "tuned_vs_default"}
    expected |= {f"dataset_{d}" for d in DATASETS} | {f"structures_{d}" for d in DATASETS}
    assert expected <= tex
    figs = ["cd_diagram", "convergence", "client_distributions", "heatmap"]
    figs += ["accuracy_vs_bytes", "fairness"]
    for f in figs:
        for ext in ("pdf", "png"):
            p = out / "figures" / f"{f}.{ext}"
            assert p.exists() and p.stat().st_size > 1000, p
    for f in ("blocks", "comparison", "pairs"):
        assert (out / "tables" / f"{f}.csv").exists()


def test_html_is_self_contained_with_every_figure(built):
    _, out, _ = built
    html = (out / "report.html").read_text(encoding="utf-8")
    n_png = len(list((out / "figures").glob("*.png")))
    imgs = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(imgs) == n_png == 6
    assert all(base64.b64decode(x)[:8] == b"\x89PNG\r\n\x1a\n" for x in imgs)
    # no external assets
    assert not re.search(r'(src|href)="(?!data:)', html)
    assert "<link" not in html and "<script" not in html


def test_planted_best_bold_second_underlined(built):
    _, out, _ = built
    main = (out / "tables" / "main.tex").read_text()
    row = {ln.split(" & ")[0]: ln for ln in main.splitlines() if " & " in ln}
    assert "booktabs" not in main and r"\toprule" in main and r"\bottomrule" in main
    for d in DATASETS:
        assert d.replace("_", r"\_") in row["Method"]
    assert row["ditto"].count(r"\textbf{") == len(DATASETS) + 1  # every dataset + mean rank
    assert row["fed\\_rep"].count(r"\underline{") == len(DATASETS) + 1
    assert r"\textbf" not in row["fedavg"] and r"\underline" not in row["fedavg"]
    assert r"$^{\blacktriangle}$" in row["ditto"] and r"$^{\blacktriangledown}$" in row["local"]
    assert r"\pm" in row["ditto"] and "polyp\\_x" in main  # escaped labels
    assert "3 seeds" in main and "N = 18" in main and "k = 5" in main and r"\uparrow" in main
    ds = (out / "tables" / "dataset_fundus.tex").read_text()
    row = {ln.split(" & ")[0]: ln for ln in ds.splitlines() if " & " in ln}
    assert row["ditto"].count(r"\textbf{") >= 8  # 6 sites + macro + worst


def test_markdown_wording(built):
    _, out, _ = built
    md = (out / "report.md").read_text(encoding="utf-8")
    line = next(ln for ln in md.splitlines() if ln.startswith("- **fedprox** vs fedavg"))
    assert stats.NO_EVIDENCE in line and "significant (" not in line
    line = next(ln for ln in md.splitlines() if ln.startswith("- **ditto** vs fedavg"))
    assert "**significant (better)**" in line
    line = next(ln for ln in md.splitlines() if ln.startswith("- **local** vs fedavg"))
    assert "**significant (worse)**" in line
    # per-dataset tests with too few blocks say so and print no p-values
    assert "Tests within prostate (blocks = clients): N = 5 blocks" in md
    para = next(ln for ln in md.splitlines() if ln.startswith("Tests within prostate"))
    assert stats.TOO_FEW in para.lower() and "Holm p" not in para
    assert "Friedman χ²(4)" in md and "Iman–Davenport" in md
    assert "Tuned vs default" in md and "Appendix: protocol and environment" in md
    assert "sneaky" not in md  # the unfinished run is not part of the report


def test_reads_only_tidy_results(built):
    run_dir, out, opened = built
    allowed = {
        "rounds.parquet",
        "comm.parquet",
        "cases.parquet",
        "manifest.json",
        "qualitative.npz",
    }
    root = run_dir.resolve()
    inside = [Path(p).resolve() for p in opened if Path(p).resolve().is_relative_to(root)]
    assert any(p.name == "manifest.json" for p in inside)  # the hook does see the reads
    for p in inside:
        if p.is_relative_to(out.resolve()):
            continue  # what the report writes (and embeds)
        rel = p.relative_to(root)
        assert rel.parts[0] == "results" and rel.name in allowed, rel
        assert "sneaky" not in str(rel)
    assert not any("checkpoints" in p for p in opened)


def test_markers_and_cd_bars_agree_on_a_planted_example(tmp_path):
    """One family: a method is marked against the reference exactly when no crossbar joins it
    to the reference, and every pair is joined exactly when its test is not significant."""
    from pflbench.report import figures

    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.9, 18)
    noise = lambda: rng.normal(0, 0.004, 18)  # noqa: E731
    m = pd.DataFrame(
        {
            "fedavg": base,
            "ditto": base + 0.05 + noise(),
            "fedprox": base + 0.012 + noise(),  # near the edge: Holm over 10 pairs decides
            "local": base - 0.001 + noise(),
            "bad": base - 0.06 + noise(),
        }
    )
    comp = stats.analyze(m, "fedavg", n_resamples=0, bayes=False, family="pairs")
    assert comp.family_size == 10 and len(comp.vs_reference) == 4
    marks = rtables.markers_from(comp)
    fig, bars = figures.cd_figure(comp, figures.palette(list(m.columns)))
    assert marks["ditto"] == rtables.UP and marks["bad"] == rtables.DOWN and "local" not in marks
    for a in m.columns.drop("fedavg"):
        assert (a in marks) == (not figures.joined(bars, a, "fedavg")), a
    for _, row in comp.pairs.iterrows():
        assert row["significant"] == (not figures.joined(bars, row["a"], row["b"])), tuple(row)
    # the vs-reference rows are the pairs rows: same p, same verdict
    pr = comp.pairs[comp.pairs["b"] == "fedavg"].set_index("a")
    vr = comp.vs_reference.set_index("a")
    pd.testing.assert_series_equal(vr["p_holm"], pr.loc[vr.index, "p_holm"])
    assert (vr["verdict"] == pr.loc[vr.index, "verdict"]).all()
    png = figures.save(fig, tmp_path, "cd")
    assert png.stat().st_size > 1000 and (tmp_path / "cd.pdf").exists()


def test_report_markers_come_from_the_cd_diagrams_family(built):
    _, out, _ = built
    comp = pd.read_csv(out / "tables" / "comparison.csv").set_index("a")
    pairs = pd.read_csv(out / "tables" / "pairs.csv")
    ref = pairs[pairs["b"] == "fedavg"].set_index("a")
    assert len(pairs) == 10 and set(comp.index) == set(ref.index)
    assert (comp["significant"] == ref.loc[comp.index, "significant"]).all()
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "Holm over all 10 pairs of the 5 methods" in md and "Nemenyi" not in md
    assert "Drawn with scikit-posthocs" in md


def test_golden_tables_from_fabricated_runs(built):
    _, out, _ = built
    for name in ("main", "dataset_prostate"):
        _check_golden(name, (out / "tables" / f"{name}.tex").read_text())


def test_main_table_cells_are_the_fabricated_client_macro_means(built):
    """The golden files only say the output did not change; this says it is right: each cell
    of the main table is recomputed here from the fabricated cases (test split, best round):
    per client the mean over cases and structures, per seed the mean over clients, then mean ±
    SD over the seeds, tuned label for tuned methods."""
    run_dir, out, _ = built
    tex = (out / "tables" / "main.tex").read_text()
    cases = pd.concat(
        pd.read_parquet(d / "cases.parquet").assign(
            **{
                k: json.loads((d / "manifest.json").read_text())[k]
                for k in ("dataset", "method", "label", "seed")
            }
        )
        for d in sorted((run_dir / "results").iterdir())
        if (d / "DONE").exists()
    )
    cases = cases[(cases["split"] == "test") & (cases["selection"] == "best")]
    cases = cases[cases["label"].isin(["tuned", "fixed"])]
    per_seed = (
        cases.groupby(["dataset", "method", "seed", "client"])["dice"]
        .mean()
        .groupby(["dataset", "method", "seed"])
        .mean()
    )
    checked = 0
    for method in EFFECTS:
        row = next(
            line for line in tex.splitlines() if line.startswith(method.replace("_", r"\_") + " & ")
        )
        cells = re.findall(r"(\d\.\d{3}) \$\\pm\$ (\d\.\d{3})", row)
        for dataset, (mean, sd) in zip(sorted(DATASETS), cells, strict=True):
            x = per_seed.loc[(dataset, method)]
            assert float(mean) == pytest.approx(x.mean(), abs=5e-4), (method, dataset)
            # (at three decimals the SD cannot tell n − 1 from n over three seeds)
            assert float(sd) == pytest.approx(x.std(ddof=1), abs=5e-4), (method, dataset)
            checked += 1
    assert checked == len(EFFECTS) * len(DATASETS)


def test_golden_ties_escaping_and_markers():
    raw = pd.DataFrame(
        {"site_1": [0.85141, 0.85061, 0.84949, 0.7], "HD95 (mm)": [3.21, 3.24, 3.21, 9.0]},
        index=["fed_avg & co", "50% ditto", "#local", "x^2 naïve-α ☃"],
    )
    cells = raw.copy().astype(object)
    cells["site_1"] = [rtables.fmt_mean_std(v, 0.0123, 3) for v in raw["site_1"]]
    cells["HD95 (mm)"] = [rtables.fmt_mean_std(v, 0.5, 1) for v in raw["HD95 (mm)"]]
    bold, under = rtables.rank_marks(raw, {"site_1": 3, "HD95 (mm)": 1}, ["HD95 (mm)"])
    # 0.85141 and 0.85061 both show 0.851: tied best; 0.849 second; HD95 3.21/3.24 show 3.2
    assert bold["site_1"].tolist() == [True, True, False, False]
    assert under["site_1"].tolist() == [False, False, True, False]
    assert bold["HD95 (mm)"].tolist() == [True, True, True, False]
    assert under["HD95 (mm)"].tolist() == [False, False, False, True]
    marks = pd.DataFrame("", index=raw.index, columns=raw.columns)
    marks.iloc[1, 0], marks.iloc[2, 1] = rtables.UP, rtables.DOWN
    t = rtables.Table(
        name="ties",
        title="ties",
        cells=cells,
        caption="Dice ↑ / HD95 ↓; mean ± SD over 3 seeds; N = 4, k = 4; 50% & more_{x}. "
        + rtables.marker_legend("fed_avg", 0.01),
        bold=bold,
        underline=under,
        markers=marks,
    )
    tex = rlatex.to_latex(t)
    assert r"fed\_avg \& co" in tex and r"50\% ditto" in tex and r"\#local" in tex
    assert r"x\textasciicircum{}2 naïve-$\alpha$ ?" in tex
    assert r"\textbf{0.851 $\pm$ 0.012}" in tex and r"\underline{0.849 $\pm$ 0.012}" in tex
    _check_golden("ties", tex)


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.tex"
    if UPDATE or not path.exists():
        if not UPDATE:
            pytest.fail(f"missing golden {path}; run with PFLBENCH_UPDATE_GOLDEN=1 to create it")
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name}.tex differs from {path}"


def _pdflatex(folder: Path, doc: str) -> str:
    """Compile ``doc`` in ``folder``; returns the log (the test fails on a LaTeX error)."""
    proc = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (folder / doc).with_suffix(".pdf").stat().st_size > 1000
    return (folder / doc).with_suffix(".log").read_text(errors="replace")


def overfull(log: str, tolerance: float = 1.0) -> list[float]:
    """Overfull hbox/vbox amounts (pt) above ``tolerance`` in a LaTeX log."""
    found = re.findall(r"Overfull \\[hv]box \((\d+(?:\.\d+)?)pt too (?:wide|high)", log)
    return [float(x) for x in found if float(x) > tolerance]


def test_overfull_counts_boxes_above_the_tolerance():
    log = (
        "Overfull \\hbox (39.7pt too wide) in alignment at lines 5--20\n"
        "Overfull \\hbox (0.4pt too wide) in paragraph\nOverfull \\vbox (589.0pt too high) has"
    )
    assert overfull(log) == [39.7, 589.0]


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_golden_tables_compile_with_pdflatex(tmp_path):
    for p in GOLDEN.glob("*.tex"):
        shutil.copy(p, tmp_path / f"golden_{p.name}")
    files = sorted(tmp_path.glob("golden_*.tex"))
    (tmp_path / "doc.tex").write_text(rlatex.document(files))
    assert "Missing character" not in _pdflatex(tmp_path, "doc.tex")


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """Nine methods (36 pairs: the pairs table is split into parts) on 7 sites."""
    run_dir = tmp_path_factory.mktemp("wide")
    effects = {f"method_{i}": 0.01 * i for i in range(8)} | {"fedavg": 0.0}
    fabricate(run_dir, datasets={"prostate_x": 7}, effects=effects, seeds=(0, 1), rounds=2,
              cases=2, tuned=())  # fmt: skip
    return build_report(run_dir)


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
@pytest.mark.parametrize("doc", ["all_tables.tex", "all_tables_twocolumn.tex"])
@pytest.mark.parametrize("which", ["built", "wide"])
def test_all_tables_fit_one_and_two_column_articles(request, tmp_path, doc, which):
    out = request.getfixturevalue(which)
    out = out[1] if which == "built" else out
    shutil.copytree(out / "tables", tmp_path / "t")
    log = _pdflatex(tmp_path / "t", doc)
    assert overfull(log) == [], f"overfull boxes above 1 pt in {doc}"
    assert "Float too large" not in log and "Missing character" not in log
    if which == "wide":
        assert "(part 2 of 2)" in (tmp_path / "t" / "pairs.tex").read_text()


def test_lower_is_better_metric_and_small_n(tmp_path):
    """HD95 ranks ascending; one dataset of 4 sites is too small for any significance."""
    fabricate(
        tmp_path,
        datasets={"tiny": 4},
        effects={"fedavg": 0.0, "ditto": 0.06, "local": -0.04},
        seeds=(0, 1),
        rounds=2,
        cases=2,
        tuned=(),
    )
    out = build_report(tmp_path, out=tmp_path / "rep", metric="hd95", practical=0.5)
    main = (out / "tables" / "main.tex").read_text()
    row = {ln.split(" & ")[0]: ln for ln in main.splitlines() if " & " in ln}
    assert r"\textbf{" in row["ditto"] and r"\underline{" in row["fedavg"]
    assert r"\downarrow" in main and "HD95" in main
    md = (out / "report.md").read_text(encoding="utf-8")
    assert stats.TOO_FEW in md and not re.search(r"Holm p (=|<) ?[0-9]", md)  # no p-values
    assert "tuned_vs_default" not in {p.stem for p in (out / "tables").glob("*.tex")}
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count('<img src="data:image/png;base64,') == len(
        list((out / "figures").glob("*.png"))
    )
    with pytest.raises(ReportError):
        build_report(tmp_path, out=tmp_path / "x", reference="nope")
    with pytest.raises(ReportError):
        build_report(tmp_path, out=tmp_path / "x", metric="accuracy")
    with pytest.raises(ReportError):
        build_report(tmp_path / "empty")


def test_runs_from_different_processors_are_named_in_the_appendix_and_a_note(tmp_path):
    """CPU numbers are bitwise reproducible on one processor only: a report that merges runs
    made on two says so, and its appendix names both."""
    fabricate(tmp_path, datasets={"tiny": 4}, effects={"fedavg": 0.0, "local": -0.04},
              seeds=(0, 1), rounds=2, cases=2, tuned=())  # fmt: skip
    cpus = {0: {"model": "Intel(R) Xeon(R) Processor", "torch_capability": "AVX512"},
            1: {"model": "AMD EPYC", "torch_capability": "AVX2"}}  # fmt: skip
    for path in (tmp_path / "results").glob("*/manifest.json"):
        m = json.loads(path.read_text())
        path.write_text(json.dumps({**m, "processor": cpus[m["seed"]]}))
    md = (build_report(tmp_path, out=tmp_path / "rep") / "report.md").read_text(encoding="utf-8")
    assert "| processor | Intel(R) Xeon(R) Processor (AVX512) \\| AMD EPYC (AVX2) |" in md
    assert "tiny: the runs come from different processors" in md

    for path in (tmp_path / "results").glob("*/manifest.json"):  # one processor: no note
        m = json.loads(path.read_text())
        path.write_text(json.dumps({**m, "processor": cpus[0]}))
    md = (build_report(tmp_path, out=tmp_path / "one") / "report.md").read_text(encoding="utf-8")
    assert "different processors" not in md
    assert "| processor | Intel(R) Xeon(R) Processor (AVX512) |" in md
