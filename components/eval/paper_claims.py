"""Paper vs reproduced: each method's published figures and protocol (``benchmarks/paper_claims.yaml``)
beside our mean ± sd over seeds, as a markdown section of the leaderboard.

``load_paper_claims`` reads and validates the file (a malformed entry is a one-line error naming the file
and the key); ``paper_vs_reproduced`` renders the section for one sequence's leaderboard rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components.errors import ContadError
from components.eval.leaderboard import MethodRow, cell

METHOD_KEYS = ("paper", "venue", "claims", "protocol", "backbone", "resolution", "why_ours_differs")
CLAIM_KEYS = ("metric", "printed", "scale", "dataset", "setting", "source")  # + "missing" when printed is null
PROTOCOL_KEYS = ("tasks", "order", "task_id_at_test", "epochs", "evaluation")
SCALES = {"fraction": 100.0, "percent": 1.0}


@dataclass(frozen=True)
class PaperClaim:
    """One published figure: ``value`` in % (None when the papers do not report it, ``missing`` says why)."""

    metric: str
    value: float | None
    printed: str | None
    dataset: str
    setting: str
    source: str
    missing: str | None = None


@dataclass(frozen=True)
class MethodClaims:
    """A method's paper, its claims (the first is the headline), protocol and why our number differs."""

    method: str
    paper: str
    venue: str
    claims: list[PaperClaim]
    protocol: dict[str, str]
    backbone: str
    resolution: str
    why_ours_differs: str


