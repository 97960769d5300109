"""The continual accuracy matrix and the measures derived from it.

``R[i][j]`` is a metric of product ``j`` (columns in training order) evaluated after training
step ``i`` (rows). A step may add several products (IUF "X-Y with N steps": the first step
learns X base products together, each later step Y more). Cells of products not yet learned
at step ``i`` are ``None``; a learned cell whose metric is undefined (e.g. pixel AUROC of a
product without defective test images) is NaN. Both are ``null`` in ``metrics.json``.

Derived measures use the last evaluated step ``T`` (the last row holding any value) and
ignore undefined cells:

- final: ``R[T][j]`` per product.
- average: mean over products of ``R[T][j]``.
- forgetting (FM, Chaudhry et al. 2018, as used by UCAD/IUF/IB-IUMAD): mean over products
  ``j`` learned at a step ``< T`` of ``max_{step_learned(j) <= l < T} R[l][j] - R[T][j]``.
  Products learned at step ``T`` do not enter; with a single step FM is undefined (NaN).
- backward transfer (BWT, Lopez-Paz & Ranzato 2017): mean over the same products of
  ``R[T][j] - R[step_learned(j)][j]`` (negative = forgetting).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from components.errors import ContadError
from components.eval.metrics import METRIC_KEYS
from components.eval.operating_points import parse_point_key

NAN = float("nan")
ROUTING_KEY = "routing_accuracy"
# False-reject rate on the reserved normals of a product with normal images only (no test set, so no AUROC).
RESERVED_FRR = "reserved_false_reject_rate"
# Error rates (decisions at the deployed thresholds): lower is better, so forgetting is their rise.
LOWER_IS_BETTER = frozenset({"escape_rate", "false_reject_rate", RESERVED_FRR, "promised_fpr", "escape_estimate", "false_reject_bound"})


def lower_is_better(metric: str) -> bool:
    """Whether a lower ``metric`` is better (an error rate, at the deployed thresholds or at another promise's)."""
    return metric in LOWER_IS_BETTER or parse_point_key(metric) is not None


SCHEMA_KEYS: tuple[str, ...] = ("method", "protocol", "tasks", "matrix", "final", "average", "forgetting", "routing_accuracy")


class MetricsSchemaError(ContadError):
    """A ``metrics.json`` document does not follow the schema."""


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, numbers.Real) and math.isnan(value))


def _mean(values: Iterable[float | None]) -> float:
    defined = [float(v) for v in values if not _is_missing(v)]
    return sum(defined) / len(defined) if defined else NAN


def _json_number(value: float | None) -> float | None:
    return None if _is_missing(value) else float(value)  # type: ignore[arg-type]


