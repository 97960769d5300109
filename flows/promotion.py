"""The promotion gate and the one transaction that makes a bank version current *and* champion.

Gate: passes when every product the champion does not contain yet (whichever step learned it: a
product rejected at one step is new again at the next) reaches ``promotion.min_new_image_auroc``
image AUROC and keeps its false-reject rate at the deployed threshold (good test images decided NG)
at or below ``promotion.max_false_reject_rate``, and no product the champion contains loses more
than ``promotion.max_forgetting`` image AUROC compared with the champion's own evaluation of it, and, for a
bank whose memories grew under unchanged thresholds (operator feedback: it can keep its AUROC and
still pass defects it used to reject), none lets more than ``promotion.max_escape_rise`` more of its
defective test images through at the deployed threshold (compared only when both evaluations used
the same threshold promise, ``promised_fpr``). A product with normal images only (no test
set, so no AUROC) instead must keep its false-reject rate on its reserved normals (never trained
on, never used for a threshold: ``components.data.loading.reserve_normals``) at or below
``promotion.max_false_reject_rate``, when it is new and at every later step.

Transaction (docs/ARCHITECTURE.md, "Transactions"): under the bank store's lock, ``promote``
writes a *pending* journal naming the state before (bank, champion model version) and after,
moves ``CURRENT``, moves the registry's ``champion`` alias, and marks the journal *committed*.
``recover`` (run first by every command that uses the store, and by ``contad banks doctor``)
finds a pending journal left by a crash and puts both back to the state before, the last
state where both agreed.

One store, one champion: a store has an identity (``STORE_ID``) and acts only on its own
registered model in the *configured* registry (``tracking.uri``): the model named
``tracking.registered_model`` when this store owns it (registered-model tag ``contad.store_id``),
else ``<name>-<first 8 characters of the store id>`` (``store_model_name``). Every model version
carries the id of the store that registered it (tag ``store_id``); a champion of another store
is never moved, and a pending journal naming another registry is refused, not repaired there.
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.config import Config, PromotionConfig
from components.eval.continual import RESERVED_FRR
from components.errors import ContadError
from components.faults import fault_point
from components.memory.store import MANIFEST_FILE, SHORT_HASH, BankError, BankStore, mismatched_files, verify_registered_state

log = logging.getLogger(__name__)

GATE_METRIC = "image_auroc"
DECISION_FRR = "false_reject_rate"  # good test images decided NG at the deployed thresholds
DECISION_ESCAPE = "escape_rate"  # defective test images decided OK at the deployed thresholds
PROMISE = "promised_fpr"  # the false-reject rate the product's threshold promises (same promise = same threshold rule)


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
    escape_rises: dict[str, float] = field(default_factory=dict)  # old products: escape-rate change at the deployed threshold
    checked: list[str] = field(default_factory=list)  # every check made, passed or not (one line each)

    def message(self) -> str:
        if self.passed:
            return "promotion gate passed"
        return "promotion gate failed: " + "; ".join(self.reasons)

    def to_dict(self) -> dict[str, object]:
        return {"passed": self.passed, "reasons": list(self.reasons), "drops": dict(self.drops), "false_reject_rates": dict(self.false_reject_rates),
                "escape_rises": dict(self.escape_rises), "checked": list(self.checked)}


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


def _escape_check(cfg: PromotionConfig, product: str, before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                  decision: GateDecision) -> None:
    """Append a reason to ``decision`` when ``product`` passes more than ``promotion.max_escape_rise`` more of its
    defective test images at the deployed threshold than the champion did (skipped, and said so, when the two
    evaluations' thresholds keep different promises or there is no defective image)."""
    old, new = _value(before, product, DECISION_ESCAPE), _value(after, product, DECISION_ESCAPE)
    if old is None or new is None:
        return
    promise_old, promise_new = _value(before, product, PROMISE), _value(after, product, PROMISE)
    if promise_old is None or promise_new is None or not math.isclose(promise_old, promise_new, rel_tol=1e-9, abs_tol=1e-12):
        decision.checked.append(f"old product {product!r}: {DECISION_ESCAPE} not compared (the champion was evaluated at another threshold promise)")
        return
    decision.escape_rises[product] = new - old
    decision.checked.append(f"old product {product!r}: {DECISION_ESCAPE} rise {new - old:.4f} <= {cfg.max_escape_rise}")
    if new - old > cfg.max_escape_rise + 1e-12:
        decision.reasons.append(f"old product {product!r} {DECISION_ESCAPE} at the deployed threshold rose {new - old:.4f} ({old:.4f} -> {new:.4f}) "
                                f"> promotion.max_escape_rise {cfg.max_escape_rise}")


def promotion_gate(
    cfg: PromotionConfig,
    new_products: list[str],
    after: dict[str, dict[str, float]],
    before: dict[str, dict[str, float]] | None = None,
    check_escapes: bool = False,
) -> GateDecision:
    """Check ``after`` (metrics by product after the step) against ``before`` (the champion's); ``check_escapes``:
    also the escape-rate rise of every old product at the deployed thresholds (feedback apply, whose memories grow
    under unchanged thresholds; add-product leaves old products' memories and thresholds as they are)."""
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
        if check_escapes:
            _escape_check(cfg, product, before or {}, after, decision)
    decision.passed = not reasons
    return decision


# ---------------------------------------------------------------------------------- transactions
BANK_VERSION_TAG = "bank_version"


class ChampionMismatch(ContadError):
    """The bank store's ``CURRENT`` and the registry's champion disagree outside any transaction."""


class ForeignChampion(BankError):
    """The champion (or the version to make champion) was registered by another bank store."""


@dataclass(frozen=True)
class Registry:
    """Where the ``champion`` alias lives: an MLflow registry URI and a registered model name.

    ``store_id``: the bank store this view acts for; model versions another store registered are
    never made champion, and their champion is never moved (None: a store without an identity).
    """

    uri: str
    model: str
    store_id: str | None = None

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
        """Bank version tag of the champion (None: no champion or untagged); ``ForeignChampion`` when
        another bank store registered it."""
        version = self.champion()
        if version is None:
            return None
        tags = self._tags(version)
        self._check_own(version, tags)
        return tags.get(BANK_VERSION_TAG)

    def _tags(self, version: str) -> dict[str, str]:
        from flows.model_registry import model_version_tags
        from flows.tracking import tracking_errors

        with tracking_errors(self.uri):
            return model_version_tags(self.client(), self.model, version)

    def _check_own(self, version: str, tags: dict[str, str]) -> None:
        from flows.model_registry import STORE_ID_TAG

        owner = tags.get(STORE_ID_TAG)
        if self.store_id and owner and owner != self.store_id:
            raise ForeignChampion(f"model version {version} of {self.model} ({self.uri}) belongs to bank store {owner[:8]}, not to this store "
                                  f"({self.store_id[:8]}); contad never moves another store's champion")

    def set_champion(self, version: str | None) -> None:
        """Point the champion alias at ``version`` (None: remove it); refuses a version of another store."""
        from flows.model_registry import set_champion_alias
        from flows.tracking import tracking_errors

        if version is not None and self.store_id:
            self._check_own(version, self._tags(version))
        with tracking_errors(self.uri):
            set_champion_alias(self.client(), self.model, version)

    def version_for_bank(self, bank: str) -> str | None:
        """Newest model version of this store tagged with bank version ``bank``."""
        from flows.model_registry import STORE_ID_TAG, version_banks
        from flows.tracking import tracking_errors

        if self._missing():
            return None
        with tracking_errors(self.uri):
            versions = version_banks(self.client(), self.model)
        matching = [int(v) for v, tags in versions
                    if tags.get(BANK_VERSION_TAG) == bank and (not self.store_id or tags.get(STORE_ID_TAG) in (None, self.store_id))]
        return str(max(matching)) if matching else None

    def champion_files_problem(self, store: BankStore) -> str | None:
        """Why the champion's registered files (calibration.json, detector.json, state) no longer match its
        bank version (None: they match, or there is no champion)."""
        from flows.deployed import download_registered
        from flows.tracking import tracking_errors

        version = self.champion()
        bank = self.champion_bank() if version is not None else None
        if version is None or bank is None:
            return None
        with tempfile.TemporaryDirectory(prefix="contad-doctor-") as tmp, tracking_errors(self.uri):
            try:
                method_dir = download_registered(self.client(), self.uri, self.model, version, Path(tmp))["method"]
            except ContadError as exc:  # not a contad detector (hand-registered): nothing doctor can check
                return f"champion model version {version} of {self.model}: {exc}"
            try:
                verify_registered_state(method_dir, bank, f"model version {version} of {self.model} ({self.uri})")
            except BankError as exc:
                if not (store.versions_dir / bank / MANIFEST_FILE).is_file():
                    return str(exc)
                changed = mismatched_files(method_dir, store.show(bank).get("files") or {})
                return f"{exc} (changed: {', '.join(changed[:5]) or '-'})"
        return None

    def to_dict(self) -> dict[str, str]:
        return {"uri": self.uri, "model": self.model}


def registry_for(cfg: Config, store: BankStore | None = None, claim: bool = False) -> Registry | None:
    """The registry view of the bank store ``store`` (default ``banks.store_dir``) in ``cfg.tracking``
    (None when tracking is disabled): its own registered model (``store_model_name``) and identity.

    ``claim=True`` (writers, lock held): create the store's identity and claim its registered model.
    """
    from flows.tracking import normalized_uri

    if not cfg.tracking.enabled:
        return None
    store = store or BankStore(Path(cfg.banks.store_dir))
    store_id = store.ensure_store_id() if claim else (store.store_id() if store.root.is_dir() else None)
    base = Registry(normalized_uri(cfg.tracking.uri), cfg.tracking.registered_model, store_id)
    if store_id is None:
        return base
    return Registry(base.uri, store_model_name(base, store, claim), store_id)


def store_model_name(base: Registry, store: BankStore, claim: bool) -> str:
    """The registered model of ``store`` in ``base.uri``: ``base.model`` when this store owns it (or may claim it:
    unregistered, or unclaimed and holding this store's champion), else ``<base.model>-<store id[:8]>``."""
    from flows.model_registry import claim_registered_model, registered_model_owner, set_owner
    from flows.tracking import tracking_errors

    me = str(base.store_id)
    own = f"{base.model}-{me[:8]}"
    if base.model.endswith(f"-{me[:8]}") or base._missing():
        return base.model  # no registry yet: the first registration creates the model, the next writer claims it
    with tracking_errors(base.uri):
        client = base.client()
        exists, owner = registered_model_owner(client, base.model)
        if owner == me:
            return base.model
        if registered_model_owner(client, own)[0]:
            return own
        if not exists and (not claim or claim_registered_model(client, base.model, me) == me):
            return base.model
        if exists and owner is None and _holds_champion_of(client, base.model, store):
            if claim:
                set_owner(client, base.model, me)
            return base.model
        if claim:
            claim_registered_model(client, own, me)
            log.warning("registered model %s in %s belongs to another bank store; bank store %s (%s) registers its detectors as %s",
                        base.model, base.uri, store.root, me[:8], own)
    return own


def _holds_champion_of(client: Any, model: str, store: BankStore) -> bool:
    """Whether an unclaimed registered model is ``store``'s: it has no versions, or its champion (else any
    version) was registered by this store (tag ``store_id``; untagged: its bank version is stored here)."""
    from flows.model_registry import STORE_ID_TAG, champion_alias_version, version_banks

    versions = dict(version_banks(client, model))
    if not versions:
        return True
    champion = champion_alias_version(client, model)
    chosen = [versions[champion]] if champion in versions else list(versions.values())
    me = store.store_id()
    return any(tags[STORE_ID_TAG] == me if tags.get(STORE_ID_TAG) else (store.versions_dir / str(tags.get(BANK_VERSION_TAG)) / MANIFEST_FILE).is_file()
               for tags in chosen)


def _journal_registry(journal: dict[str, Any] | None) -> Registry | None:
    doc = (journal or {}).get("registry")
    return Registry(str(doc["uri"]), str(doc["model"])) if isinstance(doc, dict) else None


def _recovery_registry(store: BankStore, journal: dict[str, Any], registry: Registry | None) -> Registry | None:
    """The configured ``registry``, when it is the one the pending journal moved the champion in; else ``BankError``:
    the champion of a registry other than the configured one is never moved."""
    journaled = _journal_registry(journal)
    if journaled is None:
        return registry
    if registry is None or (registry.uri, registry.model) != (journaled.uri, journaled.model):
        configured = "tracking is disabled" if registry is None else f"the configured registry is {registry.model} in {registry.uri}"
        raise BankError(f"{store.root / 'JOURNAL.json'}: an interrupted promotion moved the champion of {journaled.model} in {journaled.uri}, but "
                        f"{configured}; rerun with tracking.uri={journaled.uri} to repair it (contad moves champions in the configured registry only)")
    return registry


def recover(store: BankStore, registry: Registry | None = None) -> str | None:
    """Repair a transaction a crash left pending: restore ``CURRENT`` and the champion it started from.

    Call with the store's lock held. Returns what was repaired (None when nothing was pending).
    Refuses (``BankError``) when the journal names a registry other than ``registry`` (the configured one).
    """
    journal = store.read_journal()
    if journal is None or journal["state"] != "pending":
        return None
    registry = _recovery_registry(store, journal, registry)
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
        if registry is not None:
            registry.champion_bank()  # ForeignChampion: another store's champion is never moved
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
    """Lock the bank store of ``cfg``, bind ``cfg.tracking.registered_model`` to the store's own model (``registry_for``)
    and repair any interrupted promotion; yields (store, registry)."""
    store = store or BankStore(Path(cfg.banks.store_dir))
    with store.lock(cfg.banks.lock_timeout_s):
        registry = registry_for(cfg, store, claim=True)
        if registry is not None:
            cfg.tracking.registered_model = registry.model  # every registration of this command goes to the store's own model
        recover(store, registry)
        yield store, registry


@dataclass
class DoctorReport:
    """What ``contad banks doctor`` found and repaired."""

    repaired: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    checked: int = 0


def doctor(store: BankStore, registry: Registry | None) -> DoctorReport:
    """Repair what crashes and hand edits leave (stale temporaries, an interrupted promotion, a broken JOURNAL
    or CURRENT, CURRENT and champion disagreeing), verify every version's hashes and the champion's registered files."""
    report = DoctorReport()
    with store.lock():
        removed = store.remove_stale_temporaries()
        if removed:
            report.repaired.append(f"removed {len(removed)} temporary file(s) of writers that died: {', '.join(p.name for p in removed[:3])}")
        journal = _usable_journal(store, registry, report)
        if journal is not None and journal["state"] == "pending":
            report.repaired.append(str(recover(store, registry)))
            journal = store.read_journal()
        _repair_current(store, registry, journal, report)
        for entry in store.list():
            report.checked += 1
            try:
                store.verify(entry.version)
            except BankError as exc:
                report.problems.append(str(exc))
        try:
            check_agreement(store, registry)
            if isinstance(registry, Registry):
                problem = registry.champion_files_problem(store)
                if problem:
                    report.problems.append(problem)
        except ForeignChampion as exc:
            report.problems.append(str(exc))
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


def _usable_journal(store: BankStore, registry: Registry | None, report: DoctorReport) -> dict[str, Any] | None:
    """The journal; a broken one (truncated, ``{}``) is rebuilt as committed from the champion's bank tag, else CURRENT."""
    try:
        return store.read_journal()
    except BankError as exc:
        agreed, source = _agreed_state(store, registry, None)
        store.set_current(agreed["bank"])
        journal = {"state": "committed", "before": agreed, "after": agreed, "registry": registry.to_dict() if registry else None, "rebuilt_from": source}
        store.write_journal(journal)
        report.repaired.append(f"{str(exc).split(';')[0]}; rebuilt it from {source}: bank {_short(agreed['bank'])}, champion {agreed['model_version'] or '-'}")
        if agreed["bank"] is None and store.list():
            report.problems.append(f"neither the champion nor CURRENT names a stored version, so none is current; choose one: contad banks rollback VERSION --store {store.root}")
        return journal


def _repair_current(store: BankStore, registry: Registry | None, journal: dict[str, Any] | None, report: DoctorReport) -> None:
    """Rewrite a garbage, empty or dangling CURRENT (or a missing one the committed journal names) from the last agreed state."""
    recorded = ((journal or {}).get("after") or {}).get("bank") if (journal or {}).get("state") == "committed" else None
    try:
        if store.current() is not None or recorded is None:
            return
        broken = f"{store.root / 'CURRENT'} is missing"
    except BankError as exc:
        broken = str(exc).split(";")[0]
    agreed, source = _agreed_state(store, registry, journal)
    store.set_current(agreed["bank"])
    if agreed["bank"] is None:
        report.problems.append(f"{broken}, and neither the champion nor the journal names a stored version; choose one: contad banks rollback VERSION --store {store.root}")
    else:
        report.repaired.append(f"{broken}; restored CURRENT from {source}: bank {_short(agreed['bank'])}")


def _agreed_state(store: BankStore, registry: Registry | None, journal: dict[str, Any] | None) -> tuple[dict[str, str | None], str]:
    """The last state CURRENT and champion agreed on, from (in this order) the champion's bank tag, the committed
    journal, CURRENT; ``({"bank": None, ...}, ...)`` when none names a stored version."""
    stored = lambda bank: bool(bank) and (store.versions_dir / str(bank) / MANIFEST_FILE).is_file()  # noqa: E731
    champion = registry.champion() if registry is not None else None
    try:
        champion_bank = registry.champion_bank() if registry is not None and champion is not None else None
    except ForeignChampion:
        champion, champion_bank = None, None
    if stored(champion_bank):
        return {"bank": champion_bank, "model_version": champion}, "the champion's bank_version tag"
    after = (journal or {}).get("after") or {}
    if (journal or {}).get("state") == "committed" and stored(after.get("bank")):
        return {"bank": after["bank"], "model_version": after.get("model_version")}, "the committed journal"
    try:
        current = store.current()
    except BankError:
        current = None
    if current is not None:
        return {"bank": current, "model_version": champion}, "CURRENT"
    return {"bank": None, "model_version": champion}, "nothing usable"


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
    if sub in ("list", "show") and not store.writable():
        print(f"contad: bank store {store.root} is read-only: showing it as readers see it (an interrupted promotion is not repaired)", file=sys.stderr)
        return inspect_command(cfg, sub, version, store.root)
    with store.lock(cfg.banks.lock_timeout_s):
        registry = registry_for(cfg, store, claim=sub in ("rollback", "doctor"))
        if sub == "doctor":
            return _print_doctor(store, doctor(store, registry))
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
        return inspect_command(cfg, sub, version, store.root)


def _print_doctor(store: BankStore, report: DoctorReport) -> int:
    """Print what ``doctor`` repaired and found; 1 when a problem remains."""
    for line in report.repaired:
        print(f"repaired: {line}")
    for line in report.problems:
        print(f"problem: {line}")
    try:
        current = _short(store.current())
    except BankError:
        current = "unusable"
    print(f"bank store {store.root}: {report.checked} version(s) checked, current {current}, {len(report.repaired)} repair(s), {len(report.problems)} problem(s)")
    return 1 if report.problems else 0
