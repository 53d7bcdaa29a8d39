"""Deep deltaspaces against DeltaGlider and dgfs's DeltaGlider mode, on real releases.

One run on one local SeaweedFS. For each release series of
benchmarks/series.py (botocore wheels, Django sdists, the same sdists as
plain tars, pip wheels) three stores take the files, oldest first:

- "DeltaGlider": DeltaGlider 6.2.0's Python API (its own venv), with
  ``.whl`` added to the delta-eligible extensions (stock DeltaGlider stores
  wheels whole) and ``XDELTA="-D -R"`` (without it, its ``.tar.gz`` deltas
  cannot be read back). Upload and download are timed inside its process;
  the download is a fresh process (empty cache), then SHA-256 checked.
- "dgfs dg": a foreground dgfs mount, ``-o deltas=dg`` (DeltaGlider v6
  compatible): ``cp`` into a new directory, then fsync every file, timed
  until durable; unmount; then a fresh mount with an empty cache_dir reads
  and SHA-256s every file (cold read).
- "dgfs deep": the same with ``-o deltas=deep`` (dgfs/deep/).

Stored bytes are what the bucket holds under the series' prefix, reference
included. Memory: each dgfs daemon's peak RSS (VmHWM) and the sampled peak
of daemon + its children (xdelta3, zgz) together; for DeltaGlider, its
process's ru_maxrss and that plus its largest child's. Prints one table per
series and a summary; writes benchmarks/results/deep.json. A tool that
fails is reported with its error and the others still run; mounts are
unmounted and daemons stopped by PID whatever happens (benchmarks/compare.py).

    .venv/bin/python benchmarks/deep.py [--cache DIR] [--small] [--series wheels,sdists]
        [--mount-options listing_ttl=600]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dgfs  # noqa: E402
from benchmarks.compare import (  # noqa: E402
    FuseMount,
    ToolFailed,
    _raise_interrupt,
    fmt,
    read_all,
    run,
    timed,
)
from benchmarks.demo import dgfs_bin, settle, sha256  # noqa: E402
from benchmarks.series import DEFAULT_CACHE, Series, all_series  # noqa: E402
from dgfs.deep.gnuzip import zgz_path  # noqa: E402
from testsupport.dgcli import deltaglider_bin, deltaglider_env  # noqa: E402
from testsupport.servers import S3_TEST_ENV, SeaweedServer, make_bucket, s3_client  # noqa: E402

TOOLS = ("DeltaGlider", "dgfs dg", "dgfs deep")
BUCKETS = {"DeltaGlider": "deltaglider", "dgfs dg": "dgfs-dg", "dgfs deep": "dgfs-deep"}
SAMPLE_INTERVAL = 0.05  # seconds between two memory samples of a daemon

# Run by DeltaGlider's own interpreter: argv[1] is a JSON request file
# {op: put|get, endpoint, bucket, prefix, paths, out, result}; it writes
# {seconds, files, version, delta_extensions, maxrss_kib, children_maxrss_kib}
# to the request's "result" path.
DG_SCRIPT = r"""
import json, resource, sys, time
from pathlib import Path

import deltaglider
from deltaglider import create_client

request = json.loads(Path(sys.argv[1]).read_text())
client = create_client(endpoint_url=request["endpoint"], log_level="WARNING")
# Stock DeltaGlider stores wheels whole; they are zips, so let them be deltas.
client.service.delta_extensions.add(".whl")
url = f"s3://{request['bucket']}/{request['prefix']}/"
files = []
t0 = time.monotonic()
if request["op"] == "put":
    for path in request["paths"]:
        summary = client.upload(path, url)
        files.append(
            {"name": Path(path).name, "key": summary.key, "operation": summary.operation,
             "stored_size": summary.stored_size, "is_delta": summary.is_delta}
        )
else:
    out = Path(request["out"])
    for path in request["paths"]:
        name = Path(path).name
        client.download(url + name, out / name)
