"""Dynamic micro-batching: the images of concurrent requests join one model call.

A batch starts with the first image waiting. It takes more while they come, up to `max_batch` images or
`max_wait` seconds, and leaves at once when no other request is still being decoded (a lone client never
waits for company). One batch runs at a time, on its own thread, so the event loop never blocks; the next
batch gathers meanwhile.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """`await submit(x)` with x (k, 3, S, S) returns the model's (k, C) rows for it."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], executor: Executor, max_batch: int,
                 max_wait_s: float, arriving: Callable[[], int] = lambda: 0,
                 on_batch: Callable[[int, float], None] | None = None):
        self.run, self.executor = run, executor
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.arriving = arriving  # requests admitted but not yet submitted: they may still join this batch
        self.on_batch = on_batch or (lambda size, seconds: None)
        self.queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, x: np.ndarray) -> np.ndarray:
        if self.task.done():
            raise RuntimeError("the batcher is closed")
        item = _Item(x, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(item)
        return await item.future

    async def close(self) -> None:
        """Finish what was submitted, then stop."""
        self.queue.put_nowait(None)
        await self.task

    async def _gather(self, first: _Item) -> tuple[list[_Item], bool]:
        batch, rows = [first], len(first.x)
        deadline = time.monotonic() + self.max_wait_s
        while rows < self.max_batch:
            if self.queue.empty() and self.arriving() == 0:
                break  # nobody else is on the way: waiting would only add latency
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                item = await asyncio.wait_for(self.queue.get(), timeout)
            except TimeoutError:
                break
            if item is None:
                return batch, True
            batch.append(item)
            rows += len(item.x)
        return batch, False

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            first = await self.queue.get()
            if first is None:
                break
            batch, stop = await self._gather(first)
            x = np.concatenate([item.x for item in batch])
            start = time.perf_counter()
            try:
                out = await loop.run_in_executor(self.executor, self.run, x)
            except Exception as exc:  # the runtime failed: every request of the batch gets the error
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self.on_batch(len(x), time.perf_counter() - start)
            offset = 0
            for item in batch:
                if not item.future.done():  # a client that went away cancelled its future
                    item.future.set_result(out[offset:offset + len(item.x)])
                offset += len(item.x)
        while not self.queue.empty():  # submitted after close(): refused, never left waiting
            item = self.queue.get_nowait()
            if item is not None and not item.future.done():
                item.future.set_exception(RuntimeError("the batcher is closed"))
