"""Online mode: ``contad stream SOURCE --product NAME --out DIR`` (Prefect flow ``contad-stream``).

A line camera's images arrive one at a time. Each image is, in this order (prequential):
1. decoded (an unreadable image is logged with its path, recorded in ``stream.jsonl`` with its
   error and skipped; the stream goes on);
2. scored with the CURRENT model of ``NAME``'s task (``ContinualMethod.score_one``), and routed by
   content among all learned tasks (``routed`` is a monitoring signal: a mismatch flags an image from
   another line);
3. decided OK / NG with the rule ``contad predict`` uses: NG when the score is above the
   ``decision.target_fpr`` quantile of the task's calibration sample (``components.eval.thresholds``):
   the calibrated normals of the starting model (``--init``) plus the scores of every image this stream
   decided OK. A task without calibrated normals first labels ``stream.warmup`` images ``warmup``
   (learned, never decided; their scores start the sample);
4. learned (``learn_one``) when decided OK or warm-up; an NG image is never learned with the default
   ``stream.update=ok`` (``all``: every image): it is appended to ``DIR/quarantine.jsonl``;
5. appended to ``DIR/stream.jsonl`` (path, product, routed, score, threshold, decision, learned,
   model_step = images the task had learned before this one) and flushed;
6. when decided OK, fed to the drift watch (``flows/monitoring.py``, ``drift.*``): each full window of
   OK scores compared with the calibration normals (or the stream's first OK scores) goes to
   ``DIR/drift.jsonl``; an alarm logs a warning and emits ``contad.product.drift`` when
   ``PREFECT_API_URL`` names a server.

Every ``stream.checkpoint_every`` images and at exit the model and the stream position are
written atomically to ``DIR/checkpoint`` (with the configuration and a calibration holding the
stream's sample, so ``contad predict --bank`` decides like the stream) and committed as a bank version (``contad banks list
--store DIR/banks`` unless ``banks.store_dir`` is set). Rerunning the same command after a crash
(even ``kill -9``) resumes from the last checkpoint: ``stream.jsonl`` is cut back to the
checkpoint's length (``quarantine.jsonl`` too) and images already learned are skipped, so the final state equals that of an
uninterrupted stream. SOURCE is a folder watched for new images, a text file of image paths, or
``-`` for paths on stdin. A path that is not a regular file (a FIFO, socket or device, which would
block or never end) is recorded with its error and skipped like an unreadable image; when no new image
could be read at all the command exits 2. One stream at a time per ``DIR``: a stream holds the lock
of its directory (the bank store's kind of lock, ``DIR/.lock``) while it runs; a second one waits up to
``banks.lock_timeout_s``, then exits 75. Fault hook for tests: env ``CONTAD_STREAM_KILL_AFTER=N``
SIGKILLs the process right after the N-th image of this run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow

from components.artifact import deployed_config, read_detector_config, write_detector_config
from components.atomic import atomic_directory
from components.config import BanksConfig, Config
from components.data.loading import load_images
from components.errors import ContadError, DataError
from components.eval.thresholds import NG, OK, Calibration, TaskSample, quantile_threshold, read_calibration, write_calibration
from components.memory.store import BankLockTimeout, BankStore
from components.methods.base import ContinualMethod
from components.methods.loading import load_method
from components.progress import progress_bar
from flows.monitoring import DriftReporter, StreamDrift

log = logging.getLogger(__name__)

STREAM_LOG = "stream.jsonl"
QUARANTINE_LOG = "quarantine.jsonl"
DRIFT_LOG = "drift.jsonl"  # one line per completed drift window of OK scores (flows/monitoring.py)
WARMUP = "warmup"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_METHOD = "method"
CHECKPOINT_STATE = "stream.json"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
KILL_AFTER_ENV = "CONTAD_STREAM_KILL_AFTER"


# ---------------------------------------------------------------------------------- sources
def watch_folder(folder: Path, poll_s: float, idle_timeout_s: float, sleep: Callable[[float], None] = time.sleep) -> Iterator[str]:
    """Image paths under ``folder`` as they appear (oldest first), each once its size is stable over one poll.

    Stops after ``idle_timeout_s`` seconds without a new image (0 = watch forever).
    """
    sizes: dict[str, int] = {}
    yielded: set[str] = set()
    last_new = time.monotonic()
    announced = False  # the "waiting" line is logged once per idle spell
    while True:
        found = []
        for path in folder.rglob("*"):
            key = os.path.abspath(path)
            if key in yielded or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            stat = path.stat()
            if sizes.get(key) == stat.st_size:
                found.append((stat.st_mtime_ns, key))
            sizes[key] = stat.st_size
        for _, key in sorted(found):
            yielded.add(key)
            last_new = time.monotonic()
            announced = False
            yield key
        if idle_timeout_s > 0 and time.monotonic() - last_new > idle_timeout_s:
            log.info("stream: no new image in %s for %.0f s (stream.idle_timeout_s): stopping", folder, idle_timeout_s)
            return
        if not found and not announced:
            until = f"stops after {idle_timeout_s:.0f} s without one (stream.idle_timeout_s)" if idle_timeout_s > 0 else "until interrupted"
            log.info("stream: waiting for new images in %s; %s", folder, until)
            announced = True
        sleep(poll_s)


def _path_lines(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        text = line.strip()
        if text and not text.startswith("#"):
            yield os.path.abspath(os.path.expanduser(text))


def open_source(source: str, cfg: Config) -> Iterator[str]:
    """Absolute image paths from ``source``: ``-`` (stdin lines), a watched folder or a text file of paths."""
    if source == "-":
        return _path_lines(iter(sys.stdin.readline, ""))
    path = Path(source)
    if path.is_dir():
        return watch_folder(path, cfg.stream.poll_s, cfg.stream.idle_timeout_s)
    if path.is_file():
        return _path_lines(iter(path.read_text(encoding="utf-8").splitlines()))
    raise ContadError(f"stream source {source}: not a folder, a text file of image paths or '-' (stdin)")


# ---------------------------------------------------------------------------------- state
@dataclass
class StreamState:
    """Where a stream is: images handled, their paths, log lengths, and the task's calibration sample."""

    product: str
    step: int = 0  # images handled (learned, rejected or unreadable)
    processed: list[str] = field(default_factory=list)
    log_bytes: int = 0  # length of stream.jsonl at this state
    quarantine_bytes: int = 0  # length of quarantine.jsonl at this state
    calibrated: list[float] = field(default_factory=list)  # normal scores of the starting model's calibration
    accepted: list[float] = field(default_factory=list)  # scores of warm-up and OK images of this stream

    def threshold(self, cfg: Config) -> float | None:
        """The ``decision.target_fpr`` quantile of the calibration sample; None during warm-up."""
        if not self.calibrated and len(self.accepted) < cfg.stream.warmup:
            return None
        return quantile_threshold(np.asarray(self.calibrated + self.accepted), cfg.decision.target_fpr)


