"""``sqla-tenancy shell`` and ``sqla-tenancy run``: code that runs as a tenant.

``shell --tenant acme`` opens an interactive Python shell (IPython when installed) inside
``tenant_context("acme")``, with the Tenancy, a session, the tenant and the application's module
in scope; ``--platform REASON`` opens it in ``platform_context(REASON)`` instead.

``run`` runs one piece of code once per tenant, each time in that tenant's context:

* ``module:function``: the function is called in this process as ``function(tenant)`` (or with
  no argument when it takes none), inside ``tenant_context(tenant)``;
* ``python script.py [args]`` / ``python -m module [args]``: a child Python process per tenant
  that enters the tenant's context, then runs the script as ``__main__``;
* any other command: a child process per tenant, with ``SQLA_TENANCY_TENANT`` (the slug) and
  ``SQLA_TENANCY_TENANT_ID`` in its environment.

With ``--jobs N`` tenants run N at a time (threads; child processes for commands). A per-tenant
report follows (``--json`` for scripts); the exit code is 1 when any tenant failed.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ._app import EXIT_FAILED, EXIT_USAGE, AppOption, ConfigOption, JsonOption, app
from ._project import fail, load_tenancy, operation, print_json, print_table, split_list

if TYPE_CHECKING:
    from ..registry import Tenant
    from ..tenancy import Tenancy

TENANT_ENV = "SQLA_TENANCY_TENANT"
TENANT_ID_ENV = "SQLA_TENANCY_TENANT_ID"
_PYTHONS = {"python", "python3", Path(sys.executable).name}


@app.command()
def shell(
    tenant: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--tenant", "-t", help="Run the shell as this tenant (slug or id)."),
    ] = None,
    platform: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--platform", metavar="REASON", help="Cross-tenant work instead, logged with REASON."),
    ] = None,
    plain: Annotated[
        bool, typer.Option("--plain", help="The standard Python shell, even with IPython.")
    ] = False,
    app_spec: AppOption = None,
    config: ConfigOption = Path("alembic.ini"),
) -> None:
    """An interactive Python shell as a tenant (or in platform mode), with the app in scope."""
    if (tenant is None) == (platform is None):
        fail("pass exactly one of --tenant SLUG or --platform REASON.", EXIT_USAGE)
    from ..context import platform_context, tenant_context

    tenancy = load_tenancy(app_spec, config)
    with operation(tenancy):
        namespace = _namespace(tenancy)
        if tenant is not None:
            record = tenancy.get_tenant(tenant)
            if not record.is_active:
                fail(f"tenant {record.slug!r} is {record.status}; resume it first.")
            scope: Any = tenant_context(record.slug)
            label = record.slug
            namespace["tenant"] = record
        else:
            assert platform is not None
            scope = platform_context(platform)
            label = "platform"
        Session = tenancy.sessionmaker()
        with scope, Session() as session:
            namespace.update(session=session, Session=Session)
            banner = (
                f"sqla-tenancy shell as {label!r}: `session` queries "
                + ("only this tenant's data" if tenant else "every tenant (platform mode)")
                + f". In scope: {', '.join(sorted(k for k in namespace if not k.startswith('_')))}"
            )
            _interact(namespace, banner, label, plain=plain)


def _namespace(tenancy: Tenancy) -> dict[str, Any]:
    """The tenancy, SQLAlchemy's usual helpers and every mapped class of the tenancy's metadata."""
    import sqlalchemy
    from sqlalchemy.orm import Mapper

    namespace: dict[str, Any] = {
        "tenancy": tenancy,
        "select": sqlalchemy.select,
        "text": sqlalchemy.text,
        "func": sqlalchemy.func,
    }
    import gc

    for obj in gc.get_objects():
        if isinstance(obj, Mapper) and getattr(obj.local_table, "metadata", None) is tenancy.metadata:
            namespace.setdefault(obj.class_.__name__, obj.class_)
    return namespace


def _interact(namespace: dict[str, Any], banner: str, label: str, *, plain: bool) -> None:
    if not plain and sys.stdin.isatty():
        try:
            from IPython import start_ipython
            from traitlets.config import Config

            cfg = Config()
            cfg.TerminalInteractiveShell.banner2 = banner
            cfg.TerminalInteractiveShell.prompts_class = _ipython_prompts(label)
            start_ipython(argv=[], user_ns=namespace, config=cfg)
            return
        except ImportError:
            pass
    import code

    previous = getattr(sys, "ps1", None)
    sys.ps1 = f"[{label}] >>> "
    try:
        code.interact(banner=banner, local=namespace, exitmsg="")
    finally:
        if previous is None:
            del sys.ps1
        else:
            sys.ps1 = previous


def _ipython_prompts(label: str) -> type:
    from IPython.terminal.prompts import Prompts, Token

    class TenantPrompts(Prompts):  # type: ignore[misc]
        def in_prompt_tokens(self) -> list[tuple[Any, str]]:
            return [
                (Token.Prompt, f"[{label}] In ["),
                (Token.PromptNum, str(self.shell.execution_count)),
                (Token.Prompt, "]: "),
            ]

    return TenantPrompts


@dataclass
class RunOutcome:
    """What ``run`` did for one tenant."""

    tenant: str
    placement: str
    status: str  # "ok", "failed" or "not run"
    seconds: float = 0.0
    result: str | None = None
    error: str | None = None
    exit_code: int | None = None


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    tenant: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--tenant", "-t", help="Run for this tenant (repeat, or a comma list)."),
    ] = None,
    all_tenants: Annotated[bool, typer.Option("--all-tenants", help="Run for every active tenant.")] = False,
    placement: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="With --all-tenants: only tenants of this placement."),
    ] = None,
    exclude_default: Annotated[
        bool, typer.Option("--exclude-default", help="With --all-tenants: leave the default tenant out.")
    ] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Tenants run at the same time.")] = 1,
    continue_on_error: Annotated[
        bool, typer.Option("--continue-on-error", help="Go on past failing tenants.")
    ] = False,
    app_spec: AppOption = None,
    config: ConfigOption = Path("alembic.ini"),
    as_json: JsonOption = False,
) -> None:
    """Run `module:function` or `-- command ...` once per tenant, in its context, with a report.

    Examples: `sqla-tenancy run --all-tenants myapp.jobs:reindex`,
    `sqla-tenancy run --tenant acme -- python scripts/fix.py --dry-run`.
    """
    target = list(ctx.args)
    if not target:
        fail("what to run? Give module:function, or -- followed by a command.", EXIT_USAGE)
    chosen = split_list(tenant)
    if bool(chosen) == all_tenants:
        fail("pass --tenant SLUG (repeatable) or --all-tenants, not both.", EXIT_USAGE)
    if placement is not None and not all_tenants:
        fail("--placement narrows --all-tenants; with --tenant, name the tenants.", EXIT_USAGE)
    tenancy = load_tenancy(app_spec, config)
    with operation(tenancy):
        if all_tenants:
            tenants = [
                t
                for t in tenancy.list_tenants()
                if t.is_active
                and (placement is None or t.placement == placement)
                and not (exclude_default and t.is_default)
            ]
        else:
            assert chosen is not None
            tenants = [tenancy.get_tenant(ref) for ref in chosen]
            inactive = [t.slug for t in tenants if not t.is_active]
            if inactive:
                fail(f"not active: {', '.join(inactive)}; resume them first or leave them out.")
        runner = _runner(target, app_spec, config)
        outcomes = _run_all(tenants, runner, jobs=jobs, continue_on_error=continue_on_error, quiet=as_json)
    failed = [o for o in outcomes if o.status == "failed"]
    if as_json:
        print_json({"ok": not failed, "tenants": [asdict(o) for o in outcomes]})
    else:
        print_table(
            None,
            ("tenant", "placement", "status", "seconds", "result / error"),
            [
                [o.tenant, o.placement, o.status, f"{o.seconds:.2f}", o.error or o.result or ""]
                for o in outcomes
            ],
            empty="no tenant to run for.",
        )
        counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "failed", "not run")}
        typer.echo(f"{counts['ok']} ok, {counts['failed']} failed, {counts['not run']} not run")
    if failed:
        raise typer.Exit(EXIT_FAILED)


Runner = Callable[["Tenant"], tuple[str | None, int | None]]


def _runner(target: list[str], app_spec: str | None, config: Path) -> Runner:
    """A callable running ``target`` for one tenant: returns (result, exit code); raises on failure."""
    from ..context import tenant_context

    if len(target) == 1 and ":" in target[0] and not os.path.exists(target[0]):
        function = _load_function(target[0])
        takes_tenant = bool(inspect.signature(function).parameters)

        def call(tenant: Tenant) -> tuple[str | None, int | None]:
            with tenant_context(tenant.slug):
                value = function(tenant) if takes_tenant else function()
            return (None if value is None else repr(value)), None

        return call

    python = Path(target[0]).name in _PYTHONS and len(target) > 1

    def command_for(tenant: Tenant) -> list[str]:
        if python:  # the child enters the tenant's context itself
            return [sys.executable, "-m", "sqla_tenancy.cli._run_as", tenant.slug, *target[1:]]
        return target

    def spawn(tenant: Tenant) -> tuple[str | None, int | None]:
        env = {**os.environ, TENANT_ENV: tenant.slug, TENANT_ID_ENV: str(tenant.id)}
        proc = subprocess.run(command_for(tenant), env=env, capture_output=True, text=True)
        output = (proc.stdout + proc.stderr).rstrip()
        for line in output.splitlines():
            typer.echo(f"[{tenant.slug}] {line}", err=True)
        if proc.returncode != 0:
            last = output.splitlines()[-1] if output else ""
            raise _ChildFailed(
                proc.returncode, f"exit code {proc.returncode}" + (f": {last}" if last else "")
            )
        return None, 0

    return spawn


class _ChildFailed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _load_function(spec: str) -> Callable[..., Any]:
    import importlib

    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        fail(f"cannot import {module_name!r} (from {spec!r}): {exc}", EXIT_USAGE)
    function = getattr(module, attribute, None)
    if not callable(function):
        fail(f"{spec!r} is not a function.", EXIT_USAGE)
    return function  # type: ignore[no-any-return]


def _run_all(
    tenants: list[Tenant], runner: Runner, *, jobs: int, continue_on_error: bool, quiet: bool
) -> list[RunOutcome]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    outcomes = {t.slug: RunOutcome(t.slug, t.placement, "not run") for t in tenants}
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("tenants"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
    )

    def one(tenant: Tenant) -> RunOutcome:
        outcome = outcomes[tenant.slug]
        started = time.perf_counter()
        try:
            outcome.result, outcome.exit_code = runner(tenant)
            outcome.status = "ok"
        except _ChildFailed as exc:
            outcome.status, outcome.error, outcome.exit_code = "failed", str(exc), exc.code
        except Exception as exc:  # noqa: BLE001 - reported per tenant
            outcome.status, outcome.error = "failed", f"{type(exc).__name__}: {exc}"
        outcome.seconds = time.perf_counter() - started
        return outcome

    queue = list(tenants)
    stop = False
    with bar, ThreadPoolExecutor(max_workers=jobs) as pool:
        task = bar.add_task("run", total=len(queue))
        running: set[Future[RunOutcome]] = set()
        while (queue and not stop) or running:
            while queue and not stop and len(running) < jobs:
                running.add(pool.submit(one, queue.pop(0)))
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                bar.advance(task)
                if future.result().status == "failed" and not continue_on_error:
                    stop = True
    return list(outcomes.values())
