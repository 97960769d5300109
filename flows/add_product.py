"""Triggered incremental run: add one new product on top of the current champion.

``contad add-product PATH --name NAME`` validates the product folder, caches its structure
masks, trains the new task starting from the current memory-bank version, evaluates ALL
products (old products' test data located through the bank manifest's ``products``), versions
the bank, registers the detector and applies the promotion gate. A product folder with
``train/good`` images only (how a new product arrives on a real line) is accepted: a share of
its normals is reserved before training (``promotion.reserved_normals_fraction``) and the gate
checks the false-reject rate on them (``promotion.max_false_reject_rate``) instead of AUROC,
plus forgetting on the old products' test sets. Only a step that passes the
gate moves the bank store's ``CURRENT`` pointer and the registry's ``champion`` alias, together,
through ``flows.promotion.promote``; on gate failure or any error both stay where they were. The
whole read-modify-write holds the bank store's lock.

``--via-server`` instead emits the ``contad.product.added`` event to the Prefect server, where
``contad serve`` runs this same flow.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, tags, task
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from components.artifact import deployed_config, read_detector_config
from components.atomic import atomic_write_json
from components.config import Config, config_to_dict
from components.data.protocol import task_name, task_products
from components.data.tiling import resolve_tiling
from components.errors import ContadError, DataError
from components.eval.continual import RESERVED_FRR
from components.faults import fault_point
from components.memory.store import CURRENT_FILE, SHORT_HASH, BankStore, content_hash, state_files
from flows.feedback import gate_escapes
from flows.promotion import GATE_METRIC, GateDecision, Registry, check_agreement, promote, promotion_gate, store_transaction
from flows.records import RESULTS_DIR
from flows.run_links import add_product_run_name, link_runs, named, publish_add_product, run_tags, tag_flow_run
from flows.tracking import make_tracker

log = logging.getLogger(__name__)

PRODUCT_ADDED_EVENT = "contad.product.added"
_VALID_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class AddProductError(ContadError):
    """An incremental run failed; champion and current bank version are unchanged."""


@dataclass
class AddProductResult:
    """What an incremental run did."""

    name: str
    previous_version: str
    bank_version: str
    model_version: str | None
    promoted: bool
    gate: GateDecision
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "previous_version": self.previous_version,
            "bank_version": self.bank_version,
            "model_version": self.model_version,
            "promoted": self.promoted,
            "gate": self.gate.to_dict(),
            "metrics": self.metrics,
        }


@contextmanager
def _stage(name: str, product: str, previous: str | None) -> Iterator[None]:
    """Re-raise any failure inside a stage as ``AddProductError`` naming the stage."""
    try:
        yield
    except Exception as exc:
        kept = f"current bank version stays {previous[:SHORT_HASH]}" if previous else "nothing was changed"
        raise AddProductError(f"add-product {product!r} failed while {name}: {exc} ({kept}; champion unchanged)") from exc


def check_product_name(name: str) -> str:
    """``name`` if it is a usable product name (letters, digits, ``_.-``); else ``DataError``."""
    if not _VALID_NAME.fullmatch(name or ""):
        raise DataError(f"product name {name!r} is invalid: use letters, digits, '_', '.', '-' (no '/', '+' or spaces)")
    return name


def default_out(name: str) -> Path:
    return Path("runs") / "add-product" / name


def _task_of_product(manifest: dict[str, Any]) -> dict[str, str]:
    """Product -> task name of the products already learned by a bank version."""
    if isinstance(manifest.get("task_of_product"), dict):
        return {str(k): str(v) for k, v in manifest["task_of_product"].items()}
    mapping: dict[str, str] = {}
    for learned in manifest.get("tasks") or []:
        products = [str(p) for p in learned] if isinstance(learned, list) else task_products(str(learned))
        for product in products:
            mapping[product] = task_name(products)
    for product in manifest.get("products") or {}:
        mapping.setdefault(product, product)
    return mapping


def _task_names(manifest: dict[str, Any]) -> list[str]:
    return [task_name(t) if isinstance(t, list) else str(t) for t in manifest.get("tasks") or []]


def _stored_metrics(manifest: dict[str, Any], products: list[str]) -> dict[str, dict[str, float]] | None:
    """The bank version's own per-product metrics, when it recorded the gate metric for all ``products``
    (for a product with normal images only: its reserved-normal false-reject rate)."""
    metrics = manifest.get("metrics")
    if not isinstance(metrics, dict):
        return None
    if all(isinstance(metrics.get(p), dict) and (metrics[p].get(GATE_METRIC) is not None or RESERVED_FRR in metrics[p]) for p in products):
        return {p: dict(metrics[p]) for p in products}
    return None


def _json_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """Metrics with NaN/inf as None (strict JSON for the bank manifest)."""
    return {p: {k: float(v) if v is not None and math.isfinite(float(v)) else None for k, v in m.items()} for p, m in metrics.items()}


def _validated_manifest(path: Path, name: str, in_flow: bool = True) -> pd.DataFrame:
    """Validate the product folder (as a one-product dataset named ``name``) and read its manifest; errors name
    the user's folder, not the temporary one-product dataset. ``in_flow=False``: the plain check (no Prefect task)."""
    from components.data.manifest import read_product
    from flows import pipeline

    with tempfile.TemporaryDirectory(prefix="contad-add-") as tmp:
        (Path(tmp) / name).symlink_to(path, target_is_directory=True)
        validate = pipeline.validate_dataset if in_flow else pipeline.validate_dataset.fn

        def users_paths(message: str) -> str:
            for root in dict.fromkeys((tmp, str(Path(tmp).resolve()))):
                message = message.replace(f"dataset {root} ", f"product folder {path} ").replace(str(Path(root) / name), str(path))
                message = message.replace(root, f"{path} (as product {name!r})")
            return message

        try:
            with _log_rewrite(users_paths):
                validate(Path(tmp))
        except DataError as exc:
            raise DataError(users_paths(str(exc))) from None
    return read_product(path, name)


