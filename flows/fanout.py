"""Fan-out of the embarrassingly parallel work of a run to a Dask cluster (``prefect-dask``).

Two kinds of work are independent per item and go out as Prefect tasks when
``cfg.compute.fanout`` (``compute.workers > 1`` or ``compute.dask_address``):

- structure-mask caching: the images still missing from the cache, in ``compute.workers`` chunks
  (``mask_chunk`` tasks; every entry is content-addressed, so the cache is the same as a sequential build);
- evaluation: one ``evaluate_product`` task per learned product (feature extraction + prediction +
  metrics of that product's test images; images still carry no product label).

``with_task_runner(flow, compute)`` gives a flow whose task runner is a ``DaskTaskRunner``: a
``distributed.LocalCluster`` of ``compute.workers`` processes, or the existing cluster at
``compute.dask_address`` (its workers need this code, the data paths and the bank store mounted at
the same paths). Training itself stays in the flow process: one task at a time, on its device.
Results are identical to the sequential path (same cache entries, same metrics, same bank hash).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from prefect import Flow, task
from prefect.cache_policies import NO_CACHE

from components.config import ComputeConfig, Config, MasksConfig
from components.data.loading import test_batch
from components.data.manifest import untested_products
from components.eval.step_eval import evaluate_batches, evaluate_reserved
from components.methods.loading import stored_config
from components.segment.cache import BuildSummary, MaskCache, PendingImage, plan_build, read_image_bytes, sha256_hex

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Flow)

fanout_task = task(cache_policy=NO_CACHE, persist_result=False)  # inputs are large (frames, configs): never hashed


def task_runner(compute: ComputeConfig) -> Any:
    """A ``DaskTaskRunner`` for ``compute``: the cluster at ``dask_address``, else a LocalCluster of ``workers`` processes."""
    from prefect_dask import DaskTaskRunner

    if compute.dask_address:
        return DaskTaskRunner(address=compute.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": compute.workers,
            "threads_per_worker": compute.threads_per_worker,
            "processes": True,
            "dashboard_address": None,  # no HTTP dashboard: nothing listens besides the loopback scheduler
            "host": "127.0.0.1",
        },
    )


def with_task_runner(flow: F, compute: ComputeConfig) -> F:
    """``flow`` itself (sequential path), or a copy whose submitted tasks run on Dask when ``compute.fanout``."""
    if not compute.fanout:
        return flow
    return flow.with_options(task_runner=task_runner(compute))  # type: ignore[return-value]


def chunks(items: list[Any], n: int) -> list[list[Any]]:
    """``items`` split round-robin into at most ``n`` non-empty chunks (order within a chunk kept)."""
    n = max(1, min(n, len(items)))
    return [items[i::n] for i in range(n)] if items else []


# ---------------------------------------------------------------------------------- mask caching
@fanout_task(name="mask_chunk")
def mask_chunk(cache_dir: str, masks_cfg: MasksConfig, pending: list[PendingImage]) -> list[str]:
    """Compute and store the label maps of ``pending`` images (one Dask worker); returns their hashes."""
    cache = MaskCache(cache_dir, masks_cfg)
    stored = []
    for item in pending:
        image_bytes = read_image_bytes(item.image_path)
        image_sha256 = sha256_hex(image_bytes)
        cache.compute(image_bytes, image_sha256, item.product, item.image_path)
        stored.append(image_sha256)
    return stored


def cache_masks(cfg: Config, manifest: pd.DataFrame, products: list[str]) -> Path:
    """Fill the mask cache for the training images of ``products`` with ``mask_chunk`` tasks (call inside a flow)."""
    cache_dir = Path(cfg.masks.cache_dir)
    rows = manifest[(manifest["split"] == "train") & manifest["product"].isin(products)]
    items = list(zip(rows["image_path"].astype(str), rows["product"].astype(str)))
    cache = MaskCache(cache_dir, cfg.masks)
    cache.directory.mkdir(parents=True, exist_ok=True)
    cache.remove_stale_temporaries()
    summary = BuildSummary(total=len(items))
    pending = plan_build(cache, items, summary)
    parts = chunks(pending, fanout_width(cfg.compute))
    try:
        futures = [mask_chunk.submit(str(cache_dir), cfg.masks, part) for part in parts]
        done = sum(len(f.result()) for f in futures)
    finally:
        cache.write_index()
    log.info("mask cache %s (%s): %s; %d computed in %d Dask tasks", cache_dir, cfg.masks.provider, summary.as_dict(), done, len(parts))
    return cache_dir


def fanout_width(compute: ComputeConfig) -> int:
    """How many chunks to cut work into: the local worker count (or at least 2 on an external cluster)."""
    return max(compute.workers, 2)


# ---------------------------------------------------------------------------------- evaluation
@fanout_task(name="evaluate_product", task_run_name="evaluate-{product}")
def evaluate_product(cfg: Config, method_dir: str, rows: pd.DataFrame, product: str, task_of_product: dict[str, str]) -> dict[str, float]:
    """Metrics of one product's test images under the method in ``method_dir`` (one Dask worker)."""
    cfg = stored_config(cfg, Path(method_dir))  # the state's own configuration (image size, tiling)
    return evaluate_batches(cfg, Path(method_dir), {product: test_batch(rows, product, cfg.data.image_size)}, task_of_product)[product]


def evaluate_all_tasks(cfg: Config, method_dir: Path, manifest: pd.DataFrame, task_of_product: dict[str, str]) -> dict[str, dict[str, float]]:
    """``flows.pipeline_tasks.evaluate_all_tasks`` with one ``evaluate_product`` task per product (call inside a flow)."""
    untested = untested_products(manifest[manifest["product"].isin(list(task_of_product))])
    futures = {
        product: evaluate_product.submit(cfg, str(method_dir), manifest[manifest["product"] == product].reset_index(drop=True), product, task_of_product)
        for product in task_of_product
        if product not in untested
    }
    metrics = {product: future.result() for product, future in futures.items()}
    metrics.update(evaluate_reserved(cfg, Path(method_dir), manifest, untested, task_of_product))  # normal images only: no test batch
    log.info("evaluated %d products with %s on Dask", len(metrics), method_dir)
    return {product: metrics[product] for product in task_of_product}
