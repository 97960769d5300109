"""The ``contad`` command line: one entry point, one subcommand per job.

Config overrides are trailing ``key=value`` arguments (dotted keys, lists comma-separated),
applied on top of ``--params`` (default ``params.yaml``).
"""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import os
import re
import shutil
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

from components.config import Config, ConfigError, load_config
from components.errors import ContadError

DESCRIPTION = """\
contad — unsupervised continual anomaly detection pipeline.

Typical use:
  contad demo --out runs/demo                  synthetic products -> full continual pipeline -> report
  contad run --out runs/x method=ucad data.root=DIR
  contad report runs/ucad runs/patchcore_finetune --out runs/compare
  contad predict images/ --model models:/contad-detector@champion --out runs/predictions
  contad serve-api --model models:/contad-detector@champion
"""

EXIT_CODES = """\
exit codes:
  0    success (run / add-product: the final step was promoted: current bank + champion)
  1    promotion gate rejected the (final) step: stored, but not current and not champion;
       banks doctor: a problem remains
  2    invalid input, configuration or usage (the message names the file or key);
       data validate: the dataset failed validation; predict: no input image could be decided;
       stream: none of its new images could be read
  3    output not writable (read-only file system or permission denied)
  4    disk full (no space left on device)
  5    tracking database unreadable or corrupt (tracking.uri)
  6    data folder unreadable (permission denied, symlink loop)
  70   unexpected internal error (rerun with --verbose for the traceback)
  75   bank store (or stream --out) locked by another command for longer than banks.lock_timeout_s
  86   injected fault (CONTAD_FAULT, tests only)
  130  interrupted
Errors are one line on stderr; --verbose adds debug logs and the full traceback.
"""
EXIT_OK, EXIT_REJECTED, EXIT_INPUT, EXIT_READ_ONLY, EXIT_DISK_FULL, EXIT_TRACKING_DB, EXIT_DATA_UNREADABLE = 0, 1, 2, 3, 4, 5, 6
EXIT_INTERNAL, EXIT_LOCKED, EXIT_INTERRUPTED = 70, 75, 130


def _add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="YAML config file (default: params.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. method=ucad data.products=a,b")


class _SuggestingParser(argparse.ArgumentParser):
    """An ArgumentParser whose "invalid choice" errors (mistyped subcommands) add a "did you mean" hint."""

    def error(self, message: str) -> None:  # type: ignore[override]
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            close = difflib.get_close_matches(m[1], re.findall(r"'([^']*)'", m[2]), n=1, cutoff=0.5)
            if close:
                message += f"; did you mean '{close[0]}'?"
        super().error(message)


