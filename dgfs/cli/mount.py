"""``dgfs mount BUCKET[/PREFIX] MOUNTPOINT [-o opt,...] [-f]``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dgfs import readahead
from dgfs.deep.expand import ExpansionLimits
from dgfs.errors import ConfigError, FormatError
from dgfs.format import DeltaMode
from dgfs.fs.filesystem import FsOptions
from dgfs.policy import Policy
from dgfs.proxycrypt import load_proxy_key
from dgfs.runtime import S3Location, Settings, parse_size

EXAMPLES = """
examples:
  dgfs mount releases /mnt/releases -o endpoint=http://127.0.0.1:8333
  dgfs mount releases/app /mnt/app -o ro,allow_other
  dgfs mount s3://releases /mnt/releases -f -o log_level=info     # stay in the foreground

options (-o, comma separated):
  endpoint=URL     S3 endpoint (MinIO, Ceph, SeaweedFS...)      region=NAME   profile=NAME
  cache_dir=DIR    cache, journal, attribute cache (private)    cache_size=2G
  cache_key_file=F keep the encrypted cache across remounts     max_ratio=0.5 (DG_MAX_RATIO)
  proxy_key_file=F deltaglider_proxy's key (64 hex digits): read the objects it encrypted
  ro / rw          read-only or read-write (default rw)         allow_other
  uid=N gid=N      owner shown for every file                   umask=022
  file_mode=644    dir_mode=755                                 listing_ttl=10 (seconds)
  sync_upload      close() waits for the upload and reports its error
  upload_workers=4 concurrent uploads                            log_level=info
  upload_delay=0.5 seconds between the last close and the upload (fsync skips it)
  min_delta_size=64K  smaller files are stored direct           attr_timeout=1
  prefetch=4       deltas rebuilt ahead of a reader walking a directory in order (0: off)
  read_ahead_kb=1024  the kernel's read-ahead for the mount (root only; 0: kernel default)
  s3_timeout=60    seconds to wait for S3 to answer a read before retrying the request
  xdelta_level=9   xdelta3's encoding level; lower stores faster (1 for files of GiBs)
  deltas=dg|deep   new directories: DeltaGlider v6 deltas (default), or deep deltas of
                   archives' expanded content (dgfs only; docs/FORMAT.md)
  expand_ratio=100 expand_max=4G expand_members=200000 expand_time=600
                   how far deep mode expands one file (bytes per byte of the file, bytes,
                   zip entries + gzip members, seconds); beyond, it is stored unexpanded
  metrics=[IP:]PORT  serve Prometheus metrics (default address 127.0.0.1; docs/metrics.md)