def stream_calibration(calibration: Calibration | None, product: str) -> list[float]:
    """The calibrated normal scores of ``product``'s task in a starting model's calibration (may be empty)."""
    if calibration is None:
        return []
    task = calibration.task_of_product.get(product, product)
    sample = calibration.samples.get(task)
    return [float(v) for v in sample.normal] if sample is not None else []


def checkpoint_calibration(cfg: Config, state: StreamState, previous: Calibration | None) -> Calibration | None:
    """The starting calibration with the stream's task sample: the OK scores join its held-out normals."""
    if state.threshold(cfg) is None:
        return previous
    samples = dict(previous.samples) if previous is not None else {}
    old = samples.get(state.product)
    pixel = old.pixel if old is not None else float("inf")  # no maps of the streamed normals: no contour drawn
    samples[state.product] = TaskSample(tuple(state.calibrated + state.accepted), (), pixel, old.synthetic if old is not None else ())
    task_of_product = {**(previous.task_of_product if previous is not None else {}), state.product: state.product}
    return Calibration(cfg.decision.target_fpr, cfg.decision.pixel_fpr, samples, task_of_product)


def version_checkpoint(store_dir: Path, method_dir: Path, meta: dict[str, Any], out: Path) -> str:
    """Commit a checkpointed method state as a bank version (the one place the stream touches BankStore).

    In the stream's own store (``OUT/banks``) the checkpoint becomes current. In a shared store
    (``banks.store_dir`` set) it is stored as a candidate only (listed by ``contad banks list``):
    there ``CURRENT`` moves only together with the ``champion`` alias, through the promotion transaction.
    """
    own_store = Path(store_dir).resolve() == (Path(out) / "banks").resolve()
    return BankStore(store_dir).commit(method_dir, meta, make_current=own_store)


def write_checkpoint(out: Path, method: ContinualMethod, state: StreamState, store_dir: Path, start: Calibration | None = None) -> str:
    """Atomically write ``OUT/checkpoint`` (method + configuration + calibration + stream state), then
    version it; returns the bank version."""
    checkpoint = out / CHECKPOINT_DIR
    with atomic_directory(checkpoint) as tmp:
        method.save(tmp / CHECKPOINT_METHOD)
        write_detector_config(tmp / CHECKPOINT_METHOD, method.config)
        calibration = checkpoint_calibration(method.config, state, start)
        if calibration is not None:
            write_calibration(tmp / CHECKPOINT_METHOD, calibration)
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(asdict(state)) + "\n", encoding="utf-8")
    learned = {task: method.images_learned(task) for task in method.tasks}
    meta = {"step": state.step, "tasks": list(method.tasks), "source": "stream", "stream_product": state.product, "images_learned": learned,
            "method": method.name, "task_of_product": {t: t for t in method.tasks}}
    return version_checkpoint(store_dir, checkpoint / CHECKPOINT_METHOD, meta, out)


