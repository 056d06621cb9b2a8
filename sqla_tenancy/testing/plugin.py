"""pytest fixtures for sqla-tenancy and for applications built on it (registered as the
``sqla_tenancy`` plugin through the ``pytest11`` entry point).

The plugin is inert: nothing runs unless a test asks for one of its fixtures.

The server and throwaway databases:

``tenancy_server``
    a session-wide :class:`TestServer` (a throwaway cluster, or ``$SQLA_TENANCY_TEST_DSN``) with an
    application role and an admin role, both password-authenticated.
``tenancy_database``
    the name of a fresh database owned by the admin role, dropped after the test.
``tenancy_factory``
    ``tenancy_factory(metadata, **kwargs) -> Tenancy`` on ``tenancy_database``; every Tenancy it
    made is disposed after the test.

The application's own :class:`Tenancy` (see ``docs/testing.md``):

``tenancy_app``
    the application's Tenancy, as its code imports it: named by the ``sqla_tenancy_app`` ini
    option (``myapp.db:tenancy``), or override this fixture.
``app_tenancy``
    the same object, rebound once per test session to a database of the test server (the
    application's URLs are never used), prepared for database tenants, migrated (the project's
    Alembic migrations when it has them, else ``metadata.create_all``) and installed.
``tenant``
    a tenant for the test, active (``tenant_context``) for the whole test; its placement comes from
    ``@pytest.mark.tenant(placement=...)`` (``"all"``: the test runs once per placement). Shared and
    schema tenants are reused between tests and every test's writes are rolled back (the
    application's ``commit()`` releases a SAVEPOINT); a pooled database tenant is emptied after
    each test; ``fresh=True`` on the marker provisions a tenant for the test.
``make_tenant``, ``as_tenant``, ``tenant_session``, ``platform_session``, ``tenant_factory``,
``tenant_isolation``, ``flask_client``, ``asgi_client`` (with ``tenant_token`` and
``tenant_header``, which applications override)
    see their docstrings.

The rebinding re-runs ``Tenancy.__init__`` on the application's object with the test server's
URLs and the application's other settings (``servers=`` aside: those are the application's
servers), so that modules which imported the object at start-up use the test database too.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, MetaData, create_engine, event
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from ..config import plain_url
from ..context import tenant_context
from ..errors import TenancyError
from ..placements.shared import delete_tenant_rows
from ..registry import Tenant
from ..rls import qualified_name
from ..session import TenantSession, pin_connection, unpin_connection
from ..tenancy import Tenancy
from .isolation import ALL_PLACEMENTS, IsolationReport, assert_tenant_isolation
from .server import TestServer

__all__ = [
    "TenantKit",
    "app_tenancy",
    "as_tenant",
    "asgi_client",
    "flask_client",
    "hmac_token_minter",
    "load_tenancy",
    "make_tenant",
    "platform_session",
    "rebind",
    "tenancy_app",
    "tenancy_database",
    "tenancy_factory",
    "tenancy_server",
    "tenant",
    "tenant_factory",
    "tenant_header",
    "tenant_isolation",
    "tenant_placement",
    "tenant_session",
    "tenant_token",
]

APP_INI = "sqla_tenancy_app"
#: placements whose per-test isolation is a rolled-back outer transaction (SAVEPOINTs inside)
ROLLBACK_PLACEMENTS = ("shared", "schema")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        APP_INI,
        "The application's Tenancy as module:attribute (e.g. myapp.db:tenancy), for the tenant fixtures.",
        default="",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "tenant(placement='shared', fresh=False): the placement of the `tenant` fixture's tenant: "
        "'shared', 'schema', 'database', or 'all' (or a list) to run the test once per placement; "
        "fresh=True provisions a tenant for the test instead of reusing a pooled one.",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "tenant_placement" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("tenant")
    wanted = marker.kwargs.get("placement", "shared") if marker is not None else "shared"
    placements = list(ALL_PLACEMENTS) if wanted == "all" else wanted
    if isinstance(placements, (list, tuple)):
        metafunc.parametrize("tenant_placement", list(placements), ids=list(placements))


# -- the server and throwaway databases -----------------------------------------------------------


@pytest.fixture(scope="session")
def tenancy_server() -> Iterator[TestServer]:
    server = TestServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tenancy_database(tenancy_server: TestServer) -> Iterator[str]:
    name = tenancy_server.create_database()
    try:
        yield name
    finally:
        tenancy_server.drop_database(name)


@pytest.fixture
def tenancy_factory(tenancy_server: TestServer, tenancy_database: str) -> Iterator[Callable[..., Tenancy]]:
    made: list[Tenancy] = []

    def factory(metadata: MetaData, **kwargs: Any) -> Tenancy:
        tenancy = tenancy_server.tenancy(tenancy_database, metadata, **kwargs)
        made.append(tenancy)
        return tenancy

    yield factory
    for tenancy in made:
        tenancy.dispose()


# -- the application's Tenancy --------------------------------------------------------------------


def load_tenancy(spec: str) -> Tenancy:
    """The :class:`Tenancy` named by ``module:attribute`` (the attribute may be a function
    returning it)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise pytest.UsageError(f"{APP_INI} = {spec!r} is not module:attribute (e.g. myapp.db:tenancy).")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise pytest.UsageError(f"{APP_INI}: cannot import {module_name!r}: {exc}") from exc
    value = getattr(module, attribute, None)
    if callable(value) and not isinstance(value, Tenancy):
        value = value()
    if not isinstance(value, Tenancy):
        raise pytest.UsageError(
            f"{APP_INI} = {spec!r} is not a sqla_tenancy.Tenancy (got {type(value).__name__})."
        )
    return value