"""

FLAG_OPTIONS = {"ro", "rw", "allow_other", "sync_upload", "foreground"}
VALUE_OPTIONS = {
    "endpoint",
    "region",
    "profile",
    "cache_dir",
    "cache_size",
    "cache_key_file",
    "proxy_key_file",
    "max_ratio",
    "min_delta_size",
    "uid",
    "gid",
    "umask",
    "dir_mode",
    "file_mode",
    "listing_ttl",
    "log_level",
    "upload_workers",
    "prefetch",
    "upload_delay",
    "attr_timeout",
    "deltas",
    "expand_ratio",
    "expand_max",
    "expand_members",
    "expand_time",
    "metrics",
    "s3_timeout",
    "xdelta_level",
    "read_ahead_kb",
}


def split_options(texts: list[str]) -> dict[str, str | None]:
    """``["a=1,b", "c"]`` -> ``{"a": "1", "b": None, "c": None}``."""
    options: dict[str, str | None] = {}
    for text in texts:
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, value = item.partition("=")
            options[name.strip()] = value if sep else None
    return options


def _int(name: str, value: str | None, base: int = 10) -> int:
    try:
        return int(value or "", base)
    except ValueError:
        raise ConfigError(
            f"option {name} needs a {'octal ' if base == 8 else ''}number, got {value!r}"
        ) from None


def _float(name: str, value: str | None) -> float:
    try:
        return float(value or "")
    except ValueError:
        raise ConfigError(f"option {name} needs a number, got {value!r}") from None


def _delta_mode(value: str | None) -> DeltaMode:
    try:
        return DeltaMode.parse(value or "")
    except FormatError:
        raise ConfigError(f"option deltas must be 'dg' or 'deep', not {value!r}") from None


def _expansion_limits(options: dict[str, str | None]) -> ExpansionLimits | None:
    """The ``expand_*`` options over the defaults; None if none is given."""
    limits: dict[str, object] = {}
    if "expand_ratio" in options:
        ratio = _float("expand_ratio", options["expand_ratio"])
        if not 2 <= ratio < 1e9:
            raise ConfigError(f"option expand_ratio must be 2 to 1e9, got {ratio:g}")
        limits["ratio"] = ratio
    if "expand_max" in options:
        max_bytes = parse_size(str(options["expand_max"]))
        if max_bytes < 1 << 20:
            raise ConfigError(f"option expand_max must be at least 1M, got {options['expand_max']}")
        limits["max_bytes"] = max_bytes
    if "expand_members" in options:
        members = _int("expand_members", options["expand_members"])
        if members < 1:
            raise ConfigError(f"option expand_members must be at least 1, got {members}")
        limits["members"] = members
    if "expand_time" in options:
        seconds = _float("expand_time", options["expand_time"])
        if not seconds > 0:
            raise ConfigError(f"option expand_time must be more than 0 seconds, got {seconds:g}")
        limits["seconds"] = seconds
    return ExpansionLimits(**limits) if limits else None  # type: ignore[arg-type]


def build_config(
    source: str, mountpoint: str, option_texts: list[str]
) -> tuple[object, str | None, bool]:
    """``(MountConfig, log_level, foreground)`` from the command line; ``ConfigError`` if bad."""
    from dgfs.mount import MountConfig

    options = split_options(option_texts)
    for name, value in options.items():
        if name in FLAG_OPTIONS:
            if value is not None:
                raise ConfigError(f"option {name} takes no value")
        elif name in VALUE_OPTIONS:
            if value is None or value == "":
                raise ConfigError(f"option {name} needs a value ({name}=...)")
        else:
            raise ConfigError(f"unknown option {name!r} (see dgfs mount --help)")
    settings = Settings.from_env()
    changes: dict[str, object] = {}
    if "endpoint" in options:
        changes["endpoint_url"] = options["endpoint"]
    for name in ("region", "profile"):
        if name in options:
            changes[name] = options[name]
    if "cache_dir" in options:
        changes["cache_dir"] = Path(str(options["cache_dir"])).expanduser().absolute()
    if "cache_key_file" in options:
        # absolute: a daemon works from / (chdir) when it reads the key
        changes["cache_key_file"] = Path(str(options["cache_key_file"])).expanduser().absolute()
    if "proxy_key_file" in options:
        path = Path(str(options["proxy_key_file"])).expanduser().absolute()
        load_proxy_key(path)  # a bad file stops the mount now, with one line
        changes["proxy_key_file"] = path
    if "cache_size" in options:
        changes["cache_size"] = parse_size(str(options["cache_size"]))
    policy_overrides: dict[str, object] = {}
    if "max_ratio" in options:
        policy_overrides["max_ratio"] = _float("max_ratio", options["max_ratio"])
    if "min_delta_size" in options:
        policy_overrides["min_delta_size"] = parse_size(str(options["min_delta_size"]))
    if "deltas" in options:
        changes["deltas"] = _delta_mode(options["deltas"])
    if "s3_timeout" in options:
        timeout = _float("s3_timeout", options["s3_timeout"])
        if not timeout > 0:
            raise ConfigError(f"option s3_timeout must be more than 0 seconds, got {timeout:g}")
        changes["s3_timeout"] = timeout
    if "xdelta_level" in options:
        level = _int("xdelta_level", options["xdelta_level"])
        if not 1 <= level <= 9:
            raise ConfigError(f"option xdelta_level must be 1 to 9, got {level}")
        changes["xdelta_level"] = level
    if policy_overrides:
        changes["policy"] = Policy.from_env(**policy_overrides)
    expansion = _expansion_limits(options)
    if expansion is not None:
        changes["expansion"] = expansion
    settings = dataclasses.replace(settings, **changes)  # type: ignore[arg-type]

    fs_changes: dict[str, object] = {}
    if "ro" in options:
        fs_changes["read_only"] = True
    if "uid" in options:
        fs_changes["uid"] = _int("uid", options["uid"])
        fs_changes["force_owner"] = True
    if "gid" in options:
        fs_changes["gid"] = _int("gid", options["gid"])
        fs_changes["force_owner"] = True
    if "umask" in options:
        fs_changes["umask"] = _int("umask", options["umask"], 8) & 0o777
    if "file_mode" in options:
        fs_changes["file_mode"] = _int("file_mode", options["file_mode"], 8) & 0o7777
    if "dir_mode" in options:
        fs_changes["dir_mode"] = _int("dir_mode", options["dir_mode"], 8) & 0o7777
    if "listing_ttl" in options:
        fs_changes["listing_ttl"] = max(0.0, _float("listing_ttl", options["listing_ttl"]))
    if "prefetch" in options:
        fs_changes["prefetch"] = max(0, _int("prefetch", options["prefetch"]))
    if "upload_workers" in options:
        fs_changes["upload_workers"] = max(1, _int("upload_workers", options["upload_workers"]))
    if "upload_delay" in options:
        fs_changes["upload_delay"] = max(0.0, _float("upload_delay", options["upload_delay"]))
    if "sync_upload" in options:
        fs_changes["sync_upload"] = True
    fs_options = FsOptions(**fs_changes)  # type: ignore[arg-type]
    attr_timeout = (
        _float("attr_timeout", options["attr_timeout"]) if "attr_timeout" in options else 1.0
    )
    read_ahead_kb = readahead.DEFAULT_KIB
    if "read_ahead_kb" in options:
        read_ahead_kb = _int("read_ahead_kb", options["read_ahead_kb"])
        if not 0 <= read_ahead_kb <= 1 << 20:
            raise ConfigError(f"option read_ahead_kb must be 0 to 1048576, got {read_ahead_kb}")
    metrics = None
    if "metrics" in options:
        from dgfs.metrics import parse_listen_address

        metrics = parse_listen_address(str(options["metrics"]))
    config = MountConfig(
        location=S3Location.parse(source),
        mountpoint=Path(mountpoint).absolute(),
        settings=settings,
        fs_options=fs_options,
        allow_other="allow_other" in options,
        attr_timeout=attr_timeout,
        metrics=metrics,
        read_ahead_kb=read_ahead_kb,
    )
    return config, options.get("log_level"), "foreground" in options


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "mount",
        help="mount a bucket (or a prefix of it) as a directory",
        description="Mount BUCKET[/PREFIX] on MOUNTPOINT. Without -f the command returns "
        "once the mount is live (or fails with the reason).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    parser.set_defaults(func=run)


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
