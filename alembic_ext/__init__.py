"""Alembic extension for sqla-tenancy: an infrastructure stream run once on the main database and a
tenant stream run at every tenant location, a one-call ``env.py`` helper, autogenerate with RLS,
and a fleet runner (``sqla-tenancy migrate``) for parallel, resumable, reported upgrades.

See :mod:`alembic_ext.environment` and :mod:`alembic_ext.fleet`.
"""

from __future__ import annotations

from . import ops
from .environment import run_env
from .errors import MigrationError, MigrationLocked
from .fleet import FleetReport, load_app, migrate_fleet
from .locations import Location
from .project import init_project
from .runner import Outcome
from .versions import INFRASTRUCTURE, TENANT

__all__ = [
    "INFRASTRUCTURE",
    "TENANT",
    "FleetReport",
    "Location",
    "MigrationError",
    "MigrationLocked",
    "Outcome",
    "init_project",
    "load_app",
    "migrate_fleet",
    "ops",
    "run_env",
]
