"""Runs in a separate process: holds a database tenant's connections while another process
deletes or suspends the tenant, and reports what this process sees afterwards."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import text

from sqla_tenancy import Tenancy, TenancyError, tenant_context

from .models import INFRASTRUCTURE, Base


def hold_connections(options: dict[str, Any], slug: str, ready: Any, go: Any, out: Any) -> None:
    """Keep one connection of ``slug`` checked out (idle, outside a transaction) and one idle in
    the pool; once ``go`` is set, report how long until this process drops the tenant's pooled
    engine, and what a new request for it raises."""
    tenancy = Tenancy(metadata=Base.metadata, infrastructure_schemas=INFRASTRUCTURE, **options)
    try:
        with tenant_context(slug):
            held = tenancy.connect()
            held.execute(text("select count(*) from projects"))
            held.commit()
            with tenancy.connect() as pooled:
                pooled.execute(text("select 1"))
                pooled.commit()
        ready.set()
        go.wait(60)
        start = time.monotonic()
        dropped = None
        while time.monotonic() - start < 5:
            if tenancy.tenant_engines.stats().engines == 0:
                dropped = time.monotonic() - start
                break
            time.sleep(0.01)
        try:
            with tenant_context(slug), tenancy.connect() as conn:
                conn.execute(text("select 1"))
            refused = "nothing"
        except TenancyError as error:
            refused = type(error).__name__
        held.invalidate()
        held.close()
        out.put((dropped, refused))
    finally:
        tenancy.dispose()
