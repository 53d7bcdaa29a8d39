"""Recovering the original bytes of .tar.gz files the stock DeltaGlider CLI stored."""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import random
import shutil
import struct
import subprocess
import tarfile
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest

from dgfs import dgzip
from dgfs.delta import DeltaEngine, external_compression
from dgfs.dgzip import gzip_header, read_gzip_header, recover_gzip, tarscan
from dgfs.dgzip.limits import Budget
from dgfs.errors import DecodeLimit, DeltaEngineError
from testsupport.dgcli import run_deltaglider
from testsupport.servers import s3_client

NEWEST = 1_700_000_000  # the newest member's mtime in the synthetic sdists
_WORDS = b"def class return import self value result config error stream delta store".split()


def sdist_tar(name: str, *, seed: int = 1, edit: int = 0) -> bytes:
    """A tar like an sdist's: a top directory of text files, mtimes up to ``NEWEST``.

    ``edit`` > 0 changes a few members and adds one, as a next release would.
    """
    rng = random.Random(seed)
    members: dict[str, bytes] = {}
    for i in range(24):
        words = [rng.choice(_WORDS) for _ in range(3000)]
        members[f"{name}/src/mod{i:02d}.py"] = b" ".join(words)
    edit_rng = random.Random(1000 + edit)
    for i in range(edit):
        path = f"{name}/src/mod{edit_rng.randrange(24):02d}.py"
        members[path] = members[path][:5000] + b"changed %d " % i + members[path][5000:]
        members[f"{name}/src/added{edit}.py"] = b"new module\n" * 50
    buf = io.BytesIO()
    # PAX, as setuptools writes: float mtimes, the newest one (PKG-INFO) last.
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries = sorted(members.items())
        for index, (path, data) in enumerate(entries):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mtime = NEWEST - 86_400 + index * 7.25
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(f"{name}/PKG-INFO")
        info.size = 12
        info.mtime = NEWEST + 0.625
        tar.addfile(info, io.BytesIO(b"Version: 1\n\n"))
    return buf.getvalue()


def python_gzip(
    plain: bytes, filename: str, mtime: int, level: int = 9, *, with_name: bool = True
) -> bytes:
    """What Python's gzip module (and so setuptools' sdist) makes of ``plain``."""
    buf = io.BytesIO()
    with gzip.GzipFile(
        filename=filename if with_name else "",
        mode="wb",
        fileobj=buf,
        mtime=mtime,
        compresslevel=level,
    ) as gz:
        gz.write(plain)
    return buf.getvalue()


def deflate_gzip(plain: bytes, header: bytes, compressor: zlib._Compress) -> bytes:
    """A gzip member with ``header`` and a body from ``compressor``."""
    body = compressor.compress(plain) + compressor.flush()
    return header + body + struct.pack("<II", zlib.crc32(plain), len(plain) & 0xFFFFFFFF)


