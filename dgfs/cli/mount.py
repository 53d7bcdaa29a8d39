"""``dgfs mount BUCKET[/PREFIX] MOUNTPOINT [-o opt,...] [-f]``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dgfs.cli import options
from dgfs.errors import ConfigError
from dgfs.fs.filesystem import FsOptions
from dgfs.runtime import S3Location, Settings

EPILOG = """
examples:
  dgfs mount releases /mnt/releases -o endpoint=http://127.0.0.1:8333
  dgfs mount releases/app /mnt/app -o ro,allow_other
  dgfs mount s3://releases /mnt/releases -f -o log_level=info     # stay in the foreground

""" + options.help_text()


def build_config(
    source: str, mountpoint: str, option_texts: list[str]
) -> tuple[object, str | None, bool]:
    """``(MountConfig, log_level, foreground)`` from the command line; ``ConfigError`` if bad."""
    from dgfs.mount import MountConfig

    chosen = options.parse_mount_options(option_texts)
    config = MountConfig(
        location=S3Location.parse(source),
        mountpoint=Path(mountpoint).absolute(),
        settings=chosen.settings_over(Settings.from_env()),
        fs_options=FsOptions(**chosen.fs),  # type: ignore[arg-type]
        **chosen.mount,  # type: ignore[arg-type]
    )
    log_level = chosen.command.get("log_level")
    return config, str(log_level) if log_level else None, "foreground" in chosen.command


HELP = "mount a bucket (or a prefix of it) as a directory"
DESCRIPTION = (
    "Mount BUCKET[/PREFIX] on MOUNTPOINT. Without -f the command returns "
    "once the mount is live (or fails with the reason)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", metavar="BUCKET[/PREFIX]", help="bucket, bucket/prefix or s3://bucket/prefix"
    )
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]")
    parser.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    sandbox = parser.add_argument_group(
        "sandboxed mounts (systemd/dgfs@.service; docs/operations.md)"
    )
    sandbox.add_argument(
        "--handoff",
        metavar="USER",
        help="the privileged step, as root (ExecStartPre=+): mount MOUNTPOINT for USER and give"
        " the /dev/fuse descriptor to systemd, then exit; no daemon is started",
    )
    sandbox.add_argument(
        "--fuse-fd",
        metavar="N|systemd",
        help="serve /dev/fuse descriptor N, already mounted on MOUNTPOINT (systemd: the one"
        " --handoff gave systemd); needs no privileges",
    )


def fuse_fd_argument(value: str) -> int:
    """The descriptor ``--fuse-fd`` names: a number, or ``systemd`` (from LISTEN_FDS)."""
    from dgfs.handoff import FD_NAME
    from dgfs.sdnotify import listened_fds

    if value == "systemd":
        passed = listened_fds()
        if FD_NAME not in passed:
            raise ConfigError(
                f"--fuse-fd systemd: systemd passed no descriptor named {FD_NAME!r}"
                " (the unit's ExecStartPre=+ ... --handoff USER gives it one)"
            )
        return passed[FD_NAME]
    if not value.isdigit() or int(value) < 3:
        raise ConfigError(
            f"--fuse-fd takes a descriptor number (3 or more) or 'systemd', not {value!r}"
        )
    return int(value)


def run(args: argparse.Namespace) -> int:
    from dgfs.cli.main import setup_logging
    from dgfs.mount import MountConfig, daemonize, hand_over, run_foreground

    config, log_level, foreground = build_config(args.source, args.mountpoint, args.options)
    assert isinstance(config, MountConfig)
    if log_level:
        setup_logging(log_level)
    if args.handoff is not None:
        if args.fuse_fd is not None:
            raise ConfigError("--handoff mounts for a daemon started with --fuse-fd: not both")
        hand_over(config, args.handoff)
        return 0
    if args.fuse_fd is not None:
        config = dataclasses.replace(config, fuse_fd=fuse_fd_argument(args.fuse_fd))
    if args.foreground or foreground:
        run_foreground(config)
        return 0
    return daemonize(config)
