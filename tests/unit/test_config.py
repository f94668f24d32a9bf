"""Configuration: TOML file, defaults, command-line overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest

from tests.paths import ROOT
from virtnode.config import (
    Config,
    ConfigError,
    Listener,
    Role,
    build_config,
    dump_config,
    load_config,
    parse_listener,
)

REPO = ROOT


def write(tmp_path: Path, text: str, name: str = "virtnode.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(match: str, raw: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError, match=match) as caught:
        build_config(raw)
    return caught.value


# -- defaults and files -----------------------------------------------------------------------


def test_defaults() -> None:
    config = load_config(None)
    assert config == Config()
    assert config.server.listen == ("unix:/run/virtnode/virtnode.sock",)
    assert config.server.listeners == (Listener("unix", path="/run/virtnode/virtnode.sock"),)
    assert config.server.unix_socket_mode == 0o666
    assert config.server.max_inflight_per_connection == 64
    assert config.hypervisor.uri == "test:///default"
    assert config.access.unix_admin_uids == (0,)
    assert config.access.unix_role is Role.READER
    assert config.access.tcp_role is Role.READER
    assert config.access.tls_role is Role.ADMIN
    assert config.access.tls_reader_cns == ()
    assert (config.tls.cert_file, config.tls.key_file, config.tls.ca_file) == ("", "", "")
    assert config.state.dir == "/var/lib/virtnode"
    assert config.log.level == "info"


def test_config_is_frozen() -> None:
    config = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.listen = ()  # type: ignore[misc]


def test_load_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [server]
        listen = ["unix:run/agent.sock", "tcp://127.0.0.1:8765", "tcp://[::1]:8766"]
        unix_socket_mode = 0o660
        drain_timeout = 3          # an integer where a float is expected is fine

        [hypervisor]
        uri = "qemu:///system"
        reconnect_min = 1.5
        reconnect_max = 1.5

        [access]
        unix_admin_uids = [0, 1000]
        unix_role = "admin"

        [state]
        dir = "var"

        [log]
        level = "debug"
    """)
    config = load_config(path)
    assert config.server.listeners == (
        Listener("unix", path="run/agent.sock"),
        Listener("tcp", host="127.0.0.1", port=8765),
        Listener("tcp", host="::1", port=8766),
    )
    assert [str(item) for item in config.server.listeners] == [
        "unix:run/agent.sock", "tcp://127.0.0.1:8765", "tcp://[::1]:8766",
    ]
    assert config.server.unix_socket_mode == 0o660
    assert config.server.drain_timeout == 3.0
    assert isinstance(config.server.drain_timeout, float)
    assert config.server.stage_timeout == 5.0  # untouched keys keep their default
    assert config.hypervisor.uri == "qemu:///system"
    assert config.access.unix_admin_uids == (0, 1000)
    assert config.access.unix_role is Role.ADMIN
    assert config.state.dir == "var"
    assert config.log.level == "debug"


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


@pytest.mark.parametrize("name", ["dev.toml", "virtnode.toml"])
def test_shipped_config_files_load(name: str) -> None:
    load_config(REPO / "packaging" / name)


