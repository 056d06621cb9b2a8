"""Placements: where a tenant's data lives and how a transaction is bound to it.

Each placement implements :class:`Placement` and owns everything placement-specific; the router
picks a tenant's placement by the registry row's ``strategy`` column (the stored name of the
placement).
"""

from __future__ import annotations

from .base import MigrationSite, Placement
from .database import DatabasePlacement
from .schema import SchemaPlacement
from .shared import SharedPlacement

__all__ = ["DatabasePlacement", "MigrationSite", "Placement", "SchemaPlacement", "SharedPlacement"]
