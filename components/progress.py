"""The one progress system (tqdm) and the logging handler that writes through it.

- On a terminal, ``progress_bar`` is a live tqdm bar on stderr, and ``ProgressLogHandler`` (installed by
  ``configure_logging``) prints every log record with ``tqdm.write``: live bars are cleared, the line is
  printed, the bars are redrawn, so log lines and bars never interleave.
- Without a terminal (CI, DVC, log files, captured output) no bar is drawn and no carriage return is
  written: a bar that runs longer than ``LOG_INTERVAL_S`` reports as a plain log line
  (``components.progress``) at most every ``LOG_INTERVAL_S`` seconds, plus one at its end; short bars
  say nothing (the log lines around them already do).
"""

from __future__ import annotations

import io
import logging
import sys
import time
from typing import Any, TextIO

from tqdm.std import tqdm

LOG_INTERVAL_S = 30.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger(__name__)


class _Sink(io.TextIOBase):
    """Swallows a plain-line bar's own drawing (it reports through logging instead)."""

    def write(self, s: str) -> int:
        return len(s)

    def isatty(self) -> bool:
        return False


class LineProgress(tqdm):  # type: ignore[type-arg]
    """A tqdm bar for non-terminals: plain log lines at most every ``mininterval`` seconds, never ``\\r``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._started = False
        self._closing = False
        self._lines = 0
        self._last_line_t = time.monotonic()
        kwargs["file"] = _Sink()
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S)
        if kwargs.get("disable") is None:  # tqdm's "off when not a TTY": here plain lines are the non-TTY form
            kwargs["disable"] = False
        super().__init__(*args, **kwargs)
        self._started = True

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """Called by tqdm on every refresh: a log line when ``mininterval`` passed since the last one."""
        if msg is None and self._started and not self._closing and time.monotonic() - self._last_line_t >= self.mininterval:
            self._log_line()
        return True

    def close(self) -> None:
        """Close; a bar that already reported gets a last line with its final count."""
        if not getattr(self, "disable", True) and self._lines and not self._closing:
            self._log_line()
        self._closing = True
        super().close()

    def _log_line(self) -> None:
        self._lines += 1
        self._last_line_t = time.monotonic()
        log.info("%s", self.plain_line())

    def plain_line(self) -> str:
        """``desc: n/total unit (p%), elapsed, ~left`` (no bar graphics)."""
        d = self.format_dict
        n, total, elapsed, unit = d["n"], d["total"], d["elapsed"], d["unit"]
        done = f"{n}/{total} {unit} ({100 * n / total:.0f}%)" if total else f"{n} {unit}"
        line = f"{d['prefix'] or 'progress'}: {done}, {tqdm.format_interval(elapsed)} elapsed"
        if total and n and elapsed:
            line += f", ~{tqdm.format_interval((total - n) * elapsed / n)} left"
        if d.get("postfix"):
            line += f"; {d['postfix']}"
        return line


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where bars go) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:  # type: ignore[type-arg]
    """A progress bar: live tqdm on a terminal; plain periodic log lines otherwise (see module docstring)."""
    if is_terminal(kwargs.get("file")):
        return tqdm(iterable, **kwargs)
    kwargs.pop("file", None)
    return LineProgress(iterable, **kwargs)


class ProgressLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that prints through ``tqdm.write`` so records never land inside a live bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception as exc:  # noqa: BLE001 - logging must never raise (logging's own convention) ...
            if _interrupted(exc):  # ... but Ctrl-C must never be swallowed (tqdm turns one raised in its lock set-up into another error)
                raise KeyboardInterrupt from exc
            self.handleError(record)


def _interrupted(exc: BaseException) -> bool:
    """Whether a ``KeyboardInterrupt`` is anywhere in ``exc``'s chain of causes and contexts."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def configure_logging(level: int, fmt: str = LOG_FORMAT, stream: TextIO | None = None) -> ProgressLogHandler | None:
    """Root logging through the progress system; like ``logging.basicConfig``, only when the root has no handler yet.

    Returns the installed handler (None when the root already had handlers).
    """
    root = logging.getLogger()
    if root.handlers:
        return None
    tqdm.get_lock()  # created now, not inside the first log write (its lazy import is where a Ctrl-C used to get lost)
    handler = ProgressLogHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    return handler
