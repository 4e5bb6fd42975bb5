"""Suite validation: every bad input gets one line naming the file, the key and the expectation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pflbench.suite import SuiteError, load_suite, parse_suite

GOOD = {
    "name": "t",
    "datasets": [{"name": "synthetic", "options": {"flavour": "fundus", "size": 16}}],
    "methods": ["fedavg", {"name": "local"}],
    "seeds": [0],
    "model": {"name": "unet", "options": {"base": 4, "depth": 2}},
    "protocol": {"rounds": 2},
}


def write(tmp_path: Path, data, name: str = "suite.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def bad(tmp_path: Path, data) -> str:
    path = write(tmp_path, data)
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    msg = str(info.value)
    assert str(path) in msg
    return msg


def test_good_suite_loads_with_shorthands(tmp_path):
    suite = load_suite(write(tmp_path, GOOD))
    assert [m.name for m in suite.methods] == ["fedavg", "local"]
    assert suite.protocol.local_epochs == 1 and suite.protocol.local_steps is None


def test_malformed_yaml_names_line(tmp_path):
    msg = bad(tmp_path, "name: t\nmethods: [fedavg\nseeds: [0]\n")
    assert "malformed YAML" in msg and "suite.yaml:" in msg


def test_unknown_key_is_named(tmp_path):
    msg = bad(tmp_path, {**GOOD, "protocol": {"rounds": 2, "roundz": 3}})
    assert "protocol.roundz: unknown key" in msg


def test_unknown_method_suggests(tmp_path):
    msg = bad(tmp_path, {**GOOD, "methods": ["fedavgg"]})
    assert (
        "methods[0]" in msg and "unknown method 'fedavgg'" in msg and "did you mean 'fedavg'" in msg
    )


def test_non_positive_rounds(tmp_path):
    msg = bad(tmp_path, {**GOOD, "protocol": {"rounds": 0}})
    assert "protocol.rounds" in msg and "greater than 0" in msg


def test_missing_data_root(tmp_path):
    ds = {"name": "synthetic", "options": {"root": str(tmp_path / "nope")}}
    msg = bad(tmp_path, {**GOOD, "datasets": [ds]})
    assert "datasets[0].options.root" in msg and "does not exist" in msg


def test_unset_environment_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("PFLBENCH_NOPE", raising=False)
    ds = {"name": "synthetic", "options": {"root": "$PFLBENCH_NOPE/prostate"}}
    msg = bad(tmp_path, {**GOOD, "datasets": [ds]})
    assert "$PFLBENCH_NOPE is not set" in msg and "datasets[0].options" in msg


def test_environment_variables_expand(tmp_path, monkeypatch):
    monkeypatch.setenv("PFLB_OUT", str(tmp_path / "o"))
    suite = load_suite(write(tmp_path, {**GOOD, "out": "${PFLB_OUT}/runs"}))
    assert suite.out == f"{tmp_path}/o/runs"


def test_unknown_method_parameter(tmp_path):
    msg = bad(tmp_path, {**GOOD, "methods": [{"name": "fedavg", "params": {"mu": 1}}]})
    assert "methods[0]" in msg and "unknown parameter(s) ['mu']" in msg


def test_unknown_dataset_option(tmp_path):
    ds = {"name": "synthetic", "options": {"flavor": "fundus"}}
    msg = bad(tmp_path, {**GOOD, "datasets": [ds]})
    assert "datasets[0].options" in msg and "'flavor'" in msg


def test_duplicate_labels_and_seeds(tmp_path):
    assert "appear more than once" in bad(tmp_path, {**GOOD, "methods": ["fedavg", "fedavg"]})
    assert "distinct" in bad(tmp_path, {**GOOD, "seeds": [1, 1]})


def test_epochs_and_steps_are_exclusive(tmp_path):
    msg = bad(tmp_path, {**GOOD, "protocol": {"rounds": 2, "local_epochs": 1, "local_steps": 3}})
    assert "exactly one of local_epochs and local_steps" in msg
    ok = load_suite(write(tmp_path, {**GOOD, "protocol": {"rounds": 2, "local_steps": 3}}))
    assert ok.protocol.local_epochs is None and ok.protocol.local_steps == 3


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("suites/*.yaml")))
def test_shipped_suites_validate(path, monkeypatch, tmp_path):
    """Every shipped suite is valid; real-data suites may only miss their data folders here."""
    monkeypatch.setenv("PFLBENCH_DATA", str(tmp_path))
    try:
        load_suite(path)
    except SuiteError as exc:
        problems = [line for line in str(exc).splitlines() if line.startswith(str(path))]
        assert problems, exc
        assert all("options.root: data folder" in line for line in problems), exc


def test_suite_workers_setting_is_validated_and_resolved(tmp_path):
    from pflbench.pool import resolve_workers

    base = {
        "name": "w",
        "datasets": [{"name": "synthetic"}],
        "methods": ["fedavg"],
        "seeds": [0],
        "protocol": {"rounds": 1},
    }
    assert parse_suite(base, "w.yaml").workers == 1
    assert parse_suite({**base, "workers": "auto"}, "w.yaml").workers == "auto"
    with pytest.raises(SuiteError, match=r"w.yaml.*workers.*≥ 1"):
        parse_suite({**base, "workers": 0}, "w.yaml")
    with pytest.raises(SuiteError, match=r"workers"):
        parse_suite({**base, "workers": "many"}, "w.yaml")
    assert resolve_workers("auto", threads=1, cpus=8) == 8
    assert resolve_workers("auto", threads=3, cpus=8) == 2
    assert resolve_workers("auto", threads=None, cpus=8) == 1  # torch takes every core itself
    assert resolve_workers(3, threads=None, cpus=8) == 3
    assert resolve_workers("bogus", cpus=8) == 1  # a raw peek at a bad file: validation reports it
