from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from sqla_tenancy import Tenancy

from .models import INFRASTRUCTURE, Base

SECRET = "a test key of more than sixteen bytes"

#: The suite's model as an application module holds it: its URLs point nowhere the tests could
#: reach; the plugin's tenant fixtures rebind it to the test server (tests/test_testing_kit.py).
APP = Tenancy(
    "postgresql+psycopg://app:secret@db.invalid/production",
    admin_url="postgresql+psycopg://owner:secret@db.invalid/production",
    metadata=Base.metadata,
    infrastructure_schemas=INFRASTRUCTURE,
    secret_key=SECRET,
    registry_ttl=2.0,
)


@pytest.fixture(scope="session")
def tenancy_app() -> Tenancy:
    """The application's Tenancy for the plugin's tenant fixtures."""
    return APP


@pytest.fixture
def tenancy(tenancy_factory: Callable[..., Tenancy]) -> Iterator[Tenancy]:
    """An installed Tenancy over the test model, with the default tenant."""
    t = tenancy_factory(Base.metadata, infrastructure_schemas=INFRASTRUCTURE, secret_key=SECRET)
    t.install()
    yield t
