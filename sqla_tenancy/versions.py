"""The two migration streams, their version tables, and how a revision is written down.

A project's migrations are one Alembic script directory with two independent branches, labelled
``infrastructure`` and ``tenant``. Each *location* (the main database for the infrastructure; the
main database, every schema tenant's schema, every database tenant's database and every template
database for the tenant stream) keeps its own version table, and the registry keeps a copy of each
tenant's tenant-stream revision in ``tenancy.tenants.revision``.

This is the core's part of the migration machinery: tenants created from the models are stamped
with the tenant stream's heads, so the core needs the streams and their version tables, but never
the Alembic extension (:mod:`alembic_ext`, which builds on this module).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

from .alembic_compat import version_directories
from .identifiers import quote_ident, quote_literal

__all__ = [
    "INFRASTRUCTURE",
    "STREAMS",
    "TENANT",
    "VERSION_TABLES",
    "format_revision",
    "has_stream",
    "load_config",
    "config_stream_heads",
    "stream_heads",
    "version_table_script",
]

INFRASTRUCTURE = "infrastructure"
TENANT = "tenant"
#: In the order a full upgrade runs them.
STREAMS = (INFRASTRUCTURE, TENANT)
#: Version table of each stream (in schema ``tenancy``, or in a schema tenant's own schema).
VERSION_TABLES = {INFRASTRUCTURE: "alembic_infrastructure", TENANT: "alembic_tenant"}


def format_revision(heads: Iterable[str]) -> str | None:
    """The registry's form of a location's heads: sorted and comma-separated (None: at base)."""
    ordered = sorted(heads)
    return ",".join(ordered) if ordered else None


def load_config(config: str | os.PathLike[str] | Config) -> Config:
    """An Alembic ``Config`` from a path to ``alembic.ini`` (or the Config itself)."""
    if isinstance(config, Config):
        return config
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(
            f"No Alembic configuration at {str(path)!r}: pass the path of the project's alembic.ini "
            "(`sqla-tenancy init` creates one)."
        )
    return Config(str(path))


@lru_cache(maxsize=32)
def _heads(options: tuple[tuple[str, str], ...], stream: str, stamp: tuple[float, ...]) -> tuple[str, ...]:
    config = Config()
    for key, value in options:
        config.set_main_option(key, value.replace("%", "%%"))
    return stream_heads(ScriptDirectory.from_config(config), stream)


def stream_heads(script: ScriptDirectory, stream: str) -> tuple[str, ...]:
    """The head revisions of one stream (its branch label) in ``script``; empty if it has none."""
    if stream not in STREAMS:
        raise ValueError(f"Unknown migration stream {stream!r}; use one of {', '.join(STREAMS)}.")
    if not has_stream(script, stream):
        return ()
    return tuple(sorted(rev.revision for rev in script.get_revisions(f"{stream}@head") if rev is not None))


def has_stream(script: ScriptDirectory, stream: str) -> bool:
    """True when a revision of ``script`` carries the stream's branch label."""
    return any(stream in (rev.branch_labels or ()) for rev in script.walk_revisions())


def config_stream_heads(config: Config, stream: str) -> tuple[str, ...]:
    """:func:`stream_heads` for a Config, cached until a file is added to or removed from one of
    its version directories (so provisioning does not re-read every revision file)."""
    if not config.get_main_option("script_location"):
        raise ValueError("The Alembic configuration has no script_location.")
    script = ScriptDirectory.from_config(config)
    stamp = tuple(os.stat(d).st_mtime for d in version_directories(script) if os.path.isdir(d))
    keys = ("script_location", "version_locations", "path_separator")
    options = tuple((k, v) for k in keys if (v := config.get_main_option(k)) is not None)
    return _heads(options, stream, stamp)


def version_table_script(schema: str, stream: str, heads: Iterable[str]) -> str:
    """DDL creating ``stream``'s version table in ``schema`` and stamping ``heads`` in it: what a
    location created from the models (not by replaying migrations) is born with."""
    table = f"{quote_ident(schema)}.{quote_ident(VERSION_TABLES[stream])}"
    constraint = quote_ident(f"{VERSION_TABLES[stream]}_pkc")
    statements = [
        f"CREATE TABLE IF NOT EXISTS {table} (version_num VARCHAR(32) NOT NULL, "
        f"CONSTRAINT {constraint} PRIMARY KEY (version_num))",
        f"DELETE FROM {table}",
    ]
    statements += [f"INSERT INTO {table} (version_num) VALUES ({quote_literal(head)})" for head in heads]
    return ";\n".join(statements)
