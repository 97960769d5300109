"""The leaderboard: mean ± sd over seeds, "–" for undefined measures (never 0), and `contad bench` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from components.eval.leaderboard import aggregate, cell, leaderboard_markdown, pareto_figure, summarise_run


def _fake_run(root: Path, method: str, seed: int, aurocs: dict[str, float], one_task: bool = False) -> Path:
    run = root / method / f"seed{seed}"
    tasks = list(aurocs)[:1] if one_task else list(aurocs)
    metrics = {name: dict.fromkeys(tasks, 0.5) for name in ("image_auroc", "pixel_auroc", "aupro", "escape_rate", "false_reject_rate")}
    metrics["image_auroc"] = {t: aurocs[t] for t in tasks}
    average = {name: sum(v.values()) / len(v) for name, v in metrics.items()}
    doc = {"method": method, "tasks": tasks, "final": metrics, "average": average, "forgetting": {"image_auroc": 0.02},
           "bwt": {"image_auroc": -0.01}, "routing_accuracy": 1.0}
    (run / "steps" / "00-a").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(doc))
    (run / "steps" / "00-a" / "train_log.json").write_text(json.dumps({"task": tasks[0], "seconds": 10.0 + seed, "log": {"memory_bytes": 2**20}}))
    (run / "bench.json").write_text(json.dumps({"seed": seed, "images_per_s": 4.0, "load": {"before": [1.0, 1.0, 1.0]}}))
    return run


def test_mean_sd_over_seeds_and_undefined_is_a_dash(tmp_path: Path) -> None:
    runs = [_fake_run(tmp_path, "ucad", 0, {"a": 0.9, "b": 0.8}), _fake_run(tmp_path, "ucad", 1, {"a": 0.7, "b": 0.8}),
            _fake_run(tmp_path, "single", 0, {"a": 0.6, "b": 0.6}, one_task=True)]
    rows = aggregate([summarise_run(r) for r in runs])
    assert [r.method for r in rows] == ["ucad", "single"]  # best image AUROC first
    ucad = rows[0]
    assert ucad.stats["image_auroc"] == pytest.approx((0.8, math.sqrt(0.005), 2))
    assert ucad.per_product["a"][:2] == pytest.approx((0.8, math.sqrt(0.02)))
    assert cell(ucad.stats["image_auroc"], 100.0) == "80.0 ± 7.1"
    single = rows[1]
    assert math.isnan(single.stats["forgetting"][0]) and cell(single.stats["forgetting"], 100.0) == "–"  # one task: undefined, not 0
    assert cell(single.stats["image_auroc"], 100.0) == "60.0"  # one seed: no sd
    text = leaderboard_markdown(rows, "Sequence `x`", ["note"])
    assert "| ucad | 2 | 80.0 ± 7.1 |" in text and "| single | 1 | 60.0 |" in text and "–" in text
    assert pareto_figure(rows, tmp_path / "p.png", "x").stat().st_size > 5000


@pytest.mark.slow
def test_contad_bench_runs_resumes_and_writes_the_leaderboard(tmp_path: Path) -> None:
    from flows.bench import bench_command

    out, board = tmp_path / "bench", tmp_path / "LEADERBOARD.md"
    tiny = ["data.synth.products=2", "patchcore.coreset_size=64", "data.tile=null", "data.image_size=64"]
    assert bench_command("synth", 1, ["patchcore_finetune"], out, board, None, tiny) == 0
    run = out / "synth" / "patchcore_finetune" / "seed0"
    first = json.loads((run / "metrics.json").read_text())
    stamp = (run / "bench.json").stat().st_mtime_ns
    assert "| patchcore_finetune | 1 |" in board.read_text() and (tmp_path / "leaderboard_synth.png").is_file()
    machine = json.loads(board.with_suffix(".json").read_text())
    assert machine["synth"]["methods"][0]["method"] == "patchcore_finetune"

    assert bench_command("synth", 1, ["patchcore_finetune"], out, board, None, tiny) == 0  # resumed: nothing rerun
    assert (run / "bench.json").stat().st_mtime_ns == stamp

    import shutil

    shutil.rmtree(run)  # redo the run: the same image-level numbers (reproducible)
    assert bench_command("synth", 1, ["patchcore_finetune"], out, board, None, tiny) == 0
    assert json.loads((run / "metrics.json").read_text())["final"]["image_auroc"] == first["final"]["image_auroc"]
