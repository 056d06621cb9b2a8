"""Keys in shared tables: foreign keys and unique constraints stay within one tenant.

PostgreSQL checks keys, and runs ON DELETE actions, without row-level security. The suite attacks
the test model the way one tenant would attack another (attach rows to its project, have its
delete cascade into our rows, probe which values exist there) and runs per placement: in the
shared placement the keys are what stops the attack, in the schema and database placements the
same keys must simply work.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    exc,
    func,
    select,
    text,
)
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

from sqla_tenancy import (
    Tenancy,
    Tenant,
    TenantScoped,
    UnsafeKeyError,
    tenant_context,
    tenant_foreign_key,
    tenant_id_column,
    tenant_unique,
    unique_across_tenants,
    unsafe_keys,
)
from sqla_tenancy.keys import UnsafeKey
from sqla_tenancy.testing import TestServer

from .conftest import SECRET
from .models import Project, Task, User


@dataclass
class World:
    tenancy: Tenancy
    acme: Tenant
    globex: Tenant
    Session: sessionmaker[Session]
    #: the id of one of acme's projects that globex has no project with
    acme_only_project: int

    def tasks_of(self, tenant: Tenant) -> list[str]:
        with tenant_context(tenant), self.Session() as s:
            return sorted(s.scalars(select(Task.title)))


class TenantKeysSuite:
    placement: str

    @pytest.fixture
    def world(self, tenancy: Tenancy, tenancy_server: TestServer) -> Iterator[World]:
        if self.placement == "database":
            tenancy.prepare_server(tenancy_server.superuser_url)
        acme = tenancy.create_tenant("acme", placement=self.placement)
        globex = tenancy.create_tenant("globex", placement=self.placement)
        maker = tenancy.sessionmaker()
        ids: dict[str, set[int]] = {}
        for tenant, names in ((acme, ["a1", "a2", "a3"]), (globex, ["b1"])):
            with tenant_context(tenant), maker() as s:
                projects = [Project(name=n) for n in names]
                s.add_all(projects)
                s.flush()
                s.add_all(Task(project_id=p.id, title=f"{p.name}-task") for p in projects)
                s.commit()
                ids[tenant.slug] = {p.id for p in projects}
        target = max(ids["acme"] - ids["globex"])
        yield World(tenancy, acme, globex, maker, target)

    def test_a_tenant_cannot_attach_a_row_to_another_tenants_parent(self, world: World) -> None:
        with tenant_context(world.globex), world.Session() as s:
            s.add(Task(project_id=world.acme_only_project, title="intruder"))
            with pytest.raises(exc.IntegrityError, match="foreign key"):
                s.flush()

    def test_a_tenants_delete_never_cascades_into_another_tenants_rows(self, world: World) -> None:
        # the attack first: whether PostgreSQL lets it through or not, the delete must not reach b
        with tenant_context(world.globex), world.Session() as s:
            s.add(Task(project_id=world.acme_only_project, title="intruder"))
            try:
                s.commit()
            except exc.IntegrityError:
                s.rollback()
        globex_before = world.tasks_of(world.globex)
        with tenant_context(world.acme), world.Session() as s:
            for project in s.scalars(select(Project)):
                s.delete(project)
            s.commit()
        assert world.tasks_of(world.acme) == []  # the cascade ran, within acme
        assert world.tasks_of(world.globex) == globex_before
        with tenant_context(world.globex), world.Session() as s:
            assert s.scalar(select(func.count()).select_from(Project)) == 1

    def test_a_value_another_tenant_holds_is_no_error_for_this_one(self, world: World) -> None:
        for tenant in (world.acme, world.globex):
            with tenant_context(tenant), world.Session() as s:
                s.add(User(email="bob@x.test"))
                s.commit()  # no duplicate-key error telling globex that acme has bob
        for tenant in (world.acme, world.globex):
            with tenant_context(tenant), world.Session() as s:
                assert s.scalars(select(User.email)).all() == ["bob@x.test"]

    def test_a_duplicate_within_one_tenant_is_still_refused(self, world: World) -> None:
        with tenant_context(world.globex), world.Session() as s:
            s.add(User(email="bob@x.test"))
            s.commit()
        with tenant_context(world.globex), world.Session() as s:
            s.add(User(email="bob@x.test"))
            with pytest.raises(exc.IntegrityError, match="duplicate key"):
                s.commit()

    def test_a_tenants_own_references_and_cascades_still_work(self, world: World) -> None:
        with tenant_context(world.globex), world.Session() as s:
            project = s.scalars(select(Project)).one()
            s.add(Task(project_id=project.id, title="b1-second"))
            s.commit()
        assert world.tasks_of(world.globex) == ["b1-second", "b1-task"]
        with tenant_context(world.globex), world.Session() as s:
            s.delete(s.scalars(select(Project)).one())
            s.commit()
        assert world.tasks_of(world.globex) == []
        assert world.tasks_of(world.acme) == ["a1-task", "a2-task", "a3-task"]

    def test_a_reference_to_no_project_is_refused(self, world: World) -> None:
        with tenant_context(world.acme), world.Session() as s:
            s.add(Task(project_id=2_000_000_000, title="orphan"))
            with pytest.raises(exc.IntegrityError, match="foreign key"):
                s.flush()


class TestSharedPlacement(TenantKeysSuite):
    placement = "shared"


class TestSchemaPlacement(TenantKeysSuite):
    placement = "schema"


class TestDatabasePlacement(TenantKeysSuite):
    placement = "database"


def test_the_tenant_id_of_a_shared_row_comes_from_its_tenant(tenancy: Tenancy) -> None:
    """(The composite key changes nothing about who owns a row.)"""
    globex = tenancy.create_tenant("globex")
    with tenant_context(globex), tenancy.sessionmaker()() as s:
        project = Project(name="p")
        s.add(project)
        s.flush()
        task = Task(project_id=project.id, title="t")
        s.add(task)
        s.commit()
        assert task.tenant_id == project.tenant_id == globex.id
        assert isinstance(task.tenant_id, uuid.UUID)


# -- the unsafe-key check ------------------------------------------------------------------------


def unsafe_model() -> MetaData:
    """Every unsafe shape once, beside the safe ones (plans is global, users' login e-mail is
    unique across tenants on purpose)."""

    class Base(DeclarativeBase):
        pass

    class Project(TenantScoped, Base):
        __tablename__ = "projects"
        id: Mapped[int] = mapped_column(primary_key=True)
        code: Mapped[str] = mapped_column(Text, unique=True)
        handle: Mapped[str] = mapped_column(Text, unique=True, index=True)
        name: Mapped[str] = mapped_column(Text)

    class Task(TenantScoped, Base):
        __tablename__ = "tasks"
        __table_args__ = (
            UniqueConstraint("project_id", "title", name="tasks_title_key"),
            Index("tasks_slug_idx", "slug", unique=True),
        )
        id: Mapped[int] = mapped_column(primary_key=True)
        project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
        plan_id: Mapped[int | None] = mapped_column(ForeignKey("auth.plans.id"))  # global: fine
        title: Mapped[str] = mapped_column(Text)
        slug: Mapped[str] = mapped_column(Text)

    class Plan(Base):
        __tablename__ = "plans"
        __table_args__ = {"schema": "auth"}
        id: Mapped[int] = mapped_column(primary_key=True)

    class Login(TenantScoped, Base):
        __tablename__ = "logins"
        __table_args__ = (unique_across_tenants("email"), {"schema": "auth"})
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str] = mapped_column(Text)

    # Core: a tenant foreign key to a table without UNIQUE (tenant_id, id)
    Table("labels", Base.metadata, Column("id", Integer, primary_key=True), tenant_id_column())
    Table(
        "task_labels",
        Base.metadata,
        Column("id", Integer, primary_key=True),
        Column("label_id", Integer),
        tenant_id_column(),
        tenant_foreign_key(["label_id"], ["labels.id"]),
    )
    return Base.metadata


def findings(metadata: MetaData) -> dict[str, UnsafeKey]:
    return {f"{f.table}: {f.key}": f for f in unsafe_keys(metadata, infrastructure_schemas=["auth"])}


def test_each_unsafe_key_is_reported_with_the_declaration_that_fixes_it() -> None:
    found = findings(unsafe_model())
    assert sorted(found) == [
        "projects: UNIQUE (code) (unique=True on the column)",
        "projects: UNIQUE INDEX ix_projects_handle (handle)",
        "task_labels: FOREIGN KEY (tenant_id, label_id) REFERENCES labels (tenant_id, id)",
        "tasks: FOREIGN KEY (project_id) REFERENCES projects (id)",
        "tasks: UNIQUE (project_id, title)",
        "tasks: UNIQUE INDEX tasks_slug_idx (slug)",
    ]
    plain_fk = found["tasks: FOREIGN KEY (project_id) REFERENCES projects (id)"]
    assert "attach its rows to another tenant's" in plain_fk.problem
    assert "tenant_foreign_key(['project_id'], ['projects.id'], ondelete='CASCADE')" in plain_fk.fix
    column_flag = found["projects: UNIQUE (code) (unique=True on the column)"]
    assert "duplicate-key error" in column_flag.problem
    assert "drop unique=True from column code and add tenant_unique('code')" in column_flag.fix
    assert "unique_across_tenants('code')" in column_flag.fix  # the deliberate alternative
    column_index = found["projects: UNIQUE INDEX ix_projects_handle (handle)"]
    assert "drop unique=True from column handle" in column_index.fix
    assert "tenant_unique('handle')" in column_index.fix
    constraint = found["tasks: UNIQUE (project_id, title)"]
    assert "replace it with tenant_unique('project_id', 'title', name='tasks_title_key')" in constraint.fix
    index = found["tasks: UNIQUE INDEX tasks_slug_idx (slug)"]
    assert "Index('tasks_slug_idx', 'tenant_id', 'slug', unique=True)" in index.fix
    target = found["task_labels: FOREIGN KEY (tenant_id, label_id) REFERENCES labels (tenant_id, id)"]
    assert "no unique constraint on exactly (id, tenant_id)" in target.problem
    assert "add tenant_unique('id') to the table arguments of labels" in target.fix


def test_the_test_model_and_the_example_model_are_safe() -> None:
    from examples.common import INFRASTRUCTURE_SCHEMAS
    from examples.common import Base as ExampleBase

    from .models import INFRASTRUCTURE, Base

    assert unsafe_keys(Base.metadata, infrastructure_schemas=INFRASTRUCTURE) == []
    assert unsafe_keys(ExampleBase.metadata, infrastructure_schemas=INFRASTRUCTURE_SCHEMAS) == []


def test_unique_across_tenants_is_accepted_in_infrastructure_only() -> None:
    metadata = MetaData()
    for schema in ("auth", None):
        Table(
            "logins",
            metadata,
            Column("id", Integer, primary_key=True),
            Column("email", Text),
            tenant_id_column(),
            tenant_unique("id"),
            unique_across_tenants("email"),
            schema=schema,
        )
    found = unsafe_keys(metadata, infrastructure_schemas=["auth"])
    assert [(f.table, f.key) for f in found] == [("logins", "UNIQUE (email)")]
    assert "copied into each schema and database tenant" in found[0].problem
    assert "tenant_unique('email')" in found[0].fix


def test_install_refuses_unsafe_keys_before_creating_anything(
    tenancy_factory: Callable[..., Tenancy],
) -> None:
    tenancy = tenancy_factory(unsafe_model(), infrastructure_schemas=["auth"], secret_key=SECRET)  # no error
    with pytest.raises(UnsafeKeyError) as refused:
        tenancy.install()
    message = str(refused.value)
    assert "6 key(s) of tenant-scoped tables are unsafe" in message
    assert "tenant_foreign_key(['project_id'], ['projects.id'], ondelete='CASCADE')" in message
    assert len(refused.value.findings) == 6
    with tenancy.admin_engine.connect() as conn:
        assert conn.execute(text("select to_regclass('tenancy.tenants')")).scalar() is None
        assert conn.execute(text("select to_regclass('public.tasks')")).scalar() is None


def test_a_shared_tenant_is_refused_where_keys_are_unsafe(
    tenancy: Tenancy, tenancy_factory: Callable[..., Tenancy]
) -> None:
    """(``tenancy`` installed the safe test model; an application whose model has an unsafe key
    is refused a shared tenant, and nothing is registered.)"""
    metadata = MetaData()
    for table in tenancy.metadata.tables.values():
        table.to_metadata(metadata)
    Index("projects_name_idx", metadata.tables["projects"].c.name, unique=True)
    unsafe = tenancy_factory(metadata, infrastructure_schemas=["auth"], secret_key=SECRET)
    with pytest.raises(UnsafeKeyError, match="projects_name_idx"):
        unsafe.create_tenant("globex")
    assert [t.slug for t in tenancy.list_tenants()] == ["default"]


# -- the helpers ---------------------------------------------------------------------------------


def test_the_tenant_columns_are_the_tables_own_whatever_their_names() -> None:
    metadata = MetaData()
    Table(
        "orgs_projects",
        metadata,
        Column("id", Integer, primary_key=True),
        tenant_id_column("org_id"),
        tenant_unique("id"),
    )
    tasks = Table(
        "orgs_tasks",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("project_id", Integer),
        tenant_id_column("account_id"),
        tenant_foreign_key(["project_id"], ["orgs_projects.id"], ondelete="SET NULL", name="orgs_tasks_fk"),
    )
    (fk,) = tasks.foreign_key_constraints
    assert [(e.parent.name, e.target_fullname) for e in fk.elements] == [
        ("account_id", "orgs_projects.org_id"),
        ("project_id", "orgs_projects.id"),
    ]
    assert fk.name == "orgs_tasks_fk"
    assert fk.ondelete == "SET NULL (project_id)"  # never the tenant column
    unique = next(c for c in metadata.tables["orgs_projects"].constraints if isinstance(c, UniqueConstraint))
    assert [c.name for c in unique.columns] == ["org_id", "id"]
    assert unsafe_keys(metadata) == []


def test_the_helpers_refuse_a_table_without_tenant_column() -> None:
    with pytest.raises(ArgumentError, match="no tenant column"):
        Table("plans", MetaData(), Column("id", Integer, primary_key=True), tenant_unique("id"))
    with pytest.raises(ArgumentError, match="as many referenced columns"):
        tenant_foreign_key(["a", "b"], ["t.a"])


def test_set_null_clears_the_reference_and_keeps_the_tenant(tenancy_factory: Callable[..., Tenancy]) -> None:
    metadata = MetaData()
    projects = Table(
        "projects",
        metadata,
        Column("id", Integer, primary_key=True),
        tenant_id_column("org_id"),
        tenant_unique("id"),
    )
    tasks = Table(
        "tasks",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("project_id", Integer, nullable=True),
        tenant_id_column("org_id"),
        tenant_foreign_key(["project_id"], ["projects.id"], ondelete="SET NULL"),
    )
    tenancy = tenancy_factory(metadata, secret_key=SECRET)
    tenancy.install()
    acme = tenancy.create_tenant("acme")
    with tenant_context(acme), tenancy.connect() as conn:
        project = conn.execute(projects.insert().returning(projects.c.id)).scalar_one()
        conn.execute(tasks.insert().values(project_id=project))
        conn.execute(projects.delete())
        assert conn.execute(select(tasks.c.project_id, tasks.c.org_id)).one() == (None, acme.id)


# -- ORM relationships over tenant foreign keys ----------------------------------------------------


@dataclass
class BoardModel:
    Base: type[DeclarativeBase]
    Board: type[Any]
    Owner: type[Any]
    Card: type[Any]


def board_model(*, isolate_owner: bool) -> BoardModel:
    """Cards reference a board and an owner, both through tenant foreign keys, with relationships
    on both sides. Each relationship would write ``cards.tenant_id`` from its parent; with
    ``isolate_owner`` the owner's side writes ``owner_id`` only (``foreign()`` in its join, or
    ``foreign_keys=``), which is what SQLAlchemy's overlap warning asks for."""

    class Base(DeclarativeBase):
        pass

    owner_join = "and_(Owner.tenant_id == Card.tenant_id, Owner.id == foreign(Card.owner_id))"
    owner_kw: dict[str, object] = {"primaryjoin": owner_join} if isolate_owner else {}

    class Board(TenantScoped, Base):
        __tablename__ = "boards"
        id: Mapped[int] = mapped_column(primary_key=True)
        cards: Mapped[list[Card]] = relationship(back_populates="board", cascade="all, delete-orphan")

    class Owner(TenantScoped, Base):
        __tablename__ = "owners"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(Text)
        cards: Mapped[list[Card]] = relationship(back_populates="owner", **owner_kw)  # type: ignore[call-overload]

    class Card(TenantScoped, Base):
        __tablename__ = "cards"
        __table_args__ = (
            tenant_foreign_key(["board_id"], ["boards.id"], ondelete="CASCADE"),
            tenant_foreign_key(["owner_id"], ["owners.id"]),
        )
        id: Mapped[int] = mapped_column(primary_key=True)
        board_id: Mapped[int]
        owner_id: Mapped[int]
        board: Mapped[Board] = relationship(back_populates="cards")
        owner: Mapped[Owner] = relationship(back_populates="cards", **owner_kw)  # type: ignore[call-overload]

    return BoardModel(Base, Board, Owner, Card)


