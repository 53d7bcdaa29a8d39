"""Real mounts: several mounts of one bucket, as several build servers have.

Mounts share nothing but the bucket: changes made through one appear in
the other within ``listing_ttl`` plus the kernel's attribute timeout; two
mounts creating the first file of a directory end up with one reference.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mountutil import (
    DgfsMount,
    Mounts,
    S3View,
    sha256_file,
    wait_until,
)
from testsupport.releases import write_series

pytestmark = pytest.mark.mount

SEEN_WITHIN = 6.0  # listing_ttl=1 plus attr_timeout=1, with room for a slow box


@pytest.fixture(scope="module")
def pair(mounts: Mounts) -> tuple[DgfsMount, DgfsMount]:
    first = mounts.mount()
    second = mounts.mount(first.bucket)
    return first, second


@pytest.fixture(autouse=True)
def _daemon_logs_clean(pair: tuple[DgfsMount, DgfsMount]) -> Iterator[None]:
    yield
    for mount in pair:
        mount.check_log()


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(tmp_path_factory.mktemp("series"), 4, size=512 << 10, seed=61)


def _digest_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def test_changes_appear_in_the_other_mount(
    pair: tuple[DgfsMount, DgfsMount], series: list[Path]
) -> None:
    a, b = pair
    (a / "shared").mkdir()
    shutil.copyfile(series[0], a / "shared" / "f.zip")
    a.settle(a / "shared" / "f.zip")
    assert wait_until(
        lambda: _digest_or_none(b / "shared" / "f.zip") == sha256_file(series[0]), SEEN_WITHIN
    )
    assert (b / "shared" / "f.zip").stat().st_size == series[0].stat().st_size

    # Overwritten through b: a reads the new bytes.
    shutil.copyfile(series[1], b / "shared" / "f.zip")
    b.settle(b / "shared" / "f.zip")
    assert wait_until(
        lambda: _digest_or_none(a / "shared" / "f.zip") == sha256_file(series[1]), SEEN_WITHIN
    )
    assert (a / "shared" / "f.zip").stat().st_size == series[1].stat().st_size

    # Removed through a: gone from b.
    os.unlink(a / "shared" / "f.zip")
    assert wait_until(
        lambda: os.listdir(b / "shared") == [] and not (b / "shared" / "f.zip").exists(),
        SEEN_WITHIN,
    )


def test_two_mounts_create_the_first_file_of_a_directory_at_once(
    pair: tuple[DgfsMount, DgfsMount], series: list[Path]
) -> None:
    a, b = pair
    (a / "race").mkdir()
    assert wait_until(lambda: (b / "race").is_dir(), SEEN_WITHIN)
    _write_at_once(
        [
            (a, series[2], a / "race" / series[2].name),
            (b, series[3], b / "race" / series[3].name),
        ]
    )
    view = S3View(a.endpoint, a.bucket)
    try:
        stored = view.keys("race/")
        assert {k for k in stored if k.endswith("reference.bin")} == {"race/reference.bin"}
        ref_sha = view.metadata("race/reference.bin")["dg-file-sha256"]
        for src in (series[2], series[3]):
            meta = view.metadata(f"race/{src.name}.delta")
            assert meta["dg-ref-sha256"] == ref_sha, src.name
    finally:
        view.close()
    for mount in (a, b):
        for src in (series[2], series[3]):
            assert wait_until(
                lambda m=mount, s=src: _digest_or_none(m / "race" / s.name) == sha256_file(s),
                SEEN_WITHIN,
            ), (mount.mountpoint, src.name)


def _write_at_once(writes: list[tuple[DgfsMount, Path, Path]]) -> None:
    """Each ``(mount, source, destination)`` copied and fsync'd, all starting together."""
    barrier = threading.Barrier(len(writes))
    errors: list[BaseException] = []

    def write(mount: DgfsMount, src: Path, dest: Path) -> None:
        try:
            barrier.wait(10)
            shutil.copyfile(src, dest)
            mount.settle(dest)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=w) for w in writes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors


def test_two_mounts_writing_one_name_at_once_keep_one_whole_version(
    pair: tuple[DgfsMount, DgfsMount], series: list[Path], tmp_path: Path
) -> None:
    """Two build servers write one name at the same moment, one a version
    that is stored as a delta, the other bytes that are stored whole: round
    after round, S3 ends holding one form of the name, and both mounts read
    that version exactly (tests/test_two_mounts.py drives the interleavings
    one by one in-process; this is the same race on real mounts). The mount
    whose form lost failed its reads ("not found", an ERROR line each)
    until its listing expired."""
    a, b = pair
    (a / "same").mkdir()
    shutil.copyfile(series[0], a / "same" / "base.zip")
    a.settle(a / "same" / "base.zip")
    assert wait_until(lambda: (b / "same" / "base.zip").exists(), SEEN_WITHIN)
    unrelated = tmp_path / "unrelated.zip"
    unrelated.write_bytes(os.urandom(256 << 10))
    digests = {sha256_file(series[1]), sha256_file(unrelated)}
    view = S3View(a.endpoint, a.bucket)
    try:
        for round_ in range(4):
            name = f"x{round_}.zip"
            _write_at_once([(a, series[1], a / "same" / name), (b, unrelated, b / "same" / name)])
            forms = {k for k in view.keys("same/") if k.startswith(f"same/{name}")}
            assert len(forms) == 1, (round_, forms)
            survivor = view.metadata(forms.pop())
            stored_sha = survivor.get("dg-file-sha256") or survivor.get("file_sha256")
            assert stored_sha in digests, (round_, survivor)
            for mount in (a, b):  # each within the time changes take to show
                path = mount / "same" / name
                assert wait_until(
                    lambda p=path, sha=stored_sha: _digest_or_none(p) == sha, SEEN_WITHIN
                ), (round_, mount.mountpoint)
    finally:
        view.close()


def test_two_mounts_sharing_one_cache_dir(mounts: Mounts, series: list[Path]) -> None:
    """The second mount takes its own journal slot; both upload everything."""
    first = mounts.mount(upload_delay="30")
    second = mounts.mount(first.bucket, cache_dir=first.cache_dir, upload_delay="30")
    shutil.copyfile(series[0], first / "one.zip")
    shutil.copyfile(series[1], second / "two.zip")
    second.unmount()
    first.unmount()
    view = S3View(first.endpoint, first.bucket)
    try:
        assert {"one.zip.delta", "two.zip.delta"} <= set(view.keys())
    finally:
        view.close()
    first.remount(upload_delay="0.2")
    assert sha256_file(first / "one.zip") == sha256_file(series[0])
    assert sha256_file(first / "two.zip") == sha256_file(series[1])
    first.unmount()
