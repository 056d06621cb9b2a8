"""Placement strategies: where a tenant's data lives and how a transaction is bound to it.

Each placement implements :class:`Strategy`; :class:`Tenancy` picks the strategy by the
tenant's ``strategy`` column.
"""

from __future__ import annotations

from .base import Placement, Strategy
from .database import DatabaseStrategy
from .schema import SchemaStrategy
from .shared import SharedStrategy

__all__ = ["DatabaseStrategy", "Placement", "SchemaStrategy", "SharedStrategy", "Strategy"]
