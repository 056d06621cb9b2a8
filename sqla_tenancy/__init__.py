"""sqla-tenancy: multi-tenancy for SQLAlchemy on PostgreSQL, enforced by the database."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .context import current_tenant, no_tenant_context, platform_context, run_in_context, tenant_context
    from .dialect import TenancyDialect, TenancyDialectAsync
    from .distribution import TenantNode
    from .doctor import Finding
    from .errors import (
        AutocommitNotAllowed,
        ConfigurationError,
        ConnectionBudgetExceeded,
        CrossTenantAccess,
        DeletionError,
        ExportError,
        HookFailed,
        InvalidTenantSlug,
        ProvisioningError,
        ScriptRefused,
        TenancyError,
        TenantNotFound,
        TenantRefused,
        TenantRequired,
        TenantSuspended,
        UnknownPlacement,
        UnsafeKeyError,
        UnsafeRoleError,
        UnsupportedOperation,
    )
    from .events import TenantEvent
    from .fleet import TenantResult, TenantRow
    from .keys import tenant_foreign_key, tenant_unique, unique_across_tenants, unsafe_keys
    from .models import TenantScoped, anonymous_readable, tenant_id_column
    from .registry import Tenant
    from .sandbox import StatementResult
    from .session import TenantSession
    from .tenancy import Tenancy

#: public name -> the module defining it. Imported on first use (PEP 562), so that importing a
#: submodule (the CLI, for one) does not load the whole library.
_LAZY = {
    "AutocommitNotAllowed": "errors",
    "ConfigurationError": "errors",
    "ConnectionBudgetExceeded": "errors",
    "CrossTenantAccess": "errors",
    "DeletionError": "errors",
    "ExportError": "errors",
    "Finding": "doctor",
    "HookFailed": "errors",
    "InvalidTenantSlug": "errors",
    "ProvisioningError": "errors",
    "ScriptRefused": "errors",
    "StatementResult": "sandbox",
    "Tenancy": "tenancy",
    "TenancyDialect": "dialect",
    "TenancyDialectAsync": "dialect",
    "TenancyError": "errors",
    "Tenant": "registry",
    "TenantEvent": "events",
    "TenantNode": "distribution",
    "TenantNotFound": "errors",
    "TenantRefused": "errors",
    "TenantRequired": "errors",
    "TenantResult": "fleet",
    "TenantRow": "fleet",
    "TenantScoped": "models",
    "TenantSession": "session",
    "TenantSuspended": "errors",
    "UnknownPlacement": "errors",
    "UnsafeKeyError": "errors",
    "UnsafeRoleError": "errors",
    "UnsupportedOperation": "errors",
    "anonymous_readable": "models",
    "current_tenant": "context",
    "no_tenant_context": "context",
    "platform_context": "context",
    "run_in_context": "context",
    "tenant_context": "context",
    "tenant_foreign_key": "keys",
    "tenant_id_column": "models",
    "tenant_unique": "keys",
    "unique_across_tenants": "keys",
    "unsafe_keys": "keys",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sqla_tenancy' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__version__ = "0.1.0"

__all__ = [
    "AutocommitNotAllowed",
    "ConfigurationError",
    "ConnectionBudgetExceeded",
    "CrossTenantAccess",
    "DeletionError",
    "ExportError",
    "Finding",
    "HookFailed",
    "InvalidTenantSlug",
    "ProvisioningError",
    "ScriptRefused",
    "StatementResult",
    "Tenancy",
    "TenancyDialect",
    "TenancyDialectAsync",
    "TenancyError",
    "Tenant",
    "TenantEvent",
    "TenantNode",
    "TenantNotFound",
    "TenantRefused",
    "TenantRequired",
    "TenantResult",
    "TenantRow",
    "TenantScoped",
    "TenantSession",
    "TenantSuspended",
    "UnknownPlacement",
    "UnsafeKeyError",
    "UnsafeRoleError",
    "UnsupportedOperation",
    "anonymous_readable",
    "current_tenant",
    "no_tenant_context",
    "platform_context",
    "run_in_context",
    "tenant_context",
    "tenant_foreign_key",
    "tenant_id_column",
    "tenant_unique",
    "unique_across_tenants",
    "unsafe_keys",
]