def _version() -> str:
    """The installed package's version (package metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("contad")
    except PackageNotFoundError:
        return "unknown (not installed; pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = _SuggestingParser(prog="contad", description=DESCRIPTION, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"contad {_version()}", help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="generate and validate datasets").add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    synth = data.add_parser("synth", help="generate procedural MVTec-layout products (deterministic per seed)")
    synth.add_argument("--out", required=True, help="output directory (one folder per product)")
    synth.add_argument("--products", type=int, default=None, help="number of products (default: data.synth.products)")
    synth.add_argument("--seed", type=int, default=None, help="random seed (default: data.synth.seed)")
    synth.add_argument("--depth", action="store_true", help="RGB + xyz object products in the MVTec 3D-AD layout (same as data.synth.depth=true)")
    _add_params(synth)
    validate = data.add_parser("validate", help="validate a dataset (Great Expectations suite + image checks); writes a JSON report, never into the data")
    validate.add_argument("root", help="dataset root (MVTec-style layout: one folder per product)")
    report_to = validate.add_mutually_exclusive_group()
    report_to.add_argument("--out", default=None, help="output folder for validation_report.json (default: runs/validation/, as ROOTNAME_validation_report.json)")
    report_to.add_argument("--report", default=None, help="explicit report file path (outside ROOT)")
    validate.add_argument("--min-valid-fraction", type=float, default=None, help="xyz tiffs: minimum share of valid points (default: data.depth_min_valid_fraction)")

    masks = sub.add_parser("masks", help="offline structure masks").add_subparsers(dest="masks_command", required=True, metavar="SUBCOMMAND")
    build = masks.add_parser("build", help="fill the content-addressed mask cache for every training image (resumable)")
    build.add_argument("data_dir", help="dataset root")
    build.add_argument("--out", required=True, help="cache directory")
    _add_params(build)

    run = sub.add_parser("run", help="train a continual sequence and evaluate every task after every step; writes OUT/metrics.json and a report")
    run.add_argument("--out", required=True, help="run directory")
    run.add_argument("--allow-rejected", action="store_true",
                     help="exit 0 even when the final step fails the promotion gate (research runs, DVC); it still is not made current")
    _add_params(run)

    demo = sub.add_parser("demo", help="synthetic products + the whole continual pipeline (Prefect, MLflow, report) with the offline backbone")
    demo.add_argument("--out", default="runs/demo", help="demo directory (default: runs/demo)")
    _add_params(demo)

    report = sub.add_parser("report", help="side-by-side comparison of one or more run directories")
    report.add_argument("runs", nargs="+", help="run directories containing metrics.json")
    report.add_argument("--out", default=None, help="output directory (default: first run dir)")
    report.add_argument("--dvc-dir", default=None, help="also write the DVC metrics and plot files of the first run here (summary.json, average/curves/forgetting.csv; see dvc.yaml)")
    report.add_argument("--store", default=None, help="bank store DIR whose operator feedback (STORE/feedback) is reported too: verdicts by kind, "
                        "learned false rejects, the recorded escapes scored by the current bank version (also OUT/feedback.json)")
    report.add_argument("--params", default="params.yaml", help="YAML config for scoring the escapes (deploy-time settings, e.g. decision.target_fpr; default: params.yaml)")
    template = sub.add_parser("plots-template", help="write the offline HTML template of `dvc plots show` (Vega JS inlined from vl-convert-python, no CDN)")
    template.add_argument("--out", default=".dvc/plots/offline.html", help="template file (default: .dvc/plots/offline.html, named in .dvc/config)")

    banks = sub.add_parser("banks", help="versioned memory banks").add_subparsers(dest="banks_command", required=True, metavar="SUBCOMMAND")
    for name, helptext in (("list", "list versions (current marked)"), ("show", "show one version's manifest"),
                           ("rollback", "make a version current and its model champion, together (never deletes)"),
                           ("doctor", "repair an interrupted promotion, a broken JOURNAL/CURRENT, dead writers' temporaries; "
                                      "verify every version's hashes and the champion's files; check CURRENT == champion")):
        b = banks.add_parser(name, help=helptext)
        if name not in ("list", "doctor"):
            b.add_argument("version", help="version hash (a unique prefix is enough)")
        if name == "list":
            b.add_argument("--json", action="store_true", help="print the versions as JSON (store, current, versions oldest first, each with current true/false)")
        b.add_argument("--store", default=None, help="bank store directory (default: banks.store_dir)")
        _add_params(b)

    add = sub.add_parser("add-product", help="triggered incremental run: validate, mask, train on top of the champion, evaluate, gate")
    add.add_argument("path", help="product folder (MVTec layout: train/good, test/..., ground_truth/...)")
    add.add_argument("--name", required=True, help="product name")
    add.add_argument("--out", default=None, help="directory for this step's outputs (default: runs/add-product/NAME)")
    add.add_argument("--via-server", action="store_true", help="emit the contad.product.added event to the Prefect server instead of running locally")
    add.add_argument("--text", default=None, help="sentence describing the product for text-guided methods (sets text.prompts.NAME; stored in the bank)")
    _add_params(add)

    stream = sub.add_parser("stream", help="online mode: score each image of a live stream, then learn it (prequential); checkpoints are bank versions")
    stream.add_argument("source", help="a folder watched for new images, a text file of image paths, or - for paths on stdin")
    stream.add_argument("--product", required=True, help="the product (task) this stream learns")
    stream.add_argument("--out", required=True, help="stream directory: stream.jsonl, checkpoint/, banks/ (rerun to resume)")
    stream.add_argument("--init", default=None, help="saved method directory to start from (default: a fresh model)")
    _add_params(stream)

    serve = sub.add_parser("serve", help="register Prefect deployments that run add-product on contad.product.added and feedback apply on contad.feedback.recorded events, and serve them")
    _add_params(serve)

    feedback = sub.add_parser("feedback", help="operator verdicts: PATH... --as good|defect records them; `feedback apply` learns false rejects "
                              "into a gated bank version; `feedback list` prints the audit trail")
    feedback.add_argument("paths", nargs="*", metavar="PATH", help="image files or prediction ids (with --predictions); or `apply` / `list`")
    feedback.add_argument("--as", dest="verdict", choices=["good", "defect"], default=None, help="the operator's verdict on the images")
    feedback.add_argument("--product", default=None, help="the product the images are of (default: the product the detector routed them to)")
    feedback.add_argument("--by", default=None, help="who gives the verdict (default: $USER)")
    feedback.add_argument("--predictions", default=None, help="predictions.jsonl of contad predict, to name images by prediction_id")
    feedback.add_argument("--apply", action="store_true", help="same as `contad feedback apply`")
    feedback.add_argument("--force", action="store_true", help="apply even below feedback.min_images false rejects")
    feedback.add_argument("--json", action="store_true", help="list: print the verdicts as JSON")
    feedback.add_argument("--out", default=None, help="apply: folder for the candidate state and feedback_apply.json (default: runs/feedback)")
    _add_params(feedback)

    predict = sub.add_parser("predict", help="OK/NG decisions, scores and heat-map overlays for images, folders or globs (exit 0 even when parts are NG)")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or glob patterns")
    _add_model_source(predict, required=True)
    predict.add_argument("--out", required=True, help="output directory: predictions.csv, predictions.jsonl, overlays/")
    _add_params(predict)

    export = sub.add_parser("export", help="write a deployed detector as ONNX graphs + data files + a reference runner (onnxruntime + numpy)")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", default=None, help="registered model, e.g. models:/contad-detector@champion (registry: tracking.uri)")
    source.add_argument("--bank", default=None, help="bank store DIR or DIR@VERSION")
    source.add_argument("--method-dir", default=None, help="a saved method directory (e.g. RUN/steps/N/method; also the per-product oracle)")
    export.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default: onnx)")
    export.add_argument("--out", required=True, help="output folder: detector.onnx.json, *.onnx, *.npy, run_onnx.py")
    _add_params(export)

    bench = sub.add_parser("bench", help="every method on a named sequence over N seeds (real pipeline, resumable) -> a leaderboard (benchmarks/LEADERBOARD.md for runs/bench)")
    bench.add_argument("--sequence", default="real-ad", help="real-ad | real-3d | synth (default: real-ad)")
    bench.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method (default: 3)")
    bench.add_argument("--methods", default=None, help="comma list (default: every registered method of the sequence)")
    bench.add_argument("--data", default=None, help="data folder of the sequence (default: ../shared/data/<sequence>)")
    bench.add_argument("--out", default="runs/bench", help="where the runs go (default: runs/bench)")
    bench.add_argument("--leaderboard", default=None,
                       help="leaderboard file to regenerate (default: benchmarks/LEADERBOARD.md for --out runs/bench, else OUT/LEADERBOARD.md)")
    bench.add_argument("--keep-recorded", action="store_true",
                       help="methods with no finished run under OUT keep the runs the leaderboard's .json recorded (refresh some rows only)")
    bench.add_argument("--headline", action="append", default=[], metavar="FILE",
                       help="also regenerate the headline table between FILE's '<!-- leaderboard:SEQUENCE -->' markers (repeatable)")
    _add_params(bench)

    config = sub.add_parser("config", help="inspect the configuration").add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    _add_params(config.add_parser("show", help="print the effective, validated config (params file + overrides) as YAML"))

    api = sub.add_parser("serve-api", help="REST inference service (POST /v1/predict, Swagger UI at /docs; binds 127.0.0.1:8000 by default)")
    _add_model_source(api, required=False)
    api.add_argument("--host", default=None, type=_host, help="address to bind (default: serve.host, 127.0.0.1; beyond loopback needs the "
                     "bearer token of serve.token_env); wins over a serve.host= override")
    api.add_argument("--port", default=None, type=_port, help="TCP port (default: serve.port, 8000); wins over a serve.port= override")
    _add_params(api)
    return parser


def _host(text: str) -> str:
    """argparse type of ``serve-api --host``: a non-empty address without spaces."""
    if not text.strip() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: give an IP address or host name, e.g. 127.0.0.1")
    return text


def _port(text: str) -> int:
    """argparse type of ``serve-api --port``: an integer in 0..65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected an integer from 0 to 65535")
    return port


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """Config overrides spelled as flags (``serve-api --host/--port``); appended last, so they win over ``key=value``."""
    if args.command != "serve-api":
        return []
    return ([f"serve.host={args.host}"] if args.host is not None else []) + ([f"serve.port={args.port}"] if args.port is not None else [])


