"""``cache_dir`` never changes a directory dgfs did not create (``runtime.private_cache_root``).

``-o cache_dir=/tmp`` used to chmod /tmp to 0700. Now a directory others
share holds a private ``dgfs-UID`` subdirectory dgfs creates, and dgfs
keeps all its files there; one that someone else planted under that name
is refused.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dgfs.errors import ConfigError
from dgfs.runtime import S3Location, Settings, open_core, private_cache_root
from tests.mountutil import Mounts

UID = os.geteuid()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def shared_dir(path: Path, mode: int = 0o1777) -> Path:
    """A directory like /tmp (or /var/cache with 0o755)."""
    path.mkdir()
    path.chmod(mode)
    return path


async def test_a_shared_cache_dir_keeps_its_mode(tmp_path: Path) -> None:
    shared = shared_dir(tmp_path / "tmp")
    settings = Settings(endpoint_url="http://127.0.0.1:9", cache_dir=shared)
    async with open_core(S3Location("bucket"), settings, check_bucket=False) as core:
        assert mode_of(shared) == 0o1777
        private = shared / f"dgfs-{UID}"
        assert mode_of(private) == 0o700
        assert core.cache.directory.parent == private
        assert core.scratch_dir.is_relative_to(private)
        assert sorted(p.name for p in shared.iterdir()) == [private.name]
    assert mode_of(shared) == 0o1777


def test_a_directory_dgfs_creates_or_made_before_is_used_as_it_is(tmp_path: Path) -> None:
    new = tmp_path / "a" / "new"
    assert private_cache_root(new) == new
    assert mode_of(new) == 0o700
    assert private_cache_root(new) == new  # its own, private: used again
    assert list(new.iterdir()) == []


def test_a_readable_directory_of_ones_own_is_left_alone_too(tmp_path: Path) -> None:
    mine = shared_dir(tmp_path / "cache", 0o755)
    assert private_cache_root(mine) == mine / f"dgfs-{UID}"
    assert mode_of(mine) == 0o755


@pytest.mark.expected_log(r"a journal an earlier version left in .* is not read: chmod 700")
def test_a_journal_left_in_a_directory_made_shared_is_named_in_the_log(tmp_path: Path) -> None:
    loose = shared_dir(tmp_path / "cache", 0o755)
    (loose / "journal").mkdir()
    assert private_cache_root(loose) == loose / f"dgfs-{UID}"


def test_a_subdirectory_someone_else_planted_is_refused(tmp_path: Path) -> None:
    shared = shared_dir(tmp_path / "tmp")
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir(mode=0o700)
    (shared / f"dgfs-{UID}").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="is not this user's private directory"):
        private_cache_root(shared)
    (shared / f"dgfs-{UID}").unlink()
    (shared / f"dgfs-{UID}").mkdir(mode=0o777)
    (shared / f"dgfs-{UID}").chmod(0o777)
    with pytest.raises(ConfigError, match="is not this user's private directory"):
        private_cache_root(shared)
    if UID == 0:
        os.chown(shared / f"dgfs-{UID}", 1000, 1000)
        (shared / f"dgfs-{UID}").chmod(0o700)
        with pytest.raises(ConfigError, match="is not this user's private directory"):
            private_cache_root(shared)
    assert mode_of(shared) == 0o1777


def test_a_cache_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        private_cache_root(tmp_path / "file")


@pytest.mark.mount
def test_a_mount_with_cache_dir_tmp_leaves_it_as_it_was(moto_endpoint: str, tmp_path: Path) -> None:
    shared = shared_dir(tmp_path / "tmp")
    with Mounts(moto_endpoint, tmp_path / "mounts") as mounts:
        mount = mounts.mount(cache_dir=shared)
        (mount / "note.txt").write_text("hello\n")
        mount.unmount()
        assert mode_of(shared) == 0o1777
        assert sorted(p.name for p in shared.iterdir()) == [f"dgfs-{UID}"]
        assert (shared / f"dgfs-{UID}" / "journal").is_dir()
        mount.remount()
        assert (mount / "note.txt").read_text() == "hello\n"
        mount.unmount()


def test_a_process_of_the_same_pid_in_another_namespace_gets_its_own_ephemeral_cache(
    tmp_path: Path,
) -> None:
    """Two containers share a cache_dir volume without a cache key; each dgfs
    has the same PID in its own namespace (PID 1, say). The first holds
    ``content-ephemeral-<pid>`` (its lock taken); the second must get a cache
    of its own: it failed with "in use by another dgfs mount"."""
    import os

    from dgfs.cache import ContentCache
    from dgfs.runtime import Settings, _open_cache
    from dgfs.telemetry import Telemetry

    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    other = ContentCache(root / f"content-ephemeral-{os.getpid()}", 1 << 20, None)
    try:
        settings = Settings.from_env({}, cache_dir=root)
        cache, ephemeral = _open_cache(root, settings, Telemetry())
        try:
            assert ephemeral
            assert cache.directory != other.directory
        finally:
            cache.close()
    finally:
        other.close()
