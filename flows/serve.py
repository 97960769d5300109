"""``contad serve``: an event-triggered Prefect deployment of the add-product flow.

Registers the deployment ``contad-add-product/contad-add-product`` on the Prefect server at
``PREFECT_API_URL`` with a deployment trigger on the ``contad.product.added`` event (payload:
``path``, ``name``) and serves it from this process until interrupted. The served flow runs
with the configuration given to ``contad serve`` (relative paths made absolute here, so the
flow runs are independent of the runner's working directory).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from components.config import Config, config_to_dict
from components.errors import ContadError
from flows.add_product import PRODUCT_ADDED_EVENT, check_prefect_server, add_product_flow
from flows.tracking import normalized_uri

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "contad-add-product"
RESOURCE_PATTERN = "contad.product.*"


def absolute_config(cfg: Config) -> Config:
    """A copy of ``cfg`` whose relative filesystem paths are resolved against the cwd."""
    out = cfg.model_copy(deep=True)
    out.data.root = str(Path(cfg.data.root).resolve())
    out.masks.cache_dir = str(Path(cfg.masks.cache_dir).resolve())
    out.banks.store_dir = str(Path(cfg.banks.store_dir).resolve())
    out.tracking.uri = normalized_uri(cfg.tracking.uri)
    return out


def product_added_trigger() -> Any:
    """Deployment trigger: one flow run per ``contad.product.added`` event, parameters from its payload."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="contad-product-added",
        description="run add-product for every contad.product.added event",
        expect={PRODUCT_ADDED_EVENT},
        match={"prefect.resource.id": RESOURCE_PATTERN},
        parameters={"path": "{{ event.payload.path }}", "name": "{{ event.payload.name }}"},
    )


def serve_command(cfg: Config) -> int:
    """Register the event-triggered add-product deployment and serve it (blocks until interrupted)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.types.entrypoint import EntrypointType

    url = PREFECT_API_URL.value()
    if not url:
        raise ContadError("contad serve needs a Prefect server for event triggers: start `prefect server start` and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    check_prefect_server(url)
    parameters = {"config": config_to_dict(absolute_config(cfg)), "out": None, "fail_on_reject": True}
    print(f"serving {DEPLOYMENT_NAME} on {url}: send `contad add-product PATH --name NAME --via-server` (event {PRODUCT_ADDED_EVENT})")
    add_product_flow.serve(
        name=DEPLOYMENT_NAME,
        triggers=[product_added_trigger()],
        parameters=parameters,
        description="contad triggered incremental run: validate, masks, train on top of the champion, evaluate all products, promotion gate",
        tags=["contad"],
        entrypoint_type=EntrypointType.MODULE_PATH,
        pause_on_shutdown=False,
    )
    return 0
