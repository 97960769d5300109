"""The leaderboard: mean ± sd over seeds, "–" for undefined measures (never 0), and `contad bench` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from components.eval.leaderboard import aggregate, cell, label_heights, leaderboard_markdown, operating_points_figure, pareto_figure, summarise_run


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


def test_a_bench_of_other_runs_gets_its_own_board_unless_one_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows import bench
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # main() would point it at ./runs/.prefect otherwise
    assert bench.default_leaderboard(Path("runs/bench")) == Path("benchmarks/LEADERBOARD.md")
    assert bench.default_leaderboard(tmp_path / "runs" / "bench") == Path("benchmarks/LEADERBOARD.md")  # the same folder, absolute
    assert bench.default_leaderboard(Path("runs/bench-try")) == Path("runs/bench-try/LEADERBOARD.md")
    boards: list[Path] = []
    monkeypatch.setattr(bench, "bench_command", lambda *args, **kwargs: boards.append(args[4]) or 0)
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    for argv in (["--out", "runs/try"], [], ["--out", "runs/try", "--leaderboard", "benchmarks/LEADERBOARD.md"]):
        assert main(["bench", "--params", str(params), "--methods", "ucad", *argv]) == 0
    assert boards == [Path("runs/try/LEADERBOARD.md"), Path("benchmarks/LEADERBOARD.md"), Path("benchmarks/LEADERBOARD.md")]


# Paper vs reproduced (benchmarks/paper_claims.yaml)

REPO = Path(__file__).resolve().parents[1]
PAPERS = REPO.parent / "shared" / "papers"


def _claims_doc() -> dict:
    protocol = {"tasks": "15 products", "order": "alphabetical", "task_id_at_test": "no", "epochs": "25", "evaluation": "after the last task"}
    claim = {"metric": "image AUROC", "printed": "0.930", "scale": "fraction", "dataset": "MVTec AD", "setting": "mean of 15", "source": "ucad.txt, Table 3"}
    other = {**claim, "printed": "87.4", "scale": "percent", "dataset": "VisA", "source": "ucad.txt, Table 4"}
    ucad = {"paper": "Liu et al.", "venue": "AAAI 2024", "claims": [claim, other], "protocol": protocol,
            "backbone": "ViT-B/16", "resolution": "224 px", "why_ours_differs": "Lite0 | 4 products"}
    return {"version": 1, "methods": {"ucad": ucad}}


def _write(path: Path, doc: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(doc))
    return path


def test_paper_claims_beside_the_reproduced_mean_and_missing_methods_are_dashes(tmp_path: Path) -> None:
    from components.eval.paper_claims import paper_vs_reproduced

    runs = [_fake_run(tmp_path, "ucad", 0, {"a": 0.9, "b": 0.8}), _fake_run(tmp_path, "ucad", 1, {"a": 0.7, "b": 0.8})]
    rows = aggregate([summarise_run(r) for r in runs])
    claims = _write(tmp_path / "claims.yaml", _claims_doc())
    text = paper_vs_reproduced(claims, rows, ["ucad", "lemo"], "`real-ad`")
    ucad = next(line for line in text.splitlines() if line.startswith("| ucad |"))
    cells = [c.strip() for c in ucad.split(" | ")]
    assert "image AUROC **93.0** on MVTec AD" in cells[1] and "[ucad.txt, Table 3]" in cells[1]  # fraction shown in %
    assert "task id at test: no" in cells[1] and "87.4" not in cells[1]  # the headline in the table, other figures below it
    assert "- ucad: image AUROC **87.4** on VisA" in text
    assert cells[2] == "80.0 ± 7.1 (n = 2)" and cells[3] == "-13.0"  # ours beside the paper; gap to the headline
    assert "Lite0 \\| 4 products" in ucad  # a "|" in the text cannot split the table
    assert "| lemo | – | – | – | – |" in text  # registered for the sequence, no claim and no run
    assert paper_vs_reproduced(tmp_path / "absent.yaml", rows, ["ucad"], "x") == ""  # no file: no section


@pytest.mark.parametrize(("change", "key"), [
    (lambda d: d["methods"]["ucad"]["claims"][0].update(printed=0.93), "methods.ucad.claims[0].printed"),
    (lambda d: d["methods"]["ucad"]["claims"][1].update(printed=None), "methods.ucad.claims[1].missing"),
    (lambda d: d["methods"]["ucad"]["protocol"].pop("epochs"), "methods.ucad.protocol.epochs: missing"),
    (lambda d: d["methods"]["ucad"].update(venu="x"), "methods.ucad.venu: unknown key"),
    (lambda d: d["methods"].update(ucda=d["methods"]["ucad"]), "methods.ucda: not a registered method"),
])
def test_malformed_claims_name_the_file_and_the_key(tmp_path: Path, change, key: str) -> None:
    from components.errors import ContadError
    from components.eval.paper_claims import load_paper_claims

    doc = _claims_doc()
    change(doc)
    path = _write(tmp_path / "claims.yaml", doc)
    with pytest.raises(ContadError) as err:
        load_paper_claims(path)
    assert str(path) in str(err.value) and key in str(err.value) and "\n" not in str(err.value)


def test_shipped_claims_cover_every_method_and_quote_the_papers() -> None:
    from components.eval.paper_claims import load_paper_claims
    from components.methods.registry import METHOD_CLASSES

    claims = load_paper_claims(REPO / "benchmarks" / "paper_claims.yaml")
    assert claims is not None and set(claims) == set(METHOD_CLASSES)
    quoted = [(c.source.split(",")[0], c.printed) for entry in claims.values() for c in entry.claims if c.printed is not None]
    assert all(c.value is None or 0 < c.value <= 100 for entry in claims.values() for c in entry.claims)
    if not PAPERS.is_dir():
        pytest.skip(f"{PAPERS} not present: the quotes cannot be checked")
    unquoted = [(source, printed) for source, printed in quoted if printed not in (PAPERS / source).read_text()]
    assert not unquoted, f"figures not found in their source text: {unquoted}"


def test_write_leaderboard_puts_the_paper_section_under_each_sequence(tmp_path: Path) -> None:
    from flows.bench import write_leaderboard

    _fake_run(tmp_path / "out" / "real-ad", "ucad", 0, {"grid": 0.9, "pcb": 0.8})
    board = tmp_path / "LEADERBOARD.md"
    write_leaderboard(tmp_path / "out", board)
    text = board.read_text()
    section = text[text.index("### Paper vs reproduced: `real-ad`"):]
    assert text.index("## Sequence `real-ad`") < text.index("### Paper vs reproduced: `real-ad`")
    assert "| ucad | Liu et al." in section and "| 85.0 (n = 1) | -8.0 |" in section  # shipped claims: UCAD's 93.0
    assert "| patchcore_joint |" in section and "| ib_iumad |" not in section  # the sequence's methods only
    assert "anomalib" not in text  # no peer run: no peer section
    peer = {"product": "grid", "train_images": 20, "test_images": 10, "load": [1.0, 1.0, 1.0],
            "contad": {"image_auroc": 0.9, "pixel_auroc": 0.95, "train_s": 2.0, "test_s": 1.0, "bank_rows": 10},
            "peer": {"image_auroc": 0.93, "pixel_auroc": 0.94, "train_s": 30.0, "test_s": 3.0, "bank_rows": 10}}
    (tmp_path / "out" / "real-ad" / "peer").mkdir()
    (tmp_path / "out" / "real-ad" / "peer" / "results.json").write_text(json.dumps([peer]))
    machine = write_leaderboard(tmp_path / "out", board)
    text = board.read_text()
    assert text.index("## Sequence `real-ad`") < text.index("### Peer: anomalib 2.7 PatchCore")
    assert "| grid | 20 / 10 | 0.900 | 0.930 | 0.950 | 0.940 | 2.0 + 1.0 | 30.0 + 3.0 | 11.0x |" in text and "Not run yet: pcb." in text
    assert machine["real-ad"]["peer"][0]["peer"]["image_auroc"] == 0.93


def test_mb_per_task_is_the_final_saved_state_over_the_products(tmp_path: Path) -> None:
    run = _fake_run(tmp_path, "iuf", 0, {"a": 0.9, "b": 0.8})
    state = run / "steps" / "01-b" / "method"
    state.mkdir(parents=True)
    (state / "model.safetensors").write_bytes(b"x" * 2**21)  # 2 MiB for 2 products
    (run / "steps" / "00-a" / "method").mkdir()
    (run / "steps" / "00-a" / "method" / "model.safetensors").write_bytes(b"x" * 2**23)  # an earlier step: not counted
    assert summarise_run(run)["mb_per_task"] == pytest.approx(1.0)


def test_pareto_labels_of_a_cluster_are_stacked_apart() -> None:
    # three methods at ~2 MB and ~90 % (the real-ad cluster), one far away on x at the same height
    points = [(math.log10(2.01), 89.7), (math.log10(2.01), 89.8), (math.log10(2.0), 89.6), (math.log10(40.0), 88.8), (math.log10(0.4), 66.5)]
    heights = label_heights(points)
    gap = 0.05 * (89.8 - 66.5)
    cluster = sorted(heights[:3], reverse=True)
    assert heights[1] == 89.8  # the highest label stays at its point
    assert all(a - b >= gap - 1e-9 for a, b in zip(cluster, cluster[1:]))  # no two cluster labels closer than the gap
    assert heights[3] == 88.8 and heights[4] == 66.5  # labels with nothing near them do not move
    assert label_heights([]) == []


def test_keep_recorded_refreshes_some_rows_and_keeps_the_others_recorded_runs(tmp_path: Path) -> None:
    from components.errors import ContadError
    from flows.bench import write_leaderboard

    board = tmp_path / "LEADERBOARD.md"
    for seed in (0, 1):
        _fake_run(tmp_path / "first" / "real-ad", "ucad", seed, {"grid": 0.80, "pcb": 0.70})
        _fake_run(tmp_path / "first" / "real-ad", "iuf", seed, {"grid": 0.60 + 0.1 * seed, "pcb": 0.50})
    peer = {"product": "grid", "train_images": 20, "test_images": 10, "load": [1.0, 1.0, 1.0],
            "contad": {"image_auroc": 0.9, "pixel_auroc": 0.95, "train_s": 2.0, "test_s": 1.0, "bank_rows": 10},
            "peer": {"image_auroc": 0.93, "pixel_auroc": 0.94, "train_s": 30.0, "test_s": 3.0, "bank_rows": 10}}
    (tmp_path / "first" / "real-ad" / "peer").mkdir()
    (tmp_path / "first" / "real-ad" / "peer" / "results.json").write_text(json.dumps([peer]))
    before = write_leaderboard(tmp_path / "first", board)["real-ad"]

    _fake_run(tmp_path / "second" / "real-ad", "ucad", 0, {"grid": 0.95, "pcb": 0.90})  # only UCAD is re-run
    after = write_leaderboard(tmp_path / "second", board, keep_recorded=True)["real-ad"]
    rows = {m["method"]: m for m in after["methods"]}
    assert rows["ucad"]["seeds"] == [0] and rows["ucad"]["stats"]["image_auroc"][0] == pytest.approx(0.925)
    assert rows["iuf"] == next(m for m in before["methods"] if m["method"] == "iuf")  # kept as recorded
    assert [r for r in after["runs"] if r["method"] == "iuf"] == [r for r in before["runs"] if r["method"] == "iuf"]
    text = board.read_text()
    assert "Re-run for this board: ucad; kept from the board's earlier record (runs of earlier code, not re-run): iuf." in text
    assert "### Peer: anomalib 2.7 PatchCore" in text and after["peer"] == before["peer"]

    assert {m["method"] for m in write_leaderboard(tmp_path / "second", board)["real-ad"]["methods"]} == {"ucad"}  # without: only what ran
    for malformed in ("[1, 2]", '{"real-ad": {"runs": [{"seed": 0}]}}'):
        board.with_suffix(".json").write_text(malformed)
        with pytest.raises(ContadError, match="LEADERBOARD.json: not a leaderboard record"):
            write_leaderboard(tmp_path / "second", board, keep_recorded=True)


def test_operating_points_table_averages_each_promise_and_dashes_runs_recorded_before_them(tmp_path: Path) -> None:
    with_points = []
    for seed, (esc1, esc5, broken5) in enumerate(((0.6, 0.2, 0.0), (0.4, 0.1, 0.5))):
        run = _fake_run(tmp_path, "ucad", seed, {"a": 0.9, "b": 0.8})
        doc = json.loads((run / "metrics.json").read_text())
        doc["average"].update({"escape_rate_at_1pct": esc1, "false_reject_rate_at_1pct": 0.0, "promised_fpr_at_1pct": 0.2,
                               "promise_broken_at_1pct": 0.0, "escape_rate_at_5pct": esc5, "false_reject_rate_at_5pct": 0.05})
        if seed == 1:  # the promise readings came later than the rates: a run without them has "–" there
            doc["average"].update({"promised_fpr_at_5pct": 0.2, "promise_broken_at_5pct": broken5})
        (run / "metrics.json").write_text(json.dumps(doc))
        with_points.append(run)
    older = _fake_run(tmp_path, "lemo", 0, {"a": 0.6, "b": 0.6})  # a run recorded before the readings existed
    rows = aggregate([summarise_run(r) for r in [*with_points, older]])
    ucad, lemo = rows
    assert ucad.operating_points["escape_rate_at_5pct"][:2] == pytest.approx((0.15, math.sqrt(0.005)))
    assert lemo.operating_points == {}
    text = leaderboard_markdown(rows, "Sequence `x`", [])
    assert ("| method | escape @ 1 % | false reject @ 1 % | promised @ 1 % | products broken @ 1 % | escape @ 5 % | "
            "false reject @ 5 % | promised @ 5 % | products broken @ 5 % |") in text
    assert "| ucad | 50.0 ± 14.1 | 0.0 ± 0.0 | 20.0 ± 0.0 | 0.0 ± 0.0 | 15.0 ± 7.1 | 5.0 ± 0.0 | 20.0 | 50.0 |" in text
    assert "| lemo | – | – | – | – | – | – | – | – |" in text
    # no run records them: no table, no figure
    assert "escape @ 1 %" not in leaderboard_markdown(aggregate([summarise_run(older)]), "Sequence `x`", [])
    assert operating_points_figure(aggregate([summarise_run(older)]), tmp_path / "none.png", "x") is None
    assert operating_points_figure(rows, tmp_path / "promises.png", "x").stat().st_size > 5000
