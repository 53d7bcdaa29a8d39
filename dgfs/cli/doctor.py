"""``dgfs doctor [BUCKET[/PREFIX]] [-o opt,...] [--json]``: what a mount needs, checked.

The options are ``dgfs mount``'s, read by the same code
(``dgfs.cli.mount.build_config``), so the checks see what that mount
would: its endpoint, profile, cache directory, ``allow_other``, ``ro``.
Exit status 0 when nothing failed (warnings included), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import trio

from dgfs import doctor
from dgfs.doctor import Check, Status
from dgfs.errors import DgfsError
from dgfs.runtime import S3Location, open_store

EPILOG = """
examples:
  dgfs doctor                  # this machine: FUSE, xdelta3, zgz, cache, credentials
  dgfs doctor releases -o endpoint=http://127.0.0.1:8333,allow_other
  dgfs doctor releases/app -o ro --json    # a read-only mount: no probe write

Each line: ok, warn, FAIL or skip, the check, what was found and, if
something is wrong, "-- fix: ..." with what to do. With BUCKET, dgfs
writes one probe object under .deltaglider/tmp/ and deletes it (not with ro).
"""

#: Stands in for the bucket when none is given: only the endpoint is derived from it.
_NO_BUCKET = "dgfs-doctor-no-bucket"


HELP = "check what a mount needs (FUSE, xdelta3, cache, credentials, endpoint, bucket)"
DESCRIPTION = (
    "Check this machine, the S3 endpoint and (with BUCKET) the bucket for what "
    "`dgfs mount BUCKET ... -o OPTIONS` needs; one line per check, with its fix."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        nargs="?",
        metavar="BUCKET[/PREFIX]",
        help="the bucket to check (list, probe write, what it holds)",
    )
    parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="the mount's options (see dgfs mount --help)",
    )
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")


def local_checks(config: object) -> list[Check]:
    """The checks of this machine (blocking: run them outside trio)."""
    from dgfs.mount import MountConfig
    from dgfs.store.s3 import credential_source

    assert isinstance(config, MountConfig)
    settings = config.settings
    return [
        doctor.check_fuse_device(),
        doctor.check_fusermount(),
        doctor.check_allow_other(config.allow_other),
        doctor.check_xdelta3(settings.xdelta3),
        doctor.check_zgz(),
        doctor.check_cache_dir(settings.cache_dir, settings.cache_size),
        doctor.check_credentials(partial(credential_source, settings.profile)),
    ]


async def remote_checks(config: object, bucket_given: bool, can_sign: bool) -> list[Check]:
    """The endpoint's checks, then the bucket's (when given, and reachable with credentials)."""
    from dgfs.mount import MountConfig
    from dgfs.store.s3 import ca_bundle

    assert isinstance(config, MountConfig)
    try:
        async with open_store(config.location, config.settings) as store:
            endpoint, clock = await trio.to_thread.run_sync(
                partial(doctor.check_endpoint, store.endpoint, ca_bundle=ca_bundle())
            )
            checks = [endpoint, clock]
            if not bucket_given:
                checks.append(Check("bucket", Status.SKIP, "no BUCKET given"))
            elif endpoint.status is Status.FAIL or not can_sign:
                checks.append(Check("bucket", Status.SKIP, "needs the endpoint and credentials"))
            else:
                location = config.location
                read_only = config.fs_options.read_only
                proxy_key = config.settings.proxy_key_file is not None
                checks += await doctor.check_bucket(store, location.prefix, read_only, proxy_key)
            return checks
    except DgfsError as exc:  # the client cannot even be made (a malformed endpoint URL)
        return [Check("endpoint", Status.FAIL, str(exc), "check -o endpoint=")]


def run(args: argparse.Namespace) -> int:
    from dgfs.cli.mount import build_config

    source = args.source or _NO_BUCKET
    S3Location.parse(source)  # a bad name is a usage error, before anything runs
    config, _, _ = build_config(source, "/", args.options)
    checks = local_checks(config)
    can_sign = checks[-1].status is not Status.FAIL
    checks += trio.run(remote_checks, config, args.source is not None, can_sign)
    if args.json:
        print(
            json.dumps(
                {"ok": not doctor.failed(checks), "checks": [c.as_json() for c in checks]},
                indent=2,
            )
        )
    else:
        for check in checks:
            print(check.line())
        problems = sum(check.status is Status.FAIL for check in checks)
        warnings = sum(check.status is Status.WARN for check in checks)
        print(
            f"dgfs doctor: {problems} problem(s)"
            if problems
            else f"dgfs doctor: no problems ({warnings} warning(s))"
            if warnings
            else "dgfs doctor: no problems"
        )
    return 1 if doctor.failed(checks) else 0