# -- bad configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"bogus": {}}, "bogus"),
        ({"server": {"listne": ["unix:/x"]}}, "server.listne"),
        ({"log": {"level": "info", "format": "json"}}, "log.format"),
        ({"server": "unix:/x"}, "server"),
        ({"server": {"listen": "unix:/x"}}, "server.listen"),
        ({"server": {"listen": ["unix:/x", 5]}}, r"server.listen\[1\]"),
        ({"server": {"listen": []}}, "server.listen"),
        ({"server": {"max_message_size": "16M"}}, "server.max_message_size"),
        ({"server": {"max_message_size": 1.5}}, "server.max_message_size"),
        ({"server": {"max_inflight_per_connection": True}}, "server.max_inflight_per_connection"),
        ({"server": {"max_inflight_per_connection": 0}}, "server.max_inflight_per_connection"),
        ({"server": {"drain_timeout": "10"}}, "server.drain_timeout"),
        ({"server": {"drain_timeout": False}}, "server.drain_timeout"),
        ({"server": {"drain_timeout": -1.0}}, "server.drain_timeout"),
        ({"server": {"drain_timeout": 0}}, "server.drain_timeout"),
        ({"server": {"drain_timeout": float("nan")}}, "server.drain_timeout"),
        ({"server": {"stage_timeout": -5}}, "server.stage_timeout"),
        ({"server": {"unix_socket_mode": 0o1777}}, "server.unix_socket_mode"),
        ({"server": {"unix_socket_mode": -1}}, "server.unix_socket_mode"),
        ({"server": {"unix_socket_mode": "0660"}}, "server.unix_socket_mode"),
        ({"hypervisor": {"uri": "qemu"}}, "hypervisor.uri"),
        ({"hypervisor": {"uri": 5}}, "hypervisor.uri"),
        ({"hypervisor": {"call_timeout": -0.1}}, "hypervisor.call_timeout"),
        ({"hypervisor": {"pool_size": 0}}, "hypervisor.pool_size"),
        ({"hypervisor": {"keepalive_interval": -1}}, "hypervisor.keepalive_interval"),
        ({"hypervisor": {"keepalive_count": 2.0}}, "hypervisor.keepalive_count"),
        ({"hypervisor": {"reconnect_min": -1}}, "hypervisor.reconnect_min"),
        ({"hypervisor": {"reconnect_max": 0}}, "hypervisor.reconnect_max"),
        ({"hypervisor": {"reconnect_min": 10, "reconnect_max": 5}}, "hypervisor.reconnect_min"),
        ({"hypervisor": {"reconnect_min": 31.0}}, "hypervisor.reconnect_min"),
        ({"access": {"unix_role": "root"}}, "access.unix_role"),
        ({"access": {"tcp_role": "Admin"}}, "access.tcp_role"),
        ({"access": {"tcp_role": 1}}, "access.tcp_role"),
        ({"access": {"tcp_role": ["admin"]}}, "access.tcp_role"),
        ({"access": {"unix_admin_uids": 0}}, "access.unix_admin_uids"),
        ({"access": {"unix_admin_uids": ["root"]}}, r"access.unix_admin_uids\[0\]"),
        ({"access": {"tls_role": "engine"}}, "access.tls_role"),
        ({"access": {"tls_reader_cns": "collector"}}, "access.tls_reader_cns"),
        ({"access": {"tls_reader_cns": [1]}}, r"access.tls_reader_cns\[0\]"),
        ({"tls": {"cert_file": 1}}, "tls.cert_file"),
        ({"tls": {"ca": "/etc/ca.pem"}}, "tls.ca"),
        ({"state": {"dir": 1}}, "state.dir"),
        ({"log": {"level": "verbose"}}, "log.level"),
        ({"log": {"level": "INFO"}}, "log.level"),
        ({"log": {"level": 10}}, "log.level"),
    ],
    ids=str,
)
def test_bad_value_names_the_key(raw: dict[str, Any], key: str) -> None:
    error = config_error(rf"^{key}:", raw)
    assert str(error).strip() != key


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("tcp://0.0.0.0:8765", "loopback only"),
        ("tcp://10.0.0.1:8765", "loopback only"),
        ("tcp://[::]:8765", "loopback only"),
        ("tcp://192.168.1.1:8765", "loopback only"),
        ("tcp://agent.example.com:8765", "not an IP address"),
        ("tls://agent.example.com:8765", "not an IP address"),
        ("tls://0.0.0.0", "HOST:PORT"),
        ("tcp://127.0.0.1", "HOST:PORT"),
        ("tcp://:8765", "HOST:PORT"),
        ("tcp://127.0.0.1:99999", "out of range"),
        ("tcp://127.0.0.1:http", "integer"),
        ("http://127.0.0.1:8765", "tcp://HOST:PORT or tls://HOST:PORT"),
        ("/run/virtnode.sock", "tcp://HOST:PORT or tls://HOST:PORT"),
        ("tcp://127.0.0.1:0", "port 0"),
        ("tls://[::]:0", "port 0"),
        # A listener is an address and a port; anything else in the URL was a mistake.
        ("tcp://u@127.0.0.1:1", "user name"),
        ("tls://user:secret@[::]:54321", "user name"),
        ("tcp://@127.0.0.1:1", "user name"),
        ("tcp://u@127.0.0.1:1/x", "user name"),
        ("tls://[::]:54321/path?q#f", "path"),
        ("tcp://127.0.0.1:8765/", "path"),
        ("tcp://127.0.0.1:8765/rpc", "path"),
        ("tls://0.0.0.0:54321?q", "query"),
        ("tls://0.0.0.0:54321?", "query"),
        ("tcp://127.0.0.1:8765#f", "fragment"),
        ("tcp://127.0.0.1:8765#", "fragment"),
        ("unix:", "empty"),
        ("unix:/run/a\0b", "NUL"),
        ("", "tcp://HOST:PORT or tls://HOST:PORT"),
    ],
)
def test_bad_listen_address(address: str, why: str) -> None:
    error = config_error(r"^server\.listen:", {"server": {"listen": ["unix:/ok", address]}})
    assert repr(address) in str(error)
    assert why in str(error)
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_listener(address)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("unix:/run/virtnode/virtnode.sock", Listener("unix", path="/run/virtnode/virtnode.sock")),
        ("unix:relative.sock", Listener("unix", path="relative.sock")),
        ("tcp://127.0.0.1:8765", Listener("tcp", host="127.0.0.1", port=8765)),
        ("tcp://127.1.2.3:1", Listener("tcp", host="127.1.2.3", port=1)),
        ("tcp://localhost:8765", Listener("tcp", host="localhost", port=8765)),
        ("tcp://[::1]:8765", Listener("tcp", host="::1", port=8765)),
        # TLS authenticates the peer, so it may listen anywhere.
        ("tls://0.0.0.0:54321", Listener("tls", host="0.0.0.0", port=54321)),
        ("tls://[::]:54321", Listener("tls", host="::", port=54321)),
        ("tls://192.0.2.7:1", Listener("tls", host="192.0.2.7", port=1)),
        ("tls://192.0.2.7:65535", Listener("tls", host="192.0.2.7", port=65535)),
        ("tls://127.0.0.1:8765", Listener("tls", host="127.0.0.1", port=8765)),
    ],
)
def test_good_listen_address(address: str, expected: Listener) -> None:
    assert parse_listener(address) == expected
    assert str(expected) == address


