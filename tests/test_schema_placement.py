"""What only the schema placement has: search_path and role binding, its own keys, provisioning."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import exc, select, text

from sqla_tenancy import ProvisioningError, Tenancy, tenant_context

from .models import Plan, Project
from .test_binding import session_level_setting


@pytest.fixture
def two(tenancy: Tenancy) -> Iterator[Tenancy]:
    for slug, names in (("acme", ["a1", "a2"]), ("globex", ["b1"])):
        tenancy.create_tenant(slug, placement="schema")
        with tenant_context(slug), tenancy.sessionmaker()() as s:
            s.add_all(Project(name=n) for n in names)
            s.commit()
    yield tenancy


def names(t: Tenancy, slug: str) -> tuple[str, str]:
    return f"{t.name_prefix}_{slug}", f"{t.name_prefix}_{slug}_app"


def catalog(t: Tenancy) -> tuple[set[str], set[str]]:
    with t.admin_engine.connect() as conn:
        schemas = set(conn.execute(text("select nspname from pg_namespace")).scalars())
        roles = set(conn.execute(text("select rolname from pg_roles")).scalars())
    return schemas, roles


def test_transaction_runs_in_the_tenants_schema_as_the_tenants_role(two: Tenancy) -> None:
    schema, role = names(two, "acme")
    with tenant_context("acme"), two.engine.connect() as conn:
        # pg_temp last: a temporary table can never shadow the tenant's own tables
        assert conn.execute(text("show search_path")).scalar() == f"{schema}, pg_temp"
        assert conn.execute(text("select current_user")).scalar() == role
        assert conn.execute(text("select current_schema()")).scalar() == schema
        conn.commit()
        # nothing of it is left on the connection
        driver = conn.connection.dbapi_connection
        assert driver is not None
        assert driver.execute("select current_user").fetchone()[0] == two.url.username  # type: ignore[index]
        assert driver.execute("show search_path").fetchone()[0] == '"$user", public'  # type: ignore[index]
        assert session_level_setting(conn) in (None, "")


def test_no_public_fallback(two: Tenancy) -> None:
    with two.admin_engine.begin() as conn:
        conn.execute(text("create table public.legacy (x int)"))
        conn.execute(text(f'grant select on public.legacy to "{two.url.username}"'))
    with tenant_context("acme"), two.engine.connect() as conn:
        # a table missing from the tenant's schema is an error, never the public one...
        with pytest.raises(exc.ProgrammingError, match='relation "legacy" does not exist'):
            conn.execute(text("select * from legacy"))
        conn.rollback()
        # ...nor qualified: the tenant's role has no privilege there
        with pytest.raises(exc.ProgrammingError, match="permission denied"):
            conn.execute(text("select * from public.projects"))
        conn.rollback()
        # infrastructure stays reachable by its qualified name
        assert conn.execute(select(Plan)).all() == []


def test_another_tenants_schema_is_refused_by_grants(two: Tenancy) -> None:
    other, _ = names(two, "globex")
    with tenant_context("acme"), two.engine.connect() as conn:
        with pytest.raises(exc.ProgrammingError, match="permission denied for schema"):
            conn.execute(text(f'select * from "{other}".projects'))


def test_equal_primary_keys_never_collide_in_one_session(two: Tenancy) -> None:
    with two.sessionmaker()() as s:
        with tenant_context("acme"):
            a = s.get(Project, 1)
        with tenant_context("globex"):
            b = s.get(Project, 1)
        assert a is not None and b is not None and a is not b
        assert (a.name, b.name) == ("a1", "b1")
        with tenant_context("acme"):
            assert s.get(Project, 1) is a
            a.name = "a1-renamed"
            s.commit()
        with tenant_context("globex"):
            assert s.scalars(select(Project.name)).all() == ["b1"]


def test_delete_tenant_leaves_nothing(two: Tenancy) -> None:
    before_schemas, before_roles = catalog(two)
    schema, role = names(two, "acme")
    assert schema in before_schemas and role in before_roles
    two.delete_tenant("acme")
    after_schemas, after_roles = catalog(two)
    assert before_schemas - after_schemas == {schema}
    assert before_roles - after_roles == {role, f"{two.name_prefix}_acme_anon"}  # and its anonymous role
    with tenant_context("globex"), two.sessionmaker()() as s:
        assert s.scalars(select(Project.name)).all() == ["b1"]


STEPS = ["register", "schema", "tables", "role", "membership", "activate"]


@pytest.mark.parametrize("step", STEPS)
def test_failure_at_any_step_leaves_nothing(tenancy: Tenancy, step: str) -> None:
    seen: list[str] = []

    def inject(name: str) -> None:
        seen.append(name)
        if name == step:
            raise RuntimeError(f"injected failure at {name}")

    before = catalog(tenancy)
    tenancy._fault_injector = inject
    with pytest.raises(ProvisioningError if step != "register" else RuntimeError, match="injected"):
        tenancy.create_tenant("acme", placement="schema")
    assert seen[-1] == step
    assert catalog(tenancy) == before
    assert [t.slug for t in tenancy.list_tenants()] == ["default"]
    tenancy._fault_injector = None
    tenancy.create_tenant("acme", placement="schema")
    with tenant_context("acme"), tenancy.sessionmaker()() as s:
        assert s.scalars(select(Project)).all() == []


def test_all_steps_are_exercised(tenancy: Tenancy) -> None:
    seen: list[str] = []
    tenancy._fault_injector = seen.append
    tenancy.create_tenant("acme", placement="schema")
    assert seen == STEPS


def test_leftover_role_is_reported_and_nothing_is_made(tenancy: Tenancy) -> None:
    _, role = names(tenancy, "acme")
    with tenancy.admin_engine.begin() as conn:
        conn.execute(text(f'create role "{role}" nologin'))
    before = catalog(tenancy)
    with pytest.raises(ProvisioningError, match="name_prefix"):
        tenancy.create_tenant("acme", placement="schema")
    assert catalog(tenancy) == before
    assert [t.slug for t in tenancy.list_tenants()] == ["default"]


def test_an_existing_schema_of_the_tenants_name_is_refused_and_left_alone(tenancy: Tenancy) -> None:
    schema, _ = names(tenancy, "acme")
    with tenancy.admin_engine.begin() as conn:
        conn.execute(text(f'create schema "{schema}"'))
        conn.execute(text(f'create table "{schema}".kept (id int)'))
    before = catalog(tenancy)
    with pytest.raises(ProvisioningError, match=rf"schema '{schema}' exists already"):
        tenancy.create_tenant("acme", placement="schema")
    assert catalog(tenancy) == before
    assert [t.slug for t in tenancy.list_tenants()] == ["default"]
    with tenancy.admin_engine.connect() as conn:
        assert conn.execute(text(f'select count(*) from "{schema}".kept')).scalar() == 0
