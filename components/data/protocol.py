"""Task sequences: which products are learned at which step, and in what order.

Sequential protocol: one product per task, task name = product name. "X-Y" protocol: the first
task learns the first X products together, every later task the next Y. A task's name joins its
products with "+" (``task_name``; ``task_products`` reads them back): the only place that spells
the convention out.
"""

from __future__ import annotations

import pandas as pd

from components.config import Config
from components.errors import DataError


def task_sequence(products: list[str], base_tasks: int, step_tasks: int) -> list[list[str]]:
    """Split the ordered ``products`` into tasks: ``base_tasks`` first, then ``step_tasks`` at a time."""
    if base_tasks < 1 or step_tasks < 1:
        raise DataError(f"protocol.base_tasks and protocol.step_tasks must be >= 1, got {base_tasks} and {step_tasks}")
    if not products:
        raise DataError("no products to learn: the product list is empty")
    if base_tasks > len(products):
        raise DataError(f"protocol.base_tasks={base_tasks} exceeds the number of products ({len(products)}: {products})")
    tasks = [list(products[:base_tasks])]
    for start in range(base_tasks, len(products), step_tasks):
        tasks.append(list(products[start : start + step_tasks]))
    return tasks


_TASK_SEPARATOR = "+"


def task_name(products: list[str]) -> str:
    """Name of the task that learns ``products`` together (``"a+b"``; one product: its name)."""
    return _TASK_SEPARATOR.join(products)


def task_products(task: str) -> list[str]:
    """The products of the task named ``task`` (inverse of ``task_name``)."""
    return task.split(_TASK_SEPARATOR)


def task_of_product(tasks: list[list[str]]) -> dict[str, str]:
    """Map every product to the name of the task that learns it."""
    return {product: task_name(task) for task in tasks for product in task}


def ordered_products(manifest: pd.DataFrame, cfg: Config) -> list[str]:
    """Training order: ``cfg.data.products`` when set (must all exist), else all products alphabetically."""
    available = sorted(manifest["product"].unique().tolist())
    wanted = list(cfg.data.products)
    if not wanted:
        return available
    duplicates = sorted({p for p in wanted if wanted.count(p) > 1})
    if duplicates:
        raise DataError(f"data.products lists {duplicates} more than once")
    unknown = [p for p in wanted if p not in available]
    if unknown:
        raise DataError(f"data.products: unknown product(s) {unknown} in {cfg.data.root}; available: {available}")
    return wanted
