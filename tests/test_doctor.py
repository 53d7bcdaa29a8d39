"""``dgfs doctor``: a good machine and bucket pass; each broken thing fails with its fix.

The whole command runs in-process against moto_server; each check's
failure path runs on its own (a fake ``/dev/fuse``, a ``fuse.conf``
without ``user_allow_other``, a mounts table saying tmpfs, a store that
refuses writes, a clock ten minutes off, an untrusted certificate).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgfs import doctor
from dgfs.cli.main import main
from dgfs.deep import gnuzip
from dgfs.doctor import Status
from dgfs.errors import AccessDenied
from dgfs.store.faulty import FaultyStore
from dgfs.store.memory import MemoryStore
from testsupport.servers import SECRET_KEY, free_port, s3_client


def run_doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, dict]]:
    code = main(["doctor", *args, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is (code == 0)
    return code, {check["name"]: check for check in report["checks"]}


def options(endpoint: str, tmp_path: Path, *extra: str) -> list[str]:
    return ["-o", ",".join([f"endpoint={endpoint}", f"cache_dir={tmp_path / 'cache'}", *extra])]


# --- the whole command -------------------------------------------------------------


def test_a_good_bucket_passes_and_what_it_holds_is_named(
    moto_endpoint: str, bucket_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = s3_client(moto_endpoint)
    sha = "0" * 64
    client.put_object(
        Bucket=bucket_name,
        Key="app/reference.bin",
        Body=b"r",
        Metadata={"dg-tool": "deltaglider/6.2.0", "dg-note": "reference", "dg-file-sha256": sha},
    )
    client.put_object(
        Bucket=bucket_name,
        Key="deep/reference.deep",
        Body=b"r",
        Metadata={"dg-tool": "dgfs/0.1.0", "dgfs-format": "deep-1", "dg-file-sha256": sha},
    )
    client.put_object(
        Bucket=bucket_name,
        Key="proxy/app.zip.delta",
        Body=b"d",
        Metadata={
            "dg-tool": "deltaglider_proxy/1.19.0",
            "dg-note": "delta",
            "dg-ref-path": "reference.bin",
            "dg-file-sha256": sha,
        },
    )
    code, checks = run_doctor(capsys, bucket_name, *options(moto_endpoint, tmp_path))
    statuses = {name: check["status"] for name, check in checks.items()}
    assert code == 0, checks
    for name in ("fuse-device", "fusermount3", "xdelta3", "cache-dir", "credentials", "endpoint"):
        assert statuses[name] == "ok", checks[name]
    assert statuses["clock"] == "ok" and statuses["bucket"] == "ok"
    assert statuses["bucket-write"] == "ok" and "If-None-Match" in checks["bucket-write"]["detail"]
    assert checks["credentials"]["detail"] == "from env (values not shown)"
    data = checks["bucket-data"]
    assert data["status"] == "ok"
    for kind in ("DeltaGlider v6 (the DeltaGlider CLI): 1", "dgfs deep", "deltaglider_proxy: 1"):
        assert kind in data["detail"]
    # the probe object is gone, and no secret was printed
    probes = client.list_objects_v2(Bucket=bucket_name, Prefix=".deltaglider/tmp/")
    assert probes.get("KeyCount", 0) == 0
    assert SECRET_KEY not in json.dumps(checks)
    client.close()


def test_text_output_has_one_line_per_check_with_its_fix(
    bucket_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    code = main(["doctor", bucket_name, *options(endpoint, tmp_path, "ro")])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    failed = [line for line in lines if line.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith("FAIL endpoint")
    assert "cannot connect" in failed[0] and "-- fix: check -o endpoint=" in failed[0]
    assert any(line.startswith("skip bucket ") for line in lines)
    assert lines[-1] == "dgfs doctor: 1 problem(s)"


def test_without_a_bucket_only_the_machine_and_endpoint_are_checked(
    moto_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, checks = run_doctor(capsys, *options(moto_endpoint, tmp_path))
    assert code == 0
    assert checks["bucket"]["status"] == "skip" and "bucket-write" not in checks


def test_no_such_bucket(
    moto_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, checks = run_doctor(capsys, "no-such-bucket-here", *options(moto_endpoint, tmp_path))
    assert code == 1
    assert checks["bucket"]["status"] == "fail"
    assert "does not exist" in checks["bucket"]["detail"]
    assert "aws s3 mb s3://no-such-bucket-here" in checks["bucket"]["fix"]


def test_no_credentials(
    moto_endpoint: str,
    bucket_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    code, checks = run_doctor(capsys, bucket_name, *options(moto_endpoint, tmp_path))
    assert code == 1
    assert checks["credentials"]["status"] == "fail"
    assert "AWS_ACCESS_KEY_ID" in checks["credentials"]["fix"]
    assert "/etc/dgfs/" in checks["credentials"]["fix"]
    assert checks["bucket"]["status"] == "skip"


def test_a_profile_that_does_not_exist(
    moto_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, checks = run_doctor(capsys, *options(moto_endpoint, tmp_path, "profile=nobody"))
    assert code == 1 and checks["credentials"]["status"] == "fail"
    assert "nobody" in checks["credentials"]["detail"]


def test_a_bad_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "-o", "no_such_option=1"]) == 2
    assert "unknown option 'no_such_option'" in capsys.readouterr().err


# --- each check's failure path ------------------------------------------------------


def test_no_fuse_device(tmp_path: Path) -> None:
    missing = doctor.check_fuse_device(tmp_path / "fuse")
    assert missing.status is Status.FAIL and "modprobe fuse" in (missing.fix or "")
    (tmp_path / "plain").write_text("")
    plain = doctor.check_fuse_device(tmp_path / "plain")
    assert plain.status is Status.FAIL and "not a character device" in plain.detail


def test_no_fusermount3(tmp_path: Path) -> None:
    missing = doctor.check_fusermount(str(tmp_path / "fusermount3"))
    assert missing.status is Status.FAIL and missing.fix == "apt-get install fuse3"
    helper = tmp_path / "fm3"
    helper.write_text("#!/bin/sh\n")
    helper.chmod(0o755)
    as_user = doctor.check_fusermount(str(helper), euid=1000)
    assert as_user.status is Status.FAIL and "setuid" in as_user.detail
    assert doctor.check_fusermount(str(helper), euid=0).status is Status.OK


def test_allow_other_needs_user_allow_other(tmp_path: Path) -> None:
    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\nmount_max = 1000\n")
    refused = doctor.check_allow_other(True, euid=1000, fuse_conf=conf)
    assert refused.status is Status.FAIL
    assert refused.fix == f"echo user_allow_other >> {conf} (as root), or mount as root"
    assert doctor.check_allow_other(True, euid=1000, fuse_conf=tmp_path / "none").status is (
        Status.FAIL
    )
    conf.write_text("user_allow_other\n")
    assert doctor.check_allow_other(True, euid=1000, fuse_conf=conf).status is Status.OK
    assert doctor.check_allow_other(False, euid=1000, fuse_conf=conf).status is Status.SKIP
    assert doctor.check_allow_other(True, euid=0, fuse_conf=tmp_path / "none").status is (Status.OK)


def test_no_xdelta3(tmp_path: Path) -> None:
    check = doctor.check_xdelta3(str(tmp_path / "xdelta3"))
    assert check.status is Status.FAIL and check.fix == "apt-get install xdelta3"
    found = doctor.check_xdelta3()
    assert found.status is Status.OK and "3." in found.detail  # its version


def test_no_zgz(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gnuzip.ZGZ_ENV, "")
    gnuzip.zgz_path.cache_clear()
    try:
        check = doctor.check_zgz()
    finally:
        monkeypatch.undo()
        gnuzip.zgz_path.cache_clear()
    assert check.status is Status.WARN and "pristine-tar" in (check.fix or "")


def test_cache_on_tmpfs_loses_the_journal(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\ntmpfs {tmp_path} tmpfs rw 0 0\n")
    check = doctor.check_cache_dir(tmp_path / "cache", 1 << 20, mounts)
    assert check.status is Status.WARN
    assert "tmpfs loses the journal" in check.detail and "cache_dir=" in (check.fix or "")
    mounts.write_text("/dev/vda / ext4 rw 0 0\n")
    assert doctor.check_cache_dir(tmp_path / "cache", 1 << 20, mounts).status is Status.OK


def test_cache_dir_smaller_than_cache_size_and_pending_uploads(tmp_path: Path) -> None:
    journal = tmp_path / "cache" / "journal" / "slot"
    journal.mkdir(parents=True)
    (tmp_path / "cache").chmod(0o700)  # private, as dgfs makes it
    (journal / "a.json").write_text("{}")
    (journal / "failed").mkdir()
    for name in ("b.json", "b.data"):  # failed for good: not waiting for upload
        (journal / "failed" / name).write_text("{}")
    check = doctor.check_cache_dir(tmp_path / "cache", 1 << 62)
    assert check.status is Status.WARN and "cache_size" in (check.fix or "")
    assert "1 file(s) waiting for upload" in check.detail
    assert "1 file(s) whose upload failed for good" in check.detail


def test_cache_dir_someone_else_controls(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / f"dgfs-{os.geteuid()}").symlink_to(tmp_path)  # planted by someone else
    check = doctor.check_cache_dir(shared, 1 << 20)
    assert check.status is Status.FAIL and "directory of this user's own" in (check.fix or "")


def test_clock_skew(moto_endpoint: str) -> None:
    endpoint, clock = doctor.check_endpoint(moto_endpoint, now=lambda: time.time() + 600)
    assert endpoint.status is Status.OK
    assert clock.status is Status.FAIL and "ahead of the endpoint" in clock.detail
    assert "timedatectl set-ntp true" in (clock.fix or "")
    _, behind = doctor.check_endpoint(moto_endpoint, now=lambda: time.time() - 3600)
    assert behind.status is Status.FAIL and "behind" in behind.detail


def test_unresolvable_endpoint() -> None:
    endpoint, clock = doctor.check_endpoint("http://no-such-host.invalid:9000", timeout=5)
    assert endpoint.status is Status.FAIL and "cannot resolve" in endpoint.detail
    assert clock.status is Status.SKIP


@pytest.fixture
def untrusted_tls_port(tmp_path: Path) -> Iterator[int]:
    """A TLS server on 127.0.0.1 with a self-signed certificate (handshakes only)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = tmp_path / "server.pem"
    pem.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        try:
            with context.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass  # the client refuses the certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.close()
    thread.join(timeout=10)


