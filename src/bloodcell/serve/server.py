"""Run the app with uvicorn as `bloodcell serve` does: one process, the limits of serve.limits.

uvicorn closes a kept-alive connection that idles after an answer, but waits for ever on one that connects and never
completes its request headers (1,000 such connections stayed open in the abuse trial): its HTTP protocol is extended
here with a deadline for the headers of every request.
"""

from __future__ import annotations

import socket

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from bloodcell.serve.limits import ServerLimits


def protocol_with_header_deadline(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose next request's headers are not complete `seconds` after it
    opened or after its last answer."""

    class HeaderDeadlineProtocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            self.loop.call_later(seconds, self._headers_due, self.cycle)

        def _headers_due(self, cycle_then) -> None:
            # the request cycle is created when its headers are complete: the same cycle means none came since
            if self.cycle is cycle_then and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol


def run(app, sock: socket.socket, limits: ServerLimits, log_level: str = "info") -> None:
    """Serve `app` on the bound socket `sock` until interrupted.

    Args:
        app: The ASGI application.
        sock: A TCP socket the caller has already bound (to the host and port to serve on).
        limits: The server's limits; header_seconds and max_connections are used here.
        log_level: uvicorn's log level ('critical', 'error', 'warning', 'info', 'debug', 'trace').
    """
    config = uvicorn.Config(
        app,
        log_level=log_level,
        http=protocol_with_header_deadline(limits.header_seconds),
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=5,
    )
    uvicorn.Server(config).run(sockets=[sock])
