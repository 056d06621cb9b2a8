"""The application the migration tests run: its Tenancy, built from the environment the test
fixtures set, so that the fleet runner's worker processes import the same one by name."""

from __future__ import annotations

import os

from sqla_tenancy import Tenancy
from tests.models import INFRASTRUCTURE, Base


def tenancy() -> Tenancy:
    return Tenancy(
        os.environ["MIGRATION_TEST_URL"],
        admin_url=os.environ["MIGRATION_TEST_ADMIN_URL"],
        metadata=Base.metadata,
        infrastructure_schemas=INFRASTRUCTURE,
        name_prefix=os.environ["MIGRATION_TEST_PREFIX"],
        secret_key=os.environ["MIGRATION_TEST_SECRET"],
        migrations=os.environ["MIGRATION_TEST_INI"],
        registry_listen=False,
    )