def _add_model_source(p: argparse.ArgumentParser, required: bool) -> None:
    source = p.add_mutually_exclusive_group(required=required)
    source.add_argument("--model", default=None, help="registered model, e.g. models:/contad-detector@champion (registry: tracking.uri)"
                        + ("" if required else "; default: serve.model"))
    source.add_argument("--bank", default=None, help="bank store DIR or DIR@VERSION (method from the config: pass the run's --params/overrides)")


def _dispatch(args: argparse.Namespace) -> int:
    overrides = getattr(args, "overrides", []) or []
    if hasattr(args, "params"):
        load_config(args.params, overrides)  # fail fast on a bad config, before heavy imports
    if args.command == "config":
        import yaml

        from components.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(load_config(args.params, overrides)), sort_keys=False), end="")
        return EXIT_OK
    if args.command == "data" and args.data_command == "synth":
        from components.data.synthesis import synth_command

        cfg = load_config(args.params, overrides + (["data.synth.depth=true"] if args.depth else []))
        return synth_command(cfg, out=Path(args.out), products=args.products, seed=args.seed)
    if args.command == "data" and args.data_command == "validate":
        from components.data.validate import validate_command

        from components.config import DataConfig
        from components.data.validate import default_report_path

        floor = args.min_valid_fraction if args.min_valid_fraction is not None else DataConfig().depth_min_valid_fraction
        report_path = Path(args.report) if args.report else default_report_path(Path(args.root), Path(args.out)) if args.out else None
        return validate_command(Path(args.root), report_path=report_path, min_valid_fraction=floor)
    if args.command == "masks":
        from components.segment.cache import build_command

        return build_command(load_config(args.params, overrides), data_dir=Path(args.data_dir), cache_dir=Path(args.out))
    if args.command == "run":
        from flows.pipeline import run_command

        return run_command(load_config(args.params, overrides), out=Path(args.out), allow_rejected=args.allow_rejected)
    if args.command == "demo":
        from flows.demo import demo_command

        return demo_command(load_config(args.params, overrides), out=Path(args.out))
    if args.command == "report":
        from components.eval.report import report_command

        feedback = None
        if args.store:
            from flows.feedback_report import feedback_summary

            feedback = feedback_summary(load_config(args.params, overrides), Path(args.store))
            if feedback is None:
                print(f"no operator feedback recorded in {args.store}: the report has no feedback section")
        return report_command([Path(r) for r in args.runs], out=Path(args.out) if args.out else None,
                              dvc_dir=Path(args.dvc_dir) if args.dvc_dir else None, feedback=feedback)
    if args.command == "plots-template":
        from components.eval.dvc_export import write_html_template

        print(f"offline dvc plots template written to {write_html_template(Path(args.out))}")
        return EXIT_OK
    if args.command == "banks" and getattr(args, "json", False):
        from flows.banks_json import banks_list_json

        cfg = load_config(args.params, overrides)
        return banks_list_json(Path(args.store) if args.store else Path(cfg.banks.store_dir), cfg.banks.lock_timeout_s)
    if args.command == "banks":
        from flows.promotion import banks_command

        cfg = load_config(args.params, overrides)
        return banks_command(cfg, args.banks_command, getattr(args, "version", None), store=Path(args.store) if args.store else None)
    if args.command == "add-product":
        from flows.add_product import add_product_command

        cfg = with_product_text(load_config(args.params, overrides), args.name, args.text, args.via_server)
        return add_product_command(cfg, Path(args.path), name=args.name, out=Path(args.out) if args.out else None, via_server=args.via_server)
    if args.command == "stream":
        from flows.stream import stream_command

        cfg = load_config(args.params, overrides)
        return stream_command(cfg, args.source, args.product, Path(args.out), init=Path(args.init) if args.init else None)
    if args.command == "serve":
        from flows.serve import serve_command

        return serve_command(load_config(args.params, overrides))
    if args.command == "feedback":
        from flows.feedback import feedback_command

        return feedback_command(load_config(args.params, overrides), args.paths, args.verdict, product=args.product, by=args.by,
                                predictions=Path(args.predictions) if args.predictions else None, apply=args.apply, force=args.force,
                                as_json=args.json, out=Path(args.out) if args.out else None)
    if args.command == "predict":
        from flows.predict import predict_command

        return predict_command(load_config(args.params, overrides), args.paths, Path(args.out), model=args.model, bank=args.bank)
    if args.command == "bench":
        from flows.bench import bench_command, default_leaderboard

        load_config(args.params, overrides)  # every run gets these overrides: validated once, up front
        board = Path(args.leaderboard) if args.leaderboard else default_leaderboard(Path(args.out))
        return bench_command(args.sequence, args.seeds, args.methods.split(",") if args.methods else None,
                             Path(args.out), board, args.data, overrides, args.params,
                             [Path(h) for h in args.headline], keep_recorded=args.keep_recorded)
    if args.command == "export":
        from flows.export import export_command

        return export_command(load_config(args.params, overrides), Path(args.out), model=args.model, bank=args.bank,
                              method_dir=args.method_dir, fmt=args.format)
    if args.command == "serve-api":
        from flows.api import serve_api_command

        return serve_api_command(load_config(args.params, overrides), model=args.model, bank=args.bank)
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
        args.overrides = list(args.overrides or []) + overrides + _flag_overrides(args)
    return args


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (``__cause__``/``__context__``), outermost first."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return chain


