"""``contad serve-api``: the REST inference service for the line camera (FastAPI + uvicorn).

Endpoints (OpenAPI schema at ``/openapi.json``; Swagger UI at ``/docs``, served from local files so it
works offline: ``flows/offline_docs.py``):

- ``POST /v1/predict``: one image as the raw request body (``application/octet-stream`` or
  ``image/*``) or as the ``image`` file of a ``multipart/form-data`` form. Returns JSON
  ``{product, score, threshold, decision, model_version, bank_version, prediction_id, latency_ms}``
  (``prediction_id``: the hex SHA-256 of the image bytes, as ``contad predict`` writes it); with
  ``?heatmap=png`` the heat-map overlay PNG instead (decision fields in ``X-Contad-*`` headers).
- ``POST /v1/feedback?verdict=good|defect[&product=P&by=WHO]``: an operator verdict on one image (body as for
  predict), recorded in the served bank store (``--bank DIR``, else ``banks.store_dir``) with what the served
  model decides on it; returns the record (``flows/feedback.py``). 400: a verdict twice, an unknown product.
  With ``&prediction_id=ID`` (or a unique prefix of 8+ characters) and no body: the verdict is on an image this
  service predicted recently (the last ``serve.feedback_cache``, kept in memory: ``flows/prediction_cache.py``),
  with what was decided then; 404 when the id is unknown or dropped, 400 when the prefix is ambiguous.
- ``GET /v1/model``: what is deployed (versions, tasks, thresholds, source, reloads).
- ``GET /healthz`` (process alive) and ``GET /readyz`` (a model is loaded).
- ``GET /metrics``: Prometheus text (``flows/monitoring.py``): requests and latencies by endpoint,
  decisions by product, and the drift watch per product (KS distance of the last window of OK
  scores to the calibration normals, its critical value, alarms; an alarm also emits the Prefect
  event ``contad.product.drift`` when ``PREFECT_API_URL`` is set). Same auth as ``/v1/*``.

Bounded inputs: ``serve.max_bytes`` (413), ``serve.max_pixels`` (413, checked from the image
header before decoding), content sniffed from the bytes (400 when not PNG/JPEG/BMP/TIFF or
truncated), unsupported Content-Type (415), ``serve.max_concurrent`` inferences at once and
``serve.request_timeout_s`` per request (503). Bad input never gives a 500. Slow clients: the request
headers, then the body, must each arrive within ``serve.read_timeout_s`` (the connection is closed,
or 408 for the body); a client that disconnects mid-upload costs one log line, not a traceback.

Auth: when the environment variable named by ``serve.token_env`` is set, ``/v1/*`` needs
``Authorization: Bearer <token>`` (401 otherwise) and ``/readyz`` shows the model and bank versions
only with it; binding a non-loopback address without a token is refused.

Hot reload: a background thread polls the source (``serve.reload_poll_s``); when the champion
alias (or the bank store's current pointer) moves, the new detector is loaded beside the old
one and swapped in with one reference assignment. A request takes the detector reference once
when it starts, so in-flight requests finish on the old model.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from components.config import Config
from components.decision import Detector, decode_image, decode_xyz
from components.errors import ContadError, DataError
from components.eval.figures import heatmap_overlay_png
from components.memory.feedback import image_id
from flows.deployed import DeployedVersion, DetectorSource
from flows.monitoring import PROMETHEUS_CONTENT_TYPE, DriftReporter, LineMonitor
from flows.offline_docs import add_offline_docs
from flows.prediction_cache import CachedPrediction, PredictionCache, UnknownPrediction
from flows.predict import TOO_LARGE, no_reprs, skip_message, skip_reason

log = logging.getLogger(__name__)

RAW_CONTENT_TYPES = ("application/octet-stream", "image/")
MULTIPART = "multipart/form-data"
IMAGE_FIELD = "image"
DEPTH_FIELD = "depth"  # multipart file with the xyz TIFF of an RGB + depth detector


class PredictResponse(BaseModel):
    """The decision on one image."""

    product: str
    score: float
    threshold: float
    decision: Literal["OK", "NG"]
    model_version: str | None
    bank_version: str | None
    prediction_id: str  # hex SHA-256 of the image bytes: names this image in POST /v1/feedback
    latency_ms: float


class ErrorResponse(BaseModel):
    detail: str


@dataclass
class Deployed:
    """The detector serving right now and the version it was built from."""

    detector: Detector
    version: DeployedVersion
    loaded_at: float = field(default_factory=time.time)


class ModelSlot:
    """Holds the serving detector; ``swap`` replaces it atomically (readers never see a partial state)."""

    def __init__(self) -> None:
        self.deployed: Deployed | None = None
        self.reloads = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()

    def swap(self, deployed: Deployed) -> None:
        with self._lock:
            if self.deployed is not None:
                self.reloads += 1
            self.deployed = deployed  # one reference assignment: requests already holding the old one finish on it


class Reloader:
    """Loads the source's current version at start, then polls it and swaps in new versions."""

    def __init__(self, source: DetectorSource, slot: ModelSlot, poll_s: float) -> None:
        self.source, self.slot, self.poll_s = source, slot, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="contad-reloader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def check(self) -> bool:
        """Load and swap in the source's current version if it differs from the serving one; True when swapped."""
        version = self.source.current()
        serving = self.slot.deployed
        if serving is not None and serving.version.key == version.key:
            return False
        log.info("loading %s (%s) beside the serving model", self.source.description, version.key)
        self.slot.swap(Deployed(self.source.load(version), version))
        log.info("now serving %s", version.key)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
                self.slot.last_error = None
            except Exception as exc:  # noqa: BLE001 - keep serving the old model; report on /v1/model
                self.slot.last_error = str(exc)
                log.warning("model reload from %s failed (still serving the previous model): %s", self.source.description, exc)
            if self.poll_s <= 0 and self.slot.deployed is not None:
                return
            self._stop.wait(self.poll_s if self.poll_s > 0 else 1.0)


