"""The packaged systemd unit: what an operator relies on without reading it."""

from __future__ import annotations

import configparser
import tomllib

from tests.paths import ROOT
from virtnode.config import ServerConfig
from virtnode.rpc.connguard import RESERVED_DESCRIPTORS

UNIT = ROOT / "packaging" / "virtnode.service"


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


def test_every_source_package_is_installed() -> None:
    # pyproject.toml lists the packages by hand (the folders map onto one import name); a
    # new subpackage missing from the list would work in the link tree and not installed.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: ROOT / path for name, path in project["package-dir"].items()}
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((name, *rel)))
    assert found == set(project["packages"])
