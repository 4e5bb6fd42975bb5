"""The published benchmark tables are rendered from the raw JSON, not typed by hand."""

from __future__ import annotations

import json
from pathlib import Path

from render import render


def _run(*benches: tuple[str, str, float]) -> dict:
    return {
        "machine_info": {"cpu": {"brand_raw": "cpu", "count": 2}},
        "benchmarks": [
            {"group": g, "name": n, "stats": {"median": m, "mean": m, "stddev": 0.0, "rounds": 3}}
            for g, n, m in benches
        ],
    }


def test_ratios_are_medians_over_the_groups_reference_row():
    table = render(
        _run(
            ("round", "test_round[fedbn]", 0.5),
            ("round", "test_round[resfim]", 0.75),
            ("alone", "test_synthetic_load", 2.0),
        )
    )
    assert "| round | `test_round[resfim]` | 750.00 ms | 750.00 ms ± 0.00 ms | 3 | 1.50× |" in table
    assert "| round | `test_round[fedbn]` | 500.00 ms" in table and "| ref |" in table
    assert "| alone | `test_synthetic_load` | 2.00 s | 2.00 s ± 0.00 ms | 3 | – |" in table


def test_every_published_json_renders():
    for path in sorted((Path(__file__).parents[2] / "reports" / "benchmarks").glob("*.json")):
        assert "| engine-round |" in render(json.loads(path.read_text()))
