"""Directory indexes are bucket content: parsed under limits, never trusted.

A hostile or garbled index (``dgfs.fs.dirindex``) is refused with
``ValueError`` before it costs much memory or time, whatever its bytes;
the listing then HEADs the directory's objects, with one log line.
"""

from __future__ import annotations

import json
import logging
import tracemalloc
from datetime import UTC, datetime, timedelta

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgfs.fs import dirindex
from tests.test_namespace import CountingStore, fill, namespace

HEAD = b'{"format": "dgfs-dir-index-1", "prefix": "rel/", "objects": {}, "x": '


def zstd(text: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=19).compress(text)


def decode_measured(body: bytes) -> tuple[BaseException | dirindex.Rows, int]:
    """What ``decode`` gives for ``body`` (its rows or what it raised), and the
    most memory it held at once."""
    tracemalloc.start()
    try:
        result: BaseException | dirindex.Rows = dirindex.decode("rel/", body)
    except Exception as exc:  # noqa: BLE001 - the test looks at what it was
        result = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result, peak


def test_a_deeply_nested_index_is_refused_not_raised() -> None:
    """Finding: a 108-byte index of nested JSON raised RecursionError out of the
    listing, so that directory gave EIO on every mount."""
    body = zstd(HEAD + b"[" * 100_000)
    assert len(body) < 120
    result, _ = decode_measured(body)
    assert isinstance(result, ValueError), repr(result)
    assert "nested too deeply" in str(result)


def test_an_index_that_expands_past_its_limit_is_refused_before_parsing() -> None:
    body = zstd(HEAD + b"1" + b" " * (dirindex.MAX_TEXT + 1) + b"}")
    assert len(body) < 10_000
    result, peak = decode_measured(body)
    assert isinstance(result, ValueError), repr(result)
    assert f"more than {dirindex.MAX_TEXT} bytes of JSON" in str(result)
    assert peak < dirindex.MAX_TEXT + (8 << 20)  # never more than the cap decompressed


def test_an_index_that_would_build_millions_of_objects_is_refused_before_parsing() -> None:
    """Finding: a 45 KB index cost ~1.8 GB per listing. Three bytes of JSON
    (``[],``) make a list of 64 bytes: a million of them are refused unparsed."""
    body = zstd(HEAD + b"[" + b",".join([b"[]"] * 1_000_000) + b"]}")
    result, peak = decode_measured(body)
    assert isinstance(result, ValueError), repr(result)
    assert "(containers)" in str(result)
    assert peak < 16 << 20
    body = zstd(HEAD + b"[" + b",".join([b'"a"'] * 4_000_000) + b"]}")
    result, peak = decode_measured(body)
    assert isinstance(result, ValueError) and "(strings)" in str(result), repr(result)
    assert peak < 32 << 20


def test_an_index_of_millions_of_numbers_is_refused_before_parsing() -> None:
    """Finding: a 2.8 KB index holding one array of 8 million numbers passed
    the quote and bracket counts and was parsed whole (~339 MB, more than the
    bound documented above). Commas and colons bound the numbers too."""
    count = (dirindex.MAX_TEXT - 16) // 4
    body = zstd(b"[" + b"1e1," * (count - 1) + b"1e1]")
    assert len(body) < 4096
    result, peak = decode_measured(body)
    assert isinstance(result, ValueError) and "(values)" in str(result), repr(result)
    # The text decompressed (its chunks, then joined), nothing parsed: ~339 MB before.
    assert peak < 2 * dirindex.MAX_TEXT + (8 << 20)


def test_a_real_index_of_max_entries_objects_is_read() -> None:
    """The bounds refuse no real index: MAX_ENTRIES deltas with DeltaGlider's
    metadata, POSIX attributes and an S3 client's own, commas and colons in
    their values (a name, a time)."""
    meta = {
        "dg-file-sha256": "ab" * 32,
        "dg-file-size": "123456",
        "dg-ref-key": "rel/reference.bin",
        "dg-ref-sha256": "cd" * 32,
        "dg-original-name": "release 1.2, final.zip",
        "dg-created-at": "2024-01-01T12:34:56Z",
        "dg-delta-size": "1234",
        "dg-tool": "deltaglider/6.2.0",
        "mtime": "1700000000.123456789",
        "mode": "33188",
        "uid": "1000",
        "gid": "1000",
        "user-owner": "team:builds,nightly",
    }
    version = "e" * 32 + "@1700000000"
    rows = {f"rel/f-{i:06d}.zip.delta": (version, meta) for i in range(dirindex.MAX_ENTRIES)}
    assert len(dirindex.decode("rel/", dirindex.encode("rel/", rows))) == dirindex.MAX_ENTRIES


