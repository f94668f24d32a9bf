"""Render the API schema as Markdown: ``python -m virtnode.rpc.apidoc > docs/api.md``."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping

from virtnode.rpc.schema import COMMON_ERRORS, DEFINITION_REF, ApiSchema, load_schema
from virtnode.util.jsontypes import JsonObject


def _type_of(schema: JsonObject) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "oneOf" in schema:
        return " or ".join(_type_of(alternative) for alternative in schema["oneOf"])
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        return " or ".join(str(k) for k in kind)
    if kind == "array":
        return f"array of {_type_of(schema.get('items', {}))}"
    return str(kind)


def _resolved(schema: JsonObject, definitions: Mapping[str, JsonObject]) -> JsonObject:
    """``schema`` with its ``$ref`` to a definition replaced by what that definition says.

    Its own keywords add to the definition's: properties merged, required joined.
    """
    ref = schema.get("$ref")
    if not isinstance(ref, str) or not ref.startswith(DEFINITION_REF):
        return schema
    base = _resolved(definitions[ref.removeprefix(DEFINITION_REF)], definitions)
    merged = {**base, **{k: v for k, v in schema.items() if k != "$ref"}}
    merged["properties"] = {**base.get("properties", {}), **schema.get("properties", {})}
    merged["required"] = [*base.get("required", []),
                          *(r for r in schema.get("required", [])
                            if r not in base.get("required", []))]
    return merged


def _fields(schema: JsonObject, definitions: Mapping[str, JsonObject]) -> list[str]:
    schema = _resolved(schema, definitions)
    properties = schema.get("properties", {})
    if not properties and "oneOf" in schema:
        return [f"One of: {_type_of(schema)} (see Shared types).", ""]
    if not properties:
        return ["_none_", ""]
    required = set(schema.get("required", []))
    lines = ["| name | type | required | description |", "|---|---|---|---|"]
    for name, prop in properties.items():
        description = " ".join(str(prop.get("description", "")).split())
        default = f" Default: `{json.dumps(prop['default'])}`." if "default" in prop else ""
        lines.append(
            f"| `{name}` | {_type_of(prop)} | {'yes' if name in required else 'no'} "
            f"| {description}{default} |"
        )
    return [*lines, ""]


def render(schema: ApiSchema) -> str:
    """Return the Markdown reference for ``schema``."""
    out = [
        "# virtnode API reference",
        "",
        "Generated from `api_schema/` by `make docs` (`python -m virtnode.rpc.apidoc`); "
        "do not edit by hand. The same document is served by `Api.describe`.",
        "",
        f"API version {schema.version}. Every method may also raise: "
        + ", ".join(f"`{e}`" for e in COMMON_ERRORS) + ".",
        "",
        "## Methods",
        "",
    ]
    for method in schema.methods.values():
        out += [
            f"### {method.name}",
            "",
            f"Access: `{method.access}` · since {method.since}",
            "",
            method.description,
            "",
            "Params:",
            "",
            *_fields(method.params, schema.definitions),
            "Result:",
            "",
            *_fields(method.result, schema.definitions),
        ]
        if method.errors:
            out += ["Errors: " + ", ".join(f"`{e}`" for e in method.errors), ""]
    out += ["## Events", ""]
    for event in schema.events.values():
        out += [f"### {event.topic}", "", f"Since {event.since}", "", event.description, "",
                "Payload:", "", *_fields(event.payload, schema.definitions)]
    out += ["## Errors", "", "| name | code | meaning |", "|---|---|---|"]
    out += [f"| `{e.name}` | {e.code} | {' '.join(e.description.split())} |"
            for e in schema.errors.values()]
    out += ["", "## Shared types", ""]
    for name, definition in schema.definitions.items():
        out += [f"- `{name}`: `{json.dumps(definition, sort_keys=True)}`"]
    return "\n".join(out) + "\n"


def main() -> None:
    sys.stdout.write(render(load_schema()))


if __name__ == "__main__":
    main()
