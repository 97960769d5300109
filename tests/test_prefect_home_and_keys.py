"""Prefect run history stays with the project (``runs/.prefect``), and add-product's artifact key is per bank store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import PREFECT_HOME_DIR, set_prefect_home
from flows.run_links import add_product_key
from tests.conftest import REPO_ROOT
from tests.test_pipeline_helpers import shared_prefect_api


@pytest.fixture
def user_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user who set neither PREFECT_HOME nor PREFECT_API_URL, working in ``tmp_path/project`` (HOME is ``tmp_path/home``)."""
    for key in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    return project


def test_prefect_commands_get_a_project_local_home_unless_the_user_chose_one(user_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert set_prefect_home("predict") is None and "PREFECT_HOME" not in os.environ  # no Prefect: nothing set, nothing created
    assert not (user_env / "runs").exists()
    home = set_prefect_home("run")
    assert home == user_env / PREFECT_HOME_DIR and home.is_dir() and os.environ["PREFECT_HOME"] == str(home)
    monkeypatch.setenv("PREFECT_HOME", "/somewhere/else")
    assert set_prefect_home("demo") is None and os.environ["PREFECT_HOME"] == "/somewhere/else"
    monkeypatch.delenv("PREFECT_HOME")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")  # the user's own server keeps its history
    assert set_prefect_home("add-product") is None and "PREFECT_HOME" not in os.environ


def test_user_profiles_still_apply_with_the_project_home(user_env: Path, tmp_path: Path) -> None:
    profiles = tmp_path / "home" / ".prefect" / "profiles.toml"
    profiles.parent.mkdir(parents=True)
    profiles.write_text('active = "mine"\n\n[profiles.mine]\nPREFECT_LOGGING_LEVEL = "WARNING"\n')
    probe = (
        "from flows.cli import set_prefect_home; set_prefect_home('run')\n"
        "from prefect.settings import get_current_settings\n"
        "s = get_current_settings(); print(s.home); print(s.logging.level)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_LOGGING_LEVEL",)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=user_env, env={**env, "PYTHONPATH": str(REPO_ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    home, level = done.stdout.split()[-2:]
    assert Path(home) == user_env / PREFECT_HOME_DIR  # Prefect itself reads the project home
    assert level == "WARNING"  # ... and the user's active profile from ~/.prefect/profiles.toml
    assert not (tmp_path / "home" / ".prefect" / "prefect.db").exists()


def test_add_product_artifact_key_is_per_product_and_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = add_product_key("washer", tmp_path / "line_a" / "banks")
    b = add_product_key("washer", tmp_path / "line_b" / "banks")
    assert a != b and a.startswith("contad-add-product-washer-line-a-") and b.startswith("contad-add-product-washer-line-b-")
    assert add_product_key("screw", tmp_path / "line_a" / "banks") != a
    monkeypatch.chdir(tmp_path)
    assert add_product_key("washer", Path("line_a/banks")) == a  # relative or absolute: the same store, the same key
    assert set(add_product_key("Wood Panel_2", tmp_path / "Store X")) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")


@pytest.mark.slow
def test_latest_add_product_artifact_of_a_store_is_that_stores_table(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The same product added to two stores: each store's key has its own table as "latest"."""
    shared_prefect_api(request)
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.run_links import publish_add_product

    stores = {"a": tmp_path / "line_a" / "banks", "b": tmp_path / "line_b" / "banks"}
    gate = {"passed": True, "reasons": []}

    @flow(name="contad-artifact-key-probe")
    def add_to(store: str, auroc: float) -> str | None:
        return publish_add_product("washer", 1, {"washer": {"image_auroc": auroc}}, gate, "f" * 64, "1", None, stores[store])

    assert add_to("a", 0.91) and add_to("b", 0.42)

    async def latest(key: str) -> str:
        async with get_client() as client:
            (artifact,) = await client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            return str(artifact.data)

    import asyncio

    table_a, table_b = (asyncio.run(latest(add_product_key("washer", stores[s]))) for s in ("a", "b"))
    assert "91.0" in table_a and "42.0" not in table_a
    assert "42.0" in table_b and "91.0" not in table_b
