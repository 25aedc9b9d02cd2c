"""uvicorn's own httptools response cycle on a socket that only records bytes.

The stream and its direct write are tested against the ``send`` uvicorn really
gives an app (``RequestResponseCycle.send``), without a server: what reaches
the "socket" is exactly what a client would read.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

_ID = re.compile(rb"^id: (\d+)$", re.MULTILINE)


class Socket:
    """The transport: keeps what is written; ``refuse`` makes the next writes fail
    as a closing transport's do."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0
        self.refuse = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        if self.refuse:
            self.refuse -= 1
            raise RuntimeError("closing")
        self.data += data
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def ids(self) -> list[int]:
        """The event ids written, in order."""
        return [int(n) for n in _ID.findall(bytes(self.data))]


def uvicorn_cycle(socket: Socket) -> RequestResponseCycle:
    """A response cycle of a ``GET`` on ``socket``, as uvicorn's httptools
    protocol makes one for each request."""
    scope: Any = {"type": "http", "method": "GET", "path": "/", "headers": []}
    return RequestResponseCycle(
        scope=scope,
        transport=socket,  # type: ignore[arg-type]
        flow=FlowControl(socket),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"),
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=True,
        on_response=lambda: None,
    )
