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


def write_until_refused(options: dict[str, Any], slug: str, threads: int, ready: Any, out: Any) -> None:
    """Write a project and a user for ``slug`` in a loop, on ``threads`` threads, until the
    tenant is refused; report ``(commits, errors)``, where errors are the reasons writes stopped."""
    import threading

    from .models import Project, User

    tenancy = Tenancy(metadata=Base.metadata, infrastructure_schemas=INFRASTRUCTURE, **options)
    maker = tenancy.sessionmaker()
    commits = [0] * threads
    stopped: list[str] = []

    def write(index: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with tenant_context(slug), maker() as session:
                    session.add_all([Project(name=f"w{index}"), User(email=f"w{index}-{commits[index]}@x")])
                    session.commit()
                commits[index] += 1
                if commits[index] == 3:
                    ready.set()
            except TenancyError as error:
                stopped.append(type(error).__name__)
                return
            except Exception as error:  # noqa: BLE001 - a killed session ends this writer's run
                stopped.append(type(error).__name__)
                time.sleep(0.01)

    workers = [threading.Thread(target=write, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    try:
        out.put((sum(commits), sorted(set(stopped))))
    finally:
        tenancy.dispose()


def create_database_tenant(options: dict[str, Any], slug: str, start: Any, out: Any) -> None:
    """Create ``slug`` as a database tenant in this fresh process (whose first provisioning
    refreshes the template database), at the same moment as the other probes; report the error."""
    tenancy = Tenancy(metadata=Base.metadata, infrastructure_schemas=INFRASTRUCTURE, **options)
    try:
        start.wait(60)
        tenancy.create_tenant(slug, placement="database")
        out.put((slug, None))
    except Exception as error:  # noqa: BLE001 - reported to the test
        out.put((slug, f"{type(error).__name__}: {error}"))
    finally:
        tenancy.dispose()
