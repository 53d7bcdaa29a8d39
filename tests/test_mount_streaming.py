"""A large delta read through a real mount while it is rebuilt (the kernel's
concurrent read-ahead included): front to back, and from the end first."""

from __future__ import annotations

import os
import random

import pytest

from tests.mountutil import Mounts, sha256_bytes

pytestmark = pytest.mark.mount

SIZE = 40 << 20  # over the 32 MiB up to which a file is checked whole before its first byte


def _versions() -> tuple[bytes, bytes]:
    rng = random.Random(23)
    v1 = bytearray(rng.randbytes(SIZE))
    v2 = bytearray(v1)
    for at in range(0, SIZE - 4096, SIZE // 9):  # changes spread through the file
        v2[at : at + 4096] = rng.randbytes(4096)
    return bytes(v1), bytes(v2)


def test_a_large_delta_reads_back_through_the_mount_while_it_is_rebuilt(mounts: Mounts) -> None:
    v1, v2 = _versions()
    mount = mounts.mount()
    (mount / "big").mkdir()
    (mount / "big" / "app-1.tar").write_bytes(v1)
    mount.settle(mount / "big" / "app-1.tar")
    (mount / "big" / "app-2.tar").write_bytes(v2)
    mount.settle(mount / "big" / "app-2.tar")
    assert os.getxattr(mount / "big" / "app-2.tar", "user.dgfs.kind") == b"delta"

    # Fresh daemons with empty caches: front to back (cp, sha256sum)...
    mount.remount()
    with open(mount / "big" / "app-2.tar", "rb") as f:
        assert sha256_bytes(f.read()) == sha256_bytes(v2)
    # ...and from the end first (unzip reads the central directory first).
    mount.remount()
    with open(mount / "big" / "app-2.tar", "rb") as f:
        f.seek(SIZE - 65536)
        assert f.read() == v2[-65536:]
        f.seek(0)
        assert sha256_bytes(f.read()) == sha256_bytes(v2)
    mount.check_log()
