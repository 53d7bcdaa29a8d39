"""``mount.dgfs``: what ``mount -t dgfs`` and fstab lines call.

mount(8) runs ``mount.dgfs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS] [-t TYPE.SUBTYPE]``. The
options mount(8) itself understands (``rw``, ``_netdev``, ``nofail``,
``x-systemd.*``, ...) are dropped; the rest is handed to ``dgfs mount``,
which returns once the mount is live.
"""

from __future__ import annotations

import sys

# Options that mean something to mount(8), systemd or the kernel's generic
# mount code, not to dgfs. "ro" is kept: dgfs honours it.
IGNORED = {
    "rw",
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "exec",
    "noexec",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "diratime",
    "nodiratime",
    "async",
    "sync",
    "dirsync",
    "lazytime",
    "nolazytime",
    "silent",
    "loud",
    "bg",
    "fg",
}
IGNORED_PREFIXES = ("x-systemd.", "x-", "comment=", "helper=")


def filter_options(text: str) -> list[str]:
    """dgfs's own options out of a mount(8) option string."""
    kept = []
    for item in text.split(","):
        item = item.strip()
        if not item or item in IGNORED or item.startswith(IGNORED_PREFIXES):
            continue
        kept.append(item)
    return kept


def translate(argv: list[str]) -> list[str]:
    """mount.dgfs arguments -> ``dgfs`` arguments."""
    positional: list[str] = []
    options: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "-o":
            options.extend(filter_options(next(args, "")))
        elif arg.startswith("-o"):
            options.extend(filter_options(arg[2:]))
        elif arg in ("-t", "-N"):
            next(args, None)  # type.subtype, namespace: their value is a separate argument
        elif arg in ("-s", "-f", "-n", "-v") or arg.startswith(("-t", "-N")):
            continue  # sloppy, fake, no-mtab, verbose, type: nothing to do for dgfs
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise SystemExit("usage: mount.dgfs BUCKET[/PREFIX] MOUNTPOINT [-o options]")
    result = ["mount", positional[0], positional[1]]
    if options:
        result += ["-o", ",".join(options)]
    return result


USAGE = """usage: mount.dgfs BUCKET[/PREFIX] MOUNTPOINT [-o OPTIONS]

What mount(8) runs for `mount -t dgfs` and fstab lines of type dgfs. mount(8)'s own
options (rw, defaults, _netdev, nofail, noauto, x-systemd.*, ...) are dropped; the
rest go to `dgfs mount` (its options: dgfs mount --help), which returns once the
mount is live.

examples:
  mount -t dgfs releases /mnt/releases -o endpoint=http://127.0.0.1:8333
  # /etc/fstab
  releases  /mnt/releases  dgfs  _netdev,allow_other,endpoint=http://127.0.0.1:8333  0 0
"""


def main(argv: list[str] | None = None) -> int:
    from dgfs.cli.main import main as dgfs_main

    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print(USAGE, end="")
        return 0
    return dgfs_main(translate(args))


if __name__ == "__main__":
    sys.exit(main())
