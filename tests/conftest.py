"""Test-wide settings. Service fixtures live in each service's tests/<service>/conftest.py."""

from __future__ import annotations

import pytest

# The real inference server is session-wide: registered once here so every package shares
# one engine (a fixture imported into two modules would be two fixtures, two engines).
pytest_plugins = ["tests.fixtures_inference"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the fast tier first so a broken basic fails before the engine starts."""
    heavy = {"slow", "postgres", "redis"}

    def order(item: pytest.Item) -> tuple[bool, bool]:
        own_engine = "without_shared_engine" in getattr(item, "fixturenames", ())
        return own_engine, any(item.get_closest_marker(m) for m in heavy)

    # Fast tier, then the heavy tiers, then the tests that start their own engine (after the
    # shared one has stopped: one engine resident at a time).
    items.sort(key=order)
