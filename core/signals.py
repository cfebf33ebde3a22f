"""SIGTERM as an exception where cleanup matters: the default action ends the process on the spot, so
`finally` blocks (temporary files, a child process, a summary still to write) would never run."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

TERMINATED_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C: `except KeyboardInterrupt` and `finally` blocks clean up on the way out."""


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM must not cut the cleanup short
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the block SIGTERM raises Terminated (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def default_sigterm() -> None:
    """For a process forked inside sigterm_raises (a pool worker): SIGTERM ends it quietly again."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
