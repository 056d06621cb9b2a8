"""pytest-alembic's stock tests against a two-stream project, through its own runner: env.py gets
the Engine in ``config.attributes["connection"]``, as pytest-alembic hands it over."""

from __future__ import annotations

import pytest

# pytest-alembic is not in the dev extra: its 0.13 plugin breaks collection under pytest 9.2 for
# any project with a tests/conftest.py (its TestCollector uses Node._nodeid), and our dev extra
# must not break a user's test run. .ci/run installs it and runs this file on its own; its plugin
# is disabled in pyproject.toml, and these tests drive its runner, which its fixtures build on.
pytest_alembic = pytest.importorskip(
    "pytest_alembic", reason="pytest-alembic is not installed (pip install pytest-alembic; .ci/run does)"
)

from pytest_alembic.config import Config as PytestAlembicConfig  # noqa: E402
from pytest_alembic.tests import default as stock  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402

from .conftest import Project  # noqa: E402


@pytest.fixture
def runner(project: Project):  # type: ignore[no-untyped-def]
    engine = create_engine(project.tenancy.admin_url)
    config = PytestAlembicConfig(config_options={"file": str(project.ini)})
    try:
        with pytest_alembic.runner(config=config, engine=engine) as alembic_runner:
            yield alembic_runner
    finally:
        engine.dispose()


def test_stock_upgrade(runner) -> None:  # type: ignore[no-untyped-def]
    stock.test_upgrade(runner)


def test_stock_model_definitions_match_ddl(runner) -> None:  # type: ignore[no-untyped-def]
    stock.test_model_definitions_match_ddl(runner)


def test_stock_up_down_consistency(runner) -> None:  # type: ignore[no-untyped-def]
    stock.test_up_down_consistency(runner)


def test_stock_single_head_revision_does_not_apply(runner) -> None:  # type: ignore[no-untyped-def]
    """Two streams are two heads by design: this stock test is the one to leave out."""
    with pytest.raises(AssertionError):
        stock.test_single_head_revision(runner)