# -- bounds ---------------------------------------------------------------------------------


def _numeric_keys() -> list[tuple[str, str, type]]:
    """Every (section, key, type) of the configuration that holds a number."""
    keys = []
    for name, section in typing.get_type_hints(Config).items():
        hints = typing.get_type_hints(section)
        keys += [(name, key, hint) for key, hint in hints.items() if hint in (int, float)]
    return keys


NUMERIC_KEYS = _numeric_keys()


@pytest.mark.parametrize(("section", "key", "kind"), NUMERIC_KEYS,
                         ids=[f"{s}.{k}" for s, k, _ in NUMERIC_KEYS])
def test_every_number_is_bounded_and_says_so(section: str, key: str, kind: type) -> None:
    huge = 10**20 if kind is int else 1e20
    config_error(rf"^{section}\.{key}: .*at most", {section: {key: huge}})
    if kind is float:
        for value in (float("inf"), float("-inf"), float("nan")):
            config_error(rf"^{section}\.{key}:", {section: {key: value}})
    field = next(f for f in dataclasses.fields(getattr(Config(), section)) if f.name == key)
    assert "at most" in field.metadata["doc"], f"{section}.{key} does not document its bound"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"server": {"max_message_size": 10**20}}, "server.max_message_size"),
        ({"server": {"max_message_size": 2**30 + 1}}, "server.max_message_size"),
        ({"server": {"max_inflight_per_connection": 2**31}},
         "server.max_inflight_per_connection"),
        ({"server": {"drain_timeout": 86_400.5}}, "server.drain_timeout"),
        ({"hypervisor": {"call_timeout": float("inf")}}, "hypervisor.call_timeout"),
        ({"hypervisor": {"call_timeout": 1e10}}, "hypervisor.call_timeout"),
        ({"hypervisor": {"pool_size": 100_000}}, "hypervisor.pool_size"),
        ({"hypervisor": {"reconnect_min": float("inf"), "reconnect_max": float("inf")}},
         "hypervisor.reconnect_min"),
        ({"events": {"journal_max_events": 2**40}}, "events.journal_max_events"),
        ({"events": {"subscriber_queue": 10**9}}, "events.subscriber_queue"),
        ({"devices": {"coalesce_window": float("inf")}}, "devices.coalesce_window"),
        ({"stats": {"history": 86_400.0, "host_interval": 0.1}}, "stats.history"),
        ({"access": {"unix_admin_uids": [-1]}}, "access.unix_admin_uids"),
        ({"access": {"unix_admin_uids": [0, 2**32 - 1]}}, "access.unix_admin_uids"),
        ({"access": {"unix_admin_uids": [2**32]}}, "access.unix_admin_uids"),
        ({"access": {"unix_admin_uids": [2**64]}}, "access.unix_admin_uids"),
    ],
    ids=str,
)
def test_out_of_bounds_is_refused(raw: dict[str, Any], key: str) -> None:
    config_error(rf"^{re.escape(key)}:", raw)


