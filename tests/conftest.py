from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from sqla_tenancy import Tenancy

from .models import INFRASTRUCTURE, Base

SECRET = "a test key of more than sixteen bytes"


@pytest.fixture
def tenancy(tenancy_factory: Callable[..., Tenancy]) -> Iterator[Tenancy]:
    """An installed Tenancy over the test model, with the default tenant."""
    t = tenancy_factory(Base.metadata, infrastructure_schemas=INFRASTRUCTURE, secret_key=SECRET)
    t.install()
    yield t
