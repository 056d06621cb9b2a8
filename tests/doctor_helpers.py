"""The doctor's findings about this test's own objects.

The test cluster is shared by the whole run, and some tests leave databases behind until the
session ends (a restored export, say), created as ``CREATE DATABASE`` makes them: open to
``PUBLIC``. Every database tenant's login role can open those, and the doctor rightly says so;
tests of one Tenancy look at the findings about its own objects only.
"""

from __future__ import annotations

from sqla_tenancy import Finding, Tenancy


def own_findings(t: Tenancy) -> list[Finding]:
    """``t.doctor()`` without findings about another test's ``tenancy_test_*`` database."""
    own = t.url.database

    def foreign(finding: Finding) -> bool:
        if finding.check != "role-opens-other-database":
            return False
        return "'tenancy_test_" in finding.problem and f"'{own}'" not in finding.problem

    return [f for f in t.doctor() if not foreign(f)]
