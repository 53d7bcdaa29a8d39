"""dgfs next to the DeltaGlider CLI and s3fs-fuse, on the same data and server.

One run, side by side, on one local SeaweedFS: upload a release series,
read it all back (cold: fresh mount / fresh process), and count what the
bucket holds. Prints a table and writes benchmarks/results/compare.json.
Ratios between tools in one run are what to look at; absolute seconds
depend on the machine.

    .venv/bin/python benchmarks/compare.py [--versions 20] [--size-mb 16]

Columns: "cp s" is until `cp` returns; "durable s" until every file is in
S3. They differ for dgfs only: its close() returns once the data is
journaled and the upload runs in the background, so "durable" adds an
fsync of every file (which waits for the uploads). The CLI and s3fs
upload before they return, so both columns are the same for them.
"read warm" is a second read on the same mount (dgfs: from its cache;
s3fs runs without use_cache, so it fetches again).

A tool that fails is reported with its error (table and JSON) and the
others still run; mounts are unmounted and the daemons (run in the
foreground, so we know their PIDs) stopped by PID whatever happens.

s3fs-fuse is measured when `s3fs` is installed (apt install s3fs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.demo import dgfs_bin, settle, sha256  # noqa: E402
from testsupport.dgcli import deltaglider_bin, deltaglider_env  # noqa: E402
from testsupport.releases import write_series  # noqa: E402
from testsupport.servers import (  # noqa: E402
    ACCESS_KEY,
    S3_TEST_ENV,
    SECRET_KEY,
    SeaweedServer,
    make_bucket,
    s3_client,
)

# s3fs needs only path-style URLs for SeaweedFS (testsupport/servers.py gives the
# server enough volume slots for several buckets).
S3FS_OPTIONS = "use_path_request_style,nocopyapi"

CMD_TIMEOUT = 900.0  # one cp / one CLI call; a hung tool fails instead of blocking the run
MOUNT_TIMEOUT = 30.0
EXIT_TIMEOUT = 300.0  # a daemon finishing its work after the unmount


class ToolFailed(Exception):
    """A tool under test misbehaved (exit status, wrong bytes, no mount...)."""


def bucket_bytes(endpoint: str, bucket: str) -> int:
    client = s3_client(endpoint)
    try:
        total = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            total += sum(o["Size"] for o in page.get("Contents", []))
        return total
    finally:
        client.close()


def timed(fn: Callable[[], None]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def run(cmd: list[str], **kwargs: Any) -> None:
    """Run ``cmd``; ToolFailed with its output if it fails or hangs."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=CMD_TIMEOUT, **kwargs)
    except subprocess.TimeoutExpired as exc:
        raise ToolFailed(f"{' '.join(cmd[:3])} ...: no answer after {CMD_TIMEOUT:.0f}s") from exc
    if result.returncode != 0:
        out = (result.stderr or result.stdout).strip().splitlines()
        raise ToolFailed(
            f"{' '.join(cmd[:2])} ... exited {result.returncode}: {' | '.join(out[-3:])}"
        )


def read_all(directory: Path, names: list[str], digests: dict[str, str]) -> None:
    for name in names:
        try:
            digest = sha256(directory / name)
        except OSError as exc:
            raise ToolFailed(f"reading {name}: {exc}") from exc
        if digest != digests[name]:
            raise ToolFailed(f"{directory / name}: wrong bytes")


class FuseMount:
    """A FUSE daemon run in the foreground (so its PID is ours) on ``mountpoint``."""

    def __init__(self, name: str, command: list[str], mountpoint: Path, log: Path) -> None:
        self.name = name
        self.command = command
        self.mountpoint = mountpoint
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_tail(self, lines: int = 8) -> str:
        with suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def start(self) -> None:
        assert self.proc is None
        self.mountpoint.mkdir(exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ToolFailed(f"{self.name} did not mount {self.mountpoint}:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Unmount, wait for the daemon to exit; SIGTERM then SIGKILL it (by PID) if it does not."""
        proc, self.proc = self.proc, None
        deadline = time.monotonic() + 30
        while os.path.ismount(self.mountpoint) and time.monotonic() < deadline:
            # EBUSY while a reader still holds a file: retry for a while.
            if subprocess.run(
                ["fusermount3", "-u", str(self.mountpoint)], capture_output=True
            ).returncode:
                time.sleep(0.2)
        if proc is not None:
            try:
                proc.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(
                    f"   {self.name} (pid {proc.pid}) still running "
                    f"{EXIT_TIMEOUT:.0f}s after the unmount: SIGTERM",
                    file=sys.stderr,
                )
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        if os.path.ismount(self.mountpoint):  # last resort: never leave a stale mount
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], check=False)


