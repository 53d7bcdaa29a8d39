"""Names from the bucket reach logs and ``dgfs status`` escaped (``dgfs.printable``).

A key name holding a newline would forge a log line, one holding an escape
sequence would drive the operator's terminal, a bidirectional override
would make it read as another name.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dgfs import format as fmt
from dgfs.cli.main import main as dgfs_main
from dgfs.cli.status import render
from dgfs.printable import PrintableFormatter, printable
from tests.conftest import DgfsMount
from testsupport.servers import s3_client

HOSTILE = "evil\x1b[2J\x1b[31mname\u202etxt.exe\r\nFAKE dgfs.fs: all good\x07"
RAW = ("\x1b", "\r", "\n", "\u202e", "\x07")


def test_control_characters_are_escaped_and_the_rest_left_alone() -> None:
    assert printable(HOSTILE) == (
        "evil\\x1b[2J\\x1b[31mname\\u202etxt.exe\\x0d\\x0aFAKE dgfs.fs: all good\\x07"
    )
    assert printable("tab\there\x7f\x85\u2028\udcff") == "tab\\x09here\\x7f\\x85\\u2028\\udcff"
    for kept in ("app-1.0.zip", "ünïcödé 日本語 файл", "a\\b", ""):
        assert printable(kept) == kept


def test_a_log_line_stays_one_line_and_its_traceback_follows() -> None:
    formatter = PrintableFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord(
        "dgfs.x", logging.ERROR, __file__, 1, "cannot read %s", (HOSTILE,), None
    )
    line = formatter.format(record)
    assert "\n" not in line and not any(c in line for c in RAW)
    assert line.startswith("ERROR dgfs.x: cannot read evil\\x1b[2J")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "dgfs.x", logging.ERROR, __file__, 1, "failed: %s", (HOSTILE,), sys.exc_info()
        )
    first, *rest = formatter.format(record).split("\n")
    assert first.startswith("ERROR dgfs.x: failed: evil\\x1b")
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: boom"


def _document(path: str, key: str, error: str) -> dict[str, Any]:
    histogram = {"count": 0, "sum": 0.0, "buckets": [["+Inf", 0]]}
    return {
        "mount": {
            "mountpoint": "/mnt/r",
            "bucket": "b",
            "prefix": "",
            "endpoint": "http://127.0.0.1:9000",
            "deltas": "dg",
            "read_only": False,
            "pid": 1,
            "uptime_seconds": 1.0,
            "metrics": None,
        },
        "uploads": {
            "pending": 0,
            "in_flight": 0,
            "failed": 1,
            "open_unsaved": 0,
            "uploaded": 0,
            "uploaded_by_kind": {},
            "retries": 0,
            "retrying_files": [{"path": path, "key": key, "error": error, "failures": 2}],
            "failed_files": [
                {"path": path, "key": key, "error": error, "errno": "EIO", "kept_in": "/j/x.data"}
            ],
            "seconds": histogram,
        },
        "bytes": {"written": 0, "uploaded_original": 0, "uploaded_stored": 0, "ratio": None},
        "cache": {
            "directory": "/c",
            "size_bytes": 0,
            "budget_bytes": 1,
            "entries": 0,
            "hits": 0,
            "misses": 0,
            "hit_rate": None,
            "evictions": 0,
            "evicted_bytes": 0,
        },
        "s3": {"requests": {}, "requests_total": 0, "errors": {}, "retries": 0},
        "journal": {
            "directory": "/j",
            "slot": 0,
            "slots": 1,
            "slots_in_use": 1,
            "entries": 0,
            "failed_kept": 1,
            "commits": 0,
        },
        "rebuilds": {"count": 0, "seconds_total": 0.0, "seconds": histogram},
    }


def test_dgfs_status_shows_hostile_names_escaped() -> None:
    text = render(_document(f"/mnt/r/{HOSTILE}", HOSTILE, f"access denied to {HOSTILE}"))
    assert not any(c in text for c in RAW if c != "\n")
    failed = [line for line in text.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "evil\\x1b[2J\\x1b[31mname\\u202etxt.exe\\x0d\\x0aFAKE" in failed[0]
    assert not any(line.startswith("FAKE") for line in text.splitlines())


@pytest.mark.mount
def test_a_hostile_file_name_reaches_the_daemon_log_escaped(shared: DgfsMount) -> None:
    name = "evil\x1b[31mname\u202etxt.exe"
    (shared / name).write_text("hello\n")
    shared.settle(shared / name)
    log = Path(shared.log_path).read_text(errors="replace")
    assert "evil\\x1b[31mname\\u202etxt.exe" in log
    assert "\x1b" not in log and "\u202e" not in log


@pytest.mark.expected_log("SHA-256 mismatch|do not match their recorded SHA-256")
def test_operator_commands_show_hostile_keys_escaped(
    moto_endpoint: str, bucket_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dgfs verify`` and ``dgfs gc`` name keys whoever writes the bucket
    chose: each one's line stays one line and drives no terminal. (moto
    refuses a newline in a key: a carriage return forges the line here.)"""
    hostile = "evil\x1b[2J\x1b[31mname\u202etxt.exe\rFAKE verify: all good\x07"
    client = s3_client(moto_endpoint)
    body = b"not what the metadata says\n"
    meta = fmt.direct_metadata(
        original_name="x", file_sha256="0" * 64, file_size=len(body), now=datetime.now(UTC)
    )
    client.put_object(Bucket=bucket_name, Key=f"d/{hostile}.bin", Body=body, Metadata=meta)
    ref_meta = fmt.reference_metadata("x", "1" * 64, datetime.now(UTC))
    client.put_object(
        Bucket=bucket_name, Key=f"{hostile}/reference.bin", Body=b"r", Metadata=ref_meta
    )
    client.close()
    common = ["--endpoint-url", moto_endpoint]
    assert dgfs_main(["verify", "--all", f"s3://{bucket_name}", *common]) == 1
    assert dgfs_main(["gc", f"s3://{bucket_name}", "--settle", "0", *common]) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert not any(c in text for c in RAW if c != "\n")
    named = [line for line in text.splitlines() if "evil" in line]
    assert any("FAILED" in line for line in named), text  # verify's
    assert any("orphaned-reference" in line for line in named), text  # gc's
    assert all("\\x1b[2J" in line and "\\u202etxt.exe\\x0dFAKE" in line for line in named)
    assert not any(line.startswith("FAKE") for line in text.splitlines())
