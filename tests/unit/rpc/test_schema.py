"""The API contract in api_schema/: consistent, complete, strict, and documented."""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

import pytest

from tests.paths import ROOT
from virtnode import __version__
from virtnode.errors import ERRORS_BY_NAME, InvalidParams
from virtnode.rpc.apidoc import render
from virtnode.rpc.schema import (
    COMMON_ERRORS,
    PARSED_FILE,
    ApiSchema,
    SchemaError,
    _shipped_parsed,
    build_schema,
    first_sentence,
    load_schema,
    parse_files,
    render_parsed,
    shipped_files,
)

DOCS = ROOT / "docs" / "api.md"
COMMON_YAML = resources.files("virtnode.api_schema").joinpath("common.yaml").read_text("utf-8")

GOOD_METHOD = """
methods:
  Test.ping:
    description: A method.
    access: read
    since: "0.1"
    params: {}
    result: {}
"""


def build(*texts: str) -> ApiSchema:
    files = [("common.yaml", COMMON_YAML)]
    files += [(f"test{i}.yaml", text) for i, text in enumerate(texts)]
    return build_schema(files)


def method_yaml(name: str = "Test.ping", **entries: Any) -> str:
    """A one-method schema file; ``entries`` replace or (when None) drop the defaults."""
    entry: dict[str, Any] = {
        "description": "A method.", "access": "read", "since": "0.1", "params": {}, "result": {},
    }
    entry.update(entries)
    return json.dumps({"methods": {name: {k: v for k, v in entry.items() if v is not None}}})


def event_yaml(topic: str = "test.thing", **entries: Any) -> str:
    entry: dict[str, Any] = {"description": "An event.", "since": "0.1", "payload": {}}
    entry.update(entries)
    return json.dumps({"events": {topic: {k: v for k, v in entry.items() if v is not None}}})


# -- the shipped schema ---------------------------------------------------------------------


def test_shipped_schema_loads(schema: ApiSchema) -> None:
    assert schema.version == __version__
    assert "Host.ping" in schema.methods
    assert "Api.describe" in schema.methods
    assert "hypervisor.connection" in schema.events


def test_every_params_result_and_event_schema_compiles(schema: ApiSchema) -> None:
    schema.compile_checks()


def test_a_broken_result_schema_is_found_by_compile_checks() -> None:
    built = build(method_yaml(result={"properties": {"x": {"$ref": "#/definitions/Missing"}}}))
    with pytest.raises(SchemaError, match=r"result:Test\.ping"):
        built.compile_checks()


@pytest.mark.parametrize("prop", [{"$ref": "#/definitions/Missing"}, {"type": "strnig"}])
def test_a_broken_params_schema_is_found_by_compile_checks(prop: dict[str, str]) -> None:
    # Params validators are compiled on a method's first call; the shipped schema's are
    # all compiled by test_every_result_and_event_schema_compiles.
    built = build(method_yaml(params={"properties": {"x": prop}}))
    with pytest.raises(SchemaError, match=r"params:Test\.ping"):
        built.compile_checks()


def test_every_method_declares_access_since_and_description(schema: ApiSchema) -> None:
    for name, method in schema.methods.items():
        assert re.fullmatch(r"[A-Z][A-Za-z]*\.[a-z][A-Za-z]*", name), name
        assert method.access in ("read", "write"), name
        assert re.fullmatch(r"\d+\.\d+", method.since), f"{name}: since {method.since!r}"
        assert method.description.strip(), name
        assert method.summary and "\n" not in method.summary, name
        assert method.result.get("type") == "object", f"{name}: results are always objects"
        for error in method.errors:
            assert error in schema.errors, f"{name} raises unknown {error}"


