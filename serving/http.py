"""uvicorn's HTTP/1.1 protocol with a deadline on the request head.

uvicorn waits without limit for the request line and headers, so a client that connects and then trickles
bytes (slowloris) holds a connection forever. This protocol gives each request head `header_timeout_s`
(read from the app's lifespan state) and answers 408 and closes when it runs out. The body's deadline is
kept by serving.guard.
"""
from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT_S = 10.0
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"connection: close\r\ncontent-length: 38\r\n\r\nrequest headers not received in time\r\n")


class HeaderTimeoutProtocol(H11Protocol):
    header_timer: asyncio.TimerHandle | None = None

    @property
    def header_timeout_s(self) -> float:
        return float(self.app_state.get("header_timeout_s", DEFAULT_HEADER_TIMEOUT_S))

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # the next request's head is (still) on its way
            self._arm_header_timer()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _head_timed_out(self) -> None:
        self.header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()
