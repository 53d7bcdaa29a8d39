"""The Debian package, end to end: build, install, doctor, mount -t dgfs, remove, purge.

One test, as CI runs it (root on Debian 12): ``packaging/build-deb`` builds
the .deb (plus wheel and sdist) and fails on lintian errors; ``dpkg -i``
installs it; the installed ``dgfs doctor`` passes against moto_server; a
``mount -t dgfs`` through the installed ``/sbin/mount.dgfs`` (run from a
directory holding a planted ``dgfs`` package, which must not be imported)
stores a file; ``dpkg -r`` removes every file, and ``dpkg --purge`` keeps a
cache whose journal holds a file not yet uploaded, saying so.

It replaces no package: a machine with dgfs installed skips it. Deselect it
with ``-m "not package"`` (it takes a few minutes, most of them building).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgfs import __version__
from tests.mountutil import is_mounted
from testsupport.servers import s3_client

ROOT = Path(__file__).resolve().parents[1]
PREFIX = Path("/opt/dgfs")
DGFS = Path("/usr/bin/dgfs")
HELPER = Path("/sbin/mount.dgfs")
#: Where the test plants a journal entry for purge to find (a dgfs@ unit's cache).
UNIT_CACHE = Path("/var/cache/dgfs/dgfs-package-test")

pytestmark = [pytest.mark.package, pytest.mark.slow, pytest.mark.timeout(900)]


def _installed() -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status}", "dgfs"], capture_output=True, text=True
    )
    return result.returncode == 0 and result.stdout.strip() not in ("", "not-installed")


def _skip_reason() -> str | None:
    if shutil.which("dpkg") is None or shutil.which("apt-get") is None:
        return "not a Debian system (no dpkg/apt-get): the package cannot be built or installed"
    if os.geteuid() != 0:
        return "needs root: installs the package with dpkg -i"
    if _installed():
        return "a dgfs package is installed on this machine: the test does not replace it"
    return None


def run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 600)
    return subprocess.run([str(arg) for arg in args], **kwargs)  # type: ignore[call-overload]


def check(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"{result.args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


@pytest.fixture
def purged_after() -> Iterator[None]:
    """Whatever the test did, the package is purged afterwards."""
    yield
    if _installed():
        run("dpkg", "--purge", "dgfs")


def daemon_cmdline(mountpoint: Path) -> str | None:
    """The command line of the process serving ``mountpoint`` (found by its arguments)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(mountpoint).encode() in args:
            return " ".join(arg.decode(errors="replace") for arg in args if arg)
    return None


def test_the_package_builds_installs_mounts_and_purges(
    moto_endpoint: str, bucket_name: str, tmp_path: Path, purged_after: None
) -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    out = check(run(ROOT / "packaging" / "build-deb", cwd=ROOT, timeout=840))
    built = time.monotonic() - started
    print(out)  # the build's phases and their times, for CI's log
    arch = check(run("dpkg", "--print-architecture")).strip()
    deb = ROOT / "dist" / f"dgfs_{__version__}_{arch}.deb"
    assert deb.is_file(), out
    assert (ROOT / "dist" / f"dgfs-{__version__}-py3-none-any.whl").is_file()
    assert (ROOT / "dist" / f"dgfs-{__version__}.tar.gz").is_file()
    fields = check(run("dpkg-deb", "-f", deb, "Depends", "Recommends"))
    assert "fuse3" in fields and "xdelta3" in fields and "Recommends: pristine-tar" in fields

    check(run("dpkg", "-i", deb))
    # what the package put in place
    assert check(run(DGFS, "--version")).strip() == f"dgfs {__version__}"
    assert f"{PREFIX}/bin/python -I -m dgfs.mount_helper" in HELPER.read_text()
    unit = Path("/lib/systemd/system/dgfs@.service").read_text()
    assert "ExecStart=/usr/bin/dgfs mount " in unit and "/usr/local/bin" not in unit
    etc = Path("/etc/dgfs")
    assert etc.stat().st_mode & 0o777 == 0o700 and etc.stat().st_uid == 0
    example = etc / "mnt-releases.env.example"
    assert example.stat().st_mode & 0o777 == 0o600
    assert check(run("getent", "passwd", "dgfs")).startswith("dgfs:")
    for page in ("man1/dgfs.1.gz", "man1/dgfs-doctor.1.gz", "man8/mount.dgfs.8.gz"):
        assert (Path("/usr/share/man") / page).is_file(), page
    assert list(PREFIX.glob("lib/python3.11/site-packages/dgfs/__pycache__/*.pyc"))

    # the installed doctor, then a mount through the installed helper
    cache = tmp_path / "cache"
    options = f"endpoint={moto_endpoint},cache_dir={cache}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    report = run(DGFS, "doctor", bucket_name, "-o", options, "--json", env=env, cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    assert json.loads(report.stdout)["ok"] is True

    planted = tmp_path / "cwd"
    (planted / "dgfs").mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    (planted / "dgfs" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mounted = run(
        "mount", "-t", "dgfs", bucket_name, mountpoint, "-o", f"_netdev,{options}",
        env={**env, "PYTHONPATH": str(planted)}, cwd=planted, timeout=120,
    )  # fmt: skip
    try:
        assert mounted.returncode == 0, mounted.stderr
        assert not marker.exists(), "mount.dgfs imported a dgfs package from its directory"
        assert is_mounted(mountpoint)
        cmdline = daemon_cmdline(mountpoint)
        assert cmdline is not None and cmdline.startswith(f"{PREFIX}/bin/python -I -m"), cmdline
        (mountpoint / "hello.txt").write_text("from the package\n")
        check(run(DGFS, "sync", mountpoint, env=env))
    finally:
        if is_mounted(mountpoint):
            check(run("umount", mountpoint))
    deadline = time.monotonic() + 60
    while daemon_cmdline(mountpoint) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    client = s3_client(moto_endpoint)
    try:
        body = client.get_object(Bucket=bucket_name, Key="hello.txt")["Body"].read()
    finally:
        client.close()
    assert body == b"from the package\n"

    # remove: every file of the package goes; purge keeps a journal with a pending file
    check(run("dpkg", "-r", "dgfs"))
    for path in (DGFS, HELPER, PREFIX, Path("/lib/systemd/system/dgfs@.service")):
        assert not path.exists(), path
    pending = UNIT_CACHE / "journal" / "slot" / "entry.json"
    pending.parent.mkdir(parents=True, exist_ok=True)
    pending.write_text("{}")
    try:
        purge = run("dpkg", "--purge", "dgfs")
        assert purge.returncode == 0, purge.stderr
        assert "dgfs: kept /var/cache/dgfs" in purge.stderr
        assert pending.exists()
        assert not etc.exists()
    finally:
        shutil.rmtree(UNIT_CACHE, ignore_errors=True)
    print(f"package built in {built:.0f} s; whole test {time.monotonic() - started:.0f} s")
