"""Pure decisions, tested without a database: binding statements, identity tokens, references,
and the router's decisions over a registry held in memory."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest

from sqla_tenancy import (
    Tenancy,
    Tenant,
    TenantNotFound,
    TenantRequired,
    TenantSuspended,
    no_tenant_context,
    platform_context,
    tenant_context,
)
from sqla_tenancy.binding import CLEAR_LEFTOVERS, admit_statement, admitted_binding, binding_statement
from sqla_tenancy.routing import Router, lookup_key, token_scope

from .models import INFRASTRUCTURE, Base

TENANT_ID = uuid.UUID("6c2b4a1e-8f62-4f4e-9a57-0d1a3f3f3f3f")


def tenant(strategy: str, slug: str = "acme") -> Tenant:
    return Tenant(
        id=TENANT_ID,
        slug=slug,
        name=slug,
        strategy=strategy,
        status="active",
        created_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
        location={"server": "main"} if strategy == "database" else {},
    )


@pytest.fixture
def offline() -> Iterator[Tenancy]:
    """A Tenancy that never connects (nothing here runs SQL)."""
    t = Tenancy(
        "postgresql://app:secret@127.0.0.1:1/app",
        admin_url="postgresql://admin:secret@127.0.0.1:1/app",
        metadata=Base.metadata,
        infrastructure_schemas=INFRASTRUCTURE,
        registry_listen=False,
        secret_key="a unit test key of sixteen bytes+",
    )
    yield t
    t.engine.dispose()


def test_every_binding_pins_path_role_and_tenant() -> None:
    assert binding_statement(TENANT_ID) == (
        b"SET LOCAL search_path = DEFAULT; SET LOCAL ROLE NONE; "
        b"SET LOCAL app.current_tenant_id = '6c2b4a1e-8f62-4f4e-9a57-0d1a3f3f3f3f'"
    )
    assert binding_statement(TENANT_ID, schema='we"ird', role="r") == (
        b'SET LOCAL search_path = "we""ird", pg_temp; SET LOCAL ROLE "r"; '
        b"SET LOCAL app.current_tenant_id = '6c2b4a1e-8f62-4f4e-9a57-0d1a3f3f3f3f'"
    )


def test_the_clearing_commits_on_its_own_in_front_of_begin() -> None:
    statements = CLEAR_LEFTOVERS.decode().split("; ")
    assert statements == [
        "CLOSE ALL",
        "UNLISTEN *",
        "SELECT pg_advisory_unlock_all()",
        "DISCARD TEMP",
        "COMMIT",
    ]


@pytest.mark.parametrize(
    ("strategy", "full", "anonymous"),
    [
        ("shared", (None, None), (None, "tenant_anonymous")),
        ("schema", ("tenant_acme", "tenant_acme_app"), ("tenant_acme", "tenant_acme_anon")),
        ("database", (None, None), (None, "tenant_acme_anon")),
    ],
)
def test_each_placement_binds_its_schema_and_role(
    offline: Tenancy,
    strategy: str,
    full: tuple[str | None, str | None],
    anonymous: tuple[str | None, str | None],
) -> None:
    placement = offline.placement(strategy)
    record = tenant(strategy)
    assert placement.binding(record) == binding_statement(TENANT_ID, schema=full[0], role=full[1])
    assert placement.anonymous_binding(record) == binding_statement(
        TENANT_ID, schema=anonymous[0], role=anonymous[1]
    )


def test_identity_tokens_name_a_tenant_and_its_scope() -> None:
    assert token_scope(str(TENANT_ID)) == (TENANT_ID, False)
    assert token_scope(f"{TENANT_ID}:anonymous") == (TENANT_ID, True)
    for token in ("platform", None, "", "acme", f"{TENANT_ID}:other", str(TENANT_ID).upper() + "x"):
        assert token_scope(token) is None


def test_only_the_canonical_uuid_string_is_an_id() -> None:
    assert lookup_key(str(TENANT_ID)) == TENANT_ID
    for spelling in (
        str(TENANT_ID).upper(),
        "{" + str(TENANT_ID) + "}",
        TENANT_ID.hex,
        f"urn:uuid:{TENANT_ID}",
    ):
        assert lookup_key(spelling) == spelling  # a string, which no slug matches


# -- the router's decisions, over a registry held in memory ---------------------------------------


class MemoryRegistry:
    """What the router reads of a registry (tenants by slug and id, a generation, the role's
    attributes), held in memory: the router's decisions need no database."""

    def __init__(self, *tenants: Tenant) -> None:
        self.generation = 0
        self.lookups = 0
        self.by_key: dict[object, Tenant] = {}
        for t in tenants:
            self.put(t)

    def put(self, t: Tenant) -> None:
        self.by_key[t.slug] = self.by_key[t.id] = t
        self.generation += 1

    def get_entry(self, key: object) -> tuple[Tenant, float]:
        self.lookups += 1
        try:
            return self.by_key[key], float("inf")
        except KeyError:
            raise TenantNotFound(key) from None

    def get(self, key: object) -> Tenant:
        return self.get_entry(key)[0]

    def role_attributes(self) -> tuple[bool, bool]:
        return False, False

    def admits_tenants(self) -> bool:
        return True

    def admits_placements(self) -> bool:
        return True

    def admits_by_call(self) -> bool:
        return True


