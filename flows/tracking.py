"""MLflow tracking of continual sequences and the detector model registry.

One experiment per protocol (``<tracking.experiment_prefix>-<protocol>``), one parent run per
continual sequence, one nested run per training step (with the full flattened config as params,
like the parent). Metrics, all with ``step = step index`` (0-based, as ``OUT/steps/NN-*``):

- ``<metric>/<product>`` on the parent and the step run;
- ``average/<metric>``, ``forgetting/<metric>``, ``bwt/<metric>`` on the parent after EVERY step,
  computed from the accuracy matrix rows 0..k (``step_summary``), so they draw as curves.
  Forgetting and BWT need an old product, so they are absent at step 0 (never logged as 0 or NaN);
- ``loss/<part>`` (step run) and ``loss/<part>/<task>`` (parent) with ``step = epoch``, from the
  ``epoch_losses`` / ``heldout_losses`` a method returns in its training log (``train_log.json``).

Each step logs its detector as an MLflow 3 *logged model* (linked to the step run as an output,
with its signature) and registers it as a model version whose source is ``models:/<model_id>``,
with tags (bank version, products, step, gate decision) and a description. The ``champion`` alias
moves only through ``promote``. ``NullTracker`` does nothing (``tracking.enabled=false``).

Artifact locations: a local sqlite store keeps its artifacts in ``<db dir>/mlartifacts``, but
MLflow stores every local artifact location as an absolute ``file://`` URI (it resolves relative
ones at creation, ``mlflow.utils.uri.resolve_uri_if_local``), so a moved run folder needs its store
re-pointed. Portable locations need an ``mlflow server --artifacts-destination DIR`` (clients then
see ``mlflow-artifacts:/...`` URIs; ``infra/``). Model versions point at ``models:/<model_id>``,
which never names a path.

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
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

from mlflow.entities import LoggedModelOutput, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.atomic import writer_alive
from components.config import Config, TrackingConfig, flatten_config
from components.eval.continual import AccuracyMatrix
from components.errors import ContadError
from flows.model_registry import CHAMPION_ALIAS, save_detector

log = logging.getLogger(__name__)

PARENT_RUN_TAG = "mlflow.parentRunId"
BANK_VERSION_TAG = "bank_version"
SUMMARY_GROUPS = ("average", "forgetting", "bwt")
LOGGED_MODEL_NAME = "detector"
GATE_TAG = "gate"
GATE_REASONS_TAG = "gate_reasons"
_TAG_LIMIT = 4000  # characters kept of a long tag value (MLflow allows 5000 for model-version tags)
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


_PROCESS_URI_LOCK = threading.Lock()


@contextmanager
def process_mlflow_uris(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking AND registry URIs set to ``uri`` for the duration; both restored after,
    their environment variables too (``mlflow.set_registry_uri`` exports ``MLFLOW_REGISTRY_URI``, which every
    later client and child process would otherwise inherit: a ``mlflow models serve`` started afterwards looked
    for the model in an earlier store's registry)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _PROCESS_URI_LOCK:
        saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
        env = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved[0])
            registry_utils._registry_uri = saved[1]
            for name, value in env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@contextmanager
def process_tracking_uri(uri: str) -> Iterator[None]:
    """``process_mlflow_uris(uri)`` for a local store; nothing for a server.

    A local registry store resolves a ``models:/<model_id>`` version source with a client of the
    *process-wide* URIs, not of the client that asked (MLflow 3.17 ``create_model_version``); a server
    resolves it itself, so nothing changes for ``http(s)`` URIs.
    """
    if uri.startswith(("http://", "https://")):
        yield
        return
    with process_mlflow_uris(uri):
        yield


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


# MLflow 3's UI opens an experiment without this tag in its GenAI overview (traces, prompts); contad's are classic ML runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Id of experiment ``name``, created (artifacts next to a sqlite store) when missing; tagged as a
    classic model-development experiment (``EXPERIMENT_KIND_TAG``) unless it already has a kind."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            client.restore_experiment(existing.experiment_id)
        if EXPERIMENT_KIND_TAG not in existing.tags:
            client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return existing.experiment_id
    try:
        root = local_artifact_root(tracking_uri)
        location = f"{root}/{name}" if root else None
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
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


def step_summary(matrix: AccuracyMatrix, step: int) -> dict[str, dict[str, float]]:
    """``{"average"|"forgetting"|"bwt": {metric: value}}`` of the accuracy matrix rows ``0..step``.

    The same definitions as ``metrics.json`` (Chaudhry FM, BWT) as if the run ended after ``step``;
    NaN where undefined (forgetting and BWT at step 0: no old product yet).
    """
    steps = matrix.steps_or_inferred() or [[p] for p in matrix.products]
    learned = steps[: step + 1]
    partial = AccuracyMatrix([p for group in learned for p in group], step + 1, steps=learned)
    names = matrix.metric_names()
    for row in range(step + 1):
        for product in partial.products:
            if matrix.value(row, product, names[0]) is not None:  # None: not recorded (NaN: undefined)
                partial.record(row, product, {m: matrix.value(row, product, m) for m in names})
    return {"average": partial.average(), "forgetting": partial.forgetting(), "bwt": partial.bwt()}


def loss_curves(train_log: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """``{part: [(epoch, loss), ...]}`` from a method's training log.

    ``epoch_losses`` is a list (one loss: part ``train``) or ``{part: list}``; ``heldout_losses``
    (part ``heldout``) may start with the loss before the first epoch (epoch 0, UCAD) or after it
    (epoch 1, IUF): one entry more than the epochs means it starts at 0.
    """
    curves: dict[str, list[tuple[int, float]]] = {}
    epochs = train_log.get("epoch_losses")
    if isinstance(epochs, list):
        epochs = {"train": epochs}
    if isinstance(epochs, dict):
        for part, values in epochs.items():
            if isinstance(values, list):
                curves[str(part)] = [(i + 1, float(v)) for i, v in enumerate(values) if isinstance(v, (int, float))]
    n_epochs = max((len(c) for c in curves.values()), default=0)
    heldout = train_log.get("heldout_losses")
    if isinstance(heldout, list) and heldout:
        first = 0 if len(heldout) == n_epochs + 1 else 1
        curves["heldout"] = [(first + i, float(v)) for i, v in enumerate(heldout) if isinstance(v, (int, float))]
    return {part: points for part, points in curves.items() if points}


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
        self._summary_steps: set[int] = set()  # steps whose average/forgetting/bwt this tracker logged

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
        self._log_params(run_id, {k: str(v) for k, v in flatten_config(cfg).items()})
        self.client.set_tag(run_id, "contad.method", cfg.method)

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        """Log the params ``run_id`` does not have yet (params are immutable in MLflow)."""
        existing = self.client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), _BATCH):
            self.client.log_batch(run_id, params=new[i : i + _BATCH])

    def set_tags(self, tags: dict[str, str], run_id: str | None = None) -> None:
        """Set ``tags`` on ``run_id`` (default: the parent run)."""
        target = run_id or self._require_run()
        for key, value in tags.items():
            self.client.set_tag(target, key, str(value)[:_TAG_LIMIT])

    def run_url(self) -> str | None:
        """The MLflow UI address of the parent run when the tracking URI is a server (None for local stores)."""
        if self.run_id is None or not self.tracking_uri.startswith(("http://", "https://")):
            return None
        return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

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
        params = {k: str(v) for k, v in flatten_config(self._config).items()} if self._config is not None else {}
        self._log_params(run_id, {**params, "step": str(step_index), "task": task_name})
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

    def log_step_summary(self, step: int, summary: dict[str, dict[str, float]]) -> None:
        """Log ``average|forgetting|bwt/<metric>`` at ``step`` on the parent run (``step_summary``; NaN skipped)."""
        values = {metric_key(group, metric): value for group in SUMMARY_GROUPS for metric, value in (summary.get(group) or {}).items()}
        self.client.log_batch(self._require_run(), metrics=_finite_metrics(values, step, int(time.time() * 1000)))
        self._summary_steps.add(step)

    def log_train_losses(self, step: int, task_name: str, train_log: dict[str, Any]) -> None:
        """Epoch losses of a training log (``loss_curves``) as ``loss/<part>`` with ``step = epoch`` on the
        step run (when inside one) and ``loss/<part>/<task>`` on the parent run."""
        curves = loss_curves(train_log)
        if not curves:
            return
        now = int(time.time() * 1000)
        targets = [(self._require_run(), True)] + ([(self._step_run_id, False)] if self._step_run_id else [])
        for run_id, per_task in targets:
            metrics = [
                Metric(key=metric_key("loss", part, task_name) if per_task else metric_key("loss", part), value=value, timestamp=now, step=epoch)
                for part, points in curves.items()
                for epoch, value in points
                if math.isfinite(value)
            ]
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(run_id, metrics=metrics[i : i + 1000])

    def log_sequence(self, metrics_json: dict[str, Any], artifacts_dir: Path | None) -> None:
        """Log routing accuracy, the final ``average|forgetting|bwt`` (unless ``log_step_summary`` logged the
        last step already) and the report files."""
        run_id = self._require_run()
        values: dict[str, float | None] = {}
        last_step = max(len(metrics_json.get("steps") or metrics_json.get("tasks") or []) - 1, 0)
        if last_step not in self._summary_steps:
            for group in SUMMARY_GROUPS:
                for metric, value in (metrics_json.get(group) or {}).items():
                    values[metric_key(group, metric)] = value
        if metrics_json.get("routing_accuracy") is not None:
            values["routing_accuracy"] = metrics_json["routing_accuracy"]
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
        task: str | None = None,
    ) -> str:
        """Log the step's detector as an MLflow logged model and register it; returns the new model version.

        The logged model (pyfunc with its signature, linked to the active run as an output at
        ``step``) carries the config as params; the version's source is ``models:/<model_id>``. The
        version is tagged with ``bank_version``, step, task, products, method and protocol, and
        described (``version_description``); ``record_gate`` adds the gate's decision later.
        ``config`` defaults to the one given to ``log_config``; ``manifest`` (the bank version
        manifest) is logged too and names the products covered.
        """
        config = config or self._config
        if config is None:
            raise ContadError("Tracker.register_step_model needs the config: call log_config(cfg) first")
        run_id = self.active_run_id
        if manifest is not None:
            self.log_bank_manifest(manifest, bank_version)
        products = [str(p) for p in (manifest or {}).get("products") or {}]
        task = task or str((manifest or {}).get("task") or "")
        tags = {
            BANK_VERSION_TAG: bank_version,
            "bank_version_short": bank_version[:12],
            "step": str(step),
            "task": task,
            "products": ", ".join(products),
            "n_products": str(len(products)),
            "method": config.method,
            "protocol": self.protocol,
            **({"store_id": str(manifest["store_id"])} if (manifest or {}).get("store_id") else {}),  # the bank store that registered it
        }
        model = self.client.create_logged_model(
            self.experiment_id or self.client.get_run(run_id).info.experiment_id,
            name=LOGGED_MODEL_NAME,
            source_run_id=run_id,
            params={k: str(v) for k, v in flatten_config(config).items()},
            tags={k: v[:_TAG_LIMIT] for k, v in tags.items()},
            model_type="contad-detector",
        )
        try:
            self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
            with tempfile.TemporaryDirectory(prefix="contad-model-") as tmp:
                model_dir = save_detector(
                    Path(method_dir), config, Path(tmp) / "model",
                    metadata={BANK_VERSION_TAG: bank_version, "step": str(step)},
                    logged_model=(model.model_id, model.artifact_location, run_id),
                )
                self.client.log_model_artifacts(model.model_id, str(model_dir))
        except BaseException:
            self.client.finalize_logged_model(model.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(model.model_id, "READY")
        self._ensure_registered_model()
        with process_tracking_uri(self.tracking_uri):
            version = self.client.create_model_version(
                self.cfg.registered_model,
                source=f"models:/{model.model_id}",
                run_id=run_id,
                tags={k: v[:_TAG_LIMIT] for k, v in tags.items()},
                description=version_description(config.method, self.protocol, step, task, products, bank_version),
                model_id=model.model_id,
            )
        self.client.set_tag(run_id, "contad.model_version", version.version)
        self.client.set_tag(run_id, "contad.logged_model", model.model_id)
        log.info("registered %s version %s (bank %s)", self.cfg.registered_model, version.version, bank_version)
        return str(version.version)

    def record_gate(self, model_version: str | None, gate: dict[str, Any]) -> None:
        """Tag model version ``model_version`` (and the active run) with the promotion gate's decision
        (``GateDecision.to_dict()``) and append it to the version's description."""
        decision = "passed" if gate.get("passed") else "rejected"
        reasons = "; ".join(str(r) for r in gate.get("reasons") or []) or "-"
        self.set_tags({"contad.gate": decision, "contad.gate_reasons": reasons}, self.active_run_id)
        if model_version is None:
            return
        name = self.cfg.registered_model
        self.client.set_model_version_tag(name, str(model_version), GATE_TAG, decision)
        self.client.set_model_version_tag(name, str(model_version), GATE_REASONS_TAG, reasons[:_TAG_LIMIT])
        current = self.client.get_model_version(name, str(model_version)).description or ""
        self.client.update_model_version(name, str(model_version), description=current.rstrip() + "\n\n" + gate_description(gate))

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


