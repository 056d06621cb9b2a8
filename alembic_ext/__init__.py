"""Alembic extension for sqla-tenancy: infrastructure and tenant migration streams.

Not implemented yet: the package exists so that the distribution's layout is stable.
"""

from __future__ import annotations

__all__: list[str] = []
