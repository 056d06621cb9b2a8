"""What the Flask and FastAPI examples share: the model, the demo tenants and their data, the settings
an app is built from, and the framework-neutral pieces of the API (input checks, queries, JSON).

The model is a small project tracker. ``projects`` and ``tasks`` are tenant tables: each tenant's
rows live where its placement puts them (its own database for ``acme``, the main database's tables
behind row-level security for ``globex`` and the default tenant). ``auth.users`` is infrastructure:
kept once, in the main database, and reached from ``acme``'s database through postgres_fdw; it is
``TenantScoped`` too, so each tenant sees its own users only.

``projects`` is opted in to anonymous reads (:func:`~sqla_tenancy.anonymous_readable`): a request
admitted with a tenant's access key runs as the placement's anonymous database role, which may read
the tenant's projects and nothing else; tasks and users are private, and PostgreSQL refuses them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jwt
import psycopg
from sqlalchemy import DateTime, Select, Text, false, func, select
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqla_tenancy import (
    Tenancy,
    Tenant,
    TenantScoped,
    anonymous_readable,
    tenant_context,
    tenant_foreign_key,
)
from sqla_tenancy.checkpoint import Admission, Checkpoint, JWTVerifier, issue_access_key
from sqla_tenancy.resolvers import ClaimResolver, HeaderResolver, TenantResolver

__all__ = [
    "DEMO_TENANTS",
    "INFRASTRUCTURE_SCHEMAS",
    "MAX_TEXT",
    "RESOLVERS",
    "TOKEN_LIFETIME",
    "ApiError",
    "Base",
    "DemoData",
    "DemoTenant",
    "Project",
    "Settings",
    "Task",
    "User",
    "clean_text",
    "database_refusal",
    "dev_token",
    "first_user",
    "me_json",
    "mint_token",
    "project_json",
    "project_not_found",
    "projects_json",
    "projects_query",
    "provision_demo",
    "require_writer",
    "subject",
    "task_json",
    "tasks_json",
    "tasks_query",
    "text_field",
    "user_query",
]

INFRASTRUCTURE_SCHEMAS = ("auth",)
#: The tenant a request targets: the ``X-Tenant-ID`` header, else the bearer token's ``tenant`` claim.
RESOLVERS: tuple[TenantResolver, ...] = (HeaderResolver("X-Tenant-ID"), ClaimResolver("tenant"))
#: Seconds a token minted by :func:`mint_token` stays valid.
TOKEN_LIFETIME = 3600
#: The longest project name or task title accepted.
MAX_TEXT = 200


# -- model ----------------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Project(TenantScoped, Base):
    """Public within its tenant: access-key (anonymous) requests may list projects."""

    __tablename__ = "projects"
    __table_args__ = ({"info": anonymous_readable()},)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Task(TenantScoped, Base):
    """A task belongs to a project of its own tenant: the foreign key includes ``tenant_id``
    (PostgreSQL checks keys across tenants, whatever row-level security says)."""

    __tablename__ = "tasks"
    __table_args__ = (tenant_foreign_key(["project_id"], ["projects.id"], ondelete="CASCADE"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(index=True)
    title: Mapped[str] = mapped_column(Text)
    done: Mapped[bool] = mapped_column(default=False, server_default=false())
    #: the ``sub`` of the token that created it (``None`` for seeded rows)
    created_by: Mapped[str | None] = mapped_column(Text)


class User(TenantScoped, Base):
    """An infrastructure table: one table in the main database for every tenant's users."""

    __tablename__ = "users"
    __table_args__ = ({"schema": "auth"},)

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)