def rebind(tenancy: Tenancy, server: TestServer, database: str, *, secret_key: str | None = None) -> None:
    """Point ``tenancy`` (the application's own object, so that every module holding it follows)
    at ``database`` on the test server: the application and admin roles of the server, a name
    prefix of its own; every other setting is kept. Other servers are dropped (their URLs are the
    application's)."""
    config = tenancy.config
    kept = {
        f.name: getattr(config, f.name)
        for f in fields(config)
        if f.name
        not in ("url", "admin_url", "registry_url", "servers", "name_prefix", "secret_key", "migrations")
    }
    kept["infrastructure_schemas"] = tuple(kept["infrastructure_schemas"])
    kept["engine_options"] = dict(kept["engine_options"])
    migrations = config.migrations.value
    tenancy.dispose()
    Tenancy.__init__(
        tenancy,
        server.url(database),
        admin_url=server.url(database, role="admin"),
        name_prefix=server.name_prefix(database),
        secret_key=config.secret_key or secret_key or secrets.token_urlsafe(24),
        migrations=migrations,
        **kept,
    )


def _migrate(tenancy: Tenancy) -> None:
    """The project's migrations (both streams to head) when it has them; then :meth:`install`,
    which creates what is missing from the models (everything, when there are no migrations)."""
    if tenancy.migrations is not None:
        from alembic import command
        from alembic.config import Config

        config = (
            tenancy.migrations if isinstance(tenancy.migrations, Config) else Config(str(tenancy.migrations))
        )
        config.attributes["tenancy"] = tenancy
        command.upgrade(config, "head")
    tenancy.install()


@pytest.fixture(scope="session")
def tenancy_app(pytestconfig: pytest.Config) -> Tenancy:
    """The application's Tenancy: override this fixture, or set the ``sqla_tenancy_app`` ini
    option (``myapp.db:tenancy``)."""
    spec = str(pytestconfig.getini(APP_INI) or "")
    if not spec:
        raise pytest.UsageError(
            "The tenant fixtures need your application's Tenancy: add `sqla_tenancy_app = "
            "myapp.db:tenancy` to your pytest configuration, or override the `tenancy_app` fixture."
        )
    return load_tenancy(spec)


