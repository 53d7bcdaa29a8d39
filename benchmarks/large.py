"""Large files: a series of 3 versions of a 2 GiB uncompressed tar, through dgfs and plain boto3.

Builds (once, seeded, kept in ~/.cache/dgfs-bench/large/) a tar of real
content -- the members of the Django release tars and the PyPI wheels and
sdists of benchmarks/series.py (downloaded into ~/.cache/dgfs-bench once,
about 250 MB, if they are not there yet), repeated in a shuffled order and
interleaved with pseudo-random blobs -- and two later versions of it with
changes spread through the whole file: members edited (bytes replaced and
inserted, so everything after shifts), inserted and removed, from the
first megabytes to the last members.

Then, on one local SeaweedFS:

- plain boto3 ``upload_file`` / ``download_file`` of each version (the
  baseline throughput);
- dgfs: ``cp`` of each version into one directory of a mount, then fsync
  (returns once the file is durable in S3); a cold read of each version
  (``cp`` out of the mount into a local file, as ``download_file`` writes
  one) from a fresh mount with an empty cache; a warm read. Every copy,
  boto3's too, is SHA-256 verified after its timing.

and reports per version the stored bytes, seconds, MB/s, ratio to boto3,
the daemon's peak RSS while storing and while reading (VmHWM, reset
between phases through /proc/PID/clear_refs), xdelta3's peak RSS (its
processes are children of the daemon; /proc is sampled every 100 ms), and
checks the daemon's peak against 300 MB + the xdelta3 window budget.
Writes benchmarks/results/large.json.

    .venv/bin/python benchmarks/large.py [--size-gb 2] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.demo import dgfs_bin, human, wait_mounted  # noqa: E402
from benchmarks.series import DEFAULT_CACHE, all_series  # noqa: E402
from testsupport.servers import S3_TEST_ENV, SeaweedServer, make_bucket, s3_client  # noqa: E402

BENCH_CACHE = DEFAULT_CACHE
DATA_DIR = BENCH_CACHE / "large"
#: Bump when the generator changes: cached series of another version are rebuilt.
GENERATOR_VERSION = 1
VERSIONS = 3
SEED = 20241129
MTIME = 1_700_000_000
#: The daemon's own memory bound (issue 11), beside xdelta3's window budget.
DAEMON_RSS_BOUND = 300 * 10**6
#: dgfs's default xdelta3 window budget (Settings.xdelta_memory).
XDELTA_WINDOW = 1 << 30
SAMPLE_SECONDS = 0.1
MB = 10**6


# --- the series ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Edit:
    """Bytes ``length`` long, made from ``seed``, at ``offset`` of a member:
    replacing what is there, or inserted before it."""

    offset: int
    length: int
    seed: int
    insert: bool


@dataclasses.dataclass(frozen=True)
class Member:
    """A tar member: a slice of a real file, or pseudo-random bytes; then edits."""

    name: str
    size: int
    path: str | None = None  # a slice of this file...
    offset: int = 0
    seed: int = 0  # ...or random bytes from this seed
    edits: tuple[Edit, ...] = ()

    def content(self) -> bytes:
        if self.path is not None:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
        else:
            data = random.Random(self.seed).randbytes(self.size)
        for edit in self.edits:
            new = _edit_bytes(edit, data)
            at = min(edit.offset, len(data))
            tail = at if edit.insert else at + len(new)
            data = data[:at] + new + data[tail:]
        return data


def _edit_bytes(edit: Edit, data: bytes) -> bytes:
    rng = random.Random(edit.seed)
    if data[:512].isascii():
        # Text stays text: a changed or added line of code.
        alphabet = b"abcdefghijklmnopqrstuvwxyz_ ()=.,0123456789\n"
        return bytes(rng.choice(alphabet) for _ in range(edit.length))
    return rng.randbytes(edit.length)


def real_sources() -> list[Member]:
    """Every regular member of the Django tars, and every PyPI file of benchmarks/series.py's
    series (downloaded into BENCH_CACHE once, as speed.py and deep.py do)."""
    print(f"   the release series in {BENCH_CACHE} (downloaded if missing)", flush=True)
    by_name = {s.name: s.paths for s in all_series(BENCH_CACHE)}
    tars = sorted(by_name["tars"])
    dists = sorted(by_name["wheels"] + by_name["sdists"] + by_name["plain-wheels"])
    members: list[Member] = []
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            for info in tar:
                if info.isfile() and info.size:
                    members.append(Member(info.name, info.size, str(tar_path), info.offset_data))
    for dist in dists:
        members.append(Member(f"dist/{dist.name}", dist.stat().st_size, str(dist)))
    return members


def first_version(size: int, rng: random.Random) -> list[Member]:
    """Rounds of the real sources (groups in a shuffled order, under ``rN/``)
    interleaved with random blobs (about a fifth of the bytes), up to ``size``."""
    sources = real_sources()
    groups: dict[str, list[Member]] = {}
    for member in sources:
        groups.setdefault(member.path or "", []).append(member)
    members: list[Member] = []
    total = 0
    blob = 0
    round_no = 0
    while total < size:
        order = list(groups)
        rng.shuffle(order)
        for group in order:
            for source in groups[group]:
                if rng.random() < 0.004:
                    blob += 1
                    blob_size = rng.randrange(256 << 10, 4 << 20)
                    members.append(
                        Member(
                            f"r{round_no}/assets/blob-{blob:05d}.bin",
                            blob_size,
                            seed=rng.getrandbits(64),
                        )
                    )
                    total += blob_size + 512
                members.append(dataclasses.replace(source, name=f"r{round_no}/{source.name}"))
                total += source.size + 512
                if total >= size:
                    return members
        round_no += 1
    return members


def next_version(members: list[Member], rng: random.Random, version: int) -> list[Member]:
    """Edits, insertions and removals spread evenly through ``members`` (and at its end)."""
    result = list(members)
    n = len(result)
    changed = sorted(set(rng.sample(range(n), max(8, n * 3 // 1000))) | {n - 1, n - 3})
    for index in changed:
        member = result[index]
        edits = tuple(
            Edit(
                rng.randrange(member.size + 1),
                rng.randrange(16, 2048),
                rng.getrandbits(64),
                insert=rng.random() < 0.5,
            )
            for _ in range(rng.randint(1, 3))
        )
        result[index] = dataclasses.replace(member, edits=member.edits + edits)
    removed = set(rng.sample(range(n - 2), max(3, n // 2000))) | {n - 2}
    inserts: dict[int, list[Member]] = {}
    for k in range(max(3, n // 2000)):
        at = rng.randrange(n) if k else n - 1  # one near the very end
        if rng.random() < 0.5:
            blob_size = rng.randrange(64 << 10, 1 << 20)
            new = Member(f"v{version}/new-{k}.bin", blob_size, seed=rng.getrandbits(64))
        else:
            source = result[rng.randrange(n)]
            new = dataclasses.replace(source, name=f"v{version}/new-{k}-{Path(source.name).name}")
        inserts.setdefault(at, []).append(new)
    out: list[Member] = []
    for index, member in enumerate(result):
        out.extend(inserts.get(index, []))
        if index not in removed:
            out.append(member)
    return out


class _HashingFile:
    """A write-only file that hashes what goes through it (tarfile needs tell())."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self._f.close()


