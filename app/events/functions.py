"""ssehub's database functions, kept as source: ``app/events/sql``, one file per function.

Each file holds one function exactly as ``pg_get_functiondef`` prints it, so
what the database runs can be compared with what is reviewed here, byte for
byte (tests/test_sql_source.py). The files are the functions at the head of
the migrations: a migration that adds or changes one calls ``apply`` (after
dropping a function whose arguments or result change), and so does every
later one, so a database migrated from empty and one migrated step by step
end with the same functions. Its downgrade restores the definitions it
replaced from a copy of its own, as 0005's restores 0004's: the files only
ever hold the head's.

**Why the functions are safe to run as their owner.** Every one fixes
``search_path`` to ``pg_catalog, pg_temp`` and names ssehub's own objects
with their schema (``public.events``). A role that may create objects in
``public`` can then shadow nothing a function calls: no operator, function or
table of its own is even a candidate (``pg_temp`` is never searched for
functions or operators, and last for tables). ``ssehub_enqueue`` runs with
its owner's rights (``SECURITY DEFINER``) for the roles ``ssehub
grant-publisher`` prepared; the others run with the caller's, and the caller
is ssehub's own writer. ``apply`` takes ``EXECUTE`` on all of them from
``PUBLIC``: only the owner (ssehub) calls them, and ``grant-publisher`` gives
``ssehub_enqueue`` to the roles it names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

SOURCE = Path(__file__).with_name("sql")

# Functions are created without checking their bodies against objects that a
# later file (or a later migration) creates, as pg_dump does; and run by no one
# but their owner.
_BEFORE = "SET LOCAL check_function_bodies = off"
_REVOKE = """
DO $$
DECLARE f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'ssehub\\_%'
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$
"""


def sources() -> dict[str, str]:
    """Each function's definition, by name (the file's name)."""
    return {path.stem: path.read_text() for path in sorted(SOURCE.glob("*.sql"))}


def apply(execute: Callable[[str], object]) -> None:
    """Create or replace every function from its file, in the caller's transaction."""
    execute(_BEFORE)
    for definition in sources().values():
        execute(definition)
    execute(_REVOKE)
