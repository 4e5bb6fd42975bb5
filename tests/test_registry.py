"""Plugin discovery through entry points, including a package that is not pflbench."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pflbench.registry import RegistryError, registry

PLUGIN = '''
from pflbench.method import Method
from pflbench.params import Param


class Halfway(Method):
    """A third-party method: FedAvg that only trains half the epochs' worth of steps."""

    name = "halfway"
    paper = "made up for a test"
    params = {"steps": Param(2, low=1, high=4)}

    def local_update(self, client):
        client.fit(steps=self.steps)
'''


def make_plugin(root: Path, broken: bool = False) -> Path:
    """A real installed distribution: a module and a dist-info folder with entry_points.txt."""
    pkg = root / "thirdparty_pfl"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(PLUGIN)
    if broken:
        (root / "brokenpfl.py").write_text(
            "raise ImportError('this plugin is broken on purpose')\n"
        )
    info = root / "thirdparty_pfl-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-pfl\nVersion: 0.1\n")
    eps = "[pflbench.methods]\nhalfway = thirdparty_pfl:Halfway\n"
    if broken:
        eps += "broken = brokenpfl:Nothing\n"
    (info / "entry_points.txt").write_text(eps)
    return root


def test_builtins_are_entry_points():
    names = registry("methods").names()
    assert {"local", "fedavg"} <= set(names)
    assert {"synthetic"} <= set(registry("datasets").names())
    assert {"unet", "unet-timm"} <= set(registry("models").names())


def test_unknown_name_suggests_close_ones():
    with pytest.raises(RegistryError, match="did you mean 'fedavg'"):
        registry("methods").load("fedavgg")


def test_class_path_is_accepted():
    cls = registry("methods").load("pflbench.methods.fedavg:FedAvg")
    assert cls.name == "fedavg"
    with pytest.raises(RegistryError, match="has no 'Nope'"):
        registry("methods").load("pflbench.methods.fedavg:Nope")


def _cli(
    *args: str, env: dict | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pflbench.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        cwd=cwd,
        timeout=300,
    )


def test_third_party_plugin_is_listed_and_a_broken_one_is_reported(tmp_path):
    root = make_plugin(tmp_path / "site", broken=True)
    res = _cli("list", "methods", env={"PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stderr
    assert "halfway" in res.stdout and "thirdparty_pfl:Halfway" in res.stdout
    assert "broken" in res.stdout and "this plugin is broken on purpose" in res.stdout
    assert "fedavg" in res.stdout  # the rest of the registry still works
