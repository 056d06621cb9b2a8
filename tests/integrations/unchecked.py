"""Requests that skip the checkpoint (CORS preflights, exempt views and paths) run with no tenant
at all, whatever ``Tenancy(default_tenant=...)`` says: written once, subclassed per framework.

The application's Tenancy here has ``default_tenant="acme"``, so that a request served as "the
default tenant" would get rows back (acme's) instead of the empty default tenant of the package's
world: had the query run at all, the test would see it. Every test drives a real server over HTTP
(see :mod:`.apps` for the routes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import httpx
import pytest

from sqla_tenancy import Tenancy
from sqla_tenancy.checkpoint import Checkpoint
from tests.live_server import LiveServer

from .apps import HEALTH_REASON
from .conftest import SEEDS, World, bearer, make_token
from .suite import no_database_work, strict_checkpoint

PREFLIGHT = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "GET"}


def assert_refused_before_any_sql(response: httpx.Response, seen: list[str], why: str) -> None:
    """The view's query raised TenantRequired (no_tenant_context's), and PostgreSQL was never asked."""
    assert response.status_code == 500, response.text
    body = response.json()
    assert (body["ref"], body["error"]) == ("None", "TenantRequired"), body
    assert "no_tenant_context" in body["detail"] and why in body["detail"], body
    assert "acme-" not in response.text
    assert seen == []


class UncheckedRequestSuite:
    """Subclasses set ``build(tenancy, checkpoint) -> app`` and ``serve(app) -> LiveServer``."""

    build: ClassVar[Callable[[Tenancy, Checkpoint | None], Any]]
    serve: ClassVar[Callable[[Any], LiveServer]]
    #: exempt routes that query with the context they were given
    exempt_query_paths: ClassVar[tuple[str, ...]] = ("/exempt/projects",)

    @pytest.fixture(scope="class")
    @classmethod
    def acme_default(cls, world: World) -> Iterator[tuple[httpx.Client, Tenancy]]:
        """A strict checkpoint in front of an app whose Tenancy falls back to acme; the Tenancy."""
        tenancy = world.make_tenancy(default_tenant="acme")
        server = cls.serve(cls.build(tenancy, strict_checkpoint()))
        try:
            with server.client() as client:
                yield client, tenancy
        finally:
            server.stop()

    def test_a_preflight_to_a_view_that_serves_options_runs_with_no_tenant(
        self, acme_default: tuple[httpx.Client, Tenancy]
    ) -> None:
        client, tenancy = acme_default
        for headers in (PREFLIGHT, {"X-Tenant-ID": "globex", **PREFLIGHT}):
            with no_database_work(tenancy) as seen:
                response = client.options("/preflight/projects", headers=headers)
            assert_refused_before_any_sql(response, seen, "preflight")

    def test_the_view_of_a_preflight_still_serves_checked_requests(
        self, acme_default: tuple[httpx.Client, Tenancy]
    ) -> None:
        client, _ = acme_default
        assert client.get("/preflight/projects").status_code == 401
        assert client.options("/preflight/projects").status_code == 401  # not a preflight: checked
        response = client.get("/preflight/projects", headers=bearer(make_token("globex")))
        assert response.status_code == 200, response.text
        names = response.json()["names"]
        assert set(SEEDS["globex"]) <= set(names)
        assert all(name.startswith("globex-") for name in names), names

    def test_an_exempt_view_that_queries_runs_with_no_tenant(
        self, acme_default: tuple[httpx.Client, Tenancy]
    ) -> None:
        client, tenancy = acme_default
        for path in self.exempt_query_paths:
            # exempt means unresolved: naming a tenant, even with a valid token, changes nothing
            for headers in ({}, {"X-Tenant-ID": "acme", **bearer(make_token("acme"))}):
                with no_database_work(tenancy) as seen:
                    response = client.get(path, headers=headers)
                assert_refused_before_any_sql(response, seen, "exempt")

    def test_an_exempt_view_may_work_in_platform_context(
        self, acme_default: tuple[httpx.Client, Tenancy], caplog: pytest.LogCaptureFixture
    ) -> None:
        client, _ = acme_default
        with caplog.at_level(logging.INFO, logger="sqla_tenancy.platform"):
            response = client.get("/exempt/platform")
        assert response.status_code == 200, response.text
        assert {"acme-1", "globex-1"} <= set(response.json()["names"])  # every shared tenant's rows
        assert f"entering platform context: {HEALTH_REASON}" in caplog.messages

    def test_an_exempt_view_may_enter_the_tenant_context_it_chooses(
        self, acme_default: tuple[httpx.Client, Tenancy]
    ) -> None:
        client, _ = acme_default
        for slug in ("globex", "hooli"):
            response = client.get(f"/exempt/tenant/{slug}")
            assert response.status_code == 200, response.text
            names = response.json()["names"]
            assert set(SEEDS[slug]) <= set(names)
            assert all(name.startswith(f"{slug}-") for name in names), names


class FlaskHooksSuite(UncheckedRequestSuite):
    """Flask runs the application's ``before_request`` hooks on every request and its
    ``after_request`` hooks on refused ones too: none of them may run as the default tenant."""

    def test_application_hooks_run_with_no_tenant_where_the_checkpoint_is_skipped(
        self, acme_default: tuple[httpx.Client, Tenancy]
    ) -> None:
        client, tenancy = acme_default
        before = {"X-Read-In": "before"}
        for method, path, headers, why in (
            ("GET", "/exempt/projects", before, "exempt"),
            ("OPTIONS", "/preflight/projects", {**before, **PREFLIGHT}, "preflight"),
            ("GET", "/no-such-page", before, "Flask answers"),
            ("POST", "/exempt/projects", before, "Flask answers"),  # 405
        ):
            with no_database_work(tenancy) as seen:
                response = client.request(method, path, headers=headers)
            assert_refused_before_any_sql(response, seen, why)

    def test_after_request_hooks_of_a_refused_request_run_with_no_tenant(
        self, acme_default: tuple[httpx.Client, Tenancy]
    ) -> None:
        client, tenancy = acme_default
        for headers in ({}, {"X-Tenant-ID": "acme"}, bearer(make_token("acme", expires_in=-60))):
            with no_database_work(tenancy) as seen:
                response = client.get("/preflight/projects", headers={"X-Read-In": "after", **headers})
            assert_refused_before_any_sql(response, seen, "refused")
