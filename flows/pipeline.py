"""The continual pipeline as one Prefect flow: validate -> masks -> (train -> evaluate -> version -> register -> gate)*.

``continual_run(cfg, out)`` chains the building blocks of ``flows.pipeline_tasks`` over the task
sequence of ``cfg.protocol`` and writes, per completed step, an atomic step record
``OUT/steps/NN-<task>/`` (method state, training log, metrics, bank version; ``flows.records``).
Re-running the same command continues after the last completed step; a different configuration in
the same ``OUT`` is refused. Prefect runs locally (an ephemeral API) unless ``PREFECT_API_URL``
points to a server. The commands: ``run_command`` (``contad run``), ``execute``, ``run_from_params``
(the deployment entry point).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

# Before Prefect is imported: component loggers go to Prefect's run logs too, and the ephemeral
# local API gets enough time to start (and migrate a new database) on a busy 2-core machine.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "components")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import pandas as pd
from prefect import flow, tags
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from rich.console import Console

from components.atomic import atomic_directory, atomic_write_json
from components.config import Config
from components.data.loading import untested_products
from components.data.manifest import count_test_images
from components.data.protocol import ordered_products, task_name, task_of_product, task_sequence
from components.data.tiling import resolve_tiling
from components.errors import DataError
from components.eval.continual import AccuracyMatrix
from components.eval.report import METRICS_FILE, REPORT_FILE
from components.eval.step_eval import overlay_examples
from components.eval.thresholds import read_calibration
from components.faults import fault_point
from components.memory.store import BankStore, state_files
from components.methods.loading import load_method
from components.methods.registry import uses_structure_masks
from components.segment.fallback import structure_masks
from components.progress import progress_bar
from flows import fanout
from flows.pipeline_tasks import (
    cache_masks,
    evaluate_all_tasks,
    promote_if_gate_passes,
    publish_run,
    register_model,
    report_task,
    run_logger,
    train_task,
    training_manifest,
    validate_dataset,
    version_memory_bank,
)
from flows.records import (
    METHOD_DIR,
    RESULTS_DIR,
    RUN_RECORD,
    STATE_HASHES,
    STEP_RECORD,
    TRAIN_LOG,
    check_data_fingerprint,
    check_run_record,
    clean_metrics,
    config_fingerprint,
    feature_settings,
    read_step_record,
    read_train_log,
    step_dir,
    write_matrix_csvs,
)
from flows.run_links import continual_run_name, link_runs, named, run_tags

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
STANDING_WARN_GAP = 0.05  # image AUROC below UCAD on the leaderboard that turns the run's standing line into a warning


def product_dirs(manifest: pd.DataFrame, products: list[str]) -> dict[str, str]:
    """``{product: folder holding all its images}`` from the manifest."""
    dirs = {}
    for product in products:
        paths = manifest.loc[manifest["product"] == product, "image_path"].astype(str).tolist()
        if not paths:
            raise DataError(f"product {product!r} has no images in the manifest")
        dirs[product] = os.path.commonpath(paths) if len(paths) > 1 else str(Path(paths[0]).parent)
    return dirs


# ---------------------------------------------------------------------------------- tracking
def open_tracker(cfg: Config, run_record: dict[str, Any]) -> Any:
    """The MLflow tracker of this run (``flows.tracking``); resumes the parent run of an interrupted attempt."""
    from flows.tracking import NullTracker, Tracker

    if not cfg.tracking.enabled:
        return NullTracker(cfg.tracking, cfg.protocol.name)
    same_store = run_record.get("tracking_uri") == cfg.tracking.uri
    return Tracker(cfg.tracking, cfg.protocol.name, run_id=run_record.get("mlflow_run_id") if same_store else None)


def log_train_losses(tracker: Any, index: int, name: str, directory: Path) -> None:
    """Log the epoch losses of the training log in step directory ``directory`` (when it has one; an
    unreadable one stops the run with a ``ContadError`` naming the file)."""
    if (Path(directory) / TRAIN_LOG).is_file():
        tracker.log_train_losses(index, name, read_train_log(directory))


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
            "metrics": clean_metrics(metrics),
            "parent": parent_version,
            "config_fingerprint": config_fingerprint(cfg),
        }
        version = named(version_memory_bank, "version", index, name)(cfg, method_dir, meta)
        fault_point("after_store")
        bank_manifest = BankStore(cfg.banks.store_dir).show(version)
        model_version = named(register_model, "register", index, name)(tracker, method_dir, version, index, name, bank_manifest)
        fault_point("after_register")
        gate = named(promote_if_gate_passes, "gate", index, name)(cfg, tracker, version, model_version, metrics)
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


def _log_standing(cfg: Config) -> None:
    """Say where the run's method stands against UCAD on the leaderboard (a warning when > 5 points below)."""
    from components.eval.standing import method_standing, standing_sentence
    from flows.bench import LEADERBOARD_JSON

    for standing in method_standing(LEADERBOARD_JSON, cfg.method):
        (run_logger().warning if standing.gap < -STANDING_WARN_GAP else run_logger().info)("%s (benchmarks/LEADERBOARD.md)", standing_sentence(standing))


def _continual_run(cfg: Config, out: Path) -> dict[str, Any]:
    logger = run_logger()
    _log_standing(cfg)
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
        metrics_json["test_images"] = count_test_images(manifest)  # what each product's metrics rest on (chance bands)
        metrics_json["promoted"] = bool((record.get("promotion") or {}).get("passed", True))

        if uses_structure_masks(cfg):
            metrics_json.update(structure_masks(cfg).record())
        chosen = feature_settings(out, [task_name(t) for t in tasks])  # ucad.feature_choices: what each task took, and why
        if chosen:
            metrics_json["feature_settings"] = chosen
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
    "execute",
    "log_train_losses",
    "promote_if_gate_passes",
    "publish_run",
    "register_model",
    "report_task",
    "run_command",
    "run_config",
    "run_from_params",
    "summary_table",
    "train_task",
    "training_manifest",
    "validate_dataset",
    "version_memory_bank",
]
