"""The shared epoch loop of the trained methods (``components/methods/training_loop``): batching of a
remainder, shuffling, per-epoch losses, hooks, early stopping with the best epoch restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from components.methods.early_stopping import EarlyStopping
from components.methods.training_loop import batch_bounds, epochs_for, train_epochs


def test_batch_bounds_merge_the_remainder_into_the_last_batch_or_keep_it_short() -> None:
    assert batch_bounds(10, 4, "merge") == [(0, 4), (4, 10)]
    assert batch_bounds(10, 4, "short") == [(0, 4), (4, 8), (8, 10)]
    assert batch_bounds(8, 4, "merge") == batch_bounds(8, 4, "short") == [(0, 4), (4, 8)]
    assert batch_bounds(3, 4, "merge") == batch_bounds(3, 4, "short") == [(0, 3)]  # fewer samples than a batch: one batch
    assert batch_bounds(11, 4, "merge") == [(0, 4), (4, 11)]
    with pytest.raises(ValueError, match="at least one sample"):
        batch_bounds(0, 4, "short")
    with pytest.raises(ValueError, match="last_batch"):
        batch_bounds(5, 2, "drop")  # type: ignore[arg-type]


def test_epochs_are_raised_to_reach_the_minimum_number_of_updates() -> None:
    assert epochs_for(2, 0, 3) == 2
    assert epochs_for(2, 7, 3) == 3  # ceil(7 / 3)
    assert epochs_for(5, 7, 3) == 5


class Recorder:
    """A linear model trained by SGD, recording what the loop hands to its hooks."""

    def __init__(self, n: int) -> None:
        torch.manual_seed(0)
        self.net = nn.Linear(2, 1)
        self.x = torch.randn(n, 2)
        self.y = self.x @ torch.tensor([[1.0], [-2.0]])
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.1)
        self.batches: list[torch.Tensor] = []
        self.events: list[str] = []
        self.modes: list[bool] = []

    def update(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self.batches.append(batch.clone())
        self.events.append("update")
        self.modes.append(self.net.training)
        loss = nn.functional.mse_loss(self.net(self.x[batch]), self.y[batch])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"mse": loss.detach(), "size": torch.tensor(float(len(batch)))}


def test_every_sample_once_per_epoch_in_a_generator_drawn_order_with_hooks_and_size_weighted_losses() -> None:
    rec = Recorder(10)
    log = train_epochs(rec.net, 10, rec.update, torch.Generator().manual_seed(3), epochs=2, batch_size=4, last_batch="short",
                       where="test", desc="test", after_update=lambda: rec.events.append("after"),
                       epoch_start=lambda: rec.events.append("epoch"))
    assert [len(b) for b in rec.batches] == [4, 4, 2, 4, 4, 2]
    replay = torch.Generator().manual_seed(3)
    for epoch in range(2):
        order = torch.cat(rec.batches[3 * epoch : 3 * epoch + 3])
        assert torch.equal(order, torch.randperm(10, generator=replay)), "the order is the generator's permutation"
    assert rec.events == (["epoch"] + ["update", "after"] * 3) * 2
    assert all(rec.modes) and not rec.net.training, "train mode while updating, eval mode afterwards"
    assert log["epoch_losses"]["size"] == [pytest.approx((16 + 16 + 4) / 10)] * 2  # each batch's loss weighted by its size
    assert log["heldout_losses"] == [] and log["best_epoch"] == log["epochs_run"] == 2


def test_merged_last_batch_and_minimum_updates() -> None:
    rec = Recorder(10)
    log = train_epochs(rec.net, 10, rec.update, torch.Generator().manual_seed(0), epochs=1, batch_size=4, last_batch="merge",
                       where="test", desc="test", min_updates=5)
    assert [len(b) for b in rec.batches] == [4, 6] * 3  # 2 updates per epoch: 3 epochs for at least 5 updates
    assert log["epochs_run"] == 3 and len(log["epoch_losses"]["mse"]) == 3


def test_early_stopping_stops_after_the_patience_and_restores_the_best_epoch() -> None:
    rec = Recorder(8)
    stopper = EarlyStopping(rec.net, patience=2)
    scripted = iter([1.0, 0.5, 0.7, 0.6, 0.1])  # best after epoch 2; epochs 3 and 4 do not improve: stop after 4
    weights: list[torch.Tensor] = []

    def heldout() -> float:
        weights.append(rec.net.weight.detach().clone())
        return next(scripted)

    log = train_epochs(rec.net, 8, rec.update, torch.Generator().manual_seed(0), epochs=10, batch_size=4, last_batch="short",
                       where="test", desc="test", stopper=stopper, heldout_loss=heldout)
    assert log["heldout_losses"] == [1.0, 0.5, 0.7, 0.6] and log["best_epoch"] == 2 and log["epochs_run"] == 4
    assert len(rec.batches) == 8 and len(log["epoch_losses"]["mse"]) == 4
    assert torch.equal(rec.net.weight, weights[1]) and not torch.equal(rec.net.weight, weights[3])


def test_early_stopping_without_a_heldout_loss_is_refused() -> None:
    rec = Recorder(4)
    with pytest.raises(ValueError, match="held-out loss"):
        train_epochs(rec.net, 4, rec.update, torch.Generator(), epochs=1, batch_size=2, last_batch="short", where="test", desc="test",
                     stopper=EarlyStopping(rec.net, patience=1))
    assert rec.batches == [], "refused before training"
