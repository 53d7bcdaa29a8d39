"""The boto3 client of an ``S3Store``: how it is configured, what it checks on
every answer, and the fields of its answers dgfs reads.

The only module that creates a boto3 client or session.
"""

from __future__ import annotations

import email.utils
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import boto3
import botocore.exceptions as bexc
from botocore.config import Config

from dgfs import __version__, environment
from dgfs.errors import ConfigError
from dgfs.store.base import DEFAULT_CONTENT_TYPE, ObjectHead, decode_metadata
from dgfs.telemetry import Telemetry

# Seconds a request may wait for the connection and then for each read from
# it. The read timeout is also how long a stalled endpoint holds a request
# before it is retried (mount option s3_timeout).
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0


def make_client(
    endpoint_url: str | None,
    region: str | None,
    profile: str | None,
    max_pool: int,
    read_timeout: float = READ_TIMEOUT,
) -> Any:
    """One boto3 S3 client, safe to share between threads.

    Credentials come from AWS's own chain (environment, ``profile`` or the
    default profile, instance role) and are resolved lazily, on the first
    request. Checksums are sent and validated only when an operation
    requires them: several S3-compatible stores reject boto3's default
    CRC headers. A custom ``endpoint_url`` gets path-style addressing.
    ``read_timeout`` bounds each wait for data from the endpoint (and the
    connect timeout, which is at most ``CONNECT_TIMEOUT``).
    """
    session = boto3.session.Session(profile_name=profile)
    config = Config(
        region_name=region,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=max_pool,
        retries={"mode": "standard", "total_max_attempts": 3},
        connect_timeout=min(CONNECT_TIMEOUT, read_timeout),
        read_timeout=read_timeout,
        tcp_keepalive=True,
        user_agent_extra=f"dgfs/{__version__}",
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    try:
        return session.client("s3", endpoint_url=endpoint_url, config=config)
    except ValueError as exc:  # botocore: "Invalid endpoint: ..."
        raise ConfigError(
            f"bad endpoint URL {endpoint_url!r}: expected http(s)://HOST[:PORT] ({exc})"
        ) from None


def instrument(client: Any, telemetry: Telemetry) -> None:
    """Count ``client``'s calls and HTTP requests (botocore's retries among
    them) in ``telemetry``, and refuse answers whose headers were cut off."""
    events = client.meta.events
    events.register("before-call.s3", lambda **_: telemetry.s3_api_call())
    events.register("before-send.s3", lambda **_: telemetry.s3_http_request())
    events.register("needs-retry.s3", _refuse_cut_head)


def credential_source(profile: str | None) -> str | None:
    """Which provider in AWS's chain supplies the credentials, by botocore's
    name for it (``env``, ``shared-credentials-file``, ``iam-role``,
    ``assume-role``...), or None when none does. The credentials themselves
    never leave this function. ``ConfigError`` for a profile that does not exist.
    """
    try:
        credentials = boto3.session.Session(profile_name=profile).get_credentials()
    except bexc.BotoCoreError as exc:  # ProfileNotFound, a broken config file...
        raise ConfigError(f"cannot read the AWS configuration: {exc}") from None
    return None if credentials is None else str(credentials.method)


def ca_bundle() -> str | None:
    """The CA certificates boto3 verifies TLS endpoints with (``AWS_CA_BUNDLE``, else
    botocore's default: certifi's bundle when installed)."""
    from botocore.httpsession import get_cert_path

    return environment.ca_bundle() or get_cert_path(True)


class _CutHeadFilter(logging.Filter):
    """urllib3's "Failed to parse headers" warning (with a traceback) at DEBUG:
    ``_refuse_cut_head`` turns such an answer into a retried request, which
    logs its own one-line warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Failed to parse headers"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = None
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("urllib3.connection").addFilter(_CutHeadFilter())


def _refuse_cut_head(response: Any = None, endpoint: Any = None, **_: Any) -> None:
    """botocore hook, run on every answer: refuse one whose header block was cut off.

    http.client takes whatever header lines arrived before the connection
    closed, and urllib3 only logs the damage, so a cut answer would parse
    as a success without its ETag, metadata or length (a HEAD with no
    ``dg-file-sha256``, a GET with an empty body). Every S3 answer frames
    its body (Content-Length or chunked; 204 has none), so one that does not, or whose
    headers did not parse, is a broken connection: ``ConnectionClosedError``,
    which the store's retries take (``calls.call_retrying``).
    """
    if response is None:
        return
    http_response = response[0]
    original = getattr(getattr(http_response, "raw", None), "_original_response", None)
    defects = getattr(getattr(original, "msg", None), "defects", None)
    headers = getattr(http_response, "headers", {})
    status = getattr(http_response, "status_code", 0)
    bodiless = status in (204, 304) or 100 <= status < 200
    framed = bodiless or "content-length" in headers or "transfer-encoding" in headers
    if defects or not framed:
        raw = getattr(http_response, "raw", None)
        if raw is not None:
            raw.close()  # the connection is broken: it must not go back to the pool
        url = getattr(endpoint, "host", None) or "the S3 endpoint"
        raise bexc.ConnectionClosedError(endpoint_url=url)


def etag(raw: str) -> str:
    """An ETag as dgfs passes it on: without S3's quotes."""
    return raw.strip('"')


def utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def response_date(response: Mapping[str, Any]) -> datetime | None:
    """The ``Date`` header of a boto3 answer (the server's clock), None if absent or garbled."""
    headers = (response.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}
    try:
        return utc(email.utils.parsedate_to_datetime(headers["date"]))
    except (KeyError, TypeError, ValueError):
        return None


def head_from_response(key: str, response: Mapping[str, Any], size: int) -> ObjectHead:
    """The ``ObjectHead`` in a HeadObject or GetObject answer."""
    return ObjectHead(
        key=key,
        size=size,
        etag=etag(response["ETag"]),
        last_modified=utc(response["LastModified"]),
        metadata=decode_metadata(response.get("Metadata") or {}),
        content_type=response.get("ContentType") or DEFAULT_CONTENT_TYPE,
        observed_at=response_date(response),
    )
