"""A trained memory-bank detector as ONNX graphs plus data files: a model that leaves Python.

What goes where (``export_onnx``):
- **ONNX** (run by any ONNX runtime): the frozen feature extractor of every task (UCAD: one graph
  per task prompt; the PatchCore family: one shared graph), UCAD's routing-key extractor, and the
  map maker (patch-score grid -> bilinear upsampling -> Gaussian smoothing at input resolution; a task
  with its own feature settings, ``ucad.feature_choices`` / ``patchcore.feature_choices`` (oracle), has its
  own feature graph, grid and map graph).
- **Data files** (NumPy ``.npy`` + ``detector.onnx.json``): the task keys used for routing, every
  task's memory rows (nearest-neighbour search runs on them), score scales, and each task's
  calibration sample with the thresholds at the deployed ``decision.target_fpr``. Thresholds stay
  changeable: the runner re-derives them from the stored samples at any target rate.
- ``run_onnx.py``: the reference runner (``components/export/runner.py``, onnxruntime + NumPy +
  Pillow only), copied next to the files so the folder is self-contained.

Supported: ``ucad`` and the PatchCore family (``patchcore_finetune``, ``patchcore_replay``,
``patchcore_joint``, ``patchcore_oracle``; the oracle needs the product of every image, as in
Python). Graphs take one image of the detector's fixed input size; the runner loops over images.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.atomic import atomic_directory
from components.backbones.base import PromptedBackbone, TaskPrompt
from components.backbones.tiled import TiledBackbone
from components.config import Config
from components.data.loading import IMAGENET_MEAN, IMAGENET_STD
from components.errors import ContadError
from components.eval.thresholds import Calibration
from components.methods.base import ContinualMethod
from components.methods.scoring import anomaly_maps

FORMAT = "contad-onnx/1"
MANIFEST = "detector.onnx.json"
OPSET = 17
EXPORTABLE = ("ucad", "patchcore_finetune", "patchcore_replay", "patchcore_joint", "patchcore_oracle")


def resize_matrix(size: int, target: int) -> torch.Tensor:
    """(target, size) matrix ``R`` with ``R @ v`` = ``v`` resized like ``F.interpolate(bilinear, antialias)``.

    The anti-aliased resize is separable and linear, so two matrix products reproduce it exactly
    (ONNX's Resize has no anti-aliased bilinear mode the exporter can emit).
    """
    # unit impulses down the rows; a few identical columns (torch's anti-aliased kernel is not separable-exact
    # on a width-1 input), resized in height only
    basis = torch.eye(size)[:, None, :, None].expand(size, 1, size, 8).contiguous()
    columns = F.interpolate(basis, size=(target, 8), mode="bilinear", align_corners=False, antialias=True)
    return columns[:, 0, :, 0].T.contiguous()


class KeyFeatures(nn.Module):
    """images (B, 3, S, S) -> un-prompted key features (B, N, C) of ``backbone`` (tiled backbones resize first)."""

    def __init__(self, backbone: PromptedBackbone, image_size: int) -> None:
        super().__init__()
        self.inner = backbone
        resize = None
        if isinstance(backbone, TiledBackbone) and image_size > backbone.tile:
            self.inner = backbone.inner
            resize = resize_matrix(image_size, backbone.tile)
        self.register_buffer("resize", resize)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.resize is not None:
            images = torch.matmul(torch.matmul(self.resize, images), self.resize.T)
        return self.inner.key_features(images)


class PatchFeatures(nn.Module):
    """images (B, 3, S, S) -> patch features (B, N, C), prompted by ``prompt`` when given."""

    def __init__(self, backbone: PromptedBackbone, prompt: TaskPrompt | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.prompt = prompt

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(images, self.prompt)


class MapMaker(nn.Module):
    """patch scores (B, h*w) -> anomaly maps (B, S, S), exactly ``components.methods.scoring.anomaly_maps``."""

    def __init__(self, grid: tuple[int, int], image_size: int, sigma: float) -> None:
        super().__init__()
        self.grid, self.image_size, self.sigma = grid, image_size, sigma

    def forward(self, patch_scores: torch.Tensor) -> torch.Tensor:
        return anomaly_maps(patch_scores, self.grid, (self.image_size, self.image_size), self.sigma)


def _export_graph(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str) -> None:
    """Trace ``module`` on ``example`` into the ONNX file ``path`` (batch 1, fixed shapes)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
        torch.onnx.export(module.eval(), (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[input_name], output_names=[output_name])


def _save(array: torch.Tensor | np.ndarray, path: Path) -> str:
    np.save(path, np.ascontiguousarray(np.asarray(array.detach().cpu() if isinstance(array, torch.Tensor) else array)))
    return path.name


def _task_scales(method: ContinualMethod) -> list[float]:
    scale = getattr(method, "score_scale", None)
    return [float(scale(t)) if scale is not None else 1.0 for t in range(len(method.tasks))]


def _memories(method: ContinualMethod, out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(routing section, per-task sections) of the manifest, writing keys/memories/graphs under ``out``."""
    backbone, size = method.backbone, method.config.data.image_size
    example = torch.zeros(1, 3, size, size)
    if method.name == "ucad":
        _export_graph(KeyFeatures(backbone, size), example, out / "keys.onnx", "images", "key_features")
        segment = np.concatenate([np.full(len(k), t, dtype=np.int64) for t, k in enumerate(method.keys)])
        routing = {"kind": "keys", "graph": "keys.onnx", "keys": _save(torch.cat(method.keys).float(), out / "keys.npy"),
                   "segment": _save(segment, out / "key_segment.npy")}
        tasks = []
        for t, name in enumerate(method.tasks):
            _export_graph(PatchFeatures(method.task_backbone(t), method.prompts[t]), example, out / f"features_{t}.onnx", "images", "features")
            task = {"name": name, "graph": f"features_{t}.onnx", "memory": _save(method.knowledge[t].float(), out / f"memory_{t}.npy")}
            tasks.append({**task, **_own_grid(method, t, out)})
        return routing, tasks
    _export_graph(PatchFeatures(backbone, None), example, out / "features.onnx", "images", "features")
    if method.name == "patchcore_oracle":
        tasks = []
        for t, (name, bank) in enumerate(zip(method.tasks, method.banks)):
            task = {"name": name, "graph": "features.onnx", "memory": _save(bank.features, out / f"memory_{t}.npy")}
            if method.task_backbone(t) is not backbone:  # its own feature settings: its own feature graph
                _export_graph(PatchFeatures(method.task_backbone(t), None), example, out / f"features_{t}.onnx", "images", "features")
                task["graph"] = f"features_{t}.onnx"
            tasks.append({**task, **_own_grid(method, t, out)})
        return {"kind": "product_label"}, tasks
    bank = method.bank  # one bank over every task; an image goes to the task most of its nearest rows came from
    _save(bank.features, out / "memory.npy")
    routing = {"kind": "bank_owner", "origin": _save(bank.origin.numpy().astype(np.int64), out / "memory_origin.npy")}
    return routing, [{"name": name, "graph": "features.onnx", "memory": "memory.npy"} for name in method.tasks]


def _own_grid(method: ContinualMethod, t: int, out: Path) -> dict[str, Any]:
    """Manifest fields of task ``t``'s own patch grid and map graph when its feature settings are not the backbone's
    (``ucad.feature_choices`` / ``patchcore.feature_choices``: another stride); empty otherwise."""
    task_backbone, size = method.task_backbone(t), method.config.data.image_size
    if task_backbone is method.backbone:
        return {}
    grid = task_backbone.grid_size(size)
    _export_graph(MapMaker(grid, size, method.config.eval.smoothing_sigma), torch.zeros(1, grid[0] * grid[1]), out / f"maps_{t}.onnx",
                  "patch_scores", "anomaly_maps")
    return {"grid": list(grid), "maps": f"maps_{t}.onnx"}


def _scoring(method: ContinualMethod, config: Config) -> dict[str, Any]:
    if method.name == "ucad":
        return {"num_neighbors": 1, "reweight": bool(config.ucad.reweight)}
    return {"num_neighbors": int(config.patchcore.num_neighbors), "reweight": bool(config.patchcore.reweight)}


def _thresholds(calibration: Calibration, tasks: list[str]) -> dict[str, Any]:
    """Per task: the normal score sample, the pixel threshold and the image threshold at the target rate."""
    doc: dict[str, Any] = {"target_fpr": calibration.target_fpr, "pixel_fpr": calibration.pixel_fpr, "tasks": {}}
    for task in tasks:
        sample, threshold = calibration.samples[task], calibration.for_task(task)
        doc["tasks"][task] = {"image": threshold.image, "pixel": threshold.pixel, "normal_scores": sample.normal.tolist()}
    return doc


def export_onnx(method: ContinualMethod, calibration: Calibration, config: Config, out: Path,
                provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``method`` (trained, with its ``calibration``) as an ONNX detector folder ``out``; its manifest."""
    if method.name not in EXPORTABLE:
        raise ContadError(f"method {method.name!r} cannot be exported to ONNX yet (exportable: {', '.join(EXPORTABLE)})")
    if not method.tasks:
        raise ContadError("nothing to export: the method has learned no task")
    missing = sorted(set(method.tasks) - set(calibration.samples))
    if missing:
        raise ContadError(f"calibration has no thresholds for learned tasks {missing}")
    size = config.data.image_size
    out = Path(out)
    with atomic_directory(out) as tmp:
        routing, tasks = _memories(method, tmp)
        for task, scale in zip(tasks, _task_scales(method)):
            task["scale"] = scale
        grid = method.backbone.grid_size(size)
        _export_graph(MapMaker(grid, size, config.eval.smoothing_sigma), torch.zeros(1, grid[0] * grid[1]), tmp / "maps.onnx",
                      "patch_scores", "anomaly_maps")
        manifest = {
            "format": FORMAT,
            "method": method.name,
            "image_size": size,
            "normalise": {"mean": IMAGENET_MEAN.flatten().tolist(), "std": IMAGENET_STD.flatten().tolist(), "resize": "PIL bilinear"},
            "grid": list(grid),
            "routing": routing,
            "scoring": _scoring(method, config),
            "maps": "maps.onnx",
            "tasks": tasks,
            "thresholds": _thresholds(calibration, list(method.tasks)),
            "provenance": provenance or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.copyfile(Path(__file__).with_name("runner.py"), tmp / "run_onnx.py")
    return manifest


def export_method_dir(method_dir: Path, config: Config, out: Path, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export the detector saved in ``method_dir`` (state + ``calibration.json`` + ``detector.json``) to ``out``.

    The configuration is the stored one with ``config``'s deploy-time keys (as ``Detector.from_method_dir``):
    ``decision.target_fpr`` sets the thresholds written next to the graphs.
    """
    from components.artifact import deployed_config, read_detector_config
    from components.eval.thresholds import read_calibration
    from components.methods.loading import load_method

    method_dir = Path(method_dir)
    calibration = read_calibration(method_dir)
    if calibration is None:
        raise ContadError(f"{method_dir} holds no calibration.json: only a calibrated detector can be exported")
    stored = read_detector_config(method_dir)
    if stored is not None:
        config = deployed_config(stored, config, str(method_dir))
    method = load_method(config, method_dir)
    return export_onnx(method, calibration.at_target(config.decision.target_fpr), config, out, provenance)