def recover(
    tmp_path: Path,
    original: bytes,
    plain: bytes,
    name: str,
    reference: bytes | None = None,
    **limits: int,
) -> tuple[bool, Path]:
    """Run recover_gzip on ``plain`` for the file ``original``; returns (found, out)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    decompressed = tmp_path / "plain.tar"
    decompressed.write_bytes(plain)
    ref_path = None
    if reference is not None:
        ref_path = tmp_path / "reference.bin"
        ref_path.write_bytes(reference)
    out = tmp_path / "out" / name.rsplit("/", 1)[-1]
    out.parent.mkdir(exist_ok=True)
    found = recover_gzip(
        decompressed,
        out,
        original_name=name,
        expected_sha256=hashlib.sha256(original).hexdigest(),
        expected_size=len(original),
        reference_gzip=ref_path,
        scratch_dir=scratch,
        **limits,
    )
    assert list(scratch.iterdir()) == []  # scratch files are removed
    assert sorted(p.name for p in out.parent.iterdir()) == ([out.name] if found else [])
    return found, out


# --- headers -----------------------------------------------------------------------------


def test_header_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    header = gzip_header(mtime=NEWEST, xfl=2, os_byte=255, name=b"x.tar")
    path.write_bytes(header + b"\x03\x00" + struct.pack("<II", 0, 0))
    parsed = read_gzip_header(path)
    assert parsed is not None
    assert (parsed.flags, parsed.mtime, parsed.xfl, parsed.os) == (8, NEWEST, 2, 255)
    assert (parsed.name, parsed.raw) == (b"x.tar", header)
    python_made = tmp_path / "p.gz"
    python_made.write_bytes(python_gzip(b"abc", "p.tar.gz", NEWEST))
    assert python_made.read_bytes().startswith(
        gzip_header(mtime=NEWEST, xfl=2, os_byte=255, name=b"p.tar")
    )
    path.write_bytes(b"PK\x03\x04 not gzip")
    assert read_gzip_header(path) is None


# --- recover_gzip on synthetic sdists ------------------------------------------------------


@pytest.mark.parametrize("seconds_after", [0, 3, 250])
def test_recovers_python_sdist(tmp_path: Path, seconds_after: int) -> None:
    plain = sdist_tar("pkg-1.1", edit=2)
    original = python_gzip(plain, "pkg-1.1.tar.gz", NEWEST + seconds_after)
    reference = python_gzip(sdist_tar("pkg-1.0"), "pkg-1.0.tar.gz", NEWEST - 5000)
    found, out = recover(tmp_path, original, plain, "pkg-1.1.tar.gz", reference)
    assert found
    assert out.read_bytes() == original


@pytest.mark.parametrize("with_reference", [True, False])
def test_recovers_a_name_with_a_directory(tmp_path: Path, with_reference: bool) -> None:
    """Older Pythons' gzip wrote the path it was given: ``dist/pkg-1.1.tar``
    (requests 2.28.2 to 2.30.0 on PyPI)."""

    def old_python_gzip(plain: bytes, name: bytes, mtime: int) -> bytes:
        header = gzip_header(mtime=mtime, xfl=2, os_byte=255, name=name)
        return deflate_gzip(plain, header, zlib.compressobj(9, zlib.DEFLATED, -15))

    plain = sdist_tar("pkg-1.1", edit=2)
    original = old_python_gzip(plain, b"dist/pkg-1.1.tar", NEWEST)
    reference = old_python_gzip(sdist_tar("pkg-1.0"), b"dist/pkg-1.0.tar", NEWEST - 5000)
    found, out = recover(
        tmp_path, original, plain, "pkg-1.1.tar.gz", reference if with_reference else None
    )
    assert found and out.read_bytes() == original


@pytest.mark.parametrize("mtime", ["inf", "-inf", "nan", "1e999"])
def test_a_pax_mtime_no_integer_holds_is_ignored(tmp_path: Path, mtime: str) -> None:
    # Found by fuzzing (tests/fuzz_corpus/dgzip/crash-b9f236e9...): a pax
    # header's mtime is read as any float, and floor(inf) raised
    # OverflowError out of the search (floor(nan) ValueError).
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, pax in (("pkg-1.1/a.txt", {"mtime": mtime}), ("pkg-1.1/b.txt", {})):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.pax_headers = 3, NEWEST, pax
            tar.addfile(info, io.BytesIO(b"abc"))
    plain = buf.getvalue()
    original = python_gzip(plain, "pkg-1.1.tar.gz", NEWEST)
    found, out = recover(tmp_path, original, plain, "pkg-1.1.tar.gz")
    assert found and out.read_bytes() == original


@pytest.mark.parametrize(
    "tar_format", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT]
)
def test_the_tar_scan_finds_what_tarfile_finds(tmp_path: Path, tar_format: int) -> None:
    """``_tar_facts`` reads the tar itself (tarfile would read any extended
    header whole, below): the newest mtime and top directory come out as
    tarfile gives them, with long names (a GNU long-name header, a ustar
    prefix, a pax path), pax float mtimes and a global pax header."""
    deep = "pkg-3.0/" + "/".join(["sub"] * 30) + "/module.py"  # over 100 characters
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tar_format) as tar:
        if tar_format == tarfile.PAX_FORMAT:
            tar.pax_headers = {"comment": "made by a test"}  # a global header
        for name, mtime, kind in [
            (deep, NEWEST - 9.5, tarfile.REGTYPE),  # first: the top directory is in its long name
            ("pkg-3.0", NEWEST - 50, tarfile.DIRTYPE),
            ("pkg-3.0/link", NEWEST - 3, tarfile.SYMTYPE),
            ("pkg-3.0/PKG-INFO", NEWEST + 0.625, tarfile.REGTYPE),
            ("pkg-3.0/z.txt", NEWEST - 7, tarfile.REGTYPE),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.mtime = kind, mtime
            data = b"x" * 700 if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "t.tar"
    path.write_bytes(buf.getvalue())
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert members[0].name == deep  # the long name survives in this format
    newest = max(m.mtime for m in members)
    facts = tarscan.tar_facts(path, Budget(60, 0))
    assert facts == tarscan.TarFacts(math.floor(newest), "pkg-3.0")


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.XGLTYPE, b"L", b"K"])
def test_an_extended_tar_header_is_never_read_whole(tmp_path: Path, kind: bytes) -> None:
    """Before, ``_tar_facts`` let tarfile read a pax (or GNU long-name)
    header whole into memory, whatever size it claimed: the content of a
    hostile stock gzip delta may hold up to 4 GiB (the expand_max allowance
    of its dg-file-size), so one object could take that much of the
    daemon's memory, or end the search with MemoryError. Now a claim over
    MAX_TAR_EXTENSION gives no facts and nothing of it is read (a 64 MiB
    claim here, in a sparse file; the peak of Python's allocations is
    measured)."""
    claim = 64 << 20
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = kind, claim
    plain = tmp_path / "plain.tar"
    with open(plain, "wb") as f:
        f.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        f.truncate(512 + claim + 1024)  # sparse: no disk used
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    tracemalloc.start()
    try:
        found = recover_gzip(
            plain,
            tmp_path / "out.gz",
            original_name="x.tar.gz",
            expected_sha256="ab" * 32,
            expected_size=1000,
            reference_gzip=None,
            scratch_dir=scratch,
            max_bodies=0,
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not found
    assert peak < 4 << 20, f"{peak >> 20} MiB allocated for a {claim >> 20} MiB header"
    assert tarscan.tar_facts(plain, Budget(60, 0)) == tarscan.TarFacts(None, None)


def hostile_target(tmp_path: Path, size: int) -> tuple[bytes, bytes]:
    """(content, its gzip) of ``size`` random bytes in a tar: Python's level 9,
    the body the search tries first, whose length fits the file's size."""
    data = random.Random(5).randbytes(size)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("pkg-1.1/data.bin")
        info.size, info.mtime = len(data), NEWEST
        tar.addfile(info, io.BytesIO(data))
    plain = buf.getvalue()
    return plain, python_gzip(plain, "pkg-1.1.tar.gz", NEWEST)