class Limiter:
    """At most ``max_concurrent`` inferences at once; each request waits and runs within ``timeout_s``."""

    def __init__(self, max_concurrent: int, timeout_s: float) -> None:
        self.max_concurrent, self.timeout_s = max_concurrent, timeout_s
        self._semaphore: asyncio.Semaphore | None = None

    async def run(self, fn: Any, *args: Any) -> Any:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_concurrent)
        semaphore = self._semaphore
        deadline = time.monotonic() + self.timeout_s
        try:
            await asyncio.wait_for(semaphore.acquire(), self.timeout_s)
        except TimeoutError:
            raise HTTPException(503, f"busy: no inference slot free within serve.request_timeout_s={self.timeout_s} s") from None
        work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        work.add_done_callback(lambda _: semaphore.release())  # the slot stays taken until the work really ends
        try:
            return await asyncio.wait_for(asyncio.shield(work), max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            raise HTTPException(503, f"inference did not finish within serve.request_timeout_s={self.timeout_s} s") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_token(cfg: Config) -> str | None:
    """The bearer token from the environment variable ``serve.token_env`` (None when unset or empty)."""
    return os.environ.get(cfg.serve.token_env) or None


class SlowClientGuard(H11Protocol):
    """uvicorn's h11 connection with a deadline on the request headers: a client that has not sent a complete
    request head ``read_timeout_s`` after connecting (or after its previous response) is disconnected."""

    read_timeout_s: float  # set per server by ``slow_client_guard`` (serve.read_timeout_s)
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        waiting = self.cycle
        super().handle_events()
        if self.cycle is not waiting:  # a request head arrived: its body has its own deadline (``read_body``)
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._idle():
            self._arm()  # the next request on this keep-alive connection (unless a pipelined one already started)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _idle(self) -> bool:
        """No request is in progress on this connection (none yet, or the last one answered)."""
        return self.cycle is None or self.cycle.response_complete

    def _too_slow(self) -> None:
        self._deadline = None
        if self._idle() and not self.transport.is_closing():
            log.info("client %s sent no complete request head within serve.read_timeout_s=%s s: connection closed",
                     _peer(self.client), self.read_timeout_s)
            self.transport.close()


def slow_client_guard(read_timeout_s: float) -> type[SlowClientGuard]:
    """The uvicorn ``http`` protocol class cutting request heads slower than ``read_timeout_s``."""
    return type("SlowClientGuard", (SlowClientGuard,), {"read_timeout_s": read_timeout_s})


def _peer(client: Any) -> str:
    """``host:port`` of a uvicorn/Starlette client address (or "unknown")."""
    return f"{client[0]}:{client[1]}" if client else "unknown"


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``max_bytes`` and with 408 when it has not
    arrived within ``timeout_s``; a client gone mid-upload is logged in one line (``ClientDisconnect``)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"request body of {declared} bytes exceeds serve.max_bytes={max_bytes}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise HTTPException(413, f"request body exceeds serve.max_bytes={max_bytes}")
                chunks.append(chunk)
    except TimeoutError:
        log.info("client %s sent %d body bytes in serve.read_timeout_s=%s s: request cut", _peer(request.client), size, timeout_s)
        raise HTTPException(408, f"request body not received within serve.read_timeout_s={timeout_s} s") from None
    except ClientDisconnect:
        log.info("client %s disconnected after %d body bytes: request dropped", _peer(request.client), size)
        raise HTTPException(400, "client disconnected before the request body was complete") from None
    return b"".join(chunks)


async def image_bytes(request: Request, max_bytes: int, timeout_s: float) -> tuple[bytes, bytes | None]:
    """(encoded image, xyz TIFF or None) of a raw-body or multipart request (the content type only chooses
    how to read it; a multipart request may carry the point cloud as a ``depth`` file)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (content_type.startswith(RAW_CONTENT_TYPES) or content_type == MULTIPART):
        raise HTTPException(415, f"unsupported Content-Type {content_type or '(none)'!r}: send the image as "
                                 f"application/octet-stream, image/* or {MULTIPART} with an {IMAGE_FIELD!r} file")
    body = await read_body(request, max_bytes, timeout_s)
    if content_type != MULTIPART:
        return body, None
    request._body = body  # noqa: SLF001 - let Starlette parse the already size-checked body
    try:
        form = await request.form(max_files=2, max_fields=8)
    except Exception as exc:  # noqa: BLE001 - malformed multipart is bad input
        raise HTTPException(400, f"malformed {MULTIPART} body: {no_reprs(str(exc))}") from None
    upload = form.get(IMAGE_FIELD)
    if upload is None or isinstance(upload, str):
        raise HTTPException(400, f"{MULTIPART} request needs a file field named {IMAGE_FIELD!r}")
    depth = form.get(DEPTH_FIELD)
    return await upload.read(), (await depth.read() if depth is not None and not isinstance(depth, str) else None)


def decode_and_decide(detector: Detector, data: bytes, max_pixels: int, depth: bytes | None = None) -> tuple[Any, Any]:
    """(decoded RGB image, verdict) of one encoded image (with its xyz TIFF for an RGB + depth detector)."""
    rgb = decode_image(data, max_pixels, source="request body")
    if not detector.uses_depth:
        return rgb, detector.decide([rgb])[0]
    if depth is None:
        raise DataError(f"this detector scores RGB + depth: send {MULTIPART} with files {IMAGE_FIELD!r} and {DEPTH_FIELD!r} (xyz TIFF)")
    return rgb, detector.decide([rgb], [decode_xyz(depth, max_pixels, source=DEPTH_FIELD)])[0]


def create_app(cfg: Config, source: DetectorSource, token: str | None = None, start_reloader: bool = True) -> FastAPI:
    """The FastAPI app serving ``source``; the reloader thread runs for the app's lifetime."""
    slot = ModelSlot()
    reloader = Reloader(source, slot, cfg.serve.reload_poll_s)
    limiter = Limiter(cfg.serve.max_concurrent, cfg.serve.request_timeout_s)
    monitor = LineMonitor(cfg, DriftReporter(cfg) if cfg.drift.enabled else None)
    recent = PredictionCache(cfg.serve.feedback_cache, int(cfg.serve.feedback_cache_mb * 2**20))

    async def lifespan(app: FastAPI):  # noqa: ANN202
        if start_reloader:
            reloader.start()
        yield
        if start_reloader:
            reloader.stop()
        if monitor.reporter is not None:
            monitor.reporter.close()

    app = FastAPI(title="contad inference API", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  swagger_ui_oauth2_redirect_url=None,
                  description="OK/NG decisions and heat maps from the deployed continual anomaly detector.")
    add_offline_docs(app)  # /docs from local files: no CDN
    app.state.slot, app.state.reloader, app.state.monitor, app.state.recent = slot, reloader, monitor, recent

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            monitor.observe_request(getattr(route, "path", "unmatched"), status, time.perf_counter() - started)

    errors = {code: {"model": ErrorResponse} for code in (400, 401, 408, 413, 415, 422, 503)}
    feedback_errors = {**errors, 404: {"model": ErrorResponse}}

    def authorised(request: Request) -> bool:
        """No token configured, or the request carries it."""
        if token is None:
            return True
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(value.strip().encode(), token.encode())

    def authorise(request: Request) -> None:
        if not authorised(request):
            raise HTTPException(401, "missing or invalid bearer token (Authorization: Bearer <token>)", headers={"WWW-Authenticate": "Bearer"})

    def serving() -> Deployed:
        deployed = slot.deployed
        if deployed is None:
            raise HTTPException(503, f"no model loaded yet from {source.description}" + (f" ({slot.last_error})" if slot.last_error else ""))
        return deployed

    @app.get("/healthz", responses={200: {"content": {"application/json": {}}}})
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request) -> dict[str, Any]:
        """A model is loaded and requests can be served; which versions, only to an authorised client."""
        deployed = serving()
        if not authorised(request):
            return {"status": "ready"}
        return {"status": "ready", "model_version": deployed.version.model_version, "bank_version": deployed.version.bank_version}

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": {PROMETHEUS_CONTENT_TYPE: {}}}, 401: {"model": ErrorResponse}})
    async def metrics(request: Request) -> Response:
        """Prometheus metrics: requests, latencies, decisions per product, drift of OK scores per product."""
        authorise(request)
        return Response(monitor.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/v1/model", responses=errors)
    async def model_info(request: Request) -> dict[str, Any]:
        """The deployed detector: versions, tasks, thresholds, source and reload count."""
        authorise(request)
        deployed = serving()
        return {**deployed.detector.describe(), "source": source.description, "loaded_at": deployed.loaded_at,
                "reloads": slot.reloads, "last_reload_error": slot.last_error}

    body_schema = {"type": "string", "format": "binary"}
    request_body = {"required": True, "content": {
        "application/octet-stream": {"schema": body_schema},
        "image/png": {"schema": body_schema},
        "image/jpeg": {"schema": body_schema},
        MULTIPART: {"schema": {"type": "object", "properties": {IMAGE_FIELD: body_schema, DEPTH_FIELD: body_schema}, "required": [IMAGE_FIELD]}},
    }}

    @app.post("/v1/predict", response_model=PredictResponse, openapi_extra={"requestBody": request_body},
              responses={**errors, 200: {"content": {"image/png": {}}, "description": "decision (JSON) or, with heatmap=png, the overlay"}})
    async def predict(request: Request, heatmap: Literal["png"] | None = Query(None, description="png: return the heat-map overlay")) -> Any:
        """Decide OK/NG for one image (raw body or multipart ``image`` file)."""
        started = time.perf_counter()
        authorise(request)
        deployed = serving()  # taken once: a reload during this request does not affect it
        data, depth = await image_bytes(request, cfg.serve.max_bytes, cfg.serve.read_timeout_s)
        if not data:
            raise HTTPException(400, "empty request body: send the encoded image")
        try:  # decoding is bounded work too: it runs in the inference slot, off the event loop
            rgb, verdict = await limiter.run(decode_and_decide, deployed.detector, data, cfg.serve.max_pixels, depth)
        except DataError as exc:  # too large (ours or PIL's decompression-bomb limit): 413; anything else: 400
            raise HTTPException(413 if skip_reason(exc) == TOO_LARGE else 400, skip_message(exc, "request body", cfg.serve.max_pixels)) from None
        monitor.observe_verdict(deployed.detector, deployed.version.key, verdict,
                                {"model_version": deployed.version.model_version, "bank_version": deployed.version.bank_version})
        ident = image_id(data)
        recent.put(ident, CachedPrediction(data, verdict.to_dict(), deployed.version.model_version, deployed.version.bank_version))
        result = PredictResponse(**verdict.to_dict(), model_version=deployed.version.model_version, bank_version=deployed.version.bank_version,
                                 prediction_id=ident, latency_ms=round(1000 * (time.perf_counter() - started), 3))
        if heatmap == "png":
            png = await asyncio.to_thread(heatmap_overlay_png, rgb, verdict.anomaly_map, verdict.pixel_threshold, None, cfg.serve.heatmap_size,
                                          (verdict.decision, verdict.score, verdict.threshold, verdict.product))
            headers = {f"X-Contad-{k.replace('_', '-').title()}": str(v) for k, v in result.model_dump().items()}
            return Response(png, media_type="image/png", headers=headers)
        return result

    @app.post("/v1/feedback", openapi_extra={"requestBody": {**request_body, "required": False}}, responses=feedback_errors)
    async def feedback(request: Request, verdict: Literal["good", "defect"] = Query(..., description="the operator's verdict on the image"),
                       product: str | None = Query(None, description="the image's product (default: where it is routed)"),
                       by: str | None = Query(None, description="who gives the verdict (default: api)"),
                       prediction_id: str | None = Query(None, min_length=8, max_length=64, pattern="^[0-9a-fA-F]+$",
                                                         description="a recent /v1/predict of this service (its id or a unique prefix); no body then")) -> dict[str, Any]:
        """Record an operator verdict on one image (body as for /v1/predict) with what the served model decides on it, or on
        a recent prediction named by ``prediction_id`` with what was decided then (``contad feedback``: false rejects marked
        good are learned by ``contad feedback apply``; escapes gate every candidate)."""
        authorise(request)
        from flows.feedback import feedback_config, record_served  # the recording side (Prefect, the store lock) only when used

        if prediction_id is not None:
            if int(request.headers.get("content-length") or 0) > 0 or "transfer-encoding" in request.headers:
                raise HTTPException(400, "give either prediction_id or the image as the request body, not both")
            try:
                ident, seen = recent.find(prediction_id)
            except UnknownPrediction as exc:
                raise HTTPException(404, str(exc)) from None
            return await asyncio.to_thread(record_served, feedback_config(cfg, source), seen.data, seen.decided, seen.model_version,
                                           seen.bank_version, verdict, product, by, f"prediction {ident[:12]} (serve-api)")
        deployed = serving()
        data, depth = await image_bytes(request, cfg.serve.max_bytes, cfg.serve.read_timeout_s)
        if not data:
            raise HTTPException(400, "empty request body: send the encoded image")
        try:
            _, decided = await limiter.run(decode_and_decide, deployed.detector, data, cfg.serve.max_pixels, depth)
        except DataError as exc:
            raise HTTPException(413 if skip_reason(exc) == TOO_LARGE else 400, skip_message(exc, "request body", cfg.serve.max_pixels)) from None
        return await asyncio.to_thread(record_served, feedback_config(cfg, source), data, decided.to_dict(), deployed.version.model_version,
                                       deployed.version.bank_version, verdict, product, by)

    @app.exception_handler(ContadError)
    async def contad_error(request: Request, exc: ContadError) -> JSONResponse:
        return JSONResponse({"detail": no_reprs(str(exc))}, status_code=400)

    return app


def check_bind(host: str, token: str | None, token_env: str) -> None:
    """Refuse to expose the service beyond loopback without a bearer token."""
    if not is_loopback(host) and token is None:
        raise ContadError(f"refusing to bind {host} (not loopback) without a bearer token: set the environment variable "
                          f"{token_env} (serve.token_env) or bind 127.0.0.1")


def serve_api_command(cfg: Config, model: str | None = None, bank: str | None = None) -> int:
    """``contad serve-api``: serve ``--model`` (default ``serve.model``) or ``--bank`` until interrupted."""
    import uvicorn

    from flows.deployed import make_source

    token = api_token(cfg)
    check_bind(cfg.serve.host, token, cfg.serve.token_env)
    source = make_source(cfg, model if model or bank else cfg.serve.model, bank)
    source.current()  # fail fast on a wrong model/bank reference
    app = create_app(cfg, source, token)
    print(f"serving {source.description} on http://{cfg.serve.host}:{cfg.serve.port} (docs: /docs; auth: {'bearer token' if token else 'none'})")
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning", timeout_graceful_shutdown=10,
                http=slow_client_guard(cfg.serve.read_timeout_s))
    return 0
