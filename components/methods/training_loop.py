"""The epoch loop of the trained methods (IUF, IB-IUMAD): shuffled mini-batches, one update per batch,
per-epoch mean losses, early stopping on held-out normal TRAINING images.

Per epoch: the network goes to train mode, the sample order is a ``torch.randperm`` drawn from the
method's generator, ``epoch_start`` resets per-epoch state, and every batch of indices is handed to
``update`` (the method's own update: losses, backward, the (projected) optimizer step; it returns the
batch's losses), then to ``after_update`` (e.g. retention toward the previous model, IUF Eq. 9). The
epoch's loss of each part is the batch losses' mean weighted by batch size. With a ``stopper``
(``components/methods/early_stopping``) ``heldout_loss`` is evaluated after every epoch; training stops
once it has not improved for ``patience`` epochs, and the best epoch's weights are restored.

How a sample count that the batch size does not divide is batched is the method's choice, stated
with ``last_batch``: ``"merge"`` (IUF) = full batches only, the last one takes the remainder (at least
one batch); ``"short"`` (IB-IUMAD) = a last, shorter batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from components.methods.early_stopping import EarlyStopping, stopping_log
from components.progress import progress_bar

log = logging.getLogger(__name__)

LastBatch = Literal["merge", "short"]


def batch_bounds(n_samples: int, batch_size: int, last_batch: LastBatch) -> list[tuple[int, int]]:
    """(start, stop) of every batch of one epoch over ``n_samples`` shuffled samples (see ``last_batch``)."""
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"need at least one sample and a batch size of at least 1, got {n_samples} samples, batch size {batch_size}")
    if last_batch == "short":
        return [(start, min(start + batch_size, n_samples)) for start in range(0, n_samples, batch_size)]
    if last_batch == "merge":
        full = max(1, n_samples // batch_size)
        return [(i * batch_size, (i + 1) * batch_size) for i in range(full - 1)] + [((full - 1) * batch_size, n_samples)]
    raise ValueError(f"last_batch must be 'merge' or 'short', not {last_batch!r}")


def epochs_for(epochs: int, min_updates: int, batches_per_epoch: int) -> int:
    """``epochs``, raised so that at least ``min_updates`` updates run (``batches_per_epoch`` per epoch)."""
    return max(epochs, -(-min_updates // batches_per_epoch))  # ceil


def train_epochs(
    network: nn.Module,
    n_samples: int,
    update: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    generator: torch.Generator,
    *,
    epochs: int,
    batch_size: int,
    last_batch: LastBatch,
    where: str,
    desc: str,
    min_updates: int = 0,
    after_update: Callable[[], None] | None = None,
    epoch_start: Callable[[], None] | None = None,
    stopper: EarlyStopping | None = None,
    heldout_loss: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Train ``network`` for ``epochs`` epochs (raised to ``min_updates`` updates; the maximum with a
    ``stopper``) over ``n_samples`` samples; ``update(indices)`` makes one update on the samples at
    ``indices`` and returns its losses by name. ``where`` (e.g. "iuf: task 'a'") starts every log
    line, ``desc`` names the progress bar. Leaves ``network`` in eval mode.

    Returns the train log: ``epoch_losses`` (per loss name, the mean of every epoch), ``heldout_losses``
    (every epoch's ``heldout_loss``; empty without a stopper), ``best_epoch`` (the epoch whose weights
    are kept) and ``epochs_run``.
    """
    if stopper is not None and heldout_loss is None:
        raise ValueError("early stopping needs a held-out loss")
    bounds = batch_bounds(n_samples, batch_size, last_batch)
    history: dict[str, list[float]] = {}
    epochs_run = 0
    bar = progress_bar(range(1, epochs_for(epochs, min_updates, len(bounds)) + 1), desc=desc, leave=False)
    for epoch in bar:
        network.train()
        order = torch.randperm(n_samples, generator=generator)
        if epoch_start is not None:
            epoch_start()
        sums: dict[str, float] = {}
        for start, stop in bounds:
            batch = order[start:stop]
            losses = update(batch)
            if after_update is not None:
                after_update()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(batch)
        for k, v in sums.items():
            history.setdefault(k, []).append(v / n_samples)
        epochs_run = epoch
        bar.set_postfix({k: f"{v[-1]:.4f}" for k, v in history.items()})
        log.info("%s epoch %d %s", where, epoch, {k: round(v[-1], 5) for k, v in history.items()})
        if stopper is not None and heldout_loss is not None and stopper.step(epoch, heldout_loss()):
            log.info("%s early stop at epoch %d (best %d)", where, epoch, stopper.best_epoch)
            break
    if stopper is not None:
        stopper.restore()
    network.eval()
    return {"epoch_losses": history, **stopping_log(stopper, epochs_run), "epochs_run": epochs_run}
