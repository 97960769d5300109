"""``serve-api``'s ``/docs`` works offline: the page and every asset it loads come from the server itself.

FastAPI's default page loads Swagger UI from cdn.jsdelivr.net and a favicon from fastapi.tiangolo.com,
so without internet it is blank. Here the page may name no other host at all, every script,
stylesheet and icon it references is a same-origin path served with 200, and none of those
assets loads anything from a CDN or a font host either.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from components.config import Config
from components.errors import ContadError
from flows.api import create_app
from flows.deployed import DeployedVersion, DetectorSource
from flows.offline_docs import DOCS_STATIC_URL

URL = re.compile(r"https?://[^\s\"'<>)`\\]+")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "testserver", "::1"}
# Hosts a browser would fetch page resources from (scripts, styles, fonts, images, spec validators).
ASSET_HOSTS = re.compile(r"cdn\.jsdelivr\.net|unpkg\.com|cdnjs\.cloudflare\.com|fonts\.(googleapis|gstatic)\.com|"
                         r"fastapi\.tiangolo\.com|cdn\.redoc\.ly|validator\.swagger\.io/validator/debug")


class NoModel(DetectorSource):
    """A source that never has a model (``/docs`` must not need one)."""

    description = "no model"

    def current(self) -> DeployedVersion:
        raise ContadError("no model")


@pytest.fixture(scope="module")
def client() -> TestClient:
    with TestClient(create_app(Config(), NoModel(), start_reloader=False)) as test_client:
        yield test_client


def _external(text: str) -> list[str]:
    return sorted({u for u in URL.findall(text) if urlsplit(u).hostname not in LOCAL_HOSTS})


def _referenced(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)


def test_docs_page_names_no_other_host_and_serves_every_asset(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assert _external(page.text) == []
    assert "\"validatorUrl\": null" in page.text  # no validator badge fetched from swagger.io
    assets = _referenced(page.text)
    assert {a.rsplit("/", 1)[-1] for a in assets} == {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"}
    for asset in assets:
        assert asset.startswith(f"{DOCS_STATIC_URL}/"), asset  # same origin, no scheme or host
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 1000, asset
        if asset.endswith((".js", ".css")):
            assert not ASSET_HOSTS.search(response.text), f"{asset} loads from {ASSET_HOSTS.search(response.text)[0]}"
        if asset.endswith(".css"):
            assert not re.findall(r"""(?:url\(\s*["']?|@import\s+["']?)https?://""", response.text), asset
    spec = client.get("/openapi.json").json()
    assert "/v1/predict" in spec["paths"] and spec["openapi"].startswith("3.1")  # Swagger UI 5 renders OpenAPI 3.1


def test_no_cdn_pages_left(client: TestClient) -> None:
    assert client.get("/redoc").status_code == 404  # ReDoc's bundle fetches a logo from a CDN: not served
    assert client.get("/docs/oauth2-redirect").status_code == 404
