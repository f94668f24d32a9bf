"""Where the agent finds the console pages and their npm packages."""

from __future__ import annotations

from pathlib import Path

from tests.paths import ROOT
from virtnode.rpc.consoles import default_web_dir, missing_pages


def test_a_checkout_serves_its_own_web_folder_complete() -> None:
    # `make setup` (which `make test` runs first) installs the npm packages there.
    assert default_web_dir() == ROOT / "web"
    assert missing_pages(ROOT / "web") == []


def test_what_is_missing_is_named(tmp_path: Path) -> None:
    assert missing_pages(tmp_path) == ["app", "novnc", "xterm"]
    (tmp_path / "console").mkdir()
    (tmp_path / "node_modules" / "@xterm" / "xterm").mkdir(parents=True)
    assert missing_pages(tmp_path) == ["novnc"]