@pytest.mark.parametrize(("description", "summary"), [
    ("Attach an existing domain, e.g. one made elsewhere: path says where. More.",
     "Attach an existing domain, e.g. one made elsewhere: path says where"),
    ("Copy a volume, i.e. its data. Then more.", "Copy a volume, i.e. its data"),
    ("Pause the VM.\nSecond line.", "Pause the VM"),
    ("One sentence only", "One sentence only"),
])
def test_summary_is_the_whole_first_sentence(description: str, summary: str) -> None:
    assert first_sentence(description) == summary


def test_summaries_are_not_cut_at_abbreviations(schema: ApiSchema) -> None:
    assert schema.methods["StorageDomain.attach"].summary.startswith(
        "Attach an existing domain, e.g. one created by another host")


def test_every_event_declares_since_description_and_an_object_payload(schema: ApiSchema) -> None:
    for topic, event in schema.events.items():
        assert re.fullmatch(r"[a-z][a-z_]*(\.[a-z][a-z_]*)+", topic), topic
        assert re.fullmatch(r"\d+\.\d+", event.since), f"{topic}: since {event.since!r}"
        assert event.description, topic
        assert event.payload.get("type") == "object", topic


def test_every_error_class_has_a_schema_entry_with_its_code(schema: ApiSchema) -> None:
    assert set(schema.errors) == set(ERRORS_BY_NAME)
    for name, cls in ERRORS_BY_NAME.items():
        assert schema.errors[name].code == cls.code, name
        assert schema.errors[name].description, f"{name} has no description"


def test_error_codes_are_the_documented_ones(schema: ApiSchema) -> None:
    codes = {name: spec.code for name, spec in schema.errors.items()}
    assert codes == {
        "ParseError": -32700, "InvalidRequest": -32600, "MethodNotFound": -32601,
        "InvalidParams": -32602, "InternalError": -32603,
        "Cancelled": 1, "InvalidArgument": 3, "DeadlineExceeded": 4, "NotFound": 5,
        "AlreadyExists": 6, "PermissionDenied": 7, "ResourceExhausted": 8,
        "FailedPrecondition": 9, "Aborted": 10, "Unimplemented": 12, "Internal": 13,
        "Unavailable": 14, "Unauthenticated": 16,
    }


def test_common_errors_exist(schema: ApiSchema) -> None:
    assert set(COMMON_ERRORS) <= set(schema.errors)


def _object_schemas(node: Any, definitions: dict[str, Any], seen: set[str]) -> list[Any]:
    """Every object schema reachable from ``node``, following $refs into the definitions."""
    if not isinstance(node, dict):
        return []
    found = [node] if node.get("type") == "object" or "properties" in node else []
    ref = node.get("$ref")
    if isinstance(ref, str) and ref not in seen:
        seen.add(ref)
        found += _object_schemas(definitions[ref.rsplit("/", 1)[-1]], definitions, seen)
    children: list[Any] = list(node.get("properties", {}).values())
    children += [node.get("items"), node.get("additionalProperties")]
    for key in ("oneOf", "anyOf", "allOf"):
        children += node.get(key, [])
    for child in children:
        found += _object_schemas(child, definitions, seen)
    return found


def test_every_params_schema_rejects_unknown_properties(schema: ApiSchema) -> None:
    for name, method in schema.methods.items():
        for obj in _object_schemas(method.params, dict(schema.definitions), set()):
            if "properties" not in obj and isinstance(obj.get("additionalProperties"), dict):
                continue  # a map (labels): any key, each value typed
            assert obj.get("additionalProperties") is False, (
                f"{name}: params object {obj} accepts unknown properties"
            )
        with pytest.raises(InvalidParams):
            schema.check_params(method, {"surely_not_a_parameter": 1})


@pytest.mark.parametrize("method", ["Host.ping", "Host.getCapabilities", "Api.describe"])
def test_unknown_parameter_is_named(schema: ApiSchema, method: str) -> None:
    with pytest.raises(InvalidParams) as caught:
        schema.check_params(schema.methods[method], {"verbose": True})
    assert caught.value.details["field"] == "verbose"


