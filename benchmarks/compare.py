"""dgfs next to the DeltaGlider CLI and s3fs-fuse, on the same data and server.

One run, side by side, on one local SeaweedFS: upload a release series,
read it all back (cold: fresh mount / fresh process), and count what the
bucket holds. Prints a table and writes benchmarks/results/compare.json.
Ratios between tools in one run are what to look at; absolute seconds
depend on the machine.

    .venv/bin/python benchmarks/compare.py [--versions 20] [--size-mb 16]

s3fs-fuse is measured when `s3fs` is installed (apt install s3fs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.demo import dgfs_bin, settle, sha256, wait_mounted  # noqa: E402
from tests.dgcli import deltaglider_bin  # noqa: E402
from tests.releases import write_series  # noqa: E402
from tests.servers import ACCESS_KEY, SECRET_KEY, SeaweedServer, make_bucket, s3_client  # noqa: E402


def bucket_bytes(endpoint: str, bucket: str) -> int:
    client = s3_client(endpoint)
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        total += sum(o["Size"] for o in page.get("Contents", []))
    return total


def timed(fn: Callable[[], None]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def unmount(mnt: Path) -> None:
    subprocess.run(["umount", str(mnt)], check=False)
    deadline = time.monotonic() + 300
    while os.path.ismount(mnt) and time.monotonic() < deadline:
        time.sleep(0.1)


def read_all(directory: Path, names: list[str], digests: dict[str, str]) -> None:
    for name in names:
        if sha256(directory / name) != digests[name]:
            raise SystemExit(f"{directory / name}: wrong bytes")


def bench_dgfs(endpoint: str, work: Path, paths: list[Path], digests: dict[str, str]) -> dict[str, float]:
    bucket = "dgfs"
    make_bucket(endpoint, bucket)
    mnt = work / "mnt-dgfs"
    mnt.mkdir()
    cache = work / "cache-dgfs"
    names = [p.name for p in paths]

    def mount() -> None:
        subprocess.run(
            [dgfs_bin(), "mount", bucket, str(mnt), "-o", f"endpoint={endpoint},cache_dir={cache}"],
            check=True,
        )
        wait_mounted(mnt)

    mount()

    def upload() -> None:
        subprocess.run(["cp", *map(str, paths), str(mnt)], check=True)
        settle(mnt, dict.fromkeys(names))

    up = timed(upload)
    unmount(mnt)
    shutil.rmtree(cache, ignore_errors=True)  # cold: no cached references
    mount()
    down = timed(lambda: read_all(mnt, names, digests))
    warm = timed(lambda: read_all(mnt, names, digests))
    unmount(mnt)
    return {"upload_s": up, "read_cold_s": down, "read_warm_s": warm, "stored_bytes": bucket_bytes(endpoint, bucket)}


def bench_deltaglider(endpoint: str, work: Path, paths: list[Path], digests: dict[str, str]) -> dict[str, float]:
    bucket = "deltaglider"
    make_bucket(endpoint, bucket)
    env = dict(os.environ, DG_DISABLE_EC2_DETECTION="1", AWS_EC2_METADATA_DISABLED="true",
               XDELTA="-D -R", DG_LOG_LEVEL="WARNING")
    dg = deltaglider_bin()

    def upload() -> None:
        for p in paths:
            subprocess.run([dg, "cp", str(p), f"s3://{bucket}/app/{p.name}", "--endpoint-url", endpoint],
                           check=True, env=env, capture_output=True)

    out = work / "out-dg"
    out.mkdir()

    def download() -> None:
        for p in paths:
            subprocess.run([dg, "cp", f"s3://{bucket}/app/{p.name}", str(out / p.name),
                            "--endpoint-url", endpoint], check=True, env=env, capture_output=True)
        read_all(out, [p.name for p in paths], digests)

    up = timed(upload)
    down = timed(download)
    return {"upload_s": up, "read_cold_s": down, "read_warm_s": float("nan"),
            "stored_bytes": bucket_bytes(endpoint, bucket)}


def bench_s3fs(endpoint: str, work: Path, paths: list[Path], digests: dict[str, str]) -> dict[str, float]:
    bucket = "s3fs"
    make_bucket(endpoint, bucket)
    mnt = work / "mnt-s3fs"
    mnt.mkdir()
    passwd = work / "s3fs.passwd"
    passwd.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
    passwd.chmod(0o600)
    names = [p.name for p in paths]

    def mount() -> None:
        subprocess.run(["s3fs", bucket, str(mnt), "-o", f"url={endpoint},use_path_request_style,"
                        f"passwd_file={passwd},nocopyapi"], check=True)
        wait_mounted(mnt)

    mount()
    up = timed(lambda: subprocess.run(["cp", *map(str, paths), str(mnt)], check=True))
    unmount(mnt)
    mount()
    down = timed(lambda: read_all(mnt, names, digests))
    warm = timed(lambda: read_all(mnt, names, digests))
    unmount(mnt)
    return {"upload_s": up, "read_cold_s": down, "read_warm_s": warm, "stored_bytes": bucket_bytes(endpoint, bucket)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, default=20)
    parser.add_argument("--size-mb", type=float, default=16.0)
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    work = Path(tempfile.mkdtemp(prefix="dgfs-compare-"))
    print(f"== generating {args.versions} releases (~{args.size_mb:g} MiB uncompressed each)")
    paths = write_series(work / "dist", args.versions, size=int(args.size_mb * (1 << 20)))
    digests = {p.name: sha256(p) for p in paths}
    original = sum(p.stat().st_size for p in paths)
    results: dict[str, dict[str, float]] = {}
    try:
        with SeaweedServer() as server:
            endpoint = server.endpoint_url
            print(f"== SeaweedFS on {endpoint}")
            for name, bench in (("dgfs", bench_dgfs), ("deltaglider CLI", bench_deltaglider),
                                ("s3fs-fuse", bench_s3fs)):
                if name == "s3fs-fuse" and not shutil.which("s3fs"):
                    print("   (s3fs not installed: skipped)")
                    continue
                print(f"== {name}")
                results[name] = bench(endpoint, work, paths, digests)
    finally:
        for mnt in work.glob("mnt-*"):
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    mb = original / 1e6
    print(f"\n{len(paths)} files, {mb:.1f} MB original\n")
    print(f"{'tool':<16} {'upload s':>9} {'MB/s':>7} {'read cold s':>12} {'MB/s':>7} "
          f"{'read warm s':>12} {'stored MB':>10} {'ratio':>6}")
    for name, r in results.items():
        print(f"{name:<16} {r['upload_s']:>9.2f} {mb / r['upload_s']:>7.1f} {r['read_cold_s']:>12.2f} "
              f"{mb / r['read_cold_s']:>7.1f} {r['read_warm_s']:>12.2f} {r['stored_bytes'] / 1e6:>10.1f} "
              f"{r['stored_bytes'] / original:>6.3f}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(
        {"versions": len(paths), "original_bytes": original, "results": results}, indent=2))
    print("\nwritten: benchmarks/results/compare.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
