"""The continual_run flow: outputs, resume after a failure, refusal of a changed config, retries."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from components.data.protocol import task_name
from components.errors import ContadError, DataError
from components.memory.store import BankStore
from flows.cli import main
from tests.test_pipeline_helpers import FitCounter, make_tiny_products, shared_prefect_api, tiny_config

TINY_CLI = [
    "promotion.min_new_image_auroc=0.0", "promotion.max_forgetting=1.0", "promotion.max_false_reject_rate=1.0",
    "data.image_size=64", "data.heldout_fraction=0.2", "masks.image_size=64", "masks.workers=1",
    "ucad.epochs=1", "ucad.key_size=16", "ucad.knowledge_size=32", "ucad.batch_size=4",
    "ucad.pairs_per_image=32", "eval.overlays_per_task=0", "tracking.enabled=false",
]


@pytest.fixture(scope="module")
def prefect_api(request: pytest.FixtureRequest) -> str:
    return shared_prefect_api(request)


@pytest.fixture(scope="module")
def products(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_products(tmp_path_factory.mktemp("pipeline") / "data", n_products=3)


def _cli_run(out: Path, data: Path, cache: Path, *extra: str) -> int:
    return main(["run", "--out", str(out), f"data.root={data}", f"masks.cache_dir={cache}", *TINY_CLI, *extra])


def _doc(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_resume_after_failure_continues_and_matches_uninterrupted_run(
    prefect_api: str, products: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "mask_cache"
    full, resumed = tmp_path / "full", tmp_path / "resumed"

    fits = FitCounter(monkeypatch)
    assert _cli_run(full, products, cache) == 0
    order = list(fits.calls)
    assert len(order) == 3

    # an interrupted attempt: the 3rd task fails while training
    failing = FitCounter(monkeypatch, fail_at_call=3)
    assert _cli_run(resumed, products, cache) == 70  # an unexpected error: one line, exit 70 (traceback with --verbose)
    assert failing.calls == order
    steps = sorted(p.name for p in (resumed / "steps").iterdir())
    assert steps == [f"00-{order[0]}", f"01-{order[1]}"], "only completed steps leave a record (no partial step)"
    store = BankStore(resumed / "banks")
    assert len(store.list()) == 2
    assert store.current() == json.loads((resumed / "steps" / steps[1] / "step.json").read_text())["bank_version"]
    assert not (resumed / "metrics.json").exists()

    # the same command again: tasks 1-2 are not retrained, task 3 is
    again = FitCounter(monkeypatch)
    assert _cli_run(resumed, products, cache) == 0
    assert again.calls == [order[2]]

    a, b = _doc(full), _doc(resumed)
    assert b["matrix"] == a["matrix"]
    assert b["final"] == a["final"] and b["forgetting"] == a["forgetting"]
    assert b["bank_version"] == a["bank_version"], "same content-hashed final state as the uninterrupted run"

    versions = BankStore(resumed / "banks").list()
    assert [v.step for v in versions] == [0, 1, 2]
    assert versions[-1].current and versions[-1].parent == versions[1].version
    manifest = BankStore(resumed / "banks").show(versions[-1].version)
    assert set(manifest["products"]) == set(order)
    assert all(Path(d).name == p for p, d in manifest["products"].items())
    assert manifest["metrics"][order[0]]["image_auroc"] == a["matrix"]["image_auroc"][2][a["tasks"].index(order[0])]

    # outputs of a run: metrics, report, figures, matrices as CSV for DVC plots
    for out in (full, resumed):
        assert (out / "report.md").is_file()
        assert any((out / "figures").glob("*.png"))
        header = (out / "matrices" / "image_auroc.csv").read_text().splitlines()[0]
        assert header == "step,task," + ",".join(a["tasks"])
        assert len((out / "matrices" / "average.csv").read_text().splitlines()) == 4
        assert any((out / ".prefect-results").iterdir()), "task results are persisted under OUT"

    # a different configuration in the same directory is refused (nothing is trained)
    changed = FitCounter(monkeypatch)
    with pytest.raises(ContadError, match=r"different configuration \(changed: .*ucad\.epochs \(1 -> 2\)"):
        from flows.pipeline import run_command

        run_command(tiny_config(products, tmp_path, "ucad.epochs=2"), resumed)
    assert changed.calls == []
    assert main(["run", "--out", str(resumed), f"data.root={products}", f"masks.cache_dir={cache}", *TINY_CLI, "ucad.epochs=2"]) == 2


def test_retry_condition_only_retries_transient_io() -> None:
    from prefect.states import Completed, Failed

    from flows.pipeline_tasks import retry_on_transient_io

    assert retry_on_transient_io(None, None, Failed(data=OSError(errno.EIO, "I/O error")))
    assert not retry_on_transient_io(None, None, Failed(data=FileNotFoundError("gone")))
    assert not retry_on_transient_io(None, None, Failed(data=DataError("bad image")))
    assert not retry_on_transient_io(None, None, Failed(data=RuntimeError("nan loss")))
    assert not retry_on_transient_io(None, None, Completed(data=1))


@pytest.mark.slow  # starts the session's Prefect test server
def test_building_block_retries_transient_io_errors(prefect_api: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import flows.pipeline as pipeline

    calls: list[str] = []

    def flaky_commit(self, method_dir, meta, make_current=True):  # type: ignore[no-untyped-def]
        calls.append(meta["task"])
        if len(calls) == 1:
            raise OSError(errno.EIO, "transient I/O error")
        if meta["task"] == "bad":
            raise ValueError("deterministic")
        return "f" * 64

    monkeypatch.setattr(BankStore, "commit", flaky_commit)
    cfg = tiny_config(tmp_path, tmp_path, f"banks.store_dir={tmp_path / 'banks'}")
    fast = pipeline.version_memory_bank.with_options(retry_delay_seconds=0)
    assert fast(cfg, tmp_path, {"task": "ok", "step": 0}) == "f" * 64
    assert calls == ["ok", "ok"]
    with pytest.raises(ValueError, match="deterministic"):
        fast(cfg, tmp_path, {"task": "bad", "step": 1})
    assert calls == ["ok", "ok", "bad"], "deterministic errors are not retried"


def test_step_records_reject_mismatched_task(tmp_path: Path) -> None:
    from flows.records import read_step_record, step_dir

    d = step_dir(tmp_path, 0, "a+b")
    d.mkdir(parents=True)
    assert d.name == "00-a+b"
    assert read_step_record(tmp_path, 0, "a+b") is None
    (d / "step.json").write_text(json.dumps({"task": "other", "step": 0}))
    with pytest.raises(ContadError, match="expected 'a\\+b'"):
        read_step_record(tmp_path, 0, "a+b")


@pytest.mark.slow  # starts the session's Prefect test server
def test_x_y_protocol_with_a_baseline_method(prefect_api: str, products: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.pipeline import run_command

    fits = FitCounter(monkeypatch)
    cfg = tiny_config(products, tmp_path, "method=patchcore_finetune", "protocol.base_tasks=2", "protocol.step_tasks=1")
    assert run_command(cfg, tmp_path / "xy") == 0
    doc = json.loads((tmp_path / "xy" / "metrics.json").read_text())
    first, last = doc["tasks"][:2], doc["tasks"][2]
    assert doc["protocol"] == "2-1" and doc["steps"] == [first, [last]]
    assert fits.calls == [task_name(first), last]
    assert doc["matrix"]["image_auroc"][0][2] is None and doc["matrix"]["image_auroc"][1][2] is not None
    assert sorted(p.name for p in (tmp_path / "xy" / "steps").iterdir()) == [f"00-{task_name(first)}", f"01-{last}"]
    assert not (tmp_path / "mask_cache").exists(), "PatchCore needs no structure masks"
    manifest = BankStore(tmp_path / "xy" / "banks").show(doc["bank_version"])
    assert manifest["task_of_product"] == {first[0]: task_name(first), first[1]: task_name(first), last: last}


@pytest.mark.slow  # starts the session's Prefect test server
def test_invalid_dataset_stops_before_training(prefect_api: str, products: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(products, broken)
    victim = sorted((broken / sorted(p.name for p in broken.iterdir() if (p / "train").is_dir())[0] / "train" / "good").iterdir())[0]
    victim.write_bytes(b"not an image")
    fits = FitCounter(monkeypatch)
    assert _cli_run(tmp_path / "out", broken, tmp_path / "cache") == 2
    assert victim.name in capsys.readouterr().err
    assert fits.calls == [] and not (tmp_path / "out" / "steps").exists()


def test_a_product_rejected_at_one_step_is_checked_again_by_every_later_gate(
        prefect_api: str, products: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced failure: the gate rejects any step whose new products include the second product. It is never
    walked around: no later bank version that contains it becomes current, each later gate lists it as new."""
    import flows.promotion
    from flows.pipeline import run_command

    real_gate = flows.promotion.promotion_gate
    names = sorted(p.name for p in products.iterdir() if p.is_dir() and not p.name.startswith("."))
    rejected = names[1]
    seen: list[list[str]] = []

    def gate(cfg, new_products, after, before=None):  # type: ignore[no-untyped-def]
        seen.append(list(new_products))
        decision = real_gate(cfg, new_products, after, before)
        if rejected in new_products:
            decision.passed = False
            decision.reasons.append(f"forced: {rejected} rejected")
        return decision

    monkeypatch.setattr(flows.promotion, "promotion_gate", gate)
    cfg = tiny_config(products, tmp_path, "method=patchcore_oracle", "promotion.max_false_reject_rate=1.0")
    assert run_command(cfg, tmp_path / "run") == 1  # the final step contains the rejected product: not promoted
    assert seen == [[names[0]], [names[1]], [names[1], names[2]]]  # step 3's gate checks the product step 2 failed
    store = BankStore(tmp_path / "run" / "banks")
    current = store.show(store.current())
    assert rejected not in current["task_of_product"] and current["step"] == 0
    record = json.loads((tmp_path / "run" / "steps" / f"02-{names[2]}" / "step.json").read_text())
    assert not record["promotion"]["passed"] and any(rejected in line for line in record["promotion"]["checked"])
