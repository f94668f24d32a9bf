"""Device events: uevent translation, coalescing, choosing and opening the monitor.

``data/uevents.jsonl`` holds real uevents recorded from the kernel with
``tools/capture-uevents`` while a loop device was created (``losetup /dev/loop77``),
attached, detached and removed, and a veth pair was created, renamed and deleted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.paths import DATA
from virtnode.config import DevicesConfig, DeviceSource
from virtnode.events.bus import EventBus
from virtnode.host.devices import (
    Coalescer,
    DeviceMonitor,
    MonitorState,
    choose_source,
    device_payload,
    read_attributes,
)
from virtnode.rpc.schema import ApiSchema

CAPTURED = DATA / "uevents.jsonl"
MiB = 1024 * 1024


def captured() -> list[dict[str, Any]]:
    lines = CAPTURED.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def payloads() -> list[dict[str, Any]]:
    found = [device_payload(r["properties"], r["attributes"]) for r in captured()]
    assert None not in found
    return [p for p in found if p is not None]


# -- translation ----------------------------------------------------------------------------


def test_every_captured_uevent_gives_a_payload_the_schema_accepts(schema: ApiSchema) -> None:
    found = payloads()
    assert len(found) == len(captured()) == 10
    for payload in found:
        schema.check_event("host.device", payload)


def test_loop_device_uevents() -> None:
    loop = [p for p in payloads() if p["subsystem"] == "block"]
    assert [p["action"] for p in loop] == ["add", "change", "change", "change", "remove"]
    assert loop[0] == {
        "action": "add", "subsystem": "block", "name": "loop77",
        "devpath": "/devices/virtual/block/loop77", "devtype": "disk", "seqnum": 7867,
        "devnode": "/dev/loop77", "major": 7, "minor": 77, "size_bytes": 0,
    }
    assert loop[1]["size_bytes"] == 8 * MiB  # attached: the backing file's size
    assert loop[2]["size_bytes"] == 0  # detached
    assert "size_bytes" not in loop[4]  # gone: nothing to read
    assert loop[4]["major"] == 7


def test_veth_uevents() -> None:
    net = [p for p in payloads() if p["subsystem"] == "net"]
    assert [(p["action"], p["name"]) for p in net] == [
        ("add", "vn-t-cap1"), ("add", "vn-t-cap0"), ("move", "vn-t-cap2"),
        ("remove", "vn-t-cap2"), ("remove", "vn-t-cap1"),
    ]
    assert net[1] == {
        "action": "add", "subsystem": "net", "name": "vn-t-cap0",
        "devpath": "/devices/virtual/net/vn-t-cap0", "devtype": None, "seqnum": 7878,
        "ifindex": 36, "mac": "fe:79:6e:6a:4f:77",
    }
    assert net[2]["old_devpath"] == "/devices/virtual/net/vn-t-cap0"
    assert net[3] == {
        "action": "remove", "subsystem": "net", "name": "vn-t-cap2",
        "devpath": "/devices/virtual/net/vn-t-cap2", "devtype": None, "seqnum": 7890,
        "ifindex": 36,
    }


def test_kernel_devname_without_dev_prefix() -> None:
    record = captured()[0]
    properties = {**record["properties"], "DEVNAME": "loop77"}
    payload = device_payload(properties, {})
    assert payload is not None
    assert payload["devnode"] == "/dev/loop77"


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"ACTION": "bind"}, "action not reported"),
        ({"ACTION": "online"}, "action not reported"),
        ({"SUBSYSTEM": "usb"}, "other subsystem"),
        ({"DEVPATH": ""}, "no devpath"),
    ],
)
def test_events_not_reported(changes: dict[str, str], why: str) -> None:
    properties = {**captured()[5]["properties"], **changes}
    assert device_payload(properties, {}) is None, why


def test_unparsable_numbers_are_left_out() -> None:
    properties = {**captured()[5]["properties"], "IFINDEX": "x", "SEQNUM": ""}
    payload = device_payload(properties, {})
    assert payload is not None
    assert "ifindex" not in payload
    assert "seqnum" not in payload


def test_read_attributes_from_a_sysfs_tree(tmp_path: Path) -> None:
    device = tmp_path / "devices/virtual/net/vn-t-x"
    device.mkdir(parents=True)
    (device / "address").write_text("02:00:00:00:00:01\n")
    properties = {"ACTION": "add", "SUBSYSTEM": "net", "DEVPATH": "/devices/virtual/net/vn-t-x"}
    assert read_attributes(properties, tmp_path) == {"address": "02:00:00:00:00:01"}
    assert read_attributes({**properties, "ACTION": "remove"}, tmp_path) == {}
    gone = {**properties, "DEVPATH": "/devices/virtual/net/vn-t-gone"}
    assert read_attributes(gone, tmp_path) == {}


# -- coalescing -----------------------------------------------------------------------------


def test_a_burst_keeps_add_and_remove_and_drops_superseded_changes() -> None:
    coalescer = Coalescer()
    for payload in payloads():
        coalescer.add(payload)
    assert len(coalescer) == 7
    assert [(p["action"], p["name"]) for p in coalescer.take()] == [
        ("add", "loop77"), ("remove", "loop77"),
        ("add", "vn-t-cap1"), ("add", "vn-t-cap0"), ("move", "vn-t-cap2"),
        ("remove", "vn-t-cap2"), ("remove", "vn-t-cap1"),
    ]
    assert coalescer.dropped == 3
    assert coalescer.take() == []


def test_changes_of_one_device_merge_into_the_last() -> None:
    loop = [p for p in payloads() if p["subsystem"] == "block"]
    coalescer = Coalescer()
    for payload in loop[:3]:  # add, change (attached), change (detached)
        coalescer.add(payload)
    assert coalescer.take() == [loop[0], loop[2]]


def test_changes_of_different_devices_all_stay() -> None:
    change = payloads()[1]
    other = {**change, "name": "loop78", "devpath": "/devices/virtual/block/loop78"}
    coalescer = Coalescer()
    for payload in (change, other, change):
        coalescer.add(payload)
    assert coalescer.take() == [other, change]


def test_a_move_supersedes_a_change_under_the_old_name() -> None:
    net = [p for p in payloads() if p["subsystem"] == "net"]
    change = {**net[1], "action": "change"}
    coalescer = Coalescer()
    coalescer.add(change)
    coalescer.add(net[2])  # move vn-t-cap0 -> vn-t-cap2
    assert coalescer.take() == [net[2]]


# -- choosing and opening the source --------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "udev_running", "expected"),
    [
        (DeviceSource.AUTO, True, MonitorState.UDEV),
        (DeviceSource.AUTO, False, MonitorState.KERNEL),
        (DeviceSource.KERNEL, True, MonitorState.KERNEL),
        (DeviceSource.UDEV, False, MonitorState.UDEV),
        (DeviceSource.OFF, True, MonitorState.OFF),
    ],
)
def test_choose_source(configured: DeviceSource, udev_running: bool,
                       expected: MonitorState) -> None:
    assert choose_source(configured, udev_running) is expected


def _fd_target(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return None


async def test_monitor_opens_on_the_loop_and_closes_its_socket() -> None:
    monitor = DeviceMonitor(DevicesConfig(source=DeviceSource.KERNEL), EventBus())
    await monitor.start()
    try:
        assert monitor.state is MonitorState.KERNEL
        fd = monitor._fd
        socket = os.readlink(f"/proc/self/fd/{fd}")
        assert socket.startswith("socket:")
    finally:
        await monitor.close()
    assert _fd_target(fd) != socket
    await monitor.close()  # idempotent


async def test_monitor_off() -> None:
    monitor = DeviceMonitor(DevicesConfig(source=DeviceSource.OFF), EventBus())
    await monitor.start()
    assert monitor.state is MonitorState.OFF
    await monitor.close()


def test_no_monitor_leaves_the_service_running() -> None:
    # A real failure: every file descriptor is taken when the monitor opens its socket.
    script = textwrap.dedent("""
        import asyncio, logging, os, resource
        from virtnode.config import DevicesConfig, DeviceSource
        from virtnode.host.devices import DeviceMonitor
        from virtnode.events.bus import EventBus

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        loop = asyncio.new_event_loop()
        monitor = DeviceMonitor(DevicesConfig(source=DeviceSource.KERNEL), EventBus())
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        loop.run_until_complete(monitor.start())
        for fd in held:
            os.close(fd)
        loop.run_until_complete(monitor.close())
        print(monitor.state.value)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "unavailable"
    assert "host device events unavailable: cannot open a kernel monitor" in proc.stderr
