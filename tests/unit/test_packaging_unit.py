"""The packaged systemd unit: what an operator relies on without reading it."""

from __future__ import annotations

import configparser
from pathlib import Path

from virtnode.config import ServerConfig
from virtnode.connguard import RESERVED_DESCRIPTORS

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "virtnode.service"


def _service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser["Service"]


def test_the_unit_raises_the_descriptor_limit_above_what_the_listeners_may_hold() -> None:
    limit = int(_service()["LimitNOFILE"])
    # The default listener cap fits, for a unix socket and a tls:// listener, with the
    # reserve the agent keeps for everything else.
    assert limit >= 2 * ServerConfig().max_connections + RESERVED_DESCRIPTORS