seconds = time.monotonic() - t0
Path(request["result"]).write_text(json.dumps({
    "seconds": seconds,
    "files": files,
    "version": deltaglider.__version__,
    "delta_extensions": sorted(client.service.delta_extensions),
    "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "children_maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
}))
"""


def prefix_bytes(endpoint: str, bucket: str, prefix: str) -> int:
    """Bytes of every object under ``prefix/`` in ``bucket``."""
    client = s3_client(endpoint)
    try:
        total = 0
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
        for page in pages:
            total += sum(o["Size"] for o in page.get("Contents", []))
        return total
    finally:
        client.close()


def _status_kib(pid: int, field: str) -> int | None:
    """``field`` (VmHWM, VmRSS...) of /proc/PID/status in KiB; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            lists = list(Path(f"/proc/{parent}/task").glob("*/children"))
        except OSError:  # exited meanwhile
            continue
        for children in lists:
            with suppress(OSError, ValueError):
                kids = [int(x) for x in children.read_text().split()]
                found += kids
                todo += kids
    return found


class MonitoredMount(FuseMount):
    """A FuseMount whose daemon's memory is sampled while it runs.

    ``peak_rss_kib``: the daemon's own high-water mark (VmHWM).
    ``peak_tree_kib``: the largest sampled sum of the RSS of the daemon and
    its children (xdelta3, zgz), which VmHWM does not count.
    """

    def __init__(self, name: str, command: list[str], mountpoint: Path, log: Path) -> None:
        super().__init__(name, command, mountpoint, log)
        self.peak_rss_kib: int | None = None
        self.peak_tree_kib: int | None = None
        self._sampler: threading.Thread | None = None
        self._done = threading.Event()

    def start(self) -> None:
        super().start()
        assert self.pid is not None
        self._done.clear()
        self._sampler = threading.Thread(target=self._sample, args=(self.pid,), daemon=True)
        self._sampler.start()

    def stop(self) -> None:
        super().stop()
        self._done.set()
        if self._sampler is not None:
            self._sampler.join()
            self._sampler = None

    def _sample(self, pid: int) -> None:
        while True:
            hwm = _status_kib(pid, "VmHWM")
            if hwm is None:  # exited (a zombie has no Vm* lines)
                return
            tree = sum(_status_kib(p, "VmRSS") or 0 for p in [pid, *_descendants(pid)])
            self.peak_rss_kib = max(self.peak_rss_kib or 0, hwm)
            self.peak_tree_kib = max(self.peak_tree_kib or 0, tree)
            if self._done.wait(SAMPLE_INTERVAL):
                return


def bench_dgfs(
    mode: str,
    extra_options: str,
    endpoint: str,
    work: Path,
    series: Series,
    digests: dict[str, str],
    result: dict[str, Any],
) -> None:
    bucket = BUCKETS[f"dgfs {mode}"]
    names = [p.name for p in series.paths]
    mnt = work / f"mnt-{mode}"
    directory = mnt / series.name
    caches = (work / f"cache-{mode}-store", work / f"cache-{mode}-read")

    def mount(cache: Path) -> MonitoredMount:
        options = f"endpoint={endpoint},cache_dir={cache},log_level=warning,deltas={mode}"
        if extra_options:
            options += "," + extra_options
        command = [dgfs_bin(), "mount", bucket, str(mnt), "-f", "-o", options]
        result["command"] = " ".join(command)
        return MonitoredMount(f"dgfs {mode}", command, mnt, work / f"dgfs-{mode}-{series.name}.log")

    for cache in caches:
        shutil.rmtree(cache, ignore_errors=True)
    store, read = mount(caches[0]), mount(caches[1])
    try:
        store.start()
        directory.mkdir()
        result["cp_s"] = timed(lambda: run(["cp", *map(str, series.paths), str(directory)]))
        result["upload_s"] = result["cp_s"] + timed(lambda: settle(directory, dict.fromkeys(names)))
        # As stored (the writing mount's view), not re-derived by the reading mount.
        result["files"] = [
            {
                "name": name,
                "kind": os.getxattr(directory / name, "user.dgfs.kind").decode(),
                "stored_size": int(os.getxattr(directory / name, "user.dgfs.stored_size")),
            }
            for name in names
        ]
        store.stop()
        result["rss_kib"] = {"store": store.peak_rss_kib}
        result["tree_rss_kib"] = {"store": store.peak_tree_kib}
        read.start()  # fresh cache_dir: no cached references or expanded forms
        result["read_cold_s"] = timed(lambda: read_all(directory, names, digests))
        read.stop()
        result["rss_kib"]["read"] = read.peak_rss_kib
        result["tree_rss_kib"]["read"] = read.peak_tree_kib
    except ToolFailed as exc:
        tail = read.log_tail() or store.log_tail()
        raise ToolFailed(f"{exc}\n--- dgfs log:\n{tail}" if tail else str(exc)) from exc
    finally:
        read.stop()
        store.stop()
        for cache in caches:
            shutil.rmtree(cache, ignore_errors=True)