class AccuracyMatrix:
    """Per-metric accuracy matrices of one continual run (rows = steps, columns = products)."""

    def __init__(self, products: list[str], n_steps: int, steps: list[list[str]] | None = None) -> None:
        if len(set(products)) != len(products) or not products:
            raise ContadError(f"products must be a non-empty list of unique names, got {products}")
        if steps is None and n_steps == len(products):
            steps = [[p] for p in products]
        if steps is not None:
            flat = [p for group in steps for p in group]
            if flat != list(products) or len(steps) != n_steps:
                raise ContadError(f"steps {steps} do not partition products {products} into {n_steps} steps in order")
        self.products = list(products)
        self.n_steps = int(n_steps)
        self.steps = [list(g) for g in steps] if steps is not None else None
        self._cells: dict[tuple[int, str], dict[str, float]] = {}

    # -- recording -------------------------------------------------------------------------
    def record(self, step: int, product: str, metrics: Mapping[str, float | None]) -> None:
        """Store the metrics of ``product`` evaluated after training step ``step``."""
        if not 0 <= step < self.n_steps:
            raise ContadError(f"step {step} outside 0..{self.n_steps - 1}")
        if product not in self.products:
            raise ContadError(f"unknown product {product!r}; known: {self.products}")
        if self.steps is not None and self.step_learned(product) > step:
            raise ContadError(f"product {product!r} is learned at step {self.step_learned(product)}, not by step {step}")
        self._cells[(step, product)] = {k: (NAN if _is_missing(v) else float(v)) for k, v in metrics.items()}

    def step_learned(self, product: str) -> int:
        """Step at which ``product`` is learned (from ``steps``, else its first recorded row)."""
        if self.steps is not None:
            return next(i for i, group in enumerate(self.steps) if product in group)
        rows = [s for (s, p) in self._cells if p == product]
        return min(rows) if rows else self.n_steps

    def metric_names(self) -> list[str]:
        """``METRIC_KEYS`` first, then any extra metric recorded (routing accuracy excluded)."""
        extra = sorted({k for cell in self._cells.values() for k in cell} - set(METRIC_KEYS) - {ROUTING_KEY})
        return list(METRIC_KEYS) + extra

    def last_step(self) -> int:
        """The last step with any recorded cell (``T``); -1 when nothing is recorded."""
        return max((s for s, _ in self._cells), default=-1)

    # -- views -----------------------------------------------------------------------------
    def value(self, step: int, product: str, metric: str) -> float | None:
        """``R[step][product]`` for ``metric``: None if not recorded, NaN if undefined."""
        cell = self._cells.get((step, product))
        return None if cell is None else cell.get(metric, NAN)

    def matrix(self, metric: str) -> list[list[float | None]]:
        """The full ``n_steps x n_products`` matrix of ``metric``."""
        return [[self.value(i, p, metric) for p in self.products] for i in range(self.n_steps)]

    def final(self) -> dict[str, dict[str, float | None]]:
        """``{metric: {product: R[T][product]}}`` for the last evaluated step ``T``."""
        last = self.last_step()
        return {m: {p: self.value(last, p, m) for p in self.products} for m in self.metric_names() + [ROUTING_KEY]}

    def average(self) -> dict[str, float]:
        """``{metric: mean over products of R[T][j]}`` (undefined cells ignored; NaN if none)."""
        return {m: _mean(row.values()) for m, row in self.final().items()}

    def _old_products(self) -> list[str]:
        last = self.last_step()
        return [p for p in self.products if self.step_learned(p) < last]

    def forgetting_of(self, step: int, product: str, metric: str) -> float | None:
        """Forgetting of ``product`` after ``step``: best value at an earlier step (from the one learning
        it) minus the value now (the rise for lower-is-better metrics); None before it is learned, at the
        step learning it, or when undefined."""
        if self.step_learned(product) >= step:
            return None
        earlier = [v for i in range(self.step_learned(product), step) if not _is_missing(v := self.value(i, product, metric))]
        now = self.value(step, product, metric)
        if not earlier or _is_missing(now):
            return None
        return now - min(earlier) if lower_is_better(metric) else max(earlier) - now  # type: ignore[type-var, operator]

    def forgetting_matrix(self, metric: str) -> list[list[float | None]]:
        """``F[step][product]``: forgetting of every product after every step (see ``forgetting_of``);
        FM is the mean of the last evaluated row."""
        return [[self.forgetting_of(i, p, metric) for p in self.products] for i in range(self.n_steps)]

    def forgetting(self) -> dict[str, float]:
        """Forgetting measure FM per metric (Chaudhry et al.; see module docstring)."""
        last = self.last_step()
        return {m: _mean(self.forgetting_of(last, p, m) for p in self._old_products()) for m in self.metric_names()}

    def bwt(self) -> dict[str, float]:
        """Backward transfer per metric: mean of ``R[T][j] - R[learned(j)][j]`` over old products."""
        last = self.last_step()
        out: dict[str, float] = {}
        for m in self.metric_names():
            diffs = []
            for p in self._old_products():
                first, now = self.value(self.step_learned(p), p, m), self.value(last, p, m)
                if not _is_missing(first) and not _is_missing(now):
                    diffs.append(now - first)  # type: ignore[operator]
            out[m] = _mean(diffs)
        return out

    def routing_accuracy(self) -> float:
        """Mean routing accuracy over products at the last step (NaN if never recorded)."""
        return self.average().get(ROUTING_KEY, NAN)

    # -- serialisation ---------------------------------------------------------------------
    def to_metrics_json(self, method: str, protocol: str, routing_accuracy: float | None = None) -> dict[str, Any]:
        """The ``metrics.json`` document (issue 4 schema, plus ``steps``, ``bwt``, ``routing_accuracy_matrix``).

        ``routing_accuracy`` defaults to the mean routing accuracy of the last step.
        """
        names = self.metric_names()
        final = self.final()
        routing = self.routing_accuracy() if routing_accuracy is None else routing_accuracy
        doc: dict[str, Any] = {
            "method": method,
            "protocol": protocol,
            "tasks": list(self.products),
            "matrix": {m: [[_json_number(v) for v in row] for row in self.matrix(m)] for m in names},
            "final": {m: {p: _json_number(v) for p, v in final[m].items()} for m in names},
            "average": {m: _json_number(v) for m, v in self.average().items() if m in names},
            "forgetting": {m: _json_number(v) for m, v in self.forgetting().items()},
            "routing_accuracy": _json_number(routing),
            "bwt": {m: _json_number(v) for m, v in self.bwt().items()},
            "routing_accuracy_matrix": [[_json_number(v) for v in row] for row in self.matrix(ROUTING_KEY)],
        }
        steps = self.steps_or_inferred()
        if steps is not None:
            doc["steps"] = steps
        return doc

    def steps_or_inferred(self) -> list[list[str]] | None:
        """Products learned per step (given, or inferred from records); None if not inferable."""
        if self.steps is not None:
            return [list(g) for g in self.steps]
        steps = [[p for p in self.products if self.step_learned(p) == i] for i in range(self.n_steps)]
        return steps if [p for g in steps for p in g] == self.products else None

    @classmethod
    def from_metrics_json(cls, d: Mapping[str, Any], source: str = "metrics.json") -> AccuracyMatrix:
        """Rebuild the matrix from a ``metrics.json`` document (validated first).

        A ``null`` cell at or after the step learning its product is restored as NaN.
        """
        validate_metrics_json(d, source)
        products = list(d["tasks"])
        n_steps = len(next(iter(d["matrix"].values())))
        steps = d.get("steps")
        matrix = cls(products, n_steps, steps=steps if steps else None)
        routing = d.get("routing_accuracy_matrix")
        for i in range(n_steps):
            for j, product in enumerate(products):
                cell = {m: rows[i][j] for m, rows in d["matrix"].items()}
                if routing is not None:
                    cell[ROUTING_KEY] = routing[i][j]
                learned = matrix.step_learned(product) <= i if steps else any(v is not None for v in cell.values())
                if learned:
                    matrix.record(i, product, cell)
        return matrix