class _RewriteFilter(logging.Filter):
    """Rewrites every passing record's rendered message with ``rewrite``."""

    def __init__(self, rewrite: Any) -> None:
        super().__init__()
        self.rewrite = rewrite

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.rewrite(record.getMessage()), None
        return True


@contextmanager
def _log_rewrite(rewrite: Any) -> Iterator[None]:
    """While inside, log lines reaching the root handlers are rewritten (the temporary folder -> the user's)."""
    handlers = list(logging.getLogger().handlers)
    rewrite_filter = _RewriteFilter(rewrite)
    for handler in handlers:
        handler.addFilter(rewrite_filter)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(rewrite_filter)


def _old_manifest(products: dict[str, str]) -> pd.DataFrame:
    """Manifest of the products a bank version learned, from their recorded folders."""
    from components.data.manifest import read_product

    frames = []
    for product, product_dir in products.items():
        if not Path(product_dir).is_dir():
            raise DataError(f"product {product!r} recorded in the bank manifest at {product_dir} no longer exists; its test data is needed to check forgetting")
        frames.append(read_product(Path(product_dir), product))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def add_product(cfg: Config, path: Path, name: str, out: Path | None = None) -> AddProductResult:
    """Run the incremental step for product ``name`` at ``path``; raises ``AddProductError`` on any failure.

    Holds the bank store's lock from reading the champion to moving it (a concurrent add-product
    waits), so no product is ever lost; a crash anywhere leaves (or ``recover`` restores) the
    previous bank current and champion.
    """
    path = Path(path).resolve()
    check_product_name(name)
    if not path.is_dir():
        raise DataError(f"product folder {path} does not exist or is not a directory")
    out = Path(out or default_out(name)).resolve()
    store = BankStore(Path(cfg.banks.store_dir))
    if not (store.root / CURRENT_FILE).is_file():
        raise _no_champion(store)
    with store_transaction(cfg, store) as (store, registry):
        return _add_product_locked(cfg, path, name, out, store, registry)


