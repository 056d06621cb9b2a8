"""MkDocs hook: the command-line reference (docs/cli.md) generated from the Typer app itself.

The page holds prose and the marker ``<!-- cli-reference -->``; at build time the marker becomes
one section per command (usage, help, arguments and options), read from the click command tree
behind ``sqla_tenancy.cli.app``, so the reference cannot drift from the code.
"""

from __future__ import annotations

import importlib
from typing import Any

import typer

MARKER = "<!-- cli-reference -->"


def _click() -> Any:
    """The click implementation behind Typer's commands (recent Typer vendors its own copy)."""
    try:
        return importlib.import_module("typer._click")
    except ImportError:
        return importlib.import_module("click")


def _kind(param: Any, ctx: Any) -> str:
    display = getattr(param, "display_type", None)
    if callable(display):
        return str(display(ctx)).strip("<>")
    return str(param.type.name)


def _param_row(param: Any, ctx: Any) -> str:
    if param.param_type_name == "option":
        names = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
        kind = "flag" if param.is_flag else _kind(param, ctx)
        help_text = param.help or ""
        if param.envvar:
            help_text += f" (env: `{param.envvar}`)"
        default = param.default
        shown = "" if default in (None, False, ()) or callable(default) else f"`{default}`"
    else:
        names = f"`{(param.metavar or param.name or '').upper()}`"
        kind = _kind(param, ctx)
        help_text = getattr(param, "help", "") or ""
        shown = "required" if param.required else ""
    help_text = " ".join(help_text.split()).replace("|", "\\|")
    return f"| {names} | {kind} | {shown} | {help_text} |"


def _sections(command: Any, path: list[str], out: list[str]) -> None:
    ctx = _click().Context(command, info_name=" ".join(path))
    if path[1:]:
        level = "#" * min(len(path), 4)
        out.append(f"{level} `{' '.join(path)}`\n")
        doc = (command.help or "").strip()
        if doc:
            out.append(inspect_clean(doc) + "\n")
        out.append(f"```text\n{command.get_usage(ctx)}\n```\n")
        params = [p for p in command.get_params(ctx) if p.name != "help" and not getattr(p, "hidden", False)]
        if params:
            out.append("| argument / option | type | default | meaning |\n| --- | --- | --- | --- |")
            out.extend(_param_row(p, ctx) for p in params)
            out.append("")
    if hasattr(command, "list_commands"):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                _sections(sub, [*path, name], out)


def inspect_clean(doc: str) -> str:
    import inspect

    return inspect.cleandoc(doc)


def reference() -> str:
    from sqla_tenancy.cli import app

    out: list[str] = []
    _sections(typer.main.get_command(app), ["sqla-tenancy"], out)
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference())
