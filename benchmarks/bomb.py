"""A zip bomb copied into a deep directory of a real mount (issue 17's target).

Mounts a bucket on a local moto_server in the foreground with
``-o deltas=deep``, stores a first release (the directory's
``reference.deep``), then ``cp``s a zip of ~5 MB whose members (deflated
by zlib, so deep mode can reproduce and expand them) inflate to 3 GiB, and
waits until its object is in the bucket. Meanwhile it samples the
daemon's resident set and the bytes held in the mount's scratch
directory. Target: stored and durable within 2 minutes, the daemon under
600 MB RSS, scratch never over the expansion cap (``expand_ratio`` × the
file's size, at most ``expand_max``). The file is then read back and
compared. Writes benchmarks/results/bomb.json.

    .venv/bin/python benchmarks/bomb.py [--inflated-gib 3] [--mount-options expand_ratio=100]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.demo import dgfs_bin, wait_mounted  # noqa: E402
from dgfs.deep.expand import ExpansionLimits  # noqa: E402
from testsupport.bombs import zeros_zip  # noqa: E402
from testsupport.releases import ReleaseSeries  # noqa: E402
from testsupport.servers import S3_TEST_ENV, MotoServer, make_bucket, s3_client  # noqa: E402

MB = 10**6
MiB = 1 << 20
TARGET_SECONDS = 120
TARGET_RSS = 600 * MB
SAMPLE_SECONDS = 0.01


def status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def held_bytes(directory: Path) -> int:
    """Bytes allocated on disk by the files under ``directory`` now."""
    total = 0
    for path, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(path, name)).st_blocks * 512
    return total


class Sampler:
    """Peak daemon RSS (VmHWM, reset at start; and sampled) and peak scratch bytes."""

    def __init__(self, pid: int, scratch: Path) -> None:
        self.pid = pid
        self.scratch = scratch
        self.scratch_peak = 0
        self.rss_sampled_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.rss_peak_kib = max(status_kib(self.pid, "VmHWM"), self.rss_sampled_kib)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.rss_sampled_kib = max(self.rss_sampled_kib, status_kib(self.pid, "VmRSS"))
            self.scratch_peak = max(self.scratch_peak, held_bytes(self.scratch))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def stored_key(client: object, bucket: str, key: str) -> str | None:
    """The object that holds ``key`` (its delta or the file direct), if stored."""
    for candidate in (key + ".delta", key):
        try:
            client.head_object(Bucket=bucket, Key=candidate)  # type: ignore[attr-defined]
            return candidate
        except Exception:  # noqa: BLE001 - 404: not (yet) there
            continue
    return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inflated-gib", type=float, default=3.0)
    parser.add_argument("--filler-mib", type=float, default=2.0, help="random stored member")
    parser.add_argument("--mount-options", default="", help="extra -o options")
    args = parser.parse_args()
    os.environ.update(S3_TEST_ENV)
    work = Path(tempfile.mkdtemp(prefix="dgfs-bomb-"))
    bomb = work / "bomb.zip"
    bomb.write_bytes(
        zeros_zip(int(args.inflated_gib * (1 << 30)), filler=int(args.filler_mib * MiB))
    )
    first = work / "app-1.0.zip"
    first.write_bytes(next(ReleaseSeries(size=4 * MiB).zips(1))[1])
    allowance = ExpansionLimits().allowance(bomb.stat().st_size)
    print(f"== {bomb.stat().st_size:,} byte zip, {args.inflated_gib:g} GiB inflated")
    mnt = work / "mnt"
    mnt.mkdir()
    cache = work / "cache"
    results: dict[str, object] = {
        "zip_bytes": bomb.stat().st_size,
        "inflated_bytes": int(args.inflated_gib * (1 << 30)),
    }
    with MotoServer() as server:
        make_bucket(server.endpoint_url, "bomb")
        client = s3_client(server.endpoint_url)
        options = f"endpoint={server.endpoint_url},cache_dir={cache},deltas=deep,log_level=info"
        if args.mount_options:
            options += "," + args.mount_options
        log_path = work / "daemon.log"
        with open(log_path, "wb") as daemon_log:
            daemon = subprocess.Popen(
                [dgfs_bin(), "mount", "bomb", str(mnt), "-f", "-o", options], stderr=daemon_log
            )
            try:
                wait_mounted(mnt)
                (mnt / "deep").mkdir()
                subprocess.run(["cp", str(first), str(mnt / "deep" / first.name)], check=True)
                subprocess.run(["sync", "-f", str(mnt / "deep" / first.name)], check=True)
                scratch = next(cache.rglob("scratch"))
                # Held before: the decrypted copy of the reference xdelta3 reads.
                results["scratch_before_mb"] = held_bytes(scratch) / MB
                with Sampler(daemon.pid, scratch) as sampler:
                    started = time.monotonic()
                    subprocess.run(["cp", str(bomb), str(mnt / "deep" / "bomb.zip")], check=True)
                    results["cp_seconds"] = time.monotonic() - started
                    key = None
                    while key is None and time.monotonic() - started < 600:
                        key = stored_key(client, "bomb", "deep/bomb.zip")
                        time.sleep(0.05)
                    results["durable_seconds"] = time.monotonic() - started
                results["stored_as"] = key
                results["daemon_peak_rss_mb"] = sampler.rss_peak_kib * 1024 / MB
                results["scratch_peak_mb"] = sampler.scratch_peak / MB
                results["expansion_cap_mb"] = allowance / MB
                head = client.head_object(Bucket="bomb", Key=key)
                results["stored_bytes"] = head["ContentLength"]
                results["read_back_equal"] = sha256(mnt / "deep" / "bomb.zip") == sha256(bomb)
            finally:
                subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
                try:
                    daemon.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    daemon.kill()
        log_text = log_path.read_text(errors="replace")
        results["log"] = [line for line in log_text.splitlines() if "bomb.zip" in line]
    subprocess.run(["rm", "-rf", str(work)], check=False)
    met = (
        results.get("stored_as") is not None
        and float(results["durable_seconds"]) <= TARGET_SECONDS  # type: ignore[arg-type]
        and float(results["daemon_peak_rss_mb"]) * MB < TARGET_RSS  # type: ignore[arg-type]
        and float(results["scratch_peak_mb"]) - float(results["scratch_before_mb"])  # type: ignore[arg-type]
        <= allowance / MB
        and results["read_back_equal"] is True
    )
    results["target_met"] = met
    for name, value in results.items():
        if name != "log":
            shown = f"{value:.2f}" if isinstance(value, float) else value
            print(f"{name:<22} {shown}")
    for line in results["log"]:  # type: ignore[attr-defined]
        print("   ", line)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bomb.json").write_text(json.dumps(results, indent=2))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
