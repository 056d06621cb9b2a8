"""pytest-alembic's stock tests against a two-stream project, through its own runner: env.py gets
the Engine in ``config.attributes["connection"]``, as pytest-alembic hands it over."""

from __future__ import annotations

import pytest
import pytest_alembic
from pytest_alembic.config import Config as PytestAlembicConfig
from pytest_alembic.tests import default as stock
from sqlalchemy import create_engine

from .conftest import Project

# (pytest-alembic's own pytest plugin is disabled in pyproject.toml: it fails to collect under
# pytest 9. Its runner, which its fixtures are built on, is what these tests drive.)


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
