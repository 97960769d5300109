"""RGB + depth through the serving paths: the REST request's ``depth`` file and the MLflow model's ``depth`` column
reach ``Detector.decide`` as point clouds (a detector that does not use depth ignores them)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from components.decision import decode_xyz
from components.errors import DataError


def _png(size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 128, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _tiff(xyz: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, xyz)
    return buffer.getvalue()


@dataclass
class RecordingDetector:
    """Stands in for ``Detector``: records what ``decide`` receives."""

    uses_depth: bool
    calls: list[tuple[Any, Any]] = field(default_factory=list)

    def decide(self, rgbs: list[np.ndarray], depths: list[np.ndarray] | None = None) -> list[str]:
        self.calls.append((rgbs, depths))
        return ["verdict"] * len(rgbs)


def test_rest_depth_file_reaches_the_detector_and_is_required_by_a_depth_detector() -> None:
    from flows.api import decode_and_decide

    xyz = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    depth_detector = RecordingDetector(uses_depth=True)
    _, verdict = decode_and_decide(depth_detector, _png(), 10**6, _tiff(xyz))  # type: ignore[arg-type]
    assert verdict == "verdict" and np.array_equal(depth_detector.calls[0][1][0], xyz)
    with pytest.raises(DataError, match="RGB \\+ depth: send multipart/form-data with files 'image' and 'depth'"):
        decode_and_decide(depth_detector, _png(), 10**6, None)  # type: ignore[arg-type]
    plain = RecordingDetector(uses_depth=False)
    decode_and_decide(plain, _png(), 10**6, _tiff(xyz))  # type: ignore[arg-type]
    assert plain.calls[0][1] is None


def test_decode_xyz_refuses_what_is_not_an_organised_point_cloud() -> None:
    with pytest.raises(DataError, match="depth: not an xyz TIFF"):
        decode_xyz(_png(), 10**6)
    with pytest.raises(DataError, match="expected \\(H, W, 3\\)"):
        decode_xyz(_tiff(np.zeros((4, 4), dtype=np.float32)), 10**6)
    with pytest.raises(DataError, match="serve.max_pixels"):
        decode_xyz(_tiff(np.zeros((8, 8, 3), dtype=np.float32)), 10)


def test_mlflow_model_reads_the_depth_column(tmp_path: Any) -> None:
    from flows.detector_model import ContadDetector

    xyz = np.ones((16, 16, 3), dtype=np.float32)
    path = tmp_path / "000.tiff"
    path.write_bytes(_tiff(xyz))
    model = ContadDetector()
    model.detector = RecordingDetector(uses_depth=True)  # type: ignore[assignment]
    model.detector.config = type("C", (), {"serve": type("S", (), {"max_pixels": 10**6})()})()  # type: ignore[attr-defined]
    frame = pd.DataFrame({"image": [_png(), _png()], "depth": [_tiff(xyz), None], "depth_path": [None, str(path)]})
    depths = model._depths(frame)
    assert depths is not None and len(depths) == 2 and all(np.array_equal(d, xyz) for d in depths)
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="needs a 'depth'"):
        model._depths(pd.DataFrame({"image": [_png()]}))
