"""``contad banks list|show|rollback``: inspect the memory-bank store and move its current pointer.

The ``contad`` CLI reaches these through ``flows.promotion.banks_command``, which holds the store's
lock (not on a read-only store: list/show then read it as readers do), repairs an interrupted
promotion first, and does ``rollback`` (pointer *and* champion) and ``doctor`` itself;
``rollback`` here moves only the pointer (stores without a registry).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from components.config import Config
from components.errors import ContadError
from components.memory.store import SHORT_HASH, BankStore, resolve_current_for_reader

SUBCOMMANDS = ("list", "show", "rollback")


def _print_list(store: BankStore, console: Console) -> None:
    versions = store.list()
    if not versions:
        console.print(f"bank store {store.root} holds no versions yet")
        return
    table = Table(title=f"memory-bank versions in {store.root}")
    for column in ("", "version", "step", "tasks", "created", "parent"):
        table.add_column(column)
    for entry in versions:
        table.add_row(
            "*" if entry.current else "",
            entry.short,
            "" if entry.step is None else str(entry.step),
            ", ".join(entry.tasks),
            entry.created,
            (entry.parent or "-")[:SHORT_HASH],
        )
    console.print(table)
    console.print("* = current")


def _print_show(store: BankStore, version: str, console: Console) -> None:
    manifest = store.show(version)
    manifest["current"] = manifest["version"] == resolve_current_for_reader(store)
    manifest["state_dir"] = str(store.state_dir(manifest["version"]))
    console.print_json(json.dumps(manifest))


def banks_command(cfg: Config, sub: str, version: str | None, store: Path | None) -> int:
    """Run ``banks list``, ``banks show VERSION`` or ``banks rollback VERSION`` on ``store`` (default ``banks.store_dir``)."""
    if sub not in SUBCOMMANDS:
        raise ContadError(f"unknown banks subcommand {sub!r}; expected one of {', '.join(SUBCOMMANDS)}")
    if sub != "list" and not version:
        raise ContadError(f"banks {sub} needs a version hash (or a unique prefix of one)")
    bank_store = BankStore(store if store is not None else Path(cfg.banks.store_dir))
    console = Console()
    if sub == "list":
        _print_list(bank_store, console)
    elif sub == "show":
        _print_show(bank_store, str(version), console)
    else:
        previous = bank_store.current()
        full = bank_store.rollback(str(version))
        console.print(f"current bank version: {full[:SHORT_HASH]} (was {(previous or '-')[:SHORT_HASH]}); no version was deleted")
    return 0
