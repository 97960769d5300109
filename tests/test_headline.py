"""The leaderboard's headline table spliced into README / RESULTS: only between the sequence's markers,
from the same rows as LEADERBOARD.md, so the two cannot disagree."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.errors import ContadError
from components.eval.headline import splice_headline
from flows.bench import write_leaderboard
from tests.test_leaderboard import _fake_run


def test_bench_regenerates_only_the_marked_block_from_the_leaderboard_rows(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    _fake_run(out / "real-ad", "ucad", 0, {"a": 0.9, "b": 0.8})
    _fake_run(out / "real-ad", "ucad", 1, {"a": 0.7, "b": 0.8})
    doc = tmp_path / "docs" / "README.md"
    doc.parent.mkdir()
    doc.write_text("intro 12.3\n<!-- leaderboard:real-ad -->\n| ucad | 1 | 99.9 |\n<!-- /leaderboard:real-ad -->\noutro\n"
                   "<!-- leaderboard:real-3d -->\nuntouched\n<!-- /leaderboard:real-3d -->\n")
    board = tmp_path / "benchmarks" / "LEADERBOARD.md"
    write_leaderboard(out, board, [doc])
    text = doc.read_text()
    assert "99.9" not in text and "| ucad | 2 | 80.0 ± 7.1 |" in text  # mean ± sd over the two seeds
    assert "| ucad | 2 | 80.0 ± 7.1 |" in board.read_text()  # the same number in the full board
    assert "No finished run yet: patchcore_finetune" in board.read_text()  # registered methods without a run are named
    assert text.startswith("intro 12.3\n") and "outro\n" in text and "untouched" in text  # outside / other sequence kept
    assert "(../benchmarks/LEADERBOARD.md)" in text  # link relative to the document


def test_a_document_without_markers_is_left_alone_and_a_broken_pair_is_named(tmp_path: Path) -> None:
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert splice_headline(plain, "real-ad", "| x |") is False and plain.read_text() == "no markers\n"
    broken = tmp_path / "broken.md"
    broken.write_text("<!-- leaderboard:real-ad -->\nno end\n")
    with pytest.raises(ContadError, match="broken.md"):
        splice_headline(broken, "real-ad", "| x |")


def test_bench_refuses_a_missing_headline_file_before_running_anything(tmp_path: Path) -> None:
    from flows.bench import bench_command

    with pytest.raises(ContadError, match="--headline .*nope.md"):
        bench_command("synth", 1, ["patchcore_finetune"], tmp_path / "out", tmp_path / "L.md", None, [],
                      headlines=[tmp_path / "nope.md"])
    assert not (tmp_path / "out").exists()
