"""The registry: immutable, stable, short descriptions, valid schemas, marked writes."""

from __future__ import annotations

import json
import re

import pytest
from jsonschema import Draft202012Validator

from services.tools.output import estimate_tokens
from services.tools.registry import Effect, Registry, default_registry, define


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


@pytest.mark.parametrize(
    "change",
    [
        {"timeout_ms": 1},
        {"principal_arguments": ()},
        {"requires_customer": False, "principal_arguments": ()},
    ],
)
def test_version_changes_with_any_spec_change(change: dict[str, object]) -> None:
    from dataclasses import replace

    tools = list(default_registry())
    first = next(t for t in tools if t.name == "billing_lookup")
    changed = [replace(first, **change), *(t for t in tools if t is not first)]  # type: ignore[arg-type]
    assert Registry(tuple(changed)).version != default_registry().version


def test_version_tells_requires_customer_apart() -> None:
    from dataclasses import replace

    tools = list(default_registry())
    kb = next(t for t in tools if t.name == "kb_search")
    changed = [replace(kb, requires_customer=True), *(t for t in tools if t is not kb)]
    assert Registry(tuple(changed)).version != default_registry().version


def test_principal_bound_arguments() -> None:
    registry = default_registry()
    bound = {t.name: (t.principal_arguments, t.requires_customer) for t in registry}
    assert bound == {
        "billing_credit": (("customer_id",), True),
        "billing_lookup": (("customer_id",), True),
        "billing_refund": (("customer_id",), True),
        "crm_lookup": (("customer_id",), True),
        "kb_search": ((), False),
    }
    # What the model decodes once the orchestrator strips the bound arguments:
    crm = registry.get("crm_lookup")
    assert crm is not None
    stripped = {k: v for k, v in crm.parameters["properties"].items() if k != "customer_id"}
    assert stripped == {}
    assert crm.parameters["required"] == ["customer_id"]


def test_email_lookup_is_registered_only_when_allowed() -> None:
    default = default_registry()
    allowed = default_registry(allow_email_lookup=True)
    assert "crm_find_customer" not in default.names()
    assert allowed.names() == sorted([*default.names(), "crm_find_customer"])
    assert allowed.version != default.version
    find = allowed.get("crm_find_customer")
    assert find is not None
    assert find.principal_arguments == () and find.requires_customer is False
    assert find.parameters["required"] == ["email"]


@pytest.mark.parametrize(
    ("bound", "requires_customer"),
    [(("account_id",), True), (("customer_id",), False)],
    ids=["not-a-property", "anonymous-could-call-it"],
)
def test_principal_bound_tools_need_a_schema_property_and_a_customer(
    bound: tuple[str, ...], requires_customer: bool
) -> None:
    schema = {"type": "object", "properties": {"customer_id": {"type": "string"}}}
    with pytest.raises(ValueError):
        define(
            "t",
            "d",
            schema,
            effect=Effect.READ,
            timeout_ms=1,
            source_kind="x",
            principal_arguments=bound,
            requires_customer=requires_customer,
        )


def test_duplicate_names_are_refused() -> None:
    tool = next(iter(default_registry()))
    with pytest.raises(ValueError):
        Registry((tool, tool))


@pytest.mark.parametrize(
    "tool", list(default_registry(allow_email_lookup=True)), ids=lambda t: t.name
)
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
