"""The continual pipeline as Prefect tasks and one flow: validate -> masks -> (train -> evaluate -> version)*.

Building blocks (Prefect tasks; called inside a flow they become task runs with retries on
transient I/O errors, persisted results and logs; ``.fn`` is the plain function):

- ``validate_dataset(root) -> manifest``
- ``cache_masks(cfg, manifest, products) -> cache dir``
- ``train_task(cfg, method_dir_in, task_name, products, manifest, out_dir) -> method dir``
- ``evaluate_all_tasks(cfg, method_dir, manifest, task_of_product) -> metrics by product``
- ``version_memory_bank(cfg, method_dir, meta) -> bank version hash``

``continual_run(cfg, out)`` chains them over the task sequence of ``cfg.protocol`` and writes,
per completed step, an atomic step record ``OUT/steps/NN-<task>/`` (method state, training
log, metrics, bank version). Re-running the same command continues after the last completed
step; a different configuration in the same ``OUT`` is refused. Prefect runs locally (an
ephemeral API) unless ``PREFECT_API_URL`` points to a server.
"""

from __future__ import annotations

import csv
import errno
import functools
import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Before Prefect is imported: component loggers go to Prefect's run logs too, and the ephemeral
# local API gets enough time to start (and migrate a new database) on a busy 2-core machine.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "components")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import numpy as np
import pandas as pd
import torch
from prefect import flow, get_run_logger, tags, task
from prefect.cache_policies import INPUTS, NO_CACHE, RUN_ID, TASK_SOURCE
from prefect.exceptions import MissingContextError
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from rich.console import Console

from components.atomic import atomic_directory, atomic_write_json, atomic_write_text
from components.backbones.base import PromptedBackbone
from components.backbones.registry import build_backbone
from components.config import Config, config_to_dict
from components.data.loading import depth_of, load_images, reserve_normals, task_data, task_image_paths, test_batch, train_split, untested_products
from components.data.protocol import ordered_products, task_name, task_of_product, task_sequence
from components.data.tiling import effective_tile, resolve_tiling
from components.errors import ContadError, DataError
from components.eval.continual import RESERVED_FRR, AccuracyMatrix
from components.eval.evaluate import evaluate_tasks, predict_batch
from components.eval.report import write_report
from components.artifact import deployed_config, read_detector_config, write_detector_config
from components.eval.thresholds import Calibration, calibrate_heldout, carried_leave_out, decision_metrics, learned_task_of_product, read_calibration, write_calibration
from components.faults import fault_point
from components.memory.store import BankStore, state_files
from components.methods.base import ContinualMethod
from components.methods.registry import build_method, method_class, structure_masks
from components.progress import progress_bar
from components.segment.cache import MaskCache, build_cache, label_maps_for
from components.types import ImageBatch, Prediction, TaskData
from flows import fanout
from flows.run_links import continual_run_name, link_runs, named, publish_summary, run_tags

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise

STEPS_DIR = "steps"
STEP_RECORD = "step.json"
STATE_HASHES = "state_files"  # step record key: {relative path: sha256} of the saved method state
METHOD_DIR = "method"
TRAIN_LOG = "train_log.json"
RUN_RECORD = "run.json"
MATRICES_DIR = "matrices"
AVERAGE_CSV = "average.csv"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
RESULTS_DIR = ".prefect-results"
# Parts of a run directory that are not report artifacts (state, data, stores).
NON_ARTIFACTS = frozenset({STEPS_DIR, "banks", "data", "mask_cache", "mlartifacts", RESULTS_DIR, "baselines"})  # baselines: `contad demo`
# Config sections that do not change what a run computes (they may differ on resume).
FINGERPRINT_EXCLUDES = ("tracking", "banks", "compute")
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


@functools.lru_cache(maxsize=2)
def _cached_backbone(backbone_json: str, image_size: int) -> PromptedBackbone:
    from components.config import BackboneConfig

    return build_backbone(BackboneConfig.model_validate_json(backbone_json), image_size)


@functools.lru_cache(maxsize=2)
def _cached_tiled_backbone(backbone_json: str, image_size: int, tile: int, overlap: int) -> PromptedBackbone:
    from components.backbones.tiled import tiled_backbone

    return tiled_backbone(_cached_backbone(backbone_json, tile), image_size, tile, overlap)


