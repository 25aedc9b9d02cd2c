"""Writing to a stream's socket between two ``send``s: the one place that knows uvicorn.

Under a 10,000-way fan-out, waking each stream's writer task to ``send`` one
run of events costs more than the write itself: the hub writes a run straight
to the socket of every stream whose writer is parked
(``app.realtime.stream``). ASGI has no such call, so this reaches into
uvicorn's httptools response cycle: ``send`` is its bound method, and the
cycle holds the transport, the flow control and whether the client left.
uvicorn is pinned to the minor version whose cycle this reads, and
``tests/unit/realtime/test_direct_write.py`` fails if it changes; a server
whose ``send`` is anything else (h11, another server, a middleware's wrapper)
gets no ``DirectWriter``, and its streams are written by their writer task.

The bytes written must be what uvicorn itself would write for a ``send``: in a
chunked response, each body as one HTTP chunk (``sse.http_chunk``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.types import Send

# The class whose instances this writes to, and what it reads of them.
CYCLE_MODULE = "uvicorn.protocols.http.httptools_impl"
CYCLE_CLASS = "RequestResponseCycle"
CYCLE_ATTRIBUTES = ("transport", "flow", "disconnected", "chunked_encoding")
# Set on the cycle here, called by ssehub's server protocol when the
# connection is lost (``client_left``, from ``app.limits``).
ON_DISCONNECT = "on_disconnect"


class DirectWriter:
    """The socket of one chunked uvicorn response, written to without ``send``.

    Whoever calls ``write_now`` must know that nothing else is writing the
    response at that moment (the stream calls it only while its writer task
    is parked with nothing queued): the bytes then land between two
    ``send``s, never inside one."""

    __slots__ = ("_cycle",)

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle

    def write_now(self, chunk: bytes) -> bool:
        """Write ``chunk`` (HTTP-framed) now if the socket takes bytes now, else
        write nothing and return False: a paused transport (the reader's buffer
        is full) or a gone client is left to the writer task, which waits for
        the one and ends on the other."""
        cycle = self._cycle
        if cycle.flow.write_paused or cycle.disconnected:
            return False
        try:
            cycle.transport.write(chunk)
        except (OSError, RuntimeError):
            return False  # closing: the writer task ends the stream
        return True

    @property
    def disconnected(self) -> bool:
        """Whether uvicorn has seen the client go (read by the hub's ticker)."""
        return bool(self._cycle.disconnected)

    def on_disconnect(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` called as soon as the connection is lost, under
        ssehub's server protocol (``client_left``); under plain uvicorn the
        ticker reads ``disconnected`` instead."""
        setattr(self._cycle, ON_DISCONNECT, callback)


def direct_writer(send: Send) -> DirectWriter | None:
    """The ``DirectWriter`` behind ``send``, once the response has started, if
    ``send`` is uvicorn's httptools cycle streaming a chunked body; else None."""
    cycle: Any = getattr(send, "__self__", None)
    kind = type(cycle)
    if kind.__module__ != CYCLE_MODULE or kind.__name__ != CYCLE_CLASS:
        return None
    if not all(hasattr(cycle, name) for name in CYCLE_ATTRIBUTES):
        return None
    if not hasattr(cycle.flow, "write_paused") or cycle.chunked_encoding is not True:
        return None
    return DirectWriter(cycle)


def client_left(cycle: object) -> None:
    """The connection of ``cycle`` (a response cycle, or None) was lost: tell
    the stream writing it, if one asked (``DirectWriter.on_disconnect``)."""
    callback = getattr(cycle, ON_DISCONNECT, None)
    if callback is not None:
        callback()
