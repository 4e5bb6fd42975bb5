"""Configuration identity: seeds of one configuration are averaged, different ones never are."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from pflbench import configs
from pflbench.report import ReportError, build_report
from pflbench.results import RunRecords, write_run
from pflbench.summary import dice_table, write_summary

SITES = ["s1", "s2", "s3", "s4"]


def write(
    out: Path,
    method: str,
    seed: int,
    dice: float,
    rounds: int = 2,
    label: str = "fixed",
    lr: float = 0.003,
    eval_every: int = 1,
    threads: int = 1,
    dataset: str = "synth",
) -> None:
    """One finished run whose every test case has ``dice`` (plus a small per-site offset)."""
    cases, rds, comm = [], [], []
    for i, site in enumerate(SITES):
        v = dice + 0.002 * i
        for sel in ("best", "last"):
            for c in range(2):
                cases.append(
                    dict(selection=sel, round=rounds, client=site, split="test",
                         case_id=f"{site}-{c}", structure="mean", dice=v, iou=v, hd95=1.0,
                         assd=1.0)
                )  # fmt: skip
        for rd in range(1, rounds + 1):
            rds.append(
                dict(round=rd, client=site, split="val", structure="mean", metric="dice", value=v)
            )
            comm.append(dict(round=rd, client=site, bytes_up=10, bytes_down=10, sampled=True))
    protocol = {
        "rounds": rounds, "local_epochs": 1, "batch_size": 4, "eval_every": eval_every,
        "optimizer": {"name": "adam", "lr": lr}, "threads": threads, "device": "cpu",
    }  # fmt: skip
    key = f"{dataset}-{method}-{label}-r{rounds}-lr{lr}-e{eval_every}-t{threads}-s{seed}"
    manifest = dict(
        run_key=key, dataset=dataset, method=method, method_name=method, label=label, seed=seed,
        params={}, protocol=protocol, model={"name": "unet"}, mode="final",
        data_fingerprint="fp", versions={"pflbench": "0.1.0"}, sites=SITES,
    )  # fmt: skip
    write_run(
        out,
        key,
        RunRecords(pd.DataFrame(rds), pd.DataFrame(comm), pd.DataFrame(cases), manifest),
    )


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """The issue's folder: `rounds: 2` then `rounds: 3` rerun into the same --out."""
    for seed in (0, 1):
        write(tmp_path, "local", seed, 0.30, rounds=2)
        write(tmp_path, "fedavg", seed, 0.031, rounds=2)
        write(tmp_path, "fedavg", seed, 0.407, rounds=3)
    return tmp_path


def _main_rows(md: str) -> dict[str, list[str]]:
    """Method → cells of the main table in report.md."""
    part = md.split("## Main results", 1)[1].split("\n## ", 1)[0]
    rows = [ln.strip("| ").split(" | ") for ln in part.splitlines() if ln.startswith("| ")]
    return {r[0]: r[1:] for r in rows[1:] if not r[0].startswith(":--")}


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+\.\d{3}", text))


def test_config_key_ignores_seed_and_local_fields_only():
    base = dict(
        dataset="d", method="fedavg", label="fixed", seed=0, params={"mu": 0.1},
        protocol={"rounds": 2, "threads": 1, "device": "cpu", "optimizer": {"lr": 0.1}},
        model={"name": "unet"}, data_fingerprint="fp", versions={"pflbench": "0.1.0"},
    )  # fmt: skip
    other_seed = {**base, "seed": 7, "run_key": "x", "timings": {"total_s": 3}}
    other_host = {**base, "protocol": {**base["protocol"], "threads": 4, "device": "cuda"}}
    assert (
        configs.config_key(base) == configs.config_key(other_seed) == configs.config_key(other_host)
    )
    more_rounds = {**base, "protocol": {**base["protocol"], "rounds": 3}}
    other_lr = {**base, "protocol": {**base["protocol"], "optimizer": {"lr": 0.2}}}
    other_mu = {**base, "params": {"mu": 0.01}}
    keys = {configs.config_key(m) for m in (base, more_rounds, other_lr, other_mu)}
    assert len(keys) == 4
    assert configs.differing_keys([base, more_rounds, other_lr]) == {
        "protocol.optimizer.lr": [0.1, 0.2],
        "protocol.rounds": [2, 3],
    }


def test_mixed_configurations_are_refused_with_the_differing_keys(mixed):
    with pytest.raises(ReportError) as err:
        build_report(mixed, out=mixed / "rep")
    msg = str(err.value)
    assert "synth / fedavg / fixed: 2 configurations differing in protocol.rounds: 2 vs 3" in msg
    assert "--select protocol.rounds=3" in msg and "--split-configs" in msg and "--out" in msg
    assert "local" not in msg  # one configuration: not a conflict
    assert not (mixed / "rep" / "report.md").exists()


