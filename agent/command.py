"""The ``virtnode`` command: the client's commands (:mod:`virtnode.client.cli`) and ``serve``,
which runs the agent in the foreground.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtnode.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    dump_config,
    load_config,
    toml_value,
)
from virtnode.rpc.schema import SchemaError
from virtnode.store import StoreError

if TYPE_CHECKING:
    from virtnode.client.cli import Command


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the agent in the foreground")
    p.add_argument("--config", type=Path,
                   help=f"TOML config file (default: {DEFAULT_CONFIG_PATH} if it exists)")
    p.add_argument("--listen", action="append", metavar="ADDR",
                   help="unix:/PATH, tcp://127.0.0.1:PORT or tls://HOST:PORT; repeat for "
                        "several (server.listen)")
    p.add_argument("--hypervisor", metavar="URI", help="libvirt URI (hypervisor.uri)")
    p.add_argument("--state-dir", metavar="DIR", help="state directory (state.dir)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="log level (log.level)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key; the value is TOML (repeatable)")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective configuration and exit")


def _serve_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.set)
    if args.listen:
        overrides.append(f"server.listen={toml_value(args.listen)}")
    if args.hypervisor:
        overrides.append(f"hypervisor.uri={toml_value(args.hypervisor)}")
    if args.state_dir:
        overrides.append(f"state.dir={toml_value(args.state_dir)}")
    if args.log_level:
        overrides.append(f"log.level={toml_value(args.log_level)}")
    return overrides


def cmd_serve(args: argparse.Namespace) -> int:
    from virtnode.client.cli import EXIT_USAGE
    from virtnode.daemon import serve

    path = args.config
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    try:
        config = load_config(path, _serve_overrides(args))
    except ConfigError as exc:
        print(f"virtnode: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    logging.basicConfig(
        level=config.log.level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:  # files the configuration names, read at start
        print(f"virtnode: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError, SchemaError, StoreError) as exc:
        logging.getLogger("virtnode").error("cannot start: %s", exc)
        return 1
    return 0



SERVE: Command = ("serve", _serve_parser, cmd_serve)


def main(argv: Sequence[str] | None = None) -> int:
    if list(sys.argv[1:] if argv is None else argv)[:1] == ["serve"]:
        # The agent's start allocates much and frees little: the cyclic collector's passes
        # over it, most during the imports below, cost a tenth of the start. The agent
        # freezes what its start made and collects again once it is ready (daemon.serve).
        gc.disable()
    from virtnode.client import cli

    return cli.main(argv, [SERVE])


if __name__ == "__main__":
    sys.exit(main())
