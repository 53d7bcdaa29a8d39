"""Options every sub-command shares, and how they become ``Settings``."""

from __future__ import annotations

import argparse
from pathlib import Path

from dgfs.policy import Policy
from dgfs.runtime import Settings, parse_size


def add_s3_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("S3 connection")
    group.add_argument(
        "--endpoint-url", help="S3 endpoint (MinIO, Ceph, SeaweedFS...); also AWS_ENDPOINT_URL"
    )
    group.add_argument("--region", help="AWS region (default: from the AWS config)")
    group.add_argument("--profile", help="AWS profile from ~/.aws/credentials")


def add_cache_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cache")
    group.add_argument("--cache-dir", type=Path, help="where references are cached (0700)")
    group.add_argument("--cache-size", help="cache budget, e.g. 2G (default 2G)")
    group.add_argument(
        "--proxy-key-file",
        type=Path,
        help="deltaglider_proxy's encryption key (64 hex digits): read the objects it encrypted",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """``Settings`` from the environment, overridden by the options given."""
    overrides: dict[str, object] = {}
    if getattr(args, "endpoint_url", None):
        overrides["endpoint_url"] = args.endpoint_url
    for name in ("region", "profile", "cache_dir", "proxy_key_file"):
        if getattr(args, name, None):
            overrides[name] = getattr(args, name)
    if getattr(args, "cache_size", None):
        overrides["cache_size"] = parse_size(args.cache_size)
    if getattr(args, "max_ratio", None) is not None:
        overrides["policy"] = Policy.from_env(max_ratio=args.max_ratio)
    return Settings.from_env(**overrides)
