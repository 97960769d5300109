"""What the terminal shows: no third-party chatter, --version, config show, "did you mean"."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from tests.test_pipeline_helpers import make_tiny_products, shared_prefect_api

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "promotion.min_new_image_auroc=0.0", "promotion.max_forgetting=1.0",
    "data.image_size=64", "data.heldout_fraction=0.2", "masks.image_size=64", "masks.workers=1",
    "ucad.epochs=1", "ucad.key_size=16", "ucad.knowledge_size=32", "ucad.batch_size=4",
    "ucad.pairs_per_image=32", "eval.overlays_per_task=0",
]
OWN_LOGGERS = ("components", "flows", "prefect", "contad", "py.warnings")
LOG_LINE = re.compile(r"^\d{4}[-/]\d\d[-/]\d\d \d\d:\d\d:\d\d(?:,\d+)? (?P<level>[A-Z]+) (?P<name>[\w.]+):")


def _third_party_info(output: str) -> list[str]:
    """Lines at INFO/DEBUG from loggers that are not contad's or Prefect's, plus MLflow download bars."""
    noisy = []
    for line in output.replace("\r", "\n").splitlines():
        m = LOG_LINE.match(line)
        if m and m["level"] in ("INFO", "DEBUG") and not m["name"].startswith(OWN_LOGGERS):
            noisy.append(line)
        elif "Downloading artifacts" in line or "faiss" in line.lower():
            noisy.append(line)
    return noisy


@pytest.mark.slow
def test_run_output_has_no_third_party_info_lines(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A whole `contad run` (tiny data, MLflow on, registry + promotion) prints only contad's and Prefect's logs,
    and, its stderr not being a terminal, no carriage-return bar drawing. One product has normal images only:
    it is learned, not evaluated (no AUROC, null cells), and gated on its reserved normals."""
    import json
    import shutil

    data = make_tiny_products(tmp_path / "data", n_products=3)
    untested = sorted(p.name for p in data.iterdir() if (p / "test").is_dir())[-1]
    shutil.rmtree(data / untested / "test")
    shutil.rmtree(data / untested / "ground_truth")
    env = dict(os.environ, PREFECT_API_URL=shared_prefect_api(request), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_LOGGING_LEVEL", "MLFLOW_CONFIGURE_LOGGING"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--out", str(tmp_path / "run"), f"data.root={data}",
           f"masks.cache_dir={tmp_path / 'cache'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *TINY_RUN,
           "promotion.max_false_reject_rate=1.0"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    output = res.stdout + res.stderr
    assert res.returncode == 0, output[-3000:]
    assert "INFO flows.tracking: registered contad-detector" in output  # MLflow really ran (and downloaded artifacts)
    assert "INFO components.data.validate" in output  # Great Expectations really ran
    assert _third_party_info(output) == []
    assert "\r" not in res.stderr and "Add type hints" not in output and "Finished in state Completed" not in output
    assert f"{untested} (normal images only)" in res.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    column = metrics["tasks"].index(untested)
    assert metrics["not_evaluable"] == [untested]
    assert all(row[column] is None for row in metrics["matrix"]["image_auroc"])  # never 0: not evaluable
    learned_at = next(i for i, step in enumerate(metrics["steps"]) if untested in step)
    assert all(row[column] is not None for row in metrics["matrix"]["reserved_false_reject_rate"][learned_at:])


def test_without_a_terminal_bars_are_plain_periodic_log_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import logging

    from components import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("components.progress").addHandler(handler)
    monkeypatch.setattr(logging.getLogger("components.progress"), "level", logging.INFO)
    try:
        not_a_tty = io.StringIO()
        bar = progress.progress_bar(range(4), desc="masks", unit="img", file=not_a_tty)
        assert isinstance(bar, progress.LineProgress)
        assert list(bar) == [0, 1, 2, 3]
    finally:
        logging.getLogger("components.progress").removeHandler(handler)
    assert not_a_tty.getvalue() == ""  # nothing drawn, no carriage returns
    assert records and records[-1].startswith("masks: 4/4 img (100%)") and all("\r" not in r for r in records)

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 3600.0)
    records.clear()
    logging.getLogger("components.progress").addHandler(handler)
    try:
        assert list(progress.progress_bar(range(3), desc="short")) == [0, 1, 2]
    finally:
        logging.getLogger("components.progress").removeHandler(handler)
    assert records == []  # a bar shorter than the interval says nothing


