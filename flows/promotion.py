"""The promotion gate and the one transaction that makes a bank version current *and* champion.

Gate: passes when every product the champion does not contain yet (whichever step learned it: a
product rejected at one step is new again at the next) reaches ``promotion.min_new_image_auroc``
image AUROC and keeps its false-reject rate at the deployed threshold (good test images decided NG)
at or below ``promotion.max_false_reject_rate``, and no product the champion contains loses more
than ``promotion.max_forgetting`` image AUROC compared with the champion's own evaluation of it. A product with normal images only (no test
set, so no AUROC) instead must keep its false-reject rate on its reserved normals (never trained
on, never used for a threshold: ``components.data.loading.reserve_normals``) at or below
``promotion.max_false_reject_rate``, when it is new and at every later step.

Transaction (docs/ARCHITECTURE.md, "Transactions"): under the bank store's lock, ``promote``
writes a *pending* journal naming the state before (bank, champion model version) and after,
moves ``CURRENT``, moves the registry's ``champion`` alias, and marks the journal *committed*.
``recover`` (run first by every command that uses the store, and by ``contad banks doctor``)
finds a pending journal left by a crash and puts both back to the state before, the last
state where both agreed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.config import Config, PromotionConfig
from components.eval.continual import RESERVED_FRR
from components.errors import ContadError
from components.faults import fault_point
from components.memory.store import SHORT_HASH, BankError, BankStore

log = logging.getLogger(__name__)

GATE_METRIC = "image_auroc"
DECISION_FRR = "false_reject_rate"  # good test images decided NG at the deployed thresholds


def gate_scope(after: dict[str, dict[str, float]], champion: dict[str, Any] | None) -> tuple[list[str], dict[str, dict[str, float]] | None]:
    """(products new to the gate, the champion's own metrics of the products it contains) for a step whose
    metrics cover ``after``; ``champion`` is the current bank version's manifest (None: no champion yet).

    Every product the champion does not contain is new, whichever step learned it, so a product
    rejected at one step is checked again as new by every later step until a champion contains it.
    """
    contained = set((champion or {}).get("task_of_product") or {})
    new = [p for p in after if p not in contained]
    before = {p: m for p, m in ((champion or {}).get("metrics") or {}).items() if p in contained}
    return new, (before if champion is not None else None)


@dataclass
class GateDecision:
    """Outcome of the gate; ``reasons`` says why it failed (empty when passed)."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    drops: dict[str, float] = field(default_factory=dict)
    false_reject_rates: dict[str, float] = field(default_factory=dict)  # products with normal images only
    checked: list[str] = field(default_factory=list)  # every check made, passed or not (one line each)

    def message(self) -> str:
        if self.passed:
            return "promotion gate passed"
        return "promotion gate failed: " + "; ".join(self.reasons)

    def to_dict(self) -> dict[str, object]:
        return {"passed": self.passed, "reasons": list(self.reasons), "drops": dict(self.drops), "false_reject_rates": dict(self.false_reject_rates),
                "checked": list(self.checked)}


def _value(metrics: dict[str, dict[str, float]], product: str, metric: str = GATE_METRIC) -> float | None:
    value = (metrics.get(product) or {}).get(metric)
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def _normals_only(metrics: dict[str, dict[str, float]], product: str) -> bool:
    """Whether ``product`` was measured on reserved normals (no test images) rather than by AUROC."""
    return RESERVED_FRR in (metrics.get(product) or {})


def _false_reject_check(cfg: PromotionConfig, product: str, after: dict[str, dict[str, float]], decision: GateDecision, role: str) -> None:
    """Append a reason to ``decision`` unless ``product``'s reserved-normal false-reject rate is within the limit."""
    rate = _value(after, product, RESERVED_FRR)
    if rate is None:
        decision.reasons.append(f"{role} product {product!r} has normal images only and no {RESERVED_FRR} (too few train/good images to reserve, or no thresholds)")
        return
    decision.false_reject_rates[product] = rate
    decision.checked.append(f"{role} product {product!r} (normal images only): {RESERVED_FRR} {rate:.4f} <= {cfg.max_false_reject_rate}")
    if rate > cfg.max_false_reject_rate:
        decision.reasons.append(f"{role} product {product!r} (normal images only) {RESERVED_FRR} {rate:.4f} > promotion.max_false_reject_rate {cfg.max_false_reject_rate}")


def promotion_gate(
    cfg: PromotionConfig,
    new_products: list[str],
    after: dict[str, dict[str, float]],
    before: dict[str, dict[str, float]] | None = None,
) -> GateDecision:
    """Check ``after`` (metrics by product after the step) against ``before`` (the champion's)."""
    decision = GateDecision(passed=False)
    reasons, drops = decision.reasons, decision.drops
    for product in new_products:
        if _normals_only(after, product):
            _false_reject_check(cfg, product, after, decision, "new")
            continue
        value = _value(after, product)
        decision.checked.append(f"new product {product!r}: {GATE_METRIC} {'-' if value is None else f'{value:.4f}'} >= {cfg.min_new_image_auroc}")
        if value is None:
            reasons.append(f"no {GATE_METRIC} for new product {product!r}")
        elif value < cfg.min_new_image_auroc:
            reasons.append(f"new product {product!r} {GATE_METRIC} {value:.4f} < promotion.min_new_image_auroc {cfg.min_new_image_auroc}")
        frr = _value(after, product, DECISION_FRR)
        if frr is not None:  # decisions at the deployed threshold (absent when the step has no calibration)
            decision.checked.append(f"new product {product!r}: {DECISION_FRR} {frr:.4f} <= {cfg.max_false_reject_rate}")
            if frr > cfg.max_false_reject_rate:
                reasons.append(f"new product {product!r} {DECISION_FRR} {frr:.4f} > promotion.max_false_reject_rate {cfg.max_false_reject_rate}")
    for product in sorted(after):
        if product not in new_products and _normals_only(after, product):
            _false_reject_check(cfg, product, after, decision, "old")
    for product in sorted(before or {}):
        if product in new_products or _normals_only(after, product):
            continue
        old, new = _value(before or {}, product), _value(after, product)
        if old is None:
            continue
        if new is None:
            reasons.append(f"old product {product!r} was not evaluated after the step")
            continue
        drops[product] = old - new
        decision.checked.append(f"old product {product!r}: {GATE_METRIC} drop {old - new:.4f} <= {cfg.max_forgetting}")
        if old - new > cfg.max_forgetting:
            reasons.append(f"old product {product!r} {GATE_METRIC} dropped {old - new:.4f} ({old:.4f} -> {new:.4f}) > promotion.max_forgetting {cfg.max_forgetting}")
    decision.passed = not reasons
    return decision


# ---------------------------------------------------------------------------------- transactions
BANK_VERSION_TAG = "bank_version"


class ChampionMismatch(ContadError):
    """The bank store's ``CURRENT`` and the registry's champion disagree outside any transaction."""


@dataclass(frozen=True)
class Registry:
    """Where the ``champion`` alias lives: an MLflow registry URI and a registered model name."""

    uri: str
    model: str

    def client(self) -> Any:
        from flows.tracking import make_client_for_uri

        return make_client_for_uri(self.uri)

    def _missing(self) -> bool:
        """Whether the registry is a sqlite database that does not exist (yet): nothing registered, don't create it."""
        from flows.tracking import sqlite_path

        db = sqlite_path(self.uri)
        return db is not None and not db.is_file()

    def champion(self) -> str | None:
        """Model version the champion alias points to (None: no champion)."""
        from flows.model_registry import champion_alias_version
        from flows.tracking import tracking_errors

        if self._missing():
            return None
        with tracking_errors(self.uri):
            return champion_alias_version(self.client(), self.model)

    def champion_bank(self) -> str | None:
        """Bank version tag of the champion (None: no champion or untagged)."""
        from flows.model_registry import model_version_tag
        from flows.tracking import tracking_errors

        version = self.champion()
        if version is None:
            return None
        with tracking_errors(self.uri):
            return model_version_tag(self.client(), self.model, version, BANK_VERSION_TAG)

    def set_champion(self, version: str | None) -> None:
        from flows.model_registry import set_champion_alias
        from flows.tracking import tracking_errors

        with tracking_errors(self.uri):
            set_champion_alias(self.client(), self.model, version)

    def version_for_bank(self, bank: str) -> str | None:
        """Newest registered model version tagged with bank version ``bank``."""
        from flows.model_registry import latest_version_with_tag
        from flows.tracking import tracking_errors

        if self._missing():
            return None
        with tracking_errors(self.uri):
            return latest_version_with_tag(self.client(), self.model, BANK_VERSION_TAG, bank)

    def to_dict(self) -> dict[str, str]:
        return {"uri": self.uri, "model": self.model}


def registry_for(cfg: Config) -> Registry | None:
    """The registry of ``cfg.tracking`` (None when tracking is disabled)."""
    from flows.tracking import normalized_uri

    if not cfg.tracking.enabled:
        return None
    return Registry(normalized_uri(cfg.tracking.uri), cfg.tracking.registered_model)


def _journal_registry(journal: dict[str, Any] | None) -> Registry | None:
    doc = (journal or {}).get("registry")
    return Registry(str(doc["uri"]), str(doc["model"])) if isinstance(doc, dict) else None


def recover(store: BankStore, registry: Registry | None = None) -> str | None:
    """Repair a transaction a crash left pending: restore ``CURRENT`` and the champion it started from.

    Call with the store's lock held. Returns what was repaired (None when nothing was pending).
    The journal's own registry wins over ``registry`` (it is where the alias was being moved).
    """
    journal = store.read_journal()
    if journal is None or journal["state"] != "pending":
        return None
    registry = _journal_registry(journal) or registry
    before, after = journal["before"], journal["after"]
    store.set_current(before.get("bank"))
    if registry is not None:
        registry.set_champion(before.get("model_version"))
    store.write_journal({**journal, "state": "committed", "after": before, "rolled_back": after})
    message = (
        f"bank store {store.root}: an interrupted promotion of bank {_short(after.get('bank'))} "
        f"(model version {after.get('model_version') or '-'}) was rolled back; current bank {_short(before.get('bank'))}, "
        f"champion {before.get('model_version') or '-'} (the last state where both agreed)"
    )
    log.warning("%s", message)
    return message


def promote(store: BankStore, registry: Registry | None, bank: str, model_version: str | None) -> None:
    """Make ``bank`` current and ``model_version`` champion, together (journaled; crash-safe)."""
    if registry is not None and model_version is None:
        raise ContadError(f"cannot promote bank {bank[:SHORT_HASH]}: it has no registered model version in {registry.model}")
    with store.lock():
        recover(store, registry)
        full = store.verify(bank)
        before = {"bank": store.current(), "model_version": registry.champion() if registry else None}
        after = {"bank": full, "model_version": model_version}
        journal: dict[str, Any] = {"state": "pending", "before": before, "after": after, "registry": registry.to_dict() if registry else None}
        store.write_journal(journal)
        try:
            store.set_current(full)
            fault_point("between_pointer_and_alias")
            if registry is not None:
                registry.set_champion(model_version)
            store.write_journal({**journal, "state": "committed"})
        except BaseException:
            _undo_now(store, registry)
            raise
    log.info("bank %s is current and model version %s is champion", full[:SHORT_HASH], model_version or "-")


def _undo_now(store: BankStore, registry: Registry | None) -> None:
    """After a failed promotion (disk full, registry down): put both back at once when possible.

    When that fails too, the journal stays pending and the next command repairs it.
    """
    try:
        recover(store, registry)
    except Exception as exc:  # noqa: BLE001 - the original error is the one to report
        log.warning("could not undo the interrupted promotion now (%s); the next command on %s repairs it", exc, store.root)


def rollback(store: BankStore, registry: Registry | None, version: str) -> tuple[str, str | None]:
    """Make an older bank version current *and* champion (the newest model version tagged with it)."""
    with store.lock():
        recover(store, registry)
        registry = _journal_registry(store.read_journal()) or registry
        full = store.verify(version)
        model_version = registry.version_for_bank(full) if registry is not None else None
        if registry is not None and model_version is None:
            raise ContadError(
                f"bank version {full[:SHORT_HASH]} has no registered model version of {registry.model} in {registry.uri}, "
                "so the champion cannot follow it; use the tracking.uri of the run that produced it (or tracking.enabled=false)"
            )
        promote(store, registry, full, model_version)
    return full, model_version


def check_agreement(store: BankStore, registry: Registry | None) -> None:
    """``ChampionMismatch`` when the champion's bank tag differs from ``CURRENT`` (no champion is fine)."""
    if registry is None:
        return
    champion_bank = registry.champion_bank()
    current = store.current()
    if champion_bank is not None and champion_bank != current:
        raise ChampionMismatch(
            f"bank store {store.root}: CURRENT is bank {_short(current)} but the champion of {registry.model} ({registry.uri}) "
            f"is bank {_short(champion_bank)}; run `contad banks doctor --store {store.root}` or `contad banks rollback VERSION` to make them agree"
        )


@contextmanager
def store_transaction(cfg: Config, store: BankStore | None = None) -> Iterator[tuple[BankStore, Registry | None]]:
    """Lock the bank store of ``cfg`` and repair any interrupted promotion; yields (store, registry)."""
    store = store or BankStore(Path(cfg.banks.store_dir))
    registry = registry_for(cfg)
    with store.lock(cfg.banks.lock_timeout_s):
        recover(store, registry)
        yield store, registry


@dataclass
class DoctorReport:
    """What ``contad banks doctor`` found and repaired."""

    repaired: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    checked: int = 0


def doctor(store: BankStore, registry: Registry | None) -> DoctorReport:
    """Repair interrupted promotions, verify every version's hashes, check CURRENT against the champion."""
    report = DoctorReport()
    with store.lock():
        repaired = recover(store, registry)
        if repaired:
            report.repaired.append(repaired)
        journal = store.read_journal()
        registry = _journal_registry(journal) or registry
        for entry in store.list():
            report.checked += 1
            try:
                store.verify(entry.version)
            except BankError as exc:
                report.problems.append(str(exc))
        try:
            check_agreement(store, registry)
        except ChampionMismatch as exc:
            if journal is not None and journal["state"] == "committed":
                agreed = journal["after"]
                store.set_current(agreed.get("bank"))
                if registry is not None:
                    registry.set_champion(agreed.get("model_version"))
                report.repaired.append(f"CURRENT and champion disagreed; restored the last committed state: bank {_short(agreed.get('bank'))}, champion {agreed.get('model_version') or '-'}")
            else:
                report.problems.append(str(exc))
    return report


def _short(version: str | None) -> str:
    return version[:SHORT_HASH] if version else "-"


def banks_command(cfg: Config, sub: str, version: str | None, store: Path | None) -> int:
    """``contad banks list|show|rollback|doctor``: every subcommand first repairs an interrupted promotion.

    ``rollback`` moves ``CURRENT`` and the champion together; ``doctor`` also verifies every
    version's hashes and that ``CURRENT`` equals the champion's bank (exit 1 when a problem remains).
    """
    bank_store = BankStore(store if store is not None else Path(cfg.banks.store_dir))
    return _banks_locked(cfg, sub, version, bank_store)


def _banks_locked(cfg: Config, sub: str, version: str | None, store: BankStore) -> int:
    from components.memory.cli import banks_command as inspect_command

    if not store.root.is_dir():
        raise BankError(f"no bank store at {store.root} (set banks.store_dir or --store)")
    registry = registry_for(cfg)
    with store.lock(cfg.banks.lock_timeout_s):
        repaired = recover(store, registry)
        if repaired:
            print(f"contad: repaired: {repaired}")
        if sub == "rollback":
            if not version:
                raise ContadError("banks rollback needs a version hash (or a unique prefix of one)")
            previous = store.current()
            full, model_version = rollback(store, registry, version)
            print(f"current bank version: {full[:SHORT_HASH]} (was {_short(previous)}); champion: model version {model_version or '-'}; no version was deleted")
            return 0
        if sub == "doctor":
            report = doctor(store, registry)
            for line in report.repaired:
                print(f"repaired: {line}")
            for line in report.problems:
                print(f"problem: {line}")
            print(f"bank store {store.root}: {report.checked} version(s) checked, current {_short(store.current())}, "
                  f"{len(report.repaired)} repair(s), {len(report.problems)} problem(s)")
            return 1 if report.problems else 0
        return inspect_command(cfg, sub, version, store.root)
