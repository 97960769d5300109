"""One store, one champion (issue 36), without training: store identity, per-store registered models in
one MLflow registry, the configured registry only, readers during a pending journal, doctor on a broken
JOURNAL/CURRENT and stale temporaries, a read-only store. States are tiny synthetic files; the
registry is a real MLflow sqlite store shared by the module (each test uses its own model name)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.atomic import writer_alive
from components.config import Config
from components.errors import ContadError
from components.memory import store as store_mod
from components.memory.store import BankError, BankStore, resolve_current_for_reader
from flows.cli import main
from flows.deployed import BankSource
from flows.promotion import ForeignChampion, Registry, banks_command, check_agreement, promote, registry_for, store_transaction
from tests.tracking_support import tiny_config


@pytest.fixture(scope="module")
def registry_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow sqlite registry for the module (created once: its migrations take seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()
    return uri


def _config(root: Path, store: str, model: str, uri: str | None) -> Config:
    cfg = tiny_config(root / store, root / "data", tracking_uri=uri)
    cfg.tracking.registered_model = model
    cfg.tracking.enabled = uri is not None
    return cfg


def _commit(store: BankStore, root: Path, payload: bytes) -> str:
    state = root / f"state-{payload.decode()}"
    state.mkdir(parents=True)
    (state / "model.safetensors").write_bytes(payload)
    (state / "calibration.json").write_text(json.dumps({"threshold": 1.0}))
    return store.commit(state, {"step": 0, "tasks": ["a"], "products": {"a": "/a"}}, make_current=False)


def _register(registry: Registry, store: BankStore, bank: str) -> str:
    """What ``Tracker.register_step_model`` does to the registry: a version tagged with its bank and store."""
    client = MlflowClient(tracking_uri=registry.uri, registry_uri=registry.uri)
    try:
        client.create_registered_model(registry.model)
    except MlflowException:
        pass  # claimed (created) already
    model_dir = store.root.parent / f"model-{bank[:12]}"  # a contad pyfunc's layout: MLmodel + method state + config
    shutil.copytree(store.state_dir(bank), model_dir / "artifacts" / "method")
    (model_dir / "artifacts" / "config.json").write_text("{}")
    (model_dir / "MLmodel").write_text("flavors:\n  python_function:\n    artifacts:\n      method: {path: artifacts/method}\n"
                                        "      config: {path: artifacts/config.json}\n")
    tags = {"bank_version": bank, "store_id": store.show(bank)["store_id"]}
    return str(client.create_model_version(registry.model, source=str(model_dir), tags=tags).version)


def _learn(cfg: Config, root: Path, payload: bytes) -> tuple[str, str | None]:
    """A writer command: bind the store, store a version, register it, promote it (like ``contad run``)."""
    with store_transaction(cfg) as (store, registry):
        bank = _commit(store, root, payload)
        model_version = _register(registry, store, bank) if registry is not None else None
        promote(store, registry, bank, model_version)
    return bank, model_version


def _champion(uri: str, model: str) -> str | None:
    try:
        return str(MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(model, "champion").version)
    except MlflowException:
        return None


def test_a_store_has_an_identity_recorded_in_its_versions(tmp_path: Path) -> None:
    store = BankStore(tmp_path / "banks")
    assert store.store_id() is None
    bank = _commit(store, tmp_path, b"one")
    store_id = store.store_id()
    assert store_id is not None and len(store_id) == 32 and store.ensure_store_id() == store_id
    assert store.show(bank)["store_id"] == store_id
    assert BankStore(tmp_path / "other").ensure_store_id() != store_id
    (store.root / "STORE_ID").write_text("not an id\n")
    with pytest.raises(BankError, match="STORE_ID"):
        store.store_id()


def test_two_stores_on_one_registry_keep_their_own_champions(tmp_path: Path, registry_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    sx, sy = _config(tmp_path, "sx", "two-stores", registry_db), _config(tmp_path, "sy", "two-stores", registry_db)
    x_bank, x_model = _learn(sx, tmp_path / "x", b"x1")
    y_bank, y_model = _learn(sy, tmp_path / "y", b"y1")
    with store_transaction(sx) as (store, registry):  # what add-product on sx checks first: no ChampionMismatch
        check_agreement(store, registry)
        assert sx.tracking.registered_model == "two-stores"
    assert banks_command(sx, "doctor", None, None) == 0
    assert banks_command(sy, "doctor", None, None) == 0
    assert "0 problem(s)" in capsys.readouterr().out
    rx, ry = registry_for(sx), registry_for(sy)
    assert rx is not None and ry is not None
    assert rx.model == "two-stores" and ry.model == f"two-stores-{BankStore(tmp_path / 'sy' / 'banks').store_id()[:8]}"  # type: ignore[index]
    assert rx.champion_bank() == x_bank and ry.champion_bank() == y_bank
    assert (_champion(registry_db, rx.model), _champion(registry_db, ry.model)) == (x_model, y_model)

    # a registry view bound to sy never moves (or adopts) a champion sx registered
    foreign = Registry(rx.uri, rx.model, ry.store_id)
    with pytest.raises(ForeignChampion, match="belongs to bank store"):
        foreign.champion_bank()
    with pytest.raises(ForeignChampion):
        foreign.set_champion(x_model)
    with pytest.raises(ForeignChampion):
        promote(BankStore(tmp_path / "sy" / "banks"), foreign, y_bank, x_model)
    assert _champion(registry_db, rx.model) == x_model and foreign.version_for_bank(x_bank) is None


def test_rollback_on_a_copied_store_never_writes_the_journals_registry(tmp_path: Path, registry_db: str) -> None:
    cfg = _config(tmp_path, "orig", "copied", registry_db)
    v1, m1 = _learn(cfg, tmp_path / "s", b"c1")
    v2, m2 = _learn(cfg, tmp_path / "s", b"c2")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "orig" / "banks", copy)
    other = _config(tmp_path, "other", "copied", f"sqlite:///{tmp_path / 'OTHER.db'}")

    with pytest.raises(ContadError, match="no registered model version"):
        banks_command(other, "rollback", v1[:10], copy)  # OTHER.db holds no version of it: refused, not done elsewhere
    assert _champion(registry_db, "copied") == m2 and BankStore(copy).current() == v2

    journal = json.loads((copy / "JOURNAL.json").read_text())
    journal.update(state="pending", before={"bank": v1, "model_version": m1}, after={"bank": v2, "model_version": m2})
    (copy / "JOURNAL.json").write_text(json.dumps(journal))
    with pytest.raises(BankError, match=r"tracking\.uri=sqlite:///.*mlflow\.db to repair it"):
        banks_command(other, "list", None, copy)
    assert _champion(registry_db, "copied") == m2  # the journal's registry was not touched
    assert banks_command(_config(tmp_path, "orig", "copied", registry_db), "rollback", v1[:10], copy) == 0  # the configured one, same as the journal's
    assert _champion(registry_db, "copied") == m1 and BankStore(copy).current() == v1


def test_readers_resolve_current_as_recovery_will(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, "r", "unused", None)
    v1, _ = _learn(cfg, tmp_path / "s", b"r1")
    store = BankStore(cfg.banks.store_dir)
    v2 = _commit(store, tmp_path / "s", b"r2")
    # what a crash between the pointer and the alias leaves: CURRENT moved, journal still pending
    store.write_journal({"state": "pending", "before": {"bank": v1, "model_version": None}, "after": {"bank": v2, "model_version": None}, "registry": None})
    store.set_current(v2)

    def writer_lock(*args: object, **kwargs: object) -> None:
        raise AssertionError("a reader took the writer lock")

    monkeypatch.setattr(BankStore, "lock", writer_lock)
    assert resolve_current_for_reader(store) == v1
    assert BankSource(str(store.root), cfg).current().bank_version == v1
    assert store.current() == v2 and store.read_journal()["state"] == "pending"  # readers write nothing
    assert [e.version for e in store.list() if e.current] == [v1]
    store.write_journal({"state": "committed", "before": {"bank": v1}, "after": {"bank": v2}, "registry": None})
    assert BankSource(str(store.root), cfg).current().bank_version == v2
    (store.root / "CURRENT").write_text("garbage\n")
    assert resolve_current_for_reader(store) == v2  # the committed journal's last agreed bank


def _dead_pid() -> int:
    return next(pid for pid in range(4_000_000, 4_100_000) if not writer_alive(pid))


@pytest.mark.parametrize("journal", ["{}", '{"state": "comm', ""])
def test_doctor_rebuilds_a_broken_journal_from_the_champion(journal: str, tmp_path: Path, registry_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, "j", f"journal-{len(journal)}", registry_db)
    v1, m1 = _learn(cfg, tmp_path / "s", b"j1")
    v2, m2 = _learn(cfg, tmp_path / "s", b"j2")
    store = BankStore(cfg.banks.store_dir)
    (store.root / "JOURNAL.json").write_text(journal)
    store.set_current(v1)  # and CURRENT disagrees with the champion (v2): the champion's tag decides
    with pytest.raises(BankError, match="JOURNAL.json"):
        banks_command(cfg, "list", None, None)
    assert banks_command(cfg, "doctor", None, None) == 0
    assert "rebuilt it from the champion's bank_version tag" in capsys.readouterr().out
    assert store.current() == v2 and store.read_journal()["state"] == "committed" and registry_for(cfg).champion_bank() == v2  # type: ignore[union-attr]
    assert banks_command(cfg, "rollback", v1[:10], None) == 0 and store.current() == v1


@pytest.mark.parametrize("pointer", [b"\xff\xfe garbage", b"", b"0123456789abcdef\n"])
def test_doctor_restores_a_broken_current_from_the_committed_journal(pointer: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, "c", "unused", None)
    _learn(cfg, tmp_path / "s", b"p1")
    v2, _ = _learn(cfg, tmp_path / "s", b"p2")
    store = BankStore(cfg.banks.store_dir)
    (store.root / "CURRENT").write_bytes(pointer)
    assert banks_command(cfg, "doctor", None, None) == 0
    assert "restored CURRENT from the committed journal" in capsys.readouterr().out
    assert store.current() == v2

    (store.root / "CURRENT").write_bytes(pointer)
    (store.root / "JOURNAL.json").write_text("{}")  # both broken, no registry: nothing to tell which version was current
    assert banks_command(cfg, "doctor", None, None) == 1
    assert "choose one: contad banks rollback" in capsys.readouterr().out
    assert banks_command(cfg, "rollback", v2[:10], None) == 0 and store.current() == v2  # not a dead end


def test_doctor_removes_temporaries_of_dead_writers_only(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "t", "unused", None)
    _learn(cfg, tmp_path / "s", b"t1")
    store = BankStore(cfg.banks.store_dir)
    steps = store.root.parent / "steps"
    dead, live = _dead_pid(), os.getpid()
    stale = [steps / f".00-a.{dead}.x1.tmp", store.versions_dir / f".staging.{dead}.x2.tmp", store.root / f".CURRENT.{dead}.x3.tmp"]
    kept = [steps / f".01-b.{live}.y1.tmp", store.versions_dir / f".{'f' * 64}.{live}.y2.tmp"]
    for path in stale[:2] + kept:
        path.mkdir(parents=True)
        (path / "part").write_bytes(b"half")
    stale[2].write_text("half")
    assert banks_command(cfg, "doctor", None, None) == 0
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_read_only_store_still_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, "ro", "unused", None)
    bank, _ = _learn(cfg, tmp_path / "s", b"ro")
    real_open = os.open

    def read_only(path: str | os.PathLike[str], flags: int, *args: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(store_mod.os, "open", read_only)
    store = str(cfg.banks.store_dir)
    assert main(["banks", "list", "--store", store, "tracking.enabled=false"]) == 0
    assert bank[:12] in capsys.readouterr().out
    assert main(["banks", "list", "--json", "--store", store]) == 0
    assert json.loads(capsys.readouterr().out)["current"] == bank
