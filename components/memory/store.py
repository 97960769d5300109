"""Versioned memory banks: immutable, content-hashed snapshots of a continual method's full state.

Layout of a store directory::

    ROOT/
      versions/<sha256>/state/...      the saved method directory (keys, prompts, knowledge, config)
      versions/<sha256>/manifest.json  meta: step, tasks, products, metrics, parent, created, files
      CURRENT                          the version hash the pipeline continues from
      JOURNAL.json                     the last "make V current (and champion)" transaction
      STORE_ID                         this store's identity (created with it; tagged on its model versions)
      .lock                            advisory lock held around every read-modify-write

A version's hash is the SHA-256 of its state files (relative path + content hash of every file),
so identical states share one version. Versions are written into a temporary sibling directory
and renamed into place; ``CURRENT`` is replaced atomically afterwards, so a crash at any point
leaves the previous version current. Nothing is ever deleted: rollback only moves ``CURRENT``.

``lock()`` serialises writers (a second process waits, saying who holds the lock);
``JOURNAL.json`` lets ``flows.promotion`` move ``CURRENT`` and the registry's champion alias
together and repair a crash between the two (see docs/ARCHITECTURE.md, "Transactions").
Readers never take the lock: ``resolve_current_for_reader`` applies the same recovery rule
(the journal's ``before`` while a promotion is pending) without writing anything.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from components.atomic import atomic_directory, atomic_write_json, atomic_write_text, is_stale_temporary, temp_prefix
from components.errors import ContadError

log = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
STATE_DIR = "state"
MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "CURRENT"
JOURNAL_FILE = "JOURNAL.json"
STORE_ID_FILE = "STORE_ID"
LOCK_FILE = ".lock"
DEFAULT_LOCK_TIMEOUT_S = 3600.0
_LOCK_POLL_S = 0.2
SHORT_HASH = 12
_CHUNK = 1 << 20
_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
_HEX = frozenset("0123456789abcdef")


class BankError(ContadError):
    """A bank store or version is missing, ambiguous or corrupt."""


class BankLockTimeout(BankError):
    """Another process held the store's lock for longer than the caller was willing to wait."""


# Per-process re-entrant lock bookkeeping: {resolved lock path: (open fd, depth)}.
_HELD: dict[str, tuple[int, int]] = {}
_HELD_GUARD = threading.RLock()


class SavableState(Protocol):
    """Anything that writes its full state into a directory (a ``ContinualMethod``)."""

    def save(self, directory: str | Path) -> Path: ...


@dataclass(frozen=True)
class BankVersion:
    """One entry of ``BankStore.list()``."""

    version: str
    step: int | None
    tasks: list[str]
    created: str
    parent: str | None
    current: bool

    @property
    def short(self) -> str:
        return self.version[:SHORT_HASH]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of one file's content."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_files(state_dir: Path) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every regular file under ``state_dir`` (hidden temp files skipped)."""
    files: dict[str, str] = {}
    for path in sorted(state_dir.rglob("*")):
        rel = path.relative_to(state_dir)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files[rel.as_posix()] = file_sha256(path)
    return files


