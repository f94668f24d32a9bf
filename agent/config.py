"""Agent configuration: one TOML file parsed once into frozen dataclasses.

Every key can be overridden from the command line (``--set section.key=value``, plus
shorthand flags for the common ones). Anything wrong raises :class:`ConfigError` naming
the key, and ``virtnode serve`` exits with status 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import posixpath
import re
import tomllib
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

DEFAULT_CONFIG_PATH = Path("/etc/virtnode/virtnode.toml")


class ConfigError(Exception):
    """The configuration is invalid; the message names the key."""


class Role(StrEnum):
    """What a caller may do: ``reader`` calls read methods, ``admin`` calls everything."""

    READER = "reader"
    ADMIN = "admin"


class DeviceSource(StrEnum):
    """Where host device events come from."""

    AUTO = "auto"  # udev when udevd runs, kernel uevents otherwise
    UDEV = "udev"
    KERNEL = "kernel"
    OFF = "off"


@dataclass(frozen=True)
class Listener:
    """A parsed listen address: ``unix:PATH``, ``tcp://host:port`` or ``tls://host:port``.

    A relative unix socket path is relative to the agent's working directory.
    """

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind}://{host}:{self.port}"


def parse_listener(text: str) -> Listener:
    """Parse a listen address; raises ``ValueError`` with a reason."""
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path or "\0" in path:
            raise ValueError("unix socket path is empty or has a NUL byte")
        return Listener("unix", path=path)
    parts = urlsplit(text)
    if parts.scheme not in ("tcp", "tls"):
        raise ValueError("expected unix:/PATH, tcp://HOST:PORT or tls://HOST:PORT")
    _check_only_host_port(text, parts)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if not parts.hostname or port is None:
        raise ValueError(f"{parts.scheme} listener needs HOST:PORT")
    if port == 0:
        raise ValueError("port 0 is not a port to listen on (1 to 65535)")
    host = parts.hostname
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address") from None
        # Plain text has no identity but the peer's address: only local callers may use it.
        if parts.scheme == "tcp" and not loopback:
            raise ValueError("plain tcp:// listens on loopback only; use tls:// for remote access")
    return Listener(parts.scheme, host=host, port=port)


def _check_only_host_port(text: str, parts: SplitResult) -> None:
    """A listener is HOST:PORT: refuse what else a URL may hold, rather than ignore it."""
    scheme = parts.scheme
    if "@" in parts.netloc:
        raise ValueError(f"{scheme} listener takes no user name (user@); it is HOST:PORT")
    # urlsplit drops an empty query or fragment ("tcp://h:1?"): look at the text itself.
    if parts.path:
        raise ValueError(f"{scheme} listener takes no path ({parts.path!r}); it is HOST:PORT")
    if "?" in text:
        raise ValueError(f"{scheme} listener takes no query (?...); it is HOST:PORT")
    if "#" in text:
        raise ValueError(f"{scheme} listener takes no fragment (#...); it is HOST:PORT")


Check = Callable[[Any], str | None]

#: Bounds of the numeric keys. Each key has one, finite, so that a typo (1e20, inf) is
#: an error here rather than an overflow or a wait of centuries at run time.
GiB = 1 << 30
#: Seconds in a day: the longest timeout, interval or delay any key takes...
DAY = 86_400
#: ...but for how long finished jobs and journaled events are kept.
MONTH = 30 * DAY
#: uid_t is 32 bits, and (uid_t)-1 means "no uid" to chown(2) and setresuid(2).
MAX_UID = 2**32 - 2
#: Host statistics samples kept in memory (stats.history / stats.host_interval).
MAX_HISTORY_SAMPLES = 100_000


def _within(low: float, high: float, *, low_included: bool, problem: str) -> Check:
    """Check ``low < value <= high`` (or ``low <= value``); NaN and infinities fail it."""

    def check(value: float) -> str | None:
        above = value >= low if low_included else value > low
        return None if above and value <= high else problem

    return check


def _seconds(most: int = DAY, *, zero: bool = False) -> Check:
    """A duration: above 0 (or at least 0 with ``zero``) and at most ``most`` seconds."""
    low = "at least 0" if zero else "greater than 0"
    return _within(0, most, low_included=zero,
                   problem=f"must be {low} and at most {most} seconds")


def _count(most: int) -> Check:
    """A number of things (threads, requests, events, bytes): 1 to ``most``."""
    return _within(1, most, low_included=True, problem=f"must be at least 1 and at most {most}")


def _check_listen(value: tuple[str, ...]) -> str | None:
    if not value:
        return "needs at least one address"
    for item in value:
        try:
            parse_listener(item)
        except ValueError as exc:
            return f"{item!r}: {exc}"
    return None


def _check_uri(value: str) -> str | None:
    return None if "://" in value or value.startswith("test:") else "is not a libvirt URI"


def _check_level(value: str) -> str | None:
    levels = ("debug", "info", "warning", "error")
    return None if value in levels else f"must be one of {', '.join(levels)}"


def _check_mode(value: int) -> str | None:
    return None if 0 <= value <= 0o777 else "must be a file mode, at least 0 and at most 0o777"


def _check_uids(value: tuple[int, ...]) -> str | None:
    for index, uid in enumerate(value):
        if not 0 <= uid <= MAX_UID:
            return f"[{index}]: {uid} is not a uid (at least 0 and at most {MAX_UID})"
    return None


def _spec(default: Any, check: Callable[[Any], str | None] | None = None, doc: str = "") -> Any:
    return field(default=default, metadata={"check": check, "doc": doc})


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...] = _spec(
        ("unix:/run/virtnode/virtnode.sock",), _check_listen, "addresses to serve the API on"
    )
    unix_socket_mode: int = _spec(
        0o666, _check_mode, "mode of unix sockets, at most 0o777; roles limit callers")
    max_message_size: int = _spec(
        16 * 1024 * 1024, _count(GiB), "largest request message, bytes (at most 1 GiB)")
    max_inflight_per_connection: int = _spec(
        64, _count(65_536), "concurrent requests per connection (at most 65536)")
    drain_timeout: float = _spec(
        10.0, _seconds(), "seconds to let in-flight calls finish at stop (at most a day)")
    stage_timeout: float = _spec(
        5.0, _seconds(), "seconds for each other shutdown stage (at most a day)")
    check_results: bool = _spec(
        False, None, "validate every result and event against the schema (development)"
    )
    max_batch: int = _spec(
        100, _count(10_000), "requests in one batch at most (at most 10000)")
    max_answer_size: int = _spec(
        16 * 1024 * 1024, _count(GiB),
        "largest answer, bytes; a bigger one is replaced by a ResourceExhausted error "
        "(at most 1 GiB)")
    send_buffer_soft: int = _spec(
        1024 * 1024, _count(GiB),
        "unsent bytes of one WebSocket above which the agent stops reading from it "
        "(at most 1 GiB)")
    send_buffer_hard: int = _spec(
        64 * 1024 * 1024, _count(GiB),
        "unsent bytes of one WebSocket above which the agent closes it (1008; at most 1 GiB)")
    max_connections: int = _spec(
        1000, _count(1_000_000), "open connections per listener at most (at most 1000000)")
    max_connections_per_caller: int = _spec(
        200, _count(1_000_000), "open connections per listener of one caller (uid, "
        "certificate CN or peer address) at most (at most 1000000)")
    header_timeout: float = _spec(
        10.0, _seconds(), "seconds a client has to send a request's headers once it began "
        "(at most a day)")
    idle_timeout: float = _spec(
        60.0, _seconds(), "seconds a connection may stay without a request before it is "
        "closed (WebSockets excepted: they are pinged; at most a day)")
    body_timeout: float = _spec(
        60.0, _seconds(), "seconds to receive a POST body (at most a day)")
    backlog: int = _spec(
        4096, _count(65_535), "pending connections each listener queues (at most 65535)")
    allowed_hosts: tuple[str, ...] = _spec(
        (), None, "more host names accepted in the Host and Origin headers (besides "
        "localhost, this host's names, the listen addresses and IP literals)")

    @property
    def listeners(self) -> tuple[Listener, ...]:
        return tuple(parse_listener(item) for item in self.listen)


@dataclass(frozen=True)
class HypervisorConfig:
    uri: str = _spec("test:///default", _check_uri, "libvirt connection URI")
    call_timeout: float = _spec(
        30.0, _seconds(), "deadline of one libvirt call, seconds (at most a day)")
    pool_size: int = _spec(
        8, _count(1024), "threads that run blocking libvirt calls (at most 1024)")
    keepalive_interval: int = _spec(
        5, _seconds(), "seconds between keepalive probes (at most a day)")
    keepalive_count: int = _spec(
        3, _count(1000), "unanswered probes before the link is dead (at most 1000)")
    reconnect_min: float = _spec(
        0.5, _seconds(), "first reconnect delay, seconds (at most a day)")
    reconnect_max: float = _spec(
        30.0, _seconds(), "longest reconnect delay, seconds (at most a day)")


#: Directories whose files are the host itself: never a place for VM images.
_SYSTEM_DIRS = ("/dev", "/proc", "/sys")


def _check_dirs(value: tuple[str, ...]) -> str | None:
    for item in value:
        if "\0" in item:
            return f"{item!r}: has a NUL byte"
        if not item.startswith("/"):
            return f"{item!r}: must be an absolute path"
        norm = posixpath.normpath(item)
        if norm in ("/", "//"):
            return f"{item!r}: would allow every file of the host; name the directories"
        for system in _SYSTEM_DIRS:
            if norm == system or norm.startswith(system + "/"):
                return (f"{item!r}: {system} holds the host's devices and kernel state, "
                        "never VM images (see vm.allow_host_devices)")
    return None


@dataclass(frozen=True)
class VmConfig:
    lock_wait: float = _spec(
        60.0, _seconds(), "seconds a call waits for another on the same VM (at most a day)")
    acpi_interval: float = _spec(
        3.0, _seconds(), "seconds between ACPI presses in VM.shutdown (at most a day)")
    allowed_paths: tuple[str, ...] = _spec(
        (), _check_dirs, "directories whose files VMs may use (disks, ISOs, kernels, console "
        "logs, sockets) besides the storage domains' images; only root may write in them")
    firmware_paths: tuple[str, ...] = _spec(
        ("/usr/share/OVMF", "/usr/share/ovmf", "/usr/share/qemu", "/usr/share/seabios",
         "/usr/lib/ipxe/qemu"), _check_dirs,
        "read-only firmware: read-only loaders, NVRAM templates and option ROMs may come from "
        "here too")
    nvram_paths: tuple[str, ...] = _spec(
        ("/var/lib/libvirt/qemu/nvram",), _check_dirs,
        "where a VM's UEFI variable store (<nvram>) may be, besides vm.allowed_paths")
    allow_host_devices: bool = _spec(
        False, None, "let VMs have host devices (hostdev, block devices, SCSI LUNs, input, "
        "USB redirection, smartcards, host TPM, audio, GPU render nodes): this trusts VM "
        "creators with the host")
    allow_network_disks: bool = _spec(
        False, None, "let VMs have network disks (nbd, iscsi, rbd, gluster, http...) that the "
        "host connects to")
    hotplug_ports: int = _spec(
        8, _within(0, 64, low_included=True, problem="must be at least 0 and at most 64"),
        "spare PCIe root ports a q35 VM gets for hot-plugged disks and NICs (at most 64)")


@dataclass(frozen=True)
class ConsoleConfig:
    log_size: int = _spec(
        256 * 1024, _count(64 * 1024 * 1024),
        "bytes of each running VM's serial output the agent keeps for VM.getConsoleLog and "
        "for clients that connect late (at most 64 MiB)")
    token_lifetime: float = _spec(
        60.0, _seconds(3600), "seconds a VM.openConsole token may wait to be used (at most "
                              "an hour)")
    client_buffer: int = _spec(
        1024 * 1024, _count(GiB),
        "serial output bytes one console client may leave unread before it is closed (1008; "
        "at most 1 GiB)")
    max_clients: int = _spec(
        16, _count(1024), "console clients of one kind attached to one VM at most (at most 1024)")
    web_dir: str = _spec(
        "", None, "where the console pages and their npm packages are (when empty: web/ of "
                  "the source tree if there is one, else /usr/share/virtnode/web)")


@dataclass(frozen=True)
class GuestAgentConfig:
    timeout: float = _spec(
        5.0, _seconds(300), "seconds a guest agent command may take before it counts as "
                            "unanswered (at most 300)")
    refresh_interval: float = _spec(
        60.0, _within(5, DAY, low_included=True,
                      problem=f"must be at least 5 and at most {DAY} seconds"),
        "seconds between readings of what a connected guest agent reports (OS, users, "
        "filesystems, addresses), at least 5 and at most a day; also read when it "
        "connects and when the VM resumes")


@dataclass(frozen=True)
class MigrationConfig:
    libvirt_uri: str = _spec(
        "qemu+tls://{host}/system", None,
        "how another host's libvirtd reaches this one for an incoming migration; {host} is "
        "the host name or address the source agent called this agent on")
    max_outgoing: int = _spec(
        2, _within(1, 64, low_included=True, problem="must be at least 1 and at most 64"),
        "migrations this host sends at once, at most 64; more wait their turn")
    max_incoming: int = _spec(
        2, _within(1, 64, low_included=True, problem="must be at least 1 and at most 64"),
        "migrations this host takes in at once, at most 64; more are refused "
        "ResourceExhausted")
    connect_timeout: float = _spec(
        10.0, _seconds(), "seconds to reach the destination agent (at most a day)")
    progress_interval: float = _spec(
        1.0, _seconds(), "seconds between readings of a migration's progress (at most a day)")


@dataclass(frozen=True)
class DevicesConfig:
    source: DeviceSource = _spec(
        DeviceSource.AUTO, None, "host.device events from: auto, udev, kernel or off"
    )
    coalesce_window: float = _spec(
        0.1, _seconds(60, zero=True),
        "seconds a device change waits to be merged with later ones (at most 60)"
    )


@dataclass(frozen=True)
class StatsConfig:
    host_interval: float = _spec(
        5.0, _seconds(), "seconds between host statistics samples (at most a day)")
    vm_interval: float = _spec(
        10.0, _seconds(), "seconds between VM statistics samples (at most a day)")
    history: float = _spec(
        3600.0, _seconds(), "seconds of host statistics kept in memory (at most a day, and "
        f"at most {MAX_HISTORY_SAMPLES} samples of host_interval)")
    vm_timeout: float = _spec(
        5.0, _seconds(), "deadline of the bulk VM statistics call; past it, stuck VMs are "
        "sought (at most a day)"
    )
    probe_timeout: float = _spec(
        1.0, _seconds(), "deadline of a call probing for a stuck VM (at most a day)")
    stuck_retry: float = _spec(
        60.0, _seconds(), "seconds before a stuck VM is sampled again when libvirt cannot "
        "tell (at most a day)"
    )


@dataclass(frozen=True)
class JobsConfig:
    retention: float = _spec(
        3600.0, _seconds(MONTH),
        "seconds a finished job (and its request key) is kept (at most 30 days)")
    purge_interval: float = _spec(
        60.0, _seconds(), "seconds between purges of expired jobs (at most a day)")
    progress_interval: float = _spec(
        0.5, _seconds(), "least seconds between two progress events (and writes) of one job "
        "(at most a day)")
    cancel_wait: float = _spec(
        10.0, _seconds(), "seconds Job.cancel waits for the job to end (at most a day)")


@dataclass(frozen=True)
class StorageConfig:
    mount_root: str = _spec(
        "", None, "where posixfs domains are mounted, one directory per domain; empty: "
        "<state.dir>/mnt")
    monitor_interval: float = _spec(
        10.0, _seconds(), "seconds between checks of each domain (at most a day)")
    monitor_timeout: float = _spec(
        5.0, _seconds(), "deadline of one domain check; past it the domain is unreachable "
        "(at most a day)")
    monitor_slow: float = _spec(
        1.0, _seconds(), "metadata read latency, seconds, above which a domain is slow "
        "(at most a day)")
    mount_timeout: float = _spec(
        60.0, _seconds(), "deadline of one mount or umount command (at most a day)")
    io_timeout: float = _spec(
        60.0, _seconds(), "deadline of the storage I/O of one call (formatting, reading "
        "metadata; at most a day)")
    import_paths: tuple[str, ...] = _spec(
        (), _check_dirs, "directories whose image files Volume.import may read (after "
        "symlinks); empty: imports by path are refused. Only root should write in them")
    transfer_timeout: float = _spec(
        300.0, _seconds(), "seconds a volume transfer (Volume.prepareTransfer) lives without "
        "a request; each request starts the time again (at most a day)")
    export_paths: tuple[str, ...] = _spec(
        (), _check_dirs, "directories VM.export may write OVA files in (after symlinks); "
        "empty: exports are refused. Only root should write in them")
    merge_bandwidth: int = _spec(
        0, _within(0, 65536, low_included=True, problem="must be at least 0 and at most 65536"),
        "MiB/s a merge inside a running VM (VM.deleteSnapshot) writes at most; 0: no limit")


@dataclass(frozen=True)
class NetworkSettings:
    restore_boot_config: bool = _spec(
        True, None, "after the host booted, set up the persisted networks at start")
    boot_id_file: str = _spec(
        "/proc/sys/kernel/random/boot_id", None,
        "the file whose content changes with each boot of the host")


@dataclass(frozen=True)
class AccessConfig:
    unix_admin_uids: tuple[int, ...] = _spec(
        (0,), _check_uids, f"unix peer uids given the admin role (0 to at most {MAX_UID})")
    unix_role: Role = _spec(Role.READER, None, "role of other unix peers")
    tcp_role: Role = _spec(Role.READER, None, "role of plain tcp (loopback) callers")
    tls_role: Role = _spec(
        Role.ADMIN, None, "role of tls:// clients whose certificate chains to tls.ca_file")
    tls_reader_cns: tuple[str, ...] = _spec(
        (), None, "client certificate subject CNs given the reader role instead of tls_role")


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str = _spec(
        "", None, "PEM certificate (with its chain) that tls:// listeners present")
    key_file: str = _spec("", None, "PEM private key of tls.cert_file, not encrypted")
    ca_file: str = _spec(
        "", None, "PEM CA bundle that client certificates on tls:// listeners must chain to")


@dataclass(frozen=True)
class StateConfig:
    dir: str = _spec("/var/lib/virtnode", None, "where state that survives a restart lives")


@dataclass(frozen=True)
class EventsConfig:
    journal_max_events: int = _spec(
        100_000, _count(10_000_000), "events the journal keeps (at most 10000000)")
    journal_max_age: float = _spec(
        86_400.0, _seconds(MONTH), "seconds the journal keeps an event (at most 30 days)")
    subscriber_queue: int = _spec(
        10_000, _count(1_000_000),
        "events queued for one slow subscriber before it is dropped (at most 1000000)"
    )


def _check_uplinks(value: tuple[str, ...]) -> str | None:
    for item in value:
        parts = urlsplit(item)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            return f"{item!r}: expected ws://HOST[:PORT]/PATH or wss://..."
        if parts.scheme == "ws" and not _is_loopback(parts.hostname):
            return f"{item!r}: plain ws:// goes to loopback only; use wss:// for remote hosts"
    return None


def _check_topics(value: tuple[str, ...]) -> str | None:
    if not value:
        return "needs at least one topic glob"
    bad = [t for t in value if not re.fullmatch(r"[a-z0-9_.*?\[\]]{1,200}", t)]
    return f"not topic globs: {bad}" if bad else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class UplinkConfig:
    urls: tuple[str, ...] = _spec(
        (), _check_uplinks, "upstream WebSocket URLs the agent dials out to (wss://, or ws:// "
        "on loopback)"
    )
    role: Role = _spec(Role.READER, None, "role of requests that arrive over an uplink")
    topics: tuple[str, ...] = _spec(("*",), _check_topics, "event topics streamed upstream")
    hello_timeout: float = _spec(
        10.0, _seconds(), "seconds to wait for the upstream's hello answer (at most a day)")
    reconnect_min: float = _spec(
        1.0, _seconds(), "first reconnect delay, seconds (at most a day)")
    reconnect_max: float = _spec(
        60.0, _seconds(), "longest reconnect delay, seconds (at most a day)")


@dataclass(frozen=True)
class LogConfig:
    level: str = _spec("info", _check_level, "debug logs one line per request")


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    hypervisor: HypervisorConfig = field(default_factory=HypervisorConfig)
    vm: VmConfig = field(default_factory=VmConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    guest_agent: GuestAgentConfig = field(default_factory=GuestAgentConfig)
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    access: AccessConfig = field(default_factory=AccessConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    state: StateConfig = field(default_factory=StateConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _convert(key: str, hint: Any, value: Any) -> Any:
    """Convert a TOML value to the field's type or raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item_hint, _) = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return tuple(_convert(f"{key}[{i}]", item_hint, v) for i, v in enumerate(value))
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        try:
            return hint(value)
        except ValueError:
            choices = ", ".join(m.value for m in hint)
            raise ConfigError(f"{key}: {value!r} is not one of {choices}") from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if type(value) is not hint:
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover - schema bug


