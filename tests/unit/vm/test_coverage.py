"""Every ``VM.*`` method of the schema has an in-process test on the test driver.

A test counts for the methods it is marked ``@pytest.mark.covers(...)`` with; the
``start_agent`` fixture fails it unless it did call each of them through the dispatcher.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import tests.unit.vm
from virtnode.rpc.schema import ApiSchema


def covered() -> dict[str, list[str]]:
    """The tests of this package by the methods they are marked as covering."""
    found: dict[str, list[str]] = {}
    for module_info in pkgutil.iter_modules(tests.unit.vm.__path__):
        if not module_info.name.startswith("test_"):
            continue
        module = importlib.import_module(f"tests.unit.vm.{module_info.name}")
        for name, function in inspect.getmembers(module, inspect.isfunction):
            if not name.startswith("test_"):
                continue
            for mark in getattr(function, "pytestmark", []):
                if mark.name == "covers":
                    for method in mark.args:
                        found.setdefault(method, []).append(f"{module_info.name}::{name}")
    return found


def test_every_vm_method_of_the_schema_has_a_test(schema: ApiSchema) -> None:
    methods = {name for name in schema.methods if name.startswith("VM.")}
    tests = covered()
    assert sorted(methods - set(tests)) == [], "VM.* methods without an in-process test"
    assert sorted(set(tests) - set(schema.methods)) == [], "tests of methods the schema lacks"
