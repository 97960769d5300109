"""``contad predict PATH... --model models:/NAME@ALIAS | --bank DIR[@VERSION] --out DIR``.

Every image (files, folders searched recursively, or glob patterns) is routed by itself to a
learned product, scored and decided OK/NG against that product's calibrated threshold. Writes
into ``--out``:

- ``predictions.csv`` and ``predictions.jsonl``: one row per readable image with ``path``,
  ``product``, ``score``, ``threshold``, ``decision``, ``overlay`` (relative path),
  ``model_version``, ``bank_version`` (``predictions.jsonl`` also ``prediction_id``: the SHA-256 of the image
  bytes, which ``contad feedback`` accepts);
- ``overlays/NNNNN_<name>.png``: the image with its heat map and the defect contour;
- ``skipped.csv`` (``path``, ``reason``, ``error``) when files could not be decided: ``reason`` is
  ``unreadable`` (not an image, truncated, corrupt) or ``too large`` (more pixels than
  ``serve.max_pixels``); they are also reported on stderr and never stop the run;
- ``summary.json``: per routed product the decisions, the threshold and what it promises (false-reject
  rate controlled to ``promised_fpr``, ``escape_estimate`` from synthetic defects) and, where the folder
  layout labels the images (MVTec ``test/good`` vs ``test/<defect>``), the measured false-reject rate,
  escape rate and image AUROC by product folder.

An RGB + depth detector (``uses_depth``) reads each ``.../rgb/NAME.png`` with its point cloud
``.../xyz/NAME.tiff`` (the MVTec 3D-AD layout); files in the ``xyz/`` and ``gt/`` folders next to an
``rgb/`` folder are not images to decide.

NG is a result, not an error: the exit code is 0 whenever the model could be loaded and at
least one image was decided; 2 (input error) when every input was skipped.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from components.atomic import atomic_write_bytes, atomic_write_text
from components.config import Config
from components.decision import Detector, ImageTooLarge, Verdict, decode_image
from components.errors import ContadError, DataError
from components.memory.feedback import image_id
from components.eval.chance import counts_band, inside
from components.eval.figures import heatmap_overlay_png
from components.progress import progress_bar

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
PREDICTION_COLUMNS = ["path", "product", "score", "threshold", "decision", "overlay", "model_version", "bank_version"]
PREDICTIONS_CSV = "predictions.csv"
PREDICTIONS_JSONL = "predictions.jsonl"
SKIPPED_CSV = "skipped.csv"
SUMMARY_JSON = "summary.json"
MVTEC3D_NOT_IMAGES = frozenset({"xyz", "gt"})  # sibling folders of rgb/ in the MVTec 3D-AD layout
SKIPPED_COLUMNS = ["path", "reason", "error"]
TOO_LARGE, UNREADABLE = "too large", "unreadable"
OVERLAYS_DIR = "overlays"


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Image files named by ``patterns``: files as given, folders searched recursively for image
    suffixes, anything else as a (recursive ``**``) glob. Order kept, duplicates dropped."""
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.exists() and not path.is_file() and not path.is_dir():  # a FIFO, socket or device would block or never end
            log.warning("%s is not a regular file (FIFO, socket or device): skipped", pattern)
            continue
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


# PIL's guard against a compressed chunk (e.g. a PNG zTXt/iCCP) that expands beyond its limit: a decompression bomb too.
PIL_CHUNK_BOMB = "Decompressed data too large"
_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def no_reprs(text: str) -> str:
    """``text`` without Python object reprs (``<_io.BytesIO object at 0x...>``) that libraries put in messages."""
    return _REPR.sub("", text)


def _bomb_kind(exc: DataError) -> str | None:
    """Which PIL decompression-bomb guard ``exc`` comes from: ``pixels`` (image size), ``chunk`` (a compressed chunk
    above PIL's limit), or None."""
    from PIL import Image

    for cause in (exc.__cause__, exc.__context__):
        if isinstance(cause, Image.DecompressionBombError):
            return "pixels"
        if isinstance(cause, ValueError) and str(cause).startswith(PIL_CHUNK_BOMB):
            return "chunk"
    return None


def skip_reason(exc: DataError) -> str:
    """``too large`` for an image above the pixel limit (ours or PIL's decompression-bomb guards), else ``unreadable``."""
    return TOO_LARGE if isinstance(exc, ImageTooLarge) or _bomb_kind(exc) is not None else UNREADABLE


def skip_message(exc: DataError, path: Path | str, max_pixels: int) -> str:
    """The one-line reason ``path`` (a file, or e.g. "request body") was not decided, in contad's terms: PIL's
    decompression-bomb errors become the pixel limit (``serve.max_pixels``) or "decompression bomb"."""
    bomb = None if isinstance(exc, ImageTooLarge) else _bomb_kind(exc)
    if bomb == "pixels":
        pixels = re.search(r"Image size \((\d+) pixels\)", str(exc))
        size = f"{int(pixels[1])} pixels" if pixels else "the image"
        return f"{path}: {size} exceeds the limit of {max_pixels} (serve.max_pixels)"
    if bomb == "chunk":
        return f"{path}: decompression bomb: a compressed chunk expands beyond the decoder's limit"
    return no_reprs(str(exc))


