"""The psycopg dialects that bind a tenant at transaction begin, in the same round trip.

psycopg 3 starts a transaction lazily by sending ``BEGIN`` on its own before the first statement.
Binding a tenant with one more statement after that costs a second round trip per transaction.
These dialects instead keep the driver connection in autocommit mode and, at SQLAlchemy's
transaction begin, send one simple-protocol query::

    CLOSE ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD TEMP; COMMIT;
    BEGIN [ISOLATION LEVEL ...] [READ ONLY] [DEFERRABLE];
    SET LOCAL search_path = ...; SET LOCAL ROLE ...; SET LOCAL app.current_tenant_id = '...'

so the binding is free of extra round trips and strictly transaction-local: ``COMMIT`` or
``ROLLBACK`` ends it. The statements in front of ``BEGIN``, committed on their own, clear what an
earlier transaction on the same connection may have left behind that outlives a transaction
(holdable cursors, ``LISTEN``, session advisory locks, temporary tables; see
:mod:`sqla_tenancy.binding`), so nothing one tenant leaves reaches the next. They are left out
only when the connection's previous transaction had the same binding and nothing else can have
used its server session since: never behind a pooler, which each new connection is checked for
(PgBouncer answers with a backend key of its own, not the server's ``pg_backend_pid()``).

The dialects track the isolation level SQLAlchemy asks for (``AUTOCOMMIT`` included) themselves;
a connection in ``AUTOCOMMIT`` cannot hold a transaction-local binding, so it is refused for
tenant work (:class:`AutocommitNotAllowed`) rather than run unbound.

An engine gets its binding statement from a *binder*: a callable the :class:`Tenancy` gives the
dialect (``create_engine(url, binder=...)``), returning the ``SET LOCAL`` text for the current
context (or ``None`` when the transaction needs no binding, e.g. on an engine nobody bound).
"""

from __future__ import annotations

import select
import uuid
import weakref
from collections.abc import Callable, Generator
from typing import Any

import psycopg
from psycopg import generators
from psycopg.pq import ConnStatus, ExecStatus
from sqlalchemy.dialects import registry as dialect_registry
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg, PGDialectAsync_psycopg
from sqlalchemy.util import await_

from .binding import CLEAR_LEFTOVERS, REFUSED_SQLSTATE, SEPARATE_BINDING
from .errors import AutocommitNotAllowed, TenantRefused

__all__ = ["Binder", "TenancyDialect", "TenancyDialectAsync", "DRIVER_NAME"]

#: The SQLAlchemy driver name engines built by sqla-tenancy carry (``postgresql+psycopg_tenancy``).
DRIVER_NAME = "psycopg_tenancy"

#: Returns the statement(s) binding the current context, or None for an unbound transaction.
Binder = Callable[[], "bytes | None"]

_OK = (ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK)
_CLEAR = CLEAR_LEFTOVERS + b"; "


class _ConnState:
    """What SQLAlchemy asked of one driver connection (the driver itself stays in autocommit),
    and what the dialect knows of its server session."""

    __slots__ = ("autocommit", "begin", "clean_for", "shared_backend")

    def __init__(self) -> None:
        self.autocommit = False
        self.begin = b"BEGIN"
        #: the binding of the last transaction on this connection, when nothing but that
        #: transaction's tenant can have used the server session since it was last cleared
        self.clean_for: bytes | None = None
        #: whether the server session may serve other clients too (a pooler in between; until
        #: the connection is checked, assumed so)
        self.shared_backend = True


def _send(pgconn: Any, query: bytes) -> Generator[Any, Any, list[Any]]:
    pgconn.send_query(query)
    results: list[Any] = yield from generators.execute(pgconn)
    return results


def _begin_statement(driver: Any) -> bytes:
    parts = [b"BEGIN"]
    if driver.isolation_level is not None:
        parts.append(b"ISOLATION LEVEL " + driver.isolation_level.name.replace("_", " ").encode())
    if driver.read_only is not None:
        parts.append(b"READ ONLY" if driver.read_only else b"READ WRITE")
    if driver.deferrable is not None:
        parts.append(b"DEFERRABLE" if driver.deferrable else b"NOT DEFERRABLE")
    return b" ".join(parts)


