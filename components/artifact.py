"""What a saved detector carries besides its state: the configuration it was trained and calibrated with.

A method directory (a step's ``method/``, a bank version, a registered model's ``method`` artifact)
holds the method state (``model.safetensors`` + ``model.json``), its ``calibration.json`` and
``detector.json``: the run's *resolved* configuration (``data.tile: auto`` already decided, image size,
backbone, normalisation and method switches) and the versions of the code that produced it. Every
path that deploys a detector rebuilds it from this file, never from the command line's params file:
``deployed_config`` keeps the artifact's configuration and takes only deploy-time settings
(``DEPLOY_TIME``: thresholds' target, serving, tracking, stores, streaming, compute) from the
requested one. An explicit ``key=value`` override of any other key that differs from the artifact is
refused with a one-line error naming the key.
"""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from components.atomic import atomic_write_json
from components.config import Config, config_to_dict
from components.errors import ContadError

DETECTOR_FILE = "detector.json"
# Sections / dotted keys a deployment may set for itself: they never change a score.
DEPLOY_TIME: tuple[str, ...] = ("decision.target_fpr", "serve", "tracking", "banks", "stream", "drift", "compute", "promotion", "demo", "feedback",
                                "eval.batch_size", "eval.overlays_per_task", "data.root", "data.products", "data.num_workers",
                                "data.synth", "masks.cache_dir", "masks.workers", "masks.device", "backbone.device", "text.prompts")
VERSIONED_PACKAGES = ("contad", "torch", "torchvision", "timm", "faiss-cpu", "numpy")


def code_versions() -> dict[str, str]:
    """Versions of Python and of the packages whose code shapes a score."""
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def inference_config(cfg: Config) -> dict[str, Any]:
    """``cfg`` as a dict with every ``DEPLOY_TIME`` key at its default: what decides a score, and nothing about
    where a run lived (so the same state trained in two places has the same content hash)."""
    return _with_deploy_time(config_to_dict(cfg), config_to_dict(Config()))


def write_detector_config(method_dir: Path, cfg: Config) -> Path:
    """Write ``method_dir/detector.json`` (the inference configuration + code versions) atomically."""
    path = Path(method_dir) / DETECTOR_FILE
    atomic_write_json(path, {"config": inference_config(cfg), "versions": code_versions()})
    return path


def read_detector_config(method_dir: Path) -> Config | None:
    """The configuration stored with a method state (None for a state saved before it was stored)."""
    path = Path(method_dir) / DETECTOR_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ContadError(f"{path}: unreadable detector configuration ({exc})") from exc
    if not isinstance(doc, dict):
        raise ContadError(f"{path}: unreadable detector configuration (config is not a mapping)")
    unknown = _unknown_keys(doc, Config)
    scoring = [key for key in unknown if not _deploy_time(key)]
    if scoring:
        raise ContadError(f"{path}: configuration key(s) {', '.join(scoring)} of this detector are unknown to the installed contad "
                          f"{code_versions().get('contad')}; they may change its scores, so it is not loaded (use the contad version that saved it)")
    for key in unknown:  # a deploy-time key renamed or removed since: it never changed a score, so it is dropped
        _drop(doc, key)
    try:
        return Config.model_validate(doc)
    except ValueError as exc:
        raise ContadError(f"{path}: unreadable detector configuration ({' '.join(str(exc).split())})") from exc


def _unknown_keys(doc: dict[str, Any], model: Any, prefix: str = "") -> list[str]:
    """Dotted keys of ``doc`` that the pydantic ``model`` (a config section) does not have, nested sections included."""
    unknown: list[str] = []
    for key, value in doc.items():
        field = model.model_fields.get(key)
        if field is None:
            unknown.append(prefix + key)
            continue
        sub = field.annotation
        if isinstance(value, dict) and isinstance(sub, type) and hasattr(sub, "model_fields"):
            unknown += _unknown_keys(value, sub, f"{prefix}{key}.")
    return unknown


def _drop(doc: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    node = doc
    for part in parents:
        node = node[part]
    node.pop(last, None)


def version_drift(method_dir: Path) -> list[str]:
    """``"package stored -> installed"`` for every versioned package that differs from the state's ``detector.json``."""
    path = Path(method_dir) / DETECTOR_FILE
    try:
        stored = json.loads(path.read_text()).get("versions") or {}
    except (OSError, ValueError):
        return []
    installed = code_versions()
    return [f"{name} {stored[name]} -> {installed.get(name)}" for name in sorted(stored) if stored[name] != installed.get(name)]


def _deploy_time(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in DEPLOY_TIME)


def _get(doc: dict[str, Any], dotted: str) -> Any:
    node: Any = doc
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(doc: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = doc
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _with_deploy_time(doc: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """``doc`` (a config dict, changed in place) with every ``DEPLOY_TIME`` key taken from ``source``."""
    for key in DEPLOY_TIME:
        _set(doc, key, _get(source, key))
    return doc


def deployed_config(artifact: Config, requested: Config, what: str = "this detector") -> Config:
    """The artifact's configuration with the deploy-time settings of ``requested``.

    Raises ``ContadError`` naming the key when one of ``requested.overrides`` asks for a value of a
    key outside ``DEPLOY_TIME`` that differs from what ``what`` was trained and calibrated with.
    """
    stored, wanted = config_to_dict(artifact), config_to_dict(requested)
    for item in requested.overrides:
        key = item.split("=", 1)[0].strip()
        if _deploy_time(key):
            continue
        if _get(stored, key) != _get(wanted, key):
            raise ContadError(f"{item}: {what} was trained and calibrated with {key}={_get(stored, key)!r}; an override that changes "
                              "inference is refused (drop it, or retrain with it)")
    cfg = Config.model_validate(_with_deploy_time(stored, wanted))
    cfg._overrides = requested.overrides
    return cfg
