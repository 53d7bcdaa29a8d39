"""Real mounts of a bucket written the way deltaglider_proxy writes it.

The objects come from ``testsupport/proxyobjects.py`` (the proxy's metadata map,
its xdelta3 argv and its encryption framing, ported from its source):

- every file is listed under its real name and size and reads back exactly;
  no ``.delta``, ``reference.bin`` or ``_dgp/`` is ever listed; a client's
  own metadata shows as read-only ``user.s3.*`` attributes;
- encrypted objects read with ``-o proxy_key_file``; without it they list
  with their real sizes and every read fails with EIO and one log line
  naming the option, never ciphertext;
- a file the mount adds to a proxy deltaspace is stored against the proxy's
  reference, and reads as the proxy's own parsing and the DeltaGlider CLI
  expect.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from tests.mountutil import Mounts, S3View, dg_download, sha256_bytes, sha256_file
from testsupport.proxyobjects import ProxyEncryption, ProxyWriter, proxy_parse
from testsupport.releases import ReleaseSeries

pytestmark = [pytest.mark.mount, pytest.mark.interop]

KEY = bytes(range(100, 132))


@pytest.fixture(scope="module")
def proxy_bucket(mounts: Mounts) -> tuple[str, dict[str, bytes]]:
    """A bucket the proxy wrote: ``app/`` plain, ``sec/`` encrypted; key -> bytes."""
    bucket = mounts.new_bucket()
    series = ReleaseSeries(size=384 << 10, seed=41)
    files: dict[str, bytes] = {}
    plain = ProxyWriter()
    secret = ProxyWriter(encryption=ProxyEncryption(KEY, chunked_passthrough=True))
    view = S3View(mounts.endpoint, bucket)
    try:
        for directory, writer in (("app", plain), ("sec", secret)):
            for name, data in series.zips(3):
                files[f"{directory}/{name}"] = data
            files[f"{directory}/NOTES.txt"] = b"built by ci #42\n" * 9000  # passthrough
            for key, data in files.items():
                if not key.startswith(directory + "/"):
                    continue
                objects = writer.put(key, data, delta=key.endswith(".zip"), user={"build": "42"})
                for obj in objects:
                    view.put(obj.key, obj.body, obj.metadata)
        # The proxy's coordination objects, when the bucket is also its coordination bucket.
        view.put("_dgp/locks/reference/0123abcd.json", b'{"owner":"x"}')
    finally:
        view.close()
    return bucket, files


def test_proxy_bucket_lists_and_reads_exactly(
    mounts: Mounts, proxy_bucket: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    bucket, files = proxy_bucket
    key_file = tmp_path / "proxy.key"
    key_file.write_text(KEY.hex() + "\n")
    mount = mounts.mount(bucket, ro=None, proxy_key_file=str(key_file))
    try:
        assert sorted(os.listdir(mount.mountpoint)) == ["app", "sec"]
        for directory in ("app", "sec"):
            names = sorted(k.split("/", 1)[1] for k in files if k.startswith(directory + "/"))
            assert sorted(os.listdir(mount / directory)) == names
        for key, data in files.items():
            assert (mount / key).stat().st_size == len(data), key
            assert sha256_file(mount / key) == sha256_bytes(data), key
        zip_key = next(k for k in files if k.startswith("app/") and k.endswith(".zip"))
        assert os.getxattr(mount / zip_key, "user.dgfs.kind") == b"delta"
        # The client's own metadata (user-build), as the proxy serves it; read-only.
        for key in (zip_key, "app/NOTES.txt", "sec/NOTES.txt"):
            assert "user.s3.build" in os.listxattr(mount / key), key
            assert os.getxattr(mount / key, "user.s3.build") == b"42", key
        assert not [n for n in os.listxattr(mount / "sec/NOTES.txt") if "dg-" in n]
    finally:
        mount.unmount()


def test_encrypted_objects_without_the_key_fail_with_eio(
    mounts: Mounts, proxy_bucket: tuple[str, dict[str, bytes]]
) -> None:
    bucket, files = proxy_bucket
    mount = mounts.mount(bucket, ro=None)
    mount.expect_log(r"cannot read sec/.*encrypted by deltaglider_proxy.*proxy_key_file")
    try:
        secret = {k: v for k, v in files.items() if k.startswith("sec/")}
        assert sorted(os.listdir(mount / "sec")) == sorted(k[4:] for k in secret)
        for key, data in secret.items():
            assert (mount / key).stat().st_size == len(data), key
            with pytest.raises(OSError) as caught:
                (mount / key).read_bytes()
            assert caught.value.errno == errno.EIO, key
        # The plain directory beside it reads as ever.
        for key, data in files.items():
            if key.startswith("app/"):
                assert sha256_file(mount / key) == sha256_bytes(data), key
        lines = [line for line in mount.log_text().splitlines() if "proxy_key_file" in line]
        assert 1 <= len(lines) <= len(secret) + 1, lines  # once per object, not per read
    finally:
        mount.unmount()


def test_file_added_to_a_proxy_deltaspace_reads_in_every_tool(
    mounts: Mounts, proxy_bucket: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    bucket, files = proxy_bucket
    view = S3View(mounts.endpoint, bucket)
    mount = mounts.mount(bucket)
    try:
        ref_before = view.metadata("app/reference.bin")
        series = ReleaseSeries(size=384 << 10, seed=41)
        for _ in range(7):
            name, data = series.next_zip()  # the next release of the fixture's series
        target = mount / "app" / name
        target.write_bytes(data)
        mount.settle(target)
        assert view.metadata("app/reference.bin") == ref_before  # the proxy's, untouched
        meta = view.metadata(f"app/{name}.delta")
        parsed = proxy_parse(meta)  # as the proxy reads it
        assert parsed["storage"] == "delta" and parsed["ref_path"] == "reference.bin"
        assert parsed["ref_sha256"] == ref_before["dg-file-sha256"]
        assert parsed["md5"] == hashlib.md5(data).hexdigest()
        assert parsed["file_size"] == len(data)
        # The DeltaGlider CLI reads it too (dg-ref-key is there for it).
        out = dg_download(mounts.endpoint, bucket, f"app/{name}", tmp_path / name)
        assert sha256_file(out) == sha256_bytes(data)
        assert sha256_file(target) == sha256_bytes(data)
        # The client's own metadata is read-only, as the rest (a writable mount).
        with pytest.raises(OSError) as caught:
            os.setxattr(mount / "app/NOTES.txt", "user.s3.build", b"43")
        assert caught.value.errno == errno.ENOTSUP
        # The proxy's coordination prefix cannot be made at the root.
        with pytest.raises(OSError) as caught:
            (mount.mountpoint / "_dgp").mkdir()
        assert caught.value.errno == errno.EINVAL
        assert "_dgp" not in os.listdir(mount.mountpoint)
    finally:
        view.close()
        mount.unmount()
