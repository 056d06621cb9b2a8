"""Celery: a task runs for the tenant that was active where it was sent, or not at all.

::

    from celery import Celery
    from sqla_tenancy.integrations.celery import TenantTask, install_celery

    app = Celery("proj", task_cls=TenantTask)
    install_celery(app, tenancy=tenancy)

    @app.task
    def reindex(project_id: int) -> None:  # runs inside tenant_context(<the sender's tenant>)
        ...

    @app.task(tenant_required=False)
    def purge_expired_sessions() -> None:  # may run with no tenant (periodic, cross-tenant...)
        ...

    with tenant_context("acme"):
        reindex.delay(42)  # the message carries acme's id; the worker re-enters it

**Sending.** A message published inside :func:`~sqla_tenancy.tenant_context` carries the tenant's
id in the ``sqla_tenancy_tenant`` header (a slug is resolved to the id at send time, so a task
queued for a tenant never runs for a later tenant that reuses the slug); inside
:func:`~sqla_tenancy.platform_context` it carries the reason in ``sqla_tenancy_platform``. The
headers are set from the context on every publish (``before_task_publish``), so they follow
``delay``, ``apply_async``, ``send_task``, canvas and retries alike, and a task that sends
another from the worker passes its own tenant on. A message sent inside an anonymous
``tenant_context(..., anonymous=True)`` (an access-key request, say) also carries
``sqla_tenancy_anonymous: "1"``, and its task runs anonymously too, with the anonymous database
role: queuing work never raises an anonymous caller's privileges.

**Running.** In the worker the task runs inside the context its message names, entered before the
task starts and left when it is over (``task_prerun`` / ``task_postrun``, the latter sent also when
the task failed), so the next task on the same worker starts with none. That span covers the body,
the task's ``on_success`` / ``on_failure`` / ``after_return`` handlers and the chained and chord
callback tasks the worker sends after the body returns: those carry the tenant on too. Before the
body runs, :class:`TenantTask` (the app's task class) checks that context: the tenant is resolved,
so one deleted or suspended since the message was sent fails the task with
:class:`~sqla_tenancy.TenantNotFound` or :class:`~sqla_tenancy.TenantSuspended`; a message that
names no tenant fails it closed with :class:`~sqla_tenancy.TenantRequired`, unless the task is
declared ``tenant_required=False``. Tenant-less sends are almost always a task sent outside the
request that should have named the tenant, and running it for the worker's default tenant would be
the wrong tenant, silently. A ``tenant_required=False`` task runs with no tenant (its queries get
the :class:`~sqla_tenancy.Tenancy`'s default tenant, or raise TenantRequired); periodic tasks sent
by ``celery beat`` are such tasks: have them enter each tenant's context themselves, or a
``platform_context``. (The checks are in the task class because Celery logs and swallows what a
signal receiver raises: only the task's ``__call__`` can fail it closed.)

Called directly (``task(...)``) or eagerly (``task_always_eager``), a task runs in the caller's
thread and keeps the caller's context; ``tenant_required`` is checked against it.

**One header, in one place.** The worker reads the context from the message's top-level headers
only, where the publish hook writes them (protocol 2 makes them attributes of ``task.request``).
The hook also removes the context headers' names from the other parts of a message that Celery
shows on the worker's request (a nested ``apply_async(headers={"headers": {...}})``, which becomes
``request.headers``; message properties, from unknown ``apply_async`` options; stamps), so setting
them by hand names nothing. A message that still carries one of them there (from a producer that
never ran :func:`install_celery`) fails with :class:`~sqla_tenancy.integrations.IntegrationError`
before the body runs, ``tenant_required=False`` or not.

The broker is trusted with the header as it is with the task's arguments: whoever can publish to
it can name any tenant. Needs Celery's message protocol 2 (the default since Celery 4).

For threads rather than processes, :func:`sqla_tenancy.run_in_context` carries the tenant into a
thread pool (``executor.submit(run_in_context(work), arg)``).
"""

from __future__ import annotations

import logging
import uuid
import weakref
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from celery import Celery, Task
from celery.signals import before_task_publish, task_postrun, task_prerun

