"""``mount -t dgfs`` through the installed ``mount.dgfs`` helper, and daemon mode.

Also unit tests of ``mount_helper.translate`` for what mount(8) and fstab
lines hand the helper.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgfs.cli import install_helper
from dgfs.errors import ConfigError
from dgfs.mount_helper import translate
from tests.mountutil import (
    Mounts,
    S3View,
    daemon_pids,
    dgfs_bin,
    is_mounted,
    mount_fstype,
    sha256_bytes,
    sha256_file,
)
from testsupport.releases import ReleaseSeries

HELPER = Path("/sbin/mount.dgfs")


# --- translate (no mount) -------------------------------------------------------


def test_translate_drops_what_mount_and_systemd_own() -> None:
    argv = [
        "releases/app",
        "/mnt/app",
        "-o",
        "rw,endpoint=http://127.0.0.1:8333,cache_dir=/var/cache/dgfs,_netdev,nofail,"
        "noauto,x-systemd.automount,x-systemd.mount-timeout=30,defaults,noatime,uid=1000,"
        "deltas=deep",
    ]
    assert translate(argv) == [
        "mount",
        "releases/app",
        "/mnt/app",
        "-o",
        "endpoint=http://127.0.0.1:8333,cache_dir=/var/cache/dgfs,uid=1000,deltas=deep",
    ]


def test_translate_keeps_ro_and_handles_flags_and_types() -> None:
    assert translate(["b", "/m", "-s", "-n", "-v", "-o", "ro,allow_other"]) == [
        "mount",
        "b",
        "/m",
        "-o",
        "ro,allow_other",
    ]
    # mount(8) passes "-t type.subtype" as two arguments for a subtype.
    assert translate(["b", "/m", "-o", "ro", "-t", "dgfs.releases"]) == [
        "mount",
        "b",
        "/m",
        "-o",
        "ro",
    ]
    assert translate(["b", "/m", "-oendpoint=http://h:1,nofail"]) == [
        "mount",
        "b",
        "/m",
        "-o",
        "endpoint=http://h:1",
    ]
    assert translate(["b", "/m", "-o", "defaults,_netdev"]) == ["mount", "b", "/m"]
    assert translate(["b", "/m", "-o", "a=1", "-o", "b=2"]) == ["mount", "b", "/m", "-o", "a=1,b=2"]


def test_translate_needs_source_and_mountpoint() -> None:
    with pytest.raises(SystemExit):
        translate(["only-one"])
    with pytest.raises(SystemExit):
        translate(["a", "b", "c"])


def test_install_helper_writes_an_executable_script(tmp_path: Path) -> None:
    target = tmp_path / "mount.dgfs"
    subprocess.run([dgfs_bin(), "install-helper", "--path", str(target)], check=True)
    text = target.read_text()
    assert text.startswith("#!/bin/sh")
    assert sys.executable in text and "dgfs.mount_helper" in text
    assert target.stat().st_mode & stat.S_IXUSR
    subprocess.run([dgfs_bin(), "install-helper", "--uninstall", "--path", str(target)], check=True)
    assert not target.exists()


def test_install_helper_says_what_is_wrong_with_its_path(tmp_path: Path) -> None:
    """A missing directory is named as such (not "run as root" to root), and
    --uninstall of nothing says there was nothing, not "removed"."""
    target = tmp_path / "no-such-dir" / "mount.dgfs"
    ran = subprocess.run(
        [dgfs_bin(), "install-helper", "--path", str(target)], capture_output=True, text=True
    )
    assert ran.returncode == 2
    assert f"{target.parent} is not a directory" in ran.stderr, ran.stderr
    ran = subprocess.run(
        [dgfs_bin(), "install-helper", "--uninstall", "--path", str(target)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert ran.stdout == f"nothing to remove: {target} does not exist\n"


def test_the_helper_imports_nothing_from_the_directory_it_runs_in(tmp_path: Path) -> None:
    """mount(8) runs the helper as root from any directory (/tmp, a home): a
    ``dgfs`` package planted there must never be what it imports."""
    target = tmp_path / "mount.dgfs"
    subprocess.run([dgfs_bin(), "install-helper", "--path", str(target)], check=True)
    cwd = tmp_path / "writable-by-someone"
    (cwd / "dgfs").mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    (cwd / "dgfs" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    env = {**os.environ, "PYTHONPATH": str(cwd)}  # a variable root may have set: ignored too
    result = subprocess.run(
        [str(target), "only-a-source"], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert not marker.exists(), "the helper ran a dgfs package from its working directory"
    assert result.returncode != 0 and "usage: mount.dgfs" in result.stderr, result.stderr


def test_install_helper_as_root_refuses_an_interpreter_others_can_replace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the check is made when root installs the helper")
    real_python = Path(os.path.realpath(sys.executable))
    assert install_helper.replaceable_by_others(real_python) is None

    def install(python: Path) -> Path:
        monkeypatch.setattr(sys, "executable", str(python))
        target = tmp_path / "mount.dgfs"
        target.unlink(missing_ok=True)
        args = argparse.Namespace(path=target, uninstall=False)
        install_helper.run(args)
        return target

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone may replace what is in it
    (shared / "python3").symlink_to(real_python)
    loose = tmp_path / "loose-python3"
    shutil.copy(real_python, loose)
    loose.chmod(0o775)  # group-writable
    someones = tmp_path / "someones-python3"
    shutil.copy(real_python, someones)
    os.chown(someones, 1000, 1000)
    for python, why in [
        (shared / "python3", "writable by its group or others"),
        (loose, "0775"),
        (someones, "owned by uid 1000"),
    ]:
        with pytest.raises(ConfigError, match=f"refusing.*{re.escape(str(python))}.*{why}"):
            install(python)
        assert not (tmp_path / "mount.dgfs").exists()
    # The interpreter running the tests is root's own: installed as usual.
    target = install(real_python)
    assert f"{real_python} -I -m dgfs.mount_helper" in target.read_text()


# --- real mounts --------------------------------------------------------------------


@pytest.fixture
def mounts(moto_endpoint: str, tmp_path: Path) -> Iterator[Mounts]:
    with Mounts(moto_endpoint, tmp_path) as factory:
        yield factory


@pytest.fixture
def installed_helper() -> Iterator[Path]:
    """/sbin/mount.dgfs for this environment; the previous one (if any) is put back."""
    if os.geteuid() != 0:
        pytest.skip("installing /sbin/mount.dgfs needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount(8) not installed")
    previous = HELPER.read_bytes() if HELPER.exists() else None
    subprocess.run([dgfs_bin(), "install-helper", "--path", str(HELPER)], check=True)
    try:
        yield HELPER
    finally:
        if previous is None:
            HELPER.unlink(missing_ok=True)
        else:
            HELPER.write_bytes(previous)
            HELPER.chmod(0o755)


def _zip() -> tuple[str, bytes]:
    return ReleaseSeries(size=256 << 10, seed=51).next_zip()


@pytest.mark.mount
def test_mount_t_dgfs_round_trip(mounts: Mounts, installed_helper: Path) -> None:
    mount = mounts.mount(via_mount_t=True, _netdev=None, nofail=None)
    assert mount_fstype(mount.mountpoint) == "fuse.dgfs"
    assert mount.pid in daemon_pids(mount.mountpoint)
    name, data = _zip()
    (mount / "app").mkdir()
    (mount / "app" / name).write_bytes(data)
    (mount / "app" / "note.txt").write_text("hello from mount -t\n")
    assert sha256_file(mount / "app" / name) == sha256_bytes(data)
    mount.unmount(with_umount=True)
    assert not is_mounted(mount.mountpoint)
    view = S3View(mount.endpoint, mount.bucket)
    try:
        assert view.metadata(f"app/{name}.delta")["dg-file-sha256"] == sha256_bytes(data)
        assert view.get("app/note.txt") == b"hello from mount -t\n"
    finally:
        view.close()
    # The daemon logged to the cache dir (no syslog here); nothing alarming in it.
    assert "mounted s3://" in mount.log_text()
    mount.check_log()

    # And again, read-only, with a prefix as the root.
    mount.source = f"{mount.bucket}/app"
    mount.remount(ro=None)
    assert (mount / "note.txt").read_text() == "hello from mount -t\n"
    assert sha256_file(mount / name) == sha256_bytes(data)
    with pytest.raises(OSError):
        (mount / "new.txt").write_text("refused")
    mount.unmount(with_umount=True)


@pytest.mark.mount
def test_mount_t_dgfs_reports_a_missing_bucket(
    installed_helper: Path, moto_endpoint: str, tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = subprocess.run(
        [
            "mount",
            "-t",
            "dgfs",
            "no-such-bucket-for-helper",
            str(mnt),
            "-o",
            f"endpoint={moto_endpoint},cache_dir={tmp_path / 'cache'},_netdev",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "no-such-bucket-for-helper" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not is_mounted(mnt)


@pytest.mark.mount
def test_daemon_mode_round_trip(mounts: Mounts) -> None:
    mount = mounts.mount(daemon=True)
    assert mount.pid is not None and mount.proc is None
    name, data = _zip()
    (mount / name).write_bytes(data)
    mount.unmount()
    mount.check_log()
    mount.remount()
    assert sha256_file(mount / name) == sha256_bytes(data)


@pytest.mark.mount
def test_daemon_mode_with_relative_paths(mounts: Mounts, tmp_path: Path) -> None:
    """The daemon works from /, yet a relative cache_key_file given from elsewhere is found."""
    key = tmp_path / "cache.key"
    key.write_text(base64.urlsafe_b64encode(os.urandom(32)).decode())
    key.chmod(0o600)
    mount = mounts.mount(daemon=True, cache_key_file="cache.key", start=False)
    mount.cwd = tmp_path
    mount.start()
    name, data = _zip()
    (mount / name).write_bytes(data)
    mount.settle(mount / name)
    assert sha256_file(mount / name) == sha256_bytes(data)
    mount.unmount()
    # With a key the cache is the persistent one, not a per-process throwaway.
    assert (mount.cache_dir / "content").is_dir()
    assert not list(mount.cache_dir.glob("content-ephemeral-*"))
    mount.check_log()
