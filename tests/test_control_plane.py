"""Control-plane integrity without training: store lock, promotion journal, hashes, config ranges,
mask-cache temporaries, one-line CLI errors with exit codes, orphan-safe servers, stale MLflow runs."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.atomic import atomic_write_bytes, is_stale_temporary
from components.config import ConfigError, load_config
from components.errors import ContadError
from components.memory.store import BankError, BankLockTimeout, BankStore
from flows.promotion import doctor, promote, recover, rollback

REPO = Path(__file__).resolve().parents[1]


def _state(directory: Path, payload: bytes) -> Path:
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(payload)
    (directory / "model.json").write_text('{"tasks": []}')
    return directory


class FakeRegistry:
    """In-memory stand-in for the MLflow registry: model versions tagged with bank versions."""

    model = "fake-detector"
    uri = "memory://"

    def __init__(self) -> None:
        self.banks: dict[str, str] = {}
        self.alias: str | None = None

    def register(self, bank: str) -> str:
        version = str(len(self.banks) + 1)
        self.banks[version] = bank
        return version

    def champion(self) -> str | None:
        return self.alias

    def champion_bank(self) -> str | None:
        return self.banks.get(self.alias) if self.alias else None

    def set_champion(self, version: str | None) -> None:
        self.alias = version

    def version_for_bank(self, bank: str) -> str | None:
        found = [int(v) for v, b in self.banks.items() if b == bank]
        return str(max(found)) if found else None

    def to_dict(self) -> None:
        return None  # the journal then records no registry; recovery uses the one passed in


def _two_versions(tmp_path: Path) -> tuple[BankStore, FakeRegistry, str, str, str, str]:
    store = BankStore(tmp_path / "banks")
    registry = FakeRegistry()
    v1 = store.commit(_state(tmp_path / "s1", b"one"), {"step": 0, "products": {"a": "/a"}}, make_current=False)
    m1 = registry.register(v1)
    promote(store, registry, v1, m1)
    v2 = store.commit(_state(tmp_path / "s2", b"two"), {"step": 1, "products": {"a": "/a", "b": "/b"}}, make_current=False)
    m2 = registry.register(v2)
    return store, registry, v1, m1, v2, m2


# ---------------------------------------------------------------------------------- transactions
def test_candidates_are_not_current_until_promoted(tmp_path: Path) -> None:
    store, registry, v1, m1, v2, m2 = _two_versions(tmp_path)
    assert store.current() == v1 and registry.champion() == m1
    promote(store, registry, v2, m2)
    assert store.current() == v2 and registry.champion_bank() == v2
    assert store.read_journal()["state"] == "committed"


def test_crash_between_pointer_and_alias_is_rolled_back_to_last_agreement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, registry, v1, m1, v2, m2 = _two_versions(tmp_path)

    def die(version: str | None) -> None:
        raise SystemExit("killed between pointer and alias")

    monkeypatch.setattr(registry, "set_champion", die)
    monkeypatch.setattr("flows.promotion._undo_now", lambda store, registry: None)  # a killed process undoes nothing
    with pytest.raises(SystemExit):
        promote(store, registry, v2, m2)
    assert store.current() == v2 and registry.champion() == m1  # the torn state a crash leaves
    monkeypatch.undo()
    assert "rolled back" in (recover(store, registry) or "")
    assert store.current() == v1 and registry.champion_bank() == v1
    assert recover(store, registry) is None  # idempotent


def test_failed_alias_move_is_undone_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, registry, v1, m1, v2, m2 = _two_versions(tmp_path)
    real = registry.set_champion

    def registry_down(version: str | None) -> None:
        if version == m2:
            raise OSError(errno.ENOSPC, "No space left on device", "mlflow.db")
        real(version)

    monkeypatch.setattr(registry, "set_champion", registry_down)
    with pytest.raises(OSError):
        promote(store, registry, v2, m2)
    assert store.current() == v1 and registry.champion() == m1  # pointer and champion never disagree
    assert store.read_journal()["state"] == "committed"


def test_rollback_moves_pointer_and_champion_together(tmp_path: Path) -> None:
    store, registry, v1, m1, v2, m2 = _two_versions(tmp_path)
    promote(store, registry, v2, m2)
    full, model_version = rollback(store, registry, v1[:8])
    assert (full, model_version) == (v1, m1)
    assert store.current() == v1 and registry.champion_bank() == v1


def test_doctor_verifies_hashes_and_agreement(tmp_path: Path) -> None:
    store, registry, v1, m1, v2, m2 = _two_versions(tmp_path)
    report = doctor(store, registry)
    assert report.checked == 2 and not report.problems and not report.repaired
    registry.set_champion(m2)  # someone moved the alias outside a transaction
    report = doctor(store, registry)
    assert report.repaired and registry.champion() == m1 and store.current() == v1
    model = store.state_dir(v2) / "model.safetensors"
    model.write_bytes(b"owt")  # same size, other content
    report = doctor(store, registry)
    assert len(report.problems) == 1 and str(model) in report.problems[0]


def test_bank_version_tamper_is_refused_naming_the_file(tmp_path: Path) -> None:
    store, registry, v1, *_ = _two_versions(tmp_path)
    model = store.state_dir(v1) / "model.safetensors"
    model.write_bytes(b"ONE")
    with pytest.raises(BankError, match=str(model)):
        store.checkout(v1, tmp_path / "out")


# ---------------------------------------------------------------------------------- the lock
_HOLDER = """
import sys, time
from components.memory.store import BankStore
with BankStore(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold_lock(root: Path, seconds: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root), str(seconds)], stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    return process