def skipped_summary(skipped: list[dict[str, str]]) -> str:
    """``"3 skipped (2 unreadable, 1 too large)"`` (``"0 skipped"`` when none)."""
    counts = Counter(row["reason"] for row in skipped)
    detail = ", ".join(f"{counts[reason]} {reason}" for reason in (UNREADABLE, TOO_LARGE) if counts[reason])
    return f"{len(skipped)} skipped" + (f" ({detail})" if detail else "")


def xyz_path(path: Path) -> Path | None:
    """The point cloud of an MVTec 3D-AD ``.../rgb/NAME.png``: ``.../xyz/NAME.tiff`` (None when absent)."""
    if path.parent.name != "rgb":
        return None
    for suffix in (".tiff", ".tif"):
        candidate = path.parent.parent / "xyz" / f"{path.stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _read_depth(path: Path) -> Any:
    from components.data.loading import read_xyz

    depth = xyz_path(path)
    if depth is None:
        raise DataError(f"{path}: no point cloud ../xyz/{path.stem}.tiff next to this rgb image (the detector scores RGB + depth)")
    return read_xyz(str(depth))


def predict_files(detector: Detector, paths: list[Path], out: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Decide every image in ``paths``; write overlays under ``out``; returns (rows, skipped)."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    size = detector.config.serve.heatmap_size
    if detector.uses_depth:  # MVTec 3D-AD: point clouds and ground-truth masks next to rgb/ are not images to decide
        paths = [p for p in paths if not (p.parent.name in MVTEC3D_NOT_IMAGES and (p.parent.parent / "rgb").is_dir())]
    bar = progress_bar(total=len(paths), desc="predict", unit="img")
    for chunk in _batches(paths, detector.config.eval.batch_size):
        readable, images, depths = [], [], []
        for path in chunk:
            try:
                rgb = _read(path, detector.config.serve.max_pixels)
                if detector.uses_depth:
                    depths.append(_read_depth(path))
                images.append(rgb)
                readable.append(path)
            except DataError as exc:
                reason = skip_reason(exc)
                message = skip_message(exc, path, detector.config.serve.max_pixels)
                skipped.append({"path": str(path), "reason": reason, "error": message})
                print(f"contad: skipped {path} ({reason}): {message}", file=sys.stderr)
        for path, rgb, verdict in zip(readable, images, detector.decide(images, depths if detector.uses_depth else None)):
            overlay = f"{OVERLAYS_DIR}/{len(rows):05d}_{path.stem}.png"
            atomic_write_bytes(out / overlay, heatmap_overlay_png(rgb, verdict.anomaly_map, verdict.pixel_threshold, size=size,
                                                                  decision=(verdict.decision, verdict.score, verdict.threshold, verdict.product)))
            rows.append(_row(path, verdict, overlay, detector))
        bar.update(len(chunk))
    bar.close()
    return rows, skipped


def _row(path: Path, verdict: Verdict, overlay: str, detector: Detector) -> dict[str, Any]:
    return {"path": str(path), **verdict.to_dict(), "overlay": overlay,
            "model_version": detector.model_version, "bank_version": detector.bank_version,
            "prediction_id": image_id(path.read_bytes())}  # jsonl only: what `contad feedback --predictions` names an image by


def write_predictions(out: Path, rows: list[dict[str, Any]], skipped: list[dict[str, str]]) -> None:
    """``predictions.csv`` + ``predictions.jsonl`` (+ ``skipped.csv``), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PREDICTION_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    atomic_write_text(out / PREDICTIONS_CSV, buffer.getvalue())
    atomic_write_text(out / PREDICTIONS_JSONL, "".join(json.dumps(row) + "\n" for row in rows))
    if skipped:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=SKIPPED_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(skipped)
        atomic_write_text(out / SKIPPED_CSV, buffer.getvalue())


def predict_command(cfg: Config, inputs: list[str], out: Path, model: str | None = None, bank: str | None = None) -> int:
    """``contad predict``: decisions, tables and overlays for every input image; 0 even when parts are NG."""
    from flows.deployed import make_source

    if Path(out).exists() and not Path(out).is_dir():
        raise ContadError(f"predict --out {out}: an existing file, not a folder; give a new or existing folder")
    paths = expand_inputs(inputs)
    source = make_source(cfg, model, bank)
    version = source.current()
    log.info("loading %s (model version %s, bank %s)", source.description, version.model_version, (version.bank_version or "-")[:12])
    detector = source.load(version)
    out = Path(out)
    rows, skipped = predict_files(detector, paths, out)
    write_predictions(out, rows, skipped)
    summary = decision_summary(detector, rows)
    atomic_write_text(out / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
    counts = Counter(row["decision"] for row in rows)
    print(f"{len(rows)} image(s) decided: {counts.get('OK', 0)} OK, {counts.get('NG', 0)} NG; {skipped_summary(skipped)}")
    if rows:
        print(summary_text(summary))
    print(f"predictions: {out / PREDICTIONS_CSV} and {out / PREDICTIONS_JSONL}; summary: {out / SUMMARY_JSON}; overlays: {out / OVERLAYS_DIR}/")
    if not rows:  # nothing decided is an input error, not a result
        raise ContadError(f"no image could be decided: {skipped_summary(skipped)} of {len(paths)} input file(s); see {out / SKIPPED_CSV}")
    return 0


def folder_label(path: str) -> int | None:
    """0 / 1 when an MVTec-layout path says good / defective (``test/good/...``, ``test/<defect>/[rgb/]...``), else None."""
    parts = Path(path).parts
    if "test" not in parts:
        return None
    below = parts[len(parts) - parts[::-1].index("test") :]
    return None if len(below) < 2 else int(below[0] != "good")


def _folder_product(path: str) -> str:
    """The product folder of an MVTec-layout test image (the folder above ``test``)."""
    parts = Path(path).parts
    index = len(parts) - 1 - parts[::-1].index("test")
    return parts[index - 1] if index > 0 else ""


def _number(value: float) -> float | None:
    return None if value != value else float(value)


def decision_summary(detector: Detector, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per routed product: decisions, threshold and its promises; per product folder: the measured rates
    and image AUROC where the folder layout labels the images."""
    from components.eval.metrics import auroc

    routed: dict[str, Any] = {}
    for product in sorted({row["product"] for row in rows}):
        mine = [row for row in rows if row["product"] == product]
        threshold = detector.calibration.for_task(product)
        routed[product] = {"images": len(mine), "OK": sum(r["decision"] == "OK" for r in mine), "NG": sum(r["decision"] == "NG" for r in mine),
                           "threshold": threshold.image, "calibration_normals": threshold.n_images,
                           "promised_fpr": _number(threshold.promised_fpr), "escape_estimate": _number(threshold.escape_estimate)}
    labelled = [(row, folder_label(row["path"])) for row in rows]
    labelled = [(row, label) for row, label in labelled if label is not None]
    measured: dict[str, Any] = {}
    for folder in sorted({_folder_product(row["path"]) for row, _ in labelled}):
        mine = [(row, label) for row, label in labelled if _folder_product(row["path"]) == folder]
        good = [row for row, label in mine if label == 0]
        bad = [row for row, label in mine if label == 1]
        scores = np.array([r["score"] for r in good + bad], dtype=np.float64)
        labels = np.array([0] * len(good) + [1] * len(bad))
        band = counts_band({"good": len(good), "defective": len(bad)})
        measured[folder] = {"images": len(mine), "good": len(good), "defective": len(bad),
                            "false_reject_rate": sum(r["decision"] == "NG" for r in good) / len(good) if good else None,
                            "escape_rate": sum(r["decision"] == "OK" for r in bad) / len(bad) if bad else None,
                            "image_auroc": auroc(labels, scores) if good and bad else None,
                            "chance_band": list(band) if band else None}
    promises = [line for line in detector.calibration.promises() if line.split(":")[0].removeprefix("task ") in routed]
    return {"target_fpr": detector.calibration.target_fpr, "routed": routed, "measured": measured, "promises": promises}


def summary_text(summary: dict[str, Any]) -> str:
    """The summary as terminal lines: per routed product, then the measured rates per product folder."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = [f"decisions at decision.target_fpr={summary['target_fpr']}:"]
    for product, e in summary["routed"].items():
        lines.append(f"  routed to {product}: {e['images']} images, {e['OK']} OK, {e['NG']} NG; threshold {e['threshold']:.4g} from "
                     f"{e['calibration_normals']} normals: false-reject rate controlled to {pct(e['promised_fpr'])}, "
                     f"escape estimate (synthetic defects) {pct(e['escape_estimate'])}")
    for folder, e in summary["measured"].items():
        auroc = "-" if e["image_auroc"] is None else f"{e['image_auroc']:.4f}"
        band = e.get("chance_band")
        luck = (f" (inside the chance band {band[0]:.2f}-{band[1]:.2f} of {e['good']} good / {e['defective']} defective images: "
                "no evidence of detection)" if inside(e["image_auroc"], band) else "")
        lines.append(f"  measured on {folder} (labels from the folders): false-reject rate {pct(e['false_reject_rate'])}, "
                     f"escape rate {pct(e['escape_rate'])}, image AUROC {auroc}{luck}")
    lines += [f"  note: {line}" for line in summary["promises"]]
    return "\n".join(lines)
