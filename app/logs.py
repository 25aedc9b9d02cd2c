"""Logging set-up, and the filter that keeps tokens out of every log line."""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

# ``key=value`` as it appears in a logged URL (after ``?`` or ``&``) or a message.
_QUERY_PARAM = re.compile(r"(?P<sep>^|[?&\s])(?P<key>[^=&?\s\"#]+)=(?P<value>[^&\s\"#]*)")
SECRET_PARAMS = frozenset({"access_token"})


def _redact_param(match: re.Match[str]) -> str:
    # The server decodes the key (``access%5Ftoken`` is ``access_token`` to it), so
    # the filter must too, or an encoded name would carry a working token into the log.
    if unquote_plus(match["key"]).lower() in SECRET_PARAMS:
        return f"{match['sep']}{match['key']}=[redacted]"
    return match.group(0)


def redact(text: str) -> str:
    """Replace the value of every ``access_token`` query parameter, however encoded."""
    return _QUERY_PARAM.sub(_redact_param, text)


class RedactTokens(logging.Filter):
    """Rewrites a record's arguments so ``?access_token=...`` never reaches a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def install_token_redaction() -> None:
    """Attach the filter to uvicorn's loggers (idempotent)."""
    for name in ("uvicorn.access", "uvicorn.error", "ssehub"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
