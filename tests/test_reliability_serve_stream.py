"""Reliability of ``contad stream`` and ``contad serve-api`` against hostile use (issue 36, stream/serve half).

Two streams into one ``--out`` (the second is refused with 75, nothing interleaves), a ``kill -9``'d stream
takes its temporary Prefect server with it, FIFOs and 0-byte files never hang or pass as success, and the REST
service survives aborted and slow uploads quietly, answers image bombs with 413, keeps Python reprs out of its
messages and shows versions on ``/readyz`` only to an authorised client.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

from components.config import Config
from flows.api import create_app, slow_client_guard
from flows.deployed import DeployedVersion, DetectorSource
from tests.api_support import running_server

REPO = Path(__file__).resolve().parents[1]
CONTAD = Path(sys.executable).with_name("contad")
TOKEN = "reliability-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT_S = 240.0  # upper bound for a contad subprocess to start (imports + temporary Prefect server on 2 busy cores)


# ---------------------------------------------------------------------------------- stream: lock + server guard
def _children(pid: int) -> dict[int, str]:
    """{pid: command line} of the live child processes of ``pid``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry.name)] = cmdline
    return found


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def _camera_folder(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


STREAM_ARGS = ["method=lemo", "backbone.pretrained=false", "backbone.device=cpu", "data.image_size=64", "lemo.key_size=16",
               "tracking.enabled=false", "stream.warmup=2", "stream.poll_s=0.2", "stream.checkpoint_every=100"]


@pytest.mark.slow  # two contad subprocesses (torch + Prefect imports, a temporary Prefect server)
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_second_stream_into_one_out_is_refused_and_kill_9_takes_the_prefect_server_along(tmp_path: Path) -> None:
    camera, out = tmp_path / "camera", tmp_path / "out"
    _camera_folder(camera, 3)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}  # a temporary server of its own
    common = ["stream", str(camera), "--product", "red", "--out", str(out), *STREAM_ARGS]
    first = subprocess.Popen([str(CONTAD), *common, "stream.idle_timeout_s=0"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    servers: dict[int, str] = {}
    try:
        assert first.stderr is not None
        deadline = time.monotonic() + WAIT_S
        for line in first.stderr:  # it has learned the folder and waits for more (watching forever)
            if "waiting for new images" in line or time.monotonic() > deadline:
                break
        servers = {pid: cmd for pid, cmd in _children(first.pid).items() if "uvicorn" in cmd}
        assert servers, f"no temporary Prefect server child of contad stream: {_children(first.pid)}"

        second = subprocess.run([str(CONTAD), *common, "stream.idle_timeout_s=2", "banks.lock_timeout_s=0"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=WAIT_S)
        errors = [line for line in second.stderr.splitlines() if line.startswith("contad: error:")]
        assert second.returncode == 75, second.stderr[-3000:]
        assert len(errors) == 1 and f"stream --out {out} is in use by another stream" in errors[0] and "Traceback" not in second.stderr
        lines = (out / "stream.jsonl").read_text().splitlines()
        assert [line.count('"index"') for line in lines] == [1, 1, 1], "only the first stream wrote its log"

        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in servers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in servers), f"temporary Prefect server outlived its kill -9'd stream: {servers}"
    finally:
        for pid in [first.pid, *servers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        first.wait(timeout=60)


# ---------------------------------------------------------------------------------- stream: FIFOs, 0-byte files
def _toy_stream(tmp_path: Path) -> tuple[Config, object]:
    from components.methods.lemo import LeMO
    from tests.methods_support import ToyBackbone, toy_config

    cfg = toy_config("lemo")
    cfg.lemo.key_size = 8
    cfg.stream.warmup = 2
    cfg.stream.poll_s = 0.05
    cfg.stream.idle_timeout_s = 0.5
    return cfg, LeMO(cfg, ToyBackbone())


def _release_if_blocked(fifo: Path, worker: threading.Thread) -> None:
    """Unblock a reader stuck opening ``fifo`` (so a failing test ends instead of hanging)."""
    if worker.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(timeout=60)


def test_stream_skips_a_fifo_with_an_error_line_and_goes_on(tmp_path: Path) -> None:
    from flows.stream import STREAM_LOG, run_stream

    cfg, method = _toy_stream(tmp_path)
    _camera_folder(tmp_path / "img", 2)
    fifo = tmp_path / "img" / "camera.png"
    os.mkfifo(fifo)
    paths = [str(fifo), str(tmp_path / "img" / "000.png"), str(tmp_path / "img" / "001.png")]
    result: dict[str, object] = {}
    worker = threading.Thread(target=lambda: result.update(run_stream(cfg, method, iter(paths), "red", tmp_path / "out")))
    worker.start()
    worker.join(timeout=120)
    hung = worker.is_alive()
    _release_if_blocked(fifo, worker)
    assert not hung, "contad stream blocked on a FIFO given as an image path"
    first, *rest = [line for line in (tmp_path / "out" / STREAM_LOG).read_text().splitlines()]
    assert "not a regular file" in first and str(fifo) in first
    assert result["new_images"] == 3 and result["unreadable"] == 1 and len(rest) == 2


def test_predict_inputs_skip_a_fifo(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from components.errors import ContadError
    from flows.predict import expand_inputs

    fifo = tmp_path / "camera.png"
    os.mkfifo(fifo)
    Image.new("RGB", (8, 8)).save(tmp_path / "part.png")
    assert expand_inputs([str(fifo), str(tmp_path / "part.png")]) == [(tmp_path / "part.png").resolve()]
    assert f"{fifo} is not a regular file" in caplog.text
    with pytest.raises(ContadError, match="no input files found"):
        expand_inputs([str(fifo)])


def test_stream_of_only_empty_files_exits_2_not_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder of 0-byte images decides nothing: exit 2 (as predict), not 0 with "0 decided"."""
    import flows.stream
    from flows.cli import main

    cfg, method = _toy_stream(tmp_path)
    folder = tmp_path / "camera"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"")

    def toy_flow(config: Config, source: str, product: str, out: Path, init: Path | None = None) -> dict:
        """The stream flow with the toy backbone (the real one needs weights), Prefect left out."""
        return flows.stream.run_stream(config, method, flows.stream.open_source(source, config), product, out)

    monkeypatch.setattr(flows.stream, "stream_flow", toy_flow)
    (tmp_path / "params.yaml").write_text("method: lemo\n")
    overrides = ["stream.poll_s=0.05", "stream.idle_timeout_s=0.5"]
    assert main(["stream", str(folder), "--product", "red", "--out", str(tmp_path / "out"), "--params", str(tmp_path / "params.yaml"), *overrides]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("contad: error:")]
    assert len(errors) == 1 and "none of the 3 new image(s) could be read" in errors[0], err


# ---------------------------------------------------------------------------------- serve-api
class _FixedSource(DetectorSource):
    """A source whose one version is a detector that is never asked to decide (every request here fails decoding)."""

    description = "fixed test source"

    def current(self) -> DeployedVersion:
        return DeployedVersion(key="bank:abc", model_version="7", bank_version="abc123")

    def load(self, version: DeployedVersion) -> object:
        return SimpleNamespace(uses_depth=False)


READ_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    cfg = Config()
    cfg.serve.read_timeout_s = READ_TIMEOUT_S
    app = create_app(cfg, _FixedSource(), token=TOKEN)
    with running_server(app, http=slow_client_guard(READ_TIMEOUT_S)) as url:
        yield url


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_logs() -> Iterator[_Records]:
    """Every record of uvicorn's and the service's loggers (uvicorn's do not propagate to the root logger)."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "flows.api")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler
    for logger, level in zip(loggers, levels):
        logger.removeHandler(handler)
        logger.setLevel(level)


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _head(length: int) -> bytes:
    return (f"POST /v1/predict HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n").encode()


def test_aborted_upload_is_one_quiet_log_line(api: str, server_logs: _Records) -> None:
    with _connect(api) as sock:
        sock.sendall(_head(100_000) + b"\x89PNG\r\n\x1a\n" + b"x" * 1000)
        time.sleep(0.2)
    deadline = time.monotonic() + 30
    while not any("disconnected" in r.getMessage() for r in server_logs.records) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # anything the server still logs about that request
    assert [r for r in server_logs.records if r.exc_info or "Exception in ASGI" in r.getMessage()] == []
    quiet = [r for r in server_logs.records if "disconnected" in r.getMessage()]
    assert len(quiet) == 1 and quiet[0].levelno <= logging.INFO and "\n" not in quiet[0].getMessage()
    assert httpx.get(f"{api}/healthz").status_code == 200


def test_slow_request_head_and_body_are_cut_after_the_read_timeout(api: str) -> None:
    with _connect(api) as sock:  # head never completed: the server closes the connection
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: test\r\n")
        assert sock.recv(4096) == b""
    with _connect(api) as sock:  # head complete, body trickles: 408
        sock.sendall(_head(1000) + b"x" * 10)
        reply = b""
        while chunk := sock.recv(4096):  # until the server closes the connection
            reply += chunk
        reply = reply.decode(errors="replace")
        assert reply.startswith("HTTP/1.1 408") and "serve.read_timeout_s" in reply, reply


def _ztxt_bomb() -> bytes:
    """A valid 8x8 PNG with a zTXt chunk inflating to 20 MB (above PIL's text-chunk limit): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    head = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    pixels = b"".join(b"\x00" + b"\x00" * 24 for _ in range(8))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"a" * (20 << 20)))
            + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b""))


def test_image_bomb_is_413_and_messages_carry_no_python_reprs(api: str) -> None:
    octet = {**AUTH, "Content-Type": "application/octet-stream"}
    bomb = httpx.post(f"{api}/v1/predict", content=_ztxt_bomb(), headers=octet, timeout=60)
    assert bomb.status_code == 413 and "decompression bomb" in bomb.json()["detail"], bomb.text
    for body in (b"\x89PNG\r\n\x1a\n", b"II*\x00" + bytes(20), b"\xff\xd8\xff" + bytes(40)):  # signatures, nothing behind them
        response = httpx.post(f"{api}/v1/predict", content=body, headers=octet, timeout=60)
        assert response.status_code == 400 and "object at 0x" not in response.text and "cannot decode" in response.text, response.text


def test_readyz_shows_versions_only_to_an_authorised_client(api: str) -> None:
    assert httpx.get(f"{api}/readyz").json() == {"status": "ready"}
    assert httpx.get(f"{api}/readyz", headers={"Authorization": "Bearer wrong"}).json() == {"status": "ready"}
    assert httpx.get(f"{api}/readyz", headers=AUTH).json() == {"status": "ready", "model_version": "7", "bank_version": "abc123"}
    open_app = create_app(Config(), _FixedSource(), token=None)  # no token configured: loopback only, versions for all
    with running_server(open_app) as url:
        assert httpx.get(f"{url}/readyz").json()["bank_version"] == "abc123"

