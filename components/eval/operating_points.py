"""What each false-reject promise costs in escapes: decisions at promises other than the deployed one.

A plant chooses its false-reject promise (``decision.target_fpr``, default 1 %). The calibration stores its score
samples of training normals, so the thresholds at any other promise are known without retraining
(``Calibration.at_target``): they are the thresholds a detector loaded with ``decision.target_fpr=p`` decides with
(``Detector``, ``contad predict``). For every promise ``p`` in ``decision.operating_points`` the evaluation records
the test images' escape and false-reject rates at those thresholds, per product, as ``escape_rate_at_<p>pct`` and
``false_reject_rate_at_<p>pct`` (``p`` in %, e.g. ``escape_rate_at_5pct``). They are readings of the test split
beside the deployed rates (``escape_rate`` / ``false_reject_rate``), one per promise a line could make; nothing is
chosen from them: the promise is the plant's decision.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from components.eval.thresholds import Calibration, decision_metrics
from components.types import ImageBatch, Prediction

RATES = ("escape_rate", "false_reject_rate")
_POINT_KEY = re.compile(r"^(escape_rate|false_reject_rate)_at_(\d+(?:\.\d+)?)pct$")


def percent_label(promise: float) -> str:
    """``promise`` (a rate) in % without trailing zeros: 0.05 -> "5", 0.005 -> "0.5"."""
    return f"{round(promise * 100, 6):g}"


def point_key(rate: str, promise: float) -> str:
    """The metric key of ``rate`` (``escape_rate`` / ``false_reject_rate``) at the thresholds of ``promise``."""
    if rate not in RATES:
        raise ValueError(f"operating-point rate {rate!r}: expected one of {RATES}")
    return f"{rate}_at_{percent_label(promise)}pct"


def parse_point_key(metric: str) -> tuple[str, float] | None:
    """(rate, promise) of an operating-point metric key, None for any other metric."""
    match = _POINT_KEY.match(metric)
    return (match.group(1), float(match.group(2)) / 100.0) if match else None


def promises_in(metrics: Iterable[str]) -> list[float]:
    """The promises that ``metrics`` (metric keys) hold operating points for, ascending."""
    return sorted({parsed[1] for m in metrics if (parsed := parse_point_key(m)) is not None})


def operating_point_metrics(prediction: Prediction, batch: ImageBatch, calibration: Calibration, promises: Iterable[float]) -> dict[str, float]:
    """Escape and false-reject rates of one product's labelled test ``batch`` (scored as ``prediction``) at the
    thresholds ``calibration`` takes at each of ``promises`` (NaN where a class is absent, and at every promise but its
    own for a calibration written before score samples were stored)."""
    out: dict[str, float] = {}
    for promise in promises:
        if promise != calibration.target_fpr and not calibration.retargetable:
            out.update({point_key(rate, promise): math.nan for rate in RATES})
            continue
        rates = decision_metrics(prediction, batch, calibration.at_target(promise))
        for rate in RATES:
            out[point_key(rate, promise)] = float(rates.get(rate, math.nan))
    return out
