"""suites/resfim-paper.yaml: the seed paper's setting on fixture trees of its three layouts, and
the report's column of published values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fixtures_data import make_gland_tree, make_prostate_tree, make_vessel_tree

from pflbench.runner import plan
from pflbench.suite import SuiteError, load_suite, parse_suite

SUITE = Path(__file__).resolve().parent.parent / "suites" / "resfim-paper.yaml"


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "data"
    make_prostate_tree(root / "prostate")
    make_vessel_tree(root / "vessel")
    make_gland_tree(root / "gland")
    monkeypatch.setenv("PFLBENCH_DATA", str(root))
    monkeypatch.setenv("PFLBENCH_CACHE", str(tmp_path / "cache"))
    return root


def test_suite_carries_the_benchmarks_protocol_per_dataset(data_root: Path) -> None:
    suite = load_suite(SUITE)
    assert [d.key for d in suite.datasets] == ["prostate", "vessel", "gland"]
    assert suite.seeds == [0, 1, 2]
    names = {m.name for m in suite.methods}
    assert (
        len(names) == len(suite.methods) >= 17 and {"resfim", "fedcac", "fedas", "fedap"} <= names
    )
    assert (suite.protocol.rounds, suite.protocol.local_epochs) == (200, 2)
    by = {d.key: suite.protocol_for(d) for d in suite.datasets}
    assert by["prostate"].optimizer.lr == 1e-4 and by["prostate"].lr_schedule is None
    for key in ("vessel", "gland"):
        p = by[key]
        assert p.optimizer.lr == 1e-3
        assert [r for r in range(2, 201) if p.lr_factor(r) < p.lr_factor(r - 1)] == [
            50,
            100,
            150,
            200,
        ]
    assert by["gland"].augmentations == ("flips",)
    assert by["prostate"].augmentations == by["vessel"].augmentations == ("flips", "rot90")
    for p in by.values():
        assert p.optimizer_state == "persist" and p.aggregation_weights == "batches"
        assert p.loss_smoothing == 1e-6 and p.first_selectable() == 102
        assert p.optimizer.weight_decay == 5e-4 and p.batch_size == 8
    gland = next(d for d in suite.datasets if d.key == "gland")
    assert gland.options["size"] == [192, 384]
    cells = plan(suite)
    assert len(cells) == 3 * len(suite.methods) * 3
    assert len({c.key("fp") for c in cells}) == len(cells)


def test_published_block_is_validated() -> None:
    raw = yaml.safe_load(SUITE.read_text())
    raw["datasets"] = [{"name": "synthetic", "label": "gland", "options": {"sites": 2}}]
    raw["report"]["published"]["datasets"] = {"gland": {"sites": {"a": 1.0}}}
    parse_suite(raw, "s.yaml")  # a well-formed block passes
    raw["report"]["published"]["datasets"] = {"glands": {"sites": {"a": 1.0}}}
    with pytest.raises(SuiteError, match=r"report\.published\.datasets\.glands: not a dataset"):
        parse_suite(raw, "s.yaml")
    raw["report"]["published"]["datasets"] = {"gland": {"site": {"a": 1.0}}}
    with pytest.raises(SuiteError, match=r"report\.published\.datasets\.gland\.site: unknown key"):
        parse_suite(raw, "s.yaml")
    raw["report"]["published"]["datasets"] = {"gland": {}}
    raw["report"]["published"]["method"] = "resfim2"
    with pytest.raises(SuiteError, match=r"report\.published\.method: 'resfim2' is not a method"):
        parse_suite(raw, "s.yaml")


@pytest.mark.slow
def test_one_round_end_to_end_with_the_published_column(data_root: Path, tmp_path: Path) -> None:
    """The real suite file, cut to one round, one seed, two methods and tiny images/model."""
    from click.testing import CliRunner

    from pflbench.cli import main

    raw = yaml.safe_load(SUITE.read_text())
    raw["seeds"] = [0]
    raw["methods"] = ["fedavg", "resfim"]
    raw["protocol"].update(rounds=1, local_epochs=1, threads=1, device="cpu")
    raw["model"]["options"] = {"base": 4, "depth": 2, "norm": "batch"}
    sizes = {
        "prostate": {"size": 32, "crop": 32},
        "vessel": {"size": 32},
        "gland": {"size": [16, 32]},
    }
    for d in raw["datasets"]:
        d["options"].update(sizes[d["name"]])
    path = tmp_path / "paper-small.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "runs"
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (out / "published.json").is_file()
    report = (out / "report" / "report.md").read_text()
    assert "## Published values beside ours" in report
    section = report.split("## Published values beside ours")[1].split("\n## ")[0]
    assert section.count("published (Dice %)") == 3
    assert "ours: resfim (Dice %, mean ± SD over seeds)" in section
    assert "78.07" in section and "76.58 (as LFSC)" in section and "79.45" in section
    assert "not recovered" in section  # prostate sites other than BIDMC, DRIVE, averages
    lines = {ln.split("|")[1].strip(): ln for ln in section.splitlines() if ln.startswith("|")}
    assert "not recovered" in lines["DRIVE"] and "72.74" in lines["ChaseDB"]
    # our column holds numbers from the run, not the published ones
    ours = [ln.split("|")[3].strip() for ln in section.splitlines() if ln.startswith("| MGD-1K")]
    assert ours and ours[0] not in ("–", "82.32")
    assert 0.0 <= float(ours[0]) <= 100.0
    # the per-dataset protocols reached the runs (appendix of the report)
    assert '"lr": 0.0001' in report and '"augment": ["flips"]' in report


class _Res:
    """The three things the published tables read from report Results."""

    def __init__(self, scores):
        self._scores = scores
        self.datasets = sorted(set(scores["dataset"]))

    def headline(self):
        return self._scores

    def sites(self, dataset):
        return sorted(set(self._scores.loc[self._scores["dataset"] == dataset, "client"]))


def test_published_table_puts_the_papers_values_beside_ours() -> None:
    import pandas as pd

    from pflbench.report import published
    from pflbench.suite import Published

    rows = [
        ("gland", m, "fixed", seed, site, v)
        for m, site, vals in [
            ("resfim", "CAMG", (0.70, 0.74)),
            ("resfim", "MGD-1K", (0.80, 0.84)),
            ("fedavg", "CAMG", (0.1, 0.1)),
            ("fedavg", "MGD-1K", (0.1, 0.1)),
        ]
        for seed, v in zip((0, 1), vals, strict=True)
    ]
    scores = pd.DataFrame(rows, columns=["dataset", "method", "label", "seed", "client", "value"])
    pub = Published.model_validate(
        {
            "source": "paper",
            "method": "resfim",
            "datasets": {
                "gland": {
                    "sites": {"MGD-1K": 82.32, "CAMG": 76.58, "Other": 1.0},
                    "names": {"CAMG": "LFSC"},
                },
                "vessel": {"sites": {"DRIVE": 1.0}},  # not in the results: no table
            },
        }
    )
    (table,) = published.tables(_Res(scores), pub)
    cells = table.cells
    pub_col, ours_col = cells.columns
    assert pub_col == "published (Dice %)" and ours_col.startswith("ours: resfim")
    assert cells.loc["MGD-1K", pub_col] == "82.32"
    assert cells.loc["CAMG", pub_col] == "76.58 (as LFSC)"
    assert cells.loc["Avg", pub_col] == "not recovered"
    assert cells.loc["MGD-1K", ours_col] == "82.00 ± 2.83"  # resfim only, in %, over seeds
    assert cells.loc["CAMG", ours_col] == "72.00 ± 2.83"
    assert cells.loc["Avg", ours_col] == "77.00 ± 2.83"  # client macro per seed, then seeds
    assert "published sites not among ours: Other" in table.caption
    assert "not ours" in table.caption
    pub.method = "ditto"
    (none,) = published.tables(_Res(scores), pub)
    assert set(none.cells.iloc[:, 1]) == {"–"} and "no finished ditto runs" in none.caption