def _write_probe(path: Path) -> str | None:
    """Why nothing can be created at ``path`` (its nearest existing folder refuses a new entry), or None when it can."""
    folder = path.absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".contad-write-check-", dir=folder))
    except OSError as exc:
        return f"{folder} does not allow creating files ({exc.strerror or exc})"
    return None


def unwritable_output(exc: BaseException, outputs: list[tuple[str, Path]]) -> str | None:
    """The message for a "no such file" failure while writing under one of ``outputs`` (flag, path), when that
    location really cannot be written (e.g. under /proc); None otherwise (a missing input stays what it is)."""
    for cause in _causes(exc):
        if not (isinstance(cause, OSError) and cause.errno == errno.ENOENT and cause.filename):
            continue
        failed = Path(os.fsdecode(cause.filename)).absolute()
        for flag, out in outputs:
            out = out.absolute()
            if failed == out or out in failed.parents or failed.parent == out.parent:
                reason = _write_probe(out)
                if reason is not None:
                    return f"cannot write {flag} {out}: {reason}; choose a writable location"
    return None


def output_is_a_file(exc: BaseException, outputs: list[tuple[str, Path]]) -> str | None:
    """The message when a command failed because an output folder it was given (flag, path) is an existing file."""
    for cause in _causes(exc):
        if not (isinstance(cause, OSError) and cause.errno in (errno.EEXIST, errno.ENOTDIR) and cause.filename):
            continue
        failed = Path(os.fsdecode(cause.filename)).absolute()
        for flag, out in outputs:
            out = out.absolute()
            if out.is_file() and (failed == out or out in failed.parents):
                return f"{flag} {out} is an existing file, not a folder: give a new or existing folder"
    return None


