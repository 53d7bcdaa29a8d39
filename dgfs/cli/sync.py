"""``dgfs sync PATH...``: wait until files closed in a mount are in S3.

A CI step can ``cp app.zip /mnt/releases/app/ && dgfs sync /mnt/releases/app``
and know the file is durable and visible to the other mounts. For each
regular file under each PATH (recursively) whose ``user.dgfs.kind`` says
``pending``, it calls ``fsync``, which in a dgfs mount returns once that
file's upload is done, with its errno if the upload failed. Files already
in S3 cost one ``getxattr``. ``sync FILE`` (coreutils' sync(1) with a file
argument, or any fsync) is the single-file form.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from dgfs.durable import fsync_path
from dgfs.errors import ConfigError
from dgfs.fs.xattrs import PREFIX
from dgfs.printable import printable

KIND = PREFIX + "kind"

EXIT_OK = 0
EXIT_FAILED = 1


HELP = "wait until files closed under PATH in a mount are in S3"
DESCRIPTION = (
    "Return once every file under each PATH that was closed before the call "
    "is in S3; exit 1 naming the files whose upload failed."
)
EPILOG = "example:\n  cp dist/app-1.4.2.zip /mnt/releases/app/ && dgfs sync /mnt/releases/app"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="a file or directory in a mount")
    parser.add_argument("--quiet", "-q", action="store_true", help="print only failures")


def _files(path: Path) -> Iterator[Path]:
    if path.is_symlink() or not path.is_dir():
        yield path
        return
    for root, _dirs, names in os.walk(path):
        for name in sorted(names):
            yield Path(root) / name


def _is_pending(path: Path) -> bool:
    try:
        return os.getxattr(path, KIND, follow_symlinks=False) == b"pending"
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False  # a directory, a symlink, or a file outside a dgfs mount
        raise


def sync_file(path: Path) -> None:
    """fsync ``path``: in a dgfs mount, returns once its upload is done (OSError if it failed)."""
    fsync_path(path, os.O_RDONLY | os.O_NOFOLLOW)


def run(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.paths]
    for path in paths:
        if not path.exists():
            raise ConfigError(f"{path}: no such file or directory")
        try:
            os.getxattr(path, PREFIX + "bucket")
        except OSError:
            raise ConfigError(f"{path} is not inside a dgfs mount") from None
    synced = 0
    failures: list[tuple[Path, OSError]] = []
    for path in paths:
        for file in _files(path):
            try:
                if not _is_pending(file):
                    continue
                sync_file(file)
                synced += 1
            except OSError as exc:
                failures.append((file, exc))
    for file, error in failures:
        print(printable(f"FAILED  {file}: {error.strerror or error}"), file=sys.stderr)
    if not args.quiet:
        print(f"{synced} file(s) were pending and are now in S3; {len(failures)} failed")
    return EXIT_FAILED if failures else EXIT_OK