def _no_champion(store: BankStore) -> AddProductError:
    return AddProductError(
        f"no current memory-bank version in {store.root}: add-product builds on the current champion, so train a "
        f"sequence first (contad run --out DIR) and point banks.store_dir at its store (DIR/banks)"
    )


def _add_product_locked(cfg: Config, path: Path, name: str, out: Path, store: BankStore, registry: Registry | None) -> AddProductResult:
    from flows import pipeline

    previous = store.current()
    if previous is None:
        raise _no_champion(store)
    check_agreement(store, registry)
    base = store.show(previous)
    if base.get("method") not in (None, cfg.method):
        raise AddProductError(f"bank version {previous[:SHORT_HASH]} holds a {base['method']!r} model but method={cfg.method!r}; use the configuration of the run that produced it")
    old_products: dict[str, str] = {str(k): str(v) for k, v in (base.get("products") or {}).items()}
    step = int(base.get("step", len(_task_names(base)) - 1)) + 1
    if name in old_products:
        finished = _finish_interrupted_record(cfg, name, path, out, store, registry, base, previous)
        if finished is not None:
            return finished
        raise AddProductError(f"product {name!r} is already learned by bank version {previous[:SHORT_HASH]} (from {old_products[name]}); choose another --name")
    tracker = make_tracker(cfg, run_name=f"add-product-{name}")
    log.info("adding product %s from %s on top of bank version %s (products: %s)", name, path, previous[:SHORT_HASH], ", ".join(old_products))

    with _stage("validating the product data", name, previous):
        new_manifest = _validated_manifest(path, name)
    with _stage("reading the old products' data", name, previous):
        old_manifest = _old_manifest(old_products)
    manifest = pd.concat([old_manifest, new_manifest], ignore_index=True)
    training = pipeline.training_manifest(cfg, manifest)  # without the reserved normals of products with no test images
    base_dir = store.checkout(previous, out / "base_method")
    cfg = _base_config(cfg, base_dir, previous, old_manifest, list(old_products))
    with _stage("caching structure masks", name, previous):
        pipeline.cache_masks(cfg, training, [name])
    with _stage("training the new task", name, previous):
        method_dir = named(pipeline.train_task, "train", step, name)(cfg, base_dir, name, [name], training, out / "method")
    fault_point("after_train")
    task_of_product = {**_task_of_product(base), name: name}
    with _stage("evaluating all products", name, previous):
        metrics = named(pipeline.evaluate_all_tasks, "evaluate", step, f"{len(task_of_product)} products")(cfg, method_dir, manifest, task_of_product)
        before = _stored_metrics(base, list(old_products))
        if before is None and old_products:
            before = pipeline.evaluate_all_tasks(cfg, base_dir, old_manifest, _task_of_product(base))
    gate = promotion_gate(cfg.promotion, [name], metrics, before)
    with _stage("scoring the recorded escapes", name, previous):
        escapes = gate_escapes(cfg, store, gate, method_dir, base_dir, previous)  # operator feedback (flows/feedback.py)
    meta = {
        "step": step,
        "task": name,
        "tasks": _task_names(base) + [name],
        "products": {**old_products, name: str(path)},
        "task_of_product": task_of_product,
        "method": cfg.method,
        "metrics": _json_metrics(metrics),
        "gate": gate.to_dict(),
        "trigger": "add-product",
        "parent": previous,
        **({"escapes": escapes} if escapes else {}),
    }
    with _stage("versioning the memory bank", name, previous):
        bank_version = named(pipeline.version_memory_bank, "version", step, name)(cfg, method_dir, meta)  # a candidate: not current yet
    fault_point("after_store")
    with _stage("tracking and registering the model", name, previous):
        model_version = named(_track, "register", step, name)(cfg, tracker, step, name, metrics, method_dir, bank_version, store, gate.to_dict())
    fault_point("after_register")
    if gate.passed:
        with _stage("promoting the new version", name, previous):
            promote(store, registry, bank_version, model_version)
            _mark_promoted(tracker, model_version)
    result = AddProductResult(name, previous, bank_version, model_version, gate.passed, gate, metrics)
    publish_add_product(name, step, metrics, gate.to_dict(), bank_version, model_version, tracker, store.root)
    atomic_write_json(out / "add_product.json", result.to_dict())
    return result


