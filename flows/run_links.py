"""What a person sees of a run in Prefect, and the links between its Prefect flow run and MLflow run.

- Flow-run names that say what ran (``continual_run_name``, ``add_product_run_name``: callables
  for ``flow_run_name=``), task-run names by step and product (``step_label``), flow-run tags
  ``method:<method>``, ``protocol:<protocol>`` (``run_tags``).
- Cross-links (``link_runs``): the MLflow parent run gets tags ``prefect.flow_run_id``,
  ``prefect.flow_run_name`` and, with a Prefect server, ``prefect.flow_run_url``; the Prefect flow
  run gets the tag ``mlflow-run:<run id>``.
- One markdown artifact per run (``publish_summary``, key per run directory: ``run_key``): the final accuracy
  table (per product, average, forgetting) and where the MLflow run is.

Everything here is best effort: a failure to tag or publish is logged and never fails the run.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from components.data.protocol import task_name

log = logging.getLogger(__name__)

MLFLOW_RUN_TAG_PREFIX = "mlflow-run:"
FLOW_RUN_ID_TAG = "prefect.flow_run_id"
FLOW_RUN_NAME_TAG = "prefect.flow_run_name"
FLOW_RUN_URL_TAG = "prefect.flow_run_url"
SUMMARY_METRICS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"))


@dataclass(frozen=True)
class FlowRunInfo:
    """The Prefect flow run this code runs in."""

    id: str
    name: str | None
    url: str | None  # UI address; None without a Prefect server (ephemeral API)


def current_flow_run() -> FlowRunInfo | None:
    """The current Prefect flow run (None outside a flow run)."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return None
    run_id = str(context.flow_run.id)
    ui = PREFECT_UI_URL.value() if PREFECT_API_URL.value() else None  # the ephemeral API has no UI to link to
    return FlowRunInfo(run_id, context.flow_run.name, f"{str(ui).rstrip('/')}/runs/flow-run/{run_id}" if ui else None)


def step_label(action: str, step: int, what: str) -> str:
    """Task-run name ``"<action> step <k> · <what>"`` (``k`` is the 0-based step index of MLflow and ``OUT/steps``)."""
    return f"{action} step {step} · {what}"


def named(step_task: Any, action: str, step: int, what: str) -> Any:
    """``step_task`` with the task-run name ``step_label(action, step, what)``; a plain function (a task's
    ``.fn``, as the crash tests run them) is returned unchanged."""
    with_options = getattr(step_task, "with_options", None)
    return with_options(task_run_name=step_label(action, step, what)) if with_options is not None else step_task


def run_tags(method: str, protocol: str, *extra: str) -> list[str]:
    """Prefect tags of a run: ``method:<method>``, ``protocol:<protocol>`` and ``extra``."""
    return [f"method:{method}", f"protocol:{protocol}", *extra]


def _parameters() -> dict[str, Any]:
    from prefect.runtime import flow_run

    return dict(flow_run.parameters or {})


def continual_run_name() -> str:
    """Flow-run name of ``continual_run``: method, protocol, data and output folder."""
    params = _parameters()
    cfg, out = params.get("cfg"), params.get("out")
    if cfg is None:
        return "continual run"
    from pathlib import Path

    data = ", ".join(cfg.data.products) if cfg.data.products else Path(str(cfg.data.root)).name
    return f"{cfg.method} · {cfg.protocol.name} · {data} → {Path(str(out)).name if out else '-'}"


def add_product_run_name() -> str:
    """Flow-run name of ``contad-add-product``: the product and the method."""
    params = _parameters()
    method = (params.get("config") or {}).get("method") or "default method"
    return f"add-product {params.get('name', '?')} · {method}"


def tag_flow_run(tags: list[str]) -> None:
    """Add ``tags`` to the current flow run (kept: its existing tags)."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    merged = list(dict.fromkeys([*(context.flow_run.tags or []), *tags]))
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(context.flow_run.id, tags=merged)
        context.flow_run.tags = merged
    except Exception as exc:  # noqa: BLE001 - tags are a convenience, never a reason to fail a run
        log.warning("could not tag Prefect flow run %s: %s", context.flow_run.id, exc)


def link_runs(tracker: Any) -> FlowRunInfo | None:
    """Tag the tracker's MLflow parent run with the current Prefect flow run and the flow run with the MLflow run id."""
    info = current_flow_run()
    run_id = getattr(tracker, "run_id", None)
    if info is None:
        return None
    if run_id is not None:
        tags = {FLOW_RUN_ID_TAG: info.id, FLOW_RUN_NAME_TAG: info.name or ""}
        if info.url:
            tags[FLOW_RUN_URL_TAG] = info.url
        try:
            tracker.set_tags(tags)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not tag MLflow run %s with the Prefect flow run: %s", run_id, exc)
        tag_flow_run([f"{MLFLOW_RUN_TAG_PREFIX}{run_id}"])
    return info


