"""Untrusted bytes are expanded and decoded under limits (issue 17).

Deep mode's expansion of a file being written; xdelta3's output, zstd
references and expanded forms read from the bucket; the time and the
environment of child processes. docs/SECURITY.md ("Archives and deltas
are expanded and decoded under limits") describes each limit. New names
are imported inside the tests, so that each one fails on its own without
its limit.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import shutil
import stat
import subprocess
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from dgfs import children
from dgfs import format as fmt
from dgfs.deep import expand, gnuzip, objects
from dgfs.delta import DeltaEngine, OutputCap
from dgfs.errors import DgfsError, FsError, IntegrityError
from dgfs.format import Kind
from dgfs.store.memory import MemoryStore
from tests.coreharness import deep_core
from tests.fsharness import lookup, mounted, read_file, write_file
from testsupport import bombs
from testsupport.releases import write_sdist

MiB = 1 << 20

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _fresh_memos() -> None:
    expand.VERIFIED_SPANS.clear()
    expand.REBUILT_SUBTREES.clear()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    path = tmp_path / "scratch"
    path.mkdir()
    return path


def scratch_files(directory: Path) -> list[str]:
    """What an expansion or rebuild may leave behind in ``directory`` (nothing, after it)."""
    return sorted(p.name for p in directory.iterdir() if p.suffix in {".nested", ".gnu", ".dgx"})


# --- expanding a file (writing) ---------------------------------------------------------


def test_a_353_byte_zip_stops_expanding_at_its_allowance(tmp_path: Path, scratch: Path) -> None:
    """It expanded to 134 MB in 0.5 s; now to at most 1 MiB (the floor of the allowance)."""
    from dgfs.errors import ExpansionLimit

    bomb = write(tmp_path / "bomb.zip", bombs.nested_gzip_zip())
    assert bomb.stat().st_size < 400
    out = tmp_path / "out.dgx"
    started = time.monotonic()
    with pytest.raises(ExpansionLimit, match=r"would pass 1048576 bytes \(expand_ratio=100"):
        expand.expand_file(bomb, out, scratch_dir=scratch)
    assert time.monotonic() - started < 5
    assert out.stat().st_size == 0
    assert scratch_files(scratch) == []


def test_scratch_holds_no_more_than_the_allowance(tmp_path: Path, scratch: Path) -> None:
    """The expanded form and the spools of nested archives count together."""
    from dgfs.errors import ExpansionLimit

    data = bombs.nested_gzip_zip(16 * MiB)  # zip > gzip > gzip > 16 MiB of zeros
    src = write(tmp_path / "nested.zip", data)
    roomy = expand.ExpansionLimits(ratio=1e6)
    stats = expand.expand_file(src, tmp_path / "out", scratch_dir=scratch, limits=roomy)
    assert stats.expanded_size > 16 * MiB
    # The inner gzip's spool was on disk while its zeros were written out.
    assert stats.peak_scratch > stats.expanded_size
    assert stats.peak_scratch <= roomy.allowance(len(data))
    tight = expand.ExpansionLimits(ratio=1e6, max_bytes=stats.peak_scratch - 1)
    with pytest.raises(ExpansionLimit, match="expand_max"):
        expand.expand_file(src, tmp_path / "out", scratch_dir=scratch, limits=tight)
    assert scratch_files(scratch) == []


def test_a_stream_nobody_reproduces_is_inflated_no_further_than_the_allowance(
    tmp_path: Path,
) -> None:
    """Bytes that are never written (no settings reproduce the stream) still cost CPU."""
    from dgfs.errors import ExpansionLimit

    odd = zlib.compressobj(9, zlib.DEFLATED, -15, 1)  # memLevel 1: no candidate makes it
    body = odd.compress(bytes(64 * MiB)) + odd.flush()
    member = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + body + b"\x00" * 8
    src = write(tmp_path / "odd.gz", member)
    with pytest.raises(ExpansionLimit, match="a stream in it inflates to more than"):
        expand.expand_file(src, tmp_path / "out", scratch_dir=tmp_path)


def test_member_count_limit(tmp_path: Path) -> None:
    from dgfs.errors import ExpansionLimit

    entries = [
        (f"m{i}.txt".encode(), 0, 0, b"stored %d" % i, b"", b"stored %d" % i) for i in range(50)
    ]
    from tests.test_expand import hand_zip

    src = write(tmp_path / "many.zip", hand_zip(entries))
    expand.expand_file(src, tmp_path / "out", scratch_dir=tmp_path)  # the default: fine
    with pytest.raises(ExpansionLimit, match=r"more than 10 zip entries.*expand_members"):
        expand.expand_file(
            src, tmp_path / "out", scratch_dir=tmp_path, limits=expand.ExpansionLimits(members=10)
        )


def test_time_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dgfs.errors import ExpansionLimit

    src = write(tmp_path / "x.tar.gz", write_sdist(tmp_path, 1).read_bytes())
    clock = iter(range(0, 10**6, 5))  # every look at the clock: 5 s later
    monkeypatch.setattr("dgfs.deep.limits.time.monotonic", lambda: float(next(clock)))
    with pytest.raises(ExpansionLimit, match=r"took over 12 s \(expand_time\)"):
        expand.expand_file(
            src, tmp_path / "out", scratch_dir=tmp_path, limits=expand.ExpansionLimits(seconds=12)
        )


def test_a_file_larger_than_expand_max_is_not_expanded(tmp_path: Path) -> None:
    from dgfs.errors import ExpansionLimit

    src = write(tmp_path / "big.gz", random.Random(1).randbytes(3 * MiB))
    limits = expand.ExpansionLimits(max_bytes=2 * MiB)
    with pytest.raises(ExpansionLimit, match="more than expand_max=2097152"):
        expand.expand_file(src, tmp_path / "out", scratch_dir=tmp_path, limits=limits)


@pytest.mark.expected_log(r"app/bomb\.zip: .*; stored without expanding it")
async def test_deep_put_of_a_bomb_is_stored_unexpanded_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    core, cache = deep_core(store, tmp_path)
    try:
        await core.put(write_sdist(tmp_path, 1), "app/pkg-1.tar.gz")
        bomb = write(tmp_path / "bomb.zip", bombs.nested_gzip_zip(filler=100_000))
        result = await core.put(bomb, "app/bomb.zip")
        assert result.stored.kind in (Kind.DELTA, Kind.DIRECT)
        if result.stored.kind is Kind.DELTA:
            stored = store.objects["app/bomb.zip.delta"]
            # The form that expands nothing: the file's own bytes, in RAW segments.
            assert int(stored.metadata[fmt.META_EXPANDED_SIZE]) < 2 * bomb.stat().st_size
        out = tmp_path / "back"
        await core.get("app/bomb.zip", out)
        assert out.read_bytes() == bomb.read_bytes()
        assert scratch_files(core.scratch_dir) == []
    finally:
        await core.aclose()
        cache.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


async def deep_reference_object(store: MemoryStore, prefix: str, content: bytes, tmp: Path) -> str:
    """Seed ``prefix/reference.deep`` made from ``content``, as any bucket writer can;
    returns its SHA-256 (of the expanded form)."""
    expanded = tmp / "ref.dgx"
    expand.plain_form(write(tmp / "ref.src", content), expanded)
    body = tmp / "ref.zst"
    objects.compress_reference(expanded, body)
    meta = fmt.deep_reference_metadata(
        "first.zip", sha(expanded.read_bytes()), expanded.stat().st_size, datetime.now(UTC)
    )
    await store.put_bytes(f"{prefix}/reference.deep", body.read_bytes(), meta)
    return sha(expanded.read_bytes())


@pytest.mark.expected_log(r"stored without expanding it")
async def test_a_bomb_copied_into_a_directory_a_bucket_writer_made_deep(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The mount writes DeltaGlider deltas, but ``d/reference.deep`` makes ``d`` deep;
    the bomb is stored (durable, nothing left in the journal), with one warning."""
    store = MemoryStore()
    await deep_reference_object(store, "d", random.Random(2).randbytes(200_000), tmp_path)
    await store.put_bytes("d/", b"", {})
    bomb = bombs.nested_gzip_zip(filler=100_000)  # over min_delta_size
    async with mounted(store, tmp_path) as m:
        d = (await lookup(m.fs, "d")).ino
        await write_file(m.fs, "bomb.zip", bomb, d)
        await m.fs.wait_idle()
        assert await read_file(m.fs, "bomb.zip", d) == bomb
    stored = store.objects.get("d/bomb.zip.delta") or store.objects["d/bomb.zip"]
    if "d/bomb.zip.delta" in store.objects:
        assert int(stored.metadata[fmt.META_EXPANDED_SIZE]) < 2 * len(bomb)
    assert not list((tmp_path / "journal").rglob("*.data"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings


# --- decoding objects from the bucket (reading) ------------------------------------------


@pytest.fixture(params=["prlimit", "preexec_fn"])
def size_cap_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The two ways a child's output is capped: util-linux's prlimit, or
    (where it is not installed) a preexec_fn."""
    if request.param == "prlimit":
        assert children.resolve("prlimit"), "util-linux's prlimit (Debian: essential)"
        assert children.size_capped(["x"], 1)[1] is None  # no preexec_fn: prlimit it is
    else:
        monkeypatch.setattr(children, "_prlimit", lambda: None)
        assert children.size_capped(["x"], 1)[0] == ["x"]
    return str(request.param)


async def test_a_vcdiff_bomb_is_stopped_at_the_size_it_must_have(
    tmp_path: Path, size_cap_by: str
) -> None:
    """261 bytes of VCDIFF decode to 256 MiB: xdelta3 writes no byte past ``max_size``."""
    from dgfs.errors import DecodeLimit

    delta = write(tmp_path / "bomb.vcdiff", bombs.vcdiff_run(256 * MiB))
    assert len(delta.read_bytes()) < 300
    source = write(tmp_path / "ref", b"r" * 1000)
    out = write(tmp_path / "out", b"stale")
    started = time.monotonic()
    with pytest.raises(DecodeLimit, match=r"stopped at 1000 bytes of output.*dg-file-size"):
        await DeltaEngine().decode(source, delta, out, cap=OutputCap(1000))
    assert time.monotonic() - started < 5
    assert not out.exists()
    # Exactly the size it must have is fine.
    small = write(tmp_path / "small.vcdiff", bombs.vcdiff_run(1000))
    await DeltaEngine().decode(source, small, out, cap=OutputCap(1000))
    assert out.read_bytes() == bytes(1000)


@pytest.mark.skipif(shutil.which("gzip") is None, reason="needs gzip(1)")
async def test_a_stock_gzip_delta_past_its_size_is_stopped_as_a_limit(
    tmp_path: Path, size_cap_by: str
) -> None:
    """A stock delta of gzip input: xdelta3 pipes its output through gzip(1),
    which hits the cap (killed by SIGXFSZ under prlimit, EFBIG otherwise):
    a limit reached, not a broken object (which the reader would then try
    to recover from, a search of ~30 s)."""
    from dgfs.errors import DecodeLimit

    content = os.urandom(1 << 16) * 4
    for name, data in (("a", content), ("b", content + b"more")):
        write(tmp_path / name, data)
        subprocess.run(["gzip", "-kn", str(tmp_path / name)], check=True)
    delta = tmp_path / "stock.delta"
    subprocess.run(
        ["xdelta3", "-e", "-f", "-s", tmp_path / "a.gz", tmp_path / "b.gz", delta], check=True
    )
    with pytest.raises(DecodeLimit, match="stopped at 1000 bytes"):
        await DeltaEngine().decode(tmp_path / "a.gz", delta, tmp_path / "out", cap=OutputCap(1000))
    assert not (tmp_path / "out").exists()


async def test_a_prlimit_that_cannot_set_the_limit_is_a_setup_error(tmp_path: Path) -> None:
    """prlimit refused (a seccomp filter): this machine's problem, said so,
    not an object that "cannot be decoded"."""
    from dgfs.errors import XdeltaMissing

    fake = script(
        tmp_path / "prlimit",
        'echo "prlimit: failed to set the FSIZE resource limit: Operation not permitted"'
        " >&2\nexit 1\n",
    )
    children._prlimit.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(children, "_prlimit", lambda: str(fake))
            with pytest.raises(XdeltaMissing, match="under prlimit.*Operation not permitted"):
                await DeltaEngine().decode(
                    write(tmp_path / "ref", b"r"),
                    write(tmp_path / "d", b"d"),
                    tmp_path / "o",
                    cap=OutputCap(10),
                )
    finally:
        children._prlimit.cache_clear()


async def seed_dg_delta(store: MemoryStore, key: str, body: bytes, size: int) -> None:
    """``key``'s delta (``body``) and a reference beside it, with ``dg-file-size`` ``size``."""
    prefix, name = fmt.split_key(key)
    ref = random.Random(3).randbytes(100_000)
    now = datetime.now(UTC)
    ref_key = f"{prefix}/reference.bin"
    await store.put_bytes(ref_key, ref, fmt.reference_metadata("first.zip", sha(ref), now))
    meta = fmt.delta_metadata(
        original_name=name,
        file_sha256="ab" * 32,
        file_size=size,
        ref_key=ref_key,
        ref_sha256=sha(ref),
        delta_size=len(body),
        now=now,
    )
    await store.put_bytes(f"{key}.delta", body, meta)


@pytest.mark.expected_log(r"cannot read")
async def test_a_hostile_delta_reads_eio_with_one_line_naming_the_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    await seed_dg_delta(store, "b/x.zip", bombs.vcdiff_run(256 * MiB), 1000)
    async with mounted(store, tmp_path) as m:
        b = (await lookup(m.fs, "b")).ino
        for _ in range(3):  # the kernel retries, a user runs cat again
            with pytest.raises(FsError) as exc:
                await read_file(m.fs, "x.zip", b)
            assert exc.value.errno == errno.EIO
        assert scratch_files(m.fs.core.scratch_dir) == []
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert "b/x.zip.delta" in lines[0] and "1000 bytes" in lines[0]
    assert "dg-file-size" in lines[0]


def test_a_zstd_reference_bomb_stops_at_its_cap(tmp_path: Path) -> None:
    """8 KB of zstd hold 256 MiB: refused by the frame's header, or where the bytes pass the cap."""
    from dgfs.errors import DecodeLimit

    out = tmp_path / "out"
    announced = write(tmp_path / "announced.zst", bombs.zstd_zeros(256 * MiB))
    assert announced.stat().st_size < 10_000
    with pytest.raises(DecodeLimit, match="its header announces 268435456"):
        objects.decompress_reference(announced, out, 1 * MiB)
    assert out.stat().st_size == 0
    silent = write(tmp_path / "silent.zst", bombs.zstd_zeros(256 * MiB, content_size=False))
    with pytest.raises(DecodeLimit, match="more than 1048576 bytes"):
        objects.decompress_reference(silent, out, 1 * MiB)
    assert out.stat().st_size <= 1 * MiB
    objects.decompress_reference(announced, out, 256 * MiB)  # within the cap: fine
    assert out.stat().st_size == 256 * MiB


def test_reference_cap() -> None:
    """What a reference records, within expand_max unless it is stored compressed
    less than expand_ratio times (the plain form of a large first file)."""
    limits = expand.ExpansionLimits(ratio=100, max_bytes=1 << 30)
    recorded = fmt.META_EXPANDED_SIZE
    assert objects.reference_cap({recorded: "1234"}, 100, limits) == 1234
    assert objects.reference_cap({recorded: str(1 << 40)}, 100, limits) == 1 << 30
    assert objects.reference_cap({recorded: str(5 << 30)}, 4 << 30, limits) == 5 << 30
    for junk in ("", "-1", "1e9", "0x10", "9" * 30):
        assert objects.reference_cap({recorded: junk}, 100, limits) == 1 << 30
    assert objects.reference_cap({}, 100, limits) == 1 << 30


@pytest.mark.parametrize("size", [0, 1, 1000, MiB - 1, MiB, MiB + 1, 3 * MiB + 5])
def test_plain_form_size(tmp_path: Path, size: int) -> None:
    form = tmp_path / "form"
    expand.plain_form(write(tmp_path / "src", bytes(size)), form)
    assert form.stat().st_size == expand.plain_form_size(size)


@pytest.mark.expected_log(r"more than expand_max=2097152; stored without expanding it")
async def test_files_larger_than_expand_max_in_a_deep_directory_read_back(tmp_path: Path) -> None:
    """Such a file is stored as its plain form, even as the directory's
    reference: readers with the same limits read it all back."""
    store = MemoryStore()
    base = random.Random(6).randbytes(3 * MiB)
    first = write(tmp_path / "a.bin", b"PK\x03\x04" + base)
    second = write(tmp_path / "b.bin", b"PK\x03\x04" + base[:MiB] + b"new" + base[MiB:])
    writer, wcache = deep_core(store, tmp_path / "w", max_bytes=2 * MiB)
    for path in (first, second):
        assert (await writer.put(path, f"big/{path.name}")).stored.deep
    await writer.aclose()
    wcache.close()
    assert int(store.objects["big/reference.deep"].metadata[fmt.META_EXPANDED_SIZE]) > 3 * MiB
    reader, rcache = deep_core(store, tmp_path / "r", max_bytes=2 * MiB)
    try:
        for path in (first, second):
            await reader.get(f"big/{path.name}", tmp_path / "out")
            assert (tmp_path / "out").read_bytes() == path.read_bytes()
    finally:
        await reader.aclose()
        rcache.close()


async def test_a_deep_reference_larger_than_it_says_is_refused(tmp_path: Path) -> None:
    store = MemoryStore()
    writer, wcache = deep_core(store, tmp_path / "w")
    paths = [write_sdist(tmp_path, v) for v in (1, 2)]
    for p in paths:
        await writer.put(p, f"app/{p.name}")
    await writer.aclose()
    wcache.close()
    ref = store.objects["app/reference.deep"]
    await store.put_bytes("app/reference.deep", bombs.zstd_zeros(256 * MiB), ref.metadata)
    reader, rcache = deep_core(store, tmp_path / "r")
    try:
        with pytest.raises(IntegrityError, match="dgfs-expanded-size"):
            await reader.get(f"app/{paths[1].name}", tmp_path / "out")
        assert scratch_files(reader.scratch_dir) == []
    finally:
        await reader.aclose()
        rcache.close()


async def test_verify_of_a_deep_reference_larger_than_it_says(tmp_path: Path) -> None:
    """``dgfs verify`` decompresses a reference under the same cap as a read."""
    from dgfs.verify import Status, Verifier

    store = MemoryStore()
    await deep_reference_object(store, "d", b"reference " * 1000, tmp_path)
    ref = store.objects["d/reference.deep"]
    await store.put_bytes("d/reference.deep", bombs.zstd_zeros(256 * MiB), ref.metadata)
    core, cache = deep_core(store, tmp_path / "core")
    try:
        result = await Verifier(core).verify_reference("d/reference.deep")
    finally:
        await core.aclose()
        cache.close()
    assert result.status is Status.FAILED
    assert "dgfs-expanded-size" in (result.message or "")
    assert scratch_files(core.scratch_dir) == []


def test_an_expanded_form_nesting_2000_deep_is_refused(tmp_path: Path) -> None:
    """It raised RecursionError, which nothing in dgfs expected."""
    from dgfs.errors import DecodeLimit

    form = write(tmp_path / "deep.dgx", bombs.nested_form(2000))
    with pytest.raises(DecodeLimit, match="nest deeper than 16"):
        expand.rebuild_digest(form, tmp_path)
    with pytest.raises(DecodeLimit, match="nest deeper than 16"):
        expand.rebuild_digest(form, tmp_path, workers=2)
    # As deep as dgfs writes (MAX_DEPTH + 1), and as the limit: fine.
    for levels in (expand.MAX_DEPTH + 1, expand.MAX_NESTING):
        write(form, bombs.nested_form(levels))
        expand.rebuild_digest(form, tmp_path)


async def test_a_deep_delta_nesting_2000_deep_reads_as_an_integrity_error(tmp_path: Path) -> None:
    store = MemoryStore()
    ref_sha = await deep_reference_object(store, "d", b"reference " * 1000, tmp_path)
    nested = write(tmp_path / "nested.dgx", bombs.nested_form(2000))
    plain_ref = tmp_path / "ref.dgx"
    vcdiff = tmp_path / "nested.vcdiff"
    await DeltaEngine().encode(plain_ref, nested, vcdiff)
    body = fmt.DEEP_DELTA_MAGIC + vcdiff.read_bytes()
    meta = fmt.deep_delta_metadata(
        original_name="x.zip",
        file_sha256="ab" * 32,
        file_size=100,
        ref_key="d/reference.deep",
        ref_sha256=ref_sha,
        delta_size=len(body),
        now=datetime.now(UTC),
    )
    await store.put_bytes("d/x.zip.delta", body, meta)
    core, cache = deep_core(store, tmp_path / "core")
    try:
        with pytest.raises(IntegrityError, match="nest deeper than 16"):
            await core.get("d/x.zip", tmp_path / "out")
    finally:
        await core.aclose()
        cache.close()


def test_rebuild_stops_at_the_files_size(tmp_path: Path) -> None:
    from dgfs.errors import DecodeLimit

    form = tmp_path / "form.dgx"
    expand.plain_form(write(tmp_path / "src", random.Random(4).randbytes(3 * MiB)), form)
    out = tmp_path / "out"
    with pytest.raises(DecodeLimit, match=r"more than 1048576 bytes \(its dg-file-size\)"):
        expand.rebuild_file(form, out, max_size=MiB)
    assert out.stat().st_size <= MiB
    assert expand.rebuild_file(form, out, max_size=3 * MiB)[1] == 3 * MiB


# --- child processes ------------------------------------------------------------------------


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    values = {
        "AWS_SECRET_ACCESS_KEY": "secret-from-the-environment",
        "AWS_SESSION_TOKEN": "token-from-the-environment",
        "DG_CACHE_ENCRYPTION_KEY": "cache-key-from-the-environment",
        "XDELTA": "-S djw",
        "GZIP": "-1",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    yield values


async def test_xdelta3_gets_a_minimal_environment(tmp_path: Path, secrets: dict[str, str]) -> None:
    dump = tmp_path / "env.txt"
    fake = script(tmp_path / "xdelta3", f'env > "{dump}"\nexit 1\n')
    source = write(tmp_path / "a", b"a" * 1000)
    with pytest.raises(DgfsError):
        await DeltaEngine(str(fake)).encode(source, source, tmp_path / "d")
    env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert not set(secrets) & set(env), env
    assert env.get("LC_ALL") == "C" and env.get("PATH")
    # Huge pages for its window and hash table (benchmarks/children_env.py).
    assert env.get("GLIBC_TUNABLES") == "glibc.malloc.hugetlb=1"


def test_zgz_gets_a_minimal_environment(
    tmp_path: Path, secrets: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dump = tmp_path / "env.txt"
    fake = script(tmp_path / "zgz", f'env > "{dump}"\nexit 1\n')
    monkeypatch.setenv(gnuzip.ZGZ_ENV, str(fake))
    gnuzip.zgz_path.cache_clear()
    try:
        assert not gnuzip.gnu_matches(6, write(tmp_path / "p", b"payload"), iter([b"x"]))
    finally:
        gnuzip.zgz_path.cache_clear()
    env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert not set(secrets) & set(env), env


async def test_xdelta3_runs_by_the_path_found_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A program named xdelta3 put on PATH later is never run."""
    engine = DeltaEngine()
    planted = tmp_path / "bin"
    planted.mkdir()
    script(planted / "xdelta3", f'touch "{tmp_path / "planted-ran"}"\nexit 1\n')
    monkeypatch.setenv("PATH", f"{planted}:{os.environ['PATH']}")
    source = write(tmp_path / "a", random.Random(5).randbytes(50_000))
    await engine.encode(source, source, tmp_path / "d")
    await engine.decode(source, tmp_path / "d", tmp_path / "out")
    assert not (tmp_path / "planted-ran").exists()
    assert engine.path is not None and os.path.isabs(engine.path)


def pids_running(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


async def test_a_hung_xdelta3_is_stopped_at_its_time_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dgfs.errors import DecodeLimit, DeltaEngineError

    monkeypatch.setattr("dgfs.children.BASE_SECONDS", 0.5)
    fake = script(tmp_path / "xdelta3", "while true; do sleep 0.1; done\n")
    marker = str(fake)
    source = write(tmp_path / "a", b"a" * 1000)
    engine = DeltaEngine(str(fake))
    started = trio.current_time()
    with pytest.raises(DecodeLimit, match="time limit"):
        await engine.decode(source, source, tmp_path / "out", cap=OutputCap(1000))
    with pytest.raises(DeltaEngineError, match="time limit"):
        await engine.encode(source, source, tmp_path / "d")
    assert trio.current_time() - started < 10
    assert pids_running(marker) == []
    assert not (tmp_path / "out").exists()


def test_a_hung_zgz_is_stopped_at_its_time_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dgfs.errors import DecodeLimit

    fake = script(tmp_path / "zgz", "while true; do sleep 0.1; done\n")
    marker = str(fake)
    monkeypatch.setenv(gnuzip.ZGZ_ENV, str(fake))
    gnuzip.zgz_path.cache_clear()
    payload = write(tmp_path / "p", b"payload")
    started = time.monotonic()
    try:
        with pytest.raises(DecodeLimit, match="time limit"):
            list(gnuzip.gnu_deflate(6, payload, timeout=0.5))
        # While expanding, a zgz that hangs is one more stream kept as it is.
        assert not gnuzip.gnu_matches(6, payload, iter([b"x"]), timeout=0.5)
    finally:
        gnuzip.zgz_path.cache_clear()
    assert time.monotonic() - started < 10
    assert pids_running(marker) == []


def test_a_hung_zgz_in_a_rebuild_gets_only_the_time_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zgz had its own time limit (120 s and more) whatever was left of the
    rebuild's ``expand_time``: it now gets no more than what is left, and
    the error names the rebuild's limit."""
    from dgfs.errors import DecodeLimit

    fake = script(tmp_path / "zgz", "while true; do sleep 0.1; done\n")
    monkeypatch.setenv(gnuzip.ZGZ_ENV, str(fake))
    gnuzip.zgz_path.cache_clear()
    form = write(tmp_path / "gnu.dgx", expand.MAGIC + b"\x03\x06\x01\x03abc\x00\x00")
    started = time.monotonic()
    try:
        with pytest.raises(DecodeLimit, match=r"took over 0\.5 s \(expand_time\)"):
            expand.rebuild_file(form, tmp_path / "out", tmp_path, seconds=0.5)
    finally:
        gnuzip.zgz_path.cache_clear()
    assert time.monotonic() - started < 10
    assert pids_running(str(fake)) == []


# --- options --------------------------------------------------------------------------------


def test_expand_options() -> None:
    from dgfs.cli.mount import build_config
    from dgfs.errors import ConfigError

    config, _, _ = build_config(
        "bucket",
        "/mnt/x",
        ["expand_ratio=250,expand_max=8G,expand_members=1000000,expand_time=1800"],
    )
    assert config.settings.expansion == expand.ExpansionLimits(  # type: ignore[attr-defined]
        ratio=250, max_bytes=8 << 30, members=1_000_000, seconds=1800
    )
    default, _, _ = build_config("bucket", "/mnt/x", [])
    assert default.settings.expansion == expand.ExpansionLimits()  # type: ignore[attr-defined]
    for bad in (
        "expand_ratio=1",
        "expand_ratio=inf",
        "expand_max=10K",
        "expand_members=0",
        "expand_time=0",
        "expand_time=nan",
    ):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            build_config("bucket", "/mnt/x", [bad])


def test_every_expand_option_is_documented() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs"
    configuration = (docs / "configuration.md").read_text()
    security = (docs / "SECURITY.md").read_text()
    for option in ("expand_ratio", "expand_max", "expand_members", "expand_time"):
        assert f"`{option}=" in configuration, option
        assert option in security, option


# --- the target of issue 17 -------------------------------------------------------------------


@pytest.mark.expected_log(r"bomb\.zip: .*stored without expanding it")
async def test_a_5_mb_zip_of_3_gib_is_stored_with_scratch_under_its_allowance(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    core, cache = deep_core(store, tmp_path)
    bomb = write(tmp_path / "bomb.zip", bombs.zeros_zip(3 << 30, filler=2 * MiB))
    assert 5 * 10**6 <= bomb.stat().st_size <= 6 * 10**6
    allowance = core.limits.allowance(bomb.stat().st_size)
    peak = 0

    async def watch_scratch() -> None:
        nonlocal peak
        while True:
            held = 0
            for entry in os.scandir(core.scratch_dir):
                with contextlib.suppress(OSError):
                    held += entry.stat().st_blocks * 512
            peak = max(peak, held)
            await trio.sleep(0.005)

    try:
        await core.put(write_sdist(tmp_path, 1), "deep/pkg-1.tar.gz")  # the reference
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_scratch)
            result = await core.put(bomb, "deep/bomb.zip")
            nursery.cancel_scope.cancel()
        assert trio.current_time() - started < 120
        assert result.stored.stored_key in store.objects
        back = tmp_path / "back"
        await core.get("deep/bomb.zip", back)
        assert sha(back.read_bytes()) == sha(bomb.read_bytes())
    finally:
        await core.aclose()
        cache.close()
    # The expansion's cap, plus the plain form, delta and body of a 5 MB file.
    assert peak <= allowance + 4 * bomb.stat().st_size, (peak, allowance)
