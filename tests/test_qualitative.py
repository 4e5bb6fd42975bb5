"""The qualitative figure: the masks a run stores, the fixed case rule, and the report's choice.

Runs are tiny (16 px, 2 rounds); the report half uses planted result folders written with
:func:`pflbench.results.write_run`, so the chosen methods, seed and cases are known in advance.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_MODEL, fast_protocol, tiny_federation

from pflbench import configs, qualitative
from pflbench.data import FederatedData, SiteData, make_splits
from pflbench.engine import Federation, predict
from pflbench.registry import get_method
from pflbench.report import build_report
from pflbench.report import qualitative as rqual
from pflbench.report.data import load
from pflbench.results import (
    ResultsError,
    RunRecords,
    read_manifest,
    read_qualitative,
    results_dir,
    write_alias,
    write_run,
)
from pflbench.runner import RunSpec, execute
from pflbench.state import MemoryStore
from pflbench.suite import UNKEYED, DatasetSpec, MethodSpec, ModelSpec, Protocol

# ------------------------------------------------------------------------- the stored cases


class KeepingStore(MemoryStore):
    """A memory store that keeps its records after the run, so a test can reload snapshots."""

    def close(self) -> None:
        pass


def _run(data: FederatedData, method: str = "fedavg", seed: int = 0, **proto):
    store = KeepingStore()
    protocol = fast_protocol(rounds=3, eval_every=1, selection="best", **proto)
    fed = Federation(
        data, make_splits(data), get_method(method)(), TINY_MODEL, protocol, seed, store=store
    )
    return fed, fed.run(), store


def _dice(pred: np.ndarray, true: np.ndarray) -> float:
    p, t = pred > 0, true > 0
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else 2.0 * (p & t).sum() / denom


def test_stored_masks_are_the_selected_models_predictions():
    data = tiny_federation(n=12)
    fed, out, store = _run(data, qualitative_cases=2)
    assert len(out.qualitative) == 2 * len(data.sites)
    best = out.cases[(out.cases["selection"] == "best") & (out.cases["split"] == "test")]
    for c in out.qualitative:
        test = fed.by_id[c.client].test
        assert c.round == out.info["selected_rounds"][c.client]
        snapshot = store.get(f"{c.client}/snapshot")["module"]  # the selected round's model
        i = test.case_ids.index(c.case_id)
        want = predict(snapshot, test, torch.device("cpu"))[i].numpy()
        np.testing.assert_array_equal(c.pred, want)
        np.testing.assert_array_equal(c.label, test.labels[i].numpy())
        img = np.rint(test.images[i, 0].numpy() * 255)
        assert np.abs(c.image[..., 0].astype(float) - img).max() <= 1  # not yet JPEG-coded
        # the stored masks give the Dice the cases table recorded for the selected round
        row = best[(best["client"] == c.client) & (best["case_id"] == c.case_id)]
        assert _dice(c.pred, c.label) == pytest.approx(float(row["dice"].iloc[0]))
    assert any(c.pred.any() for c in out.qualitative)  # a real prediction, not an empty one


def test_every_method_and_seed_stores_the_same_cases():
    data = tiny_federation(n=16)  # 3 test cases per site
    seen = []
    for method, seed in (("fedavg", 0), ("local", 0), ("fedbn", 1)):
        _, out, _ = _run(data, method, seed)
        seen.append(out.qualitative)
    ids = [[(c.client, c.case_id, c.slice_index) for c in q] for q in seen]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 3 * len(data.sites)
    for other in seen[1:]:
        for a, b in zip(seen[0], other, strict=True):
            np.testing.assert_array_equal(a.label, b.label)
            np.testing.assert_array_equal(a.image, b.image)
    splits = make_splits(data)
    for site in data.site_names:  # the candidates are the rule's, from the test split only
        want = qualitative.candidate_cases(site, splits[site]["test"], 3)
        assert [c.case_id for c in seen[0] if c.client == site] == want


def test_candidate_rule_is_the_hash_order_of_the_case_ids():
    cases = [f"p{i:02d}" for i in range(10)]
    got = qualitative.candidate_cases("siteA", cases, 3)
    by_hash = sorted(cases, key=lambda c: hashlib.sha256(f"siteA/{c}".encode()).hexdigest())
    assert got == by_hash[:3]
    assert qualitative.candidate_cases("siteA", cases[::-1], 3) == got  # not the input order
    assert qualitative.candidate_cases("siteA", cases + cases, 3) == got  # slices of volumes
    assert qualitative.candidate_cases("siteB", cases, 3) != got  # per site
    assert qualitative.candidate_cases("siteA", cases, 0) == []
    assert len(qualitative.candidate_cases("siteA", cases[:2], 3)) == 2


def test_representative_slice_has_the_most_foreground_nearest_the_middle():
    lab = np.zeros((5, 4, 4), np.int64)
    lab[0, :2] = 1  # 8 pixels
    lab[4, :2] = 2  # 8 pixels, same count: slice 4 is as far from the middle (2) as slice 0
    lab[1, :1] = 1  # 4 pixels
    assert qualitative.representative_slice(lab) == 0
    lab[3, :2] = 1  # 8 pixels, nearer the middle
    assert qualitative.representative_slice(lab) == 3
    assert qualitative.representative_slice(np.zeros((4, 2, 2))) == 1  # empty: the middle


def _volumes() -> FederatedData:
    """Two sites of 3-slice volumes (case_level volume), so a case is several images."""
    sites = []
    for k in range(2):
        base = tiny_federation(n_sites=1, n=18).sites[0]
        case_ids = [f"v{k}-{i // 3}" for i in range(18)]
        slices = [i % 3 for i in range(18)]
        sites.append(
            SiteData(f"s{k}", base.images, base.labels, case_ids=case_ids, slice_index=slices)
        )
    return FederatedData("vol", sites, ["background", "blob"], {"blob": [1]}, "volume")


def test_a_volume_stores_its_most_foreground_slice():
    data = _volumes()
    fed, out, store = _run(data, qualitative_cases=1)
    assert len(out.qualitative) == 2
    for c in out.qualitative:
        test = fed.by_id[c.client].test
        idx = [i for i, cid in enumerate(test.case_ids) if cid == c.case_id]
        fg = [int((test.labels[i] > 0).sum()) for i in idx]
        i = idx[qualitative.representative_slice(test.labels[idx].numpy())]
        assert fg[idx.index(i)] == max(fg) and c.slice_index == test.slice_index[i]
        snapshot = store.get(f"{c.client}/snapshot")["module"]
        np.testing.assert_array_equal(
            c.pred, predict(snapshot, test, torch.device("cpu"))[i].numpy()
        )


def test_a_volumes_slices_are_ranked_in_slice_order_not_storage_order():
    """Slices stored out of order (1, 2, 0) with equal foreground: the tie goes to the middle
    slice of the volume (slice 1), not to the middle of the storage order (slice 2)."""
    sites = []
    for k in range(2):
        base = tiny_federation(n_sites=1, n=18).sites[0]
        first = [3 * (i // 3) for i in range(18)]  # every slice of a case: its first image
        sites.append(
            SiteData(
                f"s{k}",
                base.images[first].clone(),
                base.labels[first].clone(),
                case_ids=[f"v{k}-{i // 3}" for i in range(18)],
                slice_index=[(1, 2, 0)[i % 3] for i in range(18)],
            )
        )
    data = FederatedData("vol", sites, ["background", "blob"], {"blob": [1]}, "volume")
    _, out, _ = _run(data, qualitative_cases=1)  # one test volume per site
    assert [c.slice_index for c in out.qualitative] == [1, 1]


def test_file_round_trip_keeps_masks_exact_and_the_image_close():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :24]
    img = np.stack([yy * 8, xx * 8, 255 - yy * 5], axis=-1).astype(np.uint8)  # smooth, like scans
    lab = rng.integers(0, 3, (24, 24)).astype(np.uint8)
    case = qualitative.Case("a", "c1", 2, 7, img, lab, (lab + 1) % 3)
    grey = qualitative.Case("b", "c2", 0, 5, img[..., :1], lab, lab)
    cases, classes = qualitative.from_bytes(qualitative.to_bytes([case, grey], ["bg", "x", "y"]))
    assert classes == ["bg", "x", "y"]
    assert [(c.client, c.case_id, c.slice_index, c.round) for c in cases] == [
        ("a", "c1", 2, 7),
        ("b", "c2", 0, 5),
    ]
    np.testing.assert_array_equal(cases[0].pred, (lab + 1) % 3)
    np.testing.assert_array_equal(cases[1].label, lab)
    assert cases[0].image.shape == (24, 24, 3) and cases[1].image.shape == (24, 24, 1)
    assert np.abs(cases[0].image.astype(int) - img).max() <= 8  # JPEG: display only
    big = np.zeros((300, 150, 1), np.uint8)
    shrunk = qualitative.decode_image(qualitative.encode_image(big))
    assert shrunk.shape == (qualitative.IMAGE_SIDE, qualitative.IMAGE_SIDE // 2, 1)


# ------------------------------------------------------------------------- results folder


def _records(blob: bytes | None) -> RunRecords:
    cases = pd.DataFrame(
        [dict(selection="best", round=1, client="a", split="test", case_id="c1",
              structure="x", dice=0.5, iou=1 / 3, hd95=1.0, assd=1.0)]
    )  # fmt: skip
    manifest = {"run_key": "k", "dataset": "d", "method": "m", "label": "fixed", "seed": 0}
    return RunRecords(pd.DataFrame(), pd.DataFrame(), cases, manifest, qualitative=blob)


def _blob() -> bytes:
    lab = np.eye(8, dtype=np.uint8)
    return qualitative.to_bytes(
        [qualitative.Case("a", "c1", 0, 1, lab[..., None] * 200, lab, lab)], ["bg", "x"]
    )


def test_the_file_is_hashed_in_the_manifest_and_corruption_is_an_error(tmp_path):
    d = write_run(tmp_path, "k", _records(_blob()))
    manifest = read_manifest(tmp_path, "k")
    entry = manifest["files"][qualitative.FILE]
    assert entry["sha256"] == hashlib.sha256((d / qualitative.FILE).read_bytes()).hexdigest()
    cases, classes = read_qualitative(d, manifest)
    assert cases[0].case_id == "c1" and classes == ["bg", "x"]
    alias = write_alias(tmp_path, "k", "k-tuned", label="tuned")  # copied with the run
    assert read_qualitative(alias, read_manifest(tmp_path, "k-tuned"))[0][0].case_id == "c1"
    blob = (d / qualitative.FILE).read_bytes()
    (d / qualitative.FILE).write_bytes(blob[:-10])
    with pytest.raises(ResultsError, match=r"qualitative\.npz.*hash mismatch"):
        read_qualitative(d, manifest)
    (d / qualitative.FILE).unlink()
    with pytest.raises(ResultsError, match=r"qualitative\.npz: unreadable"):
        read_qualitative(d, manifest)
    # a file the manifest does not list (hand-made folder) is still parsed, and garbage is named
    (d / qualitative.FILE).write_bytes(b"not an npz")
    with pytest.raises(ResultsError, match="not a readable qualitative file"):
        read_qualitative(d, {})


def test_a_run_without_the_file_reads_as_none(tmp_path):
    d = write_run(tmp_path, "k", _records(None))
    manifest = read_manifest(tmp_path, "k")
    assert qualitative.FILE not in manifest["files"] and read_qualitative(d, manifest) is None


def test_storing_masks_changes_neither_the_run_key_nor_a_number(tmp_path):
    def spec(k: int) -> RunSpec:
        return RunSpec(
            dataset=DatasetSpec(name="synthetic", options={"flavour": "fundus", "size": 16,
                                                           "images_per_site": [5, 5]}),
            method=MethodSpec(name="fedavg"),
            seed=0,
            protocol=fast_protocol(rounds=1, qualitative_cases=k),
            model=TINY_MODEL,
        )  # fmt: skip

    key_a, _ = execute(spec(2), tmp_path / "a")
    key_b, _ = execute(spec(0), tmp_path / "b")
    man_a, man_b = read_manifest(tmp_path / "a", key_a), read_manifest(tmp_path / "b", key_b)
    assert key_a == key_b and configs.config_key(man_a) == configs.config_key(man_b)
    a, b = results_dir(tmp_path / "a") / key_a, results_dir(tmp_path / "b") / key_b
    assert (a / qualitative.FILE).exists() and not (b / qualitative.FILE).exists()
    for t in ("rounds", "cases", "comm"):
        assert man_a["files"][f"{t}.parquet"] == man_b["files"][f"{t}.parquet"]
    cases, classes = read_qualitative(a, man_a)
    assert len(cases) == 2 * 1 and classes == ["background", "disc", "cup"]  # 1 test case/site
    assert (a / qualitative.FILE).stat().st_size < 20_000
    key_c, _ = execute(spec(2), tmp_path / "c")  # the same run again: the same bytes
    man_c = read_manifest(tmp_path / "c", key_c)
    assert man_c["files"][qualitative.FILE] == man_a["files"][qualitative.FILE]


def test_protocol_option_is_validated_and_never_keyed():
    with pytest.raises(ValueError, match="qualitative_cases"):
        Protocol(rounds=2, qualitative_cases=-1)
    spec = [
        RunSpec(DatasetSpec(name="synthetic"), MethodSpec(name="fedavg"), 0,
                Protocol(rounds=2, qualitative_cases=k), ModelSpec())
        for k in (0, 3, 7)
    ]  # fmt: skip
    assert len({s.key("abc") for s in spec}) == 1
    assert "qualitative_cases" not in spec[0].semantic("abc")["protocol"]
    assert set(UNKEYED) == set(configs.LOCAL_PROTOCOL)  # run key and configuration agree


# ------------------------------------------------------------------------- the report's choice

SITES = ("A", "B")
#: Planted client-macro level of each method: b is the best other method, c the worst.
LEVEL = {"fedavg": 0.6, "a": 0.7, "b": 0.8, "c": 0.3}
#: The reference's per-case Dice of seed 1 (seed 0 of c stores no masks): median = c2 at A,
#: c0 at B (lower median of 4 ties broken by case id: c0 < c3 at 0.5).
REF_DICE = {"A": {"c0": 0.9, "c1": 0.1, "c2": 0.5}, "B": {"c0": 0.5, "c1": 0.2, "c2": 0.95,
                                                         "c3": 0.5}}  # fmt: skip
METHOD_CODE = {"fedavg": 1, "a": 2, "b": 3, "c": 4}  # each method's masks hold its own value


def _planted(out, method: str, seed: int, store: bool, dataset: str = "d") -> None:
    rows, cases = [], []
    for site in SITES:
        for case, ref in REF_DICE[site].items():
            dice = ref if method == "fedavg" else LEVEL[method] + 0.01 * int(case[1])
            for st in ("x", "y"):
                rows.append(dict(selection="best", round=2, client=site, split="test",
                                 case_id=case, structure=st, dice=dice, iou=dice,
                                 hd95=1.0, assd=1.0))  # fmt: skip
            pred = np.full((6, 6), METHOD_CODE[method], np.uint8)
            label = np.full((6, 6), 1, np.uint8)
            image = np.full((6, 6, 1), 10 * int(case[1]), np.uint8)
            cases.append(qualitative.Case(site, case, 0, 2, image, label, pred))
    key = f"{dataset}-{method}-s{seed}"
    manifest = dict(run_key=key, dataset=dataset, method=method, label="fixed", seed=seed,
                    protocol={"rounds": 2}, sites=list(SITES), structures=["x", "y"],
                    data_fingerprint=f"fp-{dataset}", case_level="image")  # fmt: skip
    blob = qualitative.to_bytes(cases, ["bg", "fg"]) if store else None
    write_run(out, key, RunRecords(pd.DataFrame(), pd.DataFrame(), pd.DataFrame(rows), manifest,
                                   qualitative=blob))  # fmt: skip


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Dataset d: every run stores masks except seed 0 of c; dataset e: no run stores any."""
    out = tmp_path_factory.mktemp("planted")
    for m in LEVEL:
        for seed in (0, 1):
            _planted(out, m, seed, store=not (m == "c" and seed == 0))
            _planted(out, m, seed, store=False, dataset="e")
    return out