def recover_hostile(tmp_path: Path, size: int, **limits: float) -> None:
    """Run recover_gzip as a hostile object has it run: a dg-file-size that fits
    the first deflate body, a dg-file-sha256 that no candidate matches."""
    plain, original = hostile_target(tmp_path, size)
    decompressed = tmp_path / "plain.tar"
    decompressed.write_bytes(plain)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    try:
        recover_gzip(
            decompressed,
            tmp_path / "out.gz",
            original_name="pkg-1.1.tar.gz",
            expected_sha256=hashlib.sha256(b"not these bytes").hexdigest(),
            expected_size=len(original),
            reference_gzip=None,
            scratch_dir=scratch,
            **limits,  # type: ignore[arg-type]
        )
    finally:
        assert list(scratch.iterdir()) == []  # scratch files are removed
        assert not (tmp_path / "out.gz").exists()


def test_a_size_that_fits_stops_the_search_at_its_hashing_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, every deflate body whose length fits dg-file-size got
    MAX_HEADERS (2,000) SHA-256 of the whole file, up to MAX_BODIES (4)
    bodies: whoever writes the bucket picks the size, and the recovery of
    one object hashed 2,000-8,000 times its size (hours at 4 GiB) under a
    CPU token other reads waited for. Now the whole search hashes at most
    HASH_RATIO (64) times the size (at least HASH_FLOOR, 0 here to reach
    the ratio with a small file), then stops with DecodeLimit naming it."""
    monkeypatch.setattr("dgfs.dgzip.limits.HASH_FLOOR", 0)
    size = 256 << 10
    started = time.monotonic()
    with pytest.raises(DecodeLimit, match=r"would hash more than \d+ bytes.*64 × its dg-file-size"):
        recover_hostile(tmp_path, size)
    assert time.monotonic() - started < 5


def test_the_search_stops_at_its_time_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the recovery had no time limit (a 4 GiB object: hours). Now it
    stops past ``seconds`` (the mount's expand_time), checked between hashes
    and between pieces of a compression, with DecodeLimit naming it (the
    hashing budget is lifted here, so only the clock can stop the 2,000
    hashes of 4 MiB per body)."""
    monkeypatch.setattr("dgfs.dgzip.limits.HASH_FLOOR", 1 << 50)
    started = time.monotonic()
    with pytest.raises(DecodeLimit, match=r"took over 0.3 s \(expand_time\)"):
        recover_hostile(tmp_path, 4 << 20, seconds=0.3)
    assert time.monotonic() - started < 3


