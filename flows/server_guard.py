"""The temporary Prefect API server dies with the contad process that started it (even on kill -9).

Prefect starts its ephemeral server as a child ``python -m uvicorn ...`` and stops it at exit;
a ``kill -9`` of the parent skips that and leaves the server running as an orphan. ``install()``
makes Prefect start the child through a small launcher that holds the read end of a pipe whose
write end only this (parent) process holds: when the parent dies, for any reason, the kernel
closes the write end, the launcher reads EOF and terminates the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

_WATCHER = r"""
import os, runpy, signal, sys, threading, time
fd = int(sys.argv[1])
def watch():
    try:
        while os.read(fd, 64):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)  # parent gone: shut uvicorn down
    time.sleep(10)
    os._exit(1)
threading.Thread(target=watch, daemon=True, name="contad-parent-watch").start()
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""

_PARENT_ENDS: list[int] = []  # write ends held open for this process's lifetime


class _GuardedSubprocess:
    """``subprocess`` as seen by Prefect's server module, with ``Popen`` wrapping uvicorn children."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(args: list[str], **kwargs: Any) -> subprocess.Popen:  # noqa: N802 - mirrors subprocess.Popen
        """Start ``python -m MODULE ...`` through the parent-death watcher; anything else unchanged."""
        argv = list(args)
        if len(argv) < 3 or argv[1] != "-m":
            return subprocess.Popen(argv, **kwargs)
        read_end, write_end = os.pipe()
        _PARENT_ENDS.append(write_end)
        pass_fds = tuple(kwargs.pop("pass_fds", ())) + (read_end,)
        try:
            return subprocess.Popen([argv[0], "-c", _WATCHER, str(read_end), *argv[2:]], pass_fds=pass_fds, **kwargs)
        finally:
            os.close(read_end)


def install() -> bool:
    """Route Prefect's ephemeral-server start through the watcher; True when installed (idempotent)."""
    if sys.platform == "win32":
        return False
    from prefect.server.api import server

    if not isinstance(server.subprocess, _GuardedSubprocess):
        server.subprocess = _GuardedSubprocess()  # type: ignore[assignment]
    return True
