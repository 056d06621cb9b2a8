"""The one-line commands: ``python -m examples.<app>`` with no ``DATABASE_URL`` starts its own
PostgreSQL, prints working curl commands, serves them, and on Ctrl-C (or ``kill``) stops cleanly,
taking its PostgreSQL with it."""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Running:
    proc: subprocess.Popen[str]
    lines: queue.Queue[str | None]
    output: list[str]

    def read_until(self, marker: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {marker!r} within {timeout} s:\n" + "".join(self.output))
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(
                    f"exited with {self.proc.wait()} before {marker!r}:\n" + "".join(self.output)
                )
            if marker in line:
                return

    def exit_code(self, timeout: float) -> int:
        """The process's exit code once it stopped; if it does not stop within ``timeout``, every
        thread's stack (faulthandler, on SIGABRT) and all it printed, in the failure."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGABRT)  # PYTHONFAULTHANDLER: the stacks, then it dies
            with suppress(queue.Empty):
                self.rest()
            raise AssertionError(
                f"still running {timeout} s after the signal; its threads and output:\n"
                + "".join(self.output)
            ) from None

    def rest(self) -> str:
        """Everything printed, once the process has exited and its output is drained."""
        while self.lines.get(timeout=STOP_TIMEOUT) is not None:
            pass
        return "".join(self.output)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def launched(module: str, port: int, *, sigint_ignored: bool = False) -> Iterator[Running]:
    """``python -m <module> --port <port>`` in its own session (so that a signal to its process
    group is what Ctrl-C in a terminal does), without DATABASE_URL or a test DSN."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SQLA_TENANCY_TEST_DSN")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a hung shut-down shows its threads (Running.exit_code)
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # as a background job of a non-interactive shell (`cmd &` in a script) starts it
        preexec_fn=_ignore_sigint if sigint_ignored else None,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        yield Running(proc, lines, output)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)


def run_curl(command: str) -> httpx.Response:
    """Perform a printed ``curl`` command (the options the banner uses) with httpx."""
    words = shlex.split(command)
    assert words[0] == "curl"
    method, url, headers, data = "GET", "", {}, None
    it = iter(words[1:])
    for word in it:
        if word == "-X":
            method = next(it)
        elif word == "-H":
            name, _, value = next(it).partition(": ")
            headers[name] = value
        elif word == "-d":
            data = next(it)
        elif word.startswith("http://"):
            url = word
        else:
            assert word in ("-s", "-i"), word
    return httpx.request(method, url, headers=headers, content=data, timeout=10.0)


def printed_examples(output: str) -> list[tuple[str, int, str]]:
    """(description, expected status, curl command) of each example in the banner."""
    found = re.findall(r"^  # (.+) -> (\d{3})\n  (curl .+)$", output, flags=re.MULTILINE)
    return [(description, int(status), command) for description, status, command in found]


def accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize(
    ("module", "stop_signal", "group", "sigint_ignored"),
    [
        pytest.param("examples.flask_app", signal.SIGINT, True, False, id="flask-ctrl-c"),
        pytest.param("examples.fastapi_app", signal.SIGTERM, False, False, id="fastapi-kill"),
        # started with SIGINT ignored (inherited from a script's `&`): Ctrl-C stops it all the same
        pytest.param("examples.flask_app", signal.SIGINT, True, True, id="flask-ctrl-c-background-job"),
    ],
)
def test_one_command_serves_the_printed_examples_and_stops_cleanly(
    module: str, stop_signal: signal.Signals, group: bool, sigint_ignored: bool
) -> None:
    port = free_port()
    with launched(module, port, sigint_ignored=sigint_ignored) as app:
        app.read_until("Ctrl-C stops", START_TIMEOUT)
        banner = "".join(app.output)
        assert f"serving on http://127.0.0.1:{port}" in banner
        assert re.search(r"acme +ACME Corp +database", banner)
        assert re.search(r"globex +Globex Corporation +shared", banner)
        pg = re.search(r"PostgreSQL \S+ at ([\d.]+):(\d+) \(embedded, removed at exit\)", banner)
        assert pg is not None, banner
        pg_host, pg_port = pg.group(1), int(pg.group(2))

        examples = printed_examples(banner)
        assert {status for _, status, _ in examples} >= {200, 201, 401, 403}
        for description, expected, command in examples:
            response = run_curl(command)
            assert response.status_code == expected, (description, response.text)
        me = run_curl(examples[0][2]).json()
        assert (me["tenant"], me["subject"], me["placement"]) == ("acme", "wile@acme.test", "database")

        # Ctrl-C in a terminal signals the whole process group; `kill` signals the process only
        if group:
            os.killpg(app.proc.pid, stop_signal)
        else:
            app.proc.send_signal(stop_signal)
        assert app.exit_code(STOP_TIMEOUT) == 0, "".join(app.output)
        output = app.rest()
    assert output.rstrip().endswith("Stopped."), output
    assert "Traceback" not in output, output
    assert not accepts_connections(pg_host, pg_port)  # its PostgreSQL went with it
    assert not accepts_connections("127.0.0.1", port)
