"""The anonymous database role, written once and run against every placement.

Inside ``tenant_context(tenant, anonymous=True)`` PostgreSQL itself decides: the opted-in tables
are readable (the tenant's rows only, and only those their row filter admits), every other table
and every write is ``permission denied``, and nothing of the role outlives the transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection, Text, delete, exc, func, insert, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqla_tenancy import ProvisioningError, Tenancy, Tenant, TenantScoped, anonymous_readable, tenant_context
from sqla_tenancy.anonymous import anonymous_role, tenant_anonymous_role
from sqla_tenancy.context import current_is_anonymous
from sqla_tenancy.testing import TestServer

from .conftest import SECRET


class Base(DeclarativeBase):
    pass


class Article(TenantScoped, Base):
    """Readable anonymously, public rows only."""

    __tablename__ = "articles"
    __table_args__ = {"info": anonymous_readable(where="is_public")}

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(Text)
    is_public: Mapped[bool] = mapped_column(default=False)


class Category(TenantScoped, Base):
    """Readable anonymously, every row of the tenant."""

    __tablename__ = "categories"
    __table_args__ = {"info": anonymous_readable()}

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(Text)


class Invoice(TenantScoped, Base):
    """Not opted in: private."""

    __tablename__ = "invoices"

    id: Mapped[int] = mapped_column(primary_key=True)
    amount: Mapped[int]


class Profile(TenantScoped, Base):
    """Infrastructure, readable anonymously, public rows only."""

    __tablename__ = "profiles"
    __table_args__ = {"schema": "directory", "info": anonymous_readable(where="is_public")}

    id: Mapped[int] = mapped_column(primary_key=True)
    handle: Mapped[str] = mapped_column(Text)
    is_public: Mapped[bool] = mapped_column(default=False)


class Account(TenantScoped, Base):
    """Infrastructure, not opted in."""

    __tablename__ = "accounts"
    __table_args__ = {"schema": "directory"}

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(Text)


def denied(error: pytest.ExceptionInfo[exc.DBAPIError]) -> bool:
    return isinstance(error.value.orig, psycopg.errors.InsufficientPrivilege)


@dataclass
class World:
    tenancy: Tenancy
    a: Tenant
    b: Tenant
    Session: sessionmaker[Session]

    def anonymous_role(self, tenant: Tenant) -> str:
        if tenant.strategy == "shared":
            return anonymous_role(self.tenancy.config)
        return tenant_anonymous_role(self.tenancy.config, tenant.slug)


class AnonymousSuite:
    placement: str
    #: whether the placement's anonymous role reaches opted-in infrastructure tables
    reads_infrastructure = True

    @pytest.fixture
    def world(self, tenancy_factory: Callable[..., Tenancy], tenancy_server: TestServer) -> Iterator[World]:
        tenancy = tenancy_factory(Base.metadata, infrastructure_schemas=("directory",), secret_key=SECRET)
        tenancy.install()
        if self.placement == "database":
            tenancy.prepare_server(tenancy_server.superuser_url)
        a = tenancy.create_tenant("acme", placement=self.placement)
        b = tenancy.create_tenant("globex", placement=self.placement)
        maker = tenancy.sessionmaker()
        for tenant in (a, b):
            slug = tenant.slug
            with tenant_context(tenant), maker() as s:
                s.add_all(
                    [
                        Article(title=f"{slug}-public", is_public=True),
                        Article(title=f"{slug}-draft", is_public=False),
                        Category(name=f"{slug}-c1"),
                        Category(name=f"{slug}-c2"),
                        Invoice(amount=100),
                        Profile(handle=f"{slug}-shown", is_public=True),
                        Profile(handle=f"{slug}-hidden", is_public=False),
                        Account(email=f"owner@{slug}.test"),
                    ]
                )
                s.commit()
        yield World(tenancy, a, b, maker)

    # -- what the anonymous role may read ---------------------------------------------------------

    def test_an_opted_in_table_shows_the_tenants_rows_only(self, world: World) -> None:
        for tenant in (world.a, world.b):
            with tenant_context(tenant, anonymous=True), world.Session() as s:
                names = s.scalars(select(Category.name).order_by(Category.name)).all()
                raw = s.execute(text("select name from categories order by name")).scalars().all()
            assert names == raw == [f"{tenant.slug}-c1", f"{tenant.slug}-c2"]

    def test_a_row_filter_applies_on_top_of_the_tenant_policy(self, world: World) -> None:
        with tenant_context(world.a, anonymous=True), world.Session() as s:
            assert s.scalars(select(Article.title)).all() == ["acme-public"]
            # naming the hidden rows does not help
            assert s.scalars(select(Article.title).where(Article.is_public.is_(False))).all() == []
        with tenant_context(world.a), world.Session() as s:  # the full role sees every row
            assert sorted(s.scalars(select(Article.title))) == ["acme-draft", "acme-public"]

    def test_a_table_not_opted_in_is_permission_denied(self, world: World) -> None:
        with tenant_context(world.a, anonymous=True), world.Session() as s:
            with pytest.raises(exc.ProgrammingError) as error:
                s.execute(select(func.count()).select_from(Invoice))
            assert denied(error)
            s.rollback()
            with pytest.raises(exc.ProgrammingError) as error:
                s.execute(text("select * from invoices"))
            assert denied(error)

    @pytest.mark.parametrize(
        "statement",
        [
            insert(Category).values(name="x"),
            update(Category).values(name="x"),
            delete(Category),
            insert(Article).values(title="x", is_public=True),
            update(Article).values(is_public=True),
            delete(Article),
            text("truncate categories"),
        ],
        ids=[
            "insert",
            "update",
            "delete",
            "insert-filtered",
            "update-filtered",
            "delete-filtered",
            "truncate",
        ],
    )
    def test_writes_are_permission_denied(self, world: World, statement: Any) -> None:
        with tenant_context(world.a, anonymous=True), world.Session() as s:
            with pytest.raises(exc.ProgrammingError) as error:
                s.execute(statement)
            assert denied(error)
        with tenant_context(world.a), world.Session() as s:
            assert s.scalar(select(func.count()).select_from(Category)) == 2
            assert s.scalar(select(func.count()).select_from(Article)) == 2

    def test_the_orm_cannot_flush_anonymously(self, world: World) -> None:
        with tenant_context(world.a, anonymous=True), world.Session() as s:
            s.add(Category(name="smuggled"))
            with pytest.raises(exc.ProgrammingError) as error:
                s.flush()
            assert denied(error)

    def test_the_tenant_registry_is_out_of_reach(self, world: World) -> None:
        with tenant_context(world.a, anonymous=True), world.Session() as s:
            # permission denied in the main database; no such table in a tenant database
            with pytest.raises(exc.ProgrammingError):
                s.execute(text("select slug, access_key_hash from tenancy.tenants"))

    def test_infrastructure_tables_follow_the_same_opt_in(self, world: World) -> None:
        with tenant_context(world.a, anonymous=True), world.Session() as s:
            if self.reads_infrastructure:
                assert s.scalars(select(Profile.handle)).all() == ["acme-shown"]
            else:
                with pytest.raises(exc.ProgrammingError) as error:
                    s.execute(select(Profile.handle))
                assert denied(error)
            s.rollback()
            with pytest.raises(exc.ProgrammingError) as error:
                s.execute(select(Account.email))
            assert denied(error)

    async def test_async_sessions_are_anonymous_too(self, world: World) -> None:
        maker = world.tenancy.async_sessionmaker()
        try:
            with tenant_context(world.b, anonymous=True):
                async with maker() as s:
                    assert (await s.scalars(select(Category.name).order_by(Category.name))).all() == [
                        "globex-c1",
                        "globex-c2",
                    ]
                    with pytest.raises(exc.ProgrammingError) as error:
                        await s.execute(select(Invoice.amount))
                    assert denied(error)
        finally:
            await world.tenancy.dispose_async()

    # -- the role is the transaction's, and nothing else's -------------------------------------------

    def test_the_role_lasts_one_transaction_on_a_pooled_connection(self, world: World) -> None:
        role = world.anonymous_role(world.a)

        def current_user(conn: Connection) -> str:
            return str(conn.execute(text("select current_user")).scalar())

        with tenant_context(world.a), world.tenancy.connect() as conn:
            full_user = current_user(conn)
            conn.rollback()
            session_user = str(conn.connection.dbapi_connection.execute("select session_user").fetchone()[0])  # type: ignore[union-attr,index]
            assert full_user != role
            for end in (conn.commit, conn.rollback):
                with tenant_context(world.a, anonymous=True):
                    assert current_user(conn) == role
                    end()
                # between transactions, on the same physical connection: the login role, no switch
                driver = conn.connection.dbapi_connection
                assert driver is not None and driver.info.transaction_status == 0
                row = driver.execute("select current_user, current_setting('role')").fetchone()
                assert row == (session_user, "none")
                assert current_user(conn) == full_user  # the outer, full-privilege context again
                assert conn.execute(select(func.count()).select_from(Invoice)).scalar() == 1
                conn.rollback()

    def test_a_failed_anonymous_transaction_leaves_nothing_either(self, world: World) -> None:
        with tenant_context(world.a), world.tenancy.connect() as conn:
            with tenant_context(world.a, anonymous=True), pytest.raises(exc.ProgrammingError):
                conn.execute(text("select * from invoices"))
            conn.rollback()
            assert conn.execute(select(func.count()).select_from(Invoice)).scalar() == 1

    def test_one_session_keeps_anonymous_and_full_work_apart(self, world: World) -> None:
        with world.Session() as s:
            with tenant_context(world.a):
                full = s.scalars(select(Category).where(Category.name == "acme-c1")).one()
                s.add(Invoice(amount=7))
                s.flush()  # a write in the full transaction, not committed yet
            with tenant_context(world.a, anonymous=True):
                anonymous = s.get(Category, full.id)
                assert anonymous is not None and anonymous is not full  # its own identity-map entry
                assert world.tenancy.identity_token() == f"{world.a.id}:anonymous"
                with pytest.raises(exc.ProgrammingError):  # its own transaction, not the full one
                    s.execute(select(Invoice.amount))
            with tenant_context(world.a):
                assert s.get(Category, full.id) is full
                assert sorted(s.scalars(select(Invoice.amount))) == [7, 100]

    def test_reset_role_returns_to_the_login_role_a_known_limit(self, world: World) -> None:
        """The switch is ``SET LOCAL ROLE``: SQL running in the transaction can undo it, since the
        login role is the session user. It guards the application's queries, not injected SQL.
        The tenant binding stays in force."""
        with tenant_context(world.a, anonymous=True), world.tenancy.connect() as conn:
            conn.execute(text("reset role"))
            users = conn.execute(text("select current_user = session_user")).scalar()
            tenant = conn.execute(text("select tenancy.current_tenant_id()")).scalar()
            assert (users, tenant) == (True, world.a.id)

    def test_a_suspended_tenant_is_refused_anonymously_too(self, world: World) -> None:
        world.tenancy.suspend_tenant("globex")
        from sqla_tenancy import TenantSuspended

        with tenant_context("globex", anonymous=True), world.Session() as s, pytest.raises(TenantSuspended):
            s.execute(select(Category.name))

    def test_context_reports_anonymity(self, world: World) -> None:
        assert not current_is_anonymous()
        with tenant_context(world.a, anonymous=True):
            assert current_is_anonymous()
            with tenant_context(world.a):
                assert not current_is_anonymous()
            assert current_is_anonymous()
        assert not current_is_anonymous()

    def test_deleting_the_tenant_drops_its_anonymous_role(self, world: World) -> None:
        role = world.anonymous_role(world.b)
        world.tenancy.delete_tenant("globex")
        with world.tenancy.admin_engine.connect() as conn:
            exists = conn.execute(text("select 1 from pg_roles where rolname = :r"), {"r": role}).first()
        assert (exists is not None) == (self.placement == "shared")  # shared: one role for all


class TestSharedPlacement(AnonymousSuite):
    placement = "shared"


class TestSchemaPlacement(AnonymousSuite):
    placement = "schema"


class TestDatabasePlacement(AnonymousSuite):
    placement = "database"
    # foreign tables are not granted to a database tenant's anonymous role (documented limit)
    reads_infrastructure = False


# -- opt-in and installation ---------------------------------------------------------------------------


def test_a_row_filter_needs_a_tenant_scoped_table(tenancy_factory: Callable[..., Tenancy]) -> None:
    from sqlalchemy import Column, Integer, MetaData, Table

    metadata = MetaData()
    Table("plans", metadata, Column("id", Integer, primary_key=True), info=anonymous_readable(where="true"))
    with pytest.raises(ProvisioningError, match="TenantScoped"):
        tenancy_factory(metadata).install()


def test_anonymous_readable_refuses_an_empty_filter() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        anonymous_readable(where=" ")


def test_install_is_idempotent_and_takes_back_an_opt_in(tenancy_factory: Callable[..., Tenancy]) -> None:
    tenancy = tenancy_factory(Base.metadata, infrastructure_schemas=("directory",))
    tenancy.install()
    tenancy.install()
    role = anonymous_role(tenancy.config)

    def privileges() -> set[str]:
        with tenancy.admin_engine.connect() as conn:
            return set(
                conn.execute(
                    text(
                        "select table_name || ':' || privilege_type "
                        "from information_schema.role_table_grants where grantee = :r"
                    ),
                    {"r": role},
                ).scalars()
            )

    assert privileges() == {"articles:SELECT", "categories:SELECT"}
    Category.__table__.info.pop("sqla_tenancy.anonymous")
    try:
        tenancy.install()
        assert privileges() == {"articles:SELECT"}
    finally:
        Category.__table__.info.update(anonymous_readable())


def test_the_application_role_keeps_its_privileges_and_sees_no_filter(
    tenancy_factory: Callable[..., Tenancy],
) -> None:
    """The application role may switch to the anonymous roles but inherits neither their
    privileges nor their policies (the gate role is NOINHERIT, on every PostgreSQL version)."""
    tenancy = tenancy_factory(Base.metadata, infrastructure_schemas=("directory",))
    tenancy.install()
    slug = f"t{uuid.uuid4().hex[:6]}"
    tenancy.create_tenant(slug)
    with tenant_context(slug), tenancy.sessionmaker()() as s:
        s.add_all([Article(title="shown", is_public=True), Article(title="draft")])
        s.commit()
        role = anonymous_role(tenancy.config)
        inherits = s.execute(text("select pg_has_role(current_user, :r, 'USAGE')"), {"r": role}).scalar()
        can_switch = s.execute(text("select pg_has_role(current_user, :r, 'MEMBER')"), {"r": role}).scalar()
        assert (inherits, can_switch) == (False, True)
        assert sorted(s.scalars(select(Article.title))) == ["draft", "shown"]