def test_the_bounds_themselves_are_accepted() -> None:
    config = build_config({
        "server": {"max_message_size": 2**30, "drain_timeout": 86_400,
                   "stage_timeout": 86_400.0},
        "hypervisor": {"call_timeout": 86_400, "reconnect_max": 86_400},
        "devices": {"coalesce_window": 0},
        "access": {"unix_admin_uids": [0, 2**32 - 2]},
    })
    assert config.server.max_message_size == 2**30
    assert config.hypervisor.call_timeout == 86_400.0
    assert config.access.unix_admin_uids == (0, 2**32 - 2)


def test_a_toml_file_with_inf_and_nan_names_the_key(tmp_path: Path) -> None:
    for text, key in (("[hypervisor]\ncall_timeout = inf\n", "hypervisor.call_timeout"),
                      ("[server]\ndrain_timeout = nan\n", "server.drain_timeout"),
                      ("[server]\nmax_message_size = 100000000000000000000\n",
                       "server.max_message_size")):
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}:"):
            load_config(write(tmp_path, text))


TLS_FILES = {"cert_file": "/etc/pki/virtnode/cert.pem", "key_file": "/etc/pki/virtnode/key.pem",
             "ca_file": "/etc/pki/virtnode/ca.pem"}


def test_tls_listener_with_its_files() -> None:
    # The files are read when the agent starts, not when the configuration is built.
    config = build_config({
        "server": {"listen": ["unix:/run/a.sock", "tls://0.0.0.0:54321"]},
        "tls": TLS_FILES,
        "access": {"tls_role": "reader", "tls_reader_cns": ["collector", "monitor"]},
    })
    assert config.server.listeners[1] == Listener("tls", host="0.0.0.0", port=54321)
    assert config.tls.ca_file == "/etc/pki/virtnode/ca.pem"
    assert config.access.tls_role is Role.READER
    assert config.access.tls_reader_cns == ("collector", "monitor")


@pytest.mark.parametrize("key", ["cert_file", "key_file", "ca_file"])
def test_tls_listener_needs_each_file(key: str) -> None:
    files = {k: v for k, v in TLS_FILES.items() if k != key}
    error = config_error(rf"^tls\.{key}: must be set",
                         {"server": {"listen": ["tls://[::]:54321"]}, "tls": files})
    assert "server.listen" in str(error)


def test_tls_files_are_optional_without_a_tls_listener() -> None:
    assert build_config({"tls": {"cert_file": "/x.pem"}}).tls.cert_file == "/x.pem"


def test_file_that_is_not_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nlisten = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00\x01[server]\x80")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="No such file") as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_bad_key_in_a_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[hypervisor]\npool_size = -2\n")
    with pytest.raises(ConfigError,
                       match=r"^hypervisor\.pool_size: must be at least 1 and at most 1024"):
        load_config(path)


# -- overrides ------------------------------------------------------------------------------


def test_overrides_take_toml_values(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nlisten = ["unix:/a.sock"]\n[log]\nlevel = "debug"\n')
    config = load_config(path, [
        'server.listen = ["unix:/b.sock", "tcp://127.0.0.1:9000"]',
        "server.max_inflight_per_connection=8",
        "server.drain_timeout=2.5",
        "server.unix_socket_mode=0o600",
        "access.unix_admin_uids=[0, 1000]",
        'hypervisor.uri="qemu:///system"',
    ])
    assert config.server.listen == ("unix:/b.sock", "tcp://127.0.0.1:9000")
    assert config.server.max_inflight_per_connection == 8
    assert config.server.drain_timeout == 2.5
    assert config.server.unix_socket_mode == 0o600
    assert config.access.unix_admin_uids == (0, 1000)
    assert config.hypervisor.uri == "qemu:///system"
    assert config.log.level == "debug"  # from the file, not overridden


def test_overrides_take_bare_strings() -> None:
    config = load_config(None, [
        "hypervisor.uri=qemu:///system",
        "log.level = warning",
        "access.tcp_role=admin",
        "state.dir=/srv/virtnode state",
    ])
    assert config.hypervisor.uri == "qemu:///system"
    assert config.log.level == "warning"
    assert config.access.tcp_role is Role.ADMIN
    assert config.state.dir == "/srv/virtnode state"


def test_later_override_wins() -> None:
    assert load_config(None, ["log.level=debug", "log.level=error"]).log.level == "error"


def test_override_can_add_a_section_missing_from_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[log]\nlevel = 'debug'\n")
    assert load_config(path, ["state.dir=/tmp/x"]).state.dir == "/tmp/x"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("server.bogus=1", r"^server\.bogus: unknown key"),
        ("bogus.key=1", r"^bogus: unknown section"),
        ("server.max_inflight_per_connection=many", r"^server\.max_inflight_per_connection:"),
        ("server.max_inflight_per_connection=-3", r"^server\.max_inflight_per_connection:"),
        ("server.listen=unix:/x.sock", r"^server\.listen: expected a list"),
        ('server.listen=["tcp://0.0.0.0:1"]', r"^server\.listen: .*loopback"),
        ("state.dir=true", r"^state\.dir: expected str"),
        ("log.level=loud", r"^log\.level:"),
        ("hypervisor.reconnect_min=60", r"^hypervisor\.reconnect_min:"),
        ("log.level", "expected section.key=value"),
        ("level=debug", "expected section.key=value"),
        ("log.level.x=debug", "expected section.key=value"),
        (".level=debug", "expected section.key=value"),
        ("log.=debug", "expected section.key=value"),
    ],
)
def test_bad_override(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_override_of_a_section_that_is_not_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, 'log = "debug"\n')
    with pytest.raises(ConfigError, match=r"^log: expected a table"):
        load_config(path, ["log.level=debug"])


