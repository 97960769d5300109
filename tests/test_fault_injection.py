"""Crash recovery: kill ``add-product`` and ``contad run`` (``os._exit`` in a subprocess, like kill -9)
at every commit point, then check the control-plane invariants after recovery and that a rerun
reproduces an uninterrupted run's metrics. Also two concurrent add-products on one store.

Children run the flows' plain functions (Prefect tasks replaced by ``.fn``) so no Prefect server
starts; the 2-product base sequence is trained once per session (``tracking_support.trained_base``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.metric_support import assert_same_metrics
from mlflow.tracking import MlflowClient

from components.config import Config, config_to_dict
from components.faults import FAULT_ENV, FAULT_EXIT_CODE, FAULT_POINTS
from components.memory.store import BankStore
from flows.promotion import Registry, registry_for, store_transaction
from tests.tracking_support import TrainedBase, copy_base, tiny_config, trained_base

REPO = Path(__file__).resolve().parents[1]
TASKS = ("validate_dataset", "cache_masks", "train_task", "evaluate_all_tasks", "version_memory_bank",
         "register_model", "promote_if_gate_passes", "report_task", "publish_run")
CHILD = f"""
import json, sys
from pathlib import Path
from components.config import Config
from flows import add_product as add_module, pipeline
for name in {TASKS!r}:
    setattr(pipeline, name, getattr(pipeline, name).fn)
add_module._track = add_module._track.fn
cfg = Config.model_validate(json.loads(Path(sys.argv[2]).read_text()))
if sys.argv[1] == "add":
    from flows.add_product import add_product
    result = add_product(cfg, Path(sys.argv[3]), sys.argv[4], Path(sys.argv[5])).to_dict()
else:
    result = pipeline.continual_run.fn(cfg, Path(sys.argv[3]))
print("RESULT " + json.dumps(result["metrics"] if sys.argv[1] == "add" else result["matrix"]))
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> TrainedBase:
    return trained_base(tmp_path_factory)


@pytest.fixture
def plain_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the pipeline's Prefect tasks as plain functions in this process (no Prefect server)."""
    from flows import add_product, pipeline

    for name in TASKS:
        monkeypatch.setattr(pipeline, name, getattr(pipeline, name).fn)
    monkeypatch.setattr(add_product, "_track", add_product._track.fn)


