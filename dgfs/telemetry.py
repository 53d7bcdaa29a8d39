"""The counters of one mount (or one CLI run), in one place.

The S3 store, the cache, the journal and the upload pipeline call the
small ``Telemetry`` methods below; ``dgfs status`` (dgfs/control.py) and
the Prometheus endpoint (dgfs/metrics.py) read ``snapshot()``. Nothing
here knows FUSE, boto3 or Prometheus, and nothing here blocks: callers
run on the trio thread and in worker threads (cache, journal), so every
change happens under one lock.

Values that describe the present rather than count events (uploads
pending, cache size, journal slots) are not kept here: the daemon reads
them from their owners when it answers (see dgfs/control.py).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

#: Upper bounds (seconds) of the duration histograms' buckets; +Inf is implied.
DURATION_BUCKETS: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

#: Failed uploads remembered with their paths (the count keeps growing beyond).
MAX_FAILED_REMEMBERED = 100


@dataclass
class Histogram:
    """Observations of a duration: non-cumulative counts per bucket, sum and count."""

    bounds: tuple[float, ...] = DURATION_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``[(upper bound, observations <= bound), ..., (inf, count)]`` (Prometheus' form)."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total, self.count)


@dataclass(frozen=True)
class FailedUpload:
    """An upload that failed for good: which file, why, and where its bytes are kept."""

    path: str  # in the mount, relative to its root
    key: str
    error: str
    errno_name: str  # what fsync()/close() reported to the writer
    kept_in: str  # the journal's failed/ copy of the data
    at: float  # time.time()


@dataclass(frozen=True)
class Snapshot:
    """A consistent copy of every counter at one moment."""

    started_at: float
    uptime_seconds: float
    bytes_written: int
    uploads: dict[str, int]  # kind (delta, direct, deep-delta...) -> files stored
    uploaded_original_bytes: int
    uploaded_stored_bytes: int
    upload_retries: int
    uploads_failed: int
    failed: tuple[FailedUpload, ...]
    upload_seconds: Histogram
    rebuild_seconds: Histogram
    cache_hits: int
    cache_misses: int
    cache_evictions: int
    cache_evicted_bytes: int
    s3_requests: dict[str, int]  # operation -> requests sent (every attempt)
    s3_errors: dict[tuple[str, str], int]  # (operation, error kind) -> failed attempts
    s3_retries: int  # requests dgfs repeated after botocore gave up
    s3_api_calls: int  # botocore API calls (a multipart upload makes several)
    s3_http_requests: int  # HTTP requests botocore sent for them
    journal_commits: int

    @property
    def s3_botocore_retries(self) -> int:
        return max(0, self.s3_http_requests - self.s3_api_calls)

    def s3_summary(self) -> str:
        """The line a store logs when it closes: how flaky the endpoint was."""
        return (
            f"{self.s3_api_calls} S3 requests, {self.s3_botocore_retries} retried by botocore,"
            f" {self.s3_retries} retried by dgfs"
        )

    @property
    def uploaded_files(self) -> int:
        return sum(self.uploads.values())

    @property
    def ratio(self) -> float | None:
        """Stored bytes per original byte of what was uploaded (None before any upload)."""
        if not self.uploaded_original_bytes:
            return None
        return self.uploaded_stored_bytes / self.uploaded_original_bytes

    @property
    def cache_hit_rate(self) -> float | None:
        lookups = self.cache_hits + self.cache_misses
        return self.cache_hits / lookups if lookups else None


class Telemetry:
    """Event counters; every method is cheap and safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self._bytes_written = 0
        self._uploads: Counter[str] = Counter()
        self._uploaded_original = 0
        self._uploaded_stored = 0
        self._upload_retries = 0
        self._uploads_failed = 0
        self._failed: list[FailedUpload] = []
        self._upload_seconds = Histogram()
        self._rebuild_seconds = Histogram()
        self._cache_hits = 0
        self._cache_misses = 0
        self._cache_evictions = 0
        self._cache_evicted_bytes = 0
        self._s3_requests: Counter[str] = Counter()
        self._s3_errors: Counter[tuple[str, str]] = Counter()
        self._s3_retries = 0
        self._s3_api_calls = 0
        self._s3_http_requests = 0
        self._journal_commits = 0

    # --- the filesystem and its uploads -------------------------------------------------

    def wrote(self, nbytes: int) -> None:
        """Users wrote ``nbytes`` through the mount (write(2) calls, before any delta)."""
        with self._lock:
            self._bytes_written += nbytes

    def uploaded(self, kind: str, original_size: int, stored_size: int, seconds: float) -> None:
        with self._lock:
            self._uploads[kind] += 1
            self._uploaded_original += original_size
            self._uploaded_stored += stored_size
            self._upload_seconds.observe(seconds)

    def upload_retried(self) -> None:
        with self._lock:
            self._upload_retries += 1

    def upload_failed(self, failure: FailedUpload) -> None:
        with self._lock:
            self._uploads_failed += 1
            if len(self._failed) < MAX_FAILED_REMEMBERED:
                self._failed.append(failure)

    def rebuilt(self, seconds: float) -> None:
        """A delta was reconstructed for a read that found it in no cache."""
        with self._lock:
            self._rebuild_seconds.observe(seconds)

    def journal_committed(self) -> None:
        with self._lock:
            self._journal_commits += 1

    # --- the cache --------------------------------------------------------------------

    def cache_lookup(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self._cache_hits += 1
            else:
                self._cache_misses += 1

    def cache_evicted(self, stored_bytes: int) -> None:
        with self._lock:
            self._cache_evictions += 1
            self._cache_evicted_bytes += stored_bytes

    # --- S3 -----------------------------------------------------------------------------

    def s3_request(self, operation: str) -> None:
        with self._lock:
            self._s3_requests[operation] += 1

    def s3_api_call(self) -> None:
        """botocore makes one API call (its retries are ``s3_http_request``s)."""
        with self._lock:
            self._s3_api_calls += 1

    def s3_http_request(self) -> None:
        with self._lock:
            self._s3_http_requests += 1

    def s3_error(self, operation: str, kind: str, *, retried: bool) -> None:
        """A request failed with the dgfs error class ``kind`` (AccessDenied, NotFound...)."""
        with self._lock:
            self._s3_errors[(operation, kind)] += 1
            if retried:
                self._s3_retries += 1

    # --- reading ------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(
                started_at=self.started_at,
                uptime_seconds=time.monotonic() - self._started_mono,
                bytes_written=self._bytes_written,
                uploads=dict(self._uploads),
                uploaded_original_bytes=self._uploaded_original,
                uploaded_stored_bytes=self._uploaded_stored,
                upload_retries=self._upload_retries,
                uploads_failed=self._uploads_failed,
                failed=tuple(self._failed),
                upload_seconds=self._upload_seconds.copy(),
                rebuild_seconds=self._rebuild_seconds.copy(),
                cache_hits=self._cache_hits,
                cache_misses=self._cache_misses,
                cache_evictions=self._cache_evictions,
                cache_evicted_bytes=self._cache_evicted_bytes,
                s3_requests=dict(self._s3_requests),
                s3_errors=dict(self._s3_errors),
                s3_retries=self._s3_retries,
                s3_api_calls=self._s3_api_calls,
                s3_http_requests=self._s3_http_requests,
                journal_commits=self._journal_commits,
            )
