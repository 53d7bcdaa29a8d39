"""The ObjectStore on S3 (and S3-compatible stores), via boto3: the only code
that imports boto3/botocore.

Parts, each with one job:

- ``store``: ``S3Store``, the API the rest of dgfs uses; requests built and
  answers read here.
- ``calls``: the one way to call S3: botocore exceptions translated into
  ``dgfs.errors`` (``translate_error``), transient failures retried.
- ``client``: the boto3 client and its configuration (timeouts, checksums,
  addressing), the hooks on every answer, the AWS credential chain.
- ``transfers``: multipart uploads and copies, parallel ranged downloads.
"""

from dgfs.store.s3.calls import translate_error
from dgfs.store.s3.client import READ_TIMEOUT, ca_bundle, credential_source, make_client
from dgfs.store.s3.store import S3Store
from dgfs.store.s3.transfers import multipart_etag

__all__ = [
    "READ_TIMEOUT",
    "S3Store",
    "ca_bundle",
    "credential_source",
    "make_client",
    "multipart_etag",
    "translate_error",
]
