"""Moving a tenant between the shared, schema and database placements (and a database tenant to
another server): rows copied and checked, registry switched, source removed; read-only meanwhile,
with an error naming the move; a failure at any step before the switch leaves the tenant active at
its source with every row and nothing of the target."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, exc, select, text, update

from sqla_tenancy import (
    ProvisioningError,
    Tenancy,
    TenantEvent,
    TenantRefused,
    UnsupportedOperation,
    tenant_context,
)
from sqla_tenancy.grants import is_keeper_role
from sqla_tenancy.locks import tenant_key
from sqla_tenancy.move import MoveError
from sqla_tenancy.testing import TemporaryCluster, TestServer
from tests.doctor_helpers import own_findings

from .conftest import SECRET
from .models import INFRASTRUCTURE, Base, Project, Task, User

STEPS = ["move_read_only", "move_provision", "move_copy", "move_verify", "move_remove_source", "move_switch"]
#: the moves to or from the database placement (each step of each is failed in turn)
ACROSS = [("shared", "database"), ("schema", "database"), ("database", "shared"), ("database", "schema")]


def seed(t: Tenancy, slug: str) -> None:
    with tenant_context(slug), t.sessionmaker()() as s:
        for n in range(3):
            project = Project(name=f"{slug}-{n}")
            s.add(project)
            s.flush()
            s.add(Task(project_id=project.id, title=f"{slug}-{n}-t"))
        s.add(User(email=f"u@{slug}.test"))
        s.commit()


def content(t: Tenancy, slug: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]], list[str]]:
    with tenant_context(slug), t.sessionmaker()() as s:
        return (
            [tuple(r) for r in s.execute(select(Project.id, Project.name).order_by(Project.id))],  # type: ignore[misc]
            [tuple(r) for r in s.execute(select(Task.project_id, Task.title).order_by(Task.id))],  # type: ignore[misc]
            list(s.scalars(select(User.email))),
        )


def policies(t: Tenancy) -> list[str]:
    with t.admin_engine.connect() as conn:
        return list(
            conn.execute(text("select polname from pg_policy where polname like 'tenancy_moving%'")).scalars()
        )


def objects(t: Tenancy) -> dict[str, set[str]]:
    """The main cluster's databases and roles, and the registry's slugs."""
    with t.admin_engine.connect() as conn:
        return {
            "databases": set(conn.execute(text("select datname from pg_database")).scalars()),
            # (keeper roles, the library's own, are made once per 32 schema tenants and kept)
            "roles": {
                r
                for r in conn.execute(text("select rolname from pg_roles")).scalars()
                if not is_keeper_role(t.config, r)
            },
            "tenants": set(conn.execute(text("select slug from tenancy.tenants")).scalars()),
        }


def source_policies(t: Tenancy, slug: str) -> list[str]:
    """The move's policies and function where the tenant's rows are (its own database included)."""
    tenant = t.get_tenant(slug)
    found = policies(t)
    if tenant.strategy == "database":
        url = t.admin_url.set(database=tenant.location["database"])
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                found += conn.execute(
                    text(
                        "select polname from pg_policy where polname like 'tenancy_moving%' union all "
                        "select proname from pg_proc where proname like 'tenancy_moving%'"
                    )
                ).scalars()
        finally:
            engine.dispose()
    return found


def place(t: Tenancy, slug: str, placement: str) -> None:
    """Put ``slug`` (a shared tenant) in ``placement``."""
    if placement != "shared":
        t.move_tenant(slug, placement)
    assert t.get_tenant(slug).strategy == placement


@pytest.fixture
def t(tenancy: Tenancy, tenancy_server: TestServer) -> Iterator[Tenancy]:
    tenancy.prepare_server(tenancy_server.superuser_url)
    tenancy.create_tenant("acme")
    tenancy.create_tenant("globex")
    seed(tenancy, "acme")
    seed(tenancy, "globex")
    yield tenancy


def test_shared_to_schema_and_back(t: Tenancy) -> None:
    before, others = content(t, "acme"), content(t, "globex")
    events: list[str] = []
    t.on("before_move", lambda e: events.append(f"{e.name}:{e.details['from']}->{e.placement}"))
    t.on("after_move", lambda e: events.append(f"{e.name}:{e.tenant.strategy if e.tenant else None}"))

    moved = t.move_tenant("acme", "schema")
    assert moved.strategy == "schema" and moved.location["schema"] and moved.is_active
    assert content(t, "acme") == before
    assert content(t, "globex") == others
    with t.admin_engine.connect() as conn:  # the shared tables hold none of its rows any more
        assert (
            conn.execute(text("select count(*) from projects where tenant_id = :t"), {"t": moved.id}).scalar()
            == 0
        )
    assert own_findings(t) == []

    back = t.move_tenant("acme", "shared")
    assert back.strategy == "shared"
    assert content(t, "acme") == before
    assert events == [
        "before_move:shared->schema",
        "after_move:schema",
        "before_move:schema->shared",
        "after_move:shared",
    ]
    assert own_findings(t) == []


@pytest.mark.parametrize(("source", "target"), [("shared", "schema"), ("schema", "shared"), *ACROSS])
@pytest.mark.parametrize("step", STEPS)
def test_a_failure_at_any_step_leaves_the_tenant_at_its_source(
    t: Tenancy, source: str, target: str, step: str
) -> None:
    slug = "acme"
    place(t, slug, source)  # a schema tenant's keys are free in the shared tables to go back to
    before, catalog = content(t, slug), objects(t)
    tenant = t.get_tenant(slug)

    def fail(name: str) -> None:
        if name == step:
            raise RuntimeError(f"injected at {name}")

    t._fault_injector = fail
    with pytest.raises(MoveError, match=f"injected at {step}") as raised:
        t.move_tenant(slug, target)
    t._fault_injector = None
    after = t.get_tenant(slug)
    if source == "database" and step == "move_remove_source":
        # the switch had committed: the tenant is at its target, the source database still there
        assert "rerun move_tenant" in str(raised.value)
        assert (after.strategy, after.status) == (target, "active")
        assert content(t, slug) == before
        t.move_tenant(slug, target)  # finishes the removal
        after = t.get_tenant(slug)
        assert "move_source" not in after.location
        assert tenant.location["database"] not in objects(t)["databases"]
    else:
        assert (after.strategy, after.location, after.status) == (tenant.strategy, tenant.location, "active")
        assert content(t, slug) == before
        assert objects(t) == catalog  # no database, role or registry row of the target
    assert source_policies(t, slug) == []
    with tenant_context(slug), t.sessionmaker()() as s:  # writable again
        s.add(Project(name="still here"))
        s.commit()
    assert own_findings(t) == []


@pytest.mark.parametrize(
    "path",
    [
        ["shared", "database", "shared"],
        ["schema", "database", "schema"],  # the roles' names pass from one to the other
        ["shared", "database", "schema", "shared"],
    ],
)
def test_round_trips_through_the_database_placement(t: Tenancy, path: list[str]) -> None:
    place(t, "acme", path[0])
    before, others, catalog = content(t, "acme"), content(t, "globex"), objects(t)
    events: list[str] = []
    t.on("before_move", lambda e: events.append(f"before:{e.details['from']}->{e.placement}"))
    t.on("after_move", lambda e: events.append(f"after:{e.tenant.strategy if e.tenant else None}"))
    for placement in path[1:]:
        moved = t.move_tenant("acme", placement)
        assert (moved.strategy, moved.status) == (placement, "active")
        assert not {"move_journal", "move_source"} & set(moved.location)
        assert content(t, "acme") == before
        assert content(t, "globex") == others
        assert source_policies(t, "acme") == []
        if placement == "database":
            with tenant_context("acme"), t.sessionmaker()() as s:  # its own database, its infrastructure
                assert s.scalar(text("select current_database()")) == moved.location["database"]
                assert s.scalars(select(User.email)).all() == ["u@acme.test"]
        assert own_findings(t) == []
    assert objects(t) == catalog  # nothing left of the placements it passed through
    assert events == [e for a, b in itertools.pairwise(path) for e in (f"before:{a}->{b}", f"after:{b}")]


def test_keys_continue_after_the_copied_ones_in_a_database(t: Tenancy) -> None:
    t.move_tenant("acme", "database")
    highest = max(i for i, _ in content(t, "acme")[0])
    with tenant_context("acme"), t.sessionmaker()() as s:
        project = Project(name="after the move")
        s.add(project)
        s.commit()
        assert project.id == highest + 1
    t.move_tenant("globex", "database")  # its keys (4..6) continue there, past the shared sequence
    with tenant_context("globex"), t.sessionmaker()() as s:
        s.add_all([Project(name="globex-3"), Project(name="globex-4")])
        s.commit()
    t.move_tenant("globex", "shared")  # the shared sequence goes past the keys that came back
    with tenant_context("globex"), t.sessionmaker()() as s:
        project = Project(name="globex after")
        s.add(project)
        s.commit()
        assert project.id == max(i for i, _ in content(t, "globex")[0]) == 9


def test_an_interrupted_move_is_cleaned_up_by_the_next(t: Tenancy, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqla_tenancy.move as move

    catalog, before = objects(t), content(t, "acme")
    monkeypatch.setattr(move, "_undo", lambda *args: None)  # as if the process died at the failure
    t._fault_injector = lambda name: (
        (_ for _ in ()).throw(RuntimeError("crash")) if name == "move_verify" else None
    )
    with pytest.raises(MoveError):
        t.move_tenant("acme", "database")
    t._fault_injector = None
    monkeypatch.undo()
    left = t.get_tenant("acme")
    assert left.strategy == "shared" and left.location.get("move_journal")
    assert policies(t) != [] and objects(t) != catalog  # read-only, a target database half-made
    moved = t.move_tenant("acme", "database")
    assert moved.strategy == "database" and content(t, "acme") == before
    t.move_tenant("acme", "shared")
    assert objects(t) == catalog


def write_refused(t: Tenancy, slug: str) -> bool:
    """Whether the tenant's writes are refused (by a move's read-only guard)."""
    try:
        with tenant_context(slug), t.sessionmaker()() as s:
            s.add(Project(name=f"{slug} probe"))
            s.commit()
    except exc.DBAPIError as error:
        assert getattr(error.orig, "sqlstate", None) == "25006", error
        return True
    with tenant_context(slug), t.sessionmaker()() as s:
        s.execute(Project.__table__.delete().where(Project.name == f"{slug} probe"))
        s.commit()
    return False


@pytest.mark.parametrize(
    ("source", "target", "crash_at"),
    [
        ("shared", "database", "move_verify"),
        ("database", "shared", "move_copy"),
        ("shared", "schema", "move_copy"),
    ],
)
def test_the_doctor_reports_an_interrupted_move_and_moving_back_undoes_it(
    t: Tenancy, monkeypatch: pytest.MonkeyPatch, source: str, target: str, crash_at: str
) -> None:
    import sqla_tenancy.move as move

    place(t, "acme", source)
    catalog, before = objects(t), content(t, "acme")
    # as if the process died at the failure: no clean-up
    monkeypatch.setattr(move, "_undo", lambda *args: None)
    monkeypatch.setattr(move, "_unblock_writes", lambda *args: None)
    t._fault_injector = lambda name: (
        (_ for _ in ()).throw(RuntimeError("crash")) if name == crash_at else None
    )
    with pytest.raises(MoveError):
        t.move_tenant("acme", target)
    t._fault_injector = None
    monkeypatch.undo()
    assert t.get_tenant("acme").strategy == source and write_refused(t, "acme")
    findings = [f for f in own_findings(t) if f.check == "move-interrupted"]
    assert [(f.severity, f.object) for f in findings] == [("warning", "tenant acme")]
    assert f"tenancy.move_tenant('acme', '{source}') undoes the move" in findings[0].fix
    print(findings[0])

    # while a move of the tenant runs (it holds the tenant's lock), the doctor says nothing of it
    with t.admin_engine.connect() as conn:
        conn.execute(text("select pg_advisory_lock(hashtext(:k))"), {"k": tenant_key("acme")})
        try:
            assert [f for f in own_findings(t) if f.check == "move-interrupted"] == []
        finally:
            conn.execute(text("select pg_advisory_unlock(hashtext(:k))"), {"k": tenant_key("acme")})

    undone = t.move_tenant("acme", source)  # to where it is: the interrupted move is undone
    assert undone.strategy == source and not undone.location.get("move_journal")
    assert not write_refused(t, "acme") and content(t, "acme") == before
    assert source_policies(t, "acme") == [] and objects(t) == catalog
    assert own_findings(t) == []
    with pytest.raises(UnsupportedOperation, match="already"):  # nothing left to undo
        t.move_tenant("acme", source)


def test_a_database_tenant_moves_to_another_server(t: Tenancy) -> None:
    with TemporaryCluster() as eu:
        su = create_engine(eu.url(), isolation_level="AUTOCOMMIT")
        with su.connect() as conn:  # not BYPASSRLS: it copies as the tables' owner
            conn.exec_driver_sql("create role eu_admin login createdb createrole password 'eu-admin-pw'")
        su.dispose()
        remote = Tenancy(
            t.url,
            admin_url=t.admin_url,
            metadata=Base.metadata,
            infrastructure_schemas=INFRASTRUCTURE,
            secret_key=SECRET,
            name_prefix=t.name_prefix,
            servers={"eu": eu.url(user="eu_admin", password="eu-admin-pw")},
        )
        try:
            remote.prepare_server(eu.url(), server="eu")
            before, catalog = content(remote, "acme"), objects(remote)
            remote.move_tenant("acme", "database")
            moved = remote.move_tenant("acme", "database", server="eu")
            assert moved.location["server"] == "eu"
            assert content(remote, "acme") == before
            with tenant_context("acme"), remote.sessionmaker()() as s:
                assert s.execute(text("select inet_server_port()")).scalar() == eu.port
                s.add(Project(name="in eu"))
                s.commit()
                assert s.scalars(select(User.email)).all() == ["u@acme.test"]  # infrastructure reached
            assert objects(remote) == {**catalog, "roles": catalog["roles"] | {moved.location["fdw_role"]}}
            with pytest.raises(UnsupportedOperation, match="on server 'eu' already"):
                remote.move_tenant("acme", "database", server="eu")
            back = remote.move_tenant("acme", "schema")  # its keys (1..4) are its own there
            assert back.strategy == "schema" and len(content(remote, "acme")[0]) == 4
            with create_engine(eu.url()).connect() as conn:
                assert (
                    conn.execute(
                        text("select count(*) from pg_database where datname like '%acme%'")
                    ).scalar()
                    == 0
                )
            assert objects(remote)["databases"] == catalog["databases"]
            assert moved.location["fdw_role"] not in objects(remote)["roles"]
        finally:
            remote.dispose()


@pytest.mark.parametrize(
    ("source", "target"), [("shared", "schema"), ("schema", "database"), ("database", "shared")]
)
def test_the_tenant_is_read_only_during_the_move(t: Tenancy, source: str, target: str) -> None:
    place(t, "acme", source)
    seen: dict[str, object] = {}

    def during(event: TenantEvent) -> None:
        if event.step != "move_copy" or seen:
            return

        def as_the_tenant() -> None:  # other connections, as the application serves it
            with tenant_context("acme"), t.sessionmaker()() as s:
                seen["read"] = len(s.scalars(select(Project)).all())
                s.add(Project(name="written during the move"))
                try:
                    s.commit()
                except exc.InternalError as error:
                    seen["write"] = str(error.orig).splitlines()[0]
            with tenant_context("acme"), t.sessionmaker()() as s:
                try:
                    s.execute(update(Project).values(name="renamed during the move"))
                    s.commit()
                except exc.InternalError as error:
                    seen["update"] = type(error.orig).__name__
            with tenant_context("globex"), t.sessionmaker()() as s:  # other tenants write on
                s.add(Project(name="globex during the move"))
                s.commit()
                seen["other"] = "ok"

        thread = threading.Thread(target=as_the_tenant)
        thread.start()
        thread.join(30)

    t.on("step", during)
    t.move_tenant("acme", target)
    assert seen == {
        "read": 3,
        "write": f"tenant 'acme' is being moved from {source} to {target}: its writes are refused "
        "until the move ends (reads go on)",
        "update": "ReadOnlySqlTransaction",
        "other": "ok",
    }
    assert [name for _, name in content(t, "acme")[0]] == ["acme-0", "acme-1", "acme-2"]
    with tenant_context("acme"), t.sessionmaker()() as s:  # writable at the target
        s.add(Project(name="after the move"))
        s.commit()


def test_a_moved_tenants_keys_continue_after_the_copied_ones(t: Tenancy) -> None:
    t.move_tenant("acme", "schema")
    highest = max(i for i, _ in content(t, "acme")[0])
    with tenant_context("acme"), t.sessionmaker()() as s:
        project = Project(name="after the move")
        s.add(project)
        s.commit()
        assert project.id == highest + 1


def test_keys_that_collide_in_the_shared_tables_fail_the_move_cleanly(t: Tenancy) -> None:
    t.create_tenant("initech", placement="schema")
    seed(t, "initech")  # ids 1..3 in its own schema; acme and globex hold 1..6 in the shared tables
    before = content(t, "initech")
    with pytest.raises(MoveError, match="duplicate key"):
        t.move_tenant("initech", "shared")
    assert t.get_tenant("initech").strategy == "schema"
    assert content(t, "initech") == before


def test_unsupported_moves_are_refused_before_anything(t: Tenancy, tenancy_server: TestServer) -> None:
    with pytest.raises(UnsupportedOperation, match="already"):
        t.move_tenant("acme", "shared")
    with pytest.raises(UnsupportedOperation, match="server= applies to moves to the database"):
        t.move_tenant("acme", "schema", server="main")
    with pytest.raises(ProvisioningError, match="Unknown server"):
        t.move_tenant("acme", "database", server="mars")
    with pytest.raises(UnsupportedOperation, match="default tenant"):
        t.move_tenant("default", "schema")
    t.suspend_tenant("acme")
    with pytest.raises(UnsupportedOperation, match="suspended"):
        t.move_tenant("acme", "schema")


@pytest.mark.parametrize("target", ["schema", "database"])
def test_concurrent_moves_of_one_tenant_run_one_after_the_other(t: Tenancy, target: str) -> None:
    before = content(t, "acme")
    outcomes: list[str] = []

    def attempt() -> None:
        try:
            t.move_tenant("acme", target)
            outcomes.append("moved")
        except MoveError as error:  # it waited for the other, then found the tenant moved
            outcomes.append(
                "changed before" if "changed before its move started" in str(error) else str(error)
            )
        except UnsupportedOperation:  # it started after the other had finished
            outcomes.append("changed before")

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(outcomes) == ["changed before", "moved"]
    assert t.get_tenant("acme").strategy == target
    assert content(t, "acme") == before
    assert source_policies(t, "acme") == [] and own_findings(t) == []


@pytest.mark.parametrize(
    ("source", "target"), [("shared", "schema"), ("schema", "database"), ("shared", "database")]
)
def test_a_process_whose_cache_predates_the_move_is_refused_at_the_source(
    t: Tenancy, source: str, target: str
) -> None:
    """Another process still routes the tenant to where it was (its registry cache has not caught
    up): the database refuses its transactions there, so it cannot write rows the moved tenant
    would never see again."""
    t.create_tenant("initech", placement=source)
    seed(t, "initech")
    stale = Tenancy(
        t.url,
        admin_url=t.admin_url,
        metadata=t.metadata,
        infrastructure_schemas=t.infrastructure_schemas,
        name_prefix=t.name_prefix,
        secret_key=SECRET,
        registry_ttl=300.0,
        registry_listen=False,  # nothing tells this one
    )
    try:
        before = content(stale, "initech")  # its cache now routes acme to the source
        t.move_tenant("initech", target)
        assert stale.get_tenant("initech").placement == source  # not caught up
        with tenant_context("initech"), stale.sessionmaker()() as s:
            s.add(Project(name="written by a stale process"))
            with pytest.raises(TenantRefused, match=f"may not be served as a {source} tenant"):
                s.commit()
        assert content(t, "initech") == before  # the moved tenant has its rows, and no stray one
        with t.admin_engine.connect() as conn:
            stray = conn.execute(
                text("select count(*) from projects where name = 'written by a stale process'")
            ).scalar()
        assert stray == 0
    finally:
        stale.dispose()


def test_the_switch_waits_for_the_transactions_admitted_at_the_source(
    t: Tenancy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction of the tenant that began at the source before the switch (it could still
    write once the read-only policies went with the switch) ends first; if it does not, the move
    stops before switching and the tenant stays where it was, with every row."""
    import sqla_tenancy.move as move

    monkeypatch.setattr(move, "SWITCH_TIMEOUT", 1.0)
    before = content(t, "acme")
    with tenant_context("acme"), t.connect() as holder:
        # admitted (the binding's admission), touching no table yet, and left open: the
        # read-only step does not wait for it, the switch must
        holder.execute(text("select 1"))
        with pytest.raises(MoveError, match="still running at its source"):
            t.move_tenant("acme", "schema")
    assert t.get_tenant("acme").placement == "shared"
    assert content(t, "acme") == before and policies(t) == []
    assert t.move_tenant("acme", "schema").placement == "schema"  # nothing in flight now
    assert content(t, "acme") == before
