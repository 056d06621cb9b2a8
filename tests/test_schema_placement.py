"""What only the schema placement has: search_path and role binding, its own keys, provisioning."""

from __future__ import annotations

import re
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


def server_version(t: Tenancy) -> int:
    with t.admin_engine.connect() as conn:
        return int(conn.exec_driver_sql("show server_version_num").scalar_one())


def counted_create(t: Tenancy, slug: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """Create a schema tenant; the statements and scripts the admin side sent for it."""
    from sqlalchemy import event

    from sqla_tenancy.placements import base, schema

    count = [0]
    original = base.run_script

    def counting_script(conn: object, script: str) -> None:
        count[0] += 1
        original(conn, script)  # type: ignore[arg-type]

    def counting_statement(*args: object) -> None:
        count[0] += 1

    monkeypatch.setattr(schema, "run_script", counting_script)
    event.listen(t.admin_engine, "before_cursor_execute", counting_statement)
    try:
        t.create_tenant(slug, placement="schema")
    finally:
        event.remove(t.admin_engine, "before_cursor_execute", counting_statement)
        monkeypatch.setattr(schema, "run_script", original)
    return count[0]


def test_provisioning_does_not_grow_with_the_fleet(tenancy: Tenancy, monkeypatch: pytest.MonkeyPatch) -> None:
    """What makes creating a schema tenant cost the same whatever the size of the fleet, checked
    without timing it: the same round trips for every tenant, and (PostgreSQL 16+) tenant roles
    created and granted by keepers, each holding a bounded number of roles, so that no GRANT walks
    the memberships of the whole fleet (the admin role, were it their creator, would be a member of
    every tenant role)."""
    from sqla_tenancy import grants

    monkeypatch.setattr(grants, "KEEPER_TENANTS", 2)
    trips = [counted_create(tenancy, f"t{n}", monkeypatch) for n in range(1, 8)]
    # a new keeper's DDL comes with the first tenant of each keeper (tenants 1, 3, 5, 7)
    assert trips[1] == trips[3] == trips[5], trips
    assert trips[0] == trips[2] == trips[4] == trips[6], trips
    if server_version(tenancy) < 160000:
        return
    prefix, admin = tenancy.name_prefix, tenancy.admin_url.username
    roles = [f"{prefix}_t{n}_{purpose}" for n in range(1, 8) for purpose in ("app", "anon")]
    with tenancy.admin_engine.connect() as conn:
        created_by_admin = conn.execute(
            text(
                "select count(*) from pg_auth_members a join pg_roles r on r.oid = a.roleid "
                "where a.member = (select oid from pg_roles where rolname = :admin) "
                "and r.rolname = any(:roles)"
            ),
            {"admin": admin, "roles": roles},
        ).scalar_one()
        keepers = conn.execute(
            text(
                "select r.rolname, r.rolcreaterole, r.rolcanlogin, r.rolinherit, "
                "(select count(*) from pg_auth_members m where m.member = r.oid), "
                "has_function_privilege(:app, 'tenancy.' || quote_ident(r.rolname) || '(text, text, text)', "
                "'EXECUTE') from pg_roles r where r.rolname like :p order by 1"
            ),
            {"p": f"{prefix}\\_keeper\\_%", "app": tenancy.url.username},
        ).all()
        # every tenant role is still what it was: a member of its group, the app role's (or the
        # gate's) without inheritance
        memberships = set(
            conn.execute(
                text(
                    "select g.rolname, m.rolname, a.inherit_option from pg_auth_members a "
                    "join pg_roles g on g.oid = a.roleid join pg_roles m on m.oid = a.member "
                    "where (g.rolname = any(:roles) or m.rolname = any(:roles)) "
                    "and m.rolname not like :p"
                ),
                {"roles": roles[:2], "p": f"{prefix}\\_keeper\\_%"},
            ).all()
        )
    assert created_by_admin == 0
    assert [(name, creates, login, inherit) for name, creates, login, inherit, _, _ in keepers] == [
        (f"{prefix}_keeper_{n:05d}", True, False, False) for n in (1, 2, 3, 4)
    ]
    assert all(members <= 2 + 2 * 2 for *_, members, _ in keepers)  # its two groups, its roles
    assert not any(app_may_call for *_, app_may_call in keepers)
    assert memberships == {
        (f"{prefix}_tenants", f"{prefix}_t1_app", True),
        (f"{prefix}_t1_app", tenancy.url.username, False),
        (f"{prefix}_anonymous_infra", f"{prefix}_t1_anon", True),
        (f"{prefix}_t1_anon", f"{prefix}_anonymous_gate", False),
    }
    # the keepers are the library's own: not orphans; and deletion still removes the roles
    from .doctor_helpers import own_findings

    assert [f for f in own_findings(tenancy) if "keeper" in f.object] == []
    tenancy.delete_tenant("t1")
    with tenancy.admin_engine.connect() as conn:
        left = conn.execute(text("select count(*) from pg_roles where rolname = any(:r)"), {"r": roles[:2]})
        assert left.scalar_one() == 0


def test_admin_connections_are_replaced_after_a_few_keepers(
    tenancy: Tenancy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server session keeps the plans of every PL/pgSQL function it called, and PostgreSQL visits
    them all at each relation invalidation: an admin connection that had called every keeper's
    function made each later schema tenant dearer. One that has called more than
    KEEPERS_PER_CONNECTION keepers' functions (creating roles, or dropping them) is replaced at
    its next checkout, and the transaction that crossed the line still commits."""
    from sqla_tenancy import grants

    if server_version(tenancy) < 160000:
        pytest.skip("keepers are made on PostgreSQL 16+ only")
    monkeypatch.setattr(grants, "KEEPER_TENANTS", 1)  # a keeper per tenant
    monkeypatch.setattr(grants, "KEEPERS_PER_CONNECTION", 2)

    def backend() -> int:
        with tenancy.admin_engine.connect() as conn:
            return int(conn.execute(text("select pg_backend_pid()")).scalar_one())

    first = backend()
    pids = []
    for n in range(1, 7):
        tenancy.create_tenant(f"t{n}", placement="schema")
        pids.append(backend())
    # keepers 1-3 on the first session (the third crosses the line), 4-6 on the next one
    assert pids[:2] == [first, first] and first not in pids[2:], pids
    assert pids[2] == pids[3] == pids[4] != pids[5], pids
    created = [t.slug for t in tenancy.list_tenants() if t.strategy == "schema"]
    assert created == [f"t{n}" for n in range(1, 7)]
    # deletions call the keepers too: three tenants of three keepers, then a new session
    for n in (1, 2, 3):
        tenancy.delete_tenant(f"t{n}")
    assert backend() != pids[5]
    _, left = catalog(tenancy)
    assert not {f"{tenancy.name_prefix}_t{n}_app" for n in (1, 2, 3)} & left


def test_concurrent_provisioning_shares_the_keepers(
    tenancy: Tenancy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Provisionings running at once that find the newest keeper full make one new keeper between
    them (they wait for each other), and every tenant gets its roles."""
    from concurrent.futures import ThreadPoolExecutor

    from sqla_tenancy import grants

    monkeypatch.setattr(grants, "KEEPER_TENANTS", 2)
    slugs = [f"c{n}" for n in range(8)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda slug: tenancy.create_tenant(slug, placement="schema"), slugs))
    assert sorted(t.slug for t in tenancy.list_tenants() if t.strategy == "schema") == slugs
    prefix = tenancy.name_prefix
    with tenancy.admin_engine.connect() as conn:
        members = conn.execute(
            text(
                "select count(*) from pg_auth_members a join pg_roles g on g.oid = a.roleid "
                "join pg_roles m on m.oid = a.member where g.rolname = :g and m.rolname like :p"
            ),
            {"g": f"{prefix}_tenants", "p": f"{prefix}\\_c%\\_app"},
        ).scalar_one()
        keepers = conn.execute(
            text("select count(*) from pg_roles where rolname like :p"), {"p": f"{prefix}\\_keeper\\_%"}
        ).scalar_one()
    assert members == len(slugs)
    if server_version(tenancy) >= 160000:
        assert 1 <= keepers <= len(slugs) // 2
    for slug in slugs[:2]:
        with tenant_context(slug), tenancy.sessionmaker()() as s:
            s.add(Project(name=slug))
            s.commit()
            assert s.scalars(select(Project.name)).all() == [slug]


def deletion_scripts(t: Tenancy, slug: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Delete a schema tenant; the scripts its deprovisioning sent."""
    from sqla_tenancy.placements import base, schema

    sent: list[str] = []
    original = base.run_script

    def recording(conn: object, script: str) -> None:
        sent.append(script)
        original(conn, script)  # type: ignore[arg-type]

    monkeypatch.setattr(schema, "run_script", recording)
    try:
        t.delete_tenant(slug)
    finally:
        monkeypatch.setattr(schema, "run_script", original)
    return "\n".join(sent)


def test_deletion_drops_the_roles_through_their_keeper(
    tenancy: Tenancy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the admin role, DROP ROLE walks the admin's memberships, and through the keepers every
    schema tenant's roles (PostgreSQL 16+): the keeper that created a role drops it. A keeper of an
    earlier version, whose function cannot, leaves it to the admin until install() upgrades it."""
    if server_version(tenancy) < 160000:
        pytest.skip("keepers are made on PostgreSQL 16+ only")
    for slug in ("t1", "t2", "t3"):
        tenancy.create_tenant(slug, placement="schema")
    prefix = tenancy.name_prefix
    keeper = f"{prefix}_keeper_00001"
    roles = [f"{prefix}_t1_app", f"{prefix}_t1_anon"]
    sent = deletion_scripts(tenancy, "t1", monkeypatch)
    assert "DROP ROLE" not in sent
    for role in roles:
        assert f"SELECT tenancy.\"{keeper}\"('drop', '{role}', '')" in sent
    _, left = catalog(tenancy)
    assert not set(roles) & left

    # the keeper refuses to drop what it did not create: the groups it holds ADMIN OPTION on
    with tenancy.admin_engine.connect() as conn, pytest.raises(exc.DBAPIError, match="was not created by"):
        conn.exec_driver_sql(f"SELECT tenancy.\"{keeper}\"('drop', '{prefix}_tenants', '')")

    # a keeper made by an earlier version: its function has no 'drop'
    function = f'tenancy."{keeper}"(text, text, text)'
    with tenancy.admin_engine.connect() as conn:
        source = conn.execute(
            text(f"select prosrc from pg_proc where oid = '{function}'::regprocedure")
        ).scalar_one()
    old = re.sub(r"ELSIF action = 'drop' THEN.*?(?=ELSE\s+RAISE)", "", source, flags=re.S)
    assert "'drop'" not in old and "grant_inherit" in old
    with tenancy.admin_engine.begin() as conn:  # the keeper owns it: replaced as the keeper
        conn.exec_driver_sql(
            f'GRANT "{keeper}" TO "{tenancy.admin_url.username}" WITH INHERIT FALSE, SET TRUE'
        )
        conn.exec_driver_sql("GRANT CREATE ON SCHEMA tenancy TO " + f'"{keeper}"')
        conn.exec_driver_sql(f'SET LOCAL ROLE "{keeper}"')
        conn.exec_driver_sql(
            f"CREATE OR REPLACE FUNCTION {function.replace('(text, text, text)', '')}"
            f"(action text, role text, other text) RETURNS void LANGUAGE plpgsql SECURITY DEFINER "
            f"SET search_path = pg_catalog, pg_temp AS $fn${old.replace('%', '%%')}$fn$"
        )
        conn.exec_driver_sql("SET LOCAL ROLE NONE")
        conn.exec_driver_sql(f'REVOKE CREATE ON SCHEMA tenancy FROM "{keeper}"')
        conn.exec_driver_sql(f'REVOKE "{keeper}" FROM "{tenancy.admin_url.username}"')
    sent = deletion_scripts(tenancy, "t2", monkeypatch)
    assert f'DROP ROLE IF EXISTS "{prefix}_t2_app"' in sent and "'drop'" not in sent
    tenancy.install()  # upgrades it
    sent = deletion_scripts(tenancy, "t3", monkeypatch)
    assert "DROP ROLE" not in sent and f"('drop', '{prefix}_t3_app', '')" in sent
    _, left = catalog(tenancy)
    assert not {f"{prefix}_{slug}_{kind}" for slug in ("t2", "t3") for kind in ("app", "anon")} & left
    with tenancy.admin_engine.connect() as conn:  # and the keeper holds no privilege on the schema
        assert not conn.execute(
            text("select has_schema_privilege(:k, 'tenancy', 'CREATE')"), {"k": keeper}
        ).scalar_one()
