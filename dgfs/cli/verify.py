"""``dgfs verify``: rebuild stored files and check their SHA-256."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from dgfs.cli import options
from dgfs.cli.main import EXIT_FAILURE, EXIT_OK
from dgfs.cli.runner import run_trio
from dgfs.errors import ConfigError, NotFound, UserError
from dgfs.printable import printable
from dgfs.progress import Progress, human_bytes
from dgfs.runtime import S3Location, Settings, open_core
from dgfs.shard import Shard, suffix
from dgfs.verify import Status, VerifyReport, VerifyResult, mount_location, verify_all, verify_key

EPILOG = """\
TARGET is s3://BUCKET/KEY (the file's user-visible name, without .delta), a path
inside a dgfs mount, or with --all s3://BUCKET[/PREFIX] (or a directory in a mount).

A delta passes when its reference in the bucket matches the SHA-256 the delta was
made against and the rebuilt bytes match the file's SHA-256; a direct object when
its bytes match. Foreign objects (no recorded SHA-256) are reported as skipped.
Deep deltaspaces (dgfs's extension): reference.deep is decompressed and its
expanded form checked; deep deltas are rebuilt like others ("deep delta").

examples:
  dgfs verify s3://releases/app/app-1.4.2.zip
  dgfs verify /mnt/releases/app/app-1.4.2.zip
  dgfs verify --all s3://releases/app
  dgfs verify --all releases --json > report.json
  dgfs verify --all --shard 2/4 s3://releases   # worker 2 of 4 (by directory)

--shard K/N checks only the directories of worker K of N (a stable hash of each
directory's name), so N machines running 1/N ... N/N check every object once.

exit codes: 0 all verified, 1 a file failed (or could not be read),
            2 usage error (bad target, no such bucket or file), 130 interrupted
"""


HELP = "rebuild files and check their SHA-256"
DESCRIPTION = "Reconstruct stored files and check them against their recorded SHA-256."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="TARGET")
    parser.add_argument("--all", action="store_true", help="verify everything under TARGET")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="files verified at once (default 8)"
    )
    parser.add_argument(
        "--shard",
        metavar="K/N",
        help="with --all: only the directories of worker K of N (1 <= K <= N)",
    )
    options.add_flags(parser, options.S3_GROUP)
    options.add_flags(parser, options.CACHE_GROUP)
    options.add_flags(parser, options.PROXY_GROUP)


def resolve_target(target: str) -> tuple[S3Location, str | None]:
    """``(location, endpoint from the mount)`` for an S3 URL, a mount path or BUCKET/KEY."""
    if target.startswith("s3://") or not Path(target).exists():
        return S3Location.parse(target), None
    try:
        mount = mount_location(Path(target))
    except LookupError as exc:
        raise UserError(str(exc)) from None
    return S3Location(mount.bucket, mount.key), mount.endpoint_url


def run(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    shard = Shard.parse(args.shard) if args.shard is not None else None
    if shard is not None and not args.all:
        raise ConfigError("--shard splits a --all run: pass --all with it")
    location, mount_endpoint = resolve_target(args.target)
    settings = options.settings_from_args(args)
    if mount_endpoint and not args.endpoint_url:
        settings = replace(settings, endpoint_url=mount_endpoint)
    if args.all:
        report = run_trio(_verify_all, location, settings, args, shard)
        if args.json:
            json.dump(report.to_json(), sys.stdout, indent=2)
            print()
        else:
            print_report(report)
        return EXIT_OK if report.ok else EXIT_FAILURE
    if not location.prefix:
        raise ConfigError(f"{args.target}: name a file (s3://BUCKET/KEY), or use --all")
    result = run_trio(_verify_one, location, settings)
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=2)
        print()
    else:
        print(printable(_result_line(location.bucket, result)))
    return EXIT_FAILURE if result.status is Status.FAILED else EXIT_OK


async def _verify_one(location: S3Location, settings: Settings) -> VerifyResult:
    async with open_core(location, settings) as core:
        try:
            return await verify_key(core, location.prefix)
        except NotFound:
            raise UserError(f"{location}: no such file") from None


async def _verify_all(
    location: S3Location, settings: Settings, args: argparse.Namespace, shard: Shard | None
) -> VerifyReport:
    async with open_core(location, settings) as core:
        progress: Progress | None = None

        def on_start(objects: int, stored_bytes: int) -> None:
            nonlocal progress
            progress = Progress("verify" + suffix(shard), objects)

        def on_result(result: VerifyResult) -> None:
            if progress is not None:
                if result.status is Status.FAILED:
                    progress.note(_result_line(location.bucket, result))
                progress.advance(1, result.original_size)

        try:
            return await verify_all(
                core,
                location.prefix,
                concurrency=args.concurrency,
                shard=shard,
                on_start=on_start,
                on_result=on_result,
            )
        finally:
            if progress is not None:
                progress.close()


def _result_line(bucket: str, result: VerifyResult) -> str:
    kind = result.kind_label
    where = f"s3://{bucket}/{result.visible_key}"
    if result.status is Status.OK:
        return (
            f"OK      {where} ({kind}, {human_bytes(result.original_size)}, "
            f"sha256 {result.actual_sha256})" + (f": {result.message}" if result.message else "")
        )
    if result.status is Status.SKIPPED:
        return f"SKIPPED {where} ({kind}): {result.message}"
    return f"FAILED  {where} ({kind}): {result.message}" + (
        f" [expected {result.expected_sha256}, got {result.actual_sha256}]"
        if result.actual_sha256 and result.expected_sha256 != result.actual_sha256
        else ""
    )


def print_report(report: VerifyReport) -> None:
    where = f"s3://{report.bucket}/{report.prefix}" if report.prefix else f"s3://{report.bucket}"
    ok, failed = report.count(Status.OK), report.count(Status.FAILED)
    skipped = report.count(Status.SKIPPED)
    where += suffix(report.shard)
    print(printable(f"Verified {where}: {len(report.results)} objects in {report.elapsed:.1f} s"))
    print(f"  ok:      {ok}  ({human_bytes(report.verified_bytes)} checked)")
    print(f"  failed:  {failed}")
    print(f"  skipped: {skipped}  (foreign objects have no recorded SHA-256)")
    if report.failures:
        print("\nFailures:")
        for result in report.failures:
            print("  " + printable(_result_line(report.bucket, result)))
