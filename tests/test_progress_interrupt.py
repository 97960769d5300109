"""Ctrl-C is never swallowed by the CLI's log handler (found when a Ctrl-C during a bank-lock wait was lost)."""

from __future__ import annotations

import io
import logging

import pytest

from components.progress import ProgressLogHandler


class _InterruptedStream(io.StringIO):
    """A stream whose write fails the way tqdm's did: another error raised while handling a KeyboardInterrupt."""

    def __init__(self, interrupt: bool) -> None:
        super().__init__()
        self.interrupt = interrupt

    def write(self, text: str) -> int:
        try:
            if self.interrupt:
                raise KeyboardInterrupt
            raise OSError("disk gone")
        except BaseException as exc:
            raise RuntimeError("wrapped by the writer") from exc


def _record() -> logging.LogRecord:
    return logging.LogRecord("x", logging.INFO, __file__, 1, "waiting for the lock", None, None)


def test_an_interrupt_inside_a_log_write_propagates_and_other_errors_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyboardInterrupt):
        ProgressLogHandler(_InterruptedStream(interrupt=True)).emit(_record())
    reported: list[logging.LogRecord] = []
    handler = ProgressLogHandler(_InterruptedStream(interrupt=False))
    monkeypatch.setattr(handler, "handleError", reported.append)
    handler.emit(_record())  # logging's convention: an ordinary write error never raises
    assert len(reported) == 1
