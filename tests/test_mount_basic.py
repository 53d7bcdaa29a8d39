"""Real mounts: copying a release series in, reading it back, and the bucket's layout.

Also the in-place edits (truncate, append, writes in the middle of a
delta-stored file), xattrs, statfs and parallel writers. Every expectation
is computed from local copies, never hard-coded.
"""

from __future__ import annotations

import gzip
import os
import random
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.mountutil import (
    DgfsMount,
    Mounts,
    S3View,
    daemon_env,
    dg_download,
    dgfs_bin,
    sha256_bytes,
    sha256_file,
    wait_until,
)
from testsupport.releases import ReleaseSeries, write_series

pytestmark = pytest.mark.mount

SERIES_SIZE = 512 << 10  # zips of ~250 KiB


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Twelve consecutive release zips, local."""
    return write_series(tmp_path_factory.mktemp("series"), 12, size=SERIES_SIZE)


def _fresh_dir(mount: DgfsMount, name: str) -> Path:
    path = mount / name
    path.mkdir()
    return path


def test_file_still_being_written_is_not_uploaded_half_done(
    shared: DgfsMount, s3: S3View, series: list[Path]
) -> None:
    """A shell redirect closes duplicate descriptors (FUSE flush) while it still
    writes: that must not upload the first half, which would become the
    directory's reference for good and spoil every later delta."""
    dest = _fresh_dir(shared, "halfdone")
    name, first, second = series[0].name, series[0].read_bytes(), series[1]
    fd = os.open(dest / name, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, first[: len(first) // 2])
        os.close(os.dup(fd))  # a flush while the file is still open for writing
        time.sleep(1.0)  # well past upload_delay
        assert not s3.exists(f"halfdone/{name}.delta")
        assert not s3.exists("halfdone/reference.bin")
        os.write(fd, first[len(first) // 2 :])
    finally:
        os.close(fd)
    subprocess.run(["cp", str(second), str(dest)], check=True)
    shared.settle(dest / name, dest / second.name)
    stored = s3.keys("halfdone/")
    assert stored["halfdone/reference.bin"] == len(first)
    assert stored[f"halfdone/{second.name}.delta"] < second.stat().st_size * 0.3
    assert sha256_file(dest / name) == sha256_bytes(first)


def test_verify_a_path_inside_the_mount(shared: DgfsMount, series: list[Path]) -> None:
    """`dgfs verify PATH` finds bucket, key and endpoint from the mount's xattrs."""
    dest = _fresh_dir(shared, "verifypath")
    shutil.copyfile(series[0], dest / "a.zip")
    shutil.copyfile(series[1], dest / "b.zip")
    shared.settle(dest / "a.zip", dest / "b.zip")
    env = {k: v for k, v in daemon_env().items() if k != "AWS_ENDPOINT_URL"}
    result = subprocess.run(
        [dgfs_bin(), "verify", str(dest / "b.zip")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verifypath/b.zip" in result.stdout


# --- a release series -----------------------------------------------------------


@pytest.mark.interop  # reads back with the DeltaGlider CLI
def test_cp_series_reads_back_and_is_stored_as_deltas(
    shared: DgfsMount, s3: S3View, series: list[Path], tmp_path: Path
) -> None:
    dest = _fresh_dir(shared, "series")
    subprocess.run(["cp", *map(str, series), str(dest)], check=True)

    # ls -l: the original names and sizes, nothing else.
    assert sorted(os.listdir(dest)) == sorted(p.name for p in series)
    for src in series:
        assert (dest / src.name).stat().st_size == src.stat().st_size
        assert sha256_file(dest / src.name) == sha256_file(src)

    shared.settle(*(dest / p.name for p in series))
    stored = s3.keys("series/")
    expected = {"series/", "series/reference.bin"} | {f"series/{p.name}.delta" for p in series}
    assert set(stored) == expected
    # The reference is a full copy of one of the files (whichever was uploaded first).
    by_sha = {sha256_file(p): p for p in series}
    ref_sha = s3.metadata("series/reference.bin")["dg-file-sha256"]
    assert ref_sha in by_sha
    assert stored["series/reference.bin"] == by_sha[ref_sha].stat().st_size
    for src in series:
        size = src.stat().st_size
        delta_size = stored[f"series/{src.name}.delta"]
        assert delta_size < size * 0.3, f"{src.name}: delta {delta_size} of {size} bytes"
        meta = s3.metadata(f"series/{src.name}.delta")
        assert meta["dg-file-sha256"] == sha256_file(src)
        assert int(meta["dg-file-size"]) == size
        assert meta["dg-ref-key"] == "series/reference.bin"
        assert meta["dg-original-name"] == src.name
    total_deltas = sum(v for k, v in stored.items() if k.endswith(".delta"))
    assert total_deltas < sum(p.stat().st_size for p in series) * 0.3

    # The real DeltaGlider CLI reads what the mount wrote.
    for src in series:
        out = dg_download(shared.endpoint, shared.bucket, f"series/{src.name}", tmp_path / src.name)
        assert sha256_file(out) == sha256_file(src)

    # After a remount (no local state but the cache dir) everything is the same.
    shared.remount()
    assert sorted(os.listdir(dest)) == sorted(p.name for p in series)
    for src in series:
        assert (dest / src.name).stat().st_size == src.stat().st_size
        assert sha256_file(dest / src.name) == sha256_file(src)


def test_stat_sizes_before_and_after_upload(shared: DgfsMount, series: list[Path]) -> None:
    dest = _fresh_dir(shared, "sizes")
    shutil.copyfile(series[0], dest / "a.zip")
    assert (dest / "a.zip").stat().st_size == series[0].stat().st_size  # pending
    shared.settle(dest / "a.zip")
    assert (dest / "a.zip").stat().st_size == series[0].stat().st_size  # in S3
    assert os.stat(dest).st_nlink >= 1


# --- edits of stored files --------------------------------------------------------


def _edit_matrix(dest: Path, local: Path, series: list[Path]) -> None:
    """Apply the same edits to a file in the mount and to a local copy."""
    for name, src in (("shrink.zip", series[1]), ("grow.zip", series[2]), ("zero.zip", series[3])):
        shutil.copyfile(src, dest / name)
        shutil.copyfile(src, local / name)
    for name in ("append.zip", "middle.zip", "rmw.zip"):
        shutil.copyfile(series[4], dest / name)
        shutil.copyfile(series[4], local / name)


def _apply_edits(root: Path) -> None:
    os.truncate(root / "shrink.zip", 1000)
    size = (root / "grow.zip").stat().st_size
    os.truncate(root / "grow.zip", size + 70_000)
    os.truncate(root / "zero.zip", 0)
    with open(root / "append.zip", "ab") as handle:
        handle.write(b"appended tail\n" * 100)
    with open(root / "middle.zip", "r+b") as handle:
        handle.seek(100_000)
        handle.write(b"X" * 5000)
        handle.seek(7)
        handle.write(b"hello")
    # open(O_RDWR), read, write back elsewhere: read-modify-write like an editor.
    with open(root / "rmw.zip", "r+b") as handle:
        head = handle.read(4096)
        handle.seek(50_000)
        handle.write(head[::-1])


def test_truncate_append_and_random_writes_on_delta_files(
    shared: DgfsMount, s3: S3View, series: list[Path], tmp_path: Path
) -> None:
    dest = _fresh_dir(shared, "edits")
    local = tmp_path / "local"
    local.mkdir()
    _edit_matrix(dest, local, series)
    names = sorted(os.listdir(local))
    # Make sure the originals are really stored as deltas before editing them.
    shared.settle(*(dest / n for n in names))
    assert {k for k in s3.keys("edits/") if k.endswith(".delta")} == {
        f"edits/{n}.delta" for n in names
    }
    _apply_edits(dest)
    _apply_edits(local)

    def compare() -> None:
        for name in names:
            data = (dest / name).read_bytes()
            expected = (local / name).read_bytes()
            assert len(data) == len(expected), name
            assert sha256_bytes(data) == sha256_bytes(expected), name

    compare()  # before the upload (staging)
    shared.settle(*(dest / n for n in names))
    for name in names:
        meta = s3.metadata(
            f"edits/{name}.delta" if s3.exists(f"edits/{name}.delta") else f"edits/{name}"
        )
        assert meta["dg-file-sha256"] == sha256_file(local / name), name
    shared.remount()
    compare()  # from S3 after a remount


def test_overwrite_with_o_trunc_replaces_content(shared: DgfsMount, series: list[Path]) -> None:
    dest = _fresh_dir(shared, "overwrite")
    shutil.copyfile(series[0], dest / "f.zip")
    shared.settle(dest / "f.zip")
    shutil.copyfile(series[5], dest / "f.zip")  # O_TRUNC over a stored delta
    assert sha256_file(dest / "f.zip") == sha256_file(series[5])
    shared.settle(dest / "f.zip")
    (dest / "f.zip").write_bytes(b"short")
    assert (dest / "f.zip").read_bytes() == b"short"
    shared.settle(dest / "f.zip")
    assert (dest / "f.zip").read_bytes() == b"short"


def test_small_and_empty_files(shared: DgfsMount, s3: S3View) -> None:
    dest = _fresh_dir(shared, "small")
    (dest / "empty").write_bytes(b"")
    (dest / "note.txt").write_text("hello\n")
    shared.settle(dest / "empty", dest / "note.txt")
    assert (dest / "empty").read_bytes() == b""
    assert (dest / "note.txt").read_text() == "hello\n"
    assert set(s3.keys("small/")) == {"small/", "small/empty", "small/note.txt"}
    assert s3.get("small/note.txt") == b"hello\n"


# --- xattrs, statfs ---------------------------------------------------------------


def test_xattrs_describe_storage(shared: DgfsMount, s3: S3View, series: list[Path]) -> None:
    dest = _fresh_dir(shared, "xattr")
    shutil.copyfile(series[0], dest / "ref.zip")
    shared.settle(dest / "ref.zip")
    shutil.copyfile(series[1], dest / "next.zip")
    (dest / "plain.txt").write_text("plain text\n")
    shared.settle(dest / "next.zip", dest / "plain.txt")
    stored = s3.keys("xattr/")

    def attr(name: str, field: str) -> str:
        return os.getxattr(dest / name, f"user.dgfs.{field}").decode()

    assert attr("next.zip", "kind") == "delta"
    assert attr("next.zip", "sha256") == sha256_file(series[1])
    assert int(attr("next.zip", "stored_size")) == stored["xattr/next.zip.delta"]
    assert int(attr("next.zip", "original_size")) == series[1].stat().st_size
    assert attr("plain.txt", "kind") == "direct"
    assert attr("plain.txt", "sha256") == sha256_bytes(b"plain text\n")
    assert int(attr("plain.txt", "stored_size")) == stored["xattr/plain.txt"]
    assert attr("plain.txt", "key") == "xattr/plain.txt"
    assert attr("plain.txt", "bucket") == shared.bucket
    assert attr("plain.txt", "endpoint") == shared.endpoint  # for `dgfs verify PATH`
    listed = set(os.listxattr(dest / "next.zip"))
    assert {"user.dgfs.kind", "user.dgfs.sha256", "user.dgfs.stored_size"} <= listed
    with pytest.raises(OSError) as info:
        os.getxattr(dest / "next.zip", "user.dgfs.nonexistent")
    assert info.value.errno == 61  # ENODATA

    # After a remount the values come from S3 metadata.
    shared.remount()
    assert attr("next.zip", "kind") == "delta"
    assert attr("next.zip", "sha256") == sha256_file(series[1])
    assert int(attr("next.zip", "stored_size")) == stored["xattr/next.zip.delta"]


def test_statfs(shared: DgfsMount) -> None:
    info = os.statvfs(shared.mountpoint)
    assert info.f_bsize > 0
    assert info.f_blocks > 0 and info.f_bavail > 0
    assert info.f_namemax == 255
    assert shutil.disk_usage(shared.mountpoint).free > 0


# --- parallel writers -------------------------------------------------------------


def test_parallel_writers(shared: DgfsMount, tmp_path: Path) -> None:
    dest = _fresh_dir(shared, "parallel")
    series = ReleaseSeries(size=SERIES_SIZE, seed=7)
    files = dict(series.zips(8))
    errors: list[BaseException] = []

    def writer(name: str, data: bytes) -> None:
        try:
            with open(dest / name, "wb") as handle:
                for start in range(0, len(data), 65536):
                    handle.write(data[start : start + 65536])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=item) for item in files.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    for name, data in files.items():
        assert sha256_file(dest / name) == sha256_bytes(data), name
    shared.settle(*(dest / n for n in files))
    shared.remount()
    for name, data in files.items():
        assert sha256_file(dest / name) == sha256_bytes(data), name


# --- names --------------------------------------------------------------------------

ODD_NAMES = [
    "name with spaces.txt",
    "ünïcödé.txt",
    "日本語.zip",
    "percent%20.zip",
    "plus+sign.txt",
    "q?mark&amp;.txt",
    "hash#.txt",
    "ﬁle-ligature.txt",
]


@pytest.mark.interop  # reads back with the DeltaGlider CLI
def test_odd_names_round_trip(
    shared: DgfsMount, s3: S3View, series: list[Path], tmp_path: Path
) -> None:
    dest = _fresh_dir(shared, "names")
    expected: dict[str, str] = {}
    for index, name in enumerate(ODD_NAMES):
        if name.endswith(".zip"):
            shutil.copyfile(series[index], dest / name)
            expected[name] = sha256_file(series[index])
        else:
            (dest / name).write_text(f"content of {name}\n")
            expected[name] = sha256_bytes(f"content of {name}\n".encode())
    shared.settle(*(dest / n for n in expected))
    # A stored delta renamed to a non-ASCII name.
    os.rename(dest / "percent%20.zip", dest / "переименован.zip")
    expected["переименован.zip"] = expected.pop("percent%20.zip")
    shared.settle(dest / "переименован.zip")
    assert sorted(os.listdir(dest)) == sorted(expected)
    stored = s3.keys("names/")
    assert "names/日本語.zip.delta" in stored
    assert "names/переименован.zip.delta" in stored
    shared.remount()
    assert sorted(os.listdir(dest)) == sorted(expected)
    for name, digest in expected.items():
        assert sha256_file(dest / name) == digest, name
    for name in ("日本語.zip", "переименован.zip"):
        out = dg_download(shared.endpoint, shared.bucket, f"names/{name}", tmp_path / "x.zip")
        assert sha256_file(out) == expected[name], name


def test_non_ascii_directory_holds_deltas(shared: DgfsMount, series: list[Path]) -> None:
    """The reference key in a delta's metadata is then non-ASCII too."""
    dest = _fresh_dir(shared, "répertoire")
    for src in series[:3]:
        shutil.copyfile(src, dest / src.name)
    shared.settle(*(dest / p.name for p in series[:3]))
    os.rename(dest, shared / "каталог")
    os.rename(shared / "каталог" / series[0].name, shared / "каталог" / "ü.zip")
    shared.remount()
    moved = shared / "каталог"
    assert sorted(os.listdir(moved)) == sorted(["ü.zip", series[1].name, series[2].name])
    assert sha256_file(moved / "ü.zip") == sha256_file(series[0])
    for src in series[1:3]:
        assert sha256_file(moved / src.name) == sha256_file(src)
    assert os.getxattr(moved / series[2].name, "user.dgfs.kind") == b"delta"


# --- what becomes a delta -------------------------------------------------------------


def test_delta_decision_by_content_size_and_ratio(
    shared: DgfsMount, s3: S3View, series: list[Path]
) -> None:
    dest = _fresh_dir(shared, "decide")
    shutil.copyfile(series[0], dest / "first.zip")  # becomes the reference
    shared.settle(dest / "first.zip")
    files = {
        "release.whl": series[1].read_bytes(),  # zip content, name not on DeltaGlider's list
        "blob.bin": series[2].read_bytes(),  # zip content under a neutral name
        "small.zip": series[3].read_bytes()[: 32 << 10],  # below min_delta_size (64 KiB)
        "noise.zip": random.Random(5).randbytes(200_000),  # no delta under max_ratio
        "data.tar.gz": gzip.compress(series[4].read_bytes(), mtime=0),  # gzip: always direct
    }
    for name, data in files.items():
        (dest / name).write_bytes(data)
    shared.settle(*(dest / n for n in files))
    stored = s3.keys("decide/")
    expected_kind = {
        "release.whl": "delta",
        "blob.bin": "delta",
        "small.zip": "direct",
        "noise.zip": "direct",
        "data.tar.gz": "direct",
    }
    for name, kind in expected_kind.items():
        assert (f"decide/{name}.delta" in stored) == (kind == "delta"), name
        assert (f"decide/{name}" in stored) == (kind == "direct"), name
        assert os.getxattr(dest / name, "user.dgfs.kind").decode() == kind, name
    for name in ("release.whl", "blob.bin"):
        assert stored[f"decide/{name}.delta"] < len(files[name]) * 0.5, name
    shared.remount()
    for name, data in files.items():
        assert sha256_file(dest / name) == sha256_bytes(data), name


# --- attributes of objects without POSIX metadata, and mount options -----------------


def test_foreign_object_defaults(shared: DgfsMount, s3: S3View) -> None:
    s3.put("foreign/plain.dat", b"someone else's bytes")
    s3.put("foreign/sub/deep.dat", b"deep")  # a directory with no marker object
    head = s3.client.head_object(Bucket=shared.bucket, Key="foreign/plain.dat")
    dest = shared / "foreign"
    assert wait_until(lambda: "plain.dat" in os.listdir(dest), 5)
    info = os.stat(dest / "plain.dat")
    assert info.st_size == len(b"someone else's bytes")
    assert stat.S_IMODE(info.st_mode) == 0o644  # 0666 & ~umask 022
    assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid())
    assert info.st_mtime_ns // 10**9 == int(head["LastModified"].timestamp())
    assert info.st_atime_ns == info.st_mtime_ns  # atime is not kept
    assert stat.S_IMODE(os.stat(dest / "sub").st_mode) == 0o755
    assert (dest / "plain.dat").read_bytes() == b"someone else's bytes"
    assert (dest / "sub" / "deep.dat").read_bytes() == b"deep"
    assert os.getxattr(dest / "plain.dat", "user.dgfs.kind") == b"foreign"


def test_posix_metadata_in_s3_uses_s3fs_keys(shared: DgfsMount, s3: S3View) -> None:
    dest = _fresh_dir(shared, "posixmeta")
    (dest / "f.txt").write_text("f")
    os.chmod(dest / "f.txt", 0o640)
    os.chown(dest / "f.txt", 1111, 2222)
    os.utime(dest / "f.txt", ns=(1_600_000_000_250_000_000,) * 2)
    shared.settle(dest / "f.txt")
    assert wait_until(lambda: s3.metadata("posixmeta/f.txt").get("uid") == "1111")
    meta = s3.metadata("posixmeta/f.txt")
    assert meta["mtime"] == "1600000000.25"
    assert int(meta["mode"]) == stat.S_IFREG | 0o640
    assert (meta["uid"], meta["gid"]) == ("1111", "2222")


def test_owner_and_mode_options(mounts: Mounts, shared: DgfsMount) -> None:
    dest = _fresh_dir(shared, "options")
    (dest / "f.txt").write_text("f")
    os.chmod(dest / "f.txt", 0o666)
    (dest / "d").mkdir(mode=0o777)
    shared.settle(dest / "f.txt")
    forced = mounts.mount(
        shared.bucket, ro=None, uid="1234", gid="2345", file_mode="600", dir_mode="700"
    )
    try:
        for path, mode in ((forced / "options" / "f.txt", 0o600), (forced / "options", 0o700)):
            info = os.stat(path)
            assert (info.st_uid, info.st_gid) == (1234, 2345), path
            assert stat.S_IMODE(info.st_mode) == mode, path
        assert stat.S_IMODE(os.stat(forced / "options" / "d").st_mode) == 0o700
    finally:
        forced.unmount()
    masked = mounts.mount(shared.bucket, ro=None, umask="077")
    try:
        shared_view = S3View(shared.endpoint, shared.bucket)
        shared_view.put("options/foreign.dat", b"x")
        shared_view.close()
        assert stat.S_IMODE(os.stat(masked / "options" / "foreign.dat").st_mode) == 0o600
        # A file with its own mode keeps it.
        assert stat.S_IMODE(os.stat(masked / "options" / "f.txt").st_mode) == 0o666
    finally:
        masked.unmount()


def test_sync_upload_close_waits_for_the_upload(mounts: Mounts, series: list[Path]) -> None:
    mount = mounts.mount(sync_upload=None, upload_delay="30")
    view = S3View(mount.endpoint, mount.bucket)
    try:
        started = time.monotonic()
        shutil.copyfile(series[0], mount / "a.zip")
        assert "a.zip.delta" in view.keys("")  # right after close returned
        assert time.monotonic() - started < 15
    finally:
        view.close()
        mount.unmount()


# --- big direct files ---------------------------------------------------------------------


def test_large_direct_file_ranged_reads(shared: DgfsMount, s3: S3View, tmp_path: Path) -> None:
    """Over 32 MiB and not an archive: stored direct, read by ranged GETs."""
    data = random.Random(9).randbytes(33 << 20)
    dest = _fresh_dir(shared, "large")
    (dest / "big.bin").write_bytes(data)
    shared.settle(dest / "big.bin")
    assert s3.keys("large/")["large/big.bin"] == len(data)
    shared.remount()
    assert os.getxattr(dest / "big.bin", "user.dgfs.kind") == b"direct"
    assert sha256_file(dest / "big.bin") == sha256_bytes(data)
    rng = random.Random(3)
    with open(dest / "big.bin", "rb", buffering=0) as handle:
        for _ in range(8):
            offset, size = rng.randrange(len(data)), rng.randrange(1, 300_000)
            handle.seek(offset)
            assert handle.read(size) == data[offset : offset + size], (offset, size)
        handle.seek(len(data) - 10)
        assert handle.read(100) == data[-10:]


def test_dgfs_sync_waits_for_the_uploads_under_a_directory(mounts: Mounts) -> None:
    """`dgfs sync DIR` returns once every file closed under DIR is in S3 (with a
    long upload delay, they are all still pending when it is called)."""
    mount = mounts.mount(upload_delay="60")
    view = S3View(mount.endpoint, mount.bucket)
    try:
        (mount / "app" / "sub").mkdir(parents=True)
        for name in ("a.txt", "sub/b.txt"):
            (mount / "app" / name).write_text(f"{name}\n")
        assert os.getxattr(mount / "app" / "a.txt", "user.dgfs.kind") == b"pending"
        result = subprocess.run(
            [dgfs_bin(), "sync", str(mount / "app")],
            capture_output=True,
            text=True,
            env=daemon_env(),
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "2 file(s) were pending and are now in S3; 0 failed" in result.stdout
        assert {"app/a.txt", "app/sub/b.txt"} <= set(view.keys("app/"))
        outside = subprocess.run(
            [dgfs_bin(), "sync", "/tmp"], capture_output=True, text=True, check=False
        )
        assert outside.returncode == 2 and "not inside a dgfs mount" in outside.stderr
    finally:
        view.close()
        mount.unmount()