from ..context import (
    current_is_anonymous,
    current_platform_reason,
    current_tenant_ref,
    platform_context,
    tenant_context,
)
from ..errors import TenantNotFound, TenantRequired
from ..registry import Tenant
from ..routing import lookup_key
from ..tenancy import Tenancy, active_tenancy
from . import IntegrationError

__all__ = [
    "ANONYMOUS_HEADER",
    "PLATFORM_HEADER",
    "TENANT_HEADER",
    "TenantTask",
    "context_headers",
    "install_celery",
]

log = logging.getLogger(__name__)

#: The message header that carries the tenant's id (a slug when it could not be resolved at send time).
TENANT_HEADER = "sqla_tenancy_tenant"
#: The message header that carries the reason of the sender's :func:`platform_context`.
PLATFORM_HEADER = "sqla_tenancy_platform"
#: The message header (``"1"``) marking a tenant sent from an anonymous ``tenant_context``.
ANONYMOUS_HEADER = "sqla_tenancy_anonymous"

_CONTEXT_HEADERS = (TENANT_HEADER, PLATFORM_HEADER, ANONYMOUS_HEADER)
_UID = "sqla_tenancy.integrations.celery"
_CONTEXT_ATTR = "_sqla_tenancy_context"  # on the task's request, between prerun and postrun
_tenancy_ref: weakref.ref[Tenancy] | None = None


def _tenancy() -> Tenancy | None:
    """The Tenancy given to :func:`install_celery`, else the process's active one."""
    tenancy = _tenancy_ref() if _tenancy_ref is not None else None
    return tenancy if tenancy is not None else active_tenancy()


def _tenant_id(ref: str | uuid.UUID | Tenant) -> str:
    """The id of the tenant ``ref`` names, as a string; the slug itself if it cannot be resolved
    here (the worker then resolves it, and fails the task if it cannot either)."""
    key = lookup_key(ref)
    if isinstance(key, uuid.UUID):
        return str(key)
    tenancy = _tenancy()
    if tenancy is None:
        log.warning("no Tenancy in this process to resolve tenant %r; the message carries the slug", key)
        return key
    try:
        return str(tenancy.get_tenant(key).id)
    except TenantNotFound:
        log.warning("no tenant %r in the registry; the message carries the slug (the task will fail)", key)
    except Exception:
        log.exception("could not resolve tenant %r at send time; the message carries the slug", key)
    return key


def context_headers() -> dict[str, str]:
    """The message headers that name the current context: the tenant's id (and the anonymous
    mark), the platform reason, or nothing outside both. (What every publish adds once
    :func:`install_celery` has run.)"""
    reason = current_platform_reason()
    if reason is not None:
        return {PLATFORM_HEADER: reason}
    ref = current_tenant_ref()
    if ref is not None:
        if current_is_anonymous():
            return {TENANT_HEADER: _tenant_id(ref), ANONYMOUS_HEADER: "1"}
        return {TENANT_HEADER: _tenant_id(ref)}
    return {}


def _on_before_task_publish(
    headers: dict[str, Any] | None = None, properties: dict[str, Any] | None = None, **_: Any
) -> None:
    """``before_task_publish`` receiver: the message's context headers are the sender's context,
    and no other part of the message names one (see :func:`_misplaced`)."""
    if headers is None:
        return
    dropped = _drop_context_names(headers, properties)
    if dropped:
        log.warning(
            "task %s: dropped %s from its message: the context a task runs in is the sender's, "
            "carried by sqla_tenancy's own headers only",
            headers.get("id"),
            ", ".join(dropped),
        )
    for name in _CONTEXT_HEADERS:
        headers.pop(name, None)
    headers.update(context_headers())


def _drop_context_names(headers: dict[str, Any], properties: dict[str, Any] | None) -> list[str]:
    """Remove the context headers' names from every place of an outgoing message where Celery
    would show them to the worker besides the headers themselves; what was removed, and where."""
    dropped: list[str] = []
    for place, container in (
        ("headers", headers.get("headers")),
        ("stamps", headers.get("stamps")),
        ("properties", properties),
    ):
        if isinstance(container, dict):
            for name in _CONTEXT_HEADERS:
                if name in container:
                    del container[name]
                    dropped.append(f"{place}[{name!r}]")
    stamped = headers.get("stamped_headers")
    if isinstance(stamped, list):
        headers["stamped_headers"] = [name for name in stamped if name not in _CONTEXT_HEADERS]
    return dropped


