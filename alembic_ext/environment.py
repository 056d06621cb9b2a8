"""The ``env.py`` helper: one call runs any Alembic command over both streams.

A project's ``env.py`` is::

    from alembic_ext import run_env
    from myapp.db import tenancy

    run_env(tenancy)

``alembic upgrade head`` then upgrades the infrastructure stream on the main database, refreshes
database tenants' foreign tables if the infrastructure changed, and upgrades every tenant location
(the main database's tenant tables, each template database, each schema and database tenant), one
transaction per location, stopping at the first failure. ``-x stream=infrastructure|tenant`` and
``-x tenant=<slug>[,<slug>...]`` narrow it; ``current``, ``downgrade`` and ``stamp`` work the same
way. ``revision --autogenerate`` compares each stream with the main database and writes one
revision per stream that changed, RLS included; ``alembic check`` covers both.

A ``Tenancy`` in ``config.attributes["tenancy"]`` wins over the argument, and an Engine or a
Connection in ``config.attributes["connection"]`` is used for the main database (so
pytest-alembic's fixtures work unchanged). For many tenants use the fleet runner
(``sqla-tenancy migrate``): parallel processes, continue-on-error, a report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from alembic import util as alembic_util
from alembic.operations import ops
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, text

from sqla_tenancy.alembic_compat import running_environment
from sqla_tenancy.distribution import check_distributable, citus_in, citus_kind
from sqla_tenancy.keys import check_tenant_keys
from sqla_tenancy.registry import REGISTRY_SCHEMA
from sqla_tenancy.rls import is_tenant_scoped, policy_names, qualified_name, tenant_column_name

from . import ops as tenancy_ops
from .errors import MigrationError
from .fleet import load_app
from .keys import order_key_operations
from .locations import tenant_locations
from .runner import Command, LocationRunner, _transaction, fleet_lock
from .versions import INFRASTRUCTURE, STREAMS, TENANT, VERSION_TABLES, has_stream

if TYPE_CHECKING:
    from sqla_tenancy.tenancy import Tenancy

__all__ = ["distribution_operations", "parse_selection", "run_env"]

log = logging.getLogger("alembic_ext")

_COMMANDS: dict[str, Command] = {"upgrade": "upgrade", "downgrade": "downgrade", "do_stamp": "stamp"}


def _environment() -> EnvironmentContext:
    env = running_environment()
    if env is None:
        raise MigrationError("run_env() is called from a project's env.py, while Alembic runs a command.")
    return env


def parse_selection(x: dict[str, str]) -> tuple[tuple[str, ...], list[str] | None]:
    """The streams and tenants named by ``-x stream=...`` and ``-x tenant=...``."""
    unknown = sorted(set(x) - {"stream", "tenant"})
    if unknown:
        raise MigrationError(
            f"Unknown -x option(s): {', '.join(unknown)}; use -x stream=... or -x tenant=...."
        )
    only = [t.strip() for t in x["tenant"].split(",") if t.strip()] if "tenant" in x else None
    if "stream" in x:
        stream = x["stream"].strip()
        if stream not in STREAMS:
            raise MigrationError(f"-x stream={stream!r}: use 'infrastructure' or 'tenant'.")
        if only is not None and stream != TENANT:
            raise MigrationError(
                "-x tenant=... selects tenant locations; it cannot go with -x stream=infrastructure."
            )
        return (stream,), only
    return ((TENANT,) if only is not None else STREAMS), only


def run_env(
    tenancy: Tenancy | Callable[[], Tenancy] | None = None,
    *,
    process_revision_directives: Callable[..., Any] | None = None,
    **configure_options: Any,
) -> None:
    """Run the current Alembic command over the infrastructure and tenant streams.

    :param tenancy: the application's :class:`~sqla_tenancy.Tenancy` (or a callable returning it);
        ``config.attributes["tenancy"]`` takes precedence. Default: the one named by
        ``$SQLA_TENANCY_APP`` or by the ``app`` option of alembic.ini's ``[sqla_tenancy]``
        section (see :func:`alembic_ext.load_app`).
    :param process_revision_directives: chained after the extension's own hook (autogenerate).
    :param configure_options: passed to ``EnvironmentContext.configure`` for every location
        (e.g. ``compare_type=False``); the extension sets the connection, version tables,
        ``target_metadata`` and transaction handling itself.
    """
    env = _environment()
    config = env.config
    given = config.attributes.get("tenancy", tenancy)
    if given is None:
        given = load_app(config=config)
    resolved: Tenancy = given() if callable(given) and not hasattr(given, "metadata") else given
    if resolved.migrations is None:
        resolved.migrations = config  # tenants created during the run are born at head
    streams, only = parse_selection(env.get_x_argument(as_dictionary=True))
    if env.is_offline_mode():
        _run_offline(env, resolved, streams, configure_options)
        return
    with _main_connection(config.attributes.get("connection"), resolved) as main:
        if "revision_context" in env.context_opts:
            _autogenerate(env, resolved, main, streams, process_revision_directives, configure_options)
            return
        outer = env.context_opts.get("fn")
        command = _COMMANDS.get(getattr(outer, "__name__", ""), "display")
        runner = LocationRunner(
            resolved,
            env,
            command=command,
            destination=env.context_opts.get("destination_rev"),
            display_fn=outer,
            configure_options=configure_options,
        )
        try:
            with resolved.admin_engine.connect() as control:
                if command == "display":
                    _run(runner, main, control, streams, only)
                else:
                    with fleet_lock(control, wait=True):
                        _run(runner, main, control, streams, only)
        finally:
            runner.dispose()


def _run(
    runner: LocationRunner,
    main: Connection,
    control: Connection,
    streams: Sequence[str],
    only: list[str] | None,
) -> None:
    tenancy = runner.tenancy
    say = runner.env.config.print_stdout if runner.command == "display" else None
    if INFRASTRUCTURE in streams:
        if say:
            say("infrastructure stream, main database:")
        outcome = runner.run_infrastructure(main)
        _log(outcome.location, outcome.before, outcome.after, outcome.seconds)
        if runner.command != "display" and outcome.status == "upgraded":
            if main.in_transaction():
                # the caller's transaction (a Connection handed over in config.attributes): the
                # upgrade is not committed yet, and the refresh's own connections would wait for
                # it (the registry table is locked) forever
                log.warning(
                    "the infrastructure stream ran inside the caller's transaction: after it "
                    "commits, call tenancy.refresh_foreign_schemas() so that database tenants' "
                    "foreign tables see the changes"
                )
            else:
                refreshed = tenancy.refresh_foreign_schemas()
                if refreshed:
                    log.info("refreshed the foreign tables of %d database tenant(s)", len(refreshed))
    if TENANT in streams:
        if (
            runner.command == "display"
            and main.execute(text("select to_regclass(:t)"), {"t": f"{REGISTRY_SCHEMA}.tenants"}).scalar()
            is None
        ):
            if say:
                say(
                    "tenant stream: not installed yet (the first `alembic upgrade head` creates the registry)"
                )
            return
        for location in tenant_locations(tenancy, only=only):
            if say:
                say(f"tenant stream, {location.describe()}:")
            outcome = runner.run_tenant(main, location, control)
            _log(location.describe(), outcome.before, outcome.after, outcome.seconds)


def _log(where: str, before: str | None, after: str | None, seconds: float) -> None:
    if before != after:
        log.info("%s: %s -> %s (%.0f ms)", where, before or "base", after or "base", seconds * 1000)


@contextmanager
def _main_connection(given: object, tenancy: Tenancy) -> Iterator[Connection]:
    if isinstance(given, Connection):
        yield given
    elif isinstance(given, Engine):
        with given.connect() as conn:
            yield conn
    elif given is None:
        with tenancy.admin_engine.connect() as conn:
            yield conn
    else:
        raise MigrationError(
            f"config.attributes['connection'] must be an Engine or a Connection, not {type(given).__name__}."
        )


def _run_offline(
    env: EnvironmentContext, tenancy: Tenancy, streams: Sequence[str], options: dict[str, Any]
) -> None:
    if streams != (INFRASTRUCTURE,):
        raise MigrationError(
            "Offline (--sql) mode writes the infrastructure stream only (-x stream=infrastructure): "
            "tenant locations each have their own version table; migrate them online."
        )
    outer = env.context_opts.get("fn")
    command = _COMMANDS.get(getattr(outer, "__name__", ""), "display")
    runner = LocationRunner(
        tenancy, env, command=command, destination=env.context_opts.get("destination_rev"), display_fn=outer
    )
    env.configure(
        url=tenancy.admin_url,
        literal_binds=True,
        version_table=VERSION_TABLES[INFRASTRUCTURE],
        version_table_schema=REGISTRY_SCHEMA,
        fn=runner.stream_fn(INFRASTRUCTURE),
        **options,
    )
    with env.begin_transaction():
        env.run_migrations()


# -- autogenerate -------------------------------------------------------------------------------


def _current_heads(main: Connection, stream: str) -> tuple[str, ...]:
    context = MigrationContext.configure(
        main, opts={"version_table": VERSION_TABLES[stream], "version_table_schema": REGISTRY_SCHEMA}
    )
    return context.get_current_heads()


def _autogenerate(
    env: EnvironmentContext,
    tenancy: Tenancy,
    main: Connection,
    streams: Sequence[str],
    user_hook: Callable[..., Any] | None,
    options: dict[str, Any],
) -> None:
    # Refused, not warned: a revision would put the unsafe keys into every tenant location, and
    # `alembic check` (which runs this too) must fail in CI. Fix the models, then autogenerate.
    check_tenant_keys(tenancy.metadata, infrastructure_schemas=tenancy.infrastructure_schemas)
    script = env.script
    missing = [s for s in streams if not has_stream(script, s)]
    if missing:
        raise MigrationError(
            f"The script directory has no {' or '.join(missing)} branch: each stream starts from a "
            "root revision with branch_labels = ('infrastructure',) / ('tenant',) "
            "(`sqla-tenancy init` creates both)."
        )
    outer = env.context_opts["fn"]
    with _transaction(main):  # where Alembic creates the version tables
        main.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {REGISTRY_SCHEMA}")
    # Autogenerate refuses to run unless the database is at every head of the script directory;
    # a location holds only its stream's heads, so give it both streams'.
    current = _current_heads(main, INFRASTRUCTURE) + _current_heads(main, TENANT)
    for index, stream in enumerate(streams):
        # infrastructure: the declared schemas; tenant: the default schema only
        wanted: set[str | None] = (
            set(tenancy.infrastructure_schemas) if stream == INFRASTRUCTURE else {None, "public"}
        )

        def include_name(name: str | None, type_: str, parent: Any, wanted: set[str | None] = wanted) -> bool:
            return name in wanted if type_ == "schema" else True

        def include_object(
            obj: Any,
            name: str | None,
            type_: str,
            reflected: bool,
            compare_to: Any,
            wanted: set[str | None] = wanted,
        ) -> bool:
            return obj.schema in wanted if type_ == "table" else True

        infra = stream == INFRASTRUCTURE

        hook = _Hook(tenancy, stream, streams, last=index == len(streams) - 1, user_hook=user_hook)
        env.configure(
            connection=main,
            target_metadata=tenancy.metadata,
            version_table=VERSION_TABLES[stream],
            version_table_schema=REGISTRY_SCHEMA,
            include_schemas=infra,
            include_name=include_name,
            include_object=include_object,
            process_revision_directives=hook,
            fn=lambda rev, context: outer(current, context),
            **options,
        )
        with env.begin_transaction():
            env.run_migrations()


class _Hook:
    """``process_revision_directives`` for one stream: orders key operations so that PostgreSQL
    accepts them (:mod:`alembic_ext.keys`), adds the RLS operations autogenerate cannot see and,
    on Citus, the tables' distribution, then (after the last stream) splits the single generated
    script into one per stream."""

    def __init__(
        self,
        tenancy: Tenancy,
        stream: str,
        streams: Sequence[str],
        *,
        last: bool,
        user_hook: Callable[..., Any] | None,
    ) -> None:
        self.tenancy, self.stream, self.streams, self.last, self.user_hook = (
            tenancy,
            stream,
            streams,
            last,
            user_hook,
        )

    def __call__(
        self, context: MigrationContext, revision: Any, directives: list[ops.MigrationScript]
    ) -> None:
        script = directives[-1]
        upgrade, downgrade = script.upgrade_ops_list[-1], script.downgrade_ops_list[-1]
        if order_key_operations(upgrade):  # new unique keys before the foreign keys needing them
            downgrade.ops[:] = upgrade.reverse().ops  # as Alembic derives it
        assert context.connection is not None
        added = rls_operations(context.connection, self.tenancy, self.stream)
        upgrade.ops.extend(added)
        downgrade.ops[:0] = [op.reverse() for op in reversed(added)]
        distribution = distribution_operations(context.connection, self.tenancy, self.stream)
        upgrade.ops.extend(distribution)
        # a table this revision creates is dropped by its downgrade: no undistribution first
        created = {(o.schema, o.table_name) for o in upgrade.ops if isinstance(o, ops.CreateTableOp)}
        downgrade.ops[:0] = [
            op.reverse() for op in reversed(distribution) if (op.schema, op.table_name) not in created
        ]
        if self.last:
            _split(context, directives, self.streams)
        if self.user_hook is not None:
            self.user_hook(context, revision, directives)


def _split(context: MigrationContext, directives: list[ops.MigrationScript], streams: Sequence[str]) -> None:
    base = directives[0]
    pieces = [
        (stream, up, down)
        for stream, up, down in zip(streams, base.upgrade_ops_list, base.downgrade_ops_list, strict=False)
        if not up.is_empty()
    ]
    if not pieces:  # nothing changed: an empty revision, in the tenant stream unless narrowed
        stream = TENANT if TENANT in streams else streams[0]
        pieces = [(stream, ops.UpgradeOps([]), ops.DowngradeOps([]))]
    scripts = []
    for index, (stream, up, down) in enumerate(pieces):
        up.upgrade_token, down.downgrade_token = "upgrades", "downgrades"
        scripts.append(
            ops.MigrationScript(
                base.rev_id if index == 0 else alembic_util.rev_id(),
                up,
                down,
                message=base.message,
                imports=set(base.imports),
                head=f"{stream}@head",
                splice=False,
            )
        )
    # `alembic check` reads only the last script: it also carries the other streams' operations,
    # under tokens the script template does not render, so that every stream's drift is seen.
    last = scripts[-1]
    for stream, up, down in pieces[:-1]:
        last.upgrade_ops_list.append(ops.UpgradeOps(list(up.ops), upgrade_token=f"tenancy_{stream}_upgrades"))
        last.downgrade_ops_list.append(
            ops.DowngradeOps(list(down.ops), downgrade_token=f"tenancy_{stream}_downgrades")
        )
    directives[:] = scripts


def rls_operations(conn: Connection, tenancy: Tenancy, stream: str) -> list[ops.MigrateOperation]:
    """Operations bringing the database's row-level security in line with the models: enable it
    (with the tenant policies) where a tenant-scoped table lacks any of it, disable it where a
    table that is no longer tenant-scoped still has the tenant policies."""
    tables = tenancy.infrastructure_tables() if stream == INFRASTRUCTURE else tenancy.tenant_tables()
    if not tables:
        return []
    default = conn.execute(text("select current_schema()")).scalar()
    rows = conn.execute(
        text(
            "select n.nspname, c.relname, c.relrowsecurity, c.relforcerowsecurity, "
            "array(select polname::text from pg_policy p where p.polrelid = c.oid) "
            "from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "where c.relkind in ('r', 'p') and n.nspname = any(:schemas)"
        ),
        {"schemas": sorted({str(t.schema or default) for t in tables})},
    ).all()
    state = {(r[0], r[1]): (r[2], r[3], set(r[4])) for r in rows}
    result: list[ops.MigrateOperation] = []
    for table in tables:
        expected = set(policy_names(table).values())
        found = state.get((table.schema or default, table.name))
        column = tenant_column_name(table)
        if column is not None and is_tenant_scoped(table):
            if found is None or not found[0] or not found[1] or not expected <= found[2]:
                result.append(
                    tenancy_ops.EnableTenantRLSOp(table.name, tenant_column=column, schema=table.schema)
                )
        elif found is not None and expected & found[2]:
            result.append(tenancy_ops.DisableTenantRLSOp(table.name, schema=table.schema))
    return result


def distribution_operations(
    conn: Connection, tenancy: Tenancy, stream: str
) -> list[tenancy_ops.MakeReferenceTableOp | tenancy_ops.DistributeTenantTableOp]:
    """On a distributed Tenancy (Citus), the operations that make every table of ``stream``
    what Citus should make of it: a table with a tenant column distributed by it (colocated with
    the others), a table without one a reference table. Tables Citus distributes or replicates
    already need nothing; new tables (not in the database yet) get theirs after their
    ``create_table``. Reference tables come first: distributed tables may reference them."""
    if not tenancy.config.distributed:
        return []
    tables = tenancy.infrastructure_tables() if stream == INFRASTRUCTURE else tenancy.tenant_tables()
    check_distributable(tables)
    has_citus = citus_in(conn)
    references: list[tenancy_ops.MakeReferenceTableOp] = []
    distributed: list[tenancy_ops.DistributeTenantTableOp] = []
    for table in tables:
        exists = conn.execute(text("select to_regclass(:t)"), {"t": qualified_name(table)}).scalar()
        kind = citus_kind(conn, qualified_name(table)) if exists is not None and has_citus else None
        if kind in ("distributed", "reference"):
            continue
        column = tenant_column_name(table)
        if column is None:
            references.append(tenancy_ops.MakeReferenceTableOp(table.name, schema=table.schema))
        else:
            distributed.append(
                tenancy_ops.DistributeTenantTableOp(table.name, schema=table.schema, tenant_column=column)
            )
    return [*references, *distributed]
