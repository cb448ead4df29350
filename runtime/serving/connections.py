"""Connection limits of ``clipinspect serve`` in front of the app: a header deadline, a cap per
client address and a total cap that makes room by closing the oldest idle connection.

uvicorn alone has no deadline for a request head: a socket that sends nothing, or half a header
line every few seconds, stays open for ever, and its ``limit_concurrency`` counts such sockets,
so a few hundred of them get every real request a 503. This module subclasses uvicorn's h11
protocol (the one uvicorn picks without httptools; it is pinned so the same code always runs):

- **Header deadline**: from the moment a connection is accepted, and again from the end of each
  response, the next request head must be complete within ``header_timeout_s``, else the
  connection is closed. Data trickling in does not extend it (uvicorn's keep-alive timer is
  reset by any byte). While a request is in the app, the app's own limits apply (body timeout).
- **Per address**: a client address with ``max_per_client`` open connections gets 503 on the
  next one (loopback addresses are counted like any other).
- **Total**: at ``max_connections`` open connections, a new one closes the connection that has
  waited longest for a request head; only when every connection is inside a request does the
  new one get 503. Idle sockets therefore cannot keep a real client out.
Refused connections are answered 503 with ``Connection: close`` as soon as their head arrives,
and are closed after at most ``REFUSED_DEADLINE_S`` otherwise; they are not counted.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

REFUSED_DEADLINE_S = 1.0


class ConnectionGuard:
    """The open connections of one server; ``on_close(reason)`` counts each one it closes or
    refuses (reasons: ``header_timeout``, ``evicted``, ``per_client_cap``,
    ``max_connections``)."""

    def __init__(self, header_timeout_s: float, max_connections: int, max_per_client: int,
                 on_close: Callable[[str], None] = lambda reason: None):
        self.header_timeout_s, self.max_connections, self.max_per_client = (
            header_timeout_s, max_connections, max_per_client)
        self.on_close = on_close
        self.accepted: set[GuardedH11Protocol] = set()
        # Accepted connections waiting for a request head, oldest first (dicts keep order).
        self.waiting: dict[GuardedH11Protocol, None] = {}
        self.per_client: Counter[str] = Counter()

    def protocol(self, *args, **kwargs) -> "GuardedH11Protocol":
        """The protocol factory uvicorn calls for each connection (``uvicorn.Config(http=)``)."""
        return GuardedH11Protocol(*args, guard=self, **kwargs)

    def admit(self, conn: "GuardedH11Protocol") -> str | None:
        """Count a new connection in; returns why it is refused instead (None: admitted)."""
        if self.per_client[conn.address] >= self.max_per_client:
            self.on_close("per_client_cap")
            return (f"too many connections from {conn.address} ({self.max_per_client} open, "
                    "the --max-connections-per-client limit); reuse one or close some")
        if len(self.accepted) >= self.max_connections:
            if not self.waiting:
                self.on_close("max_connections")
                return (f"the server has {self.max_connections} connections open, all inside "
                        "a request (the --max-connections limit); retry shortly")
            self.close(next(iter(self.waiting)), "evicted")
        self.accepted.add(conn)
        self.per_client[conn.address] += 1
        return None

    def close(self, conn: "GuardedH11Protocol", reason: str) -> None:
        self.release(conn)
        self.on_close(reason)
        conn.transport.close()

    def release(self, conn: "GuardedH11Protocol") -> None:
        """Count a connection out (idempotent: closing it here and losing it later)."""
        self.waiting.pop(conn, None)
        if conn in self.accepted:
            self.accepted.discard(conn)
            self.per_client[conn.address] -= 1
            if not self.per_client[conn.address]:
                del self.per_client[conn.address]


def refusal_app(message: str):
    """An ASGI app answering 503 with ``message`` (the server's JSON error format)."""
    body = json.dumps({"error": {"status": 503, "code": "too_many_connections",
                                 "message": message}}).encode()

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})
    return app


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the deadline and caps of a :class:`ConnectionGuard`."""

    def __init__(self, *args, guard: ConnectionGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.address = "unknown"
        self.refused = False
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.client:
            self.address = self.client[0]
        refusal = self.guard.admit(self)
        if refusal is None:
            self._wait_for_head()
        else:
            self.refused = True
            self.app = refusal_app(refusal)  # what uvicorn runs for this connection's request
            self.deadline = self.loop.call_later(REFUSED_DEADLINE_S, self.transport.close)

    def _wait_for_head(self) -> None:
        self._disarm()
        self.guard.waiting.pop(self, None)
        self.guard.waiting[self] = None  # now the newest waiting
        self.deadline = self.loop.call_later(self.guard.header_timeout_s, self._head_too_slow)

    def _head_too_slow(self) -> None:
        self.deadline = None
        if not self.transport.is_closing():
            self.guard.close(self, "header_timeout")

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and not self.refused:  # a request head is complete
            self._disarm()
            self.guard.waiting.pop(self, None)

    def on_response_complete(self) -> None:
        if not self.refused and not self.transport.is_closing():
            self._wait_for_head()  # before super(): it may start a pipelined request
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.release(self)
        super().connection_lost(exc)
