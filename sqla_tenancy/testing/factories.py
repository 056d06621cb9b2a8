"""factory-boy factories that write into the active tenant (``pip install sqla-tenancy[testing]``).

:class:`TenantModelFactory` is a ``SQLAlchemyModelFactory`` whose session is a
:class:`~sqla_tenancy.TenantSession` of the application's Tenancy, so rows go wherever the active
tenant's placement keeps them and ``tenant_id`` is filled from the context::

    class ProjectFactory(TenantModelFactory):
        class Meta:
            model = Project

        name = factory.Sequence(lambda n: f"project {n}")

    with tenant_context("acme"):
        ProjectFactory.create_batch(5)  # five of acme's rows

Sub-factories and related objects are created in the same tenant (the same context, the same
session). Outside any tenant a factory refuses to create (:class:`~sqla_tenancy.TenantRequired`),
even when a default tenant is configured: rows made by a test should never land in the default
tenant by accident.

:class:`TenantFactory` provisions tenants (``TenantFactory(placement="schema")``) and deletes
them again with :meth:`TenantFactory.cleanup` (the pytest plugin's ``tenant_factory`` fixture calls
it after each test).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, ClassVar

import factory
from factory.alchemy import SQLAlchemyModelFactory

from ..context import current_platform_reason, current_tenant_ref
from ..errors import TenancyError, TenantRequired
from ..registry import Tenant
from ..session import TenantSession
from ..tenancy import Tenancy, active_tenancy

__all__ = ["TenantFactory", "TenantModelFactory", "bind_factories", "close_sessions"]

_bound: weakref.ref[Tenancy] | None = None
_sessions: weakref.WeakKeyDictionary[Tenancy, TenantSession] = weakref.WeakKeyDictionary()


def bind_factories(tenancy: Tenancy | None) -> None:
    """Make the factories use ``tenancy`` (default: the process's most recently created Tenancy,
    which an application with one Tenancy never needs to change)."""
    global _bound
    _bound = weakref.ref(tenancy) if tenancy is not None else None
    close_sessions()


def _tenancy() -> Tenancy:
    tenancy = _bound() if _bound is not None else active_tenancy()
    if tenancy is None:
        raise TenancyError(
            "The factories found no Tenancy: create the application's Tenancy first, or call "
            "sqla_tenancy.testing.factories.bind_factories(tenancy)."
        )
    return tenancy


def tenant_session() -> TenantSession:
    """The factories' session: one per Tenancy, serving whichever tenant is active. Refuses to
    hand it out outside a tenant (:class:`TenantRequired`)."""
    if current_tenant_ref() is None:
        where = "inside platform_context()" if current_platform_reason() is not None else "outside any tenant"
        raise TenantRequired(
            f"A TenantModelFactory was asked to create rows {where}. Wrap the call in "
            "`with tenant_context(<slug>):` (or use the pytest plugin's `tenant` fixture): "
            "factories write one tenant's rows, never the default tenant's by accident."
        )
    tenancy = _tenancy()
    session = _sessions.get(tenancy)
    if session is None:
        session = _sessions[tenancy] = tenancy.sessionmaker(expire_on_commit=False)()
    return session


def close_sessions() -> None:
    """Close the factories' sessions (after each test: objects must not outlive it)."""
    for session in list(_sessions.values()):
        session.close()
    _sessions.clear()


class TenantModelFactory(SQLAlchemyModelFactory):  # type: ignore[misc]
    """A ``SQLAlchemyModelFactory`` writing into the active tenant; each ``create()`` commits
    (in the pytest plugin's tests that releases a SAVEPOINT: the test still rolls back)."""

    class Meta:
        abstract = True
        sqlalchemy_session_factory = tenant_session
        sqlalchemy_session_persistence = "commit"


class TenantFactory(factory.Factory):  # type: ignore[misc]
    """Provisions a tenant: ``TenantFactory()`` (shared), ``TenantFactory(placement="schema")``,
    ``TenantFactory(slug="acme", placement="database")``. :meth:`cleanup` deletes every tenant
    it made. ``build()`` is refused: a tenant exists only once provisioned."""

    class Meta:
        model = Tenant

    slug = factory.Sequence(lambda n: f"factory_tenant_{n}")
    placement = "shared"
    name = None
    server = None

    _made: ClassVar[list[tuple[weakref.ref[Tenancy], str]]] = []

    @classmethod
    def _build(cls, model_class: Any, *args: Any, **kwargs: Any) -> Any:
        raise TenancyError("TenantFactory.build() cannot make a tenant: use TenantFactory() / create().")

    @classmethod
    def _create(cls, model_class: Any, *args: Any, **kwargs: Any) -> Tenant:
        tenancy = _tenancy()
        created = tenancy.create_tenant(
            kwargs["slug"], placement=kwargs["placement"], name=kwargs["name"], server=kwargs["server"]
        )
        cls._made.append((weakref.ref(tenancy), created.slug))
        return created

    @classmethod
    def cleanup(cls) -> None:
        """Delete every tenant this factory made (newest first), data and storage included."""
        while cls._made:
            ref, slug = cls._made.pop()
            tenancy = ref()
            if tenancy is None:
                continue
            with contextlib.suppress(TenancyError):  # deleted by the test already
                tenancy.delete_tenant(slug)
