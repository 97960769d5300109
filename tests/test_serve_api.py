"""``contad serve-api``: a real uvicorn on 127.0.0.1 serving the registered champion of the trained base.

Bad input of every kind gets a 4xx with a clear message (never a 5xx) and the service keeps
serving; the champion alias moved while a client loops switches responses to the new version
without a failed request; schemathesis fuzzing from the OpenAPI schema finds no 5xx.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from mlflow.tracking import MlflowClient
from PIL import Image
from schemathesis.checks import not_a_server_error

from components.config import Config
from components.errors import ContadError
from flows.api import check_bind, create_app
from flows.deployed import RegistrySource
from flows.model_registry import CHAMPION_ALIAS
from tests.api_support import running_server
from tests.tracking_support import TrainedBase, copy_base, trained_base

pytestmark = pytest.mark.integration
TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "contad-detector"
FUZZ_EXAMPLES = 25  # per operation


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> TrainedBase:
    return trained_base(tmp_path_factory)


@pytest.fixture(scope="module")
def served(base: TrainedBase, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Config]:
    """The champion of a private copy of the base registry, served with a token and small input limits."""
    cfg = copy_base(base, tmp_path_factory.mktemp("api") / "work")
    cfg.serve.max_bytes = 300_000
    cfg.serve.max_pixels = 1_000_000
    cfg.serve.reload_poll_s = 0.2
    app = create_app(cfg, RegistrySource(f"models:/{MODEL}@{CHAMPION_ALIAS}", cfg), token=TOKEN)
    with running_server(app) as url:
        yield url, cfg


def _png(path: Path) -> bytes:
    return path.read_bytes()


def test_valid_images_raw_multipart_and_heatmap(served: tuple[str, Config], base: TrainedBase) -> None:
    url, cfg = served
    defect = sorted(p for p in (base.old[0] / "test").rglob("*.png") if "/good/" not in str(p))[0]
    client = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    champion = client.get_model_version_by_alias(MODEL, CHAMPION_ALIAS)
    raw = httpx.post(f"{url}/v1/predict", content=_png(defect), headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert set(body) == {"product", "score", "threshold", "decision", "model_version", "bank_version", "prediction_id", "latency_ms"}
    assert body["prediction_id"] == hashlib.sha256(_png(defect)).hexdigest()  # the id contad predict writes
    assert body["model_version"] == str(champion.version) and body["bank_version"] == champion.tags["bank_version"]
    assert body["product"] in {p.name for p in base.old} and body["decision"] == ("NG" if body["score"] > body["threshold"] else "OK")
    form = httpx.post(f"{url}/v1/predict", files={"image": ("part.png", _png(defect), "image/png")}, headers=AUTH)
    assert form.status_code == 200 and form.json()["score"] == pytest.approx(body["score"])
    heat = httpx.post(f"{url}/v1/predict?heatmap=png", content=_png(defect), headers={**AUTH, "Content-Type": "image/png"})
    assert heat.status_code == 200 and heat.headers["content-type"] == "image/png"
    assert heat.headers["x-contad-decision"] == body["decision"]
    assert heat.headers["x-contad-prediction-id"] == body["prediction_id"]
    with Image.open(io.BytesIO(heat.content)) as overlay:
        assert overlay.size == (cfg.serve.heatmap_size, cfg.serve.heatmap_size)
    info = httpx.get(f"{url}/v1/model", headers=AUTH).json()
    assert info["model_version"] == str(champion.version) and set(info["thresholds"]["tasks"]) == {p.name for p in base.old}
    assert httpx.get(f"{url}/healthz").status_code == 200 and httpx.get(f"{url}/openapi.json").json()["paths"]["/v1/predict"]


def test_bad_input_is_a_clear_4xx_and_the_service_keeps_serving(served: tuple[str, Config], base: TrainedBase) -> None:
    url, _ = served
    good = sorted((base.old[0] / "test" / "good").glob("*.png"))[0]
    png = _png(good)
    octet = {**AUTH, "Content-Type": "application/octet-stream"}
    big = io.BytesIO()
    Image.fromarray(np.zeros((1200, 1200, 3), np.uint8)).save(big, format="PNG")  # small file, too many pixels
    bomb = io.BytesIO()
    Image.new("1", (15000, 15000)).save(bomb, format="PNG")  # ~30 kB, above PIL's own decompression-bomb limit
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(noisy, format="PNG")  # > max_bytes
    cases = [
        ("truncated PNG", dict(content=png[: len(png) // 2], headers=octet), 400, "cannot decode PNG"),
        ("not an image", dict(content=b"GIF89a or plain text", headers=octet), 400, "not a supported image"),
        ("empty body", dict(content=b"", headers=octet), 400, "empty request body"),
        ("too many pixels", dict(content=big.getvalue(), headers=octet), 413, "serve.max_pixels"),
        ("decompression bomb", dict(content=bomb.getvalue(), headers=octet), 413, "225000000 pixels exceeds the limit of 1000000 (serve.max_pixels)"),
        ("too many bytes", dict(content=noisy.getvalue(), headers=octet), 413, "serve.max_bytes"),
        ("wrong content type", dict(content=png, headers={**AUTH, "Content-Type": "application/json"}), 415, "unsupported Content-Type"),
        ("no content type", dict(content=png, headers=AUTH), 415, "unsupported Content-Type"),
        ("multipart without image", dict(files={"file": ("x.png", png, "image/png")}, headers=AUTH), 400, "named 'image'"),
        ("missing token", dict(content=png, headers={"Content-Type": "image/png"}), 401, "bearer token"),
        ("wrong token", dict(content=png, headers={"Content-Type": "image/png", "Authorization": "Bearer nope"}), 401, "bearer token"),
        ("bad heatmap value", dict(content=png, headers=octet, params={"heatmap": "jpg"}), 422, "png"),
    ]
    for name, request, status, message in cases:
        response = httpx.post(f"{url}/v1/predict", **request)
        assert response.status_code == status, (name, response.status_code, response.text)
        assert message in response.json()["detail"] if isinstance(response.json()["detail"], str) else message in response.text, name
    assert httpx.get(f"{url}/v1/model").status_code == 401
    assert httpx.post(f"{url}/v1/predict", content=png, headers=octet).status_code == 200  # still serving


def test_non_loopback_bind_needs_a_token(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    monkeypatch.delenv("CONTAD_API_TOKEN", raising=False)
    assert main(["serve-api", "--bank", "nowhere", "serve.host=0.0.0.0"]) == 2
    assert "refusing to bind 0.0.0.0" in capsys.readouterr().err
    with pytest.raises(ContadError, match="CONTAD_API_TOKEN"):
        check_bind("0.0.0.0", None, "CONTAD_API_TOKEN")
    check_bind("0.0.0.0", "secret", "CONTAD_API_TOKEN")
    check_bind("127.0.0.1", None, "CONTAD_API_TOKEN")
    check_bind("::1", None, "CONTAD_API_TOKEN")


def test_champion_moved_while_a_client_loops(served: tuple[str, Config], base: TrainedBase) -> None:
    url, cfg = served
    client = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    old = client.get_model_version_by_alias(MODEL, CHAMPION_ALIAS)
    from flows.tracking import process_tracking_uri

    with process_tracking_uri(cfg.tracking.uri):  # a models:/<id> source is resolved through the process-wide registry
        new = client.create_model_version(MODEL, source=old.source, run_id=old.run_id, tags={**old.tags, "bank_version": "moved-" + old.tags["bank_version"][:8]})
    old_version, new_version = str(old.version), str(new.version)
    image = _png(sorted((base.old[1] / "test" / "good").glob("*.png"))[0])
    seen: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def loop() -> None:
        with httpx.Client(timeout=60.0) as http:
            while not stop.is_set() and len(seen) < 2000:
                response = http.post(f"{url}/v1/predict", content=image, headers={**AUTH, "Content-Type": "image/png"})
                seen.append((response.status_code, response.json().get("model_version") if response.status_code == 200 else response.text))

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        while len(seen) < 3:
            time.sleep(0.05)
        client.set_registered_model_alias(MODEL, CHAMPION_ALIAS, new_version)
        deadline = time.monotonic() + 120
        while not any(v == new_version for _, v in seen[-3:]) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert [s for s in seen if s[0] != 200] == []  # zero failed requests during the swap
    versions = [v for _, v in seen]
    assert versions[0] == old_version and versions[-1] == new_version
    switched = versions.index(new_version)
    assert set(versions[switched:]) == {new_version}  # once switched, never back
    info = httpx.get(f"{url}/v1/model", headers=AUTH).json()
    assert info["model_version"] == new_version and info["reloads"] >= 1
    client.set_registered_model_alias(MODEL, CHAMPION_ALIAS, old_version)  # leave the module's server as it was


def test_schema_fuzzing_finds_no_server_error(served: tuple[str, Config]) -> None:
    """Schemathesis cases from the live OpenAPI schema, a bounded number per operation, with and without the token.

    (Driven through hypothesis directly: schemathesis' pytest plugin does not run under pytest 9.)
    """
    url, _ = served
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/predict", "/v1/model", "/healthz", "/readyz"}
    calls: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: schemathesis.Case) -> None:
            for headers in (AUTH, {}):
                response = case.call_and_validate(headers=headers, checks=[not_a_server_error], timeout=60)
                calls.append(response.status_code)

        fuzz()
    assert len(calls) >= 2 * len(operations) and max(calls) < 500


@pytest.mark.slow
def test_mlflow_models_serve_returns_decisions_without_the_source_tree(base: TrainedBase, tmp_path: Path) -> None:
    """``mlflow models serve -m models:/contad-detector@champion --env-manager local`` from a directory outside
    this tree (no PYTHONPATH): the model brings its own ``components`` code and answers with decisions."""
    import base64
    import os

    from tests.tracking_support import VENV_BIN, background, free_port, wait_http_ok

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{base.work / 'mlflow.db'}", MLFLOW_DISABLE_TELEMETRY="true",
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")  # the environment's uvicorn, as in an activated venv
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@{CHAMPION_ALIAS}", "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    image = sorted(p for p in (base.old[0] / "test").rglob("*.png") if "/good/" not in str(p))[0]
    payload = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image.read_bytes()).decode()]]}, "params": {"mask": True}}
    log = tmp_path / "serve.log"
    with background(cmd, log, env=env, cwd=tmp_path) as process:
        wait_http_ok(f"http://127.0.0.1:{port}/ping", process, log)
        response = httpx.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=120)
        bad = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"text").decode()]]}}, timeout=120)
    assert response.status_code == 200, response.text + log.read_text()[-2000:]
    (row,) = response.json()["predictions"]
    assert row["product"] in {p.name for p in base.old} and row["decision"] in {"OK", "NG"}
    assert row["decision"] == ("NG" if row["score"] > row["threshold"] else "OK")
    assert len(row["mask"].split("\n")) == 32
    assert bad.status_code == 400 and "not a supported image" in bad.text


def test_inference_slots_and_timeout_are_bounded() -> None:
    import asyncio

    from fastapi import HTTPException

    from flows.api import Limiter

    running: list[int] = []
    peak: list[int] = []

    def work(seconds: float) -> float:
        running.append(1)
        peak.append(len(running))
        time.sleep(seconds)
        running.pop()
        return seconds

    async def scenario() -> list[object]:
        limiter = Limiter(max_concurrent=1, timeout_s=0.3)
        slow = [limiter.run(work, 0.5)]  # longer than the timeout: 503, but keeps its slot until it really ends
        quick = [limiter.run(work, 0.01) for _ in range(2)]  # must wait for the slot: 503 too (timeout while queued)
        results = await asyncio.gather(*slow, *quick, return_exceptions=True)
        await asyncio.sleep(0.4)
        results.append(await Limiter(max_concurrent=2, timeout_s=5).run(work, 0.01))
        return results

    results = asyncio.run(scenario())
    assert all(isinstance(r, HTTPException) and r.status_code == 503 for r in results[:3]), results
    assert "serve.request_timeout_s" in results[0].detail and "busy" in results[1].detail
    assert results[3] == 0.01 and max(peak) == 1
