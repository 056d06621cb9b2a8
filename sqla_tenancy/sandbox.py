"""Tenant-scoped SQL: a platform operator's script, run inside one tenant's sandbox.

:func:`run_sql` runs a multi-statement script as the tenant, in one transaction, under a
statement timeout, and commits it only if it is still in that sandbox at the end. Three layers,
of which only the first is the isolation boundary:

1. **The database.** The script's session logs in as a role that can reach the tenant's data and
   nothing else, whatever the script runs, dynamic SQL included:

   * a database tenant: its own login role, on its own database (the role can open no other
     database, and reaches the infrastructure only through its FDW role, which the main
     database binds to the tenant by its name);
   * a shared or schema tenant: a short-lived login role made for this run, named like a
     database tenant's FDW role (``<prefix>_fdw_<tenant id>``), so that the main database's
     ``tenancy.current_tenant_id()`` derives the tenant from the session's login identity and
     ignores ``app.current_tenant_id`` (which any session may set). It may write the shared
     tenant tables (a shared tenant) or inherits the tenant's schema role (a schema tenant), and
     the tenants' group's infrastructure privileges; it is a member of nothing else, so no
     ``SET ROLE`` or ``RESET ROLE`` leads anywhere. It is dropped when the run ends (the doctor
     reports one a crash left behind, and the next run for the tenant replaces it).

2. **A check of the session state before commit.** After the script, still in its transaction,
   the role, session user, ``search_path``, tenant setting and ``statement_timeout`` are compared
   with what the sandbox set; any change (made by dynamic SQL the text check cannot see) rolls
   everything back and raises :class:`~sqla_tenancy.ScriptRefused`.

3. **A check of the text, before anything runs**, for a clear error: ``SET`` (but ``SET
   CONSTRAINTS``), ``RESET``, ``set_config``, ``SET ROLE`` / ``SESSION AUTHORIZATION``, transaction
   control (``BEGIN``, ``COMMIT``, ``ROLLBACK`` but ``ROLLBACK TO SAVEPOINT``, ``PREPARE
   TRANSACTION``, ...), ``DISCARD``, ``ALTER ROLE`` and ``ALTER SYSTEM`` are refused, also inside
   string literals and function bodies (where ``EXECUTE`` could run them). It is bypassable by
   construction (``EXECUTE 'RE' || 'SET ROLE'``): layers 1 and 2 are what hold.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.pq import TransactionStatus
from sqlalchemy import text
from sqlalchemy.engine import URL

from . import locks
from .binding import binding_statement
from .errors import ScriptRefused, UnsupportedOperation
from .grants import keeper_call, keeper_of, tenants_group
from .identifiers import quote_ident, quote_literal
from .passwords import scram_verifier
from .placements.base import run_script
from .placements.database import DatabasePlacement
from .registry import Tenant, conninfo_kwargs
from .rls import TENANT_SETTING, fdw_role_name, qualified_name

if TYPE_CHECKING:
    from .services import Services

__all__ = ["StatementResult", "check_script", "run_sql", "sandbox_marker", "split_statements"]

#: The comment of a sandbox role (what lets a later run, or the doctor, recognise a leftover).
_MARKER = "sqla-tenancy run_sql sandbox of tenant "


def sandbox_marker(tenant_id: uuid.UUID) -> str:
    """The comment a shared or schema tenant's sandbox role carries."""
    return f"{_MARKER}{tenant_id}"


@dataclass(frozen=True)
class StatementResult:
    """What one statement of a script returned."""

    #: the command tag (``"UPDATE 3"``, ``"SELECT 2"``)
    status: str
    #: the rows' column names (empty for statements that return no rows)
    columns: tuple[str, ...]
    #: the rows (empty for statements that return none)
    rows: list[tuple[Any, ...]]
    #: rows affected or returned (-1 when PostgreSQL does not say)
    rowcount: int


