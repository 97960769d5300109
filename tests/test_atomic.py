"""Atomic writes never leave partial files."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.atomic import atomic_directory, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    p = tmp_path / "a" / "x.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_text(p, "new")
    assert p.read_text() == "new"
    assert [f.name for f in p.parent.iterdir()] == ["x.json"]


def test_atomic_directory_failure_keeps_old(tmp_path: Path) -> None:
    d = tmp_path / "state"
    with atomic_directory(d) as tmp:
        (tmp / "f.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(d) as tmp:
            (tmp / "f.txt").write_text("v2-partial")
            raise RuntimeError("crash mid-write")
    assert (d / "f.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
    with atomic_directory(d) as tmp:
        (tmp / "f.txt").write_text("v2")
    assert (d / "f.txt").read_text() == "v2"


def test_atomic_files_get_normal_permissions(tmp_path: Path) -> None:
    import os
    import stat

    p = atomic_write_text(tmp_path / "r.md", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "f").write_text("y")
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
