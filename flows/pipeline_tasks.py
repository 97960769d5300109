"""The building blocks of the continual pipeline as Prefect tasks (``.fn`` is the plain function).

Called inside a flow they become task runs with retries on transient I/O errors, persisted results
and logs (``io_task``), or plain graph nodes for tasks that take live objects such as the MLflow
tracker (``graph_task``):

- ``validate_dataset(root) -> manifest``
- ``cache_masks(cfg, manifest, products) -> cache dir``
- ``train_task(cfg, method_dir_in, task_name, products, manifest, out_dir) -> method dir``
- ``evaluate_all_tasks(cfg, method_dir, manifest, task_of_product) -> metrics by product``
- ``version_memory_bank(cfg, method_dir, meta) -> bank version hash``
- ``register_model``, ``promote_if_gate_passes``, ``report_task``, ``publish_run`` (tracker and report)

Import them through ``flows.pipeline``, which sets Prefect's logging and startup defaults first.
"""

from __future__ import annotations

import errno
import functools
import logging
import random
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE, RUN_ID, TASK_SOURCE
from prefect.exceptions import MissingContextError

from components.artifact import write_detector_config
from components.atomic import atomic_write_json
from components.config import Config
from components.data.loading import reserve_normals, task_data
from components.errors import DataError
from components.eval.report import write_report
from components.eval.step_eval import evaluate_learned
from components.eval.thresholds import calibrate_method, carried_leave_out, read_calibration, task_leave_out, write_calibration
from components.memory.store import BankStore
from components.methods.loading import load_method
from components.segment.fallback import structure_masks
from components.segment.cache import MaskCache, build_cache
from components.segment.task_maps import task_label_maps
from components.types import ImageBatch, Prediction
from flows import promotion  # looked up on use: tests swap promotion.promotion_gate
from flows.records import TRAIN_LOG, report_artifacts
from flows.run_links import publish_summary

log = logging.getLogger(__name__)

IO_RETRIES = 2
IO_RETRY_DELAY_S = 2.0
DETERMINISTIC_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """Prefect's run logger inside a flow/task run, else this module's logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return log


def retry_on_transient_io(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: only transient I/O errors (never bad data, missing files or training errors)."""
    try:
        state.result()
    except DETERMINISTIC_OS_ERRORS:
        return False
    except OSError as exc:
        return exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # disk full / read-only: retrying cannot help
    except BaseException:  # noqa: BLE001 - anything else is deterministic: do not retry
        return False
    return False


io_task = functools.partial(
    task,
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAY_S,
    retry_condition_fn=retry_on_transient_io,
    persist_result=True,
    # Result keys include the flow-run id: results are persisted (OUT/.prefect-results) but never
    # reused across runs; resuming a run is the job of the step records.
    cache_policy=INPUTS + TASK_SOURCE + RUN_ID,
)
# Tasks that take live objects (the MLflow tracker): shown in the flow graph, never cached or persisted.
graph_task = functools.partial(task, cache_policy=NO_CACHE, persist_result=False)


# ---------------------------------------------------------------------------------- helpers
def seed_everything(seed: int, task: str) -> None:
    """Seed python/numpy/torch from the run seed and the task name (independent of resume order)."""
    value = (seed * 1_000_003 + zlib.crc32(task.encode("utf-8"))) & 0x7FFFFFFF
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def training_manifest(cfg: Config, manifest: pd.DataFrame) -> pd.DataFrame:
    """``manifest`` without the reserved normals of products that have no test images (training never sees them)."""
    return reserve_normals(manifest, cfg.promotion.reserved_normals_fraction, cfg.seed)[0]


# ---------------------------------------------------------------------------------- data and training
@io_task(name="validate_dataset", task_run_name="validate dataset")
def validate_dataset(root: Path, min_valid_fraction: float | None = None) -> pd.DataFrame:
    """Validate the dataset at ``root`` (never modifies it) and return its manifest.

    ``min_valid_fraction``: minimum share of valid xyz points per tiff (None = validation default).
    Raises ``DataError`` listing every failed check.
    """
    from components.data import validate as data_validation  # Great Expectations: imported on use

    logger = run_logger()
    root = Path(root)
    floor = data_validation.DEFAULT_MIN_VALID_FRACTION if min_valid_fraction is None else min_valid_fraction
    report = data_validation.validate_dataset(root, floor)
    if not report.ok or report.manifest is None:
        raise DataError(report.describe())
    manifest = report.manifest
    logger.info("dataset %s valid: %d images of %d products", root, len(manifest), manifest["product"].nunique())
    if report.not_evaluable:  # learned like any product; gated on the false-reject rate of its reserved normals
        logger.info("product(s) %s have normal images only (no test images): learned but not evaluable by AUROC; "
                    "the promotion gate uses their false-reject rate on reserved normals", ", ".join(report.not_evaluable))
    return manifest


@io_task(name="cache_masks", task_run_name="masks-{cfg.masks.provider}")
def cache_masks(cfg: Config, manifest: pd.DataFrame, products: list[str]) -> Path:
    """Fill the structure-mask cache (``cfg.masks.cache_dir``) for the training images of ``products``."""
    logger = run_logger()
    cache_dir = Path(cfg.masks.cache_dir)
    rows = manifest[(manifest["split"] == "train") & manifest["product"].isin(products)]
    items = list(zip(rows["image_path"].astype(str), rows["product"].astype(str)))
    masks = structure_masks(cfg)  # the method's provider, or its recorded fallback
    if masks.fell_back:
        logger.warning("structure masks: %s instead of %s (%s)", masks.used, masks.requested, masks.reason)
    summary = build_cache(MaskCache(cache_dir, masks.config), items, workers=cfg.masks.workers)
    logger.info("mask cache %s (%s): %s", cache_dir, masks.used, summary.as_dict())
    return cache_dir