def test_recovers_without_a_reference(tmp_path: Path) -> None:
    plain = sdist_tar("pkg-1.1", edit=1)
    original = python_gzip(plain, "pkg-1.1.tar.gz", NEWEST + 1)
    found, out = recover(tmp_path, original, plain, "releases/pkg-1.1.tar.gz")
    assert found
    assert out.read_bytes() == original


def test_recovers_other_levels_names_and_reproducible_headers(tmp_path: Path) -> None:
    plain = sdist_tar("pkg-2.0", edit=3)
    cases = [
        # Python keeps ".tgz" in FNAME; level 6 as tarfile users may pick.
        ("pkg-2.0.tgz", python_gzip(plain, "pkg-2.0.tgz", NEWEST + 2, level=6)),
        # No name, MTIME 0: a reproducible build.
        ("pkg-2.0.tar.gz", python_gzip(plain, "x", 0, with_name=False)),
        # Named after the tar's top directory, not after the stored name.
        ("renamed.tar.gz", python_gzip(plain, "pkg-2.0.tar.gz", NEWEST)),
    ]
    reference = python_gzip(sdist_tar("pkg-1.9"), "pkg-1.9.tar.gz", NEWEST - 9000)
    for index, (name, original) in enumerate(cases):
        case_dir = tmp_path / str(index)
        case_dir.mkdir()
        found, out = recover(case_dir, original, plain, name, reference)
        assert found, name
        assert out.read_bytes() == original, name


def test_reference_self_delta_is_recovered_from_its_own_header(tmp_path: Path) -> None:
    plain = sdist_tar("pkg-1.0")
    original = python_gzip(plain, "pkg-1.0.tar.gz", NEWEST + 40_000)  # far from any member
    found, out = recover(tmp_path, original, plain, "pkg-1.0.tar.gz", original)
    assert found
    assert out.read_bytes() == original


def test_unreproducible_body_is_refused_cheaply(tmp_path: Path) -> None:
    plain = sdist_tar("pkg-1.1", edit=1)
    header = gzip_header(mtime=NEWEST + 3, xfl=2, os_byte=255, name=b"pkg-1.1.tar")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15, 3)  # memLevel 3: no writer we know
    original = deflate_gzip(plain, header, compressor)
    started = time.monotonic()
    found, _ = recover(tmp_path, original, plain, "pkg-1.1.tar.gz", max_bodies=30)
    assert not found
    assert time.monotonic() - started < 30


def test_header_outside_the_search_is_not_found(tmp_path: Path) -> None:
    plain = sdist_tar("pkg-1.1", edit=1)
    original = python_gzip(plain, "pkg-1.1.tar.gz", NEWEST + 90_000)
    found, _ = recover(tmp_path, original, plain, "pkg-1.1.tar.gz", max_headers=200)
    assert not found
    # The same file with the time inside the window is found.
    inside = python_gzip(plain, "pkg-1.1.tar.gz", NEWEST + 120)
    retry = tmp_path / "retry"
    retry.mkdir()
    found, out = recover(retry, inside, plain, "pkg-1.1.tar.gz")
    assert found and out.read_bytes() == inside


def test_wrong_size_or_digest_is_never_written(tmp_path: Path) -> None:
    plain = sdist_tar("pkg-1.1", edit=1)
    original = python_gzip(plain, "pkg-1.1.tar.gz", NEWEST)
    found, _ = recover(tmp_path, original + b"\0", plain, "pkg-1.1.tar.gz", max_headers=50)
    assert not found


@pytest.mark.skipif(shutil.which("zgz") is None, reason="zgz (pristine-tar) not installed")
@pytest.mark.skipif(shutil.which("gzip") is None, reason="GNU gzip not installed")
def test_recovers_gnu_gzip_output(tmp_path: Path) -> None:
    plain = sdist_tar("pkg-1.1", edit=1)
    tar_path = tmp_path / "src" / "pkg-1.1.tar"
    tar_path.parent.mkdir()
    tar_path.write_bytes(plain)
    os.utime(tar_path, (NEWEST + 12, NEWEST + 12))
    env = {k: v for k, v in os.environ.items() if k != "GZIP"}
    original = subprocess.run(
        ["gzip", "-9", "-N", "-c", str(tar_path)], capture_output=True, check=True, env=env
    ).stdout
    assert original[9] == dgzip.OS_UNIX
    ref_tar = tmp_path / "src" / "pkg-1.0.tar"
    ref_tar.write_bytes(sdist_tar("pkg-1.0"))
    reference = subprocess.run(
        ["gzip", "-9", "-N", "-c", str(ref_tar)], capture_output=True, check=True, env=env
    ).stdout
    found, out = recover(tmp_path, original, plain, "pkg-1.1.tar.gz", reference)
    assert found
    assert out.read_bytes() == original


