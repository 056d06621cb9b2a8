"""Every ``alembic`` and ``sqla-tenancy`` command line in the README and in docs/ parses as written.

The commands are extracted from the Markdown (code blocks and inline code) and handed to the
real argument parsers: Alembic's ``CommandLine`` and the click command behind our Typer app. A
command that would stop with ``unrecognized arguments`` or ``No such option`` fails here, naming
the file and the line. (tests/test_first_project.py runs the walk-through's commands for real.)
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\s*$")
_INLINE = re.compile(r"`((?:alembic|sqla-tenancy|python -m sqla_tenancy) [^`]+)`")


def _commands() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        in_block, language, pending = False, "", ""
        for number, line in enumerate(lines, 1):
            fence = _FENCE.match(line.strip())
            if fence:
                in_block, language = (not in_block, fence.group(1)) if not in_block else (False, "")
                continue
            where = f"{page.relative_to(ROOT)}:{number}"
            if in_block and language in ("bash", "console", "text", "shell", "sh"):
                text = line.strip()
                text = text[2:] if text.startswith("$ ") else text
                if pending:
                    text, pending = pending + " " + text, ""
                if text.endswith("\\"):
                    pending = text[:-1]
                    continue
                if re.match(r"(alembic|sqla-tenancy|python -m sqla_tenancy)( |$)", text):
                    found.append((where, text))
            elif not in_block:
                found.extend((where, m.group(1)) for m in _INLINE.finditer(line))
    return found


COMMANDS = _commands()


def _argv(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def _click_of(command: object) -> object:
    """The click implementation behind a Typer command (recent Typer vendors its own copy)."""
    try:
        return importlib.import_module("typer._click")
    except ImportError:
        return importlib.import_module("click")


def _parse_click(group: object, args: list[str]) -> None:
    ctx = group.make_context("sqla-tenancy", list(args))  # type: ignore[attr-defined]
    command = group
    while hasattr(command, "resolve_command"):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not rest:
            break
        name, sub, rest = command.resolve_command(ctx, rest)
        assert sub is not None and name is not None
        ctx = sub.make_context(name, rest, parent=ctx)
        command = sub


def test_the_docs_have_commands() -> None:
    kinds = {c.split()[0] for _, c in COMMANDS}
    assert {"alembic", "sqla-tenancy"} <= kinds, COMMANDS
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_command_parses(where: str, command: str) -> None:
    argv = _argv(command)
    if argv[0] == "alembic":
        from alembic.config import CommandLine

        parser = CommandLine(prog="alembic").parser
        try:
            options = parser.parse_args(argv[1:])
        except SystemExit as exc:
            pytest.fail(f"{where}: `{command}` is refused by alembic's parser (exit {exc.code})")
        assert hasattr(options, "cmd") or "--help" in argv, f"{where}: no alembic command in `{command}`"
        return
    from sqla_tenancy.cli import app

    args = argv[3:] if argv[:3] == ["python", "-m", "sqla_tenancy"] else argv[1:]
    group = typer.main.get_command(app)
    click = _click_of(group)
    try:
        _parse_click(group, args)
    except click.exceptions.Exit:  # type: ignore[attr-defined]
        pass  # --help
    except click.ClickException as exc:  # type: ignore[attr-defined]
        pytest.fail(f"{where}: `{command}` is refused by sqla-tenancy's parser: {exc.format_message()}")


def test_the_parser_check_catches_a_wrong_option() -> None:
    from sqla_tenancy.cli import app

    group = typer.main.get_command(app)
    click = _click_of(group)
    with pytest.raises(click.ClickException):  # type: ignore[attr-defined]
        _parse_click(group, ["tenants", "list", "--no-such-option"])
    with pytest.raises(click.ClickException):  # type: ignore[attr-defined]
        _parse_click(group, ["migrate", "--tenant"])


def _sql_blocks(page: Path) -> list[str]:
    blocks, current = [], None
    for line in page.read_text().splitlines():
        if current is None and line.strip() == "```sql":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


@pytest.mark.parametrize("page", ["quickstart.md", "first-project.md"])
def test_the_role_set_up_in_the_docs_is_what_dev_server_runs(page: str) -> None:
    """The set-up SQL the docs show is exactly what works: the statements `sqla-tenancy
    dev-server` runs (and tests/test_first_project.py then uses)."""
    from sqla_tenancy.privileges import setup_sql

    expected = "\n".join(f"{statement};" for statement in setup_sql())
    assert expected in _sql_blocks(ROOT / "docs" / page), f"docs/{page} must show:\n{expected}"