@pytest.fixture(scope="module")
def report(planted):
    return build_report(planted)


def test_report_picks_the_references_median_case_of_the_best_and_worst(planted):
    res = load(planted)
    ranking = res.headline().query("dataset == 'd'").groupby("method")["value"].mean()
    sel, why = rqual.select(res, planted, "d", "fedavg", ranking)
    assert why == "" and sel is not None
    assert sel.roles == [("reference", "fedavg"), ("best", "b"), ("worst", "c")]
    assert sel.seed == 1  # the lowest seed where every shown method stored masks
    assert [(r.site, r.case_id) for r in sel.rows] == [("A", "c2"), ("B", "c0")]
    for r in sel.rows:
        for m, pred in r.preds.items():
            assert (pred == METHOD_CODE[m]).all()  # each panel holds its own method's masks
        assert r.dice["fedavg"] == REF_DICE[r.site][r.case_id]
        assert r.dice["b"] == pytest.approx(0.8 + 0.01 * int(r.case_id[1]))
        assert (r.image == 10 * int(r.case_id[1])).all()
    none, why = rqual.select(res, planted, "e", "fedavg", ranking)
    assert none is None and "store no predicted masks" in why


def test_median_rule_and_roles_by_hand():
    assert rqual.median_case({"x": 0.3, "y": 0.9, "z": 0.5}) == "z"
    assert rqual.median_case({"x": 0.3, "y": 0.9, "z": 0.5, "w": 0.7}) == "z"  # lower median
    assert rqual.median_case({"q": 0.4}) == "q"
    s = pd.Series({"ref": 0.1, "m1": 0.5, "m2": 0.9})
    assert rqual.roles("ref", s, True) == [("reference", "ref"), ("best", "m2"), ("worst", "m1")]
    assert rqual.roles("ref", s, False) == [("reference", "ref"), ("best", "m1"), ("worst", "m2")]
    assert rqual.roles("ref", s[["ref", "m1"]], True) == [("reference", "ref"), ("other", "m1")]


def test_report_draws_the_figure_in_markdown_and_html(report):
    png = report / "figures" / "qualitative_d.png"
    assert png.exists() and (report / "figures" / "qualitative_d.pdf").exists()
    assert (report / "figures" / "column" / "qualitative_d.png").exists()
    md = (report / "report.md").read_text(encoding="utf-8")
    assert "![qualitative_d](figures/qualitative_d.png)" in md
    assert "median Dice of the reference fedavg" in md and "seed 1" in md
    html = (report / "report.html").read_text(encoding="utf-8")
    assert 'alt="qualitative_d"' in html


def test_a_dataset_without_stored_masks_still_reports(report, planted):
    md = (report / "report.md").read_text(encoding="utf-8")
    assert "No qualitative figure for e (its runs store no predicted masks" in md
    assert not list((report / "figures").glob("qualitative_e*"))
    manifest = json.loads((results_dir(planted) / "e-a-s0" / "manifest.json").read_text())
    assert qualitative.FILE not in manifest["files"]
    assert "dataset_e" in {p.stem for p in (report / "tables").glob("*.tex")}  # reported
