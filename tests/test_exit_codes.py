"""Every exit code of the ``contad --help`` table that can be provoked cheaply, provoked for real.

Through ``main()`` or a ``contad`` subprocess, never by calling ``classify_error`` with a made-up
exception (tests/test_control_plane.py does that). Disk full (4): a real tiny tmpfs where user
namespaces allow mounting one, else the copy into a full temporary folder fails as the kernel would
have it fail. Not here: 70 (needs a bug), 86 (an injected fault during training:
tests/test_fault_injection.py).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from components.memory.store import BankStore
from flows.cli import EXIT_CODES, main
from tests.tracking_support import TrainedBase, trained_base

REPO = Path(__file__).resolve().parents[1]
CONTAD = Path(sys.executable).with_name("contad")
# Config overrides that rebuild the trained base's method from its bank store (as tests/test_decisions.py).
BASE_OVERRIDES = ["method=patchcore_finetune", "data.image_size=64", "backbone.device=cpu", "patchcore.coreset_size=64"]


def _documented(code: int) -> None:
    assert f"\n  {code} " in f"\n{EXIT_CODES}", f"exit code {code} is not in the contad --help table"


def _store(root: Path) -> tuple[BankStore, str]:
    """A bank store with one small version (no training)."""
    state = root.parent / "state"
    state.mkdir(parents=True)
    (state / "model.safetensors").write_bytes(b"weights")
    (state / "model.json").write_text(json.dumps({"tasks": ["a"]}))
    store = BankStore(root)
    return store, store.commit(state, {"step": 0, "tasks": ["a"]})


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("contad: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _default_sigint() -> None:
    """Ctrl-C as a shell delivers it: Python turns SIGINT into KeyboardInterrupt only when its parent left SIGINT
    at the default, and an ignored SIGINT is inherited (something earlier in a full pytest session can ignore it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _contad(args: list[str], **kwargs: object) -> subprocess.Popen:
    return subprocess.Popen([str(CONTAD), *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint, **kwargs)


def test_0_success(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _documented(0)
    assert main(["data", "synth", "--out", str(tmp_path / "data"), "--products", "1", "data.synth.image_size=64",
                 "data.synth.train_per_product=4", "data.synth.test_good_per_product=2", "data.synth.test_defect_per_type=1"]) == 0
    assert main(["data", "validate", str(tmp_path / "data"), "--out", str(tmp_path / "val")]) == 0


def test_1_banks_doctor_finds_a_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _documented(1)
    store, version = _store(tmp_path / "banks")
    target = store.versions_dir / version / "state" / "model.safetensors"
    target.chmod(0o644)
    target.write_bytes(b"tampered")
    assert main(["banks", "doctor", "--store", str(store.root), f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]) == 1
    assert "problem: bank version" in capsys.readouterr().out


def test_2_invalid_input_config_and_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _documented(2)
    assert main(["config", "show", "ucad.no_such_knob=1"]) == 2
    assert "ucad" in _one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as usage:
        main(["serve-api", "--port", "99999"])
    assert usage.value.code == 2
    capsys.readouterr()
    (tmp_path / "junk" / "nothing").mkdir(parents=True)  # not a dataset: validation fails -> invalid input
    assert main(["data", "validate", str(tmp_path / "junk"), "--out", str(tmp_path / "val")]) == 2
    assert "FAILED validation" in capsys.readouterr().out


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_2_product_name_with_a_trailing_newline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "screw2").mkdir()
    assert main(["add-product", str(tmp_path / "screw2"), "--name", "screw2\n", f"banks.store_dir={tmp_path / 'banks'}"]) == 2
    assert "product name 'screw2\\n' is invalid" in _one_error_line(capsys.readouterr().err)


def test_3_output_not_writable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _documented(3)
    assert main(["data", "synth", "--out", "/proc/contad-out", "--products", "1"]) == 3
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot write --out /proc/contad-out" in line and "/proc does not allow creating files" in line
    (tmp_path / "data").mkdir()
    assert main(["data", "validate", str(tmp_path / "data"), "--report", "/proc/contad-report.json"]) == 3
    assert "cannot write --report /proc/contad-report.json" in _one_error_line(capsys.readouterr().err)


def test_2_binary_params_file_and_predict_out_onto_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "params.yaml"
    binary.write_bytes(bytes(range(256)) * 8)
    assert main(["config", "show", "--params", str(binary)]) == 2
    assert f"{binary}: not a YAML text file" in _one_error_line(capsys.readouterr().err)
    store, _ = _store(tmp_path / "banks")
    Image.new("RGB", (32, 32)).save(tmp_path / "part.png")
    taken = tmp_path / "predictions.csv"
    taken.write_text("an existing file\n")
    assert main(["predict", str(tmp_path / "part.png"), "--bank", str(store.root), "--out", str(taken)]) == 2
    assert f"--out {taken}: an existing file, not a folder" in _one_error_line(capsys.readouterr().err)
    assert taken.read_text() == "an existing file\n"


def _full_disk_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file copy into a ``contad-*`` temporary folder fails as on a full disk (ENOSPC from the kernel's write)."""
    import errno
    import shutil

    copyfile = shutil.copyfile

    def full(src: str, dst: str, *args: object, **kwargs: object) -> str:
        if "/contad-" in str(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return copyfile(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", full)


def _tmpfs_available() -> bool:
    """Whether this user may mount a tmpfs in a private user + mount namespace (``unshare -rm``)."""
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_4_disk_full_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``predict --bank`` copies the version into a temporary folder; a full disk there is 4, one line, not shutil.Error's list."""
    _documented(4)
    store, _ = _store(tmp_path / "banks")
    Image.new("RGB", (32, 32)).save(tmp_path / "part.png")
    argv = ["predict", str(tmp_path / "part.png"), "--bank", str(store.root), "--out", str(tmp_path / "out")]
    if _tmpfs_available():  # a real full file system: TMPDIR on a 64 kB tmpfs, the bank's state is 256 kB
        padded = tmp_path / "padded"
        padded.mkdir()
        (padded / "model.safetensors").write_bytes(os.urandom(256 * 1024))
        (padded / "model.json").write_text(json.dumps({"tasks": ["a"]}))
        store.commit(padded, {"step": 1, "tasks": ["a"]})  # made current
        small = tmp_path / "small"
        small.mkdir()
        script = f'mount -t tmpfs -o size=64k none "{small}" && TMPDIR="{small}" exec "{CONTAD}" "$@"'
        full = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert full.returncode == 4, full.stderr[-3000:]
        err = full.stderr
    else:
        _full_disk_copy(monkeypatch)
        assert main(argv) == 4
        err = capsys.readouterr().err
    line = _one_error_line(err)
    assert line.startswith("contad: error: disk full: no space left writing ") and "[(" not in line and "Errno" not in line


def test_5_tracking_database_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _documented(5)
    database = tmp_path / "mlflow.db"
    database.write_bytes(os.urandom(4096))
    Image.new("RGB", (32, 32)).save(tmp_path / "part.png")
    assert main(["predict", str(tmp_path / "part.png"), "--model", "models:/contad-detector@champion", "--out", str(tmp_path / "out"),
                 f"tracking.uri=sqlite:///{database}"]) == 5
    line = _one_error_line(capsys.readouterr().err)
    assert str(database) in line and "unreadable" in line


def test_5_corrupt_schema_name_is_5_not_70(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A scribbled schema entry that sqlite3 cannot even decode into an error message (UnicodeDecodeError)."""
    import sqlite3

    database = tmp_path / "mlflow.db"
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE t (a)")
        db.execute("CREATE INDEX ix_QQQQ ON t (a)")
    db.close()
    database.write_bytes(database.read_bytes().replace(b"ix_QQQQ", b"ix_\xff\xfe\xfd\xfc").replace(b"CREATE INDEX", b"CREATE ENDEX"))
    Image.new("RGB", (32, 32)).save(tmp_path / "part.png")
    assert main(["predict", str(tmp_path / "part.png"), "--model", "models:/contad-detector@champion", "--out", str(tmp_path / "out"),
                 f"tracking.uri=sqlite:///{database}"]) == 5
    line = _one_error_line(capsys.readouterr().err)
    assert str(database) in line and "is unreadable" in line


def test_6_data_folder_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _documented(6)
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert main(["data", "validate", str(tmp_path / "a"), "--out", str(tmp_path / "val")]) == 6
    assert "symlink loop" in _one_error_line(capsys.readouterr().err)


def test_75_locked_and_130_interrupted(tmp_path: Path) -> None:
    _documented(75)
    _documented(130)
    store, _ = _store(tmp_path / "banks")
    with store.lock(5):  # held by this process: a contad subprocess has to wait for it
        gives_up = _contad(["banks", "list", "--store", str(store.root), "banks.lock_timeout_s=1"])
        _, err = gives_up.communicate(timeout=120)
        assert gives_up.returncode == 75 and "banks.lock_timeout_s" in _one_error_line(err)

        waits = _contad(["banks", "list", "--store", str(store.root), "banks.lock_timeout_s=600"])
        line = waits.stderr.readline()  # blocks until it says it is waiting for the lock
        while line and "waiting" not in line:
            line = waits.stderr.readline()
        waits.send_signal(signal.SIGINT)  # Ctrl-C while it waits
        _, err = waits.communicate(timeout=60)
    assert waits.returncode == 130 and _one_error_line(err) == "contad: error: interrupted"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> TrainedBase:
    return trained_base(tmp_path_factory)


@pytest.mark.slow  # trains the shared 2-product base once per session
def test_predict_exit_codes_and_skip_reasons(base: TrainedBase, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "text.png").write_text("not an image")
    Image.new("1", (10000, 10000)).save(inputs / "big.png")  # 100 M pixels: above serve.max_pixels and PIL's warning limit
    Image.new("1", (15000, 15000)).save(inputs / "bomb.png")  # 225 M pixels: above PIL's own error limit
    command = ["predict", str(inputs), "--bank", str(base.work / "banks"), *BASE_OVERRIDES]

    every_input_skipped = subprocess.run([str(CONTAD), *command, "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    output = every_input_skipped.stdout + every_input_skipped.stderr
    assert every_input_skipped.returncode == 2, output
    assert "3 skipped (1 unreadable, 2 too large)" in every_input_skipped.stdout
    assert "no image could be decided" in _one_error_line(every_input_skipped.stderr) and "skipped.csv" in every_input_skipped.stderr
    for name, reason in (("text.png", "unreadable"), ("big.png", "too large"), ("bomb.png", "too large")):
        assert f"skipped {inputs / name} ({reason})" in every_input_skipped.stderr
    assert "decompression bomb" not in output.lower() and "DecompressionBomb" not in output  # no PIL warning leaks
    with (tmp_path / "out" / "skipped.csv").open() as handle:
        reasons = {Path(row["path"]).name: row["reason"] for row in csv.DictReader(handle)}
    assert reasons == {"text.png": "unreadable", "big.png": "too large", "bomb.png": "too large"}

    good = sorted((base.old[0] / "test" / "good").glob("*.png"))[0]
    (inputs / "good.png").write_bytes(good.read_bytes())
    one_decided = subprocess.run([str(CONTAD), *command, "--out", str(tmp_path / "out2")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert one_decided.returncode == 0, one_decided.stderr  # NG or OK is a result
    assert "1 image(s) decided" in one_decided.stdout and "3 skipped (1 unreadable, 2 too large)" in one_decided.stdout
