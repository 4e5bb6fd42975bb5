"""The nnU-Net v2 raw dataset loader (`nnunet`) on fixture trees in the real layout and formats."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures_data import NNUNET_MULTI, make_nnunet_tree, write_nifti, write_pillow

from pflbench.cli import main
from pflbench.data import DataError, make_splits
from pflbench.datasets import _io
from pflbench.datasets.nnunet import NNUNet


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PFLBENCH_CACHE", str(tmp_path / "default-cache"))


def rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def check_cli(root: Path, *options: str):
    args = ["data", "check", "nnunet", "--root", str(root)]
    for o in options:
        args += ["--option", o]
    return CliRunner().invoke(main, args, env={"COLUMNS": "250"})


# ------------------------------------------------------------------------------------------
# What load() returns
# ------------------------------------------------------------------------------------------


def test_csv_sites_nifti_volumes_become_foreground_slices_split_by_case(tmp_path: Path) -> None:
    tree = make_nnunet_tree(tmp_path, {"A": 3, "B": 4}, fg_slices=(1, 2))
    data = NNUNet(root=str(tree.root), sites_csv="sites.csv", size=16, cache=False).load()
    assert data.site_names == ["A", "B"]
    assert data.classes == ["background", "prostate"] and data.structures == {"prostate": [1]}
    assert data.case_level == "volume"
    for site in data.sites:
        assert site.cases == tree.cases[site.name]
        assert len(site) == tree.images[site.name]  # 2 foreground slices of 4 per volume
        assert sorted(set(site.slice_index)) == [1, 2]
        assert site.images.shape[1:] == (1, 16, 16) and set(site.labels.unique().tolist()) == {0, 1}
        assert 0.0 <= float(site.images.min()) and float(site.images.max()) <= 1.0
        # 20×24 in-plane padded to 24, resized to 16: the header's 0.5 mm becomes 0.75 mm
        assert site.spacing == pytest.approx((0.75, 0.75))
        parts = make_splits(data)[site.name]
        flat = [c for ids in parts.values() for c in ids]
        assert sorted(flat) == sorted(site.cases) and len(flat) == len(set(flat))
    keep = NNUNet(root=str(tree.root), sites_csv="sites.csv", size=16, keep_empty=True, cache=False)
    assert [len(s) for s in keep.load().sites] == [3 * 4, 4 * 4]


def test_folder_per_site_rgb_png_multiclass_and_the_chosen_channel(tmp_path: Path) -> None:
    tree = make_nnunet_tree(
        tmp_path,
        {"North": 3, "South": 3},
        layout="folders",
        ending=".png",
        labels=NNUNET_MULTI,
        channels=("R", "G", "B"),
        rgb_png=True,
    )
    # 20×24 images padded to 24×24: size 24 means no resampling, so pixels compare exactly
    data = NNUNet(root=str(tree.root), channel="G", size=24, cache=False).load()
    assert data.site_names == ["North", "South"] and data.case_level == "image"
    assert data.classes == ["background", "zone", "core"]
    assert data.structures == {"zone": [1], "core": [2]}
    from PIL import Image

    for site in data.sites:
        img_path, mask_path = tree.files[site.name][0]
        rgb = np.asarray(Image.open(img_path))
        mask = np.asarray(Image.open(mask_path))
        assert set(np.unique(mask)) == {0, 1, 2}
        got = site.images[0, 0].numpy()
        np.testing.assert_allclose(got[2:22, :], rgb[..., 1] / 255.0, atol=1e-6)  # green
        assert not np.allclose(got[2:22, :], rgb[..., 0] / 255.0)
        np.testing.assert_array_equal(site.labels[0].numpy()[2:22, :], mask)
        assert (site.labels[0].numpy()[:2] == 0).all()  # the padding is background


def test_tiff_with_one_file_per_channel_reads_the_chosen_file(tmp_path: Path) -> None:
    tree = make_nnunet_tree(tmp_path, layout="folders", ending=".tif", channels=("T1", "T2"))
    ds = NNUNet(root=str(tree.root), channel="T2", size=16, cache=False)
    inv = ds.inventory()
    assert all(it.image.name.endswith("_0001.tif") for its in inv.sites.values() for it in its)
    assert [len(s) for s in ds.load().sites] == [3, 4]
    with pytest.raises(DataError, match=r"channel='ADC'.*\(0: T1, 1: T2\)"):
        NNUNet(root=str(tree.root), channel="ADC").load()
    with pytest.raises(DataError, match=r"channel=2: .*declares 2 channel\(s\): 0: T1, 1: T2"):
        NNUNet(root=str(tree.root), channel=2).load()


def test_tiff_z_stacks_are_volumes(tmp_path: Path) -> None:
    import tifffile

    tree = make_nnunet_tree(tmp_path, layout="folders", ending=".tif")
    for _site, pairs in tree.files.items():
        for img, mask in pairs:  # rewrite as 3-slice Z×H×W stacks, foreground on slice 1 only
            im, lab = tifffile.imread(str(img)), tifffile.imread(str(mask))
            tifffile.imwrite(str(img), np.stack([im, im, im]), photometric="minisblack")
            tifffile.imwrite(str(mask), np.stack([0 * lab, lab, 0 * lab]), photometric="minisblack")
    data = NNUNet(root=str(tree.root), size=16, cache=False).load()
    assert data.case_level == "volume"
    assert [len(s) for s in data.sites] == [3, 4] and set(data.sites[0].slice_index) == {1}


def test_cache_covers_the_sites_csv(tmp_path: Path) -> None:
    tree = make_nnunet_tree(tmp_path, {"A": 3, "B": 3})
    opts = {"root": str(tree.root), "sites_csv": "sites.csv", "size": 16}
    first = NNUNet(**opts).load()
    assert "cache" in first.source and first.site_names == ["A", "B"]
    csv = tree.root / "sites.csv"
    csv.write_text(csv.read_text().replace(",B", ",C"))
    assert NNUNet(**opts).load().site_names == ["A", "C"]  # not the stale cached federation


# ------------------------------------------------------------------------------------------
# Errors and `data check`
# ------------------------------------------------------------------------------------------


def test_data_check_passes_a_clean_tree_in_both_layouts(tmp_path: Path) -> None:
    csv_tree = make_nnunet_tree(tmp_path / "csv")
    res = check_cli(csv_tree.root, "sites_csv=sites.csv")
    assert res.exit_code == 0, res.output
    assert "no problems found" in res.output and "A" in res.output
    folders = make_nnunet_tree(tmp_path / "folders", layout="folders", ending=".png")
    res = check_cli(folders.root, "size=16")
    assert res.exit_code == 0, res.output
    assert "Dataset001_A" in res.output and "Dataset002_B" in res.output


def test_data_check_names_every_planted_problem_csv_layout(tmp_path: Path) -> None:
    tree = make_nnunet_tree(tmp_path, {"A": 4, "B": 4})
    root = tree.root
    csv = root / "sites.csv"
    csv.write_text(csv.read_text() + "ghost,B\n")  # a case with no image
    tree.files["A"][0][1].unlink()  # a label missing
    _, mask = tree.files["B"][1]
    write_nifti(mask, np.full((20, 24, 4), 7, dtype=np.uint8))  # a value dataset.json lacks
    extra = root / "imagesTr" / "b003_0001.nii.gz"  # a second channel dataset.json lacks
    write_nifti(extra, np.zeros((20, 24, 4), dtype=np.int16))
    res = check_cli(root, "sites_csv=sites.csv")
    assert res.exit_code == 1
    lines = [ln.strip() for ln in res.output.splitlines() if ln.strip().startswith("- ")]
    expect = [
        f"- {rel(root, tree.files['A'][0][0])}: missing mask (no labelsTr/a000.nii.gz)",
        "- imagesTr/b003_XXXX.nii.gz: channel files _0000, _0001 but dataset.json declares "
        "1 channel(s) (0: T2)",
        "- sites.csv line 10: case 'ghost' has no image (no imagesTr/ghost_0000.nii.gz)",
        "- labelsTr/b001.nii.gz: unexpected label value(s) 7 (the dataset.json encoding "
        "expects 0/1)",
    ]
    assert sorted(lines) == sorted(expect), res.output
    assert "4 problem(s):" in res.output


def test_data_check_names_every_planted_problem_folder_layout(tmp_path: Path) -> None:
    tree = make_nnunet_tree(tmp_path, {"A": 3, "B": 3, "C": 3}, layout="folders", ending=".png")
    root = tree.root
    (tree.folder("A") / "dataset.json").unlink()
    img, _ = tree.files["B"][0]
    write_pillow(img, np.zeros((20, 24, 3), dtype=np.uint8))  # RGB where one channel is declared
    spec = json.loads((tree.folder("C") / "dataset.json").read_text())
    spec["numTraining"] = 5
    (tree.folder("C") / "dataset.json").write_text(json.dumps(spec))
    res = check_cli(root)
    assert res.exit_code == 1
    out = " ".join(res.output.split())
    assert f"missing file {tree.folder('A') / 'dataset.json'}" in out
    assert (
        f"{rel(root, img)}: unreadable image (ChannelMismatch: the file holds 3 channels; "
        "expected one channel a file)" in out
    )
    assert "Dataset003_C/dataset.json: numTraining is 5 but Dataset003_C/imagesTr holds 3" in out
    assert "3 problem(s):" in out and "Expected layout under" in out


def test_load_refuses_what_check_reports(tmp_path: Path) -> None:
    tree = make_nnunet_tree(tmp_path, {"A": 3, "B": 3})
    root = tree.root
    with pytest.raises(
        DataError, match=r"dataset.json: one dataset folder has no sites; give the option sites_csv"
    ):
        NNUNet(root=str(root)).load()
    _, mask = tree.files["A"][2]
    write_nifti(mask, np.full((20, 24, 4), 3, dtype=np.uint8))
    with pytest.raises(DataError) as err:
        NNUNet(root=str(root), sites_csv="sites.csv", cache=False).load()
    assert (
        str(mask) in str(err.value) and "[3]" in str(err.value) and "expected 0/1" in str(err.value)
    )
    with pytest.raises(DataError, match=r"missing file .*nope\.csv \(option sites_csv"):
        NNUNet(root=str(root), sites_csv="nope.csv").load()
    with pytest.raises(
        DataError, match=r"site 'Z' \(option sites\) is not one of the sites in sites\.csv"
    ):
        NNUNet(root=str(root), sites_csv="sites.csv", sites=["A", "Z"]).load()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": None}, r"dataset.json: missing key\(s\) labels"),
        ({"labels": {"bg": 0, "x": 1}}, r'labels must map names to ids with "background": 0'),
        ({"labels": {"background": 0, "x": 2}}, r"label ids must be consecutive from 0.*\[0, 2\]"),
        ({"labels": {"background": 0, "x": 1, "y": 1}}, r"labels gives one id to several names"),
        ({"channel_names": {"1": "T2"}}, r'channel_names must map "0", "1", \.\.\.'),
        ({"file_ending": ".mha"}, r"file_ending '.mha' is not one this loader reads"),
        ({"labels": {"background": 0, "x": 1, "ignore": 2}}, r"labels.ignore is nnU-Net's ignore"),
        ({"numTraining": "7"}, r"numTraining must be a count of cases \(got '7'\)"),
    ],
)
def test_bad_dataset_json_names_the_file_and_key(tmp_path: Path, change, message) -> None:
    tree = make_nnunet_tree(tmp_path)
    path = tree.root / "dataset.json"
    spec = json.loads(path.read_text())
    for k, v in change.items():
        if v is None:
            del spec[k]
        else:
            spec[k] = v
    path.write_text(json.dumps(spec))
    with pytest.raises(DataError, match=message):
        NNUNet(root=str(tree.root), sites_csv="sites.csv").load()


def test_region_labels_become_nested_structures(tmp_path: Path) -> None:
    labels = {"background": 0, "whole": [1, 2], "core": 2}
    tree = make_nnunet_tree(tmp_path, layout="folders", labels=labels)
    data = NNUNet(root=str(tree.root), size=16, cache=False).load()
    assert data.classes == ["background", "label 1", "core"]
    assert data.structures == {"whole": [1, 2], "core": [2]}
    assert set(data.sites[0].labels.unique().tolist()) == {0, 1, 2}


def test_expected_tree_is_the_declared_one() -> None:
    assert NNUNet(root="/nowhere").tree_text().endswith(NNUNet.expected_tree)
    assert _io.FolderDataset in NNUNet.__mro__


# ------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------


def test_one_round_suite_on_an_nnunet_tree_runs_and_reports(tmp_path: Path) -> None:
    from pflbench.results import load_results

    tree = make_nnunet_tree(tmp_path / "data", {"A": 4, "B": 4}, labels=NNUNET_MULTI)
    suite = tmp_path / "nn.yaml"
    suite.write_text(
        textwrap.dedent(
            f"""\
            name: nnunet-e2e
            datasets:
              - name: nnunet
                options: {{root: {tree.root}, sites_csv: sites.csv, size: 16}}
            methods: [fedavg]
            seeds: [0]
            model: {{name: unet, options: {{base: 4, depth: 2}}}}
            protocol: {{rounds: 1, local_epochs: 1, batch_size: 4, threads: 1, device: cpu,
                        surface_metrics: false}}
            """
        )
    )
    out = tmp_path / "runs"
    res = CliRunner().invoke(main, ["run", str(suite), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    scores = load_results(out)
    assert set(scores["client"]) == {"A", "B"}
    assert set(scores["structure"]) == {"zone", "core"}
    assert scores["dice"].between(0.0, 1.0).all()
    assert (out / "report" / "report.md").is_file()
