"""``dgfs install-helper``: make ``mount -t dgfs`` and fstab lines work."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from dgfs.errors import ConfigError

SCRIPT = """#!/bin/sh
# Installed by `dgfs install-helper`: mount(8) calls this for `-t dgfs` and fstab lines.
exec {python} -m dgfs.mount_helper "$@"
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "install-helper",
        help="install /sbin/mount.dgfs so `mount -t dgfs` and fstab work",
        description="Write a mount.dgfs helper that runs this dgfs installation.",
        epilog="example:\n  sudo dgfs install-helper\n  sudo mount -t dgfs releases /mnt/releases "
        "-o endpoint=http://127.0.0.1:8333",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--path", type=Path, default=Path("/sbin/mount.dgfs"))
    parser.add_argument("--uninstall", action="store_true", help="remove the helper")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path: Path = args.path
    if args.uninstall:
        path.unlink(missing_ok=True)
        print(f"removed {path}")
        return 0
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"cannot write {path}: run as root (sudo dgfs install-helper)")
    if not shutil.which("fusermount3"):
        print("warning: fusermount3 not found; install fuse3", file=sys.stderr)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(SCRIPT.format(python=sys.executable))
    tmp.chmod(0o755)
    os.replace(tmp, path)
    print(f"installed {path} -> {sys.executable} -m dgfs.mount_helper")
    return 0
