"""The shared early-stopping helper (IUF, IB-IUMAD): best held-out loss kept, patience, restore."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from components.methods.early_stopping import EarlyStopping, early_stopping


def test_stops_after_patience_and_restores_the_best_epoch() -> None:
    net = nn.Linear(2, 1)
    stopper = EarlyStopping(net, patience=2)
    states, stops = [], []
    for epoch, loss in enumerate([3.0, 2.0, 2.5, 2.1, 1.0], start=1):
        with torch.no_grad():
            net.weight.fill_(float(epoch))  # "training": the weights differ after every epoch
        states.append({k: v.clone() for k, v in net.state_dict().items()})
        stops.append(stopper.step(epoch, loss))
        if stops[-1]:
            break
    assert stops == [False, False, False, True]  # epoch 2 best, no improvement in epochs 3-4: stop (epoch 5 never runs)
    assert stopper.losses == [3.0, 2.0, 2.5, 2.1] and stopper.best_epoch == 2 and stopper.best_loss == 2.0
    stopper.restore()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in states[1].items())


def test_factory_is_off_without_patience_or_heldout_images(caplog: pytest.LogCaptureFixture) -> None:
    net = nn.Linear(2, 1)
    assert early_stopping(net, 0, 5, "m: task 'a'", 4) is None
    with caplog.at_level(logging.WARNING):
        assert early_stopping(net, 2, 0, "m: task 'a'", 4) is None
    assert "m: task 'a' has no held-out normals; early stopping off, 4 fixed epochs" in caplog.text
    stopper = early_stopping(net, 2, 5, "m: task 'a'", 4)
    assert isinstance(stopper, EarlyStopping) and stopper.patience == 2
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(net, 0)
