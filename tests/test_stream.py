"""Online mode: prequential order, update policies, folder watch, bad images, kill -9 and resume, bank versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import Config
from components.data.loading import denormalize, load_images
from components.memory.store import BankStore
from components.methods.lemo import LeMO
from flows.stream import KILL_AFTER_ENV, STREAM_LOG, run_stream, watch_folder
from tests.conftest import REPO_ROOT
from tests.methods_support import ToyBackbone, product_images, toy_config


def stream_config(**stream: object) -> Config:
    cfg = toy_config("lemo")
    cfg.lemo.key_size = 8
    cfg.stream.warmup = 4
    cfg.stream.checkpoint_every = 3
    for key, value in stream.items():
        setattr(cfg.stream, key, value)
    return cfg


def write_images(folder: Path, images: torch.Tensor, prefix: str) -> list[str]:
    """Save (N, 3, H, W) normalised images as PNGs; returns their absolute paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(denormalize(images)):
        path = folder / f"{prefix}{i:03d}.png"
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        paths.append(str(path.resolve()))
    return paths


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / STREAM_LOG).read_text().splitlines()]


def test_each_image_is_scored_before_it_updates_the_model(tmp_path: Path) -> None:
    cfg = stream_config()
    paths = write_images(tmp_path / "img", product_images("red", 6, seed=1), "r")
    run_stream(cfg, LeMO(cfg, ToyBackbone()), iter(paths), "red", tmp_path / "out")
    lines = records(tmp_path / "out")
    reference = LeMO(cfg, ToyBackbone())
    t = reference.add_task("red")
    for k, (path, line) in enumerate(zip(paths, lines, strict=True)):
        feats = reference.frozen_features(load_images([path], cfg.data.image_size))
        assert line["path"] == path and line["model_step"] == k
        assert line["score"] == pytest.approx(float(reference.score_features(feats, t)[0][0]), abs=1e-6)
        reference.learn_features(feats, t)  # the reference learns only after scoring, like the stream must
    assert [line["decision"] for line in lines[:4]] == ["warmup"] * 4 and {lines[4]["decision"], lines[5]["decision"]} <= {"OK", "NG"}
    assert all(line["learned"] == (line["decision"] != "NG") for line in lines)


@pytest.mark.parametrize("policy", ["ok", "all"])
def test_decisions_use_the_calibration_quantile_and_ng_is_never_learned(tmp_path: Path, policy: str) -> None:
    cfg = stream_config(update=policy, warmup=5)
    cfg.decision.target_fpr = 0.2
    images = torch.cat([product_images("red", 8, seed=2), product_images("blue", 3, seed=3), product_images("red", 3, seed=4)])
    method = LeMO(cfg, ToyBackbone())
    out = tmp_path / "out"
    summary = run_stream(cfg, method, iter(write_images(tmp_path / "img", images, "f")), "red", out)
    lines = records(out)
    accepted: list[float] = []
    for line in lines:
        if len(accepted) < cfg.stream.warmup:
            assert line["decision"] == "warmup" and line["threshold"] is None
        else:  # the rule `contad predict` uses: the target_fpr quantile of the calibration sample
            expected = float(np.quantile(accepted, 1 - cfg.decision.target_fpr, method="higher"))
            assert line["threshold"] == pytest.approx(expected, rel=1e-9)
            assert line["decision"] == ("NG" if line["score"] > expected else "OK")
        if line["decision"] != "NG":
            accepted.append(line["score"])
        assert line["learned"] == (policy == "all" or line["decision"] != "NG")
    ng = [line for line in lines if line["decision"] == "NG"]
    assert ng and summary["decisions"]["NG"] == len(ng)
    quarantined = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [q["path"] for q in quarantined] == [line["path"] for line in ng] and all(q["score"] > q["threshold"] for q in quarantined)
    assert method.images_learned_per_task[0] == sum(line["learned"] for line in lines)


def test_a_calibrated_start_decides_from_the_first_image_and_checkpoints_are_deployable(tmp_path: Path) -> None:
    from components.eval.thresholds import read_calibration
    from flows.stream import stream_calibration

    cfg = stream_config(warmup=3)
    first = LeMO(cfg, ToyBackbone())
    run_stream(cfg, first, iter(write_images(tmp_path / "a", product_images("red", 6, seed=11), "a")), "red", tmp_path / "first")
    init = tmp_path / "first" / "checkpoint" / "method"
    sample = stream_calibration(read_calibration(init), "red")
    assert len(sample) == 6 and read_calibration(init) is not None and (init / "detector.json").is_file()
    resumed = LeMO(cfg, ToyBackbone())
    resumed.load(init)
    run_stream(cfg, resumed, iter(write_images(tmp_path / "b", product_images("red", 3, seed=12), "b")), "red", tmp_path / "second", init=init)
    lines = records(tmp_path / "second")
    assert all(line["decision"] in ("OK", "NG") for line in lines), "a calibrated product needs no warm-up"
    assert lines[0]["threshold"] == pytest.approx(float(np.quantile(sample, 1 - cfg.decision.target_fpr, method="higher")))


