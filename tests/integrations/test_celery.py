"""The Celery integration: a task runs for the tenant it was sent for, or fails closed.

The worker tests run a real ``celery worker`` process (solo pool: one task after another on one
thread, where a leaked context would show) against a private ``redis-server`` (broker and result
backend), on the package's test database; see :mod:`tests.integrations.celery_app`. The eager-mode
tests at the end need neither.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain, chord
from celery.app.task import Task as CeleryTask
from celery.result import AsyncResult
from sqlalchemy import func, select

from sqla_tenancy import TenantNotFound, TenantRequired, TenantSuspended, platform_context, tenant_context
from sqla_tenancy.context import current_platform_reason, current_tenant_ref
from sqla_tenancy.integrations import IntegrationError
from sqla_tenancy.integrations.celery import (
    ANONYMOUS_HEADER,
    PLATFORM_HEADER,
    TENANT_HEADER,
    TenantTask,
    context_headers,
    install_celery,
)
from tests.integrations import celery_app
from tests.integrations.celery_app import (
    add_project,
    all_project_names,
    anonymous_reads,
    collect,
    fail,
    fail_and_record,
    retry_once,
    scope,
    scope_after,
    scope_optional,
    send_child,
)
from tests.integrations.conftest import World
from tests.models import Project

ROOT = Path(__file__).resolve().parents[2]
REDIS_SERVER = shutil.which("redis-server")
TIMEOUT = 30  # seconds, for every result and every start-up
pytestmark = pytest.mark.timeout(120)
WORKER_COMMAND = [
    sys.executable,
    *("-m", "celery", "-A", celery_app.__name__, "worker"),
    *("--pool=solo", "--concurrency=1", "--loglevel=warning", "--hostname=sqla-tenancy-test@%h"),
    *("--without-heartbeat", "--without-gossip", "--without-mingle"),
]

# -- services ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a Celery worker's warm shutdown), then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free loopback port, stopped after the module."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server): no broker for the worker")
    workdir = tmp_path_factory.mktemp("redis")
    port = _free_port()
    with open(workdir / "redis.log", "wb") as log:
        proc = subprocess.Popen(
            [
                *(REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)),
                *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not _redis_answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{(workdir / 'redis.log').read_text()}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def installed(world: World) -> None:
    """The test process sends with the package's Tenancy resolving slugs."""
    install_celery(celery_app.app, tenancy=world.tenancy)


