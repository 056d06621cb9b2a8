"""The doctor on Citus: a distributed install reports nothing of its own; each Citus
misconfiguration, planted one at a time, is reported with its fix."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Column, Integer, MetaData, PrimaryKeyConstraint, Table, event

from sqla_tenancy import Finding, Tenancy, tenant_id_column
from sqla_tenancy.registry import REGISTRY_SCHEMA
from sqla_tenancy.rls import enable_rls_ddl

from .models import Base

#: about the harness's database, which the admin role does not own (install() says so too)
HARNESS = {"public-connect", "public-temporary"}


def findings(t: Tenancy) -> list[Finding]:
    return [f for f in t.doctor() if f.check not in HARNESS]


def admin_sql(t: Tenancy, *statements: str) -> None:
    with t.admin_engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def tenant_table_ddl(name: str, *extra: str) -> list[str]:
    """A tenant table with its RLS, as install() would make it (so that only Citus is amiss)."""
    table = Table(
        name, MetaData(), tenant_id_column(), Column("id", Integer), PrimaryKeyConstraint("tenant_id", "id")
    )
    columns = ", ".join(["tenant_id uuid not null", "id int not null", "primary key (tenant_id, id)", *extra])
    return [f"CREATE TABLE {name} ({columns})", *enable_rls_ddl(table, function_schema=REGISTRY_SCHEMA)]


@pytest.fixture
def planted(distributed: Tenancy) -> Iterator[list[str]]:
    """Tables the test plants, dropped afterwards."""
    dropped: list[str] = []
    yield dropped
    for table in dropped:
        admin_sql(distributed, f"DROP TABLE IF EXISTS {table} CASCADE")


def only(found: list[Finding], check: str) -> Finding:
    assert [f.check for f in found] == [check], found
    return found[0]


def test_a_distributed_install_reports_nothing(distributed: Tenancy) -> None:
    assert findings(distributed) == []


def test_a_tenant_table_left_on_the_coordinator(distributed: Tenancy, planted: list[str]) -> None:
    planted.append("notes")
    admin_sql(distributed, *tenant_table_ddl("notes"))
    finding = only(findings(distributed), "citus-not-distributed")
    assert finding.object == "table notes" and finding.severity == "warning"
    assert "coordinator alone" in finding.problem
    assert finding.fix.startswith("SELECT create_distributed_table('notes', 'tenant_id'")


def test_a_tenant_table_in_another_colocation_group(distributed: Tenancy, planted: list[str]) -> None:
    planted.append("notes")
    admin_sql(
        distributed,
        *tenant_table_ddl("notes"),
        "SELECT create_distributed_table('notes', 'tenant_id', colocate_with => 'none')",
    )
    finding = only(findings(distributed), "citus-not-colocated")
    assert finding.object == "table notes"
    assert finding.fix.startswith("SELECT update_distributed_table_colocation('notes', colocate_with => ")


def test_an_infrastructure_table_that_is_not_a_reference_table(
    distributed: Tenancy, planted: list[str]
) -> None:
    planted.append("billing.currencies")
    admin_sql(distributed, "CREATE TABLE billing.currencies (code text primary key, name text)")
    finding = only(findings(distributed), "citus-not-reference")
    assert finding.object == "table billing.currencies"
    assert finding.fix.startswith("SELECT create_reference_table('billing.currencies')")


def test_a_key_without_tenant_id(distributed: Tenancy, planted: list[str]) -> None:
    """Citus refuses such a key on a distributed table, so it lives on a table Citus left on the
    coordinator: both are reported."""
    planted.append("notes")
    admin_sql(distributed, *tenant_table_ddl("notes", "code text", "unique (code)"))
    found = findings(distributed)
    assert sorted(f.check for f in found) == ["citus-not-distributed", "key-without-tenant"], found
    key = next(f for f in found if f.check == "key-without-tenant")
    assert key.object == "constraint notes_code_key on notes" and key.severity == "error"


def test_application_connections_that_do_not_propagate_the_tenant(distributed: Tenancy) -> None:
    """As behind a pooler that drops the connection's startup option."""
    t = Tenancy(
        distributed.url,
        admin_url=distributed.admin_url,
        metadata=Base.metadata,
        infrastructure_schemas=["billing"],
        name_prefix=distributed.name_prefix,
        distributed=True,
        registry_listen=False,
    )

    @event.listens_for(t.engine, "connect")
    def drop_propagation(dbapi_connection: object, record: object) -> None:
        dbapi_connection.autocommit = True  # type: ignore[attr-defined]
        dbapi_connection.execute("SET citus.propagate_set_commands = none")  # type: ignore[attr-defined]
        dbapi_connection.autocommit = False  # type: ignore[attr-defined]

    try:
        finding = only(findings(t), "citus-set-not-propagated")
        assert "'none'" in finding.problem and "the workers' policies see no tenant" in finding.problem
    finally:
        t.dispose()
