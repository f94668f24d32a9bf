"""The API contract, loaded from the YAML files of ``virtnode.api_schema``.

The schema is data; this module reads it once, checks it for consistency, compiles a
validator for every method's params, and answers questions about it. Results and event
payloads are validated on demand (the test suite checks every one it sees).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import fastjsonschema

from virtnode import __version__
from virtnode.errors import ERRORS_BY_NAME, InvalidParams
from virtnode.jsonrpc import holds_match
from virtnode.util.jsontypes import JsonObject
from virtnode.util.yamltext import YamlError, safe_load

Access = Literal["read", "write"]
Validator = Callable[[Any], Any]

#: Errors any method may raise; method entries list only the errors of their own.
COMMON_ERRORS = (
    "InvalidRequest",
    "MethodNotFound",
    "InvalidParams",
    "InternalError",
    "PermissionDenied",
    "ResourceExhausted",
)

_METHOD_NAME = re.compile(r"^[A-Z][A-Za-z]*\.[a-z][A-Za-z]*$")
_TOPIC_NAME = re.compile(r"^[a-z][a-z_]*(\.[a-z][a-z_]*)+$")
_METHOD_KEYS = frozenset({"description", "access", "since", "params", "result", "errors"})
_EVENT_KEYS = frozenset({"description", "since", "payload"})


class SchemaError(Exception):
    """The schema files are inconsistent; the agent cannot start with them."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    access: Access
    since: str
    params: JsonObject
    result: JsonObject
    errors: tuple[str, ...]

    @property
    def summary(self) -> str:
        """The first sentence of the description."""
        return first_sentence(self.description)


#: Words whose full stop does not end a sentence.
_ABBREVIATIONS = frozenset({"e.g.", "i.e.", "etc.", "cf.", "vs."})


def first_sentence(text: str) -> str:
    """The first sentence of ``text``'s first line, without its full stop.

    A full stop ends a sentence when a space or the end of the line follows it and it is
    not part of an abbreviation such as "e.g.".
    """
    line = text.strip().split("\n")[0]
    for stop in re.finditer(r"\.(?=\s|$)", line):
        word = line[:stop.end()].rsplit(None, 1)[-1].lower()
        if word.lstrip("(") not in _ABBREVIATIONS:
            return line[:stop.start()]
    return line


@dataclass(frozen=True)
class EventSpec:
    topic: str
    description: str
    since: str
    payload: JsonObject


@dataclass(frozen=True)
class ErrorSpec:
    name: str
    code: int
    description: str


@dataclass(frozen=True)
class ApiSchema:
    """The loaded, checked API contract."""

    version: str
    methods: Mapping[str, MethodSpec]
    events: Mapping[str, EventSpec]
    errors: Mapping[str, ErrorSpec]
    definitions: Mapping[str, JsonObject]
    _validators: dict[str, Validator] = field(default_factory=dict, repr=False, compare=False)

    def check_params(self, method: MethodSpec, params: JsonObject) -> JsonObject:
        """Validate ``params`` (filling in defaults) or raise :class:`InvalidParams`.

        Beyond the method's schema, no string in them (value or key, at any depth) may
        hold a C0 control character other than tab, newline and carriage return (reason
        ``control_character``): see :data:`CONTROL_CHARACTERS`.
        """
        validate = self._validator(f"params:{method.name}", method.params, use_default=True)
        try:
            checked: JsonObject = validate(params)
        except fastjsonschema.JsonSchemaValueException as exc:
            raise _invalid_params(exc) from None
        if checked and holds_match(checked, CONTROL_CHARACTERS):
            raise _control_character(checked)
        return checked

    def check_result(self, method: str, value: Any) -> None:
        """Validate a method's result; raises ``ValueError`` naming the mismatch."""
        spec = self.methods[method]
        self._check(f"result:{method}", spec.result, value)

    def check_event(self, topic: str, payload: Any) -> None:
        """Validate an event payload; raises ``ValueError`` naming the mismatch."""
        self._check(f"event:{topic}", self.events[topic].payload, payload)

    def compile_checks(self) -> None:
        """Compile every params, result and event validator now (they are otherwise
        compiled on first use, a few milliseconds each, keeping the agent's start short).
        Raises :class:`SchemaError`."""
        for name, spec in self.methods.items():
            self._validator(f"params:{name}", spec.params, use_default=True)
            self._validator(f"result:{name}", spec.result)
        for topic, event in self.events.items():
            self._validator(f"event:{topic}", event.payload)

    def _validator(self, key: str, schema: JsonObject, *, use_default: bool = False
                   ) -> Validator:
        validator = self._validators.get(key)
        if validator is None:
            try:
                validator = _compile(schema, self.definitions, use_default=use_default)
            except fastjsonschema.JsonSchemaDefinitionException as exc:
                raise SchemaError(f"{key}: {exc}") from None
            self._validators[key] = validator
        return validator

    def _check(self, key: str, schema: JsonObject, value: Any) -> None:
        validator = self._validator(key, schema)
        try:
            validator(value)
        except fastjsonschema.JsonSchemaValueException as exc:
            raise ValueError(f"{key}: {exc.message}") from None

    def describe(self) -> JsonObject:
        """Return the whole contract as an OpenRPC-like document."""
        return copy.deepcopy({
            "openrpc": "1.3.2",
            "info": {"title": "virtnode", "version": self.version},
            "methods": [
                {
                    "name": m.name,
                    "summary": m.summary,
                    "description": m.description,
                    "access": m.access,
                    "since": m.since,
                    "params": m.params,
                    "result": m.result,
                    "errors": list(m.errors),
                }
                for m in self.methods.values()
            ],
            "events": [
                {
                    "topic": e.topic,
                    "description": e.description,
                    "since": e.since,
                    "payload": e.payload,
                }
                for e in self.events.values()
            ],
            "errors": [
                {"name": e.name, "code": e.code, "description": e.description}
                for e in self.errors.values()
            ],
            "definitions": dict(self.definitions),
        })