def _finish_interrupted_record(cfg: Config, name: str, path: Path, out: Path, store: BankStore, registry: Registry | None, base: dict[str, Any],
                               current: str) -> AddProductResult | None:
    """The result of an add-product of ``name`` into ``out`` whose promotion committed but which was killed before writing
    ``add_product.json``: the current version is its step (same folder, same trained state in ``out/method``). Tags the
    promoted run and writes the record; None when the current version is not such an unfinished step."""
    if (out / "add_product.json").is_file() or base.get("task") != name or base.get("trigger") != "add-product":
        return None
    if (base.get("products") or {}).get(name) != str(path) or not (out / "method").is_dir():
        return None
    if content_hash(state_files(out / "method")) != current:
        return None
    model_version = registry.version_for_bank(current) if registry is not None else None
    log.warning("add-product %s: the promotion of bank version %s committed but the run was interrupted before its record; finishing it",
                name, current[:SHORT_HASH])
    _mark_promoted(make_tracker(cfg, run_name=f"add-product-{name}"), model_version)
    gate = GateDecision(**{k: v for k, v in (base.get("gate") or {"passed": True}).items() if k in GateDecision.__dataclass_fields__})
    result = AddProductResult(name, str(base.get("parent") or ""), current, model_version, True, gate, base.get("metrics") or {})
    atomic_write_json(out / "add_product.json", result.to_dict())
    return result


def _base_config(cfg: Config, base_dir: Path, previous: str, old_manifest: pd.DataFrame, old_products: list[str]) -> Config:
    """The configuration the new task is learned with: the champion's own (``detector.json``: image size,
    tiling, backbone, method switches) with this command's deploy-time settings; an override that would
    change how the champion scores is refused. A champion stored before its configuration was: ``cfg``,
    with ``data.tile=auto`` resolved on the old products as the base run did."""
    stored = read_detector_config(base_dir)
    if stored is None:
        return resolve_tiling(cfg, old_manifest, old_products)
    return deployed_config(stored, cfg, f"bank version {previous[:SHORT_HASH]}")


@task(name="register_model", cache_policy=NO_CACHE, persist_result=False)
def _track(cfg: Config, tracker: Any, step: int, name: str, metrics: dict[str, dict[str, float]], method_dir: Path, bank_version: str, store: BankStore,
           gate: dict[str, Any] | None = None) -> str | None:
    """Log the step and register its detector with the gate's decision (the champion alias moves only in ``promote``)."""
    from flows.pipeline import log_train_losses

    with tracker:
        tracker.log_config(cfg)
        link_runs(tracker)
        with tracker.step(step, name):
            tracker.log_step_metrics(step, metrics)
            log_train_losses(tracker, step, name, Path(method_dir).parent)
            model_version = tracker.register_step_model(method_dir, bank_version, step, config=cfg, manifest=store.show(bank_version), task=name)
            if gate is not None:
                tracker.record_gate(model_version, gate)
    return model_version


def _mark_promoted(tracker: Any, model_version: str | None) -> None:
    """Tag the step run of the promoted model version (best effort: the promotion itself is done)."""
    if model_version is None or not hasattr(tracker, "client"):
        return
    try:
        run_id = tracker.client.get_model_version(tracker.cfg.registered_model, model_version).run_id
        tracker.mark_promoted(run_id)
    except Exception as exc:  # noqa: BLE001 - a missing tag must not undo a committed promotion
        log.warning("could not tag the promoted run of model version %s: %s", model_version, exc)


