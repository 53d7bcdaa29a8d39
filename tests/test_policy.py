"""Delta eligibility: magic bytes, DeltaGlider's extension list, DG_MAX_RATIO."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import math
import random
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from dgfs.errors import ConfigError
from dgfs.policy import (
    ARCHIVE_KINDS,
    DEFAULT_MAX_RATIO,
    DEFAULT_MIN_DELTA_SIZE,
    SNIFF_BYTES,
    Policy,
    has_delta_extension,
    sniff_kind,
)

BIG = 10 * 1024 * 1024  # comfortably above the delta threshold


# --- real (minimal) files of each kind --------------------------------------------------


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("app/__init__.py", "print('hello')\n")
    return buf.getvalue()


def empty_zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w"):
        pass
    return buf.getvalue()


def tar_bytes(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        data = b"hello\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ar_member(name: bytes, data: bytes) -> bytes:
    """One member of a System V ar archive, as dpkg-deb writes them."""
    header = (
        name.ljust(16)
        + b"0".ljust(12)
        + b"0".ljust(6)
        + b"0".ljust(6)
        + b"100644".ljust(8)
        + str(len(data)).encode().ljust(10)
        + b"`\n"
    )
    return header + data + (b"\n" if len(data) % 2 else b"")


def deb_bytes() -> bytes:
    return (
        b"!<arch>\n"
        + ar_member(b"debian-binary", b"2.0\n")
        + ar_member(b"control.tar.gz", gzip.compress(tar_bytes(tarfile.GNU_FORMAT)))
    )


def rpm_lead() -> bytes:
    """The 96-byte lead every RPM package starts with (v3.0, binary, noarch name)."""
    name = b"hello-1.0-1".ljust(66, b"\0")
    magic_version_type_arch = b"\xed\xab\xee\xdb\x03\x00\x00\x00\x00\x01"
    os_signature_reserved = b"\x00\x01\x00\x05" + b"\0" * 16
    return magic_version_type_arch + name + os_signature_reserved


def iso_bytes() -> bytes:
    """32 KiB system area, then an ISO 9660 primary volume descriptor."""
    descriptor = b"\x01CD001\x01\x00" + b"LINUX".ljust(32) + b"RELEASE".ljust(32)
    return b"\0" * 0x8000 + descriptor.ljust(2048, b"\0")


SAMPLES: dict[str, bytes] = {
    "zip": zip_bytes(),
    "zip-empty": empty_zip_bytes(),
    "gzip": gzip.compress(b"hello " * 100),
    "tar-ustar": tar_bytes(tarfile.USTAR_FORMAT),
    "tar-gnu": tar_bytes(tarfile.GNU_FORMAT),
    "tar-pax": tar_bytes(tarfile.PAX_FORMAT),
    "bzip2": bz2.compress(b"hello " * 100),
    "xz": lzma.compress(b"hello " * 100),
    # zstd frame of empty content: magic, FHD (single segment), FCS=0, last raw block of 0.
    "zstd": b"\x28\xb5\x2f\xfd\x20\x00\x01\x00\x00",
    # 7z signature header: magic, version 0.4, start-header CRC, next-header offset/size/CRC.
    "7z": b"7z\xbc\xaf\x27\x1c\x00\x04" + b"\x8d\x9b\xd5\x0f" + b"\0" * 20,
    "deb": deb_bytes(),
    "rpm": rpm_lead(),
    "iso": iso_bytes(),
    "lz4": b"\x04\x22\x4d\x18\x64\x40\xa7\x00\x00\x00\x00",
    "rar": b"Rar!\x1a\x07\x01\x00" + b"\0" * 16,
    "compress": b"\x1f\x9d\x90" + b"hello",
    "xar": b"xar!\x00\x1c\x00\x01" + b"\0" * 20,
}


@pytest.mark.parametrize("label", sorted(SAMPLES))
def test_sniff_kind_detects_real_headers(label: str) -> None:
    expected = label.split("-")[0]
    assert sniff_kind(SAMPLES[label][:SNIFF_BYTES]) == expected
    assert expected in ARCHIVE_KINDS


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"hello world\n" * 100,
        b"\x89PNG\r\n\x1a\n" + b"\0" * 100,
        b"\x7fELF\x02\x01\x01" + b"\0" * 100,
        b"%PDF-1.7\n",
        b"!<arch>\n" + ar_member(b"libfoo.o/", b"\0" * 64),  # a static library, not a .deb
        b"\0" * SNIFF_BYTES,
        b"BZh0",  # bzip2 block sizes are 1..9
        b"PK",  # too short for any zip signature
        random.Random(1).randbytes(SNIFF_BYTES),
    ],
)
def test_sniff_kind_rejects_non_archives(head: bytes) -> None:
    assert sniff_kind(head) is None


def test_sniff_bytes_reaches_every_signature() -> None:
    assert len(iso_bytes()) > SNIFF_BYTES >= 0x8001 + len(b"CD001")
    assert sniff_kind(iso_bytes()[: SNIFF_BYTES - 1]) is None  # one byte short


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_sniff_kind_real_dpkg_deb(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: hello\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.com>\n"
        "Description: test\n"
    )
    (root / "usr" / "share").mkdir(parents=True)
    (root / "usr" / "share" / "hello").write_text("hello\n")
    deb = tmp_path / "hello.deb"
    subprocess.run(["dpkg-deb", "--build", root, deb], check=True, capture_output=True)
    assert sniff_kind(deb.read_bytes()[:SNIFF_BYTES]) == "deb"


@pytest.mark.parametrize(("tool", "kind"), [("zstd", "zstd"), ("lz4", "lz4"), ("xz", "xz")])
def test_sniff_kind_real_compressors(tool: str, kind: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"needs {tool}")
    packed = subprocess.run(
        [tool, "-c"], input=b"hello " * 1000, capture_output=True, check=True
    ).stdout
    assert sniff_kind(packed) == kind


# --- candidates -------------------------------------------------------------------------


def test_rsync_temp_name_with_zip_content_is_candidate() -> None:
    assert Policy().is_delta_candidate(".app-1.2.zip.Xy12ab", SAMPLES["zip"], BIG)
    # Content alone decides when the name says nothing.
    assert Policy().is_delta_candidate(".app-1.2.whl.Xy12ab", SAMPLES["zip"], BIG)
    assert Policy().is_delta_candidate("tmpk2j3h4_1", SAMPLES["tar-gnu"], BIG)
    assert not Policy().is_delta_candidate(".app-1.2.whl.Xy12ab", b"text\n" * 100, BIG)


def test_rsync_temp_name_of_unsniffable_extension_is_candidate() -> None:
    # .dmg has no signature at its start; the name rsync will rename to decides.
    noise = random.Random(2).randbytes(SNIFF_BYTES)
    assert Policy().is_delta_candidate(".app-1.2.dmg.Xy12ab", noise, BIG)
    assert Policy().is_delta_candidate("dist/.app-1.2.dmg.Xy12ab", noise, BIG)
    assert not Policy().is_delta_candidate(".notes.txt.Xy12ab", noise, BIG)


def test_text_file_is_not_candidate() -> None:
    assert not Policy().is_delta_candidate("x.txt", b"just some text\n" * 100, BIG)


def test_small_zip_is_not_candidate() -> None:
    policy = Policy()
    assert not policy.is_delta_candidate("app.zip", SAMPLES["zip"], len(SAMPLES["zip"]))
    assert not policy.is_delta_candidate("app.zip", SAMPLES["zip"], DEFAULT_MIN_DELTA_SIZE - 1)
    assert policy.is_delta_candidate("app.zip", SAMPLES["zip"], DEFAULT_MIN_DELTA_SIZE)


def test_threshold_is_configurable() -> None:
    assert Policy(min_delta_size=0).is_delta_candidate("app.zip", SAMPLES["zip"], 10)
    assert not Policy(min_delta_size=BIG + 1).is_delta_candidate("a.iso", SAMPLES["iso"], BIG)


def test_extension_only_match_is_candidate() -> None:
    noise = random.Random(3).randbytes(SNIFF_BYTES)
    assert sniff_kind(noise) is None
    for name in ("Installer.dmg", "APP.DMG", "app-1.0.TAR.GZ", "lib.war", "release.pkg"):
        assert Policy().is_delta_candidate(name, noise, BIG), name


def test_content_only_match_is_candidate() -> None:
    # Wheels are zip files but not in DeltaGlider's list.
    assert not has_delta_extension("botocore-1.35.0-py3-none-any.whl")
    assert Policy().is_delta_candidate("botocore-1.35.0-py3-none-any.whl", SAMPLES["zip"], BIG)
    assert Policy().is_delta_candidate("backup", SAMPLES["tar-pax"], BIG)
    assert not Policy().is_delta_candidate("botocore.whl", b"not a zip", BIG)


def test_extension_list_matches_deltaglider_6_2_0() -> None:
    listed = [
        ".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".dmg",
        ".iso", ".pkg", ".deb", ".rpm", ".apk", ".jar", ".war", ".ear",
        ".tar.gz", ".tar.bz2", ".tar.xz",
    ]  # fmt: skip
    for ext in listed:
        assert has_delta_extension(f"file{ext}"), ext
        assert has_delta_extension(f"FILE{ext.upper()}"), ext
    for name in ("a.whl", "a.txt", "a.zst", "a.tar.zst", "a.gzip", "zip", "a.zip.bak", "a.exe"):
        assert not has_delta_extension(name), name


# --- ratio ------------------------------------------------------------------------------


def test_accepts_ratio_boundaries() -> None:
    policy = Policy()
    assert policy.accepts_ratio(500, 1000)
    assert not policy.accepts_ratio(501, 1000)
    assert policy.accepts_ratio(0, 1000)
    assert policy.accepts_ratio(0, 0)
    assert not policy.accepts_ratio(1, 0)
    assert Policy(max_ratio=1).accepts_ratio(1000, 1000)
    assert not Policy(max_ratio=1).accepts_ratio(1001, 1000)
    assert not Policy(max_ratio=0).accepts_ratio(1, 10**12)
    big = 50 * 1024**3
    assert policy.accepts_ratio(big // 2, big)
    assert not policy.accepts_ratio(big // 2 + 1, big)


# --- configuration ----------------------------------------------------------------------


def test_defaults() -> None:
    assert DEFAULT_MAX_RATIO == 0.5
    assert DEFAULT_MIN_DELTA_SIZE == 64 * 1024
    assert Policy() == Policy(max_ratio=0.5, min_delta_size=64 * 1024)


@pytest.mark.parametrize("ratio", [-0.1, 1.01, math.nan, math.inf, "0.5", True, None])
def test_invalid_max_ratio(ratio: object) -> None:
    with pytest.raises(ConfigError, match="max_ratio"):
        Policy(max_ratio=ratio)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [-1, 1.5, "10", True])
def test_invalid_min_delta_size(size: object) -> None:
    with pytest.raises(ConfigError, match="min_delta_size"):
        Policy(min_delta_size=size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0.3", 0.3), (" 0.25 ", 0.25), ("0", 0.0), ("1", 1.0), ("1e-1", 0.1), ("", 0.5)],
)
def test_from_env_dg_max_ratio(value: str, expected: float) -> None:
    assert Policy.from_env({"DG_MAX_RATIO": value}).max_ratio == expected


def test_from_env_without_variables() -> None:
    assert Policy.from_env({}) == Policy()
    assert Policy.from_env({"DG_LOG_LEVEL": "DEBUG"}) == Policy()


@pytest.mark.parametrize("value", ["abc", "1.5", "-0.2", "nan", "inf", "50%"])
def test_from_env_dg_max_ratio_errors(value: str) -> None:
    with pytest.raises(ConfigError, match="DG_MAX_RATIO") as info:
        Policy.from_env({"DG_MAX_RATIO": value})
    assert "0 to 1" in str(info.value)


def test_from_env_overrides_win() -> None:
    env = {"DG_MAX_RATIO": "0.3"}
    assert Policy.from_env(env, max_ratio=0.7).max_ratio == 0.7
    assert Policy.from_env(env, max_ratio=None).max_ratio == 0.3
    policy = Policy.from_env(env, min_delta_size=0)
    assert (policy.max_ratio, policy.min_delta_size) == (0.3, 0)
    # an explicit option makes the variable irrelevant, even a bad one
    assert Policy.from_env({"DG_MAX_RATIO": "2"}, max_ratio=0.5).max_ratio == 0.5
    with pytest.raises(ConfigError, match="min_delta_size"):
        Policy.from_env(env, min_delta_size=-1)
    with pytest.raises(ConfigError, match="max_ratio"):
        Policy.from_env({}, max_ratio=3)
    with pytest.raises(TypeError, match="max_ratioo"):
        Policy.from_env({}, max_ratioo=0.1)


@pytest.mark.parametrize("kind", ["gzip", "bzip2", "xz"])
def test_content_xdelta_would_decompress_is_stored_direct(kind: str) -> None:
    # Stock DeltaGlider decodes without -D; such deltas would be unreadable by it.
    head = SAMPLES[kind]
    assert sniff_kind(head) == kind
    for name in ("app-1.0.tar.gz", "data.bz2", "dump.xz", "noext"):
        assert not Policy().is_delta_candidate(name, head, BIG), (kind, name)
