"""Dask fan-out (flows/fanout.py): the same metrics, bank version and mask cache as the sequential path."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.metric_support import assert_same_metrics

from components.config import ComputeConfig, ConfigError, load_config
from flows import fanout
from tests.test_pipeline_helpers import make_tiny_products, shared_prefect_api, tiny_config


def test_compute_section_validates_and_decides_fanout() -> None:
    assert not ComputeConfig().fanout
    assert ComputeConfig(workers=2).fanout and ComputeConfig(dask_address="tcp://10.0.0.5:8786").fanout
    with pytest.raises(ConfigError, match="compute.dask_address"):
        load_config(None, ["compute.dask_address=scheduler:8786"])
    with pytest.raises(ConfigError, match="compute.workers"):
        load_config(None, ["compute.workers=0"])


def test_chunks_cover_every_item_once() -> None:
    items = list(range(7))
    parts = fanout.chunks(items, 3)
    assert len(parts) == 3 and sorted(i for p in parts for i in p) == items
    assert fanout.chunks(items[:2], 5) == [[0], [1]] and fanout.chunks([], 4) == []


def test_sequential_config_keeps_the_flow_and_fanout_gets_a_dask_runner() -> None:
    from prefect_dask import DaskTaskRunner

    from flows.pipeline import continual_run

    assert fanout.with_task_runner(continual_run, ComputeConfig()) is continual_run
    local = fanout.with_task_runner(continual_run, ComputeConfig(workers=3)).task_runner
    assert isinstance(local, DaskTaskRunner) and local.cluster_kwargs["n_workers"] == 3
    remote = fanout.with_task_runner(continual_run, ComputeConfig(dask_address="tcp://127.0.0.1:8786")).task_runner
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://127.0.0.1:8786"


@pytest.fixture(scope="module")
def prefect_api(request: pytest.FixtureRequest) -> str:
    return shared_prefect_api(request)


@pytest.fixture(scope="module")
def products(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_products(tmp_path_factory.mktemp("fanout") / "data", n_products=2)


def _run(products: Path, out: Path, *extra: str) -> dict[str, Any]:
    from flows.pipeline import execute, run_config

    cfg = run_config(tiny_config(products, out, *extra, n_products=2), out)
    return execute(cfg, out)


def _cache_entries(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "mask_cache").rglob("*.png"))}


@pytest.fixture(scope="module")
def sequential(prefect_api: str, products: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("sequential")
    return _run(products, out), out


@pytest.fixture(scope="module")
def threaded_cluster() -> Iterator[str]:
    """An existing Dask cluster (in-process scheduler + 2 threaded workers) for ``compute.dask_address``."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp", dashboard_address=None, host="127.0.0.1") as cluster:
        yield cluster.scheduler_address


def _assert_same_run(got: tuple[dict[str, Any], Path], want: tuple[dict[str, Any], Path]) -> None:
    (doc, out), (ref, ref_out) = got, want
    assert doc["bank_version"] == ref["bank_version"]
    assert_same_metrics(doc["matrix"], ref["matrix"])
    assert_same_metrics(doc["final"], ref["final"])
    assert_same_metrics(json.loads((out / "metrics.json").read_text())["matrix"], json.loads((ref_out / "metrics.json").read_text())["matrix"])
    entries = _cache_entries(out)
    assert entries and entries == _cache_entries(ref_out)


def test_existing_dask_cluster_matches_sequential_path(prefect_api: str, products: Path, sequential: tuple[dict[str, Any], Path],
                                                       threaded_cluster: str, tmp_path: Path) -> None:
    got = _run(products, tmp_path, f"compute.dask_address={threaded_cluster}")
    _assert_same_run((got, tmp_path), sequential)


@pytest.mark.slow
def test_local_cluster_of_worker_processes_matches_sequential_path(prefect_api: str, products: Path, sequential: tuple[dict[str, Any], Path],
                                                                   tmp_path: Path) -> None:
    got = _run(products, tmp_path, "compute.workers=2")
    _assert_same_run((got, tmp_path), sequential)
