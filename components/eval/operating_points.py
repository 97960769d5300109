"""What each false-reject promise costs in escapes: decisions at promises other than the deployed one.

A plant chooses its false-reject promise (``decision.target_fpr``, default 1 %). The calibration stores its score
samples of training normals, so the thresholds at any other promise are known without retraining
(``Calibration.at_target``): they are the thresholds a detector loaded with ``decision.target_fpr=p`` decides with
(``Detector``, ``contad predict``). For every promise ``p`` in ``decision.operating_points`` the evaluation records
the test images' escape and false-reject rates at those thresholds, per product, as ``escape_rate_at_<p>pct`` and
``false_reject_rate_at_<p>pct`` (``p`` in %, e.g. ``escape_rate_at_5pct``). They are readings of the test split
beside the deployed rates (``escape_rate`` / ``false_reject_rate``), one per promise a line could make; nothing is
chosen from them: the promise is the plant's decision.

A calibration cannot promise every ``p``: with ``n`` calibration normals it controls the false-reject rate only to
``max(p, 1/n)`` (``TaskThreshold.promised_fpr``). So each promise also records what was promised,
``promised_fpr_at_<p>pct``, and whether the test split broke it, ``promise_broken_at_<p>pct``: 1 when the measured
false-reject rate lies above the largest one consistent with the promise on this many good test parts (the 95 %
binomial bound, ``false_reject_bound``), else 0; averaged over products it is the share of products whose promise broke.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from components.eval.thresholds import Calibration, decision_metrics
from components.types import ImageBatch, Prediction

RATES = ("escape_rate", "false_reject_rate")  # measured on the test split at a promise's thresholds
PROMISE_READINGS = ("promised_fpr", "promise_broken")  # what the calibration promised there, and whether the test split broke it
READINGS = RATES + PROMISE_READINGS
_POINT_KEY = re.compile(rf"^({'|'.join(READINGS)})_at_(\d+(?:\.\d+)?)pct$")


def percent_label(promise: float) -> str:
    """``promise`` (a rate) in % without trailing zeros: 0.05 -> "5", 0.005 -> "0.5"."""
    return f"{round(promise * 100, 6):g}"


def point_key(reading: str, promise: float) -> str:
    """The metric key of ``reading`` (one of ``READINGS``) at the thresholds of ``promise``."""
    if reading not in READINGS:
        raise ValueError(f"operating-point reading {reading!r}: expected one of {READINGS}")
    return f"{reading}_at_{percent_label(promise)}pct"


def parse_point_key(metric: str) -> tuple[str, float] | None:
    """(reading, promise) of an operating-point metric key, None for any other metric."""
    match = _POINT_KEY.match(metric)
    return (match.group(1), float(match.group(2)) / 100.0) if match else None


def promises_in(metrics: Iterable[str]) -> list[float]:
    """The promises that ``metrics`` (metric keys) hold operating points for, ascending."""
    return sorted({parsed[1] for m in metrics if (parsed := parse_point_key(m)) is not None})


def operating_point_metrics(prediction: Prediction, batch: ImageBatch, calibration: Calibration, promises: Iterable[float]) -> dict[str, float]:
    """``READINGS`` of one product's labelled test ``batch`` (scored as ``prediction``) at the thresholds ``calibration``
    takes at each of ``promises``: escape and false-reject rates, the promised false-reject rate and whether it broke
    (NaN where a class is absent, and at every promise but its own for a calibration written before score samples were
    stored)."""
    out: dict[str, float] = {}
    for promise in promises:
        if promise != calibration.target_fpr and not calibration.retargetable:
            out.update({point_key(reading, promise): math.nan for reading in READINGS})
            continue
        rates = decision_metrics(prediction, batch, calibration.at_target(promise))
        for rate in RATES:
            out[point_key(rate, promise)] = float(rates.get(rate, math.nan))
        out[point_key("promised_fpr", promise)] = float(rates["promised_fpr"])
        out[point_key("promise_broken", promise)] = promise_broken(rates["false_reject_rate"], rates["false_reject_bound"])
    return out


def promise_broken(false_reject_rate: float, bound: float) -> float:
    """1.0 when a measured ``false_reject_rate`` lies above the ``bound`` its promise allows, 0.0 when not, NaN when either is unknown."""
    if math.isnan(false_reject_rate) or math.isnan(bound):
        return math.nan
    return float(false_reject_rate > bound)
