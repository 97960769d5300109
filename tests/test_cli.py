"""The contad CLI: every subcommand documented, errors printed without tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.cli import build_parser, main


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("data", "masks", "run", "demo", "report", "banks", "add-product", "serve"):
        assert cmd in out


def test_run_requires_out() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run"])


def test_config_error_is_reported_cleanly(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    code = main(["run", "--out", str(tmp_path / "r"), "ucad.bogus=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "ucad.bogus: unknown key" in err and "Traceback" not in err


def test_console_script_installed() -> None:
    res = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "contad" in res.stdout


def test_overrides_anywhere_after_subcommand() -> None:
    from flows.cli import parse_args

    args = parse_args(["masks", "build", "data", "--out", "cache", "masks.provider=slic", "masks.workers=1"])
    assert args.data_dir == "data" and args.out == "cache"
    assert args.overrides == ["masks.provider=slic", "masks.workers=1"]
    args = parse_args(["run", "method=ucad", "--out", "x", "ucad.epochs=1"])
    assert args.out == "x" and args.overrides == ["method=ucad", "ucad.epochs=1"]
