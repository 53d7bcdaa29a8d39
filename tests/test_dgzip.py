"""Recovering the original bytes of .tar.gz files the stock DeltaGlider CLI stored."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import shutil
import struct
import subprocess
import tarfile
import time
import zlib
from pathlib import Path

import pytest

from dgfs import dgzip
from dgfs.delta import DeltaEngine, external_compression
from dgfs.dgzip import gzip_header, read_gzip_header, recover_gzip
from dgfs.errors import DeltaEngineError
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
