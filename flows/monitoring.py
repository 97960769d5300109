"""What the line looks like from the serving side: Prometheus metrics and the drift watch's alarms.

``LineMonitor`` (one per serve-api process or stream) counts requests, latencies and decisions per
product (Prometheus text at ``/metrics``), feeds the score of every image decided OK to the drift
watch of the version that decided it (``components.eval.drift``; reset when a new version is
loaded), and hands each completed drift window to a background ``DriftReporter``: MLflow metrics
``drift_ks.<product>`` in a ``drift-watch`` run of the ``<prefix>-monitoring`` experiment (when
tracking is on) and, for an alarming window, a Prefect event ``contad.product.drift`` (resource
``contad.product.<product>``; payload: the reading and the deployed versions) to the server at
``PREFECT_API_URL`` that a deployment or automation can act on (re-calibrate, alert). Requests never
wait for either: readings go through a queue, and a failing sink only logs a warning.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from components.config import Config
from components.decision import Detector, Verdict
from components.eval.drift import DriftReading, DriftWatch, drift_watch_for

log = logging.getLogger(__name__)

DRIFT_EVENT = "contad.product.drift"
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DriftReporter:
    """Sends drift readings to MLflow and alarms to Prefect from a background thread (never from a request)."""

    def __init__(self, cfg: Config) -> None:
        from prefect.settings import PREFECT_API_URL

        self.cfg = cfg
        self.api_url: str | None = PREFECT_API_URL.value() or None  # read here: settings contexts do not reach the thread
        self._queue: queue.Queue[tuple[DriftReading, dict[str, Any]] | None] = queue.Queue(maxsize=1000)
        self._thread = threading.Thread(target=self._run, name="contad-drift-reporter", daemon=True)
        self._run_id: str | None = None
        self._client: Any = None
        self.sent_events = 0
        self._thread.start()

    def report(self, reading: DriftReading, versions: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait((reading, versions))
        except queue.Full:
            log.warning("drift watch: reporting queue full; reading of %s dropped", reading.product)

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            reading, versions = item
            for sink in (self._log_mlflow, self._emit_event):
                try:
                    sink(reading, versions)
                except Exception as exc:  # noqa: BLE001 - a monitoring sink must never stop serving
                    log.warning("drift watch: %s failed for %s: %s", sink.__name__.strip("_"), reading.product, str(exc).splitlines()[0] if str(exc) else exc)

    def _log_mlflow(self, reading: DriftReading, versions: dict[str, Any]) -> None:
        if not self.cfg.tracking.enabled:
            return
        from flows.tracking import ensure_experiment, make_client, process_tags

        if self._client is None:
            self._client = make_client(self.cfg.tracking)
            experiment = ensure_experiment(self._client, f"{self.cfg.tracking.experiment_prefix}-monitoring", self.cfg.tracking.uri)
            tags = {"contad.kind": "drift-watch", **{f"contad.{k}": str(v) for k, v in versions.items() if v}, **process_tags()}
            self._run_id = self._client.create_run(experiment, run_name="drift-watch", tags=tags).info.run_id
        for key, value in (("drift_ks", reading.statistic), ("drift_critical", reading.critical), ("drift_alarm", float(reading.alarm))):
            self._client.log_metric(self._run_id, f"{key}.{reading.product}", value, step=reading.window)

    def _emit_event(self, reading: DriftReading, versions: dict[str, Any]) -> None:
        if not reading.alarm:
            return
        url = self.api_url
        if not url:
            log.warning("drift watch: %s drifted (KS %.3f > %.3f) but PREFECT_API_URL is not set: no %s event sent",
                        reading.product, reading.statistic, reading.critical, DRIFT_EVENT)
            return
        asyncio.run(send_drift_event(url, reading, versions))
        self.sent_events += 1
        log.warning("drift watch: %s drifted (KS %.3f > %.3f in window %d): %s sent to %s",
                    reading.product, reading.statistic, reading.critical, reading.window, DRIFT_EVENT, url)


async def send_drift_event(url: str, reading: DriftReading, versions: dict[str, Any]) -> None:
    """Emit ``contad.product.drift`` for ``reading`` to the Prefect server at ``url``."""
    from flows.events import send_event

    await send_event(url, DRIFT_EVENT, f"contad.product.{reading.product}", {**reading.to_dict(), **versions},
                     {"prefect.resource.name": reading.product})


class LineMonitor:
    """Prometheus metrics of one serving process, and the drift watch of the version being served."""

    def __init__(self, cfg: Config, reporter: DriftReporter | None = None) -> None:
        self.cfg = cfg
        self.registry = CollectorRegistry()
        self.requests = Counter("contad_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("contad_request_seconds", "request latency (s) by endpoint", ["endpoint"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.decisions = Counter("contad_decisions", "decisions by routed product and decision", ["product", "decision"], registry=self.registry)
        self.drift = Gauge("contad_drift_ks", "KS distance of the last window of OK scores to the calibration normals", ["product"],
                           registry=self.registry)
        self.critical = Gauge("contad_drift_critical", "KS distance above which a window alarms (drift.alpha)", ["product"], registry=self.registry)
        self.alarms = Counter("contad_drift_alarms", "drift windows that alarmed", ["product"], registry=self.registry)
        self.windows = Counter("contad_drift_windows", "drift windows completed", ["product"], registry=self.registry)
        self.reporter = reporter
        self._watch: DriftWatch | None = None
        self._watched_key: str | None = None
        self._lock = threading.Lock()

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_verdict(self, detector: Detector, version_key: str, verdict: Verdict, versions: dict[str, Any] | None = None) -> DriftReading | None:
        """Count the decision; feed an OK score to the drift watch of ``version_key`` (a new version starts a new watch)."""
        self.decisions.labels(verdict.product, verdict.decision).inc()
        if not self.cfg.drift.enabled or verdict.decision != "OK":
            return None
        with self._lock:
            if self._watched_key != version_key:
                self._watch = drift_watch_for(detector.calibration, self.cfg.drift.window, self.cfg.drift.alpha)
                self._watched_key = version_key
            assert self._watch is not None
            reading = self._watch.observe(verdict.product, verdict.score)
        if reading is not None:
            self.record_reading(reading, versions or {})
        return reading

    def record_reading(self, reading: DriftReading, versions: dict[str, Any]) -> None:
        """Expose a completed window and hand it to the reporter."""
        self.drift.labels(reading.product).set(reading.statistic)
        self.critical.labels(reading.product).set(reading.critical)
        self.windows.labels(reading.product).inc()
        if reading.alarm:
            self.alarms.labels(reading.product).inc()
        if self.reporter is not None:
            self.reporter.report(reading, versions)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class StreamDrift:
    """The drift watch of one ``contad stream`` product.

    Reference: the starting model's calibration normals of the product when it has enough (like
    serve-api); otherwise the stream's own first ``2 * drift.window`` OK scores (a baseline of the line
    itself), after which the watch starts. Not persisted: a resumed stream starts new windows.
    """

    def __init__(self, cfg: Config, product: str, calibrated: list[float], threshold: float | None, reporter: DriftReporter | None) -> None:
        self.cfg, self.product, self.reporter = cfg, product, reporter
        self.baseline: list[float] = []
        self.watch: DriftWatch | None = None
        self.windows = self.alarms = 0
        if cfg.drift.enabled and threshold is not None:
            watch = DriftWatch({product: calibrated}, {product: threshold}, cfg.drift.window, cfg.drift.alpha)
            self.watch = watch if watch.watches(product) else None

    def observe(self, score: float, versions: dict[str, Any]) -> DriftReading | None:
        """Feed the score of an image decided OK; the reading when it completes a window."""
        if not self.cfg.drift.enabled:
            return None
        if self.watch is None:
            self.baseline.append(float(score))
            if len(self.baseline) >= 2 * self.cfg.drift.window:
                self.watch = DriftWatch({self.product: self.baseline}, {self.product: float("inf")}, self.cfg.drift.window, self.cfg.drift.alpha)
                log.info("stream drift watch: %s compares with the first %d OK scores of the stream (no calibrated normals)",
                         self.product, len(self.baseline))
            return None
        reading = self.watch.observe(self.product, score)
        if reading is not None:
            self.windows += 1
            self.alarms += reading.alarm
            if reading.alarm:
                log.warning("stream drift watch: %s drifted (KS %.3f > %.3f in window %d; median score shift %+.3f)",
                            self.product, reading.statistic, reading.critical, reading.window, reading.median_shift)
            if self.reporter is not None:
                self.reporter.report(reading, versions)
        return reading
