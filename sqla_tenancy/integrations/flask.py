"""Flask: resolve and check the tenant of every request, serve it inside its tenant's context.

::

    tenancy = Tenancy(url, metadata=Base.metadata)
    ext = TenancyFlask(
        app,
        tenancy=tenancy,
        checkpoint=Checkpoint(verifier=JWTVerifier(secret, algorithms=["HS256"])),
    )

    @app.get("/projects")
    def projects():
        return [p.name for p in ext.session.scalars(select(Project))]

    @app.get("/health")
    @ext.exempt
    def health():  # no tenant resolution, no checkpoint, no tenant
        with platform_context("health check"):  # a view that skips the checkpoint picks its context
            ext.session.execute(select(1))
        return "ok"

Before each request (ahead of the application's own ``before_request`` hooks; CORS preflights and
exempt views aside) the extension resolves the tenant and runs the checkpoint; a refusal is answered
with a JSON error (see :mod:`sqla_tenancy.checkpoint` for the statuses) and the view never runs.
Otherwise the request runs inside ``tenant_context(tenant)`` (with ``anonymous=True``, i.e. the
anonymous database role, for an access-key or credential-less admission: see
:attr:`~sqla_tenancy.checkpoint.Admission.database_role`), which ``teardown_request`` leaves, also
when the view raised, after closing the request's session (:attr:`TenancyFlask.session`). A streamed
body is produced after teardown: wrap it with :meth:`TenancyFlask.stream` to keep the tenant.

What skips the checkpoint (exempt views, CORS preflights, URLs Flask cannot route) and what follows
a refusal (the ``after_request`` hooks) runs inside :class:`~sqla_tenancy.context.no_tenant_context`
instead: no tenant at all, not even the default tenant, since nobody proved they may act for it.
Queries there raise :class:`~sqla_tenancy.TenantRequired` before any SQL is sent, unless the view
enters a ``tenant_context`` or ``platform_context`` itself.

For Flask-SQLAlchemy's ``db.session``, see :mod:`sqla_tenancy.integrations.flask_sqlalchemy`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, AnyStr, TypeVar

from flask import Flask, Response, current_app, g, request, stream_with_context

from ..checkpoint import Admission, Checkpoint, HttpAnswer, admit, http_answer
from ..context import no_tenant_context, tenant_context
from ..errors import TenancyError
from ..registry import Tenant
from ..resolvers import RequestView, TenantResolver, default_resolvers
from ..session import TenantSession
from ..tenancy import Tenancy
from . import IntegrationError

__all__ = ["EXTENSION_KEY", "TenancyFlask", "flask_request_view"]

log = logging.getLogger(__name__)

#: Where the extension registers itself in ``app.extensions``.
EXTENSION_KEY = "sqla_tenancy"
_G_KEY = "_sqla_tenancy"
_EXEMPT_ATTR = "_sqla_tenancy_exempt"
# Why a request runs inside no_tenant_context() (the text of its queries' TenantRequired).
_EXEMPT = "an exempt view, served without tenant resolution or checkpoint"
_PREFLIGHT = "a CORS preflight, served without tenant resolution or checkpoint"
_NO_ROUTE = "a request Flask answers itself (unknown URL or method), with no tenant resolution"
_REFUSED = "a request the checkpoint refused"

F = TypeVar("F", bound=Callable[..., Any])


class _RequestState:
    """What the extension keeps on ``flask.g`` for one request."""

    __slots__ = ("admission", "context", "session")

    def __init__(self) -> None:
        self.admission: Admission | None = None
        self.context: tenant_context | no_tenant_context | None = None
        self.session: TenantSession | None = None

    def enter(self, context: tenant_context | no_tenant_context) -> None:
        """Enter the request's context; ``teardown_request`` leaves it."""
        context.__enter__()
        self.context = context


def flask_request_view() -> RequestView:
    """The current Flask request, as the resolvers see it."""
    return RequestView.from_pairs(request.method, request.path, request.host, request.headers.items())


