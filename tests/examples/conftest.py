"""The example apps' demo database, built once for the package with the examples' own provisioning
code, and real HTTP servers on loopback for the apps the examples' factories build.

Tests that write add rows with unique names, so the demo data every test starts from stays intact.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from examples.common import DemoData, Settings, mint_token, provision_demo
from sqla_tenancy.testing import TestServer

JWT_SECRET = "example-app-tests-hs256-secret-0123456789abcdef"
TENANT_KEY = "example-app-tests-tenant-key"


@dataclass
class DemoWorld:
    """The demo tenants (acme: own database; globex and default: shared), plus admin access to
    every database they live in, to check where rows really went."""

    settings: Settings
    data: DemoData
    admin: Engine
    _tenant_admins: dict[str, Engine] = field(default_factory=dict)

    def token(self, tenant: str, subject: str | None = None, *, secret: str = JWT_SECRET) -> str:
        return mint_token(secret, tenant, subject or f"someone@{tenant}.test")

    def bearer(self, tenant: str, subject: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(tenant, subject)}"}

    def _databases(self) -> dict[str, Engine]:
        """Admin engines by where they point: ``"main"``, or a database tenant's slug."""
        for slug, tenant in self.data.tenants.items():
            if tenant.strategy == "database" and slug not in self._tenant_admins:
                url = self.settings.admin_url.set(database=tenant.location["database"])
                self._tenant_admins[slug] = create_engine(url, poolclass=NullPool)
        return {"main": self.admin, **self._tenant_admins}

    def where(self, table: str, column: str, value: str) -> set[tuple[str, str]]:
        """Every (database, tenant) holding a row of ``table`` whose ``column`` is ``value``, read
        by the admin role (which bypasses row-level security)."""
        slugs = {t.id: slug for slug, t in self.data.tenants.items()}
        found = set()
        for place, engine in self._databases().items():
            with engine.connect() as conn:
                rows = conn.execute(
                    text(f"select tenant_id from {table} where {column} = :v"), {"v": value}
                ).scalars()
                found |= {(place, slugs.get(tenant_id, str(tenant_id))) for tenant_id in rows}
        return found

    def names(self, slug: str, table: str = "projects", column: str = "name") -> list[str]:
        """The tenant's values of ``column``, read where its placement keeps them."""
        tenant = self.data.tenants[slug]
        engine = self._databases()[slug if tenant.strategy == "database" else "main"]
        with engine.connect() as conn:
            return list(
                conn.execute(
                    text(f"select {column} from {table} where tenant_id = :t order by id"), {"t": tenant.id}
                ).scalars()
            )

    def dispose(self) -> None:
        for engine in self._databases().values():
            engine.dispose()


@pytest.fixture(scope="package")
def world(tenancy_server: TestServer) -> Iterator[DemoWorld]:
    database = tenancy_server.create_database()
    try:
        settings = Settings(
            database_url=tenancy_server.url(database),
            admin_url=tenancy_server.url(database, role="admin"),
            jwt_secret=JWT_SECRET,
            secret_key=TENANT_KEY,
            name_prefix=tenancy_server.name_prefix(database),
            dev_tokens=True,
        )
        data = provision_demo(settings, tenancy_server.superuser_url)
        world = DemoWorld(settings, data, create_engine(settings.admin_url, poolclass=NullPool))
        try:
            yield world
        finally:
            world.dispose()
    finally:
        tenancy_server.drop_database(database)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- live servers -------------------------------------------------------------------------------------
