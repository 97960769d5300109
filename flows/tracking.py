"""MLflow tracking of continual sequences and the detector model registry.

One experiment per protocol (``<tracking.experiment_prefix>-<protocol>``), one parent run per
continual sequence, one nested run per training step. Metrics ``<metric>/<product>`` are
logged with ``step = step index``; ``average/<metric>`` and ``forgetting/<metric>`` at the end.
Each step registers a detector version (tagged with its bank version); the ``champion`` alias
moves only through ``promote``. ``NullTracker`` does nothing (``tracking.enabled=false``).

All calls go through an explicit ``MlflowClient`` with explicit run ids, so tracking works
from any thread (Prefect task runners) and never touches MLflow's global active run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.atomic import writer_alive
from components.config import Config, TrackingConfig, flatten_config
from components.errors import ContadError
from flows.model_registry import CHAMPION_ALIAS, save_detector

log = logging.getLogger(__name__)

PARENT_RUN_TAG = "mlflow.parentRunId"
BANK_VERSION_TAG = "bank_version"
ARTIFACT_SUFFIXES = {".csv", ".png", ".jpg", ".md", ".json", ".html", ".svg"}
_BATCH = 100
_KEY_INVALID = re.compile(r"[^/\w.\- :]")


def metric_key(*parts: str) -> str:
    """An MLflow-safe metric key from parts joined by ``/`` (invalid characters become ``_``)."""
    return "/".join(_KEY_INVALID.sub("_", str(p)) for p in parts)


def experiment_name(cfg: TrackingConfig, protocol: str) -> str:
    """``<experiment_prefix>-<protocol>``."""
    return f"{cfg.experiment_prefix}-{protocol}"


def sqlite_path(uri: str) -> Path | None:
    """Database file of a ``sqlite:///`` tracking URI (relative paths resolved from the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri[len("sqlite:///") :])).resolve()


def normalized_uri(uri: str) -> str:
    """The tracking URI with a sqlite database path made absolute (so later cwd changes are harmless)."""
    db = sqlite_path(uri)
    return f"sqlite:///{db}" if db is not None else uri


def local_artifact_root(uri: str) -> str | None:
    """Artifact root next to a sqlite database (``<db dir>/mlartifacts``); None for servers."""
    db = sqlite_path(uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


class TrackingStoreError(ContadError):
    """The MLflow tracking database cannot be read (corrupt, not a database, locked)."""


_CORRUPT_MARKERS = ("file is not a database", "database disk image is malformed", "malformed", "no such table", "unable to open database")


@contextmanager
def tracking_errors(uri: str) -> Iterator[None]:
    """Turn a corrupt/unreadable tracking database into one ``TrackingStoreError`` naming it."""
    try:
        yield
    except ContadError:
        raise
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        corrupt = type(exc).__module__.startswith("sqlalchemy") or any(m in text.lower() for m in _CORRUPT_MARKERS)
        if not corrupt:
            raise
        where = sqlite_path(uri) or uri
        raise TrackingStoreError(
            f"tracking database {where} is unreadable ({text}); move it aside or set tracking.uri to another database"
        ) from exc


def make_client_for_uri(uri: str) -> MlflowClient:
    """An ``MlflowClient`` for ``uri`` (creates a sqlite database's directory; corrupt database -> ``TrackingStoreError``)."""
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    uri = normalized_uri(uri)
    with tracking_errors(uri):
        return MlflowClient(tracking_uri=uri, registry_uri=uri)


def make_client(cfg: TrackingConfig) -> MlflowClient:
    """An ``MlflowClient`` for ``cfg.uri`` (creates a sqlite database's directory)."""
    return make_client_for_uri(cfg.uri)


PID_TAG = "contad.pid"
HOST_TAG = "contad.host"


def process_tags() -> dict[str, str]:
    """Tags naming the process that owns a RUNNING run (so a later start can tell it died)."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def fail_dead_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs of ``experiment_id`` whose contad process (same host) is gone; returns their ids."""
    host = socket.gethostname()
    failed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get(HOST_TAG) != host or not str(tags.get(PID_TAG, "")).isdigit():
            continue
        pid = int(tags[PID_TAG])
        if pid == os.getpid() or writer_alive(pid):
            continue
        client.set_terminated(run.info.run_id, "FAILED")
        client.set_tag(run.info.run_id, "contad.failed_reason", f"process {pid} died without ending the run")
        failed.append(run.info.run_id)
    if failed:
        log.warning("marked %d MLflow run(s) of dead contad processes FAILED: %s", len(failed), ", ".join(failed))
    return failed


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Id of experiment ``name``, created (artifacts next to a sqlite store) when missing."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            client.restore_experiment(existing.experiment_id)
        return existing.experiment_id
    try:
        root = local_artifact_root(tracking_uri)
        location = f"{root}/{name}" if root else None
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        found = client.get_experiment_by_name(name)  # created concurrently
        if found is None:
            raise
        return found.experiment_id


def _finite_metrics(values: dict[str, float | None], step: int, timestamp: int) -> list[Metric]:
    return [
        Metric(key=k, value=float(v), timestamp=timestamp, step=step)
        for k, v in values.items()
        if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))
    ]


