"""The README's generated parts match the code."""

from __future__ import annotations

from pathlib import Path

from pflbench.docs import render
from pflbench.registry import registry

README = Path(__file__).parent.parent / "README.md"


def test_readme_methods_table_is_current():
    text = README.read_text()
    assert render(text) == text, "README.md is stale: run `python -m pflbench.docs README.md`"


def test_every_builtin_method_cites_a_paper_and_imports():
    reg = registry("methods")
    methods = reg.load_all()
    assert not reg.errors, reg.errors
    for name, cls in methods.items():
        assert cls.paper, f"{name} has no paper citation"
        assert (cls.__doc__ or "").strip(), f"{name} has no docstring"


ROOT = README.parent


def test_datasets_doc_is_current():
    """docs/datasets.md is what the generator makes of the declarations and timings."""
    from pflbench.docs import DATASETS_DOC, TIMINGS, datasets_doc, load_timings

    committed = (ROOT / DATASETS_DOC).read_text()
    assert committed == datasets_doc(load_timings(ROOT / TIMINGS)), (
        "docs/datasets.md is stale: run `python -m pflbench.docs`"
    )


def test_every_builtin_dataset_is_documented_from_its_declaration():
    from pflbench.docs import DATASETS_DOC, builtin_datasets

    doc = (ROOT / DATASETS_DOC).read_text()
    datasets = builtin_datasets()
    assert {
        "prostate",
        "fundus",
        "polyp",
        "vessel",
        "gland",
        "anatomy",
        "synthetic",
        "nnunet",
    } <= set(datasets)
    for name, cls in datasets.items():
        for attr in ("source", "homepage", "licence", "access", "citation"):
            assert getattr(cls, attr).strip(), f"{name} declares no {attr}"
        section = doc.split(f"\n## `{name}`\n", 1)[1].split("\n## ", 1)[0]
        assert cls.licence in section and cls.homepage in section
        if cls.expected_tree:  # the layout shown is the one `data check` prints
            assert f"```text\n{cls.expected_tree.strip(chr(10))}\n```" in section
        assert "**Time:** not measured" not in section, f"{name}: no timing in the JSON"
    assert "(docs/datasets.md)" in README.read_text()


def test_the_generator_writes_both_files(tmp_path):
    from pflbench.docs import main

    (tmp_path / "README.md").write_text(README.read_text())
    (tmp_path / "docs").mkdir()
    assert main([str(tmp_path / "README.md")]) == 0
    assert (tmp_path / "docs" / "datasets.md").read_text().startswith("# Datasets\n")
    assert "not measured" in (tmp_path / "docs" / "datasets.md").read_text()  # no timings file