def _check_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))


def metrics_json_problems(d: Any) -> list[str]:
    """Every way ``d`` departs from the ``metrics.json`` schema (empty list = valid)."""
    if not isinstance(d, Mapping):
        return ["top level is not an object"]
    problems = [f"missing key {k!r}" for k in SCHEMA_KEYS if k not in d]
    if problems:
        return problems
    for key in ("method", "protocol"):
        if not isinstance(d[key], str) or not d[key]:
            problems.append(f"{key!r} must be a non-empty string")
    tasks = d["tasks"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks) or len(set(tasks)) != len(tasks):
        return problems + ["'tasks' must be a non-empty list of unique product names"]
    for section in ("matrix", "final", "average", "forgetting"):
        if not isinstance(d[section], Mapping):
            problems.append(f"{section!r} must be an object keyed by metric")
            continue
        problems += [f"{section!r} lacks metric {m!r}" for m in METRIC_KEYS if m not in d[section]]
    if problems:
        return problems
    n_rows = None
    for m, rows in d["matrix"].items():
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and len(r) == len(tasks) for r in rows):
            problems.append(f"matrix[{m!r}] must be a non-empty list of rows with {len(tasks)} cells")
            continue
        n_rows = len(rows) if n_rows is None else n_rows
        if len(rows) != n_rows:
            problems.append(f"matrix[{m!r}] has {len(rows)} rows, other metrics {n_rows}")
        problems += [f"matrix[{m!r}] holds a non-number {v!r}" for r in rows for v in r if not _check_number(v)][:1]
    for m, row in d["final"].items():
        if not isinstance(row, Mapping) or set(row) != set(tasks):
            problems.append(f"final[{m!r}] must map exactly the tasks {tasks}")
        elif not all(_check_number(v) for v in row.values()):
            problems.append(f"final[{m!r}] holds a non-number")
    for section in ("average", "forgetting"):
        problems += [f"{section}[{m!r}] is not a number or null" for m, v in d[section].items() if not _check_number(v)]
    if not _check_number(d["routing_accuracy"]):
        problems.append("'routing_accuracy' must be a number or null")
    if "steps" in d:
        steps = d["steps"]
        if not isinstance(steps, list) or [p for g in steps if isinstance(g, list) for p in g] != tasks:
            problems.append("'steps' must partition 'tasks' in training order")
        elif n_rows is not None and len(steps) != n_rows:
            problems.append(f"'steps' lists {len(steps)} steps, matrix has {n_rows} rows")
    return problems


def validate_metrics_json(d: Any, source: str = "metrics.json") -> None:
    """Raise ``MetricsSchemaError`` naming ``source`` and every problem when ``d`` is not valid."""
    problems = metrics_json_problems(d)
    if problems:
        raise MetricsSchemaError(f"{source}: invalid metrics document: " + "; ".join(problems))
