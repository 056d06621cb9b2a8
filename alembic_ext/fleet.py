"""The fleet runner: the tenant stream across every tenant, in parallel processes, with a report.

One run:

1. takes the fleet lock (a second run waits with ``wait=True``, else stops with
   :class:`MigrationLocked` naming the holder);
2. upgrades the infrastructure stream on the main database, and if that changed anything,
   re-imports every database tenant's foreign tables;
3. asks the registry, in one query, which tenants are behind: tenants whose copy of the revision
   is already the target are skipped without a connection;
4. upgrades the main database's tenant tables and the template databases, then the remaining
   locations in ``jobs`` worker **processes** (Alembic keeps module-global state, so threads would
   race), each location in one transaction and under its tenant's provisioning lock;
5. with ``canary=K``, migrates K tenants first and stops if any of them failed; without
   ``continue_on_error``, stops submitting work at the first failure;
6. returns a :class:`FleetReport` (and writes it as JSON when asked): per location the revision
   before and after, the duration and the error. A re-run retries only what is still behind.
"""

from __future__ import annotations

import importlib
import json
import logging
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from .errors import MigrationError
from .locations import MIGRATED_STATUSES, Location, tenant_locations
from .runner import LocationRunner, Outcome, fleet_lock
from .versions import INFRASTRUCTURE, STREAMS, TENANT, format_revision, load_config, stream_heads

if TYPE_CHECKING:
    from sqla_tenancy.tenancy import Tenancy

__all__ = ["FleetReport", "config_app", "load_app", "migrate_fleet", "prepend_sys_path"]

log = logging.getLogger("alembic_ext.fleet")

#: environment variable naming the application's Tenancy as ``module:attribute``
APP_ENV = "SQLA_TENANCY_APP"
#: the section of alembic.ini that names the application (option ``app``)
APP_SECTION = "sqla_tenancy"


def load_app(spec: str | None = None, *, config: Config | None = None) -> Tenancy:
    """The :class:`Tenancy` named by ``module:attribute``; the attribute may also be a function
    returning it.

    The name is ``spec``, else ``$SQLA_TENANCY_APP``, else the ``app`` option of the
    ``[sqla_tenancy]`` section of ``config`` (the project's ``alembic.ini``, as
    ``sqla-tenancy init`` writes it). With ``config``, its ``prepend_sys_path`` entries are put in
    front of ``sys.path`` first, as Alembic does, so that the project's own modules import.
    """
    from sqla_tenancy.tenancy import Tenancy

    if config is not None:
        prepend_sys_path(config)
    spec = spec or os.environ.get(APP_ENV) or (config_app(config) if config is not None else None)
    if not spec:
        where = (
            f" or add `app = ...` to the [{APP_SECTION}] section of {config.config_file_name}"
            if (config is not None and config.config_file_name)
            else ""
        )
        raise MigrationError(
            f"Which application? Pass --app module:attribute (e.g. myapp.db:tenancy), set {APP_ENV}{where}."
        )
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise MigrationError(f"{spec!r} is not module:attribute (e.g. myapp.db:tenancy).")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MigrationError(
            f"Cannot import {module_name!r} (from {spec!r}): {exc}. Run the command from the "
            "project's folder, or put that folder on PYTHONPATH."
        ) from exc
    value = getattr(module, attribute, None)
    if callable(value) and not isinstance(value, Tenancy):
        value = value()
    if not isinstance(value, Tenancy):
        raise MigrationError(f"{spec!r} is not a sqla_tenancy.Tenancy (got {type(value).__name__}).")
    return value


def config_app(config: Config) -> str | None:
    """The ``app`` option of ``config``'s ``[sqla_tenancy]`` section, if any."""
    value = config.get_section_option(APP_SECTION, "app")
    return value.strip() or None if value else None


def prepend_sys_path(config: Config) -> None:
    """Put ``config``'s ``prepend_sys_path`` entries in front of ``sys.path`` (once each)."""
    paths = config.get_prepend_sys_paths_list() if hasattr(config, "get_prepend_sys_paths_list") else None
    for path in reversed(paths or []):
        if path not in sys.path:
            sys.path.insert(0, path)


