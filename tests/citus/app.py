"""The application the Citus migration tests run through the command line: a distributed
Tenancy built from the environment the test sets (``CITUS_APP_*``), on the models of
:mod:`tests.citus.models` (``CITUS_APP_MODELS=extended``: with the later tables)."""

from __future__ import annotations

import os

from sqla_tenancy import Tenancy
from tests.citus.models import Base, extended_metadata

#: schema tenants on Citus log in to the workers with passwords derived from it
SECRET = "a Citus migration test key, more than 16 bytes"


def tenancy() -> Tenancy:
    extended = os.environ.get("CITUS_APP_MODELS") == "extended"
    return Tenancy(
        os.environ["CITUS_APP_URL"],
        admin_url=os.environ["CITUS_APP_ADMIN_URL"],
        metadata=extended_metadata() if extended else Base.metadata,
        infrastructure_schemas=["billing"],
        name_prefix=os.environ["CITUS_APP_PREFIX"],
        migrations=os.environ.get("CITUS_APP_INI") or None,
        distributed=True,
        registry_listen=False,
        secret_key=SECRET,
    )
