"""The example apps' demo install (their own provisioning code: shared and database tenants)
passes the isolation doctor."""

from __future__ import annotations

from tests.doctor_helpers import own_findings

from .conftest import DemoWorld


def test_the_demo_install_reports_nothing(world: DemoWorld) -> None:
    tenancy = world.settings.make_tenancy()
    try:
        assert own_findings(tenancy) == []
    finally:
        tenancy.dispose()