def _output_paths(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """The output locations a command was given (``--out``, ``--report``, ``--store``) as (flag, path)."""
    return [(f"--{name}", Path(value)) for name in ("out", "report", "store") if isinstance(value := getattr(args, name, None), str)]


def _is_database_error(exc: BaseException) -> bool:
    """An SQLite/SQLAlchemy database error (the only databases contad opens itself are MLflow tracking stores), or a
    text-decoding error raised inside the driver (sqlite3 cannot decode the error message of a corrupt schema)."""
    drivers = ("sqlite3", "sqlalchemy")
    if type(exc).__name__ in ("DatabaseError", "OperationalError") and type(exc).__module__.split(".")[0] in drivers:
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return isinstance(exc, UnicodeDecodeError) and tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0] in drivers


def _tracking_uri(args: argparse.Namespace) -> str | None:
    """The command's ``tracking.uri`` (None when it has no config or the config does not load)."""
    if not hasattr(args, "params"):
        return None
    try:
        return load_config(args.params, getattr(args, "overrides", []) or []).tracking.uri
    except Exception:  # noqa: BLE001 - only a hint for an error message
        return None


def disk_full_target(exc: BaseException) -> str | None:
    """What could not be written when ``exc`` says the disk is full (ENOSPC/EDQUOT, also inside the list of a
    ``shutil.Error`` from ``copytree``, which keeps only each failure's text); None for any other error."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return os.fsdecode(exc.filename) if exc.filename else "output"
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list):
        full = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
        for entry in exc.args[0]:
            if isinstance(entry, tuple) and len(entry) == 3 and any(text in str(entry[2]) for text in full):
                return str(entry[1])
    return None


def classify_error(exc: BaseException, outputs: list[tuple[str, Path]] | None = None, tracking_uri: str | None = None) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that ended a command (see ``EXIT_CODES``);
    ``outputs``: the command's output locations, to tell an unwritable one from a missing input;
    ``tracking_uri``: named when an SQLite/SQLAlchemy error ends the command."""
    from components.errors import UnreadableDataError
    from components.memory.store import BankLockTimeout

    unwritable = unwritable_output(exc, outputs or [])
    if unwritable is not None:
        return EXIT_READ_ONLY, unwritable
    not_a_folder = output_is_a_file(exc, outputs or [])
    if not_a_folder is not None:
        return EXIT_INPUT, not_a_folder
    for cause in _causes(exc):
        name = type(cause).__name__
        if name == "TrackingStoreError":
            return EXIT_TRACKING_DB, str(cause)
        if _is_database_error(cause):
            text = str(cause).splitlines()[0] if str(cause) else name
            return EXIT_TRACKING_DB, (f"tracking database {tracking_uri or '(tracking.uri)'} is unreadable ({text}); "
                                      "move it aside or set tracking.uri to another database")
        if isinstance(cause, BankLockTimeout):
            return EXIT_LOCKED, str(cause)
        if isinstance(cause, UnreadableDataError):
            return EXIT_DATA_UNREADABLE, str(cause)
        full = disk_full_target(cause)
        if full is not None:
            return EXIT_DISK_FULL, f"disk full: no space left writing {full}; free space and rerun the same command (it resumes)"
        if isinstance(cause, OSError) and cause.errno == errno.ELOOP:
            return EXIT_DATA_UNREADABLE, f"{cause.filename or 'a path'}: symlink loop ({cause.strerror})"
        if isinstance(cause, OSError) and cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return EXIT_READ_ONLY, f"cannot write {cause.filename or 'output'}: {cause.strerror}; choose a writable --out / store location"
    if isinstance(exc, (ContadError, ConfigError)):
        return EXIT_INPUT, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return EXIT_INTERNAL, f"unexpected {type(exc).__name__}: {text} (rerun with --verbose for the traceback)"