def test_an_index_larger_than_its_limit_is_refused_unread() -> None:
    result, _ = decode_measured(b"\0" * (dirindex.MAX_BYTES + 1))
    assert isinstance(result, ValueError) and f"larger than {dirindex.MAX_BYTES}" in str(result)


def test_an_index_of_too_many_objects_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dirindex, "MAX_ENTRIES", 10, raising=False)
    rows = {f"rel/f{i}": ("v@1", {"dg-file-size": "1"}) for i in range(11)}
    with pytest.raises(ValueError, match="more than 10 objects"):
        dirindex.decode("rel/", dirindex.encode("rel/", rows))
    del rows["rel/f0"]
    assert dirindex.decode("rel/", dirindex.encode("rel/", rows)) == rows


def test_rows_of_the_wrong_shape_are_left_out() -> None:
    good = ("v@1", {"dg-file-size": "5"})
    objects = {
        "rel/good": list(good),
        "rel/number": ["v@1", {"dg-file-size": 5}],
        "rel/list-meta": ["v@1", [["dg-file-size", "5"]]],
        "rel/version": [1, {"dg-file-size": "5"}],
        "rel/three": ["v@1", {}, {}],
        "rel/sub/deeper": list(good),
        "other/dir": list(good),
        "rel/many-keys": ["v@1", {f"k{i}": "" for i in range(dirindex.MAX_META_ITEMS + 1)}],
        "rel/long-value": ["v@1", {"dg-note": "x" * (dirindex.MAX_META_VALUE + 1)}],
    }
    doc = {"format": dirindex.FORMAT, "prefix": "rel/", "objects": objects}
    assert dirindex.decode("rel/", zstd(json.dumps(doc).encode())) == {"rel/good": good}


async def test_no_index_is_written_that_readers_would_refuse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dirindex, "MAX_ENTRIES", 20)
    store = CountingStore()
    await fill(store, 20)  # and notes.txt: 21 objects
    ns = namespace(store, None)
    await ns.listing("rel")
    await ns.flush_attr_cache()
    assert dirindex.index_key("rel/") not in store.objects


@pytest.mark.expected_log(r"directory index not used \(not a directory index: nested too deeply\)")
async def test_a_hostile_index_costs_heads_and_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = CountingStore()
    await fill(store, 20)
    await store.put_bytes(dirindex.index_key("rel/"), zstd(HEAD + b"[" * 100_000), {})
    entries = await namespace(store, None).listing("rel")
    assert entries["app-7.zip"].size == 5007
    assert store.heads == 22  # 20 deltas, notes.txt and the sub/ marker
    lines = [r for r in caplog.get_records("call") if r.levelno >= logging.WARNING]
    assert len(lines) == 1


# --- fuzzing: whatever the bytes, rows or ValueError ---------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=40,
)


def _decodes_or_refuses(body: bytes) -> None:
    try:
        rows = dirindex.decode("rel/", body)
    except ValueError:
        return
    for key, (version, meta) in rows.items():
        assert key.startswith("rel/") and "/" not in key[4:]
        assert isinstance(version, str)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_any_bytes(body: bytes) -> None:
    _decodes_or_refuses(body)
    _decodes_or_refuses(zstd(body))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_json, st.integers(min_value=0, max_value=3000))
def test_fuzz_json_documents(objects: object, depth: int) -> None:
    doc = {"format": dirindex.FORMAT, "prefix": "rel/", "objects": objects}
    text = json.dumps(doc)
    _decodes_or_refuses(zstd(text.encode()))
    # The same, buried ``depth`` arrays deep.
    _decodes_or_refuses(zstd(("[" * depth + text + "]" * depth).encode()))


def test_a_row_is_settled_only_once_read_after_its_second_and_the_margin() -> None:
    """``settled``: read more than SETTLE_MARGIN seconds after the second of
    the version's Last-Modified (both by the store's clock); unknown: never."""
    written = datetime(2026, 12, 6, 12, 0, 0, 900_000, tzinfo=UTC)
    margin = dirindex.SETTLE_MARGIN
    assert not dirindex.settled(written, None)
    assert not dirindex.settled(written, written + timedelta(milliseconds=50))  # same second
    assert not dirindex.settled(written, written.replace(microsecond=0) + timedelta(seconds=margin))
    assert dirindex.settled(written, written.replace(microsecond=0) + timedelta(seconds=margin + 1))
