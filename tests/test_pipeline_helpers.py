"""Shared helpers of the pipeline/DVC tests: one Prefect test server per session, tiny configs, fit counting.

(No tests here; pytest collects this module and finds none.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from components.config import Config, load_config
from tests.conftest import REPO_ROOT

_PREFECT = ExitStack()
_PREFECT_API_URL: str | None = None

# A few images per product at 64 px: enough for every metric to be defined, seconds per step.
TINY_OVERRIDES = [
    "data.synth.image_size=64",
    "data.synth.train_per_product=6",
    "data.synth.test_good_per_product=2",
    "data.synth.test_defect_per_type=1",
    "data.image_size=64",
    "data.heldout_fraction=0.2",
    "masks.image_size=64",
    "masks.workers=1",
    "ucad.epochs=1",
    "ucad.key_size=16",
    "ucad.knowledge_size=32",
    "ucad.batch_size=4",
    "ucad.pairs_per_image=32",
    "patchcore.coreset_size=64",
    "eval.overlays_per_task=0",
    "promotion.min_new_image_auroc=0.0",  # these tests are about the pipeline's mechanics, not the gate:
    "promotion.max_forgetting=1.0",  # every step is promoted (current + champion), as before the gate applied to runs
    "promotion.max_false_reject_rate=1.0",
]


def shared_prefect_api(request: pytest.FixtureRequest) -> str:
    """Start Prefect's test server once per pytest session (a temporary database); returns its API URL.

    Flows in this process use it; subprocesses get it through ``PREFECT_API_URL``.
    """
    global _PREFECT_API_URL
    if _PREFECT_API_URL is None:
        from prefect.settings import PREFECT_API_URL
        from prefect.testing.utilities import prefect_test_harness

        _PREFECT.enter_context(prefect_test_harness(server_startup_timeout=300))
        _PREFECT_API_URL = str(PREFECT_API_URL.value())
        request.session.config.add_cleanup(_stop_prefect)
    return _PREFECT_API_URL


def _stop_prefect() -> None:
    """Stop the server at session end (quietly: pytest has closed the captured streams by then)."""
    import logging

    global _PREFECT_API_URL
    prefect_logger = logging.getLogger("prefect")
    level = prefect_logger.level
    prefect_logger.setLevel(logging.WARNING)
    try:
        _PREFECT.close()
    finally:
        prefect_logger.setLevel(level)
        _PREFECT_API_URL = None


def tiny_config(data_root: Path, tmp: Path, *extra: str, n_products: int = 3) -> Config:
    """The repository's params.yaml with tiny sizes, tracking off, caches under ``tmp``."""
    overrides = [
        *TINY_OVERRIDES,
        f"data.synth.products={n_products}",
        f"data.root={data_root}",
        f"masks.cache_dir={tmp / 'mask_cache'}",
        "tracking.enabled=false",
        *extra,
    ]
    return load_config(REPO_ROOT / "params.yaml", overrides)


def make_tiny_products(root: Path, n_products: int = 3) -> Path:
    """Generate ``n_products`` tiny synthetic products into ``root`` (once)."""
    from components.data.synth import generate_products

    if not root.exists():
        cfg = tiny_config(root, root.parent, n_products=n_products)
        generate_products(root, n_products, cfg.data.synth.seed, cfg.data.synth)
    return root


class FitCounter:
    """Wraps ``components.methods.loading.build_method`` to record every ``fit_task`` call and optionally fail one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at_call: int | None = None) -> None:
        import components.methods.loading as loading

        self.calls: list[str] = []
        self.fail_at_call = fail_at_call
        real_build = loading.build_method

        def counting_build(cfg, backbone):  # type: ignore[no-untyped-def]
            method = real_build(cfg, backbone)
            real_fit = method.fit_task

            def fit_task(data):  # type: ignore[no-untyped-def]
                self.calls.append(data.name)
                if self.fail_at_call is not None and len(self.calls) == self.fail_at_call:
                    raise RuntimeError(f"injected failure while training task {data.name!r}")
                return real_fit(data)

            method.fit_task = fit_task  # type: ignore[method-assign]
            return method

        monkeypatch.setattr(loading, "build_method", counting_build)


def offline_env(api_url: str | None) -> dict[str, str]:
    """Environment for ``contad`` subprocesses: offline, telemetry off, the shared Prefect server."""
    env = dict(os.environ)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env["PATH"] = f"{REPO_ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def iter_files(root: Path) -> Iterator[Path]:
    return (p for p in sorted(root.rglob("*")) if p.is_file())


def test_fingerprint_ignores_how_synthetic_data_is_made() -> None:
    """``data.synth`` does not change what a run computes (the data is fingerprinted separately)."""
    from flows.records import config_fingerprint

    base = load_config(REPO_ROOT / "params.yaml", ["data.root=/data"])
    assert config_fingerprint(base) == config_fingerprint(load_config(REPO_ROOT / "params.yaml", ["data.root=/data", "data.synth.train_per_product=3"]))
    assert config_fingerprint(base) != config_fingerprint(load_config(REPO_ROOT / "params.yaml", ["data.root=/data", "data.image_size=128"]))
    assert config_fingerprint(base) != config_fingerprint(load_config(REPO_ROOT / "params.yaml", ["data.root=/data", "ucad.lr=0.5"]))