class _NoFailureEcho(logging.Filter):
    """Drops Prefect's failure records (error logs, tracebacks, "Finished in state Failed")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR and not record.exc_info and "Finished in state Failed" not in record.getMessage()


def _quiet_framework_logs() -> None:
    """Without --verbose, Prefect's own loggers stay silent about failures (the CLI prints each problem once)."""
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoFailureEcho) for f in logger.filters):
            logger.addFilter(_NoFailureEcho())


# Libraries whose INFO chatter (import-time loader lines, doc decorators, DB migrations) is not for users.
THIRD_PARTY_LOGGERS = ("great_expectations", "faiss", "mlflow", "alembic", "urllib3", "httpx", "httpcore",
                       "matplotlib", "PIL", "numexpr", "distributed", "dask", "fsspec", "git", "filelock")
THIRD_PARTY_QUIET_ENV = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # carriage-return "Downloading artifacts" bars
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # MLflow configures its own handler at import time
}
# Library hints addressed to whoever packages a model, not to a contad user (MLflow re-enables them with its own
# "once" filter, so they are dropped as captured ``py.warnings`` records instead).
THIRD_PARTY_HINTS = ("Add type hints to the `predict` method", "An input example was not provided when logging the model")
# Prefect's routine INFO line after every task run (kept in the Prefect UI's run logs; not printed on the terminal).
PREFECT_ROUTINE = ("Finished in state Completed",)
# Library errors that are raised right after being logged with a traceback (the CLI reports them once, in one line).
THIRD_PARTY_ECHOES = ("SQLAlchemy database error",)


