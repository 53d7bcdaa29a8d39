"""DeltaEngine against the real xdelta3 binary."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from dgfs.delta import (
    INSTALL_HINT,
    MAX_SOURCE_WINDOW,
    MIN_SOURCE_WINDOW,
    DeltaEngine,
    OutputCap,
    external_compression,
    memory_estimate,
    source_window,
)
from dgfs.errors import DeltaEngineError, XdeltaMissing

MiB = 1 << 20


@pytest.fixture
def engine() -> DeltaEngine:
    return DeltaEngine()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def similar_pair(tmp_path: Path, size: int = 300_000, seed: int = 1) -> tuple[Path, Path]:
    """A random binary file and an edited copy (changed, inserted, deleted bytes)."""
    rng = random.Random(seed)
    source = rng.randbytes(size)
    target = bytearray(source)
    target[1000:1100] = rng.randbytes(100)
    target[size // 2 : size // 2] = rng.randbytes(5000)
    del target[size - 20_000 : size - 10_000]
    return write(tmp_path / "source.bin", source), write(tmp_path / "target.bin", bytes(target))


def xdelta3_children_with(marker: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line mentions ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and "xdelta3" in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


# --- check ----------------------------------------------------------------------


def test_check_returns_version(engine: DeltaEngine) -> None:
    version = engine.check()
    assert version[0].isdigit() and "." in version, version


def test_check_missing_binary_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(XdeltaMissing) as info:
        DeltaEngine(str(tmp_path / "no-such-xdelta3")).check()
    assert "apt install xdelta3" in str(info.value)
    assert "brew install xdelta" in str(info.value)
    assert INSTALL_HINT in str(info.value)


def test_check_not_executable(tmp_path: Path) -> None:
    binary = write(tmp_path / "xdelta3", b"#!/bin/sh\necho 'Xdelta version 3.0.11,' >&2\n")
    binary.chmod(0o644)
    with pytest.raises(XdeltaMissing, match="apt install xdelta3"):
        DeltaEngine(str(binary)).check()


@pytest.mark.parametrize(
    "script",
    [
        "#!/bin/sh\necho 'Xdelta version 3.0.11,' >&2\nexit 1\n",  # fails
        "#!/bin/sh\necho hello\n",  # answers, but is not xdelta3
    ],
)
def test_check_failing_binary(tmp_path: Path, script: str) -> None:
    binary = write(tmp_path / "xdelta3", script.encode())
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(XdeltaMissing, match="apt install xdelta3"):
        DeltaEngine(str(binary)).check()


# --- source window ----------------------------------------------------------------


def test_source_window_covers_source_within_limits() -> None:
    assert source_window(0, 1 << 30) == MIN_SOURCE_WINDOW == 512 * 1024
    assert source_window(100, 1 << 30) == MIN_SOURCE_WINDOW
    assert source_window(110 * MiB, 1 << 30) == 110 * MiB
    assert source_window(5 << 30, 1 << 30) == 1 << 30  # capped by memory_limit
    assert source_window(5 << 30, 8 << 30) == MAX_SOURCE_WINDOW == 2 << 30  # xdelta3's max
    assert source_window(5 << 30, 0) == MIN_SOURCE_WINDOW  # never below xdelta3's min


# --- round trips ------------------------------------------------------------------


async def test_round_trip_binary(engine: DeltaEngine, tmp_path: Path) -> None:
    source, target = similar_pair(tmp_path)
    delta, out = tmp_path / "d.vcdiff", tmp_path / "out.bin"
    delta_size = await engine.encode(source, target, delta)
    assert delta_size == delta.stat().st_size
    assert delta_size < 20_000  # ~5 KiB of new bytes in a 300 KB file
    await engine.decode(source, delta, out)
    assert out.read_bytes() == target.read_bytes()


async def test_zero_diff_is_tiny(engine: DeltaEngine, tmp_path: Path) -> None:
    source, _ = similar_pair(tmp_path)
    delta, out = tmp_path / "self.vcdiff", tmp_path / "out.bin"
    delta_size = await engine.encode(source, source, delta)
    assert delta_size < 100
    await engine.decode(source, delta, out)
    assert out.read_bytes() == source.read_bytes()


async def test_empty_files(engine: DeltaEngine, tmp_path: Path) -> None:
    empty = write(tmp_path / "empty", b"")
    data = write(tmp_path / "data", random.Random(3).randbytes(70_000))
    for source, target in ((empty, data), (data, empty), (empty, empty)):
        delta, out = tmp_path / "d", tmp_path / "out"
        await engine.encode(source, target, delta)
        await engine.decode(source, delta, out)
        assert out.read_bytes() == target.read_bytes()


async def test_output_is_overwritten(engine: DeltaEngine, tmp_path: Path) -> None:
    source, target = similar_pair(tmp_path)
    delta = write(tmp_path / "d", b"old" * 100_000)
    out = write(tmp_path / "out", b"old" * 200_000)
    await engine.encode(source, target, delta)
    await engine.decode(source, delta, out)
    assert out.read_bytes() == target.read_bytes()


async def test_xdelta_environment_variable_is_ignored(
    engine: DeltaEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # XDELTA adds flags to every xdelta3 run; -J would suppress the output.
    monkeypatch.setenv("XDELTA", "-J")
    source, target = similar_pair(tmp_path)
    delta, out = tmp_path / "d", tmp_path / "out"
    await engine.encode(source, target, delta)
    await engine.decode(source, delta, out)
    assert out.read_bytes() == target.read_bytes()


async def test_deltas_carry_no_local_file_names(engine: DeltaEngine, tmp_path: Path) -> None:
    source, target = similar_pair(tmp_path)
    delta = tmp_path / "d"
    await engine.encode(source, target, delta)
    head = delta.read_bytes()[:200]
    assert b"source.bin" not in head and b"target.bin" not in head
    assert external_compression(head) is None


@pytest.mark.slow
async def test_large_file_changes_beyond_64_mib_stay_small(
    engine: DeltaEngine, tmp_path: Path
) -> None:
    """110 MiB; the first 72 MiB moved to the end, then a few KiB changed at
    ~90 and ~105 MiB. Content that moves by more than xdelta3's default 64 MiB
    source window is lost without ``-B`` (measured: a 90 MB delta in 28 s);
    in-place edits alone would not show it, xdelta3 follows those anyway."""
    started = time.monotonic()
    rng = random.Random(110)
    size, shift = 110 * MiB, 72 * MiB
    source_bytes = rng.randbytes(size)
    edited = bytearray(source_bytes[shift:] + source_bytes[:shift])
    for offset in (90 * MiB + 12_345, 105 * MiB + 777):
        edited[offset : offset + 4096] = rng.randbytes(4096)
    source = write(tmp_path / "big-1.0.iso", source_bytes)
    target = write(tmp_path / "big-1.1.iso", bytes(edited))
    del source_bytes, edited
    generated = time.monotonic()

    delta, out = tmp_path / "big.delta", tmp_path / "big.out"
    delta_size = await engine.encode(source, target, delta)
    encoded = time.monotonic()
    await engine.decode(source, delta, out)
    decoded = time.monotonic()

    print(
        f"generate {generated - started:.1f}s, encode {encoded - generated:.1f}s, "
        f"decode {decoded - encoded:.1f}s, delta {delta_size} bytes"
    )
    assert delta_size < MiB
    assert sha256_of(out) == sha256_of(target)


# --- gzip ---------------------------------------------------------------------------


def tar_gz(files: dict[str, bytes], *, gzip_tool: bool = False) -> bytes:
    """A .tar.gz of ``files``: compressed by Python's gzip, or by gzip(1) as
    xdelta3's external recompression would run it."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    if gzip_tool:
        return subprocess.run(
            ["gzip", "-c"], input=raw.getvalue(), capture_output=True, check=True
        ).stdout
    return gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)


