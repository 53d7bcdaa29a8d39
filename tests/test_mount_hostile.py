"""Real mounts of a bucket dgfs did not write: odd names, garbled metadata, broken deltas.

The bucket is seeded with plain boto3 (and, for the deltas, objects made
in-process by ``Core`` and then damaged), then mounted. Listing and stat
of every directory must work, each name is shown or skipped by the rules
of docs/SEMANTICS.md ("Buckets dgfs did not write"), reads of broken
objects fail with EIO and one log line naming the key, writes leave
every object the mount does not show as the file written, and the
operator commands report each bad key without a traceback. The same
inputs in-process, branch by branch: tests/test_hostile.py.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from dgfs.store.memory import MemoryStore
from tests.coreharness import make_core, write
from tests.mountutil import DgfsMount, Mounts, S3View, daemon_env, dgfs_bin
from tests.test_hostile import BAD_METADATA, BROKEN, LONG, break_one
from testsupport.releases import ReleaseSeries

pytestmark = pytest.mark.mount

NAMES = {
    "n/a": b"file a",  # a file and a directory of one name
    "n/a/b": b"file a/b",
    "n/c//d": b"empty name",
    "n/./x": b"dot",
    "n/../y": b"dot dot",
    "n/e/./f": b"dot inside",
    "/leading": b"leading slash",
    f"n/{LONG}": b"too long",
    "n/ok": b"ok",
    "n/x": b"x direct, older",
    ".deltaglider": b"a file named like the internal prefix",
}
SHOWN_IN_N = {"a", "c", "dm", "e", "ok", "x", "x.delta"}


def _seed_broken(s3: S3View, tmp: Path) -> None:
    """Per variant ``b-<how>/``: two releases stored by ``Core``, the second damaged."""

    async def build() -> MemoryStore:
        store = MemoryStore()
        core, cache = make_core(store, tmp / "core")
        for seed, how in enumerate(BROKEN):
            # Each its own content: the cache finds a reference by its SHA-256,
            # so a shared one would let a delta whose dg-ref-key points nowhere read.
            series = ReleaseSeries(size=256 << 10, seed=seed)
            zips = [write(tmp / f"{seed}-{n}", d) for n, d in series.zips(2)]
            await core.put(zips[0], f"b-{how}/first.zip")
            await core.put(zips[1], f"b-{how}/second.zip")
            await break_one(store, how, f"b-{how}/second.zip.delta")
        await core.aclose()
        cache.close()
        return store

    store = trio.run(build)
    for key, obj in store.objects.items():
        s3.put(key, obj.body, obj.metadata)


@pytest.fixture(scope="module")
def hostile(mounts: Mounts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DgfsMount]:
    bucket = mounts.new_bucket()
    s3 = S3View(mounts.endpoint, bucket)
    for name, meta in BAD_METADATA.items():
        s3.put(f"m/{name}", b"data", meta)
    for key, body in NAMES.items():
        s3.put(key, body)
    s3.put("n/dm/", b"a marker with bytes")
    s3.put("n/x.delta", b"not a delta of x")  # no DeltaGlider metadata
    s3.put("d/x.zip.delta", b"raw delta bytes, no metadata")
    s3.put("f/reference.bin", b"a user's file of that name")  # no DeltaGlider metadata
    _seed_broken(s3, tmp_path_factory.mktemp("hostile-core"))
    s3.close()
    mount = mounts.mount(bucket)
    mount.expect_log(r"cannot read b-")
    yield mount


@pytest.fixture
def view(hostile: DgfsMount) -> Iterator[S3View]:
    s3 = S3View(hostile.endpoint, hostile.bucket)
    yield s3
    s3.close()


def test_every_directory_lists_and_every_entry_stats(hostile: DgfsMount) -> None:
    seen = {}
    for dirpath, dirnames, filenames in os.walk(hostile.root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            seen[str(path.relative_to(hostile.root))] = os.lstat(path)
    top = {p for p in seen if "/" not in p}
    assert top == {"m", "n", "d", "f", *(f"b-{how}" for how in BROKEN)}
    assert {p[2:] for p in seen if p.startswith("n/") and p.count("/") == 1} == SHOWN_IN_N
    assert {p for p in seen if p.startswith("m/")} == {f"m/{n}" for n in BAD_METADATA}
    assert seen["n/a/b"].st_size == len(b"file a/b")
    assert not any(p.startswith(("n/c/", "n/e/")) for p in seen)  # d and f: skipped names


def test_bad_metadata_is_ignored_per_value(hostile: DgfsMount) -> None:
    for name in ("uid-neg", "uid-big", "uid-abc"):
        assert os.stat(hostile / f"m/{name}").st_uid == os.getuid()
    assert os.stat(hostile / "m/mode-dir").st_mode == 0o100700
    assert os.stat(hostile / "m/mode-garbage").st_mode == 0o100644
    assert os.stat(hostile / "m/mtime-neg").st_mtime == -100
    assert (hostile / "m/uid-neg").read_bytes() == b"data"


def test_delta_objects_without_metadata_show_under_their_own_name(
    hostile: DgfsMount, view: S3View
) -> None:
    assert sorted(os.listdir(hostile / "d")) == ["x.zip.delta"]
    assert (hostile / "d/x.zip.delta").read_bytes() == b"raw delta bytes, no metadata"
    # x beside x.delta: two files; x reads its own bytes.
    assert (hostile / "n/x").read_bytes() == b"x direct, older"
    (hostile / "d/x.zip").write_bytes(b"new")
    hostile.settle(hostile / "d/x.zip")
    assert sorted(os.listdir(hostile / "d")) == ["x.zip", "x.zip.delta"]
    assert view.get("d/x.zip.delta") == b"raw delta bytes, no metadata"
    os.unlink(hostile / "d/x.zip")
    assert view.get("d/x.zip.delta") == b"raw delta bytes, no metadata"


def test_writes_never_destroy_what_the_mount_does_not_show(
    hostile: DgfsMount, view: S3View
) -> None:
    before = view.keys()
    with pytest.raises(IsADirectoryError):
        (hostile / "n/a").write_bytes(b"clobber")  # the file a is hidden by a/
    for directory in ("n/c", "n/e", "n/dm", "f"):
        with pytest.raises(OSError) as exc:
            os.rmdir(hostile / directory)
        assert exc.value.errno == errno.ENOTEMPTY
    os.chmod(hostile / "n/dm", 0o700)
    assert view.get("n/dm/") == b"a marker with bytes"
    assert view.keys() == before


def test_broken_deltas_read_eio_with_one_log_line_each(hostile: DgfsMount) -> None:
    for how in BROKEN:
        path = hostile / f"b-{how}/second.zip"
        assert os.stat(path).st_size > 0  # stat works; only the bytes are refused
        for _ in range(2):
            with pytest.raises(OSError) as exc:
                data = path.read_bytes()
                pytest.fail(f"{how}: read {len(data)} bytes")
            assert exc.value.errno == errno.EIO, how
        if how not in ("missing-reference", "corrupt-reference"):
            assert len((hostile / f"b-{how}/first.zip").read_bytes()) > 0  # its neighbour reads
    log = hostile.log_text()
    assert "Traceback" not in log
    assert "please verify the source file" not in log  # xdelta3's advice: not a log line
    lines = [line for line in log.splitlines() if "cannot read" in line]
    for how in BROKEN:
        named = [line for line in lines if f"b-{how}/second.zip.delta" in line]
        assert len(named) == 1, (how, lines)


def _cli(hostile: DgfsMount, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dgfs_bin(), *args, "--endpoint-url", hostile.endpoint],
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=120,
        check=False,
    )


def test_operator_commands_name_each_bad_key_and_gc_removes_nothing(
    hostile: DgfsMount, view: S3View
) -> None:
    before = view.keys()
    before.pop(".deltaglider/stats_quick.json", None)  # stats' own cache
    verify = _cli(hostile, "verify", "--all", f"s3://{hostile.bucket}")
    assert verify.returncode == 1, verify.stderr
    assert "Traceback" not in verify.stderr + verify.stdout
    for how in BROKEN:
        assert f"b-{how}/second.zip" in verify.stderr + verify.stdout, how
    stats = _cli(hostile, "stats", hostile.bucket)
    assert stats.returncode == 0, stats.stderr
    assert "Traceback" not in stats.stderr
    gc = _cli(hostile, "gc", "--yes", "--settle", "0", f"s3://{hostile.bucket}")
    assert gc.returncode == 0, gc.stderr
    assert "f/reference.bin has no DeltaGlider metadata" in gc.stderr
    assert "Traceback" not in gc.stderr
    after = view.keys()
    after.pop(".deltaglider/stats_quick.json", None)
    assert after == before


def test_mount_ignores_setuid_bits_and_device_numbers_from_the_bucket(
    hostile: DgfsMount,
) -> None:
    target = os.fsencode(str(hostile.root))
    with open("/proc/self/mountinfo", "rb") as info:
        options = next(line.split()[5] for line in info if line.split()[4] == target)
    assert {b"nosuid", b"nodev"} <= set(options.split(b","))
