"""Where a method stands against UCAD on the benchmark sequences, read from the leaderboard's JSON.

A user who picks ``method=lemo`` should learn, in the run's log and report, that on the shared real
sequence it ranks far below UCAD, before deploying it. ``method_standing`` reads
``benchmarks/LEADERBOARD.json`` (written by ``contad bench``) and returns, per benchmark sequence on which
both the method and the reference were run, their mean ± sd final image AUROC (over and per product);
``standing_markdown`` and ``standing_sentence`` render it for the report and the log. The numbers are the
leaderboard's (its products, its defaults), not the user's data, and say so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.eval.chance import counts_band, inside
from components.eval.leaderboard import CHANCE_MEANING, chance_bands

REFERENCE = "ucad"
Stat = tuple[float, float, int]  # mean, sample sd (NaN with one seed), seeds


@dataclass(frozen=True)
class SequenceStanding:
    """One benchmark sequence: the method's and the reference's image AUROC (overall and per product)."""

    sequence: str
    method: str
    reference: str
    overall: Stat
    reference_overall: Stat
    per_product: dict[str, Stat]
    reference_per_product: dict[str, Stat]
    test_images: dict[str, dict[str, int]] = field(default_factory=dict)  # per product: good / defective test images

    @property
    def gap(self) -> float:
        """Method minus reference mean image AUROC (fraction)."""
        return self.overall[0] - self.reference_overall[0]


def _stat(value: Any) -> Stat:
    mean, sd, n = value
    return float(mean), float(sd), int(n)


def method_standing(leaderboard_json: Path, method: str, reference: str = REFERENCE) -> list[SequenceStanding]:
    """Per sequence of ``leaderboard_json`` with finished runs of both ``method`` and ``reference``; [] when
    the file does not exist, cannot be read, or has neither (the standing is advice, never an error)."""
    try:
        doc = json.loads(Path(leaderboard_json).read_text())
    except (OSError, ValueError):
        return []
    found = []
    for sequence, section in doc.items():
        rows = {row["method"]: row for row in section.get("methods", []) if isinstance(row, dict) and "method" in row}
        if method not in rows or reference not in rows:
            continue
        ours, theirs = rows[method], rows[reference]
        try:
            found.append(SequenceStanding(sequence, method, reference, _stat(ours["stats"]["image_auroc"]),
                                          _stat(theirs["stats"]["image_auroc"]),
                                          {p: _stat(v) for p, v in ours.get("per_product", {}).items()},
                                          {p: _stat(v) for p, v in theirs.get("per_product", {}).items()},
                                          dict(section.get("test_images") or {})))
        except (KeyError, TypeError, ValueError):
            continue
    return found


def _pct(stat: Stat) -> str:
    mean, sd, n = stat
    if n == 0 or math.isnan(mean):
        return "–"
    return f"{100 * mean:.1f}" + (f" ± {100 * sd:.1f}" if n > 1 and not math.isnan(sd) else "")


def standing_sentence(standing: SequenceStanding) -> str:
    """One line for the log, e.g. ``lemo on the real-ad leaderboard: image AUROC 62.0 (1 seed) vs ucad 90.6 (3 seeds): -28.6 points``."""
    n, m = standing.overall[2], standing.reference_overall[2]
    below = {p: counts_band(standing.test_images.get(p)) for p, s in standing.per_product.items() if s[2] and s[0] < 0.5}
    worst = [p for p, band in below.items() if band is not None and not inside(standing.per_product[p][0], band)]
    luck = [p for p, band in below.items() if inside(standing.per_product[p][0], band)]
    unknown = [p for p, band in below.items() if band is None]  # a board without test counts cannot tell luck from inversion
    inverted = "".join(text for text in (
        f"; below chance on {', '.join(worst)}" if worst else "",
        f"; below 50 but inside the chance band of its few test images on {', '.join(luck)} (no separation, not evidence of an inversion)" if luck else "",
        f"; below 50 on {', '.join(unknown)}" if unknown else ""))
    return (f"{standing.method} on the {standing.sequence} leaderboard: image AUROC {_pct(standing.overall)} "
            f"({n} seed{'s' * (n != 1)}) vs {standing.reference} {_pct(standing.reference_overall)} ({m} seed{'s' * (m != 1)}): "
            f"{100 * standing.gap:+.1f} points{inverted}")


def standing_markdown(standings: list[SequenceStanding], method: str, leaderboard: str) -> list[str]:
    """The report's "Where this method stands" section (empty for the reference itself)."""
    if method == REFERENCE:
        return []
    lines = ["## Where this method stands", ""]
    if not standings:
        return lines + [f"No finished leaderboard runs of `{method}` and `{REFERENCE}` on the same sequence in `{leaderboard}` "
                        "(`make leaderboard`); compare before deploying it."]
    lines.append(f"Final image AUROC (%) on the benchmark sequences of `{leaderboard}` (their products and the defaults, "
                 f"not this run's data), mean ± sd over seeds, against `{REFERENCE}`:")
    for s in standings:
        products = sorted(set(s.per_product) | set(s.reference_per_product))
        header = "| method | seeds | " + " | ".join(products) + " | average |"
        rows = [f"| {name} | {overall[2]} | " + " | ".join(_pct(per.get(p, (math.nan, math.nan, 0))) for p in products)
                + f" | {_pct(overall)} |" for name, overall, per in ((s.method, s.overall, s.per_product),
                                                                  (s.reference, s.reference_overall, s.reference_per_product))]
        lines += ["", f"`{s.sequence}`: {100 * s.gap:+.1f} points against {s.reference}.", "", header,
                  "|" + "---|" * (len(products) + 3), *rows]
        bands = chance_bands(s.test_images, products)
        if bands:
            lines += ["", f"Chance band per product ({CHANCE_MEANING}): {bands}."]
    return lines
