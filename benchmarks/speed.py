"""One command: dgfs against the tools people use, on real releases, in one run.

Starts its own SeaweedFS S3 server (127.0.0.1, free ports), takes real
consecutive releases from PyPI (benchmarks/series.py: downloaded once into
~/.cache/dgfs-bench and checked against PyPI's SHA-256), and runs every
workload that applies to each tool, all against the same server:

- dgfs: a real mount in DeltaGlider mode (``-o deltas=dg``), foreground;
- dgfs deep: the same with ``-o deltas=deep`` (archives diffed by their
  content, rebuilt and SHA-256 checked on read), in a bucket of its own;
- DeltaGlider CLI 6.2.0: one ``deltaglider cp`` per file in version order
  (the first file becomes the reference), ``XDELTA="-D -R"`` so its
  ``.tar.gz`` deltas can be read back; stock extensions, so wheels go whole;
- DeltaGlider API 6.2.0: ``client.upload``/``download`` in one process, with
  ``.whl`` added to the delta extensions (benchmarks/deep.py's script);
- s3fs-fuse: a mount (``apt-get install s3fs``); missing, its columns are
  skipped and the run says so;
- boto3: ``upload_file``/``download_file`` with default settings.

Workloads, per series (wheels, sdists, tars by default):

- store: until durable in S3. dgfs: ``cp`` then fsync of every file (which
  waits for its background uploads); s3fs: ``cp`` (it uploads in close);
  the others: their upload call.
- cold read: every file read and SHA-256 checked; mounts are fresh (new
  daemon, empty cache_dir), the others download into an empty directory.
- warm read: the same again on the same mount (mounts only).
- stored bytes: what the bucket holds under the series' prefix.

and once: ``ls -l`` of a directory of 1,000 small similar zips (>= 64 KiB,
so dgfs stores them as deltas; s3fs holds the same files plain), written
once through a mount, then listed on a fresh mount with an empty cache
("cold") and right after on the same mount ("warm"); every listed size is
checked.

Timings are medians of ``--repeats`` runs (tools interleaved within each
repeat, so a noisy neighbour hits all of them alike). Ratios compare tools
within this run: each workload against s3fs-fuse, stores and cold reads
also against the DeltaGlider API (the last columns: dgfs and dgfs deep).
The dgfs (and s3fs) daemon's peak RSS (VmHWM) and the peak of daemon +
children (xdelta3) are sampled in every phase.

Prints the tables, writes benchmarks/results/speed.json and, when matplotlib
is installed (``pip install -e '.[bench]'``), PNG charts into docs/img/.
Mounts are unmounted and daemons and server stopped (by PID) on errors and
Ctrl-C too.

    .venv/bin/python benchmarks/speed.py [--quick] [--repeats 3] [--series wheels,tars]
        [--tools dgfs,deep,api] [--count 6] [--ls-files 1000 | 0]
        [--mount-options upload_workers=2] [--base TREE]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import boto3  # noqa: E402
from botocore.config import Config  # noqa: E402

import dgfs  # noqa: E402
from benchmarks.compare import (  # noqa: E402
    S3FS_OPTIONS,
    ToolFailed,
    _raise_interrupt,
    read_all,
    run,
    timed,
)
from benchmarks.deep import DG_SCRIPT, MonitoredMount, prefix_bytes  # noqa: E402
from benchmarks.demo import dgfs_bin, settle, sha256  # noqa: E402
from benchmarks.series import DEFAULT_CACHE, Series, all_series  # noqa: E402
from testsupport.dgcli import deltaglider_bin, deltaglider_env  # noqa: E402
from testsupport.servers import (  # noqa: E402
    ACCESS_KEY,
    REGION,
    S3_TEST_ENV,
    SECRET_KEY,
    SeaweedServer,
    make_bucket,
)

DGFS = "dgfs"
DGFS_DEEP = "dgfs deep"
DGFS_BASE = "dgfs base"  # --base: dgfs from another source tree, for A/B
DGFS_DEEP_BASE = "deep base"  # --base: dgfs deep from another source tree, for A/B
DG_CLI = "DeltaGlider CLI"
DG_API = "DeltaGlider API"
S3FS = "s3fs-fuse"
BOTO3 = "boto3"
TOOLS = (DGFS, DGFS_BASE, DGFS_DEEP, DGFS_DEEP_BASE, DG_CLI, DG_API, S3FS, BOTO3)
#: The tool each base tool measures from another tree (--base).
BASE_OF = {DGFS: DGFS_BASE, DGFS_DEEP: DGFS_DEEP_BASE}
BASELINE = S3FS  # every workload is also given as a ratio to this tool
STORE_BASELINE = DG_API  # stores and cold reads are also given as a ratio to this one
API_KINDS = ("store", "cold read")
# Each gets a column of its ratio to STORE_BASELINE.
DGFS_TOOLS = (DGFS, DGFS_BASE, DGFS_DEEP, DGFS_DEEP_BASE)

PHASES = ("store", "read", "ls setup", "ls", "aborted")  # of the RSS table, in this order
DEFAULT_SERIES = ("wheels", "sdists", "tars")
LS_FILES = 1000
LS_FILES_QUICK = 200
LS_DIR = "ls-dir"
# A member every ls-zip shares, incompressible and stored: the zips are then
# >= 64 KiB (dgfs's default min_delta_size) and deltas of each other.
LS_PAYLOAD = 64 * 1024

RESULTS = ROOT / "benchmarks" / "results" / "speed.json"
CHARTS = ROOT / "docs" / "img"


# ---------------------------------------------------------------------------
# Pure parts: statistics, ratios, tables (tests/test_speed_bench.py)


def median(samples: Sequence[float]) -> float | None:
    """The median of ``samples``; None when there are none."""
    return statistics.median(samples) if samples else None


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


@dataclass
class Measure:
    """One tool's samples of one workload (seconds), or why it has none."""

    samples: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return median(self.samples)


