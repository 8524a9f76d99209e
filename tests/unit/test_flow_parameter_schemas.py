"""Every deployment's run form explains itself: each parameter has a description and a concrete type.

Prefect builds the form from the flow function's annotations and its Google-style `Args:`
docstring section (`prefect.utilities.callables.parameter_schema`, the same call `prefect
deploy` makes), so an untyped or undocumented parameter shows up as a bare text box.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import Flow
from prefect.utilities.callables import parameter_schema

import flows

ROOT = Path(__file__).resolve().parents[2]


def all_flows() -> dict[str, Flow[Any, Any]]:
    """Every flow object defined in flows/, by entrypoint, so a new flow is checked without listing it."""
    found: dict[str, Flow[Any, Any]] = {}
    for module_info in pkgutil.iter_modules(flows.__path__):
        module = importlib.import_module(f"flows.{module_info.name}")
        for attribute, value in vars(module).items():
            if isinstance(value, Flow) and value.fn.__module__ == module.__name__:
                found[f"flows/{module_info.name}.py:{attribute}"] = value
    return found


FLOWS = all_flows()


def concrete(prop: dict[str, Any], definitions: dict[str, Any]) -> bool:
    """A schema that names a type other than null (directly, as an enum, by reference or in an anyOf)."""
    if "$ref" in prop:
        return concrete(definitions[prop["$ref"].rsplit("/", 1)[-1]], definitions)
    if "enum" in prop:
        return True
    if prop.get("type") not in (None, "null"):
        return True
    return any(concrete(option, definitions) for option in prop.get("anyOf", []) + prop.get("allOf", []))


def test_every_deployment_entrypoint_is_a_checked_flow() -> None:
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert {d["entrypoint"] for d in deployments} <= set(FLOWS)


@pytest.mark.parametrize("entrypoint", sorted(FLOWS))
def test_every_parameter_has_a_description_and_a_concrete_type(entrypoint: str) -> None:
    schema = parameter_schema(FLOWS[entrypoint].fn).model_dump_for_openapi()
    definitions = schema.get("definitions", {})
    assert schema["properties"], f"{entrypoint} has no parameters to check"
    undocumented = [name for name, prop in schema["properties"].items() if not prop.get("description", "").strip()]
    untyped = [name for name, prop in schema["properties"].items() if not concrete(prop, definitions)]
    assert (undocumented, untyped) == ([], []), f"{entrypoint}: without description / concrete type"


def test_the_check_catches_an_untyped_or_undocumented_parameter() -> None:
    def documented(a: int, b: int | None = None) -> None:
        """A documented function.

        Args:
            a: the first.
            b: the second.
        """

    def bare(a, b=None):  # type: ignore[no-untyped-def]
        pass

    good = parameter_schema(documented).model_dump_for_openapi()["properties"]
    bad = parameter_schema(bare).model_dump_for_openapi()["properties"]
    assert all(concrete(p, {}) and p.get("description") for p in good.values())
    assert not any(concrete(p, {}) or p.get("description") for p in bad.values())


@pytest.mark.parametrize("entrypoint", ["flows/ops.py:kill_switch", "flows/ops.py:flatten", "flows/golive.py:go_live"])
def test_operator_actions_require_who_and_why(entrypoint: str) -> None:
    required = parameter_schema(FLOWS[entrypoint].fn).model_dump_for_openapi()["required"]
    assert {"operator", "reason"} <= set(required)


def test_the_kill_switch_form_makes_the_operator_choose_on_or_off() -> None:
    schema = parameter_schema(FLOWS["flows/ops.py:kill_switch"].fn).model_dump_for_openapi()
    assert "enabled" in schema["required"] and "default" not in schema["properties"]["enabled"]


def test_operator_deployments_force_a_choice_and_run_one_at_a_time() -> None:
    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert "enabled" not in (deployments["kill-switch"].get("parameters") or {})  # the operator chooses
    for name in ("kill-switch", "flatten", "go-live"):
        assert deployments[name]["concurrency_limit"]["limit"] == 1, name
    for deployment in deployments.values():
        for trigger in deployment.get("triggers", []):
            assert trigger.get("name") and trigger.get("description"), deployment["name"]
