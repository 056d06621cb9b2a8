"""``python -m sqla_tenancy``: the ``sqla-tenancy`` command line."""

from .cli import main

main()