def test_two_tenant_foreign_keys_with_relationships_on_both_sides_need_foreign() -> None:
    with pytest.warns(exc.SAWarning, match=r"copy column \w+\.tenant_id to column cards\.tenant_id"):
        board_model(isolate_owner=False).Base.registry.configure()
    board_model(isolate_owner=True).Base.registry.configure()  # no warning (warnings are errors here)


def test_foreign_keys_argument_isolates_the_written_column_too() -> None:
    class Base(DeclarativeBase):
        pass

    class Owner(TenantScoped, Base):
        __tablename__ = "owners"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Team(TenantScoped, Base):
        __tablename__ = "teams"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Member(TenantScoped, Base):
        __tablename__ = "members"
        __table_args__ = (
            tenant_foreign_key(["team_id"], ["teams.id"]),
            tenant_foreign_key(["owner_id"], ["owners.id"]),
        )
        id: Mapped[int] = mapped_column(primary_key=True)
        team_id: Mapped[int] = mapped_column()
        owner_id: Mapped[int] = mapped_column()
        team: Mapped[Team] = relationship()
        owner: Mapped[Owner] = relationship(foreign_keys=[owner_id])

    Base.registry.configure()
    assert str(Member.owner.property.primaryjoin) == "owners.id = members.owner_id"
    assert len(Member.team.property.synchronize_pairs) == 2  # tenant_id and team_id


