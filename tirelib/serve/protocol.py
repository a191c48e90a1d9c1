"""uvicorn's HTTP/1.1 protocol (h11) with the limits it lacks on reading a request's head.

uvicorn cancels its keep-alive timer on the first byte a client sends, and a new connection has
no timer at all, so a client that sends its headers a byte at a time holds a connection for ever
(slowloris). :class:`HeadGuardedProtocol` gives every request head a deadline: the clock starts
when the server begins to wait for a request (the connection is made, or the previous response
is sent) and stops when the head is complete; later bytes do not reset it. At the deadline a
partly sent head is answered 408 and the connection closed; an idle connection is just closed.

h11 stops buffering a head that grows past ``h11_max_incomplete_event_size`` bytes while it
arrives; uvicorn would answer that with a plain-text 400, this protocol with a JSON 431. A head
that arrived whole is measured by :class:`~tirelib.serve.limits.HeaderLimitMiddleware`.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any

import h11
import msgspec
from uvicorn.protocols.http.h11_impl import H11Protocol

from tirelib.serve.config import ServeConfig

log = logging.getLogger(__name__)


class HeadGuardedProtocol(H11Protocol):
    """h11 with a deadline on each request head and JSON answers to unreadable heads."""

    # Set from ServeConfig by server_options(), which makes the subclass uvicorn instantiates.
    header_timeout_s: float
    max_header_bytes: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_clock()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()

    def send_400_response(self, msg: str) -> None:
        """h11 could not read the request (uvicorn calls this); answer in JSON and close."""
        if self._head_bytes > self.max_header_bytes:
            self._answer_and_close(
                431,
                f"the request line and headers are larger than {self.max_header_bytes:,} bytes; "
                f"at most {self.max_header_bytes:,} are accepted",
            )
        else:
            self._answer_and_close(
                400, "invalid HTTP request: the request line or headers are malformed"
            )

    # -- the head's deadline ---------------------------------------------------------------

    def _watch_head(self) -> None:
        """Run the clock while a request head is awaited (h11: the client is IDLE), else stop it."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._head_timer is None:
            self._head_bytes = 0
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_too_slow)
        elif not waiting:
            self._stop_head_clock()

    def _stop_head_clock(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._head_bytes == 0:  # an idle connection: nothing to answer
            self.transport.close()
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.warning(
            "closed the connection of %s: its request head was not complete after %g s",
            client, self.header_timeout_s,
        )  # fmt: skip
        self._answer_and_close(
            408,
            f"the request line and headers did not arrive within {self.header_timeout_s:g} s",
        )

    def _answer_and_close(self, status: int, message: str) -> None:
        """Write a JSON error and close: the stream cannot be read further, so h11 is bypassed."""
        self._stop_head_clock()
        if self.transport.is_closing():
            return
        body = msgspec.json.encode({"error": message})
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        self.transport.close()


def server_options(config: ServeConfig) -> dict[str, Any]:
    """``uvicorn.run`` options that enforce ``config``'s limits on request heads."""

    class Protocol(HeadGuardedProtocol):
        header_timeout_s = config.header_timeout_s
        max_header_bytes = config.max_header_bytes

    return {"http": Protocol, "h11_max_incomplete_event_size": config.max_header_bytes}
