"""The anomalib peer benchmark's results (``benchmarks/peer_anomalib.py``): per product both systems' metrics,
seconds and bank rows, as a markdown table for RESULTS and the leaderboard's peer row."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from components.errors import ContadError


@dataclass
class SystemResult:
    """One system on one product: raw-score metrics, seconds, memory-bank rows."""

    image_auroc: float
    pixel_auroc: float
    train_s: float
    test_s: float
    bank_rows: int

    @property
    def total_s(self) -> float:
        return self.train_s + self.test_s


@dataclass
class ProductResult:
    """contad and anomalib on one product, with the machine load (1/5/15 min) before the pair ran."""

    product: str
    train_images: int
    test_images: int
    load: tuple[float, float, float]
    contad: SystemResult
    peer: SystemResult

    @property
    def ratio(self) -> float:
        """anomalib (train + test) seconds / contad (train + test) seconds."""
        return self.peer.total_s / self.contad.total_s if self.contad.total_s > 0 else math.nan


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def results_table(results: list[ProductResult]) -> str:
    """Markdown side-by-side table: AUROCs of both systems, seconds, anomalib/contad time ratio, load."""
    lines = [
        "| product | train / test images | image AUROC contad | image AUROC anomalib | pixel AUROC contad | pixel AUROC anomalib "
        "| contad train + test s | anomalib train + test s | time ratio anomalib / contad | bank rows contad / anomalib | load 1 min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.product} | {r.train_images} / {r.test_images} | {_fmt(r.contad.image_auroc)} | {_fmt(r.peer.image_auroc)} "
            f"| {_fmt(r.contad.pixel_auroc)} | {_fmt(r.peer.pixel_auroc)} "
            f"| {r.contad.train_s:.1f} + {r.contad.test_s:.1f} | {r.peer.train_s:.1f} + {r.peer.test_s:.1f} "
            f"| {_fmt(r.ratio, 1)}x | {r.contad.bank_rows} / {r.peer.bank_rows} | {r.load[0]:.1f} |"
        )
    if results:
        contad_total = sum(r.contad.total_s for r in results)
        peer_total = sum(r.peer.total_s for r in results)
        lines.append(
            f"| **average / total** | | {_fmt(_mean([r.contad.image_auroc for r in results]))} "
            f"| {_fmt(_mean([r.peer.image_auroc for r in results]))} | {_fmt(_mean([r.contad.pixel_auroc for r in results]))} "
            f"| {_fmt(_mean([r.peer.pixel_auroc for r in results]))} | {contad_total:.1f} | {peer_total:.1f} "
            f"| {_fmt(peer_total / contad_total if contad_total > 0 else math.nan, 1)}x | | |"
        )
    return "\n".join(lines)


def results_from_json(doc: list[dict]) -> list[ProductResult]:
    """Inverse of ``asdict`` over a list of ``ProductResult`` (results.json)."""
    return [
        ProductResult(product=d["product"], train_images=d["train_images"], test_images=d["test_images"], load=tuple(d["load"]),
                      contad=SystemResult(**d["contad"]), peer=SystemResult(**d["peer"]))
        for d in doc
    ]


def read_peer_results(path: Path) -> list[ProductResult]:
    """``results.json`` of a peer run (one entry per finished product); a clear error when it is malformed."""
    try:
        return results_from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ContadError(f"{path}: not a peer results file ({exc})") from None


def peer_markdown(results: list[ProductResult], products: list[str]) -> str:
    """The leaderboard's peer section: contad's ``patchcore_oracle`` and anomalib's PatchCore side by side on the
    same tiles, per product of the sequence that has a result, with the time ratio measured in the same run."""
    done = [r.product for r in results]
    missing = [p for p in products if p not in done]
    lines = ["### Peer: anomalib 2.7 PatchCore", "",
             "`python -m benchmarks.peer_anomalib --resume --out OUT/<sequence>/peer` (OUT: the bench folder; `make leaderboard` runs it): "
             "contad's `patchcore_oracle` (seed 0, the defaults) and anomalib's PatchCore on the same tiles, the same "
             "ImageNet Lite0 weights and feature levels, the same number of bank rows; raw-score AUROC with contad's "
             "metric code; product by product, both systems under the same load, so the time ratio is measured inside "
             "one run.", "", results_table(results), ""]
    if missing:
        lines += [f"Not run yet: {', '.join(missing)}.", ""]
    return "\n".join(lines)
