"""The main job, end to end: a real S3 server, a real mount, a release series.

Starts SeaweedFS on 127.0.0.1 (free ports, temp dir), creates a bucket,
and for each delta mode (``-o deltas=dg``, DeltaGlider v6, then
``-o deltas=deep``) mounts it with dgfs, copies two series of similar
releases (zips, and Python-made ``.tar.gz`` files) in with ``cp`` and
again with ``rsync -a``, reads everything back through the mount and
checks SHA-256, shows ``dgfs status`` of the mount, unmounts (waiting for
uploads), and prints what each file cost in the bucket next to its
original size, per mode. Writes the
numbers to benchmarks/results/demo.json.

    .venv/bin/python benchmarks/demo.py [--versions 12] [--size-mb 8]
"""

from __future__ import annotations

import argparse
import gzip
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

from testsupport.releases import ReleaseSeries, write_series  # noqa: E402
from testsupport.servers import S3_TEST_ENV, SeaweedServer, make_bucket, s3_client  # noqa: E402

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


def write_sdists(directory: Path, count: int, size: int) -> list[Path]:
    """``count`` consecutive ``.tar.gz`` releases, gzipped as Python's sdists are (level 9)."""
    directory.mkdir(parents=True, exist_ok=True)
    series = ReleaseSeries(name="tool", size=size, seed=7)
    paths = []
    for _ in range(count):
        name, data = series.next_tar()
        path = directory / f"{name}.gz"
        with gzip.GzipFile(path, "wb", compresslevel=9, mtime=1_700_000_000) as gz:
            gz.write(data)
        paths.append(path)
    return paths


