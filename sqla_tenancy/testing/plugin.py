"""pytest plugin (registered as ``sqla_tenancy``): a real PostgreSQL for every test run.

Fixtures:

``tenancy_server``
    session-scoped :class:`TestServer`: a throwaway cluster (or ``$SQLA_TENANCY_TEST_DSN``) with an
    application role and an admin role, both password-authenticated.
``tenancy_database``
    the name of a fresh database owned by the admin role, dropped after the test.
``tenancy_factory``
    ``tenancy_factory(metadata, **kwargs) -> Tenancy`` on ``tenancy_database``; every Tenancy it
    made is disposed after the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import MetaData

from ..tenancy import Tenancy
from .server import TestServer

__all__ = ["tenancy_database", "tenancy_factory", "tenancy_server"]


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
        kwargs.setdefault("admin_url", tenancy_server.url(tenancy_database, role="admin"))
        kwargs.setdefault("name_prefix", tenancy_server.name_prefix(tenancy_database))
        tenancy = Tenancy(tenancy_server.url(tenancy_database), metadata=metadata, **kwargs)
        made.append(tenancy)
        return tenancy

    yield factory
    for tenancy in made:
        tenancy.dispose()