#: Refused in every string of every method's params: the C0 controls but tab, newline and
#: carriage return (the characters XML 1.0 refuses too). Params become names, paths, argv
#: words, domain XML and stored text, where NUL cuts a C string short and the others are
#: never meant; one rule here covers every method, present and future.
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _control_character(params: JsonObject) -> InvalidParams:
    """The error naming the first field (in document order) with a control character.

    A key with one is reported on the object that holds it: the field could not be named
    without writing the character.
    """
    pending: list[tuple[str, str, Any]] = [("", "parameter", params)]
    while pending:
        path, what, item = pending.pop()
        if isinstance(item, str):
            found = CONTROL_CHARACTERS.search(item)
            if found is not None:
                subject = f"{what} {path!r}" if path else "a parameter name"
                return InvalidParams(
                    f"{subject} holds the control character "
                    f"U+{ord(found.group()):04X}; of those only tab, newline and carriage "
                    "return are allowed", reason="control_character", field=path)
        elif isinstance(item, dict | list):
            entries = item.items() if isinstance(item, dict) else enumerate(item)
            children: list[tuple[str, str, Any]] = []
            for key, value in entries:
                if isinstance(key, str):
                    children.append((path, "a key in parameter", key))
                children.append((f"{path}.{key}" if path else str(key), "parameter", value))
            pending.extend(reversed(children))
    raise AssertionError("no control character in params")  # pragma: no cover


def _invalid_params(exc: fastjsonschema.JsonSchemaValueException) -> InvalidParams:
    path = [str(p) for p in (exc.path or [])][1:]  # drop the root "data"
    message = re.sub(r"^data", "params", exc.message)
    definition = exc.definition or {}
    if isinstance(exc.value, dict):
        if exc.rule == "additionalProperties":
            known = definition.get("properties", {})
            extra = sorted(k for k in exc.value if k not in known)
            if extra:
                path.append(extra[0])
                message = f"unknown parameter {'.'.join(path)!r}"
        elif exc.rule == "required":
            missing = [k for k in definition.get("required", []) if k not in exc.value]
            if missing:
                path.append(missing[0])
                message = f"missing parameter {'.'.join(path)!r}"
    return InvalidParams(message, reason=exc.rule or "schema", field=".".join(path))


def _compile(schema: JsonObject, definitions: Mapping[str, JsonObject], *,
             use_default: bool) -> Validator:
    full = {"$schema": "http://json-schema.org/draft-07/schema#", **schema}
    # Only the definitions the schema uses: the generated code grows with every one given,
    # and compiling them all for every method made the agent's start take seconds.
    full["definitions"] = {name: definitions[name]
                           for name in _referenced(schema, definitions, set())}
    compiled: Validator = fastjsonschema.compile(full, use_default=use_default)
    return compiled


DEFINITION_REF = "#/definitions/"


