"""Every environment variable dgfs reads, and the only module that reads them.

Each function names one setting and the variable(s) it comes from; the
rest of dgfs calls these instead of looking at ``os.environ``. Each takes
the environment as a mapping (the process's when none is given) so tests
pass their own. ``VARIABLES`` lists them all for the docs
(docs/configuration.md, checked by tests/test_environment.py).

boto3 reads the AWS credential chain (``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE``…) itself; dgfs never looks at those values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: name -> what it sets, for the docs.
VARIABLES: dict[str, str] = {
    "AWS_ENDPOINT_URL": "the S3 endpoint, when no endpoint= option is given",
    "AWS_REGION": "the region a bucket is addressed in (then AWS_DEFAULT_REGION)",
    "AWS_DEFAULT_REGION": "the region, when AWS_REGION is not set",
    "AWS_CA_BUNDLE": "the CA certificates TLS endpoints are verified with",
    "AWS_EC2_METADATA_DISABLED": "true: never ask the EC2 instance metadata service",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT": "another EC2 instance metadata endpoint",
    "DG_DISABLE_EC2_DETECTION": "1/true/yes: never ask the EC2 instance metadata service",
    "DG_MAX_RATIO": "the largest delta/file size ratio stored as a delta (0 to 1)",
    "DG_CACHE_ENCRYPTION_KEY": "the cache key (32 bytes, base64); wins over cache_key_file",
    "DG_LOG_LEVEL": "the log level when no --log-level/log_level= is given",
    "DGFS_ZGZ": "the zgz program (pristine-tar's); empty: none",
    "XDG_CACHE_HOME": "where the default cache directory goes (non-root users)",
    "PATH": "where child programs are found (resolved once, at start)",
    "NOTIFY_SOCKET": "systemd's notification socket (set by systemd)",
    "LISTEN_PID": "systemd's descriptor passing: the process meant (set by systemd)",
    "LISTEN_FDS": "systemd's descriptor passing: how many (set by systemd)",
    "LISTEN_FDNAMES": "systemd's descriptor passing: their names (set by systemd)",
}


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _get(name: str, environ: Mapping[str, str] | None) -> str:
    assert name in VARIABLES, f"{name} is not listed in VARIABLES"
    return _env(environ).get(name, "")


def endpoint_url(environ: Mapping[str, str] | None = None) -> str | None:
    return _get("AWS_ENDPOINT_URL", environ) or None


def region(environ: Mapping[str, str] | None = None) -> str | None:
    return _get("AWS_REGION", environ) or _get("AWS_DEFAULT_REGION", environ) or None


def ca_bundle(environ: Mapping[str, str] | None = None) -> str | None:
    return _get("AWS_CA_BUNDLE", environ) or None


def ec2_detection_disabled(environ: Mapping[str, str] | None = None) -> bool:
    return (
        _get("DG_DISABLE_EC2_DETECTION", environ).strip().lower() in ("1", "true", "yes")
        or _get("AWS_EC2_METADATA_DISABLED", environ).strip().lower() == "true"
    )


def ec2_metadata_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    return _get("AWS_EC2_METADATA_SERVICE_ENDPOINT", environ) or None


def max_ratio_text(environ: Mapping[str, str] | None = None) -> str:
    """``DG_MAX_RATIO`` as given (stripped; empty when unset)."""
    return _get("DG_MAX_RATIO", environ).strip()


def cache_key_text(environ: Mapping[str, str] | None = None) -> str:
    """``DG_CACHE_ENCRYPTION_KEY`` as given (empty when unset)."""
    return _get("DG_CACHE_ENCRYPTION_KEY", environ)


def log_level(environ: Mapping[str, str] | None = None) -> str | None:
    return _get("DG_LOG_LEVEL", environ) or None


def zgz(environ: Mapping[str, str] | None = None) -> str:
    """The zgz program to use: ``DGFS_ZGZ`` when set (empty: none), else ``zgz``."""
    return _env(environ).get("DGFS_ZGZ", "zgz")


def cache_home(environ: Mapping[str, str] | None = None) -> str | None:
    return _get("XDG_CACHE_HOME", environ) or None


def search_path(environ: Mapping[str, str] | None = None) -> str | None:
    return _get("PATH", environ) or None


def notify_socket(environ: Mapping[str, str] | None = None) -> str:
    return _get("NOTIFY_SOCKET", environ)


def listen_fds(environ: Mapping[str, str] | None = None) -> tuple[str, str, str]:
    """``(LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES)`` as given (empty when unset)."""
    return (
        _get("LISTEN_PID", environ),
        _get("LISTEN_FDS", environ),
        _get("LISTEN_FDNAMES", environ),
    )
