"""The exceptions sqla-tenancy raises: one vocabulary of domain errors, all derived from
:class:`TenancyError`. What an HTTP client is answered for each is decided at the edge, in one
table (:func:`sqla_tenancy.resolvers.http_answer`), not by the errors themselves."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AutocommitNotAllowed",
    "ConfigurationError",
    "ConnectionBudgetExceeded",
    "CrossTenantAccess",
    "ExportError",
    "HookFailed",
    "InvalidTenantSlug",
    "ProvisioningError",
    "ScriptRefused",
    "TenancyError",
    "TenantNotFound",
    "TenantRequired",
    "TenantSuspended",
    "UnknownPlacement",
    "UnsafeKeyError",
    "UnsafeRoleError",
    "UnsupportedOperation",
]


class TenancyError(Exception):
    """Base class of every error raised by sqla-tenancy."""


class TenantRequired(TenancyError):
    """A query needed a tenant, none was active and no default tenant is configured."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(
            message
            or "No tenant is active and no default tenant is configured. Wrap the work in "
            "`tenant_context(<slug>)`, use `platform_context(reason)` for cross-tenant work, or "
            "construct Tenancy with default_tenant='default'."
        )


class TenantNotFound(TenancyError, LookupError):
    """No tenant in the registry matches the given slug or id (or the reference is not a
    canonical one, which no tenant can match)."""

    def __init__(self, ref: object) -> None:
        self.ref = ref
        super().__init__(
            f"No tenant {ref!r} in the registry. Create it with `tenancy.create_tenant(...)` "
            "or check the slug/id the request carried."
        )


class TenantSuspended(TenancyError):
    """The tenant exists but is suspended: no query may run for it until it is resumed."""

    def __init__(self, slug: str) -> None:
        self.slug = slug
        super().__init__(f"Tenant {slug!r} is suspended; `tenancy.resume_tenant({slug!r})` lifts it.")


class TenantRefused(TenancyError):
    """The database refused to begin a transaction for a tenant that is no longer active
    (suspended, being deleted or deleted) although this process's registry cache still had it
    active: the cache catches up within ``registry_ttl`` at most, and the database does not wait."""


class InvalidTenantSlug(TenancyError, ValueError):
    """A slug does not match the allowed pattern, is too long, or is reserved."""


class ProvisioningError(TenancyError):
    """Creating, changing or deleting a tenant's storage failed; nothing was left half-made."""


class DeletionError(ProvisioningError):
    """Deleting a tenant stopped part way. The tenant stays registered as ``deleting`` (refused
    everywhere, its data not yet or not entirely removed) until ``delete_tenant`` is run again,
    which finishes the deletion."""


class UnknownPlacement(ProvisioningError, LookupError):
    """A placement name (``placement=``, or a registry row's) that this version does not know."""

    def __init__(self, name: str, known: Sequence[str], *, tenant: str | None = None) -> None:
        self.name = name
        who = (
            f"Tenant {tenant!r} uses an unknown placement {name!r}"
            if tenant
            else f"Unknown placement {name!r}"
        )
        super().__init__(f"{who}; the placements of this version are {', '.join(sorted(known))}.")


class ConfigurationError(TenancyError, ValueError):
    """sqla-tenancy (a Tenancy, a checkpoint, an integration) is configured in a way that cannot
    work; the message names the argument to change."""


class UnsupportedOperation(TenancyError):
    """An operation that does not apply to this tenant (the default tenant cannot be deleted, a
    shared tenant has no foreign schemas) or in this situation."""


class CrossTenantAccess(TenancyError):
    """An ORM object of one tenant was to be loaded or flushed for another tenant (or outside its
    context); the message names both."""


class ExportError(TenancyError):
    """Exporting a tenant failed (``pg_dump`` missing or failing, no location recorded)."""


class ConnectionBudgetExceeded(TenancyError):
    """Every connection of ``max_tenant_connections`` stayed in use for the whole wait."""


class UnsafeRoleError(TenancyError):
    """The application role could bypass row-level security (superuser or BYPASSRLS)."""


class UnsafeKeyError(TenancyError):
    """Tenant-scoped tables have keys that PostgreSQL checks across tenants (foreign keys without
    the tenant column, unique constraints without it): each finding says what to write instead.

    ``findings`` are :class:`sqla_tenancy.keys.UnsafeKey` objects.
    """

    def __init__(self, findings: Sequence[object]) -> None:
        self.findings = tuple(findings)
        listed = "\n".join(f"  - {finding}" for finding in self.findings)
        super().__init__(
            f"{len(self.findings)} key(s) of tenant-scoped tables are unsafe where tenants share "
            "tables: PostgreSQL checks keys, and runs ON DELETE / ON UPDATE, across tenants "
            "whatever row-level security says. Write each as its fix says (the helpers are in "
            "sqla_tenancy.keys):\n"
            f"{listed}\n"
            "Existing tables: see 'Keys in shared tables' in the documentation for the migration."
        )


class AutocommitNotAllowed(TenancyError):
    """An AUTOCOMMIT connection was asked to run statements for a tenant.

    In autocommit mode every statement is its own transaction, so a transaction-local tenant
    binding would not hold. Such connections are refused instead of running unbound.
    """


class HookFailed(TenancyError):
    """An ``after_*`` lifecycle callback raised (see :mod:`sqla_tenancy.events`). After
    ``create`` the tenant was deleted again; after any other operation the operation itself is
    done. The callback's exception is ``__cause__``."""


class ScriptRefused(TenancyError):
    """A tenant-scoped script (:meth:`Tenancy.run_sql`) tried to leave its sandbox (change its
    role, search path, tenant setting or timeout, or end its transaction); nothing it did was
    committed. The message names the statement."""
