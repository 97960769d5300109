"""Comparing metric documents from two runs that must agree.

Image-level results are identical between an uninterrupted run and a resumed / fanned-out one, but
test features served from the evaluation feature cache (``components/eval``) and features recomputed
in a fresh process can differ in the last float bits, which moves pixel metrics (AUPRO most) by up to ~1e-6. Equal here
means: same structure, same ``None`` cells, numbers within 1e-5 relative.
"""

from __future__ import annotations

import math
from typing import Any


def assert_same_metrics(got: Any, want: Any, path: str = "") -> None:
    """Recursively compare two JSON-like metric documents (dicts, lists, numbers, None, strings)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{path}: keys {sorted(got) if isinstance(got, dict) else got} != {sorted(want)}"
        for key in want:
            assert_same_metrics(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: {got} != {want}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_metrics(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if math.isnan(want) and math.isnan(got):  # undefined in both
            return
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-8), f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"
