"""The client commands of ``virtnode``: ``call``, ``methods``, ``events``, ``job``, ``stats``
and ``volume``.

``serve``, which runs the agent, is added by :mod:`virtnode.command`; nothing here imports
the agent's own modules.

Exit status: 0 success (and ``events`` interrupted); 1 the agent answered with an error
(printed as JSON on stderr), or the watched job failed or was cancelled; 2 bad usage or
configuration; 3 the agent could not be reached or the connection dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from virtnode import __version__, jsonrpc
from virtnode.client import jobs as jobcli
from virtnode.client import transfer as transfercli
from virtnode.client.connection import (
    DEFAULT_URL,
    Client,
    ClientError,
    ConnectionLost,
    RemoteError,
    endpoint,
    tls_context,
)
from virtnode.client.events import EventWatch, json_line, pretty_line

EXIT_REMOTE_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


def _url_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"agent URL (default {DEFAULT_URL})")
    tls = parser.add_argument_group("TLS, for wss:// and tls://HOST:PORT URLs")
    tls.add_argument("--ca", metavar="FILE",
                     help="CA bundle the agent's certificate must chain to (default: the "
                          "system's CAs)")
    tls.add_argument("--cert", metavar="FILE", help="this client's certificate (PEM)")
    tls.add_argument("--key", metavar="FILE",
                     help="this client's private key (PEM; default: in --cert)")
    tls.add_argument("--no-check-hostname", action="store_true",
                     help="check only that the agent's certificate chains to the CA, not "
                          "that it names the host in the URL")


def _call_parser(sub: Any) -> None:
    p = sub.add_parser("call", help="call one API method and print its result")
    p.add_argument("method", help="e.g. Host.getCapabilities")
    p.add_argument("params", nargs="*", metavar="KEY=VALUE",
                   help="a parameter; VALUE is JSON, or a plain string if it is not JSON")
    p.add_argument("--json", dest="json_params", metavar="OBJECT",
                   help="parameters as one JSON object (merged under KEY=VALUE ones)")
    _url_arg(p)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer")


def _methods_parser(sub: Any) -> None:
    p = sub.add_parser("methods", help="list the API methods with one-line descriptions")
    _url_arg(p)
    p.add_argument("--local", action="store_true",
                   help="read the schema installed with this command instead of asking the agent")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _events_parser(sub: Any) -> None:
    p = sub.add_parser("events", help="print the agent's events as they happen")
    p.add_argument("--topic", action="append", metavar="GLOB", dest="topics",
                   help="topics to follow, e.g. 'vm.*' (repeatable; default: all)")
    p.add_argument("--since", type=_non_negative_int, metavar="SEQ",
                   help="first replay the journal's events after SEQ")
    p.add_argument("--pretty", action="store_true",
                   help="one readable line per event instead of JSON")
    _url_arg(p)


def _job_parser(sub: Any) -> None:
    p = sub.add_parser("job", help="follow, list and cancel jobs")
    jobs = p.add_subparsers(dest="job_command", required=True)
    watch = jobs.add_parser("watch", help="show a job's progress until it ends; exit 0 "
                            "if it succeeded, 1 if it failed or was cancelled")
    watch.add_argument("job_id")
    listing = jobs.add_parser("list", help="list the jobs the agent knows")
    listing.add_argument("--state", choices=("pending", "running", "succeeded", "failed",
                                             "cancelled"))
    listing.add_argument("--kind", help="e.g. VM.shutdown")
    listing.add_argument("--json", action="store_true", help="print the jobs as JSON")
    cancel = jobs.add_parser("cancel", help="cancel a job and print it")
    cancel.add_argument("job_id")
    for parser in (watch, listing, cancel):
        _url_arg(parser)


def _stats_parser(sub: Any) -> None:
    p = sub.add_parser("stats", help="print host and VM statistics as tables")
    _url_arg(p)
    p.add_argument("--json", action="store_true", help="print both results as JSON instead")
    p.add_argument("--host", action="store_true", help="only the host")
    p.add_argument("--vms", action="store_true", help="only the VMs")


#: A command added from outside: (name, adds its parser to the subparsers, runs it).
Command = tuple[str, Callable[[Any], None], Callable[[argparse.Namespace], int]]


def _console_parsers(sub: Any) -> None:
    p = sub.add_parser("console", help="attach the terminal to a VM's serial console "
                                        "(Ctrl-] detaches)")
    p.add_argument("vm", help="the VM's name or UUID")
    p.add_argument("--takeover", choices=("keep", "fail", "disconnect"), default="keep",
                   help="with other sessions that may type: join them (keep), give up "
                        "(fail) or close them (disconnect)")
    _url_arg(p)
    p = sub.add_parser("vnc", help="print the URL of a VM's VNC console page for a browser")
    p.add_argument("vm", help="the VM's name or UUID")
    p.add_argument("--takeover", choices=("keep", "fail", "disconnect"), default="keep")
    _url_arg(p)


def build_parser(extra: Sequence[Command] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virtnode", description="virtnode host agent")
    parser.add_argument("--version", action="version", version=f"virtnode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for _, add_parser, _ in extra:
        add_parser(sub)
    _call_parser(sub)
    _methods_parser(sub)
    _events_parser(sub)
    _job_parser(sub)
    _stats_parser(sub)
    _console_parsers(sub)
    transfercli.add_parser(sub, _url_arg)
    return parser


def parse_params(pairs: Sequence[str], json_params: str | None) -> dict[str, Any]:
    """Build a params object from ``--json`` and ``KEY=VALUE`` words.

    Raises ``ValueError`` with a message for the user.
    """
    params: dict[str, Any] = {}
    if json_params is not None:
        try:
            loaded = jsonrpc.decode(json_params)
        except ValueError as exc:
            raise ValueError(f"--json is not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise ValueError("--json must be a JSON object")
        params.update(loaded)
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r}: expected KEY=VALUE")
        try:
            params[key] = jsonrpc.decode(text)
        except ValueError:
            params[key] = text
    return params


@dataclass(frozen=True)
class Target:
    """An agent to connect to: its URL and, for wss://, the TLS context."""

    url: str
    tls: ssl.SSLContext | None = None

    async def connect(self) -> Client:
        return await Client.connect(self.url, tls=self.tls)