def run_mode(
    mode: str, endpoint: str, work: Path, series: dict[str, list[Path]], env: dict[str, str]
) -> dict[str, object]:
    """Mount with ``-o deltas=MODE``, copy each series into MODE/NAME with cp and rsync -a,
    read everything back, unmount (waiting for uploads); returns the measurements."""
    mnt = work / f"mnt-{mode}"
    mnt.mkdir()
    mount_cmd = [
        dgfs_bin(),
        "mount",
        BUCKET,
        str(mnt),
        "-o",
        f"endpoint={endpoint},cache_dir={work / ('cache-' + mode)},deltas={mode}",
    ]
    print(f"\n== {' '.join(mount_cmd)}")
    subprocess.run(mount_cmd, check=True, env=env)
    wait_mounted(mnt)
    result: dict[str, object] = {}
    rows = []
    try:
        for name, paths in series.items():
            target = mnt / mode / name
            target.mkdir(parents=True)
            original = {p.name: (p.stat().st_size, sha256(p)) for p in paths}
            t0 = time.monotonic()
            subprocess.run(["cp", *map(str, paths), str(target)], check=True)
            cp_seconds = time.monotonic() - t0
            settle(target, original)
            durable = time.monotonic() - t0
            rsync_dir = mnt / mode / f"{name}-rsync"
            t0 = time.monotonic()
            subprocess.run(["rsync", "-a", f"{paths[0].parent}/", f"{rsync_dir}/"], check=True)
            rsync_seconds = time.monotonic() - t0
            settle(rsync_dir, original)
            rsync_durable = time.monotonic() - t0
            again = subprocess.run(
                ["rsync", "-a", "--stats", f"{paths[0].parent}/", f"{rsync_dir}/"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            transferred = next(
                (
                    line.split(":")[1].strip()
                    for line in again.splitlines()
                    if line.startswith("Number of regular files transferred")
                ),
                "?",
            )
            print(
                f"== {mode}/{name}: cp {cp_seconds:.2f} s ({durable:.2f} s until all in S3)   "
                f"rsync -a {rsync_seconds:.2f} s ({rsync_durable:.2f} s until all in S3)   "
                f"rsync -a again: {transferred} files transferred"
            )
            if name == next(iter(series)):
                print(f"\n$ ls -l {target}")
                listing = subprocess.run(["ls", "-l", str(target)], capture_output=True, text=True)
                print(listing.stdout)
            for file_name, (size, digest) in sorted(original.items()):
                path = target / file_name
                kind = os.getxattr(path, "user.dgfs.kind").decode()
                stored = int(os.getxattr(path, "user.dgfs.stored_size"))
                ok = sha256(path) == digest and sha256(rsync_dir / file_name) == digest
                rows.append((f"{name}/{file_name}", size, kind, stored, ok))
            result[name] = {
                "cp_seconds": cp_seconds,
                "cp_durable_seconds": durable,
                "rsync_seconds": rsync_seconds,
                "rsync_durable_seconds": rsync_durable,
                "rsync_again_transferred": transferred,
            }
        # What the mount itself reports after the workload (docs/CLI.md).
        print(f"\n$ dgfs status {mnt}")
        status = subprocess.run([dgfs_bin(), "status", str(mnt)], capture_output=True, text=True)
        print(status.stdout or status.stderr)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        deadline = time.monotonic() + 300
        while os.path.ismount(mnt) and time.monotonic() < deadline:
            time.sleep(0.2)
    result["files"] = [
        {"name": n, "original": s, "kind": k, "stored": st, "sha256_ok": ok}
        for n, s, k, st, ok in rows
    ]
    print(f"{'file':<38} {'original':>10} {'stored as':>10} {'stored':>10} {'ratio':>7}  sha256")
    for name, size, kind, stored, ok in rows:
        print(
            f"{name:<38} {human(size):>10} {kind:>10} {human(stored):>10} "
            f"{stored / size:>7.3f}  {'ok' if ok else 'MISMATCH'}"
        )
    result["ok"] = all(r[4] for r in rows) and all(
        v["rsync_again_transferred"] == "0" for v in result.values() if isinstance(v, dict)
    )
    return result


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
    env = dict(os.environ, **S3_TEST_ENV)
    os.environ.update(env)
    size = int(args.size_mb * (1 << 20))
    print(
        f"== generating {args.versions} releases of a plugin (zip) and of a tool (.tar.gz),"
        f" ~{args.size_mb:g} MiB unpacked each"
    )
    series = {
        "plugin": write_series(work / "dist" / "plugin", args.versions, size=size),
        "tool": write_sdists(work / "dist" / "tool", args.versions, size),
    }
    originals = {name: sum(p.stat().st_size for p in paths) for name, paths in series.items()}

    results: dict[str, object] = {"versions": args.versions, "original_bytes": originals}
    with SeaweedServer() as server:
        endpoint = server.endpoint_url
        print(f"== SeaweedFS S3 on {endpoint}")
        make_bucket(endpoint, BUCKET)
        for mode in ("dg", "deep"):
            results[mode] = run_mode(mode, endpoint, work, series, env)
        client = s3_client(endpoint)
        objects = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            objects += page.get("Contents", [])

    print("\n== what the bucket holds (references included)")
    print(f"{'directory':<22} {'original':>10} {'in the bucket':>14} {'ratio':>7} {'saved':>7}")
    stored: dict[str, int] = {}
    for mode in ("dg", "deep"):
        for name in series:
            for suffix in ("", "-rsync"):
                directory = f"{mode}/{name}{suffix}"
                total = sum(o["Size"] for o in objects if o["Key"].startswith(directory + "/"))
                stored[directory] = total
                print(
                    f"{directory + '/':<22} {human(originals[name]):>10} {human(total):>14} "
                    f"{total / originals[name]:>7.3f} {100 * (1 - total / originals[name]):>6.1f}%"
                )
    for name in series:
        dg, deep = stored[f"dg/{name}"], stored[f"deep/{name}"]
        print(f"{name}: deep mode stores {deep / dg:.2f} x what DeltaGlider mode stores")
    results["stored_bytes"] = stored
    all_ok = all(
        isinstance(results[m], dict) and results[m].get("ok")  # type: ignore[union-attr]
        for m in ("dg", "deep")
    )
    results["ok"] = all_ok
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(results, indent=2))
    print(f"\nresult: {'OK' if all_ok else 'FAILED'} (benchmarks/results/demo.json)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
