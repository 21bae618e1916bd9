"""Session-wide fixtures. Keep this minimal: only what several test files share."""

from __future__ import annotations

import pytest

from tests._recipe_helpers import RecipeEnv, build_recipe_env


@pytest.fixture(scope="session")
def recipe_env(tmp_path_factory) -> RecipeEnv:
    """One tiny checkpoint + one shapes dataset for every recipe test (built once, under tmp)."""
    return build_recipe_env(tmp_path_factory.mktemp("recipe_env"))
