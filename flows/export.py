"""``contad export``: a deployed detector (registered model, bank store or method directory) as ONNX files.

The detector is the one ``predict`` would run from the same source (its stored configuration, the
command line's deploy-time keys only); ``decision.target_fpr`` sets the thresholds written beside the
graphs. The folder is self-contained: ``python OUT/run_onnx.py OUT IMAGE...`` decides without contad.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from components.config import Config
from components.errors import ContadError
from components.export.onnx_export import MANIFEST, export_method_dir
from flows.deployed import make_source

log = logging.getLogger(__name__)


def _method_dir(config: Config, model: str | None, bank: str | None, method_dir: str | None, tmp: Path) -> tuple[Path, dict[str, str | None]]:
    """(method directory to export, provenance) of the one source named."""
    if method_dir is not None:
        if model is not None or bank is not None:
            raise ContadError("give exactly one of --model, --bank and --method-dir")
        path = Path(method_dir)
        if not path.is_dir():
            raise ContadError(f"--method-dir {method_dir}: not a directory")
        return path, {"method_dir": str(path.resolve())}
    source = make_source(config, model, bank)
    version = source.current()
    provenance = {"source": source.description, "model_version": version.model_version, "bank_version": version.bank_version}
    return source.checkout(version, tmp)[0], provenance  # the files predict / serve-api load, checked as they check them


def export_command(config: Config, out: Path, model: str | None = None, bank: str | None = None, method_dir: str | None = None,
                   fmt: str = "onnx") -> int:
    """Write the detector of the named source as ONNX graphs + data files + reference runner into ``out``."""
    if fmt != "onnx":
        raise ContadError(f"--format {fmt}: only onnx is supported")
    if out.exists() and not (out / MANIFEST).is_file():
        raise ContadError(f"--out {out}: exists and is not an exported detector; choose a new folder")
    with tempfile.TemporaryDirectory(prefix="contad-export-") as tmp:
        folder, provenance = _method_dir(config, model, bank, method_dir, Path(tmp))
        manifest = export_method_dir(folder, config, out, provenance)
    print(f"exported {manifest['method']} ({len(manifest['tasks'])} products: {', '.join(t['name'] for t in manifest['tasks'])}) to {out}")
    print(f"  decide without contad: python {out / 'run_onnx.py'} {out} IMAGE...  (onnxruntime, numpy, pillow)")
    return 0
