"""The privileged step's mount(2) arguments, from the options dgfs gives libfuse."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dgfs.errors import ConfigError
from dgfs.handoff import MS_NODEV, MS_NOSUID, MS_RDONLY, check_fuse_fd, kernel_mount, user_ids
from dgfs.mount import MountConfig, _fuse_options
from dgfs.runtime import S3Location, Settings


def test_libfuse_options_become_mount_flags_and_kernel_options() -> None:
    options = {"default_permissions", "fsname=dgfs:b", "subtype=dgfs", "nosuid", "nodev", "ro"}
    source, fstype, flags, data = kernel_mount(options | {"allow_other"}, 7, 1000, 1001)
    assert (source, fstype) == ("dgfs:b", "fuse.dgfs")
    assert flags == MS_RDONLY | MS_NOSUID | MS_NODEV
    assert data.split(",") == [
        "fd=7", "rootmode=40000", "user_id=1000", "group_id=1001",
        "allow_other", "default_permissions",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="max_idle_threads"):
        kernel_mount({"max_idle_threads=4"}, 7, 0, 0)


@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize("allow_other", [False, True])
def test_every_option_a_mount_gives_libfuse_can_be_handed_over(
    read_only: bool, allow_other: bool, tmp_path: Path
) -> None:
    """One rule, one place: ``--handoff`` mounts with the very options the
    daemon would give libfuse (dgfs.mount._fuse_options), all of them known."""
    from dgfs.fs.options import FsOptions

    config = MountConfig(
        location=S3Location.parse("bucket/prefix"),
        mountpoint=tmp_path,
        settings=Settings(cache_dir=tmp_path),
        fs_options=FsOptions(read_only=read_only),
        allow_other=allow_other,
    )
    source, fstype, flags, data = kernel_mount(_fuse_options(config), 3, 0, 0)
    assert (source, fstype) == ("dgfs:bucket", "fuse.dgfs")
    assert flags & (MS_NOSUID | MS_NODEV) == MS_NOSUID | MS_NODEV  # always
    assert bool(flags & MS_RDONLY) == read_only
    assert ("allow_other" in data.split(",")) == allow_other


def test_user_ids_by_name_or_number() -> None:
    assert user_ids("root") == (0, 0)
    assert user_ids("0") == (0, 0)
    with pytest.raises(ConfigError, match="no such user"):
        user_ids("no-such-user-dgfs")


def test_only_dev_fuse_is_served(tmp_path: Path) -> None:
    with open(tmp_path / "plain", "wb") as plain, pytest.raises(ConfigError, match="not /dev"):
        check_fuse_fd(plain.fileno())
    read_end, write_end = os.pipe()
    os.close(write_end)
    os.close(read_end)
    with pytest.raises(ConfigError, match="is not open"):
        check_fuse_fd(read_end)
