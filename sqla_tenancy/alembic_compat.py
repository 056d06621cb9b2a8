"""The parts of Alembic that sqla-tenancy uses without Alembic documenting them, in one place.

Each is reached through a function here, with a test per symbol (``tests/test_alembic_compat.py``)
and the Alembic versions they are known to work with bounded in ``pyproject.toml``, so that an
Alembic release that changes one of them fails one test with a clear name, not a fleet run.

* :func:`upgrade_steps`, :func:`downgrade_steps`, :func:`stamp_steps`: what a location's version
  table would go through, as a migration ``fn`` returns it (``ScriptDirectory._upgrade_revs`` and
  its siblings, which ``alembic.command`` itself uses);
* :func:`version_directories`: the directories a script's revision files live in
  (``ScriptDirectory._version_locations``);
* :func:`running_environment`: the ``EnvironmentContext`` of the command being run
  (``alembic.context._proxy``), which ``env.py`` helpers need.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import alembic.context
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory

__all__ = [
    "KNOWN_ALEMBIC",
    "downgrade_steps",
    "running_environment",
    "stamp_steps",
    "upgrade_steps",
    "version_directories",
]

#: The Alembic versions these calls were checked against (kept in step with pyproject.toml).
KNOWN_ALEMBIC = ">=1.16,<1.21"


def upgrade_steps(script: ScriptDirectory, destination: str, current: Any) -> list[Any]:
    """The steps from ``current`` (what the version table holds) up to ``destination``."""
    return list(script._upgrade_revs(destination, current))


def downgrade_steps(script: ScriptDirectory, destination: str, current: Any) -> list[Any]:
    """The steps from ``current`` down to ``destination``."""
    return list(script._downgrade_revs(destination, current))


def stamp_steps(script: ScriptDirectory, destination: Sequence[str], current: Any) -> list[Any]:
    """The version-table changes that stamp ``destination`` over ``current``."""
    return list(script._stamp_revs(tuple(destination), current))


def version_directories(script: ScriptDirectory) -> list[str]:
    """The directories ``script``'s revision files are read from."""
    return [str(directory) for directory in script._version_locations]


def running_environment() -> EnvironmentContext | None:
    """The ``EnvironmentContext`` of the Alembic command being run (``None`` outside one)."""
    env = getattr(alembic.context, "_proxy", None)
    return env if isinstance(env, EnvironmentContext) else None
