"""uvicorn, hardened at the connection level (below anything an ASGI app can see).

uvicorn has no deadline for a request's headers: a client that opens connections and sends half
a request holds them, and their file descriptors, for as long as it likes; with the default limit
of 1024 open files, ~1000 such sockets stopped a server from accepting anyone (the red team's
finding). `GuardedH11` closes a connection whose request headers are not complete within
`header_timeout` seconds (also between requests on a kept-alive connection); `run()` also raises
the process's open-file limit to its hard limit (at most 65536) and caps concurrent connections
(`limit_concurrency`: uvicorn answers 503 beyond it).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("lorakit.serve")


def _protocol(header_timeout: float) -> Any:
    """uvicorn's h11 protocol with a header deadline, or "auto" if this uvicorn's internals differ."""
    try:
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:  # pragma: no cover - another uvicorn layout
        return "auto"
    if not all(hasattr(H11Protocol, m) for m in ("connection_made", "connection_lost", "handle_events",
                                                 "on_response_complete")):
        return "auto"  # pragma: no cover

    class GuardedH11(H11Protocol):
        _due: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._due = self.loop.call_later(header_timeout, self._late)

        def _disarm(self) -> None:
            if self._due is not None:
                self._due.cancel()
                self._due = None

        def _late(self) -> None:
            cycle = getattr(self, "cycle", None)
            if (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()  # no request under way: its headers did not arrive in time

        def handle_events(self) -> None:
            super().handle_events()
            cycle = getattr(self, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                self._disarm()  # a request's headers are complete

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11


def raise_open_file_limit(most: int = 65536) -> int:
    """The soft limit on open files raised to the hard one (at most `most`); returns it."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = most if hard == resource.RLIM_INFINITY else min(hard, most)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):  # pragma: no cover
            pass
    return soft


def run(app: Any, *, host: str, port: int, log_level: str, max_connections: int = 1024,
        header_timeout: float = 10.0) -> None:
    import uvicorn

    raise_open_file_limit()
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                limit_concurrency=max_connections, http=_protocol(header_timeout))
