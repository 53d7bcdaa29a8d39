"""The main job, end to end: a real S3 server, a real mount, a release series.

Starts SeaweedFS on 127.0.0.1 (free ports, temp dir), creates a bucket,
mounts it with dgfs, copies a series of similar release archives in with
``cp`` and again with ``rsync -a``, reads everything back through the mount
and checks SHA-256, unmounts (waiting for uploads), and prints what each
file cost in the bucket next to its original size. Writes the numbers to
benchmarks/results/demo.json.

    .venv/bin/python benchmarks/demo.py [--versions 12] [--size-mb 8]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.releases import write_series  # noqa: E402
from tests.servers import ACCESS_KEY, SECRET_KEY, SeaweedServer, make_bucket, s3_client  # noqa: E402

BUCKET = "releases"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def dgfs_bin() -> str:
    candidate = Path(sys.executable).with_name("dgfs")
    return str(candidate) if candidate.exists() else "dgfs"


def wait_mounted(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.ismount(path):
            return
        time.sleep(0.1)
    raise SystemExit(f"{path} did not become a mount point")


def settle(directory: Path, names: dict[str, object]) -> None:
    """fsync every file: returns once the background uploads are in S3."""
    for name in names:
        fd = os.open(directory / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--versions", type=int, default=12)
    parser.add_argument(
        "--size-mb", type=float, default=8.0, help="uncompressed size of one release"
    )
    parser.add_argument("--keep", action="store_true", help="leave the temp dir for inspection")
    args = parser.parse_args()

    if not SeaweedServer.available():
        raise SystemExit("SeaweedFS (weed) not found: run `bash .ci/setup` first")
    work = Path(tempfile.mkdtemp(prefix="dgfs-demo-"))
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    os.environ.update(env)
    source = work / "dist"
    mnt = work / "mnt"
    mnt.mkdir()
    print(f"== generating {args.versions} releases of a plugin (~{args.size_mb:g} MiB unzipped)")
    paths = write_series(source, args.versions, size=int(args.size_mb * (1 << 20)))
    original = {p.name: (p.stat().st_size, sha256(p)) for p in paths}

    results: dict[str, object] = {}
    with SeaweedServer() as server:
        endpoint = server.endpoint_url
        print(f"== SeaweedFS S3 on {endpoint}")
        make_bucket(endpoint, BUCKET)
        mount_cmd = [
            dgfs_bin(),
            "mount",
            BUCKET,
            str(mnt),
            "-o",
            f"endpoint={endpoint},cache_dir={work / 'cache'}",
        ]
        print("== " + " ".join(mount_cmd))
        subprocess.run(mount_cmd, check=True, env=env)
        wait_mounted(mnt)
        try:
            (mnt / "app").mkdir()
            t0 = time.monotonic()
            subprocess.run(["cp", *map(str, paths), str(mnt / "app")], check=True)
            cp_seconds = time.monotonic() - t0
            settle(mnt / "app", original)
            cp_durable_seconds = time.monotonic() - t0
            t0 = time.monotonic()
            subprocess.run(["rsync", "-a", f"{source}/", f"{mnt / 'app-rsync'}/"], check=True)
            rsync_seconds = time.monotonic() - t0
            settle(mnt / "app-rsync", original)
            rsync_durable_seconds = time.monotonic() - t0
            t0 = time.monotonic()
            again = subprocess.run(
                ["rsync", "-a", "--stats", f"{source}/", f"{mnt / 'app-rsync'}/"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            rsync_again_seconds = time.monotonic() - t0
            transferred = next(
                (
                    line.split(":")[1].strip()
                    for line in again.splitlines()
                    if line.startswith("Number of regular files transferred")
                ),
                "?",
            )
            print(
                f"== cp: {cp_seconds:.2f} s ({cp_durable_seconds:.2f} s until all in S3)   "
                f"rsync -a: {rsync_seconds:.2f} s "
                f"({rsync_durable_seconds:.2f} s until all in S3)   "
                f"rsync -a again: {rsync_again_seconds:.2f} s ({transferred} files transferred)"
            )
            print("\n$ ls -l " + str(mnt / "app"))
            print(
                subprocess.run(
                    ["ls", "-l", str(mnt / "app")], capture_output=True, text=True
                ).stdout
            )
            rows = []
            for name, (size, digest) in sorted(original.items()):
                path = mnt / "app" / name
                kind = os.getxattr(path, "user.dgfs.kind").decode()
                stored = int(os.getxattr(path, "user.dgfs.stored_size"))
                ok = sha256(path) == digest and sha256(mnt / "app-rsync" / name) == digest
                rows.append((name, size, kind, stored, ok))
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
            deadline = time.monotonic() + 120
            while os.path.ismount(mnt) and time.monotonic() < deadline:
                time.sleep(0.2)

        client = s3_client(endpoint)
        objects = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            objects += page.get("Contents", [])
        stored_total = {
            d: sum(o["Size"] for o in objects if o["Key"].startswith(d + "/"))
            for d in ("app", "app-rsync")
        }

    print(f"{'file':<28} {'original':>12} {'stored as':>10} {'stored':>12} {'ratio':>7}  sha256")
    for name, size, kind, stored, ok in rows:
        print(
            f"{name:<28} {human(size):>12} {kind:>10} {human(stored):>12} {stored / size:>7.3f}  "
            f"{'ok' if ok else 'MISMATCH'}"
        )
    for o in objects:
        if o["Key"].endswith("/reference.bin"):
            print(f"{o['Key']:<28} {'':>12} {'reference':>10} {human(o['Size']):>12}")
    original_total = sum(size for size, _ in original.values())
    print()
    for d in ("app", "app-rsync"):
        print(
            f"{d + '/':<12} original {human(original_total):>10}   in the bucket "
            f"{human(stored_total[d]):>10} (reference included)   "
            f"saved {100 * (1 - stored_total[d] / original_total):.1f}%"
        )
    all_ok = all(r[4] for r in rows) and transferred == "0"
    results = {
        "versions": args.versions,
        "original_bytes": original_total,
        "stored_bytes": stored_total,
        "cp_seconds": cp_seconds,
        "cp_durable_seconds": cp_durable_seconds,
        "rsync_seconds": rsync_seconds,
        "rsync_durable_seconds": rsync_durable_seconds,
        "rsync_again_seconds": rsync_again_seconds,
        "rsync_again_transferred": transferred,
        "files": [
            {"name": n, "original": s, "kind": k, "stored": st, "sha256_ok": ok}
            for n, s, k, st, ok in rows
        ],
        "ok": all_ok,
    }
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(results, indent=2))
    print(f"\nresult: {'OK' if all_ok else 'FAILED'} (benchmarks/results/demo.json)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
