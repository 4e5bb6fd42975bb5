"""`pflbench show` and `list` for every plugin kind, and `data check` on part of a dataset."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from fixtures_data import make_prostate_tree

from pflbench.cli import main


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_show_a_dataset_lists_its_options_and_layout():
    res = _invoke("show", "prostate")
    assert res.exit_code == 0, res.output
    assert "prostate (dataset)" in res.output and "Fed-Prostate" in res.output
    assert "root" in res.output and "required" in res.output and "sites" in res.output
    assert "RUNMC/" in res.output  # the expected folder layout
    from pflbench.datasets.prostate import Prostate

    # provenance, as docs/datasets.md has it
    for title in ("project page:", "licence:", "how to get it:", "cite:"):
        assert title in res.output
    assert Prostate.homepage.split()[0] in res.output.replace("\n", "")


def test_show_a_model_and_a_method():
    model = _invoke("show", "unet")
    assert model.exit_code == 0 and "unet (model)" in model.output and "depth" in model.output
    method = _invoke("show", "ditto")
    assert method.exit_code == 0 and "personal_epochs" in method.output


def test_show_an_unknown_name_suggests_across_kinds():
    res = _invoke("show", "prostat")
    assert res.exit_code == 2
    assert "did you mean 'prostate'" in res.output


def test_list_datasets_and_models_have_summaries():
    for kind in ("datasets", "models"):
        res = _invoke("list", kind)
        assert res.exit_code == 0
        rows = [line for line in res.output.splitlines() if "pflbench." in line]
        assert rows
        for row in rows:  # name │ source │ summary: the summary cell is never empty
            cells = [c.strip() for c in row.strip("│ ").split("│")]
            assert cells[-1], row


@pytest.fixture
def partial_prostate(tmp_path):
    """A copy of two of the six prostate sites."""
    make_prostate_tree(tmp_path / "p", sites={"RUNMC": 3, "BMC": 3})
    return tmp_path / "p"


def test_data_check_of_a_partial_copy_passes_with_sites(partial_prostate):
    res = _invoke(
        "data", "check", "prostate", "--root", str(partial_prostate), "--sites", "RUNMC,BMC"
    )
    assert res.exit_code == 0, res.output
    assert "no problems found" in res.output
    whole = _invoke("data", "check", "prostate", "--root", str(partial_prostate))
    assert whole.exit_code == 1
    assert "I2CVB" in whole.output
    # the expected layout is printed once, after the list of problems
    assert whole.output.count("Expected layout under") == 1
    assert whole.output.rindex("Expected layout under") > whole.output.rindex("  - ")


def test_data_check_options_are_validated(partial_prostate):
    root = str(partial_prostate)
    res = _invoke("data", "check", "prostate", "--root", root, "--option", "sizee=32")
    assert res.exit_code == 2 and "sizee" in res.output and "size" in res.output
    res = _invoke("data", "check", "prostate", "--root", root, "--option", "nonsense")
    assert res.exit_code == 2 and "KEY=VALUE" in res.output
    res = _invoke(
        "data", "check", "prostate", "--root", root, "--sites", "RUNMC", "--option", "size=32"
    )
    assert res.exit_code == 0, res.output