def load_backbone(cfg: Config) -> PromptedBackbone:
    """The frozen backbone of ``cfg`` (built once per process and configuration; tiled when ``data.tile`` < image size)."""
    tile = effective_tile(cfg.data)
    if tile is not None and tile < cfg.data.image_size:
        return _cached_tiled_backbone(cfg.backbone.model_dump_json(), cfg.data.image_size, tile, cfg.data.tile_overlap)
    return _cached_backbone(cfg.backbone.model_dump_json(), cfg.data.image_size)


def stored_config(cfg: Config, method_dir: Path) -> Config:
    """The configuration ``method_dir``'s state was trained with (``detector.json``) with ``cfg``'s deploy-time
    settings: every evaluation scores what the deployed detector scores; ``cfg`` for a state saved without one."""
    stored = read_detector_config(Path(method_dir))
    return deployed_config(stored, cfg, str(method_dir)) if stored is not None else cfg


def load_method(cfg: Config, method_dir: Path | None) -> ContinualMethod:
    """A ``cfg.method`` instance, restored from ``method_dir`` when given."""
    method = build_method(cfg, load_backbone(cfg))
    if method_dir is not None:
        method.load(method_dir)
    return method


def uses_structure_masks(cfg: Config) -> bool:
    """Whether ``cfg.method`` trains with structure label maps (its ``needs_structure_masks``)."""
    return method_class(cfg.method).needs_structure_masks(cfg)


def product_dirs(manifest: pd.DataFrame, products: list[str]) -> dict[str, str]:
    """``{product: folder holding all its images}`` from the manifest."""
    dirs = {}
    for product in products:
        paths = manifest.loc[manifest["product"] == product, "image_path"].astype(str).tolist()
        if not paths:
            raise DataError(f"product {product!r} has no images in the manifest")
        dirs[product] = os.path.commonpath(paths) if len(paths) > 1 else str(Path(paths[0]).parent)
    return dirs


def fingerprinted_config(doc: dict[str, Any]) -> dict[str, Any]:
    """The part of a config dict (``config_to_dict``) that changes what a run computes.

    Tracking, bank and mask-cache locations are excluded, and so is ``data.synth``: it only says how synthetic data
    is generated, and the data itself is fingerprinted separately (``check_data_fingerprint``).
    """
    kept = {k: v for k, v in doc.items() if k not in FINGERPRINT_EXCLUDES}
    kept["data"] = {k: v for k, v in (kept.get("data") or {}).items() if k != "synth"}
    kept["masks"] = {k: v for k, v in (kept.get("masks") or {}).items() if k != "cache_dir"}  # where, not what
    return kept


def config_fingerprint(cfg: Config) -> str:
    """Hash of ``fingerprinted_config``."""
    doc = fingerprinted_config(config_to_dict(cfg))
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode("utf-8")).hexdigest()


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    changed: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return changed


def _clean_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _clean_number(value.item())
    return value


def _clean_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """Metrics with NaN/inf as None (JSON-safe)."""
    return {p: {k: _clean_number(v) for k, v in m.items()} for p, m in metrics.items()}


# ---------------------------------------------------------------------------------- building blocks
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


def task_label_maps(cfg: Config, manifest: pd.DataFrame, products: list[str]) -> torch.Tensor | None:
    """Label maps of a task's train + held-out images from the mask cache (None if the method needs none)."""
    if not uses_structure_masks(cfg):
        return None
    paths = task_image_paths(manifest, products, cfg)
    path_product = dict(zip(manifest["image_path"].astype(str), manifest["product"].astype(str)))
    return label_maps_for(paths, [path_product[p] for p in paths], structure_masks(cfg).config, Path(cfg.masks.cache_dir), cfg.data.image_size)


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
    leave_out = {**carried_leave_out(method, previous), **_calibration_scores(method, data)}
    calibration = calibrate_method(cfg, method, manifest, leave_out)
    if calibration is not None:
        write_calibration(out_dir, calibration)  # part of the state: versioned with the bank, shipped with the model
    atomic_write_json(out_dir.parent / TRAIN_LOG, {"task": task_name, "products": products, "seconds": seconds, "cpu_seconds": cpu_seconds, "log": train_log})
    logger.info("task %s trained in %.1f s; state saved to %s", task_name, seconds, out_dir)
    return out_dir


def _calibration_scores(method: ContinualMethod, data: TaskData) -> dict[str, torch.Tensor]:
    """``{task: scores}`` of the method's own calibration scores for the task it just learned (may be empty)."""
    scores = method.calibration_scores(data)
    return {data.name: scores} if scores is not None and len(scores) else {}


