"""``dgfs migrate``: copy a bucket or prefix into DeltaGlider-compressed storage."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import TypeVar

import trio

from dgfs import ec2, environment
from dgfs import format as fmt
from dgfs.cli import options
from dgfs.cli.main import EXIT_FAILURE, EXIT_OK
from dgfs.cli.runner import run_trio
from dgfs.convert import (
    ConversionPlan,
    ConversionReport,
    convert_in_place,
    is_in_place,
    other_mode,
    plan_conversion,
)
from dgfs.core import Core
from dgfs.errors import ConfigError, UserError
from dgfs.format import DeltaMode
from dgfs.gc import DEFAULT_SETTLE_SECONDS
from dgfs.migrate import (
    Copied,
    MigrationPlan,
    MigrationReport,
    SourceFile,
    open_migration,
    plan_migration,
    run_migration,
)
from dgfs.normalize import NormalizeReport, normalize
from dgfs.printable import printable
from dgfs.progress import Progress, human_bytes
from dgfs.runtime import S3Location, Settings, open_core, open_store
from dgfs.shard import Shard, label, suffix

ReportT = TypeVar("ReportT", bound=MigrationReport)

#: Seconds to wait before re-checking removed references (``gc --settle``).
CONVERSION_SETTLE_SECONDS = DEFAULT_SETTLE_SECONDS
MODE_NAMES = {DeltaMode.DG: "DeltaGlider v6", DeltaMode.DEEP: "deep"}
STOCK_GZIP_DELTAS = "DeltaGlider gzip deltas it cannot read back"
REWRITE_NOTE = "DeltaGlider cannot read this gzip delta back: rewrite"

EPILOG = """\
Files are copied one by one through a local scratch file and stored as deltas
(or direct) under their own names. Sources already in the DeltaGlider format
are rebuilt and checked, not copied as deltas. Content type and user metadata
are kept. Rerunning resumes: files already at the destination (same name and
size, and SHA-256 where recorded) are skipped.

prefixes (as DeltaGlider): the last component of the source prefix is kept
  s3://src/a/b/ -> s3://dst/x/   lands in s3://dst/x/b/
  with --no-preserve-prefix      lands in s3://dst/x/