def test_on_a_terminal_log_lines_never_land_inside_a_bar() -> None:
    import io
    import logging

    from components.progress import ProgressLogHandler, progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    handler = ProgressLogHandler(screen)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("components.test_progress")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in progress_bar(range(3), desc="evaluate", file=screen, mininterval=0):
            logger.warning("record %d", i)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    text = screen.getvalue()
    assert "evaluate:" in text and "\r" in text  # a live bar was drawn
    for i in range(3):
        before, _, _ = text.partition(f"WARNING components.test_progress: record {i}")
        on_that_line = before.rsplit("\n", 1)[-1].rsplit("\r", 1)[-1]
        assert on_that_line == "", f"record {i} printed after {on_that_line!r}"  # the bar was cleared first


def test_noise_filter_catches_the_known_offenders() -> None:
    """The checker itself flags the lines the issue counted (so the run test can fail)."""
    sample = "\n".join([
        "2026-12-01 03:58:41,227 INFO great_expectations._docs_decorators: registering",
        "2026-12-01 03:58:09,779 INFO faiss.loader: Loading faiss with AVX2 support.",
        "2026/12/01 03:59:01 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
        "Downloading artifacts:   0%|          | 0/3\rDownloading artifacts: 100%",
        "2026-12-01 03:59:30,300 INFO flows.tracking: registered contad-detector version 1",
        "2026-12-01 03:59:30,555 INFO prefect.flow_runs: promotion gate passed",
    ])
    assert len(_third_party_info(sample)) == 5