def _mapping(value: Any, path: Path, key: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """``value`` as a mapping with exactly the ``required`` keys (plus any of ``optional``), else a ContadError."""
    if not isinstance(value, dict):
        raise ContadError(f"{path}: {key}: expected a mapping, got {type(value).__name__}")
    missing = [k for k in required if k not in value]
    unknown = sorted(set(value) - set(required) - set(optional))
    if missing or unknown:
        wrong = f"{key}.{missing[0]}: missing" if missing else f"{key}.{unknown[0]}: unknown key"
        raise ContadError(f"{path}: {wrong} (keys: {', '.join(required + optional)})")
    return value


def _text(value: Any, path: Path, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ContadError(f"{path}: {key}: expected non-empty text, got {value!r}")
    return value.strip()


def _claim(value: Any, path: Path, key: str) -> PaperClaim:
    doc = _mapping(value, path, key, CLAIM_KEYS, ("missing",))
    texts = {k: _text(doc[k], path, f"{key}.{k}") for k in ("metric", "dataset", "setting", "source")}
    printed, scale = doc["printed"], doc["scale"]
    if scale not in SCALES:
        raise ContadError(f"{path}: {key}.scale: {scale!r} is not one of {', '.join(SCALES)}")
    if printed is None:  # not in the papers: say why
        return PaperClaim(value=None, printed=None, missing=_text(doc.get("missing"), path, f"{key}.missing"), **texts)
    if not isinstance(printed, str):
        raise ContadError(f"{path}: {key}.printed: quote the value as the paper prints it (\"0.930\"), got {printed!r}")
    try:
        value_pct = float(printed) * SCALES[scale]
    except ValueError:
        raise ContadError(f"{path}: {key}.printed: {printed!r} is not a number") from None
    return PaperClaim(value=value_pct, printed=printed, **texts)


def _method_claims(method: str, value: Any, path: Path) -> MethodClaims:
    from components.methods.registry import METHOD_CLASSES

    key = f"methods.{method}"
    if method not in METHOD_CLASSES:
        raise ContadError(f"{path}: {key}: not a registered method (choose from {', '.join(METHOD_CLASSES)})")
    doc = _mapping(value, path, key, METHOD_KEYS)
    if not isinstance(doc["claims"], list) or not doc["claims"]:
        raise ContadError(f"{path}: {key}.claims: expected a non-empty list (the first claim is the headline)")
    protocol = _mapping(doc["protocol"], path, f"{key}.protocol", PROTOCOL_KEYS)
    return MethodClaims(
        method, _text(doc["paper"], path, f"{key}.paper"), _text(doc["venue"], path, f"{key}.venue"),
        [_claim(c, path, f"{key}.claims[{i}]") for i, c in enumerate(doc["claims"])],
        {k: _text(protocol[k], path, f"{key}.protocol.{k}") for k in PROTOCOL_KEYS},
        *(_text(doc[k], path, f"{key}.{k}") for k in ("backbone", "resolution", "why_ours_differs")))


def load_paper_claims(path: Path) -> dict[str, MethodClaims] | None:
    """The methods' published claims from ``path`` (None when the file does not exist).

    Malformed content raises a one-line ``ContadError`` naming the file and the key."""
    if not path.is_file():
        return None
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ContadError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    doc = _mapping(doc, path, "(top level)", ("methods",), ("version",))
    methods = doc["methods"]
    if not isinstance(methods, dict):
        raise ContadError(f"{path}: methods: expected a mapping of method name -> claims")
    return {str(m): _method_claims(str(m), v, path) for m, v in methods.items()}


def _md(text: str) -> str:
    """``text`` safe inside one markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _claim_text(claim: PaperClaim) -> str:
    if claim.value is None:
        return f"{claim.metric}: not reported. {claim.missing} [{claim.source}]"
    return f"{claim.metric} **{claim.value:.1f}** on {claim.dataset}: {claim.setting} [{claim.source}]"


CELL_PROTOCOL = (("tasks", "tasks"), ("task_id_at_test", "task id at test"), ("epochs", "epochs"))  # the rest stays in the YAML


def _paper_cell(entry: MethodClaims) -> str:
    """Paper and venue, the headline claim, then what of the protocol explains a gap (entries given as "-" left out)."""
    fields = [f"{label}: {entry.protocol[key]}" for key, label in CELL_PROTOCOL if entry.protocol[key] != "-"]
    fields += [f"{k}: {v}" for k, v in (("backbone", entry.backbone), ("resolution", entry.resolution)) if v != "-"]
    parts = [f"{entry.paper}; {entry.venue}", _claim_text(entry.claims[0])] + (["protocol: " + "; ".join(fields)] if fields else [])
    return "<br>".join(_md(s) for s in parts)


def _ours_and_gap(row: MethodRow | None, entry: MethodClaims | None) -> tuple[str, str]:
    stat = row.stats["image_auroc"] if row else (math.nan, math.nan, 0)
    ours = f"{cell(stat, 100.0)} (n = {stat[2]})" if stat[2] else "–"
    headline = entry.claims[0].value if entry else None
    gap = "–" if headline is None or not stat[2] else f"{100.0 * stat[0] - headline:+.1f}"
    return ours, gap


def paper_vs_reproduced_markdown(claims: dict[str, MethodClaims], rows: list[MethodRow], methods: list[str], title: str) -> str:
    """One row per method of ``methods`` (then any other method with a row): the paper's claims and
    protocol, our mean ± sd final image AUROC with its seed count, the gap to the headline, and why they
    differ; "–" where a side is missing."""
    by_method = {r.method: r for r in rows}
    lines = [f"### Paper vs reproduced: {title}", "",
             "| method | paper's claim (metric, value, protocol) | ours: final image AUROC (n seeds) | gap | why they differ |",
             "|---|---|---|---|---|"]
    for method in dict.fromkeys([*methods, *by_method]):
        entry = claims.get(method)
        ours, gap = _ours_and_gap(by_method.get(method), entry)
        paper = _paper_cell(entry) if entry else "–"
        lines.append(f"| {method} | {paper} | {ours} | {gap} | {_md(entry.why_ours_differs) if entry else '–'} |")
    others = [f"{method}: " + "; ".join(_claim_text(c) for c in claims[method].claims[1:])
              for method in dict.fromkeys([*methods, *by_method]) if method in claims and len(claims[method].claims) > 1]
    if others:
        lines += ["", "Other figures of the same papers:", ""] + [f"- {_md(o)}" for o in others]
    notes = ["Paper figures are quoted from the papers with their table (`benchmarks/paper_claims.yaml`); "
             "the first claim is the paper's headline, shown in %; full protocols (task order, evaluation) are in that file.",
             "gap = our mean minus the headline, in AUROC points. Data, backbone and protocol differ (last column), "
             "so the gap measures the distance to the published figure, not a failed reproduction of it."]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes] + [""])


def paper_vs_reproduced(path: Path, rows: list[MethodRow], methods: list[str], title: str) -> str:
    """The "Paper vs reproduced" section for ``rows`` from the claims file ``path``; "" when it does not exist."""
    claims = load_paper_claims(path)
    return "" if claims is None else paper_vs_reproduced_markdown(claims, rows, methods, title)
