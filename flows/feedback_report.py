"""The operator feedback of a bank store for ``contad report --store DIR``: verdict counts, and the escapes scored now.

Per product: the verdicts by kind (false_reject / escape / confirmed_ok / confirmed_ng), how many false
rejects are learned and in which bank version, and how many of the recorded escapes the *current*
bank version still passes (decided OK): the stored escape images are scored by the current version
here, so ``components.eval.report`` only formats the summary.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from components.config import Config
from components.decision import Detector
from components.errors import ContadError
from components.eval.report import FEEDBACK_KINDS
from components.memory.feedback import ESCAPE, FALSE_REJECT, FeedbackLog, VerdictRecord
from components.memory.store import BankStore, resolve_current_for_reader
from flows.feedback import decide_batched, recorded_images


def feedback_summary(cfg: Config, store_dir: Path, detector: Any = None) -> dict[str, Any] | None:
    """What ``report_command(feedback=...)`` shows for the bank store ``store_dir`` (None when it has no verdicts).

    ``detector`` decides the escapes (default: the store's current bank version with ``cfg``'s deploy-time settings)."""
    store = BankStore(Path(store_dir))
    if not store.root.is_dir():
        raise ContadError(f"--store {store_dir}: no such bank store (a folder with versions/ and feedback/)")
    log = FeedbackLog(store.root)
    records = log.read()
    if not records:
        return None
    current = resolve_current_for_reader(store)  # lock-free: what recovery would leave current
    escapes = [r for r in records if r.kind == ESCAPE]
    passed: Counter[str] = Counter()
    scored = bool(escapes) and (current is not None or detector is not None)
    if scored:
        detector = detector or Detector.from_method_dir(store.state_dir(current), cfg, bank_version=current)
        for record, verdict in zip(escapes, decide_batched(detector, recorded_images(log, escapes, cfg.serve.max_pixels)), strict=True):
            passed[record.product] += verdict.decision == "OK"
    products = {}
    for product in sorted({r.product for r in records}):
        mine = [r for r in records if r.product == product]
        products[product] = {**_counts(mine), "escapes_passed_now": passed[product] if scored else None}
    return {"store": str(store.root.resolve()), "bank_version": current, "verdicts": len(records), "products": products}


def _counts(records: list[VerdictRecord]) -> dict[str, Any]:
    kinds = Counter(r.kind for r in records)
    learned = Counter(r.learned_in for r in records if r.kind == FALSE_REJECT and r.learned_in)
    return {**{kind: kinds[kind] for kind in FEEDBACK_KINDS}, "false_rejects_learned": sum(learned.values()), "learned_in": dict(learned)}

