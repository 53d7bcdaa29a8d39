"""The operator commands as a user meets them: help, errors, exit codes, output, progress."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trio

from dgfs.cli.main import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from dgfs.cli.main import main as dgfs_main
from dgfs.cli.runner import run_trio
from dgfs.errors import AccessDenied, NoSuchBucket
from dgfs.progress import Progress, human_bytes, human_duration
from dgfs.runtime import S3Location, Settings, open_core
from testsupport.releases import ReleaseSeries
from testsupport.servers import REGION, free_port

COMMANDS = ("stats", "verify", "migrate", "gc")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples_exit_codes_and_connection_options(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        dgfs_main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "exit codes:" in text
    for option in ("--endpoint-url", "--region", "--profile"):
        assert option in text
    assert f"dgfs {command}" in text.split("examples:")[1]


def test_exit_code_constants_match_the_docs() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "CLI.md").read_text()
    for code, meaning in (
        (EXIT_OK, "0"),
        (EXIT_FAILURE, "1"),
        (EXIT_USAGE, "2"),
        (EXIT_INTERRUPTED, "130"),
    ):
        assert str(code) == meaning and f"| {meaning} " in doc
    for command in COMMANDS:
        assert f"## dgfs {command}" in doc


@pytest.mark.parametrize(
    "argv",
    [
        ["stats", "{bucket}"],
        ["verify", "--all", "s3://{bucket}"],
        ["gc", "s3://{bucket}"],
        ["migrate", "--dry-run", "s3://{bucket}/", "s3://{other}/"],
        ["migrate", "--dry-run", "s3://{other}/", "s3://{bucket}/"],
    ],
)
def test_no_such_bucket_is_one_line_and_exit_2(
    argv: list[str],
    moto_endpoint: str,
    bucket_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [a.format(bucket="no-such-bucket-here", other=bucket_name) for a in argv]
    code = dgfs_main([*args, "--endpoint-url", moto_endpoint, *cache_option(args, tmp_path)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "no-such-bucket-here" in err and "does not exist" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def cache_option(args: list[str], tmp_path: Path) -> list[str]:
    return ["--cache-dir", str(tmp_path / "c")] if args[0] in ("verify", "migrate") else []


def test_unreachable_endpoint_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    assert dgfs_main(["stats", "releases", "--endpoint-url", endpoint]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "cannot reach" in err and endpoint in err and "Traceback" not in err


class Refusing(BaseHTTPRequestHandler):
    """An S3 endpoint that refuses every request with AccessDenied."""

    BODY = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
        b"<Message>Access Denied</Message></Error>"
    )

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _deny(self) -> None:
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        body = b"" if self.command == "HEAD" else self.BODY
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _deny  # noqa: N815


@pytest.fixture
def refusing_endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("command", [["stats", "releases"], ["gc", "s3://releases"]])
def test_access_denied_is_a_clear_error(
    command: list[str], refusing_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert dgfs_main([*command, "--endpoint-url", refusing_endpoint]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "denied" in err.lower() and "Traceback" not in err


def test_bad_locations_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert dgfs_main(["migrate", "old-bucket", "s3://new/"]) == EXIT_USAGE
    assert "s3:// URL" in capsys.readouterr().err
    assert dgfs_main(["stats", "s3://"]) == EXIT_USAGE
    assert dgfs_main(["gc", "b", "--tmp-max-age", "soon"]) == EXIT_USAGE


@pytest.mark.parametrize(
    "command",
    [
        ["verify", "--all", "s3://releases"],
        ["migrate", "--yes", "s3://old/", "s3://releases/"],
        ["migrate", "--yes", "--deltas", "deep", "s3://releases/", "s3://releases/"],  # in place
    ],
)
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0/3", "K must be between 1 and N (the 3 workers are 1/3 ... 3/3)"),
        ("3/2", "K must be between 1 and N (the 2 workers are 1/2 ... 2/2)"),
        ("1/0", "N (the number of workers) must be at least 1"),
        ("x/y", "give K/N"),
    ],
)
def test_bad_shard_is_a_usage_error(
    command: list[str], value: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Refused before any request: no endpoint is needed to get the message.
    assert dgfs_main([*command, "--shard", value]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"dgfs {command[0]}: bad --shard ") and reason in err
    assert value in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_stats_command_text_and_json(
    moto_endpoint: str, bucket_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fill() -> int:
        settings = Settings(endpoint_url=moto_endpoint, region=REGION, cache_dir=tmp_path / "c")
        total = 0
        async with open_core(S3Location(bucket_name), settings) as core:
            for name, data in ReleaseSeries(size=256 << 10, seed=2).zips(3):
                (tmp_path / name).write_bytes(data)
                await core.put(tmp_path / name, f"app/{name}")
                total += len(data)
            await core.store.put_bytes("old/reference.bin", b"x" * 10, {"dg-file-sha256": "0"})
        return total

    total = trio.run(fill)
    common = ["--endpoint-url", moto_endpoint]
    assert dgfs_main(["stats", bucket_name, "--detailed", "--json", *common]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["original_bytes"] == total and data["delta_count"] == 3
    assert [o["key"] for o in data["orphans"]] == ["old/reference.bin"]

    assert dgfs_main(["stats", f"s3://{bucket_name}", "--detailed", "--by-prefix", *common]) == 0
    out = capsys.readouterr().out
    assert "cached result" in out  # the JSON run wrote the cache
    assert "app/" in out and "old/" in out and "orphaned reference" in out
    assert f"dgfs gc --yes s3://{bucket_name} --endpoint-url {moto_endpoint}" in out


def test_runner_unwraps_exception_groups() -> None:
    async def fails(exc: BaseException) -> None:
        async with trio.open_nursery() as nursery:

            async def boom() -> None:
                raise exc

            nursery.start_soon(boom)

    with pytest.raises(NoSuchBucket):
        run_trio(fails, NoSuchBucket("gone"))
    with pytest.raises(AccessDenied):
        run_trio(fails, AccessDenied("no"))
    with pytest.raises(ExceptionGroup):
        run_trio(fails, ValueError("a bug stays a bug"))


def test_progress_is_silent_off_a_terminal_and_draws_on_one() -> None:
    quiet = io.StringIO()
    with Progress("migrate", 2, 2048, stream=quiet) as progress:
        progress.advance(1, 1024)
        progress.advance(1, 1024)
    assert quiet.getvalue() == ""

    drawn = io.StringIO()
    with Progress("migrate", 4, 4096, stream=drawn, enabled=True, min_interval=0) as progress:
        progress.advance(1, 1024)
        progress.note("FAILED x.zip: boom")
        progress.advance(3, 3072)
    text = drawn.getvalue()
    assert "FAILED x.zip: boom\n" in text
    assert "4/4 files" in text and "4.00 KiB/4.00 KiB" in text and "files/s" in text
    assert text.endswith("\n")


def test_human_units() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1536) == "1.50 KiB"
    assert human_bytes(8 << 20) == "8.00 MiB"
    assert human_duration(75.2) == "1:15"
    assert human_duration(3725) == "1:02:05"


def test_mount_option_deltas_is_checked() -> None:
    """``-o deltas=`` (also from fstab) takes dg or deep and says so otherwise."""
    from dgfs.cli.mount import build_config
    from dgfs.errors import ConfigError
    from dgfs.format import DeltaMode

    config, _, _ = build_config("bucket", "/mnt/x", ["deltas=deep"])
    assert config.settings.deltas is DeltaMode.DEEP  # type: ignore[attr-defined]
    config, _, _ = build_config("bucket", "/mnt/x", [])
    assert config.settings.deltas is DeltaMode.DG  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="'dg' or 'deep'"):
        build_config("bucket", "/mnt/x", ["deltas=fast"])


def test_mount_option_s3_timeout_is_checked() -> None:
    """``-o s3_timeout=`` sets the store's read timeout; it must be a positive number."""
    from dgfs.cli.mount import build_config
    from dgfs.errors import ConfigError
    from dgfs.store.s3 import READ_TIMEOUT

    config, _, _ = build_config("bucket", "/mnt/x", ["s3_timeout=2.5"])
    assert config.settings.s3_timeout == 2.5  # type: ignore[attr-defined]
    config, _, _ = build_config("bucket", "/mnt/x", [])
    assert config.settings.s3_timeout == READ_TIMEOUT  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="more than 0"):
        build_config("bucket", "/mnt/x", ["s3_timeout=0"])
    with pytest.raises(ConfigError, match="needs a number"):
        build_config("bucket", "/mnt/x", ["s3_timeout=soon"])


def test_mount_option_xdelta_level_is_checked() -> None:
    from dgfs.cli.mount import build_config
    from dgfs.errors import ConfigError

    config, _, _ = build_config("bucket", "/mnt/x", ["xdelta_level=6"])
    assert config.settings.xdelta_level == 6  # type: ignore[attr-defined]
    assert build_config("bucket", "/mnt/x", [])[0].settings.xdelta_level == 9  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="1 to 9"):
        build_config("bucket", "/mnt/x", ["xdelta_level=0"])
