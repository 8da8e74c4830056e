"""Test-wide settings. Service fixtures live in each service's tests/<service>/conftest.py."""

from __future__ import annotations

import pytest

# The real inference server is session-wide: registered once here so every package shares
# one engine (a fixture imported into two modules would be two fixtures, two engines).
pytest_plugins = ["tests.fixtures_inference"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the fast tier first so a broken basic fails before the engine starts."""
    heavy = {"slow", "postgres", "redis"}
    items.sort(key=lambda item: any(item.get_closest_marker(m) for m in heavy))