def sdist_files(version: int) -> dict[str, bytes]:
    rng = random.Random(7)
    files = {
        f"pkg/mod{i}.py": "\n".join(
            f"def f{i}_{j}(x):\n    return x * {j} + {rng.randint(0, 9)}" for j in range(300)
        ).encode()
        for i in range(20)
    }
    if version > 1:
        files["pkg/mod3.py"] = files["pkg/mod3.py"].replace(b"x * 7 +", b"x * 77 +")
        files["pkg/new.py"] = b"print('new in 1.1')\n"
    return files


def stock_encode(source: Path, target: Path, delta: Path) -> None:
    """DeltaGlider 6.2.0's command: ``xdelta3 -e -9 -s ref target out``."""
    env = {k: v for k, v in os.environ.items() if k != "XDELTA"}
    subprocess.run(
        ["xdelta3", "-e", "-9", "-f", "-s", source, target, delta],
        check=True,
        capture_output=True,
        env=env,
    )


async def test_gzip_round_trip_is_byte_identical(engine: DeltaEngine, tmp_path: Path) -> None:
    v1 = write(tmp_path / "app-1.0.tar.gz", tar_gz(sdist_files(1)))
    v2 = write(tmp_path / "app-1.1.tar.gz", tar_gz(sdist_files(2)))
    delta, out = tmp_path / "d", tmp_path / "out.tar.gz"
    await engine.encode(v1, v2, delta)
    await engine.decode(v1, delta, out)
    assert out.read_bytes() == v2.read_bytes()


