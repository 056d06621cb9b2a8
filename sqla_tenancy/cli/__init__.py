"""The ``sqla-tenancy`` command line (also ``python -m sqla_tenancy``).

Each command is a thin mapping onto a public API function, so that the command line and the
Python API cannot drift apart. Command modules import only Typer at import time; the library and
the application are imported when a command runs, which keeps ``--help`` and usage errors fast.

Exit codes: 0 success; 1 the operation failed (a tenant, a check, a script); 2 usage or
configuration error; 3 another migration holds the lock; 4 refused at a confirmation prompt.
"""

from __future__ import annotations

from . import check as _check  # noqa: F401  (each module registers its commands)
from . import devserver as _devserver  # noqa: F401
from . import migrations as _migrations  # noqa: F401
from . import run as _run  # noqa: F401
from . import tenants as _tenants  # noqa: F401
from ._app import app

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``sqla-tenancy`` console script."""
    app()