# -- the text check ---------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<line>--[^\n]*)
  | (?P<block>/\*)
  | (?P<dollar>\$(?:[A-Za-z_][A-Za-z_0-9]*)?\$)
  | (?P<estring>[Ee]'(?:[^'\\]|\\.|'')*')
  | (?P<string>'(?:[^']|'')*')
  | (?P<ident>"(?:[^"]|"")*")
  | (?P<semi>;)
    """,
    re.VERBOSE | re.DOTALL,
)

#: statements refused by their first words (upper-cased, single-spaced)
_REFUSED_START = (
    ("SET", "changes a setting of the session: the sandbox sets role, path, tenant and timeout"),
    ("RESET", "resets a setting of the session to what the login role has"),
    ("DISCARD", "discards session state"),
    ("BEGIN", "transaction control: the script runs in one transaction the sandbox owns"),
    ("START", "transaction control: the script runs in one transaction the sandbox owns"),
    ("COMMIT", "transaction control: the sandbox commits once the script is checked"),
    ("END", "transaction control: the sandbox commits once the script is checked"),
    ("ABORT", "transaction control: the sandbox rolls back on failure itself"),
    ("ROLLBACK", "transaction control: the sandbox rolls back on failure itself"),
    ("PREPARE TRANSACTION", "transaction control"),
    ("ALTER ROLE", "changes a role"),
    ("ALTER USER", "changes a role"),
    ("ALTER SYSTEM", "changes the server's configuration"),
)
_ALLOWED_START = ("SET CONSTRAINTS", "ROLLBACK TO")

#: refused in a statement's code (outside literals)
_IN_CODE = (
    (re.compile(r"\bset_config\s*\(", re.I), "calls set_config()"),
    (re.compile(r"\bdblink\w*\s*\(", re.I), "opens another connection (dblink)"),
)

#: refused in string literals and function bodies (what EXECUTE or a DO block would run)
_REFUSED_ANYWHERE = (
    (re.compile(r"\bset_config\s*\(", re.I), "calls set_config()"),
    (re.compile(r"\bset\s+(?:local\s+|session\s+)?role\b", re.I), "changes the role (SET ROLE)"),
    (
        re.compile(r"\breset\s+(?:role|all|session|search_path)\b", re.I),
        "resets the session's role or settings",
    ),
    (re.compile(r"\bsession\s+authorization\b", re.I), "changes the session's user"),
    (re.compile(r"\bsearch_path\b", re.I), "touches search_path"),
    (re.compile(re.escape(TENANT_SETTING), re.I), f"touches the tenant setting {TENANT_SETTING}"),
    (re.compile(r"\bstatement_timeout\b", re.I), "touches statement_timeout"),
    (re.compile(r"\b(?:commit|rollback)\b(?!\s+to\b)", re.I), "ends the transaction (COMMIT / ROLLBACK)"),
    (re.compile(r"\bdblink\w*\s*\(", re.I), "opens another connection (dblink)"),
)


def split_statements(script: str) -> list[str]:
    """The script's statements, comments kept, split at the semicolons outside literals,
    identifiers, comments and dollar-quoted bodies (empty statements dropped)."""
    statements: list[str] = []
    start = pos = 0
    while True:
        match = _TOKEN.search(script, pos)
        if match is None:
            break
        kind = match.lastgroup
        if kind == "semi":
            statements.append(script[start : match.start()])
            start = pos = match.end()
        elif kind == "block":
            pos = _end_of_block_comment(script, match.end())
        elif kind == "dollar":
            end = script.find(match.group(), match.end())
            if end < 0:
                raise ScriptRefused(f"The script has an unterminated {match.group()} quote.")
            pos = end + len(match.group())
        else:
            pos = match.end()
    statements.append(script[start:])
    return [s for s in statements if _code(s).strip()]


def _end_of_block_comment(script: str, pos: int) -> int:
    depth = 1
    while depth:
        opening, closing = script.find("/*", pos), script.find("*/", pos)
        if closing < 0:
            raise ScriptRefused("The script has an unterminated /* comment.")
        if 0 <= opening < closing:
            depth, pos = depth + 1, opening + 2
        else:
            depth, pos = depth - 1, closing + 2
    return pos


def _code(statement: str) -> str:
    """The statement without its comments, with literals and quoted identifiers blanked."""
    return _parts(statement)[0]


def _parts(statement: str) -> tuple[str, str]:
    """The statement's code (comments dropped, literals, bodies and quoted identifiers blanked)
    and the text of its string literals and dollar-quoted bodies (what ``EXECUTE`` may run)."""
    code: list[str] = []
    literals: list[str] = []
    pos = 0
    while True:
        match = _TOKEN.search(statement, pos)
        if match is None:
            code.append(statement[pos:])
            return "".join(code), "\n".join(literals)
        code.append(statement[pos : match.start()])
        kind = match.lastgroup
        if kind == "block":
            pos = _end_of_block_comment(statement, match.end())
            code.append(" ")
        elif kind == "dollar":
            end = statement.find(match.group(), match.end())
            pos = len(statement) if end < 0 else end + len(match.group())
            literals.append(statement[match.end() : max(match.end(), end)])
            code.append(" '' ")
        elif kind in ("string", "estring"):
            pos = match.end()
            literals.append(match.group().replace("''", "'"))
            code.append(" '' ")
        elif kind == "ident":
            pos = match.end()
            code.append(' "" ')
        elif kind == "line":
            pos = match.end()
            code.append(" ")
        else:
            pos = match.end()
            code.append(match.group())


def check_script(script: str) -> list[str]:
    """The script's statements; :class:`~sqla_tenancy.ScriptRefused` naming the first that would
    leave the sandbox. A convenience for a clear error, not the boundary (see the module)."""
    if not isinstance(script, str):
        raise TypeError(f"run_sql() takes the script as a str, not {type(script).__name__}")
    statements = split_statements(script)
    if not statements:
        raise ScriptRefused("The script is empty.")
    for number, statement in enumerate(statements, 1):
        words = " ".join(_code(statement).upper().split())
        shown = " ".join(statement.split())[:80]
        if not words.startswith(_ALLOWED_START):
            for start, why in _REFUSED_START:
                if words == start or words.startswith(start + " ") or words.startswith(start + ";"):
                    raise ScriptRefused(
                        f"Statement {number} ({shown!r}) {why}; a tenant-scoped script cannot. "
                        "Remove it: run_sql() binds the tenant, and commits or rolls back itself."
                    )
        code, literals = _parts(statement)
        found = [why for pattern, why in _IN_CODE if pattern.search(code)]
        found += [why for pattern, why in _REFUSED_ANYWHERE if pattern.search(literals)]
        if found:
            raise ScriptRefused(
                f"Statement {number} ({shown!r}) {found[0]}, which would leave the tenant's sandbox; "
                "a tenant-scoped script cannot (the database refuses what this check misses)."
            )
    return statements


# -- running --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sandbox:
    url: URL
    binding: bytes


def run_sql(
    services: Services, tenant: Tenant, script: str, *, timeout: float = 30.0
) -> list[StatementResult]:
    """Run ``script`` in ``tenant``'s sandbox in one transaction (see the module); the results of
    its statements, in order. :class:`~sqla_tenancy.ScriptRefused` (nothing ran, or everything
    was rolled back) when it would leave the sandbox; the database's error, rolled back, when a
    statement fails; ``statement_timeout`` (``timeout`` seconds, for the whole script) cancels it."""
    if tenant.status != "active":
        raise UnsupportedOperation(
            f"Tenant {tenant.slug!r} is {tenant.status}: scripts run for active tenants only."
        )
    if not timeout > 0:
        raise ValueError("run_sql() needs a positive timeout (seconds)")
    check_script(script)
    placement = services.placement(tenant.strategy)
    # Serialised with the tenant's migrations and deletion (they take the same lock).
    with services.engines.admin.connect() as guard, locks.session_lock(guard, locks.tenant_key(tenant.slug)):
        if isinstance(placement, DatabasePlacement):
            sandbox = _Sandbox(placement.app_url(tenant), binding_statement(tenant.id))
            return _run(sandbox, tenant, script, timeout)
        with _sandbox_role(services, tenant) as sandbox:
            return _run(sandbox, tenant, script, timeout)


@contextmanager
def _sandbox_role(services: Services, tenant: Tenant) -> Iterator[_Sandbox]:
    """A login role for one run, bound to ``tenant`` by its name; dropped afterwards."""
    config = services.config
    role = fdw_role_name(tenant.id, config.name_prefix)
    r = quote_ident(role)
    password = secrets.token_urlsafe(32)
    with services.engines.admin.begin() as admin:
        _drop_leftover(admin, tenant, role)
        statements = [
            f"CREATE ROLE {r} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE INHERIT "
            f"CONNECTION LIMIT 1 PASSWORD {quote_literal(scram_verifier(password))}",
            f"COMMENT ON ROLE {r} IS {quote_literal(sandbox_marker(tenant.id))}",
            f"GRANT {quote_ident(tenants_group(config))} TO {r}",
        ]
        if tenant.strategy == "schema":
            schema = str(tenant.location["schema"])
            tenant_role = str(tenant.location["role"])
            keeper = keeper_of(admin, config, tenant_role)  # the role's creator grants it
            if keeper is not None:
                statements.append(keeper_call(keeper, "grant_inherit", tenant_role, role))
            else:
                statements.append(f"GRANT {quote_ident(tenant_role)} TO {r}")
            binding = binding_statement(tenant.id, schema=schema)
        else:
            existing = [
                t
                for t in config.tenant_tables()
                if admin.execute(text("select to_regclass(:t)"), {"t": qualified_name(t)}).scalar()
            ]
            for table in existing:
                statements.append(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {qualified_name(table)} TO {r}")
            for schema in sorted({t.schema or "public" for t in existing}):
                statements.append(
                    f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {quote_ident(schema)} TO {r}"
                )
            binding = binding_statement(tenant.id)
        run_script(admin, ";\n".join(statements))
    url = config.admin_url.set(username=role, password=password)
    try:
        yield _Sandbox(url, binding)
    finally:
        with services.engines.admin.begin() as admin:
            admin.exec_driver_sql(_drop(role))


def _drop_leftover(admin: Any, tenant: Tenant, role: str) -> None:
    """Drop a sandbox role a crashed run left (recognised by its comment); refuse anything else
    under that name."""
    row = admin.execute(
        text("select shobj_description(oid, 'pg_authid') from pg_roles where rolname = :r"), {"r": role}
    ).first()
    if row is None:
        return
    if row[0] != sandbox_marker(tenant.id):
        raise UnsupportedOperation(
            f"The role {role!r} exists and is not a run_sql sandbox of tenant {tenant.slug!r}: "
            "run_sql() neither adopts nor drops it. Find out what made it (sqla-tenancy doctor)."
        )
    admin.exec_driver_sql(_drop(role))


def _drop(role: str) -> str:
    """Drop a sandbox role and the privileges granted to it. ``DROP OWNED`` needs the
    privileges of the role (PostgreSQL 16+): the admin role, which created it, takes them first."""
    r = quote_ident(role)
    return f"GRANT {r} TO CURRENT_USER; DROP OWNED BY {r}; DROP ROLE {r}"


_STATE = (
    "select current_user::text, session_user::text, current_setting('search_path'), "
    f"current_setting('{TENANT_SETTING}', true), current_setting('statement_timeout')"
)


def _run(sandbox: _Sandbox, tenant: Tenant, script: str, timeout: float) -> list[StatementResult]:
    kwargs = conninfo_kwargs(sandbox.url)
    kwargs["application_name"] = f"sqla-tenancy run_sql {tenant.slug}"[:63]
    milliseconds = max(1, int(timeout * 1000))
    with psycopg.connect(**kwargs) as conn:
        with conn.cursor() as cursor:
            cursor.execute(
                f"SET LOCAL statement_timeout = {milliseconds}; "
                f"SET LOCAL idle_in_transaction_session_timeout = {milliseconds}; ".encode()
                + sandbox.binding
            )
            cursor.execute(_STATE.encode())
            expected = cursor.fetchone()
            results: list[StatementResult] = []
            try:
                cursor.execute(script.encode())
                while True:
                    description = cursor.description
                    results.append(
                        StatementResult(
                            status=cursor.statusmessage or "",
                            columns=tuple(c.name for c in description or ()),
                            rows=[tuple(r) for r in cursor.fetchall()] if description else [],
                            rowcount=cursor.rowcount,
                        )
                    )
                    if not cursor.nextset():
                        break
            except BaseException:
                conn.rollback()
                raise
            if conn.info.transaction_status != TransactionStatus.INTRANS:
                # only a COMMIT or ROLLBACK of its own gets here: the text check refuses those
                raise ScriptRefused(
                    f"The script for tenant {tenant.slug!r} ended its transaction itself; what it "
                    "ran before that was committed or rolled back by it, not by the sandbox."
                )
            cursor.execute(_STATE.encode())
            state = cursor.fetchone()
            if state != expected:
                conn.rollback()
                names = ("role", "session user", "search_path", TENANT_SETTING, "statement_timeout")
                changed = [
                    f"{name} {before!r} -> {after!r}"
                    for name, before, after in zip(names, expected or (), state or (), strict=True)
                    if before != after
                ]
                raise ScriptRefused(
                    f"The script for tenant {tenant.slug!r} changed its session ({'; '.join(changed)}), "
                    "leaving the sandbox: everything it did was rolled back."
                )
        conn.commit()
    return results
