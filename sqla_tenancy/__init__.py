"""sqla-tenancy: multi-tenancy for SQLAlchemy on PostgreSQL, enforced by the database."""

from __future__ import annotations

from .context import current_tenant, no_tenant_context, platform_context, run_in_context, tenant_context
from .dialect import TenancyDialect, TenancyDialectAsync
from .errors import (
    AutocommitNotAllowed,
    ConfigurationError,
    ConnectionBudgetExceeded,
    CrossTenantAccess,
    DeletionError,
    ExportError,
    InvalidTenantSlug,
    ProvisioningError,
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
from .keys import tenant_foreign_key, tenant_unique, unique_across_tenants, unsafe_keys
from .models import TenantScoped, anonymous_readable, tenant_id_column
from .registry import Tenant
from .session import TenantSession
from .tenancy import Tenancy

__version__ = "0.1.0"

__all__ = [
    "AutocommitNotAllowed",
    "ConfigurationError",
    "ConnectionBudgetExceeded",
    "CrossTenantAccess",
    "DeletionError",
    "ExportError",
    "InvalidTenantSlug",
    "ProvisioningError",
    "Tenancy",
    "TenancyDialect",
    "TenancyDialectAsync",
    "TenancyError",
    "Tenant",
    "TenantNotFound",
    "TenantRefused",
    "TenantRequired",
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
