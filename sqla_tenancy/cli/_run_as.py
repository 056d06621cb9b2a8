"""``python -m sqla_tenancy.cli._run_as SLUG script.py [args]`` (or ``-m module [args]``): run a
Python script as ``__main__`` inside ``tenant_context(SLUG)``; ``sqla-tenancy run`` starts one
per tenant."""

from __future__ import annotations

import runpy
import sys

from ..context import tenant_context


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m sqla_tenancy.cli._run_as SLUG script.py [args] | -m module [args]")
    slug, *target = argv
    with tenant_context(slug):
        if target[0] == "-m":
            if len(target) < 2:
                sys.exit("-m needs a module name")
            sys.argv = [target[1], *target[2:]]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(target)
            sys.path.insert(0, str(__import__("os").path.dirname(__import__("os").path.abspath(target[0]))))
            runpy.run_path(target[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
