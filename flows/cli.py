"""The ``contad`` command line: one entry point, one subcommand per job.

Config overrides are trailing ``key=value`` arguments (dotted keys, lists comma-separated),
applied on top of ``--params`` (default ``params.yaml``).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from components.config import Config, ConfigError, load_config
from components.errors import ContadError

DESCRIPTION = """\
contad — unsupervised continual anomaly detection pipeline.

Typical use:
  contad demo --out runs/demo                  synthetic products -> full continual pipeline -> report
  contad run --out runs/x method=ucad data.root=DIR
  contad report runs/ucad runs/patchcore_finetune --out runs/compare
"""


def _add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="YAML config file (default: params.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. method=ucad data.products=a,b")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contad", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="generate and validate datasets").add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    synth = data.add_parser("synth", help="generate procedural MVTec-layout products (deterministic per seed)")
    synth.add_argument("--out", required=True, help="output directory (one folder per product)")
    synth.add_argument("--products", type=int, default=None, help="number of products (default: data.synth.products)")
    synth.add_argument("--seed", type=int, default=None, help="random seed (default: data.synth.seed)")
    _add_params(synth)
    validate = data.add_parser("validate", help="validate a dataset (Great Expectations suite + image checks); writes a JSON report next to the data")
    validate.add_argument("root", help="dataset root (MVTec-style layout: one folder per product)")
    validate.add_argument("--report", default=None, help="report path (default: ROOT/validation_report.json)")

    masks = sub.add_parser("masks", help="offline structure masks").add_subparsers(dest="masks_command", required=True, metavar="SUBCOMMAND")
    build = masks.add_parser("build", help="fill the content-addressed mask cache for every training image (resumable)")
    build.add_argument("data_dir", help="dataset root")
    build.add_argument("--out", required=True, help="cache directory")
    _add_params(build)

    run = sub.add_parser("run", help="train a continual sequence and evaluate every task after every step; writes OUT/metrics.json and a report")
    run.add_argument("--out", required=True, help="run directory")
    _add_params(run)

    demo = sub.add_parser("demo", help="synthetic products + the whole continual pipeline (Prefect, MLflow, report) with the offline backbone")
    demo.add_argument("--out", default="runs/demo", help="demo directory (default: runs/demo)")
    _add_params(demo)

    report = sub.add_parser("report", help="side-by-side comparison of one or more run directories")
    report.add_argument("runs", nargs="+", help="run directories containing metrics.json")
    report.add_argument("--out", default=None, help="output directory (default: first run dir)")

    banks = sub.add_parser("banks", help="versioned memory banks").add_subparsers(dest="banks_command", required=True, metavar="SUBCOMMAND")
    for name, helptext in (("list", "list versions (current marked)"), ("show", "show one version's manifest"), ("rollback", "move the current pointer to a version (never deletes)")):
        b = banks.add_parser(name, help=helptext)
        if name != "list":
            b.add_argument("version", help="version hash (a unique prefix is enough)")
        b.add_argument("--store", default=None, help="bank store directory (default: banks.store_dir)")
        _add_params(b)

    add = sub.add_parser("add-product", help="triggered incremental run: validate, mask, train on top of the champion, evaluate, gate")
    add.add_argument("path", help="product folder (MVTec layout: train/good, test/..., ground_truth/...)")
    add.add_argument("--name", required=True, help="product name")
    add.add_argument("--out", default=None, help="directory for this step's outputs (default: runs/add-product/NAME)")
    add.add_argument("--via-server", action="store_true", help="emit the contad.product.added event to the Prefect server instead of running locally")
    add.add_argument("--text", default=None, help="sentence describing the product for text-guided methods (sets text.prompts.NAME; stored in the bank)")
    _add_params(add)

    serve = sub.add_parser("serve", help="register a Prefect deployment that runs add-product on contad.product.added events and serve it")
    _add_params(serve)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    overrides = getattr(args, "overrides", []) or []
    if hasattr(args, "params"):
        load_config(args.params, overrides)  # fail fast on a bad config, before heavy imports
    if args.command == "data" and args.data_command == "synth":
        from components.data.synth import synth_command

        cfg = load_config(args.params, overrides)
        return synth_command(cfg, out=Path(args.out), products=args.products, seed=args.seed)
    if args.command == "data" and args.data_command == "validate":
        from components.data.validate import validate_command

        return validate_command(Path(args.root), report_path=Path(args.report) if args.report else None)
    if args.command == "masks":
        from components.segment.cache import build_command

        return build_command(load_config(args.params, overrides), data_dir=Path(args.data_dir), cache_dir=Path(args.out))
    if args.command == "run":
        from flows.pipeline import run_command

        return run_command(load_config(args.params, overrides), out=Path(args.out))
    if args.command == "demo":
        from flows.demo import demo_command

        return demo_command(load_config(args.params, overrides), out=Path(args.out))
    if args.command == "report":
        from components.eval.report import report_command

        return report_command([Path(r) for r in args.runs], out=Path(args.out) if args.out else None)
    if args.command == "banks":
        from components.memory.cli import banks_command

        cfg = load_config(args.params, overrides)
        return banks_command(cfg, args.banks_command, getattr(args, "version", None), store=Path(args.store) if args.store else None)
    if args.command == "add-product":
        from flows.add_product import add_product_command

        cfg = with_product_text(load_config(args.params, overrides), args.name, args.text, args.via_server)
        return add_product_command(cfg, Path(args.path), name=args.name, out=Path(args.out) if args.out else None, via_server=args.via_server)
    if args.command == "serve":
        from flows.serve import serve_command

        return serve_command(load_config(args.params, overrides))
    raise AssertionError(f"unhandled command {args.command}")


def with_product_text(cfg: Config, name: str, text: str | None, via_server: bool) -> Config:
    """``cfg`` with ``text.prompts[name] = text`` (``add-product --text``); unchanged without ``--text``."""
    if text is None:
        return cfg
    if not text.strip():
        raise ContadError("add-product --text: the product sentence is empty")
    if via_server:
        raise ContadError(f"add-product --text cannot travel with --via-server: set text.prompts.{name} in the params file the server uses")
    cfg = cfg.model_copy(deep=True)
    cfg.text.prompts = {**cfg.text.prompts, name: text.strip()}
    return cfg


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may appear anywhere after the subcommand."""
    overrides = [a for a in argv if _OVERRIDE.match(a)]
    args = build_parser().parse_args([a for a in argv if not _OVERRIDE.match(a)])
    if overrides and not hasattr(args, "overrides"):
        build_parser().error(f"{args.command} takes no config overrides: {' '.join(overrides)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides or []) + overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except (ContadError, ConfigError) as exc:
        print(f"contad: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