# -- settings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What an example app is built from; the launcher and the tests inject it.

    :param database_url: the application role (NOSUPERUSER NOBYPASSRLS): row-level security applies.
    :param admin_url: the role that owns the tables and provisions tenants.
    :param jwt_secret: the HS256 key bearer tokens are verified with (at least 32 bytes).
    :param secret_key: the key database tenants' role passwords are derived from.
    :param name_prefix: the prefix of the databases and roles tenants get (cluster-wide names).
    :param dev_tokens: serve ``POST /dev/token``, which mints a token for anyone who asks. For a
        local demo only: with it on, the API has no authentication at all.
    """

    database_url: URL
    admin_url: URL
    jwt_secret: str
    secret_key: str
    name_prefix: str = "tenant"
    dev_tokens: bool = False

    def make_tenancy(self) -> Tenancy:
        return Tenancy(
            self.database_url,
            admin_url=self.admin_url,
            metadata=Base.metadata,
            infrastructure_schemas=INFRASTRUCTURE_SCHEMAS,
            secret_key=self.secret_key,
            name_prefix=self.name_prefix,
        )

    def make_checkpoint(self) -> Checkpoint:
        """Bearer tokens (HS256 with ``jwt_secret``) or a tenant's access key; nothing else."""
        return Checkpoint(verifier=JWTVerifier(self.jwt_secret, algorithms=["HS256"]))


# -- demo tenants and data ------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoTenant:
    slug: str
    name: str
    #: ``None`` for the default tenant, which ``Tenancy.install`` creates
    placement: str | None
    #: (email, name) of its users
    users: tuple[tuple[str, str], ...]
    #: project name -> task titles
    projects: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


DEMO_TENANTS: tuple[DemoTenant, ...] = (
    DemoTenant(
        "acme",
        "ACME Corp",
        "database",
        users=(("wile@acme.test", "Wile E. Coyote"), ("bugs@acme.test", "Bugs Bunny")),
        projects={
            "Rocket skates": ("Order rockets", "Test on the mesa road"),
            "Giant magnet": ("Find an anvil",),
        },
    ),
    DemoTenant(
        "globex",
        "Globex Corporation",
        "shared",
        users=(("hank@globex.test", "Hank Scorpio"),),
        projects={"Doomsday device": ("Hire henchmen", "Hammock district")},
    ),
    DemoTenant(
        "default",
        "Default tenant",
        None,
        users=(("guest@example.test", "Guest"),),
        projects={"Welcome": ("Read the README",)},
    ),
)


def first_user(slug: str) -> str:
    """The e-mail address of a demo tenant's first user."""
    return next(t.users[0][0] for t in DEMO_TENANTS if t.slug == slug)


@dataclass(frozen=True)
class DemoData:
    """The demo tenants, as provisioned."""

    tenants: dict[str, Tenant]
    #: each tenant's access key (``X-Tenant-Access-Key``: anonymous, read-only access), issued by
    #: :func:`provision_demo`. The registry keeps only their hashes: this is the one copy.
    access_keys: dict[str, str]
    #: the id of each tenant's first project
    first_project: dict[str, int]


def provision_demo(
    settings: Settings, superuser_url: URL, demo_tenants: Iterable[DemoTenant] = DEMO_TENANTS
) -> DemoData:
    """Install the tenancy in ``settings``' (empty) database, prepare the server for database
    tenants (``superuser_url`` is needed for that one step only), create the demo tenants, fill
    them with their users, projects and tasks, and issue each tenant an access key (returned here
    and nowhere else: keys are stored hashed and cannot be read back)."""
    tenancy = settings.make_tenancy()
    try:
        tenancy.install()
        tenancy.prepare_server(superuser_url)
        Session = tenancy.sessionmaker()
        first_project: dict[str, int] = {}
        for demo in demo_tenants:
            if demo.placement is not None:
                tenancy.create_tenant(demo.slug, placement=demo.placement, name=demo.name)
            with tenant_context(demo.slug), Session() as session:
                session.add_all(User(email=email, name=name) for email, name in demo.users)
                for project_name, titles in demo.projects.items():
                    project = Project(name=project_name)
                    session.add(project)
                    session.flush()
                    first_project.setdefault(demo.slug, project.id)
                    session.add_all(Task(project_id=project.id, title=title) for title in titles)
                session.commit()
        tenants = {t.slug: t for t in tenancy.list_tenants()}
        keys = {slug: str(issue_access_key(tenancy, slug)) for slug in tenants}
        return DemoData(tenants, keys, first_project)
    finally:
        tenancy.dispose()


# -- tokens ---------------------------------------------------------------------------------------