@flow(name="contad-add-product", log_prints=True, flow_run_name=add_product_run_name)
def add_product_flow(path: str, name: str, config: dict[str, Any] | None = None, out: str | None = None, fail_on_reject: bool = True,
                     overrides: list[str] | None = None) -> dict[str, Any]:
    """Prefect flow of an incremental run (what ``contad serve`` runs on ``contad.product.added``).

    Returns ``AddProductResult.to_dict()``. Raises when the step fails, and (``fail_on_reject``)
    when the promotion gate rejects it, so a served flow run ends Failed.
    """
    cfg = Config.model_validate(config or {})
    cfg._overrides = list(overrides or [])  # what the user set explicitly: refused when it would change how the champion scores
    target = Path(out) if out else default_out(name)
    labels = run_tags(cfg.method, cfg.protocol.name, "add-product")
    tag_flow_run(labels)
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str((target / RESULTS_DIR).resolve())}), tags(*labels):
        result = add_product(cfg, Path(path), name, target)
    if fail_on_reject and not result.promoted:
        raise AddProductError(f"product {name!r} rejected: {result.gate.message()} (bank version {result.bank_version[:SHORT_HASH]} kept but not current; champion unchanged)")
    return result.to_dict()


def emit_product_added(path: Path, name: str, api_url: str | None = None) -> None:
    """Send ``contad.product.added`` (payload: path, name) to the Prefect server at ``PREFECT_API_URL``."""
    from prefect.settings import PREFECT_API_URL

    from flows.events import emit_event

    url = api_url or PREFECT_API_URL.value()
    if not url:
        raise ContadError("--via-server needs a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api) to the server where `contad serve` runs")
    check_prefect_server(url)
    try:
        emit_event(url, PRODUCT_ADDED_EVENT, f"contad.product.{name}", {"path": str(Path(path).resolve()), "name": name},
                   {"prefect.resource.name": name})
    except Exception as exc:
        raise ContadError(f"could not send {PRODUCT_ADDED_EVENT} to the Prefect server at {url}: {exc}") from exc
    log.info("emitted %s for %s (%s) to %s", PRODUCT_ADDED_EVENT, name, path, url)


def check_prefect_server(url: str) -> None:
    """``ContadError`` unless the Prefect API at ``url`` answers its health check."""
    import httpx

    try:
        response = httpx.get(url.rstrip("/") + "/health", timeout=5.0)
        response.raise_for_status()
    except Exception as exc:
        raise ContadError(f"no Prefect server answering at PREFECT_API_URL={url} ({exc}); start one with `prefect server start` and run `contad serve`") from exc


def add_product_command(cfg: Config, path: Path, name: str, out: Path | None, via_server: bool) -> int:
    """``contad add-product``: 0 when the product was added and promoted, 1 when the gate rejected it."""
    check_product_name(name)
    if via_server:
        if not Path(path).is_dir():
            raise DataError(f"product folder {path} does not exist or is not a directory")
        emit_product_added(Path(path), name)
        print(f"sent {PRODUCT_ADDED_EVENT} for {name!r} ({Path(path).resolve()}); the `contad serve` deployment will run it")
        return 0
    if not Path(path).is_dir():
        raise DataError(f"product folder {path} does not exist or is not a directory")
    with _stage("validating the product data", name, BankStore(Path(cfg.banks.store_dir)).current()):
        _validated_manifest(Path(path).resolve(), name, in_flow=False)  # bad data: an error naming the folder, before Prefect starts
    result = add_product_flow(path=str(Path(path).resolve()), name=name, config=config_to_dict(cfg), out=str(out) if out else None, fail_on_reject=False,
                              overrides=cfg.overrides)
    if result["promoted"]:
        rate = (result["gate"].get("false_reject_rates") or {}).get(name)
        checked = "" if rate is None else f" (normal images only: {rate:.1%} of its reserved normals rejected, limit {cfg.promotion.max_false_reject_rate:.1%})"
        print(f"added {name!r}{checked}: bank version {result['bank_version'][:SHORT_HASH]} is current, model version {result['model_version'] or '-'} is champion")
        return 0
    print(
        f"contad: add-product {name!r} rejected: promotion gate failed: {'; '.join(result['gate']['reasons'])}\n"
        f"  bank version {result['bank_version'][:SHORT_HASH]} stored but current stays {result['previous_version'][:SHORT_HASH]}; champion unchanged",
        file=sys.stderr,
    )
    return 1