def test_split_configs_shows_each_configuration_and_never_the_merged_number(mixed):
    out = build_report(mixed, out=mixed / "rep", split_configs=True, reference="local")
    md = (out / "report.md").read_text(encoding="utf-8")
    rows = _main_rows(md)
    # client-macro of the planted values: 0.031 / 0.407 plus the mean site offset 0.003
    assert rows["fedavg [rounds=2]"][0] == "0.034 ± 0.000"
    assert rows["fedavg [rounds=3]"][0] == "**0.410 ± 0.000**"
    merged = f"{(0.034 + 0.410) / 2:.3f}"  # what the old report printed as one "fedavg" row
    assert merged == "0.222" and merged not in _numbers(md)
    assert not any(r.startswith("fedavg |") for r in rows)
    # the default reference never silently becomes another method
    with pytest.raises(ReportError, match=r"--reference 'fedavg \[rounds=3\]'"):
        build_report(mixed, out=mixed / "rep2", split_configs=True)


def test_select_keeps_the_matching_configuration(mixed):
    out = build_report(mixed, out=mixed / "rep", select={"protocol.rounds": "3"})
    md = (out / "report.md").read_text(encoding="utf-8")
    assert _main_rows(md)["fedavg"][0] == "0.410 ± 0.000" and "0.034" not in md
    assert "2 of 6 finished runs are reported" in md
    with pytest.raises(ReportError, match="no run has the key 'rounds'"):
        build_report(mixed, out=mixed / "rep", select={"rounds": "3"})
    with pytest.raises(configs.ConfigError, match="expected KEY=VALUE"):
        configs.parse_select(["protocol.rounds"])


def test_summary_rows_are_configurations(mixed):
    table, split = dice_table(mixed)
    names = [m for _, m in table.index]
    assert sorted(names) == ["fedavg [rounds=2]", "fedavg [rounds=3]", "local"]
    text = write_summary(mixed, (table, split)).read_text()
    assert "0.221" not in text and "0.034 ± 0.000" in text and "0.409 ± 0.000" in text


def test_summary_one_seed_shows_no_spread(tmp_path):
    write(tmp_path, "fedavg", 0, 0.5)
    text = write_summary(tmp_path).read_text()
    assert "0.503" in text and "±" not in text.split("\n", 2)[2]


def test_tuned_shared_hyperparameters_are_not_a_protocol_difference(tmp_path):
    for seed in (0, 1):
        write(tmp_path, "fedavg", seed, 0.5, label="tuned", lr=0.004430375245218269)
        write(tmp_path, "fedavg", seed, 0.45, label="default", lr=0.003)
        write(tmp_path, "local", seed, 0.4, label="tuned", lr=0.02, threads=2)
        write(tmp_path, "local", seed, 0.38, label="default", lr=0.003)
    md = (build_report(tmp_path, out=tmp_path / "rep") / "report.md").read_text(encoding="utf-8")
    assert "different protocols" not in md


def test_a_real_protocol_difference_between_methods_is_still_flagged(tmp_path):
    for seed in (0, 1):
        write(tmp_path, "fedavg", seed, 0.5, label="tuned", eval_every=1)
        write(tmp_path, "local", seed, 0.4, label="tuned", eval_every=2)
    md = (build_report(tmp_path, out=tmp_path / "rep") / "report.md").read_text(encoding="utf-8")
    line = next(ln for ln in md.splitlines() if "different protocols" in ln)
    assert "(eval_every: 1 vs 2)" in line


def test_configurations_table_cites_tuned_values_space_and_trials(tmp_path):
    from pflbench.report import tables
    from pflbench.report.data import load

    space = {
        "lr": dict(name="lr", source="shared", kind="float", low=0.001, high=0.1, log=True),
        "local_epochs": dict(name="local_epochs", source="shared", kind="int", low=1, high=3),
        "mu": dict(name="mu", source="method", kind="float", low=1e-4, high=1.0, log=True),
    }
    for seed in (0, 1):
        write(tmp_path, "fedprox", seed, 0.5, label="tuned", lr=0.004430375245218269)
        write(tmp_path, "fedprox", seed, 0.45, label="default", lr=0.003)
    for d in (tmp_path / "results").iterdir():  # what tuning.final_spec records
        man = json.loads((d / "manifest.json").read_text())
        tuned = man["label"] == "tuned"
        man.update(search_space=space, tuning_budget=6, params={"mu": 0.0123456 if tuned else 0.01})
        if tuned:
            man["tuning_trial"] = 4
        (d / "manifest.json").write_text(json.dumps(man))
    t = tables.configurations_table(load(tmp_path))
    assert t is not None
    row = t.cells.loc["synth / fedprox / tuned"]
    assert row["Hyperparameters"] == "lr = 0.00443; local_epochs = 1; mu = 0.0123"
    assert row["Search space"] == (
        "lr ∈ [0.001, 0.1] (log); local_epochs ∈ {1, …, 3}; mu ∈ [0.0001, 1] (log)"
    )
    assert row["Trials"] == "6 (best #4)"
    assert t.cells.loc["synth / fedprox / default", "Hyperparameters"].startswith("lr = 0.003;")
    assert "0.004430375245218269" not in t.cells.to_string()
