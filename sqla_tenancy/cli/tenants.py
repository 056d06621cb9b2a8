"""``sqla-tenancy tenants ...``: the tenant registry from the command line (move and pool too).

Each command maps onto one public function (``Tenancy.list_tenants``, ``get_tenant``,
``create_tenant``, ``update_tenant``, ``suspend_tenant``, ``resume_tenant``, ``delete_tenant``,
``export_tenant``, :func:`sqla_tenancy.checkpoint.rotate_access_key`), so the command line does
what the API does and nothing else. ``--json`` prints what scripts read; a terminal gets a table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._app import AppOption, ConfigOption, JsonOption, YesOption, app
from ._project import (
    TENANT_COLUMNS,
    confirm,
    fail,
    load_tenancy,
    operation,
    print_json,
    print_table,
    tenant_record,
    tenant_rows,
)

tenants = typer.Typer(
    name="tenants",
    help="List, create, change and delete tenants.",
    no_args_is_help=True,
)
app.add_typer(tenants)

SlugArgument = Annotated[str, typer.Argument(help="The tenant's slug (or id).", show_default=False)]
_PLACEMENTS = ("shared", "schema", "database")


def _show(tenant: object, as_json: bool, verb: str | None = None) -> None:
    from ..registry import Tenant

    assert isinstance(tenant, Tenant)
    if as_json:
        print_json(tenant_record(tenant))
        return
    if verb:
        typer.echo(f"{verb} tenant {tenant.slug!r} ({tenant.placement}, {tenant.status})")
        return
    record = tenant_record(tenant)
    location = record.pop("location")
    print_table(
        None, ("field", "value"), [*record.items(), *(("location." + k, v) for k, v in location.items())]
    )


@tenants.command("list")
def list_(
    app_spec: AppOption = None,
    config: ConfigOption = Path("alembic.ini"),
    behind: Annotated[
        bool, typer.Option("--behind", help="Only tenants not at the tenant stream's head.")
    ] = False,
    placement: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Only tenants of this placement: shared, schema or database."),
    ] = None,
    status: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Only tenants with this status (active, suspended, provisioning, deleting)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Every tenant, oldest first (the default tenant included)."""
    if placement is not None and placement not in _PLACEMENTS:
        fail(f"--placement must be one of {', '.join(_PLACEMENTS)}, not {placement!r}.", 2)
    tenancy = load_tenancy(app_spec, config)
    with operation(tenancy):
        heads = None
        if behind:
            heads = tenancy.tenant_heads()
            if heads is None:
                fail(
                    "--behind needs the project's migrations: run it next to alembic.ini (or pass "
                    "--config), or give the Tenancy migrations='alembic.ini'.",
                    2,
                )
        found = [
            t
            for t in tenancy.list_tenants()
            if (placement is None or t.placement == placement)
            and (status is None or t.status == status)
            and (heads is None or t.revision not in heads)
        ]
        if as_json:
            print_json([tenant_record(t, heads) for t in found])
            return
        title = f"tenants behind {', '.join(heads)}" if heads else None
        print_table(title, TENANT_COLUMNS, tenant_rows(found), empty="no tenant matches.")


@tenants.command()
def show(
    slug: SlugArgument,
    app_spec: AppOption = None,
    config: ConfigOption = Path("alembic.ini"),
    as_json: JsonOption = False,
) -> None:
    """One tenant: its id, placement, status, revision and location (on Citus, its node)."""
    tenancy = load_tenancy(app_spec, config)
    with operation(tenancy):
        tenant = tenancy.get_tenant(slug)
        if not (tenancy.config.distributed and tenant.placement == "shared"):
            _show(tenant, as_json)
            return
        node = tenancy.tenant_node(tenant)
        record = tenant_record(tenant)
        record["node"] = {
            "address": node.address,
            "node_id": node.node_id,
            "shard_id": node.shard_id,
            "isolated": node.isolated,
        }
        if as_json:
            print_json(record)
            return
        location, where = record.pop("location"), record.pop("node")
        print_table(
            None,
            ("field", "value"),
            [
                *record.items(),
                *(("location." + k, v) for k, v in location.items()),
                *(("node." + k, v) for k, v in where.items()),
            ],
        )


