"""Lifecycle events: callbacks run around creating, deleting, suspending, resuming, moving and
migrating a tenant, and at each named provisioning step.

Register with :meth:`Tenancy.on` (``tenancy.on("after_create", seed)`` or as a decorator,
``@tenancy.on("after_create")``). A callback receives one :class:`TenantEvent`.

* ``before_*`` callbacks run before anything is changed: one that raises aborts the operation,
  which has then made nothing (the exception propagates as it is).
* ``after_*`` callbacks run once the operation has committed. One that raises after
  ``create`` undoes the creation (the tenant is deleted again, so a failed seeding leaves no
  half-seeded tenant) and :class:`~sqla_tenancy.HookFailed` is raised; after any other operation
  the operation stays done and :class:`~sqla_tenancy.HookFailed` says so.
* ``step`` callbacks run before each provisioning step (``register``, ``schema``, ``database``,
  ``fdw``, ...: the same names the fault-injection tests fail), for metrics and logs; one that
  raises fails the provisioning, which is undone like any failed step.

Callbacks run in the calling thread, in registration order.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, get_args, overload

from .errors import HookFailed
from .registry import Tenant

__all__ = ["EVENTS", "EventName", "Events", "Hook", "HookFailed", "TenantEvent"]

log = logging.getLogger("sqla_tenancy.events")

EventName = Literal[
    "before_create",
    "after_create",
    "before_delete",
    "after_delete",
    "before_suspend",
    "after_suspend",
    "before_resume",
    "after_resume",
    "before_move",
    "after_move",
    "before_migrate",
    "after_migrate",
    "step",
]
#: Every event name :meth:`Events.on` accepts.
EVENTS: tuple[str, ...] = get_args(EventName)


@dataclass(frozen=True)
class TenantEvent:
    """What a callback is told."""

    #: the event (``"after_create"``)
    name: str
    #: the tenant's slug
    slug: str
    #: the tenant as the registry has it (``None`` for ``before_create``, which has no row yet)
    tenant: Tenant | None = None
    #: the placement concerned (for ``move``: the target placement)
    placement: str | None = None
    #: for ``step`` events, the step's name
    step: str | None = None
    #: anything else the operation reports (``move``: ``{"from": ..., "server": ...}``)
    details: dict[str, object] = field(default_factory=dict)


Hook = Callable[[TenantEvent], None]

#: the tenant whose provisioning steps are running (set by the facade around an operation)
_subject: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "sqla_tenancy_event_subject", default=None
)


class Events:
    """The callbacks of one Tenancy, by event name."""

    def __init__(self) -> None:
        self._hooks: dict[str, list[Hook]] = {}
        self._lock = threading.Lock()

    @overload
    def on(self, name: EventName, fn: Hook) -> Hook: ...

    @overload
    def on(self, name: EventName, fn: None = None) -> Callable[[Hook], Hook]: ...

    def on(self, name: EventName, fn: Hook | None = None) -> Hook | Callable[[Hook], Hook]:
        """Run ``fn`` on the event ``name``; without ``fn``, a decorator that does."""
        if name not in EVENTS:
            raise ValueError(f"Unknown event {name!r}; the events are {', '.join(EVENTS)}.")

        def register(hook: Hook) -> Hook:
            if not callable(hook):
                raise TypeError(f"on({name!r}) takes a callable, not {type(hook).__name__}")
            with self._lock:
                self._hooks[name] = [*self._hooks.get(name, []), hook]
            return hook

        return register if fn is None else register(fn)

    def off(self, name: EventName, fn: Hook) -> None:
        """Stop running ``fn`` on ``name`` (a no-op if it was not registered)."""
        with self._lock:
            self._hooks[name] = [h for h in self._hooks.get(name, []) if h is not fn]

    def has(self, name: str) -> bool:
        return bool(self._hooks.get(name))

    def emit(self, event: TenantEvent) -> None:
        """Run the callbacks of ``event.name``; the first exception propagates."""
        for hook in self._hooks.get(event.name, ()):
            hook(event)

    def after(self, event: TenantEvent, *, done: str) -> None:
        """Run the ``after_*`` callbacks; wrap a failure in :class:`HookFailed` saying ``done``."""
        try:
            self.emit(event)
        except Exception as exc:
            raise HookFailed(
                f"An {event.name} callback failed for tenant {event.slug!r} ({type(exc).__name__}: "
                f"{exc}); {done}"
            ) from exc

    def step(self, name: str) -> None:
        """The provisioning steps' observer (see :class:`~sqla_tenancy.steps.Steps`)."""
        subject = _subject.get()
        if subject is None or not self.has("step"):
            return
        slug, placement = subject
        self.emit(TenantEvent("step", slug, placement=placement, step=name))

    @contextmanager
    def subject(self, slug: str, placement: str | None) -> Iterator[None]:
        """Attribute the provisioning steps run inside the block to ``slug``."""
        token = _subject.set((slug, placement))
        try:
            yield
        finally:
            _subject.reset(token)
