"""A real uvicorn server on 127.0.0.1 in a background thread, always shut down."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from tests.tracking_support import free_port

START_TIMEOUT_S = 60.0


@contextmanager
def running_server(app: FastAPI, ready_path: str = "/readyz", ready_timeout_s: float = 180.0, **options: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn (more ``uvicorn.Config`` ``options``, e.g. ``http``) on a free loopback port until
    ``ready_path`` answers 200; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **options))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        deadline = time.monotonic() + ready_timeout_s
        while httpx.get(url + ready_path, timeout=5.0).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}{ready_path} not ready after {ready_timeout_s:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
