"""``serve-api --host/--port`` (flags win over ``serve.host=/serve.port=``) and ``banks list --json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from components.config import Config
from components.memory.store import LOCK_FILE, BankStore
from flows import api
from flows.cli import main


def _method_dir(root: Path, name: str, payload: bytes) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "model.json").write_text(json.dumps({"tasks": [name]}))
    return folder


def _serve_config(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> Config:
    """The config ``serve_api_command`` receives for ``contad serve-api ARGV`` (the server itself is not started)."""
    seen: dict[str, Any] = {}

    def fake_serve(cfg: Config, model: str | None = None, bank: str | None = None) -> int:
        seen["cfg"] = cfg
        return 0

    monkeypatch.setattr(api, "serve_api_command", fake_serve)
    assert main(["serve-api", *argv]) == 0
    return seen["cfg"]


def test_serve_api_host_port_flags_win_over_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _serve_config(monkeypatch, ["--host", "::1", "--port", "8123"])
    assert (cfg.serve.host, cfg.serve.port) == ("::1", 8123)
    cfg = _serve_config(monkeypatch, ["serve.host=localhost", "serve.port=9000"])  # overrides alone still work
    assert (cfg.serve.host, cfg.serve.port) == ("localhost", 9000)
    cfg = _serve_config(monkeypatch, ["serve.port=9000", "--port", "8124", "serve.host=localhost"])
    assert (cfg.serve.host, cfg.serve.port) == ("localhost", 8124)
    cfg = _serve_config(monkeypatch, [])
    assert (cfg.serve.host, cfg.serve.port) == (Config().serve.host, Config().serve.port)


@pytest.mark.parametrize("argv, message", [(["--port", "70000"], "invalid port '70000'"), (["--port", "http"], "invalid port 'http'"),
                                           (["--host", ""], "invalid address ''")])
def test_serve_api_bad_flags_are_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve-api", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_serve_api_help_documents_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve-api", "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "--host" in text and "--port" in text and "serve.host=" in text and "serve.port=" in text


def _store_contents(root: Path) -> dict[Path, bytes]:
    """Every file of a bank store but the advisory lock, whose holder line a reader taking the lock rewrites."""
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != LOCK_FILE}


def test_banks_list_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "banks"
    store = BankStore(root)
    v1 = store.commit(_method_dir(tmp_path, "a", b"one"), {"step": 0, "tasks": ["a"]})
    v2 = store.commit(_method_dir(tmp_path, "b", b"two"), {"step": 1, "tasks": ["a", "b"]})
    store.rollback(v1)
    before = _store_contents(root)
    assert main(["banks", "list", "--json", "--store", str(root)]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)  # stdout is the JSON document and nothing else
    assert document["store"] == str(root.resolve()) and document["current"] == v1 and document["interrupted_promotion"] is False
    assert [(v["version"], v["short"], v["step"], v["tasks"], v["parent"], v["current"]) for v in document["versions"]] == [
        (v1, v1[:12], 0, ["a"], None, True), (v2, v2[:12], 1, ["a", "b"], v1, False)]
    assert all(v["created"] for v in document["versions"])
    assert _store_contents(root) == before  # read-only


def test_banks_list_json_empty_and_missing_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["banks", "list", "--json", "--store", str(tmp_path / "empty")]) == 0
    assert json.loads(capsys.readouterr().out) == {"store": str((tmp_path / "empty").resolve()), "current": None,
                                                   "interrupted_promotion": False, "versions": []}
    assert main(["banks", "list", "--json", "--store", str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "no bank store at" in captured.err and str(tmp_path / "nope") in captured.err
