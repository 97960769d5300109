"""Operator feedback kept in a bank store: verdicts on images the line has seen, with copies of the images.

Layout (next to the store's versions; never part of a version's hash)::

    STORE/feedback/verdicts.jsonl          one verdict per line (rewritten atomically as a whole)
    STORE/feedback/images/<sha256><suffix> the image bytes the verdict is about (the id is their SHA-256)

A verdict records who gave it and when, and what the deployed detector decided when it saw the
image (model version, bank version, routed product, score, threshold, decision). Its ``kind``
follows from the decision and the verdict:

- ``false_reject``: marked good, decided NG: learned into a new bank version by ``feedback apply``
  (``learned_in`` names that version once it is promoted);
- ``escape``: marked defect, decided OK: part of its product's labelled evaluation set, which the
  promotion gate of every later candidate scores;
- ``confirmed_ok`` / ``confirmed_ng``: the operator agrees with the decision (kept for the audit).

Plain Python: the caller holds the bank store's lock while it writes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from components.atomic import atomic_write_bytes, atomic_write_text
from components.errors import ContadError

FEEDBACK_DIR = "feedback"
VERDICTS_FILE = "verdicts.jsonl"
IMAGES_DIR = "images"
VERDICTS = ("good", "defect")
FALSE_REJECT, ESCAPE, CONFIRMED_OK, CONFIRMED_NG = "false_reject", "escape", "confirmed_ok", "confirmed_ng"


def image_id(data: bytes) -> str:
    """The id of an image: the hex SHA-256 of its bytes (what ``contad predict`` writes as ``prediction_id``)."""
    return hashlib.sha256(data).hexdigest()


def verdict_kind(verdict: str, decision: str) -> str:
    """``false_reject`` / ``escape`` / ``confirmed_ok`` / ``confirmed_ng`` for an operator ``verdict`` on a ``decision``."""
    if verdict not in VERDICTS:
        raise ContadError(f"verdict {verdict!r} is invalid: use one of {', '.join(VERDICTS)}")
    if verdict == "good":
        return FALSE_REJECT if decision == "NG" else CONFIRMED_OK
    return ESCAPE if decision == "OK" else CONFIRMED_NG


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class VerdictRecord:
    """One operator verdict and what the deployed detector had decided on the image."""

    id: str  # sha256 of the image bytes
    path: str  # where the operator's image was
    product: str  # the product the operator says the image is of
    verdict: str  # good | defect
    kind: str  # false_reject | escape | confirmed_ok | confirmed_ng
    by: str
    at: str
    image: str  # the stored copy, relative to the feedback folder
    decision: str  # what the deployed detector decided: OK | NG
    score: float
    threshold: float
    routed: str  # the product the detector routed the image to
    model_version: str | None
    bank_version: str | None
    learned_in: str | None = None  # bank version that learned this false reject (promoted)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FeedbackLog:
    """The verdicts of one bank store (``STORE/feedback``)."""

    def __init__(self, store_root: str | Path) -> None:
        self.root = Path(store_root) / FEEDBACK_DIR

    @property
    def verdicts_file(self) -> Path:
        return self.root / VERDICTS_FILE

    def read(self) -> list[VerdictRecord]:
        """Every verdict, oldest first; ``ContadError`` naming the file and line on a broken one."""
        if not self.verdicts_file.is_file():
            return []
        records = []
        for number, line in enumerate(self.verdicts_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                records.append(VerdictRecord(**{k: v for k, v in doc.items() if k in VerdictRecord.__dataclass_fields__}))
            except (ValueError, TypeError) as exc:
                raise ContadError(f"{self.verdicts_file}:{number}: unreadable verdict ({exc}); fix or remove that line") from exc
        return records

    def find(self, ident: str) -> VerdictRecord | None:
        return next((r for r in self.read() if r.id == ident), None)

    def image_file(self, record: VerdictRecord) -> Path:
        return self.root / record.image

    def image_bytes(self, record: VerdictRecord) -> bytes:
        path = self.image_file(record)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ContadError(f"{path}: the stored copy of feedback image {record.id[:12]} is unreadable ({exc.strerror or exc})") from exc

    def add(self, records: list[VerdictRecord], images: dict[str, bytes]) -> None:
        """Store the image copies, then append ``records`` (refused when an image already has a verdict)."""
        existing = {r.id: r for r in self.read()}
        for record in records:
            if record.id in existing:
                old = existing[record.id]
                raise ContadError(f"{record.path}: image {record.id[:12]} already has a verdict ({old.verdict!r} by {old.by} at {old.at}, "
                                  f"from {old.path}); a verdict is given once")
        for record in records:
            atomic_write_bytes(self.root / record.image, images[record.id])
        self._write([*existing.values(), *records])

    def mark_learned(self, ids: list[str], bank_version: str) -> None:
        """Record that the false rejects ``ids`` were learned into (promoted) ``bank_version``."""
        wanted = set(ids)
        records = self.read()
        for record in records:
            if record.id in wanted:
                record.learned_in = bank_version
        self._write(records)

    def pending_false_rejects(self) -> list[VerdictRecord]:
        """False rejects marked good that no promoted bank version has learned yet."""
        return [r for r in self.read() if r.kind == FALSE_REJECT and r.learned_in is None]

    def escapes(self) -> list[VerdictRecord]:
        """The labelled evaluation set: every image marked defect that a deployed detector passed."""
        return [r for r in self.read() if r.kind == ESCAPE]

    def _write(self, records: list[VerdictRecord]) -> None:
        atomic_write_text(self.verdicts_file, "".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in records))


def image_name(ident: str, image_format: str | None) -> str:
    """Relative path of the stored copy of an image: ``images/<sha256>.<format>`` (``.img`` for an unknown format)."""
    return f"{IMAGES_DIR}/{ident}.{(image_format or 'img').lower()}"