def target_of(args: argparse.Namespace) -> Target | None:
    """The agent that ``--url`` and the TLS flags name; None (after saying why) if unusable."""
    try:
        ws_url, _ = endpoint(args.url)
        if not (args.ca or args.cert or args.key or args.no_check_hostname):
            return Target(args.url)
        if not ws_url.startswith("wss:"):
            raise ValueError("--ca, --cert, --key and --no-check-hostname need a wss:// or "
                             "tls:// URL")
        return Target(args.url, tls_context(args.ca, args.cert, args.key,
                                            check_hostname=not args.no_check_hostname))
    except ValueError as exc:
        print(f"virtnode: {exc}", file=sys.stderr)
        return None


async def _call(target: Target, method: str, params: dict[str, Any], timeout: float) -> Any:
    async with await target.connect() as client:
        return await client.call(method, params, timeout=timeout)


def _run_client(coro: Any) -> tuple[int, Any]:
    try:
        return 0, asyncio.run(coro)
    except RemoteError as exc:
        print(json.dumps(exc.error, indent=2), file=sys.stderr)
        return EXIT_REMOTE_ERROR, None
    except (ConnectionLost, TimeoutError) as exc:
        print(f"virtnode: {exc or 'timed out'}", file=sys.stderr)
        return EXIT_UNREACHABLE, None
    except ClientError as exc:
        print(f"virtnode: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE, None


def cmd_call(args: argparse.Namespace) -> int:
    try:
        params = parse_params(args.params, args.json_params)
    except ValueError as exc:
        print(f"virtnode: {exc}", file=sys.stderr)
        return EXIT_USAGE
    target = target_of(args)
    if target is None:
        return EXIT_USAGE
    status, result = _run_client(_call(target, args.method, params, args.timeout))
    if status == 0:
        print(json.dumps(result, indent=2, sort_keys=True))
    return status


def cmd_methods(args: argparse.Namespace) -> int:
    if args.local:
        from virtnode.rpc.schema import load_schema

        document = load_schema().describe()
    else:
        target = target_of(args)
        if target is None:
            return EXIT_USAGE
        status, document = _run_client(_call(target, "Api.describe", {}, 30.0))
        if status:
            return status
    width = max((len(m["name"]) for m in document["methods"]), default=0)
    for method in document["methods"]:
        summary = method.get("summary") or method["description"]
        print(f"{method['name']:<{width}}  {method['access']:<5}  {summary}")
    return 0


def _notice(text: str) -> None:
    print(f"virtnode: {text}", file=sys.stderr, flush=True)


def _warn(text: str) -> None:
    print(f"virtnode: warning: {text}", file=sys.stderr, flush=True)


async def _follow(target: Target, topics: list[str], since: int | None, pretty: bool) -> None:
    """Print events until SIGINT or SIGTERM (returns) or the connection ends (raises)."""
    def write(params: dict[str, Any]) -> None:
        print(pretty_line(params) if pretty else json_line(params), flush=True)

    loop = asyncio.get_running_loop()
    async with await target.connect() as client:
        follower = EventWatch(client, topics, since, write=write, warn=_warn, notice=_notice)
        watch = asyncio.create_task(follower.run(), name="virtnode-events")
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, watch.cancel)
        try:
            await watch
        except asyncio.CancelledError:
            if not watch.cancelled():
                raise
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)


def cmd_events(args: argparse.Namespace) -> int:
    target = target_of(args)
    if target is None:
        return EXIT_USAGE
    try:
        status, _ = _run_client(_follow(target, args.topics or ["*"], args.since, args.pretty))
    except BrokenPipeError:
        # The reader went away (| head): that ends the stream like Ctrl-C does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return status


