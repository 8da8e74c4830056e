"""The registry: immutable, stable, short descriptions, valid schemas, marked writes."""

from __future__ import annotations

import json
import re

import pytest
from jsonschema import Draft202012Validator

from services.tools.output import estimate_tokens
from services.tools.registry import Effect, Registry, default_registry


def test_registry_is_ordered_and_versioned_stably() -> None:
    first, second = default_registry(), default_registry()
    assert first.names() == sorted(first.names())
    assert first.version == second.version
    assert len(first.version) == 16
    reordered = Registry(tuple(reversed(list(first))))
    assert reordered.version == first.version
    assert reordered.names() == first.names()


def test_registry_cannot_be_changed() -> None:
    registry = default_registry()
    with pytest.raises(AttributeError):
        registry._tools = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        registry._tools["x"] = next(iter(registry))  # type: ignore[index]
    tool = next(iter(registry))
    with pytest.raises(AttributeError):
        tool.description = "changed"  # type: ignore[misc]


def test_version_changes_with_any_spec_change() -> None:
    from dataclasses import replace

    tools = list(default_registry())
    changed = [replace(tools[0], timeout_ms=tools[0].timeout_ms + 1), *tools[1:]]
    assert Registry(tuple(changed)).version != default_registry().version


def test_duplicate_names_are_refused() -> None:
    tool = next(iter(default_registry()))
    with pytest.raises(ValueError):
        Registry((tool, tool))


@pytest.mark.parametrize("tool", list(default_registry()), ids=lambda t: t.name)
def test_each_tool_is_short_snake_case_and_has_a_valid_schema(tool: object) -> None:
    from services.tools.registry import ToolDefinition

    assert isinstance(tool, ToolDefinition)
    assert re.fullmatch(r"[a-z][a-z0-9_]*", tool.name)
    assert estimate_tokens(tool.description) < 200
    rendered_spec = json.dumps(
        {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
    )
    assert estimate_tokens(rendered_spec) < 400  # the whole spec stays small too
    Draft202012Validator.check_schema(tool.parameters)
    assert tool.parameters["type"] == "object"
    assert tool.parameters["additionalProperties"] is False
    assert 0 < tool.timeout_ms <= 10_000


def test_write_tools_are_marked_and_say_so() -> None:
    registry = default_registry()
    writes = {t.name for t in registry if t.effect is Effect.WRITE}
    assert writes == {"billing_refund", "billing_credit"}
    for name in writes:
        tool = registry.get(name)
        assert tool is not None and tool.description.startswith("WRITE")