delta modes: --deltas dg (DeltaGlider v6, reference.bin) or deep (dgfs's deep
deltas of archives' expanded content, reference.deep) for directories new at the
destination; existing directories keep their mode. With SRC = DST and --deltas,
the location is converted IN PLACE: every delta of the other mode is rebuilt,
checked and stored again in the given mode, then the other mode's references are
removed (a backup is kept 24 h under .deltaglider/tmp/gc/). Every file stays
readable throughout; rerun to finish an interrupted conversion. --deltas dg in
place also rewrites the .tar.gz/.tgz deltas the deltaglider CLI stored from gzip
input and cannot read back (stored direct again, as it reads them).

normalize: --normalize with SRC = DST rewrites, in place, the metadata of every
object under the location that lacks some of what the DeltaGlider CLI, dgfs and
deltaglider_proxy each need (CopyObject onto itself, no byte moved), so that
all three read a bucket any of them wrote: the proxy's deltas get dg-ref-key,
its direct files dg-compression; DeltaGlider's get dg-ref-path and dg-note.
Nothing is removed. An object replaced meanwhile is left alone (rerun); a rerun
skips what is done. --dry-run lists what would change; --shard K/N splits it.

several machines: --shard K/N takes only the directories (destination directories;
in place, the location's) of worker K of N, by a stable hash of each directory's
name, so N workers running 1/N ... N/N with the same other arguments cover every
file once and each directory's reference is made by one of them. Rerun a worker
with the same K/N to resume it.

examples:
  dgfs migrate s3://old-releases/ s3://releases/
  dgfs migrate --dry-run s3://old/app/ s3://releases/
  dgfs migrate --yes --include '*.zip' --exclude '*-rc*' s3://old/ s3://releases/
  dgfs migrate --yes --concurrency 16 --endpoint-url http://127.0.0.1:9000 s3://a/ s3://b/
  dgfs migrate --yes --deltas deep s3://old-releases/ s3://releases/
  dgfs migrate --dry-run --deltas dg s3://releases/ s3://releases/   # deep -> DeltaGlider
  dgfs migrate --yes --shard 3/8 s3://old-releases/ s3://releases/    # worker 3 of 8
  dgfs migrate --yes --normalize s3://releases/ s3://releases/      # readable by all three

exit codes: 0 all copied (or nothing to do, or dry run), 1 some files failed (listed),
            2 usage error (bad location, no such bucket, access denied,
            no confirmation), 130 interrupted (rerun to resume)
"""


HELP = "copy a bucket/prefix into delta-compressed storage (resumable)"
DESCRIPTION = "Copy a bucket or prefix into DeltaGlider-compressed storage."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="s3://SRC[/PREFIX]/")
    parser.add_argument("dest", metavar="s3://DST[/PREFIX]/")
    parser.add_argument("--dry-run", action="store_true", help="show what would be copied")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    parser.add_argument(
        "--include", action="append", default=[], metavar="GLOB", help="only matching keys"
    )
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="skip matching keys"
    )
    parser.add_argument(
        "--no-preserve-prefix",
        action="store_true",
        help="put files right under the destination prefix",
    )
    parser.add_argument("--concurrency", type=int, default=8, help="files in flight (default 8)")
    options.add_flag(parser, "max_ratio")
    parser.add_argument(
        "--deltas",
        choices=[mode.value for mode in DeltaMode],
        help="mode of new destination directories: dg (DeltaGlider v6, default) or deep; "
        "with SRC = DST, convert the location in place to that mode",
    )
    parser.add_argument(
        "--normalize",
        action="store_true",
        help="with SRC = DST: add the metadata keys the DeltaGlider CLI and "
        "deltaglider_proxy need, in place (no bytes copied)",
    )
    parser.add_argument(
        "--shard",
        metavar="K/N",
        help="only the directories of worker K of N (1 <= K <= N), to split a run across machines",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    options.add_flags(parser, options.S3_GROUP)
    options.add_flags(parser, options.CACHE_GROUP)
    options.add_flags(parser, options.PROXY_GROUP)


def _location(text: str, what: str) -> S3Location:
    if not text.startswith("s3://"):
        raise ConfigError(f"{what} must be an s3:// URL, not {text!r}")
    return S3Location.parse(text)


def run(args: argparse.Namespace) -> int:
    source, dest = _location(args.source, "source"), _location(args.dest, "destination")
    if args.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    # Parsed here so that a bad value is a one-line usage error (exit 2), like the others.
    shard = Shard.parse(args.shard) if args.shard is not None else None
    settings = options.settings_from_args(args)
    if args.deltas:
        settings = dataclasses.replace(settings, deltas=DeltaMode.parse(args.deltas))
    if args.normalize:
        return _main_normalize(source, dest, settings, args, shard)
    if is_in_place(source, dest):
        if not args.deltas:
            raise ConfigError(
                f"source and destination are the same location ({source}): nothing to copy; "
                "to convert its deltas in place pass --deltas dg or --deltas deep"
            )
        return _main_in_place(source, settings, args, shard)
    plan, report = run_trio(_migrate, source, dest, settings, args, shard)
    return _outcome(args, plan_json(plan), report, print_summary)


def _outcome(
    args: argparse.Namespace,
    plan_document: dict[str, object],
    report: ReportT | None,
    print_report: Callable[[ReportT], None],
) -> int:
    """Print what a run (migration or conversion) did, or its plan when nothing ran
    (``--json`` only); its exit code."""
    if report is None:
        if args.json:
            json.dump(plan_document, sys.stdout, indent=2)
            print()
        return EXIT_OK
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        print()
    elif not args.quiet or report.any_failed:
        print_report(report)
    return EXIT_FAILURE if report.any_failed else EXIT_OK


def _main_normalize(
    source: S3Location,
    dest: S3Location,
    settings: Settings,
    args: argparse.Namespace,
    shard: Shard | None,
) -> int:
    if not is_in_place(source, dest) or args.deltas:
        raise ConfigError(
            "--normalize rewrites a location in place: give it as SRC and DST, no --deltas"
        )
    if not args.dry_run and not args.yes:
        raise ConfigError(
            "--normalize rewrites the metadata of objects in place: pass --yes (or --dry-run first)"
        )

    async def go() -> NormalizeReport:
        async with open_store(source, settings) as store:
            await store.check_bucket()
            return await normalize(
                store,
                source.prefix,
                dry_run=args.dry_run,
                shard=shard,
                concurrency=args.concurrency,
            )

    report = run_trio(go)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        print()
    else:
        verb = "would rewrite" if args.dry_run else "rewrote"
        _say(args, f"Normalizing {source}/{suffix(shard)}: examined {report.examined:,} objects")
        _say(
            args,
            f"  {verb}: {len(report.rewritten):,}; already readable by all: {report.unchanged:,}",
        )
        if args.dry_run:
            for key in report.rewritten[:50]:
                _say(args, printable(f"    {key}"))
        if report.changed_meanwhile:
            _say(
                args,
                f"  changed while it ran (left alone, rerun): {len(report.changed_meanwhile):,}",
            )
        if report.shadowed:
            _say(
                args,
                f"  hidden by a newer form of the same file (left alone): {len(report.shadowed):,}",
            )
        for key, why in sorted(report.failed.items()):
            print(printable(f"  FAILED {key}: {why}"), file=sys.stderr)
    return EXIT_FAILURE if report.failed else EXIT_OK


def _say(args: argparse.Namespace, text: str = "") -> None:
    if not args.quiet and not args.json:
        print(text)


async def _warn_regions(settings: Settings, buckets: list[str]) -> None:
    """On EC2, a line on stderr for each bucket addressed in another region than the instance's."""
    instance = await trio.to_thread.run_sync(ec2.instance_info)
    if instance is None:
        return
    # The bucket's region as the client addresses it (DeltaGlider compares the same).
    region = settings.region or environment.region() or "us-east-1"
    for bucket in dict.fromkeys(buckets):
        warning = ec2.region_warning(instance, bucket, region)
        if warning:
            print(warning, file=sys.stderr)


async def _migrate(
    source: S3Location,
    dest: S3Location,
    settings: Settings,
    args: argparse.Namespace,
    shard: Shard | None,
) -> tuple[MigrationPlan, MigrationReport | None]:
    await _warn_regions(settings, [source.bucket, dest.bucket])
    async with open_migration(source, dest, settings) as (source_core, dest_core):
        plan = await plan_migration(
            source_core.store,
            dest_core.store,
            source,
            dest,
            include=args.include,
            exclude=args.exclude,
            preserve_prefix=not args.no_preserve_prefix,
            shard=shard,
        )
        show_plan(plan, args)
        mine = f" of shard {plan.shard}" if plan.shard else ""
        nothing = f"Nothing to copy: the destination holds every file{mine}."
        report = await _carry_out(
            args,
            nothing if not plan.to_copy else None,
            partial(_confirm, plan),
            partial(_run, source_core, dest_core, plan, args),
        )
        return plan, report


async def _carry_out(
    args: argparse.Namespace,
    nothing_to_do: str | None,
    confirm: Callable[[], Awaitable[None]],
    execute: Callable[[], Awaitable[ReportT]],
) -> ReportT | None:
    """Run a shown plan, unless there is nothing to do (say ``nothing_to_do``) or it is
    a dry run; ask first unless --yes. The run's report, or None when nothing ran."""
    if nothing_to_do is not None:
        _say(args, nothing_to_do)
        return None
    if args.dry_run:
        return None
    if not args.yes:
        await confirm()
    return await execute()


def plan_json(plan: MigrationPlan) -> dict[str, object]:
    """The plan as ``--json`` prints it for a dry run (or when nothing is to do)."""
    return {
        "source": str(plan.source),
        "destination": f"s3://{plan.dest.bucket}/{plan.dest_prefix}",
        "shard": label(plan.shard),
        "other_shards": plan.other_shards,
        "to_copy": [
            {"key": f.rel_key, "dest_key": f.dest_key, "size": f.size} for f in plan.to_copy
        ],
        "to_copy_bytes": plan.total_bytes,
        "replacing": [f.rel_key for f in plan.replacing],
        "present": len(plan.present),
        "present_bytes": plan.present_bytes,
        "filtered_out": plan.filtered_out,
    }


def show_plan(plan: MigrationPlan, args: argparse.Namespace) -> None:
    target = f"s3://{plan.dest.bucket}/{plan.dest_prefix}".rstrip("/") + "/"
    _say(args, f"Migrating {plan.source}/ -> {target}{suffix(plan.shard)}")
    _say(args, f"  to copy:          {len(plan.to_copy):,} files, {human_bytes(plan.total_bytes)}")
    if plan.replacing:
        _say(args, f"    of which differ at the destination (replaced): {len(plan.replacing):,}")
    _say(
        args,
        f"  already present:  {len(plan.present):,} files, {human_bytes(plan.present_bytes)}"
        " (skipped)",
    )
    _show_selection(plan, "files", args)
    if args.dry_run:
        _say(args, "\nDry run, nothing written. Would copy:")
        shown = plan.to_copy if len(plan.to_copy) <= 50 else plan.to_copy[:50]
        for file in shown:
            _say(
                args, printable(f"  {file.rel_key}  ({human_bytes(file.size)}) -> {file.dest_key}")
            )
        if len(shown) < len(plan.to_copy):
            _say(args, f"  ... and {len(plan.to_copy) - len(shown)} more")


def _show_selection(
    plan: MigrationPlan | ConversionPlan, unit: str, args: argparse.Namespace
) -> None:
    """The plan's lines on what --include/--exclude and --shard left to others."""
    if plan.filtered_out:
        _say(args, f"  filtered out:     {plan.filtered_out:,} files")
    if plan.shard is not None:
        _say(args, f"  other shards:     {plan.other_shards:,} {unit} (their directories' workers)")


async def _confirm(plan: MigrationPlan) -> None:
    question = (
        f"Copy {len(plan.to_copy):,} files ({human_bytes(plan.total_bytes)}) "
        f"to s3://{plan.dest.bucket}/{plan.dest_prefix}{suffix(plan.shard)}? [y/N] "
    )
    await _ask(question, "migrate", "migration")


async def _ask(question: str, verb: str, noun: str) -> None:
    """``UserError`` unless the user at the terminal answers yes."""
    if not sys.stdin.isatty():
        raise UserError(f"refusing to {verb} without confirmation: pass --yes (or use a terminal)")
    answer = await trio.to_thread.run_sync(input, question)
    if answer.strip().lower() not in ("y", "yes"):
        raise UserError(f"{noun} cancelled")


@contextlib.contextmanager
def _progress(
    name: str, files: int, total_bytes: int, args: argparse.Namespace
) -> Iterator[Callable[[SourceFile, Copied | None, str | None], None]]:
    """A progress bar (none with --quiet or --json) and the ``on_done`` that advances it."""
    enabled = False if (args.quiet or args.json) else None
    with Progress(name, files, total_bytes, enabled=enabled) as progress:

        def on_done(file: SourceFile, copied: Copied | None, error: str | None) -> None:
            if error is not None:
                progress.note(f"FAILED {file.rel_key}: {error}")
            progress.advance(1, file.size)

        yield on_done


async def _run(
    source_core: Core, dest_core: Core, plan: MigrationPlan, args: argparse.Namespace
) -> MigrationReport:
    name = "migrate" + suffix(plan.shard)
    with _progress(name, len(plan.to_copy), plan.total_bytes, args) as on_done:
        return await run_migration(
            source_core, dest_core, plan, concurrency=args.concurrency, on_done=on_done
        )


def print_summary(report: MigrationReport) -> None:
    print()
    print("Migration summary" + suffix(report.shard))
    print(f"  copied:    {len(report.copied):,} files in {report.elapsed:.1f} s")
    print(f"  skipped:   {report.skipped:,} files already at the destination")
    print(f"  failed:    {len(report.failed):,} files")
    print(f"  original:  {human_bytes(report.original_bytes)} ({report.original_bytes:,} bytes)")
    print(f"  stored:    {human_bytes(report.stored_bytes)} ({report.stored_bytes:,} bytes)")
    if report.original_bytes:
        fraction = report.saved_bytes / report.original_bytes
        print(f"  saved:     {human_bytes(report.saved_bytes)} ({fraction:.1%})")
    print(f"  rate:      {_rate(report)}")
    _print_failed(report)


def _rate(report: MigrationReport) -> str:
    elapsed = max(report.elapsed, 1e-9)
    return (
        f"{len(report.copied) / elapsed:.2f} files/s, "
        f"{report.original_bytes / elapsed / 1e6:.2f} MB/s"
    )


def _print_failed(report: MigrationReport) -> None:
    if report.failed:
        print("\nFailed files (rerun to retry them):")
        for key, reason in report.failed:
            print(printable(f"  {key}: {reason}"))


# --- in-place conversion ------------------------------------------------------------


def _main_in_place(
    location: S3Location, settings: Settings, args: argparse.Namespace, shard: Shard | None
) -> int:
    plan, report = run_trio(_convert, location, settings, args, shard)
    return _outcome(args, conversion_plan_json(plan), report, print_conversion_summary)


async def _convert(
    location: S3Location, settings: Settings, args: argparse.Namespace, shard: Shard | None
) -> tuple[ConversionPlan, ConversionReport | None]:
    await _warn_regions(settings, [location.bucket])
    async with open_core(location, settings) as core:
        plan = await plan_conversion(
            core.store,
            location,
            settings.deltas,
            include=args.include,
            exclude=args.exclude,
            shard=shard,
        )
        show_conversion_plan(plan, args)
        there = "in this shard's directories" if plan.shard else "there"
        nothing = f"Nothing to convert: every delta {there} is already {plan.target.value}."
        report = await _carry_out(
            args,
            nothing if plan.nothing_to_do else None,
            partial(_confirm_conversion, plan),
            partial(_run_conversion, core, plan, args),
        )
        return plan, report


def _location_text(location: S3Location) -> str:
    return str(location).rstrip("/") + "/"


def conversion_plan_json(plan: ConversionPlan) -> dict[str, object]:
    """The conversion plan as ``--json`` prints it for a dry run (or when nothing is to do)."""
    return {
        "in_place": True,
        "location": str(plan.location),
        "shard": label(plan.shard),
        "other_shards": plan.other_shards,
        "deltas": plan.target.value,
        "to_convert": [
            {"key": f.rel_key, "size": f.size, "from": plan.source_mode.value}
            for f in plan.to_convert
        ],
        "to_convert_bytes": plan.total_bytes,
        "to_rewrite": [{"key": f.rel_key, "size": f.size} for f in plan.to_rewrite],
        "to_rewrite_bytes": plan.rewrite_bytes,
        "already": plan.already,
        "stale_deltas": plan.stale,
        "old_references": [{"key": o.key, "size": o.size} for o in plan.old_references],
        "filtered_out": plan.filtered_out,
    }


def show_conversion_plan(plan: ConversionPlan, args: argparse.Namespace) -> None:
    old, new = plan.source_mode.value, plan.target.value
    old_ref = fmt.reference_key("", plan.source_mode)
    _say(
        args,
        f"Converting {_location_text(plan.location)} in place to {MODE_NAMES[plan.target]} "
        f"deltas ({fmt.reference_key('', plan.target)}){suffix(plan.shard)}",
    )
    _say(
        args,
        f"  to convert:       {len(plan.to_convert):,} {old} deltas, "
        f"{human_bytes(plan.total_bytes)}",
    )
    if plan.to_rewrite:
        _say(
            args,
            f"  to rewrite:       {len(plan.to_rewrite):,} {STOCK_GZIP_DELTAS}, "
            f"{human_bytes(plan.rewrite_bytes)}",
        )
    _say(args, f"  already {new + ':':<9} {plan.already:,} deltas (skipped)")
    if plan.stale:
        _say(args, f"  stale deltas:     {len(plan.stale):,} (a newer direct copy exists; removed)")
    if plan.old_references:
        _say(
            args,
            f"  old references:   {len(plan.old_references):,} {old_ref} "
            f"(removed once no {old} delta needs them)",
        )
    _show_selection(plan, "deltas", args)
    if args.dry_run:
        _say(args, "\nDry run, nothing written. Would convert:")
        shown = plan.to_convert[:50]
        for file in shown:
            _say(args, printable(f"  {file.rel_key}  ({human_bytes(file.size)})  {old} -> {new}"))
        if len(shown) < len(plan.to_convert):
            _say(args, f"  ... and {len(plan.to_convert) - len(shown)} more")
        for file in plan.to_rewrite[:50]:
            _say(args, printable(f"  {file.rel_key}  ({human_bytes(file.size)})  {REWRITE_NOTE}"))
        if len(plan.to_rewrite) > 50:
            _say(args, f"  ... and {len(plan.to_rewrite) - 50} more to rewrite")
        for key in plan.stale:
            _say(args, printable(f"  {key}  (stale, delete)"))
        for ref in plan.old_references:
            _say(
                args,
                printable(
                    f"  {ref.key}  ({human_bytes(ref.size)})  remove if no {old} delta is left"
                ),
            )


async def _confirm_conversion(plan: ConversionPlan) -> None:
    rewrite = (
        f", rewrite {len(plan.to_rewrite):,} {STOCK_GZIP_DELTAS} "
        f"({human_bytes(plan.rewrite_bytes)})"
        if plan.to_rewrite
        else ""
    )
    question = (
        f"Convert {len(plan.to_convert):,} deltas ({human_bytes(plan.total_bytes)}) in "
        f"{_location_text(plan.location)}{suffix(plan.shard)} to {plan.target.value}{rewrite} "
        "and remove the "
        f"{fmt.reference_key('', plan.source_mode)} references no delta needs? [y/N] "
    )
    await _ask(question, "convert", "conversion")


async def _run_conversion(
    core: Core, plan: ConversionPlan, args: argparse.Namespace
) -> ConversionReport:
    files = len(plan.to_convert) + len(plan.to_rewrite)
    total = plan.total_bytes + plan.rewrite_bytes
    with _progress("convert" + suffix(plan.shard), files, total, args) as on_done:
        return await convert_in_place(
            core,
            plan,
            concurrency=args.concurrency,
            settle=CONVERSION_SETTLE_SECONDS,
            on_done=on_done,
        )


def print_conversion_summary(report: ConversionReport) -> None:
    new = report.target.value
    old_ref = fmt.reference_key("", other_mode(report.target))
    print()
    print(f"Conversion summary (to {MODE_NAMES[report.target]} deltas){suffix(report.shard)}")
    converted = report.converted
    converted_bytes = sum(c.original_size for c in converted)
    print(
        f"  converted:  {len(converted):,} files ({human_bytes(converted_bytes)}) "
        f"in {report.elapsed:.1f} s"
    )
    if report.rewritten:
        rewritten_bytes = report.original_bytes - converted_bytes
        print(
            f"  rewritten:  {len(report.rewritten):,} DeltaGlider gzip deltas "
            f"({human_bytes(rewritten_bytes)}), now readable by DeltaGlider"
        )
    print(f"  skipped:    {report.skipped:,} deltas already {new}")
    print(f"  failed:     {len(report.failed):,} files")
    if report.stale_removed:
        print(
            f"  stale:      {len(report.stale_removed):,} old deltas behind a direct copy removed"
        )
    print(
        f"  references: {len(report.references_removed):,} {old_ref} removed "
        f"({human_bytes(report.freed_bytes)}), {len(report.references_kept):,} kept"
    )
    print(
        f"  stored:     {human_bytes(report.stored_before)} before, "
        f"{human_bytes(report.stored_after)} after "
        + (
            f"(the directories of shard {report.shard})"
            if report.shard
            else "(everything under the location)"
        )
    )
    print(f"  rate:       {_rate(report)}")
    if report.references_removed:
        print("Removed references are kept 24 h under .deltaglider/tmp/gc/ in case one is needed.")
    for key, why in report.references_kept:
        print(printable(f"  kept {key}: {why}"))
    for key, error in report.references_failed:
        print(printable(f"  FAILED to remove {key}: {error}"))
    if report.unused_references:
        print(
            f"{len(report.unused_references):,} {fmt.REFERENCE_NAME} left that no delta needs "
            "any more (`dgfs gc --yes` removes them):"
        )
        for key in report.unused_references:
            print(printable(f"  {key}"))
    _print_failed(report)