def training_manifest(cfg: Config, manifest: pd.DataFrame) -> pd.DataFrame:
    """``manifest`` without the reserved normals of products that have no test images (training never sees them)."""
    return reserve_normals(manifest, cfg.promotion.reserved_normals_fraction, cfg.seed)[0]


@io_task(name="evaluate_all_tasks")
def evaluate_all_tasks(cfg: Config, method_dir: Path, manifest: pd.DataFrame, task_of_product: dict[str, str]) -> dict[str, dict[str, float]]:
    """Metrics of every product in ``task_of_product`` (all learned so far); images carry no product label.

    Products without test images get only ``RESERVED_FRR`` (``evaluate_reserved``), no AUROC.
    """
    cfg = stored_config(cfg, Path(method_dir))
    untested = set(untested_products(manifest[manifest["product"].isin(list(task_of_product))]))
    batches = {p: test_batch(manifest, p, cfg.data.image_size) for p in task_of_product if p not in untested}
    metrics = evaluate_batches(cfg, Path(method_dir), batches, task_of_product) if batches else {}
    metrics.update(evaluate_reserved(cfg, Path(method_dir), manifest, sorted(untested), task_of_product))
    run_logger().info("evaluated %d products with %s", len(metrics), method_dir)
    return {p: metrics[p] for p in task_of_product}


def evaluate_reserved(cfg: Config, method_dir: Path, manifest: pd.DataFrame, products: list[str], task_of_product: dict[str, str]) -> dict[str, dict[str, float]]:
    """``{product: {RESERVED_FRR: share of its reserved normals decided NG}}`` for products without test images.

    The deployed rule: each image is routed by its own content and compared with the threshold of
    the task it was routed to (``decision_metrics``). The reserved normals were never trained on
    and never set a threshold (``reserve_normals``). NaN without reserved normals or thresholds.
    """
    if not products:
        return {}
    cfg = stored_config(cfg, Path(method_dir))
    _, reserved = reserve_normals(manifest[manifest["product"].isin(products)], cfg.promotion.reserved_normals_fraction, cfg.seed)
    calibration = read_calibration(Path(method_dir))
    method = load_method(cfg, Path(method_dir)) if calibration is not None and not reserved.empty else None
    metrics: dict[str, dict[str, float]] = {}
    for product in products:
        rows = reserved[reserved["product"] == product]
        metrics[product] = {RESERVED_FRR: math.nan}
        if method is None or rows.empty:
            run_logger().warning("product %s: no reserved normals or no decision thresholds, so no false-reject rate", product)
            continue
        batch = ImageBatch(images=load_images(list(rows["image_path"]), cfg.data.image_size), products=list(rows["product"]),
                           paths=list(rows["image_path"]), labels=torch.zeros(len(rows), dtype=torch.long), depth=depth_of(rows, cfg.data.image_size))
        prediction = predict_batch(method, batch, task_of_product, cfg.eval.batch_size)
        metrics[product][RESERVED_FRR] = decision_metrics(prediction, batch, calibration)["false_reject_rate"]  # type: ignore[arg-type]
        run_logger().info("%s (normal images only): %.3f of %d reserved normals decided NG", product, metrics[product][RESERVED_FRR], len(rows))
    return metrics


def evaluate_batches(cfg: Config, method_dir: Path, batches: dict[str, ImageBatch], task_of_product: dict[str, str]) -> dict[str, dict[str, float]]:
    """Threshold-free metrics of each product's test batch, plus OK/NG metrics at the deployed per-task thresholds."""
    cfg = stored_config(cfg, Path(method_dir))
    method = load_method(cfg, method_dir)
    metrics, predictions = evaluate_tasks(method, batches, task_of_product, cfg)
    calibration = read_calibration(method_dir)
    if calibration is not None:
        for product, prediction in predictions.items():
            metrics[product].update(decision_metrics(prediction, batches[product], calibration))
    return metrics