def _referenced(node: Any, definitions: Mapping[str, JsonObject], found: set[str]) -> set[str]:
    """The names of the definitions ``node`` refers to, directly or through others."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(DEFINITION_REF):
            name = ref.removeprefix(DEFINITION_REF)
            if name in definitions and name not in found:
                found.add(name)
                _referenced(definitions[name], definitions, found)
        for value in node.values():
            _referenced(value, definitions, found)
    elif isinstance(node, list):
        for value in node:
            _referenced(value, definitions, found)
    return found


def _object_schema(where: str, raw: Any, *, closed: bool) -> JsonObject:
    schema: JsonObject = dict(raw or {})
    schema.setdefault("type", "object")
    if schema["type"] != "object":
        raise SchemaError(f"{where} must be an object schema")
    if closed:
        if schema.get("additionalProperties", False) is not False:
            raise SchemaError(f"{where} must not allow unknown properties")
        schema["additionalProperties"] = False
        schema.setdefault("properties", {})
    return schema


#: The JSON Schema (draft-07) keywords a schema here may use; any other key is a mistake,
#: typically YAML reading part of an unquoted description as a key of its own.
_KEYWORDS = frozenset({
    "$id", "$schema", "$ref", "$comment", "title", "description", "default", "examples",
    "readOnly", "writeOnly", "type", "enum", "const", "multipleOf", "maximum",
    "exclusiveMaximum", "minimum", "exclusiveMinimum", "maxLength", "minLength", "pattern",
    "format", "contentMediaType", "contentEncoding", "items", "additionalItems", "maxItems",
    "minItems", "uniqueItems", "contains", "maxProperties", "minProperties", "required",
    "properties", "patternProperties", "additionalProperties", "dependencies",
    "propertyNames", "if", "then", "else", "allOf", "anyOf", "oneOf", "not", "definitions",
})
#: Keywords whose value is a schema, a list of schemas, or a mapping of names to schemas.
_SCHEMA_VALUED = frozenset({"items", "additionalItems", "contains", "additionalProperties",
                            "propertyNames", "if", "then", "else", "not"})
_SCHEMA_LISTS = frozenset({"items", "allOf", "anyOf", "oneOf"})
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "definitions", "dependencies"})


def _lint_keywords(where: str, node: Any) -> None:
    """Raise :class:`SchemaError` naming the path of a key in ``node`` that is no keyword."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        path = f"{where}/{key}"
        if key not in _KEYWORDS:
            raise SchemaError(f"{path}: unknown JSON Schema keyword {key!r}")
        if key in _SCHEMA_LISTS and isinstance(value, list):
            for index, item in enumerate(value):
                _lint_keywords(f"{path}/{index}", item)
        elif key in _SCHEMA_VALUED:
            _lint_keywords(path, value)
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                _lint_keywords(f"{path}/{name}", sub)


def _lint_schemas(merged: JsonObject) -> None:
    """Check the keywords of every params, result, event payload and definition."""
    for name, method in merged["methods"].items():
        if isinstance(method, dict):
            for part in ("params", "result"):
                _lint_keywords(f"{name}/{part}", method.get(part))
    for topic, event in merged["events"].items():
        if isinstance(event, dict):
            _lint_keywords(f"{topic}/payload", event.get("payload"))
    for name, definition in merged["definitions"].items():
        _lint_keywords(f"definitions/{name}", definition)


def parse_files(files: Iterable[tuple[str, str]]) -> JsonObject:
    """The YAML files' sections merged (methods, events, errors, definitions), unchecked."""
    merged: JsonObject = {"methods": {}, "events": {}, "errors": {}, "definitions": {}}
    for name, text in files:
        try:
            doc = safe_load(text) or {}
        except YamlError as exc:
            raise SchemaError(f"{name}: not valid YAML: {exc}") from None
        if not isinstance(doc, dict):
            raise SchemaError(f"{name}: expected a mapping of sections")
        unknown = set(doc) - set(merged)
        if unknown:
            raise SchemaError(f"{name}: unknown sections {sorted(unknown)}")
        for section, entries in doc.items():
            if not isinstance(entries or {}, dict):
                raise SchemaError(f"{name}: {section} must be a mapping")
            for key, value in (entries or {}).items():
                if key in merged[section]:
                    raise SchemaError(f"{name}: {section} {key!r} is declared twice")
                merged[section][key] = value
    return merged


