"""``dgfs gc``: remove orphaned references and indexes, expired temp objects, stale uploads."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import timedelta

from dgfs.cli import options
from dgfs.cli.main import EXIT_FAILURE, EXIT_OK
from dgfs.cli.runner import run_trio
from dgfs.errors import ConfigError
from dgfs.gc import (
    DEFAULT_SETTLE_SECONDS,
    Garbage,
    GarbageKind,
    GcResult,
    collect,
    find_garbage,
)
from dgfs.printable import printable
from dgfs.progress import human_bytes
from dgfs.runtime import S3Location, Settings, open_store

EPILOG = """\
Without --yes nothing is changed: the command lists what it would do.

  orphaned-reference  reference.bin or reference.deep that no .delta in its directory
                      needs (deep deltas need reference.deep, the others
                      reference.bin); a copy is kept 24 h under
                      .deltaglider/tmp/gc/ and put back if a delta appears meanwhile
  expired-tmp         .deltaglider/tmp/ objects past their dg-expires-at, or older
                      than --tmp-max-age without one (whole-bucket runs only)
  stale-multipart     incomplete multipart uploads older than --multipart-max-age
  orphaned-index      a mount's directory index (.deltaglider/dgfs-index/) of a
                      directory that holds nothing any more (whole-bucket runs only)
  restore-reference   a gc copy whose directory has deltas again: it is put back

examples:
  dgfs gc s3://releases
  dgfs gc --yes s3://releases/app
  dgfs gc --yes --multipart-max-age 2h releases

exit codes: 0 ok (or dry run), 1 something could not be removed,
            2 usage error (bad location, no such bucket, access denied), 130 interrupted
"""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``"90"``/``"90s"``, ``"30m"``, ``"24h"``, ``"7d"`` -> timedelta."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"bad duration {text!r}: use a number with s, m, h or d")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


HELP = "remove orphaned references and indexes, expired temp objects, stale uploads"
DESCRIPTION = "Find (and with --yes remove) what no file needs any more."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("location", metavar="BUCKET|s3://BUCKET[/PREFIX]")
    parser.add_argument("--yes", "-y", action="store_true", help="really remove (default: dry run)")
    parser.add_argument("--tmp-max-age", default="24h", help="age of a temp object without expiry")
    parser.add_argument("--multipart-max-age", default="24h", help="age of a stale upload")
    parser.add_argument(
        "--settle",
        type=float,
        default=DEFAULT_SETTLE_SECONDS,
        help="seconds to wait before re-checking removed references (default %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    options.add_flags(parser, options.S3_GROUP)


def run(args: argparse.Namespace) -> int:
    location = S3Location.parse(args.location)
    tmp_max_age = parse_duration(args.tmp_max_age)
    multipart_max_age = parse_duration(args.multipart_max_age)
    if args.settle < 0:
        raise ConfigError("--settle must be >= 0")
    settings = options.settings_from_args(args)
    garbage, result = run_trio(_gc, location, settings, args, tmp_max_age, multipart_max_age)
    if args.json:
        json.dump(_json(location, garbage, result), sys.stdout, indent=2)
        print()
    else:
        print_result(location, garbage, result)
    return EXIT_FAILURE if result is not None and result.failed else EXIT_OK


async def _gc(
    location: S3Location,
    settings: Settings,
    args: argparse.Namespace,
    tmp_max_age: timedelta,
    multipart_max_age: timedelta,
) -> tuple[list[Garbage], GcResult | None]:
    async with open_store(location, settings) as store:
        await store.check_bucket()
        garbage = await find_garbage(
            store,
            location.prefix,
            tmp_max_age=tmp_max_age,
            multipart_max_age=multipart_max_age,
        )
        if not args.yes or not garbage:
            return garbage, None
        return garbage, await collect(store, garbage, settle=args.settle)


def _item_json(item: Garbage) -> dict[str, object]:
    return {"kind": item.kind.value, "key": item.key, "size": item.size, "reason": item.reason}


def _json(
    location: S3Location, garbage: list[Garbage], result: GcResult | None
) -> dict[str, object]:
    data: dict[str, object] = {
        "location": str(location),
        "dry_run": result is None,
        "found": [_item_json(item) for item in garbage],
    }
    if result is not None:
        data["removed"] = [_item_json(item) for item in result.removed]
        data["restored"] = result.restored
        data["kept"] = [{**_item_json(i), "why": why} for i, why in result.kept]
        data["failed"] = [{**_item_json(i), "error": err} for i, err in result.failed]
        data["freed_bytes"] = result.freed_bytes
    return data


def print_result(location: S3Location, garbage: list[Garbage], result: GcResult | None) -> None:
    if not garbage:
        print(printable(f"{location}: nothing to collect"))
        return
    total = sum(item.size for item in garbage)
    verb = "Would act on" if result is None else "Found"
    print(printable(f"{verb} {len(garbage)} item(s) in {location} ({human_bytes(total)}):"))
    for item in garbage:
        size = f"  {human_bytes(item.size)}" if item.size else ""
        print(printable(f"  {item.kind.value:<19} {item.key}{size}  ({item.reason})"))
    if result is None:
        print("\nDry run: nothing changed. Rerun with --yes to remove them.")
        return
    print(f"\nRemoved {len(result.removed)} item(s), freed {human_bytes(result.freed_bytes)}.")
    for key in result.restored:
        print(printable(f"  restored {key}"))
    for item, why in result.kept:
        print(printable(f"  kept {item.key}: {why}"))
    for item, error in result.failed:
        print(printable(f"  FAILED {item.key}: {error}"))
    if any(item.kind is GarbageKind.ORPHANED_REFERENCE for item in result.removed):
        print("Removed references are kept 24 h under .deltaglider/tmp/gc/ in case one is needed.")