def test_untrusted_tls_certificate(untrusted_tls_port: int) -> None:
    endpoint, _ = doctor.check_endpoint(f"https://127.0.0.1:{untrusted_tls_port}", timeout=5)
    assert endpoint.status is Status.FAIL and "TLS certificate not trusted" in endpoint.detail
    assert "AWS_CA_BUNDLE" in (endpoint.fix or "")


async def test_no_write_permission(faulty: FaultyStore) -> None:
    faulty.fail("put_bytes", error=AccessDenied)
    checks = {check.name: check for check in await doctor.check_bucket(faulty, "", False)}
    assert checks["bucket"].status is Status.OK
    write = checks["bucket-write"]
    assert write.status is Status.FAIL and "s3:PutObject" in (write.fix or "")
    assert "-o ro" in (write.fix or "")


async def test_read_only_skips_the_probe_write(faulty: FaultyStore) -> None:
    checks = {check.name: check for check in await doctor.check_bucket(faulty, "", True)}
    assert checks["bucket-write"].status is Status.SKIP
    assert faulty.calls["put_bytes"] == 0


async def test_no_list_permission(faulty: FaultyStore) -> None:
    faulty.fail("list", error=AccessDenied)
    (bucket,) = await doctor.check_bucket(faulty, "", False)
    assert bucket.status is Status.FAIL and "s3:ListBucket" in (bucket.fix or "")


async def test_an_empty_bucket_holds_no_deltaglider_objects(memory: MemoryStore) -> None:
    checks = {check.name: check for check in await doctor.check_bucket(memory, "", False)}
    assert checks["bucket-data"].status is Status.OK
    assert checks["bucket-data"].detail == "empty: no DeltaGlider objects"


async def test_objects_the_proxy_encrypted_need_its_key(memory: MemoryStore) -> None:
    metadata = {
        "dg-tool": "deltaglider_proxy/1.19.0",
        "dg-note": "delta",
        "dg-ref-path": "reference.bin",
        "dg-encrypted": "aes-256-gcm-v1",
    }
    await memory.put_bytes("app/x.zip.delta", b"ciphertext", metadata)
    (data,) = [c for c in await doctor.check_bucket(memory, "", True) if c.name == "bucket-data"]
    assert data.status is Status.WARN and "encrypted by deltaglider_proxy" in data.detail
    assert "proxy_key_file" in (data.fix or "")
    with_key = await doctor.check_bucket(memory, "", True, proxy_key=True)
    assert with_key[-1].status is Status.OK and "deltaglider_proxy: 1" in with_key[-1].detail
