"""``contad feedback``: verdicts in the store, learning false rejects into a gated bank version, escapes in the gate.

A 2-product UCAD sequence (tiny synthetic products, 64 px) is trained once per module; every test
works on its own copy of the bank store and MLflow store.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from components.config import Config, config_to_dict
from components.decision import Detector
from components.errors import ContadError, DataError
from components.memory.feedback import ESCAPE, FALSE_REJECT, FeedbackLog
from components.memory.store import BankLockTimeout, BankStore
from flows.add_product import add_product_command
from flows.cli import main
from flows.feedback import apply_feedback, escape_check, record_feedback
from flows.promotion import GateDecision
from flows.tracking import champion_version
from tests.tracking_support import linked_dataset, tiny_config, tiny_products


def _ucad(cfg: Config, **overrides: object) -> Config:
    doc = config_to_dict(cfg)
    doc["method"] = "ucad"
    doc["ucad"] = {**doc["ucad"], "key_size": 16, "knowledge_size": 32, "batch_size": 4}
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        doc[section] = {**doc[section], key: value}
    return Config.model_validate(doc)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from flows.pipeline import execute

    root = tmp_path_factory.mktemp("feedback_base")
    folders = tiny_products(root / "data", n_products=3, seed=3)
    dataset = linked_dataset(root / "dataset", folders[:2])
    execute(_ucad(tiny_config(root / "work", dataset)), root / "work")
    return SimpleNamespace(work=root / "work", dataset=dataset, a=folders[0], b=folders[1], new=folders[2])


def _copy(base: SimpleNamespace, dest: Path, **overrides: object) -> Config:
    dest.mkdir(parents=True)
    shutil.copytree(base.work / "banks", dest / "banks")
    shutil.copy2(base.work / "mlflow.db", dest / "mlflow.db")
    return _ucad(tiny_config(dest, base.dataset), **overrides)


def _champion(cfg: Config) -> Detector:
    store = BankStore(cfg.banks.store_dir)
    current = store.current()
    return Detector.from_method_dir(store.state_dir(current), cfg, bank_version=current)


def _decide(detector: Detector, paths: list[Path]) -> list:
    return detector.decide([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def test_false_rejects_marked_good_are_learned_and_nothing_else_changes(base: SimpleNamespace, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _copy(base, tmp_path / "work", decision__target_fpr=0.9)  # a strict threshold: good parts are rejected
    store = BankStore(cfg.banks.store_dir)
    before_version = store.current()
    b_good = sorted((base.b / "test" / "good").glob("*.png"))
    a_test = sorted((base.a / "test").rglob("*.png"))
    champion = _champion(cfg)
    rejected = [p for p, v in zip(b_good, _decide(champion, b_good), strict=True) if v.decision == "NG" and v.product == base.b.name]
    assert rejected, "the strict threshold rejects some good images of product B"
    a_before = [v.score for v in _decide(champion, a_test)]

    records = record_feedback(cfg, [str(p) for p in rejected], "good", product=base.b.name, by="tester")
    assert [r.kind for r in records] == [FALSE_REJECT] * len(rejected)
    assert all(r.bank_version == before_version and r.by == "tester" and r.decision == "NG" for r in records)
    assert all((store.root / "feedback" / r.image).is_file() for r in records)

    assert apply_feedback(cfg, tmp_path / "out")["applied"] is False  # below feedback.min_images (5)
    assert store.current() == before_version
    result = apply_feedback(cfg, tmp_path / "out", force=True)

    assert result["applied"] and result["promoted"] and result["now_ok"] == len(rejected)
    new_version = store.current()
    assert new_version == result["bank_version"] != before_version
    manifest = store.show(new_version)
    assert manifest["trigger"] == "feedback" and manifest["parent"] == before_version and manifest["tasks"] == store.show(before_version)["tasks"]
    how = manifest["feedback"]["how"]  # each image learned only the share of its patches it needed (at most the cap)
    assert sorted(how) == sorted(r.id for r in records) and all(h["now_ok"] and 0 < h["share"] <= cfg.feedback.patch_share for h in how.values())
    assert any(check.startswith(f"old product {base.b.name!r}: escape_rate") for check in manifest["gate"]["checked"])
    after = _champion(cfg)
    assert [v.decision for v in _decide(after, rejected)] == ["OK"] * len(rejected)
    assert [v.score for v in _decide(after, a_test)] == a_before  # the other product: bit-identical scores
    assert all(r.learned_in == new_version for r in FeedbackLog(store.root).read())
    client = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    version = client.get_model_version(cfg.tracking.registered_model, result["model_version"])
    assert version.tags["bank_version"] == new_version and version.tags["feedback_false_rejects"] == str(len(rejected))
    assert champion_version(client, cfg.tracking.registered_model) == (result["model_version"], new_version)
    assert main(["feedback", "apply", "--force", "--out", str(tmp_path / "again"), *_overrides(cfg)]) == 0  # learned once: nothing to do
    assert "nothing applied: 0 false reject(s) waiting" in capsys.readouterr().out and store.current() == new_version

    assert main(["feedback", "list", "--json", *_overrides(cfg)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in listed] == [r.id for r in records] and all(r["model_version"] and r["learned_in"] == new_version for r in listed)


def _overrides(cfg: Config) -> list[str]:
    return [f"banks.store_dir={cfg.banks.store_dir}", f"tracking.uri={cfg.tracking.uri}", "method=ucad"]


def test_escapes_are_recorded_and_checked_by_the_gate(base: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _copy(base, tmp_path / "work")
    passed = sorted((base.a / "train" / "good").glob("*.png"))[:2]  # learned images: decided OK; the operator says defect
    assert main(["predict", *map(str, passed), "--bank", cfg.banks.store_dir, "--out", str(tmp_path / "line"), *_overrides(cfg)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "line" / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction_id"] for r in rows] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in passed]
    capsys.readouterr()
    assert main(["feedback", *(r["prediction_id"][:12] for r in rows), "--as", "defect", "--product", base.a.name, "--by", "inspector",
                 "--predictions", str(tmp_path / "line" / "predictions.jsonl"), *_overrides(cfg)]) == 0
    assert "2 verdict(s) recorded" in capsys.readouterr().out
    records = FeedbackLog(cfg.banks.store_dir).read()
    assert [r.kind for r in records] == [ESCAPE, ESCAPE] and [r.score for r in records] == [r["score"] for r in rows]  # the line's decision
    feedback = FeedbackLog(cfg.banks.store_dir)
    assert [r.id for r in feedback.escapes()] == [r.id for r in records]

    champion = _champion(cfg)
    same = GateDecision(passed=True)
    assert escape_check(same, feedback, champion, champion, cfg.serve.max_pixels) == {base.a.name: {"escapes": 2, "passed_before": 2, "passed_after": 2}}
    assert same.passed and any("recorded escapes" in line for line in same.checked)

    def detector(decision: str) -> SimpleNamespace:
        return SimpleNamespace(config=cfg, decide=lambda rgbs: [SimpleNamespace(decision=decision) for _ in rgbs])

    assert add_product_command(cfg, base.new, name="newcomer", out=tmp_path / "add", via_server=False) == 0  # its gate scores them
    added = BankStore(cfg.banks.store_dir).show(BankStore(cfg.banks.store_dir).current())
    assert added["escapes"] == {base.a.name: {"escapes": 2, "passed_before": 2, "passed_after": 2}}
    assert any("recorded escapes" in line for line in added["gate"]["checked"])

    worse = GateDecision(passed=True)
    escape_check(worse, feedback, detector("OK"), detector("NG"), cfg.serve.max_pixels)
    assert not worse.passed and "passes 2 of its 2 recorded escapes (champion: 0)" in worse.reasons[0]


def test_bad_feedback_is_a_one_line_error_and_changes_nothing(base: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _copy(base, tmp_path / "work")
    image = sorted((base.b / "test" / "good").glob("*.png"))[0]
    record_feedback(cfg, [str(image)], "good")
    verdicts = FeedbackLog(cfg.banks.store_dir).verdicts_file.read_text()

    with pytest.raises(ContadError, match="already has a verdict"):
        record_feedback(cfg, [str(image)], "defect")
    with pytest.raises(ContadError, match="unknown product 'nope'"):
        record_feedback(cfg, [str(sorted((base.a / "test" / "good").glob("*.png"))[0])], "good", product="nope")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        record_feedback(cfg, [str(broken)], "good")
    assert main(["feedback", str(image), "--as", "good", *_overrides(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already has a verdict" in err[0]
    assert FeedbackLog(cfg.banks.store_dir).verdicts_file.read_text() == verdicts


def test_feedback_waits_for_the_store_lock_or_gives_up(base: SimpleNamespace, tmp_path: Path) -> None:
    cfg = _copy(base, tmp_path / "work")
    image = str(sorted((base.b / "test" / "good").glob("*.png"))[0])
    holder = subprocess.Popen(  # another command (e.g. add-product) holds the store's lock for a few seconds
        [sys.executable, "-c", "import sys, time; from components.memory.store import BankStore\n"
         "with BankStore(sys.argv[1]).lock(5):\n    print('held', flush=True); time.sleep(float(sys.argv[2]))",
         cfg.banks.store_dir, "4"], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg.banks.lock_timeout_s = 0.5
        with pytest.raises(BankLockTimeout, match="banks.lock_timeout_s"):
            record_feedback(cfg, [image], "good")
        assert not FeedbackLog(cfg.banks.store_dir).verdicts_file.exists()
        cfg.banks.lock_timeout_s = 120.0
        assert len(record_feedback(cfg, [image], "good")) == 1  # waits for the holder, then records
    finally:
        holder.kill()
        holder.wait()


def test_rest_feedback_records_what_the_service_decided(base: SimpleNamespace, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from flows.api import create_app
    from flows.deployed import BankSource

    cfg = _copy(base, tmp_path / "work")
    data, other = (p.read_bytes() for p in sorted((base.b / "test" / "good").glob("*.png"))[1:3])
    auth = {"Authorization": "Bearer secret", "Content-Type": "application/octet-stream"}
    with TestClient(create_app(cfg, BankSource(cfg.banks.store_dir, cfg), token="secret")) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.post("/v1/feedback", params={"verdict": "good"}, content=data).status_code == 401  # same auth as predict
        predicted = client.post("/v1/predict", content=data, headers=auth).json()
        answer = client.post("/v1/feedback", params={"verdict": "good", "by": "line-3"}, content=data, headers=auth)
        assert answer.status_code == 200, answer.text
        record = answer.json()
        assert record["id"] == hashlib.sha256(data).hexdigest() and record["by"] == "line-3" and record["product"] == predicted["product"]
        assert (record["score"], record["decision"], record["bank_version"]) == (predicted["score"], predicted["decision"], predicted["bank_version"])
        again = client.post("/v1/feedback", params={"verdict": "defect"}, content=data, headers=auth)
        assert again.status_code == 400 and "already has a verdict" in again.json()["detail"]
        unknown = client.post("/v1/feedback", params={"verdict": "good", "product": "nope"}, content=other, headers=auth)
        assert unknown.status_code == 400 and "unknown product 'nope'" in unknown.json()["detail"]
        assert client.post("/v1/feedback", params={"verdict": "maybe"}, content=data, headers=auth).status_code == 422
    assert [r.id for r in FeedbackLog(cfg.banks.store_dir).read()] == [record["id"]]


def test_rest_feedback_by_prediction_id_of_a_recent_prediction(base: SimpleNamespace, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from flows.api import create_app
    from flows.deployed import BankSource

    cfg = _copy(base, tmp_path / "work")
    cfg.serve.feedback_cache = 2
    first, second, third = (p.read_bytes() for p in sorted((base.b / "test" / "good").glob("*.png"))[:3])
    auth = {"Content-Type": "application/octet-stream"}
    with TestClient(create_app(cfg, BankSource(cfg.banks.store_dir, cfg))) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        predicted = [client.post("/v1/predict", content=data, headers=auth).json() for data in (first, second, third)]
        assert [p["prediction_id"] for p in predicted] == [hashlib.sha256(d).hexdigest() for d in (first, second, third)]
        dropped = client.post("/v1/feedback", params={"verdict": "good", "prediction_id": predicted[0]["prediction_id"]})
        assert dropped.status_code == 404 and "not among the last 2 predictions" in dropped.json()["detail"]  # the cache keeps 2
        assert client.post("/v1/feedback", params={"verdict": "good", "prediction_id": "abc"}).status_code == 422  # < 8 characters
        both = client.post("/v1/feedback", params={"verdict": "good", "prediction_id": predicted[2]["prediction_id"]}, content=third, headers=auth)
        assert both.status_code == 400 and "not both" in both.json()["detail"]
        answer = client.post("/v1/feedback", params={"verdict": "defect", "prediction_id": predicted[2]["prediction_id"][:10], "by": "line-1"})
        assert answer.status_code == 200, answer.text
        record = answer.json()
        assert record["id"] == predicted[2]["prediction_id"] and record["by"] == "line-1" and record["verdict"] == "defect"
        assert (record["score"], record["decision"], record["bank_version"]) == (predicted[2]["score"], predicted[2]["decision"], predicted[2]["bank_version"])
        assert client.post("/v1/feedback", params={"verdict": "good", "prediction_id": predicted[2]["prediction_id"]}).status_code == 400  # twice
    log = FeedbackLog(cfg.banks.store_dir)
    [stored] = log.read()
    assert log.image_bytes(stored) == third  # the cached image bytes were stored

    cache_entries = [("ab" * 4 + "0" * 56, b"x"), ("ab" * 4 + "1" * 56, b"y")]
    from flows.prediction_cache import AmbiguousPrediction, CachedPrediction, PredictionCache

    cache = PredictionCache(4)
    for ident, data in cache_entries:
        cache.put(ident, CachedPrediction(data, {}, None, None))
    with pytest.raises(AmbiguousPrediction, match="ambiguous"):
        cache.find("abababab")
    assert cache.find("abababab1")[1].data == b"y"
    off = PredictionCache(0)
    off.put(cache_entries[0][0], CachedPrediction(b"x", {}, None, None))
    assert len(off) == 0
    bounded = PredictionCache(10, max_bytes=5)  # the oldest images go once they hold more than 5 bytes together
    for ident, data in (("a" * 64, b"123"), ("b" * 64, b"45"), ("c" * 64, b"6")):
        bounded.put(ident, CachedPrediction(data, {}, None, None))
    assert len(bounded) == 2 and bounded.find("cccccccc")[1].data == b"6" and bounded.find("bbbbbbbb")[1].data == b"45"
    bounded.put("d" * 64, CachedPrediction(b"0123456789", {}, None, None))  # one image over the bound is still kept alone
    assert len(bounded) == 1 and bounded.find("dddddddd")


def test_report_shows_the_operator_feedback_of_the_store(base: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from flows.feedback_report import feedback_summary

    cfg = _copy(base, tmp_path / "work")
    escapes = sorted((base.a / "train" / "good").glob("*.png"))[:2]  # learned images: decided OK; the operator says defect
    record_feedback(cfg, list(map(str, escapes)), "defect", product=base.a.name)
    strict = cfg.model_copy(deep=True)
    strict.decision.target_fpr = 0.9  # a strict threshold at the line: good parts rejected
    goods = record_feedback(strict, [str(p) for p in sorted((base.b / "test" / "good").glob("*.png"))[:3]], "good", product=base.b.name)
    log = FeedbackLog(cfg.banks.store_dir)
    assert [r.kind for r in log.read()[:2]] == [ESCAPE, ESCAPE]
    false_rejects = [r.id for r in goods if r.kind == FALSE_REJECT]
    assert false_rejects
    log.mark_learned(false_rejects[:1], "fb" * 32)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(config_to_dict(cfg)))
    capsys.readouterr()

    assert main(["report", str(base.work), "--store", cfg.banks.store_dir, "--params", str(params), "--out", str(tmp_path / "report")]) == 0
    summary = json.loads((tmp_path / "report" / "feedback.json").read_text())
    a, b = summary["products"][base.a.name], summary["products"][base.b.name]
    assert summary["verdicts"] == 5 and summary["bank_version"] == BankStore(cfg.banks.store_dir).current()
    assert (a["escape"], a["false_reject"], a["escapes_passed_now"]) == (2, 0, 2)  # the current version still passes both
    assert b["false_reject"] == len(false_rejects) and b["confirmed_ok"] == 3 - len(false_rejects) and b["escape"] == 0
    assert b["false_rejects_learned"] == 1 and b["learned_in"] == {"fb" * 32: 1} and b["escapes_passed_now"] == 0
    text = (tmp_path / "report" / "comparison.md").read_text()
    assert "## Operator feedback" in text and f"| {base.a.name} | 0 | 2 | 0 | 0 | 0 (-) | 2 of 2 |" in text
    assert f"1 in {'fb' * 6}" in text

    never = SimpleNamespace(config=cfg, decide=lambda rgbs: [SimpleNamespace(decision="NG") for _ in rgbs])
    assert feedback_summary(cfg, Path(cfg.banks.store_dir), never)["products"][base.a.name]["escapes_passed_now"] == 0  # scored, not copied


def test_methods_without_incremental_feedback_say_so() -> None:
    import torch

    from components.methods.base import ContinualMethod

    with pytest.raises(ContadError, match="method 'patchcore_finetune' cannot learn feedback incrementally"):
        ContinualMethod.extend_task(SimpleNamespace(name="patchcore_finetune"), "task", torch.zeros(1, 3, 8, 8))  # type: ignore[arg-type]


def test_a_failing_event_sink_never_fails_the_verdict(base: SimpleNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.tracking_support import free_port

    cfg = _copy(base, tmp_path / "work")
    image = sorted((base.b / "test" / "good").glob("*.png"))[0]
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}), caplog.at_level("WARNING", "flows.feedback"):
        assert len(record_feedback(cfg, [str(image)], "good")) == 1
    assert [r.getMessage() for r in caplog.records if "contad.feedback.recorded could not be sent" in r.getMessage()] != []
    assert len(FeedbackLog(cfg.banks.store_dir).read()) == 1
