"""Where a deployed detector comes from: a registered model (``models:/NAME@ALIAS`` or
``models:/NAME/VERSION``) or a memory-bank store (``DIR[@VERSION]``).

``DetectorSource.current()`` names the version the source points at right now (cheap: one
registry or file lookup), ``load(version)`` builds the ``Detector`` of a version. The REST
service polls ``current()`` to hot-reload when the ``champion`` alias or the bank store's
current pointer moves; a bank store's "current" is resolved as readers must
(``resolve_current_for_reader``: the journal's ``before`` while a promotion is pending, no lock).
Registered models are loaded from their artifacts (method state, calibration, config) with the
installed code, not through ``mlflow.pyfunc``, after checking that those files still hash to the
version's bank version (``verify_registered_state``). Either way the
detector's configuration is the one it was trained with (``components.artifact``); the command
line's configuration contributes deploy-time settings only.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components.artifact import read_detector_config
from components.config import Config
from components.decision import Detector, read_config_json
from components.errors import ContadError
from components.memory.store import BankStore, resolve_current_for_reader, verify_registered_state

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")
BANK_VERSION_TAG = "bank_version"


@dataclass(frozen=True)
class DeployedVersion:
    """One concrete deployable version: registry model version and/or bank version."""

    key: str  # what identifies it (changes when the source moves)
    model_version: str | None
    bank_version: str | None


class DetectorSource:
    """Interface: ``current()`` -> the version pointed at now; ``load(version)`` -> its Detector."""

    description: str

    def current(self) -> DeployedVersion:
        raise NotImplementedError

    def load(self, version: DeployedVersion) -> Detector:
        raise NotImplementedError

    def checkout(self, version: DeployedVersion, folder: Path) -> tuple[Path, Config | None]:
        """(method directory of ``version``, written under ``folder``; the training configuration recorded
        beside it, or None): the files ``load`` builds the detector from, checked like ``load`` checks them."""
        raise NotImplementedError


class RegistrySource(DetectorSource):
    """A registered MLflow model, by alias (followed as it moves) or fixed version number."""

    def __init__(self, model_uri: str, config: Config) -> None:
        match = _MODEL_URI.match(model_uri)
        if match is None:
            raise ContadError(f"--model {model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        from mlflow.tracking import MlflowClient

        self.name, self.alias, self.version = match["name"], match["alias"], match["version"]
        self.description = model_uri
        self.config = config
        self.tracking_uri = tracking_uri = config.tracking.uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def current(self) -> DeployedVersion:
        from mlflow.exceptions import MlflowException

        try:
            if self.alias is not None:
                found = self.client.get_model_version_by_alias(self.name, self.alias)
            else:
                found = self.client.get_model_version(self.name, str(self.version))
        except MlflowException as exc:
            raise ContadError(f"{self.description}: no such registered model version ({exc.message.splitlines()[0]})") from exc
        return DeployedVersion(key=f"model:{found.version}", model_version=str(found.version), bank_version=found.tags.get(BANK_VERSION_TAG))

    def checkout(self, version: DeployedVersion, folder: Path) -> tuple[Path, Config | None]:
        artifacts = download_registered(self.client, self.tracking_uri, self.name, str(version.model_version), folder)
        if version.bank_version:
            verify_registered_state(artifacts["method"], version.bank_version, f"{self.description} (model version {version.model_version})")
        return artifacts["method"], read_config_json(artifacts["config"])

    def load(self, version: DeployedVersion) -> Detector:
        with tempfile.TemporaryDirectory(prefix="contad-deployed-") as tmp:
            method_dir, recorded = self.checkout(version, Path(tmp))
            return Detector.from_method_dir(method_dir, self.config, version.model_version, version.bank_version, fallback=recorded)


def download_registered(client: Any, tracking_uri: str, name: str, version: str, dst: Path) -> dict[str, Path]:
    """Download model version ``version`` of ``name`` into ``dst``; ``{artifact name: local path}`` of its files."""
    import mlflow.artifacts

    # Where the version's files are (its logged model's artifact location), not its ``models:/<id>`` source:
    # MLflow resolves ``models:/`` URIs with the process-wide registry, not this source's.
    source = client.get_model_version_download_uri(name, str(version))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri))
    return _pyfunc_artifacts(local)


def _pyfunc_artifacts(model_dir: Path) -> dict[str, Path]:
    """``{artifact name: local path}`` of a downloaded contad pyfunc model (from its MLmodel file)."""
    try:
        mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
        entries = mlmodel["flavors"]["python_function"]["artifacts"]
        paths = {name: model_dir / entry["path"] for name, entry in entries.items()}
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise ContadError(f"{model_dir}: not a contad detector model ({exc!r})") from exc
    if not {"method", "config"} <= set(paths):
        raise ContadError(f"{model_dir}: model lacks the method/config artifacts of a contad detector")
    return paths


class BankSource(DetectorSource):
    """A bank store: a fixed version (``DIR@VERSION``) or its current pointer (``DIR``, followed as it moves)."""

    def __init__(self, spec: str, config: Config) -> None:
        directory, _, version = spec.partition("@")
        self.store = BankStore(Path(directory))
        if not self.store.versions_dir.is_dir():
            raise ContadError(f"--bank {spec!r}: {directory} is not a bank store (no versions/ folder)")
        self.fixed = self.store.resolve(version) if version else None
        self.config = config
        self.description = f"bank store {directory}" + (f"@{self.fixed[:12]}" if self.fixed else " (current)")

    def current(self) -> DeployedVersion:
        version = self.fixed or resolve_current_for_reader(self.store)
        if version is None:
            raise ContadError(f"{self.description}: no current version")
        return DeployedVersion(key=f"bank:{version}", model_version=None, bank_version=version)

    def checkout(self, version: DeployedVersion, folder: Path) -> tuple[Path, Config | None]:
        method_dir = self.store.checkout(str(version.bank_version), Path(folder) / "method")
        if read_detector_config(method_dir) is None:  # a version stored before its configuration was
            manifest = self.store.show(str(version.bank_version))
            if manifest.get("method") not in (None, self.config.method):
                raise ContadError(f"bank version {str(version.bank_version)[:12]} holds a {manifest['method']!r} model but method={self.config.method!r}; "
                                  "pass the configuration of the run that produced it (--params / method=...)")
        return method_dir, None

    def load(self, version: DeployedVersion) -> Detector:
        with tempfile.TemporaryDirectory(prefix="contad-bank-") as tmp:
            method_dir, _ = self.checkout(version, Path(tmp))
            return Detector.from_method_dir(method_dir, self.config, None, version.bank_version)


def make_source(config: Config, model: str | None, bank: str | None) -> DetectorSource:
    """The source named by ``--model`` or ``--bank`` (exactly one)."""
    if (model is None) == (bank is None):
        raise ContadError("give exactly one of --model models:/NAME@ALIAS and --bank DIR[@VERSION]")
    if model is not None:
        return RegistrySource(model, config)
    return BankSource(str(bank), config)
