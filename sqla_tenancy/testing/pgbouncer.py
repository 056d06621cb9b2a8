"""A throwaway PgBouncer in front of a test PostgreSQL server.

Production deployments often put PgBouncer in *transaction pooling* mode between the application
and PostgreSQL: each client transaction borrows whichever server connection is idle, so anything a
client leaves at session level (a ``SET`` without ``LOCAL``, a role, a ``search_path``) would leak
into another client's transactions. :class:`PgBouncer` starts Debian's ``pgbouncer`` binary with
its own configuration on a free loopback port, so that tests can drive many clients over a few
server connections and check that sqla-tenancy's binding stays inside each transaction.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO

from sqlalchemy.engine import URL

from .cluster import _free_port, _make_traversable, _os_user_when_root

__all__ = ["PgBouncer", "PgBouncerError"]

log = logging.getLogger(__name__)

_CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer")


class PgBouncerError(RuntimeError):
    """PgBouncer could not be found, configured or started."""


def _find_binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return next((path for path in _CANDIDATES if os.access(path, os.X_OK)), None)


def _quote_userlist(value: str) -> str:
    """A double-quoted ``auth_file`` field (a double quote inside is written twice)."""
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """PgBouncer listening on ``127.0.0.1:<free port>``, pooling into ``server_host:server_port``.

    :param server_host: the PostgreSQL server's host (for the test server: ``127.0.0.1``).
    :param server_port: the PostgreSQL server's port.
    :param databases: the database names clients may connect to (one ``[databases]`` entry each).
    :param users: login role -> plain-text password. The same list serves two purposes: clients
        authenticate against it (SCRAM), and PgBouncer uses the password to log in to the server,
        which requires SCRAM itself (a plain-text entry lets PgBouncer compute the SCRAM proof).
    :param pool_size: ``default_pool_size``: server connections per database/user pair.
    :param pool_mode: ``transaction`` (default), ``session`` or ``statement``.
    :param max_client_conn: client connections PgBouncer accepts.
    :param settings: further ``[pgbouncer]`` settings, overriding the defaults.
    :param database_settings: options added to every ``[databases]`` entry, such as
        ``{"auth_user": "..."}`` for ``auth_query`` (PgBouncer 1.18 reads the ``[databases]``
        section first, so a global ``auth_user`` does not reach the entries above it).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        server_host: str,
        server_port: int,
        *,
        databases: Iterable[str],
        users: Mapping[str, str],
        pool_size: int = 3,
        pool_mode: str = "transaction",
        max_client_conn: int = 200,
        settings: Mapping[str, str] | None = None,
        database_settings: Mapping[str, str] | None = None,
    ) -> None:
        self.server_host = server_host
        self.server_port = server_port
        self.databases = list(databases)
        self.users = dict(users)
        self.pool_size = pool_size
        self.pool_mode = pool_mode
        self.max_client_conn = max_client_conn
        self.settings = dict(settings or {})
        self.database_settings = dict(database_settings or {})
        self.host = "127.0.0.1"
        self.port = 0
        self.base_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @staticmethod
    def available() -> bool:
        """True when a ``pgbouncer`` binary is installed (on ``PATH`` or in ``/usr/sbin``)."""
        return _find_binary() is not None

    @property
    def log_path(self) -> Path | None:
        """PgBouncer's log (its stdout and stderr), while it runs."""
        return self.base_dir / "pgbouncer.log" if self.base_dir is not None else None

    def log_tail(self, size: int = 3000) -> str:
        """The end of PgBouncer's log, for error messages."""
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return path.read_text(errors="replace")[-size:]

    def url(self, database: str, *, user: str, password: str, driver: str = "postgresql+psycopg") -> URL:
        """A SQLAlchemy URL reaching ``database`` through this PgBouncer."""
        return URL.create(
            driver, username=user, password=password, host=self.host, port=self.port, database=database
        )

    def _config(self, userlist: Path) -> str:
        extra = "".join(f" {key}={value}" for key, value in self.database_settings.items())
        databases = "\n".join(
            f"{name} = host={self.server_host} port={self.server_port} dbname={name}{extra}"
            for name in self.databases
        )
        settings = {
            "listen_addr": self.host,
            "listen_port": str(self.port),
            # TCP only: no socket file to place (or to collide with a system PgBouncer's).
            "unix_socket_dir": "",
            # scram-sha-256 accepts plain-text passwords in auth_file (PgBouncer >= 1.14).
            "auth_type": "scram-sha-256",
            "auth_file": str(userlist),
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.pool_size),
            "min_pool_size": "0",
            "reserve_pool_size": "0",
            "max_client_conn": str(self.max_client_conn),
            "ignore_startup_parameters": "extra_float_digits,options",
            # Nothing cleans server connections between clients: whatever a client leaves at
            # session level reaches the next one, which is what the tests look for.
            "server_reset_query": "",
            "server_reset_query_always": "0",
            "server_tls_sslmode": "disable",
            "client_tls_sslmode": "disable",
            "log_connections": "0",
            "log_disconnections": "0",
            **self.settings,
        }
        body = "\n".join(f"{key} = {value}".rstrip() for key, value in settings.items())
        return f"[databases]\n{databases}\n\n[pgbouncer]\n{body}\n"

    def start(self, timeout: float = 15.0) -> PgBouncer:
        """Write the configuration, start PgBouncer and wait until its port accepts connections."""
        if self._proc is not None:
            raise PgBouncerError("PgBouncer is running already")
        binary = _find_binary()
        if binary is None:
            raise PgBouncerError("No pgbouncer binary: install it (Debian: apt-get install pgbouncer).")
        if not self.databases:
            raise PgBouncerError("PgBouncer needs at least one database")
        os_user = _os_user_when_root()  # PgBouncer, like PostgreSQL, refuses to run as root
        self.base_dir = Path(tempfile.mkdtemp(prefix="sqla-tenancy-pgbouncer-"))
        userlist = self.base_dir / "userlist.txt"
        userlist.write_text(
            "".join(f"{_quote_userlist(u)} {_quote_userlist(p)}\n" for u, p in self.users.items())
        )
        userlist.chmod(0o600)
        self.port = _free_port()
        config = self.base_dir / "pgbouncer.ini"
        config.write_text(self._config(userlist))
        config.chmod(0o600)
        assert self.log_path is not None
        self._log = self.log_path.open("wb")
        drop: dict[str, object] = {}
        if os_user:
            info = pwd.getpwnam(os_user)
            _make_traversable(self.base_dir)
            for path in (self.base_dir, userlist, config, self.log_path):
                os.chown(path, info.pw_uid, info.pw_gid)
            drop = {"user": info.pw_uid, "group": info.pw_gid, "extra_groups": []}
        try:
            self._proc = subprocess.Popen(  # type: ignore[call-overload]
                [binary, str(config)],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd="/",
                **drop,
            )
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("started PgBouncer on %s:%s (%s pooling)", self.host, self.port, self.pool_mode)
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise PgBouncerError(f"PgBouncer exited with status {code}:\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise PgBouncerError(
                        f"PgBouncer did not listen on {self.host}:{self.port} within {timeout:.0f} s:\n"
                        f"{self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop PgBouncer (dropping its connections) and delete its files."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM: immediate shutdown
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
