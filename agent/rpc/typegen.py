"""Generate ``api_schema/params.py``: each method's params as a TypedDict.

``python -m virtnode.rpc.typegen > api_schema/params.py`` (``make docs`` runs it; a test
fails when the file is out of date). A TypedDict is the validated params object itself,
typed: keys with a default in the schema are always present once validated, keys that are
neither required nor defaulted are ``NotRequired``, so ``"spec" in params`` keeps its
meaning. Nested objects stay ``JsonObject``: the services check those themselves.
"""

from __future__ import annotations

import json
import keyword
import re
import sys
from collections.abc import Mapping
from typing import Any

from virtnode.rpc.schema import DEFINITION_REF, ApiSchema, load_schema
from virtnode.util.jsontypes import JsonObject

_SCALARS = {"string": "str", "integer": "int", "number": "float", "boolean": "bool",
            "null": "None", "object": "JsonObject"}


def type_name(method: str) -> str:
    """``VM.shutdown`` -> ``VmShutdownParams``."""
    namespace, verb = method.split(".")
    if namespace.isupper():
        namespace = namespace.capitalize()
    return f"{namespace}{verb[0].upper()}{verb[1:]}Params"


def annotation(node: Mapping[str, Any], definitions: Mapping[str, JsonObject]) -> str:
    """The Python type of the values ``node`` accepts."""
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith(DEFINITION_REF):
        return annotation(definitions[ref[len(DEFINITION_REF):]], definitions)
    if "enum" in node and all(isinstance(v, str) for v in node["enum"]):
        return "Literal[" + ", ".join(json.dumps(v) for v in node["enum"]) + "]"
    for key in ("oneOf", "anyOf"):
        if key in node:
            return _union([annotation(alt, definitions) for alt in node[key]])
    kind = node.get("type")
    if isinstance(kind, list):
        return _union([annotation({**node, "type": k}, definitions) for k in kind])
    if kind == "array":
        items = node.get("items")
        return f"list[{annotation(items, definitions)}]" if isinstance(items, dict) else \
            "list[Any]"
    if isinstance(kind, str) and kind in _SCALARS:
        return _SCALARS[kind]
    return "Any"


def _union(names: list[str]) -> str:
    unique = list(dict.fromkeys(names))
    if "Any" in unique:
        return "Any"
    if "float" in unique and "int" in unique:
        unique.remove("int")
    return " | ".join(unique)


def render(schema: ApiSchema) -> str:
    lines = [
        '"""The params of every API method as a TypedDict, generated from the YAML beside it.',
        "",
        "Do not edit: ``make docs`` writes it (``python -m virtnode.rpc.typegen``).",
        '"""',
        "",
    ]
    body = []
    for name in sorted(schema.methods):
        params = _resolved(schema.methods[name].params, schema.definitions)
        required = set(params.get("required", ()))
        fields = []
        for key, node in params.get("properties", {}).items():
            kind = annotation(node, schema.definitions)
            if key not in required and "default" not in node:
                kind = f"NotRequired[{kind}]"
            fields.append((key, kind))
        tname = type_name(name)
        body += ["", ""]
        if not fields:
            body.append(f'{tname} = TypedDict("{tname}", {{}})')
        elif any(keyword.iskeyword(k) or not k.isidentifier() for k, _ in fields):
            body.append(f'{tname} = TypedDict("{tname}", {{')
            body += [f'    "{k}": {t},' for k, t in fields]
            body.append("})")
        else:
            body.append(f"class {tname}(TypedDict):")
            body += [f"    {k}: {t}" for k, t in fields]
    text = "\n".join(body)
    typing = [n for n in ("Any", "Literal", "NotRequired") if f"{n}[" in text or
              re.search(rf"\b{n}\b", text)] + ["TypedDict"]
    lines.append(f"from typing import {', '.join(typing)}")
    if "JsonObject" in text:
        lines += ["", "from virtnode.util.jsontypes import JsonObject"]
    return "\n".join(lines + body) + "\n"


def _resolved(node: JsonObject, definitions: Mapping[str, JsonObject]) -> JsonObject:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith(DEFINITION_REF):
        return _resolved(definitions[ref[len(DEFINITION_REF):]], definitions)
    return node


def main() -> None:
    sys.stdout.write(render(load_schema()))


if __name__ == "__main__":
    main()