@pytest.mark.skipif(shutil.which("gzip") is None, reason="needs gzip(1)")
async def test_stock_flags_lose_gzip_bytes(engine: DeltaEngine, tmp_path: Path) -> None:
    """Why -D -R: xdelta3's stock flags diff the decompressed stream and
    recompress with gzip(1), whose header differs from Python's gzip (OS byte
    3 vs 255), so the same content comes back as different bytes."""
    v1 = write(tmp_path / "app-1.0.tar.gz", tar_gz(sdist_files(1)))
    v2 = write(tmp_path / "app-1.1.tar.gz", tar_gz(sdist_files(2)))
    delta, out = tmp_path / "stock.delta", tmp_path / "out.tar.gz"
    stock_encode(v1, v2, delta)
    assert external_compression(delta.read_bytes()[:4096]) == ("G", "G")
    await engine.decode(v1, delta, out)  # decodes, but ...
    assert out.read_bytes() != v2.read_bytes()  # ... not to the original bytes
    assert gzip.decompress(out.read_bytes()) == gzip.decompress(v2.read_bytes())


@pytest.mark.skipif(shutil.which("gzip") is None, reason="needs gzip(1)")
async def test_decodes_stock_gzip_delta_when_recompression_matches(
    engine: DeltaEngine, tmp_path: Path
) -> None:
    v1 = write(tmp_path / "app-1.0.tar.gz", tar_gz(sdist_files(1), gzip_tool=True))
    v2 = write(tmp_path / "app-1.1.tar.gz", tar_gz(sdist_files(2), gzip_tool=True))
    delta, out = tmp_path / "stock.delta", tmp_path / "out.tar.gz"
    stock_encode(v1, v2, delta)
    await engine.decode(v1, delta, out)
    assert out.read_bytes() == v2.read_bytes()


async def test_decodes_stock_delta_of_plain_files(engine: DeltaEngine, tmp_path: Path) -> None:
    source, target = similar_pair(tmp_path)
    delta, out = tmp_path / "stock.delta", tmp_path / "out"
    stock_encode(source, target, delta)
    assert external_compression(delta.read_bytes()[:4096]) == ("", "")
    await engine.decode(source, delta, out)
    assert out.read_bytes() == target.read_bytes()


def test_external_compression_ignores_non_vcdiff() -> None:
    assert external_compression(b"") is None
    assert external_compression(b"PK\x03\x04 not a delta") is None
    assert external_compression(b"\xd6\xc3\xc4\x00\x05\x02\x7fab") is None  # truncated header


# --- failures -------------------------------------------------------------------------


async def test_missing_binary_at_run_time(tmp_path: Path) -> None:
    source, target = similar_pair(tmp_path)
    link = tmp_path / "xdelta3"
    xdelta3 = shutil.which("xdelta3")
    assert xdelta3 is not None
    link.symlink_to(xdelta3)
    engine = DeltaEngine(str(link))
    engine.check()
    link.unlink()  # uninstalled while mounted
    with pytest.raises(XdeltaMissing, match="apt install xdelta3"):
        await engine.encode(source, target, tmp_path / "d")
    with pytest.raises(XdeltaMissing):
        await engine.decode(source, write(tmp_path / "d2", b"x"), tmp_path / "out")
    with pytest.raises(XdeltaMissing, match="apt install xdelta3"):  # size-capped (prlimit)
        await engine.decode(source, tmp_path / "d2", tmp_path / "out", cap=OutputCap(100))


