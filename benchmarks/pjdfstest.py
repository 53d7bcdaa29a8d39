"""pjdfstest (POSIX syscall conformance, ~8,800 tests) on a fresh dgfs mount.

Builds pjdfstest if needed, starts a local S3 server (SeaweedFS when
``weed`` is installed, else moto_server; ``--server`` chooses), creates a
bucket, mounts it with dgfs as root with ``allow_other`` (the suite runs
syscalls as other users), runs every test file of pjdfstest's ``tests/``
with ``prove -v`` from a directory inside the mount, one file at a time
with a timeout each, and prints pass/fail counts per group (chmod, chown,
link, mkdir, mkfifo, mknod, open, rename, ...) and in total. Writes
benchmarks/results/pjdfstest.json (every failed test line, per file) and
keeps the daemon's log beside it. The mount is unmounted and the daemon
and server stopped by PID at the end, on Ctrl-C, SIGTERM and SIGHUP too.

Needs root, /dev/fuse, perl's ``prove``, openssl, and for the build a C
compiler, autoconf and automake (Debian: ``apt install autoconf automake
libtool``). Get the source once, e.g.::

    git clone https://github.com/pjd/pjdfstest ~/.cache/dgfs-bench/pjdfstest

then, as root::

    .venv/bin/python benchmarks/pjdfstest.py [--src DIR] [--server seaweedfs|moto]
        [--fs FUSE.DGFS] [--timeout 600] [--budget 7200] [--mount-options a=b,...]
        [GROUP_OR_FILE ...]           # e.g. chmod rename/09.t; default: every test

``--src`` defaults to $DGFS_PJDFSTEST_SRC, else ~/.cache/dgfs-bench/pjdfstest;
``--tarball PATH`` unpacks a source tarball there first when it is missing.

File-system type: pjdfstest's ``tests/conf`` sets ``fs`` from ``df -PT .``
(on Linux), which for dgfs is ``FUSE.DGFS``; the tests then hold dgfs to
the same expectations as any FUSE filesystem they do not name. The only
Linux FUSE special case in ``tests/misc.sh`` skips the hard-link tests for
``FUSE.S3FS`` and ``FUSE.GCSFUSE``. The script runs a copy of ``tests/``
whose ``conf`` lets the environment variable ``PJDFSTEST_FS`` override the
detected type, and sets it from ``--fs`` (default: keep the detection), so
``--fs FUSE.S3FS`` reproduces the conditions s3fs-fuse is measured under.

Counting is prove's: a test file that does not apply to this system or
file-system type (``quick_exit``) counts as one passing test; a test
marked TODO counts as passed (reported separately); tests a file planned
but never printed (it timed out or died) count as failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.compare import FuseMount, ToolFailed, _raise_interrupt  # noqa: E402
from benchmarks.demo import dgfs_bin  # noqa: E402
from benchmarks.series import DEFAULT_CACHE  # noqa: E402
from testsupport.servers import (  # noqa: E402
    S3_TEST_ENV,
    MotoServer,
    SeaweedServer,
    make_bucket,
)

DEFAULT_SRC = DEFAULT_CACHE / "pjdfstest"
RESULTS = ROOT / "benchmarks" / "results"
BUCKET = "pjdfstest"
# Appended to the copy of tests/conf: the environment may name the type.
CONF_OVERRIDE = """
# Added by dgfs benchmarks/pjdfstest.py: PJDFSTEST_FS overrides the detected type.
if [ -n "${PJDFSTEST_FS}" ]; then
	fs="${PJDFSTEST_FS}"