@dataclass
class Workload:
    """A row of the table: what was timed, and each tool's measure."""

    key: str
    label: str
    kind: str  # "store", "cold read", "warm read", "ls cold", "ls warm"
    series: str | None = None
    measures: dict[str, Measure] = field(default_factory=dict)

    def seconds(self, tool: str) -> float | None:
        m = self.measures.get(tool)
        return m.median if m else None

    def ratios(self, tool: str) -> dict[str, float | None]:
        """``tool``'s median against the baselines of this run."""
        mine = self.seconds(tool)
        out = {f"vs {BASELINE}": ratio(mine, self.seconds(BASELINE))}
        if self.kind in API_KINDS:
            out[f"vs {STORE_BASELINE}"] = ratio(mine, self.seconds(STORE_BASELINE))
        return out

    def to_json(self, tools: Iterable[str]) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "kind": self.kind,
            "series": self.series,
            "tools": {
                t: {
                    "samples": m.samples,
                    "median_s": m.median,
                    "error": m.error,
                    "ratios": self.ratios(t),
                }
                for t in tools
                if (m := self.measures.get(t)) is not None
            },
        }


def cell(seconds: float | None, vs_baseline: float | None, width: int = 15) -> str:
    """``seconds`` and its ratio to the baseline, e.g. ``"  6.10s  3.05x"``; ``-`` when absent."""
    if seconds is None:
        return f"{'-':>{width}}"
    text = f"{seconds:.2f}s"
    text += f" {vs_baseline:5.2f}x" if vs_baseline is not None else "      -"
    return f"{text:>{width}}"


def _api_columns(tools: Sequence[str]) -> list[str]:
    """The dgfs tools among ``tools``: each gets a last column, its time ÷ the DeltaGlider API."""
    return [t for t in DGFS_TOOLS if t in tools] or [DGFS]


def format_table(workloads: Sequence[Workload], tools: Sequence[str]) -> str:
    """The timing table: one row per workload, per tool the median and its ratio to s3fs."""
    label_width = max([len(w.label) for w in workloads] + [8])
    head = f"{'workload':<{label_width}} " + " ".join(f"{t:>15}" for t in tools)
    columns = _api_columns(tools)
    titles = [t.replace("dgfs ", "") + "÷API" for t in columns]
    head += "".join(f" {title:>9}" for title in titles)
    lines = [head, "-" * len(head)]
    for w in workloads:
        row = f"{w.label:<{label_width}} "
        row += " ".join(cell(w.seconds(t), w.ratios(t)[f"vs {BASELINE}"]) for t in tools)
        for t, title in zip(columns, titles, strict=True):
            vs_api = w.ratios(t).get(f"vs {STORE_BASELINE}")
            width = max(9, len(title))
            row += f" {vs_api:>{width - 1}.2f}x" if vs_api is not None else f" {'':>{width}}"
        lines.append(row)
    return "\n".join(lines)


def format_stored(
    stored: dict[str, dict[str, int | None]], originals: dict[str, int], tools: Sequence[str]
) -> str:
    """Stored MB per series (rows) and tool (columns), with stored/original."""
    head = f"{'series':<10} {'original MB':>12} " + " ".join(f"{t:>17}" for t in tools)
    lines = [head, "-" * len(head)]
    for name, original in originals.items():
        row = f"{name:<10} {original / 1e6:>12.1f} "
        cells = []
        for t in tools:
            size = stored.get(name, {}).get(t)
            if size is None:
                cells.append(f"{'-':>17}")
            else:
                cells.append(f"{f'{size / 1e6:.1f} ({size / original:.3f})':>17}")
        lines.append(row + " ".join(cells))
    return "\n".join(lines)


def parse_ls(output: str) -> dict[str, int]:
    """Name -> size of the regular files in ``ls -l`` output (C locale; names without spaces)."""
    sizes = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) >= 9 and line.startswith("-"):
            sizes[fields[-1]] = int(fields[4])
    return sizes