# -- dump -----------------------------------------------------------------------------------


def _round_trip(config: Config) -> Config:
    return build_config(tomllib.loads(dump_config(config)))


def test_dump_of_the_defaults_parses_back() -> None:
    text = dump_config(Config())
    assert "[server]" in text
    assert "unix_socket_mode = 0o666" in text
    assert "# addresses to serve the API on" in text
    assert _round_trip(Config()) == Config()


def test_dump_of_a_changed_config_parses_back(tmp_path: Path) -> None:
    path = write(tmp_path, r"""
        [server]
        listen = ["unix:/tmp/a \"quoted\" \\ path.sock", "tcp://[::1]:1"]
        unix_socket_mode = 0o600
        drain_timeout = 1e-3
        stage_timeout = 8.64e4
        [hypervisor]
        uri = "qemu+ssh://root@host/system?keyfile=/k#x"
        [access]
        unix_admin_uids = []
        unix_role = "admin"
        [state]
        dir = "/var/lib/ünïcode/😀/tab\there/newline\nhere/bell\u0007/del\u007f"
        [log]
        level = "error"
    """)
    config = load_config(path)
    assert _round_trip(config) == config


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/up",             # not a WebSocket URL
    "ws://192.0.2.10/up",              # plain text to another host
    "ws:///no-host",
])
def test_uplink_urls_are_checked(url: str) -> None:
    config_error(r"^uplink\.urls:", {"uplink": {"urls": [url]}})


def test_uplink_urls_accepted() -> None:
    config = build_config({"uplink": {"urls": ["ws://127.0.0.1:9/up", "wss://engine.example/x"],
                                      "role": "admin"}})
    assert config.uplink.urls == ("ws://127.0.0.1:9/up", "wss://engine.example/x")
    assert config.uplink.role == "admin"


def test_uplink_topics_must_be_globs() -> None:
    config_error(r"^uplink\.topics:", {"uplink": {"topics": ["VM lifecycle"]}})


# -- the VM host-access policy ------------------------------------------------------------------


def test_vm_policy_defaults_are_closed() -> None:
    vm = build_config({}).vm
    assert vm.allowed_paths == ()
    assert "/usr/share/OVMF" in vm.firmware_paths
    assert vm.nvram_paths == ("/var/lib/libvirt/qemu/nvram",)
    assert (vm.allow_host_devices, vm.allow_network_disks) == (False, False)
    assert vm.hotplug_ports == 8


@pytest.mark.parametrize("key", ["allowed_paths", "firmware_paths", "nvram_paths"])
@pytest.mark.parametrize("value", [
    "relative/images", "images", "/srv/\0images", "/", "//", "/./", "/dev", "/dev/disk/by-id",
    "/proc/self", "/sys/", "/srv/../dev",
])
def test_vm_directories_are_checked(key: str, value: str) -> None:
    config_error(rf"^vm\.{key}: ", {"vm": {key: ["/srv/images", value]}})


def test_vm_directories_accepted() -> None:
    vm = build_config({"vm": {"allowed_paths": ["/srv/images", "/var/lib/libvirt/images/"],
                              "allow_host_devices": True}}).vm
    assert vm.allowed_paths == ("/srv/images", "/var/lib/libvirt/images/")
    assert vm.allow_host_devices is True
    config_error(r"^vm\.allow_network_disks:", {"vm": {"allow_network_disks": "yes"}})
    assert build_config({"vm": {"hotplug_ports": 0}}).vm.hotplug_ports == 0
    config_error(r"^vm\.hotplug_ports:", {"vm": {"hotplug_ports": 65}})
