"""The end-of-run summary file."""

from __future__ import annotations

import pandas as pd

from pflbench.summary import write_summary


def test_summary_marks_sites_a_dataset_does_not_have(tmp_path):
    # two datasets with 2 and 1 sites: the pivot leaves a hole that must not read "nan"
    table = pd.DataFrame(
        {"s1": ["0.5 ± 0.1", "0.7 ± 0.0"], "s2": ["0.6 ± 0.1", None], "mean": ["a", "b"]},
        index=pd.MultiIndex.from_tuples([("d1", "fedavg"), ("d2", "fedavg")]),
    )
    path = write_summary(tmp_path, (table, "test"))
    text = path.read_text()
    assert "nan" not in text.lower() and "| –" in text
    assert text.startswith("# Dice per method × site (test split")
