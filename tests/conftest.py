"""Session-wide fixtures. Keep this minimal: only what several test files share."""

from __future__ import annotations

import pytest

from tests._recipe_helpers import RecipeEnv, build_recipe_env


@pytest.fixture(scope="session")
def recipe_env(tmp_path_factory) -> RecipeEnv:
    """One tiny checkpoint + one shapes dataset for every recipe test (built once, under tmp)."""
    return build_recipe_env(tmp_path_factory.mktemp("recipe_env"))


@pytest.fixture
def fresh_coordexp_logger():
    """The ``coordexp`` logger without handlers for one test (earlier tests may have bound it to a
    captured, now closed, stderr); restored afterwards."""
    import logging

    logger = logging.getLogger("coordexp")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    logger.handlers[:] = []
    logger.propagate = True
    yield logger
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