def artifact_key(text: str) -> str:
    """A Prefect artifact key from ``text`` (lowercase letters, digits and dashes only)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "contad"


def _percent(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{100 * float(value):.1f}"


def final_table(metrics_json: dict[str, Any]) -> str:
    """Markdown table of the final metrics (%) per product, their average and the forgetting FM."""
    header = "| product | " + " | ".join(label for _, label in SUMMARY_METRICS) + " |"
    lines = [header, "|---|" + "---:|" * len(SUMMARY_METRICS)]
    final = metrics_json.get("final") or {}
    for product in metrics_json.get("tasks") or []:
        lines.append(f"| {product} | " + " | ".join(_percent((final.get(m) or {}).get(product)) for m, _ in SUMMARY_METRICS) + " |")
    for group, label in (("average", "**average**"), ("forgetting", "**forgetting (FM)**"), ("bwt", "**BWT**")):
        values = metrics_json.get(group) or {}
        lines.append(f"| {label} | " + " | ".join(_percent(values.get(m)) for m, _ in SUMMARY_METRICS) + " |")
    return "\n".join(lines)


def metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    """Markdown table of one evaluation (%): ``{product: {metric: value}}``."""
    lines = ["| product | " + " | ".join(label for _, label in SUMMARY_METRICS) + " |", "|---|" + "---:|" * len(SUMMARY_METRICS)]
    for product, values in metrics.items():
        lines.append(f"| {product} | " + " | ".join(_percent(values.get(m)) for m, _ in SUMMARY_METRICS) + " |")
    return "\n".join(lines)


def mlflow_section(tracker: Any) -> str:
    """Where the MLflow run is: a link with a tracking server, else the ``mlflow ui`` command and the run's page."""
    run_id = getattr(tracker, "run_id", None)
    if run_id is None:
        return "MLflow: tracking disabled (`tracking.enabled=false`)."
    url = tracker.run_url()
    experiment = getattr(tracker, "experiment_id", None)
    if url:
        return f"MLflow run [`{run_id}`]({url})."
    uri = getattr(tracker, "tracking_uri", "")
    return (
        f"MLflow run `{run_id}` (experiment {experiment}) in `{uri}`: open it with "
        f"`mlflow ui --backend-store-uri {uri}`, then `#/experiments/{experiment}/runs/{run_id}`."
    )


def publish_markdown(key: str, markdown: str, description: str) -> str | None:
    """Create a Prefect markdown artifact in the current flow run; its id (None outside a run or on failure)."""
    from prefect.artifacts import create_markdown_artifact

    if current_flow_run() is None:
        return None
    try:
        return str(create_markdown_artifact(markdown=markdown, key=artifact_key(key), description=description))
    except Exception as exc:  # noqa: BLE001
        log.warning("could not create the Prefect artifact %s: %s", key, exc)
        return None


def run_summary_markdown(metrics_json: dict[str, Any], tracker: Any) -> str:
    """The markdown of a continual run's summary artifact."""
    steps = metrics_json.get("steps") or [[p] for p in metrics_json.get("tasks") or []]
    order = " → ".join(task_name(group) for group in steps)
    bank = str(metrics_json.get("bank_version") or "-")[:12]
    promoted = "yes" if metrics_json.get("promoted", True) else "no (the promotion gate rejected it)"
    return (
        f"# {metrics_json.get('method')} · {metrics_json.get('protocol')}\n\n"
        f"Learned in order: {order} ({len(steps)} steps). After the last step, in %:\n\n"
        f"{final_table(metrics_json)}\n\n"
        f"Final bank version `{bank}`; final step promoted: {promoted}.\n\n{mlflow_section(tracker)}\n"
    )


def run_key(method: Any, protocol: Any, out: Any) -> str:
    """Artifact key of a continual run: ``contad-<method>-<protocol>-<out folder>-<6 hex of its absolute path>``.

    One key per run directory, so the Prefect UI's "latest" of a key is this run's table (a resumed
    run adds a version to its own key), never another run's of the same method and protocol.
    """
    import hashlib
    from pathlib import Path

    base = f"contad-{method}-{protocol}"
    if not out:
        return artifact_key(base)
    path = Path(str(out)).absolute()
    return artifact_key(f"{base}-{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:6]}")


def publish_summary(metrics_json: dict[str, Any], tracker: Any) -> str | None:
    """The continual run's markdown artifact (key ``run_key``: per method, protocol and run directory)."""
    try:
        out = _parameters().get("out")
    except Exception:  # noqa: BLE001 - no flow run parameters: the key names method and protocol only
        out = None
    key = run_key(metrics_json.get("method"), metrics_json.get("protocol"), out)
    return publish_markdown(key, run_summary_markdown(metrics_json, tracker), "final accuracy table and MLflow run of a contad run")


def add_product_key(name: str, store: Any) -> str:
    """Artifact key of an add-product run: ``contad-add-product-<name>-<store's folder>-<6 hex of its absolute path>``.

    One key per (product, bank store), so the Prefect UI's "latest" of a key is this store's table, never the
    table of the same product name added to another store (another demo, another line).
    """
    import hashlib
    from pathlib import Path

    path = Path(str(store)).absolute()
    folder = path.parent.name if path.name == "banks" and path.parent.name else path.name
    return artifact_key(f"contad-add-product-{name}-{folder}-{hashlib.sha256(str(path).encode()).hexdigest()[:6]}")


def publish_add_product(name: str, step: int, metrics: dict[str, dict[str, float]], gate: dict[str, Any], bank_version: str,
                        model_version: str | None, tracker: Any, store: Any) -> str | None:
    """The add-product run's markdown artifact (key ``add_product_key``: per product and bank store): metrics of
    every product after the step, the gate, the MLflow run."""
    decision = "passed: promoted" if gate.get("passed") else "rejected: " + "; ".join(str(r) for r in gate.get("reasons") or [])
    markdown = (
        f"# add-product {name} (step {step})\n\nEvery learned product after the step, in %:\n\n{metrics_table(metrics)}\n\n"
        f"Promotion gate {decision}.\n\nBank version `{bank_version[:12]}`, model version {model_version or '-'}.\n\n"
        f"{mlflow_section(tracker)}\n"
    )
    return publish_markdown(add_product_key(name, store), markdown, f"metrics and promotion gate of adding {name} to {store}")