def _build_section(name: str, cls: type[Any], raw: Any) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}: expected a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{name}.{key}"
        values[key] = _convert(full, hints[key], value)
        check = fields[key].metadata.get("check")
        problem = check(values[key]) if check else None
        if problem:
            raise ConfigError(f"{full}: {problem}")
    return cls(**values)


def build_config(raw: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from a parsed TOML document; raises ConfigError."""
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section")
    sections = {name: _build_section(name, hints[name], raw.get(name, {})) for name in hints}
    config = Config(**sections)
    hv = config.hypervisor
    if hv.reconnect_min > hv.reconnect_max:
        raise ConfigError("hypervisor.reconnect_min: must not exceed hypervisor.reconnect_max")
    if config.storage.mount_root and not Path(config.storage.mount_root).is_absolute():
        raise ConfigError("storage.mount_root: must be an absolute path")
    server = config.server
    if server.send_buffer_soft > server.send_buffer_hard:
        raise ConfigError("server.send_buffer_soft: must not exceed server.send_buffer_hard")
    if server.max_connections_per_caller > server.max_connections:
        raise ConfigError(
            "server.max_connections_per_caller: must not exceed server.max_connections")
    if config.stats.history < config.stats.host_interval:
        raise ConfigError("stats.history: must be at least stats.host_interval")
    if config.stats.history / config.stats.host_interval > MAX_HISTORY_SAMPLES:
        raise ConfigError(f"stats.history: keeps at most {MAX_HISTORY_SAMPLES} samples in "
                          "memory; stats.history / stats.host_interval is more")
    _check_tls(config)
    return config


def _check_tls(config: Config) -> None:
    """A tls:// listener needs its files named; they are read when the agent starts."""
    if not any(listener.kind == "tls" for listener in config.server.listeners):
        return
    for key in ("cert_file", "key_file", "ca_file"):
        if not getattr(config.tls, key):
            raise ConfigError(f"tls.{key}: must be set for the tls:// listeners in server.listen")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is TOML, or a bare string."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"{item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return parts, value


def load_config(path: Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read ``path`` (or the defaults when None), apply ``overrides`` and check it all.

    Raises :class:`ConfigError` naming the offending key or file.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: not UTF-8 text ({exc.reason})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for item in overrides:
        (section, key), value = parse_override(item)
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table")
        table[key] = value
    return build_config(raw)


def _toml_char(char: str) -> str:
    if char in ('"', "\\"):
        return "\\" + char
    if (char < " " and char != "\t") or char == "\x7f":  # control characters must be escaped
        return f"\\u{ord(char):04x}"
    return char


def toml_value(value: Any) -> str:
    """Render a config value (string, number, bool, role or a list of them) as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, StrEnum):
        return toml_value(value.value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(type(value))  # pragma: no cover


def dump_config(config: Config) -> str:
    """Render the effective configuration as TOML, with each key's meaning."""
    lines: list[str] = []
    for section in dataclasses.fields(config):
        lines.append(f"[{section.name}]")
        obj = getattr(config, section.name)
        for item in dataclasses.fields(obj):
            doc = item.metadata.get("doc")
            value = getattr(obj, item.name)
            text = oct(value) if item.name.endswith("_mode") else toml_value(value)
            lines.append(f"{item.name} = {text}" + (f"  # {doc}" if doc else ""))
        lines.append("")
    return "\n".join(lines)