@tenants.command()
def create(
    slug: Annotated[
        str, typer.Argument(help="The new tenant's slug: permanent, lower case.", show_default=False)
    ],
    placement: Annotated[
        str, typer.Option(help="shared (rows in the main tables), schema or database.")
    ] = "shared",
    name: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Display name (default: the slug)."),
    ] = None,
    server: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="For --to database: one of the Tenancy's servers (default: main)."),
    ] = None,
    app_spec: AppOption = None,
    config: ConfigOption = Path("alembic.ini"),
    as_json: JsonOption = False,
) -> None:
    """Register and provision a tenant (Tenancy.create_tenant)."""
    if placement not in _PLACEMENTS:
        fail(f"--placement must be one of {', '.join(_PLACEMENTS)}, not {placement!r}.", 2)
    tenancy = load_tenancy(app_spec, config)
    with operation(tenancy):
        _show(tenancy.create_tenant(slug, placement=placement, name=name, server=server), as_json, "created")


@tenants.command()
def update(
    slug: SlugArgument,
    name: Annotated[
        str, typer.Option(help="The new display name (slugs are permanent).", show_default=False)
    ],
    app_spec: AppOption = None,
    config: ConfigOption = Path("alembic.ini"),
    as_json: JsonOption = False,
) -> None:
    """Change a tenant's display name."""
    tenancy = load_tenancy(app_spec, config)
    with operation(tenancy):
        _show(tenancy.update_tenant(slug, name=name), as_json, "updated")


@tenants.command()
def suspend(
    slug: SlugArgument,
    app_spec: AppOption = None,
    config: ConfigOption = Path("alembic.ini"),
    as_json: JsonOption = False,
) -> None:
    """Refuse every query for the tenant, in every process, until it is resumed."""
    tenancy = load_tenancy(app_spec, config)
    with operation(tenancy):
        _show(tenancy.suspend_tenant(slug), as_json, "suspended")


@tenants.command()
def resume(
    slug: SlugArgument,
    app_spec: AppOption = None,
    config: ConfigOption = Path("alembic.ini"),
    as_json: JsonOption = False,
) -> None:
    """Serve a suspended tenant again."""
    tenancy = load_tenancy(app_spec, config)
    with operation(tenancy):
        _show(tenancy.resume_tenant(slug), as_json, "resumed")


@tenants.command()
def delete(
    slug: SlugArgument,
    keep_infrastructure_rows: Annotated[
        bool,
        typer.Option("--keep-infrastructure-rows", help="Keep the tenant's rows in infrastructure tables."),
    ] = False,
    yes: YesOption = False,
    app_spec: AppOption = None,
    config: ConfigOption = Path("alembic.ini"),
    as_json: JsonOption = False,
) -> None:
    """Delete the tenant's data, storage, roles and registry row. Asks first (--yes skips)."""
    tenancy = load_tenancy(app_spec, config)
    with operation(tenancy):
        tenant = tenancy.get_tenant(slug)
        confirm(
            f"Delete tenant {tenant.slug!r} ({tenant.placement}) and all of its data?",
            yes=yes,
        )
        tenancy.delete_tenant(tenant.slug, keep_infrastructure_rows=keep_infrastructure_rows)
        if as_json:
            print_json({"deleted": tenant_record(tenant)})
        else:
            typer.echo(f"deleted tenant {tenant.slug!r}")


@tenants.command()
def export(
    slug: SlugArgument,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The SQL file to write.", show_default=False)
    ],
    pg_dump: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="The pg_dump binary (default: the server's version, found on this machine)."),
    ] = None,
    app_spec: AppOption = None,
    config: ConfigOption = Path("alembic.ini"),
    as_json: JsonOption = False,
) -> None:
    """Write one tenant's data as a SQL script that restores into an empty database with psql."""
    tenancy = load_tenancy(app_spec, config)
    with operation(tenancy):
        path = tenancy.export_tenant(slug, output, pg_dump=pg_dump)
        if as_json:
            print_json({"tenant": slug, "path": str(path), "bytes": path.stat().st_size})
        else:
            typer.echo(f"exported tenant {slug!r} to {path} ({path.stat().st_size} bytes)")


@tenants.command("rotate-key")
def rotate_key(
    slug: SlugArgument,
    yes: YesOption = False,
    app_spec: AppOption = None,
    config: ConfigOption = Path("alembic.ini"),
    as_json: JsonOption = False,
) -> None:
    """Give the tenant a new access key and print it (the only time it is shown); the old key
    stops working at once. Asks first (--yes skips)."""
    from ..checkpoint import rotate_access_key

    tenancy = load_tenancy(app_spec, config)
    with operation(tenancy):
        tenant = tenancy.get_tenant(slug)
        confirm(f"Replace the access key of tenant {tenant.slug!r}? The current key stops working.", yes=yes)
        key = rotate_access_key(tenancy, tenant)
        if as_json:
            print_json({"tenant": tenant.slug, "access_key": str(key)})
        else:
            typer.echo(f"new access key of tenant {tenant.slug!r} (shown once): {key}")


@tenants.command()
def move(
    slug: SlugArgument,
    placement: Annotated[
        str,
        typer.Option(
            "--to", help="The placement to move to: shared, schema or database.", show_default=False
        ),
    ],
    server: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="For --to database: one of the Tenancy's servers (default: main)."),
    ] = None,
    yes: YesOption = False,
    app_spec: AppOption = None,
    config: ConfigOption = Path("alembic.ini"),
    as_json: JsonOption = False,
) -> None:
    """Move a tenant to another placement (Tenancy.move_tenant): read-only meanwhile, rows
    checked per table, the source removed. Asks first (--yes skips)."""
    if placement not in _PLACEMENTS:
        fail(f"--to must be one of {', '.join(_PLACEMENTS)}, not {placement!r}.", 2)
    tenancy = load_tenancy(app_spec, config)
    with operation(tenancy):
        tenant = tenancy.get_tenant(slug)
        confirm(
            f"Move tenant {tenant.slug!r} from {tenant.placement} to {placement}? It is read-only meanwhile.",
            yes=yes,
        )
        _show(tenancy.move_tenant(tenant.slug, placement, server=server), as_json, "moved")


@tenants.command()
def pool(
    fill: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--fill", min=1, help="Provision this many pending database tenants ahead."),
    ] = None,
    refill: Annotated[
        bool,
        typer.Option(
            "--refill",
            help="Top the pool up to the configured Tenancy(pending_tenants={'database': N}).",
        ),
    ] = False,
    server: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="The server to provision them on (default: the main one)."),
    ] = None,
    app_spec: AppOption = None,
    config: ConfigOption = Path("alembic.ini"),
    as_json: JsonOption = False,
) -> None:
    """The pool of pending database tenants that create_tenant claims instantly; --fill N adds N,
    --refill tops it up to the configured size (Tenancy.fill_pool, Tenancy.refill_pool,
    Tenancy.pending_tenants)."""
    if fill and refill:
        fail("Give --fill N or --refill, not both.", 2)
    tenancy = load_tenancy(app_spec, config)
    target = tenancy.config.pending_tenants.get("database")
    if refill and target is None:
        fail(
            "--refill tops the pool up to Tenancy(pending_tenants={'database': N}), which this "
            "application does not configure: configure it, or pass --fill N.",
            2,
        )
    with operation(tenancy):
        if fill:
            made = tenancy.fill_pool(fill, server=server)
        elif refill:
            made = tenancy.refill_pool()
        else:
            made = []
        pending = tenancy.pending_tenants()
        if as_json:
            print_json({"added": len(made), "target": target, "pending": [tenant_record(t) for t in pending]})
            return
        if fill or refill:
            typer.echo(f"added {len(made)} pending database tenant(s)")
        size = f" (configured size {target})" if target is not None else ""
        typer.echo(f"{len(pending)} pending database tenant(s) in the pool{size}")