def install_celery(app: Celery, *, tenancy: Tenancy | None = None) -> None:
    """Make ``app`` carry the sender's tenant to its tasks (see the module documentation).

    Call it where the app is defined, in senders and workers alike. ``app`` must have been
    created with ``task_cls=TenantTask`` (or a subclass): a task of another class would ignore the
    tenant its message carries. ``tenancy`` resolves slugs to tenant ids at send time and the
    message's tenant in the worker (default: the process's most recent :class:`Tenancy`).
    Celery's signals are process-wide: the receivers are connected once, whatever the number of
    calls, and the last ``tenancy`` given is the one used.
    """
    global _tenancy_ref
    if not (isinstance(app.Task, type) and issubclass(app.Task, TenantTask)):
        raise IntegrationError(
            f"The Celery app {app.main!r} does not use TenantTask, so its tasks would ignore the "
            "tenant their messages carry. Create it with "
            "Celery(..., task_cls='sqla_tenancy.integrations.celery:TenantTask') (or a subclass)."
        )
    if tenancy is not None:
        _tenancy_ref = weakref.ref(tenancy)
    before_task_publish.connect(_on_before_task_publish, weak=False, dispatch_uid=f"{_UID}.publish")
    task_prerun.connect(_on_task_prerun, weak=False, dispatch_uid=f"{_UID}.prerun")
    task_postrun.connect(_on_task_postrun, weak=False, dispatch_uid=f"{_UID}.postrun")


def _misplaced(request: Any) -> list[str]:
    """Where the message names a context somewhere the publisher never writes it.

    With protocol 2, Celery makes each message header an attribute of the task's request: that is
    where :func:`context_headers` go, and the only place the worker reads them. The request shows
    other parts of the message too, each a place a forger could hope to be read from: a nested
    ``apply_async(headers={"headers": {...}})`` becomes ``request.headers`` (otherwise Celery fills
    it with the message's custom headers, which then repeat the attributes exactly), an unknown
    ``apply_async`` option becomes a message property (``request.properties``), a stamp
    ``request.stamps`` (and ``request.stamped_headers``)."""
    found: list[str] = []
    headers = getattr(request, "headers", None)
    properties = getattr(request, "properties", None)
    stamps = getattr(request, "stamps", None)
    stamped = getattr(request, "stamped_headers", None)
    for name in _CONTEXT_HEADERS:
        if isinstance(headers, Mapping) and name in headers and headers[name] != request.__dict__.get(name):
            found.append(f"request.headers[{name!r}]")
        if isinstance(properties, Mapping) and name in properties:
            found.append(f"request.properties[{name!r}]")
        if isinstance(stamps, Mapping) and name in stamps:
            found.append(f"request.stamps[{name!r}]")
        if isinstance(stamped, (list, tuple)) and name in stamped:
            found.append(f"request.stamped_headers ({name!r})")
    return found


def _header(request: Any, name: str) -> str | None:
    """The message header ``name``, read where the publisher writes it and nowhere else."""
    value = request.__dict__.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise IntegrationError(
            f"The message header {name!r} must be a non-empty string, got {value!r}; it is set by "
            "sqla_tenancy.integrations.celery when a task is sent: do not set it by hand."
        )
    return value


