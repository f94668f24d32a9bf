"""``VM.openConsole``, ``VM.getConsoleLog`` and ``VM.screenshot`` on the test driver.

The test driver has no console streams and no graphics server: these tests check the
tokens and the checks before them; tests/integration/test_consoles.py uses real guests.
"""

from __future__ import annotations

import base64

import pytest

from tests.unit.vm.harness import READER, InProcessAgent


@pytest.mark.covers("VM.openConsole")
async def test_open_console_grants_a_token_with_the_callers_role(api: InProcessAgent) -> None:
    vm_id = await api.create(graphics="vnc")
    grant = await api.call("VM.openConsole", {"vm_id": vm_id, "kind": "serial"})
    assert grant["url"] == f"/console/{grant['token']}" and len(grant["token"]) == 43
    assert grant["mode"] == "read-write"
    watch = await api.call("VM.openConsole", {"vm_id": vm_id, "kind": "vnc"}, caller=READER)
    assert watch["mode"] == "read-only" and watch["token"] != grant["token"]
    assert api.consoles.tokens.peek(watch["token"]).by == READER.identity


@pytest.mark.covers("VM.openConsole")
async def test_open_console_needs_a_running_vm_with_that_console(api: InProcessAgent) -> None:
    plain = await api.create("plain", serial=False)
    await api.error("VM.openConsole", {"vm_id": plain, "kind": "serial"},
                    "FailedPrecondition", "console_not_pty")
    await api.error("VM.openConsole", {"vm_id": plain, "kind": "vnc"},
                    "FailedPrecondition", "no_graphics")
    stopped = await api.create("stopped", start=False)
    await api.error("VM.openConsole", {"vm_id": stopped, "kind": "serial"},
                    "FailedPrecondition", "vm_not_running")
    await api.error("VM.openConsole", {"vm_id": "00000000-0000-4000-8000-00000000beef",
                                       "kind": "serial"}, "NotFound")


@pytest.mark.covers("VM.getConsoleLog")
async def test_console_log_of_a_vm_whose_console_cannot_be_had(api: InProcessAgent) -> None:
    vm_id = await api.create()
    log = await api.call("VM.getConsoleLog", {"vm_id": vm_id})
    assert base64.b64decode(log["data"]) == b"" and log["total_bytes"] == 0
    assert log["capacity"] == 256 * 1024
    text = await api.call("VM.getConsoleLog", {"vm_id": vm_id, "format": "text"})
    assert text["text"] == "" and "data" not in text


@pytest.mark.covers("VM.screenshot")
async def test_screenshot_needs_a_running_vm(api: InProcessAgent) -> None:
    stopped = await api.create("stopped", start=False)
    await api.error("VM.screenshot", {"vm_id": stopped}, "FailedPrecondition",
                    "vm_not_running")
