"""Exceptions of the Alembic extension."""

from __future__ import annotations

from sqla_tenancy.errors import TenancyError

__all__ = ["MigrationError", "MigrationLocked"]


class MigrationError(TenancyError):
    """A migration run could not do what was asked (bad arguments, a failed location, ...)."""


class MigrationLocked(MigrationError):
    """Another migration run holds the fleet lock."""
