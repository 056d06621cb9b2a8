"""Runs in a separate process: watches a tenant until another process's change reaches it."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import text

from sqla_tenancy import Tenancy, TenantRefused, TenantSuspended, tenant_context

from .models import INFRASTRUCTURE, Base


def watch_until_suspended(
    app_url: str, slug: str, ttl: float, listen: bool, ready: Any, go: Any, out: Any, limit: float
) -> None:
    tenancy = Tenancy(
        app_url,
        metadata=Base.metadata,
        infrastructure_schemas=INFRASTRUCTURE,
        registry_ttl=ttl,
        registry_listen=listen,
    )
    try:
        with tenant_context(slug), tenancy.engine.connect() as conn:
            conn.execute(text("select 1"))  # the tenant is now cached in this process
            conn.rollback()
        ready.set()
        go.wait(30)
        start = time.monotonic()
        while time.monotonic() - start < limit:
            try:
                with tenant_context(slug), tenancy.engine.connect() as conn:
                    conn.execute(text("select 1"))
                    conn.rollback()
            except TenantSuspended:  # this process's registry cache knows
                out.put(time.monotonic() - start)
                return
            except TenantRefused:  # the database refused it before this process's cache knew
                pass
            time.sleep(0.005)
        out.put(None)
    finally:
        tenancy.dispose()