def shared(slug: str, status: str = "active") -> Tenant:
    return Tenant(
        id=uuid.uuid5(uuid.NAMESPACE_DNS, slug),
        slug=slug,
        name=slug,
        strategy="shared",
        status=status,
        created_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
    )


@pytest.fixture
def routed(offline: Tenancy) -> Iterator[tuple[Router, MemoryRegistry]]:
    registry = MemoryRegistry(shared("default"), shared("acme"), shared("initech", status="suspended"))
    yield Router(offline.config, registry, offline.engines, offline.services.placements), registry  # type: ignore[arg-type]


def test_the_router_routes_the_active_tenant_and_falls_back_to_the_default(
    routed: tuple[Router, MemoryRegistry],
) -> None:
    router, _ = routed
    with tenant_context("acme"):
        route = router.current()
        assert route.tenant is not None and route.tenant.slug == "acme"
        # the main database admits the transaction first (refusing a tenant no longer active, or
        # no longer of the placement the route is for)
        acme = shared("acme").id
        assert route.binding == admitted_binding(
            admit_statement(acme, placement="shared", call=True), binding_statement(acme)
        )
        # the default path and the login role are pinned first, the admission CALLed as that
        # role, then the tenant set
        assert route.binding == (
            b"SET LOCAL search_path = DEFAULT; SET LOCAL ROLE NONE; "
            + f"CALL tenancy.admit('{acme}', 'shared'); SET LOCAL app.current_tenant_id = '{acme}'".encode()
        )
        assert route.token == str(shared("acme").id)
    assert router.current().tenant == shared("default")


def test_the_router_refuses_what_may_not_run(routed: tuple[Router, MemoryRegistry]) -> None:
    router, _ = routed
    with tenant_context("initech"), pytest.raises(TenantSuspended):
        router.current()
    with tenant_context("nosuch"), pytest.raises(TenantNotFound):
        router.current()
    with no_tenant_context("a preflight"), pytest.raises(TenantRequired, match="a preflight"):
        router.current()
    with platform_context("test"):
        assert router.current() is router.platform and router.current().binding is None
        with pytest.raises(TenantRequired):
            router.current_tenant_id()


def test_an_anonymous_scope_has_a_route_of_its_own(routed: tuple[Router, MemoryRegistry]) -> None:
    router, _ = routed
    with tenant_context("acme", anonymous=True):
        route = router.current()
    assert route.token == f"{shared('acme').id}:anonymous"
    # a role of its own: the admission resets the role and runs first
    assert route.binding == admit_statement(
        shared("acme").id, placement="shared", call=True
    ) + b"; " + binding_statement(shared("acme").id, role="tenant_anonymous")


def test_the_router_memoises_until_the_registry_changes(routed: tuple[Router, MemoryRegistry]) -> None:
    router, registry = routed
    with tenant_context("acme"):
        first = router.current()
        looked_up = registry.lookups
        assert router.current() is first and registry.lookups == looked_up
        registry.put(dataclasses.replace(shared("acme"), status="suspended"))
        with pytest.raises(TenantSuspended):
            router.current()