def test_relationships_over_tenant_keys_load_and_flush(tenancy_factory: Callable[..., Tenancy]) -> None:
    model = board_model(isolate_owner=True)
    Board, Owner, Card = model.Board, model.Owner, model.Card
    tenancy = tenancy_factory(model.Base.metadata, secret_key=SECRET)
    tenancy.install()
    acme, globex = tenancy.create_tenant("acme"), tenancy.create_tenant("globex")
    Session = tenancy.sessionmaker()
    with tenant_context(acme), Session() as s:
        board, owner = Board(), Owner(name="wile")
        board.cards.append(Card(owner=owner))
        s.add(board)
        s.commit()
        board_id = board.id
    with tenant_context(acme), Session() as s:
        card = s.scalars(select(Card).options(selectinload(Card.board), selectinload(Card.owner))).one()
        assert (card.board.id, card.owner.name, card.tenant_id) == (board_id, "wile", acme.id)
    with tenant_context(globex), Session() as s:
        intruder = Owner(name="hank")
        s.add(intruder)
        s.flush()
        s.add(Card(board_id=board_id, owner=intruder))  # acme's board, by id
        with pytest.raises(exc.IntegrityError, match="foreign key"):
            s.flush()


def test_tenant_scoped_tables_get_one_unique_target_for_tenant_foreign_keys() -> None:
    class Base(DeclarativeBase):
        pass

    class Person(TenantScoped, Base):
        __tablename__ = "people"
        id: Mapped[int] = mapped_column(primary_key=True)
        kind: Mapped[str] = mapped_column(Text)
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "person"}

    class Engineer(Person):  # single-table inheritance: the same table, no second key
        __mapper_args__ = {"polymorphic_identity": "engineer"}

    class Explicit(TenantScoped, Base):
        __tablename__ = "explicit"
        __table_args__ = (tenant_unique("id", name="explicit_key"),)
        id: Mapped[int] = mapped_column(primary_key=True)

    class Composite(TenantScoped, Base):
        __tablename__ = "composite"
        id: Mapped[int] = mapped_column(primary_key=True)
        tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)

    def uniques(table: Table) -> list[tuple[str | None, list[str]]]:
        found = [c for c in table.constraints if isinstance(c, UniqueConstraint)]
        return [(str(c.name), [col.name for col in c.columns]) for c in found]

    assert uniques(Person.__table__) == [("people_tenant_key", ["tenant_id", "id"])]
    assert Engineer.__table__ is Person.__table__
    assert uniques(Explicit.__table__) == [("explicit_key", ["tenant_id", "id"])]
    assert uniques(Composite.__table__) == []  # its primary key is the target


def test_unnamed_tenant_keys_are_named_as_postgresql_would_unless_a_convention_names_them() -> None:
    from .models import Task, User

    assert {c.name for c in Task.__table__.foreign_key_constraints} == {"tasks_tenant_id_project_id_fkey"}
    assert "users_tenant_id_email_key" in {c.name for c in User.__table__.constraints}
    named = MetaData(
        naming_convention={"fk": "fk_%(table_name)s_%(column_0_name)s", "uq": "uq_%(table_name)s"}
    )
    Table("p", named, Column("id", Integer, primary_key=True), tenant_id_column(), tenant_unique("id"))
    t = Table(
        "t",
        named,
        Column("id", Integer, primary_key=True),
        Column("p_id", Integer),
        tenant_id_column(),
        tenant_foreign_key("p_id", "p.id"),
    )
    assert {c.name for c in t.foreign_key_constraints} == {"fk_t_tenant_id"}
    assert {c.name for c in named.tables["p"].constraints if isinstance(c, UniqueConstraint)} == {"uq_p"}
