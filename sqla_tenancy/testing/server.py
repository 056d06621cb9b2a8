"""A PostgreSQL server for a test run, with the roles a sqla-tenancy deployment has.

Either a :class:`TemporaryCluster` (default) or an existing server named by
``SQLA_TENANCY_TEST_DSN`` (a superuser URL). Either way the run gets two password-authenticated
roles: an application role (NOSUPERUSER NOBYPASSRLS) and an admin role (CREATEDB CREATEROLE
BYPASSRLS, not a superuser), and fresh databases owned by the admin role.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import MetaData, create_engine
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import NullPool

from ..identifiers import quote_ident, quote_literal
from .cluster import ClusterError, TemporaryCluster

if TYPE_CHECKING:
    from ..tenancy import Tenancy

__all__ = ["DSN_ENV", "ServerURLError", "TestServer"]

DSN_ENV = "SQLA_TENANCY_TEST_DSN"


class ServerURLError(ClusterError):
    """The superuser URL given for a test or demo server is unusable; the message says why."""


def _checked_superuser_url(dsn: str, variable: str) -> URL:
    from sqlalchemy.exc import ArgumentError, DBAPIError

    try:
        url = make_url(dsn)
    except ArgumentError:
        raise ServerURLError(
            f"{variable} is not a database URL: expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE "
            "of a superuser."
        ) from None
    if url.get_backend_name() != "postgresql":
        raise ServerURLError(f"{variable} must be a postgresql:// URL, not {url.drivername}://.")
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    where = f"{url.username or '(no user)'}@{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            superuser = conn.exec_driver_sql(
                "select rolsuper from pg_roles where rolname = current_user"
            ).scalar()
    except DBAPIError as exc:
        first = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
        raise ServerURLError(f"{variable}: cannot connect as {where}: {first}") from None
    finally:
        engine.dispose()
    if not superuser:
        raise ServerURLError(
            f"{variable} must be a superuser's URL ({url.username!r} is not a superuser): the demo "
            "creates its own roles and a scratch database there. Unset it to use a private PostgreSQL."
        )
    return url


@dataclass
class TestServer:
    """Roles and databases on one PostgreSQL server for the duration of a test run."""

    superuser_url: URL
    cluster: TemporaryCluster | None = None
    suffix: str = field(default_factory=lambda: secrets.token_hex(4))
    app_password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    _databases: list[str] = field(default_factory=list)
    #: the ACLs of the maintenance databases as the run found them (``prepare_server`` changes them)
    _maintenance_acls: dict[str, list[str]] = field(default_factory=dict)
    _prefixes: dict[str, set[str]] = field(default_factory=dict)
    _engine: Engine | None = None

    __test__ = False  # not a test class, despite the name

    @classmethod
    def start(
        cls, dsn: str | None = None, *, use_test_dsn: bool = True, variable: str = "DATABASE_URL"
    ) -> TestServer:
        """On the server of ``dsn`` (a superuser URL), else of ``$SQLA_TENANCY_TEST_DSN`` (unless
        ``use_test_dsn`` is False, as for demos), else on a new temporary cluster.

        A ``dsn`` that does not parse, does not connect or is not a superuser's raises
        :class:`ServerURLError`, whose one-line message names ``variable`` (the environment
        variable it came from) and never the password."""
        if not dsn and use_test_dsn and os.environ.get(DSN_ENV):
            dsn, variable = os.environ[DSN_ENV], DSN_ENV
        if dsn:
            url = _checked_superuser_url(dsn, variable)
            server = cls(superuser_url=url)
        else:
            cluster = TemporaryCluster().start()
            server = cls(superuser_url=cluster.url(), cluster=cluster)
        server._create_roles()
        server._remember_maintenance_acls()
        return server

    def _remember_maintenance_acls(self) -> None:
        with self.superuser.connect() as conn:
            rows = conn.exec_driver_sql(
                "select datname, has_database_privilege('public', oid, 'CONNECT'), "
                "has_database_privilege('public', oid, 'TEMPORARY') from pg_database "
                "where datname in ('postgres', 'template1')"
            ).all()
        self._maintenance_acls = {
            name: [p for p, held in (("CONNECT", connect), ("TEMPORARY", temporary)) if held]
            for name, connect, temporary in rows
        }

    def _restore_maintenance_acls(self) -> None:
        """Give PUBLIC back what it held on ``postgres`` and ``template1`` when the run began (on a
        server of the developer's own, ``prepare_server``'s restriction must not outlive the run)."""
        for name, privileges in self._maintenance_acls.items():
            if privileges:
                self.execute(f"GRANT {', '.join(privileges)} ON DATABASE {quote_ident(name)} TO PUBLIC")

    @property
    def app_role(self) -> str:
        return f"tenancy_app_{self.suffix}"

    @property
    def admin_role(self) -> str:
        return f"tenancy_admin_{self.suffix}"

    @property
    def superuser(self) -> Engine:
        if self._engine is None:
            # pre-ping: a test that restarts the server or ends sessions leaves no dead connection
            self._engine = create_engine(self.superuser_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
        return self._engine

    def execute(self, sql: str, database: str | None = None) -> None:
        """Run ``sql`` as the superuser (in ``database`` when given)."""
        if database is None:
            with self.superuser.connect() as conn:
                conn.exec_driver_sql(sql)
            return
        engine = create_engine(self.superuser_url.set(database=database), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(sql)
        finally:
            engine.dispose()

    def _create_roles(self) -> None:
        self.execute(
            f"CREATE ROLE {quote_ident(self.app_role)} LOGIN NOSUPERUSER NOBYPASSRLS "
            f"PASSWORD {quote_literal(self.app_password)}"
        )
        self.execute(
            f"CREATE ROLE {quote_ident(self.admin_role)} LOGIN NOSUPERUSER CREATEDB CREATEROLE "
            f"BYPASSRLS PASSWORD {quote_literal(self.admin_password)}"
        )

    def create_database(self) -> str:
        """A new empty database owned by the admin role, with the privileges ``CREATE DATABASE``
        gives ``PUBLIC`` left in place, as a set-up that forgets the ``REVOKE`` leaves them: the
        tests see what ``install()`` takes back itself."""
        name = f"tenancy_test_{secrets.token_hex(5)}"
        self.execute(f"CREATE DATABASE {quote_ident(name)} OWNER {quote_ident(self.admin_role)}")
        self.execute(f"GRANT CONNECT ON DATABASE {quote_ident(name)} TO {quote_ident(self.app_role)}")
        self._databases.append(name)
        return name

    def name_prefix(self, database: str) -> str:
        """A fresh ``name_prefix`` for a Tenancy on ``database``; its roles go with the database."""
        prefix = f"t{secrets.token_hex(4)}"
        self._prefixes.setdefault(database, set()).add(prefix)
        return prefix

    def tenancy(self, database: str, metadata: MetaData, **options: Any) -> Tenancy:
        """A :class:`~sqla_tenancy.Tenancy` on ``database`` as a deployment has it: ``url`` the
        application role's, ``admin_url`` the admin role's, and a fresh :meth:`name_prefix`, so
        that the roles and databases of its tenants are dropped with ``database``. ``options``
        go to ``Tenancy`` (``admin_url`` and ``name_prefix`` among them replace these)."""
        from ..tenancy import Tenancy

        options.setdefault("admin_url", self.url(database, role="admin"))
        options.setdefault("name_prefix", self.name_prefix(database))
        return Tenancy(self.url(database), metadata=metadata, **options)

    def drop_database(self, name: str) -> None:
        """Drop the database, and the cluster-wide roles and databases its tenants created."""
        for prefix in self._prefixes.pop(name, set()):
            with self.superuser.connect() as conn:
                # (``<prefix>-new-...``: the temporary name of a database being provisioned)
                databases = (
                    conn.exec_driver_sql(
                        "select datname from pg_database where datname like %(p)s or datname like %(n)s",
                        {"p": prefix + "\\_%", "n": prefix + "-%"},
                    )
                    .scalars()
                    .all()
                )
                roles = (
                    conn.exec_driver_sql(
                        "select rolname from pg_roles where rolname like %(p)s", {"p": prefix + "\\_%"}
                    )
                    .scalars()
                    .all()
                )
            for database in databases:
                self.execute(f"DROP DATABASE IF EXISTS {quote_ident(database)} WITH (FORCE)")
            self.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
            # a keeper role (sqla_tenancy.grants) goes after the roles whose memberships it granted
            for role in sorted(roles, key=lambda name: "_keeper_" in name):
                self.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")
        self.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        if name in self._databases:
            self._databases.remove(name)

    def _revoke_memberships_granted_by(self, role: str) -> None:
        """PostgreSQL 16+ keeps the grantor of a role membership, and a grantor cannot be dropped:
        take back what ``role`` granted to roles that outlive its databases (those of a Tenancy
        made with a fixed ``name_prefix``, such as the default one)."""
        with self.superuser.connect() as conn:
            if (conn.dialect.server_version_info or (0,)) < (16,):
                return  # older servers do not tie a membership to its grantor
            grants = conn.exec_driver_sql(
                "select r.rolname, m.rolname from pg_auth_members a "
                "join pg_roles r on r.oid = a.roleid join pg_roles m on m.oid = a.member "
                "join pg_roles g on g.oid = a.grantor where g.rolname = %(g)s",
                {"g": role},
            ).all()
        for granted, member in grants:
            self.execute(
                f"REVOKE {quote_ident(granted)} FROM {quote_ident(member)} "
                f"GRANTED BY {quote_ident(role)} CASCADE"
            )

    def url(self, database: str, *, role: str = "app") -> URL:
        """The app or admin role's URL for ``database`` (password authentication)."""
        user, password = {
            "app": (self.app_role, self.app_password),
            "admin": (self.admin_role, self.admin_password),
        }[role]
        return self.superuser_url.set(username=user, password=password, database=database)

    def stop(self) -> None:
        for name in list(self._databases):
            self.drop_database(name)
        self._restore_maintenance_acls()
        for role in (self.app_role, self.admin_role):
            self._revoke_memberships_granted_by(role)
            self.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")
        if self._engine is not None:
            self._engine.dispose()
        if self.cluster is not None:
            self.cluster.stop()
