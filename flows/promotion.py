"""The promotion gate deciding whether a new step may become the ``champion``.

Passes when every newly learned product reaches ``promotion.min_new_image_auroc`` image AUROC
and no previously learned product loses more than ``promotion.max_forgetting`` image AUROC
compared with the champion's own evaluation of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from components.config import PromotionConfig

GATE_METRIC = "image_auroc"


@dataclass
class GateDecision:
    """Outcome of the gate; ``reasons`` says why it failed (empty when passed)."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    drops: dict[str, float] = field(default_factory=dict)

    def message(self) -> str:
        if self.passed:
            return "promotion gate passed"
        return "promotion gate failed: " + "; ".join(self.reasons)

    def to_dict(self) -> dict[str, object]:
        return {"passed": self.passed, "reasons": list(self.reasons), "drops": dict(self.drops)}


def _value(metrics: dict[str, dict[str, float]], product: str) -> float | None:
    value = (metrics.get(product) or {}).get(GATE_METRIC)
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def promotion_gate(
    cfg: PromotionConfig,
    new_products: list[str],
    after: dict[str, dict[str, float]],
    before: dict[str, dict[str, float]] | None = None,
) -> GateDecision:
    """Check ``after`` (metrics by product after the step) against ``before`` (the champion's)."""
    reasons: list[str] = []
    drops: dict[str, float] = {}
    for product in new_products:
        value = _value(after, product)
        if value is None:
            reasons.append(f"no {GATE_METRIC} for new product {product!r}")
        elif value < cfg.min_new_image_auroc:
            reasons.append(f"new product {product!r} {GATE_METRIC} {value:.4f} < promotion.min_new_image_auroc {cfg.min_new_image_auroc}")
    for product in sorted(before or {}):
        if product in new_products:
            continue
        old, new = _value(before or {}, product), _value(after, product)
        if old is None:
            continue
        if new is None:
            reasons.append(f"old product {product!r} was not evaluated after the step")
            continue
        drops[product] = old - new
        if old - new > cfg.max_forgetting:
            reasons.append(f"old product {product!r} {GATE_METRIC} dropped {old - new:.4f} ({old:.4f} -> {new:.4f}) > promotion.max_forgetting {cfg.max_forgetting}")
    return GateDecision(passed=not reasons, reasons=reasons, drops=drops)
