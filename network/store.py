"""What host networking keeps in the state store: the running and the boot (persisted)
config of the managed networks and bonds, the boot id they were last applied under, and the
transaction in flight.

A transaction is written before its first step and removed when it commits or has been
rolled back, so a crash in between (the agent killed while a change waits for its
confirmation) is found at the next start and rolled back from the snapshot it holds.
Every function runs on the store's thread (``await store.run(fn)``).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from virtnode.network.model import (
    Address,
    BondConfig,
    BridgeVlan,
    Dns,
    HostState,
    IpConfig,
    Link,
    NetworkConfig,
    Route,
)

T = TypeVar("T")
COMPONENT = "network"
#: 2: bonds (network_bond).
VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS network_config (
    kind   TEXT NOT NULL,  -- running | persisted
    name   TEXT NOT NULL,
    config TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS network_bond (
    kind   TEXT NOT NULL,  -- running | persisted
    name   TEXT NOT NULL,
    config TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS network_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS network_transaction (
    job_id   TEXT PRIMARY KEY,
    started  REAL NOT NULL,
    links    TEXT NOT NULL,
    snapshot TEXT NOT NULL
);
"""

RUNNING = "running"
PERSISTED = "persisted"


@dataclass(frozen=True)
class Transaction:
    """A change that was being applied: the links it touches and the state before it."""

    job_id: str
    started: float
    links: frozenset[str]
    snapshot: HostState


@dataclass(frozen=True)
class Saved:
    running: dict[str, NetworkConfig]
    persisted: dict[str, NetworkConfig]
    boot_id: str | None
    transaction: Transaction | None
    running_bonds: dict[str, BondConfig]
    persisted_bonds: dict[str, BondConfig]


def load(conn: sqlite3.Connection) -> Saved:
    configs = _load_table(conn, "network_config", config_from_json)
    bonds = _load_table(conn, "network_bond", bond_from_json)
    row = conn.execute("SELECT value FROM network_meta WHERE key = 'boot_id'").fetchone()
    tx_row = conn.execute("SELECT job_id, started, links, snapshot FROM network_transaction "
                          "ORDER BY started LIMIT 1").fetchone()
    transaction = None
    if tx_row is not None:
        transaction = Transaction(tx_row[0], tx_row[1], frozenset(json.loads(tx_row[2])),
                                  state_from_json(json.loads(tx_row[3])))
    return Saved(configs[RUNNING], configs[PERSISTED], None if row is None else row[0],
                 transaction, bonds[RUNNING], bonds[PERSISTED])


def save(conn: sqlite3.Connection, kind: str, networks: Mapping[str, NetworkConfig],
         bonds: Mapping[str, BondConfig]) -> None:
    """Replace every network and bond of ``kind`` (``running`` or ``persisted``)."""
    _save_table(conn, "network_config", kind, networks)
    _save_table(conn, "network_bond", kind, bonds)


def _load_table(conn: sqlite3.Connection, table: str,
                decode: Callable[[dict[str, Any]], T]) -> dict[str, dict[str, T]]:
    """A config table's rows (``table`` is one of this module's names), by kind and name."""
    found: dict[str, dict[str, T]] = {RUNNING: {}, PERSISTED: {}}
    for kind, name, text in conn.execute(f"SELECT kind, name, config FROM {table} "
                                         "ORDER BY name"):
        found.setdefault(kind, {})[name] = decode(json.loads(text))
    return found


def _save_table(conn: sqlite3.Connection, table: str, kind: str,
                configs: Mapping[str, NetworkConfig | BondConfig]) -> None:
    conn.execute(f"DELETE FROM {table} WHERE kind = ?", (kind,))
    conn.executemany(f"INSERT INTO {table} (kind, name, config) VALUES (?, ?, ?)",
                     [(kind, name, json.dumps(dataclasses.asdict(cfg), sort_keys=True))
                      for name, cfg in configs.items()])


def save_boot_id(conn: sqlite3.Connection, boot_id: str) -> None:
    conn.execute("INSERT OR REPLACE INTO network_meta (key, value) VALUES ('boot_id', ?)",
                 (boot_id,))


def begin(conn: sqlite3.Connection, tx: Transaction) -> None:
    conn.execute("INSERT OR REPLACE INTO network_transaction VALUES (?, ?, ?, ?)",
                 (tx.job_id, tx.started, json.dumps(sorted(tx.links)),
                  json.dumps(state_to_json(tx.snapshot))))


def end(conn: sqlite3.Connection, job_id: str) -> None:
    conn.execute("DELETE FROM network_transaction WHERE job_id = ?", (job_id,))


# --- JSON forms -----------------------------------------------------------------------------


def config_from_json(obj: dict[str, Any]) -> NetworkConfig:
    return NetworkConfig(
        name=obj["name"], bridge=obj["bridge"], ports=tuple(obj["ports"]), vlan=obj["vlan"],
        mtu=obj["mtu"], stp=obj["stp"], ipv4=IpConfig(**obj["ipv4"]),
        ipv6=IpConfig(**obj["ipv6"]), default_route=obj["default_route"])


def bond_from_json(obj: dict[str, Any]) -> BondConfig:
    return BondConfig(name=obj["name"], slaves=tuple(obj["slaves"]), mode=obj["mode"],
                      miimon=obj["miimon"])


def state_to_json(state: HostState) -> dict[str, Any]:
    return {
        "links": [dataclasses.asdict(link) for link in state.links.values()],
        "addresses": [dataclasses.asdict(a) for a in state.addresses],
        "routes": [dataclasses.asdict(r) for r in state.routes],
        "dns": dataclasses.asdict(state.dns),
    }


def state_from_json(obj: dict[str, Any]) -> HostState:
    links = {}
    for raw in obj["links"]:
        fields = dict(raw)
        fields["vlans"] = tuple(BridgeVlan(**v) for v in raw["vlans"])
        links[raw["name"]] = Link(**fields)
    return HostState(
        links=links,
        addresses=tuple(Address(**a) for a in obj["addresses"]),
        routes=tuple(Route(**r) for r in obj["routes"]),
        dns=Dns(nameservers=tuple(obj["dns"]["nameservers"]),
                search=tuple(obj["dns"]["search"])),
    )
