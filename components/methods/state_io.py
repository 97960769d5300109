"""Save and load a continual method's whole state: ``model.safetensors`` + ``model.json``, atomically."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from components.atomic import atomic_directory
from components.errors import ContadError

if TYPE_CHECKING:
    from components.methods.base import ContinualMethod

log = logging.getLogger(__name__)

TENSORS_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT_VERSION = 1


class MethodStateError(ContadError):
    """A saved method state is missing, unreadable or belongs to another method."""


def save_method_state(method: ContinualMethod, directory: str | Path) -> Path:
    """Write ``method``'s tensors and metadata into ``directory`` in one atomic directory swap."""
    directory = Path(directory)
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in method.state_tensors().items()}
    meta = {"format_version": FORMAT_VERSION, "method": method.name, "tasks": list(method.tasks), "state": method.state_meta()}
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"method": method.name})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log.info("saved %s state (%d tasks, %d tensors) to %s", method.name, len(method.tasks), len(tensors), directory)
    return directory


def read_method_state(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, full metadata) of a saved state; raises ``MethodStateError`` naming the bad file."""
    directory = Path(directory)
    tensors_path, meta_path = directory / TENSORS_FILE, directory / META_FILE
    for path in (tensors_path, meta_path):
        if not path.is_file():
            raise MethodStateError(f"{path}: method state file is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MethodStateError(f"{meta_path}: not a readable method state ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or "state" not in meta:
        raise MethodStateError(f"{meta_path}: unsupported method state format (expected format_version {FORMAT_VERSION})")
    try:
        tensors = load_file(str(tensors_path))
    except (OSError, SafetensorError, ValueError) as exc:
        raise MethodStateError(f"{tensors_path}: not a readable safetensors file ({exc})") from exc
    return tensors, meta


def load_method_state(method: ContinualMethod, directory: str | Path) -> None:
    """Restore ``method`` from ``directory``; the saved method name must match."""
    tensors, meta = read_method_state(directory)
    meta_path = Path(directory) / META_FILE
    if meta.get("method") != method.name:
        raise MethodStateError(f"{meta_path}: state of method {meta.get('method')!r}, cannot load into {method.name!r}")
    try:
        method.load_state(tensors, meta["state"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise MethodStateError(f"{meta_path}: inconsistent method state ({exc})") from exc
    method.tasks = list(meta.get("tasks", []))
    log.info("loaded %s state (%d tasks) from %s", method.name, len(method.tasks), directory)