def markdown_table(workloads: Sequence[Workload], tools: Sequence[str]) -> str:
    """The timing table as Markdown (for docs/benchmarks.md)."""
    columns = _api_columns(tools)
    head = "| workload | " + " | ".join(tools) + " | "
    head += " | ".join(f"{t} ÷ DeltaGlider API" for t in columns) + " |"
    lines = [head, "|" + "---|" * (len(tools) + 1 + len(columns))]
    for w in workloads:
        cells = []
        for t in tools:
            s = w.seconds(t)
            r = w.ratios(t)[f"vs {BASELINE}"]
            if s is None:
                cells.append("–")
            elif r is None or t == BASELINE:
                cells.append(f"{s:.2f} s")
            else:
                cells.append(f"{s:.2f} s ({r:.2f}×)")
        for t in columns:
            vs_api = w.ratios(t).get(f"vs {STORE_BASELINE}")
            cells.append(f"{vs_api:.2f}×" if vs_api else "")
        lines.append(f"| {w.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def workloads_from_json(data: dict[str, Any]) -> list[Workload]:
    """The workloads of a run's JSON, to print its tables again."""
    workloads = []
    for w in data["workloads"]:
        workload = Workload(w["key"], w["label"], w["kind"], w["series"])
        for tool, m in w["tools"].items():
            workload.measures[tool] = Measure(list(m["samples"]), m["error"])
        workloads.append(workload)
    return workloads


def markdown_report(data: dict[str, Any]) -> str:
    """Timing, stored-bytes and memory tables of a run's JSON, in Markdown."""
    tools = data["tools"]
    parts = [markdown_table(workloads_from_json(data), tools), ""]
    parts.append("| series | original MB | " + " | ".join(tools) + " |")
    parts.append("|" + "---|" * (len(tools) + 2))
    for s in data["series"]:
        original = s["original_bytes"]
        cells = [
            "–"
            if (b := s["stored_bytes"].get(t)) is None
            else f"{b / 1e6:.1f} ({b / original:.3f})"
            for t in tools
        ]
        parts.append(
            f"| {s['description_short']} | {original / 1e6:.1f} | " + " | ".join(cells) + " |"
        )
    rss, tree = data["peak_rss_kib"], data["peak_tree_rss_kib"]
    if rss:
        phases = sorted({p for t in rss.values() for p in t}, key=PHASES.index)
        parts += [
            "",
            "| peak RSS MB | " + " | ".join(phases) + " |",
            "|" + "---|" * (len(phases) + 1),
        ]
        for tool, by_phase in rss.items():
            cells = []
            for p in phases:
                own, whole = by_phase.get(p), tree.get(tool, {}).get(p)
                text = "–" if own is None else f"{own / 1024:.0f}"
                if own is not None and whole is not None:
                    text += f" ({whole / 1024:.0f})"
                cells.append(text)
            parts.append(f"| {tool} | " + " | ".join(cells) + " |")
    return "\n".join(parts)


# ---------------------------------------------------------------------------
# Inputs


def write_similar_zips(directory: Path, count: int) -> list[Path]:
    """``count`` small zips that differ in a few bytes: deltas of each other, sizes varying."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = _random_bytes(LS_PAYLOAD, seed=11)
    paths = []
    for i in range(count):
        path = directory / f"pkg-1.0.{i:04d}.zip"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
            stamp = (2024, 1, 1, 0, 0, 0)
            z.writestr(zipfile.ZipInfo("pkg/VERSION", stamp), f"1.0.{i}\n")
            z.writestr(zipfile.ZipInfo("pkg/payload.bin", stamp), payload)
            changes = "".join(f"- change {j} in 1.0.{i}\n" for j in range(i % 40))
            z.writestr(zipfile.ZipInfo("pkg/CHANGES.txt", stamp), changes)
        paths.append(path)
    return paths


def _random_bytes(size: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


# ---------------------------------------------------------------------------
# Tools


@dataclass
class Context:
    endpoint: str
    work: Path
    mount_options: str
    base: Path | None = None


class Tool:
    """One tool under test, with its own bucket on the shared server."""

    name = ""
    bucket = ""
    is_mount = False

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        #: phase -> peak KiB (daemon's VmHWM, and daemon + children sampled)
        self.rss_kib: dict[str, int] = {}
        self.tree_rss_kib: dict[str, int] = {}

    def missing(self) -> str | None:
        """Why this tool cannot run here, or None."""
        return None

    def setup(self) -> None:
        make_bucket(self.ctx.endpoint, self.bucket)

    def store(self, series: Series, prefix: str) -> float:
        raise NotImplementedError

    def read(self, series: Series, prefix: str, digests: dict[str, str]) -> tuple[float, float]:
        """Cold read seconds, and warm re-read seconds (NaN when it does not apply)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop whatever still runs (a mount left by an error or Ctrl-C)."""

    def _out_dir(self, name: str) -> Path:
        out = self.ctx.work / f"out-{self.bucket}-{name}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        return out


class MountTool(Tool):
    """A FUSE filesystem: store with cp, read through fresh mounts, list directories."""

    is_mount = True

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.mountpoint = ctx.work / f"mnt-{self.bucket}"
        self.current: MonitoredMount | None = None
        self._count = 0
        #: When set, the next mounts' daemons are sampled by py-spy into this file.
        self.profile_to: Path | None = None
        self._spy: subprocess.Popen[bytes] | None = None

    def command(self, cache: Path) -> list[str]:
        raise NotImplementedError

    def durable(self, directory: Path, names: list[str]) -> None:
        """Wait until what cp wrote into ``directory`` is in S3."""

    def _mount(self) -> MonitoredMount:
        """A fresh daemon with an empty cache directory, started."""
        self._count += 1
        cache = self.ctx.work / f"cache-{self.bucket}-{self._count}"
        shutil.rmtree(cache, ignore_errors=True)
        log = self.ctx.work / f"{self.bucket}.log"
        mount = MonitoredMount(self.name, self.command(cache), self.mountpoint, log)
        self.current = mount
        try:
            mount.start()
        except ToolFailed:
            self.current = None
            raise
        if self.profile_to is not None and mount.pid is not None:
            self._spy = start_py_spy(mount.pid, self.profile_to)
        return mount

    def _unmount(self, phase: str) -> None:
        mount, self.current = self.current, None
        if self._spy is not None:
            stop_py_spy(self._spy)
            self._spy = None
        if mount is None:
            return
        mount.stop()
        for attr, peak in (("rss_kib", mount.peak_rss_kib), ("tree_rss_kib", mount.peak_tree_kib)):
            table = getattr(self, attr)
            if peak is not None:
                table[phase] = max(table.get(phase, 0), peak)
        for cache in self.ctx.work.glob(f"cache-{self.bucket}-*"):
            shutil.rmtree(cache, ignore_errors=True)

    def _failed(self, exc: ToolFailed) -> ToolFailed:
        mount = self.current
        tail = mount.log_tail() if mount else ""
        return ToolFailed(f"{exc}\n--- {self.name} log:\n{tail}" if tail else str(exc))

    def _write(self, paths: list[Path], prefix: str) -> float:
        """Seconds to cp ``paths`` into a new directory ``prefix`` until durable."""
        directory = self.mountpoint / prefix
        directory.mkdir()
        names = [p.name for p in paths]

        def copy() -> None:
            run(["cp", *map(str, paths), str(directory)])
            self.durable(directory, names)

        return timed(copy)

    def store(self, series: Series, prefix: str) -> float:
        self._mount()
        try:
            return self._write(series.paths, prefix)
        except ToolFailed as exc:
            raise self._failed(exc) from exc
        finally:
            self._unmount("store")

    def read(self, series: Series, prefix: str, digests: dict[str, str]) -> tuple[float, float]:
        self._mount()
        directory = self.mountpoint / prefix
        names = [p.name for p in series.paths]
        try:
            cold = timed(lambda: read_all(directory, names, digests))
            warm = timed(lambda: read_all(directory, names, digests))
            return cold, warm
        except ToolFailed as exc:
            raise self._failed(exc) from exc
        finally:
            self._unmount("read")

    def populate(self, paths: list[Path]) -> dict[str, int]:
        """Write the ls directory once; what each file became (dgfs: its kind)."""
        self._mount()
        try:
            self._write(paths, LS_DIR)
            return self.kinds(self.mountpoint / LS_DIR, [p.name for p in paths])
        except ToolFailed as exc:
            raise self._failed(exc) from exc
        finally:
            self._unmount("ls setup")

    def kinds(self, directory: Path, names: list[str]) -> dict[str, int]:
        return {"plain": len(names)}

    def list_dir(self, expected: dict[str, int]) -> tuple[float, float]:
        """Cold (fresh mount and cache) and warm ``ls -l`` of the ls directory, sizes checked."""
        self._mount()
        directory = self.mountpoint / LS_DIR
        env = dict(os.environ, LC_ALL="C")
        outputs: list[str] = []

        def ls() -> None:
            done = subprocess.run(
                ["ls", "-l", str(directory)], capture_output=True, text=True, env=env, timeout=600
            )
            if done.returncode != 0:
                raise ToolFailed(
                    f"ls -l {directory} exited {done.returncode}: {done.stderr[-300:]}"
                )
            outputs.append(done.stdout)

        try:
            cold = timed(ls)
            warm = timed(ls)
            for output in outputs:
                listed = parse_ls(output)
                if listed != expected:
                    wrong = sorted(
                        n
                        for n in expected.keys() | listed.keys()
                        if listed.get(n) != expected.get(n)
                    )
                    raise ToolFailed(
                        f"ls -l shows {len(listed)} files, {len(wrong)} wrong or missing "
                        f"(e.g. {wrong[:3]})"
                    )
            return cold, warm
        except ToolFailed as exc:
            raise self._failed(exc) from exc
        finally:
            self._unmount("ls")

    def close(self) -> None:
        with suppress(Exception):
            self._unmount("aborted")


class DgfsTool(MountTool):
    name = DGFS
    bucket = "dgfs"

    def tree(self) -> Path:
        """The source tree the daemon imports dgfs from: this script's (the
        venv's dgfs may be an editable install of another worktree)."""
        return ROOT

    def command(self, cache: Path) -> list[str]:
        options = f"endpoint={self.ctx.endpoint},cache_dir={cache},log_level=warning,deltas=dg"
        if self.ctx.mount_options:
            options += "," + self.ctx.mount_options
        # env execs the daemon: its PID is the one sampled and stopped.
        return [
            "env",
            f"PYTHONPATH={self.tree()}",
            dgfs_bin(),
            "mount",
            self.bucket,
            str(self.mountpoint),
            "-f",
            "-o",
            options,
        ]

    def durable(self, directory: Path, names: list[str]) -> None:
        # close() returns once the data is journaled; fsync waits for the upload.
        settle(directory, dict.fromkeys(names))

    def kinds(self, directory: Path, names: list[str]) -> dict[str, int]:
        return dict(Counter(os.getxattr(directory / n, "user.dgfs.kind").decode() for n in names))


class DgfsDeepTool(DgfsTool):
    """dgfs with ``-o deltas=deep``: new directories store archives by their content."""

    name = DGFS_DEEP
    bucket = "dgfs-deep"

    def command(self, cache: Path) -> list[str]:
        command = super().command(cache)
        command[-1] = command[-1].replace("deltas=dg", "deltas=deep", 1)
        return command


class _BaseTree(DgfsTool):
    """A dgfs tool whose daemon imports dgfs from ``Context.base`` (a worktree
    of the commit to compare with): an A/B of a change in one run."""

    def missing(self) -> str | None:
        base = self.ctx.base
        if base is None or not (base / "dgfs" / "__init__.py").exists():
            return "no --base TREE holding dgfs/"
        return None

    def tree(self) -> Path:
        assert self.ctx.base is not None
        return self.ctx.base


class DgfsBaseTool(_BaseTree, DgfsTool):
    name = DGFS_BASE
    bucket = "dgfs-base"


class DgfsDeepBaseTool(_BaseTree, DgfsDeepTool):
    name = DGFS_DEEP_BASE
    bucket = "dgfs-deep-base"


class S3fsTool(MountTool):
    name = S3FS
    bucket = "s3fs"

    def missing(self) -> str | None:
        if shutil.which("s3fs") is None:
            return "s3fs is not installed (apt-get install s3fs)"
        return None

    def setup(self) -> None:
        super().setup()
        passwd = self.ctx.work / "s3fs.passwd"
        passwd.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        passwd.chmod(0o600)

    def command(self, cache: Path) -> list[str]:
        # No use_cache: s3fs's default, and what compare.py measured. The
        # cache directory is not used.
        passwd = self.ctx.work / "s3fs.passwd"
        options = f"url={self.ctx.endpoint},passwd_file={passwd},dbglevel=err,{S3FS_OPTIONS}"
        return ["s3fs", self.bucket, str(self.mountpoint), "-f", "-o", options]


def _deltaglider_missing() -> str | None:
    try:
        deltaglider_bin()
    except FileNotFoundError as exc:
        return str(exc)
    return None


class DeltaGliderCli(Tool):
    name = DG_CLI
    bucket = "deltaglider-cli"

    def missing(self) -> str | None:
        return _deltaglider_missing()

    def _cp(self, source: str, dest: str) -> None:
        run(
            [deltaglider_bin(), "cp", source, dest, "--endpoint-url", self.ctx.endpoint],
            env=deltaglider_env(),
        )

    def store(self, series: Series, prefix: str) -> float:
        def upload() -> None:
            for p in series.paths:  # in version order: the first is the reference
                self._cp(str(p), f"s3://{self.bucket}/{prefix}/{p.name}")

        return timed(upload)

    def read(self, series: Series, prefix: str, digests: dict[str, str]) -> tuple[float, float]:
        out = self._out_dir(series.name)
        names = [p.name for p in series.paths]

        def download() -> None:
            for name in names:
                self._cp(f"s3://{self.bucket}/{prefix}/{name}", str(out / name))
            read_all(out, names, digests)

        try:
            return timed(download), float("nan")
        finally:
            shutil.rmtree(out, ignore_errors=True)


class DeltaGliderApi(Tool):
    name = DG_API
    bucket = "deltaglider-api"

    def missing(self) -> str | None:
        return _deltaglider_missing()  # the same venv

    def _call(self, op: str, series: Series, prefix: str, out: Path) -> dict[str, Any]:
        python = str(Path(deltaglider_bin()).with_name("python"))
        request = self.ctx.work / f"dg-api-{op}.json"
        answer = self.ctx.work / f"dg-api-{op}-result.json"
        answer.unlink(missing_ok=True)
        request.write_text(
            json.dumps(
                {
                    "op": op,
                    "endpoint": self.ctx.endpoint,
                    "bucket": self.bucket,
                    "prefix": prefix,
                    "paths": [str(p) for p in series.paths],
                    "out": str(out),
                    "result": str(answer),
                }
            )
        )
        run([python, "-c", DG_SCRIPT, str(request)], env=deltaglider_env())
        result: dict[str, Any] = json.loads(answer.read_text())
        for phase, key in (("store", "put"), ("read", "get")):
            if op == key:
                self.rss_kib[phase] = max(self.rss_kib.get(phase, 0), result["maxrss_kib"])
        return result

    def store(self, series: Series, prefix: str) -> float:
        # Timed inside DeltaGlider's process: its interpreter start is not counted.
        return float(self._call("put", series, prefix, self.ctx.work)["seconds"])

    def read(self, series: Series, prefix: str, digests: dict[str, str]) -> tuple[float, float]:
        out = self._out_dir(series.name)
        try:
            seconds = float(self._call("get", series, prefix, out)["seconds"])
            seconds += timed(lambda: read_all(out, [p.name for p in series.paths], digests))
            return seconds, float("nan")
        finally:
            shutil.rmtree(out, ignore_errors=True)


class Boto3Tool(Tool):
    name = BOTO3
    bucket = "boto3"

    def _client(self) -> Any:
        # boto3's defaults (checksums, transfer settings), path-style for SeaweedFS.
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.ctx.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}),
        )

    def store(self, series: Series, prefix: str) -> float:
        client = self._client()
        try:

            def upload() -> None:
                for p in series.paths:
                    client.upload_file(str(p), self.bucket, f"{prefix}/{p.name}")

            return timed(upload)
        finally:
            client.close()

    def read(self, series: Series, prefix: str, digests: dict[str, str]) -> tuple[float, float]:
        out = self._out_dir(series.name)
        names = [p.name for p in series.paths]
        client = self._client()

        def download() -> None:
            for name in names:
                client.download_file(self.bucket, f"{prefix}/{name}", str(out / name))
            read_all(out, names, digests)

        try:
            return timed(download), float("nan")
        finally:
            client.close()
            shutil.rmtree(out, ignore_errors=True)


