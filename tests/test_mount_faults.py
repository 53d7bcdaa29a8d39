"""A release series copied into a mount whose S3 endpoint fails at random.

The mount talks to moto through tests/faultproxy.py: answers 500, 503
and SlowDown, connections reset mid-request and mid-response, bodies cut
short, and (in one case) answers stalled past the client's read timeout,
on a seeded schedule from the first request on (the mount's own probe
included). For each case:

1. every file is copied in; each close() either succeeds or fails with a
   clean errno (recorded);
2. the unmount returns within a bound (the daemon drains its uploads);
3. a remount, still through the faulty proxy and with an empty cache, reads
   every file back: each read gives the right bytes or EIO, never others;
4. a mount straight on moto finds every file whose close() succeeded
   intact (SHA-256), one reference in the directory, no multipart upload
   left behind.

The faults injected, the closes, the EIOs and the store's retries (the
daemon's own count, from its log) are printed: ``pytest -s`` shows them.
``DGFS_FAULT_ROUNDS=N`` repeats each case with N seeds (default 1).
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.faultproxy import ALL_FAULTS, QUICK_FAULTS, FaultKind, FaultProxy, FaultSchedule
from tests.mountutil import DgfsMount, Mounts, S3View, new_bucket, sha256_file
from testsupport.releases import write_series

pytestmark = [pytest.mark.mount, pytest.mark.slow]

ROUNDS = int(os.environ.get("DGFS_FAULT_ROUNDS", "1"))
FILES = 6
UNMOUNT_BOUND = 60.0
# What a daemon behind a faulty endpoint may log: the store's retries and
# the upload pipeline's, nothing else.
EXPECTED = (
    r"retry \d/\d in",
    r"upload of \S+ failed \(.*\); retrying in",
)
_STATS = re.compile(
    r"s3://\S+: (\d+) S3 requests, (\d+) retried by botocore, (\d+) retried by dgfs"
)


@dataclass(frozen=True)
class Case:
    name: str
    rate: float
    kinds: frozenset[FaultKind]
    sync_upload: bool = False
    stalls: bool = False  # also one stalled upload and one stalled read, whatever the draw


CASES = [
    Case("rate-0.05", 0.05, QUICK_FAULTS),
    Case("rate-0.2-sync", 0.2, QUICK_FAULTS, sync_upload=True),
    Case("rate-0.1-stalls", 0.1, ALL_FAULTS, stalls=True),
]


@dataclass
class Outcome:
    closes_ok: int = 0
    close_errnos: Counter[str] = field(default_factory=Counter)
    reads_ok: int = 0
    read_errnos: Counter[str] = field(default_factory=Counter)
    unmount_seconds: list[float] = field(default_factory=list)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(tmp_path_factory.mktemp("series"), FILES, size=384 << 10, seed=91)


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(moto_endpoint, stall_seconds=2.5) as running:
        yield running


def _copy(src: Path, dest: Path) -> int | None:
    """Copy as cp does; None if every call succeeded, else the errno of the failing one."""
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        return exc.errno
    try:
        data = src.read_bytes()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 1 << 20]) :]
    except OSError as exc:
        os.close(fd)
        return exc.errno
    try:
        os.close(fd)
    except OSError as exc:
        return exc.errno
    return None


def _read_or_errno(path: Path) -> bytes | int:
    try:
        return path.read_bytes()
    except OSError as exc:
        return exc.errno or errno.EIO


def _daemon_stats(mount: DgfsMount) -> tuple[int, int, int]:
    """(requests, botocore retries, dgfs retries) summed over the daemon's runs."""
    found = [tuple(map(int, m.groups())) for m in _STATS.finditer(mount.log_text())]
    assert found, f"no request statistics in the log of {mount.mountpoint}"
    return (
        sum(f[0] for f in found),
        sum(f[1] for f in found),
        sum(f[2] for f in found),
    )


def _expect_fault_logs(mount: DgfsMount) -> None:
    for pattern in EXPECTED:
        mount.expect_log(pattern)


@pytest.mark.parametrize("round_", range(ROUNDS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_series_through_a_faulty_endpoint(
    moto_endpoint: str,
    proxy: FaultProxy,
    series: list[Path],
    tmp_path: Path,
    case: Case,
    round_: int,
) -> None:
    seed = 1000 * round_ + CASES.index(case) + 1
    bucket = new_bucket(moto_endpoint)
    outcome = Outcome()
    closed_ok: list[Path] = []
    options: dict[str, str | None] = {"s3_timeout": "1"}
    if case.sync_upload:
        options["sync_upload"] = None
    proxy.schedule = FaultSchedule(seed=seed, rate=case.rate, kinds=case.kinds)
    if case.stalls:
        proxy.inject(FaultKind.STALL, "PUT", "/rel/")
        proxy.inject(FaultKind.STALL, "GET", "/rel/")
    with Mounts(proxy.endpoint_url, tmp_path / "faulty") as faulty:
        mount = faulty.mount(bucket, start=False, **options)
        _expect_fault_logs(mount)
        mount.start()
        (mount / "rel").mkdir()
        for src in series:
            failed = _copy(src, mount / "rel" / src.name)
            if failed is None:
                outcome.closes_ok += 1
                closed_ok.append(src)
            else:
                outcome.close_errnos[errno.errorcode.get(failed, str(failed))] += 1
        started = time.monotonic()
        mount.unmount(timeout=UNMOUNT_BOUND)
        outcome.unmount_seconds.append(time.monotonic() - started)

        # Read back through the faulty endpoint with an empty cache (the key
        # is ephemeral): right bytes or EIO, never anything else.
        mount.remount()
        for src in series:
            got = _read_or_errno(mount / "rel" / src.name)
            if isinstance(got, bytes):
                assert got == src.read_bytes(), f"{src.name}: wrong bytes through the faulty mount"
                outcome.reads_ok += 1
            else:
                assert got == errno.EIO, f"{src.name}: {errno.errorcode.get(got)} (not EIO)"
                outcome.read_errnos[errno.errorcode.get(got, str(got))] += 1
        started = time.monotonic()
        mount.unmount(timeout=UNMOUNT_BOUND)
        outcome.unmount_seconds.append(time.monotonic() - started)
        requests, botocore_retries, dgfs_retries = _daemon_stats(mount)

    # Straight on moto: every file whose close() succeeded is intact.
    with Mounts(moto_endpoint, tmp_path / "direct") as direct:
        clean = direct.mount(bucket)
        for src in closed_ok:
            assert sha256_file(clean / "rel" / src.name) == sha256_file(src), src.name
        clean.unmount()
    view = S3View(moto_endpoint, bucket)
    try:
        keys = view.keys("rel/")
        assert [k for k in keys if k.endswith("reference.bin")] == ["rel/reference.bin"]
        assert not view.client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    finally:
        view.close()

    report = (
        f"[{case.name} seed {seed}] faults: {proxy.summary()}; "
        f"closes ok {outcome.closes_ok}/{len(series)}, close errnos {dict(outcome.close_errnos)}; "
        f"reads ok {outcome.reads_ok}/{len(series)}, read errnos {dict(outcome.read_errnos)}; "
        f"daemon: {requests} S3 requests, {botocore_retries} retried by botocore, "
        f"{dgfs_retries} retried by dgfs; unmounts took "
        + ", ".join(f"{s:.1f}s" for s in outcome.unmount_seconds)
    )
    print(report)
    assert sum(proxy.faults.values()) > 0, "the schedule injected nothing"
    if case.stalls:
        assert proxy.faults[FaultKind.STALL] >= 2
    assert botocore_retries + dgfs_retries > 0
