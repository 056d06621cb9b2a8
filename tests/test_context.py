"""The active tenant: context variables, nesting, threads and asyncio tasks."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from sqla_tenancy import platform_context, run_in_context, tenant_context
from sqla_tenancy.context import current_platform_reason, current_tenant_ref


def test_nesting_restores_outer_tenant_also_on_exceptions() -> None:
    assert current_tenant_ref() is None
    with tenant_context("acme"):
        with pytest.raises(ValueError), tenant_context("globex"):
            assert current_tenant_ref() == "globex"
            raise ValueError
        assert current_tenant_ref() == "acme"
    assert current_tenant_ref() is None


def test_accepts_uuid_and_rejects_other_types() -> None:
    tid = uuid.uuid4()
    with tenant_context(tid):
        assert current_tenant_ref() == tid
    with pytest.raises(TypeError, match=r"slug, a uuid\.UUID or a Tenant"):
        with tenant_context(42):  # type: ignore[arg-type]
            pass


def test_threads_start_with_no_tenant() -> None:
    seen: list[object] = []
    with tenant_context("acme"):
        thread = threading.Thread(target=lambda: seen.append(current_tenant_ref()))
        thread.start()
        thread.join()
    assert seen == [None]


def test_run_in_context_carries_the_tenant_into_a_pool() -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        with tenant_context("acme"):
            carried = pool.submit(run_in_context(current_tenant_ref)).result()
            plain = pool.submit(current_tenant_ref).result()
    assert carried == "acme"
    assert plain is None


async def test_tasks_inherit_their_creators_tenant() -> None:
    async def probe() -> object:
        await asyncio.sleep(0)
        return current_tenant_ref()

    with tenant_context("acme"):
        task = asyncio.create_task(probe())
    with tenant_context("globex"):
        other = asyncio.create_task(probe())
    assert await task == "acme"
    assert await other == "globex"


async def test_concurrent_tasks_do_not_mix() -> None:
    async def worker(slug: str) -> list[object]:
        seen = []
        with tenant_context(slug):
            for _ in range(20):
                await asyncio.sleep(0)
                seen.append(current_tenant_ref())
        return seen

    results = await asyncio.gather(*(worker(f"t{i}") for i in range(10)))
    for i, seen in enumerate(results):
        assert set(seen) == {f"t{i}"}


def test_platform_context_needs_a_reason_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="reason"):
        with platform_context("  "):
            pass
    with caplog.at_level(logging.INFO, logger="sqla_tenancy.platform"):
        with tenant_context("acme"), platform_context("monthly invoices"):
            assert current_platform_reason() == "monthly invoices"
            assert current_tenant_ref() is None
    assert "monthly invoices" in caplog.text