TOOL_CLASSES: dict[str, type[Tool]] = {
    DGFS: DgfsTool,
    DGFS_DEEP: DgfsDeepTool,
    DGFS_BASE: DgfsBaseTool,
    DGFS_DEEP_BASE: DgfsDeepBaseTool,
    DG_CLI: DeltaGliderCli,
    DG_API: DeltaGliderApi,
    S3FS: S3fsTool,
    BOTO3: Boto3Tool,
}
TOOL_ALIASES = {
    "dgfs": DGFS,
    "deep": DGFS_DEEP,
    "dgfs-deep": DGFS_DEEP,
    "cli": DG_CLI,
    "deltaglider-cli": DG_CLI,
    "api": DG_API,
    "deltaglider-api": DG_API,
    "s3fs": S3FS,
    "s3fs-fuse": S3FS,
    "boto3": BOTO3,
}


# ---------------------------------------------------------------------------
# The run


def attempt(measure: Measure, tool: str, what: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a failure is recorded in ``measure`` (first error kept) and returns None."""
    try:
        return fn()
    except ToolFailed as exc:
        error = str(exc)
    except Exception as exc:  # a bug here or a server hiccup: report it, the others go on
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    if measure.error is None:
        measure.error = error
    print(f"   {tool}: {what} FAILED: {error.splitlines()[0]}", flush=True)
    return None


def series_label(series: Series) -> str:
    return f"{series.name} ({len(series.paths)}, {series.original_bytes / 1e6:.0f} MB)"


def run_series(
    series: Series, tools: dict[str, Tool], repeats: int, workloads: list[Workload]
) -> dict[str, int | None]:
    """Store/read workloads of one series; stored bytes per tool."""
    label = series_label(series)
    print(f"== {series.name}: {series.description}, {label}", flush=True)
    digests = {p.name: sha256(p) for p in series.paths}
    store = Workload(f"store {series.name}", f"store {label}", "store", series.name)
    cold = Workload(
        f"cold read {series.name}", f"cold read {series.name}", "cold read", series.name
    )
    warm = Workload(
        f"warm read {series.name}", f"warm read {series.name}", "warm read", series.name
    )
    workloads += [store, cold, warm]
    stored_ok: dict[str, str] = {}  # tool -> the prefix its last successful store wrote
    for rep in range(repeats):
        prefix = f"{series.name}-{rep}"
        for name, tool in tools.items():
            m = store.measures.setdefault(name, Measure())
            if m.error:
                continue
            seconds = attempt(
                m, name, f"store #{rep + 1}", functools.partial(tool.store, series, prefix)
            )
            if seconds is not None:
                m.samples.append(seconds)
                stored_ok[name] = prefix
                print(f"   {name:<16} store #{rep + 1}: {seconds:7.2f} s", flush=True)
    stored: dict[str, int | None] = {}
    for name, tool in tools.items():
        stored[name] = None
        if store.measures[name].samples:  # the first store (prefix -0) succeeded
            with suppress(Exception):
                stored[name] = prefix_bytes(tool.ctx.endpoint, tool.bucket, f"{series.name}-0")
    for rep in range(repeats):
        for name, tool in tools.items():
            c = cold.measures.setdefault(name, Measure())
            if name not in stored_ok:
                c.error = c.error or "not stored"
                continue
            if c.error:
                continue
            got = attempt(
                c,
                name,
                f"read #{rep + 1}",
                functools.partial(tool.read, series, stored_ok[name], digests),
            )
            if got is None:
                continue
            c.samples.append(got[0])
            line = f"   {name:<16} cold read #{rep + 1}: {got[0]:7.2f} s"
            if tool.is_mount:
                warm.measures.setdefault(name, Measure()).samples.append(got[1])
                line += f", warm {got[1]:.2f} s"
            print(line, flush=True)
    return stored


def run_ls(
    tools: dict[str, Tool], count: int, repeats: int, workloads: list[Workload], work: Path
) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """``ls -l`` of a directory of ``count`` files on each mount.

    Returns what each tool stored each file as, and the names and sizes listed.
    """
    mounts = {n: t for n, t in tools.items() if isinstance(t, MountTool)}
    cold = Workload("ls cold", f"ls -l {count:,} files, fresh mount+cache", "ls cold")
    warm = Workload("ls warm", f"ls -l {count:,} files, warm", "ls warm")
    workloads += [cold, warm]
    if not mounts:
        return {}, {}
    print(f"== ls -l of {count:,} small similar zips", flush=True)
    paths = write_similar_zips(work / "ls-src", count)
    expected = {p.name: p.stat().st_size for p in paths}
    kinds: dict[str, dict[str, int]] = {}
    for name, tool in mounts.items():
        m = cold.measures.setdefault(name, Measure())
        t0 = time.monotonic()
        got = attempt(m, name, "writing the ls directory", functools.partial(tool.populate, paths))
        if got is not None:
            kinds[name] = got
            print(f"   {name:<16} wrote {count} files in {time.monotonic() - t0:.1f} s: {got}")
    for rep in range(repeats):
        for name, tool in mounts.items():
            m = cold.measures[name]
            if m.error:
                continue
            got = attempt(m, name, f"ls #{rep + 1}", functools.partial(tool.list_dir, expected))
            if got is not None:
                m.samples.append(got[0])
                warm.measures.setdefault(name, Measure()).samples.append(got[1])
                print(f"   {name:<16} ls -l #{rep + 1}: cold {got[0]:.3f} s, warm {got[1]:.3f} s")
    return kinds, expected


SPY_RATE = 200  # samples per second


def py_spy() -> str | None:
    return shutil.which("py-spy") or (
        str(Path(sys.executable).with_name("py-spy"))
        if Path(sys.executable).with_name("py-spy").exists()
        else None
    )


def start_py_spy(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling ``pid`` into ``output`` (collapsed stacks).

    Only samples of a thread holding the GIL (``--gil``): in a daemon whose
    threads mostly wait (on S3, on xdelta3), that is where the Python CPU
    goes, and the count of samples against the rate gives how busy the GIL was.
    """
    binary = py_spy()
    if binary is None:
        raise ToolFailed("py-spy is not installed (pip install py-spy)")
    output.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        [
            binary,
            "record",
            "--pid",
            str(pid),
            "--gil",
            "--format",
            "raw",
            "--rate",
            str(SPY_RATE),
            "-o",
            str(output),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    time.sleep(1.0)  # attached before the workload starts
    return spy


def stop_py_spy(spy: subprocess.Popen[bytes]) -> None:
    """Stop ``spy`` (SIGINT: it writes its file), by PID; killed if it hangs."""
    if spy.poll() is None:
        spy.send_signal(signal.SIGINT)
    try:
        spy.wait(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(timeout=10)


def top_functions(
    collapsed: str, count: int = 12, within: str = ""
) -> tuple[int, list[tuple[str, float, float]]]:
    """Samples in py-spy raw output, and (function, own share, inclusive share) of the
    ``count`` functions with the most inclusive samples whose name contains ``within``
    (all: the most own samples)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        n = int(samples)
        total += n
        # "func (module.py:123)" -> "func (module.py)": lines of one function together
        frames = [f.rsplit(":", 1)[0] + ")" if ":" in f else f for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return 0, []
    ranked = (
        [f for f, _ in inclusive.most_common() if within in f][:count]
        if within
        else [f for f, _ in own.most_common(count)]
    )
    return total, [(f, own[f] / total, inclusive[f] / total) for f in ranked]


def run_profiles(
    tools: dict[str, Tool],
    chosen: list[Series],
    repeats: int,
    listed: dict[str, int],
    directory: Path,
) -> dict[str, str]:
    """dgfs's store, cold+warm read and ls -l once more under py-spy; profile files by name."""
    tool = tools.get(DGFS)
    if not isinstance(tool, MountTool):
        return {}
    if py_spy() is None:
        print("== --profile: py-spy is not installed (pip install py-spy); no profiles")
        return {}
    jobs: list[tuple[str, Callable[[], Any]]] = []
    for series in chosen:
        digests = {p.name: sha256(p) for p in series.paths}
        jobs.append(
            (
                f"store-{series.name}",
                functools.partial(tool.store, series, f"{series.name}-profile"),
            )
        )
        jobs.append(
            (
                f"read-{series.name}",
                functools.partial(tool.read, series, f"{series.name}-{repeats - 1}", digests),
            )
        )
    if listed:
        jobs.append(("ls", functools.partial(tool.list_dir, listed)))
    written = {}
    for name, job in jobs:
        path = directory / f"dgfs-{name}.txt"
        path.unlink(missing_ok=True)
        tool.profile_to = path
        print(f"== profiling dgfs {name} (untimed)", flush=True)
        t0 = time.monotonic()
        try:
            job()
        except Exception as exc:  # a profile is extra: report, and the results still follow
            print(f"   FAILED: {str(exc).splitlines()[0]}")
        finally:
            tool.profile_to = None
        if path.exists():
            written[name] = str(path)
            text = path.read_text()
            samples, top = top_functions(text)
            # Mount, workload and unmount: the GIL's share of that wall time.
            elapsed = time.monotonic() - t0
            print(
                f"   GIL held {samples / SPY_RATE / elapsed:.0%} of {elapsed:.1f} s "
                "(mount to unmount); share of those samples, own and inclusive:"
            )
            for function, mine, incl in top:
                print(f"   {mine:5.0%} {incl:5.0%}  {function}")
            print("   dgfs functions, by inclusive share:")
            for function, mine, incl in top_functions(text, 10, "(dgfs/")[1]:
                print(f"   {mine:5.0%} {incl:5.0%}  {function}")
    return written


def _output(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout or done.stderr).strip() or None


def environment() -> dict[str, Any]:
    """Date, machine and versions, for the JSON and the docs."""
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    ram_kib = next((int(x.split()[1]) for x in meminfo if x.startswith("MemTotal:")), 0)
    cpu = next(
        (
            x.split(":", 1)[1].strip()
            for x in Path("/proc/cpuinfo").read_text().splitlines()
            if x.startswith("model name")
        ),
        platform.processor(),
    )
    weed = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    dg_version = None
    with suppress(FileNotFoundError):
        dg_python = str(Path(deltaglider_bin()).with_name("python"))
        dg_version = _output(
            [dg_python, "-c", "import deltaglider; print(deltaglider.__version__)"]
        )
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "ram_gib": round(ram_kib / (1 << 20), 1),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dgfs": dgfs.__version__,
        "git_head": _output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "dgfs_changes": (
            _output(["git", "-C", str(ROOT), "status", "--short", "dgfs"]) or ""
        ).splitlines(),
        "xdelta3": (_output(["xdelta3", "-V"]) or "?").splitlines()[0],
        "s3fs": (_output(["s3fs", "--version"]) or "not installed").splitlines()[0]
        if shutil.which("s3fs")
        else "not installed",
        "deltaglider": dg_version,
        "boto3": boto3.__version__,
        "seaweedfs": (_output([weed, "version"]) or "?").splitlines()[0],
    }


# ---------------------------------------------------------------------------
# Charts (optional: matplotlib)


def draw_charts(data: dict[str, Any], directory: Path) -> list[Path]:
    """PNG charts of ``data`` (the JSON) into ``directory``; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no charts drawn")
        return []
    directory.mkdir(parents=True, exist_ok=True)
    tools = data["tools"]
    colors = dict(
        zip(
            TOOLS,
            ("#1f77b4", "#17becf", "#9467bd", "#ff7f0e", "#d62728", "#7f7f7f", "#2ca02c"),
            strict=True,
        )
    )
    subtitle = f"{data['environment']['date']}, {_machine(data['environment'])}"
    written = []

    # Stored bytes: one panel per series, a bar per tool.
    series = data["series"]
    if series:
        fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 4), squeeze=False)
        for ax, s in zip(axes[0], series, strict=True):
            names = [t for t in tools if s["stored_bytes"].get(t) is not None]
            values = [s["stored_bytes"][t] / 1e6 for t in names]
            bars = ax.bar(range(len(names)), values, color=[colors[t] for t in names])
            original = s["original_bytes"] / 1e6
            ax.axhline(original, color="black", linestyle="--", linewidth=1, label="original")
            ax.set_ylim(0, original * 1.25)
            for bar, value in zip(bars, values, strict=True):
                ax.text(
                    bar.get_x() + bar.get_width() / 2,
                    value,
                    f"{value:.3g}\n{value / original:.2f}×",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set_title(s["description_short"], fontsize=9)
            ax.set_ylabel("stored MB")
        axes[0][0].legend(fontsize=8, loc="upper left")
        fig.suptitle(
            f"Stored MB per tool and series, and stored ÷ original ({subtitle})", fontsize=10
        )
        fig.tight_layout()
        path = directory / "speed-stored.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # Time per workload as a ratio to s3fs-fuse (log scale, 1 = s3fs); without
    # s3fs timings, stores and cold reads as a ratio to the DeltaGlider API.
    baseline = BASELINE
    rows = [w for w in data["workloads"] if _median(w, BASELINE) is not None]
    if not rows:
        baseline = STORE_BASELINE
        rows = [w for w in data["workloads"] if _median(w, STORE_BASELINE) is not None]
    others = [t for t in tools if t != baseline]
    if rows:
        fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.8))
        width = 0.8 / max(1, len(others))
        for i, t in enumerate(others):
            xs, ys = [], []
            for j, w in enumerate(rows):
                r = ratio(_median(w, t), _median(w, baseline))
                if r is not None:
                    xs.append(j + (i - (len(others) - 1) / 2) * width)
                    ys.append(r)
            ax.bar(xs, ys, width=width, label=t, color=colors[t])
            for x, y in zip(xs, ys, strict=True):
                ax.text(x, y, f"{y:.2g}", ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.text(-0.5, 1.0, f" {baseline} = 1", va="bottom", ha="left", fontsize=8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(range(len(rows)), [w["label"] for w in rows], rotation=30, ha="right")
        ax.set_ylabel(f"median time ÷ {baseline} (log; < 1 is faster)")
        ax.set_title(f"Time per workload as a ratio to {baseline}\n({subtitle})", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = directory / "speed-ratios.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    else:
        print(f"no {BASELINE} or {STORE_BASELINE} timings: the ratio chart is not drawn")
    return written


def _median(workload: dict[str, Any], tool: str) -> float | None:
    """A tool's median seconds in a workload of the JSON, or None."""
    median_s = (workload["tools"].get(tool) or {}).get("median_s")
    return float(median_s) if median_s is not None else None


def _machine(env: dict[str, Any]) -> str:
    return f"{env['cores']} cores, {env['ram_gib']:g} GiB RAM, Linux {env['kernel']}"


# ---------------------------------------------------------------------------


def parse_tools(text: str | None) -> list[str]:
    if not text:
        return [t for t in TOOLS if t not in BASE_OF.values()]  # those only with --base
    chosen = []
    for item in text.split(","):
        name = TOOL_ALIASES.get(item.strip().lower())
        if name is None:
            raise SystemExit(f"unknown tool {item!r}; known: {', '.join(sorted(TOOL_ALIASES))}")
        chosen.append(name)
    return [t for t in TOOLS if t in chosen]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"3 versions per series, 1 repeat, {LS_FILES_QUICK} files to list: a smoke run",
    )
    parser.add_argument("--repeats", type=int, help="timings are medians of this many (default 3)")
    parser.add_argument(
        "--series", help=f"comma-separated (default {','.join(DEFAULT_SERIES)}; also plain-wheels)"
    )
    parser.add_argument(
        "--tools", help="comma-separated: dgfs,deep,cli,api,s3fs,boto3 (default all)"
    )
    parser.add_argument(
        "--count", type=int, help="the first COUNT versions of each series (default all)"
    )
    parser.add_argument(
        "--ls-files", type=int, help=f"files to ls -l (default {LS_FILES}; 0: no ls -l)"
    )
    parser.add_argument("--mount-options", default="", help="more -o options for dgfs mounts")
    parser.add_argument(
        "--base",
        "--deep-base",
        type=Path,
        metavar="TREE",
        help=f"also run {DGFS!r} and {DGFS_DEEP!r} (those chosen) with dgfs imported from"
        f" TREE (say, a git worktree of main), as {DGFS_BASE!r} and {DGFS_DEEP_BASE!r}:"
        " a change and its base in one run",
    )
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"default {DEFAULT_CACHE}"
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"default {RESULTS}")
    parser.add_argument(
        "--charts", type=Path, default=CHARTS, help=f"PNG directory (default {CHARTS})"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="then, untimed, run dgfs's store, read and ls -l again under py-spy "
        "(collapsed stacks into DIR, top functions printed)",
    )
    parser.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="only print the tables of a past run's JSON in Markdown and redraw its charts",
    )
    args = parser.parse_args()
    if args.replot:
        past = json.loads(args.replot.read_text())
        print(markdown_report(past))
        for path in draw_charts(past, args.charts):
            print(f"written: {path}")
        return 0
    repeats = args.repeats or (1 if args.quick else 3)
    ls_files = args.ls_files
    if ls_files is None:
        ls_files = LS_FILES_QUICK if args.quick else LS_FILES
    if repeats < 1 or ls_files < 0 or (args.count is not None and args.count < 2):
        raise SystemExit("--repeats must be at least 1, --count 2, --ls-files 0")
    if args.profile:
        try:
            args.profile.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SystemExit(f"--profile {args.profile}: {exc.strerror}") from None
    wanted_series = args.series.split(",") if args.series else list(DEFAULT_SERIES)
    tool_names = parse_tools(args.tools)
    if args.base:
        tool_names = [t for tool in tool_names for t in (tool, BASE_OF.get(tool)) if t is not None]

    os.environ.update(S3_TEST_ENV)
    # A SIGTERM/SIGHUP unwinds like Ctrl-C: mounts, daemons and server are cleaned up.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)

    print(f"== release series in {args.cache}", flush=True)
    every = {s.name: s for s in all_series(args.cache, small=args.quick, count=args.count)}
    unknown = set(wanted_series) - every.keys()
    if unknown:
        raise SystemExit(f"unknown series {', '.join(sorted(unknown))}; known: {', '.join(every)}")
    chosen = [every[n] for n in wanted_series]
    env = environment()
    print(f"== {env['date']}; {_machine(env)}; {env['cpu']}")
    notes: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="dgfs-speed-"))
    tools: dict[str, Tool] = {}
    workloads: list[Workload] = []
    stored: dict[str, dict[str, int | None]] = {}
    ls_kinds: dict[str, dict[str, int]] = {}
    profiles: dict[str, str] = {}
    interrupted = False
    try:
        with SeaweedServer(stop_timeout=5) as server:  # throwaway data: SIGKILL after 5 s is fine
            base = args.base.resolve() if args.base else None
            ctx = Context(server.endpoint_url, work, args.mount_options, base)
            print(f"== SeaweedFS on {ctx.endpoint}")
            for name in tool_names:
                tool = TOOL_CLASSES[name](ctx)
                why = tool.missing()
                if why:
                    note = f"{name} skipped: {why}"
                    notes.append(note)
                    print(f"== {note}", flush=True)
                    continue
                tool.setup()
                tools[name] = tool
            try:
                for series in chosen:
                    stored[series.name] = run_series(series, tools, repeats, workloads)
                listed: dict[str, int] = {}
                if ls_files:
                    ls_kinds, listed = run_ls(tools, ls_files, repeats, workloads, work)
                if args.profile:
                    profiles = run_profiles(tools, chosen, repeats, listed, args.profile)
            except KeyboardInterrupt:
                interrupted = True
                print("\n== interrupted: stopping, results so far follow", flush=True)
            finally:
                for tool in tools.values():
                    tool.close()
    finally:
        for mnt in work.glob("mnt-*"):  # normally already unmounted: never leave one stale
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)

    shown = [t for t in tool_names if t in tools]
    data = {
        "environment": env,
        "config": {
            "quick": args.quick,
            "repeats": repeats,
            "ls_files": ls_files,
            "mount_options": args.mount_options,
            "base": str(args.base) if args.base else None,
            "s3fs_options": S3FS_OPTIONS,
            "interrupted": interrupted,
        },
        "notes": notes,
        "tools": shown,
        "series": [
            {
                "name": s.name,
                "description": s.description,
                "description_short": series_label(s),
                "files": [p.name for p in s.paths],
                "original_bytes": s.original_bytes,
                "stored_bytes": stored.get(s.name, {}),
            }
            for s in chosen
            if s.name in stored
        ],
        "workloads": [w.to_json(shown) for w in workloads],
        "ls_kinds": ls_kinds,
        "profiles": profiles,
        "peak_rss_kib": {n: t.rss_kib for n, t in tools.items() if t.rss_kib},
        "peak_tree_rss_kib": {n: t.tree_rss_kib for n, t in tools.items() if t.tree_rss_kib},
    }
    print_report(data, workloads, stored, chosen, shown)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2))
    print(f"\nwritten: {args.json}")
    for path in draw_charts(data, args.charts):
        print(f"written: {path}")
    failed = any(m.error for w in workloads for m in w.measures.values())
    return 130 if interrupted else (1 if failed else 0)