def _message_scope(request: Any) -> tuple[str | uuid.UUID | None, str | None, bool]:
    """The tenant reference and the platform reason the message names (at most one of them), and
    whether the tenant is to be served anonymously."""
    misplaced = _misplaced(request)
    if misplaced:
        raise IntegrationError(
            f"The message of task {request.id} names a tenant context in {', '.join(misplaced)}, "
            "where sqla_tenancy.integrations.celery never writes one; refusing to run it rather than "
            "guess its tenant. Send the task inside tenant_context(<slug>) (or "
            "platform_context(reason)) from a process that called install_celery(app), and do not "
            "set these names in apply_async(headers=...) or as options by hand."
        )
    tenant = _header(request, TENANT_HEADER)
    reason = _header(request, PLATFORM_HEADER)
    anonymous = _header(request, ANONYMOUS_HEADER)
    if tenant is not None and reason is not None:
        raise IntegrationError(
            f"The message of task {request.id} names both a tenant and a platform context; it was "
            "not sent by sqla_tenancy.integrations.celery."
        )
    if anonymous is not None and (anonymous != "1" or tenant is None):
        raise IntegrationError(
            f"The message of task {request.id} carries {ANONYMOUS_HEADER}={anonymous!r} without a "
            "tenant, or with a value other than '1'; it was not sent by sqla_tenancy.integrations.celery."
        )
    return (lookup_key(tenant) if tenant is not None else None), reason, anonymous is not None


def _from_worker(task: Any) -> bool:
    """Whether ``task`` runs from a message (not called directly, not eagerly)."""
    request = task.request
    return isinstance(task, TenantTask) and not (request.called_directly or request.is_eager)


def _on_task_prerun(task: Any = None, **_: Any) -> None:
    """``task_prerun`` receiver: enter the context the message names."""
    if task is None or not _from_worker(task):
        return
    tenant, reason, anonymous = _message_scope(task.request)
    context: AbstractContextManager[None]
    if reason is not None:
        context = platform_context(reason)
    elif tenant is not None:
        context = tenant_context(tenant, anonymous=anonymous)
    else:
        return
    context.__enter__()
    setattr(task.request, _CONTEXT_ATTR, context)


def _on_task_postrun(task: Any = None, **_: Any) -> None:
    """``task_postrun`` receiver (sent also when the task failed): leave the context."""
    if task is None:
        return
    context: AbstractContextManager[None] | None = task.request.__dict__.pop(_CONTEXT_ATTR, None)
    if context is not None:
        context.__exit__(None, None, None)


class TenantTask(Task):  # type: ignore[misc]  # Celery ships no type information
    """The task class of a tenant-aware Celery app: runs each task inside the context its message
    names, or fails it closed (see the module documentation).

    ``tenant_required`` (default ``True``; set per task with ``@app.task(tenant_required=False)``):
    whether a message that names neither a tenant nor a platform context fails with
    :class:`~sqla_tenancy.TenantRequired` before the body runs.
    """

    tenant_required: bool = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _from_worker(self):
            self._check_message_context()
        elif current_tenant_ref() is None and current_platform_reason() is None and self.tenant_required:
            # Called directly or eagerly, in the caller's thread: the caller's context is the task's.
            raise self._no_tenant_error("runs in the caller's thread, where no tenant_context is active")
        return super().__call__(*args, **kwargs)

    def _check_message_context(self) -> None:
        """Check that the worker runs the body in exactly the context the message names, and that
        its tenant can be served now."""
        tenant, reason, anonymous = _message_scope(self.request)
        running = (current_tenant_ref(), current_platform_reason(), current_is_anonymous())
        if running != (tenant, reason, anonymous):
            if tenant is None and reason is None:
                raise IntegrationError(
                    f"Task {self.name!r} was sent with no tenant but runs inside a tenant or platform "
                    "context entered elsewhere in the worker (and never left); refusing to run it there."
                )
            raise IntegrationError(
                f"Task {self.name!r} does not run in the context its message names: the worker "
                "process has not called install_celery(app); call it where the app is defined."
            )
        if tenant is not None:
            tenancy = _tenancy()
            if tenancy is not None:
                tenancy.resolve(tenant)  # TenantNotFound / TenantSuspended before the body runs
        elif reason is None and self.tenant_required:
            raise self._no_tenant_error("its message names no tenant")

    def _no_tenant_error(self, why: str) -> TenantRequired:
        return TenantRequired(
            f"Task {self.name!r} needs a tenant, and {why}. Send it inside "
            "tenant_context(<slug>) (or platform_context(reason) for cross-tenant work), or "
            "declare it @app.task(tenant_required=False) if it may run without one."
        )