def sequence_artifacts(directory: Path) -> list[Path]:
    """Report files of a run directory: matrices, heatmaps, report, overlays, manifests.

    Skips method/bank state directories (anything holding ``*.safetensors``) and hidden paths.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    state_dirs = {p.parent for p in directory.rglob("*.safetensors")}
    files = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if not path.is_file() or path.suffix.lower() not in ARTIFACT_SUFFIXES:
            continue
        if any(part.startswith(".") for part in rel.parts):
            continue
        if any(parent in state_dirs for parent in path.parents):
            continue
        files.append(path)
    return files


class Tracker:
    """MLflow tracking of one continual sequence: a parent run with a nested run per step."""

    def __init__(self, cfg: TrackingConfig, protocol: str, run_name: str | None = None, run_id: str | None = None) -> None:
        """``run_id`` resumes an existing parent run instead of creating a new one."""
        self.cfg = cfg
        self.protocol = protocol
        self.run_name = run_name or f"{protocol}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.tracking_uri = normalized_uri(cfg.uri)
        self.client = make_client(cfg)
        self.experiment_id: str | None = None
        self.run_id: str | None = run_id
        self._step_run_id: str | None = None
        self._config: Config | None = None

    # -- parent run -----------------------------------------------------------------------
    def __enter__(self) -> Tracker:
        with tracking_errors(self.tracking_uri):
            self.experiment_id = ensure_experiment(self.client, experiment_name(self.cfg, self.protocol), self.tracking_uri)
            fail_dead_runs(self.client, self.experiment_id)
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            for key, value in process_tags().items():
                self.client.set_tag(self.run_id, key, value)
        else:
            run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags={"contad.protocol": self.protocol, **process_tags()})
            self.run_id = run.info.run_id
        log.info("MLflow run %s in experiment %s (%s)", self.run_id, experiment_name(self.cfg, self.protocol), self.tracking_uri)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FAILED" if exc_type else "FINISHED")

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("Tracker used outside its `with` block")
        return self.run_id

    @property
    def active_run_id(self) -> str:
        """The current step run inside ``step``, else the parent run."""
        return self._step_run_id or self._require_run()

    # -- logging --------------------------------------------------------------------------
    def log_config(self, cfg: Config) -> None:
        """Log ``flatten_config(cfg)`` as params of the parent run (kept for model registration)."""
        self._config = cfg
        run_id = self._require_run()
        existing = self.client.get_run(run_id).data.params
        params = [Param(k, str(v)) for k, v in flatten_config(cfg).items() if k not in existing]
        for i in range(0, len(params), _BATCH):
            self.client.log_batch(run_id, params=params[i : i + _BATCH])
        self.client.set_tag(run_id, "contad.method", cfg.method)

    @contextmanager
    def step(self, step_index: int, task_name: str) -> Iterator[str]:
        """Nested run for training step ``step_index``; yields its run id."""
        parent = self._require_run()
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"step-{step_index}-{task_name}",
            tags={PARENT_RUN_TAG: parent, "contad.step": str(step_index), "contad.task": task_name, **process_tags()},
        )
        run_id = run.info.run_id
        self.client.log_batch(run_id, params=[Param("step", str(step_index)), Param("task", task_name)])
        self._step_run_id = run_id
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        finally:
            self._step_run_id = None
            self.client.set_terminated(run_id, status)

    def log_step_metrics(self, step: int, metrics_by_product: dict[str, dict[str, float]]) -> None:
        """Log ``<metric>/<product>`` at ``step`` on the parent run (and the step run when inside one)."""
        values = {metric_key(metric, product): value for product, metrics in metrics_by_product.items() for metric, value in metrics.items()}
        metrics = _finite_metrics(values, step, int(time.time() * 1000))
        run_ids = [self._require_run()] + ([self._step_run_id] if self._step_run_id else [])
        for run_id in run_ids:
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(run_id, metrics=metrics[i : i + 1000])

    def log_sequence(self, metrics_json: dict[str, Any], artifacts_dir: Path | None) -> None:
        """Log ``average/<metric>``, ``forgetting/<metric>``, routing accuracy and the report files."""
        run_id = self._require_run()
        values: dict[str, float | None] = {}
        for group in ("average", "forgetting", "bwt"):
            for metric, value in (metrics_json.get(group) or {}).items():
                values[metric_key(group, metric)] = value
        if metrics_json.get("routing_accuracy") is not None:
            values["routing_accuracy"] = metrics_json["routing_accuracy"]
        last_step = max(len(metrics_json.get("tasks") or []) - 1, 0)
        self.client.log_batch(run_id, metrics=_finite_metrics(values, last_step, int(time.time() * 1000)))
        masks = {k: str(metrics_json[k]) for k in ("masks_provider_used", "masks_provider_requested") if metrics_json.get(k)}
        existing = self.client.get_run(run_id).data.params
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in masks.items() if k not in existing])
        with tempfile.TemporaryDirectory(prefix="contad-metrics-") as tmp:
            path = Path(tmp) / "metrics.json"
            path.write_text(json.dumps(metrics_json, indent=2))
            self.client.log_artifact(run_id, str(path))
        if artifacts_dir is not None:
            artifacts_dir = Path(artifacts_dir)
            for file in sequence_artifacts(artifacts_dir):
                if file.name == "metrics.json" and file.parent == artifacts_dir:
                    continue
                rel_parent = file.parent.relative_to(artifacts_dir).as_posix()
                self.client.log_artifact(run_id, str(file), None if rel_parent == "." else rel_parent)

    def log_bank_manifest(self, manifest: dict[str, Any], bank_version: str) -> None:
        """Log a bank version manifest as ``bank/<version>.json`` on the active run."""
        with tempfile.TemporaryDirectory(prefix="contad-bank-") as tmp:
            path = Path(tmp) / f"{bank_version}.json"
            path.write_text(json.dumps(manifest, indent=2, default=str))
            self.client.log_artifact(self.active_run_id, str(path), "bank")

    # -- registry -------------------------------------------------------------------------
    def _ensure_registered_model(self) -> None:
        name = self.cfg.registered_model
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            try:
                self.client.create_registered_model(name, description="contad continual anomaly detector (pyfunc: images -> scores + maps)")
            except MlflowException:
                self.client.get_registered_model(name)  # created concurrently

    def register_step_model(
        self,
        method_dir: Path,
        bank_version: str,
        step: int,
        config: Config | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> str:
        """Log the step's detector (pyfunc) and register it; returns the new model version.

        The version is tagged with ``bank_version`` and the step; ``config`` defaults to the
        one given to ``log_config``. ``manifest`` (the bank version manifest) is logged too.
        """
        config = config or self._config
        if config is None:
            raise ContadError("Tracker.register_step_model needs the config: call log_config(cfg) first")
        run_id = self.active_run_id
        if manifest is not None:
            self.log_bank_manifest(manifest, bank_version)
        with tempfile.TemporaryDirectory(prefix="contad-model-") as tmp:
            model_dir = save_detector(Path(method_dir), config, Path(tmp) / "model", metadata={BANK_VERSION_TAG: bank_version, "step": str(step)})
            self.client.log_artifacts(run_id, str(model_dir), "model")
        self._ensure_registered_model()
        source = f"{self.client.get_run(run_id).info.artifact_uri}/model"
        tags = {BANK_VERSION_TAG: bank_version, "step": str(step), "protocol": self.protocol}
        version = self.client.create_model_version(self.cfg.registered_model, source=source, run_id=run_id, tags=tags)
        self.client.set_tag(run_id, "contad.model_version", version.version)
        log.info("registered %s version %s (bank %s)", self.cfg.registered_model, version.version, bank_version)
        return str(version.version)

    def promote(self, version: str) -> None:
        """Move the ``champion`` alias to ``version``."""
        self.client.set_registered_model_alias(self.cfg.registered_model, CHAMPION_ALIAS, str(version))
        if self.run_id is not None:
            self.client.set_tag(self.active_run_id, "contad.promoted", "true")
        log.info("champion of %s is now version %s", self.cfg.registered_model, version)

    def mark_promoted(self, run_id: str | None = None) -> None:
        """Tag ``run_id`` (default: the active run) as the run whose model became champion."""
        self.client.set_tag(run_id or self.active_run_id, "contad.promoted", "true")

    def champion(self) -> tuple[str, str | None] | None:
        """(version, bank version) of the current champion, or None when there is none."""
        return champion_version(self.client, self.cfg.registered_model)


def champion_version(client: MlflowClient, model_name: str) -> tuple[str, str | None] | None:
    """(version, bank version tag) of ``model_name@champion``; None when unset or unregistered."""
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException:
        return None
    return str(version.version), version.tags.get(BANK_VERSION_TAG)


class NullTracker:
    """Same interface as ``Tracker``; records nothing (``tracking.enabled=false``)."""

    def __init__(self, cfg: TrackingConfig | None = None, protocol: str = "", run_name: str | None = None, run_id: str | None = None) -> None:
        self.cfg = cfg
        self.protocol = protocol
        self.run_id: str | None = None

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        return None

    def log_config(self, cfg: Config) -> None:
        return None

    @contextmanager
    def step(self, step_index: int, task_name: str) -> Iterator[str | None]:
        yield None

    def log_step_metrics(self, step: int, metrics_by_product: dict[str, dict[str, float]]) -> None:
        return None

    def log_sequence(self, metrics_json: dict[str, Any], artifacts_dir: Path | None) -> None:
        return None

    def log_bank_manifest(self, manifest: dict[str, Any], bank_version: str) -> None:
        return None

    def register_step_model(self, method_dir: Path, bank_version: str, step: int, config: Config | None = None, manifest: dict[str, Any] | None = None) -> str | None:
        return None

    def promote(self, version: str | None) -> None:
        return None

    def mark_promoted(self, run_id: str | None = None) -> None:
        return None

    def champion(self) -> tuple[str, str | None] | None:
        return None


def make_tracker(cfg: Config, protocol: str | None = None, run_name: str | None = None) -> Tracker | NullTracker:
    """``Tracker`` for ``cfg.tracking`` (protocol defaults to ``cfg.protocol.name``), or ``NullTracker`` when disabled."""
    protocol = protocol or cfg.protocol.name
    if not cfg.tracking.enabled:
        return NullTracker(cfg.tracking, protocol, run_name)
    return Tracker(cfg.tracking, protocol, run_name)