def bench_dgfs(
    endpoint: str, work: Path, paths: list[Path], digests: dict[str, str], result: dict[str, Any]
) -> None:
    bucket = "dgfs"
    make_bucket(endpoint, bucket)
    cache = work / "cache-dgfs"
    names = [p.name for p in paths]
    mnt = work / "mnt-dgfs"
    fs = FuseMount(
        "dgfs",
        [
            dgfs_bin(),
            "mount",
            bucket,
            str(mnt),
            "-f",
            "-o",
            f"endpoint={endpoint},cache_dir={cache},log_level=warning",
        ],
        mnt,
        work / "dgfs.log",
    )
    try:
        fs.start()
        result["cp_s"] = timed(lambda: run(["cp", *map(str, paths), str(mnt)]))
        result["upload_s"] = result["cp_s"] + timed(lambda: settle(mnt, dict.fromkeys(names)))
        fs.stop()
        shutil.rmtree(cache, ignore_errors=True)  # cold: no cached references
        fs.start()
        result["read_cold_s"] = timed(lambda: read_all(mnt, names, digests))
        result["read_warm_s"] = timed(lambda: read_all(mnt, names, digests))
    except ToolFailed as exc:
        tail = fs.log_tail()
        raise ToolFailed(f"{exc}\n--- dgfs log:\n{tail}" if tail else str(exc)) from exc
    finally:
        fs.stop()


def bench_deltaglider(
    endpoint: str, work: Path, paths: list[Path], digests: dict[str, str], result: dict[str, Any]
) -> None:
    bucket = "deltaglider"
    make_bucket(endpoint, bucket)
    env = deltaglider_env()
    dg = deltaglider_bin()

    def upload() -> None:
        for p in paths:
            run(
                [dg, "cp", str(p), f"s3://{bucket}/app/{p.name}", "--endpoint-url", endpoint],
                env=env,
            )

    out = work / "out-dg"
    out.mkdir()

    def download() -> None:
        for p in paths:
            run(
                [
                    dg,
                    "cp",
                    f"s3://{bucket}/app/{p.name}",
                    str(out / p.name),
                    "--endpoint-url",
                    endpoint,
                ],
                env=env,
            )
        read_all(out, [p.name for p in paths], digests)

    result["cp_s"] = result["upload_s"] = timed(upload)  # each cp returns once its object is stored
    result["read_cold_s"] = timed(download)


def bench_s3fs(
    endpoint: str, work: Path, paths: list[Path], digests: dict[str, str], result: dict[str, Any]
) -> None:
    if not shutil.which("s3fs"):
        raise ToolFailed("s3fs not installed (apt install s3fs)")
    bucket = "s3fs"
    make_bucket(endpoint, bucket)
    passwd = work / "s3fs.passwd"
    passwd.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
    passwd.chmod(0o600)
    names = [p.name for p in paths]
    mnt = work / "mnt-s3fs"
    result["options"] = S3FS_OPTIONS
    fs = FuseMount(
        "s3fs",
        [
            "s3fs",
            bucket,
            str(mnt),
            "-f",
            "-o",
            f"url={endpoint},passwd_file={passwd},dbglevel=err,{S3FS_OPTIONS}",
        ],
        mnt,
        work / "s3fs.log",
    )
    try:
        fs.start()
        # s3fs uploads the file in flush/close: once cp returns it is in S3.
        result["cp_s"] = result["upload_s"] = timed(lambda: run(["cp", *map(str, paths), str(mnt)]))
        fs.stop()
        fs.start()
        result["read_cold_s"] = timed(lambda: read_all(mnt, names, digests))
        result["read_warm_s"] = timed(lambda: read_all(mnt, names, digests))
    except ToolFailed as exc:
        tail = fs.log_tail()
        raise ToolFailed(f"{exc}\n--- s3fs log:\n{tail}" if tail else str(exc)) from exc
    finally:
        fs.stop()


