"""The first thing a new user runs must work and must show isolation."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_runs_on_its_own_postgres() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    proc = subprocess.run(
        [sys.executable, "-m", "sqla_tenancy.demo"], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[acme] ORM sees ['giant magnet', 'rocket skates']" in proc.stdout
    assert "[globex] ORM sees ['doomsday device']" in proc.stdout
    assert "refused by PostgreSQL: new row violates row-level security policy" in proc.stdout