def overlay_examples(cfg: Config, method: ContinualMethod, manifest: pd.DataFrame, task_of_product: dict[str, str]) -> dict[str, tuple[ImageBatch, Prediction]]:
    """A few test images per product for the report figures: defective ones and at least one good one
    (so false rejects are visible too)."""
    examples: dict[str, tuple[ImageBatch, Prediction]] = {}
    n = cfg.eval.overlays_per_task
    n_good = max(1, n // 3)
    for product in task_of_product:
        rows = manifest[(manifest["product"] == product) & (manifest["split"] == "test")].sort_values("image_path")
        good, defective = rows[rows["label"] == 0], rows[rows["label"] != 0]
        n_defective = min(len(defective), max(n - min(n_good, len(good)), 0))
        chosen = pd.concat([defective.iloc[:n_defective], good.iloc[: n - n_defective]])
        if chosen.empty:
            continue
        batch = test_batch(chosen, product, cfg.data.image_size)
        examples[product] = (batch, predict_batch(method, batch, task_of_product, cfg.eval.batch_size))
    return examples


def calibrate_method(cfg: Config, method: ContinualMethod, manifest: pd.DataFrame, leave_out: dict[str, torch.Tensor] | None = None) -> Calibration | None:
    """Per-task decision thresholds of every task ``method`` learned, from the held-out normal TRAINING
    images of their products in ``manifest`` (test rows are never read) and the tasks' ``leave_out``
    scores (``components.eval.thresholds``); None without held-out images."""
    learned = learned_task_of_product(method)
    products = [p for p in learned if p in set(manifest["product"])]
    missing = sorted(set(learned) - set(products))
    if missing:
        run_logger().warning("no data for learned products %s: their tasks get no decision threshold", missing)
    if not products:
        return None
    _, held = train_split(manifest, products, cfg.data.heldout_fraction, cfg.seed)
    if held.empty:
        run_logger().warning("data.heldout_fraction=%s leaves no held-out normals: no decision thresholds", cfg.data.heldout_fraction)
        return None
    batch = ImageBatch(
        images=load_images(list(held["image_path"]), cfg.data.image_size),
        products=list(held["product"]),
        paths=list(held["image_path"]),
        labels=torch.zeros(len(held), dtype=torch.long),
        depth=depth_of(held, cfg.data.image_size),
    )
    return calibrate_heldout(method, batch, cfg, leave_out)


@io_task(name="version_memory_bank")
def version_memory_bank(cfg: Config, method_dir: Path, meta: dict[str, Any]) -> str:
    """Store the state in ``method_dir`` as an immutable, not-yet-current bank version in ``cfg.banks.store_dir``; returns its hash."""
    version = BankStore(cfg.banks.store_dir).commit(Path(method_dir), meta, make_current=False)  # a candidate until promoted
    run_logger().info("bank version %s (step %s) in %s", version[:12], meta.get("step"), cfg.banks.store_dir)
    return version


# ---------------------------------------------------------------------------------- step records
def step_dir(out: Path, index: int, name: str) -> Path:
    """``OUT/steps/NN-<task>`` (task name made filesystem-safe)."""
    safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)
    return Path(out) / STEPS_DIR / f"{index:02d}-{safe}"


def read_step_record(out: Path, index: int, name: str) -> dict[str, Any] | None:
    """The record of a completed step, or None when the step has not completed."""
    path = step_dir(out, index, name) / STEP_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ContadError(f"{path}: unreadable step record ({exc}); delete {path.parent} to retrain that step") from exc
    if record.get("task") != name or record.get("step") != index:
        raise ContadError(f"{path}: records task {record.get('task')!r} at step {record.get('step')}, expected {name!r} at step {index}")
    verify_step_state(path.parent, record)
    return record


def verify_step_state(directory: Path, record: dict[str, Any]) -> None:
    """Refuse a step whose saved method state no longer matches the content hashes in its record."""
    from components.memory.store import mismatched_files

    recorded = record.get(STATE_HASHES)
    if not isinstance(recorded, dict):
        return  # a record written before hashes were recorded
    bad = mismatched_files(directory / METHOD_DIR, recorded)
    if bad:
        raise ContadError(
            f"{directory / METHOD_DIR / bad[0]}: does not match the content hash recorded in {directory / STEP_RECORD} "
            f"({len(bad)} file(s) differ); delete {directory} to retrain that step"
        )


