"""A Citus coordinator with two workers for the whole run, and a distributed Tenancy on it.

Skipped, with the command that enables them, when Citus is not built into the test PostgreSQL
(``python -m sqla_tenancy.testing.citus build ../shared/vendor/citus-14.0.1.tar.gz``; .ci/run
does it) and no ``$SQLA_TENANCY_CITUS_DSN`` names a cluster.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import URL

from sqla_tenancy import Tenancy
from sqla_tenancy.identifiers import quote_ident, quote_literal
from sqla_tenancy.testing.citus import CITUS_DSN_ENV, CitusCluster, citus_installed
from sqla_tenancy.testing.server import DSN_ENV

from .models import Base, Plan, Project, Task

__all__ = ["Base", "Plan", "Project", "Task"]

ENABLE = (
    "Citus is not built into the test PostgreSQL: run `python -m sqla_tenancy.testing.citus build "
    f"../shared/vendor/citus-14.0.1.tar.gz` (.ci/run does), or set {CITUS_DSN_ENV}"
)


@pytest.fixture(scope="session")
def citus() -> Iterator[CitusCluster]:
    if not os.environ.get(CITUS_DSN_ENV):
        if os.environ.get(DSN_ENV):
            pytest.skip(
                f"the Citus suite runs on the embedded PostgreSQL (unset {DSN_ENV}), or set {CITUS_DSN_ENV}"
            )
        if citus_installed() is None:
            pytest.skip(ENABLE)
    # every statement logged: a test reads what the workers were sent; logical replication: a
    # tenant moves between nodes while it writes (with commits written before they are
    # acknowledged, which such a move needs; the harness turns that off for speed)
    settings = {"log_statement": "'all'", "synchronous_commit": "on"}
    with CitusCluster(workers=2, logical=True, settings=settings) as cluster:
        yield cluster


def make_roles(citus: CitusCluster, database: str | None = None) -> dict[str, URL]:
    """An admin role and an application role, as production has them, reachable between nodes;
    with ``database``, in a new distributed database of that name (roles of their own: the roles
    an application's install grants to its application role are that application's)."""
    suffix = secrets.token_hex(3)
    roles = {
        "admin": (f"citus_admin_{suffix}", secrets.token_urlsafe(12)),
        "app": (f"citus_app_{suffix}", secrets.token_urlsafe(12)),
    }
    engine = create_engine(citus.superuser_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        admin, app = roles["admin"], roles["app"]
        attributes = "LOGIN CREATEROLE BYPASSRLS"
        conn.exec_driver_sql(
            f"CREATE ROLE {quote_ident(admin[0])} {attributes} PASSWORD {quote_literal(admin[1])}"
        )
        conn.exec_driver_sql(f"CREATE ROLE {quote_ident(app[0])} LOGIN PASSWORD {quote_literal(app[1])}")
    engine.dispose()
    for role, password in roles.values():
        citus.authorize(role, password)
    url = citus.create_database(database) if database is not None else citus.superuser_url
    grant_admin(url, admin[0])
    return {
        who: url.set(username=role, password=password, database=url.database or "postgres")
        for who, (role, password) in roles.items()
    }


@pytest.fixture(scope="session")
def citus_roles(citus: CitusCluster) -> dict[str, URL]:
    """The admin and application roles of the ``postgres`` database's Tenancy."""
    return make_roles(citus)


def grant_admin(superuser_url: URL, admin: str) -> None:
    """What the admin role needs in the database of ``superuser_url``, on every node: database
    privileges and the public schema are not propagated."""
    engine = create_engine(superuser_url, isolation_level="AUTOCOMMIT")
    database = quote_ident(superuser_url.database or "postgres")
    try:
        with engine.connect() as conn:
            for statement in (
                f"GRANT CREATE ON DATABASE {database} TO {quote_ident(admin)}",
                f"ALTER SCHEMA public OWNER TO {quote_ident(admin)}",
            ):
                conn.exec_driver_sql(f"SELECT run_command_on_all_nodes({quote_literal(statement)})")
    finally:
        engine.dispose()


@pytest.fixture
def citus_database(citus: CitusCluster) -> dict[str, URL]:
    """A fresh distributed database (a registry of its own) with roles of its own: their URLs."""
    if not citus.nodes:
        pytest.skip("an external cluster: the harness cannot add databases to it")
    return make_roles(citus, f"citus_{secrets.token_hex(4)}")


@pytest.fixture(scope="session")
def distributed(citus_roles: dict[str, URL]) -> Iterator[Tenancy]:
    tenancy = Tenancy(
        citus_roles["app"],
        admin_url=citus_roles["admin"],
        metadata=Base.metadata,
        infrastructure_schemas=["billing"],
        distributed=True,
        registry_listen=False,
        secret_key="a Citus test key of more than sixteen bytes",
        name_prefix=f"c{secrets.token_hex(3)}",
    )
    tenancy.install()
    for slug in ("acme", "globex"):
        tenancy.create_tenant(slug)
    yield tenancy
    tenancy.dispose()
