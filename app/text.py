"""Text Postgres can store: the one check every client text passes on its way in.

Postgres's ``text`` cannot hold a NUL character, and asyncpg cannot encode a
lone surrogate (which ``json.loads`` happily produces from ``"\\ud800"``): either
reaching a query would be a 500. Every path, query, header or body field that ends
up in SQL is typed ``Text`` (or checked with ``storable``), so it is refused
at the boundary with a 422 (a 400 for a header) and nothing is changed.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def storable(value: str) -> str:
    """``value`` unchanged if Postgres can store it, else ``ValueError``."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from exc
    return value


Text = Annotated[str, AfterValidator(storable)]
