"""UCAD vs the PatchCore baselines on the real sequence in ../shared/data/real-ad.

Run: ``.venv/bin/python -m benchmarks.real_sequence [--data DIR] [--out runs/bench-real] [key=value ...]``.

Each method runs through the real pipeline (``contad run``: validation, masks, training, banks,
evaluation after every step); then ``contad report`` renders the side-by-side comparison and a
markdown table (final image AUROC per product, Average, FM, routing accuracy) is printed, then a
cost table: wall seconds of each method's whole run (train + evaluate after every step), training
seconds and stored memory (MB) per product, and the machine load (``os.getloadavg``) before and
after the run: the benchmark machine is shared, so timings are under that load.
Existing finished runs in OUT are reused (the pipeline resumes), so reruns are cheap
(their wall time is then not a training time: delete OUT/METHOD to time it).

Reads the test split's labels and masks (the pipeline's evaluation): reported metrics only; not used to
choose defaults (issue 33: defaults come from the validation protocol,
``benchmarks/validation_levers.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from flows.cli import main as contad



def default_methods() -> list[str]:
    """The registered memory-bank methods on the shared frozen backbone that train without structure masks
    (capabilities, not a list of names: a new such method joins the benchmark by registering)."""
    from components.config import Config
    from components.methods.registry import METHODS

    return [name for name, cls in METHODS.items() if cls.tiles_inputs and not cls.needs_structure_masks(Config(method=name))]
PRODUCTS = "grid,hazelnut_toy,magnetic_tile,pcb"
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ad"


def results_table(runs: dict[str, Path], metric: str = "image_auroc") -> str:
    """Markdown table: rows = methods, columns = products + Average + FM + routing."""
    docs = {m: json.loads((d / "metrics.json").read_text()) for m, d in runs.items()}
    products = next(iter(docs.values()))["tasks"]
    head = f"| method | {' | '.join(products)} | Average | FM | routing |"
    lines = [head, "|" + "---|" * (len(products) + 4)]
    for method, doc in docs.items():
        cells = [doc["final"][metric][p] for p in products]
        row = [f"{100 * c:.1f}" if c is not None else "–" for c in cells]
        lines.append(
            f"| {method} | {' | '.join(row)} | {100 * doc['average'][metric]:.1f} | "
            f"{100 * doc['forgetting'][metric]:.1f} | {100 * doc['routing_accuracy']:.1f} |"
        )
    return "\n".join(lines)


def step_costs(run: Path) -> list[dict]:
    """Per step: task, training seconds and stored memory bytes (from each step's train_log.json)."""
    costs = []
    for log_path in sorted((run / "steps").glob("*/train_log.json")):
        doc = json.loads(log_path.read_text())
        costs.append({"task": doc["task"], "seconds": doc["seconds"], "cpu_seconds": doc.get("cpu_seconds"), "memory_bytes": doc["log"].get("memory_bytes")})
    return costs


def cost_table(runs: dict[str, Path], walls: dict[str, tuple[float, tuple[float, ...], tuple[float, ...]]]) -> str:
    """Markdown table: per method, run wall seconds, load before/after, train seconds and MB per product."""
    lines = ["| method | run wall s | load 1/5/15 min before -> after | train s per product (CPU s) | memory MB per product |", "|---|---|---|---|---|"]
    for method, run in runs.items():
        costs = step_costs(run)
        wall, before, after = walls[method]
        train = ", ".join(f"{c['task']} {c['seconds']:.0f}" + (f" (CPU {c['cpu_seconds']:.0f})" if c["cpu_seconds"] is not None else "") for c in costs)
        memory = ", ".join(f"{c['task']} {c['memory_bytes'] / 2**20:.2f}" if c["memory_bytes"] is not None else f"{c['task']} –" for c in costs)
        load = f"{'/'.join(f'{x:.1f}' for x in before)} -> {'/'.join(f'{x:.1f}' for x in after)}"
        lines.append(f"| {method} | {wall:.0f} | {load} | {train} | {memory} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("CONTAD_REAL_AD", str(DEFAULT_DATA)))
    parser.add_argument("--out", default="runs/bench-real")
    parser.add_argument("--methods", default=",".join(default_methods()))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    runs: dict[str, Path] = {}
    walls: dict[str, tuple[float, tuple[float, ...], tuple[float, ...]]] = {}
    for method in args.methods.split(","):
        runs[method] = out / method
        before, started = os.getloadavg(), time.perf_counter()
        code = contad(["run", "--out", str(runs[method]), "--allow-rejected", f"method={method}", f"data.root={args.data}",
                       f"data.products={PRODUCTS}", "tracking.enabled=false", f"masks.cache_dir={out / 'mask_cache'}",
                       *args.overrides])
        walls[method] = (time.perf_counter() - started, before, os.getloadavg())
        if code != 0:
            return code
    contad(["report", *map(str, runs.values()), "--out", str(out / "compare")])
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        print(f"\n### {metric}\n\n{results_table(runs, metric)}")
    print(f"\n### cost\n\n{cost_table(runs, walls)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
