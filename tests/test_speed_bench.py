"""The pure parts of benchmarks/speed.py: medians, ratios, tables, ``ls -l`` parsing."""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

from benchmarks.speed import (
    BOTO3,
    DG_API,
    DGFS,
    DGFS_DEEP,
    S3FS,
    Measure,
    Workload,
    format_table,
    markdown_table,
    parse_ls,
    write_similar_zips,
)
from dgfs.policy import DEFAULT_MIN_DELTA_SIZE, Policy


def test_parse_ls_reads_names_and_sizes_of_real_ls_output(tmp_path: Path) -> None:
    (tmp_path / "a.zip").write_bytes(b"x" * 70000)
    (tmp_path / "old.bin").write_bytes(b"")
    os.utime(tmp_path / "old.bin", (0, 0))  # shown with a year, not a time
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to("a.zip")
    out = subprocess.run(
        ["ls", "-l", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, LC_ALL="C"),
    ).stdout
    assert parse_ls(out) == {"a.zip": 70000, "old.bin": 0}  # no "total", dir or symlink


def test_workload_ratios_use_medians_and_tolerate_missing_tools() -> None:
    w = Workload("store x", "store x", "store", "x")
    w.measures[DGFS] = Measure([3.0, 1.0, 2.0])  # median 2
    w.measures[S3FS] = Measure([1.0, 1.0, 4.0])  # median 1
    w.measures[DG_API] = Measure([8.0])
    w.measures[BOTO3] = Measure(error="boom")
    assert w.ratios(DGFS) == {f"vs {S3FS}": 2.0, f"vs {DG_API}": 0.25}
    assert w.ratios(BOTO3) == {f"vs {S3FS}": None, f"vs {DG_API}": None}
    read = Workload("cold read x", "cold read x", "cold read", "x")
    read.measures[DGFS] = Measure([2.0])
    assert read.ratios(DGFS) == {f"vs {S3FS}": None, f"vs {DG_API}": None}  # neither ran
    warm = Workload("warm read x", "warm read x", "warm read", "x")
    warm.measures[DGFS] = Measure([2.0])
    assert warm.ratios(DGFS) == {f"vs {S3FS}": None}  # the API has no warm read


def test_tables_give_dgfs_and_dgfs_deep_each_a_column_against_the_api() -> None:
    w = Workload("cold read x", "cold read x", "cold read", "x")
    w.measures[DGFS] = Measure([1.0])
    w.measures[DGFS_DEEP] = Measure([6.0])
    w.measures[DG_API] = Measure([4.0])
    row = format_table([w], [DGFS, DGFS_DEEP, DG_API]).splitlines()[-1]
    assert row.split()[-2:] == ["0.25x", "1.50x"]
    md = markdown_table([w], [DGFS, DGFS_DEEP, DG_API]).splitlines()
    assert md[0].endswith("| dgfs ÷ DeltaGlider API | dgfs deep ÷ DeltaGlider API |")
    assert md[-1] == "| cold read x | 1.00 s | 6.00 s | 4.00 s | 0.25× | 1.50× |"


def test_tables_show_seconds_ratios_and_dashes() -> None:
    w = Workload("store x", "store x", "store", "x")
    w.measures[DGFS] = Measure([3.0])
    w.measures[S3FS] = Measure([1.5])
    w.measures[DG_API] = Measure([12.0])
    text = format_table([w], [DGFS, DG_API, S3FS, BOTO3])
    row = text.splitlines()[-1]
    assert "3.00s  2.00x" in row and "12.00s  8.00x" in row and row.rstrip().endswith("0.25x")
    assert row.split()[-2] == "-"  # boto3 has no measure
    md = markdown_table([w], [DGFS, DG_API, S3FS, BOTO3])
    last = md.splitlines()[-1]
    assert last == "| store x | 3.00 s (2.00×) | 12.00 s (8.00×) | 1.50 s | – | 0.25× |"


def test_ls_zips_are_delta_candidates_of_varying_sizes(tmp_path: Path) -> None:
    paths = write_similar_zips(tmp_path, 5)
    sizes = {p.stat().st_size for p in paths}
    assert len(sizes) == 5 and min(sizes) >= DEFAULT_MIN_DELTA_SIZE
    for p in paths:
        assert zipfile.ZipFile(p).testzip() is None
        assert Policy().is_delta_candidate(p.name, p.read_bytes()[:64], p.stat().st_size)