class _TenancyMixin:
    """Behaviour shared by the sync and async dialects."""

    supports_statement_cache = True
    #: the binding statement of the current context (see :data:`Binder`); ``None``: unbound
    binder: Binder | None = None
    #: the id of the tenant the current transaction is for (``tenant_id`` column defaults)
    tenant_of_context: Callable[[], uuid.UUID] | None = None
    #: the engine connects through a pooler it was configured with (``tenant_poolers``): every
    #: server session is taken as shared with other clients, without asking the server
    behind_pooler: bool = False
    _states: weakref.WeakKeyDictionary[Any, _ConnState]

    def __init__(
        self,
        binder: Binder | None = None,
        tenant_of_context: Callable[[], uuid.UUID] | None = None,
        behind_pooler: bool = False,
        **kwargs: Any,
    ) -> None:
        # create_engine(url, binder=..., tenant_of_context=..., behind_pooler=...) hands these to
        # the dialect
        super().__init__(**kwargs)
        self._states = weakref.WeakKeyDictionary()
        self.binder = binder
        self.tenant_of_context = tenant_of_context
        self.behind_pooler = behind_pooler

    def _state(self, driver: Any) -> _ConnState:
        try:
            return self._states[driver]
        except KeyError:
            state = self._states[driver] = _ConnState()
            return state

    # SQLAlchemy sets isolation levels through these two hooks; record the logical request and
    # keep the driver's own autocommit on.
    def _do_isolation_level(self, connection: Any, autocommit: bool, isolation_level: Any) -> None:
        driver = _driver(connection)
        state = self._state(driver)
        state.autocommit = autocommit
        self._set_driver(connection, autocommit=True, isolation_level=isolation_level)
        state.begin = _begin_statement(driver)

    def _do_autocommit(self, connection: Any, value: bool) -> None:
        self._state(_driver(connection)).autocommit = value
        self._set_driver(connection, autocommit=True)

    def detect_autocommit_setting(self, dbapi_connection: Any) -> bool:
        return self._state(_driver(dbapi_connection)).autocommit

    def set_readonly(self, connection: Any, value: Any) -> None:
        super().set_readonly(connection, value)  # type: ignore[misc]
        self._state(_driver(connection)).begin = _begin_statement(_driver(connection))

    def set_deferrable(self, connection: Any, value: Any) -> None:
        super().set_deferrable(connection, value)  # type: ignore[misc]
        self._state(_driver(connection)).begin = _begin_statement(_driver(connection))

    def _set_driver(self, connection: Any, *, autocommit: bool, isolation_level: Any = ...) -> None:
        raise NotImplementedError

    def on_connect(self) -> Callable[[Any], None]:
        base = super().on_connect()  # type: ignore[misc]

        def connect(conn: Any) -> None:
            if base is not None:
                base(conn)
            driver = _driver(conn)
            state = self._state(driver)
            self._set_driver(conn, autocommit=True)
            state.begin = _begin_statement(driver)
            if self.behind_pooler:  # known to be shared: no round trip on a new connection
                state.shared_backend = True
                return
            # A pooler (PgBouncer) answers the connection with a backend key of its own: then
            # the server session behind it serves other clients between our transactions.
            (result,) = self._run(driver, b"SELECT pg_backend_pid()")
            pid = result.get_value(0, 0)
            state.shared_backend = pid is None or int(pid) != driver.info.backend_pid

        return connect

    def do_ping(self, dbapi_connection: Any) -> bool:
        """The pool's pre-ping (``pool_pre_ping``, on by default for sqla-tenancy's engines),
        without a round trip: an idle connection has nothing to read, so a readable socket means
        the server spoke first, which after a ``pg_terminate_backend`` or a server restart is its
        ``FATAL`` goodbye and the end of the stream. Reading it tells; a dead connection answers
        ``False`` and the pool replaces it, and every connection older than it, before the
        transaction begins. (A server that vanished without closing its connections, such as
        behind a network partition, is noticed by the first statement instead, which fails.)"""
        pgconn = _driver(dbapi_connection).pgconn
        try:
            for _ in range(3):  # the goodbye message, then the end of the stream
                if pgconn.status != ConnStatus.OK:
                    return False
                if not select.select([pgconn.socket], [], [], 0)[0]:
                    return True
                pgconn.consume_input()
            return bool(pgconn.status == ConnStatus.OK)
        except (psycopg.Error, OSError, ValueError):
            return False

    def do_begin(self, dbapi_connection: Any) -> None:
        driver = _driver(dbapi_connection)
        state = self._state(driver)
        binder = self.binder
        binding = binder() if binder is not None else None
        if state.autocommit:
            if binding is not None:
                raise AutocommitNotAllowed(
                    "This connection is in AUTOCOMMIT mode, where a transaction-local tenant "
                    "binding cannot hold, so it is refused for tenant work. Drop "
                    "isolation_level='AUTOCOMMIT' for tenant queries, or run the statement in "
                    "platform_context() on the admin engine."
                )
            state.clean_for = None  # statements outside any transaction may leave anything
            return
        if binding is None:
            query = state.begin
        elif binding == state.clean_for:
            # The same tenant again on a session nobody else used: what is left is its own.
            query = state.begin + b"; " + binding
        else:
            # Another tenant, unbound work, a new session, or a server session other clients
            # share (behind a pooler): clear what anybody may have left there first.
            query = _CLEAR + state.begin + b"; " + binding
        state.clean_for = None
        alone = None
        if binding is not None and SEPARATE_BINDING in binding:  # Citus (see binding.SEPARATE_BINDING)
            query, alone = query.split(SEPARATE_BINDING, 1)
        results = self._run(driver, query)
        if alone is not None:
            results = [*results, *self._run(driver, alone)]
        for result in results:
            if result.status not in _OK:
                error = psycopg.errors.error_from_result(result, encoding=driver.info.encoding)
                self._run(driver, b"ROLLBACK")
                if error.sqlstate == REFUSED_SQLSTATE:
                    raise TenantRefused(
                        f"{error.diag.message_primary}. This process still had the tenant as "
                        "active; it catches up within registry_ttl seconds."
                    ) from error
                raise error
        if binding is not None and not state.shared_backend:
            state.clean_for = binding

    def _run(self, driver: Any, query: bytes) -> list[Any]:
        raise NotImplementedError


