"""How many ``.tar.gz`` deltas made by stock DeltaGlider dgfs gives back exactly.

DeltaGlider 6.2.0 runs ``xdelta3 -e -9 -s reference.bin FILE FILE.delta``
(no ``-D -R``): for gzip input xdelta3 diffs the decompressed streams and
re-compresses with gzip(1) on decode, so DeltaGlider's own download fails
its SHA-256 check. This script stores real consecutive sdists from PyPI the
way the stock CLI does (the first as ``reference.bin``, every file as a
delta made by that very command, DeltaGlider's metadata), into an in-memory
store, then reads each one back through ``Core.get`` (dgfs's read path,
which recovers such files) and counts exact matches and the time taken.

    .venv/bin/python benchmarks/stock_gzip.py [--cache DIR]

Writes benchmarks/results/stock_gzip.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.demo import sha256  # noqa: E402
from benchmarks.series import DEFAULT_CACHE, DJANGO, PIP, Release, fetch  # noqa: E402
from dgfs import format as fmt  # noqa: E402
from dgfs.cache import ContentCache  # noqa: E402
from dgfs.core import Core  # noqa: E402
from dgfs.delta import DeltaEngine  # noqa: E402
from dgfs.errors import DgfsError  # noqa: E402
from dgfs.policy import Policy  # noqa: E402
from dgfs.store.memory import MemoryStore  # noqa: E402

SDISTS = (
    DJANGO,
    Release("botocore", "botocore-{}.tar.gz", tuple(f"1.34.{n}" for n in range(100, 112))),
    Release("pip", "pip-{}.tar.gz", PIP.versions),
    Release(
        "requests",
        "requests-{}.tar.gz",
        ("2.28.0", "2.28.1", "2.28.2", "2.29.0", "2.30.0", "2.31.0")
        + ("2.32.0", "2.32.1", "2.32.2", "2.32.3"),
    ),
)


def stock_delta(reference: Path, target: Path, out: Path) -> None:
    """What DeltaGlider 6.2.0 runs (its diff_xdelta adapter), without XDELTA."""
    env = {k: v for k, v in os.environ.items() if k != "XDELTA"}
    subprocess.run(
        ["xdelta3", "-e", "-9", "-f", "-s", str(reference), str(target), str(out)],
        check=True,
        env=env,
        capture_output=True,
    )


async def store_like_deltaglider(
    store: MemoryStore, prefix: str, paths: list[Path], work: Path
) -> None:
    reference = paths[0]
    ref_sha = sha256(reference)
    now = datetime.now(UTC)
    ref_key = fmt.reference_key(prefix)
    ref_meta = fmt.reference_metadata(reference.name, ref_sha, now)
    await store.put_bytes(ref_key, reference.read_bytes(), ref_meta)
    for path in paths:
        delta = work / f"{path.name}.delta"
        stock_delta(reference, path, delta)
        meta = fmt.delta_metadata(
            original_name=path.name,
            file_sha256=sha256(path),
            file_size=path.stat().st_size,
            ref_key=ref_key,
            ref_sha256=ref_sha,
            delta_size=delta.stat().st_size,
            now=now,
            zero_diff=path == reference,
        )
        meta["dg-tool"] = "deltaglider/6.2.0"
        await store.put_bytes(fmt.delta_key(f"{prefix}/{path.name}"), delta.read_bytes(), meta)


async def read_back(
    core: Core, prefix: str, paths: list[Path], work: Path
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for path in paths:
        out = work / f"out-{path.name}"
        t0 = time.monotonic()
        try:
            await core.get(f"{prefix}/{path.name}", out)
            exact = sha256(out) == sha256(path)
            error = ""
        except DgfsError as exc:
            exact, error = False, str(exc)
        seconds = time.monotonic() - t0
        out.unlink(missing_ok=True)
        rows.append({"file": path.name, "exact": exact, "seconds": seconds, "error": error})
        print(f"   {path.name:<32} {'exact' if exact else 'LOST':<6} {seconds:6.2f} s {error}")
    return rows


async def run(cache: Path, only: set[str] | None) -> dict[str, object]:
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="dgfs-stock-gzip-") as tmp:
        work = Path(tmp)
        store = MemoryStore()
        content = ContentCache(work / "cache", 4 << 30)
        core = Core(store, content, DeltaEngine(), Policy(), scratch_dir=work / "scratch")
        try:
            for release in SDISTS:
                if only is not None and release.project not in only:
                    continue
                paths = fetch(release, cache / "pypi")
                print(f"== {release.project} {release.span()} ({len(paths)} sdists)")
                await store_like_deltaglider(store, release.project, paths, work)
                results[release.project] = await read_back(core, release.project, paths, work)
        finally:
            await core.aclose()
            content.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--only", help="comma-separated projects (default: all)")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    results = trio.run(run, args.cache, only)
    rows = [row for series in results.values() for row in series]  # type: ignore[attr-defined]
    exact = sum(1 for row in rows if row["exact"])
    seconds = [row["seconds"] for row in rows if row["exact"]]
    print(
        f"\nexact: {exact} of {len(rows)} ({100 * exact / len(rows):.1f}%); "
        f"mean {sum(seconds) / max(len(seconds), 1):.2f} s per recovered file"
    )
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "stock_gzip.json").write_text(json.dumps({"series": results}, indent=2))
    return 0 if exact == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
