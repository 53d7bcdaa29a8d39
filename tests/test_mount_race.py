"""Two and three mounts of one bucket racing on new directories, round after round.

Each round (seeded) picks two or three of three mounts, a new directory,
one release file per mount and a small head start for some; the mounts
then create the directory and copy their file into it at once, as build
servers publishing the same release do. Whatever the order, the directory
ends with exactly one reference, every delta is made against it, every
mount reads every file back, and the DeltaGlider CLI downloads them all.

``DGFS_RACE_ROUNDS=N`` runs N rounds (default 4).
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mountutil import DgfsMount, Mounts, S3View, sha256_file, wait_until
from testsupport.dgcli import run_deltaglider
from testsupport.releases import write_series

pytestmark = [pytest.mark.mount, pytest.mark.interop]

ROUNDS = int(os.environ.get("DGFS_RACE_ROUNDS", "4"))
SEEN_WITHIN = 8.0  # listing_ttl=1 plus attr_timeout=1, with room for a slow box


@pytest.fixture(scope="module")
def trio_of_mounts(mounts: Mounts) -> list[DgfsMount]:
    first = mounts.mount()
    return [first, mounts.mount(first.bucket), mounts.mount(first.bucket)]


@pytest.fixture(autouse=True)
def _daemon_logs_clean(trio_of_mounts: list[DgfsMount]) -> Iterator[None]:
    yield
    for mount in trio_of_mounts:
        mount.check_log()


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(tmp_path_factory.mktemp("releases"), 9, size=256 << 10, seed=77)


def _digest_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def _race(writers: list[tuple[DgfsMount, Path, float]], directory: str) -> list[BaseException]:
    """Every writer, at once after its head start: mkdir -p, copy, fsync."""
    barrier = threading.Barrier(len(writers))
    errors: list[BaseException] = []

    def write(mount: DgfsMount, src: Path, head_start: float) -> None:
        try:
            barrier.wait(20)
            time.sleep(head_start)
            (mount / directory).mkdir(exist_ok=True)
            dest = mount / directory / src.name
            shutil.copyfile(src, dest)
            mount.settle(dest)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=write, args=writer) for writer in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    return errors


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_mounts_racing_on_a_new_directory(
    trio_of_mounts: list[DgfsMount], releases: list[Path], tmp_path: Path, round_: int
) -> None:
    rng = random.Random(round_)
    count = 2 + round_ % 2  # two mounts, then three, in turn
    racers = rng.sample(trio_of_mounts, count)
    files = rng.sample(releases, count)
    # Mostly a dead heat; now and then one starts a little late.
    head_starts = [rng.choice([0.0, 0.0, 0.0, 0.05, 0.2]) for _ in racers]
    directory = f"race-{round_}-{rng.randrange(1 << 30):08x}"

    errors = _race(list(zip(racers, files, head_starts, strict=True)), directory)
    assert not errors, errors

    view = S3View(racers[0].endpoint, racers[0].bucket)
    try:
        stored = view.keys(f"{directory}/")
        references = sorted(k for k in stored if k.rsplit("/", 1)[-1].startswith("reference."))
        assert references == [f"{directory}/reference.bin"], stored
        ref_sha = view.metadata(references[0])["dg-file-sha256"]
        for src in files:
            meta = view.metadata(f"{directory}/{src.name}.delta")
            assert meta["dg-ref-sha256"] == ref_sha, src.name
            assert meta["dg-file-sha256"] == sha256_file(src), src.name
    finally:
        view.close()

    for mount in trio_of_mounts:
        for src in files:
            want = sha256_file(src)
            assert wait_until(
                lambda m=mount, s=src, w=want: _digest_or_none(m / directory / s.name) == w,
                SEEN_WITHIN,
            ), (mount.mountpoint, directory, src.name)

    # One cp per file: `cp --recursive` of DeltaGlider 6.2.0 also tries to
    # download the directory's marker object (mkdir's `dir/`) and fails.
    mount = trio_of_mounts[0]
    for src in files:
        dest = tmp_path / f"dg-{src.name}"
        run_deltaglider(
            mount.endpoint, "cp", f"s3://{mount.bucket}/{directory}/{src.name}", str(dest)
        )
        assert sha256_file(dest) == sha256_file(src), src.name