def test_shipped_params_are_checked(schema: ApiSchema) -> None:
    vm_list = schema.methods["VM.list"]
    assert schema.check_params(vm_list, {"state": "running"}) == {"state": "running"}
    with pytest.raises(InvalidParams) as caught:
        schema.check_params(vm_list, {"state": "sleeping"})
    assert caught.value.details["field"] == "state"
    with pytest.raises(InvalidParams) as caught:
        schema.check_params(schema.methods["Events.subscribe"], {"topics": []})
    assert caught.value.details["field"] == "topics"


def test_describe_is_the_whole_contract(schema: ApiSchema) -> None:
    document = schema.describe()
    assert document["info"] == {"title": "virtnode", "version": schema.version}
    assert [m["name"] for m in document["methods"]] == list(schema.methods)
    assert [e["topic"] for e in document["events"]] == list(schema.events)
    assert {e["name"]: e["code"] for e in document["errors"]} == {
        name: spec.code for name, spec in schema.errors.items()
    }
    assert set(document["definitions"]) == set(schema.definitions)
    ping = next(m for m in document["methods"] if m["name"] == "Host.ping")
    assert ping["access"] == "read"
    assert ping["params"]["additionalProperties"] is False
    schema.check_result("Api.describe", document)
    assert json.loads(json.dumps(document)) == document


def test_describe_returns_a_copy_of_the_definitions(schema: ApiSchema) -> None:
    document = schema.describe()
    document["definitions"]["Uuid"]["pattern"] = "changed"
    assert schema.describe()["definitions"]["Uuid"]["pattern"] != "changed"


@pytest.mark.parametrize(
    "bad",
    [{}, {"time": "now"}, {"time": None}, [], "pong", None],
    ids=repr,
)
def test_check_result_rejects_a_result_that_breaks_the_schema(schema: ApiSchema, bad: Any) -> None:
    with pytest.raises(ValueError, match=r"result:Host\.ping"):
        schema.check_result("Host.ping", bad)


@pytest.mark.parametrize("good", [{"time": 1700000000.5}, {"time": 0}, {"time": 1, "zone": "UTC"}])
def test_check_result_accepts_a_good_result(schema: ApiSchema, good: Any) -> None:
    schema.check_result("Host.ping", good)


def test_check_result_checks_shared_definitions(schema: ApiSchema) -> None:
    schema.check_result("VM.list", {"vms": []})
    with pytest.raises(ValueError, match="must match pattern"):
        schema.check_result("VM.list", {"vms": [{"vm_id": "x", "name": "a", "state": "running"}]})


def test_check_event(schema: ApiSchema) -> None:
    good = {"uri": "test:///default", "state": "connected", "reason": "started"}
    schema.check_event("hypervisor.connection", good)
    with pytest.raises(ValueError, match=r"event:hypervisor\.connection"):
        schema.check_event("hypervisor.connection", {**good, "state": "maybe"})


def test_api_reference_is_up_to_date() -> None:
    assert DOCS.exists(), f"{DOCS} is missing; run `make docs`"
    expected = render(load_schema())
    assert DOCS.read_text(encoding="utf-8") == expected, (
        "docs/api.md does not match api_schema/; run `make docs` and commit the result"
    )


def test_the_shipped_parse_of_the_schema_is_up_to_date() -> None:
    # The agent reads it instead of the YAML (a sixth of its start) while its digest matches.
    written = (ROOT / "api_schema" / PARSED_FILE).read_text(encoding="utf-8")
    assert written == render_parsed(shipped_files()), (
        f"api_schema/{PARSED_FILE} does not match api_schema/*.yaml; run `make docs`")


def test_the_shipped_parse_is_used_only_for_the_files_it_was_made_from() -> None:
    files = shipped_files()
    assert _shipped_parsed(files) == parse_files(files)
    edited = [(name, text + "\n# edited\n" if name == "vm.yaml" else text)
              for name, text in files]
    assert _shipped_parsed(edited) is None
    assert _shipped_parsed(files[1:]) is None


