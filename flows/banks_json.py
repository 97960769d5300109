"""``contad banks list --json``: the bank store's versions as one JSON document on stdout (for scripts).

Read-only: it holds the store's lock only to read a consistent state (no lock on a read-only store)
and changes nothing; ``current`` is what readers use (``resolve_current_for_reader``). Schema::

    {"store": "/abs/path/banks", "current": "<hash>" | null, "interrupted_promotion": false,
     "versions": [{"version": "<hash>", "short": "<12 chars>", "step": 0, "tasks": ["a"],
                   "created": "...", "parent": "<hash>" | null, "current": true}, ...]}

``versions`` are oldest first. ``interrupted_promotion`` is true when a crash left a promotion
pending (``JOURNAL.json``); ``current`` is then already the version the next ``contad banks list`` /
``banks doctor`` restores (``CURRENT`` and the champion back where they last agreed).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from components.memory.store import BankError, BankStore, resolve_current_for_reader


def banks_list_document(store: BankStore) -> dict[str, Any]:
    """The JSON document of ``banks list --json`` for ``store`` (see the module docstring)."""
    try:
        journal = store.read_journal()
    except BankError:
        journal = None  # broken: readers use CURRENT; `contad banks doctor` rebuilds it
    return {
        "store": str(store.root.resolve()),
        "current": resolve_current_for_reader(store),
        "interrupted_promotion": bool(journal and journal.get("state") == "pending"),
        "versions": [{**asdict(entry), "short": entry.short} for entry in store.list()],
    }


def banks_list_json(store_dir: Path, lock_timeout_s: float) -> int:
    """Print ``banks_list_document`` of the store at ``store_dir``; ``BankError`` when there is no store."""
    store = BankStore(store_dir)
    if not store.root.is_dir():
        raise BankError(f"no bank store at {store.root} (set banks.store_dir or --store)")
    with store.lock_if_writable(lock_timeout_s):
        document = banks_list_document(store)
    if document["interrupted_promotion"]:
        print(f"contad: warning: an interrupted promotion is pending in {store.root}; `contad banks doctor --store {store.root}` "
              "repairs it (current may then move back)", file=sys.stderr)
    print(json.dumps(document, indent=2))
    return 0
