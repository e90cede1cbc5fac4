"""A deadline for a request's head: uvicorn (h11) waits for a client's headers as long as the client likes, so one
that sends them a byte a second holds a connection, and enough of them hold every open file the server has.

`HeaderDeadline` is uvicorn's own h11 protocol with one timer: from the moment a connection opens, or its previous
answer is sent, the next request's method, path and headers must be complete within HEADER_TIMEOUT_S, or the
connection is closed. Real clients send the head in one packet. The body is not this timer's business: it is read
under the request's own time limit (uploads.TimeoutMiddleware, `--timeout`) and counted against the body cap.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is not complete within header_timeout."""

    header_timeout = HEADER_TIMEOUT_S
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:  # a head arrived: its request is running
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        waiting = self.cycle is None or self.cycle.response_complete  # no request running: its head is not in
        if waiting and not self.transport.is_closing():
            self.transport.close()
