"""``flask tenancy ...``: sqla-tenancy's commands inside a Flask application's command line.

Registered through the ``flask.commands`` entry point, so every Flask app in an environment with
sqla-tenancy installed has the group; its commands use the Tenancy of the app's
:class:`~sqla_tenancy.integrations.flask.TenancyFlask` extension instead of ``--app``:
``flask --app myapp tenancy tenants list --json`` is ``sqla-tenancy tenants list --json`` for
that app. (The arguments are handed to the ``sqla-tenancy`` command line as they are: Flask's
click and the one Typer runs on need not be the same.)
"""

from __future__ import annotations

from typing import Any

import click

from ._project import tenancy_provider


def _tenancy_of(ctx: click.Context) -> Any:
    from flask.cli import ScriptInfo

    from ..integrations.flask import EXTENSION_KEY

    flask_app = ctx.ensure_object(ScriptInfo).load_app()
    extension = flask_app.extensions.get(EXTENSION_KEY)
    if extension is None:
        raise click.UsageError(
            f"The Flask app {flask_app.name!r} has no TenancyFlask extension: create it with "
            "TenancyFlask(app, tenancy=..., checkpoint=...) or call init_app(app)."
        )
    return extension.tenancy


@click.command(
    "tenancy",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
    help="sqla-tenancy's commands (tenants, migrate, shell, run) for this app's TenancyFlask.",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def tenancy_group(ctx: click.Context, args: tuple[str, ...]) -> None:
    from . import app

    token = tenancy_provider.set(lambda: _tenancy_of(ctx))
    try:
        app(args=list(args), prog_name=f"{ctx.parent.info_name if ctx.parent else 'flask'} tenancy")
    finally:
        tenancy_provider.reset(token)