@dataclass
class TenantKit:
    """The session-wide state of the tenant fixtures (the ``app_tenancy`` fixture's companion)."""

    tenancy: Tenancy
    #: a reusable tenant per placement (shared, schema), its writes rolled back after each test
    pool: dict[str, Tenant] = field(default_factory=dict)
    #: set when something committed on an application engine during the current test
    dirty: bool = False
    serial: int = 0
    #: admin engines of the pooled database tenants' databases
    admins: dict[Any, Engine] = field(default_factory=dict)

    def slug(self, stem: str = "t") -> str:
        self.serial += 1
        return f"{stem}{self.serial}_{secrets.token_hex(2)}"

    def pooled(self, placement: str) -> Tenant:
        tenant = self.pool.get(placement)
        if tenant is None:
            tenant = self.pool[placement] = self.tenancy.create_tenant(
                self.slug(f"pool_{placement}_"), placement=placement
            )
        return tenant

    def empty(self, tenant: Tenant) -> None:
        """Remove every row of a pooled database tenant: its own tables are truncated (identities
        restarted), its rows in the infrastructure tables deleted."""
        engine = self.admins.get(tenant.id)
        if engine is None:
            target = self.tenancy.placement(tenant.strategy).dump_target(tenant)
            assert target is not None
            engine = self.admins[tenant.id] = create_engine(plain_url(target[0]), poolclass=NullPool)
        tables = [t for t in self.tenancy.tenant_tables() if t.schema is None]
        if tables:
            names = ", ".join(qualified_name(t) for t in tables)
            with engine.begin() as conn:
                conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
        with self.tenancy.admin_engine.begin() as admin:
            delete_tenant_rows(tenant, self.tenancy.infrastructure_tables(), admin=admin)

    def close(self) -> None:
        for engine in self.admins.values():
            engine.dispose()

    def reset(self, placement: str) -> None:
        """Forget the pooled tenant after a test committed outside the rolled-back transaction
        (Core connections of its own, async sessions): its rows are deleted, or the tenant."""
        tenant = self.pool.get(placement)
        if tenant is None:
            return
        if placement == "shared":
            services = self.tenancy.services
            order = {t: i for i, t in enumerate(self.tenancy.metadata.sorted_tables)}
            tables = sorted(
                [*services.config.tenant_tables(), *services.config.infrastructure_tables()],
                key=order.__getitem__,
                reverse=True,
            )
            with self.tenancy.admin_engine.begin() as admin:
                delete_tenant_rows(tenant, tables, admin=admin)
            return
        del self.pool[placement]
        self.tenancy.delete_tenant(tenant.slug)


@pytest.fixture(scope="session")
def _tenant_kit(tenancy_app: Tenancy, tenancy_server: TestServer) -> Iterator[TenantKit]:
    database = tenancy_server.create_database()
    rebind(tenancy_app, tenancy_server, database)
    try:
        tenancy_app.prepare_server(tenancy_server.superuser_url)
        _migrate(tenancy_app)
        kit = TenantKit(tenancy_app)

        def committed(conn: Connection) -> None:
            kit.dirty = True

        engines = [tenancy_app.engine]
        with contextlib.suppress(ImportError):  # no greenlet: no async engine either
            engines.append(tenancy_app.async_engine.sync_engine)
        for engine in engines:
            event.listen(engine, "commit", committed)
        yield kit
        kit.close()
    finally:
        tenancy_app.dispose()
        tenancy_server.drop_database(database)


@pytest.fixture(scope="session")
def app_tenancy(_tenant_kit: TenantKit) -> Tenancy:
    """The application's Tenancy, rebound to the test server, migrated and installed."""
    return _tenant_kit.tenancy


@pytest.fixture
def tenant_placement(request: pytest.FixtureRequest) -> str:
    """The placement of the ``tenant`` fixture (``@pytest.mark.tenant(placement=...)``)."""
    marker = request.node.get_closest_marker("tenant")
    placement = marker.kwargs.get("placement", "shared") if marker is not None else "shared"
    return str(placement)