# --- DeltaEngine.decode_decompressed -------------------------------------------------------


def stock_encode(source: Path, target: Path, delta: Path) -> None:
    """What DeltaGlider 6.2.0 runs, without ``-D -R``."""
    env = {k: v for k, v in os.environ.items() if k != "XDELTA"}
    subprocess.run(
        ["xdelta3", "-e", "-9", "-f", "-s", str(source), str(target), str(delta)],
        check=True,
        capture_output=True,
        env=env,
    )


async def test_decode_decompressed_gives_the_exact_tar(tmp_path: Path) -> None:
    reference = tmp_path / "reference.bin"
    reference.write_bytes(python_gzip(sdist_tar("pkg-1.0"), "pkg-1.0.tar.gz", NEWEST))
    plain = sdist_tar("pkg-1.1", edit=2)
    target = tmp_path / "pkg-1.1.tar.gz"
    target.write_bytes(python_gzip(plain, target.name, NEWEST + 4))
    delta = tmp_path / "pkg-1.1.tar.gz.delta"
    stock_encode(reference, target, delta)
    assert external_compression(delta.read_bytes()[:4096]) == ("G", "G")
    engine = DeltaEngine()
    tar = tmp_path / "out.tar"
    assert await engine.decode_decompressed(reference, delta, tar) == "G"
    assert tar.read_bytes() == plain
    # The stock way gives the same content in other gzip bytes: the known bug.
    regzipped = tmp_path / "regzipped"
    await engine.decode(reference, delta, regzipped)
    assert regzipped.read_bytes() != target.read_bytes()
    assert gzip.decompress(regzipped.read_bytes()) == plain


async def test_decode_decompressed_refuses_deltas_without_compression(tmp_path: Path) -> None:
    reference = tmp_path / "reference.bin"
    reference.write_bytes(python_gzip(sdist_tar("pkg-1.0"), "pkg-1.0.tar.gz", NEWEST))
    target = tmp_path / "pkg-1.1.tar.gz"
    target.write_bytes(python_gzip(sdist_tar("pkg-1.1", edit=1), target.name, NEWEST))
    delta = tmp_path / "d.delta"
    engine = DeltaEngine()
    await engine.encode(reference, target, delta)  # dgfs's own: -D -R
    out = tmp_path / "out"
    with pytest.raises(DeltaEngineError, match="no external compression"):
        await engine.decode_decompressed(reference, delta, out)
    assert not out.exists()


# --- the real CLI, the stock (broken) way ---------------------------------------------------


