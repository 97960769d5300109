"""Entry points of the work-pool deployments in ``infra/prefect.yaml`` (JSON parameters only).

A deployment's flow run starts on a worker (``prefect worker start --pool contad-cpu|contad-gpu``)
in the directory set by the deployment's pull step. Its configuration is a params file on the
worker (``params``, e.g. the plant's ``params.yaml`` on shared storage) plus ``key=value``
``overrides``, exactly as on the command line. ``flows.pipeline.run_from_params`` is the entry
point of the continual-run deployments; ``add_product_from_params`` below is the one of the
event-triggered add-product deployments.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

from prefect import flow

from components.config import config_to_dict, load_config
from flows.add_product import add_product_flow
from flows.serve import absolute_config

log = logging.getLogger(__name__)


def worker_identity() -> str:
    """``host/pid`` of the process running a flow (shown in the run's logs: where it ran)."""
    import os

    return f"{platform.node()}/{os.getpid()}"


@flow(name="contad-add-product-params", log_prints=True, validate_parameters=True)
def add_product_from_params(path: str, name: str, params: str = "params.yaml", overrides: list[str] | None = None, runs: str = "runs") -> dict[str, Any]:
    """Add product ``name`` from folder ``path`` with the configuration ``params`` + ``overrides`` (what a
    ``contad.product.added`` event runs on a worker); this step's outputs go to ``runs/add-product/<name>``.
    Relative paths are resolved against the run's working directory; raises when the step fails or the
    promotion gate rejects it (the champion stays where it was)."""
    cfg = absolute_config(load_config(params, overrides or []))
    target = str((Path(runs) / "add-product" / name).resolve())
    print(f"add-product {name!r} from {path} on worker process {worker_identity()} (bank store {cfg.banks.store_dir})")
    return add_product_flow(path=path, name=name, config=config_to_dict(cfg), out=target, fail_on_reject=True)


@flow(name="contad-predict-params", log_prints=True, validate_parameters=True)
def predict_from_params(inputs: list[str], out: str, model: str | None = None, bank: str | None = None,
                        params: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Batch predict (``contad predict``) on a worker: OK/NG, scores and overlays for every image, folder or glob
    in ``inputs`` with the registered ``model`` (default ``serve.model``, the champion) or the bank ``bank``
    (``DIR[@VERSION]``); writes ``out/predictions.csv|jsonl``. NG parts are results, not failures."""
    from flows.predict import PREDICTIONS_CSV, predict_command

    cfg = absolute_config(load_config(params, overrides or []))
    print(f"predict {len(inputs)} input(s) into {out} on worker process {worker_identity()}")
    predict_command(cfg, inputs, Path(out), model=model, bank=bank)
    return {"predictions": str(Path(out) / PREDICTIONS_CSV)}


@flow(name="contad-stream-params", log_prints=True, validate_parameters=True)
def stream_from_params(source: str, product: str, out: str, init: str | None = None,
                       params: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Online mode (``contad stream``) on a worker: score each image of ``source`` (a watched folder, or a
    text file of paths) before learning it, checkpoints in ``out`` (resumes after a crash)."""
    from flows.stream import stream_flow

    cfg = absolute_config(load_config(params, overrides or []))
    print(f"stream {product!r} from {source} into {out} on worker process {worker_identity()}")
    return stream_flow(cfg, source, product, Path(out), Path(init) if init else None)
