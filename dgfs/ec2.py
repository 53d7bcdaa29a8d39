"""Is this an EC2 instance, and in which region? (IMDSv2, short timeouts.)

Used to warn before a migration that would move data across regions (paid
transfer, slower), as the DeltaGlider CLI does. Detection is off when
``DG_DISABLE_EC2_DETECTION`` is ``true``/``1``/``yes`` (DeltaGlider's switch)
or when ``AWS_EC2_METADATA_DISABLED=true`` (botocore's). The metadata
address can be moved with botocore's ``AWS_EC2_METADATA_SERVICE_ENDPOINT``
(tests point it at a local server).

The functions here block (HTTP); call them from a worker thread.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from dgfs import environment

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
REGION_PATH = "/latest/meta-data/placement/region"
ZONE_PATH = "/latest/meta-data/placement/availability-zone"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL_SECONDS = 60  # we ask two questions, then forget the token
TIMEOUT_SECONDS = 1.0  # off EC2 the address does not answer: give up fast


@dataclass(frozen=True)
class InstanceInfo:
    """Where the instance runs; either field may be unknown."""

    region: str | None
    availability_zone: str | None


def detection_disabled(environ: Mapping[str, str] | None = None) -> bool:
    return environment.ec2_detection_disabled(environ)


def metadata_endpoint(environ: Mapping[str, str] | None = None) -> str:
    return (environment.ec2_metadata_endpoint(environ) or DEFAULT_ENDPOINT).rstrip("/")


def instance_info(
    environ: Mapping[str, str] | None = None, *, timeout: float = TIMEOUT_SECONDS
) -> InstanceInfo | None:
    """The instance's region and zone, or None when not on EC2 (or detection is off).

    Only IMDSv2 (token first) is spoken; an IMDSv1-only endpoint counts as
    "not EC2". Never raises for network trouble.
    """
    if detection_disabled(environ):
        return None
    base = metadata_endpoint(environ)
    # Link-local metadata must never go through an HTTP proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        request = urllib.request.Request(
            base + TOKEN_PATH, method="PUT", headers={TOKEN_TTL_HEADER: str(TOKEN_TTL_SECONDS)}
        )
        with opener.open(request, timeout=timeout) as response:
            token = response.read().decode().strip()
    except (OSError, ValueError) as exc:
        log.debug("no EC2 metadata service at %s: %s", base, exc)
        return None
    if not token:
        return None

    def fetch(path: str) -> str | None:
        request = urllib.request.Request(base + path, headers={TOKEN_HEADER: token})
        try:
            with opener.open(request, timeout=timeout) as response:
                return response.read().decode().strip() or None
        except (OSError, ValueError) as exc:
            log.debug("EC2 metadata %s unavailable: %s", path, exc)
            return None

    zone = fetch(ZONE_PATH)
    region = fetch(REGION_PATH)
    if region is None and zone:
        region = zone.rstrip("abcdefghijklmnopqrstuvwxyz")  # us-east-1a -> us-east-1
    return InstanceInfo(region, zone)


def region_warning(
    instance: InstanceInfo | None, bucket: str, bucket_region: str | None
) -> str | None:
    """A one-paragraph warning when ``bucket`` lives outside the instance's region."""
    if instance is None or not instance.region or not bucket_region:
        return None
    if instance.region == bucket_region:
        return None
    return (
        f"warning: this EC2 instance runs in {instance.region} but bucket {bucket} is in "
        f"{bucket_region}: traffic crosses regions (transfer charges, lower throughput). "
        f"Consider running from an instance in {bucket_region}."
    )