def mint_token(secret: str, tenant: str, subject: str, *, expires_in: int = TOKEN_LIFETIME) -> str:
    """An HS256 bearer token for ``subject`` in ``tenant``: what a real identity provider would
    issue after a login. The examples mint them only for the demo."""
    now = int(time.time())
    claims = {"sub": subject, "tenant": tenant, "iat": now, "exp": now + expires_in}
    return jwt.encode(claims, secret, algorithm="HS256")


def dev_token(settings: Settings, payload: object) -> dict[str, Any]:
    """The body of ``POST /dev/token``: ``{"tenant": ..., "sub": ...}`` in, a fresh token out."""
    tenant = text_field(payload, "tenant")
    subject = text_field(payload, "sub")
    return {
        "token": mint_token(settings.jwt_secret, tenant, subject),
        "token_type": "Bearer",
        "expires_in": TOKEN_LIFETIME,
        "warning": "Demo only: this endpoint gives a token to anyone who asks.",
    }


# -- the API, framework-neutral -------------------------------------------------------------------


class ApiError(Exception):
    """A request the API refuses; both apps answer it as JSON ``{"error": code, "detail": ...}``."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail

    def body(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.detail}


def database_refusal(error: DBAPIError) -> ApiError | None:
    """The answer to a statement PostgreSQL refused for lack of privilege (an anonymous request
    reading a private table): 403; ``None`` for any other database error."""
    if isinstance(error.orig, psycopg.errors.InsufficientPrivilege):
        return ApiError(403, "private", "This data is private: send a bearer token.")
    return None


def project_not_found(project_id: int) -> ApiError:
    return ApiError(404, "not_found", f"No project {project_id} in this tenant.")


def text_field(payload: object, name: str) -> str:
    """``payload[name]`` as a non-blank string of at most :data:`MAX_TEXT` characters."""
    if not isinstance(payload, Mapping):
        raise ApiError(400, "invalid_input", f"Send a JSON object with a {name!r} string.")
    return clean_text(payload.get(name), name)


def clean_text(value: object, name: str) -> str:
    """``value`` stripped, if it is a non-blank string of at most :data:`MAX_TEXT` characters."""
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, "invalid_input", f"{name!r} must be a non-empty string.")
    value = value.strip()
    if len(value) > MAX_TEXT:
        raise ApiError(400, "invalid_input", f"{name!r} is longer than {MAX_TEXT} characters.")
    return value


def require_writer(admission: Admission) -> None:
    """Writes need a bearer token: the tenant's access key admits anonymous readers only.

    (The anonymous database role could not write anyway; checking first gives a clear answer
    before any SQL.)"""
    if admission.is_anonymous:
        raise ApiError(
            403, "read_only", "Anonymous (access-key) requests are read-only: send a bearer token."
        )


def projects_query() -> Select[Project]:
    return select(Project).order_by(Project.id)


def tasks_query(project_id: int) -> Select[Task]:
    return select(Task).where(Task.project_id == project_id).order_by(Task.id)


def user_query(email: str) -> Select[User]:
    return select(User).where(User.email == email)


def project_json(project: Project) -> dict[str, Any]:
    return {"id": project.id, "name": project.name}


def task_json(task: Task) -> dict[str, Any]:
    return {
        "id": task.id,
        "project_id": task.project_id,
        "title": task.title,
        "done": task.done,
        "created_by": task.created_by,
    }


def projects_json(tenant: Tenant, projects: Iterable[Project]) -> dict[str, Any]:
    return {"tenant": tenant.slug, "projects": [project_json(p) for p in projects]}


def tasks_json(tenant: Tenant, project: Project, tasks: Iterable[Task]) -> dict[str, Any]:
    return {"tenant": tenant.slug, "project": project_json(project), "tasks": [task_json(t) for t in tasks]}


def subject(admission: Admission) -> str | None:
    """The ``sub`` claim of the request's token (``None`` for anonymous requests)."""
    value = (admission.claims or {}).get("sub")
    return value if isinstance(value, str) else None


def me_json(admission: Admission, user: User | None) -> dict[str, Any]:
    tenant = admission.tenant
    return {
        "tenant": tenant.slug,
        "tenant_name": tenant.name,
        "placement": tenant.strategy,
        "subject": subject(admission),
        "anonymous": admission.is_anonymous,
        "user": {"email": user.email, "name": user.name} if user is not None else None,
    }
