"""``dgfs install-helper``: make ``mount -t dgfs`` and fstab lines work.

mount(8) runs the helper as root, from whatever directory root is in, so
the helper must import nothing from there: it runs the interpreter in
isolated mode (``-I``: no current directory or script directory on
``sys.path``, no ``PYTHON*`` variables, no user site-packages). Installed
by root, it also refuses an interpreter, or a dgfs installation, that
someone other than root could replace (see ``replaceable_by_others``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import stat
import sys
from pathlib import Path

import dgfs
from dgfs.errors import ConfigError

SCRIPT = """#!/bin/sh
# Installed by {installer}: mount(8) calls this for `-t dgfs` and fstab lines.
# -I: isolated, so nothing in the directory mount(8) runs from is ever imported.
exec {python} -I -m dgfs.mount_helper "$@"
"""


def helper_script(python: str, installer: str = "`dgfs install-helper`") -> str:
    """The text of ``mount.dgfs`` running ``python`` (the Debian package writes it too)."""
    return SCRIPT.format(python=shlex.quote(python), installer=installer)


HELP = "install /sbin/mount.dgfs so `mount -t dgfs` and fstab work"
DESCRIPTION = "Write a mount.dgfs helper that runs this dgfs installation."
EPILOG = (
    "example:\n  sudo dgfs install-helper\n  sudo mount -t dgfs releases /mnt/releases "
    "-o endpoint=http://127.0.0.1:8333"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--path",
        type=Path,
        default=Path("/sbin/mount.dgfs"),
        help="where to write the helper (default /sbin/mount.dgfs)",
    )
    parser.add_argument("--uninstall", action="store_true", help="remove the helper")


def replaceable_by_others(path: Path) -> str | None:
    """Why someone other than root could change what ``path`` is, or None if nobody can.

    ``path`` (as written and with its symlinks resolved) and every directory
    above it must be owned by root and writable by neither group nor
    others; a sticky directory (``/tmp``) is allowed, since others cannot
    rename or remove root's entries in it. Symlinks themselves have no
    mode: what could replace one is its directory, which is checked.
    """
    absolute = Path(os.path.abspath(path))
    for candidate in dict.fromkeys([absolute, Path(os.path.realpath(absolute))]):
        for part in [candidate, *candidate.parents]:
            try:
                st = os.lstat(part)
            except OSError as exc:
                return f"{part}: {exc.strerror}"
            if stat.S_ISLNK(st.st_mode):
                continue
            if st.st_uid != 0:
                return f"{part} is owned by uid {st.st_uid}, not root"
            sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_dir:
                return f"{part} is writable by its group or others (mode {st.st_mode & 0o7777:04o})"
    return None


def _check_safe_to_run_as_root(python: Path) -> None:
    """``ConfigError`` when root's helper would run code another user can change."""
    package = Path(dgfs.__file__).resolve().parent
    for what, path in (("the Python interpreter", python), ("the dgfs package", package)):
        why = replaceable_by_others(path)
        if why is not None:
            raise ConfigError(
                f"refusing to install a helper that root runs with {what} {path}: {why};"
                " install dgfs with a root-owned Python (for example in a root-owned venv)"
            )


def run(args: argparse.Namespace) -> int:
    path: Path = args.path
    if args.uninstall:
        try:
            path.unlink()
        except FileNotFoundError:
            print(f"nothing to remove: {path} does not exist")
        else:
            print(f"removed {path}")
        return 0
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: {path.parent} is not a directory")
    if not os.access(path.parent, os.W_OK):
        fix = "run as root (sudo dgfs install-helper)" if os.geteuid() else "not writable"
        raise ConfigError(f"cannot write {path}: {fix}")
    python = Path(sys.executable)
    if os.geteuid() == 0:
        _check_safe_to_run_as_root(python)
    if not shutil.which("fusermount3"):
        print("warning: fusermount3 not found; install fuse3", file=sys.stderr)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(helper_script(str(python)))
    tmp.chmod(0o755)
    os.replace(tmp, path)
    print(f"installed {path} -> {python} -I -m dgfs.mount_helper")
    return 0