async def test_corrupt_delta(engine: DeltaEngine, tmp_path: Path) -> None:
    source, target = similar_pair(tmp_path)
    delta, out = tmp_path / "d", tmp_path / "out"
    await engine.encode(source, target, delta)
    data = bytearray(delta.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data[len(data) // 2 + 1] ^= 0x55
    write(delta, bytes(data))
    write(out, b"stale")  # whatever was there must not survive a failure
    with pytest.raises(DeltaEngineError) as info:
        await engine.decode(source, delta, out)
    message = str(info.value)
    assert "xdelta3" in message and "-d" in message and str(delta) in message
    assert "exit" in message
    assert not out.exists()


async def test_without_window_checks_a_corrupt_window_decodes_to_other_bytes(
    engine: DeltaEngine, tmp_path: Path
) -> None:
    """``window_checks=False`` really drops xdelta3's Adler-32 check (callers
    must check the result whole): the same corrupt delta fails with it and
    decodes without it, to bytes that differ from the target."""
    source, target = similar_pair(tmp_path)
    delta, out = tmp_path / "d", tmp_path / "out"
    await engine.encode(source, target, delta)
    inserted = target.read_bytes()[150_000 : 150_000 + 5000]  # similar_pair's random insert
    data = bytearray(delta.read_bytes())
    at = data.find(inserted[2000:2064])
    assert at > 0
    data[at] ^= 0xFF
    write(delta, bytes(data))
    with pytest.raises(DeltaEngineError):
        await engine.decode(source, delta, out)
    await engine.decode(source, delta, out, window_checks=False)
    assert out.stat().st_size == target.stat().st_size
    assert sha256_of(out) != sha256_of(target)


async def test_garbage_and_truncated_delta(engine: DeltaEngine, tmp_path: Path) -> None:
    source, target = similar_pair(tmp_path)
    delta, out = tmp_path / "d", tmp_path / "out"
    await engine.encode(source, target, delta)
    truncated = write(tmp_path / "t", delta.read_bytes()[: delta.stat().st_size // 2])
    garbage = write(tmp_path / "g", random.Random(9).randbytes(5000))
    for bad in (truncated, garbage):
        write(out, b"stale")
        with pytest.raises(DeltaEngineError):
            await engine.decode(source, bad, out)
        assert not out.exists()


async def test_wrong_source(engine: DeltaEngine, tmp_path: Path) -> None:
    source, target = similar_pair(tmp_path)
    other = write(tmp_path / "other", random.Random(5).randbytes(300_000))
    delta, out = tmp_path / "d", tmp_path / "out"
    await engine.encode(source, target, delta)
    write(out, b"stale")
    with pytest.raises(DeltaEngineError):
        await engine.decode(other, delta, out)
    assert not out.exists()


async def test_missing_inputs(engine: DeltaEngine, tmp_path: Path) -> None:
    source, target = similar_pair(tmp_path)
    with pytest.raises(DeltaEngineError):
        await engine.encode(tmp_path / "nope", target, tmp_path / "d")
    with pytest.raises(DeltaEngineError):
        await engine.encode(source, tmp_path / "nope", tmp_path / "d")
    assert not (tmp_path / "d").exists()
    with pytest.raises(DeltaEngineError):
        await engine.decode(source, tmp_path / "nope", tmp_path / "out")


@pytest.mark.slow
async def test_cancellation_kills_xdelta3(tmp_path: Path) -> None:
    # A small window turns this 96 MiB encode into tens of seconds of
    # searching, so it is surely still running when cancelled.
    engine = DeltaEngine(memory_limit=0)
    rng = random.Random(4)
    data = rng.randbytes(96 * MiB)
    source = write(tmp_path / "a", data)
    target = write(tmp_path / "b", data[70 * MiB :] + data[: 70 * MiB])
    del data
    out = write(tmp_path / "cancelled.delta", b"stale")
    seen: list[int] = []

    async def watch() -> None:
        while not (pids := xdelta3_children_with(str(out))):
            await trio.sleep(0.02)
        seen.extend(pids)

    started = trio.current_time()
    with trio.move_on_after(20) as outer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            with trio.move_on_after(1.0) as scope:
                await engine.encode(source, target, out)
    assert not outer.cancelled_caught, "xdelta3 never showed up"
    assert scope.cancelled_caught, "encode finished before it could be cancelled"
    assert seen
    assert trio.current_time() - started < 5
    assert xdelta3_children_with(str(out)) == []
    assert not out.exists()


async def test_a_lower_level_encodes_what_any_level_decodes(tmp_path: Path) -> None:
    rng = random.Random(6)
    source = bytes(rng.getrandbits(8) for _ in range(200_000))
    target = source[:50_000] + b"changed" * 100 + source[50_000:]
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    src.write_bytes(source)
    tgt.write_bytes(target)
    fast, default = DeltaEngine(level=6), DeltaEngine()
    await fast.encode(src, tgt, tmp_path / "d6")
    await default.decode(src, tmp_path / "d6", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == target
    with pytest.raises(ValueError, match="1-9"):
        DeltaEngine(level=0)


def _counting(engine: DeltaEngine, *, real: bool) -> list[int]:
    """Replace ``engine._run`` with one that counts runs at once: ``[running, most]``."""
    counts = [0, 0]
    real_run = engine._run

    async def counting_run(what: str, args: Sequence[str | Path], out: Path, **limits: Any) -> None:
        counts[0] += 1
        counts[1] = max(counts[1], counts[0])
        try:
            await trio.sleep(0.05)  # long enough for the others to try to start
            if real:
                await real_run(what, args, out, **limits)
            else:
                out.write_bytes(b"delta")
        finally:
            counts[0] -= 1

    engine._run = counting_run  # type: ignore[method-assign]
    return counts


async def test_concurrent_runs_share_one_memory_budget(tmp_path: Path) -> None:
    """Three encodes that each need the whole budget run one at a time; with
    room for two, two at once."""
    source, target = similar_pair(tmp_path)  # ~300 KB: the window is MIN_SOURCE_WINDOW
    one = memory_estimate("encode", MIN_SOURCE_WINDOW)
    for limit, expected in ((MIN_SOURCE_WINDOW, 1), (32 * MiB, 2)):
        engine = DeltaEngine(memory_limit=limit)
        assert engine.memory_budget // one == expected
        counts = _counting(engine, real=True)
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(engine.encode, source, target, tmp_path / f"d{i}")
        assert counts[1] == expected
        assert engine._memory.used == 0


async def test_concurrent_encodes_are_bounded_by_memory_not_windows(tmp_path: Path) -> None:
    """Two encodes whose 32 MiB windows fit a 64 MiB window cap together still
    run one at a time: each holds ~5 x its window (hash tables), and all of a
    mount's xdelta3 runs share what one encode with the largest window needs."""
    engine = DeltaEngine(memory_limit=64 * MiB)
    assert engine.memory_budget == memory_estimate("encode", 64 * MiB)
    sources = []
    for i in range(2):
        path = tmp_path / f"src{i}"
        with open(path, "wb") as f:
            f.truncate(32 * MiB)  # sparse: only its size matters here
        sources.append(path)
    counts = _counting(engine, real=False)
    async with trio.open_nursery() as nursery:
        for i, source in enumerate(sources):
            nursery.start_soon(engine.encode, source, source, tmp_path / f"d{i}")
    assert counts[1] == 1
    assert engine._memory.peak <= engine.memory_budget


def test_memory_estimate_covers_what_xdelta3_was_measured_to_hold() -> None:
    """Maximum RSS of xdelta3 3.0.11 (-e -9 / -d, -B = the source size), measured
    on this project's machines (docs/operations.md)."""
    measured_encode = {64 * MiB: 240_732 << 10, 130 * MiB: 701_744 << 10,
                       260 * MiB: 1_359_112 << 10, 520 * MiB: 1_625_276 << 10,
                       1 << 30: 2_200_000_000}  # fmt: skip
    for window, rss in measured_encode.items():
        assert rss <= memory_estimate("encode", window) <= rss * 1.1, window
    measured_decode = {64 * MiB: 75_696 << 10, 260 * MiB: 276_408 << 10, 520 * MiB: 542_584 << 10}
    for window, rss in measured_decode.items():
        assert rss <= memory_estimate("decode", window) <= rss + 64 * MiB, window
