"""What the environment dgfs gives xdelta3 costs: with and without huge pages.

``dgfs.children.child_env`` sets ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
(``dgfs.children.MALLOC_TUNABLES``). This runs xdelta3 exactly as
``dgfs.delta.DeltaEngine`` does (encode ``-9 -D -R -A``, decode ``-n -D``,
``-B`` the whole source) on consecutive releases of each series, each run
once with dgfs's child environment and once with the same minus the
tunable, alternating, and prints per series and direction the median wall
seconds, the mean CPU seconds (user + system) and the largest maximum RSS
of one run:

    .venv/bin/python benchmarks/children_env.py [--series wheels] [--pairs 3] [--repeats 5]

Then (``--ballast-mib``, 80 by default: a mount daemon's size) it times
the start of a size-capped run as dgfs makes it, from a process holding
that much memory: through util-linux's ``prlimit`` (Python vforks), and
with the ``preexec_fn`` dgfs falls back to (Python forks the whole
process): the median wall seconds of ``xdelta3 -V``.

Every decode's output is compared with the file it rebuilds. The kernel
grants the pages only where /sys/kernel/mm/transparent_hugepage/enabled
is ``madvise`` or ``always``; the script prints the setting.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.series import DEFAULT_CACHE, all_series  # noqa: E402
from dgfs import children  # noqa: E402
from dgfs.delta import source_window  # noqa: E402

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def run(command: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and maximum RSS (KiB) of one child run."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {stderr.decode(errors='replace')}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", default="wheels,sdists,tars")
    parser.add_argument("--pairs", type=int, default=3, help="consecutive pairs per series")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--ballast-mib", type=int, default=80)
    args = parser.parse_args()
    xdelta3 = children.resolve("xdelta3")
    if xdelta3 is None:
        raise SystemExit("xdelta3 is not installed (apt-get install xdelta3)")
    with_tunable = children.child_env()
    without = {k: v for k, v in with_tunable.items() if k != "GLIBC_TUNABLES"}
    envs = {"4 KiB pages": without, "huge pages": with_tunable}
    wanted = args.series.split(",")
    setting = THP.read_text().strip() if THP.exists() else "unknown"
    print(f"transparent_hugepage: {setting}; GLIBC_TUNABLES={children.MALLOC_TUNABLES}")
    print(f"{'series':8} {'run':7} {'env':12} {'wall s':>8} {'cpu s':>8} {'max RSS MiB':>12}")
    with tempfile.TemporaryDirectory(prefix="dgfs-children-env-") as tmp:
        work = Path(tmp)
        for series in all_series(args.cache, count=args.pairs + 1):
            if series.name not in wanted:
                continue
            pairs = list(zip(series.paths, series.paths[1:], strict=False))[: args.pairs]
            results: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
            for _ in range(args.repeats):
                for source, target in pairs:
                    window = str(source_window(source.stat().st_size, 1 << 31))
                    delta, out = work / "delta", work / "out"
                    for name, env in envs.items():
                        encode = [xdelta3, "-e", "-9", "-f", "-D", "-R", "-A", "-B", window]
                        results.setdefault(("encode", name), []).append(
                            run([*encode, "-s", str(source), str(target), str(delta)], env)
                        )
                        decode = [xdelta3, "-d", "-f", "-n", "-D", "-B", window]
                        results.setdefault(("decode", name), []).append(
                            run([*decode, "-s", str(source), str(delta), str(out)], env)
                        )
                        if not filecmp.cmp(out, target, shallow=False):
                            raise SystemExit(f"decode of {target.name} gave other bytes")
            for (what, name), runs in results.items():
                wall = statistics.median(r[0] for r in runs)
                cpu = statistics.mean(r[1] for r in runs)
                rss = max(r[2] for r in runs) / 1024
                print(f"{series.name:8} {what:7} {name:12} {wall:8.3f} {cpu:8.3f} {rss:12.0f}")
    spawn_costs(xdelta3, args.ballast_mib, args.repeats * 20)
    return 0


def spawn_costs(xdelta3: str, ballast_mib: int, runs: int) -> None:
    """Median wall seconds to run ``xdelta3 -V`` size-capped, both ways."""
    ballast = bytearray(ballast_mib << 20)
    for offset in range(0, len(ballast), 4096):  # resident, as a daemon's heap is
        ballast[offset] = 1
    ways = {"prlimit": children.size_capped([xdelta3, "-V"], 1 << 30)}
    prlimit = children._prlimit
    try:
        children._prlimit = lambda: None  # type: ignore[assignment]
        ways["preexec_fn"] = children.size_capped([xdelta3, "-V"], 1 << 30)
    finally:
        children._prlimit = prlimit  # type: ignore[assignment]
    print(f"start of a size-capped run from a process of {ballast_mib} MiB (median of {runs}):")
    for name, (command, preexec) in ways.items():
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run(
                command, env=children.child_env(), preexec_fn=preexec, capture_output=True
            )
            times.append(time.perf_counter() - start)
        print(f"  {name:10} {statistics.median(times) * 1000:6.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