def bench_deltaglider(
    endpoint: str, work: Path, series: Series, digests: dict[str, str], result: dict[str, Any]
) -> None:
    python = str(Path(deltaglider_bin()).with_name("python"))
    env = deltaglider_env()
    out = work / f"out-dg-{series.name}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()

    def call(op: str) -> dict[str, Any]:
        request = work / f"dg-{op}.json"
        answer = work / f"dg-{op}-result.json"
        answer.unlink(missing_ok=True)
        request.write_text(
            json.dumps(
                {
                    "op": op,
                    "endpoint": endpoint,
                    "bucket": BUCKETS["DeltaGlider"],
                    "prefix": series.name,
                    "paths": [str(p) for p in series.paths],
                    "out": str(out),
                    "result": str(answer),
                }
            )
        )
        run([python, "-c", DG_SCRIPT, str(request)], env=env)
        answer_json: dict[str, Any] = json.loads(answer.read_text())
        return answer_json

    try:
        put = call("put")
        result["cp_s"] = result["upload_s"] = put["seconds"]
        result["files"] = put["files"]
        result["version"] = put["version"]
        result["delta_extensions"] = put["delta_extensions"]
        get = call("get")
        result["read_cold_s"] = get["seconds"] + timed(
            lambda: read_all(out, [p.name for p in series.paths], digests)
        )
        result["rss_kib"] = {"store": put["maxrss_kib"], "read": get["maxrss_kib"]}
        # Not sampled like dgfs's: own peak + largest child's, an upper bound.
        result["tree_rss_kib"] = {
            phase: answer["maxrss_kib"] + answer["children_maxrss_kib"]
            for phase, answer in (("store", put), ("read", get))
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)


Bench = Callable[[str, Path, Series, dict[str, str], dict[str, Any]], None]


def benches(mount_options: str) -> dict[str, Bench]:
    """The three stores, in TOOLS order; ``mount_options`` go to both dgfs mounts."""
    return {
        "DeltaGlider": bench_deltaglider,
        "dgfs dg": functools.partial(bench_dgfs, "dg", mount_options),
        "dgfs deep": functools.partial(bench_dgfs, "deep", mount_options),
    }


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return a / b
    return None


def _mb(kib: Any) -> float | None:
    return kib / 1024 if isinstance(kib, (int, float)) else None


def series_ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    dg, deep, plain = results["DeltaGlider"], results["dgfs deep"], results["dgfs dg"]
    return {
        "deep_vs_deltaglider_stored": _ratio(deep.get("stored_bytes"), dg.get("stored_bytes")),
        "deep_vs_dgfs_dg_stored": _ratio(deep.get("stored_bytes"), plain.get("stored_bytes")),
        "deep_vs_dgfs_dg_store_time": _ratio(deep.get("upload_s"), plain.get("upload_s")),
        "deep_vs_dgfs_dg_cold_read": _ratio(deep.get("read_cold_s"), plain.get("read_cold_s")),
    }


