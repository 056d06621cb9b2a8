"""``sqla-tenancy dev-server``: its refusals (one line, a specific exit code, nothing left behind).
The happy path, restart included, is walked by tests/test_first_project.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = str(Path(sys.executable).parent / "sqla-tenancy")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, "dev-server", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )


def test_print_env_without_a_server(tmp_path: Path) -> None:
    result = run("--print-env", cwd=tmp_path)
    assert result.returncode == 2 and "no dev server in .sqla-tenancy" in result.stderr
    assert not (tmp_path / ".sqla-tenancy").exists()


def test_refuses_a_directory_that_is_not_its_own(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = run("--dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1 and "is not empty" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_taken_port_is_named_and_nothing_is_left(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("--port", str(port), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"Port {port} is taken: pass --port with a free one." in result.stderr
    leftovers = (
        sorted(p.name for p in (tmp_path / ".sqla-tenancy").iterdir())
        if (tmp_path / ".sqla-tenancy").exists()
        else []
    )
    assert leftovers in ([], [".gitignore"]), leftovers  # a retry starts from scratch


def test_a_deep_project_folder_still_starts(tmp_path: Path) -> None:
    """A Unix-domain socket path has at most 107 bytes: in a deeper folder the server listens on
    TCP only (which is all the dev server's URLs use) rather than fail to start."""
    from sqla_tenancy.testing import TemporaryCluster

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    cluster = TemporaryCluster(base_dir=deep / ".sqla-tenancy")
    try:
        cluster.start()
        assert cluster.url().port == cluster.port
        with socket.create_connection(("127.0.0.1", cluster.port), timeout=5):
            pass
        assert not (cluster.socket_dir / f".s.PGSQL.{cluster.port}").exists()
    finally:
        cluster.stop()
