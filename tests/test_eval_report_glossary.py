"""Every metric and term of report.md / comparison.md is explained in one line the first time it appears."""

from __future__ import annotations

import re

import pytest

from components.eval.continual import AccuracyMatrix
from components.eval.metrics import METRIC_KEYS
from components.eval.report import comparison_markdown, run_markdown

TERMS = ("AUROC", "pixel AUROC", "AUPRO", "FM", "BWT", "F1-max", "routing accuracy", "escape rate", "false-reject rate")


def _doc() -> dict:
    matrix = AccuracyMatrix(["alpha", "beta"], 2)
    values = {m: 0.9 for m in METRIC_KEYS} | {"escape_rate": 0.1, "false_reject_rate": 0.02}
    for step, product in ((0, "alpha"), (1, "alpha"), (1, "beta")):
        matrix.record(step, product, values)
    return matrix.to_metrics_json("ucad", "sequential")


def _first_use_is_explained(markdown: str, term: str) -> None:
    lines = markdown.splitlines()
    pattern = re.compile(rf"(?<![\w-]){re.escape(term)}(?![\w-])", re.IGNORECASE)
    first = next(i for i, line in enumerate(lines) if pattern.search(line))
    start = lines.index("## Glossary")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    assert start < first < end, f"{term!r} first appears outside the glossary: {lines[first]!r}"
    defined, _, explanation = lines[first].partition("**: ")
    assert lines[first].startswith("- **") and pattern.search(defined), f"{term!r} is used before it is defined: {lines[first]!r}"
    assert len(explanation.split()) >= 8, f"{term!r}: explanation too short: {explanation!r}"


@pytest.mark.parametrize("term", TERMS)
def test_report_explains_each_term_where_it_first_appears(term: str) -> None:
    doc = _doc()
    run = run_markdown(doc, {})
    assert all(re.search(re.escape(t), run, re.IGNORECASE) for t in TERMS)  # the report does use every term
    _first_use_is_explained(run, term)
    _first_use_is_explained(comparison_markdown(["ucad"], ["runs/ucad"], [doc], []), term)
    assert run.index("## Glossary") < run.index("## Image-level detection")  # near the top, before the first table
