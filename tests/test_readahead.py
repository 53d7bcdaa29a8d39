"""The mount's kernel read-ahead (dgfs/readahead.py): found through mountinfo, set in
sysfs; and the I/O size the mount asks programs to use (st_blksize)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from dgfs.readahead import fuse_device, set_read_ahead

# Lines as this machine's /proc/self/mountinfo writes them, with a stacked mount and
# a mountpoint with a space (written by the kernel as \040).
MOUNTINFO = """\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/root rw
101 22 0:39 / /mnt/releases rw,relatime shared:60 - fuse.dgfs dgfs:releases rw,user_id=0
102 22 0:40 / /mnt/my\\040releases rw,relatime - fuse.dgfs dgfs:b rw,user_id=0
103 101 0:41 / /mnt/releases rw,relatime - fuse.dgfs dgfs:again rw,user_id=0
104 22 0:42 / /mnt/tmp rw,relatime - tmpfs tmpfs rw
"""


def test_the_device_is_the_last_fuse_mount_on_the_path() -> None:
    assert fuse_device(Path("/mnt/releases"), MOUNTINFO) == "0:41"  # stacked on 0:39
    assert fuse_device(Path("/mnt/my releases"), MOUNTINFO) == "0:40"
    assert fuse_device(Path("/mnt/tmp"), MOUNTINFO) is None  # not FUSE
    assert fuse_device(Path("/mnt/other"), MOUNTINFO) is None
    assert fuse_device(Path("/mnt/releases"), "garbage line\n\n") is None


def test_set_read_ahead_writes_sysfs(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO)
    bdi = tmp_path / "bdi"
    (bdi / "0:40").mkdir(parents=True)
    (bdi / "0:40" / "read_ahead_kb").write_text("128\n")
    assert set_read_ahead(Path("/mnt/my releases"), 1024, mountinfo=mountinfo, bdi_root=bdi)
    assert (bdi / "0:40" / "read_ahead_kb").read_text() == "1024\n"


def test_set_read_ahead_failures_are_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO)
    caplog.set_level(logging.INFO, logger="dgfs.readahead")
    bdi = tmp_path / "bdi"  # no device directory: the write fails
    assert not set_read_ahead(Path("/mnt/releases"), 1024, mountinfo=mountinfo, bdi_root=bdi)
    assert "cannot write" in caplog.text and "0:41" in caplog.text
    assert not set_read_ahead(Path("/mnt/none"), 1024, mountinfo=mountinfo, bdi_root=bdi)
    assert "/mnt/none is not in" in caplog.text
    gone = tmp_path / "no-mountinfo"
    assert not set_read_ahead(Path("/mnt/releases"), 1024, mountinfo=gone, bdi_root=bdi)
    assert "cannot read" in caplog.text


def _read_ahead_of(path: Path, expected: int) -> int:
    """The mount's read-ahead, once it is ``expected`` or 5 s passed (the daemon sets
    it once it serves, in the background)."""
    dev = os.stat(path).st_dev
    setting = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    deadline = time.monotonic() + 5
    while (value := int(setting.read_text())) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


@pytest.mark.mount
def test_a_mount_gets_its_read_ahead(mounts) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("only root may set a mount's read-ahead")
    default = mounts.mount()
    assert _read_ahead_of(default.root, 1024) == 1024
    # ...and cp, rsync and stdio read and write it in 1 MiB pieces (st_blksize).
    (default / "f").write_bytes(b"x")
    assert os.stat(default / "f").st_blksize == 1 << 20
    custom = mounts.mount(read_ahead_kb="4096")
    assert _read_ahead_of(custom.root, 4096) == 4096
    kernel = mounts.mount(read_ahead_kb="0")
    time.sleep(0.5)  # nothing is to change it
    assert _read_ahead_of(kernel.root, 128) == 128  # the kernel's own default for FUSE


def test_mount_option_read_ahead_kb_is_checked() -> None:
    from dgfs.cli.mount import build_config
    from dgfs.errors import ConfigError

    assert build_config("b", "/mnt/x", [])[0].read_ahead_kb == 1024  # type: ignore[attr-defined]
    config = build_config("b", "/mnt/x", ["read_ahead_kb=0"])[0]
    assert config.read_ahead_kb == 0  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="0 to 1048576"):
        build_config("b", "/mnt/x", ["read_ahead_kb=-1"])
    with pytest.raises(ConfigError, match="needs a number"):
        build_config("b", "/mnt/x", ["read_ahead_kb=big"])
