"""Peak memory of the dgfs daemon while large files go in and out.

Mounts a bucket on a local SeaweedFS in the foreground (so the daemon's PID
is known), copies in a large incompressible file (stored direct, multipart)
and two large similar archives (the second stored as a delta against the
first), reads all of them back, and reports the daemon's peak resident set
(VmHWM) next to the file sizes. Streaming means the peak stays far below
the file size. Writes benchmarks/results/memory.json.

    .venv/bin/python benchmarks/memory.py [--size-mb 512]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.demo import dgfs_bin, settle, sha256, wait_mounted  # noqa: E402
from testsupport.servers import S3_TEST_ENV, SeaweedServer, make_bucket  # noqa: E402


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def write_random(path: Path, size: int, seed: int, *, zip_magic: bool = False) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        if zip_magic:
            f.write(b"PK\x03\x04")
            size -= 4
        while size > 0:
            chunk = rng.randbytes(min(size, 8 << 20))
            f.write(chunk)
            size -= len(chunk)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=512)
    args = parser.parse_args()
    os.environ.update(S3_TEST_ENV)
    size = args.size_mb << 20
    work = Path(tempfile.mkdtemp(prefix="dgfs-memory-"))
    src = work / "src"
    src.mkdir()
    print(f"== writing test files ({args.size_mb} MiB each)")
    write_random(src / "blob.bin", size, 1)
    write_random(src / "app-1.zip", size, 2, zip_magic=True)
    # The next version: same bytes with a few edits spread through the file.
    shutil.copy(src / "app-1.zip", src / "app-2.zip")
    with open(src / "app-2.zip", "r+b") as f:
        for offset in range(size // 8, size, size // 4):
            f.seek(offset)
            f.write(os.urandom(4096))
    digests = {p.name: sha256(p) for p in src.iterdir()}
    mnt = work / "mnt"
    mnt.mkdir()
    results: dict[str, object] = {"file_mib": args.size_mb}
    with SeaweedServer() as server:
        make_bucket(server.endpoint_url, "mem")
        daemon_log = open(work / "daemon.log", "wb")  # noqa: SIM115 - lives as long as the daemon
        daemon = subprocess.Popen(
            [
                dgfs_bin(),
                "mount",
                "mem",
                str(mnt),
                "-f",
                "-o",
                f"endpoint={server.endpoint_url},cache_dir={work / 'cache'}",
            ],
            stderr=daemon_log,
        )
        try:
            wait_mounted(mnt)
            t0 = time.monotonic()
            for name in ("blob.bin", "app-1.zip", "app-2.zip"):
                subprocess.run(["cp", str(src / name), str(mnt / name)], check=True)
            settle(mnt, digests)
            results["write_seconds"] = time.monotonic() - t0
            results["peak_rss_after_write_mib"] = peak_rss_kib(daemon.pid) / 1024
            t0 = time.monotonic()
            for name, digest in digests.items():
                if sha256(mnt / name) != digest:
                    raise SystemExit(f"{name}: wrong bytes read back")
            results["read_seconds"] = time.monotonic() - t0
            results["peak_rss_after_read_mib"] = peak_rss_kib(daemon.pid) / 1024
            results["kinds"] = {n: os.getxattr(mnt / n, "user.dgfs.kind").decode() for n in digests}
            results["stored"] = {
                n: int(os.getxattr(mnt / n, "user.dgfs.stored_size")) for n in digests
            }
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            try:
                daemon.wait(timeout=300)
            except subprocess.TimeoutExpired:
                daemon.kill()
            daemon_log.close()
            log_text = (work / "daemon.log").read_text(errors="replace")
            if "ERROR" in log_text or "Traceback" in log_text:
                print(log_text[-3000:])
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'file size':<28} {args.size_mb} MiB x 3 (direct, reference, delta)")
    for key in ("write_seconds", "read_seconds"):
        print(f"{key:<28} {results[key]:.1f}")
    for key in ("peak_rss_after_write_mib", "peak_rss_after_read_mib"):
        print(f"{key:<28} {results[key]:.0f} MiB")
    print(f"{'stored as':<28} {results['kinds']}")
    print(f"{'stored bytes':<28} {results['stored']}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
