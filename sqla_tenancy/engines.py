"""The engines of one Tenancy (:class:`Engines`) and the bounded cache of per-tenant engines
(database placement, :class:`EngineCache`).

Each database tenant gets a small pool of its own; at most ``max_engines`` engines are kept, least
recently used first out, and a tenant only takes the place of the least recently used one when it
has been asked for more often lately (a frequency count that halves every ``10 * max_engines``
look-ups): otherwise its transaction is served by an engine that keeps no connection. So a tenant
seen once does not push out one in steady use, and a cycle over more tenants than the cache holds
keeps hitting the ones it holds, instead of missing every time as plain LRU does. An evicted
engine's idle connections close at once, and connections still checked out keep working until they
are returned, then close. The evicted Engine object itself is kept (without connections) in a
larger LRU, so that bringing the tenant back does not pay SQLAlchemy's per-engine first-connect
set-up again. An optional
``max_connections`` budget bounds the physical connections open across all tenant engines
(evicted ones included): when it is full, a new connection closes the idle connections of the
least recently used other engine, or else waits for one to close, up to ``budget_timeout``.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import greenlet_spawn

from .binding import PROPAGATE_OPTION
from .config import TenancyConfig, plain_url
from .dialect import DRIVER_NAME, Binder
from .errors import ConnectionBudgetExceeded

__all__ = ["EngineCache", "EngineStats", "Engines"]


#: the ceiling of a key's look-up count: a tenant that was very busy and went quiet fades out
#: within a few windows (each halves the counts), so it cannot hold its place for long
_MAX_COUNT = 16


@dataclass(frozen=True)
class EngineStats:
    """Counters of an :class:`EngineCache`, readable at any time."""

    engines: int
    hits: int
    misses: int
    evictions: int
    open_connections: int
    peak_connections: int
    #: misses served by an engine that was not kept (its connection closes after use), because
    #: the least recently used engine's tenant had been asked for at least as often lately
    passed_over: int = 0


class EngineCache:
    """Per-key engines, at most ``max_engines``: the least recently used one makes room for a
    key asked for more often lately; other keys are served by engines not kept."""

    def __init__(
        self,
        *,
        max_engines: int = 50,
        max_connections: int | None = None,
        budget_timeout: float = 30.0,
    ) -> None:
        if max_engines < 1:
            raise ValueError("max_engines must be at least 1")
        self.max_engines = max_engines
        self.max_connections = max_connections
        self.budget_timeout = budget_timeout
        self._engines: OrderedDict[Hashable, Engine] = OrderedDict()
        self._lock = threading.Lock()
        self._budget = threading.BoundedSemaphore(max_connections) if max_connections else None
        self._hits = self._misses = self._evictions = self._passed_over = 0
        #: recent look-ups per key (hits included, at most _MAX_COUNT), halved every ``_window``
        #: look-ups
        self._frequency: dict[Hashable, int] = {}
        self._window = 10 * max_engines
        self._lookups = 0
        self._open = self._peak = 0
        self._count_lock = threading.Lock()
        self._retired: weakref.WeakSet[Engine] = weakref.WeakSet()
        #: evicted engines, connections closed, kept for a cheap revival (LRU, 10x max_engines)
        self._dormant: OrderedDict[Hashable, Engine] = OrderedDict()
        self.max_dormant = 10 * max_engines
        #: changes whenever an engine stops being the cache's for its key (evicted, discarded):
        #: an engine obtained while it had a value stays the one to use while it keeps it
        self.epoch = 0

    def get(self, key: Hashable, factory: Callable[[], Engine]) -> Engine:
        """The engine for ``key``, made by ``factory`` (a sync Engine, or an AsyncEngine's
        ``sync_engine``) on a miss."""
        with self._lock:
            self._count(key)
            engine = self._engines.get(key)
            if engine is not None:
                self._engines.move_to_end(key)
                self._hits += 1
                return engine
            self._misses += 1
            admit = self._admits(key)
            # An evicted engine keeps its (initialised) dialect: reviving it spares the dialect's
            # first-connect round trips; only its connections were closed.
            engine = self._dormant.pop(key, None)
            if engine is not None and not admit:
                return self._pass_over(key, engine)
        if engine is None:
            engine = factory()  # outside the lock: other tenants' look-ups go on meanwhile
            self._instrument(engine)
        with self._lock:
            current = self._engines.get(key)
            if current is not None:  # another thread made it meanwhile
                self._dormant[key] = engine
                self._retired.add(engine)
                self._trim_dormant()
                return current
            if not admit:
                return self._pass_over(key, engine)
            self._retired.discard(engine)
            self._engines[key] = engine
            evicted = []
            while len(self._engines) > self.max_engines:
                self.epoch += 1
                old_key, old = self._engines.popitem(last=False)
                evicted.append(old)
                self._dormant[old_key] = old
                self._retired.add(old)
                self._evictions += 1
            self._trim_dormant()
        for old in evicted:
            old.pool.dispose()  # idle connections close now, checked-out ones as they return
        return engine

    def _count(self, key: Hashable) -> None:
        """One more look-up of ``key`` (under the lock; :meth:`touch` counts without it)."""
        count = self._frequency.get(key, 0)
        if count < _MAX_COUNT:
            self._frequency[key] = count + 1
        self._lookups += 1
        if self._lookups >= self._window:  # age the counts: what was hot a while ago fades
            self._lookups = 0
            # list(): one C call, so a concurrent touch() cannot change the dict mid-iteration
            self._frequency = {k: n // 2 for k, n in list(self._frequency.items()) if n > 1}

    def _admits(self, key: Hashable) -> bool:
        """Whether ``key``'s engine takes a place in the cache (under the lock): while there is
        room, or when ``key`` was asked for more often lately than the least recently used key."""
        if len(self._engines) < self.max_engines:
            return True
        victim = next(iter(self._engines))
        return self._frequency.get(key, 0) > self._frequency.get(victim, 0)

    def _pass_over(self, key: Hashable, engine: Engine) -> Engine:
        """Serve ``key`` with ``engine`` without keeping it (under the lock): it stays dormant and
        retired, so its connections close when they are returned, and the epoch changes, so no
        route keeps it."""
        self._passed_over += 1
        self._dormant[key] = engine
        self._retired.add(engine)
        self._trim_dormant()
        self.epoch += 1
        return engine

    def discard(self, predicate: Callable[[Hashable], bool]) -> None:
        """Dispose and forget the engines whose key matches (e.g. a deleted tenant's)."""
        with self._lock:
            keys = [k for k in self._engines if predicate(k)]
            engines = [self._engines.pop(k) for k in keys]
            if keys:
                self.epoch += 1
            for key in [k for k in self._dormant if predicate(k)]:
                del self._dormant[key]
        for engine in engines:
            self._retire(engine)

    def _trim_dormant(self) -> None:
        """Forget the least recently evicted engines beyond ``max_dormant`` (under the lock)."""
        while len(self._dormant) > self.max_dormant:
            self._dormant.popitem(last=False)

    def touch(self, key: Hashable) -> None:
        """Count a hit on ``key``'s engine, obtained earlier and still current (see :attr:`epoch`),
        as :meth:`get` would: most recently used, without taking the lock (each step is atomic)."""
        self._hits += 1
        self._lookups += 1  # a lost increment under a race only makes a count less exact
        frequency = self._frequency
        count = frequency.get(key, 0)
        if count < _MAX_COUNT:
            frequency[key] = count + 1
        try:  # noqa: SIM105 - on the hot path, cheaper than contextlib.suppress
            self._engines.move_to_end(key)
        except KeyError:  # evicted meanwhile: the caller sees the new epoch next time
            pass

    def held_keys(self) -> list[Hashable]:
        """The keys of the engines kept, pooled or dormant."""
        with self._lock:
            return [*self._engines, *self._dormant]

    def _retire(self, engine: Engine) -> None:
        """Close the idle connections now, and the checked-out ones as they come back."""
        self._retired.add(engine)
        engine.pool.dispose()

    def stats(self) -> EngineStats:
        with self._lock:
            engines = len(self._engines)
        return EngineStats(
            engines, self._hits, self._misses, self._evictions, self._open, self._peak, self._passed_over
        )

    def clear(self) -> None:
        """Dispose every engine (on :meth:`Tenancy.dispose`)."""
        self.discard(lambda key: True)

    # -- connection accounting ------------------------------------------------------------------

    def _instrument(self, engine: Engine) -> None:
        @event.listens_for(engine, "do_connect")
        def _acquire(dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> Any:
            if self._budget is not None and not self._take_budget(engine):
                raise ConnectionBudgetExceeded(
                    f"All {self.max_connections} tenant database connections are in use; raise "
                    "max_tenant_connections or lower the pool sizes."
                )
            try:
                connection = dialect.connect(*cargs, **cparams)
            except BaseException:
                if self._budget is not None:
                    self._budget.release()
                raise
            with self._count_lock:
                self._open += 1
                self._peak = max(self._peak, self._open)
            return connection

        @event.listens_for(engine, "checkin")
        def _checkin(dbapi_connection: Any, record: Any) -> None:
            if engine in self._retired:
                record.invalidate()

        @event.listens_for(engine, "close")
        def _closed(dbapi_connection: Any, record: Any) -> None:
            self._release()

        @event.listens_for(engine, "close_detached")
        def _closed_detached(dbapi_connection: Any) -> None:
            self._release()

    def _take_budget(self, engine: Engine) -> bool:
        """A place in the budget for a new connection of ``engine``: at once if free; else by
        closing the idle connections of the least recently used other engine that has some (the
        engine stays cached: idle connections are bounded globally, not per engine); else by
        waiting up to ``budget_timeout`` for a connection to close."""
        assert self._budget is not None
        if self._budget.acquire(blocking=False):
            return True
        with self._lock:
            idle = next(
                (e for e in self._engines.values() if e is not engine and _idle(e) > 0),
                None,
            )
        if idle is not None:
            idle.pool.dispose()  # its idle connections close (and free their places); in use ones stay
        return self._budget.acquire(timeout=self.budget_timeout)

    def _release(self) -> None:
        with self._count_lock:
            self._open -= 1
        if self._budget is not None:
            self._budget.release()


def _idle(engine: Engine) -> int:
    """The connections idle in ``engine``'s pool (0 for a pool that keeps none)."""
    checkedin = getattr(engine.pool, "checkedin", None)
    return int(checkedin()) if checkedin is not None else 0


#: Every engine sqla-tenancy makes checks a pooled connection before handing it out, so a
#: connection the server ended (``pg_terminate_backend``, a restart, a deleted tenant's) is
#: replaced instead of failing the next transaction. The tenancy dialect's ping makes no round
#: trip (see :meth:`TenancyDialect.do_ping <sqla_tenancy.dialect.TenancyDialect.do_ping>`); the
#: admin engines' is psycopg's. ``engine_options={"pool_pre_ping": False}`` turns it off.
_RECOVERING: dict[str, Any] = {"pool_pre_ping": True}


class Engines:
    """The engines one :class:`~sqla_tenancy.Tenancy` connects with.

    ``app`` (and ``async_app``) connect as the application role with the tenancy dialect, bound
    per transaction by ``binder``; ``admin`` (and ``async_admin``) as the admin role, unbound;
    ``tenants`` holds database tenants' engines, bound the same way. ``tenant_of_context`` is given
    to the dialects for column defaults (the id of the tenant the current transaction is for).
    """

    def __init__(self, config: TenancyConfig) -> None:
        self.config = config
        #: a ``begin`` listener for the admin engines only (the audit's reason: see
        #: :func:`sqla_tenancy.audit.send_platform_reason`); the application engines get none,
        #: since any ``begin`` listener sends SQLAlchemy down its slower event-aware paths
        self.admin_begin: Callable[[Any], None] | None = None
        self._bound: dict[str, Any] = {**_RECOVERING, **config.engine_options}
        self._async_app: AsyncEngine | None = None
        self._admin: Engine | None = None
        self._async_admin: AsyncEngine | None = None
        self.tenants = EngineCache(
            max_engines=config.max_tenant_engines, max_connections=config.max_tenant_connections
        )

    def bind(self, binder: Binder, tenant_of_context: Callable[[], uuid.UUID] | None = None) -> None:
        """Give the bound engines their binder (the router's, which itself needs these engines:
        hence a step of its own) and create the application engine."""
        self._bound = {
            **_RECOVERING,
            **self.config.engine_options,
            "binder": binder,
            "tenant_of_context": tenant_of_context,
        }
        if self.config.distributed:  # Citus: SET LOCAL reaches the workers (sqla_tenancy.distribution)
            connect_args = dict(self._bound.get("connect_args", {}))
            connect_args["options"] = f"{connect_args.get('options', '')} {PROPAGATE_OPTION}".strip()
            self._bound["connect_args"] = connect_args
        self._tenant_options = {
            **self._bound,
            "pool_size": self.config.tenant_pool_size,
            "max_overflow": self.config.tenant_max_overflow,
        }
        self.app: Engine = create_engine(self._app_url(), **self._bound)

    def _app_url(self) -> URL:
        return self.config.url.set(drivername=f"postgresql+{DRIVER_NAME}")

    @property
    def async_app(self) -> AsyncEngine:
        """The asyncio engine of the application role (made on first use)."""
        if self._async_app is None:
            self._async_app = create_async_engine(self._app_url(), **self._bound)
        return self._async_app

    @property
    def admin(self) -> Engine:
        """The admin role's engine: no tenant binding (platform work, provisioning, DDL)."""
        if self._admin is None:
            self._admin = create_engine(plain_url(self.config.admin_url), **_RECOVERING)
            if self.admin_begin is not None:
                event.listen(self._admin, "begin", self.admin_begin)
        return self._admin

    @property
    def async_admin(self) -> AsyncEngine:
        """The asyncio engine of the admin role."""
        if self._async_admin is None:
            self._async_admin = create_async_engine(plain_url(self.config.admin_url), **_RECOVERING)
            if self.admin_begin is not None:
                event.listen(self._async_admin.sync_engine, "begin", self.admin_begin)
        return self._async_admin

    def main(self, async_: bool) -> Engine:
        """The main database's application engine (sync, or the async engine's ``sync_engine``)."""
        return self.async_app.sync_engine if async_ else self.app

    def platform(self, async_: bool) -> Engine:
        """The admin engine (sync, or the async one's ``sync_engine``)."""
        return self.async_admin.sync_engine if async_ else self.admin

    def tenant(
        self, tenant_id: uuid.UUID, url: Callable[[], URL], *, async_: bool, pooled: bool = False
    ) -> Engine:
        """A database tenant's engine, from the LRU cache; ``url`` is called on a miss only (it
        derives the role's password: no HMAC on the hot path). ``pooled``: the URL is a pooler's
        (``tenant_poolers``), so every server session is shared with other clients."""

        def make() -> Engine:
            options = {**self._tenant_options, "behind_pooler": True} if pooled else self._tenant_options
            if async_:
                return create_async_engine(url(), **options).sync_engine
            return create_engine(url(), **options)

        return self.tenants.get(self.tenant_key(tenant_id, async_), make)

    @staticmethod
    def tenant_key(tenant_id: uuid.UUID, async_: bool) -> tuple[uuid.UUID, bool]:
        """The key of a database tenant's engine in :attr:`tenants`."""
        return (tenant_id, async_)

    @property
    def has_async(self) -> bool:
        return self._async_app is not None or self._async_admin is not None

    async def dispose_async(self) -> None:
        """Dispose the async engines (database tenants' included) inside the running loop, then
        the sync ones."""
        # Async pools must close their connections inside SQLAlchemy's greenlet bridge.
        await greenlet_spawn(self.tenants.clear)
        if self._async_app is not None:
            await self._async_app.dispose()
        if self._async_admin is not None:
            await self._async_admin.dispose()
        self._async_app = self._async_admin = None
        self.dispose_sync()

    def dispose_sync(self) -> None:
        """Dispose the sync engines and every tenant engine."""
        self.tenants.clear()
        self.app.dispose()
        if self._admin is not None:
            self._admin.dispose()