def print_report(
    data: dict[str, Any],
    workloads: list[Workload],
    stored: dict[str, dict[str, int | None]],
    chosen: list[Series],
    tools: list[str],
) -> None:
    env = data["environment"]
    cfg = data["config"]
    print(
        f"\n{env['date']}, {_machine(env)}; dgfs {env['dgfs']} ({env['git_head']}), "
        f"DeltaGlider {env['deltaglider'] or 'not installed'}, {env['s3fs']}, "
        f"boto3 {env['boto3']}, {env['seaweedfs']}"
    )
    print(
        f"medians of {cfg['repeats']} run(s); each cell: seconds and ratio to {BASELINE}; "
        f"last column: dgfs store time ÷ {STORE_BASELINE}\n"
    )
    print(format_table(workloads, tools))
    print("\nstored MB (stored/original)\n")
    originals = {s.name: s.original_bytes for s in chosen if s.name in stored}
    print(format_stored(stored, originals, tools))
    if data["peak_rss_kib"]:
        print("\npeak RSS MB, daemon (daemon + children): per phase")
        for name, phases in data["peak_rss_kib"].items():
            tree = data["peak_tree_rss_kib"].get(name, {})
            parts = [
                f"{phase} {kib / 1024:.0f}"
                + (f" ({tree[phase] / 1024:.0f})" if phase in tree else "")
                for phase, kib in phases.items()
            ]
            print(f"  {name:<16} " + ", ".join(parts))
    if data["ls_kinds"]:
        print(
            "\nls directory stored as: "
            + "; ".join(f"{n}: {k}" for n, k in data["ls_kinds"].items())
        )
    for note in data["notes"]:
        print(f"\nNOTE: {note}")
    for w in workloads:
        for t, m in w.measures.items():
            if m.error and m.error != "not stored":
                print(f"\n{t} {w.key} FAILED: {m.error}")


if __name__ == "__main__":
    sys.exit(main())
