"""Migration throughput: `dgfs migrate` next to `deltaglider migrate` on the same data.

Generates a real-looking release series (24 versions of a plugin, ~8 MiB of
content each), uploads it raw to a source bucket on a local moto_server,
then migrates it into two fresh buckets, once with each tool, and prints a
table (files/s, MB/s, stored bytes, ratio); both results are then checked
with `dgfs verify --all`. Writes benchmarks/results/migrate.json.

    .venv/bin/python benchmarks/migrate_bench.py [--versions 24] [--size-mib 8]

The DeltaGlider CLI is found as in the tests: $DELTAGLIDER_BIN, else
<repo>/.venv-deltaglider/bin/deltaglider (skipped with a note if absent).
Times are wall-clock of the whole command, process start included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testsupport.releases import ReleaseSeries  # noqa: E402
from testsupport.servers import ACCESS_KEY, REGION, SECRET_KEY, MotoServer, make_bucket, s3_client  # noqa: E402

PREFIX = "releases/plugin/"


def dgfs_bin() -> str:
    beside = Path(sys.executable).parent / "dgfs"
    return str(beside) if beside.exists() else "dgfs"


def deltaglider_bin() -> str | None:
    candidate = os.environ.get("DELTAGLIDER_BIN") or str(
        ROOT / ".venv-deltaglider" / "bin" / "deltaglider"
    )
    return candidate if os.access(candidate, os.X_OK) else None


def environment(endpoint: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION=REGION,
        AWS_ENDPOINT_URL=endpoint,
        AWS_EC2_METADATA_DISABLED="true",
        DG_DISABLE_EC2_DETECTION="1",
        DG_SUPPRESS_DEPRECATION="1",
        DG_LOG_LEVEL="WARNING",
        XDELTA="-D -R",  # Debian's xdelta3 gzip trap (see dgfs/delta.py)
    )
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        env.pop(name, None)
    return env


def bucket_totals(endpoint: str, bucket: str) -> tuple[int, int]:
    client = s3_client(endpoint)
    count = size = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            if obj["Key"].startswith(".deltaglider/"):
                continue
            count += 1
            size += obj["Size"]
    client.close()
    return count, size


def timed(
    command: list[str], env: dict[str, str]
) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return elapsed, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", type=int, default=24)
    parser.add_argument("--size-mib", type=float, default=8.0, help="content per release")
    parser.add_argument("--concurrency", type=int, default=8, help="dgfs migrate --concurrency")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "migrate.json"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dgfs-migrate-bench-"))
    print(f"generating {args.versions} releases (~{args.size_mib:g} MiB of content each)...")
    series = list(ReleaseSeries(size=int(args.size_mib * (1 << 20)), seed=42).zips(args.versions))
    original = sum(len(data) for _, data in series)
    print(f"  {len(series)} zips, {original / 1e6:.1f} MB in total")

    results: dict[str, Any] = {
        "versions": len(series),
        "original_bytes": original,
        "file_sizes": [len(data) for _, data in series],
        "tools": {},
    }
    with MotoServer() as server:
        endpoint = server.endpoint_url
        env = environment(endpoint)
        for bucket in ("bench-source", "bench-dgfs", "bench-deltaglider"):
            make_bucket(endpoint, bucket)
        client = s3_client(endpoint)
        for name, data in series:
            client.put_object(
                Bucket="bench-source", Key=PREFIX + name, Body=data, ContentType="application/zip"
            )
        client.close()

        runs: list[tuple[str, list[str], str]] = [
            (
                "dgfs",
                [
                    dgfs_bin(),
                    "migrate",
                    "--yes",
                    "--quiet",
                    "--concurrency",
                    str(args.concurrency),
                    "--cache-dir",
                    str(work / "dgfs-cache"),
                    "--endpoint-url",
                    endpoint,
                    f"s3://bench-source/{PREFIX}",
                    "s3://bench-dgfs/",
                ],
                "bench-dgfs",
            )
        ]
        dg = deltaglider_bin()
        if dg is None:
            print("note: DeltaGlider CLI not found; set DELTAGLIDER_BIN to compare")
        else:
            runs.append(
                (
                    "deltaglider",
                    [
                        dg,
                        "migrate",
                        "--yes",
                        "--quiet",
                        "--endpoint-url",
                        endpoint,
                        f"s3://bench-source/{PREFIX}",
                        "s3://bench-deltaglider/",
                    ],
                    "bench-deltaglider",
                )
            )

        for tool, command, bucket in runs:
            print(f"running {tool} migrate...")
            elapsed, _ = timed(command, env)
            objects, stored = bucket_totals(endpoint, bucket)
            verify_elapsed, verify = timed(
                [
                    dgfs_bin(),
                    "verify",
                    "--all",
                    "--json",
                    "--cache-dir",
                    str(work / "verify-cache"),
                    "--endpoint-url",
                    endpoint,
                    f"s3://{bucket}",
                ],
                env,
            )
            report = json.loads(verify.stdout)
            results["tools"][tool] = {
                "command": " ".join(command[:2]),
                "seconds": round(elapsed, 3),
                "files_per_second": round(len(series) / elapsed, 3),
                "mb_per_second": round(original / elapsed / 1e6, 3),
                "objects": objects,
                "stored_bytes": stored,
                "ratio": round(stored / original, 4),
                "verified_ok": report["ok"],
                "verify_failed": report["failed"],
                "verify_seconds": round(verify_elapsed, 3),
            }

        _, stats = timed(
            [
                dgfs_bin(),
                "stats",
                "bench-dgfs",
                "--detailed",
                "--by-prefix",
                "--endpoint-url",
                endpoint,
            ],
            env,
        )
        results["dgfs_stats"] = stats.stdout

    print()
    print(f"{args.versions} releases, {original / 1e6:.1f} MB, on a local moto_server")
    header = (
        f"{'tool':<12} {'seconds':>8} {'files/s':>8} {'MB/s':>8} "
        f"{'stored bytes':>14} {'ratio':>7}  verify"
    )
    print(header)
    print("-" * len(header))
    for tool, row in results["tools"].items():
        print(
            f"{tool:<12} {row['seconds']:>8.2f} {row['files_per_second']:>8.2f} "
            f"{row['mb_per_second']:>8.2f} {row['stored_bytes']:>14,} {row['ratio']:>7.4f}  "
            f"{row['verified_ok']} ok, {row['verify_failed']} failed"
        )
    print()
    print("$ dgfs stats bench-dgfs --detailed --by-prefix")
    print(results["dgfs_stats"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