@pytest.fixture(scope="module")
def worker(
    world: World, installed: None, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A real Celery worker process on the test database; its log file. Stopped after the module."""
    celery_app.app.conf.update(broker_url=redis_url, result_backend=redis_url)
    env = {
        **os.environ,
        celery_app.BROKER_ENV: redis_url,
        celery_app.APP_URL_ENV: world.tenancy.url.render_as_string(hide_password=False),
        celery_app.ADMIN_URL_ENV: world.tenancy.admin_url.render_as_string(hide_password=False),
        celery_app.PREFIX_ENV: world.tenancy.name_prefix,
    }
    log_path = tmp_path_factory.mktemp("celery") / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            WORKER_COMMAND,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        ready = scope_optional.delay()
        deadline = time.monotonic() + TIMEOUT
        while not ready.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Celery worker did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield log_path
    finally:
        _stop(proc)
        celery_app.app.close()


def outcome(result: AsyncResult) -> Any:
    return result.get(timeout=TIMEOUT)


def failure(result: AsyncResult) -> BaseException:
    """The exception the task failed with, as the sender gets it."""
    with pytest.raises(Exception) as info:
        result.get(timeout=TIMEOUT)
    assert result.state == "FAILURE"
    return info.value


def rows_named(world: World, name: str) -> int:
    """Projects called ``name`` in any shared-placement tenant (read across tenants)."""
    with platform_context("celery test: check no row was written"), world.tenancy.sessionmaker()() as s:
        return int(s.scalar(select(func.count()).where(Project.name == name)) or 0)


# -- a real worker ----------------------------------------------------------------------------------


def test_a_task_runs_for_the_tenant_it_was_sent_for(world: World, worker: Path) -> None:
    with tenant_context("acme"):
        result = add_project.delay("acme-celery-1")

    got = outcome(result)

    acme = world.tenants["acme"]
    assert got["slug"] == "acme"
    assert got["tenant_ref"] == str(acme.id)  # the message carried the id, not the slug
    assert got["tenant_ids"] == [str(acme.id)]
    assert "acme-celery-1" in got["names"]
    assert all(name.startswith("acme-") for name in got["names"])
    assert "acme-celery-1" in world.names("acme")
    assert "acme-celery-1" not in world.names("globex")


def test_interleaved_tasks_of_two_tenants_each_run_for_their_own(world: World, worker: Path) -> None:
    sent: list[tuple[str, str, AsyncResult]] = []
    lock = threading.Lock()
    start = threading.Barrier(2)

    def send(slug: str) -> None:
        with tenant_context(slug):
            start.wait(timeout=TIMEOUT)
            for i in range(5):
                name = f"{slug}-celery-interleaved-{i}"
                result = add_project.delay(name)
                with lock:
                    sent.append((slug, name, result))

    threads = [threading.Thread(target=send, args=(slug,)) for slug in ("acme", "globex")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIMEOUT)
    # and alternating in one thread, tenant after tenant
    for i in range(3):
        for slug in ("globex", "acme"):
            name = f"{slug}-celery-alternating-{i}"
            with tenant_context(slug):
                sent.append((slug, name, add_project.delay(name)))

    assert len(sent) == 16
    for slug, name, result in sent:
        got = outcome(result)
        assert got["slug"] == slug
        assert got["tenant_ids"] == [str(world.tenants[slug].id)]
        assert name in got["names"]
        assert all(n.startswith(f"{slug}-") for n in got["names"]), got["names"]
    acme_names, globex_names = set(world.names("acme")), set(world.names("globex"))
    assert {name for slug, name, _ in sent if slug == "acme"} <= acme_names
    assert {name for slug, name, _ in sent if slug == "globex"} <= globex_names
    assert all(name.startswith("acme-") for name in acme_names)
    assert all(name.startswith("globex-") for name in globex_names)


def test_a_task_sent_anonymously_runs_with_the_anonymous_role(world: World, worker: Path) -> None:
    with tenant_context("globex", anonymous=True):
        anonymous = anonymous_reads.delay()
    with tenant_context("globex"):
        full = anonymous_reads.delay()

    got, got_full = outcome(anonymous), outcome(full)

    assert (got["tenant_ref"], got["anonymous"]) == (str(world.tenants["globex"].id), True)
    assert got["names"] == world.names("globex")
    assert got["tasks"] == "InsufficientPrivilege"
    assert (got_full["anonymous"], got_full["tasks"]) == (False, "readable")


def test_a_task_sent_with_no_tenant_fails_closed_before_its_body(world: World, worker: Path) -> None:
    assert current_tenant_ref() is None

    writes = failure(add_project.delay("acme-celery-orphan"))
    touches_nothing = failure(scope.delay())  # its body reads no table: only the task class can refuse

    for error in (writes, touches_nothing):
        assert isinstance(error, TenantRequired), repr(error)
        assert "needs a tenant, and its message names no tenant" in str(error)
    assert "tests.integrations.celery_app.add_project" in str(writes)
    assert rows_named(world, "acme-celery-orphan") == 0


def test_a_task_declared_tenant_required_false_runs_with_no_tenant(worker: Path) -> None:
    assert outcome(scope_optional.delay()) == {"tenant_ref": None, "platform": None}


def test_a_task_sent_in_platform_context_runs_in_platform_context(worker: Path) -> None:
    with platform_context("report"):
        result = all_project_names.delay()

    got = outcome(result)

    assert got["platform"] == "report"
    assert got["tenant_ref"] is None
    assert {"acme-1", "globex-1"} <= set(got["names"])  # every tenant's rows: the admin role


def test_a_failing_task_leaves_no_tenant_behind_for_the_next(worker: Path) -> None:
    with tenant_context("acme"):
        failed = fail.delay("boom")
    after = scope_optional.delay()  # the same worker thread, right after

    error = failure(failed)
    assert type(error).__name__ == "RuntimeError"
    assert str(error) == "boom"  # not an AssertionError: the body ran in acme's context
    assert outcome(after) == {"tenant_ref": None, "platform": None}


def test_a_task_sent_from_a_task_inherits_its_tenant(world: World, worker: Path) -> None:
    with tenant_context("globex"):
        parent = send_child.delay()

    child = AsyncResult(outcome(parent), app=celery_app.app)

    assert outcome(child) == {"tenant_ref": str(world.tenants["globex"].id), "platform": None}


def test_chained_and_chord_callback_tasks_carry_the_tenant_on(world: World, worker: Path) -> None:
    acme, globex = (str(world.tenants[slug].id) for slug in ("acme", "globex"))
    with tenant_context("acme"):
        chained = chain(add_project.s("acme-celery-chain"), scope_after.s()).delay()
    with tenant_context("globex"):
        gathered = chord([scope.s(), scope.s()])(collect.s())

    assert outcome(chained) == {"tenant_ref": acme, "platform": None}
    got = outcome(gathered)
    assert (got["tenant_ref"], got["platform"]) == (globex, None)
    assert [part["tenant_ref"] for part in got["parts"]] == [globex, globex]


def test_a_retry_runs_in_the_tasks_tenant(world: World, worker: Path) -> None:
    """The worker re-sends the message with the request's headers: the context comes along, and
    nothing in the copy looks misplaced."""
    globex = str(world.tenants["globex"].id)
    with tenant_context("globex"):
        result = retry_once.delay()
    with tenant_context("globex", anonymous=True):
        anonymous = retry_once.delay()

    assert outcome(result) == {"tenant_ref": globex, "platform": None, "anonymous": False, "retries": 1}
    assert outcome(anonymous) == {"tenant_ref": globex, "platform": None, "anonymous": True, "retries": 1}


def test_a_failure_handler_runs_in_the_tasks_tenant(world: World, worker: Path) -> None:
    with tenant_context("globex"):
        result = fail_and_record.delay("globex-celery-failed")

    assert str(failure(result)) == "globex-celery-failed"
    outcome(scope_optional.delay())  # the failure is stored before the handler runs; one worker thread
    assert "globex-celery-failed" in world.names("globex")
    assert "globex-celery-failed" not in world.names("acme")


def test_a_task_for_a_suspended_tenant_fails_before_its_body(worker: Path) -> None:
    with tenant_context("initech"):
        result = scope.delay()

    error = failure(result)

    assert isinstance(error, TenantSuspended), repr(error)


def test_a_task_for_an_unknown_tenant_fails(worker: Path) -> None:
    with tenant_context("no-such-tenant"):
        assert context_headers() == {TENANT_HEADER: "no-such-tenant"}  # unresolved: the worker decides
        result = scope.delay()

    error = failure(result)

    assert isinstance(error, TenantNotFound), repr(error)


# -- where the context is read from: exactly where the publisher writes it ----------------------------
#
# Celery (5.x, protocol 2) spreads a message's headers into the task's request, so the header
# the publisher writes, ``apply_async(headers={TENANT_HEADER: ...})``, is ``request.<name>`` (and
# also in ``request.headers``, which Celery derives from the headers it does not know). Three other
# spellings surface elsewhere on the request: a nested ``headers={"headers": {...}}`` becomes
# ``request.headers`` itself, an unknown option ``apply_async(<name>=...)`` a message property
# (``request.properties``), a stamp ``request.stamps``. The worker reads the first place only.

Forgery = Callable[[str, str], dict[str, Any]]
#: apply_async options that name ``header: value`` somewhere the publisher never writes it
FORGERIES: dict[str, Forgery] = {
    "nested": lambda header, value: {"headers": {"headers": {header: value}}},
    "property": lambda header, value: {header: value},
    "stamp": lambda header, value: {"stamped_headers": [header], header: value},
}
#: the same places, as the message itself carries them (headers, properties)
RAW_FORGERIES: dict[str, Callable[[str, str], tuple[dict[str, Any], dict[str, Any]]]] = {
    "nested": lambda header, value: ({"headers": {header: value}}, {}),
    "property": lambda header, value: ({}, {header: value}),
    "stamp": lambda header, value: ({"stamped_headers": [header], "stamps": {header: value}}, {}),
}


def publish_past_the_hook(
    task: CeleryTask, *, headers: dict[str, Any] | None = None, **properties: Any
) -> AsyncResult:
    """Publish a message for ``task`` as a producer that never called install_celery would: with
    kombu, past the ``before_task_publish`` hook, the headers and properties exactly as given."""
    app = celery_app.app
    task_id = str(uuid.uuid4())
    message = app.amqp.create_task_message(task_id, task.name, (), {})
    message.headers.update(headers or {})
    with app.producer_or_acquire() as producer:
        producer.publish(
            message.body,
            routing_key=app.conf.task_default_queue,
            headers=message.headers,
            serializer="json",
            **{**message.properties, **properties},
        )
    return AsyncResult(task_id, app=app)


@pytest.mark.parametrize("where", FORGERIES)
def test_a_tenant_named_outside_the_header_is_not_the_tasks_tenant(
    world: World, worker: Path, where: str
) -> None:
    """Sent outside any context, a tenant or platform reason written anywhere but the header
    gives the task no context: the send names no tenant, and fails closed as such."""
    forge = FORGERIES[where]
    acme = str(world.tenants["acme"].id)
    name = f"acme-celery-forged-{where}"

    writes = failure(add_project.apply_async((name,), **forge(TENANT_HEADER, acme)))
    reads = failure(scope.apply_async(**forge(TENANT_HEADER, acme)))
    cross_tenant = failure(all_project_names.apply_async(**forge(PLATFORM_HEADER, "forged")))
    optional = outcome(scope_optional.apply_async(**forge(TENANT_HEADER, acme)))

    for error in (writes, reads, cross_tenant):
        assert isinstance(error, TenantRequired), repr(error)
        assert "its message names no tenant" in str(error)
    assert optional == {"tenant_ref": None, "platform": None}
    assert rows_named(world, name) == 0


@pytest.mark.parametrize("where", FORGERIES)
def test_forged_copies_sent_inside_a_context_give_way_to_the_senders_context(
    world: World, worker: Path, where: str
) -> None:
    forge = FORGERIES[where]
    acme, globex = (str(world.tenants[slug].id) for slug in ("acme", "globex"))
    name = f"globex-celery-forged-{where}"
    with tenant_context("globex"):
        as_acme = scope.apply_async(**forge(TENANT_HEADER, acme))
        as_platform = scope.apply_async(**forge(PLATFORM_HEADER, "forged"))
        writes = add_project.apply_async((name,), **forge(TENANT_HEADER, acme))
        full_role = anonymous_reads.apply_async(**forge(ANONYMOUS_HEADER, "1"))
    with platform_context("report"):
        in_platform = scope.apply_async(**forge(TENANT_HEADER, acme))

    for result in (as_acme, as_platform):
        assert outcome(result) == {"tenant_ref": globex, "platform": None}
    written = outcome(writes)
    assert (written["slug"], written["tenant_ids"]) == ("globex", [globex])
    assert name in world.names("globex") and name not in world.names("acme")
    assert outcome(full_role)["anonymous"] is False
    assert outcome(in_platform) == {"tenant_ref": None, "platform": "report"}


@pytest.mark.parametrize("where", RAW_FORGERIES)
def test_a_message_naming_a_context_where_the_publisher_never_writes_it_fails_closed(
    world: World, worker: Path, where: str
) -> None:
    """From a producer that skipped the publish hook: the worker refuses to guess, even for a task
    that may run with no tenant, and even when the header itself names a tenant too."""
    acme, globex = (str(world.tenants[slug].id) for slug in ("acme", "globex"))
    cases = []
    for header, value in ((TENANT_HEADER, acme), (PLATFORM_HEADER, "forged"), (ANONYMOUS_HEADER, "1")):
        headers, properties = RAW_FORGERIES[where](header, value)
        for task in (scope, scope_optional):
            cases.append((header, publish_past_the_hook(task, headers=headers, **properties)))
        headers = {TENANT_HEADER: globex, **headers} if header != TENANT_HEADER else headers
        cases.append((header, publish_past_the_hook(scope, headers=headers, **properties)))

    for header, result in cases:
        error = failure(result)
        assert isinstance(error, IntegrationError), repr(error)
        assert header in str(error) and "refusing to run" in str(error), str(error)


def test_the_header_the_publisher_writes_is_read_from_any_producer(world: World, worker: Path) -> None:
    """The broker is trusted with the header as with the arguments: the worker reads it there."""
    globex = str(world.tenants["globex"].id)
    result = publish_past_the_hook(scope, headers={TENANT_HEADER: globex})
    assert outcome(result) == {"tenant_ref": globex, "platform": None}


def test_the_headers_name_the_senders_context(world: World, installed: None) -> None:
    acme = world.tenants["acme"]
    assert context_headers() == {}
    for ref in ("acme", acme.id, str(acme.id), acme):
        with tenant_context(ref):
            assert context_headers() == {TENANT_HEADER: str(acme.id)}
        with tenant_context(ref, anonymous=True):
            assert context_headers() == {TENANT_HEADER: str(acme.id), ANONYMOUS_HEADER: "1"}
    with platform_context("nightly billing"):
        assert context_headers() == {PLATFORM_HEADER: "nightly billing"}


# -- eager mode and direct calls (no worker, no broker) ---------------------------------------------

eager_app = Celery("eager", task_cls=TenantTask, set_as_current=False)
eager_app.conf.update(
    task_always_eager=True, broker_url="memory://localhost/", result_backend="cache+memory://"
)


def _eager_scope() -> dict[str, Any]:
    ref = current_tenant_ref()
    return {"tenant_ref": None if ref is None else str(ref), "platform": current_platform_reason()}


eager_scope = eager_app.task(_eager_scope, name="eager_scope")
eager_scope_optional = eager_app.task(_eager_scope, name="eager_scope_optional", tenant_required=False)


def test_an_eager_or_direct_task_keeps_the_callers_context() -> None:
    install_celery(eager_app)
    with tenant_context("acme"):
        assert eager_scope.delay().get() == {"tenant_ref": "acme", "platform": None}
        assert eager_scope() == {"tenant_ref": "acme", "platform": None}
    with platform_context("report"):
        assert eager_scope.delay().get() == {"tenant_ref": None, "platform": "report"}
    assert eager_scope_optional.delay().get() == {"tenant_ref": None, "platform": None}


def test_an_eager_or_direct_task_with_no_tenant_fails_closed() -> None:
    with pytest.raises(TenantRequired, match="needs a tenant"):
        eager_scope.delay().get()
    with pytest.raises(TenantRequired, match="needs a tenant"):
        eager_scope()


def test_install_refuses_an_app_whose_tasks_would_ignore_the_tenant() -> None:
    with pytest.raises(IntegrationError, match="task_cls="):
        install_celery(Celery("plain", set_as_current=False))
