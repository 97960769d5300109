"""``contad bench``: every registered method on a named sequence over N seeds, through the real pipeline,
aggregated into ``benchmarks/LEADERBOARD.md`` (+ ``LEADERBOARD.json`` and a Pareto figure per sequence).

Sequences: ``real-ad`` (``../shared/data/real-ad``: grid, hazelnut_toy, magnetic_tile, pcb; RGB methods),
``real-3d`` (``../shared/data/real-3d``: cable_gland; methods that read depth), ``synth`` (small
procedural products generated under OUT; RGB methods). Each (method, seed) is one ``contad run`` in a
subprocess at the defaults of ``params.yaml`` (plus the command line's overrides, applied to every
run), tracking off, under ``OUT/<sequence>/<method>/seed<k>``; afterwards the run's inference speed
is timed on its final state (one test image at a time) and written with the wall time and the machine
load to ``bench.json`` beside ``metrics.json``. A run with both files is reused (resumable: rerun the
same command after an interruption; delete a run folder to redo it). The leaderboard is regenerated
from every finished run under OUT (``benchmarks/LEADERBOARD.md`` for ``runs/bench``, else ``OUT/LEADERBOARD.md``,
unless ``--leaderboard`` names it), with the anomalib peer's section where ``OUT/<sequence>/peer/results.json``
exists (``benchmarks/peer_anomalib.py --out`` there; ``make leaderboard`` runs it for real-ad).

``--keep-recorded`` refreshes some methods' rows without re-running the others: every method (and peer
section) with no finished run under OUT keeps the runs the leaderboard's own ``.json`` recorded (the
summaries of real runs made earlier, by earlier code), and the board names which rows were kept.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from components.atomic import atomic_write_text
from components.config import Config
from components.errors import ContadError
from components.eval.headline import headline_markdown, splice_headline
from components.eval.leaderboard import aggregate, leaderboard_markdown, operating_points_figure, pareto_figure, summarise_run, test_images
from components.eval.paper_claims import load_paper_claims, paper_vs_reproduced
from components.eval.peer import peer_markdown, read_peer_results, results_from_json

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SEQUENCES: dict[str, dict[str, object]] = {
    "real-ad": {"root": SHARED / "real-ad", "products": ["grid", "hazelnut_toy", "magnetic_tile", "pcb"], "depth": False},
    "real-3d": {"root": SHARED / "real-3d", "products": ["cable_gland"], "depth": True},
    "synth": {"root": None, "products": None, "depth": False},
}
TIMED_IMAGES = 8
LEADERBOARD_JSON = REPO / "benchmarks" / "LEADERBOARD.json"  # the project's board's JSON; runs and reports read it
DEFAULT_OUT = Path("runs/bench")  # the project's runs: their board is benchmarks/LEADERBOARD.md
PAPER_CLAIMS = REPO / "benchmarks" / "paper_claims.yaml"  # each paper's own figures, beside ours
PEER_DIR = "peer"  # OUT/<sequence>/peer/results.json: benchmarks/peer_anomalib.py --out there (its leaderboard section)


def default_leaderboard(out: Path) -> Path:
    """The board a bench of the runs under ``out`` regenerates when ``--leaderboard`` is not given: the project's
    ``benchmarks/LEADERBOARD.md`` for ``runs/bench``, ``OUT/LEADERBOARD.md`` for any other folder (a bench of other
    runs, e.g. of one method with overrides, never replaces the project's board)."""
    if Path(out).resolve() == DEFAULT_OUT.resolve():
        return Path("benchmarks") / "LEADERBOARD.md"
    return Path(out) / "LEADERBOARD.md"


def sequence_methods(depth: bool) -> list[str]:
    """Registered methods that run on a sequence with (``depth``) or without point clouds."""
    from components.methods.registry import METHODS

    return [name for name, cls in METHODS.items() if cls.uses_depth == depth]


SYNTH_DEFAULTS = ["data.synth.products=3", "data.synth.train_per_product=16", "data.synth.test_good_per_product=6", "data.synth.test_defect_per_type=2"]


def _data(sequence: str, out: Path, data: str | None, overrides: list[str]) -> tuple[Path, list[str]]:
    """(data root, product order) of ``sequence``; the synthetic one is generated once (``data.synth.*`` overrides apply)."""
    spec = SEQUENCES[sequence]
    if sequence == "synth":
        root = out / "synth" / "data"
        if not root.is_dir():
            _contad(["data", "synth", "--out", str(root), *SYNTH_DEFAULTS, *[o for o in overrides if o.startswith("data.synth.")]])
        return root, sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
    root = Path(data) if data else Path(spec["root"])  # type: ignore[arg-type]
    if not root.is_dir():
        raise ContadError(f"--sequence {sequence}: data folder {root} not found (pass --data DIR)")
    return root, list(spec["products"])  # type: ignore[arg-type]


def _contad(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO)
    if done.returncode != 0:
        raise ContadError(f"contad {' '.join(args[:3])} ... failed with exit code {done.returncode}")


def images_per_s(run: Path, root: Path) -> float:
    """Test images per second of the run's final state (its stored configuration) on the test images of its
    last product under ``root``, one image at a time (warm)."""
    import torch

    from components.data.loading import test_batch
    from components.data.manifest import read_dataset
    from components.methods.loading import load_method, stored_config

    steps = sorted((run / "steps").glob("*/method"))
    requested = Config()
    requested.data.root = str(root)  # a deploy-time key: where the images are
    stored = stored_config(requested, steps[-1])
    method = load_method(stored, steps[-1])
    manifest = read_dataset(Path(stored.data.root))
    product = method.tasks[-1]
    batch = test_batch(manifest, product, stored.data.image_size)
    n = min(TIMED_IMAGES, len(batch.images))
    depth = batch.depth if method.uses_depth else None
    true = [product] if method.uses_task_labels else None
    with torch.no_grad():
        method.predict(batch.images[:1], true_tasks=true, depth=None if depth is None else depth[:1])
        started = time.perf_counter()
        for i in range(n):
            method.predict(batch.images[i : i + 1], true_tasks=true, depth=None if depth is None else depth[i : i + 1])
    return n / (time.perf_counter() - started)


def run_one(sequence: str, method: str, seed: int, root: Path, products: list[str], out: Path, overrides: list[str], params: str | None = None) -> Path:
    """One finished (method, seed) run of ``sequence`` under ``out`` (reused when already finished)."""
    run = out / sequence / method / f"seed{seed}"
    if (run / "metrics.json").is_file() and (run / "bench.json").is_file():
        log.info("bench: %s seed %d on %s already done (%s)", method, seed, sequence, run)
        return run
    before, started = os.getloadavg(), time.perf_counter()
    _contad(["run", "--out", str(run), "--allow-rejected", *(["--params", params] if params else []), f"method={method}", f"seed={seed}", f"data.root={root}",
             f"data.products={','.join(products)}", "tracking.enabled=false", "eval.overlays_per_task=0",
             f"masks.cache_dir={out / 'mask_cache'}", f"banks.store_dir={run / 'banks'}", *overrides])
    wall, after = time.perf_counter() - started, os.getloadavg()
    speed = images_per_s(run, root)
    doc = {"sequence": sequence, "method": method, "seed": seed, "wall_s": wall, "images_per_s": speed,
           "load": {"before": list(before), "after": list(after)}, "overrides": overrides}
    atomic_write_text(run / "bench.json", json.dumps(doc, indent=1))  # last: its presence marks the run finished
    return run


def recorded_board(leaderboard: Path) -> dict[str, Any]:
    """What the leaderboard's ``.json`` recorded (per sequence: run summaries, peer results); empty when absent."""
    path = leaderboard.with_suffix(".json")
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or not all(isinstance(doc[s].get("runs"), list) for s in doc):
            raise ValueError("expected {sequence: {runs: [...], ...}}")
        if not all(isinstance(r, dict) and "method" in r and "seed" in r for s in doc for r in doc[s]["runs"]):
            raise ValueError("a recorded run without its method and seed")
    except (OSError, ValueError, AttributeError) as exc:
        raise ContadError(f"{path}: not a leaderboard record ({exc})") from None
    return doc


def _kept_note(fresh: set[str], kept: set[str]) -> str:
    """The notes' sentence naming the rows re-run for a board and those kept from its earlier record ("" when none kept)."""
    if not kept:
        return ""
    record = f"from the board's earlier record (runs of earlier code, not re-run): {', '.join(sorted(kept))}."
    return f" Re-run for this board: {', '.join(sorted(fresh))}; kept {record}" if fresh else f" Kept {record}"


def write_leaderboard(out: Path, leaderboard: Path, headlines: list[Path] | None = None, keep_recorded: bool = False) -> dict[str, object]:
    """Regenerate ``leaderboard`` (+ ``.json``, Pareto figure) from every finished run under ``out`` (with
    ``keep_recorded``, plus the recorded runs of methods that have none there), and the headline table of every
    document in ``headlines`` that carries the sequence's markers."""
    sections, machine = [], {}
    recorded = recorded_board(leaderboard) if keep_recorded else {}
    for sequence in SEQUENCES:
        runs = sorted(p.parent for p in (out / sequence).glob("*/seed*/bench.json") if (p.parent / "metrics.json").is_file())
        summaries = [summarise_run(r) for r in runs]
        fresh = {s["method"] for s in summaries}
        kept = [s for s in recorded.get(sequence, {}).get("runs", []) if s["method"] not in fresh]
        summaries += kept
        if not summaries:
            continue
        rows = aggregate(summaries)
        loads = [s["load"]["before"][0] for s in summaries if s.get("load")]
        overrides = sorted({" ".join(s["overrides"]) for s in summaries})
        figure = pareto_figure(rows, leaderboard.with_name(f"leaderboard_{sequence}.png"), f"{sequence}: accuracy vs cost")
        points = operating_points_figure(rows, leaderboard.with_name(f"leaderboard_{sequence}_promises.png"),
                                         f"{sequence}: what each false-reject promise costs")
        registered, ran = sequence_methods(bool(SEQUENCES[sequence]["depth"])), {s["method"] for s in summaries}
        missing = [m for m in registered if m not in ran]
        notes = [f"Runs: {len(summaries)} ({', '.join(sorted(ran))}); seeds per method in the table."
                 + (f" No finished run yet: {', '.join(missing)}." if missing else "")
                 + _kept_note(fresh, {s["method"] for s in kept}),
                 f"Machine load (1-min average) when the runs started: {min(loads):.1f}–{max(loads):.1f} on "
                 f"{os.cpu_count()} CPUs; timings are under that load." if loads else "Machine load not recorded.",
                 "Overrides on top of params.yaml: " + ("; ".join(f"`{o}`" for o in overrides if o) or "none (the defaults)") + ".",
                 "FM = mean forgetting of image AUROC (Chaudhry et al.), BWT = backward transfer; – = undefined (one task).",
                 "escape / false reject @ thr: test-split rates at the deployed (calibrated) thresholds, averaged over products.",
                 "MB / task: the final saved state (what a deployment stores: memories, keys, prompts, networks, replay "
                 "buffers) divided by the number of products; train s / product: `fit_task` seconds, mean over products.",
                 f"Figure: ![{sequence}]({figure.name})"
                 + (f"; escape and false reject against the promise: ![{sequence} promises]({points.name})" if points else "")]
        counts = test_images(summaries)
        sections.append(leaderboard_markdown(rows, f"Sequence `{sequence}`", notes, counts))
        sections.append(paper_vs_reproduced(PAPER_CLAIMS, rows, registered, f"`{sequence}`"))  # "" without the file
        peer_results = out / sequence / PEER_DIR / "results.json"
        peer = read_peer_results(peer_results) if peer_results.is_file() else results_from_json(recorded.get(sequence, {}).get("peer") or [])
        if peer:
            sections.append(peer_markdown(peer, list(summaries[0]["products"])))
        for document in headlines or []:
            link = os.path.relpath(leaderboard, document.resolve().parent)
            if splice_headline(document, sequence, headline_markdown(rows, link)):
                log.info("bench: headline table of %s updated in %s", sequence, document)
        machine[sequence] = {"runs": summaries, "methods": [{"method": r.method, "seeds": r.seeds, "stats": r.stats,
                                                            "per_product": r.per_product,
                                                            "operating_points": r.operating_points} for r in rows],
                             "test_images": counts,
                             "peer": [asdict(r) for r in peer]}
    origin = " and the runs this board recorded before for methods not re-run (each sequence's notes name them)" if keep_recorded else ""
    text = ("# Leaderboard\n\nGenerated by `contad bench` (flows/bench.py) from the runs under "
            f"`{out}`{origin}; regenerate with the same command. Defaults of `params.yaml`; mean ± sd over seeds.\n\n" + "\n".join(sections))
    leaderboard.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(leaderboard, text)
    atomic_write_text(leaderboard.with_suffix(".json"), json.dumps(machine, indent=1, default=str))
    return machine


def bench_command(sequence: str, seeds: int, methods: list[str] | None, out: Path, leaderboard: Path,
                  data: str | None, overrides: list[str], params: str | None = None, headlines: list[Path] | None = None,
                  keep_recorded: bool = False) -> int:
    """Run the missing (method, seed) runs of ``sequence``, then regenerate the leaderboard."""
    if sequence not in SEQUENCES:
        raise ContadError(f"--sequence {sequence!r}: choose one of {', '.join(SEQUENCES)}")
    if seeds < 1:
        raise ContadError(f"--seeds {seeds}: at least 1")
    missing = [str(d) for d in headlines or [] if not d.is_file()]
    if missing:
        raise ContadError(f"--headline {', '.join(missing)}: no such file")
    load_paper_claims(PAPER_CLAIMS)  # a malformed claims file fails now, not after hours of runs
    available = sequence_methods(bool(SEQUENCES[sequence]["depth"]))
    chosen = methods or available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ContadError(f"--methods {','.join(unknown)}: not methods of sequence {sequence!r} (choose from {', '.join(available)})")
    root, products = _data(sequence, out, data, overrides)
    if keep_recorded:
        recorded_board(leaderboard.resolve())  # a malformed record fails now, not after hours of runs
    plan = [(method, seed) for seed in range(seeds) for method in chosen]  # seed-major: an interrupted bench has every method's first seeds
    for done, (method, seed) in enumerate(plan):
        log.info("bench: [%d/%d] %s seed %d on %s", done + 1, len(plan), method, seed, sequence)
        run_one(sequence, method, seed, root, products, out, overrides, params)
    write_leaderboard(out, leaderboard.resolve(), headlines, keep_recorded)
    print(f"leaderboard written to {leaderboard} ({leaderboard.with_suffix('.json').name}, leaderboard_{sequence}.png)")
    return 0
