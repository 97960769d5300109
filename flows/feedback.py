"""``contad feedback``: operator verdicts on images the line has seen, and learning them into a new bank version.

``contad feedback PATH... --as good|defect [--product P] [--by WHO]`` records one verdict per image in
the bank store (``components.memory.feedback``), with what the deployed detector (the current bank
version and its champion model version) decided on it. An image is named by its file, or by the
``prediction_id`` that ``contad predict`` wrote (``--predictions OUT/predictions.jsonl``: the decision
recorded there is the one kept).

``contad feedback apply [--force]`` (also the ``contad-feedback-apply`` Prefect flow) learns the false
rejects marked good, incrementally: the champion's state is loaded, each product's memory grows by the
fewest of each image's farthest patches that make the champion's thresholds decide it OK
(``components.memory.feedback_learning.learn_until_ok`` over ``ContinualMethod.extend_task``: nothing
is retrained, no other product's state changes), the calibration stays the champion's, and the
candidate is versioned, registered and gated like an add-product step: ``promotion_gate`` against the
champion evaluated now at the same thresholds (no new product; forgetting and escape-rate rise at the
deployed thresholds on every product's test set) plus the escape check: the recorded escapes (images marked defect that a deployed detector passed) are
scored by the champion and the candidate, and the candidate may not pass more of them, per product.
Below ``feedback.min_images`` unlearned false rejects it does nothing unless ``--force``.

``contad feedback list [--json]`` prints the audit trail: every verdict with who, when, and the model
and bank versions that decided it (and the version that learned it). The trail is also logged to
MLflow (artifact ``feedback/verdicts.jsonl`` of the run of every registered feedback version, and
model-version tags) when tracking is on.

Every write holds the bank store's lock (``store_transaction``, as add-product), and the promotion
uses the same journal (``flows.promotion.promote``).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow

from components.artifact import deployed_config, read_detector_config
from components.atomic import atomic_write_json
from components.config import Config, config_to_dict
from components.decision import Detector, decode_image, sniff_format
from components.errors import ContadError, DataError
from components.memory.feedback import (ESCAPE, FALSE_REJECT, VERDICTS, FeedbackLog, VerdictRecord, image_id, image_name, now_utc,
                                        verdict_kind)
from components.memory.feedback_learning import learn_until_ok
from components.memory.store import CURRENT_FILE, SHORT_HASH, BankStore
from flows.promotion import GateDecision, Registry, check_agreement, promote, promotion_gate, store_transaction

log = logging.getLogger(__name__)

FEEDBACK_RESULT = "feedback_apply.json"
FEEDBACK_EVENT = "contad.feedback.recorded"  # sent after verdicts are recorded; `contad serve` runs the apply flow on it


def default_out() -> Path:
    return Path("runs") / "feedback"


# ---------------------------------------------------------------------------------- recording verdicts
def _operator(by: str | None) -> str:
    if by:
        return by
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _prediction_rows(predictions: Path | None) -> dict[str, dict[str, Any]]:
    """``prediction_id -> row`` of a ``predictions.jsonl`` written by ``contad predict``."""
    if predictions is None:
        return {}
    rows: dict[str, dict[str, Any]] = {}
    try:
        lines = Path(predictions).read_text().splitlines()
    except OSError as exc:
        raise DataError(f"--predictions {predictions}: cannot read ({exc.strerror or exc})") from exc
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError as exc:
            raise DataError(f"{predictions}:{number}: not a JSON line of contad predict ({exc})") from exc
        if isinstance(row, dict) and row.get("prediction_id"):
            rows[str(row["prediction_id"])] = row
    return rows


def _resolve(item: str, rows: dict[str, dict[str, Any]]) -> tuple[Path, dict[str, Any] | None]:
    """(image file, the predict row that decided it or None) for a PATH argument or a prediction id (a unique prefix)."""
    path = Path(item)
    if path.is_file():
        return path.resolve(), None
    matches = [row for ident, row in rows.items() if len(item) >= 8 and ident.startswith(item.lower())]
    if len(matches) == 1:
        return Path(matches[0]["path"]), matches[0]
    if len(matches) > 1:
        raise DataError(f"prediction id {item!r} is ambiguous ({len(matches)} predictions start with it); give more characters")
    known = " nor a prediction id of --predictions" if rows else ""
    raise DataError(f"{item}: no such image file{known}; feedback names an image the line has seen (its file, or --predictions FILE and its id)")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the image ({exc.strerror or exc})") from exc


def _task_of_product(manifest: dict[str, Any]) -> dict[str, str]:
    from flows.add_product import _task_of_product as mapping

    return mapping(manifest)


def _champion_detector(cfg: Config, store: BankStore, registry: Registry | None, bank: str, where: Path) -> Detector:
    """The deployed detector of bank version ``bank`` (checked out into ``where``) with its model version."""
    method_dir = store.checkout(bank, where)
    model_version = registry.version_for_bank(bank) if registry is not None else None
    return Detector.from_method_dir(method_dir, cfg, model_version=model_version, bank_version=bank)


@dataclass
class FeedbackImage:
    """One image a verdict is about: where it came from, its bytes, and what the line decided on it (None: score it now
    with the current bank version)."""

    source: str
    data: bytes
    decided: dict[str, Any] | None = None


def record_feedback(cfg: Config, items: list[str], verdict: str, product: str | None = None, by: str | None = None,
                    predictions: Path | None = None) -> list[VerdictRecord]:
    """Record ``verdict`` (good | defect) on every image of ``items`` (files, folders, globs or prediction ids); all or nothing."""
    if not items:
        raise ContadError("feedback needs at least one image (PATH or prediction id)")
    from flows.predict import expand_inputs

    rows = _prediction_rows(predictions)
    images = []
    for item in items:
        if Path(item).is_dir() or any(c in item for c in "*?["):  # a folder or glob, as predict takes them
            images += [FeedbackImage(str(path), _read_bytes(path)) for path in expand_inputs([item])]
            continue
        path, row = _resolve(item, rows)
        images.append(FeedbackImage(str(path), _read_bytes(path), row))
    return record_images(cfg, images, verdict, product, by)


def record_images(cfg: Config, images: list[FeedbackImage], verdict: str, product: str | None = None, by: str | None = None) -> list[VerdictRecord]:
    """Record ``verdict`` on ``images`` in the bank store of ``cfg`` (under its lock; all or nothing)."""
    if verdict not in VERDICTS:
        raise ContadError(f"verdict {verdict!r} is invalid: use one of {', '.join(VERDICTS)}")
    store = BankStore(Path(cfg.banks.store_dir))
    if not (store.root / CURRENT_FILE).is_file():
        raise ContadError(f"no current memory-bank version in {store.root}: feedback is about a deployed detector (banks.store_dir)")
    with store_transaction(cfg, store) as (store, registry), tempfile.TemporaryDirectory(prefix="contad-feedback-") as scratch:
        records = _record_locked(cfg, store, registry, images, verdict, product, _operator(by), Path(scratch))
    announce_feedback(store.root, records, cfg.feedback.min_images)
    return records


def announce_feedback(store_root: Path, records: list[VerdictRecord], min_images: int) -> int:
    """Emit ``contad.feedback.recorded`` per product of ``records`` to the Prefect server at ``PREFECT_API_URL`` (the
    ``contad serve`` deployment of the apply flow runs on it); nothing without a server. A failing send logs one
    warning: the verdicts are recorded either way. Returns the number of events sent."""
    from prefect.settings import PREFECT_API_URL

    from flows.events import emit_event

    url = PREFECT_API_URL.value()
    if not url or not records:
        return 0
    pending = FeedbackLog(store_root).pending_false_rejects()
    sent = 0
    for product in sorted({r.product for r in records}):
        mine = [r for r in records if r.product == product]
        payload = {"product": product, "verdict": mine[0].verdict, "count": len(mine), "store": str(Path(store_root).resolve()),
                   "kinds": {kind: sum(r.kind == kind for r in mine) for kind in sorted({r.kind for r in mine})},
                   "pending_false_rejects": sum(r.product == product for r in pending), "pending_false_rejects_total": len(pending),
                   "min_images": min_images, "ids": [r.id for r in mine]}
        try:
            emit_event(url, FEEDBACK_EVENT, f"contad.product.{product}", payload, {"prefect.resource.name": product})
            sent += 1
        except Exception as exc:  # noqa: BLE001 - the verdict is recorded; the trigger is a convenience
            log.warning("feedback on %s recorded, but %s could not be sent to %s: %s", product, FEEDBACK_EVENT, url,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return sent


def _record_locked(cfg: Config, store: BankStore, registry: Registry | None, images: list[FeedbackImage], verdict: str, product: str | None,
                   by: str, scratch: Path) -> list[VerdictRecord]:
    current = store.current()
    if current is None:
        raise ContadError(f"no current memory-bank version in {store.root}")
    check_agreement(store, registry)
    products = _task_of_product(store.show(current))
    if product is not None and product not in products:
        raise ContadError(f"unknown product {product!r}: bank version {current[:SHORT_HASH]} knows {', '.join(sorted(products)) or 'none'}")
    feedback = FeedbackLog(store.root)
    seen = {r.id: r for r in feedback.read()}
    idents: list[str] = []
    rgbs = []
    for image in images:
        ident = image_id(image.data)
        if ident in seen:
            old = seen[ident]
            raise ContadError(f"{image.source}: image {ident[:12]} already has a verdict ({old.verdict!r} by {old.by} at {old.at}); "
                              "a verdict is given once")
        if ident in idents:
            raise ContadError(f"{image.source}: the same image is given twice")
        idents.append(ident)
        rgbs.append(decode_image(image.data, cfg.serve.max_pixels, source=image.source))
    unscored = [i for i, image in enumerate(images) if image.decided is None]
    decided = {i: image.decided for i, image in enumerate(images) if image.decided is not None}
    if unscored:
        detector = _champion_detector(cfg, store, registry, current, scratch / "champion")
        for i, v in zip(unscored, decide_batched(detector, [rgbs[i] for i in unscored]), strict=True):
            decided[i] = {**v.to_dict(), "model_version": detector.model_version, "bank_version": detector.bank_version}
    records = []
    for i, (image, ident) in enumerate(zip(images, idents, strict=True)):
        seen_by = decided[i]
        routed = str(seen_by["product"])
        named = product or routed
        if named not in products:
            raise ContadError(f"{image.source}: routed to {routed!r}, which is not a product of bank version {current[:SHORT_HASH]}; give --product")
        records.append(VerdictRecord(
            id=ident, path=image.source, product=named, verdict=verdict, kind=verdict_kind(verdict, str(seen_by["decision"])), by=by, at=now_utc(),
            image=image_name(ident, sniff_format(image.data)), decision=str(seen_by["decision"]), score=float(seen_by["score"]),
            threshold=float(seen_by["threshold"]), routed=routed, model_version=_model_version(seen_by, registry), bank_version=seen_by.get("bank_version"),
        ))
    feedback.add(records, dict(zip(idents, (image.data for image in images), strict=True)))
    return records


def feedback_config(cfg: Config, source: Any) -> Config:
    """The configuration ``POST /v1/feedback`` records with: the served bank store (``--bank DIR``; else ``banks.store_dir``),
    and a store-lock wait no longer than a request may take (``serve.request_timeout_s``)."""
    out = cfg.model_copy(deep=True)
    store = getattr(source, "store", None)
    if isinstance(store, BankStore):
        out.banks.store_dir = str(store.root)
    out.banks.lock_timeout_s = min(cfg.banks.lock_timeout_s, cfg.serve.request_timeout_s)
    return out


def record_served(cfg: Config, data: bytes, decided: dict[str, Any], model_version: str | None, bank_version: str | None, verdict: str,
                  product: str | None = None, by: str | None = None, source: str = "POST /v1/feedback") -> dict[str, Any]:
    """Record ``verdict`` on one image a service decided (``decided``: its ``Verdict.to_dict()``, by the given versions;
    ``source``: where the image came from, kept as the record's path); the record."""
    seen = {**decided, "model_version": model_version, "bank_version": bank_version}
    return record_images(cfg, [FeedbackImage(source, data, seen)], verdict, product, by or "api")[0].to_dict()


def _model_version(decided: dict[str, Any], registry: Registry | None) -> str | None:
    """The model version that decided: as recorded, else the store's model version of the recorded bank version
    (``contad predict --bank`` records no model version)."""
    if decided.get("model_version") or registry is None or not decided.get("bank_version"):
        return decided.get("model_version")
    return registry.version_for_bank(str(decided["bank_version"]))


def recorded_images(feedback: FeedbackLog, records: list[VerdictRecord], max_pixels: int) -> list[Any]:
    """The stored copies of ``records``' images, decoded (HxWx3 uint8; a broken copy is an error naming its file)."""
    return [decode_image(feedback.image_bytes(r), max_pixels, source=str(feedback.image_file(r))) for r in records]


def decide_batched(detector: Detector, rgbs: list[Any]) -> list[Any]:
    """``detector``'s verdicts on ``rgbs``, in batches of ``eval.batch_size``."""
    size = max(1, detector.config.eval.batch_size)
    return [v for start in range(0, len(rgbs), size) for v in detector.decide(rgbs[start : start + size])]


# ---------------------------------------------------------------------------------- the escape check
def escape_check(decision: GateDecision, feedback: FeedbackLog, candidate: Detector, champion: Detector, max_pixels: int) -> dict[str, dict[str, int]]:
    """Score the recorded escapes with the champion and the candidate; a product whose escapes the candidate passes
    more often than the champion fails ``decision``. Returns ``{product: {escapes, passed_before, passed_after}}``."""
    escapes = feedback.escapes()
    if not escapes:
        return {}
    rgbs = recorded_images(feedback, escapes, max_pixels)
    before, after = decide_batched(champion, rgbs), decide_batched(candidate, rgbs)
    counts: dict[str, dict[str, int]] = {}
    for record, old, new in zip(escapes, before, after, strict=True):
        entry = counts.setdefault(record.product, {"escapes": 0, "passed_before": 0, "passed_after": 0})
        entry["escapes"] += 1
        entry["passed_before"] += old.decision == "OK"
        entry["passed_after"] += new.decision == "OK"
    for product, entry in sorted(counts.items()):
        decision.checked.append(f"product {product!r}: recorded escapes passed {entry['passed_after']} <= {entry['passed_before']} (of {entry['escapes']})")
        if entry["passed_after"] > entry["passed_before"]:
            decision.reasons.append(f"product {product!r} passes {entry['passed_after']} of its {entry['escapes']} recorded escapes "
                                    f"(champion: {entry['passed_before']})")
    decision.passed = not decision.reasons
    return counts


def gate_escapes(cfg: Config, store: BankStore, decision: GateDecision, candidate_dir: Path, champion_dir: Path, champion_bank: str) -> dict[str, dict[str, int]]:
    """``escape_check`` of a candidate state against the champion's, for any gate on ``store`` (add-product, feedback
    apply); nothing to do (``{}``) while no escape is recorded."""
    feedback = FeedbackLog(store.root)
    if not feedback.escapes():
        return {}
    candidate = Detector.from_method_dir(Path(candidate_dir), cfg, bank_version="candidate")
    champion = Detector.from_method_dir(Path(champion_dir), cfg, bank_version=champion_bank)
    return escape_check(decision, feedback, candidate, champion, cfg.serve.max_pixels)


# ---------------------------------------------------------------------------------- learning the feedback
def apply_feedback(cfg: Config, out: Path | None = None, force: bool = False) -> dict[str, Any]:
    """Learn the unlearned false rejects into a new bank version, gate it, and promote it when it passes."""
    store = BankStore(Path(cfg.banks.store_dir))
    if not (store.root / CURRENT_FILE).is_file():
        raise ContadError(f"no current memory-bank version in {store.root}: feedback apply builds on the champion (banks.store_dir)")
    out = Path(out or default_out()).resolve()
    with store_transaction(cfg, store) as (store, registry):
        return _apply_locked(cfg, store, registry, out, force)


def _apply_locked(cfg: Config, store: BankStore, registry: Registry | None, out: Path, force: bool) -> dict[str, Any]:
    from flows.add_product import _json_metrics, _old_manifest, _task_names

    current = store.current()
    if current is None:
        raise ContadError(f"no current memory-bank version in {store.root}")
    check_agreement(store, registry)
    base = store.show(current)
    task_of_product = _task_of_product(base)
    feedback = FeedbackLog(store.root)
    _finish_interrupted(feedback, base, current)
    pending = [r for r in feedback.pending_false_rejects() if r.product in task_of_product]
    if not pending or (len(pending) < cfg.feedback.min_images and not force):
        return {"applied": False, "pending": len(pending), "min_images": cfg.feedback.min_images, "previous_version": current}
    base_dir = store.checkout(current, out / "base_method")
    cfg = _base_config(cfg, base_dir, current)
    method_dir, how = _extended_state(cfg, base_dir, feedback, pending, task_of_product, out / "method")
    products = {str(k): str(v) for k, v in (base.get("products") or {}).items()}
    metrics = _evaluate(cfg, method_dir, _old_manifest(products), task_of_product)
    # the champion evaluated now, with this command's thresholds: its stored metrics may come from another
    # decision.target_fpr, and the gate compares decisions (escapes) at the same deployed thresholds
    before = _evaluate(cfg, base_dir, _old_manifest(products), task_of_product)
    gate = promotion_gate(cfg.promotion, [], metrics, before, check_escapes=True)
    escapes = gate_escapes(cfg, store, gate, method_dir, base_dir, current)
    fixed = _now_ok(Detector.from_method_dir(method_dir, cfg, bank_version="candidate"), feedback, pending, cfg.serve.max_pixels)
    step = int(base.get("step", len(_task_names(base)) - 1)) + 1
    meta = {
        **{k: base[k] for k in ("tasks", "products", "task_of_product", "method", "task") if k in base},
        "step": step,
        "metrics": _json_metrics(metrics),
        "gate": gate.to_dict(),
        "trigger": "feedback",
        "parent": current,
        "feedback": {"learned": [r.id for r in pending], "products": sorted({r.product for r in pending}), "now_ok": fixed, "escapes": escapes, "how": how},
    }
    bank_version = _version(cfg, method_dir, meta)
    model_version = _register(cfg, step, metrics, method_dir, bank_version, store, gate, feedback)
    if gate.passed:
        promote(store, registry, bank_version, model_version)
        feedback.mark_learned([r.id for r in pending], bank_version)
    result = {"applied": True, "promoted": gate.passed, "previous_version": current, "bank_version": bank_version, "model_version": model_version,
              "learned": len(pending), "now_ok": fixed, "escapes": escapes, "gate": gate.to_dict(), "metrics": metrics}
    atomic_write_json(out / FEEDBACK_RESULT, {**result, "metrics": _json_metrics(metrics)})
    return result


def _finish_interrupted(feedback: FeedbackLog, base: dict[str, Any], current: str) -> None:
    """Mark learned the false rejects that the current version learned when the apply that promoted it was killed
    before it could say so (they are never learned twice)."""
    learned = set((base.get("feedback") or {}).get("learned") or []) if base.get("trigger") == "feedback" else set()
    unmarked = [r.id for r in feedback.pending_false_rejects() if r.id in learned]
    if unmarked:
        log.warning("feedback: %d false reject(s) were learned by current bank version %s (an interrupted apply); marking them", len(unmarked),
                    current[:SHORT_HASH])
        feedback.mark_learned(unmarked, current)


def _base_config(cfg: Config, base_dir: Path, version: str) -> Config:
    """The champion's own configuration (``detector.json``) with this command's deploy-time settings."""
    stored = read_detector_config(base_dir)
    return deployed_config(stored, cfg, f"bank version {version[:SHORT_HASH]}") if stored is not None else cfg


def _extended_state(cfg: Config, base_dir: Path, feedback: FeedbackLog, pending: list[VerdictRecord], task_of_product: dict[str, str],
                    method_dir: Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    """A copy of the champion's state (calibration and detector config included) whose products' memories grew by
    their false rejects, each by the fewest of its patches that make it OK (``learn_until_ok``); saved into
    ``method_dir``. Returns it and, per learned image id, how it was learned."""
    detector = Detector.from_method_dir(base_dir, cfg)  # the champion as deployed: its state and thresholds at cfg's target
    learned: dict[str, dict[str, Any]] = {}
    for record in sorted(pending, key=lambda r: (r.product, r.at, r.id)):
        rgb = decode_image(feedback.image_bytes(record), cfg.serve.max_pixels, source=str(feedback.image_file(record)))
        result = learn_until_ok(detector, task_of_product[record.product], rgb, cfg.feedback.patch_share)
        learned[record.id] = result.to_dict()
        log.info("feedback: %s (%s) learned %.1f%% of its patches (%d rows): score %.4f -> %.4f, threshold %.4f%s", record.id[:SHORT_HASH],
                 record.product, 100 * result.share, result.rows_added, result.score_before, result.score_after, result.threshold,
                 "" if result.now_ok else f" (still not OK at feedback.patch_share {cfg.feedback.patch_share})")
    detector.method.save(method_dir)  # the state files only: the rest (calibration.json, detector.json) is the champion's
    for path in sorted(base_dir.iterdir()):
        if path.is_file() and not (method_dir / path.name).exists():
            shutil.copy2(path, method_dir / path.name)
    return method_dir, learned


def _now_ok(candidate: Detector, feedback: FeedbackLog, pending: list[VerdictRecord], max_pixels: int) -> int:
    """How many of the learned false rejects the candidate decides OK."""
    return sum(v.decision == "OK" for v in decide_batched(candidate, recorded_images(feedback, pending, max_pixels)))


def _evaluate(cfg: Config, method_dir: Path, manifest: Any, task_of_product: dict[str, str]) -> dict[str, dict[str, float]]:
    from flows import pipeline

    return pipeline.evaluate_all_tasks(cfg, method_dir, manifest, task_of_product)


def _version(cfg: Config, method_dir: Path, meta: dict[str, Any]) -> str:
    from flows import pipeline

    return pipeline.version_memory_bank(cfg, method_dir, meta)


def _register(cfg: Config, step: int, metrics: dict[str, dict[str, float]], method_dir: Path, bank_version: str, store: BankStore,
              gate: GateDecision, feedback: FeedbackLog) -> str | None:
    """Register the candidate (as add-product does) and attach the audit trail to its run and model version."""
    from flows.add_product import _track
    from flows.tracking import make_tracker

    tracker = make_tracker(cfg, run_name="feedback")
    model_version = _track(cfg, tracker, step, "feedback", metrics, method_dir, bank_version, store, gate.to_dict())
    log_audit(tracker, model_version, feedback)
    return model_version


def log_audit(tracker: Any, model_version: str | None, feedback: FeedbackLog) -> None:
    """The verdicts as artifact ``feedback/verdicts.jsonl`` of the model version's run, and counts as its tags."""
    if model_version is None or not hasattr(tracker, "client"):
        return
    records = feedback.read()
    name, client = tracker.cfg.registered_model, tracker.client
    run_id = client.get_model_version(name, str(model_version)).run_id
    client.log_text(run_id, "".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in records), "feedback/verdicts.jsonl")
    counts = {"feedback_verdicts": len(records), "feedback_false_rejects": sum(r.kind == FALSE_REJECT for r in records),
              "feedback_escapes": sum(r.kind == ESCAPE for r in records)}
    for key, value in counts.items():
        client.set_model_version_tag(name, str(model_version), key, str(value))


@flow(name="contad-feedback-apply", log_prints=True, persist_result=False)
def feedback_apply_flow(config: dict[str, Any] | None = None, out: str | None = None, force: bool = False,
                        overrides: list[str] | None = None) -> dict[str, Any]:
    """Prefect flow of ``contad feedback apply`` (deployable like add-product); returns what ``apply_feedback`` did."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.records import RESULTS_DIR

    cfg = Config.model_validate(config or {})
    cfg._overrides = list(overrides or [])
    target = Path(out) if out else default_out()
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str((target / RESULTS_DIR).resolve())}):
        result = apply_feedback(cfg, target, force)
    return {k: v for k, v in result.items() if k != "metrics"}


# ---------------------------------------------------------------------------------- the command
def list_feedback(cfg: Config, as_json: bool = False) -> int:
    """``contad feedback list``: every verdict with the model and bank versions that decided it."""
    records = FeedbackLog(Path(cfg.banks.store_dir)).read()
    if as_json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
        return 0
    print(f"{'id':12}  {'product':14} {'verdict':7} {'kind':13} {'decision':8} {'score':>8}  {'model':>5} {'bank':12} {'learned_in':12} by / at / path")
    for r in records:
        print(f"{r.id[:12]}  {r.product:14} {r.verdict:7} {r.kind:13} {r.decision:8} {r.score:8.4f}  {r.model_version or '-':>5} "
              f"{(r.bank_version or '-')[:SHORT_HASH]:12} {(r.learned_in or '-')[:SHORT_HASH]:12} {r.by} / {r.at} / {r.path}")
    print(f"{len(records)} verdict(s) in {FeedbackLog(Path(cfg.banks.store_dir)).verdicts_file}")
    return 0


def feedback_command(cfg: Config, items: list[str], verdict: str | None, product: str | None = None, by: str | None = None,
                     predictions: Path | None = None, apply: bool = False, force: bool = False, as_json: bool = False, out: Path | None = None) -> int:
    """``contad feedback``: record verdicts (PATH... --as), ``apply`` them, or ``list`` the audit trail."""
    if items[:1] == ["list"]:
        return list_feedback(cfg, as_json)
    if items[:1] == ["apply"] or apply:
        if items[1:] if items[:1] == ["apply"] else items:
            raise ContadError("feedback apply takes no images: record them first with contad feedback PATH... --as good|defect")
        return _apply_command(cfg, out, force)
    if verdict is None:
        raise ContadError("feedback PATH... needs --as good|defect (or: contad feedback apply | list)")
    records = record_feedback(cfg, items, verdict, product, by, predictions)
    for r in records:
        print(f"{r.path}: {r.verdict} ({r.kind.replace('_', ' ')}; decided {r.decision}, score {r.score:.4f}, threshold {r.threshold:.4f}, "
              f"model version {r.model_version or '-'}, bank {(r.bank_version or '-')[:SHORT_HASH]}); product {r.product}, id {r.id[:12]}")
    pending = len(FeedbackLog(Path(cfg.banks.store_dir)).pending_false_rejects())
    print(f"{len(records)} verdict(s) recorded; {pending} false reject(s) waiting to be learned (contad feedback apply; feedback.min_images={cfg.feedback.min_images})")
    return 0


def _apply_command(cfg: Config, out: Path | None, force: bool) -> int:
    result = feedback_apply_flow(config=config_to_dict(cfg), out=str(out) if out else None, force=force, overrides=cfg.overrides)
    if not result["applied"]:
        print(f"nothing applied: {result['pending']} false reject(s) waiting, feedback.min_images={result['min_images']} (--force applies fewer); "
              f"current bank version stays {result['previous_version'][:SHORT_HASH]}")
        return 0
    if result["promoted"]:
        print(f"learned {result['learned']} false reject(s) ({result['now_ok']} now decided OK): bank version {result['bank_version'][:SHORT_HASH]} "
              f"is current, model version {result['model_version'] or '-'} is champion")
        return 0
    print(f"contad: feedback apply rejected: promotion gate failed: {'; '.join(result['gate']['reasons'])}\n"
          f"  bank version {result['bank_version'][:SHORT_HASH]} stored but current stays {result['previous_version'][:SHORT_HASH]}; champion unchanged",
          file=sys.stderr)
    return 1