def test_second_writer_waits_with_a_message_then_proceeds(tmp_path: Path) -> None:
    store = BankStore(tmp_path / "banks")
    holder = _hold_lock(store.root, 1.5)
    messages: list[str] = []
    started = time.monotonic()
    with store.lock(timeout_s=60, waiting=messages.append):
        waited = time.monotonic() - started
        assert holder.poll() is not None or waited > 0.5
    holder.wait(timeout=30)
    assert len(messages) == 1 and "is locked by pid" in messages[0] and "waiting" in messages[0]
    with store.lock(timeout_s=0):  # free again; re-entrant within a process
        with store.lock(timeout_s=0):
            pass


def test_lock_timeout_is_a_clear_error(tmp_path: Path) -> None:
    store = BankStore(tmp_path / "banks")
    holder = _hold_lock(store.root, 5)
    try:
        with pytest.raises(BankLockTimeout, match="is locked by pid"):
            with store.lock(timeout_s=0.3, waiting=lambda m: None):
                pass
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------- step records (case 5)
def test_resume_refuses_a_tampered_step_state(tmp_path: Path) -> None:
    from components.memory.store import state_files
    from flows.records import METHOD_DIR, STATE_HASHES, STEP_RECORD, read_step_record, step_dir

    directory = step_dir(tmp_path, 0, "a")
    method = _state(directory / METHOD_DIR, bytes(range(256)) * 100)
    record = {"step": 0, "task": "a", "bank_version": "x", STATE_HASHES: state_files(method)}
    (directory / STEP_RECORD).write_text(json.dumps(record))
    assert read_step_record(tmp_path, 0, "a") == record
    data = bytearray((method / "model.safetensors").read_bytes())
    data[1000:1100] = bytes(100)  # same size, other bytes
    (method / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ContadError, match=r"model\.safetensors: does not match the content hash recorded in .*step\.json"):
        read_step_record(tmp_path, 0, "a")


# ---------------------------------------------------------------------------------- config (case 6)
@pytest.mark.parametrize("override", ["ucad.batch_size=0", "data.image_size=0", "ucad.lr=-5", "ucad.epochs=-1",
                                      "patchcore.coreset_size=0", "decision.target_fpr=1", "data.heldout_fraction=1.5"])