def read_checkpoint(out: Path) -> Path | None:
    """The checkpoint directory to resume from (also the ``.old`` copy a crash mid-swap can leave), or None."""
    for candidate in (out / CHECKPOINT_DIR, out / f".{CHECKPOINT_DIR}.old"):
        if (candidate / CHECKPOINT_STATE).is_file():
            return candidate
    return None


def restore(out: Path, method: ContinualMethod, product: str) -> StreamState:
    """Load the last checkpoint of ``out`` into ``method`` and cut ``stream.jsonl`` back to it (or a fresh state)."""
    checkpoint = read_checkpoint(out)
    log_path = out / STREAM_LOG
    if checkpoint is None:
        log_path.unlink(missing_ok=True)
        (out / QUARANTINE_LOG).unlink(missing_ok=True)
        return StreamState(product=product)
    state = StreamState(**json.loads((checkpoint / CHECKPOINT_STATE).read_text(encoding="utf-8")))
    if state.product != product:
        raise ContadError(f"{checkpoint}: this stream directory learns product {state.product!r}, not {product!r} (use another --out)")
    method.load(checkpoint / CHECKPOINT_METHOD)
    for path, length in ((log_path, state.log_bytes), (out / QUARANTINE_LOG, state.quarantine_bytes)):
        if path.exists():
            with path.open("r+b") as fh:
                fh.truncate(length)
    log.info("stream: resuming %s after %d images (checkpoint %s)", product, state.step, checkpoint)
    return state


# ---------------------------------------------------------------------------------- the loop
@contextmanager
def stream_lock(out: Path, timeout_s: float) -> Iterator[None]:
    """Hold the lock of a stream directory while a stream writes it (the bank store's lock, on ``OUT/.lock``;
    re-entrant in one process); ``BankLockTimeout`` naming ``--out`` when another stream keeps it."""
    with ExitStack() as held:
        try:
            held.enter_context(BankStore(out).lock(timeout_s))
        except BankLockTimeout as exc:
            raise BankLockTimeout(f"stream --out {out} is in use by another stream: {exc}") from None
        yield


