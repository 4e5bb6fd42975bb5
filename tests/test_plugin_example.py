"""examples/plugin: the README's recipe is that package verbatim, and the package works."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from method_helpers import run, tiny_federation

from pflbench.data import FederatedData
from pflbench.params import ParamError

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "plugin"
FILES = [
    "pyproject.toml",
    "src/pflbench_example/halfprox.py",
    "src/pflbench_example/squares.py",
    "suite.yaml",
]


@pytest.fixture(scope="module")
def example():
    """The example package importable from its src/ folder (CI installs it with pip)."""
    sys.path.insert(0, str(EXAMPLE / "src"))
    try:
        from pflbench_example.halfprox import HalfProx
        from pflbench_example.squares import Squares

        yield HalfProx, Squares
    finally:
        sys.path.remove(str(EXAMPLE / "src"))


def _readme_blocks() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    return dict(re.findall(r"```\w*\n# examples/plugin/(\S+)\n(.*?)```", text, flags=re.S))


def test_readme_recipe_is_the_example_package_verbatim():
    blocks = _readme_blocks()
    assert sorted(blocks) == sorted(FILES)
    for rel in FILES:
        assert blocks[rel] == (EXAMPLE / rel).read_text(), f"README block of {rel} is stale"


def test_example_pyproject_declares_what_pip_needs():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] and project["version"]
    eps = project["entry-points"]
    assert eps["pflbench.methods"]["halfprox"] == "pflbench_example.halfprox:HalfProx"
    assert eps["pflbench.datasets"]["squares"] == "pflbench_example.squares:Squares"
    for target in (*eps["pflbench.methods"].values(), *eps["pflbench.datasets"].values()):
        module = target.split(":")[0].replace(".", "/")
        assert (EXAMPLE / "src" / f"{module}.py").is_file(), target


def test_example_method_refuses_values_outside_its_bounds(example):
    halfprox, _ = example
    with pytest.raises(ParamError, match="halfprox.*'mu'"):
        halfprox(mu=-5)


def test_example_dataset_and_method_run_through_the_engine(example):
    halfprox, squares = example
    data = squares(sites=2, images_per_site=8, size=16).load()
    assert isinstance(data, FederatedData) and data.site_names == ["site0", "site1"]
    assert data.sites[0].labels.sum() > 0
    # site brightness differs: a real appearance shift between the two sites
    means = [float(s.images[s.labels.unsqueeze(1) > 0].mean()) for s in data.sites]
    assert means[1] > means[0] + 0.1
    _, out = run(tiny_federation(), halfprox(mu=0.01), rounds=1)
    assert torch.isfinite(torch.tensor(out.rounds["value"].to_numpy())).all()
