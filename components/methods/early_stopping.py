"""Early stopping on held-out normal TRAINING images, shared by IUF, IB-IUMAD and UCAD/MTRMB's prompt training.

After every epoch the training loop passes the held-out loss to ``EarlyStopping.step``: the weights
of the epoch with the lowest loss so far are kept (a deep copy of the module's state), and training
stops once ``patience`` epochs in a row did not improve on it; ``restore`` then loads the best
weights back. The epoch budget (``<method>.epochs``) is the maximum. A loop may also call
``step(0, loss)`` before training, so the untrained weights are a candidate too (UCAD's prompt: a
prompt that only gets worse on held-out normals is not kept). Only training normals held out from
the task's training split are ever used (never test data).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn

log = logging.getLogger(__name__)


class EarlyStopping:
    """Best-held-out-loss checkpoint of ``module`` with a patience in epochs."""

    def __init__(self, module: nn.Module, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1 epoch, not {patience}")
        self.module = module
        self.patience = patience
        self.losses: list[float] = []  # held-out loss after every epoch
        self.best_loss = float("inf")
        self.best_epoch = 0  # the untrained weights (also: no epoch recorded yet)
        self._best_state: dict[str, Any] | None = None

    def step(self, epoch: int, loss: float) -> bool:
        """Record the held-out ``loss`` after ``epoch`` (1-based; 0 = before training); True when training should stop."""
        self.losses.append(loss)
        if loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, epoch
            self._best_state = copy.deepcopy(self.module.state_dict())
            return False
        return epoch - self.best_epoch >= self.patience

    def restore(self) -> None:
        """Load the best epoch's weights back into the module (no-op before any improvement)."""
        if self._best_state is not None:
            self.module.load_state_dict(self._best_state)


def early_stopping(module: nn.Module, patience: int, heldout_images: int, where: str, epochs: int) -> EarlyStopping | None:
    """An ``EarlyStopping`` of ``module``, or None (fixed epochs) when ``patience`` is 0 or no image is held out.

    ``where`` names the method and task in the warning logged when held-out normals are missing.
    """
    if patience <= 0:
        return None
    if heldout_images <= 0:
        log.warning("%s has no held-out normals; early stopping off, %d fixed epochs", where, epochs)
        return None
    return EarlyStopping(module, patience)


def stopping_log(stopper: EarlyStopping | None, epochs_run: int) -> dict[str, Any]:
    """Train-log entries of a training loop: held-out loss per epoch (empty for fixed epochs) and the epoch kept."""
    if stopper is None:
        return {"heldout_losses": [], "best_epoch": epochs_run}
    return {"heldout_losses": stopper.losses, "best_epoch": stopper.best_epoch}