def write_tar(path: Path, members: list[Member]) -> tuple[int, str]:
    tmp = path.with_suffix(".partial")
    out = _HashingFile(tmp)
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:  # type: ignore[call-overload]
        for member in members:
            data = member.content()
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            info.mtime = MTIME
            info.mode = 0o644
            tar.addfile(info, _Reader(data))
    out.close()
    tmp.rename(path)
    return out.size, out.digest.hexdigest()


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._pos + size
        chunk = self._data[self._pos : end]
        self._pos += len(chunk)
        return bytes(chunk)

    def readinto(self, buffer: Any) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def series(size: int) -> list[dict[str, Any]]:
    """The cached series of ``size`` bytes (built if absent): name, path, size, sha256."""
    directory = DATA_DIR / f"{size >> 20}M"
    manifest_path = directory / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("generator") == GENERATOR_VERSION and all(
            Path(f["path"]).exists() and Path(f["path"]).stat().st_size == f["size"] for f in files
        ):
            return list(files)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    members = first_version(size, rng)
    files = []
    for version in range(1, VERSIONS + 1):
        if version > 1:
            members = next_version(members, rng, version)
        path = directory / f"data-{version}.tar"
        print(f"   writing {path} ({len(members)} members)", flush=True)
        written, digest = write_tar(path, members)
        files.append({"name": path.name, "path": str(path), "size": written, "sha256": digest})
    manifest_path.write_text(
        json.dumps({"generator": GENERATOR_VERSION, "seed": SEED, "files": files}, indent=2)
    )
    return files


