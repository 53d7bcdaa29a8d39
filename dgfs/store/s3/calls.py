"""Calling S3: botocore's exceptions translated into ``dgfs.errors`` (the only
such mapping), and transient failures retried with backoff on top of
botocore's own retries.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import botocore.exceptions as bexc
import trio

from dgfs.errors import (
    AccessDenied,
    CredentialsUnavailable,
    DgfsError,
    EndpointUnreachable,
    NoSuchBucket,
    NotFound,
    PreconditionFailed,
    StoreError,
    TransientError,
)
from dgfs.telemetry import Telemetry

log = logging.getLogger(__name__)

T = TypeVar("T")

# Our retries after botocore's own; the delays are scaled by a random jitter.
RETRY_DELAYS: tuple[float, ...] = (0.5, 2.0, 5.0)

_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404", "NoSuchUpload"}
_ACCESS_CODES = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "InvalidToken",
    "AccountProblem",
}
# Temporary credentials that ran out while their provider could not renew
# them (the instance metadata service down through botocore's refresh
# window): the same outage as a failed fetch, one step later.
_EXPIRED_CODES = {"ExpiredToken", "TokenRefreshRequired"}
# ConditionalRequestConflict (409): a conditional request raced another write.
_PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "BandwidthLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
}
_CONNECT_ERRORS = (
    bexc.EndpointConnectionError,
    bexc.ConnectTimeoutError,
    bexc.ProxyConnectionError,
    bexc.SSLError,
)
_NETWORK_ERRORS = (
    bexc.ReadTimeoutError,
    bexc.ConnectionClosedError,
    bexc.ResponseStreamingError,
    bexc.IncompleteReadError,
    bexc.HTTPClientError,
    bexc.ConnectionError,
)
_CREDENTIAL_ERRORS = (
    bexc.NoCredentialsError,
    bexc.PartialCredentialsError,
    bexc.CredentialRetrievalError,
)


class Call(Protocol):
    """A store's one way to call S3 (``S3Store._call``): run ``fn`` (a blocking
    boto3 call) in a worker thread as request ``operation`` on ``key``,
    errors translated and transient ones retried."""

    def __call__(self, operation: str, key: str | None, fn: Callable[[], T]) -> Awaitable[T]: ...


def translate_error(
    exc: BaseException,
    *,
    bucket: str,
    key: str | None,
    endpoint: str,
    operation: str,
) -> DgfsError:
    """The dgfs error for a botocore exception (the only such mapping).

    ``key`` None means a bucket-level request, where a bare 404 means the
    bucket is missing. ``TransientError`` results (other than
    ``EndpointUnreachable``) are the ones worth retrying.
    """
    where = f"s3://{bucket}/{key}" if key is not None else f"s3://{bucket}"
    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = error.get("Message") or ""
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        detail = f"{code}: {message}" if message else code
        if code == "NoSuchBucket" or (key is None and status == 404):
            return NoSuchBucket(f"bucket {bucket!r} does not exist at {endpoint}")
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFound(f"{where} not found")
        if code in _EXPIRED_CODES:
            return CredentialsUnavailable(
                f"{operation} {where}: the credentials expired and were not renewed ({detail})"
            )
        if code in _ACCESS_CODES or status == 403:
            return AccessDenied(
                f"access denied to {where} at {endpoint} ({detail}); "
                "check the AWS credentials (environment, profile or instance role)"
            )
        if code in _PRECONDITION_CODES or status == 412:
            return PreconditionFailed(f"{operation} {where}: precondition failed ({detail})")
        if code == "NotImplemented" or status == 501:
            # Not a failure to retry: this store does not do that request (or a header of it).
            return StoreError(f"{operation} {where}: not supported by the store ({detail})")
        if code in _TRANSIENT_CODES or status == 429 or status >= 500:
            return TransientError(f"{operation} {where} failed: {detail} (HTTP {status})")
        return StoreError(f"{operation} {where} failed: {detail} (HTTP {status})")
    if isinstance(exc, _CONNECT_ERRORS):
        return EndpointUnreachable(f"cannot reach S3 endpoint {endpoint}: {exc}")
    if isinstance(exc, _NETWORK_ERRORS):
        return TransientError(f"{operation} {where} failed: {exc}")
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return CredentialsUnavailable(
            f"no usable AWS credentials for {endpoint} ({exc}); set AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, choose a profile, or run with an instance role"
        )
    return StoreError(f"{operation} {where} failed: {exc}")


def _retryable(err: DgfsError) -> bool:
    return isinstance(err, TransientError) and not isinstance(err, EndpointUnreachable)


async def call_retrying(
    operation: str,
    key: str | None,
    fn: Callable[[], T],
    *,
    bucket: str,
    endpoint: str,
    limiter: trio.CapacityLimiter,
    telemetry: Telemetry,
    retry_delays: tuple[float, ...],
) -> T:
    """Run ``fn`` in a worker thread under ``limiter``; a botocore failure
    leaves as its ``translate_error``, after ``len(retry_delays)`` retries
    when it is transient. Every attempt and failure is counted in ``telemetry``."""
    attempts = len(retry_delays) + 1
    for attempt in range(attempts):
        telemetry.s3_request(operation)
        try:
            return await trio.to_thread.run_sync(fn, limiter=limiter)
        except (bexc.BotoCoreError, bexc.ClientError) as exc:
            err = translate_error(
                exc, bucket=bucket, key=key, endpoint=endpoint, operation=operation
            )
            retry = _retryable(err) and attempt < attempts - 1
            telemetry.s3_error(operation, type(err).__name__, retried=retry)
            if not retry:
                raise err from exc
        delay = retry_delays[attempt] * random.uniform(0.5, 1.5)
        log.warning(
            "%s; retry %d/%d in %.1fs",
            err,
            attempt + 1,
            attempts - 1,
            delay,
        )
        await trio.sleep(delay)
    raise AssertionError("unreachable")
