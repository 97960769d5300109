"""Online mode: ``contad stream SOURCE --product NAME --out DIR`` (Prefect flow ``contad-stream``).

A line camera's images arrive one at a time. Each image is, in this order (prequential):
1. decoded (an unreadable image is logged with its path, recorded in ``stream.jsonl`` with its
   error and skipped; the stream goes on);
2. scored with the CURRENT model of ``NAME``'s task, and routed by key among all learned tasks
   (``routed`` is a monitoring signal: a mismatch flags an image from another line);
3. decided: ``warmup`` for the first ``stream.warmup`` images, then ``anomalous`` when the score
   exceeds mean + ``stream.threshold_sigma`` x std of the scores of the images judged normal so far,
   else ``normal``;
4. learned (one online update) when ``stream.update=all``, or with ``below_threshold`` only when it
   was not judged anomalous (likely defects stay out of the memory);
5. appended to ``DIR/stream.jsonl`` (path, product, routed, score, threshold, decision, learned,
   model_step = updates the scoring model had seen) and flushed.

Every ``stream.checkpoint_every`` images and at exit the model and the stream position are
written atomically to ``DIR/checkpoint`` and committed as a bank version (``contad banks list
--store DIR/banks`` unless ``banks.store_dir`` is set). Rerunning the same command after a crash
(even ``kill -9``) resumes from the last checkpoint: ``stream.jsonl`` is cut back to the
checkpoint's length and images already learned are skipped, so the final state equals that of an
uninterrupted stream. SOURCE is a folder watched for new images, a text file of image paths, or
``-`` for paths on stdin. Fault hook for tests: env ``CONTAD_STREAM_KILL_AFTER=N`` SIGKILLs the
process right after the N-th image of this run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow

from components.atomic import atomic_directory
from components.config import BanksConfig, Config
from components.data.loading import load_images
from components.errors import ContadError
from components.memory.store import BankStore
from components.methods.base import ContinualMethod
from components.progress import progress_bar

log = logging.getLogger(__name__)

STREAM_LOG = "stream.jsonl"
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
            yield key
        if idle_timeout_s > 0 and time.monotonic() - last_new > idle_timeout_s:
            return
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
    """Where a stream is: images handled, their paths, log length, and normal-score statistics (Welford)."""

    product: str
    step: int = 0  # images handled (learned, rejected or unreadable)
    processed: list[str] = field(default_factory=list)
    log_bytes: int = 0  # length of stream.jsonl at this state
    normal_count: int = 0
    normal_mean: float = 0.0
    normal_m2: float = 0.0

    def threshold(self, cfg: Config) -> float | None:
        """mean + sigma x std of the scores judged normal so far; None during warm-up."""
        if self.normal_count < cfg.stream.warmup:
            return None
        std = math.sqrt(self.normal_m2 / max(self.normal_count - 1, 1))
        return self.normal_mean + cfg.stream.threshold_sigma * std

    def add_normal(self, score: float) -> None:
        self.normal_count += 1
        delta = score - self.normal_mean
        self.normal_mean += delta / self.normal_count
        self.normal_m2 += delta * (score - self.normal_mean)


def version_checkpoint(store_dir: Path, method_dir: Path, meta: dict[str, Any], out: Path) -> str:
    """Commit a checkpointed method state as a bank version (the one place the stream touches BankStore).

    In the stream's own store (``OUT/banks``) the checkpoint becomes current. In a shared store
    (``banks.store_dir`` set) it is stored as a candidate only (listed by ``contad banks list``):
    there ``CURRENT`` moves only together with the ``champion`` alias, through the promotion transaction.
    """
    own_store = Path(store_dir).resolve() == (Path(out) / "banks").resolve()
    return BankStore(store_dir).commit(method_dir, meta, make_current=own_store)


def write_checkpoint(out: Path, method: ContinualMethod, state: StreamState, store_dir: Path) -> str:
    """Atomically write ``OUT/checkpoint`` (method + stream state), then version it; returns the bank version."""
    checkpoint = out / CHECKPOINT_DIR
    with atomic_directory(checkpoint) as tmp:
        method.save(tmp / CHECKPOINT_METHOD)
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(asdict(state)) + "\n", encoding="utf-8")
    meta = {"step": state.step, "tasks": list(method.tasks), "source": "stream", "stream_product": state.product, "images_learned": getattr(method, "images_learned", None)}
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
        return StreamState(product=product)
    state = StreamState(**json.loads((checkpoint / CHECKPOINT_STATE).read_text(encoding="utf-8")))
    if state.product != product:
        raise ContadError(f"{checkpoint}: this stream directory learns product {state.product!r}, not {product!r} (use another --out)")
    method.load(checkpoint / CHECKPOINT_METHOD)
    if log_path.exists():
        with log_path.open("r+b") as fh:
            fh.truncate(state.log_bytes)
    log.info("stream: resuming %s after %d images (checkpoint %s)", product, state.step, checkpoint)
    return state


# ---------------------------------------------------------------------------------- the loop
def _task_index(method: Any, product: str) -> int:
    return method.tasks.index(product) if product in method.tasks else method.add_task(product)


def _routed_product(method: Any, feats: Any) -> str | None:
    """The task key routing sends the image to (None while no task has a key yet)."""
    try:
        return method.tasks[int(method.route_features(feats)[0])]
    except ContadError:
        return None


def _handle(method: Any, cfg: Config, state: StreamState, task: int, path: str) -> dict[str, Any]:
    """Score one image with the current model, decide, then (maybe) learn it; the stream.jsonl record."""
    record: dict[str, Any] = {"index": state.step, "path": path, "product": state.product}
    try:
        image = load_images([path], cfg.data.image_size)
    except ContadError as exc:
        log.error("stream: skipping unreadable image %s: %s", path, exc)
        return {**record, "error": str(exc), "learned": False}
    feats = method.frozen_features(image)
    model_step = method.images_learned[task]
    score = float(method.score_features(feats, task)[0][0])  # prequential: before any update
    routed = _routed_product(method, feats)
    threshold = state.threshold(cfg)
    decision = "warmup" if threshold is None else ("anomalous" if score > threshold else "normal")
    learn = cfg.stream.update == "all" or decision != "anomalous"
    if decision != "anomalous":
        state.add_normal(score)
    loss = method.learn_features(feats, task) if learn else None
    return {**record, "routed": routed, "score": score, "threshold": threshold, "decision": decision, "learned": learn, "model_step": model_step, "loss": loss}


def run_stream(cfg: Config, method: ContinualMethod, source: Iterator[str], product: str, out: Path) -> dict[str, Any]:
    """Prequential online loop over ``source`` (see module docstring); returns a summary."""
    if not getattr(method, "supports_streaming", False):
        raise ContadError(f"method {method.name!r} does not support streaming (method=lemo does)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store_dir = Path(cfg.banks.store_dir) if cfg.banks.store_dir != BanksConfig().store_dir else out / "banks"
    state = restore(out, method, product)
    task = _task_index(method, product)
    done = set(state.processed)
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    new_images, started, score_sum, scored = 0, time.perf_counter(), 0.0, 0
    version = None
    bar = progress_bar(desc=f"stream {product}", unit="img")
    with (out / STREAM_LOG).open("ab") as log_file:
        for path in source:
            if path in done:
                log.debug("stream: %s already learned before the checkpoint; skipped", path)
                continue
            record = _handle(method, cfg, state, task, path)
            line = (json.dumps(record) + "\n").encode("utf-8")
            log_file.write(line)
            log_file.flush()
            state.step += 1
            state.processed.append(path)
            state.log_bytes += len(line)
            done.add(path)
            new_images += 1
            if "score" in record:
                score_sum, scored = score_sum + record["score"], scored + 1
            bar.update(1)
            bar.set_postfix(img_s=f"{new_images / max(time.perf_counter() - started, 1e-9):.1f}", mean_score=f"{score_sum / max(scored, 1):.4f}")
            if state.step % cfg.stream.checkpoint_every == 0:
                version = write_checkpoint(out, method, state, store_dir)
            if kill_after and new_images == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if cfg.stream.max_images is not None and new_images >= cfg.stream.max_images:
                break
    bar.close()
    if new_images or version is None:
        version = write_checkpoint(out, method, state, store_dir)
    seconds = time.perf_counter() - started
    summary = {
        "product": product,
        "new_images": new_images,
        "total_images": state.step,
        "images_per_s": new_images / seconds if seconds > 0 else 0.0,
        "bank_version": version,
        "bank_store": str(store_dir),
        "stream_log": str(out / STREAM_LOG),
    }
    log.info("stream: %d new images (%d in total) at %.1f img/s; bank version %s", new_images, state.step, summary["images_per_s"], version[:12])
    return summary


@flow(name="contad-stream", validate_parameters=False, persist_result=False)
def stream_flow(cfg: Config, source: str, product: str, out: Path, init: Path | None = None) -> dict[str, Any]:
    """Prefect flow around ``run_stream``: build the method (optionally from a saved state) and stream ``source``."""
    from flows.pipeline import load_method

    method = load_method(cfg, init)
    return run_stream(cfg, method, open_source(source, cfg), product, Path(out))


def stream_command(cfg: Config, source: str, product: str, out: Path, init: Path | None = None) -> int:
    """``contad stream SOURCE --product NAME --out DIR [--init METHOD_DIR]``."""
    if not product.strip():
        raise ContadError("stream: --product must name the product the stream learns")
    summary = stream_flow(cfg, source, product, Path(out), init)
    print(json.dumps(summary, indent=2))
    return 0
