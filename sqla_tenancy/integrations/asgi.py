"""ASGI (Starlette, FastAPI): a pure ASGI middleware that serves each request inside its tenant's
context, and FastAPI dependencies for the tenant and its sessions.

::

    app = FastAPI(lifespan=lifespan)  # whose shutdown awaits tenancy.dispose_async()
    app.add_middleware(
        TenancyMiddleware,
        tenancy=tenancy,
        checkpoint=Checkpoint(verifier=JWTVerifier(secret, algorithms=["HS256"])),
        exempt_paths=["/health"],
    )

    @app.get("/projects")
    def projects(session: TenantSession = Depends(get_session)):
        return [p.name for p in session.scalars(select(Project))]

    @app.get("/projects-async")
    async def projects_async(session: AsyncSession = Depends(get_async_session)):
        return [p.name for p in await session.scalars(select(Project))]

The middleware is plain ASGI (not ``BaseHTTPMiddleware``), so ``tenant_context`` wraps the whole
``await app(scope, receive, send)`` in the task that runs the endpoint: endpoints (sync ones run in
a thread with a copy of the context), dependencies, streamed response bodies and ``BackgroundTasks``
(which Starlette runs after the response, within the same call) all see the request's tenant, and
it is gone when the call returns, also on errors. Refusals are answered with a JSON error (see
:mod:`sqla_tenancy.checkpoint`); a refused websocket is closed with code 1008 before it is accepted.

CORS preflights and exempt paths skip resolution and the checkpoint, and run inside
:class:`~sqla_tenancy.context.no_tenant_context`: no tenant at all, not even the default tenant,
since nobody proved they may act for it. Their queries raise :class:`~sqla_tenancy.TenantRequired`
before any SQL is sent, unless the endpoint enters ``platform_context(reason)`` (a health check) or
a ``tenant_context`` it has checked (a login endpoint) itself.

Resolution and checkpoint may read the registry or an access key from the database, so they run in
a worker thread (``anyio.to_thread``), off the event loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio.to_thread
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import sessionmaker
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from ..checkpoint import Admission, Checkpoint, HttpAnswer, admit, http_answer
from ..context import no_tenant_context
from ..errors import TenancyError
from ..registry import Tenant
from ..resolvers import RequestView, TenantResolver, default_resolvers
from ..session import TenantSession
from ..tenancy import Tenancy
from . import IntegrationError

__all__ = [
    "SCOPE_KEY",
    "RequestTenancy",
    "TenancyMiddleware",
    "asgi_request_view",
    "get_admission",
    "get_async_session",
    "get_session",
    "get_tenant",
    "openapi_security",
]

log = logging.getLogger(__name__)

#: The key of :class:`RequestTenancy` in the ASGI scope.
SCOPE_KEY = "sqla_tenancy"
# Why a request runs inside no_tenant_context() (the text of its queries' TenantRequired).
_EXEMPT = "an exempt path, served without tenant resolution or checkpoint"
_PREFLIGHT = "a CORS preflight, served without tenant resolution or checkpoint"


@dataclass(slots=True)
class RequestTenancy:
    """What the middleware leaves in ``scope["sqla_tenancy"]`` for the request's dependencies."""

    tenancy: Tenancy
    sessionmaker: sessionmaker[TenantSession]
    async_sessionmaker: async_sessionmaker[AsyncSession]
    #: ``None`` on an exempt path and for a CORS preflight
    admission: Admission | None = field(default=None)


def asgi_request_view(scope: Scope) -> RequestView:
    """An HTTP or websocket scope, as the resolvers see it."""
    headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in scope.get("headers", ())]
    host = None
    if not any(name.lower() == "host" for name, _ in headers) and scope.get("server"):
        server_host, server_port = scope["server"]
        host = f"{server_host}:{server_port}" if server_port is not None else str(server_host)
    return RequestView.from_pairs(scope.get("method", "GET"), scope.get("path", "/"), host, headers)