def _child(cfg: Config, tmp_path: Path, args: list[str], fault: str | None) -> subprocess.Popen:
    config = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.json"
    config.write_text(json.dumps(config_to_dict(cfg)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.Popen([sys.executable, "-c", CHILD, args[0], str(config), *args[1:]], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def _promoted_banks(registry: Registry) -> list[str]:
    """Bank versions of every model version whose step run was tagged promoted."""
    client = MlflowClient(tracking_uri=registry.uri, registry_uri=registry.uri)
    banks = []
    for version in client.search_model_versions(f"name = '{registry.model}'"):
        if client.get_run(version.run_id).data.tags.get("contad.promoted") == "true":
            banks.append(version.tags["bank_version"])
    return banks


def check_invariants(cfg: Config) -> None:
    """CURRENT == champion's bank; every promoted version's products are current; every version verifies; no RUNNING run of a dead process."""
    store, registry = BankStore(cfg.banks.store_dir), registry_for(cfg)
    assert registry is not None
    current = store.current()
    assert current is not None and registry.champion_bank() == current
    current_products = set(store.show(current)["products"])
    for bank in _promoted_banks(registry):
        assert set(store.show(bank)["products"]) <= current_products, f"products of promoted bank {bank[:12]} lost"
    for entry in store.list():
        store.verify(entry.version)
    journal = store.read_journal()
    assert journal is None or journal["state"] == "committed"


def _recover(cfg: Config) -> None:
    """What the next command does first: lock the store and repair an interrupted promotion."""
    with store_transaction(cfg):
        pass


def _no_running_runs(cfg: Config) -> None:
    client = MlflowClient(tracking_uri=registry_for(cfg).uri)  # type: ignore[union-attr]
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'")


# ---------------------------------------------------------------------------------- add-product
@pytest.fixture(scope="module")
def add_reference(base: TrainedBase, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Metrics of an uninterrupted add-product of ``base.new`` (plain functions, in-process)."""
    from flows import pipeline
    from flows.add_product import add_product

    work = tmp_path_factory.mktemp("add_reference")
    saved = {name: getattr(pipeline, name) for name in TASKS}
    try:
        for name in TASKS:
            setattr(pipeline, name, saved[name].fn)
        result = add_product(copy_base(base, work / "work"), base.new, "newcomer", work / "out")
    finally:
        for name, task in saved.items():
            setattr(pipeline, name, task)
    assert result.promoted
    return result.metrics


@pytest.mark.slow  # a child process per fault point (imports + training): ~15-20 s each on an idle 2-core machine
@pytest.mark.parametrize("point", FAULT_POINTS)
def test_add_product_killed_at_commit_point_recovers(point: str, base: TrainedBase, add_reference: dict[str, Any], tmp_path: Path, plain_tasks: None) -> None:
    from flows.add_product import add_product

    cfg = copy_base(base, tmp_path / "work")
    store = BankStore(cfg.banks.store_dir)
    before = store.current()
    code, _, err = _finish(_child(cfg, tmp_path, ["add", str(base.new), "newcomer", str(tmp_path / "out")], point))
    assert code == FAULT_EXIT_CODE, err[-2000:]
    if point == "between_pointer_and_alias":  # readers during the pending journal serve what recovery restores, lock-free
        assert store.current() != before and store.read_journal()["state"] == "pending"
        _predict_bank_version(cfg, base, tmp_path / "predict", before)
    _recover(cfg)
    check_invariants(cfg)
    assert store.current() == before  # nothing of the killed step is in service

    result = add_product(cfg, base.new, "newcomer", tmp_path / "out")
    assert result.promoted and store.current() == result.bank_version
    check_invariants(cfg)
    _no_running_runs(cfg)
    assert_same_metrics(result.metrics, add_reference)


def _predict_bank_version(cfg: Config, base: TrainedBase, out: Path, expected: str | None) -> None:
    """``contad predict --bank STORE`` decides with bank version ``expected``."""
    from flows.predict import predict_command

    image = next((base.old[0] / "test" / "good").iterdir())
    assert predict_command(cfg, [str(image)], out, bank=cfg.banks.store_dir) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [row["bank_version"] for row in rows] == [expected]


@pytest.mark.slow  # one add-product in-process (~15 s)
def test_second_store_on_the_registry_and_a_promotion_killed_before_its_record(base: TrainedBase, tmp_path: Path, plain_tasks: None,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 36: a second store on the same tracking.uri (as two `contad run --out`) keeps its own champion; add-product
    on the first is not a ChampionMismatch, doctor on either moves only its own; a rerun after a committed promotion
    killed before add_product.json finishes the record instead of exiting 2 "already learned"."""
    from flows import add_product as add_module
    from flows.promotion import banks_command
    from tests.test_store_identity import _learn

    sx = copy_base(base, tmp_path / "sx")
    sy = copy_base(base, tmp_path / "sy")
    sy.tracking.uri = sx.tracking.uri
    shutil.rmtree(sy.banks.store_dir)  # sy: a new store on sx's registry (a synthetic version: no training)
    y_bank, y_model = _learn(sy, tmp_path / "ystate", b"y1")
    ry, rx = registry_for(sy), registry_for(sx)
    assert ry is not None and rx is not None and ry.model != rx.model == "contad-detector" and ry.champion_bank() == y_bank

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("killed after the promotion committed, before add_product.json")

    monkeypatch.setattr(add_module, "publish_add_product", killed)
    with pytest.raises(KeyboardInterrupt):
        add_module.add_product(sx, base.new, "newcomer", tmp_path / "out")
    store = BankStore(sx.banks.store_dir)
    assert store.show(store.current())["task"] == "newcomer" and not (tmp_path / "out" / "add_product.json").exists()
    result = add_module.add_product(sx, base.new, "newcomer", tmp_path / "out")
    assert result.promoted and result.bank_version == store.current() and result.model_version == rx.champion()
    assert json.loads((tmp_path / "out" / "add_product.json").read_text())["bank_version"] == store.current()
    check_invariants(sx)
    assert banks_command(sx, "doctor", None, None) == 0 and banks_command(sy, "doctor", None, None) == 0
    assert ry.champion() == y_model and ry.champion_bank() == y_bank and rx.champion_bank() == store.current()


@pytest.mark.slow
def test_edited_registered_calibration_is_found_by_doctor_and_refused_by_readers(base: TrainedBase, tmp_path: Path,
                                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from components.memory.store import BankError
    from flows.deployed import RegistrySource
    from flows.promotion import banks_command

    cfg = copy_base(base, tmp_path / "work")
    registry = registry_for(cfg)
    assert registry is not None and banks_command(cfg, "doctor", None, None) == 0
    client = MlflowClient(tracking_uri=registry.uri, registry_uri=registry.uri)
    location = client.get_model_version_download_uri(registry.model, str(registry.champion()))
    calibration = next(Path(location.removeprefix("file://")).rglob("artifacts/method/calibration.json"))
    original = calibration.read_bytes()  # the artifacts are shared with the session's base: put them back
    try:
        doc = json.loads(original)
        calibration.write_text(json.dumps({**doc, "edited": True}))  # still valid JSON
        capsys.readouterr()
        assert banks_command(cfg, "doctor", None, None) == 1
        assert "calibration.json" in capsys.readouterr().out
        source = RegistrySource(f"models:/{registry.model}@champion", cfg)
        with pytest.raises(BankError, match="no longer hash to its bank version"):
            source.load(source.current())
    finally:
        calibration.write_bytes(original)


@pytest.mark.slow
def test_two_concurrent_add_products_lose_nothing(base: TrainedBase, tmp_path: Path) -> None:
    cfg = copy_base(base, tmp_path / "work")
    first = _child(cfg, tmp_path, ["add", str(base.new), "twin_a", str(tmp_path / "a")], None)
    second = _child(cfg, tmp_path, ["add", str(base.new), "twin_b", str(tmp_path / "b")], None)
    results = [_finish(first), _finish(second)]
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    assert sum("waiting for it to finish" in err for _, _, err in results) == 1  # the second one waited, visibly
    store = BankStore(cfg.banks.store_dir)
    assert {"twin_a", "twin_b"} | {p.name for p in base.old} == set(store.show(store.current())["products"])
    check_invariants(cfg)


# ---------------------------------------------------------------------------------- contad run
def _run_config(base: TrainedBase, work: Path) -> Config:
    return tiny_config(work, base.work.parent / "dataset")


@pytest.fixture(scope="module")
def run_reference(base: TrainedBase, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Accuracy matrix of the uninterrupted base run (``trained_base`` ran it with the same config)."""
    return json.loads((base.work / "metrics.json").read_text())["matrix"]


@pytest.mark.slow
@pytest.mark.parametrize("point", FAULT_POINTS)
def test_run_killed_at_commit_point_of_second_step_recovers(point: str, base: TrainedBase, run_reference: dict[str, Any], tmp_path: Path, plain_tasks: None) -> None:
    from flows import pipeline

    work = tmp_path / "work"
    cfg = _run_config(base, work)
    code, _, err = _finish(_child(cfg, tmp_path, ["run", str(work)], f"{point}:2"))
    assert code == FAULT_EXIT_CODE, err[-2000:]
    _recover(cfg)
    check_invariants(cfg)
    store = BankStore(cfg.banks.store_dir)
    first_step = json.loads(next((work / "steps").glob("00-*/step.json")).read_text())
    assert store.current() == first_step["bank_version"]  # back to the last promoted step

    metrics = pipeline.continual_run.fn(cfg, work)
    assert metrics["promoted"] and store.current() == metrics["bank_version"]
    check_invariants(cfg)
    _no_running_runs(cfg)
    assert_same_metrics(metrics["matrix"], run_reference)


def test_gate_rejected_steps_are_never_current(base: TrainedBase, tmp_path: Path, plain_tasks: None, capsys: pytest.CaptureFixture[str]) -> None:
    from flows import pipeline

    work = tmp_path / "work"
    cfg = tiny_config(work, base.work.parent / "dataset", min_new_image_auroc=1.01)  # no step can pass
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "execute", lambda c, out: pipeline.continual_run.fn(c, Path(out)))
        assert pipeline.run_command(cfg, work) == 1
    assert "failed the promotion gate" in capsys.readouterr().err
    store = BankStore(cfg.banks.store_dir)
    assert store.current() is None and len(store.list()) == 2  # both steps stored, neither current
    registry = registry_for(cfg)
    assert registry is not None and registry.champion() is None
    with pytest.MonkeyPatch.context() as patch:  # --allow-rejected (research runs, DVC): exit 0, still nothing current
        patch.setattr(pipeline, "execute", lambda c, out: pipeline.continual_run.fn(c, Path(out)))
        assert pipeline.run_command(cfg, work, allow_rejected=True) == 0
    assert store.current() is None and registry.champion() is None
