"""A bounded cache of per-tenant engines (database placement).

Each database tenant gets a small pool of its own; at most ``max_engines`` engines are kept, least
recently used first out. An evicted engine is disposed at once: its idle connections close, and
connections still checked out keep working until they are returned, then close. An optional
``max_connections`` budget bounds the physical connections open across all tenant engines
(evicted ones included): a new connection waits for one to close, up to ``budget_timeout``.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event

from .errors import TenancyError

__all__ = ["EngineCache", "EngineStats"]


@dataclass(frozen=True)
class EngineStats:
    """Counters of an :class:`EngineCache`, readable at any time."""

    engines: int
    hits: int
    misses: int
    evictions: int
    open_connections: int
    peak_connections: int


class EngineCache:
    """Per-key engines, least recently used evicted beyond ``max_engines``."""

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
        self._hits = self._misses = self._evictions = 0
        self._open = self._peak = 0
        self._count_lock = threading.Lock()
        self._retired: weakref.WeakSet[Engine] = weakref.WeakSet()

    def get(self, key: Hashable, factory: Callable[[], Engine]) -> Engine:
        """The engine for ``key``, made by ``factory`` (a sync Engine, or an AsyncEngine's
        ``sync_engine``) on a miss."""
        with self._lock:
            engine = self._engines.get(key)
            if engine is not None:
                self._engines.move_to_end(key)
                self._hits += 1
                return engine
            self._misses += 1
            engine = factory()
            self._instrument(engine)
            self._engines[key] = engine
            evicted = []
            while len(self._engines) > self.max_engines:
                evicted.append(self._engines.popitem(last=False)[1])
                self._evictions += 1
        for old in evicted:
            self._retire(old)
        return engine

    def discard(self, predicate: Callable[[Hashable], bool]) -> None:
        """Dispose and forget the engines whose key matches (e.g. a deleted tenant's)."""
        with self._lock:
            keys = [k for k in self._engines if predicate(k)]
            engines = [self._engines.pop(k) for k in keys]
        for engine in engines:
            self._retire(engine)

    def _retire(self, engine: Engine) -> None:
        """Close the idle connections now, and the checked-out ones as they come back."""
        self._retired.add(engine)
        engine.pool.dispose()

    def stats(self) -> EngineStats:
        with self._lock:
            engines = len(self._engines)
        return EngineStats(engines, self._hits, self._misses, self._evictions, self._open, self._peak)

    def clear(self) -> None:
        self.discard(lambda key: True)

    # -- connection accounting ------------------------------------------------------------------

    def _instrument(self, engine: Engine) -> None:
        @event.listens_for(engine, "do_connect")
        def _acquire(dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> Any:
            if self._budget is not None and not self._budget.acquire(timeout=self.budget_timeout):
                raise TenancyError(
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

    def _release(self) -> None:
        with self._count_lock:
            self._open -= 1
        if self._budget is not None:
            self._budget.release()
