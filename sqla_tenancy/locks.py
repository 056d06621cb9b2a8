"""The advisory locks that keep sqla-tenancy's own operations apart, in one place.

Provisioning, deletion and migrations exclude each other through PostgreSQL advisory locks on the
main database (and, for a template database, on its server). Each side must take exactly the same
key: defined once here, a key cannot drift on one side and silently stop excluding the other.

Keys are text, hashed with ``hashtext()`` by the server; the statements take the key as the
``:key`` parameter, or :func:`xact_lock_sql` inlines it where a statement must share a round trip.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, text

from .identifiers import quote_literal

__all__ = [
    "GRANTS_KEY",
    "HOLDER",
    "INSTALL_KEY",
    "LOCK",
    "MIGRATION_KEY",
    "POOL_KEY",
    "TRY_LOCK",
    "UNLOCK",
    "XACT_LOCK",
    "SERVING_PREFIX",
    "keeper_key",
    "registration_key",
    "serving_key",
    "session_lock",
    "template_key",
    "tenant_key",
    "xact_lock_sql",
]

#: Held (transaction-level) by ``install()`` and other DDL of the ``tenancy`` schema; a bigint key.
INSTALL_KEY = 0x5_1A7E_7A11
#: Held (transaction-level) by every transaction that grants on the main database's shared objects
#: (the database, the ``tenancy`` and infrastructure schemas and tables, the tenants' group; a new
#: keeper role's grant on the ``tenancy`` schema): a GRANT rewrites the object's catalog row even
#: when nothing changes, and two at once fail with ``tuple concurrently updated`` or deadlock
#: (fresh processes provisioning database tenants at once did). Taken before the first of those
#: rows the transaction rewrites.
GRANTS_KEY = "sqla_tenancy:grants"
#: Held (session-level) by a migration run: the fleet runner's or a plain ``alembic`` one.
MIGRATION_KEY = "sqla_tenancy:migrate"

#: Held (session-level, tried without waiting) by whoever tops the pool of pending tenants up:
#: one refill at a time across processes, so that the pool does not overshoot its target.
POOL_KEY = "sqla_tenancy:pool"

LOCK = "select pg_advisory_lock(hashtext(:key))"
TRY_LOCK = "select pg_try_advisory_lock(hashtext(:key))"
UNLOCK = "select pg_advisory_unlock(hashtext(:key))"
XACT_LOCK = "select pg_advisory_xact_lock(hashtext(:key))"


def registration_key(slug: str) -> str:
    """Serialises the registration of a slug: two processes creating the same slug, the second
    waits and then sees the first's row."""
    return f"sqla_tenancy:{slug}"


def tenant_key(slug: str) -> str:
    """Held while a tenant is provisioned, deleted or migrated: each waits for the others."""
    return f"sqla_tenancy:provision:{slug}"


#: :func:`serving_key` without the tenant id, for SQL that appends the id itself.
SERVING_PREFIX = "sqla_tenancy:serving:"


def serving_key(tenant_id: object) -> str:
    """Held shared by every transaction of a shared or schema tenant (``tenancy.admit()``,
    in its binding), exclusively by its deletion: the deletion waits out the transactions in
    flight, and while it waits or runs a new transaction of the tenant is refused."""
    return f"{SERVING_PREFIX}{tenant_id}"


def template_key(template: str) -> str:
    """Held (in the server admin URL's database) while a template database is cloned or
    migrated: ``CREATE DATABASE`` refuses a template that has other sessions."""
    return f"sqla_tenancy:template:{template}"


def keeper_key(prefix: str) -> str:
    """Held (transaction-level) while the keeper roles of the Tenancy of ``prefix`` are counted
    or one is made (:mod:`sqla_tenancy.grants`): two provisionings never make the same keeper."""
    return f"sqla_tenancy:keeper:{prefix}"


@contextmanager
def session_lock(conn: Connection, key: str, *, wait: bool = True) -> Iterator[bool]:
    """Hold the session-level advisory lock ``key`` on ``conn`` for the block: taken, and the
    transaction it took it in committed, so that the block's own transactions (on ``conn`` or on
    other connections) run under it; released (and committed) on the way out, exceptions
    included. Yields ``True``. With ``wait=False`` a lock another session holds is not waited
    for: the block runs at once with ``False`` and nothing held."""
    params = {"key": key}
    if wait:
        conn.execute(text(LOCK), params)
        got = True
    else:
        got = bool(conn.execute(text(TRY_LOCK), params).scalar())
    conn.commit()
    if not got:
        yield False
        return
    try:
        yield True
    finally:
        conn.execute(text(UNLOCK), params)
        conn.commit()


def xact_lock_sql(key: str) -> str:
    """:data:`XACT_LOCK` with the key inlined, for a statement sent in one round trip with others."""
    return f"SELECT pg_advisory_xact_lock(hashtext({quote_literal(key)}))"


#: Who holds the session lock ``:key``: pid, application name, client address, start.
HOLDER = (
    "select a.pid, a.application_name, a.client_addr::text, a.backend_start "
    "from pg_locks l join pg_stat_activity a on a.pid = l.pid "
    "where l.locktype = 'advisory' and l.granted "
    "and l.objid = (hashtext(:key)::bigint & 4294967295) limit 1"
)
