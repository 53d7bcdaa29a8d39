"""Every mount option, in one table, and the one translator of options to settings.

``OPTIONS`` is the only list of what a user can set with ``-o`` (``dgfs
mount``, ``dgfs doctor``, ``mount -t dgfs`` and fstab lines through
``mount.dgfs``). From it come:

- ``-o`` parsing: ``parse_mount_options`` (``dgfs.cli.mount.build_config``);
- the other commands' flags (``--endpoint-url``, ``--cache-dir``...):
  ``add_flags`` and ``settings_from_args``, through the same parsers;
- the option list of ``dgfs mount --help``: ``help_text``;
- docs/configuration.md's option table, checked against this one (names,
  value names, defaults) by tests/test_options.py, which also checks that
  ``mount.dgfs`` passes every option through.

Each option names where its value goes (``target``: ``settings.X``,
``policy.X``, ``expansion.X``, ``fs.X``, ``mount.X`` or ``command.X``)
and how its text is parsed; a bad value raises ``ConfigError`` naming the
option as the user spelled it.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from dgfs.deep import ExpansionLimits
from dgfs.errors import ConfigError, FormatError
from dgfs.format import DeltaMode
from dgfs.policy import Policy
from dgfs.proxycrypt import load_proxy_key
from dgfs.runtime import Settings, parse_size

#: ``(name as the user wrote it, text) -> value``; raises ``ConfigError``.
Parser = Callable[[str, str], object]


def _text(name: str, text: str) -> object:
    return text


def _path(name: str, text: str) -> object:
    # absolute: a daemon works from / (chdir) when it opens the file
    return Path(text).expanduser().absolute()


def _proxy_key_path(name: str, text: str) -> object:
    path = Path(text).expanduser().absolute()
    load_proxy_key(path)  # a bad file stops the command now, with one line
    return path


def _size(name: str, text: str) -> object:
    return parse_size(text)


def _delta_mode(name: str, text: str) -> object:
    try:
        return DeltaMode.parse(text)
    except FormatError:
        raise ConfigError(f"option {name} must be 'dg' or 'deep', not {text!r}") from None


def _listen_address(name: str, text: str) -> object:
    from dgfs.metrics import parse_listen_address

    return parse_listen_address(text)


def _number(kind: type[int] | type[float], base: int = 10) -> Callable[[str, str], int | float]:
    def parse(name: str, text: str) -> int | float:
        try:
            return int(text, base) if kind is int else float(text)
        except ValueError:
            octal = "octal " if base == 8 else ""
            raise ConfigError(f"option {name} needs a {octal}number, got {text!r}") from None

    return parse


def _within(
    parse: Callable[[str, str], int | float], ok: Callable[[float], bool], must: str
) -> Parser:
    """``parse``, then ``ConfigError`` "option NAME must be MUST, got VALUE" unless ``ok``."""

    def checked(name: str, text: str) -> object:
        value = parse(name, text)
        if not ok(value):
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            raise ConfigError(f"option {name} must be {must}, got {shown}")
        return value

    return checked


def _clamped(
    parse: Callable[[str, str], int | float], clamp: Callable[[int | float], object]
) -> Parser:
    return lambda name, text: clamp(parse(name, text))


_INT, _FLOAT, _OCTAL = _number(int), _number(float), _number(int, 8)


def _at_least_1m(name: str, text: str) -> object:
    size = parse_size(text)
    if size < 1 << 20:
        raise ConfigError(f"option {name} must be at least 1M, got {text}")
    return size


#: The groups of the other commands' flags (``add_flags``).
S3_GROUP = "S3 connection"
CACHE_GROUP = "cache"
PROXY_GROUP = "deltaglider_proxy"


@dataclass(frozen=True)
class MountOption:
    """One ``-o`` option: how it is written, parsed, documented, and where it goes."""

    name: str
    metavar: str | None  # None: a flag, which takes no value
    default: str  # as docs/configuration.md says it (without its markup)
    help: str  # one line for ``dgfs mount --help``
    target: str | None  # "settings.endpoint_url"...; None: accepted, changes nothing
    parse: Parser = _text
    also: Mapping[str, object] = field(default_factory=dict)  # set with it
    flag: str | None = None  # the same setting as other commands' flag (``--endpoint-url``)
    flag_group: str | None = None  # that flag's group in their --help


OPTIONS: tuple[MountOption, ...] = (
    MountOption("endpoint", "URL", "AWS_ENDPOINT_URL, else AWS",
                "S3 endpoint (MinIO, Ceph, SeaweedFS...)", "settings.endpoint_url",
                flag="--endpoint-url", flag_group=S3_GROUP),
    MountOption("region", "NAME", "the AWS configuration", "region of the bucket",
                "settings.region", flag="--region", flag_group=S3_GROUP),
    MountOption("profile", "NAME", "AWS_PROFILE, else default",
                "AWS profile from ~/.aws/credentials", "settings.profile", flag="--profile",
                flag_group=S3_GROUP),
    MountOption("deltas", "dg|deep", "dg",
                "new directories: DeltaGlider v6 deltas, or deep deltas of archives' expanded"
                " content (dgfs only; docs/FORMAT.md)", "settings.deltas", _delta_mode),
    MountOption("expand_ratio", "N", "100",
                "deep mode expands a file to at most N bytes per byte of it", "expansion.ratio",
                _within(_FLOAT, lambda v: 2 <= v < 1e9, "2 to 1e9")),
    MountOption("expand_max", "SIZE", "4G", "deep mode expands a file to at most SIZE bytes",
                "expansion.max_bytes", _at_least_1m),
    MountOption("expand_members", "N", "200000",
                "deep mode walks at most N zip entries + gzip members of a file",
                "expansion.members", _within(_INT, lambda v: v >= 1, "at least 1")),
    MountOption("expand_time", "SECONDS", "600",
                "deep mode expands (or rebuilds) a file, and a stock DeltaGlider .tar.gz"
                " is recovered, for at most this long; beyond any expand_ limit a file"
                " is stored unexpanded", "expansion.seconds",
                _within(_FLOAT, lambda v: v > 0, "more than 0 seconds")),
    MountOption("max_ratio", "R", "DG_MAX_RATIO, else 0.5",
                "keep a delta only up to R x the file's size", "policy.max_ratio", _FLOAT,
                flag="--max-ratio"),
    MountOption("min_delta_size", "SIZE", "64K", "smaller files are stored direct",
                "policy.min_delta_size", _size),
    MountOption("cache_dir", "DIR",
                "$XDG_CACHE_HOME/dgfs, else /var/cache/dgfs (root) or ~/.cache/dgfs",
                "cache, journal, attribute cache (private, 0700)", "settings.cache_dir", _path,
                flag="--cache-dir", flag_group=CACHE_GROUP),
    MountOption("cache_size", "SIZE", "2G", "cache budget", "settings.cache_size", _size,
                flag="--cache-size", flag_group=CACHE_GROUP),
    MountOption("cache_key_file", "FILE", "none: a new key per mount",
                "keep the encrypted cache across remounts", "settings.cache_key_file", _path),
    MountOption("proxy_key_file", "FILE", "none",
                "deltaglider_proxy's encryption key (64 hex digits): read the objects it encrypted",
                "settings.proxy_key_file", _proxy_key_path, flag="--proxy-key-file",
                flag_group=PROXY_GROUP),
    MountOption("upload_workers", "N", "4", "concurrent uploads", "fs.upload_workers",
                _clamped(_INT, lambda v: max(1, int(v)))),
    MountOption("upload_delay", "SECONDS", "0.5",
                "from the last close to the upload (fsync skips it)", "fs.upload_delay",
                _clamped(_FLOAT, lambda v: max(0.0, v))),
    MountOption("sync_upload", None, "off", "close() waits for the upload and reports its error",
                "fs.sync_upload"),
    MountOption("listing_ttl", "SECONDS", "10", "how long a directory listing is trusted",
                "fs.listing_ttl", _clamped(_FLOAT, lambda v: max(0.0, v))),
    MountOption("attr_timeout", "SECONDS", "1", "how long the kernel trusts attributes",
                "mount.attr_timeout", _FLOAT),
    MountOption("prefetch", "N", "4",
                "deltas rebuilt ahead of a reader walking a directory in order (0: off)",
                "fs.prefetch", _clamped(_INT, lambda v: max(0, int(v)))),
    MountOption("read_ahead_kb", "N", "1024",
                "the kernel's read-ahead for the mount (root only; 0: kernel default)",
                "mount.read_ahead_kb", _within(_INT, lambda v: 0 <= v <= 1 << 20, "0 to 1048576")),
    MountOption("xdelta_level", "N", "9",
                "xdelta3's encoding level; lower stores faster (1 for files of GiBs)",
                "settings.xdelta_level", _within(_INT, lambda v: 1 <= v <= 9, "1 to 9")),
    MountOption("s3_timeout", "SECONDS", "60",
                "how long to wait for S3 to answer a read before retrying the request",
                "settings.s3_timeout", _within(_FLOAT, lambda v: v > 0, "more than 0 seconds")),
    MountOption("ro", None, "rw", "read-only mount", "fs.read_only"),
    MountOption("rw", None, "rw", "read-write mount (the default)", None),
    MountOption("allow_other", None, "off", "let other users use the mount", "mount.allow_other"),
    MountOption("uid", "N", "the mounting user", "owner shown for every file", "fs.uid", _INT,
                also={"fs.force_owner": True}),
    MountOption("gid", "N", "the mounting user", "group shown for every file", "fs.gid", _INT,
                also={"fs.force_owner": True}),
    MountOption("umask", "OCTAL", "022",
                "permission bits of files and directories without stored modes", "fs.umask",
                _clamped(_OCTAL, lambda v: int(v) & 0o777)),
    MountOption("file_mode", "OCTAL", "stored or from umask",
                "force these permission bits on files", "fs.file_mode",
                _clamped(_OCTAL, lambda v: int(v) & 0o7777)),
    MountOption("dir_mode", "OCTAL", "stored or from umask",
                "force these permission bits on directories", "fs.dir_mode",
                _clamped(_OCTAL, lambda v: int(v) & 0o7777)),
    MountOption("metrics", "[IP:]PORT", "off",
                "serve Prometheus metrics (default address 127.0.0.1; docs/metrics.md)",
                "mount.metrics", _listen_address),
    MountOption("log_level", "LEVEL", "DG_LOG_LEVEL, else warning", "debug, info, warning, error",
                "command.log_level"),
    MountOption("foreground", None, "off", "same as -f: stay in the foreground",
                "command.foreground"),
)  # fmt: skip
BY_NAME: dict[str, MountOption] = {option.name: option for option in OPTIONS}


@dataclass
class Chosen:
    """The options given, sorted by what they configure (``MountOption.target``)."""

    settings: dict[str, object] = field(default_factory=dict)
    policy: dict[str, object] = field(default_factory=dict)
    expansion: dict[str, object] = field(default_factory=dict)
    fs: dict[str, object] = field(default_factory=dict)
    mount: dict[str, object] = field(default_factory=dict)
    command: dict[str, object] = field(default_factory=dict)

    def set(self, target: str, value: object) -> None:
        part, _, name = target.partition(".")
        getattr(self, part)[name] = value

    def settings_over(self, base: Settings) -> Settings:
        """``base`` with the options given applied."""
        changes = dict(self.settings)
        if self.policy:
            changes["policy"] = Policy.from_env(**self.policy)
        if self.expansion:
            changes["expansion"] = ExpansionLimits(**self.expansion)  # type: ignore[arg-type]
        return replace(base, **changes)  # type: ignore[arg-type]


def split_options(texts: Iterable[str]) -> dict[str, str | None]:
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


def _check_given(options: Mapping[str, str | None]) -> None:
    """Every name known, flags without values, the others with one."""
    for name, value in options.items():
        option = BY_NAME.get(name)
        if option is None:
            raise ConfigError(f"unknown option {name!r} (see dgfs mount --help)")
        if option.metavar is None and value is not None:
            raise ConfigError(f"option {name} takes no value")
        if option.metavar is not None and not value:
            raise ConfigError(f"option {name} needs a value ({name}=...)")


def choose(given: Mapping[str, str | None], spelled: Mapping[str, str] | None = None) -> Chosen:
    """Parse ``given`` (option name -> text; None for a flag), in table order.

    ``spelled`` names an option as the user wrote it (a flag such as
    ``--max-ratio``), for the error messages; the option's name otherwise.
    """
    chosen = Chosen()
    for option in OPTIONS:
        if option.name not in given:
            continue
        text = given[option.name]
        label = (spelled or {}).get(option.name, option.name)
        value = True if text is None else option.parse(label, text)
        if option.target is not None:
            chosen.set(option.target, value)
        for target, extra in option.also.items():
            chosen.set(target, extra)
    return chosen


def parse_mount_options(texts: Iterable[str]) -> Chosen:
    """``-o`` texts (``["a=1,b", "c"]``) -> what they configure; ``ConfigError`` if bad."""
    options = split_options(texts)
    _check_given(options)
    return choose(options)


# --- the other commands' flags --------------------------------------------------


def _flag_dest(option: MountOption) -> str:
    assert option.flag is not None
    return option.flag.removeprefix("--").replace("-", "_")


def add_flags(parser: argparse.ArgumentParser, group: str) -> None:
    """The flags of ``group`` (``S3_GROUP``, ``CACHE_GROUP``, ``PROXY_GROUP``), from the table."""
    arguments = parser.add_argument_group(group)
    for option in OPTIONS:
        if option.flag is not None and option.flag_group == group:
            arguments.add_argument(option.flag, metavar=option.metavar, help=_flag_help(option))


def add_flag(parser: argparse.ArgumentParser, name: str) -> None:
    """One option's flag, outside the groups (``--max-ratio``)."""
    option = BY_NAME[name]
    assert option.flag is not None
    parser.add_argument(option.flag, metavar=option.metavar, help=_flag_help(option))


def _flag_help(option: MountOption) -> str:
    # %: argparse formats help texts
    return f"{option.help} (default: {option.default})".replace("%", "%%")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """``Settings`` from the environment, overridden by the flags given (``add_flags``)."""
    given: dict[str, str | None] = {}
    spelled: dict[str, str] = {}
    for option in OPTIONS:
        if option.flag is None:
            continue
        text = getattr(args, _flag_dest(option), None)
        if text:
            given[option.name] = text
            spelled[option.name] = option.flag
    return choose(given, spelled).settings_over(Settings.from_env())


# --- --help -----------------------------------------------------------------------


def help_text(width: int = 88) -> str:
    """The option list of ``dgfs mount --help``."""
    lines = ["options (-o, comma separated; docs/configuration.md):"]
    for option in OPTIONS:
        spec = option.name if option.metavar is None else f"{option.name}={option.metavar}"
        about = f"{option.help} [default: {option.default}]"
        lines += textwrap.wrap(
            about,
            width,
            initial_indent=f"  {spec:<20} ",
            subsequent_indent=" " * 23,
            break_on_hyphens=False,
        )
    return "\n".join(lines) + "\n"