def _driver(connection: Any) -> Any:
    """The psycopg connection behind a pool proxy and/or SQLAlchemy's async adapter."""
    conn = getattr(connection, "dbapi_connection", connection)
    return getattr(conn, "_connection", conn)


class TenancyDialect(_TenancyMixin, PGDialect_psycopg):
    """``postgresql+psycopg_tenancy``: psycopg 3, tenant bound at transaction begin."""

    driver = DRIVER_NAME
    supports_statement_cache = True

    def _set_driver(self, connection: Any, *, autocommit: bool, isolation_level: Any = ...) -> None:
        driver = _driver(connection)
        if driver.autocommit != autocommit:
            driver.autocommit = autocommit
        if isolation_level is not ...:
            driver.isolation_level = isolation_level

    def _run(self, driver: psycopg.Connection[Any], query: bytes) -> list[Any]:
        return driver.wait(_send(driver.pgconn, query))

    @classmethod
    def get_async_dialect_cls(cls, url: Any) -> type[TenancyDialectAsync]:
        return TenancyDialectAsync


class TenancyDialectAsync(_TenancyMixin, PGDialectAsync_psycopg):
    """The asyncio flavour of :class:`TenancyDialect`."""

    driver = DRIVER_NAME
    supports_statement_cache = True

    def _set_driver(self, connection: Any, *, autocommit: bool, isolation_level: Any = ...) -> None:
        driver = _driver(connection)
        if driver.autocommit != autocommit:
            await_(driver.set_autocommit(autocommit))
        if isolation_level is not ...:
            await_(driver.set_isolation_level(isolation_level))

    def _run(self, driver: psycopg.AsyncConnection[Any], query: bytes) -> list[Any]:
        results: list[Any] = await_(driver.wait(_send(driver.pgconn, query)))
        return results


dialect_registry.register(f"postgresql.{DRIVER_NAME}", __name__, "TenancyDialect")