def test_folder_watch_picks_up_images_added_while_running(tmp_path: Path) -> None:
    cfg = stream_config(poll_s=0.05, idle_timeout_s=1.5)
    folder = tmp_path / "camera"
    first = write_images(folder, product_images("red", 2, seed=4), "a")
    late_images = product_images("red", 3, seed=5)
    late: list[str] = []

    def camera() -> None:
        time.sleep(0.4)
        late.extend(write_images(folder, late_images, "b"))

    writer = threading.Thread(target=camera)
    writer.start()
    run_stream(cfg, LeMO(cfg, ToyBackbone()), watch_folder(folder, cfg.stream.poll_s, cfg.stream.idle_timeout_s), "red", tmp_path / "out")
    writer.join()
    assert [line["path"] for line in records(tmp_path / "out")] == first + late


def test_bad_image_is_logged_with_its_path_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = stream_config()
    good = write_images(tmp_path / "img", product_images("red", 4, seed=6), "g")
    broken = tmp_path / "img" / "broken.png"
    broken.write_bytes(b"this is not a png")
    method = LeMO(cfg, ToyBackbone())
    run_stream(cfg, method, iter(good[:2] + [str(broken)] + good[2:]), "red", tmp_path / "out")
    lines = records(tmp_path / "out")
    assert [line["path"] for line in lines] == good[:2] + [str(broken)] + good[2:]
    assert "error" in lines[2] and str(broken) in lines[2]["error"] and not lines[2]["learned"]
    assert all("score" in line for line in lines[3:]), "the stream goes on after the bad image"
    assert method.images_learned_per_task[0] == 4
    assert str(broken) in caplog.text


_KILLED_STREAM = """
import sys, torch
sys.path.insert(0, {repo!r})
torch.set_num_threads({threads})
from components.config import Config
from components.methods.lemo import LeMO
from flows.stream import run_stream
from tests.methods_support import ToyBackbone
cfg = Config.model_validate_json({cfg!r})
paths = open({paths!r}).read().split()
run_stream(cfg, LeMO(cfg, ToyBackbone()), iter(paths), "red", {out!r})
"""


@pytest.mark.slow  # a subprocess importing torch + prefect: ~10 s quiet, 30-50 s on the shared 2-core machine
def test_kill_9_then_resume_equals_an_uninterrupted_stream(tmp_path: Path) -> None:
    cfg = stream_config(checkpoint_every=3)
    paths = write_images(tmp_path / "img", product_images("red", 9, seed=8), "r")
    path_file = tmp_path / "paths.txt"
    path_file.write_text("\n".join(paths))

    reference = LeMO(cfg, ToyBackbone())
    run_stream(cfg, reference, iter(paths), "red", tmp_path / "uninterrupted")

    out = tmp_path / "killed"
    script = _KILLED_STREAM.format(repo=str(REPO_ROOT), threads=torch.get_num_threads(), cfg=cfg.model_dump_json(), paths=str(path_file), out=str(out))
    env = {**os.environ, KILL_AFTER_ENV: "5", "PYTHONPATH": str(REPO_ROOT)}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert len(records(out)) == 5, "five lines were flushed before the kill"

    resumed = LeMO(cfg, ToyBackbone())
    summary = run_stream(cfg, resumed, iter(paths), "red", out)
    assert summary["new_images"] == 6, "images 1-3 (checkpointed) are skipped; 4-5 are redone after the kill"
    assert resumed.images_learned_per_task == reference.images_learned_per_task == [9]
    for name, tensor in reference.state_tensors().items():
        torch.testing.assert_close(resumed.state_tensors()[name], tensor, atol=1e-5, rtol=0, msg=name)
    got, want = records(out), records(tmp_path / "uninterrupted")
    assert [line["path"] for line in got] == [line["path"] for line in want]
    assert [line["score"] for line in got] == pytest.approx([line["score"] for line in want], abs=1e-5)
    store = BankStore(out / "banks")
    assert store.show(store.current())["step"] == 9 and [v.step for v in store.list()] == [3, 6, 9]


def test_sources_text_file_and_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from components.errors import ContadError
    from flows.stream import open_source

    cfg = stream_config()
    listing = tmp_path / "paths.txt"
    listing.write_text("a.png\n# a comment\n\n/abs/b.png\n")
    assert list(open_source(str(listing), cfg)) == [str(tmp_path.cwd() / "a.png"), "/abs/b.png"]
    monkeypatch.setattr("sys.stdin", io.StringIO("/x/1.png\n/x/2.png\n"))
    assert list(open_source("-", cfg)) == ["/x/1.png", "/x/2.png"]
    with pytest.raises(ContadError, match="not a folder"):
        open_source(str(tmp_path / "missing"), cfg)


def test_methods_without_streaming_are_refused(tmp_path: Path) -> None:
    from components.errors import ContadError
    from components.methods.patchcore import PatchCoreOracle

    cfg = stream_config()
    with pytest.raises(ContadError, match="does not support streaming"):
        run_stream(cfg, PatchCoreOracle(cfg, ToyBackbone()), iter([]), "red", tmp_path / "out")


def test_folder_watch_says_it_is_waiting_and_why_it_stops(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="flows.stream")
    assert list(watch_folder(tmp_path, poll_s=0.02, idle_timeout_s=0.1)) == []
    waiting = [r.getMessage() for r in caplog.records if "waiting for new images" in r.getMessage()]
    assert len(waiting) == 1 and "stream.idle_timeout_s" in waiting[0], "announced once per idle spell, with the knob"
    assert any("stopping" in r.getMessage() for r in caplog.records)