def _build_method(name: str, raw: JsonObject, errors: Mapping[str, ErrorSpec]) -> MethodSpec:
    if not _METHOD_NAME.match(name):
        raise SchemaError(f"method name {name!r} is not Namespace.verb")
    unknown = set(raw) - _METHOD_KEYS
    if unknown:
        raise SchemaError(f"method {name}: unknown keys {sorted(unknown)}")
    if raw.get("access") not in ("read", "write"):
        raise SchemaError(f"method {name}: access must be read or write")
    for key in ("description", "since"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise SchemaError(f"method {name}: {key} is required")
    declared = tuple(raw.get("errors") or ())
    for err in declared:
        if err not in errors:
            raise SchemaError(f"method {name}: unknown error {err!r}")
    params = _object_schema(f"{name} params", raw.get("params"), closed=True)
    result = _object_schema(f"{name} result", raw.get("result"), closed=False)
    return MethodSpec(
        name=name,
        description=raw["description"].strip(),
        access=raw["access"],
        since=raw["since"],
        params=params,
        result=result,
        errors=declared,
    )


def _build_errors(raw: JsonObject) -> dict[str, ErrorSpec]:
    errors: dict[str, ErrorSpec] = {}
    for name, entry in raw.items():
        cls = ERRORS_BY_NAME.get(name)
        if cls is None:
            raise SchemaError(f"error {name!r} has no class in virtnode.errors")
        if entry.get("code") != cls.code:
            raise SchemaError(
                f"error {name}: code {entry.get('code')} but the class says {cls.code}"
            )
        errors[name] = ErrorSpec(name, cls.code, str(entry.get("description", "")).strip())
    missing = set(ERRORS_BY_NAME) - set(errors)
    if missing:
        raise SchemaError(f"errors without a schema entry: {sorted(missing)}")
    return errors


def _build_event(topic: str, raw: JsonObject) -> EventSpec:
    if not _TOPIC_NAME.match(topic):
        raise SchemaError(f"event topic {topic!r} is not dotted lower-case")
    unknown = set(raw) - _EVENT_KEYS
    if unknown:
        raise SchemaError(f"event {topic}: unknown keys {sorted(unknown)}")
    for key in ("description", "since"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise SchemaError(f"event {topic}: {key} is required")
    payload = _object_schema(f"event {topic} payload", raw.get("payload"), closed=False)
    return EventSpec(topic, raw["description"].strip(), raw["since"], payload)


def build_schema(files: Iterable[tuple[str, str]], version: str = __version__, *,
                 parsed: JsonObject | None = None) -> ApiSchema:
    """Build an :class:`ApiSchema` from ``(file name, YAML text)`` pairs.

    ``parsed`` is what :func:`parse_files` made of those files before, if known (taken
    over, not copied). Raises :class:`SchemaError` when the files are inconsistent.
    """
    merged = parsed if parsed is not None else parse_files(files)
    _lint_schemas(merged)
    definitions: dict[str, JsonObject] = merged["definitions"]
    errors = _build_errors(merged["errors"])
    methods = {
        name: _build_method(name, raw, errors)
        for name, raw in sorted(merged["methods"].items())
    }
    events = {topic: _build_event(topic, raw) for topic, raw in sorted(merged["events"].items())}
    return ApiSchema(version, methods, events, errors, definitions)


#: The shipped YAML files parsed, beside them in the package: reading JSON takes 2 ms where
#: YAML takes 60 (a sixth of the agent's start). Written by ``make docs``
#: (:func:`render_parsed`); used only while its digest matches the YAML files.
PARSED_FILE = "schema.json"


def files_digest(files: Iterable[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for name, text in files:
        for part in (name, text):
            data = part.encode()
            digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def render_parsed(files: Iterable[tuple[str, str]]) -> str:
    """The text of :data:`PARSED_FILE` for ``files``."""
    files = list(files)
    return json.dumps({"digest": files_digest(files), "parsed": parse_files(files)},
                      indent=1) + "\n"


def shipped_files() -> list[tuple[str, str]]:
    """The ``(name, YAML text)`` pairs of the schema shipped with this package."""
    package = resources.files("virtnode.api_schema")
    files = sorted(
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in package.iterdir()
        if entry.name.endswith(".yaml")
    )
    if not files:
        raise SchemaError("no schema files found in virtnode.api_schema")
    return files


def _shipped_parsed(files: list[tuple[str, str]]) -> JsonObject | None:
    """:data:`PARSED_FILE`'s parse of ``files``; None if it is missing or out of date."""
    try:
        text = resources.files("virtnode.api_schema").joinpath(PARSED_FILE).read_text(
            encoding="utf-8")
        doc = json.loads(text)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("digest") != files_digest(files):
        return None
    parsed = doc.get("parsed")
    return parsed if isinstance(parsed, dict) else None


def load_schema() -> ApiSchema:
    """Load the schema shipped with this package."""
    files = shipped_files()
    return build_schema(files, parsed=_shipped_parsed(files))


if __name__ == "__main__":
    import sys

    sys.stdout.write(render_parsed(shipped_files()))
