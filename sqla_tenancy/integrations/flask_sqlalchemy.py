"""Flask-SQLAlchemy: make ``db.session`` route by the request's tenant.

Flask-SQLAlchemy's documented hook for customising ``db.session`` is the session class
(``session_options={"class_": ...}``). :class:`FlaskSQLAlchemyTenantSession` is Flask-SQLAlchemy's
``Session`` with :class:`~sqla_tenancy.TenantSession`'s routing: tables of the default bind go
where the active tenant lives (the tenant's transaction binding, schema or database); tables of
another ``__bind_key__`` keep Flask-SQLAlchemy's engines from ``SQLALCHEMY_BINDS``.

::

    db = SQLAlchemy(model_class=Base, session_options={"class_": FlaskSQLAlchemyTenantSession})

    def create_app():
        app = Flask(__name__)
        tenancy = Tenancy(url, metadata=db.metadata)
        # Flask-SQLAlchemy insists on a URI; db.session never uses this engine for default-bind
        # tables, and neither should the application (db.engine is not tenant-bound).
        app.config["SQLALCHEMY_DATABASE_URI"] = tenancy.url.set(drivername="postgresql+psycopg")
        db.init_app(app)
        TenancyFlask(app, tenancy=tenancy, checkpoint=...)
        return app

The session finds the :class:`Tenancy` through the app's :class:`TenancyFlask` (or take
``session_options={"class_": ..., "tenancy": tenancy}``). ``db.session`` lives for the app context,
i.e. one request, and Flask-SQLAlchemy removes it at teardown. On an exempt view or a CORS
preflight it has no tenant, default tenant included, like every session there (see
:mod:`sqla_tenancy.integrations.flask`): default-bind queries raise TenantRequired. Use
``tenancy.install()`` or the Alembic extension instead of ``db.create_all()``, which would create
tables without their row-level security.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from flask import current_app
from flask_sqlalchemy.session import Session as FlaskSQLAlchemySession
from sqlalchemy.engine import Connection, Engine

from ..session import TenantSession
from . import IntegrationError

if TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

    from ..tenancy import Tenancy

__all__ = ["FlaskSQLAlchemyTenantSession"]


class FlaskSQLAlchemyTenantSession(TenantSession, FlaskSQLAlchemySession):
    """``db.session`` routed by the active tenant (default bind) or by bind key (other binds)."""

    def __init__(self, db: SQLAlchemy, *, tenancy: Tenancy | None = None, **kwargs: Any) -> None:
        super().__init__(db=db, tenancy=tenancy if tenancy is not None else _app_tenancy(), **kwargs)

    def get_bind(
        self,
        mapper: Any | None = None,
        clause: Any | None = None,
        bind: Engine | Connection | None = None,
        **kwargs: Any,
    ) -> Engine | Connection:
        """Precedence: an explicit ``bind``; Flask-SQLAlchemy's engine for tables of a named bind
        key; otherwise :meth:`TenantSession.get_bind` (platform context, then the active tenant)."""
        if bind is not None:
            return bind
        if _bind_key(mapper, clause) is not None:
            return FlaskSQLAlchemySession.get_bind(self, mapper, clause=clause, **kwargs)
        return TenantSession.get_bind(self, mapper, clause=clause, **kwargs)


def _app_tenancy() -> Tenancy:
    from .flask import EXTENSION_KEY, TenancyFlask

    ext = current_app.extensions.get(EXTENSION_KEY)
    if not isinstance(ext, TenancyFlask):
        raise IntegrationError(
            "FlaskSQLAlchemyTenantSession needs the app's Tenancy: install TenancyFlask on the app "
            "before db.session is used, or pass session_options={'class_': "
            "FlaskSQLAlchemyTenantSession, 'tenancy': tenancy}."
        )
    return ext.tenancy


def _bind_key(mapper: Any | None, clause: Any | None) -> str | None:
    """The Flask-SQLAlchemy bind key of the table a statement is about (``None``: default bind)."""
    table: Any = None
    if mapper is not None:
        inspected = sa.inspect(mapper, raiseerr=False)
        table = getattr(inspected, "local_table", None)
    elif isinstance(clause, sa.Table):
        table = clause
    elif isinstance(clause, sa.UpdateBase):
        table = clause.table
    if not isinstance(table, sa.Table):
        return None
    key = table.metadata.info.get("bind_key")
    return key if isinstance(key, str) else None