def test_third_party_loggers_quiet_unless_verbose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    for name in ("great_expectations", "faiss", "mlflow"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    for key in ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_LOGGING_LEVEL"):
        monkeypatch.setenv(key, "")  # restored at teardown
        monkeypatch.delenv(key)
    main(["--verbose", "report", str(tmp_path / "missing")])
    assert logging.getLogger("great_expectations").level == logging.NOTSET
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
    main(["report", str(tmp_path / "missing")])
    for name in ("great_expectations", "faiss", "mlflow"):
        assert logging.getLogger(name).level == logging.WARNING
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"


def test_version_comes_from_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"contad {version('contad')}"


def test_config_show_prints_the_effective_validated_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import yaml

    from components.config import config_to_dict, load_config

    params = tmp_path / "p.yaml"
    params.write_text("ucad:\n  epochs: 7\n")
    assert main(["config", "show", "--params", str(params), "ucad.batch_size=3", "data.products=a,b"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["ucad"]["epochs"] == 7 and shown["ucad"]["batch_size"] == 3 and shown["data"]["products"] == ["a", "b"]
    assert shown == config_to_dict(load_config(params, ["ucad.batch_size=3", "data.products=a,b"]))  # every key, defaults filled
    assert main(["config", "show", "ucad.batch_size=0"]) == 2  # validated: out of range is an error
    assert "ucad.batch_size" in capsys.readouterr().err


@pytest.mark.parametrize(("override", "hint"), [
    ("ucad.epoch=3", "did you mean ucad.epochs?"),
    ("methd=ucad", "did you mean method?"),
    ("promotion.max_forgeting=0.2", "did you mean promotion.max_forgetting?"),
])
def test_mistyped_config_key_suggests_the_close_one(capsys: pytest.CaptureFixture[str], override: str, hint: str) -> None:
    assert main(["config", "show", override]) == 2
    err = capsys.readouterr().err
    assert f"{override.split('=')[0]}: unknown key; {hint}" in err and "Traceback" not in err


def test_unrelated_unknown_key_gets_no_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "ucad.zzzz=1"]) == 2
    err = capsys.readouterr().err
    assert "ucad.zzzz: unknown key" in err and "did you mean" not in err


@pytest.mark.parametrize(("argv", "hint"), [
    (["rn", "--out", "x"], "did you mean 'run'?"),
    (["banks", "lst"], "did you mean 'list'?"),
    (["config", "shw"], "did you mean 'show'?"),
])
def test_mistyped_subcommand_suggests_the_close_one(capsys: pytest.CaptureFixture[str], argv: list[str], hint: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert hint in capsys.readouterr().err


def test_unrelated_subcommand_gets_no_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["xyzzy"])
    err = capsys.readouterr().err
    assert "invalid choice: 'xyzzy'" in err and "did you mean" not in err


def test_data_validate_report_goes_under_out_never_into_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from components.config import SynthConfig
    from components.data.synth import generate_products
    from components.data.validate import REPORT_NAME

    data = tmp_path / "lines" / "data"
    generate_products(data, 1, seed=0, cfg=SynthConfig(image_size=64, train_per_product=3, test_good_per_product=1, test_defect_per_type=1))
    before = sorted(p for p in data.rglob("*"))
    monkeypatch.chdir(tmp_path)
    assert main(["data", "validate", str(data)]) == 0  # default: runs/validation/ under the working directory
    assert json.loads((tmp_path / "runs" / "validation" / f"data_{REPORT_NAME}").read_text())["ok"]
    assert main(["data", "validate", str(data), "--out", str(tmp_path / "val")]) == 0
    assert json.loads((tmp_path / "val" / REPORT_NAME).read_text())["ok"]
    assert sorted(p for p in data.rglob("*")) == before  # nothing written into the dataset folder
    capsys.readouterr()
    assert main(["data", "validate", str(data), "--out", str(data / "reports")]) == 2  # refused, one line
    assert "must not be written into the dataset folder" in capsys.readouterr().err
    assert not (data / "reports").exists()


def test_module_that_forces_info_is_still_muted(tmp_path: Path) -> None:
    """great_expectations.data_context.types.base sets its own level to INFO at import; the root handlers still drop it."""
    import logging

    from flows.cli import _ThirdPartyBelowWarning

    main(["report", str(tmp_path / "missing")])
    assert all(any(isinstance(f, _ThirdPartyBelowWarning) for f in h.filters) for h in logging.getLogger().handlers)

    def shown(name: str, level: int) -> bool:
        return _ThirdPartyBelowWarning().filter(logging.LogRecord(name, level, __file__, 1, "msg", None, None))

    assert not shown("great_expectations.data_context.types.base", logging.INFO)
    assert not shown("faiss.loader", logging.INFO)
    assert shown("great_expectations.data_context.types.base", logging.WARNING)
    assert shown("components.data.validate", logging.INFO) and shown("prefect.flow_runs", logging.INFO)
    assert shown("gitlab_like", logging.INFO)  # whole package names only ("git" does not match "gitlab_like")
    hint = "x.py:1: UserWarning: \x1b[33mAdd type hints to the `predict` method to enable data validation"
    assert not _ThirdPartyBelowWarning().filter(logging.LogRecord("py.warnings", logging.WARNING, __file__, 1, hint, None, None))
    done = logging.LogRecord("prefect.task_runs", logging.INFO, __file__, 1, "Finished in state Completed()", None, None)
    failed = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "Finished in state Failed('boom')", None, None)
    assert not _ThirdPartyBelowWarning().filter(done) and _ThirdPartyBelowWarning().filter(failed)


def test_product_with_only_normal_images_is_valid_but_not_evaluable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import shutil

    from components.config import SynthConfig
    from components.data.synth import generate_products
    from components.data.validate import REPORT_NAME

    data = tmp_path / "data"
    tested, untested = generate_products(data, 2, seed=0, cfg=SynthConfig(image_size=64, train_per_product=3, test_good_per_product=1, test_defect_per_type=1))
    shutil.rmtree(data / untested / "test")
    shutil.rmtree(data / untested / "ground_truth")
    assert main(["data", "validate", str(data), "--out", str(tmp_path / "val")]) == 0
    out = capsys.readouterr().out
    assert "is valid" in out and f"not evaluable (normal images only, no test images): {untested}" in out
    report = json.loads((tmp_path / "val" / REPORT_NAME).read_text())
    assert report["ok"] and report["not_evaluable"] == [untested]
    assert report["products"][untested]["train"] == 3 and report["products"][tested]["test_defective"] > 0

    # `contad run` and add-product accept it too: it is learned, and gated on its reserved normals instead of AUROC
    from flows import pipeline

    manifest = pipeline.validate_dataset.fn(data)
    assert set(manifest["product"]) == {tested, untested}
