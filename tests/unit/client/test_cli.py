"""The ``virtnode`` command: parameter words, config printing, exit statuses."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from virtnode import __version__
from virtnode.client import endpoint
from virtnode.client.cli import EXIT_UNREACHABLE, EXIT_USAGE, parse_params
from virtnode.command import main
from virtnode.config import Config, Listener, Role, build_config
from virtnode.rpc.schema import ApiSchema

# -- parse_params ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("name=vm1", "vm1"),
        ("count=3", 3),
        ("ratio=0.5", 0.5),
        ("flag=true", True),
        ("none=null", None),
        ("quoted=\"3\"", "3"),
        ("list=[1, \"a\"]", [1, "a"]),
        ('obj={"a": {"b": 1}}', {"a": {"b": 1}}),
        ("empty=", ""),
        ("spaces=hello world", "hello world"),
        ("eq=a=b", "a=b"),
        ("uuid=5c1a7e1e-0000-4000-8000-000000000001", "5c1a7e1e-0000-4000-8000-000000000001"),
        ("broken={\"a\":", "{\"a\":"),
        # Not JSON the agent accepts, so they stay strings rather than becoming NaN/inf.
        ("nan=NaN", "NaN"),
        ("inf=Infinity", "Infinity"),
        ("big=1e400", "1e400"),
    ],
)
def test_key_value_is_json_or_a_string(word: str, expected: Any) -> None:
    key = word.split("=", 1)[0]
    assert parse_params([word], None) == {key: expected}


def test_json_is_merged_under_key_value_words() -> None:
    params = parse_params(["b=3", "c=x"], '{"a": 1, "b": 2}')
    assert params == {"a": 1, "b": 3, "c": "x"}


def test_no_params_is_an_empty_object() -> None:
    assert parse_params([], None) == {}
    assert parse_params([], "{}") == {}


@pytest.mark.parametrize(
    ("pairs", "json_params", "message"),
    [
        (["novalue"], None, "expected KEY=VALUE"),
        (["=value"], None, "expected KEY=VALUE"),
        ([], "{", "--json is not valid JSON"),
        ([], "", "--json is not valid JSON"),
        ([], '{"a": NaN}', "--json is not valid JSON"),
        ([], "[1, 2]", "--json must be a JSON object"),
        ([], '"text"', "--json must be a JSON object"),
        ([], "null", "--json must be a JSON object"),
    ],
)
def test_bad_params(pairs: list[str], json_params: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_params(pairs, json_params)


# -- the command, run for real --------------------------------------------------------------


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VIRTNODE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "virtnode", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def printed_config(stdout: str) -> Config:
    return build_config(tomllib.loads(stdout))


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "virtnode.toml"
    path.write_text(
        '[server]\nlisten = ["unix:/run/from-file.sock"]\n'
        '[hypervisor]\nuri = "qemu:///system"\n'
        '[log]\nlevel = "warning"\n'
    )
    return path


def test_print_config_shows_the_file(tmp_path: Path, config_file: Path) -> None:
    proc = run("serve", "--config", str(config_file), "--print-config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = printed_config(proc.stdout)
    assert config.server.listen == ("unix:/run/from-file.sock",)
    assert config.hypervisor.uri == "qemu:///system"
    assert config.log.level == "warning"
    assert config.state.dir == "/var/lib/virtnode"
    assert "# libvirt connection URI" in proc.stdout


def test_print_config_applies_set_and_shorthand_flags(tmp_path: Path, config_file: Path) -> None:
    proc = run(
        "serve", "--config", str(config_file), "--print-config",
        "--listen", "unix:relative.sock", "--listen", "tcp://127.0.0.1:8765",
        "--hypervisor", "test:///default",
        "--state-dir", "/srv/state dir/ü😀",
        "--log-level", "debug",
        "--set", "server.max_inflight_per_connection=7",
        "--set", "access.tcp_role=admin",
        "--set", "access.unix_admin_uids=[0, 1000]",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    config = printed_config(proc.stdout)
    assert config.server.listeners == (
        Listener("unix", path="relative.sock"), Listener("tcp", host="127.0.0.1", port=8765),
    )
    assert config.hypervisor.uri == "test:///default"
    assert config.state.dir == "/srv/state dir/ü😀"
    assert config.log.level == "debug"
    assert config.server.max_inflight_per_connection == 7
    assert config.access.tcp_role is Role.ADMIN
    assert config.access.unix_admin_uids == (0, 1000)


@pytest.mark.parametrize(
    ("file_text", "args", "key"),
    [
        ("[server]\nmax_inflight_per_connection = \"lots\"\n", (),
         "server.max_inflight_per_connection"),
        ("", ("--set", "server.bogus=1"), "server.bogus"),
        ("", ("--listen", "tcp://10.0.0.1:8765"), "server.listen"),
    ],
)
def test_bad_config_exits_2_naming_the_key(
    tmp_path: Path, file_text: str, args: tuple[str, ...], key: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(file_text)
    proc = run("serve", "--config", str(path), *args, cwd=tmp_path)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    proc = run("serve", "--config", str(tmp_path / "absent.toml"), "--print-config", cwd=tmp_path)
    assert proc.returncode == EXIT_USAGE
    assert "absent.toml" in proc.stderr


def test_call_unreachable_agent_exits_3(tmp_path: Path) -> None:
    proc = run("call", "Host.ping", "--url", "unix:/nonexistent/sock", cwd=tmp_path)
    assert proc.returncode == EXIT_UNREACHABLE, proc.stderr
    assert "unix:/nonexistent/sock" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_methods_local_lists_methods_with_access(tmp_path: Path, schema: ApiSchema) -> None:
    proc = run("methods", "--local", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = {line.split()[0]: line.split()[1] for line in lines}
    assert rows["Host.ping"] == "read"
    assert rows == {name: spec.access for name, spec in schema.methods.items()}
    (ping,) = [line for line in lines if line.startswith("Host.ping ")]
    assert "Check that the agent answers" in ping


# -- in-process: usage errors that never reach the network ----------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["call", "Host.ping", "--url", "http://127.0.0.1:8765/rpc"],
        ["call", "Host.ping", "--url", "/run/virtnode/virtnode.sock"],
        ["methods", "--url", "ftp://example.com"],
    ],
)
def test_unsupported_url_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "unsupported URL" in err
    assert argv[-1] in err


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("unix:/run/v.sock", ("ws://localhost/rpc", "/run/v.sock")),
        ("tcp://127.0.0.1:8765", ("ws://127.0.0.1:8765/rpc", None)),
        ("tls://192.0.2.7:54321", ("wss://192.0.2.7:54321/rpc", None)),
        ("tls://[2001:db8::7]:54321", ("wss://[2001:db8::7]:54321/rpc", None)),
        ("wss://agent.example:54321", ("wss://agent.example:54321/rpc", None)),
        ("wss://agent.example:54321/rpc", ("wss://agent.example:54321/rpc", None)),
    ],
)
def test_endpoint(url: str, expected: tuple[str, str | None]) -> None:
    assert endpoint(url) == expected


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--url", "unix:/nonexistent/sock", "--ca", "/ca.pem"), "need a wss:// or tls:// URL"),
        (("--url", "tcp://127.0.0.1:1", "--no-check-hostname"), "need a wss:// or tls:// URL"),
        (("--url", "tls://127.0.0.1:1", "--key", "/key.pem"), "a client key needs its cert"),
        (("--url", "tls://127.0.0.1:1", "--ca", "/nonexistent/ca.pem"),
         "CA file /nonexistent/ca.pem: No such file"),
        (("--url", "wss://127.0.0.1:1/rpc", "--cert", "/nonexistent/c.pem"),
         "client certificate /nonexistent/c.pem: No such file"),
    ],
)
def test_bad_tls_flags_are_a_usage_error(
    flags: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["call", "Host.ping", *flags]) == EXIT_USAGE
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["call", "Host.ping", "oops"],
        ["call", "Host.ping", "--json", "[1]"],
        ["call", "Host.ping", "--json", "{not json"],
    ],
)
def test_bad_call_params_are_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--url", "unix:/nonexistent/sock"]) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("virtnode: ")


@pytest.mark.parametrize("argv", [[], ["bogus"], ["serve", "--no-such-flag"], ["call"]])
def test_argument_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == EXIT_USAGE
    assert "usage: virtnode" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"virtnode {__version__}"


@pytest.mark.parametrize(
    ("file_text", "args", "key"),
    [
        ("[server]\nlisten = [\"tcp://0.0.0.0:8765\"]\n", (), "server.listen"),
        ("[hypervisor]\nreconnect_min = 60.0\n", (), "hypervisor.reconnect_min"),
        ("[loggin]\nlevel = \"debug\"\n", (), "loggin"),
        ("[log]\nlevel = \"debug\"\n", ("--set", "log.colour=red"), "log.colour"),
        ("", ("--listen", "tls://127.0.0.1:8765"), "tls.cert_file"),
        ("", ("--state-dir", "/x", "--set", "nonsense"), "nonsense"),
    ],
)
def test_bad_config_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
    file_text: str, args: tuple[str, ...], key: str,
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(file_text)
    assert main(["serve", "--config", str(path), "--print-config", *args]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.err.startswith("virtnode: configuration error: ")
    assert key in captured.err
    assert captured.out == ""