# --- measuring ---------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _children(pid: int) -> Iterator[tuple[int, str]]:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        # comm is in parentheses and may hold spaces; ppid is the 2nd field after it.
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            yield int(entry.name), comm


class RssSampler:
    """Peak RSS of a daemon (VmHWM, reset at start) and of its xdelta3 children.

    With ``profile`` (a path), py-spy records the daemon meanwhile (collapsed stacks).
    """

    def __init__(self, pid: int, profile: Path | None = None) -> None:
        self.pid = pid
        self.profile = profile
        self._spy: subprocess.Popen[bytes] | None = None
        self.xdelta_peak_kib = 0
        self.daemon_sampled_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        # "5" resets VmHWM to the current RSS (Linux >= 4.0): a peak per phase.
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        if self.profile is not None:
            self._spy = subprocess.Popen(
                [
                    py_spy(),
                    "record",
                    "--pid",
                    str(self.pid),
                    "--format",
                    "raw",
                    "--threads",
                    "--idle",
                    "--rate",
                    "50",
                    "--output",
                    str(self.profile),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._spy is not None:
            self._spy.send_signal(signal.SIGINT)
            self._spy.wait(timeout=60)
        self._stop.set()
        self._thread.join()
        self.daemon_peak_kib = _status_kib(self.pid, "VmHWM")

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.daemon_sampled_kib = max(self.daemon_sampled_kib, _status_kib(self.pid, "VmRSS"))
            for child, comm in _children(self.pid):
                if comm.startswith("xdelta3"):
                    self.xdelta_peak_kib = max(self.xdelta_peak_kib, _status_kib(child, "VmHWM"))

    def result(self) -> dict[str, float]:
        return {
            "daemon_peak_mb": self.daemon_peak_kib * 1024 / MB,
            "xdelta3_peak_mb": self.xdelta_peak_kib * 1024 / MB,
        }


def py_spy() -> str:
    candidate = Path(sys.executable).with_name("py-spy")
    return str(candidate) if candidate.exists() else "py-spy"


def file_sha256(path: Path) -> str:
    """SHA-256 of a local file (hashlib: SHA-NI where the CPU has it; coreutils'
    sha256sum here does ~250 MB/s and would be what a timing measured)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def copy_out(path: Path, dest: Path) -> float:
    """Copy a file out of the mount into a local file, as ``cp`` does (1 MiB
    pieces, its st_blksize): what download_file does. Returns the seconds
    until the first piece came."""
    t0 = time.monotonic()
    first = None
    with open(path, "rb", buffering=0) as src, open(dest, "wb") as out:
        while piece := src.read(1 << 20):
            if first is None:
                first = time.monotonic() - t0
            out.write(piece)
    return first if first is not None else time.monotonic() - t0


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t0 = time.monotonic()
    value = fn(*args)
    return time.monotonic() - t0, value


class Mount:
    """A dgfs mount in the foreground (its PID is the daemon's)."""

    #: More ``-o`` options for every mount (``--mount-options``).
    extra_options = ""

    def __init__(self, endpoint: str, bucket: str, mnt: Path, cache: Path, log: Path) -> None:
        self.mnt = mnt
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        options = f"endpoint={endpoint},cache_dir={cache},cache_size=64G,log_level=info"
        if self.extra_options:
            options += "," + self.extra_options
        self.process = subprocess.Popen(
            [dgfs_bin(), "mount", bucket, str(mnt), "-f", "-o", options], stderr=self._log
        )
        try:
            wait_mounted(mnt)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False)
        try:
            self.process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the run -------------------------------------------------------------------------


def _profile(directory: Path | None, phase: str, f: dict[str, Any]) -> Path | None:
    return None if directory is None else directory / f"{phase}-{f['name']}.txt"


def run(files: list[dict[str, Any]], work: Path, profile: Path | None = None) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {f["name"]: {"size": f["size"]} for f in files}
    log_path = work / "daemon.log"
    with SeaweedServer(stop_timeout=5) as server:
        endpoint = server.endpoint_url
        make_bucket(endpoint, "plain")
        make_bucket(endpoint, "dgfs")
        client = s3_client(endpoint, timeout=120)
        print("== plain boto3 upload_file / download_file")
        for f in files:
            row = rows[f["name"]]
            row["boto3_upload_s"], _ = timed(client.upload_file, f["path"], "plain", f["name"])
            dest = work / "download.tmp"
            row["boto3_download_s"], _ = timed(client.download_file, "plain", f["name"], str(dest))
            if file_sha256(dest) != f["sha256"]:
                raise SystemExit(f"boto3 gave back wrong bytes for {f['name']}")
            dest.unlink()
            up, down = row["boto3_upload_s"], row["boto3_download_s"]
            print(f"   {f['name']}: up {up:.1f} s, down {down:.1f} s")
        client.close()

        print("== dgfs: cp + fsync of each version into one directory")
        mnt = work / "mnt"
        mnt.mkdir()
        mount = Mount(endpoint, "dgfs", mnt, work / "cache-store", log_path)
        try:
            (mnt / "series").mkdir()
            for f in files:
                row = rows[f["name"]]
                target = mnt / "series" / f["name"]
                with RssSampler(mount.pid, _profile(profile, "store", f)) as sampler:
                    t0 = time.monotonic()
                    subprocess.run(["cp", f["path"], str(target)], check=True)
                    row["dgfs_cp_s"] = time.monotonic() - t0
                    fsync(target)
                    row["dgfs_store_s"] = time.monotonic() - t0
                row["store_rss"] = sampler.result()
                row["kind"] = os.getxattr(target, "user.dgfs.kind").decode()
                row["stored_bytes"] = int(os.getxattr(target, "user.dgfs.stored_size"))
                print(
                    f"   {f['name']}: {row['dgfs_store_s']:.1f} s (cp {row['dgfs_cp_s']:.1f} s),"
                    f" {row['kind']} {human(row['stored_bytes'])}, rss {row['store_rss']}"
                )
        finally:
            mount.close()

        print("== dgfs: cold read (fresh mount, empty cache) and warm read of each version")
        for f in files:
            row = rows[f["name"]]
            cache = work / f"cache-read-{f['name']}"
            mount = Mount(endpoint, "dgfs", mnt, cache, log_path)
            try:
                path = mnt / "series" / f["name"]
                dest = work / "read.tmp"
                # Timed like boto3's download_file: the bytes into a local file;
                # then checked, untimed, for both.
                with RssSampler(mount.pid, _profile(profile, "read", f)) as sampler:
                    row["dgfs_cold_read_s"], row["dgfs_cold_first_byte_s"] = timed(
                        copy_out, path, dest
                    )
                if file_sha256(dest) != f["sha256"]:
                    raise SystemExit(f"dgfs gave back wrong bytes for {f['name']} (cold)")
                row["read_rss"] = sampler.result()
                row["dgfs_warm_read_s"], _ = timed(copy_out, path, dest)
                if file_sha256(dest) != f["sha256"]:
                    raise SystemExit(f"dgfs gave back wrong bytes for {f['name']} (warm)")
                dest.unlink()
                print(
                    f"   {f['name']}: cold {row['dgfs_cold_read_s']:.1f} s"
                    f" (first byte {row['dgfs_cold_first_byte_s']:.1f} s),"
                    f" warm {row['dgfs_warm_read_s']:.1f} s, rss {row['read_rss']}"
                )
            finally:
                mount.close()
                shutil.rmtree(cache, ignore_errors=True)

        client = s3_client(endpoint)
        listing = client.list_objects_v2(Bucket="dgfs", Prefix="series/")
        objects = {o["Key"]: o["Size"] for o in listing.get("Contents", [])}
        client.close()
    log_text = log_path.read_text(errors="replace")
    if "ERROR" in log_text or "Traceback" in log_text:
        print(log_text[-3000:])
    return {"rows": rows, "objects": objects}


def summarize(files: list[dict[str, Any]], measured: dict[str, Any]) -> dict[str, Any]:
    rows = measured["rows"]
    bound_mb = (DAEMON_RSS_BOUND + XDELTA_WINDOW) / MB
    for f in files:
        row = rows[f["name"]]
        size = row["size"]
        for what, base in (
            ("dgfs_store_s", "boto3_upload_s"),
            ("dgfs_cold_read_s", "boto3_download_s"),
            ("dgfs_warm_read_s", "boto3_download_s"),
        ):
            row[what.removesuffix("_s") + "_ratio_to_boto3"] = row[what] / row[base]
        for what in (
            "boto3_upload_s",
            "boto3_download_s",
            "dgfs_store_s",
            "dgfs_cold_read_s",
            "dgfs_warm_read_s",
        ):
            row[what.removesuffix("_s") + "_mb_per_s"] = size / MB / row[what]
        row["daemon_rss_within_bound"] = all(
            row[phase]["daemon_peak_mb"] <= bound_mb for phase in ("store_rss", "read_rss")
        )
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores,"
        f" {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 30} GiB RAM",
        "command": "benchmarks/large.py " + " ".join(sys.argv[1:]),
        "daemon_rss_bound_mb": bound_mb,
        "xdelta3_window_budget": XDELTA_WINDOW,
        "files": files,
        **measured,
    }


def print_table(result: dict[str, Any]) -> None:
    rows = result["rows"]
    reference = sum(
        size for key, size in result["objects"].items() if key.endswith("reference.bin")
    )
    print(f"\nreference.bin (a full copy of the first version): {human(reference)}")
    columns = [
        ("version", 11, lambda name, row: name),
        ("size", 10, lambda name, row: human(row["size"])),
        ("stored", 10, lambda name, row: human(row["stored_bytes"])),
    ]
    for label, key in (
        ("boto3 up", "boto3_upload"),
        ("dgfs store", "dgfs_store"),
        ("boto3 down", "boto3_download"),
        ("cold read", "dgfs_cold_read"),
        ("warm read", "dgfs_warm_read"),
    ):
        columns.append((label, 10, _speed(key)))
        if key.startswith("dgfs"):
            columns.append(("x boto3", 7, _ratio(key)))
        if key == "dgfs_cold_read":
            columns.append(("1st byte", 8, _seconds("dgfs_cold_first_byte_s")))
    for label, phase, who in (
        ("rss store", "store_rss", "daemon_peak_mb"),
        ("rss read", "read_rss", "daemon_peak_mb"),
        ("xd3 store", "store_rss", "xdelta3_peak_mb"),
        ("xd3 read", "read_rss", "xdelta3_peak_mb"),
    ):
        columns.append((label, 9, _memory(phase, who)))
    print(" ".join(f"{label:>{width}}" for label, width, _ in columns))
    for name, row in rows.items():
        print(" ".join(f"{fn(name, row):>{width}}" for _, width, fn in columns))
    ok = all(row["daemon_rss_within_bound"] for row in rows.values())
    print(
        f"daemon peak RSS <= {result['daemon_rss_bound_mb']:.0f} MB"
        f" (300 MB + the xdelta3 window budget): {'yes' if ok else 'NO'}"
    )


def _speed(key: str) -> Any:
    return lambda name, row: f"{row[key + '_mb_per_s']:.0f} MB/s"


def _seconds(key: str) -> Any:
    return lambda name, row: f"{row[key]:.1f} s"


def _ratio(key: str) -> Any:
    return lambda name, row: f"{row[key + '_ratio_to_boto3']:.2f}"


def _memory(phase: str, who: str) -> Any:
    return lambda name, row: f"{row[phase][who]:.0f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gb", type=float, default=2.0, help="size of each version (GiB)")
    parser.add_argument("--quick", action="store_true", help="256 MiB versions: a smoke run")
    parser.add_argument(
        "--profile", type=Path, help="record py-spy profiles (collapsed stacks) of each phase here"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--mount-options", default="", help="more -o options for the dgfs mounts (xdelta_level=1)"
    )
    parser.add_argument("--output", type=Path, help="default: benchmarks/results/large.json")
    args = parser.parse_args()
    os.environ.update(S3_TEST_ENV)
    Mount.extra_options = args.mount_options
    size = 256 << 20 if args.quick else int(args.size_gb * (1 << 30))
    print(f"== series of {VERSIONS} tars of {human(size)} in {DATA_DIR}")
    files = series(size)
    work = Path(tempfile.mkdtemp(prefix="dgfs-large-"))
    try:
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)  # py-spy does not create it
        measured = run(files, work, args.profile)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = summarize(files, measured)
    print_table(result)
    name = "large-quick.json" if args.quick else "large.json"
    output = args.output or ROOT / "benchmarks" / "results" / name
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
