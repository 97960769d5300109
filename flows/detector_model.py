"""The registered contad detector: an MLflow pyfunc, logged "from code" (this file).

MLflow copies this file into every logged model and executes it on load. It imports nothing
from ``flows``: the model carries the ``components`` package in its ``code/`` folder (MLflow
puts it on ``sys.path``), so ``mlflow models serve -m models:/contad-detector@champion
--env-manager local`` works wherever the runtime requirements are installed, with or without
this source tree.

Signature. Input: a DataFrame with a binary ``image`` column (encoded PNG/JPEG/BMP/TIFF bytes;
base64 in MLflow's JSON) or a string ``image_path`` column; for an RGB + depth detector also a binary
``depth`` (xyz TIFF bytes) or string ``depth_path`` column. Param ``mask`` (bool, default
false). Output: one row per image with ``product`` (routed task), ``score``, ``threshold``
(that task's calibrated image threshold), ``decision`` ("OK"/"NG") and, with ``mask=true``,
``mask``: the 32x32 defect mask as 32 lines of "0"/"1".

Artifacts: ``method`` (state + ``calibration.json``) and ``config`` (the contad config as JSON).
"""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc

METHOD_ARTIFACT = "method"
CONFIG_ARTIFACT = "config"
IMAGE_COLUMN = "image"
IMAGE_PATH_COLUMN = "image_path"
DEPTH_COLUMN = "depth"
DEPTH_PATH_COLUMN = "depth_path"
MASK_PARAM = "mask"
OUTPUT_COLUMNS = ("product", "score", "threshold", "decision")


class ContadDetector(mlflow.pyfunc.PythonModel):
    """Pyfunc detector: image bytes (or paths) in, routed product + score + OK/NG decision out."""

    def load_context(self, context: Any) -> None:
        """Rebuild the detector (backbone, method, calibration) from the model's artifacts."""
        from pathlib import Path

        from components.decision import Detector, read_config_json

        config = read_config_json(Path(context.artifacts[CONFIG_ARTIFACT]))
        self.detector = Detector.from_method_dir(Path(context.artifacts[METHOD_ARTIFACT]), config)

    def _decoded(self, model_input: Any, column: str, path_column: str, what: str, decode: Any) -> list[Any]:
        """``decode(bytes, max_pixels, source)`` of every row's ``column`` bytes or ``path_column`` file; bad input
        raises an MLflow 400 naming the row."""
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from components.errors import ContadError

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        max_pixels = self.detector.config.serve.max_pixels
        decoded = []
        for row, record in enumerate(model_input.to_dict("records")):
            try:
                data = record.get(column)
                if data is not None and not (isinstance(data, float) and data != data):
                    decoded.append(decode(bytes(data), max_pixels, source=f"row {row}"))
                elif record.get(path_column):
                    path = str(record[path_column])
                    with open(path, "rb") as handle:
                        decoded.append(decode(handle.read(), max_pixels, source=path))
                else:
                    raise ContadError(f"row {row}: needs a {column!r} ({what}) or {path_column!r} value")
            except (ContadError, OSError) as exc:
                raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
        return decoded

    def _rgb_images(self, model_input: Any) -> list[Any]:
        """HxWx3 uint8 images of every row."""
        from components.decision import decode_image

        return self._decoded(model_input, IMAGE_COLUMN, IMAGE_PATH_COLUMN, "image bytes", decode_image)

    def _depths(self, model_input: Any) -> list[Any] | None:
        """(H, W, 3) xyz of every row for an RGB + depth detector (None otherwise)."""
        from components.decision import decode_xyz

        if not self.detector.uses_depth:
            return None
        return self._decoded(model_input, DEPTH_COLUMN, DEPTH_PATH_COLUMN, "this detector scores RGB + depth: xyz TIFF bytes", decode_xyz)

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - MLflow would read hints as a schema
        """One row per image: product, score, threshold, decision (+ mask when ``params["mask"]``)."""
        import pandas as pd

        verdicts = self.detector.decide(self._rgb_images(model_input), self._depths(model_input))
        rows = [v.to_dict() for v in verdicts]
        if (params or {}).get(MASK_PARAM):
            for row, verdict in zip(rows, verdicts):
                row[MASK_PARAM] = "\n".join(verdict.compact_mask())
        return pd.DataFrame(rows, columns=[*OUTPUT_COLUMNS, *([MASK_PARAM] if (params or {}).get(MASK_PARAM) else [])])


def detector_signature() -> Any:
    """The model signature: image bytes or path in; product, score, threshold, decision, optional mask out."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN, required=False), ColSpec("string", IMAGE_PATH_COLUMN, required=False),
                       ColSpec("binary", DEPTH_COLUMN, required=False), ColSpec("string", DEPTH_PATH_COLUMN, required=False)]),
        outputs=Schema([ColSpec("string", "product"), ColSpec("double", "score"), ColSpec("double", "threshold"),
                        ColSpec("string", "decision"), ColSpec("string", MASK_PARAM, required=False)]),
        params=ParamSchema([ParamSpec(MASK_PARAM, "boolean", False)]),
    )


mlflow.models.set_model(ContadDetector())