class TenancyFlask:
    """The Flask extension: one per application (or shared by several, via :meth:`init_app`).

    :param tenancy: the application's :class:`Tenancy`.
    :param checkpoint: authenticates requests (:class:`~sqla_tenancy.checkpoint.Checkpoint`).
        Required; pass ``None`` explicitly when the application authenticates by other means and
        any caller may name any tenant.
    :param resolvers: where to find the tenant a request targets, tried in order (default: the
        ``X-Tenant-ID`` header, then the token's ``tenant`` claim).
    :param exempt_endpoints: endpoints served without tenant resolution, and with no tenant
        (``static`` by default); see also :meth:`exempt`.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        tenancy: Tenancy,
        checkpoint: Checkpoint | None,
        resolvers: Sequence[TenantResolver] | None = None,
        exempt_endpoints: Iterable[str] = ("static",),
    ) -> None:
        self.tenancy = tenancy
        self.checkpoint = checkpoint
        self.resolvers: tuple[TenantResolver, ...] = (
            default_resolvers(checkpoint) if resolvers is None else tuple(resolvers)
        )
        self.exempt_endpoints = frozenset(exempt_endpoints)
        self._sessionmaker = tenancy.sessionmaker()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Install the request hooks on ``app``."""
        app.extensions[EXTENSION_KEY] = self
        # First of all before_request hooks: the application's own may already query.
        app.before_request_funcs.setdefault(None, []).insert(0, self._before_request)
        app.teardown_request(self._teardown_request)
        app.shell_context_processor(self._shell_context)

    def _shell_context(self) -> dict[str, object]:
        """What ``flask shell`` puts in scope: the tenancy, a session factory and the contexts
        (``with tenant_context("acme"): ...``)."""
        from ..context import platform_context, tenant_context

        return {
            "tenancy": self.tenancy,
            "Session": self._sessionmaker,
            "tenant_context": tenant_context,
            "platform_context": platform_context,
        }

    @staticmethod
    def exempt(view: F) -> F:
        """Decorator: serve this view without tenant resolution or checkpoint (health checks,
        login), and so with no tenant: not the default tenant either, since the caller proved
        nothing. Its queries raise TenantRequired before any SQL is sent unless it enters the
        context it needs itself (``platform_context(reason)``, or ``tenant_context`` for a tenant
        it has checked)."""
        setattr(view, _EXEMPT_ATTR, True)
        return view

    # -- per-request API --------------------------------------------------------------------

    @property
    def admission(self) -> Admission | None:
        """How the current request was admitted; ``None`` on an exempt route."""
        state: _RequestState | None = g.get(_G_KEY)
        return state.admission if state is not None else None

    @property
    def tenant(self) -> Tenant:
        """The current request's tenant."""
        admission = self.admission
        if admission is None:
            raise IntegrationError(
                f"No tenant for {request.path}: the route is exempt from tenant resolution, or "
                "TenancyFlask is not installed on this app (TenancyFlask(app, ...) or init_app)."
            )
        return admission.tenant

    @property
    def session(self) -> TenantSession:
        """The request's :class:`TenantSession`, created on first use and closed at teardown."""
        state: _RequestState | None = g.get(_G_KEY)
        if state is None:
            raise IntegrationError(
                "TenancyFlask is not installed on this app, or this is not a request: "
                "TenancyFlask(app, ...) or ext.init_app(app)."
            )
        if state.session is None:
            state.session = self._sessionmaker()
        return state.session

    def stream(self, chunks: Iterable[AnyStr]) -> Iterator[AnyStr]:
        """Wrap a streamed response body so that it is produced inside the request's tenant
        context (and, through ``stream_with_context``, its request context).

        Flask tears a request down before the server iterates a streamed body, so without this a
        generator would run with no tenant. The request's :attr:`session` is closed by then: open a
        session inside the generator (``with ext.tenancy.sessionmaker()() as session:``).
        """
        admission = self.admission
        if admission is None:
            raise IntegrationError(
                f"No tenant for {request.path}: the route is exempt from tenant resolution, or "
                "TenancyFlask is not installed on this app (TenancyFlask(app, ...) or init_app)."
            )

        def produce() -> Iterator[AnyStr]:
            with admission.context():  # the request's tenant, and its database role
                yield from chunks

        return stream_with_context(produce())

    # -- hooks ------------------------------------------------------------------------------

    def _is_exempt(self) -> bool:
        endpoint = request.endpoint
        if endpoint is None:
            return False
        if endpoint in self.exempt_endpoints:
            return True
        return bool(getattr(current_app.view_functions.get(endpoint), _EXEMPT_ATTR, False))

    def _before_request(self) -> Response | None:
        state = _RequestState()
        setattr(g, _G_KEY, state)
        # What skips the checkpoint runs with no tenant, default tenant included: the application's
        # later before_request hooks, the view, error handlers and after_request hooks alike.
        if request.routing_exception is not None:
            state.enter(no_tenant_context(_NO_ROUTE))  # Flask answers unknown URLs itself
            return None
        if self._is_exempt():
            state.enter(no_tenant_context(_EXEMPT))
            return None
        view = flask_request_view()
        if view.is_cors_preflight:
            state.enter(no_tenant_context(_PREFLIGHT))
            return None
        try:
            admission = admit(self.tenancy, view, checkpoint=self.checkpoint, resolvers=self.resolvers)
        except TenancyError as exc:
            answer = http_answer(exc)
            if answer is None:
                raise
            log.info("%s %s refused with %d: %s", request.method, request.path, answer.status, exc)
            state.enter(no_tenant_context(_REFUSED))  # the after_request hooks still run
            return _error_response(answer)
        state.admission = admission
        state.enter(admission.context())  # anonymous admissions get the anonymous database role
        return None

    def _teardown_request(self, exc: BaseException | None) -> None:
        state: _RequestState | None = g.pop(_G_KEY, None)
        if state is None:
            return
        try:
            if state.session is not None:
                state.session.close()
        finally:
            if state.context is not None:
                state.context.__exit__(None, None, None)


def _error_response(answer: HttpAnswer) -> Response:
    response = current_app.response_class(
        json.dumps(answer.body()), status=answer.status, mimetype="application/json"
    )
    response.headers.update(answer.headers)
    return response
