"""``dgfs stats``: what a bucket stores and what the deltas save."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import TextIO

from dgfs.cli import options
from dgfs.cli.main import EXIT_OK
from dgfs.cli.runner import run_trio
from dgfs.errors import ConfigError
from dgfs.progress import Progress, human_bytes
from dgfs.runtime import S3Location, Settings, open_store
from dgfs.stats import BucketStats, Mode, ModeStats, compute_stats

EPILOG = """\
modes:
  --quick     one LIST; deltas' original sizes estimated from their reference (default)
  --sampled   LIST + one HEAD per directory; the other deltas estimated from it
  --detailed  LIST + a HEAD of every object: exact, tells direct from foreign

Deltas by mode: DeltaGlider v6 directories (reference.bin) and dgfs's deep ones
(reference.deep), each with its directories, deltas, stored and original bytes.
A directory holding both references has its deltas HEADed in every mode.

Whole-bucket results are cached in the bucket at .deltaglider/stats_{mode}.json
(DeltaGlider's layout; `deltaglider stats` reads it) and reused while a LIST
shows the bucket unchanged.

examples:
  dgfs stats releases
  dgfs stats s3://releases/app --detailed --by-prefix
  dgfs stats releases --sampled --json | jq .ratio
  dgfs stats releases --refresh --endpoint-url http://127.0.0.1:9000

exit codes: 0 ok, 1 failure, 2 usage error (bad bucket, access denied), 130 interrupted
"""


HELP = "object counts, original and stored bytes, savings"
DESCRIPTION = (
    "Count files, original bytes, stored bytes (references included) and "
    "savings of a bucket or prefix stored in the DeltaGlider format."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("location", metavar="BUCKET|s3://BUCKET[/PREFIX]")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", dest="mode", action="store_const", const="quick")
    modes.add_argument("--sampled", dest="mode", action="store_const", const="sampled")
    modes.add_argument("--detailed", dest="mode", action="store_const", const="detailed")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument(
        "--refresh", action="store_true", help="recompute even if the cache is valid"
    )
    cache.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument("--by-prefix", action="store_true", help="one line per directory")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="HEAD requests in flight (default 32)"
    )
    options.add_flags(parser, options.S3_GROUP)
    parser.set_defaults(mode="quick")


def run(args: argparse.Namespace) -> int:
    location = S3Location.parse(args.location)
    if args.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    settings = options.settings_from_args(args)
    stats = run_trio(_stats, location, settings, args)
    if args.json:
        json.dump(stats.to_json(), sys.stdout, indent=2)
        print()
    else:
        print_stats(stats, sys.stdout, by_prefix=args.by_prefix, remove_hint=_gc_command(args))
    return EXIT_OK


async def _stats(location: S3Location, settings: Settings, args: argparse.Namespace) -> BucketStats:
    async with open_store(location, settings) as store:
        await store.check_bucket()
        progress: Progress | None = None

        def on_head(count: int) -> None:
            nonlocal progress
            if progress is None:
                progress = Progress("stats", count)
            else:
                progress.advance(count)

        try:
            mode: Mode = args.mode
            return await compute_stats(
                store,
                location.prefix,
                mode,
                use_cache=not args.no_cache,
                refresh=args.refresh,
                concurrency=args.concurrency,
                on_head=on_head,
            )
        finally:
            if progress is not None:
                progress.close()


def _gc_command(args: argparse.Namespace) -> str:
    location = S3Location.parse(args.location)
    words = ["dgfs", "gc", "--yes", str(location)]
    for option in ("endpoint_url", "region", "profile"):
        value = getattr(args, option, None)
        if value:
            words += ["--" + option.replace("_", "-"), value]
    return shlex.join(words)


def _size(n: int) -> str:
    return f"{human_bytes(n)} ({n:,} bytes)"


def _mode_line(mode: ModeStats | None, tilde: str) -> str:
    mode = mode or ModeStats()
    if not mode.spaces and not mode.delta_count:
        return "none"
    return (
        f"{mode.delta_count:,} deltas in {mode.spaces:,} dir(s), "
        f"original {human_bytes(mode.original_bytes)}{tilde}, "
        f"stored {human_bytes(mode.stored_bytes)} (refs {human_bytes(mode.reference_bytes)})"
    )


def print_stats(
    stats: BucketStats, out: TextIO, *, by_prefix: bool = False, remove_hint: str = ""
) -> None:
    """The human-readable report."""
    _print_totals(stats, out)
    if by_prefix and stats.spaces:
        _print_by_prefix(stats, out)
    if stats.orphans:
        _print_orphans(stats, out, remove_hint)


def _print_totals(stats: BucketStats, out: TextIO) -> None:
    where = f"s3://{stats.bucket}/{stats.prefix}" if stats.prefix else f"s3://{stats.bucket}"
    estimate = " (estimated)" if stats.estimated else ""
    w = out.write
    w(f"Statistics of {where} ({stats.mode} mode)\n")
    w("=" * 64 + "\n")
    w(f"Files:               {stats.file_count:,}\n")
    w(f"  Delta:             {stats.delta_count:,}\n")
    if stats.direct_count is None or stats.foreign_count is None:
        w(f"  Direct + foreign:  {stats.plain_count:,}  (told apart with --detailed)\n")
    else:
        w(f"  Direct:            {stats.direct_count:,}\n")
        w(f"  Foreign:           {stats.foreign_count:,}\n")
    w(f"References:          {stats.reference_count:,}  {_size(stats.reference_bytes)}\n")
    if stats.reference_count or stats.delta_count:
        tilde = "~" if stats.estimated else ""
        w("Deltas by mode:\n")
        for name, label in (("dg", "DeltaGlider v6"), ("deep", "deep (dgfs)")):
            w(f"  {label + ':':<18} {_mode_line(stats.delta_modes.get(name), tilde)}\n")
        if stats.mixed_spaces:
            w(f"  {'both references:':<18} {stats.mixed_spaces:,} dir(s)\n")
    w(f"Original size:       {_size(stats.original_bytes)}{estimate}\n")
    w(f"Stored size:         {_size(stats.stored_bytes)}\n")
    if stats.hidden_forms:
        w(
            f"  older forms:       {stats.hidden_forms:,}  {_size(stats.hidden_bytes)}"
            " (a file's form no mount shows; in stored size)\n"
        )
    w(f"Saved:               {_size(stats.saved_bytes)}{estimate}\n")
    w(
        f"Ratio:               {stats.ratio:.4f} stored/original "
        f"({stats.saved_fraction:.1%} saved){estimate}\n"
    )
    if stats.unreadable:
        w(f"Unreadable metadata: {len(stats.unreadable)} object(s), e.g. {stats.unreadable[0]}\n")
    if stats.from_cache:
        w(f"(cached result computed {stats.computed_at}; --refresh recomputes)\n")


def _print_by_prefix(stats: BucketStats, out: TextIO) -> None:
    """A table of the directories."""
    w = out.write
    w("\n")
    header = ("DIRECTORY", "MODE", "FILES", "DELTA", "OTHER", "ORIGINAL", "STORED", "RATIO")
    rows = [
        (
            (space.prefix or "(root)") + "/",
            space.mode or "-",
            f"{space.file_count:,}",
            f"{space.delta_count:,}",
            f"{space.plain_count:,}",
            human_bytes(space.original_bytes) + ("~" if space.estimated else ""),
            human_bytes(space.stored_bytes),
            f"{space.ratio:.4f}" + (" orphaned reference" if space.orphaned else ""),
        )
        for space in stats.spaces
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        middle = zip(row[2:-1], widths[2:-1], strict=True)
        cells += [cell.rjust(width) for cell, width in middle]
        cells.append(row[-1])
        w("  ".join(cells).rstrip() + "\n")
    if any(space.estimated for space in stats.spaces):
        w("~ estimated (use --detailed for exact sizes)\n")


def _print_orphans(stats: BucketStats, out: TextIO, remove_hint: str) -> None:
    w = out.write
    w("\n")
    w(
        f"Orphaned references (no delta left), {len(stats.orphans)} holding "
        f"{human_bytes(stats.orphan_bytes)}:\n"
    )
    for orphan in stats.orphans:
        w(f"  s3://{stats.bucket}/{orphan.key}  {human_bytes(orphan.size)}\n")
    if remove_hint:
        w(f"Remove them with: {remove_hint}\n")