BENCHES = (("dgfs", bench_dgfs), ("deltaglider CLI", bench_deltaglider), ("s3fs-fuse", bench_s3fs))
BUCKETS = {"dgfs": "dgfs", "deltaglider CLI": "deltaglider", "s3fs-fuse": "s3fs"}


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def fmt(value: Any, width: int, spec: str) -> str:
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    return f"{value:>{width}{spec}}"


def print_table(results: dict[str, dict[str, Any]], original: int, count: int) -> None:
    mb = original / 1e6
    print(f"\n{count} files, {mb:.1f} MB original\n")
    print(
        f"{'tool':<16} {'cp s':>7} {'durable s':>10} {'MB/s':>7} {'read cold s':>12} {'MB/s':>7} "
        f"{'read warm s':>12} {'stored MB':>10} {'ratio':>6}"
    )
    for name, r in results.items():
        up, cold = r.get("upload_s"), r.get("read_cold_s")
        stored = r.get("stored_bytes")
        print(
            f"{name:<16} {fmt(r.get('cp_s'), 7, '.2f')} {fmt(up, 10, '.2f')} "
            f"{fmt(mb / up if up else None, 7, '.1f')} {fmt(cold, 12, '.2f')} "
            f"{fmt(mb / cold if cold else None, 7, '.1f')} {fmt(r.get('read_warm_s'), 12, '.2f')} "
            f"{fmt(stored / 1e6 if stored is not None else None, 10, '.1f')} "
            f"{fmt(stored / original if stored is not None else None, 6, '.3f')}"
        )
    for name, r in results.items():
        if "error" in r:
            print(f"\n{name} FAILED: {r['error']}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--versions", type=int, default=20)
    parser.add_argument("--size-mb", type=float, default=16.0)
    args = parser.parse_args()
    os.environ.update(S3_TEST_ENV)
    # A SIGTERM/SIGHUP (a timeout, a closed terminal) unwinds like Ctrl-C, so the
    # mounts, daemons and server are still cleaned up.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    work = Path(tempfile.mkdtemp(prefix="dgfs-compare-"))
    results: dict[str, dict[str, Any]] = {}
    paths: list[Path] = []
    original = 0
    try:
        print(f"== generating {args.versions} releases (~{args.size_mb:g} MiB uncompressed each)")
        paths = write_series(work / "dist", args.versions, size=int(args.size_mb * (1 << 20)))
        digests = {p.name: sha256(p) for p in paths}
        original = sum(p.stat().st_size for p in paths)
        with SeaweedServer(stop_timeout=5) as server:  # throwaway data: SIGKILL after 5 s is fine
            endpoint = server.endpoint_url
            print(f"== SeaweedFS on {endpoint}")
            for name, bench in BENCHES:
                print(f"== {name}", flush=True)
                result: dict[str, Any] = {}
                results[name] = result
                try:
                    bench(endpoint, work, paths, digests, result)
                except ToolFailed as exc:
                    result["error"] = str(exc)
                except Exception as exc:  # a bug here or a server hiccup: report, go on
                    result["error"] = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
                if "error" in result:
                    # The server's own complaints say more than an EIO (e.g. no free volumes).
                    errors = [x for x in server.log_tail(5000).splitlines() if x.startswith("E")]
                    if errors:
                        result["error"] += "\n--- SeaweedFS errors:\n" + "\n".join(errors[-3:])
                    print(f"   FAILED: {result['error'].splitlines()[0]}", flush=True)
                with suppress(Exception):
                    result["stored_bytes"] = bucket_bytes(endpoint, BUCKETS[name])
    finally:
        for mnt in work.glob("mnt-*"):  # normally already unmounted by FuseMount.stop
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    print_table(results, original, len(paths))
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(
        json.dumps(
            {
                "versions": len(paths),
                "size_mb": args.size_mb,
                "original_bytes": original,
                "results": results,
            },
            indent=2,
        )
    )
    print("\nwritten: benchmarks/results/compare.json")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
