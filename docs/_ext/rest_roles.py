"""Griffe extension for the API reference: render the reST roles our docstrings use.

The package's docstrings follow the Sphinx convention (``:param x:``, :class:`X`, :func:`f`, ...).
mkdocstrings' Sphinx parser reads the ``:param:`` fields but leaves inline roles as literal text,
so ``:class:`Tenancy``` would show up verbatim. This extension rewrites each role before the
docstrings are parsed:

- a role naming something the reference page renders (one of the modules in
  :data:`PUBLIC_MODULES`, a name in its ``__all__``, or a public member of one of those classes)
  becomes an autorefs cross-reference to it;
- anything else (private modules, constants, SQLAlchemy classes) becomes inline code, so the build
  never meets an unresolvable link.

It also turns the reST literal-block marker ``text::`` into ``text:``, and drops a ``::`` standing
alone on its line (the indented block below it already renders as code in Markdown).

Adding a module to :data:`PUBLIC_MODULES` means ``docs/reference.md`` must render it, with every
name of its ``__all__``: otherwise the links made here have no target and the strict build fails.

Only the documentation build loads this file (see ``mkdocs.yml``); the package does not.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import griffe

PACKAGE = "sqla_tenancy"
#: Modules whose ``__all__`` the reference page renders, with the path it renders them under.
PUBLIC_MODULES = (
    "",
    "testing",
    "resolvers",
    "checkpoint",
    "integrations",
    "integrations.flask",
    "integrations.flask_sqlalchemy",
    "integrations.asgi",
    "integrations.celery",
)

_ROLE = re.compile(r":(?:py:)?(?P<role>[a-z]+):`(?P<target>[^`]+)`")
_LITERAL_MARKER = re.compile(r"(?m)(\S)::$|[ \t]+::$|^::$")


def _public_paths(pkg: griffe.Module) -> dict[str, str]:
    """Canonical path -> the path the reference page renders it under."""
    public: dict[str, str] = {}
    for sub in PUBLIC_MODULES:
        module = pkg[sub] if sub else pkg
        prefix = module.path
        public[module.canonical_path] = prefix
        for name in module.exports or ():
            name = str(name)
            try:
                target = module[name].final_target
            except Exception:  # noqa: BLE001 - an unresolvable export is simply not linked
                continue
            public[target.canonical_path] = f"{prefix}.{name}"
            if target.is_class:
                for member_name, member in target.members.items():
                    if not member_name.startswith("_") and not member.is_alias:
                        public[member.canonical_path] = f"{prefix}.{name}.{member_name}"
    return public


def _lookup(scope: griffe.Object | griffe.Alias, dotted: str) -> griffe.Object | None:
    try:
        found = scope[dotted]
        target: griffe.Object = found.final_target if found.is_alias else found
        return target
    except Exception:  # noqa: BLE001 - missing names and unresolvable aliases alike
        return None


def _resolve(owner: griffe.Object | griffe.Alias, target: str, pkg: griffe.Module) -> griffe.Object | None:
    """Find ``target`` the way Sphinx would: from the owner outwards, then from the package."""
    if target.startswith(PACKAGE + "."):
        return _lookup(pkg, target[len(PACKAGE) + 1 :])
    scope: griffe.Object | griffe.Alias | None = owner
    while scope is not None:
        if not scope.is_function and not scope.is_attribute:
            found = _lookup(scope, target)
            if found is not None:
                return found
        scope = scope.parent
    return None


def _rewrite(
    text: str, owner: griffe.Object | griffe.Alias, pkg: griffe.Module, public: dict[str, str]
) -> str:
    def replace(match: re.Match[str]) -> str:
        role, target = match["role"], match["target"].strip()
        explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", target)
        if explicit:
            title, target = explicit["title"], explicit["target"]
        short = target.startswith("~")
        target = target.lstrip("~!").lstrip(".")
        if not explicit:
            title = target.rsplit(".", 1)[-1] if short else target
            if role in {"func", "meth"}:
                title += "()"
        found = _resolve(owner, target, pkg)
        path = public.get(found.canonical_path) if found is not None else None
        return f"[`{title}`][{path}]" if path else f"`{title}`"

    text = _ROLE.sub(replace, text)
    return _LITERAL_MARKER.sub(lambda m: f"{m[1]}:" if m[1] else "", text)


def _walk(obj: griffe.Object | griffe.Alias) -> Iterator[griffe.Object | griffe.Alias]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


class RestRoles(griffe.Extension):
    """Rewrite reST roles in the ``sqla_tenancy`` docstrings (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != PACKAGE:
            return
        public = _public_paths(pkg)
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj.docstring.value, obj, pkg, public)