def check_run_record(cfg: Config, out: Path) -> dict[str, Any]:
    """Create ``OUT/run.json`` or check that an existing one belongs to the same configuration."""
    path = Path(out) / RUN_RECORD
    fingerprint = config_fingerprint(cfg)
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ContadError(f"{path}: unreadable run record ({exc})") from exc
        changed = [] if record.get("fingerprint") == fingerprint else _changed_keys(fingerprinted_config(record.get("config") or {}), fingerprinted_config(config_to_dict(cfg)))
        if record.get("fingerprint") != fingerprint and not changed and record.get("config"):
            record.update(fingerprint=fingerprint, config=config_to_dict(cfg))  # recorded before a location key left the fingerprint
            atomic_write_json(path, record)
            return record
        if changed and not completed_steps(out):
            log.info("%s: no step of the earlier run completed; starting over with the new configuration", path)
        elif record.get("fingerprint") != fingerprint:
            raise ContadError(
                f"{path}: {out} holds a run with a different configuration "
                f"(changed: {', '.join(changed) or 'none found; recorded by another contad version?'}); "
                "use another --out directory (or delete this one) to start a new run"
            )
        else:
            return record
    record = {"fingerprint": fingerprint, "config": config_to_dict(cfg), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(path, record)
    return record


def completed_steps(out: Path) -> list[Path]:
    """Step records already written in ``OUT/steps``."""
    return sorted((Path(out) / STEPS_DIR).glob(f"*/{STEP_RECORD}"))


def check_data_fingerprint(out: Path, run_record: dict[str, Any], manifest: pd.DataFrame) -> None:
    """Record the content hash of the run's images, or refuse to resume on data that changed since."""
    digest = hashlib.sha256("\n".join(sorted(manifest["sha256"].astype(str))).encode("ascii")).hexdigest()
    recorded = run_record.get("data_fingerprint")
    if recorded is None:
        run_record["data_fingerprint"] = digest
        atomic_write_json(Path(out) / RUN_RECORD, run_record)
    elif recorded != digest:
        raise ContadError(
            f"{Path(out) / RUN_RECORD}: the images under data.root changed since this run started; "
            "use another --out directory (or delete this one) to start a new run"
        )


def write_matrix_csvs(out: Path, metrics_json: dict[str, Any]) -> Path:
    """Accuracy matrices as CSV (``matrices/<metric>.csv``: step, task, one column per product)
    and ``matrices/average.csv`` (step, task, mean of each metric over the products learned so far)."""
    directory = Path(out) / MATRICES_DIR
    products: list[str] = metrics_json["tasks"]
    steps = metrics_json.get("steps") or [[p] for p in products]
    names = [task_name(s) for s in steps]
    averages: list[dict[str, Any]] = [{"step": i, "task": n} for i, n in enumerate(names)]
    for metric, rows in metrics_json["matrix"].items():
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["step", "task", *products])
        for i, row in enumerate(rows):
            writer.writerow([i, names[i], *("" if v is None else f"{v:.6f}" for v in row)])
            defined = [v for v in row if v is not None]
            averages[i][metric] = f"{sum(defined) / len(defined):.6f}" if defined else ""
        atomic_write_text(directory / f"{metric}.csv", buffer.getvalue())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["step", "task", *metrics_json["matrix"]], lineterminator="\n")
    writer.writeheader()
    writer.writerows(averages)
    atomic_write_text(directory / AVERAGE_CSV, buffer.getvalue())
    return directory


@contextmanager
def report_artifacts(out: Path) -> Iterator[Path]:
    """A temporary copy of the run directory's report files (no state, data or stores) for MLflow."""
    with tempfile.TemporaryDirectory(prefix="contad-artifacts-") as tmp:
        for entry in Path(out).iterdir():
            if entry.name in NON_ARTIFACTS or entry.name.startswith(".") or entry.suffix == ".db":
                continue
            if entry.is_dir():
                shutil.copytree(entry, Path(tmp) / entry.name)
            elif entry.is_file():
                shutil.copy2(entry, Path(tmp) / entry.name)
        yield Path(tmp)


# ---------------------------------------------------------------------------------- tracking
def open_tracker(cfg: Config, run_record: dict[str, Any]) -> Any:
    """The MLflow tracker of this run (``flows.tracking``); resumes the parent run of an interrupted attempt."""
    from flows.tracking import NullTracker, Tracker

    if not cfg.tracking.enabled:
        return NullTracker(cfg.tracking, cfg.protocol.name)
    same_store = run_record.get("tracking_uri") == cfg.tracking.uri
    return Tracker(cfg.tracking, cfg.protocol.name, run_id=run_record.get("mlflow_run_id") if same_store else None)


