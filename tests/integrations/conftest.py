"""Shared set-up for the integration tests: one database for the package, with tenants and rows,
bearer tokens, and real HTTP servers on loopback.

The database is package-scoped (built once): tests that write add rows named ``<slug>-...`` only,
so every assertion of the form "all names start with the tenant's slug" stays true.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from sqlalchemy import select

from sqla_tenancy import Tenancy, Tenant, tenant_context
from sqla_tenancy.checkpoint import issue_access_key
from sqla_tenancy.testing import TestServer
from tests.models import INFRASTRUCTURE, Base, Project, Task

SECRET = "integration-tests-hmac-secret-0123456789abcdef"
OTHER_SECRET = "a-different-hmac-secret-nobody-trusts-0123456789"

SEEDS = {
    "acme": ["acme-1", "acme-2", "acme-3"],
    "globex": ["globex-1", "globex-2"],
    "hooli": ["hooli-1", "hooli-2"],
    "initech": ["initech-1"],
}


@dataclass
class World:
    """The package's database: tenants acme and globex (shared placement), hooli (schema
    placement), initech (suspended), and the default tenant (no projects), each with an issued
    access key. Each project has one task, ``<project name>-task``."""

    tenancy: Tenancy
    make_tenancy: Callable[..., Tenancy]
    tenants: dict[str, Tenant]
    access_keys: dict[str, str]

    def names(self, slug: str) -> list[str]:
        """The tenant's project names, read directly (not over HTTP)."""
        with tenant_context(slug), self.tenancy.sessionmaker()() as session:
            return list(session.scalars(select(Project.name).order_by(Project.name)))


@pytest.fixture(scope="package")
def world(tenancy_server: TestServer) -> Iterator[World]:
    database = tenancy_server.create_database()
    prefix = tenancy_server.name_prefix(database)
    made: list[Tenancy] = []

    def make_tenancy(**kwargs: Any) -> Tenancy:
        tenancy = Tenancy(
            tenancy_server.url(database),
            metadata=Base.metadata,
            infrastructure_schemas=INFRASTRUCTURE,
            admin_url=tenancy_server.url(database, role="admin"),
            name_prefix=prefix,
            **kwargs,
        )
        made.append(tenancy)
        return tenancy

    try:
        tenancy = make_tenancy()
        tenancy.install()
        tenants = {
            "acme": tenancy.create_tenant("acme"),
            "globex": tenancy.create_tenant("globex"),
            "hooli": tenancy.create_tenant("hooli", placement="schema"),
            "initech": tenancy.create_tenant("initech"),
        }
        maker = tenancy.sessionmaker()
        for slug, names in SEEDS.items():
            with tenant_context(slug), maker() as session:
                projects = [Project(name=name) for name in names]
                session.add_all(projects)
                session.flush()
                # tasks are private: anonymous (access-key) requests cannot read them
                session.add_all(Task(project_id=p.id, title=f"{p.name}-task") for p in projects)
                session.commit()
        tenants["initech"] = tenancy.suspend_tenant("initech")
        tenants["default"] = tenancy.get_tenant("default")
        # keys are issued (shown once), not read back: the registry keeps their hashes only
        keys = {slug: str(issue_access_key(tenancy, slug)) for slug in tenants}
        yield World(tenancy, make_tenancy, tenants, keys)
    finally:
        for tenancy in made:
            tenancy.dispose()
        tenancy_server.drop_database(database)


def make_token(
    tenant: str | None = "acme",
    *,
    key: str = SECRET,
    algorithm: str = "HS256",
    expires_in: float = 300,
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A signed bearer token for ``tenant`` (no ``tenant`` claim when None)."""
    payload: dict[str, Any] = {"sub": "user-1", "exp": int(time.time() + expires_in), **claims}
    if tenant is not None:
        payload["tenant"] = tenant
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- live servers -----------------------------------------------------------------------------------
