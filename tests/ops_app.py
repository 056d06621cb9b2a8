"""The application the command-line tests run (``--app tests.ops_app:tenancy``): the test
model's Tenancy, on the database the test fixtures name in the environment."""

from __future__ import annotations

import os

from sqla_tenancy import Tenancy
from tests.models import INFRASTRUCTURE, Base


def tenancy() -> Tenancy:
    return Tenancy(
        os.environ["OPS_TEST_URL"],
        admin_url=os.environ["OPS_TEST_ADMIN_URL"],
        metadata=Base.metadata,
        infrastructure_schemas=INFRASTRUCTURE,
        name_prefix=os.environ["OPS_TEST_PREFIX"],
        secret_key=os.environ["OPS_TEST_SECRET"],
        registry_listen=False,
    )