@dataclass
class FleetReport:
    """What one fleet run did."""

    target: str | None
    jobs: int
    started_at: str
    seconds: float = 0.0
    infrastructure: Outcome | None = None
    refreshed_foreign_schemas: int = 0
    #: locations whose registry copy was already at the target: not connected to
    skipped_at_target: int = 0
    #: seconds from starting the worker processes until the last one was ready (0: none started)
    worker_start_seconds: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    stopped: str | None = None

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"] + (
            [self.infrastructure] if self.infrastructure and self.infrastructure.status == "failed" else []
        )

    @property
    def ok(self) -> bool:
        return not self.failed and self.stopped is None

    def counts(self) -> dict[str, int]:
        counts = {"upgraded": 0, "unchanged": 0, "failed": 0, "not_run": 0}
        for outcome in self.outcomes:
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
        counts["skipped_at_target"] = self.skipped_at_target
        return counts

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "jobs": self.jobs,
            "started_at": self.started_at,
            "seconds": round(self.seconds, 3),
            "counts": self.counts(),
            "stopped": self.stopped,
            "infrastructure": self.infrastructure.as_dict() if self.infrastructure else None,
            "refreshed_foreign_schemas": self.refreshed_foreign_schemas,
            "worker_start_seconds": round(self.worker_start_seconds, 3),
            "locations": [o.as_dict() for o in self.outcomes],
        }

    def write(self, path: str | os.PathLike[str]) -> Path:
        target = Path(path)
        target.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        return target


