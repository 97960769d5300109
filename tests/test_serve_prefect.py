"""``contad serve`` + ``contad add-product --via-server`` against a real ``prefect server`` on 127.0.0.1.

The server (sqlite and PREFECT_HOME in tmp) and the serve process run in their own process
groups and are always torn down. The event ``contad.product.added`` must start the served
add-product deployment, whose flow run adds the product on top of the trained champion; then a
recorded verdict (``contad.feedback.recorded``) must start the served feedback-apply deployment
(one verdict is below ``feedback.min_images``: the run completes without learning).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow.tracking import MlflowClient

from components.config import Config, config_to_dict
from components.errors import ContadError
from components.memory.feedback import FeedbackLog
from components.memory.store import BankStore
from flows.add_product import PRODUCT_ADDED_EVENT, add_product_command, emit_product_added
from flows.feedback import FEEDBACK_EVENT, record_feedback
from flows.serve import DEPLOYMENT_NAME, FEEDBACK_DEPLOYMENT_NAME, product_added_trigger, serve_command
from flows.tracking import champion_version
from tests.tracking_support import background, copy_base, free_port, trained_base, wait_for_flow_run, wait_http_ok



def test_trigger_maps_event_payload_to_parameters() -> None:
    trigger = product_added_trigger()
    assert trigger.expect == {PRODUCT_ADDED_EVENT}
    assert trigger.parameters == {"path": "{{ event.payload.path }}", "name": "{{ event.payload.name }}"}


def test_feedback_apply_is_served_beside_add_product_on_the_feedback_event() -> None:
    from flows.serve import deployments

    served = {d.name: d for d in deployments(Config())}
    apply = served[FEEDBACK_DEPLOYMENT_NAME]
    assert [t.expect for t in apply.triggers] == [{FEEDBACK_EVENT}] and apply.entrypoint == "flows.feedback.feedback_apply_flow"
    assert apply.parameters == {"config": served[DEPLOYMENT_NAME].parameters["config"], "out": None, "force": False}  # the same config


def test_via_server_needs_a_running_server(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        with pytest.raises(ContadError, match="no Prefect server answering"):
            emit_product_added(tmp_path, "x")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(ContadError, match="set PREFECT_API_URL"):
            add_product_command(None, tmp_path, "x", None, via_server=True)  # type: ignore[arg-type]
        with pytest.raises(ContadError, match="contad serve needs a Prefect server"):
            serve_command(Config())


def _prefect_env(tmp_path: Path, api_url: str) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(tmp_path / "prefect_home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }


def _wait_for_deployment(client: object, serve: object, log_path: Path, name: str = f"contad-add-product/{DEPLOYMENT_NAME}",
                         automation: str = "contad-product-added", timeout_s: float = 240.0) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if serve.poll() is not None:  # type: ignore[attr-defined]
            raise RuntimeError(f"contad serve exited with {serve.returncode}:\n{log_path.read_text()[-3000:]}")  # type: ignore[attr-defined]
        try:
            deployment = client.read_deployment_by_name(name)  # type: ignore[attr-defined]
            if client.read_automations_by_name(automation):  # type: ignore[attr-defined]
                return deployment
        except Exception:  # noqa: BLE001 - not registered yet
            pass
        time.sleep(1.0)
    raise TimeoutError(f"deployment not registered after {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")


@pytest.mark.integration
def test_event_triggers_served_add_product(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    base = trained_base(tmp_path_factory)
    cfg = copy_base(base, tmp_path / "work")
    store = BankStore(cfg.banks.store_dir)
    mlflow = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    before_bank, before_champion = store.current(), champion_version(mlflow, "contad-detector")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(config_to_dict(cfg)))

    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = _prefect_env(tmp_path, api_url)
    prefect = str(Path(sys.executable).parent / "prefect")
    server_log, serve_log = tmp_path / "prefect-server.log", tmp_path / "contad-serve.log"
    with background([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"], server_log, env) as server:
        wait_http_ok(f"{api_url}/health", server, server_log)
        with background([sys.executable, "-m", "flows.cli", "serve", "--params", str(params)], serve_log, env, cwd=tmp_path) as serve:
            with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
                deployment = _wait_for_deployment(client, serve, serve_log)
                feedback_apply = _wait_for_deployment(client, serve, serve_log, f"contad-feedback-apply/{FEEDBACK_DEPLOYMENT_NAME}",
                                                      "contad-feedback-recorded")  # served beside it
                [trigger] = client.read_automations_by_name("contad-feedback-recorded")
                assert trigger.trigger.expect == {FEEDBACK_EVENT} and feedback_apply.parameters["config"] == deployment.parameters["config"]  # type: ignore[attr-defined]
                assert add_product_command(cfg, base.new, name="served", out=None, via_server=True) == 0
                run = wait_for_flow_run(client, deployment.id, serve_log)  # type: ignore[attr-defined]
                promoted = store.current()
                [verdict] = record_feedback(cfg, [str(sorted(base.new.rglob("*.png"))[0])], "good", by="line")  # emits contad.feedback.recorded
                applied = wait_for_flow_run(client, feedback_apply.id, serve_log)  # type: ignore[attr-defined]
                events = httpx.post(f"{api_url}/events/filter", json={"filter": {"event": {"name": [FEEDBACK_EVENT]}}, "limit": 10}, timeout=30).json()["events"]

    assert run.state.type.value == "COMPLETED", serve_log.read_text()[-4000:]  # type: ignore[attr-defined]
    assert applied.state.type.value == "COMPLETED", serve_log.read_text()[-4000:]  # type: ignore[attr-defined]
    assert store.current() == promoted and FeedbackLog(store.root).find(verdict.id) is not None  # one verdict < feedback.min_images: nothing learned
    [event] = events
    assert event["resource"]["prefect.resource.id"] == f"contad.product.{verdict.product}"
    assert event["payload"]["product"] == verdict.product and event["payload"]["verdict"] == "good" and event["payload"]["count"] == 1
    assert event["payload"]["kinds"] == {verdict.kind: 1} and event["payload"]["ids"] == [verdict.id]
    assert event["payload"]["pending_false_rejects"] == (verdict.kind == "false_reject") and event["payload"]["min_images"] == cfg.feedback.min_images
    assert run.parameters["name"] == "served" and run.parameters["path"] == str(base.new.resolve())  # type: ignore[attr-defined]
    bank = store.current()
    assert bank != before_bank and "served" in store.show(bank)["products"]
    champion = champion_version(mlflow, "contad-detector")
    assert champion is not None and champion != before_champion and champion[1] == bank
    assert (tmp_path / "runs" / "add-product" / "served" / "add_product.json").is_file()