@graph_task(name="register_model")
def register_model(tracker: Any, method_dir: Path, bank_version: str, step: int, task: str, manifest: dict[str, Any]) -> str | None:
    """Log the step's detector as an MLflow logged model and register it (``Tracker.register_step_model``)."""
    return tracker.register_step_model(method_dir, bank_version, step, manifest=manifest, task=task)


@graph_task(name="promotion_gate")
def _promote_if_gate_passes(cfg: Config, tracker: Any, bank_version: str, model_version: str | None, after: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Gate the step against the current champion (every product it does not contain is new to the gate);
    when it passes, make its bank version current and its model champion (one transaction)."""
    from flows.promotion import gate_scope, promote, promotion_gate, registry_for

    store = BankStore(cfg.banks.store_dir)
    champion = store.current()
    new_products, before = gate_scope(after, store.show(champion) if champion else None)
    decision = promotion_gate(cfg.promotion, new_products, after, before)
    tracker.record_gate(model_version, decision.to_dict())
    if decision.passed:
        promote(BankStore(cfg.banks.store_dir), registry_for(cfg), bank_version, model_version)
        tracker.mark_promoted()
    run_logger().info("%s", decision.message())
    return decision.to_dict()


@graph_task(name="report", task_run_name="report")
def report_task(out: Path, metrics_json: dict[str, Any], overlays: dict[str, tuple[ImageBatch, Prediction]] | None) -> Path:
    """``write_report`` as a task of the flow graph."""
    return write_report(out, metrics_json, overlays)


@graph_task(name="publish_run", task_run_name="publish to MLflow and Prefect")
def publish_run(tracker: Any, out: Path, metrics_json: dict[str, Any]) -> str | None:
    """Log the sequence (final metrics, report files) to MLflow and the summary artifact to Prefect; the artifact id."""
    with report_artifacts(out) as artifacts:
        tracker.log_sequence(metrics_json, artifacts)
    return publish_summary(metrics_json, tracker)


def log_train_losses(tracker: Any, index: int, name: str, directory: Path) -> None:
    """Log the epoch losses of the training log in step directory ``directory`` (when it has one)."""
    path = Path(directory) / TRAIN_LOG
    if path.is_file():
        tracker.log_train_losses(index, name, json.loads(path.read_text()).get("log") or {})


# ---------------------------------------------------------------------------------- the flow
def check_data_root(root: Path, key: str = "data.root") -> Path:
    """``root`` resolved, or ``UnreadableDataError`` (symlink loop, no permission) / ``DataError`` (missing)."""
    from components.errors import UnreadableDataError

    try:
        resolved = Path(root).resolve(strict=True)
        with os.scandir(resolved):
            pass
    except FileNotFoundError as exc:
        raise DataError(f"{key}={root}: does not exist") from exc
    except (RuntimeError, OSError) as exc:  # RuntimeError: Python's "Symlink loop" from resolve()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UnreadableDataError(f"{key}={root}: cannot be read ({reason})") from exc
    return resolved


def _prepare(cfg: Config) -> tuple[pd.DataFrame, list[list[str]]]:
    check_data_root(Path(cfg.data.root))
    manifest = validate_dataset(Path(cfg.data.root), cfg.data.depth_min_valid_fraction)
    products = ordered_products(manifest, cfg)
    manifest = manifest[manifest["product"].isin(products)].reset_index(drop=True)
    tasks = task_sequence(products, cfg.protocol.base_tasks, cfg.protocol.step_tasks)
    return manifest, tasks


def _run_step(cfg: Config, out: Path, index: int, tasks: list[list[str]], manifest: pd.DataFrame,
              method_dir_in: Path | None, parent_version: str | None, tracker: Any) -> dict[str, Any]:
    """Train, evaluate, version and register step ``index``; its record appears atomically at the end."""
    name = task_name(tasks[index])
    learned = tasks[: index + 1]
    with tracker.step(index, name), atomic_directory(step_dir(out, index, name)) as tmp:
        method_dir = named(train_task, "train", index, name)(cfg, method_dir_in, name, tasks[index], training_manifest(cfg, manifest), tmp / METHOD_DIR)
        fault_point("after_train")
        log_train_losses(tracker, index, name, tmp)
        evaluated = f"{sum(len(t) for t in learned)} products"
        evaluate = fanout.evaluate_all_tasks if cfg.compute.fanout else named(evaluate_all_tasks, "evaluate", index, evaluated)
        metrics = evaluate(cfg, method_dir, manifest, task_of_product(learned))
        tracker.log_step_metrics(index, metrics)
        meta = {
            "step": index,
            "task": name,
            "tasks": [task_name(t) for t in learned],
            "products": product_dirs(manifest, [p for t in learned for p in t]),
            "task_of_product": task_of_product(learned),
            "method": cfg.method,
            "metrics": _clean_metrics(metrics),
            "parent": parent_version,
            "config_fingerprint": config_fingerprint(cfg),
        }
        version = named(version_memory_bank, "version", index, name)(cfg, method_dir, meta)
        fault_point("after_store")
        bank_manifest = BankStore(cfg.banks.store_dir).show(version)
        model_version = named(register_model, "register", index, name)(tracker, method_dir, version, index, name, bank_manifest)
        fault_point("after_register")
        gate = named(_promote_if_gate_passes, "gate", index, name)(cfg, tracker, version, model_version, metrics)
        record = {**meta, "bank_version": version, "model_version": model_version, "promotion": gate,
                  STATE_HASHES: state_files(method_dir), "completed": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(tmp / STEP_RECORD, record)
    return record


def _attach_tracker(cfg: Config, out: Path, tracker: Any, run_record: dict[str, Any]) -> bool:
    """Log the config on the parent run and remember its id for resume; True when it is a new parent run."""
    tracker.log_config(cfg)
    link_runs(tracker)
    run_id = getattr(tracker, "run_id", None)
    if run_id is None or run_record.get("mlflow_run_id") == run_id:
        return False
    run_record.update(mlflow_run_id=run_id, tracking_uri=cfg.tracking.uri)
    atomic_write_json(Path(out) / RUN_RECORD, run_record)
    return True


@flow(name="continual_run", validate_parameters=False, persist_result=False, flow_run_name=continual_run_name)
def continual_run(cfg: Config, out: Path) -> dict[str, Any]:
    """Validate, cache masks, then train/evaluate/version every task of the protocol; writes OUT/metrics.json + report."""
    from flows.promotion import store_transaction

    with store_transaction(cfg):  # the bank store is ours until the run ends; an interrupted promotion is repaired first
        return _continual_run(cfg, Path(out))


def _continual_run(cfg: Config, out: Path) -> dict[str, Any]:
    logger = run_logger()
    manifest, tasks = _prepare(cfg)
    cfg = resolve_tiling(cfg, manifest, [p for t in tasks for p in t])  # data.tile=auto -> this data's tiling
    run_record = check_run_record(cfg, out)
    check_data_fingerprint(out, run_record, manifest)
    products = [p for t in tasks for p in t]
    if uses_structure_masks(cfg):
        (fanout.cache_masks if cfg.compute.fanout else cache_masks)(cfg, training_manifest(cfg, manifest), products)
    matrix = AccuracyMatrix(products, len(tasks), steps=tasks)
    tracker = open_tracker(cfg, run_record)
    method_dir: Path | None = None
    version: str | None = None
    with tracker, progress_bar(total=len(tasks), desc="continual steps", unit="step") as bar:
        new_parent_run = _attach_tracker(cfg, out, tracker, run_record)
        for index, step_products in enumerate(tasks):
            name = task_name(step_products)
            record = read_step_record(out, index, name)
            trained_now = record is None
            if record is None:
                bar.set_description(f"step {index + 1}/{len(tasks)}: {name}", refresh=False)
                logger.info("step %d/%d: learning %s", index + 1, len(tasks), name)
                record = _run_step(cfg, out, index, tasks, manifest, method_dir, version, tracker)
            else:
                BankStore(cfg.banks.store_dir).verify(record["bank_version"])
                logger.info("step %d/%d (%s) already completed (bank version %s); not retraining", index + 1, len(tasks), name, record["bank_version"][:12])
                if new_parent_run:
                    with tracker.step(index, name):
                        tracker.log_step_metrics(index, record["metrics"])
                        log_train_losses(tracker, index, name, step_dir(out, index, name))
            for product, values in record["metrics"].items():
                matrix.record(index, product, values)
            if trained_now or new_parent_run:
                from flows.tracking import step_summary

                tracker.log_step_summary(index, step_summary(matrix, index))  # average/forgetting/BWT curves
            method_dir = step_dir(out, index, name) / METHOD_DIR
            version = record["bank_version"]
            bar.update(1)
        metrics_json = matrix.to_metrics_json(cfg.method, cfg.protocol.name)
        metrics_json["bank_version"] = version
        metrics_json["not_evaluable"] = untested_products(manifest)  # normal images only: no AUROC, gated on RESERVED_FRR
        metrics_json["promoted"] = bool((record.get("promotion") or {}).get("passed", True))

        if uses_structure_masks(cfg):
            metrics_json.update(structure_masks(cfg).record())
        overlays = None
        calibration = read_calibration(method_dir)  # type: ignore[arg-type]
        if calibration is not None:
            metrics_json["thresholds"] = calibration.to_dict()
        if cfg.eval.overlays_per_task > 0:
            final_method = load_method(cfg, method_dir)
            overlays = overlay_examples(cfg, final_method, manifest, task_of_product(tasks))  # type: ignore[arg-type]
        report = report_task(out, metrics_json, overlays)
        write_matrix_csvs(out, metrics_json)
        publish_run(tracker, out, metrics_json)
    logger.info("continual run finished: metrics %s, report %s", out / METRICS_FILE, report)
    return metrics_json


# ---------------------------------------------------------------------------------- commands
def run_config(cfg: Config, out: Path) -> Config:
    """``cfg`` with the bank store inside ``out`` unless ``banks.store_dir`` was set explicitly."""
    from components.config import BanksConfig

    cfg = cfg.model_copy(deep=True)
    if cfg.banks.store_dir == BanksConfig().store_dir:
        cfg.banks.store_dir = str(Path(out) / "banks")
    return cfg


def execute(cfg: Config, out: Path) -> dict[str, Any]:
    """Run the ``continual_run`` flow with Prefect results persisted under ``OUT/.prefect-results``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str((out / RESULTS_DIR).resolve())}), tags(*run_tags(cfg.method, cfg.protocol.name)):
        return fanout.with_task_runner(continual_run, cfg.compute)(cfg, out)