def version_description(method: str, protocol: str, step: int, task: str, products: list[str], bank_version: str) -> str:
    """Markdown description of a registered detector version (what it covers and where its bank is)."""
    covered = ", ".join(f"`{p}`" for p in products) or "-"
    return (
        f"**{method}** ({protocol}), step {step}: learned task `{task or '-'}`.\n\n"
        f"Products covered ({len(products)}): {covered}.\n\n"
        f"Bank version `{bank_version}` (`contad banks show {bank_version[:12]}`)."
    )


def gate_description(gate: dict[str, Any]) -> str:
    """Markdown line of a promotion gate decision (``GateDecision.to_dict()``)."""
    checked = "\n".join(f"- {c}" for c in gate.get("checked") or [])
    checked = f"\n\nChecked:\n{checked}" if checked else ""
    if gate.get("passed"):
        return f"Promotion gate: **passed**.{checked}"
    reasons = "\n".join(f"- {r}" for r in gate.get("reasons") or [])
    return f"Promotion gate: **rejected** (stored, never champion):\n{reasons}{checked}"


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

    def register_step_model(self, method_dir: Path, bank_version: str, step: int, config: Config | None = None, manifest: dict[str, Any] | None = None,
                            task: str | None = None) -> str | None:
        return None

    def record_gate(self, model_version: str | None, gate: dict[str, Any]) -> None:
        return None

    def log_step_summary(self, step: int, summary: dict[str, dict[str, float]]) -> None:
        return None

    def log_train_losses(self, step: int, task_name: str, train_log: dict[str, Any]) -> None:
        return None

    def set_tags(self, tags: dict[str, str], run_id: str | None = None) -> None:
        return None

    def run_url(self) -> str | None:
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