fi
"""
PLAN = re.compile(r"^1\.\.(\d+)")
# Test lines carry their number; prove -v also prints a bare "ok" per file.
RESULT = re.compile(r"^(not ok|ok)\s+(\d+)\b(.*)$")
TODO = re.compile(r"#\s*TODO\b", re.IGNORECASE)


@dataclass
class FileResult:
    """What one ``.t`` file reported."""

    planned: int = 0
    passed: int = 0
    failed: int = 0
    todo: int = 0  # "not ok ... # TODO": prove counts these as passed
    missing: int = 0  # planned but never printed: counted as failed
    seconds: float = 0.0
    timed_out: bool = False
    exit_status: int | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return max(self.planned, self.passed + self.failed + self.todo + self.missing)

    @property
    def failed_total(self) -> int:
        return self.failed + self.missing


def parse_tap(text: str) -> FileResult:
    """Counts of one test file's TAP output (as ``prove -v`` echoes it)."""
    result = FileResult()
    for line in text.splitlines():
        line = line.strip()
        if plan := PLAN.match(line):
            result.planned = int(plan.group(1))
            continue
        match = RESULT.match(line)
        if match is None:
            continue
        if TODO.search(match.group(3)):
            result.todo += 1
        elif match.group(1) == "ok":
            result.passed += 1
        else:
            result.failed += 1
            result.failures.append(line)
    seen = result.passed + result.failed + result.todo
    result.missing = max(0, result.planned - seen)
    if result.planned == 0 and seen == 0:
        result.missing = 1  # no plan, no result: the file died; one failure, as prove says
    return result


# --- pjdfstest source ---------------------------------------------------------


def prepare_source(src: Path, tarball: Path | None) -> Path:
    """``src`` with a built ``pjdfstest`` binary in it; unpacks ``tarball`` there if missing."""
    if not (src / "tests" / "conf").is_file():
        if tarball is None:
            raise ToolFailed(
                f"no pjdfstest source in {src}: git clone https://github.com/pjd/pjdfstest {src}"
                " (or pass --src DIR, or --tarball FILE)"
            )
        src.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball) as tar:
            tops = {m.name.split("/")[0] for m in tar.getmembers()}
            tar.extractall(src, filter="data")
        if len(tops) == 1 and not (src / "tests" / "conf").is_file():
            # A GitHub tarball holds one top directory: use its contents.
            top = src / tops.pop()
            for child in top.iterdir():
                child.rename(src / child.name)
            top.rmdir()
        if not (src / "tests" / "conf").is_file():
            raise ToolFailed(f"{tarball} holds no pjdfstest source (no tests/conf)")
    binary = src / "pjdfstest"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    print(f"== building pjdfstest in {src}", flush=True)
    steps = [["make", "pjdfstest"]]
    if not (src / "Makefile").is_file():
        if not (src / "configure").is_file():
            if shutil.which("autoreconf") is None:
                raise ToolFailed("autoreconf not found: apt install autoconf automake libtool")
            steps.insert(0, ["autoreconf", "-ifs"])
        steps.insert(len(steps) - 1, ["./configure"])
    for step in steps:
        proc = subprocess.run(step, cwd=src, capture_output=True, text=True)
        if proc.returncode:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise ToolFailed(f"pjdfstest build: {' '.join(step)} exited {proc.returncode}: {tail}")
    return binary


def pjdfstest_commit(src: Path) -> str | None:
    with suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        if proc.returncode == 0:
            return proc.stdout.strip()
    return None


def staged_suite(src: Path, binary: Path, work: Path) -> Path:
    """A copy of ``src/tests`` under ``work`` whose conf honours PJDFSTEST_FS.

    misc.sh finds ``conf`` and the ``pjdfstest`` binary by walking up from
    the test file, so the copy sits beside a link to the built binary.
    """
    suite = work / "pjdfstest"
    shutil.copytree(src / "tests", suite / "tests", symlinks=True)
    (suite / "pjdfstest").symlink_to(binary.resolve())
    conf = suite / "tests" / "conf"
    conf.write_text(conf.read_text() + CONF_OVERRIDE)
    return suite / "tests"


