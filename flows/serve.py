"""``contad serve``: event-triggered Prefect deployments of the add-product and feedback-apply flows.

Registers two deployments on the Prefect server at ``PREFECT_API_URL`` and serves them from this
process until interrupted:

- ``contad-add-product/contad-add-product``, triggered by the ``contad.product.added`` event
  (payload: ``path``, ``name``);
- ``contad-feedback-apply/contad-feedback-apply``, triggered by ``contad.feedback.recorded`` (sent by
  ``contad feedback`` and ``POST /v1/feedback`` after recording verdicts): every recorded verdict runs
  the apply flow, which learns nothing until ``feedback.min_images`` false rejects are waiting.

Both flows run with the configuration given to ``contad serve`` (relative paths made absolute here, so
the flow runs are independent of the runner's working directory).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from components.config import Config, config_to_dict
from components.errors import ContadError
from flows.add_product import PRODUCT_ADDED_EVENT, check_prefect_server, add_product_flow
from flows.feedback import FEEDBACK_EVENT, feedback_apply_flow
from flows.tracking import normalized_uri

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "contad-add-product"
FEEDBACK_DEPLOYMENT_NAME = "contad-feedback-apply"
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


def feedback_recorded_trigger() -> Any:
    """Deployment trigger: one apply flow run per ``contad.feedback.recorded`` event (parameters: the deployment's)."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="contad-feedback-recorded",
        description="run feedback apply when operator verdicts are recorded (it learns nothing below feedback.min_images)",
        expect={FEEDBACK_EVENT},
        match={"prefect.resource.id": RESOURCE_PATTERN},
    )


def deployments(cfg: Config) -> list[Any]:
    """The served deployments (not yet registered): add-product and feedback apply, with ``cfg`` made absolute."""
    from prefect.types.entrypoint import EntrypointType

    config = config_to_dict(absolute_config(cfg))
    common = {"tags": ["contad"], "entrypoint_type": EntrypointType.MODULE_PATH}
    return [
        add_product_flow.to_deployment(
            name=DEPLOYMENT_NAME, triggers=[product_added_trigger()], parameters={"config": config, "out": None, "fail_on_reject": True},
            description="contad triggered incremental run: validate, masks, train on top of the champion, evaluate all products, promotion gate",
            **common),
        feedback_apply_flow.to_deployment(
            name=FEEDBACK_DEPLOYMENT_NAME, triggers=[feedback_recorded_trigger()], parameters={"config": config, "out": None, "force": False},
            description="contad triggered feedback apply: learn the false rejects marked good (once feedback.min_images wait), "
                        "evaluate every product, promotion gate with the recorded escapes",
            **common),
    ]


def serve_command(cfg: Config) -> int:
    """Register the event-triggered deployments and serve them (blocks until interrupted)."""
    from prefect import serve
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ContadError("contad serve needs a Prefect server for event triggers: start `prefect server start` and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    check_prefect_server(url)
    print(f"serving {DEPLOYMENT_NAME} on {url}: send `contad add-product PATH --name NAME --via-server` (event {PRODUCT_ADDED_EVENT})")
    print(f"serving {FEEDBACK_DEPLOYMENT_NAME} on {url}: runs on every `contad feedback PATH... --as good|defect` or POST /v1/feedback "
          f"(event {FEEDBACK_EVENT}; learns once feedback.min_images={cfg.feedback.min_images} false rejects wait)")
    serve(*deployments(cfg), pause_on_shutdown=False, print_starting_message=False)
    return 0
