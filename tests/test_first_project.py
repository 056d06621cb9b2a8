"""docs/first-project.md, run as a user runs it: a new folder, the page's files and commands in
order, in subprocesses (``sqla-tenancy dev-server``, ``init``, ``alembic``, ``tenants``,
``migrate``, ``run``, ``flask tenancy``, the user's own ``pytest``), and nothing of our own
fixtures. Then what the page promises is checked from the outside: the tenants, their revisions,
the per-tenant run, and a dev server that keeps its data across a restart.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "first-project.md"
BIN = Path(sys.executable).parent
#: lines of the page a test cannot or need not run: the install, and the long-running server
#: (started by the test itself, on a free port)
SKIPPED = (re.compile(r"^(python -m venv|pip install)"), re.compile(r"^sqla-tenancy dev-server$"))


def _steps() -> list[tuple[str, str, str]]:
    """("file", path, content) and ("run", command, "") in the page's order."""
    steps: list[tuple[str, str, str]] = []
    lines = PAGE.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r'^```(\w+)(?: title="([^"]+)")?\s*$', lines[i])
        if not fence:
            i += 1
            continue
        end = lines.index("```", i + 1)
        body = lines[i + 1 : end]
        language, title = fence.groups()
        if title:
            steps.append(("file", title, "\n".join(body) + ("\n" if body else "")))
        elif language == "bash":
            steps.extend(("run", line, "") for line in body if line.strip() and not line.startswith("#"))
        i = end + 1
    return steps


def _script(steps: list[tuple[str, str, str]]) -> str:
    out = ["set -euo pipefail", "set -x"]
    for kind, what, content in steps:
        if kind == "file":
            out.append(f"mkdir -p \"$(dirname '{what}')\"")
            out.append(f"cat > '{what}' <<'SQLA_TENANCY_EOF'\n{content}SQLA_TENANCY_EOF")
        elif not any(p.search(what) for p in SKIPPED):
            out.append(what)
    return "\n".join(out) + "\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _user_env() -> dict[str, str]:
    """A shell as a user has it: the venv's commands on PATH, none of our variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SQLA_TENANCY_", "PYTEST_"))}
    for name in ("PYTHONPATH", "DATABASE_URL", "APP_URL", "ADMIN_URL", "SUPERUSER_URL", "VIRTUAL_ENV"):
        env.pop(name, None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@dataclass
class DevServer:
    process: subprocess.Popen[str]
    banner: list[str]

    def stop(self) -> str:
        self.process.send_signal(signal.SIGINT)
        out, _ = self.process.communicate(timeout=60)
        return out


def _start_dev_server(project: Path, port: int) -> DevServer:
    process = subprocess.Popen(
        [str(BIN / "sqla-tenancy"), "dev-server", "--port", str(port)],
        cwd=project,
        env=_user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    banner: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        banner.append(line.rstrip())
        if line.strip().startswith("export "):
            return DevServer(process, banner)
    process.kill()
    pytest.fail("dev-server did not start:\n" + "\n".join(banner))


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "myproject"
    folder.mkdir()
    yield folder


def _cli(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = _user_env()
    export = subprocess.run(
        [str(BIN / "sqla-tenancy"), "dev-server", "--print-env", "--json"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    env.update(json.loads(export.stdout))
    env["JWT_SECRET"] = "x" * 40
    return subprocess.run(
        [str(BIN / "sqla-tenancy"), *args], cwd=project, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_first_project_page_works_as_written(project: Path) -> None:
    steps = _steps()
    files = [what for kind, what, _ in steps if kind == "file"]
    assert {"myapp/db.py", "myapp/jobs.py", "myapp/web.py", "tests/test_isolation.py"} <= set(files)
    port = _free_port()
    server = _start_dev_server(project, port)
    try:
        assert any(f"127.0.0.1:{port}" in line for line in server.banner), server.banner
        proc = subprocess.run(
            ["bash", "-c", _script(steps)],
            cwd=project,
            env=_user_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, (
            f"the page's commands failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
        # the user's own pytest ran and passed (the last command of the page)
        assert re.search(r"\b1 passed\b", proc.stdout), proc.stdout[-3000:]
        # what the page promises, checked from outside
        listed = _cli(project, "tenants", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        tenants = {t["slug"]: t for t in json.loads(listed.stdout)}
        assert {s: t["placement"] for s, t in tenants.items()} == {
            "default": "shared",
            "acme": "schema",
            "globex": "shared",
        }
        assert tenants["acme"]["name"] == "Acme Corp"
        revisions = {t["revision"] for t in tenants.values()}
        assert len(revisions) == 1 and None not in revisions, tenants
        behind = _cli(project, "tenants", "list", "--behind", "--json")
        assert (behind.returncode, json.loads(behind.stdout)) == (0, [])
        ran = _cli(
            project, "run", "--tenant", "acme", "--tenant", "globex", "--json", "myapp.jobs:count_projects"
        )
        assert ran.returncode == 0, ran.stderr
        counts = {o["tenant"]: o["result"] for o in json.loads(ran.stdout)["tenants"]}
        assert counts == {"acme": "1", "globex": "1"}  # each sees its own seeded project only
    finally:
        out = server.stop()
    assert server.process.returncode == 0, out
    assert "dev server stopped; the data stays" in out

    # a second start reuses the data directory, its port and its passwords
    again = _start_dev_server(project, port)
    try:
        listed = _cli(project, "tenants", "list", "--json")
        assert {t["slug"] for t in json.loads(listed.stdout)} == {"default", "acme", "globex"}
    finally:
        again.stop()
    assert oct((project / ".sqla-tenancy" / "credentials.json").stat().st_mode & 0o777) == "0o600"