def migrate_fleet(
    tenancy: Tenancy | str,
    config: str | os.PathLike[str] | Config,
    *,
    jobs: int = 1,
    revision: str = "head",
    streams: Sequence[str] = STREAMS,
    tenants: Sequence[str] | None = None,
    continue_on_error: bool = False,
    canary: int = 0,
    wait_for_lock: bool = False,
    report_path: str | os.PathLike[str] | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> FleetReport:
    """Upgrade the infrastructure, then every tenant location that is behind ``revision``.

    :param tenancy: the application's Tenancy, or ``module:attribute`` naming it; worker
        processes (``jobs > 1``) import it from that name, so give the name then.
    :param config: the project's ``alembic.ini`` (or an Alembic ``Config``).
    :param tenants: slugs (or ids) to migrate; default every tenant (templates included).
    :param canary: migrate this many tenant locations first, and stop if any of them fails.
    :param on_outcome: called in this process with each location's outcome (progress bars).
    :param on_plan: called with the number of locations about to be migrated.
    """
    if jobs < 1:
        raise MigrationError("jobs must be at least 1.")
    unknown = sorted(set(streams) - set(STREAMS))
    if unknown or not streams:
        raise MigrationError(f"streams must be a subset of {STREAMS}, not {tuple(streams)}.")
    cfg = load_config(config)
    if isinstance(tenancy, str) and not tenancy:
        tenancy = os.environ.get(APP_ENV) or config_app(cfg) or ""
    app = tenancy if isinstance(tenancy, str) else None
    if jobs > 1 and app is None:
        raise MigrationError(
            "jobs > 1 runs worker processes, which import the application's Tenancy by name: "
            "pass it as 'module:attribute' (e.g. myapp.db:tenancy)."
        )
    resolved = load_app(app or None, config=cfg) if app is not None else tenancy
    assert not isinstance(resolved, str)
    config_path = cfg.config_file_name
    if jobs > 1 and config_path is None:
        raise MigrationError("jobs > 1 needs the configuration as a path to alembic.ini.")
    script = ScriptDirectory.from_config(cfg)
    if resolved.migrations is None:
        resolved.migrations = cfg
    target = _target(script, revision)
    report = FleetReport(target, jobs, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    started = time.perf_counter()
    with ExitStack() as stack:
        control = stack.enter_context(resolved.admin_engine.connect())
        stack.enter_context(fleet_lock(control, wait=wait_for_lock))
        worker = stack.enter_context(_Worker(resolved, cfg, revision))
        if INFRASTRUCTURE in streams and tenants is None:
            report.infrastructure = worker.infrastructure()
            if report.infrastructure.status == "failed":
                report.stopped = "the infrastructure stream failed; tenants were not migrated"
            elif report.infrastructure.status == "upgraded":
                report.refreshed_foreign_schemas = len(resolved.refresh_foreign_schemas())
        if TENANT in streams and report.stopped is None:
            plan = _plan(resolved, control, tenants, target, report)
            if on_plan is not None:
                on_plan(len(plan))
            # The main database and the templates first and here: everything else follows them.
            first = [loc for loc in plan if loc.kind in ("main", "template")]
            rest = [loc for loc in plan if loc.kind not in ("main", "template")]
            pool = None
            if jobs > 1 and len(rest) > 1:
                # Started now, so that the workers import and connect while this process
                # migrates the main database and the templates.
                pool = stack.enter_context(
                    _start_pool(min(jobs, len(rest)), app, config_path, revision, report)
                )
            for location in first:
                _record(report, worker.migrate(location), on_outcome)
            if report.failed and not continue_on_error:
                report.stopped = "a location failed (use continue_on_error to go on)"
            if report.stopped is None and canary > 0:
                _run_batch(rest[:canary], pool, jobs, worker, report, on_outcome, False)
                rest = rest[canary:]
                if report.failed:
                    report.stopped = f"the canary ({canary} tenant(s)) failed"
            if report.stopped is None:
                _run_batch(rest, pool, jobs, worker, report, on_outcome, continue_on_error)
                if report.failed and not continue_on_error:
                    report.stopped = "a location failed (use continue_on_error to go on)"
            if report.stopped is not None:
                done = {o.location for o in report.outcomes}
                for location in plan:
                    if location.name not in done:
                        report.outcomes.append(
                            Outcome(
                                location.name,
                                location.kind,
                                TENANT,
                                location.revision,
                                location.revision,
                                0.0,
                                "not_run",
                            )
                        )
    report.seconds = time.perf_counter() - started
    if report_path is not None:
        report.write(report_path)
    return report


def _record(report: FleetReport, outcome: Outcome, callback: Callable[[Outcome], None] | None) -> None:
    report.outcomes.append(outcome)
    if outcome.status == "failed":
        log.error("%s failed: %s", outcome.location, outcome.error)
    if callback is not None:
        callback(outcome)


def _target(script: ScriptDirectory, revision: str) -> str | None:
    if revision in ("head", "heads"):
        return format_revision(stream_heads(script, TENANT))
    found = script.get_revision(revision)
    if found is None:
        raise MigrationError(f"No revision {revision!r} in the script directory.")
    return found.revision


def _plan(
    tenancy: Tenancy, control: Connection, only: Sequence[str] | None, target: str | None, report: FleetReport
) -> list[Location]:
    """Every location behind ``target``, from one registry query (templates are always checked:
    there is one per server)."""
    tenants = tenancy.store.list(control, statuses=MIGRATED_STATUSES)
    control.commit()
    plan = []
    for location in tenant_locations(tenancy, tenants, only=only):
        if location.kind == "template" or any(t.revision != target for t in location.tenants):
            plan.append(location)
        elif location.kind == "main" and not location.tenants:
            continue
        else:
            report.skipped_at_target += 1
    return plan


@contextmanager
def _start_pool(
    jobs: int, app: str | None, config_path: str | None, revision: str, report: FleetReport
) -> Iterator[ProcessPoolExecutor]:
    started = time.perf_counter()
    pool = ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(app, config_path, revision),
    )

    def ready(_: Future[bool]) -> None:
        report.worker_start_seconds = max(report.worker_start_seconds, time.perf_counter() - started)

    with pool:
        for _ in range(jobs):
            pool.submit(_ready).add_done_callback(ready)
        yield pool


def _ready() -> bool:
    return _worker is not None


def _run_batch(
    locations: list[Location],
    pool: ProcessPoolExecutor | None,
    jobs: int,
    worker: _Worker,
    report: FleetReport,
    callback: Callable[[Outcome], None] | None,
    continue_on_error: bool,
) -> None:
    if not locations:
        return
    if pool is None:
        for location in locations:
            _record(report, worker.migrate(location), callback)
            if report.failed and not continue_on_error:
                return
        return
    pending: set[Future[Outcome]] = set()
    queue = list(reversed(locations))
    # Keep each worker busy with one location and one queued, so that a stop leaves little
    # half-submitted work behind.
    while queue or pending:
        while queue and len(pending) < 2 * jobs and (continue_on_error or not report.failed):
            pending.add(pool.submit(_migrate_in_worker, queue.pop()))
        if not pending:
            break
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            _record(report, future.result(), callback)


# -- workers --------------------------------------------------------------------------------------

_worker: _Worker | None = None


def _init_worker(app: str | None, config_path: str | None, revision: str) -> None:
    global _worker
    logging.basicConfig(level=logging.WARNING)
    config = load_config(config_path or "")
    tenancy = load_app(app, config=config)
    _worker = _Worker(tenancy, config, revision)
    _worker.open()


def _migrate_in_worker(location: Location) -> Outcome:
    assert _worker is not None, "worker process not initialised"
    return _worker.migrate(location)


class _Worker:
    """One process's migration machinery: an entered EnvironmentContext, a runner, a connection to
    the main database (locations there) and one for locks and registry copies."""

    def __init__(self, tenancy: Tenancy, config: Config, revision: str) -> None:
        self.tenancy = tenancy
        if tenancy.migrations is None:
            tenancy.migrations = config
        self.script = ScriptDirectory.from_config(config)
        self.env = EnvironmentContext(config, self.script, destination_rev=revision)
        self.runner = LocationRunner(tenancy, self.env, command="upgrade", destination=revision)
        self.main: Connection | None = None
        self.control: Connection | None = None

    def __enter__(self) -> _Worker:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self.env.__enter__()
        self.main = self.tenancy.admin_engine.connect()
        self.control = self.tenancy.admin_engine.connect()

    def close(self) -> None:
        for conn in (self.main, self.control):
            if conn is not None:
                conn.close()
        self.runner.dispose()
        self.env.__exit__(None, None, None)

    def infrastructure(self) -> Outcome:
        assert self.main is not None
        try:
            return self.runner.run_infrastructure(self.main)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            self._reset()
            return Outcome(
                "infrastructure", "main", INFRASTRUCTURE, None, None, 0.0, "failed", _describe(exc)
            )

    def migrate(self, location: Location) -> Outcome:
        assert self.main is not None and self.control is not None
        started = time.perf_counter()
        try:
            outcome = self.runner.run_tenant(self.main, location, self.control)
            outcome.seconds = time.perf_counter() - started  # waiting for the tenant's lock included
            return outcome
        except Exception as exc:  # noqa: BLE001 - one tenant's failure is reported, not raised
            self._reset()
            return Outcome(
                location.name,
                location.kind,
                TENANT,
                location.revision,
                location.revision,
                time.perf_counter() - started,
                "failed",
                _describe(exc),
            )

    def _reset(self) -> None:
        """After a failure, make sure no connection is left in an aborted transaction."""
        for conn in (self.main, self.control):
            if conn is not None and conn.in_transaction():
                conn.rollback()


def _describe(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    message = str(orig if orig is not None else exc).strip().splitlines()
    # the innermost frame of the project's own code (a revision file, typically)
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith("<")  # Alembic's generated op proxies
        and not any(part in f.filename for part in ("site-packages", "/alembic_ext/", "/sqla_tenancy/"))
    ]
    origin = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(orig or exc).__name__}: {message[0] if message else ''}{origin}"
