"""``sqla-tenancy init``: a working migrations directory for a new project.

It writes ``alembic.ini``, ``<directory>/env.py`` (one call to :func:`alembic_ext.run_env`), the
revision template, and the two streams' root revisions (``branch_labels = ("infrastructure",)`` and
``("tenant",)``) in ``<directory>/infrastructure`` and ``<directory>/tenant``. Nothing is
overwritten: an existing file is an error.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path

from alembic.util import rev_id

from .errors import MigrationError
from .versions import INFRASTRUCTURE, STREAMS, TENANT

__all__ = ["check_app_spec", "init_project"]

_SPEC = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*")


def check_app_spec(spec: str) -> str:
    """``spec`` itself when it reads ``package.module:attribute``; else :class:`MigrationError`."""
    if not _SPEC.fullmatch(spec):
        raise MigrationError(f"--app {spec!r} is not module:attribute (e.g. --app myapp.db:tenancy).")
    return spec


_INI = """\
# Alembic configuration of a sqla-tenancy project: two streams in one script directory.
[alembic]
script_location = %(here)s/{directory}
# the project's own modules (the application's Tenancy, its models) import from this folder
prepend_sys_path = %(here)s
version_locations =
    %(here)s/{directory}/infrastructure
    %(here)s/{directory}/tenant
path_separator = newline
file_template = %%(year)d%%(month).2d%%(day).2d_%%(rev)s_%%(slug)s

[sqla_tenancy]
# the application's Tenancy, as module:attribute: read by env.py (alembic) and by sqla-tenancy's
# commands; --app or $SQLA_TENANCY_APP take precedence
app = {app}

[loggers]
keys = root,sqlalchemy,alembic,alembic_ext

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARNING
handlers = console
qualname =

[logger_sqlalchemy]
level = WARNING
handlers =
qualname = sqlalchemy.engine

[logger_alembic]
level = INFO
handlers =
qualname = alembic

[logger_alembic_ext]
level = INFO
handlers =
qualname = alembic_ext

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(levelname)-5.5s [%(name)s] %(message)s
datefmt = %H:%M:%S
"""

_ENV = '''\
"""Alembic environment of both migration streams (infrastructure and tenant): see
alembic_ext.run_env. `alembic upgrade head` upgrades the infrastructure, then every tenant;
`alembic -x stream=infrastructure|tenant -x tenant=<slug>[,<slug>] upgrade head` narrows a command
(-x goes before the command)."""

import logging
from logging.config import fileConfig

from alembic import context

from alembic_ext import run_env

# Logging as alembic.ini configures it, each location's upgrades reported (unless the program
# running Alembic configured logging itself).
if context.config.config_file_name is not None and not logging.getLogger().handlers:
    fileConfig(context.config.config_file_name, disable_existing_loggers=False)

# The application's Tenancy comes from the [sqla_tenancy] app option of alembic.ini
# ($SQLA_TENANCY_APP takes precedence).
run_env()
'''

_SCRIPT = '''\
"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
${imports if imports else ""}

# revision identifiers, used by Alembic.
revision: str = ${repr(up_revision)}
down_revision: Union[str, Sequence[str], None] = ${repr(down_revision)}
branch_labels: Union[str, Sequence[str], None] = ${repr(branch_labels)}
depends_on: Union[str, Sequence[str], None] = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
'''

_ROOT = '''\
"""{stream} stream: root

{purpose}

Revision ID: {revision}
Revises:
Create Date: {date}

"""
from typing import Sequence, Union

# revision identifiers, used by Alembic.
revision: str = {revision!r}
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = ({stream!r},)
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
'''

_PURPOSE = {
    INFRASTRUCTURE: "Runs once, on the main database: the tables of the infrastructure schemas. The\n"
    "sqla-tenancy registry (schema `tenancy`) is brought up to date before this stream runs.",
    TENANT: "Runs at every tenant location: the main database (shared and default tenants), each\n"
    "schema tenant's schema, each database tenant's database and each template database.",
}


def init_project(
    directory: str | os.PathLike[str] = "migrations",
    *,
    app: str | None = None,
    ini: str | os.PathLike[str] = "alembic.ini",
) -> list[Path]:
    """Create the migrations directory and ``alembic.ini``; return the files written.

    :param directory: the script directory, relative to ``ini``'s folder.
    :param app: ``module:attribute`` of the application's Tenancy, written into ``alembic.ini``
        (section ``[sqla_tenancy]``, option ``app``), where ``env.py`` and the ``sqla-tenancy``
        commands find it. Required.
    """
    ini_path = Path(ini)
    root = ini_path.parent / directory
    relative = Path(directory).as_posix()
    if not app:
        raise MigrationError(
            "Which application? Pass --app module:attribute naming your Tenancy "
            "(e.g. --app myapp.db:tenancy), or set SQLA_TENANCY_APP."
        )
    check_app_spec(app)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    files: dict[Path, str] = {
        ini_path: _INI.format(directory=relative, app=app),
        root / "env.py": _ENV,
        root / "script.py.mako": _SCRIPT,
    }
    for stream in STREAMS:
        revision = rev_id()
        files[root / stream / f"{revision}_{stream}_root.py"] = _ROOT.format(
            stream=stream, purpose=_PURPOSE[stream], revision=revision, date=date
        )
    existing = [str(p) for p in files if p.exists()]
    if existing:
        raise MigrationError(
            f"Not overwriting {', '.join(existing)}: remove them or choose another directory/ini."
        )
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return list(files)