class TenancyMiddleware:
    """Resolves and checks each HTTP and websocket request, then runs the application inside
    ``tenant_context(tenant)``, anonymously for an access-key or credential-less admission (see
    :attr:`~sqla_tenancy.checkpoint.Admission.database_role`).

    :param app: the ASGI application to wrap.
    :param tenancy: the application's :class:`Tenancy`.
    :param checkpoint: authenticates requests (:class:`~sqla_tenancy.checkpoint.Checkpoint`).
        Required; pass ``None`` explicitly when the application authenticates by other means and
        any caller may name any tenant.
    :param resolvers: where to find the tenant a request targets, tried in order (default: the
        ``X-Tenant-ID`` header, then the token's ``tenant`` claim).
    :param exempt_paths: paths served without tenant resolution, and with no tenant: an entry
        matches itself and everything below it (``/health``, ``/docs``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        tenancy: Tenancy,
        checkpoint: Checkpoint | None,
        resolvers: Sequence[TenantResolver] | None = None,
        exempt_paths: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.tenancy = tenancy
        self.checkpoint = checkpoint
        self.resolvers: tuple[TenantResolver, ...] = (
            default_resolvers(checkpoint) if resolvers is None else tuple(resolvers)
        )
        self.exempt_paths = tuple(p.rstrip("/") or "/" for p in exempt_paths)
        self._sessionmaker = tenancy.sessionmaker()
        self._async_sessionmaker = tenancy.async_sessionmaker()

    def _is_exempt(self, path: str) -> bool:
        return any(path == p or path.startswith(p if p.endswith("/") else p + "/") for p in self.exempt_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = RequestTenancy(self.tenancy, self._sessionmaker, self._async_sessionmaker)
        scope[SCOPE_KEY] = state
        # What skips the checkpoint runs with no tenant, default tenant included.
        if self._is_exempt(scope.get("path", "/")):
            with no_tenant_context(_EXEMPT):
                await self.app(scope, receive, send)
            return
        view = asgi_request_view(scope)
        if view.is_cors_preflight:  # no credentials by design; CORS middleware answers it
            with no_tenant_context(_PREFLIGHT):
                await self.app(scope, receive, send)
            return
        admit_request = partial(
            admit, self.tenancy, view, checkpoint=self.checkpoint, resolvers=self.resolvers
        )
        try:
            state.admission = await anyio.to_thread.run_sync(admit_request)
        except TenancyError as exc:
            answer = http_answer(exc)
            if answer is None:
                raise
            log.info("%s %s refused with %d: %s", view.method, view.path, answer.status, exc)
            await _refuse(scope, send, answer)
            return
        with state.admission.context():  # anonymous admissions get the anonymous database role
            await self.app(scope, receive, send)


async def _refuse(scope: Scope, send: Send, answer: HttpAnswer) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": answer.code})
        return
    body = json.dumps(answer.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in answer.headers.items()
        ),
    ]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- FastAPI dependencies (plain functions of the connection; Starlette apps can call them too) ----


def _request_tenancy(connection: HTTPConnection) -> RequestTenancy:
    state = connection.scope.get(SCOPE_KEY)
    if not isinstance(state, RequestTenancy):
        raise IntegrationError(
            "TenancyMiddleware is not installed: app.add_middleware(TenancyMiddleware, "
            "tenancy=..., checkpoint=...)."
        )
    return state


def openapi_security(
    *,
    bearer: bool = True,
    tenant_header: str | None = "X-Tenant-ID",
    access_key_header: str | None = "X-Tenant-Access-Key",
) -> list[Any]:
    """FastAPI dependencies that declare how requests authenticate in the OpenAPI schema, so that
    "Authorize" on ``/docs`` sends the bearer token, the tenant header and the access key::

        api = APIRouter(dependencies=openapi_security())

    They check nothing themselves (all are optional to FastAPI): the middleware resolves the
    tenant and runs the checkpoint before any dependency. Pass the header names the app's
    resolvers and checkpoint use, or ``None`` to leave one out.
    """
    from fastapi import Depends
    from fastapi.security import APIKeyHeader, HTTPBearer

    schemes: list[Any] = []
    if bearer:
        schemes.append(
            HTTPBearer(
                auto_error=False,
                scheme_name="BearerToken",
                description="A token the checkpoint verifies (its claims name the tenant and the subject).",
            )
        )
    if tenant_header:
        schemes.append(
            APIKeyHeader(
                name=tenant_header,
                auto_error=False,
                scheme_name="TenantHeader",
                description="The tenant the request targets, by slug or id.",
            )
        )
    if access_key_header:
        schemes.append(
            APIKeyHeader(
                name=access_key_header,
                auto_error=False,
                scheme_name="TenantAccessKey",
                description="The tenant's access key, for anonymous read-only requests.",
            )
        )
    return [Depends(scheme) for scheme in schemes]


def get_admission(connection: HTTPConnection) -> Admission:
    """Dependency: how the request was admitted (its tenant, claims, ``is_anonymous``)."""
    admission = _request_tenancy(connection).admission
    if admission is None:
        raise IntegrationError(
            f"No tenant for {connection.url.path}: the path is exempt from tenant resolution "
            "(TenancyMiddleware(exempt_paths=...))."
        )
    return admission


def get_tenant(connection: HTTPConnection) -> Tenant:
    """Dependency: the request's :class:`Tenant`."""
    return get_admission(connection).tenant


def get_session(connection: HTTPConnection) -> Iterator[TenantSession]:
    """Dependency: a :class:`TenantSession` for the request, closed when the request is done."""
    with _request_tenancy(connection).sessionmaker() as session:
        yield session


async def get_async_session(connection: HTTPConnection) -> AsyncIterator[AsyncSession]:
    """Dependency: an ``AsyncSession`` routed like :class:`TenantSession`, closed after the request."""
    async with _request_tenancy(connection).async_sessionmaker() as session:
        yield session
