"""``contad predict PATH... --model models:/NAME@ALIAS | --bank DIR[@VERSION] --out DIR``.

Every image (files, folders searched recursively, or glob patterns) is routed by itself to a
learned product, scored and decided OK/NG against that product's calibrated threshold. Writes
into ``--out``:

- ``predictions.csv`` and ``predictions.jsonl``: one row per readable image with ``path``,
  ``product``, ``score``, ``threshold``, ``decision``, ``overlay`` (relative path),
  ``model_version``, ``bank_version``;
- ``overlays/NNNNN_<name>.png``: the image with its heat map and the defect contour;
- ``skipped.csv`` (``path``, ``error``) when files could not be read; they are also reported
  on stderr and never stop the run.

NG is a result, not an error: the exit code is 0 whenever the model could be loaded and at
least one input path matched.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.atomic import atomic_write_bytes, atomic_write_text
from components.config import Config
from components.decision import Detector, Verdict, decode_image
from components.errors import ContadError, DataError
from components.eval.figures import heatmap_overlay_png
from components.progress import progress_bar

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
PREDICTION_COLUMNS = ["path", "product", "score", "threshold", "decision", "overlay", "model_version", "bank_version"]
PREDICTIONS_CSV = "predictions.csv"
PREDICTIONS_JSONL = "predictions.jsonl"
SKIPPED_CSV = "skipped.csv"
OVERLAYS_DIR = "overlays"


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Image files named by ``patterns``: files as given, folders searched recursively for image
    suffixes, anything else as a (recursive ``**``) glob. Order kept, duplicates dropped."""
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matches:
            log.warning("no files match %s", pattern)
        found += matches
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise ContadError(f"no input files found in {' '.join(patterns)}")
    return unique


def _batches(paths: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


def _read(path: Path, max_pixels: int) -> Any:
    try:
        return decode_image(path.read_bytes(), max_pixels, source=str(path))
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from exc


def predict_files(detector: Detector, paths: list[Path], out: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Decide every image in ``paths``; write overlays under ``out``; returns (rows, skipped)."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    size = detector.config.serve.heatmap_size
    bar = progress_bar(total=len(paths), desc="predict", unit="img")
    for chunk in _batches(paths, detector.config.eval.batch_size):
        readable, images = [], []
        for path in chunk:
            try:
                images.append(_read(path, detector.config.serve.max_pixels))
                readable.append(path)
            except DataError as exc:
                skipped.append({"path": str(path), "error": str(exc)})
                print(f"contad: skipped {path}: {exc}", file=sys.stderr)
        for path, rgb, verdict in zip(readable, images, detector.decide(images)):
            overlay = f"{OVERLAYS_DIR}/{len(rows):05d}_{path.stem}.png"
            atomic_write_bytes(out / overlay, heatmap_overlay_png(rgb, verdict.anomaly_map, verdict.pixel_threshold, size=size))
            rows.append(_row(path, verdict, overlay, detector))
        bar.update(len(chunk))
    bar.close()
    return rows, skipped


def _row(path: Path, verdict: Verdict, overlay: str, detector: Detector) -> dict[str, Any]:
    return {"path": str(path), **verdict.to_dict(), "overlay": overlay,
            "model_version": detector.model_version, "bank_version": detector.bank_version}


def write_predictions(out: Path, rows: list[dict[str, Any]], skipped: list[dict[str, str]]) -> None:
    """``predictions.csv`` + ``predictions.jsonl`` (+ ``skipped.csv``), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PREDICTION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    atomic_write_text(out / PREDICTIONS_CSV, buffer.getvalue())
    atomic_write_text(out / PREDICTIONS_JSONL, "".join(json.dumps(row) + "\n" for row in rows))
    if skipped:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["path", "error"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(skipped)
        atomic_write_text(out / SKIPPED_CSV, buffer.getvalue())


def predict_command(cfg: Config, inputs: list[str], out: Path, model: str | None = None, bank: str | None = None) -> int:
    """``contad predict``: decisions, tables and overlays for every input image; 0 even when parts are NG."""
    from flows.deployed import make_source

    paths = expand_inputs(inputs)
    source = make_source(cfg, model, bank)
    version = source.current()
    log.info("loading %s (model version %s, bank %s)", source.description, version.model_version, (version.bank_version or "-")[:12])
    detector = source.load(version)
    out = Path(out)
    rows, skipped = predict_files(detector, paths, out)
    write_predictions(out, rows, skipped)
    counts = Counter(row["decision"] for row in rows)
    print(f"{len(rows)} image(s) decided: {counts.get('OK', 0)} OK, {counts.get('NG', 0)} NG; {len(skipped)} skipped (unreadable)")
    print(f"predictions: {out / PREDICTIONS_CSV} and {out / PREDICTIONS_JSONL}; overlays: {out / OVERLAYS_DIR}/")
    return 0