# -- build_schema -----------------------------------------------------------------------------


def test_minimal_schema_builds() -> None:
    built = build(GOOD_METHOD, event_yaml())
    assert list(built.methods) == ["Test.ping"]
    assert list(built.events) == ["test.thing"]
    method = built.methods["Test.ping"]
    assert method.params == {"type": "object", "additionalProperties": False, "properties": {}}
    assert built.events["test.thing"].since == "0.1"


@pytest.mark.parametrize(
    "name",
    ["host.ping", "Host", "Host.", ".ping", "Host.Ping", "Host.ping.now", "Host_x.ping",
     "Host.get_stats", "Host ping", "Host.ping2"],
)
def test_bad_method_name(name: str) -> None:
    with pytest.raises(SchemaError, match=r"Namespace\.verb"):
        build(method_yaml(name))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"errors": ["Nonsense"]}, "unknown error 'Nonsense'"),
        ({"errors": ["NotFound", "NotFoun"]}, "unknown error 'NotFoun'"),
        ({"params": {"additionalProperties": True}}, "must not allow unknown properties"),
        ({"params": {"additionalProperties": {"type": "string"}}},
         "must not allow unknown properties"),
        ({"params": {"type": "array"}}, "params must be an object schema"),
        ({"result": {"type": "array"}}, "result must be an object schema"),
        ({"access": "admin"}, "access must be read or write"),
        ({"access": None}, "access must be read or write"),
        ({"since": None}, "since is required"),
        ({"since": 0.1}, "since is required"),
        ({"description": None}, "description is required"),
        ({"description": "  "}, "description is required"),
        ({"returns": {}}, "unknown keys"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v),
)
def test_bad_method_entry(entries: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError, match=re.escape(message)):
        build(method_yaml(**entries))


def test_method_may_declare_known_errors() -> None:
    built = build(method_yaml(errors=["NotFound", "Unavailable"]))
    assert built.methods["Test.ping"].errors == ("NotFound", "Unavailable")


@pytest.mark.parametrize("section", ["methods", "events", "definitions", "errors"])
def test_declaring_twice_across_files_is_refused(section: str) -> None:
    if section == "methods":
        first, second = GOOD_METHOD, method_yaml()
    elif section == "events":
        first, second = event_yaml(), event_yaml()
    elif section == "definitions":
        first = second = "definitions:\n  Uuid: {type: string}\n"
    else:
        first, second = "", "errors:\n  NotFound: {code: 5}\n"
    with pytest.raises(SchemaError, match="declared twice"):
        build(first, second)


@pytest.mark.parametrize(
    "topic",
    ["vm", "VM.lifecycle", "vm.Lifecycle", "vm-lifecycle.x", "vm.", ".vm", "vm..x", "vm.life cycle",
     "vm.2"],
)
def test_bad_event_topic(topic: str) -> None:
    with pytest.raises(SchemaError, match="dotted lower-case"):
        build(event_yaml(topic))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"since": None}, "since is required"),
        ({"description": None}, "description is required"),
        ({"payload": {"type": "string"}}, "must be an object schema"),
        ({"data": {}}, "unknown keys"),
    ],
    ids=str,
)
def test_bad_event_entry(entries: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError, match=re.escape(message)):
        build(event_yaml(**entries))


def test_event_payload_may_have_extra_fields() -> None:
    built = build(event_yaml(payload={"required": ["a"], "properties": {"a": {"type": "string"}}}))
    built.check_event("test.thing", {"a": "x", "b": 1})
    with pytest.raises(ValueError, match=r"event:test\.thing"):
        built.check_event("test.thing", {"b": 1})


def test_error_without_class_is_refused() -> None:
    with pytest.raises(SchemaError, match="'Oops' has no class"):
        build("errors:\n  Oops: {code: 99}\n")