def run_stock_deltaglider(endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``deltaglider ARGS`` as users run it: no ``XDELTA`` fix."""
    return run_deltaglider(endpoint, *args, check=False, stock=True)


@pytest.mark.interop
async def test_stock_cli_tar_gz_is_recovered(
    moto_endpoint: str, bucket_name: str, tmp_path: Path
) -> None:
    dist = tmp_path / "dist"
    dist.mkdir()
    first = dist / "pkg-1.0.tar.gz"
    first.write_bytes(python_gzip(sdist_tar("pkg-1.0"), first.name, NEWEST + 2))
    second = dist / "pkg-1.1.tar.gz"
    second_plain = sdist_tar("pkg-1.1", edit=2)
    second.write_bytes(python_gzip(second_plain, second.name, NEWEST + 5))
    for path in (first, second):
        result = run_stock_deltaglider(
            moto_endpoint, "cp", str(path), f"s3://{bucket_name}/pkg/{path.name}"
        )
        assert result.returncode == 0, result.stderr

    # The known bug: the stock CLI cannot give the second file back.
    fetched = tmp_path / "via-cli.tar.gz"
    result = run_stock_deltaglider(
        moto_endpoint, "cp", f"s3://{bucket_name}/pkg/{second.name}", str(fetched)
    )
    assert result.returncode != 0
    assert not fetched.exists() or fetched.read_bytes() != second.read_bytes()
    # It names the SHA-256 it expected and did not get.
    assert hashlib.sha256(second.read_bytes()).hexdigest() in result.stdout + result.stderr

    client = s3_client(moto_endpoint)
    try:
        delta = tmp_path / "pkg-1.1.tar.gz.delta"
        reference = tmp_path / "reference.bin"
        client.download_file(bucket_name, f"pkg/{second.name}.delta", str(delta))
        client.download_file(bucket_name, "pkg/reference.bin", str(reference))
        meta = client.head_object(Bucket=bucket_name, Key=f"pkg/{second.name}.delta")["Metadata"]
    finally:
        client.close()
    assert external_compression(delta.read_bytes()[:4096]) == ("G", "G")

    tar = tmp_path / "pkg-1.1.tar"
    assert await DeltaEngine().decode_decompressed(reference, delta, tar) == "G"
    assert tar.read_bytes() == second_plain
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "recovered.tar.gz"
    found = recover_gzip(
        tar,
        out,
        original_name=meta["dg-original-name"],
        expected_sha256=meta["dg-file-sha256"],
        expected_size=int(meta["dg-file-size"]),
        reference_gzip=reference,
        scratch_dir=scratch,
    )
    assert found
    assert out.read_bytes() == second.read_bytes()


def _gnu_sparse_tar(tmp_path: Path) -> tuple[Path, int]:
    """A GNU tar (``tar -S``, as backups of VM images and databases are made)
    whose first file is sparse with more than 4 holes (its map continues in
    extension blocks after the header), followed by the newest file."""
    import shutil
    import subprocess

    tar_bin = shutil.which("tar")
    if tar_bin is None:
        pytest.skip("GNU tar needed")
    src = tmp_path / "src" / "pkg"
    src.mkdir(parents=True)
    with open(src / "a_sparse.img", "wb") as f:
        for i in range(12):
            f.seek(i * 200_000)
            f.write(b"segment %d\n" % i)
        f.truncate(12 * 200_000)
    (src / "b.txt").write_text("b\n")
    (src / "z_newest.txt").write_text("newest\n")
    old, newest = 1_600_000_000, 1_700_000_000
    os.utime(src / "a_sparse.img", (old, old))
    os.utime(src / "b.txt", (old, old))
    os.utime(src / "z_newest.txt", (newest, newest))
    os.utime(src, (old, old))
    tar = tmp_path / "pkg.tar"
    subprocess.run(
        [tar_bin, "--format=gnu", "-S", "--sort=name", "-cf", str(tar)]
        + ["-C", str(src.parent), "pkg"],
        check=True,
    )
    return tar, newest


def test_tar_facts_read_past_a_gnu_sparse_member_as_tarfile_did(tmp_path: Path) -> None:
    """``_tar_members`` skips a GNU sparse ('S') member's data by its size but
    not the extension blocks of its sparse map that follow the header when
    byte 482 (isextended) is set; the first of those fails the checksum and
    the scan ends there. tarfile (before 7262a07) read them
    (``TarInfo._proc_sparse``) and every member after."""
    import math
    import tarfile

    tar, newest = _gnu_sparse_tar(tmp_path)
    with tarfile.open(tar) as t:
        assert math.floor(max(m.mtime for m in t)) == newest  # what tarfile saw
    facts = tarscan.tar_facts(tar, Budget(600, 1 << 40))
    assert facts.newest_mtime == newest, f"newest mtime {facts.newest_mtime}, tarfile: {newest}"


def test_a_python_gzipped_tar_holding_a_gnu_sparse_file_is_recovered(tmp_path: Path) -> None:
    """End to end: Python's gzip (as the stock CLI's users' tools and
    setuptools write .tar.gz: level 9, FNAME, MTIME = newest member) over
    that tar. Before 7262a07 recover_gzip found it at the first header
    (tarfile gave the newest mtime); now the scan stops at the sparse
    member and no candidate MTIME is right."""
    import gzip
    import hashlib

    from dgfs import dgzip

    tar, newest = _gnu_sparse_tar(tmp_path)
    original = tmp_path / "pkg.tar.gz"
    with (
        open(original, "wb") as raw,
        gzip.GzipFile(
            filename="pkg.tar", mode="wb", compresslevel=9, fileobj=raw, mtime=newest
        ) as gz,
    ):
        gz.write(tar.read_bytes())
    body = original.read_bytes()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out.tar.gz"
    found = dgzip.recover_gzip(
        tar,
        out,
        original_name="pkg.tar.gz",
        expected_sha256=hashlib.sha256(body).hexdigest(),
        expected_size=len(body),
        reference_gzip=None,
        scratch_dir=scratch,
    )
    assert found and out.read_bytes() == body