@pytest.fixture
def tenant(_tenant_kit: TenantKit, tenant_placement: str, request: pytest.FixtureRequest) -> Iterator[Tenant]:
    """A tenant with no rows, active for the whole test (``tenant_context``).

    Shared and schema tenants come from a pool and the test runs inside an outer transaction that
    is rolled back at the end; the application's sessions join it with a SAVEPOINT, so their
    ``commit()`` works as usual. A database tenant's writes are committed for real (a transaction
    cannot span its database and the main one): the pooled database tenant is emptied after the
    test (its tables truncated, its infrastructure rows deleted). With
    ``@pytest.mark.tenant(..., fresh=True)`` the test gets a tenant provisioned for it (a
    database cloned from the server's template, for database tenants) and deleted after it.
    """
    kit = _tenant_kit
    tenancy = kit.tenancy
    factories = sys.modules.get("sqla_tenancy.testing.factories")
    if factories is not None:  # the test may use factories: they write through this Tenancy
        factories.bind_factories(tenancy)
    marker = request.node.get_closest_marker("tenant")
    fresh = bool(marker is not None and marker.kwargs.get("fresh", False))
    if tenant_placement not in ROLLBACK_PLACEMENTS and not fresh:
        pooled = kit.pooled(tenant_placement)
        try:
            with tenant_context(pooled):
                yield pooled
        finally:
            _close_factory_sessions()
            kit.empty(pooled)
        return
    if fresh:
        made = tenancy.create_tenant(kit.slug(), placement=tenant_placement)
        try:
            with tenant_context(made):
                yield made
        finally:
            _close_factory_sessions()
            _close_async_engine(tenancy, made)
            tenancy.delete_tenant(made.slug)
        return
    pooled = kit.pooled(tenant_placement)
    kit.dirty = False
    with tenant_context(pooled):
        outer = tenancy.connect()
        transaction = outer.begin()
        pin_connection(pooled.id, outer)
        try:
            yield pooled
        finally:
            _close_factory_sessions()
            unpin_connection(pooled.id)
            transaction.rollback()
            outer.close()
    if kit.dirty:
        kit.reset(tenant_placement)


def _close_async_engine(tenancy: Tenancy, tenant: Tenant) -> None:
    """Close a database tenant's async pool in an event loop of its own: the test's loop is gone
    by teardown, and ``DROP DATABASE`` cannot end the tenant role's sessions."""
    try:
        from sqlalchemy.util import greenlet_spawn
    except ImportError:  # pragma: no cover - SQLAlchemy without its asyncio extra
        return
    key = (tenant.id, True)

    async def close() -> None:
        await greenlet_spawn(tenancy.engines.tenants.discard, lambda k: k == key)

    asyncio.run(close())


def _close_factory_sessions() -> None:
    """Close the factories' sessions, if the test used factories (factory-boy stays optional)."""
    factories = sys.modules.get("sqla_tenancy.testing.factories")
    if factories is not None:
        factories.close_sessions()


@pytest.fixture
def tenant_factory(app_tenancy: Tenancy) -> Iterator[Any]:
    """:class:`~sqla_tenancy.testing.factories.TenantFactory`, on the application's Tenancy; the
    tenants it made are deleted after the test. Needs factory-boy (``sqla-tenancy[testing]``)."""
    from .factories import TenantFactory, bind_factories

    bind_factories(app_tenancy)
    try:
        yield TenantFactory
    finally:
        TenantFactory.cleanup()


@pytest.fixture
def make_tenant(_tenant_kit: TenantKit) -> Iterator[Callable[..., Tenant]]:
    """``make_tenant(slug=None, placement="shared", **kwargs) -> Tenant``: more tenants for the
    test, provisioned for real and deleted after it."""
    made: list[Tenant] = []

    def make(slug: str | None = None, placement: str = "shared", **kwargs: Any) -> Tenant:
        created = _tenant_kit.tenancy.create_tenant(slug or _tenant_kit.slug(), placement=placement, **kwargs)
        made.append(created)
        return created

    yield make
    for created in reversed(made):
        with contextlib.suppress(TenancyError):  # the test deleted it
            _tenant_kit.tenancy.delete_tenant(created.slug)


@pytest.fixture
def as_tenant() -> Callable[..., AbstractContextManager[None]]:
    """``with as_tenant("acme"):`` runs the block as that tenant (``tenant_context``)."""

    def enter(ref: str | Tenant, *, anonymous: bool = False) -> AbstractContextManager[None]:
        return tenant_context(ref, anonymous=anonymous)

    return enter


