"""Running uvicorn. Placeholder for issue 4, which adds the SIGTERM handling for streams."""

from __future__ import annotations

import uvicorn

from app.logs import install_token_redaction


def run_server(host: str, port: int, workers: int) -> None:
    install_token_redaction()
    uvicorn.run(
        "app.main:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        timeout_graceful_shutdown=4,
    )
