"""Test-wide settings. Service fixtures live in each service's tests/<service>/conftest.py."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the fast tier first so a broken basic fails before the engine starts."""
    heavy = {"slow", "postgres", "redis"}
    items.sort(key=lambda item: any(item.get_closest_marker(m) for m in heavy))
