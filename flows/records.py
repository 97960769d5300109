"""What a run directory records for resuming: step records, the run record, data/config fingerprints, matrix CSVs.

``OUT/run.json`` ties ``OUT`` to one configuration (``config_fingerprint``) and one data set
(``check_data_fingerprint``); ``OUT/steps/NN-<task>/step.json`` marks step NN completed, with the content
hashes of its saved method state. Plain functions: no Prefect, no MLflow.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.atomic import atomic_write_json, atomic_write_text
from components.config import Config, config_to_dict
from components.data.protocol import task_name
from components.errors import ContadError
from components.memory.store import mismatched_files

log = logging.getLogger(__name__)

STEPS_DIR = "steps"
STEP_RECORD = "step.json"
STATE_HASHES = "state_files"  # step record key: {relative path: sha256} of the saved method state
METHOD_DIR = "method"
TRAIN_LOG = "train_log.json"
RUN_RECORD = "run.json"
MATRICES_DIR = "matrices"
AVERAGE_CSV = "average.csv"
RESULTS_DIR = ".prefect-results"
# Parts of a run directory that are not report artifacts (state, data, stores).
NON_ARTIFACTS = frozenset({STEPS_DIR, "banks", "data", "mask_cache", "mlartifacts", RESULTS_DIR, "baselines"})  # baselines: `contad demo`
# Config sections that do not change what a run computes (they may differ on resume).
FINGERPRINT_EXCLUDES = ("tracking", "banks", "compute")


# ---------------------------------------------------------------------------------- fingerprints
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


def clean_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """Metrics with NaN/inf as None (JSON-safe)."""
    return {p: {k: _clean_number(v) for k, v in m.items()} for p, m in metrics.items()}


# ---------------------------------------------------------------------------------- step records
def step_dir(out: Path, index: int, name: str) -> Path:
    """``OUT/steps/NN-<task>`` (task name made filesystem-safe)."""
    safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)
    return Path(out) / STEPS_DIR / f"{index:02d}-{safe}"


def read_train_log(directory: Path) -> dict[str, Any]:
    """The method's fit log (``log``) in the training log of step directory ``directory``; {} when the step
    has none; a ``ContadError`` naming the file when it cannot be read."""
    path = Path(directory) / TRAIN_LOG
    try:
        return (json.loads(path.read_text()).get("log") or {}) if path.is_file() else {}
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ContadError(f"{path}: unreadable training log ({exc})") from exc


def feature_settings(out: Path, tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Per task, the feature settings its training log says it took and the choice that picked them
    (``ucad.feature_choices`` / ``patchcore.feature_choices``): ``{task: {"features": ..., "choice": {...}}}``; empty when no step chose."""
    found: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(tasks):
        log = read_train_log(step_dir(out, index, name))
        if "feature_choice" in log:
            found[name] = {"features": log.get("features"), "choice": log["feature_choice"]}
    return found


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
    recorded = record.get(STATE_HASHES)
    if not isinstance(recorded, dict):
        return  # a record written before hashes were recorded
    bad = mismatched_files(directory / METHOD_DIR, recorded)
    if bad:
        raise ContadError(
            f"{directory / METHOD_DIR / bad[0]}: does not match the content hash recorded in {directory / STEP_RECORD} "
            f"({len(bad)} file(s) differ); delete {directory} to retrain that step"
        )


def completed_steps(out: Path) -> list[Path]:
    """Step records already written in ``OUT/steps``."""
    return sorted((Path(out) / STEPS_DIR).glob(f"*/{STEP_RECORD}"))


# ---------------------------------------------------------------------------------- the run record
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


# ---------------------------------------------------------------------------------- report files
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

