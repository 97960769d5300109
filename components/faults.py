"""Fault injection for crash-recovery tests: ``CONTAD_FAULT=<point>`` kills the process at that point.

Commit points of ``contad add-product`` and ``contad run`` call ``fault_point(name)``; when the
environment variable ``CONTAD_FAULT`` names that point the process ends at once with
``os._exit(FAULT_EXIT_CODE)`` (no cleanup, no ``finally`` blocks: like ``kill -9``).
``CONTAD_FAULT=<point>:<n>`` dies at the n-th time the point is reached (e.g. the second step of a
run). Unset in normal use, so each call costs one environment lookup.
"""

from __future__ import annotations

import os
import sys

FAULT_ENV = "CONTAD_FAULT"
FAULT_EXIT_CODE = 86
# Every commit point, in the order a step passes them.
FAULT_POINTS = ("after_train", "after_store", "after_register", "between_pointer_and_alias")


_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Die like ``kill -9`` when ``CONTAD_FAULT`` names this point (and its hit count, when given)."""
    if name not in FAULT_POINTS:
        raise ValueError(f"unknown fault point {name!r}; known: {', '.join(FAULT_POINTS)}")
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _HITS[name] = _HITS.get(name, 0) + 1
    if _HITS[name] == int(nth or 1):
        sys.stderr.write(f"contad: injected fault {name}: exiting with {FAULT_EXIT_CODE}\n")
        sys.stderr.flush()
        os._exit(FAULT_EXIT_CODE)