class _ThirdPartyBelowWarning(logging.Filter):
    """Drops records below WARNING from third-party loggers, even from modules that force their own level to INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        package = record.name.split(".", 1)[0]
        if record.name == "py.warnings" and any(hint in record.getMessage() for hint in THIRD_PARTY_HINTS):
            return False
        if package == "prefect" and record.levelno < logging.WARNING and record.getMessage().startswith(PREFECT_ROUTINE):
            return False
        if package in THIRD_PARTY_LOGGERS and record.getMessage().startswith(THIRD_PARTY_ECHOES):
            return False
        return record.levelno >= logging.WARNING or package not in THIRD_PARTY_LOGGERS


def _quiet_third_party() -> None:
    """Without --verbose, third-party libraries only speak at WARNING and above (set before they are imported)."""
    for key, value in THIRD_PARTY_QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _ThirdPartyBelowWarning) for f in handler.filters):
            handler.addFilter(_ThirdPartyBelowWarning())


# Offline, telemetry-free defaults for every command (the Makefile exports the same): without them the temporary
# Prefect server logs "ERROR | prefect.server.services.telemetry - Failed to send telemetry" on every run.
OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
}


def set_offline_defaults() -> None:
    """Set ``OFFLINE_ENV`` where the environment does not say otherwise (before Prefect, MLflow, DVC, GX are imported)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


# Commands that start Prefect flows; their run history goes to PREFECT_HOME (``set_prefect_home``).
PREFECT_COMMANDS = ("run", "demo", "add-product", "serve", "stream", "feedback")
PREFECT_HOME_DIR = Path("runs") / ".prefect"


def set_prefect_home(command: str) -> Path | None:
    """Keep Prefect's run history with the project: ``PREFECT_HOME=./runs/.prefect`` (absolute) for a command that
    starts Prefect, unless the user chose a home (``PREFECT_HOME``) or a server (``PREFECT_API_URL``). The user's
    profiles (``~/.prefect/profiles.toml``) still apply. Returns the home set, or None (nothing changed)."""
    if command not in PREFECT_COMMANDS or os.environ.get("PREFECT_HOME") or os.environ.get("PREFECT_API_URL"):
        return None
    home = Path.cwd() / PREFECT_HOME_DIR
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # an unwritable working directory: Prefect's own default stays
    profiles = Path.home() / ".prefect" / "profiles.toml"
    if profiles.is_file():
        os.environ.setdefault("PREFECT_PROFILES_PATH", str(profiles))
    os.environ["PREFECT_HOME"] = str(home)
    return home


# numpy picks SIMD kernels (AVX2, AVX-512) by CPU when it is imported; their float results differ in the last bits,
# which flips a few pixels of the synthetic images between machines. `contad data synth` (DVC's prepare stage) runs
# numpy on its x86-64 baseline kernels only, so its files are byte-identical on every x86-64 machine.
PORTABLE_NUMPY_ENV = {"NPY_ENABLE_CPU_FEATURES": "X86_V2"}


def set_portable_numpy(args: argparse.Namespace) -> bool:
    """For ``data synth`` on x86-64: numpy without CPU-dispatched kernels (``PORTABLE_NUMPY_ENV``), unless numpy is
    already imported or the user chose its features; True when set."""
    import platform

    if (args.command, getattr(args, "data_command", None)) != ("data", "synth") or "numpy" in sys.modules:
        return False
    if platform.machine().lower() not in ("x86_64", "amd64") or {"NPY_ENABLE_CPU_FEATURES", "NPY_DISABLE_CPU_FEATURES"} & set(os.environ):
        return False
    os.environ.update(PORTABLE_NUMPY_ENV)
    return True


def main(argv: list[str] | None = None) -> int:
    set_offline_defaults()
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    set_prefect_home(args.command)  # before Prefect is imported: it reads its settings once
    set_portable_numpy(args)  # before numpy is imported
    from components.progress import configure_logging

    configure_logging(logging.DEBUG if args.verbose else logging.INFO)  # log lines print through the progress bars
    logging.captureWarnings(True)  # warnings too (as ``py.warnings`` records), from the first import on
    # PIL warns about images above its own pixel limit; contad bounds them itself (serve.max_pixels: "too large")
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit", category=RuntimeWarning, module=r"PIL\.")
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # MLflow's records reach that handler too (not a second stream)
    if not args.verbose:
        _quiet_third_party()
    try:
        if args.command in PREFECT_COMMANDS:  # every command that may start a temporary Prefect server
            from flows.server_guard import install

            install()  # the temporary Prefect server dies with this process
            if not args.verbose:
                _quiet_framework_logs()
        return _dispatch(args)
    except (Exception, KeyboardInterrupt) as exc:
        code, message = classify_error(exc, _output_paths(args), _tracking_uri(args))
        if args.verbose:
            traceback.print_exception(exc, file=sys.stderr)
        print(f"contad: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
