"""Where a method stands against UCAD: read from the leaderboard's JSON into the run's log and report."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from components.eval.report import run_markdown
from components.eval.standing import method_standing, standing_markdown, standing_sentence
from flows.bench import write_leaderboard
from tests.test_leaderboard import _fake_run


@pytest.fixture()
def board(tmp_path: Path) -> Path:
    """LEADERBOARD.json of a real-ad bench: ucad over two seeds, lemo over one, inverted on product a."""
    out = tmp_path / "bench"
    _fake_run(out / "real-ad", "ucad", 0, {"a": 0.9, "b": 0.8})
    _fake_run(out / "real-ad", "ucad", 1, {"a": 0.7, "b": 0.8})
    _fake_run(out / "real-ad", "lemo", 0, {"a": 0.2, "b": 0.9})
    write_leaderboard(out, tmp_path / "LEADERBOARD.md")
    return tmp_path / "LEADERBOARD.json"


def test_standing_against_ucad_from_the_leaderboard(board: Path) -> None:
    (standing,) = method_standing(board, "lemo")
    assert standing.sequence == "real-ad" and standing.overall[:1] == pytest.approx((0.55,)) and standing.overall[2] == 1
    assert standing.gap == pytest.approx(0.55 - 0.8)
    line = standing_sentence(standing)
    assert "55.0 (1 seed) vs ucad 80.0 ± 7.1 (2 seeds): -25.0 points" in line and "below 50 on a" in line and "chance" not in line  # no test counts on this board: neither luck nor inversion claimed
    text = "\n".join(standing_markdown([standing], "lemo", "x.json"))
    assert "| lemo | 1 | 20.0 | 90.0 | 55.0 |" in text and "| ucad | 2 | 80.0 ± 14.1 | 80.0 ± 0.0 | 80.0 ± 7.1 |" in text
    assert standing_markdown([standing], "ucad", "x.json") == []  # the reference does not stand against itself


def test_no_board_or_no_runs_is_advice_never_an_error(board: Path, tmp_path: Path) -> None:
    assert method_standing(tmp_path / "absent.json", "lemo") == []
    (tmp_path / "broken.json").write_text("{not json")
    assert method_standing(tmp_path / "broken.json", "lemo") == []
    assert method_standing(board, "iuf") == []  # no run of iuf
    assert "No finished leaderboard runs of `iuf`" in "\n".join(standing_markdown([], "iuf", "x.json"))


def test_run_report_and_log_carry_the_standing(board: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.bench
    from components.config import Config
    from flows.pipeline import _log_standing

    doc = {"method": "lemo", "protocol": "1-1", "tasks": ["a"], "matrix": {}}
    report = run_markdown(doc, {}, standing_markdown(method_standing(board, "lemo"), "lemo", "x.json"))
    assert report.index("## Where this method stands") > report.index("## Run")
    monkeypatch.setattr(flows.bench, "LEADERBOARD_JSON", board)
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("test_standing")
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    monkeypatch.setattr("flows.pipeline.run_logger", lambda: logger)
    try:
        _log_standing(Config(method="lemo"))
    finally:
        logger.removeHandler(handler)
    assert any(r.levelno == logging.WARNING and "-25.0 points" in r.getMessage() for r in records)  # > 5 points below
