"""From images to OK/NG decisions: a learned method plus its calibrated per-task thresholds.

``Detector`` is what ``contad predict``, the REST service, ``contad stream`` and the registered MLflow
model all run: it routes each image by itself (no product label), scores it, and compares the score
with the image threshold of the task it was routed to (``components.eval.thresholds``). It is built
from a method directory alone (``Detector.from_method_dir``): the state, its calibration and the
configuration it was trained with (``components.artifact``), so it scores exactly what the run's
evaluation scored; the command line contributes deploy-time settings only.

``decode_image`` turns untrusted bytes into an RGB array with bounded cost: the format is
sniffed from the content (never from a file name or header), the pixel count is checked from
the image header before decoding, and truncated or corrupt data is a ``DataError``.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile

from components.artifact import deployed_config, read_detector_config, version_drift
from components.config import Config
from components.data.loading import IMAGENET_MEAN, IMAGENET_STD, _to_rgb, xyz_tensor
from components.errors import ContadError, DataError
from components.eval.thresholds import NG, Calibration, read_calibration
from components.methods.base import ContinualMethod

log = logging.getLogger(__name__)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated image is an error, never silently padded

# Magic numbers of the accepted formats: the content decides, not the file name or Content-Type.
IMAGE_SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
}
MASK_SIZE = 32  # side of the compact defect mask returned on request


class ImageTooLarge(DataError):
    """The image has more pixels than allowed (``serve.max_pixels``)."""


def sniff_format(data: bytes) -> str | None:
    """The image format named by the first bytes of ``data`` (PNG, JPEG, BMP, TIFF), else None."""
    for name, signatures in IMAGE_SIGNATURES.items():
        if any(data.startswith(s) for s in signatures):
            return name
    return None


def decode_image(data: bytes, max_pixels: int, source: str = "image") -> np.ndarray:
    """HxWx3 uint8 RGB from encoded bytes; ``DataError`` naming ``source`` for anything else."""
    kind = sniff_format(data)
    if kind is None:
        raise DataError(f"{source}: not a supported image (PNG, JPEG, BMP or TIFF content expected, got bytes {data[:8]!r})")
    try:
        with Image.open(io.BytesIO(data), formats=[kind]) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"{source}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} (serve.max_pixels)")
            img.load()
            rgb = _to_rgb(img)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure (truncated, corrupt) is bad input
        raise DataError(f"{source}: cannot decode {kind} image ({exc})") from exc
    return np.array(rgb, dtype=np.uint8)


def decode_xyz(data: bytes, max_pixels: int, source: str = "depth") -> np.ndarray:
    """(H, W, 3) float32 organised point cloud from TIFF bytes; ``DataError`` naming ``source`` otherwise."""
    import tifffile

    if sniff_format(data) != "TIFF":
        raise DataError(f"{source}: not an xyz TIFF (got bytes {data[:8]!r})")
    try:
        xyz = np.asarray(tifffile.imread(io.BytesIO(data)), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - any reader failure is bad input
        raise DataError(f"{source}: cannot decode the xyz TIFF ({exc})") from exc
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise DataError(f"{source}: xyz TIFF has shape {xyz.shape}, expected (H, W, 3)")
    if xyz.shape[0] * xyz.shape[1] > max_pixels:
        raise ImageTooLarge(f"{source}: {xyz.shape[1]}x{xyz.shape[0]} points exceed the limit of {max_pixels} (serve.max_pixels)")
    return xyz


def normalise(rgbs: list[np.ndarray], image_size: int) -> torch.Tensor:
    """``(B, 3, S, S)`` ImageNet-normalised model input from HxWx3 uint8 images (bilinear square resize)."""
    out = torch.empty((len(rgbs), 3, image_size, image_size), dtype=torch.float32)
    for i, rgb in enumerate(rgbs):
        resized = Image.fromarray(rgb).resize((image_size, image_size), Image.Resampling.BILINEAR)
        out[i] = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    return (out - IMAGENET_MEAN) / IMAGENET_STD


@dataclass(frozen=True)
class Verdict:
    """The decision on one image. ``product`` is the task the image was routed to."""

    product: str
    score: float
    threshold: float
    pixel_threshold: float
    decision: str  # "OK" | "NG"
    anomaly_map: np.ndarray  # (H, W) float32 at model input resolution

    def to_dict(self) -> dict[str, Any]:
        return {"product": self.product, "score": self.score, "threshold": self.threshold, "decision": self.decision}

    def compact_mask(self, size: int = MASK_SIZE) -> list[str]:
        """The defect mask (map above the pixel threshold) at ``size``x``size`` as rows of "0"/"1"."""
        amap = torch.from_numpy(self.anomaly_map)[None, None]
        small = torch.nn.functional.adaptive_max_pool2d(amap, size)[0, 0].numpy()
        return ["".join("1" if v > self.pixel_threshold else "0" for v in row) for row in small]


class Detector:
    """A learned continual method with its calibration: images in, per-image verdicts out."""

    def __init__(self, method: ContinualMethod, calibration: Calibration, config: Config,
                 model_version: str | None = None, bank_version: str | None = None) -> None:
        if method.uses_task_labels:
            raise ContadError(f"method {config.method!r} needs the product label of every image (an oracle): it cannot make label-free decisions")
        missing = sorted(set(method.tasks) - set(calibration.tasks))
        if missing:
            raise ContadError(f"calibration has no thresholds for learned tasks {missing}")
        self.method = method
        self.calibration = calibration
        self.config = config
        self.model_version = model_version
        self.bank_version = bank_version

    @classmethod
    def from_method_dir(cls, method_dir: Path, config: Config, model_version: str | None = None, bank_version: str | None = None,
                        fallback: Config | None = None) -> Detector:
        """Rebuild backbone + method from a saved method directory holding ``calibration.json``.

        The configuration is the one stored with the state (``detector.json``) with ``config``'s
        deploy-time settings (``components.artifact.deployed_config``): an explicit override of
        anything that changes inference is refused. ``decision.target_fpr`` re-derives the thresholds
        from the stored calibration sample. ``fallback``: the training configuration recorded elsewhere
        (a registered model's ``config`` artifact) for a state saved before ``detector.json`` existed.
        """
        from components.methods.loading import load_method

        method_dir = Path(method_dir)
        calibration = read_calibration(method_dir)
        if calibration is None:
            raise ContadError(f"{method_dir} holds no calibration.json: retrain with this contad version (thresholds are calibrated after training)")
        stored = read_detector_config(method_dir) or fallback
        drift = version_drift(method_dir)
        if drift:
            log.warning("%s was saved with other code versions (%s): scores may differ from its evaluation", method_dir, "; ".join(drift))
        what = f"bank version {bank_version[:12]}" if bank_version else (f"model version {model_version}" if model_version else str(method_dir))
        if stored is not None:
            config = deployed_config(stored, config, what)
        calibration = calibration.at_target(config.decision.target_fpr)
        return cls(load_method(config, method_dir), calibration, config, model_version, bank_version)

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def uses_depth(self) -> bool:
        return self.method.uses_depth

    def decide(self, rgbs: list[np.ndarray], depths: list[np.ndarray] | None = None) -> list[Verdict]:
        """Verdicts for HxWx3 uint8 images (each routed by itself); ``depths``: their (H, W, 3) xyz point
        clouds, required by a method that ``uses_depth`` (nearest-resized like training data)."""
        if not rgbs:
            return []
        depth = None
        if self.method.uses_depth:
            if depths is None or len(depths) != len(rgbs):
                raise ContadError(f"method {self.method.name!r} scores RGB + depth: every image needs its xyz point cloud")
            depth = xyz_tensor(depths, self.image_size)
        with torch.no_grad():
            prediction = self.method.predict(normalise(rgbs, self.image_size), depth=depth)
        return self.verdicts(prediction)

    def verdicts(self, prediction: Any) -> list[Verdict]:
        """One ``Verdict`` per image of a ``Prediction`` at this detector's thresholds."""
        scores = prediction.image_scores.detach().float().cpu().numpy()
        maps = prediction.anomaly_maps.detach().float().cpu().numpy()
        verdicts = []
        for score, amap, task in zip(scores, maps, prediction.routed_tasks):
            threshold = self.calibration.for_task(task)
            verdicts.append(Verdict(task, float(score), threshold.image, threshold.pixel, self.calibration.decide(float(score), task), amap))
        return verdicts

    def describe(self) -> dict[str, Any]:
        """What is deployed: versions, method, tasks and their thresholds."""
        return {
            "model_version": self.model_version,
            "bank_version": self.bank_version,
            "method": self.config.method,
            "image_size": self.image_size,
            "tile": self.config.data.tile,
            "uses_depth": self.method.uses_depth,
            "tasks": list(self.method.tasks),
            "thresholds": {"target_fpr": self.calibration.target_fpr, "pixel_fpr": self.calibration.pixel_fpr,
                           "tasks": {t: vars(v) for t, v in self.calibration.tasks.items()}},
            "promises": self.calibration.promises(),
        }


def read_config_json(path: Path) -> Config:
    """A ``Config`` from a JSON dump (``config_to_dict``), with a clear error naming the file."""
    try:
        return Config.model_validate(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as exc:
        raise ContadError(f"{path}: unreadable contad config ({exc})") from exc


__all__ = ["NG", "Detector", "ImageTooLarge", "Verdict", "decode_image", "decode_xyz", "normalise", "read_config_json", "sniff_format"]
