"""CPU seconds of deep mode's stores and cold reads, in one process, per file.

Wall-clock timings on a shared machine move with its load (``speed.py``
compares tools within one run for that reason); CPU seconds (this process's
threads and its children: xdelta3, zgz) move far less, so a change to the
deep path can be measured against its base on a busy machine too:

    .venv/bin/python benchmarks/deep_cpu.py [--series wheels,sdists] [--count 4]
    .venv/bin/python benchmarks/deep_cpu.py --tree /tmp/base-worktree   # the same, on another tree

For each series it stores the files in order into a deep directory (a
``Core`` over the in-memory store: no S3, no FUSE), then again into a new
directory all at once, ``--workers`` at a time (as a mount's upload workers
do after ``cp``), then reads every file back from an empty cache one after
the other ("sequential"), then again all at once ("concurrent", as a
prefetch beside a reader does), SHA-256 checked. The last version is also
stored again as a new process would store it first (after a remount):
knowing no verdicts on compressed spans, and knowing those the earlier
stores left in the cache directory (``dgfs.deep.remember``).
For a ``.tar.gz`` it also measures the floor the issue sets: inflating it
plus one zlib level-9 deflate of its content, and the rebuild of the first
file's expanded form with 1 and 2 workers (a large gzip stream is rebuilt
in pieces side by side where the tree supports it).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def floor_seconds(path: Path) -> float:
    """CPU seconds of inflating a gzip file and deflating its content once at level 9."""
    start = cpu_seconds()
    content = gzip.decompress(path.read_bytes())
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    compressor.compress(content)
    compressor.flush()
    return cpu_seconds() - start


def rebuild_seconds(path: Path, work: Path) -> list[tuple[float, float]]:
    """CPU and wall seconds of ``rebuild_file`` of ``path``'s expanded form,
    with 1 and 2 workers (the SHA-256 checked)."""
    from dgfs.deep import expand

    form = work / "form.dgx"
    expand.expand_file(path, form, scratch_dir=work)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    out = []
    for workers in (1, 2):
        c, w = cpu_seconds(), time.perf_counter()
        digest, _ = expand.rebuild_file(form, work / "out", work, workers)
        out.append((cpu_seconds() - c, time.perf_counter() - w))
        if digest != want:
            raise SystemExit(f"{path.name}: rebuilt to other bytes")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--series", default="wheels,sdists,plain-wheels")
    parser.add_argument("--count", type=int, default=4, help="versions per series (default 4)")
    parser.add_argument("--tree", type=Path, help="import dgfs from this source tree")
    parser.add_argument(
        "--workers", type=int, default=4, help="stores at once (default 4: upload_workers)"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.series import all_series  # this tree's, whichever dgfs is measured

    if args.tree:
        sys.path.insert(0, str(args.tree.resolve()))
    import trio

    import dgfs.deep
    from dgfs.cache import ContentCache
    from dgfs.core import Core
    from dgfs.deep import expand
    from dgfs.delta import DeltaEngine
    from dgfs.format import DeltaMode
    from dgfs.policy import Policy
    from dgfs.store.memory import MemoryStore

    print(f"dgfs from {Path(expand.__file__).parents[2]}; CPU seconds (wall seconds)")
    save_verdicts = getattr(dgfs.deep, "save_verified_spans", None)  # trees before 2026-12-06
    load_verdicts = getattr(dgfs.deep, "load_verified_spans", None)
    every = {s.name: s for s in all_series(count=args.count)}

    async def run(paths: list[Path], work: Path) -> None:
        store = MemoryStore()

        def core(name: str) -> tuple[Core, ContentCache]:
            cache = ContentCache(work / f"cache-{name}", 1 << 34)
            policy = Policy()
            return Core(
                store, cache, DeltaEngine(), policy, scratch_dir=work, deltas=DeltaMode.DEEP
            ), cache

        writer, cache = core("put")
        puts = []
        verdicts = work / "verdicts"  # what a mount's cache_dir keeps (dgfs.deep.remember)
        verdicts.mkdir()
        for path in paths:
            if path == paths[-1] and save_verdicts is not None:
                save_verdicts(verdicts)
            c, w = cpu_seconds(), time.perf_counter()
            await writer.put(path, f"s/{path.name}")
            puts.append((cpu_seconds() - c, time.perf_counter() - w))
        await writer.aclose()
        cache.close()
        print("  store, per file: " + ", ".join(f"{c:.2f} ({w:.1f})" for c, w in puts))
        # The last version stored again, as the first store of a new process
        # (a remount): with no verdicts, or with those the cache_dir kept.
        for label in ("forgotten", "remembered"):
            if label == "remembered" and load_verdicts is None:
                print("  store after a remount, verdicts remembered: not in this tree")
                continue
            expand.VERIFIED_SPANS.clear()
            if label == "remembered":
                load_verdicts(verdicts)
            again, cache = core(f"remount-{label}")
            c, w = cpu_seconds(), time.perf_counter()
            await again.put(paths[-1], f"s/{label}-{paths[-1].name}")
            print(
                f"  store after a remount, verdicts {label}:"
                f" {cpu_seconds() - c:.2f} ({time.perf_counter() - w:.1f})"
            )
            await again.aclose()
            cache.close()
        expand.VERIFIED_SPANS.clear()
        writer, cache = core("put-at-once")
        limiter = trio.CapacityLimiter(args.workers)

        async def put(path: Path) -> None:
            async with limiter:
                await writer.put(path, f"at-once/{path.name}")

        c, w = cpu_seconds(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for path in paths:
                nursery.start_soon(put, path)
                await trio.sleep(0.01)  # in order, as cp closes them
        print(
            f"  store, all at once ({args.workers} at a time):"
            f" {cpu_seconds() - c:.2f} ({time.perf_counter() - w:.1f})"
        )
        await writer.aclose()
        cache.close()
        for mode in ("sequential", "concurrent"):
            expand.REBUILT_SUBTREES.clear()
            reader, cache = core(mode)
            stored = [await reader.locate(f"s/{p.name}") for p in paths]
            c, w = cpu_seconds(), time.perf_counter()
            if mode == "sequential":
                for one in stored:
                    await reader.materialize(one)
            else:
                async with trio.open_nursery() as nursery:
                    for one in stored:
                        nursery.start_soon(reader.materialize, one)
            print(f"  cold read, {mode}: {cpu_seconds() - c:.2f} ({time.perf_counter() - w:.1f})")
            await reader.aclose()
            cache.close()

    for name in args.series.split(","):
        series = every[name]
        print(f"{name}: {series.description}")
        if series.paths[0].name.endswith(".tar.gz"):
            floors = [floor_seconds(p) for p in series.paths]
            print(
                "  floor (inflate + one level-9 deflate), per file: "
                + ", ".join(f"{f:.2f}" for f in floors)
            )
            with tempfile.TemporaryDirectory(prefix="dgfs-deep-cpu-") as work:
                rebuilds = rebuild_seconds(series.paths[0], Path(work))
            print(
                "  rebuild of the first one's expanded form, 1 / 2 workers: "
                + ", ".join(f"{c:.2f} ({w:.2f})" for c, w in rebuilds)
            )
        expand.VERIFIED_SPANS.clear()
        with tempfile.TemporaryDirectory(prefix="dgfs-deep-cpu-") as work:
            trio.run(run, series.paths, Path(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
