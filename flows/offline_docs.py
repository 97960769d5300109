"""The ``/docs`` page of ``contad serve-api`` without a CDN: Swagger UI served from a local package.

FastAPI's default ``/docs`` and ``/redoc`` pages load Swagger UI / ReDoc JavaScript, CSS and a
favicon from public CDNs, so offline (a plant network, this repository's CI) they render blank.
``add_offline_docs`` serves the same Swagger UI 5 from the files of the pinned
``fastapi-offline`` package (``fastapi_offline/static``) at ``DOCS_STATIC_URL`` and builds the
page with FastAPI's own ``get_swagger_ui_html`` pointing there. The app must be created with
``docs_url=None, redoc_url=None`` (ReDoc is not served: its bundle fetches a logo from a CDN).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from components.errors import ContadError

DOCS_URL = "/docs"
DOCS_STATIC_URL = "/docs-static"
ASSETS_PACKAGE = "fastapi_offline"
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")
# No spec-validator badge and no OAuth redirect page: both would talk to other hosts.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}


def docs_assets_dir() -> Path:
    """The folder holding Swagger UI's ``ASSET_FILES`` (``ContadError`` naming the package when missing)."""
    try:
        folder = Path(str(files(ASSETS_PACKAGE) / "static"))
    except ModuleNotFoundError:
        raise ContadError(f"serve-api /docs needs the Python package {ASSETS_PACKAGE.replace('_', '-')} (pinned in requirements.lock): run `make venv`") from None
    missing = [name for name in ASSET_FILES if not (folder / name).is_file()]
    if missing:
        raise ContadError(f"{folder}: Swagger UI files missing ({', '.join(missing)}); reinstall {ASSETS_PACKAGE.replace('_', '-')} with `make venv`")
    return folder


def add_offline_docs(app: FastAPI) -> None:
    """Serve Swagger UI at ``DOCS_URL`` with every asset from ``DOCS_STATIC_URL`` on the same server."""
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError("create the FastAPI app with docs_url=None, redoc_url=None before adding the offline /docs page")
    app.mount(DOCS_STATIC_URL, StaticFiles(directory=docs_assets_dir()), name="docs-static")

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - docs",
            swagger_js_url=f"{root}{DOCS_STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_STATIC_URL}/favicon.png",
            oauth2_redirect_url=None,
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )
