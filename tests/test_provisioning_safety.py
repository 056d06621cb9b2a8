"""Provisioning never takes a name it does not own, and its clean-up never drops what it did not
create: no tenant may derive a name the library owns, a name that exists already is refused
before anything is made, and the clean-up of a database tenant removes only what its journal
says the attempt created, after a failure or a crash at any step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
from sqlalchemy import select, text

from sqla_tenancy import InvalidTenantSlug, ProvisioningError, Tenancy, tenant_context
from sqla_tenancy.testing import TestServer

from .conftest import SECRET
from .models import INFRASTRUCTURE, Base, Project
from .test_database_placement import STEPS, catalog

#: the exit status of a provisioning process killed on purpose
CRASHED = 17


def database_oid(t: Tenancy, name: str) -> int | None:
    with t.admin_engine.connect() as conn:
        oid = conn.execute(text("select oid::int from pg_database where datname = :d"), {"d": name}).scalar()
    return oid if isinstance(oid, int) else None


def role_oid(t: Tenancy, name: str) -> int | None:
    with t.admin_engine.connect() as conn:
        oid = conn.execute(text("select oid::int from pg_roles where rolname = :r"), {"r": name}).scalar()
    return oid if isinstance(oid, int) else None


def tenant_objects(t: Tenancy, slug: str) -> dict[str, set[str]]:
    """Whatever exists of tenant ``slug``: its registry row, its databases, its roles (the FDW
    roles of every attempt included: they are named after the attempt's tenant id)."""
    prefix = t.name_prefix
    with t.admin_engine.connect() as conn:
        return {
            "tenants": set(
                conn.execute(text("select slug from tenancy.tenants where slug = :s"), {"s": slug}).scalars()
            ),
            "databases": set(
                conn.execute(
                    text("select datname from pg_database where datname = :d or datname like :tmp"),
                    {"d": f"{prefix}_{slug}", "tmp": f"{prefix}-%"},
                ).scalars()
            ),
            "roles": set(
                conn.execute(
                    text("select rolname from pg_roles where rolname = any(:r) or rolname like :fdw"),
                    {"r": [f"{prefix}_{slug}_app", f"{prefix}_{slug}_anon"], "fdw": f"{prefix}\\_fdw\\_%"},
                ).scalars()
            ),
        }


NOTHING: dict[str, set[str]] = {"tenants": set(), "databases": set(), "roles": set()}


@pytest.fixture
def prepared(tenancy: Tenancy, tenancy_server: TestServer) -> Tenancy:
    tenancy.prepare_server(tenancy_server.superuser_url)
    return tenancy


# -- names that exist already ---------------------------------------------------------------------


def test_an_existing_database_of_the_tenants_name_is_refused_and_left_alone(
    prepared: Tenancy, tenancy_server: TestServer
) -> None:
    name = f"{prepared.name_prefix}_acme"
    tenancy_server.execute(f'create database "{name}" owner "{tenancy_server.admin_role}"')
    oid = database_oid(prepared, name)
    with pytest.raises(ProvisioningError, match=rf"database '{name}' exists already"):
        prepared.create_tenant("acme", placement="database")
    assert database_oid(prepared, name) == oid  # the very same database, untouched
    assert tenant_objects(prepared, "acme") == {**NOTHING, "databases": {name}}
    prepared.create_tenant("globex", placement="database")  # the server still works
    with tenant_context("globex"), prepared.sessionmaker()() as s:
        assert s.scalars(select(Project)).all() == []


@pytest.mark.parametrize("purpose", ["app", "anon"])
def test_an_existing_role_of_the_tenants_name_is_refused_and_left_alone(
    prepared: Tenancy, purpose: str
) -> None:
    role = f"{prepared.name_prefix}_acme_{purpose}"
    with prepared.admin_engine.begin() as conn:  # the admin role could drop it: it made it
        conn.execute(text(f'create role "{role}" nologin'))
    oid = role_oid(prepared, role)
    with pytest.raises(ProvisioningError, match=rf"[Rr]ole '{role}' exists already"):
        prepared.create_tenant("acme", placement="database")
    assert role_oid(prepared, role) == oid
    assert tenant_objects(prepared, "acme") == {**NOTHING, "roles": {role}}
    prepared.create_tenant("globex", placement="database")


# -- names the library owns -------------------------------------------------------------------------


def test_the_template_slug_is_refused_and_the_template_survives(prepared: Tenancy) -> None:
    template = f"{prepared.name_prefix}_template"
    oid = database_oid(prepared, template)
    with pytest.raises(InvalidTenantSlug, match="reserved"):
        prepared.create_tenant("template", placement="database")
    assert database_oid(prepared, template) == oid
    prepared.create_tenant("acme", placement="database")  # later database tenants still work


def test_a_tenant_database_named_like_a_servers_admin_database_is_refused(
    tenancy_factory: Callable[..., Tenancy], tenancy_server: TestServer, tenancy_database: str
) -> None:
    prefix = tenancy_server.name_prefix(tenancy_database)
    admin_database = f"{prefix}_ops"
    tenancy_server.execute(f'create database "{admin_database}" owner "{tenancy_server.admin_role}"')
    other = tenancy_server.url(admin_database, role="admin")
    t = tenancy_factory(
        Base.metadata,
        infrastructure_schemas=INFRASTRUCTURE,
        secret_key=SECRET,
        name_prefix=prefix,
        servers={"other": other},
    )
    t.install()
    t.prepare_server(tenancy_server.superuser_url)
    oid = database_oid(t, admin_database)
    before = catalog(t)
    with pytest.raises(ProvisioningError, match=r"admin database of server 'other'"):
        t.create_tenant("ops", placement="database")
    assert catalog(t) == before
    assert database_oid(t, admin_database) == oid


def test_a_tenant_database_named_like_the_main_database_is_refused(
    tenancy_server: TestServer, tenancy_database: str
) -> None:
    prefix = tenancy_server.name_prefix(tenancy_database)
    main = f"{prefix}_main"
    tenancy_server.execute(f'create database "{main}" owner "{tenancy_server.admin_role}"')
    tenancy_server.execute(f'grant connect on database "{main}" to "{tenancy_server.app_role}"')
    t = Tenancy(
        tenancy_server.url(main),
        admin_url=tenancy_server.url(main, role="admin"),
        metadata=Base.metadata,
        infrastructure_schemas=INFRASTRUCTURE,
        secret_key=SECRET,
        name_prefix=prefix,
    )
    try:
        t.install()
        t.prepare_server(tenancy_server.superuser_url)
        before = catalog(t)
        with pytest.raises(ProvisioningError, match=r"the main database"):
            t.create_tenant("main", placement="database")
        assert catalog(t) == before
        with t.admin_engine.connect() as conn:
            assert conn.execute(text("select current_database()")).scalar() == main
    finally:
        t.dispose()


def test_a_tenant_schema_named_like_an_infrastructure_schema_is_refused(
    tenancy_factory: Callable[..., Tenancy], tenancy_server: TestServer, tenancy_database: str
) -> None:
    prefix = tenancy_server.name_prefix(tenancy_database)
    ledger = f"{prefix}_ledger"
    tenancy_server.execute(
        f'create schema "{ledger}" authorization "{tenancy_server.admin_role}"', database=tenancy_database
    )
    t = tenancy_factory(
        Base.metadata,
        infrastructure_schemas=(*INFRASTRUCTURE, ledger),
        secret_key=SECRET,
        name_prefix=prefix,
    )
    t.install()
    with t.admin_engine.begin() as conn:
        conn.execute(text(f'create table "{ledger}".entries (id int)'))
    before = catalog(t)
    with pytest.raises(ProvisioningError, match=r"an infrastructure schema"):
        t.create_tenant("ledger", placement="schema")
    assert catalog(t) == before
    with t.admin_engine.connect() as conn:
        assert conn.execute(text(f'select count(*) from "{ledger}".entries')).scalar() == 0


def test_every_name_the_library_creates_is_one_it_lists_as_its_own(
    prepared: Tenancy, tenancy_server: TestServer
) -> None:
    """A new library-owned object that is not in ``library_names`` fails here, so that no tenant
    can ever derive its name (and no clean-up ever drop it)."""
    from sqla_tenancy.lifecycle import library_names

    owned = library_names(prepared.config)
    tenants = [
        prepared.create_tenant(slug, placement=strategy)
        for slug, strategy in (("acme", "shared"), ("globex", "schema"), ("initech", "database"))
    ]
    derived = set()
    for tenant in tenants:
        derived |= set(prepared.placement(tenant.strategy).derived_names(tenant))
    assert not derived & set(owned)
    prefix = prepared.name_prefix.replace("_", "\\_")
    with prepared.admin_engine.connect() as conn:
        made = {
            *(
                ("role", r)
                for r in conn.execute(
                    text("select rolname from pg_roles where rolname like :p"), {"p": f"{prefix}\\_%"}
                ).scalars()
            ),
            *(
                ("database", d)
                for d in conn.execute(
                    text("select datname from pg_database where datname like :p"), {"p": f"{prefix}\\_%"}
                ).scalars()
            ),
            *(
                ("schema", s)
                for s in conn.execute(
                    text(
                        "select nspname from pg_namespace where nspname not like 'pg\\_%' "
                        "and nspname <> 'information_schema'"
                    )
                ).scalars()
            ),
        }
    # (keepers, which create the schema tenants' roles, are many: a pattern, not a list)
    from sqla_tenancy.grants import is_keeper_role

    unlisted = {(kind, name) for kind, name in made - derived - set(owned)}
    assert {(k, n) for k, n in unlisted if not (k == "role" and is_keeper_role(prepared.config, n))} == set()
    with prepared.admin_engine.connect() as conn:
        keepers = (conn.dialect.server_version_info or (0,)) >= (16,)  # (PostgreSQL 16+ only)
    assert (("role", f"{prepared.name_prefix}_keeper_00001") in made) == keepers


# -- the journal: failures and crashes ------------------------------------------------------------


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    from sqla_tenancy import Tenancy
    from tests.conftest import SECRET
    from tests.models import INFRASTRUCTURE, Base

    options = json.loads(sys.argv[1])
    tenancy = Tenancy(
        options["url"],
        admin_url=options["admin_url"],
        metadata=Base.metadata,
        infrastructure_schemas=INFRASTRUCTURE,
        secret_key=SECRET,
        name_prefix=options["prefix"],
        registry_listen=False,
    )

    def crash(step):
        if step == options["step"]:
            os._exit({crashed})  # no clean-up, no unlock, no goodbye: a killed process

    tenancy._fault_injector = crash
    tenancy.create_tenant(options["slug"], placement="database")
    """
).format(crashed=CRASHED)


def crash_during_creation(t: Tenancy, slug: str, step: str) -> None:
    """Create database tenant ``slug`` in another process, killed at ``step``."""
    options = {
        "url": t.url.render_as_string(hide_password=False),
        "admin_url": t.admin_url.render_as_string(hide_password=False),
        "prefix": t.name_prefix,
        "slug": slug,
        "step": step,
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, json.dumps(options)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == CRASHED, done.stderr


@pytest.mark.parametrize("step", STEPS)
def test_a_crash_at_any_step_is_cleaned_up_by_the_retry(prepared: Tenancy, step: str) -> None:
    template = f"{prepared.name_prefix}_template"
    oid = database_oid(prepared, template)
    before = catalog(prepared)
    crash_during_creation(prepared, "acme", step)
    prepared.create_tenant("acme", placement="database")
    acme = prepared.get_tenant("acme")
    after = catalog(prepared)
    assert after["databases"] - before["databases"] == {f"{prepared.name_prefix}_acme"}
    assert after["roles"] - before["roles"] == {
        f"{prepared.name_prefix}_acme_app",
        f"{prepared.name_prefix}_acme_anon",
        acme.location["fdw_role"],
    }
    assert before["databases"] - after["databases"] == set()
    assert database_oid(prepared, template) == oid
    with tenant_context("acme"), prepared.sessionmaker()() as s:
        assert s.scalars(select(Project)).all() == []


def test_a_crashed_attempts_clean_up_leaves_a_database_it_did_not_create(
    prepared: Tenancy, tenancy_server: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"{prepared.name_prefix}_acme"
    crash_during_creation(prepared, "acme", "database")  # journaled, but not created yet
    # meanwhile somebody else takes the name
    tenancy_server.execute(f'create database "{name}" owner "{tenancy_server.admin_role}"')
    oid = database_oid(prepared, name)
    with pytest.raises(ProvisioningError, match=rf"database '{name}' exists already"):
        prepared.create_tenant("acme", placement="database")
    assert database_oid(prepared, name) == oid
    assert "left alone" in caplog.text
    # the crashed attempt's roles are gone, and so is its row
    assert tenant_objects(prepared, "acme") == {**NOTHING, "databases": {name}}


@pytest.mark.parametrize("step", ["rename_database", "fdw"])
def test_a_registry_row_deleted_during_provisioning_still_leaves_nothing(
    prepared: Tenancy, step: str
) -> None:
    """Without its row the journal is gone: the clean-up then drops what carries the tenant's
    marker under the names it would have journaled, and nothing else."""
    before = catalog(prepared)

    def delete_row(name: str) -> None:
        if name == step:
            with prepared.admin_engine.begin() as conn:
                conn.execute(text("delete from tenancy.tenants where slug = 'acme'"))

    prepared._fault_injector = delete_row
    with pytest.raises(ProvisioningError, match="changed while it was being provisioned"):
        prepared.create_tenant("acme", placement="database")
    assert catalog(prepared) == before
    prepared._fault_injector = None
    prepared.create_tenant("acme", placement="database")