async def _watch(target: Target, job_id: str) -> Any:
    async with await target.connect() as client:
        return await jobcli.watch(client, job_id, sys.stdout, tty=sys.stdout.isatty())


def cmd_job(args: argparse.Namespace) -> int:
    target = target_of(args)
    if target is None:
        return EXIT_USAGE
    if args.job_command == "watch":
        status, job = _run_client(_watch(target, args.job_id))
        if status:
            return status
        out, err = jobcli.outcome_lines(job)
        if out:
            print(out)
        if err:
            print(err, file=sys.stderr)
        return 0 if job["state"] == "succeeded" else EXIT_REMOTE_ERROR
    if args.job_command == "cancel":
        status, result = _run_client(_call(target, "Job.cancel", {"job_id": args.job_id}, 60))
        if status == 0:
            print(json.dumps(result["job"], indent=2, sort_keys=True))
        return status
    params = {k: v for k, v in (("state", args.state), ("kind", args.kind)) if v is not None}
    status, result = _run_client(_call(target, "Job.list", params, 30))
    if status == 0:
        if args.json:
            print(json.dumps(result["jobs"], indent=2, sort_keys=True))
        else:
            print("\n".join(jobcli.job_table(result["jobs"])))
    return status


async def _stats(target: Target, methods: Sequence[str]) -> list[Any]:
    async with await target.connect() as client:
        return list(await asyncio.gather(*(client.call(m, {}, timeout=30.0) for m in methods)))


def cmd_stats(args: argparse.Namespace) -> int:
    from virtnode.client.statstable import host_table, vm_table

    target = target_of(args)
    if target is None:
        return EXIT_USAGE
    # --json prints both; otherwise only what is shown is asked for.
    want_host, want_vms = args.json or not args.vms, args.json or not args.host
    methods = [m for m, wanted in (("Host.getStats", want_host), ("VM.getStats", want_vms))
               if wanted]
    status, answer = _run_client(_stats(target, methods))
    if status:
        return status
    results = dict(zip(methods, answer, strict=True))
    if args.json:
        print(json.dumps({"host": results["Host.getStats"],
                          "vms": results["VM.getStats"]["vms"]}, indent=2, sort_keys=True))
        return 0
    parts = []
    if want_host:
        parts.append(host_table(results["Host.getStats"]))
    if want_vms:
        parts.append(vm_table(results["VM.getStats"]["vms"]))
    print("\n\n".join(parts))
    return 0


async def _attach(target: Target, vm: str, takeover: str) -> str:
    from virtnode.client.console import attach

    async with await target.connect() as client:
        return await attach(client, target.url, vm, takeover=takeover, tls=target.tls)


async def _vnc_url(target: Target, vm: str, takeover: str) -> str:
    from virtnode.client.console import page_url, resolve_vm

    async with await target.connect() as client:
        vm_id = await resolve_vm(client, vm)
        grant = await client.call("VM.openConsole", {"vm_id": vm_id, "kind": "vnc",
                                                     "takeover": takeover})
        return page_url(target.url, grant["url"])


def cmd_console(args: argparse.Namespace) -> int:
    from virtnode.client.console import VmNameError

    target = target_of(args)
    if target is None:
        return EXIT_USAGE
    run = _attach if args.command == "console" else _vnc_url
    try:
        status, answer = _run_client(run(target, args.vm, args.takeover))
    except VmNameError as exc:
        print(f"virtnode: {exc}", file=sys.stderr)
        return EXIT_REMOTE_ERROR
    if status == 0:
        if args.command == "console":
            print(f"\r\nvirtnode: {answer}", file=sys.stderr)
        elif answer.startswith("/"):
            print(f"{answer}\n(a path on the agent's tcp:// or tls:// listener: browsers "
                  "cannot reach a unix socket; use --url tcp://HOST:PORT)", file=sys.stderr)
        else:
            print(answer)
    return status


async def _volume(target: Target, args: argparse.Namespace) -> Any:
    async with await target.connect() as client:
        return await transfercli.run(args, client, target.tls)


def cmd_volume(args: argparse.Namespace) -> int:
    target = target_of(args)
    if target is None:
        return EXIT_USAGE
    try:
        status, result = _run_client(_volume(target, args))
    except (ValueError, OSError) as exc:
        print(f"virtnode: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if status == 0:
        print(json.dumps(result, indent=2, sort_keys=True))
    return status


def main(argv: Sequence[str] | None = None, extra: Sequence[Command] = ()) -> int:
    args = build_parser(extra).parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "call": cmd_call, "methods": cmd_methods, "events": cmd_events, "job": cmd_job,
        "stats": cmd_stats, "console": cmd_console, "vnc": cmd_console,
        "volume": cmd_volume,
    }
    handlers.update((name, run) for name, _, run in extra)
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