def test_out_of_range_config_is_refused_up_front(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_locations_are_not_part_of_the_run_fingerprint(tmp_path: Path) -> None:
    from flows.records import check_run_record, config_fingerprint

    base = load_config(None, [])
    moved = load_config(None, ["masks.cache_dir=/elsewhere", "banks.store_dir=/x", "tracking.uri=sqlite:////y.db", "ucad.epochs=0"])
    assert config_fingerprint(base) == config_fingerprint(moved)
    check_run_record(base, tmp_path)
    other = load_config(None, ["ucad.epochs=5"])
    assert check_run_record(other, tmp_path)["config"]["ucad"]["epochs"] == 5  # nothing trained yet: not locked
    (tmp_path / "steps" / "00-a").mkdir(parents=True)
    (tmp_path / "steps" / "00-a" / "step.json").write_text("{}")
    with pytest.raises(ContadError, match=r"ucad\.epochs \(5 -> 0\)"):
        check_run_record(base, tmp_path)


# ---------------------------------------------------------------------------------- mask cache (case 4)
def test_cache_cleanup_spares_a_live_writers_temporaries(tmp_path: Path) -> None:
    from components.config import MasksConfig
    from components.segment.cache import MaskCache

    cache = MaskCache(tmp_path / "cache", MasksConfig(image_size=64, workers=1))
    cache.directory.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        in_flight = cache.directory / f".abc.png.{live.pid}.x1y2.tmp"
        in_flight.write_bytes(b"partial")
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
        leftover = cache.directory / f".def.png.{dead.stdout.strip()}.q9.tmp"
        leftover.write_bytes(b"partial")
        assert cache.remove_stale_temporaries() == 1
        assert in_flight.exists() and not leftover.exists()
    finally:
        live.kill()
        live.wait()
    assert is_stale_temporary(in_flight) and cache.remove_stale_temporaries() == 1


def test_atomic_temporaries_name_their_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr("components.atomic.os.replace", spy)
    atomic_write_bytes(tmp_path / "f.png", b"x")
    assert seen and f".f.png.{os.getpid()}." in seen[0] and not is_stale_temporary(tmp_path / seen[0])


# ---------------------------------------------------------------------------------- CLI errors (case 7)
@pytest.mark.parametrize(
    ("exc", "code", "text"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/out/x"), 4, "disk full"),
        (OSError(errno.EROFS, "Read-only file system", "/out/x"), 3, "cannot write /out/x"),
        (PermissionError(errno.EACCES, "Permission denied", "/out/x"), 3, "cannot write /out/x"),
        (ContadError("bad key"), 2, "bad key"),
        (ValueError("boom"), 70, "--verbose"),
    ],
)
def test_errors_map_to_documented_exit_codes(exc: BaseException, code: int, text: str) -> None:
    from flows.cli import EXIT_CODES, classify_error

    wrapped = ContadError("add-product failed while versioning")
    wrapped.__cause__ = exc
    got_code, message = classify_error(exc if code in (2, 70) else wrapped)
    assert got_code == code and text in message and "\n" not in message
    assert f"  {code} " in EXIT_CODES


def test_symlink_loop_data_root_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert main(["run", "--out", str(tmp_path / "run"), f"data.root={loop}"]) == 6
    err = capsys.readouterr().err
    assert err.count("contad: error:") == 1 and "Symlink loop" in err and "Traceback" not in err


def _store_with_version(tmp_path: Path) -> tuple[BankStore, str]:
    store = BankStore(tmp_path / "banks")
    return store, store.commit(_state(tmp_path / "s", b"s"), {"step": 0})


def test_corrupt_tracking_database_and_disk_full_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.cli import main

    store, version = _store_with_version(tmp_path)
    garbage = tmp_path / "mlflow.db"
    garbage.write_bytes(os.urandom(4096))
    assert main(["banks", "rollback", version[:8], "--store", str(store.root), f"tracking.uri=sqlite:///{garbage}"]) == 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"tracking database {garbage} is unreadable" in err

    def full(path: object, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("components.memory.store.atomic_write_json", full)
    argv = ["banks", "rollback", version[:8], "--store", str(store.root), "tracking.enabled=false"]
    assert main(argv) == 4
    err = capsys.readouterr().err
    assert err.count("contad: error:") == 1 and "disk full" in err and "Traceback" not in err
    assert main(["--verbose", *argv]) == 4
    assert "Traceback" in capsys.readouterr().err  # only with --verbose
    assert store.current() == version


# ---------------------------------------------------------------------------------- orphans (case 8)
_PARENT = """
import sys, time
from flows.server_guard import _GuardedSubprocess
child = _GuardedSubprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "0"])
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is dead too
        return fh.read().split(")")[-1].split()[0] != "Z"


def test_guarded_server_child_dies_with_a_killed_parent() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 15
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "server child outlived its kill -9'd parent"
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_prefect_temporary_server_is_started_through_the_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.server.api import server

    from flows.server_guard import install

    started: list[list[str]] = []

    class FakePopen:
        def __init__(self, args: list[str], **kwargs: object) -> None:
            started.append(list(args))
            assert kwargs["pass_fds"]

    monkeypatch.setattr(server, "subprocess", server.subprocess)  # restored after the test
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    assert install()
    server.SubprocessASGIServer(port=1)._run_uvicorn_command()
    server.SubprocessASGIServer._instances.pop(1, None)
    (argv,) = started
    assert argv[1] == "-c" and "contad-parent-watch" in argv[2] and argv[4] == "uvicorn" and "127.0.0.1" in argv


def test_running_mlflow_runs_of_dead_processes_are_marked_failed(tmp_path: Path) -> None:
    from components.config import TrackingConfig
    from flows.tracking import HOST_TAG, PID_TAG, Tracker, make_client
    import socket

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with Tracker(cfg, "sequential") as first:
        experiment = first.experiment_id
    client = make_client(cfg)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout.strip()
    orphan = client.create_run(experiment, tags={PID_TAG: dead, HOST_TAG: socket.gethostname()}).info.run_id
    alive = client.create_run(experiment, tags={PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}).info.run_id
    with Tracker(cfg, "sequential"):
        pass
    assert client.get_run(orphan).info.status == "FAILED"
    assert client.get_run(alive).info.status == "RUNNING"


def test_infra_docs_bind_loopback_and_require_auth() -> None:
    text = (REPO / "infra" / "README.md").read_text()
    code = [line for block in text.split("```")[1::2] for line in block.splitlines()]
    assert code and not [line for line in code if "0.0.0.0" in line]  # no command binds all interfaces
    assert "prefect server start --host 127.0.0.1" in text and "--host 127.0.0.1 --port 5000" in text
    for setting in ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING", "--app-name basic-auth", "127.0.0.1"):
        assert setting in text, setting


def test_banks_doctor_command_reports_and_exits_nonzero_on_corruption(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    store, version = _store_with_version(tmp_path)
    argv = ["banks", "doctor", "--store", str(store.root), "tracking.enabled=false"]
    assert main(argv) == 0
    assert "1 version(s) checked" in capsys.readouterr().out
    (store.state_dir(version) / "model.safetensors").write_bytes(b"t")
    assert main(argv) == 1
    assert "problem: bank version" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- gate: normal images only
def test_gate_uses_reserved_false_reject_rate_for_products_without_test_images() -> None:
    from components.config import PromotionConfig
    from components.eval.continual import RESERVED_FRR
    from flows.promotion import promotion_gate

    cfg = PromotionConfig(min_new_image_auroc=0.9, max_forgetting=0.05, max_false_reject_rate=0.25)
    before = {"a": {"image_auroc": 0.95}}
    ok = promotion_gate(cfg, ["n"], {"a": {"image_auroc": 0.93}, "n": {RESERVED_FRR: 0.25}}, before)
    assert ok.passed and ok.false_reject_rates == {"n": 0.25} and ok.drops == {"a": pytest.approx(0.02)}
    too_many = promotion_gate(cfg, ["n"], {"a": {"image_auroc": 0.95}, "n": {RESERVED_FRR: 0.5}}, before)
    assert not too_many.passed and "new product 'n' (normal images only)" in too_many.reasons[0]
    assert "promotion.max_false_reject_rate 0.25" in too_many.reasons[0]
    forgot = promotion_gate(cfg, ["n"], {"a": {"image_auroc": 0.80}, "n": {RESERVED_FRR: 0.0}}, before)
    assert not forgot.passed and len(forgot.reasons) == 1 and "'a' image_auroc dropped" in forgot.reasons[0]
    unmeasured = promotion_gate(cfg, ["n"], {"a": {"image_auroc": 0.95}, "n": {RESERVED_FRR: None}}, before)
    assert not unmeasured.passed and "no reserved_false_reject_rate" in unmeasured.reasons[0]
    # an old normals-only product stays gated on its false-reject rate at later steps
    later = promotion_gate(cfg, ["c"], {"a": {"image_auroc": 0.95}, "n": {RESERVED_FRR: 0.75}, "c": {"image_auroc": 0.99}}, before)
    assert not later.passed and len(later.reasons) == 1 and "old product 'n'" in later.reasons[0]


def test_gate_refuses_an_old_product_that_passes_more_defects_at_the_same_threshold() -> None:
    """AUROC can hold while a grown memory lets defects through under unchanged thresholds: the gate compares
    escape rates at the deployed thresholds, and only when both evaluations kept the same threshold promise."""
    from components.config import PromotionConfig
    from flows.promotion import promotion_gate

    cfg = PromotionConfig(max_forgetting=0.02, max_escape_rise=0.02)
    before = {"a": {"image_auroc": 0.90, "escape_rate": 0.50, "promised_fpr": 0.2}}
    same = promotion_gate(cfg, [], {"a": {"image_auroc": 0.91, "escape_rate": 0.52, "promised_fpr": 0.2}}, before, check_escapes=True)
    assert same.passed and same.escape_rises == {"a": pytest.approx(0.02)}
    lenient = promotion_gate(cfg, [], {"a": {"image_auroc": 0.91, "escape_rate": 0.70, "promised_fpr": 0.2}}, before, check_escapes=True)
    assert not lenient.passed and len(lenient.reasons) == 1
    assert "'a' escape_rate at the deployed threshold rose 0.2000 (0.5000 -> 0.7000) > promotion.max_escape_rise 0.02" in lenient.reasons[0]
    other_promise = promotion_gate(cfg, [], {"a": {"image_auroc": 0.91, "escape_rate": 0.70, "promised_fpr": 0.01}}, before, check_escapes=True)
    assert other_promise.passed and other_promise.escape_rises == {}
    assert any("escape_rate not compared" in line for line in other_promise.checked)
    no_defects = promotion_gate(cfg, [], {"a": {"image_auroc": 0.91, "escape_rate": float("nan"), "promised_fpr": 0.2}}, before, check_escapes=True)
    assert no_defects.passed
    add_product = promotion_gate(cfg, [], {"a": {"image_auroc": 0.91, "escape_rate": 0.70, "promised_fpr": 0.2}}, before)
    assert add_product.passed and add_product.escape_rises == {}  # only feedback apply grows memories under fixed thresholds
    with pytest.raises(ConfigError, match="promotion.max_escape_rise"):
        load_config(REPO / "params.yaml", ["promotion.max_escape_rise=1.5"])


def test_detector_config_drops_renamed_deploy_time_keys_and_refuses_unknown_scoring_keys(tmp_path: Path) -> None:
    """A bank saved before a deploy-time key was renamed still loads; an unknown key that could change a score
    is a one-line error naming it."""
    from components.artifact import read_detector_config, write_detector_config
    from components.config import Config

    write_detector_config(tmp_path, Config())
    path = tmp_path / "detector.json"
    doc = json.loads(path.read_text())
    doc["config"]["feedback"]["coreset_ratio"] = 0.5
    doc["config"]["serve"]["old_knob"] = 1
    path.write_text(json.dumps(doc))
    assert read_detector_config(tmp_path) == Config()
    doc["config"]["ucad"]["mystery"] = 3
    path.write_text(json.dumps(doc))
    with pytest.raises(ContadError, match=r"ucad\.mystery .*unknown to the installed contad") as info:
        read_detector_config(tmp_path)
    assert "\n" not in str(info.value) and "serve.old_knob" not in str(info.value)


def test_false_reject_limit_and_reserve_fraction_ranges_are_validated() -> None:
    for override in ("promotion.max_false_reject_rate=1.5", "promotion.max_false_reject_rate=-0.1",
                     "promotion.reserved_normals_fraction=0", "promotion.reserved_normals_fraction=1"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_config(REPO / "params.yaml", [override])
