"""Both install forms import the built-in plugins under the pflbench namespace."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_editable_install_maps_methods_and_datasets_under_the_namespace():
    import pflbench.datasets.synthetic as syn
    import pflbench.methods.fedavg as fedavg

    assert Path(fedavg.__file__).parent == ROOT / "methods"
    assert Path(syn.__file__).parent == ROOT / "datasets"
    # never a top-level name (checked away from the repository folder, which is on sys.path here)
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util as u; print(u.find_spec('methods'), u.find_spec('datasets'))",
        ],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert "pflbench" not in res.stdout and str(ROOT) not in res.stdout


@pytest.mark.slow
def test_built_wheel_contains_and_imports_the_plugins(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next(tmp_path.glob("pflbench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "pflbench/methods/fedavg.py" in names and "pflbench/datasets/synthetic.py" in names
    assert "pflbench/report/build.py" in names
    assert not any(n.startswith(("methods/", "datasets/")) for n in names)
    eps = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    for group in ("[pflbench.methods]", "[pflbench.datasets]", "[pflbench.models]"):
        assert group in eps
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    code = (
        "import pflbench.methods.fedavg as m, pflbench.datasets.synthetic as d;"
        "print(m.__file__); print(d.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(unpacked)!r}); {code}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert all(line.startswith(str(unpacked)) for line in out.stdout.split())
