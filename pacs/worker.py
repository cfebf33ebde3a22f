"""A background thread that does one step of work when kicked, or again after the delay the step asks for."""
from __future__ import annotations

import threading


class Worker:
    name = "pacs-worker"
    kick_ends_wait = False  # True: the delay is a schedule that new work moves forward, not a back-off

    def __init__(self):
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    def step(self) -> float | None:
        """Do what there is to do; the seconds to wait before trying again unprompted (None: until kicked)."""
        raise NotImplementedError

    def start(self) -> Worker:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def kick(self) -> None:
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to end after its current step, and wait for it."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            delay = self.step()
            if delay is None:
                self._wake.wait()
            elif self.kick_ends_wait:
                self._wake.wait(delay)  # stop() sets it too
            else:
                self._stop.wait(delay)  # a back-off is not cut short by new work, only by stop()
