"""Start and stop the hub and broker. Placeholder; issue 4 fills it in."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace

from fastapi import FastAPI


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[None]:
    app.state.broker = SimpleNamespace(listening=False)
    yield