@io_task(name="train_task", task_run_name="train-{task_name}")
def train_task(cfg: Config, method_dir_in: Path | None, task_name: str, products: list[str], manifest: pd.DataFrame, out_dir: Path) -> Path:
    """Learn one task on top of the state in ``method_dir_in`` (None = fresh method).

    Saves the new state atomically into ``out_dir`` and the training log next to it
    (``<out_dir's parent>/train_log.json``); returns ``out_dir``.
    """
    logger = run_logger()
    out_dir = Path(out_dir)
    seed_everything(cfg.seed, task_name)
    method = load_method(cfg, Path(method_dir_in) if method_dir_in is not None else None)
    data = task_data(manifest, task_name, products, cfg, task_label_maps(cfg, manifest, products))
    logger.info("training %s on task %s (%d images, tasks so far: %s)", cfg.method, task_name, len(data.train), method.tasks)
    started, cpu_started = time.perf_counter(), time.process_time()
    train_log = method.fit_task(data)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started  # what the wall time would be on an idle machine with one thread
    method.save(out_dir)
    write_detector_config(out_dir, cfg)  # what inference needs besides the state: deployed = evaluated
    previous = read_calibration(Path(method_dir_in)) if method_dir_in is not None else None
    leave_out = {**carried_leave_out(method, previous), **task_leave_out(method, data)}
    calibration = calibrate_method(cfg, method, manifest, leave_out)
    if calibration is not None:
        write_calibration(out_dir, calibration)  # part of the state: versioned with the bank, shipped with the model
    atomic_write_json(out_dir.parent / TRAIN_LOG, {"task": task_name, "products": products, "seconds": seconds, "cpu_seconds": cpu_seconds, "log": train_log})
    logger.info("task %s trained in %.1f s; state saved to %s", task_name, seconds, out_dir)
    return out_dir


@io_task(name="evaluate_all_tasks")
def evaluate_all_tasks(cfg: Config, method_dir: Path, manifest: pd.DataFrame, task_of_product: dict[str, str]) -> dict[str, dict[str, float]]:
    """Metrics of every product in ``task_of_product`` (``evaluate_learned``); images carry no product label."""
    metrics = evaluate_learned(cfg, Path(method_dir), manifest, task_of_product)
    run_logger().info("evaluated %d products with %s", len(metrics), method_dir)
    return metrics


@io_task(name="version_memory_bank")
def version_memory_bank(cfg: Config, method_dir: Path, meta: dict[str, Any]) -> str:
    """Store the state in ``method_dir`` as an immutable, not-yet-current bank version in ``cfg.banks.store_dir``; returns its hash."""
    version = BankStore(cfg.banks.store_dir).commit(Path(method_dir), meta, make_current=False)  # a candidate until promoted
    run_logger().info("bank version %s (step %s) in %s", version[:12], meta.get("step"), cfg.banks.store_dir)
    return version


# ---------------------------------------------------------------------------------- registry, gate, report
@graph_task(name="register_model")
def register_model(tracker: Any, method_dir: Path, bank_version: str, step: int, task: str, manifest: dict[str, Any]) -> str | None:
    """Log the step's detector as an MLflow logged model and register it (``Tracker.register_step_model``)."""
    return tracker.register_step_model(method_dir, bank_version, step, manifest=manifest, task=task)


@graph_task(name="promotion_gate")
def promote_if_gate_passes(cfg: Config, tracker: Any, bank_version: str, model_version: str | None, after: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Gate the step against the current champion (every product it does not contain is new to the gate);
    when it passes, make its bank version current and its model champion (one transaction)."""
    store = BankStore(cfg.banks.store_dir)
    champion = store.current()
    new_products, before = promotion.gate_scope(after, store.show(champion) if champion else None)
    decision = promotion.promotion_gate(cfg.promotion, new_products, after, before)
    tracker.record_gate(model_version, decision.to_dict())
    if decision.passed:
        promotion.promote(BankStore(cfg.banks.store_dir), promotion.registry_for(cfg), bank_version, model_version)
        tracker.mark_promoted()
    run_logger().info("%s", decision.message())
    return decision.to_dict()


@graph_task(name="report", task_run_name="report")
def report_task(out: Path, metrics_json: dict[str, Any], overlays: dict[str, tuple[ImageBatch, Prediction]] | None) -> Path:
    """``write_report`` as a task of the flow graph, with where the run's method stands on the leaderboard."""
    from components.eval.standing import method_standing, standing_markdown
    from flows.bench import LEADERBOARD_JSON

    method = metrics_json["method"]
    standing = standing_markdown(method_standing(LEADERBOARD_JSON, method), method, "benchmarks/LEADERBOARD.json")
    return write_report(out, metrics_json, overlays, standing)


@graph_task(name="publish_run", task_run_name="publish to MLflow and Prefect")
def publish_run(tracker: Any, out: Path, metrics_json: dict[str, Any]) -> str | None:
    """Log the sequence (final metrics, report files) to MLflow and the summary artifact to Prefect; the artifact id."""
    with report_artifacts(out) as artifacts:
        tracker.log_sequence(metrics_json, artifacts)
    return publish_summary(metrics_json, tracker)