def _kinds(result: dict[str, Any]) -> str:
    files = result.get("files") or []
    if "kind" in (files[0] if files else {}):
        counts = Counter(f["kind"] for f in files)
    else:  # DeltaGlider: create_reference, create_delta or upload_direct
        counts = Counter(f.get("operation", "?").removeprefix("create_") for f in files)
    return " ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))


def print_series(entry: dict[str, Any]) -> None:
    original = entry["original_bytes"]
    print(
        f"\n{entry['name']}: {entry['description']}\n"
        f"{len(entry['files'])} files, {original / 1e6:.1f} MB original\n"
    )
    print(
        f"{'tool':<12} {'stored MB':>10} {'stored/orig':>12} {'store s':>8} {'cold read s':>12} "
        f"{'RSS MB st/rd':>14} {'+children MB st/rd':>19}  files stored as"
    )
    for tool, r in entry["results"].items():
        stored = r.get("stored_bytes")
        rss, tree = r.get("rss_kib") or {}, r.get("tree_rss_kib") or {}
        print(
            f"{tool:<12} {fmt(stored / 1e6 if stored is not None else None, 10, '.2f')} "
            f"{fmt(_ratio(stored, original), 12, '.4f')} {fmt(r.get('upload_s'), 8, '.2f')} "
            f"{fmt(r.get('read_cold_s'), 12, '.2f')} "
            f"{fmt(_mb(rss.get('store')), 7, '.0f')}/{fmt(_mb(rss.get('read')), 6, '.0f')} "
            f"{fmt(_mb(tree.get('store')), 12, '.0f')}/{fmt(_mb(tree.get('read')), 6, '.0f')}  "
            f"{_kinds(r)}"
        )
    ratios = entry["ratios"]
    print(
        f"deep/DeltaGlider stored {fmt(ratios['deep_vs_deltaglider_stored'], 0, '.3f')}   "
        f"deep/dgfs-dg stored {fmt(ratios['deep_vs_dgfs_dg_stored'], 0, '.3f')}   "
        f"deep÷dgfs-dg store time {fmt(ratios['deep_vs_dgfs_dg_store_time'], 0, '.2f')}   "
        f"cold read {fmt(ratios['deep_vs_dgfs_dg_cold_read'], 0, '.2f')}"
    )
    for tool, r in entry["results"].items():
        if "error" in r:
            print(f"{tool} FAILED: {r['error']}")


def print_summary(entries: list[dict[str, Any]]) -> None:
    print(
        f"\n{'series':<13} {'orig MB':>8} {'DG MB':>8} {'dg MB':>8} {'deep MB':>8} "
        f"{'deep/DG':>8} {'store deep÷dg':>14} {'read deep÷dg':>13} "
        f"{'RSS MB dg':>10} {'RSS MB deep':>12}"
    )
    for e in entries:
        r, ratios = e["results"], e["ratios"]
        stored = {t: _ratio(r[t].get("stored_bytes"), 1e6) for t in TOOLS}
        peak = {t: _peak_mb(r[t]) for t in TOOLS}
        print(
            f"{e['name']:<13} {e['original_bytes'] / 1e6:>8.1f} "
            f"{fmt(stored['DeltaGlider'], 8, '.2f')} {fmt(stored['dgfs dg'], 8, '.2f')} "
            f"{fmt(stored['dgfs deep'], 8, '.2f')} "
            f"{fmt(ratios['deep_vs_deltaglider_stored'], 8, '.3f')} "
            f"{fmt(ratios['deep_vs_dgfs_dg_store_time'], 14, '.2f')} "
            f"{fmt(ratios['deep_vs_dgfs_dg_cold_read'], 13, '.2f')} "
            f"{fmt(peak['dgfs dg'], 10, '.0f')} {fmt(peak['dgfs deep'], 12, '.0f')}"
        )


def _peak_mb(result: dict[str, Any]) -> float | None:
    values = [v for v in (result.get("rss_kib") or {}).values() if v is not None]
    return _mb(max(values)) if values else None


