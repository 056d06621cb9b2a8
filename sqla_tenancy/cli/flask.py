"""``flask tenancy ...``: sqla-tenancy's commands inside a Flask application's command line.

Registered through the ``flask.commands`` entry point, so every Flask app in an environment with
sqla-tenancy installed has the group; its commands use the Tenancy of the app's
:class:`~sqla_tenancy.integrations.flask.TenancyFlask` extension instead of ``--app``.
``flask tenancy tenants list --json`` is ``sqla-tenancy tenants list --json`` for that app.
"""

from __future__ import annotations

from typing import Any

import click
import typer

from ._project import PROVIDER_KEY


def _tenancy_of_flask_app(ctx: click.Context) -> Any:
    from flask.cli import ScriptInfo

    from ..integrations.flask import EXTENSION_KEY

    app = ctx.ensure_object(ScriptInfo).load_app()
    extension = app.extensions.get(EXTENSION_KEY)
    if extension is None:
        raise click.UsageError(
            f"The Flask app {app.name!r} has no TenancyFlask extension: create it with "
            "TenancyFlask(app, tenancy=..., checkpoint=...) or call init_app(app)."
        )
    return extension.tenancy


def _make_group() -> click.Group:
    from . import app as sqla_tenancy_app

    commands = typer.main.get_command(sqla_tenancy_app)
    assert isinstance(commands, click.Group)

    @click.group(
        "tenancy",
        help="sqla-tenancy: tenants, migrations and runs as a tenant, for this app's TenancyFlask.",
    )
    @click.pass_context
    def group(ctx: click.Context) -> None:
        ctx.meta[PROVIDER_KEY] = lambda: _tenancy_of_flask_app(ctx)

    for name, command in commands.commands.items():
        if name != "dev-server":  # not tied to an application
            group.add_command(command, name)
    return group


#: the ``flask tenancy`` group (entry point ``flask.commands``)
tenancy_group = _make_group()
