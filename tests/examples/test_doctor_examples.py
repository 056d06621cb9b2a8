"""The example apps' demo install (their own provisioning code: shared and database tenants)
passes the isolation doctor."""

from __future__ import annotations

from .conftest import DemoWorld


def test_the_demo_install_reports_nothing(world: DemoWorld) -> None:
    tenancy = world.settings.make_tenancy()
    try:
        assert tenancy.doctor() == []
    finally:
        tenancy.dispose()