def test_error_with_wrong_code_is_refused() -> None:
    text = COMMON_YAML.replace("code: 5\n", "code: 55\n")
    assert text != COMMON_YAML
    with pytest.raises(SchemaError, match="NotFound: code 55"):
        build_schema([("common.yaml", text)])


def test_every_error_class_needs_an_entry() -> None:
    text = re.sub(r"  Unauthenticated:\n.*\n.*\n", "", COMMON_YAML)
    assert "Unauthenticated" not in text
    with pytest.raises(SchemaError, match="Unauthenticated"):
        build_schema([("common.yaml", text)])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("types: {}\n", "unknown sections"),
        ("- methods\n", "expected a mapping"),
        ("methods: [a, b]\n", "methods must be a mapping"),
        ("methods: {Test.ping: [\n", "not valid YAML"),
    ],
)
def test_malformed_file_is_refused(text: str, message: str) -> None:
    with pytest.raises(SchemaError, match=re.escape(message)) as caught:
        build(text)
    assert "test0.yaml" in str(caught.value)


def test_empty_file_is_allowed() -> None:
    assert list(build("", GOOD_METHOD).methods) == ["Test.ping"]


def test_load_schema_matches_the_files_in_the_package(schema: ApiSchema) -> None:
    package = resources.files("virtnode.api_schema")
    names = sorted(entry.name for entry in package.iterdir() if entry.name.endswith(".yaml"))
    files = [(name, package.joinpath(name).read_text("utf-8")) for name in names]
    assert build_schema(files).describe() == schema.describe()


def _rendered_part(text: str, method: str, part: str) -> str:
    """The ``Params:`` or ``Result:`` part of ``method``'s section in ``text``."""
    section = text.split(f"\n### {method}\n", 1)[1].split("\n### ", 1)[0]
    params, result = section.split("\nResult:\n", 1)
    return params.split("\nParams:\n", 1)[1] if part == "params" else result


def test_api_reference_resolves_references() -> None:
    schema = load_schema()
    text = render(schema)
    referring = [(name, part, spec[part]["$ref"]) for name, spec in (
        (name, {"params": method.params, "result": method.result})
        for name, method in schema.methods.items()) for part in ("params", "result")
        if "$ref" in spec[part]]
    assert referring, "no method gives its params or result by reference any more"
    for name, part, ref in referring:
        definition = schema.definitions[ref.rsplit("/", 1)[-1]]
        rendered = _rendered_part(text, name, part)
        assert "_none_" not in rendered, (name, part)
        for prop in definition["properties"]:
            assert f"| `{prop}` |" in rendered, (name, part, prop)


# An unquoted ", ...: " in a flow mapping makes YAML read the rest as a key of its own.
STRAY_KEY = """
methods:
  Test.ping:
    description: A method.
    access: read
    since: "0.1"
    params:
      properties:
        kernel: {type: string, description: Direct kernel boot, absolute path.: x}
    result: {}
"""


def test_a_stray_key_in_params_is_refused() -> None:
    with pytest.raises(SchemaError, match=r"Test.ping/params/properties/kernel/absolute path\."):
        build(STRAY_KEY)


@pytest.mark.parametrize("yaml_text", [
    event_yaml(payload={"properties": {"n": {"type": "integer", "minimun": 1}}}),
    json.dumps({"definitions": {"Thing": {"type": "object",
                                          "properties": {"a": {"items": {"tpye": "string"}}}}}}),
    method_yaml(result={"properties": {"a": {"oneOf": [{"type": "string"}, {"bogus": 1}]}}}),
])
def test_unknown_keywords_are_refused_wherever_they_are(yaml_text: str) -> None:
    with pytest.raises(SchemaError, match="unknown JSON Schema keyword"):
        build(GOOD_METHOD if "methods" not in yaml_text else "", yaml_text)


def test_the_shipped_schema_uses_only_known_keywords() -> None:
    load_schema()  # raises SchemaError on an unknown keyword