def _output(command: list[str]) -> str | None:
    """What ``command`` prints (stdout, else stderr), stripped; None if it cannot run."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout or done.stderr).strip()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"default {DEFAULT_CACHE}"
    )
    parser.add_argument("--small", action="store_true", help="3 versions per series")
    parser.add_argument("--series", help="comma-separated names (default: all)")
    parser.add_argument(
        "--mount-options",
        default="",
        help="more -o options for both dgfs mounts, e.g. listing_ttl=600",
    )
    args = parser.parse_args()
    os.environ.update(S3_TEST_ENV)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)

    print(f"== release series in {args.cache}", flush=True)
    chosen = all_series(args.cache, args.small)
    if args.series:
        wanted = args.series.split(",")
        unknown = set(wanted) - {s.name for s in chosen}
        if unknown:
            raise SystemExit(f"unknown series: {', '.join(sorted(unknown))}")
        chosen = [s for s in chosen if s.name in wanted]
    zgz = zgz_path()
    print(f"== zgz (pristine-tar): {zgz or 'not found, GNU-gzip streams stay compressed'}")
    environment = {
        "dgfs": dgfs.__version__,
        "git_head": _output(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
        # Uncommitted changes to dgfs when the run started.
        "dgfs_changes": (
            _output(["git", "-C", str(ROOT), "status", "--short", "dgfs"]) or ""
        ).splitlines(),
        "xdelta3": (_output(["xdelta3", "-V"]) or "?").splitlines()[0],
        "zgz": zgz,
        "small": args.small,
        "mount_options": args.mount_options,
    }
    work = Path(tempfile.mkdtemp(prefix="dgfs-deep-"))
    bench = benches(args.mount_options)
    entries: list[dict[str, Any]] = []
    try:
        with SeaweedServer(stop_timeout=5) as server:  # throwaway data: SIGKILL after 5 s is fine
            endpoint = server.endpoint_url
            print(f"== SeaweedFS on {endpoint}")
            for bucket in BUCKETS.values():
                make_bucket(endpoint, bucket)
            for series in chosen:
                print(
                    f"== {series.name}: {series.description}, {len(series.paths)} files",
                    flush=True,
                )
                digests = {p.name: sha256(p) for p in series.paths}
                entry: dict[str, Any] = {
                    "name": series.name,
                    "description": series.description,
                    "files": [p.name for p in series.paths],
                    "original_bytes": series.original_bytes,
                    "results": {},
                }
                entries.append(entry)
                for tool in TOOLS:
                    print(f"   {tool}", flush=True)
                    result: dict[str, Any] = {}
                    entry["results"][tool] = result
                    try:
                        bench[tool](endpoint, work, series, digests, result)
                    except ToolFailed as exc:
                        result["error"] = str(exc)
                    except Exception as exc:  # a bug here or a server hiccup: report, go on
                        result["error"] = f"{type(exc).__name__}: {exc}"
                        traceback.print_exc()
                    if "error" in result:
                        errors = [
                            x for x in server.log_tail(5000).splitlines() if x.startswith("E")
                        ]
                        if errors:
                            result["error"] += "\n--- SeaweedFS errors:\n" + "\n".join(errors[-3:])
                        print(f"   FAILED: {result['error'].splitlines()[0]}", flush=True)
                    with suppress(Exception):
                        result["stored_bytes"] = prefix_bytes(endpoint, BUCKETS[tool], series.name)
                entry["ratios"] = series_ratios(entry["results"])
                print_series(entry)
    finally:
        for mnt in work.glob("mnt-*"):  # normally already unmounted by FuseMount.stop
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    print_summary(entries)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "deep.json").write_text(
        json.dumps({"environment": environment, "series": entries}, indent=2)
    )
    print(f"\nzgz: {'yes, ' + zgz if zgz else 'no'}\nwritten: benchmarks/results/deep.json")
    return 1 if any("error" in r for e in entries for r in e["results"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