@pytest.fixture
def tenant_session(app_tenancy: Tenancy, tenant: Tenant) -> Iterator[TenantSession]:
    """A session of the application's Tenancy, for the ``tenant`` fixture's tenant."""
    with app_tenancy.sessionmaker()() as session:
        yield session


@pytest.fixture
def platform_session(app_tenancy: Tenancy) -> Iterator[Session]:
    """A session of the admin role (what ``platform_context`` uses): it sees every tenant's rows,
    to check where data really went. Its writes are committed for real."""
    with Session(app_tenancy.admin_engine) as session:
        yield session


@pytest.fixture
def tenant_isolation(app_tenancy: Tenancy) -> Callable[..., IsolationReport]:
    """``tenant_isolation(models=None, placements=..., factories=...)``: the isolation checker on
    the application's Tenancy; raises :class:`~sqla_tenancy.testing.isolation.IsolationError`."""

    def check(*args: Any, **kwargs: Any) -> IsolationReport:
        return assert_tenant_isolation(app_tenancy, *args, **kwargs)

    return check


# -- HTTP clients ---------------------------------------------------------------------------------


def _headers(
    tenant: Tenant, as_user: str | None, token: Callable[[Tenant, str], str] | None, header: str
) -> dict[str, str]:
    headers = {header: tenant.slug}
    if as_user is not None:
        if token is None:
            raise pytest.UsageError(
                "as_user= needs a way to mint the application's bearer tokens: override the "
                "`tenant_token` fixture with a function (tenant, subject) -> token."
            )
        headers["Authorization"] = f"Bearer {token(tenant, as_user)}"
    return headers


def hmac_token_minter(
    secret: str | bytes, *, algorithm: str = "HS256", tenant_claim: str = "tenant", lifetime: int = 3600
) -> Callable[[Tenant, str], str]:
    """``(tenant, subject) -> token``: bearer tokens signed with the application's (test) HMAC
    secret, as a :class:`~sqla_tenancy.checkpoint.JWTVerifier` configured with it accepts; return
    it from your ``tenant_token`` fixture."""
    import time

    import jwt

    def mint(tenant: Tenant, subject: str) -> str:
        now = int(time.time())
        claims = {"sub": subject, tenant_claim: tenant.slug, "iat": now, "exp": now + lifetime}
        return str(jwt.encode(claims, secret, algorithm=algorithm))

    return mint


@pytest.fixture
def tenant_token() -> Callable[[Tenant, str], str] | None:
    """``(tenant, subject) -> bearer token`` the application's checkpoint accepts; override it
    (e.g. PyJWT with your test secret). ``None``: clients send no token."""
    return None


@pytest.fixture
def tenant_header() -> str:
    """The header naming the target tenant (what the application's ``HeaderResolver`` reads)."""
    return "X-Tenant-ID"


@pytest.fixture
def flask_client(tenant_token: Callable[[Tenant, str], str] | None, tenant_header: str) -> Callable[..., Any]:
    """``flask_client(app, tenant, as_user=None)``: Flask's test client sending the tenant header
    and, with ``as_user``, a bearer token minted by ``tenant_token``."""

    def make(app: Any, tenant: Tenant, *, as_user: str | None = None) -> Any:
        client = app.test_client()
        client.environ_base.update(
            {
                "HTTP_" + k.upper().replace("-", "_"): v
                for k, v in _headers(tenant, as_user, tenant_token, tenant_header).items()
            }
        )
        return client

    return make


@pytest.fixture
def asgi_client(tenant_token: Callable[[Tenant, str], str] | None, tenant_header: str) -> Callable[..., Any]:
    """``asgi_client(app, tenant, as_user=None)``: an ``httpx.AsyncClient`` on the ASGI app
    (FastAPI, Starlette) sending the tenant header and, with ``as_user``, a bearer token."""

    def make(app: Any, tenant: Tenant, *, as_user: str | None = None) -> Any:
        import httpx

        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://testserver",
            headers=_headers(tenant, as_user, tenant_token, tenant_header),
        )

    return make