def select_files(tests: Path, selectors: list[str]) -> list[Path]:
    """The ``.t`` files named by ``selectors`` (groups or group/NN.t), all when empty."""
    if not selectors:
        return sorted(tests.rglob("*.t"))
    files: list[Path] = []
    for selector in selectors:
        path = tests / selector
        if path.is_dir():
            files += sorted(path.rglob("*.t"))
        elif path.is_file() and path.suffix == ".t":
            files.append(path)
        else:
            raise ToolFailed(f"{selector}: no such test group or file in {tests}")
    return files


# --- running ------------------------------------------------------------------


def run_file(test: Path, cwd: Path, timeout: float, env: dict[str, str]) -> tuple[str, FileResult]:
    """``prove -v test`` in ``cwd``; its output and counts. Killed (group) after ``timeout``."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        ["prove", "-v", str(test)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the test's shells and pjdfstest calls die with it
    )
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    except BaseException:  # Ctrl-C: the group is in its own session, end it ourselves
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    text = output.decode(errors="replace")
    result = parse_tap(text)
    result.seconds = time.monotonic() - t0
    result.timed_out = timed_out
    result.exit_status = proc.returncode
    return text, result


def summarize(results: dict[str, FileResult]) -> dict[str, dict[str, int]]:
    """Per-group sums of ``results`` (keyed ``group/NN.t``), plus ``total``."""
    groups: dict[str, Counter[str]] = {}
    for name, r in results.items():
        counts = groups.setdefault(name.split("/")[0], Counter())
        counts["files"] += 1
        counts["tests"] += r.total
        counts["passed"] += r.passed + r.todo
        counts["failed"] += r.failed_total
        counts["todo"] += r.todo
        counts["timed_out"] += r.timed_out
    total: Counter[str] = Counter()
    for counts in groups.values():
        total.update(counts)
    table = {g: dict(c) for g, c in sorted(groups.items())}
    table["total"] = dict(total)
    return table


def print_table(table: dict[str, dict[str, int]]) -> None:
    print(f"\n{'group':<18}{'files':>6}{'tests':>8}{'passed':>8}{'failed':>8}{'timeouts':>9}")
    for group, c in table.items():
        if group == "total":
            print("-" * 57)
        print(
            f"{group:<18}{c.get('files', 0):>6}{c.get('tests', 0):>8}{c.get('passed', 0):>8}"
            f"{c.get('failed', 0):>8}{c.get('timed_out', 0):>9}"
        )


def start_server(kind: str) -> MotoServer | SeaweedServer:
    if kind == "auto":
        kind = "seaweedfs" if SeaweedServer.available() else "moto"
    server: MotoServer | SeaweedServer
    # Throwaway data: SIGKILL after 5 s instead of SeaweedFS's 17 s graceful stop.
    server = SeaweedServer(stop_timeout=5) if kind == "seaweedfs" else MotoServer()
    server.start()
    return server


def dgfs_version() -> str | None:
    with suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        if proc.returncode == 0:
            return proc.stdout.strip()
    return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("selectors", nargs="*", metavar="GROUP_OR_FILE")
    parser.add_argument(
        "--src", type=Path, default=Path(os.environ.get("DGFS_PJDFSTEST_SRC") or DEFAULT_SRC)
    )
    parser.add_argument("--tarball", type=Path, help="pjdfstest source tarball, if --src is empty")
    parser.add_argument("--server", choices=("auto", "seaweedfs", "moto"), default="auto")
    parser.add_argument(
        "--fs", default="", help="file-system type the tests assume (default: detected)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per test file (default 600)"
    )
    parser.add_argument(
        "--budget", type=float, default=7200.0, help="seconds for the whole run (default 7200)"
    )
    parser.add_argument("--mount-options", default="", help="extra dgfs -o options")
    parser.add_argument("--json", type=Path, default=RESULTS / "pjdfstest.json")
    args = parser.parse_args()

    if os.geteuid() != 0:
        print("pjdfstest needs root (it switches users and creates devices)", file=sys.stderr)
        return 2
    if shutil.which("prove") is None:
        print("prove not found: apt install perl", file=sys.stderr)
        return 2
    os.environ.update(S3_TEST_ENV)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)

    work = Path(tempfile.mkdtemp(prefix="dgfs-pjdfstest-"))
    server: MotoServer | SeaweedServer | None = None
    mount: FuseMount | None = None
    results: dict[str, FileResult] = {}
    interrupted = False
    args.json.parent.mkdir(parents=True, exist_ok=True)
    daemon_log = args.json.with_suffix(".dgfs.log")
    daemon_log.unlink(missing_ok=True)
    t_start = time.monotonic()
    try:
        binary = prepare_source(args.src.expanduser(), args.tarball)
        tests = staged_suite(args.src.expanduser(), binary, work)
        files = select_files(tests, args.selectors)
        server = start_server(args.server)
        print(f"== {server.name} on {server.endpoint_url}", flush=True)
        make_bucket(server.endpoint_url, BUCKET)
        mnt = work / "mnt"
        options = f"endpoint={server.endpoint_url},cache_dir={work / 'cache'},allow_other"
        options += ",log_level=warning"
        if args.mount_options:
            options += "," + args.mount_options
        mount = FuseMount(
            "dgfs", [dgfs_bin(), "mount", BUCKET, str(mnt), "-f", "-o", options], mnt, daemon_log
        )
        mount.start()
        # The tests run from a directory of their own, searchable by the
        # other users they switch to.
        cwd = mnt / "pjdfstest"
        cwd.mkdir()
        cwd.chmod(0o755)
        env = dict(os.environ)
        if args.fs:
            env["PJDFSTEST_FS"] = args.fs
        fs_type = args.fs or _detected_fs(cwd)
        print(
            f"== {len(files)} test files, fs={fs_type}, timeout {args.timeout:.0f}s each",
            flush=True,
        )
        for test in files:
            name = str(test.relative_to(tests))
            if time.monotonic() - t_start > args.budget:
                print(f"   budget of {args.budget:.0f}s spent: {name} and later not run")
                break
            text, result = run_file(test, cwd, args.timeout, env)
            results[name] = result
            mark = (
                "TIMEOUT"
                if result.timed_out
                else ("ok" if result.failed_total == 0 else f"{result.failed_total} failed")
            )
            print(
                f"   {name:<24} {result.total:>5} tests  {result.seconds:6.1f}s  {mark}", flush=True
            )
    except KeyboardInterrupt:
        interrupted = True
        print("\n   interrupted: stopping", file=sys.stderr)
    except ToolFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if mount is not None:
            mount.stop()
        if server is not None:
            # Its log goes beside the results: a 5xx the daemon saw is explained there.
            with suppress(OSError, AssertionError):
                shutil.copyfile(server.log_path, args.json.with_suffix(".server.log"))
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    table = summarize(results)
    print_table(table)
    args.json.write_text(
        json.dumps(
            {
                "dgfs_commit": dgfs_version(),
                "pjdfstest_commit": pjdfstest_commit(args.src.expanduser()),
                "server": server.name if server else None,
                "fs": args.fs or "detected",
                "mount_options": args.mount_options,
                "timeout_s": args.timeout,
                "seconds": round(time.monotonic() - t_start, 1),
                "interrupted": interrupted,
                "groups": table,
                "files": {name: asdict(r) for name, r in results.items()},
            },
            indent=1,
        )
    )
    print(f"\nwritten: {args.json} (daemon log: {daemon_log})")
    return 130 if interrupted else 0


def _detected_fs(cwd: Path) -> str:
    """What tests/conf would detect on Linux: the upper-cased type ``df -PT`` shows."""
    proc = subprocess.run(["df", "-PT", str(cwd)], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    return lines[-1].split()[1].upper() if proc.returncode == 0 and len(lines) > 1 else "?"


if __name__ == "__main__":
    sys.exit(main())