@flow(name="contad-run", validate_parameters=True, persist_result=False)
def run_from_params(out: str, params: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Deployment entry point (JSON parameters): load ``params`` + ``overrides`` and run the sequence into ``out``."""
    from components.config import load_config

    cfg = run_config(load_config(params, overrides or []), Path(out))
    return execute(cfg, Path(out))


def summary_table(metrics_json: dict[str, Any], metrics: tuple[str, ...] = ("image_auroc", "pixel_auroc", "aupro")) -> Any:
    """A rich table of the final metrics per product plus average and forgetting."""
    from rich.table import Table

    table = Table(title=f"{metrics_json['method']} ({metrics_json['protocol']}): after the last step")
    table.add_column("product")
    for m in metrics:
        table.add_column(m, justify="right")

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    not_evaluable = set(metrics_json.get("not_evaluable") or [])
    for p in metrics_json["tasks"]:
        table.add_row(f"{p} (normal images only)" if p in not_evaluable else p, *(fmt(metrics_json["final"][m][p]) for m in metrics))
    table.add_row("[bold]average", *(fmt(metrics_json["average"].get(m)) for m in metrics))
    table.add_row("[bold]forgetting", *(fmt(metrics_json["forgetting"].get(m)) for m in metrics))
    return table


def run_command(cfg: Config, out: Path, allow_rejected: bool = False) -> int:
    """``contad run --out DIR``: train the task sequence, evaluate after every step, write metrics + report.

    Returns 0 when the final step passed the promotion gate (its bank version is current and its
    model champion), 1 when the gate rejected it (stored, but neither current nor champion), unless
    ``allow_rejected`` (research runs and the DVC stage, where the metrics are the product): then 0.
    """
    out = Path(out)
    cfg = run_config(cfg, out)
    check_data_root(Path(cfg.data.root))  # fail fast, before Prefect starts
    metrics_json = execute(cfg, out)
    console = Console()
    console.print(summary_table(metrics_json))
    print(f"metrics: {out / METRICS_FILE}\nreport:  {out / REPORT_FILE}\nbanks:   contad banks list --store {cfg.banks.store_dir}")
    if not metrics_json.get("promoted", True):
        final = str(metrics_json.get("bank_version") or "-")[:12]
        print(f"contad: the final step (bank version {final}) failed the promotion gate: it is stored but not current and not champion", file=sys.stderr)
        return 0 if allow_rejected else 1
    return 0


__all__ = [
    "cache_masks",
    "continual_run",
    "evaluate_all_tasks",
    "run_command",
    "run_from_params",
    "train_task",
    "validate_dataset",
    "version_memory_bank",
]
