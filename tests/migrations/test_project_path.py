"""The steps a new project takes, where each used to break: a missing privilege of the admin role,
`alembic current` before the first upgrade, the revision a new tenant reports, and a schema tenant
created while the models are off the tenant stream's head."""

from __future__ import annotations

import io
import secrets
from collections.abc import Callable

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from alembic_ext import init_project
from alembic_ext.versions import TENANT
from sqla_tenancy import ConfigurationError, ProvisioningError, Tenancy
from sqla_tenancy.identifiers import quote_ident, quote_literal
from sqla_tenancy.testing import TestServer
from tests.models import INFRASTRUCTURE, Base

from .conftest import ADD_CODE, Project


def test_install_names_a_missing_privilege_before_changing_anything(
    tenancy_server: TestServer, tenancy_factory: Callable[..., Tenancy]
) -> None:
    role, password = f"weak_admin_{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    tenancy_server.execute(
        f"CREATE ROLE {quote_ident(role)} LOGIN BYPASSRLS PASSWORD {quote_literal(password)}"
    )
    database = tenancy_server.create_database()
    tenancy_server.execute(f"ALTER DATABASE {quote_ident(database)} OWNER TO {quote_ident(role)}")
    try:
        admin = tenancy_server.superuser_url.set(username=role, password=password, database=database)
        tenancy = Tenancy(
            tenancy_server.url(database),
            admin_url=admin,
            metadata=Base.metadata,
            infrastructure_schemas=INFRASTRUCTURE,
        )
        with pytest.raises(ConfigurationError) as refused:
            tenancy.install()
        message = str(refused.value)
        assert f"needs the admin role {role!r} to have CREATEROLE" in message
        assert f"ALTER ROLE {quote_ident(role)} CREATEROLE;" in message
        tenancy.dispose()
        engine = create_engine(tenancy_server.superuser_url.set(database=database))
        with engine.connect() as conn:
            assert conn.execute(text("select to_regnamespace('tenancy')")).scalar() is None  # nothing made
        engine.dispose()
    finally:
        tenancy_server.drop_database(database)
        tenancy_server.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")


def test_alembic_current_before_the_first_upgrade(
    tenancy_server: TestServer, tenancy_factory: Callable[..., Tenancy], tmp_path: object
) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    ini = tmp_path / "alembic.ini"
    init_project("migrations", app="tests.migrations.app:tenancy", ini=ini)
    tenancy = tenancy_factory(Base.metadata, infrastructure_schemas=INFRASTRUCTURE, migrations=str(ini))
    out = io.StringIO()
    config = Config(str(ini), stdout=out)
    config.attributes["tenancy"] = tenancy
    command.current(config)
    assert "tenant stream: not installed yet" in out.getvalue()


def test_a_new_tenant_reports_the_revision_the_registry_holds(migrated: Project) -> None:
    migrated.tenancy.prepare_server(migrated.server.superuser_url)
    head = migrated.heads(TENANT)[0]
    for slug, placement in (("sh", "shared"), ("sc", "schema"), ("db", "database")):
        created = migrated.tenancy.create_tenant(slug, placement=placement)
        assert created.revision == migrated.tenancy.get_tenant(slug).revision == head, placement


def test_a_schema_tenant_is_refused_while_the_models_are_off_head(migrated: Project) -> None:
    # the migrations add a column the models lack: a tenant built from the models would be
    # stamped at a head it does not match
    migrated.add_revision(TENANT, ADD_CODE)
    with pytest.raises(ProvisioningError, match="main database's tenant tables are at revision") as behind:
        migrated.tenancy.create_tenant("early", placement="schema")
    assert "Run `alembic upgrade head`" in str(behind.value)
    command.upgrade(migrated.config(), "head")
    with pytest.raises(ProvisioningError, match=r"projects: code in the migrations only") as drift:
        migrated.tenancy.create_tenant("late", placement="schema")
    assert "alembic revision --autogenerate" in str(drift.value)
    assert [t.slug for t in migrated.tenancy.list_tenants()] == ["default"]  # nothing half-made
    with migrated.tenancy.admin_engine.connect() as conn:
        schemas = conn.execute(
            text("select nspname from pg_namespace where nspname like '%early%' or nspname like '%late%'")
        ).all()
    assert schemas == []
    # a shared tenant lives in the main tables, which are at head: it is created
    assert migrated.tenancy.create_tenant("shared_ok").revision == migrated.heads(TENANT)[0]