def check_regular_file(path: str) -> None:
    """``DataError`` unless ``path`` is a regular file (a FIFO would block the stream on open, a device never end)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: not a regular file (FIFO, socket, device or folder): skipped")


def _handle(method: ContinualMethod, cfg: Config, state: StreamState, path: str) -> dict[str, Any]:
    """Score one image with the current model, decide it, then learn it unless NG; the stream.jsonl record."""
    record: dict[str, Any] = {"index": state.step, "path": path, "product": state.product}
    try:
        check_regular_file(path)
        image = load_images([path], cfg.data.image_size)
    except ContadError as exc:
        log.error("stream: skipping unreadable image %s: %s", path, exc)
        return {**record, "error": str(exc), "decision": None, "learned": False}
    model_step = method.images_learned(state.product)
    scored = method.score_one(image, state.product)  # prequential: before any update
    threshold = state.threshold(cfg)
    decision = WARMUP if threshold is None else (NG if scored.score > threshold else OK)
    learn = decision != NG or cfg.stream.update == "all"
    if decision != NG:
        state.accepted.append(scored.score)
    loss = method.learn_one(scored, state.product) if learn else None
    return {**record, "routed": scored.routed, "score": scored.score, "threshold": threshold, "decision": decision, "learned": learn,
            "model_step": model_step, "loss": loss}


def run_stream(cfg: Config, method: ContinualMethod, source: Iterator[str], product: str, out: Path, init: Path | None = None) -> dict[str, Any]:
    """Prequential online loop over ``source`` (see module docstring), holding the lock of ``out``; returns a summary.

    ``init``: the method directory ``method`` was loaded from (its calibration starts the sample).
    """
    if not method.learns_online:
        raise ContadError(f"method {method.name!r} does not support streaming (methods declaring learns_online do, e.g. method=lemo)")
    with stream_lock(Path(out), cfg.banks.lock_timeout_s):
        return _run_stream(cfg, method, source, product, Path(out), init)


def _run_stream(cfg: Config, method: ContinualMethod, source: Iterator[str], product: str, out: Path, init: Path | None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    store_dir = Path(cfg.banks.store_dir) if cfg.banks.store_dir != BanksConfig().store_dir else out / "banks"
    state = restore(out, method, product)
    method.stream_task(product)
    start = read_calibration(init) if init is not None else None
    if state.step == 0:
        state.calibrated = stream_calibration(start, product)
    done = set(state.processed)
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    new_images, unreadable, started, counts = 0, 0, time.perf_counter(), {OK: 0, NG: 0, WARMUP: 0}
    reporter = DriftReporter(cfg) if cfg.drift.enabled else None
    calibrated_threshold = quantile_threshold(np.asarray(state.calibrated), cfg.decision.target_fpr) if state.calibrated else None
    drift = StreamDrift(cfg, product, state.calibrated, calibrated_threshold, reporter)
    version = None
    bar = progress_bar(desc=f"stream {product}", unit="img")
    with (out / STREAM_LOG).open("ab") as log_file, (out / QUARANTINE_LOG).open("ab") as quarantine, (out / DRIFT_LOG).open("ab") as drift_log:
        for path in source:
            if path in done:
                log.debug("stream: %s already learned before the checkpoint; skipped", path)
                continue
            record = _handle(method, cfg, state, path)
            line = (json.dumps(record) + "\n").encode("utf-8")
            if record.get("decision") == NG:
                held = (json.dumps({k: record[k] for k in ("index", "path", "product", "score", "threshold")}) + "\n").encode("utf-8")
                quarantine.write(held)
                quarantine.flush()
                state.quarantine_bytes += len(held)
            log_file.write(line)
            log_file.flush()
            reading = drift.observe(record["score"], {"stream": str(out)}) if record.get("decision") == OK else None
            if reading is not None:
                drift_log.write((json.dumps({"index": state.step, **reading.to_dict()}) + "\n").encode("utf-8"))
                drift_log.flush()
            state.step += 1
            state.processed.append(path)
            state.log_bytes += len(line)
            done.add(path)
            new_images += 1
            if record.get("decision") in counts:
                counts[record["decision"]] += 1
            unreadable += "error" in record
            bar.update(1)
            bar.set_postfix(img_s=f"{new_images / max(time.perf_counter() - started, 1e-9):.1f}", OK=counts[OK], NG=counts[NG])
            if state.step % cfg.stream.checkpoint_every == 0:
                version = write_checkpoint(out, method, state, store_dir, start)
            if kill_after and new_images == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if cfg.stream.max_images is not None and new_images >= cfg.stream.max_images:
                break
    bar.close()
    if reporter is not None:
        reporter.close()
    if new_images or version is None:
        version = write_checkpoint(out, method, state, store_dir, start)
    seconds = time.perf_counter() - started
    summary = {
        "product": product,
        "new_images": new_images,
        "total_images": state.step,
        "decisions": {"OK": counts[OK], "NG": counts[NG], "warmup": counts[WARMUP]},
        "unreadable": unreadable,
        "images_per_s": new_images / seconds if seconds > 0 else 0.0,
        "bank_version": version,
        "bank_store": str(store_dir),
        "stream_log": str(out / STREAM_LOG),
        "quarantine": str(out / QUARANTINE_LOG),
        "drift": {"windows": drift.windows, "alarms": drift.alarms, "log": str(out / DRIFT_LOG)},
    }
    log.info("stream: %d new images (%d in total; %d OK, %d NG quarantined, %d warm-up) at %.1f img/s; bank version %s",
             new_images, state.step, counts[OK], counts[NG], counts[WARMUP], summary["images_per_s"], version[:12])
    return summary


@flow(name="contad-stream", validate_parameters=False, persist_result=False)
def stream_flow(cfg: Config, source: str, product: str, out: Path, init: Path | None = None) -> dict[str, Any]:
    """Prefect flow around ``run_stream``: build the method (optionally from a saved state) and stream ``source``."""
    if init is not None:
        stored = read_detector_config(Path(init))
        cfg = deployed_config(stored, cfg, f"--init {init}") if stored is not None else cfg  # the model's own configuration
    method = load_method(cfg, init)
    return run_stream(cfg, method, open_source(source, cfg), product, Path(out), init)


def stream_command(cfg: Config, source: str, product: str, out: Path, init: Path | None = None) -> int:
    """``contad stream SOURCE --product NAME --out DIR [--init METHOD_DIR]``."""
    if not product.strip():
        raise ContadError("stream: --product must name the product the stream learns")
    with stream_lock(Path(out), cfg.banks.lock_timeout_s):  # taken before the Prefect server starts: a second stream fails fast
        summary = stream_flow(cfg, source, product, Path(out), init)
    print(json.dumps(summary, indent=2))
    if summary["new_images"] and summary["unreadable"] == summary["new_images"]:  # nothing decided is an input error, as in predict
        raise ContadError(f"stream: none of the {summary['new_images']} new image(s) could be read; see {summary['stream_log']} (each line names its error)")
    return 0
