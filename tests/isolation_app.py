"""An application for ``sqla-tenancy check-isolation`` tests: its Tenancy, built from the
environment the test sets (``--app tests.isolation_app:tenancy``)."""

from __future__ import annotations

import os

from sqla_tenancy import Tenancy
from tests.models import INFRASTRUCTURE, Base


def tenancy() -> Tenancy:
    return Tenancy(
        os.environ["CHECK_TEST_URL"],
        admin_url=os.environ["CHECK_TEST_ADMIN_URL"],
        metadata=Base.metadata,
        infrastructure_schemas=INFRASTRUCTURE,
        name_prefix=os.environ["CHECK_TEST_PREFIX"],
        secret_key=os.environ["CHECK_TEST_SECRET"],
        registry_listen=False,
    )
