"""Memory-bank store: content hashing, immutability, atomic commits, rollback, checkout, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.config import Config
from components.memory import store as store_mod
from components.memory.cli import banks_command
from components.memory.store import BankError, BankStore


def _method_dir(root: Path, name: str, payload: bytes) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(payload)
    (d / "model.json").write_text(json.dumps({"tasks": [name]}))
    return d


def _meta(step: int, tasks: list[str]) -> dict:
    return {"step": step, "tasks": tasks, "products": {t: f"/data/{t}" for t in tasks}, "metrics": {tasks[-1]: {"image_auroc": 0.9}}}


def test_commit_is_content_hashed_and_chains_parents(tmp_path: Path) -> None:
    store = BankStore(tmp_path / "banks")
    v1 = store.commit(_method_dir(tmp_path, "a", b"one"), _meta(0, ["a"]))
    v2 = store.commit(_method_dir(tmp_path, "b", b"two"), _meta(1, ["a", "b"]))
    assert v1 != v2 and len(v1) == 64
    assert store.current() == v2
    assert store.show(v2)["parent"] == v1
    assert store.show(v1)["parent"] is None
    assert store.show(v2)["products"] == {"a": "/data/a", "b": "/data/b"}
    assert [e.version for e in store.list()] == [v1, v2]
    assert [e.current for e in store.list()] == [False, True]
    # any changed file (here model.json) is a different state
    assert store.commit(_method_dir(tmp_path, "a2", b"one"), _meta(7, ["x"])) not in (v1, v2)
    # the same content from another directory is the same, immutable version
    copy = tmp_path / "copy_of_a"
    store.checkout(v1, copy)
    assert store.commit(copy, _meta(9, ["z"])) == v1
    assert store.show(v1)["step"] == 0
    assert store.current() == v1


def test_commit_accepts_an_object_with_save(tmp_path: Path) -> None:
    class Saver:
        def save(self, directory: str | Path) -> Path:
            (Path(directory) / "model.json").write_text("{}")
            return Path(directory)

    store = BankStore(tmp_path / "banks")
    v = store.commit(Saver(), {"step": 0, "tasks": ["a"]})
    assert (store.state_dir(v) / "model.json").read_text() == "{}"


def test_crash_mid_commit_leaves_previous_version_current(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BankStore(tmp_path / "banks")
    v1 = store.commit(_method_dir(tmp_path, "a", b"one"), _meta(0, ["a"]))

    def explode(path: Path, manifest: dict) -> None:
        raise RuntimeError("disk died mid-commit")

    monkeypatch.setattr(store_mod, "_write_manifest", explode)
    with pytest.raises(RuntimeError, match="mid-commit"):
        store.commit(_method_dir(tmp_path, "b", b"two"), _meta(1, ["a", "b"]))
    assert store.current() == v1
    assert [e.version for e in store.list()] == [v1]
    leftovers = [p.name for p in store.versions_dir.iterdir() if p.name != v1]
    assert leftovers == []


def test_rollback_moves_pointer_and_never_deletes(tmp_path: Path) -> None:
    store = BankStore(tmp_path / "banks")
    v1 = store.commit(_method_dir(tmp_path, "a", b"one"), _meta(0, ["a"]))
    v2 = store.commit(_method_dir(tmp_path, "b", b"two"), _meta(1, ["a", "b"]))
    assert store.rollback(v1[:6]) == v1
    assert store.current() == v1
    assert {e.version for e in store.list()} == {v1, v2}
    assert store.rollback(v2) == v2


def test_unique_prefix_lookup_and_errors(tmp_path: Path) -> None:
    store = BankStore(tmp_path / "banks")
    versions = [store.commit(_method_dir(tmp_path, f"m{i}", bytes([i])), _meta(i, [f"m{i}"])) for i in range(20)]
    assert store.resolve(versions[3][:10]) == versions[3]
    first_chars = [v[0] for v in versions]
    shared = next(c for c in first_chars if first_chars.count(c) > 1)  # 20 hashes over 16 hex digits
    with pytest.raises(BankError, match="ambiguous"):
        store.resolve(shared)
    with pytest.raises(BankError, match="no bank version"):
        store.resolve("zzzz")
    with pytest.raises(BankError, match="no bank store"):
        BankStore(tmp_path / "missing").list()


def test_checkout_materialises_and_detects_corruption(tmp_path: Path) -> None:
    store = BankStore(tmp_path / "banks")
    v1 = store.commit(_method_dir(tmp_path, "a", b"one"), _meta(0, ["a"]))
    dest = store.checkout(v1, tmp_path / "out" / "method")
    assert (dest / "model.safetensors").read_bytes() == b"one"
    (store.state_dir(v1) / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(BankError, match="corrupt"):
        store.checkout(v1, tmp_path / "out2")
    with pytest.raises(BankError, match="corrupt"):
        store.rollback(v1)


def test_banks_command_list_show_rollback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "banks"
    store = BankStore(root)
    v1 = store.commit(_method_dir(tmp_path, "a", b"one"), _meta(0, ["a"]))
    v2 = store.commit(_method_dir(tmp_path, "b", b"two"), _meta(1, ["a", "b"]))
    cfg = Config()
    assert banks_command(cfg, "list", None, root) == 0
    out = capsys.readouterr().out
    assert v1[:12] in out and v2[:12] in out
    assert banks_command(cfg, "show", v1[:8], root) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == v1 and shown["current"] is False
    assert banks_command(cfg, "rollback", v1[:8], root) == 0
    assert store.current() == v1
    cfg.banks.store_dir = str(root)
    assert banks_command(cfg, "list", None, None) == 0


def test_cli_reports_bad_version_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    root = tmp_path / "banks"
    BankStore(root).commit(_method_dir(tmp_path, "a", b"one"), _meta(0, ["a"]))
    assert main(["banks", "show", "nothere", "--store", str(root)]) == 2
    assert "no bank version starting with 'nothere'" in capsys.readouterr().err
    assert main(["banks", "list", "--store", str(tmp_path / "nope")]) == 2
    assert "no bank store" in capsys.readouterr().err


def test_candidate_commit_keeps_current_and_records_given_parent(tmp_path: Path) -> None:
    store = BankStore(tmp_path / "banks")
    v1 = store.commit(_method_dir(tmp_path, "a", b"one"), _meta(0, ["a"]))
    candidate = store.commit(_method_dir(tmp_path, "b", b"two"), {**_meta(1, ["a", "b"]), "parent": v1}, make_current=False)
    assert store.current() == v1
    assert store.show(candidate)["parent"] == v1
    assert store.rollback(candidate) == candidate