def content_hash(files: dict[str, str]) -> str:
    """Version hash of a state given its ``state_files`` listing."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode("utf-8") + b"\0" + files[rel].encode("ascii") + b"\n")
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class BankStore:
    """A directory of immutable memory-bank versions with a movable ``CURRENT`` pointer."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def versions_dir(self) -> Path:
        return self.root / VERSIONS_DIR

    # ------------------------------------------------------------------ writing
    @contextmanager
    def lock(self, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, waiting: Any = None) -> Iterator[None]:
        """Hold the store's exclusive lock (re-entrant within a process) for a read-modify-write.

        When another process holds it, says so once (``waiting(message)``, default: stderr) and
        waits up to ``timeout_s`` seconds, then raises ``BankLockTimeout``; never proceeds unlocked.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_FILE
        key = str(path.resolve())
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is not None:
                _HELD[key] = (held[0], held[1] + 1)
        if held is None:
            fd = self._acquire(path, timeout_s, waiting)
            with _HELD_GUARD:
                _HELD[key] = (fd, 1)
        try:
            yield
        finally:
            with _HELD_GUARD:
                fd, depth = _HELD[key]
                if depth > 1:
                    _HELD[key] = (fd, depth - 1)
                else:
                    del _HELD[key]
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)

    def _acquire(self, path: Path, timeout_s: float, waiting: Any) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + timeout_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_holder(path)
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise BankLockTimeout(f"bank store {self.root} is locked by {holder}; gave up after {timeout_s:.0f} s (banks.lock_timeout_s)") from None
                if not told:
                    message = f"contad: bank store {self.root} is locked by {holder}; waiting for it to finish (up to {timeout_s:.0f} s)"
                    (waiting or _print_stderr)(message)
                    log.info("%s", message)
                    told = True
                time.sleep(_LOCK_POLL_S)
        holder_line = f"pid {os.getpid()} on {socket.gethostname()} since {_now()}: {' '.join(sys.argv[:4])}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder_line.encode("utf-8", "replace"), 0)
        return fd

    def writable(self) -> bool:
        """Whether this process can take the store's lock (False on a read-only mount or directory)."""
        try:
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            if exc.errno not in _READ_ONLY_ERRNOS:
                raise
            return False
        os.close(fd)
        return True

    def lock_if_writable(self, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, waiting: Any = None) -> Any:
        """``lock()`` for a reader that wants a consistent view; no lock on a read-only store (readers need none)."""
        if self.writable():
            return self.lock(timeout_s, waiting)
        log.info("bank store %s is read-only; reading it without the lock", self.root)
        return nullcontext()

    # ------------------------------------------------------------------ identity
    def store_id(self) -> str | None:
        """This store's identity (``STORE_ID``), or None for a store created before stores had one."""
        path = self.root / STORE_ID_FILE
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BankError(f"{path}: unreadable store identity ({exc})") from exc
        if len(text) != 32 or not set(text) <= _HEX:
            raise BankError(f"{path}: not a contad store identity (32 hex characters expected); restore it from a backup of the store")
        return text

    def ensure_store_id(self) -> str:
        """This store's identity, created (once, atomically) when the store has none yet."""
        with self.lock():
            existing = self.store_id()
            if existing is not None:
                return existing
            created = uuid.uuid4().hex
            atomic_write_text(self.root / STORE_ID_FILE, created + "\n")
            log.info("bank store %s: identity %s", self.root, created)
            return created

    def stale_temporaries(self) -> list[Path]:
        """Temporaries of writers that died (``components.atomic.is_stale_temporary``) in the store and, for a
        run's own store (``OUT/banks``), in the run's ``OUT/steps`` folder (``.NN-task.<pid>.*.tmp``)."""
        folders = [self.root, self.versions_dir, self.root.parent / "steps"] if self.root.name == "banks" else [self.root, self.versions_dir]
        found = []
        for folder in folders:
            if folder.is_dir():
                candidates = sorted(folder.glob(".*.tmp")) + sorted(folder.glob(".staging-*"))  # .staging-*: writers before pids were named
                found += [p for p in candidates if is_stale_temporary(p)]
        return found

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove ``stale_temporaries()``; returns what was removed. Call with the lock held."""
        removed = self.stale_temporaries()
        for path in removed:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return removed

    # ------------------------------------------------------------------ journal
    def read_journal(self) -> dict[str, Any] | None:
        """The transaction journal (``JOURNAL.json``), or None when there is none."""
        path = self.root / JOURNAL_FILE
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BankError(f"{path}: unreadable transaction journal ({exc}); `contad banks doctor --store {self.root}` rebuilds it") from exc
        if not isinstance(doc, dict) or doc.get("state") not in ("pending", "committed") or not all(isinstance(doc.get(k), dict) for k in ("before", "after")):
            raise BankError(f"{path}: not a contad transaction journal (state pending or committed, before and after states); `contad banks doctor --store {self.root}` rebuilds it")
        return doc

    def write_journal(self, doc: dict[str, Any]) -> None:
        """Atomically replace the transaction journal."""
        atomic_write_json(self.root / JOURNAL_FILE, {**_json_safe(doc), "updated": _now()})

    def set_current(self, version: str | None) -> None:
        """Point ``CURRENT`` at ``version`` (a full stored hash), or remove it (None = empty store)."""
        if version is None:
            (self.root / CURRENT_FILE).unlink(missing_ok=True)
            return
        if not (self.versions_dir / version / MANIFEST_FILE).is_file():
            raise BankError(f"cannot make {version!r} current: it is not a stored version in {self.versions_dir}")
        self._set_current(version)

    def commit(self, method_dir_or_state: str | Path | SavableState, meta: dict[str, Any], make_current: bool = True) -> str:
        """Store a version of a method state and (by default) make it current; returns its hash.

        ``method_dir_or_state`` is a saved method directory or an object with ``save(directory)``.
        ``meta`` (JSON-able: step, tasks, products, metrics...) goes into the manifest together
        with the creation time and the parent version (``meta["parent"]`` when given, else the
        current version). Committing a state that already exists keeps the existing (immutable)
        version. ``make_current=False`` stores a candidate without moving ``CURRENT``.
        """
        with self.lock():
            return self._commit(method_dir_or_state, meta, make_current)

    def _commit(self, method_dir_or_state: str | Path | SavableState, meta: dict[str, Any], make_current: bool) -> str:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        store_id = self.ensure_store_id()
        parent = meta["parent"] if "parent" in meta else self.current()
        staging = Path(tempfile.mkdtemp(dir=self.versions_dir, prefix=temp_prefix("staging"), suffix=".tmp"))
        try:
            state_dir = staging / STATE_DIR
            self._stage_state(method_dir_or_state, state_dir)
            files = state_files(state_dir)
            if not files:
                raise BankError(f"{method_dir_or_state}: no files to version (empty method state)")
            version = content_hash(files)
            target = self.versions_dir / version
            if target.exists():
                log.info("bank version %s already stored; making it current", version[:SHORT_HASH])
            else:
                manifest = {**_json_safe(meta), "version": version, "parent": parent, "created": _now(), "files": files, "store_id": store_id}
                with atomic_directory(target) as tmp:
                    os.replace(state_dir, tmp / STATE_DIR)
                    _write_manifest(tmp / MANIFEST_FILE, manifest)
                log.info("stored bank version %s (parent %s)", version[:SHORT_HASH], (parent or "-")[:SHORT_HASH])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if make_current:
            self._set_current(version)
        return version

    def rollback(self, version: str) -> str:
        """Make ``version`` (a unique prefix is enough) current; returns the full hash. Never deletes."""
        with self.lock():
            full = self.resolve(version)
            self._verify(full)
            self._set_current(full)
        log.info("bank store %s: current version is now %s", self.root, full[:SHORT_HASH])
        return full

    def verify(self, version: str) -> str:
        """Full hash of ``version`` after checking every stored file against its manifest hash."""
        full = self.resolve(version)
        self._verify(full)
        return full

    def checkout(self, version: str, dest: str | Path) -> Path:
        """Materialise the state of ``version`` into ``dest`` (replaced atomically) for loading; verifies its hash."""
        full = self.resolve(version)
        self._verify(full)
        dest = Path(dest)
        with atomic_directory(dest) as tmp:
            shutil.copytree(self.state_dir(full), tmp, dirs_exist_ok=True)
        return dest

    # ------------------------------------------------------------------ reading
    def current(self) -> str | None:
        """Hash of the current version, or None for an empty store."""
        pointer = self.root / CURRENT_FILE
        if not pointer.exists():
            return None
        try:
            version = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise BankError(f"{pointer}: unreadable ({exc}); run `contad banks doctor --store {self.root}`") from exc
        if not version or not (self.versions_dir / version / MANIFEST_FILE).is_file():
            raise BankError(f"{pointer}: points to version {version!r}, which is not in {self.versions_dir}")
        return version

    def list(self) -> list[BankVersion]:
        """All stored versions, oldest first; ``current`` as a reader sees it (``resolve_current_for_reader``;
        none marked when CURRENT and the journal are both unusable: ``contad banks doctor`` repairs that)."""
        try:
            current = resolve_current_for_reader(self)
        except BankError as exc:
            log.warning("%s", exc)
            current = None
        entries = []
        for version in self._version_hashes():
            manifest = self.show(version)
            entries.append(
                BankVersion(
                    version=version,
                    step=manifest.get("step"),
                    tasks=list(manifest.get("tasks", [])),
                    created=str(manifest.get("created", "")),
                    parent=manifest.get("parent"),
                    current=version == current,
                )
            )
        return sorted(entries, key=lambda e: (e.created, e.step if e.step is not None else -1))

    def show(self, version: str) -> dict[str, Any]:
        """The manifest of ``version`` (a unique prefix is enough)."""
        full = self.resolve(version)
        path = self.versions_dir / full / MANIFEST_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BankError(f"{path}: unreadable manifest: {exc}") from exc

    def state_dir(self, version: str) -> Path:
        """Read-only path of the stored state of ``version`` (do not modify; use ``checkout`` to get a copy)."""
        return self.versions_dir / self.resolve(version) / STATE_DIR

    def resolve(self, version: str) -> str:
        """Full hash of the version whose hash starts with ``version``; ``BankError`` if none or ambiguous."""
        prefix = version.strip().lower()
        if not prefix:
            raise BankError("empty version: give a version hash or a unique prefix of one")
        matches = [v for v in self._version_hashes() if v.startswith(prefix)]
        if not matches:
            raise BankError(f"no bank version starting with {prefix!r} in {self.versions_dir}")
        if len(matches) > 1:
            shown = ", ".join(m[:SHORT_HASH] for m in matches)
            raise BankError(f"version prefix {prefix!r} is ambiguous in {self.versions_dir}: matches {shown}")
        return matches[0]

    # ------------------------------------------------------------------ internals
    def _version_hashes(self) -> list[str]:
        if not self.root.is_dir():
            raise BankError(f"no bank store at {self.root} (set banks.store_dir or --store)")
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_FILE).is_file())

    def _stage_state(self, source: str | Path | SavableState, state_dir: Path) -> None:
        if isinstance(source, (str, Path)):
            src = Path(source)
            if not src.is_dir():
                raise BankError(f"method directory {src} does not exist")
            shutil.copytree(src, state_dir, ignore=shutil.ignore_patterns(".*"))
        else:
            state_dir.mkdir(parents=True)
            source.save(state_dir)

    def _verify(self, version: str) -> None:
        manifest = self.show(version)
        state = self.versions_dir / version / STATE_DIR
        bad = mismatched_files(state, manifest.get("files") or {})
        if bad or content_hash(state_files(state)) != version:
            named = ", ".join(str(state / rel) for rel in bad[:3]) or str(self.versions_dir / version / MANIFEST_FILE)
            raise BankError(f"bank version {version[:SHORT_HASH]} is corrupt: {named} no longer match(es) the hashes recorded in its manifest; roll back to another version")

    def _set_current(self, version: str) -> None:
        atomic_write_text(self.root / CURRENT_FILE, version + "\n")


def resolve_current_for_reader(store: BankStore) -> str | None:
    """The version a reader (``--bank``, serve-api, predict) must use: the writers' recovery rule, lock-free.

    While a promotion is pending (``JOURNAL.json``), its ``before`` bank: what recovery restores.
    Otherwise ``CURRENT``; when ``CURRENT`` is missing, garbage or dangling but a committed journal
    records the last agreed bank, that one (``contad banks doctor`` rewrites ``CURRENT`` to it).
    A broken journal is ignored in favour of a valid ``CURRENT``. Writes nothing, takes no lock.
    """
    try:
        journal = store.read_journal()
    except BankError as exc:
        log.warning("%s; readers use CURRENT", exc)
        journal = None
    if journal is not None and journal["state"] == "pending":
        return _recorded_bank(store, journal, "before")
    try:
        current = store.current()
    except BankError as exc:
        recorded = _recorded_bank(store, journal, "after") if journal is not None else None
        if recorded is None:
            raise BankError(f"{exc}; run `contad banks doctor --store {store.root}`") from exc
        return recorded
    if current is None and journal is not None:
        return _recorded_bank(store, journal, "after")
    return current


def _recorded_bank(store: BankStore, journal: dict[str, Any], side: str) -> str | None:
    """The bank the journal records on ``side`` (before/after), checked to be a stored version."""
    bank = (journal.get(side) or {}).get("bank") if isinstance(journal.get(side), dict) else None
    if bank is None:
        return None
    if not (store.versions_dir / str(bank) / MANIFEST_FILE).is_file():
        raise BankError(f"{store.root / JOURNAL_FILE}: records bank {str(bank)[:SHORT_HASH]!r}, which is not in {store.versions_dir}; run `contad banks doctor --store {store.root}`")
    return str(bank)


def verify_registered_state(method_dir: Path, bank_version: str, what: str) -> None:
    """``BankError`` unless the registered method files in ``method_dir`` still hash to ``bank_version``
    (a registered detector's state, calibration.json and detector.json included, is the bank version's)."""
    if len(bank_version) != 64 or not set(bank_version) <= _HEX:
        return  # not a content hash (hand-registered model): nothing recorded to check against
    if content_hash(state_files(Path(method_dir))) != bank_version:
        raise BankError(f"{what}: its registered method files (calibration.json, detector.json, model state) no longer hash to its bank version "
                        f"{bank_version[:SHORT_HASH]}; they were changed after registration, so it is refused")


def mismatched_files(directory: Path, recorded: dict[str, str]) -> list[str]:
    """Relative paths whose content differs from ``recorded`` (``state_files`` form): changed, missing or extra."""
    actual = state_files(directory) if directory.is_dir() else {}
    return sorted(rel for rel in set(actual) | set(recorded) if actual.get(rel) != recorded.get(rel))


def _read_holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write one version's manifest (the last file of a version; a separate function so tests can fail it)."""
    atomic_write_json(path, manifest)


def _json_safe(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` round-tripped through JSON (paths and numpy scalars become plain values)."""
    return json.loads(json.dumps(meta, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise BankError(f"bank manifest value {value!r} of type {type(value).__name__} is not JSON-serialisable")
