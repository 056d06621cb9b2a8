"""Web framework integrations: per request, resolve the tenant, run the checkpoint, and serve the
request inside :func:`~sqla_tenancy.tenant_context`.

* :mod:`sqla_tenancy.integrations.flask`: the :class:`~sqla_tenancy.integrations.flask.TenancyFlask`
  extension (``pip install 'sqla-tenancy[flask]'``);
* :mod:`sqla_tenancy.integrations.flask_sqlalchemy`: a ``db.session`` class for Flask-SQLAlchemy;
* :mod:`sqla_tenancy.integrations.asgi`: a pure ASGI middleware and FastAPI dependencies
  (``pip install 'sqla-tenancy[fastapi]'``).

Add the ``jwt`` extra for bearer tokens. This package imports no framework itself: each module
imports only its own.
"""

from __future__ import annotations

from ..errors import TenancyError

__all__ = ["IntegrationError"]


class IntegrationError(TenancyError, RuntimeError):
    """An integration was used where it is not set up: not installed on the application, or asked
    for the tenant of a request that is exempt from tenant resolution."""
