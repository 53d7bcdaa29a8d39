"""The ``dgfs`` command: one sub-command per module in ``dgfs.cli``.

Each sub-command module provides ``HELP``, ``DESCRIPTION`` and (if it has
examples) ``EPILOG``, ``add_arguments(parser)``, and ``run(args)``, which
returns the exit code; ``build_parser`` makes every sub-command's parser
from them the same way. A ``UserError`` ends the program with a one-line
message (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dgfs import __version__, environment
from dgfs.errors import DgfsError, UserError
from dgfs.printable import PrintableFormatter, printable

SUBCOMMANDS = (
    "mount",
    "sync",
    "status",
    "stats",
    "verify",
    "migrate",
    "gc",
    "install_helper",
    "doctor",
)

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran but something failed (see its report)
EXIT_USAGE = 2  # user error: bad arguments, missing bucket, refused credentials
EXIT_INTERRUPTED = 130


def setup_logging(level: str | None) -> None:
    name = (level or environment.log_level() or "WARNING").upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise UserError(f"bad log level {name!r}: use debug, info, warning or error")
    handler = logging.StreamHandler()
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(handlers=[handler])  # nothing if logging is set up already
    logging.getLogger().setLevel(getattr(logging, name))
    # boto's own chatter is noise at INFO.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


class _Formatter(argparse.HelpFormatter):
    """A description is wrapped to the terminal; an epilog of examples (any
    text with line breaks) is shown as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dgfs",
        description="Mount an S3 bucket as a directory, storing similar files as xdelta3 deltas "
        "(DeltaGlider v6 format), and inspect, verify and migrate such buckets.",
    )
    parser.add_argument("--version", action="version", version=f"dgfs {__version__}")
    parser.add_argument(
        "--log-level", help="debug, info, warning (default) or error; also DG_LOG_LEVEL"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"dgfs.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"dgfs.cli.{name}":
                raise
            continue
        command = subparsers.add_parser(
            name.replace("_", "-"),
            help=module.HELP,
            description=module.DESCRIPTION,
            epilog=getattr(module, "EPILOG", None),
            formatter_class=_Formatter,
        )
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging(args.log_level)
        code = args.func(args)
    except KeyboardInterrupt:
        print("dgfs: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UserError as exc:
        print(f"dgfs {args.command}: {printable(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except DgfsError as exc:
        print(f"dgfs {args.command}: {printable(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
