"""Least privilege: the daemon runs as an unprivileged user, and in systemd's sandbox.

- As a plain user (``nobody``), ``dgfs mount`` mounts through the setuid
  ``fusermount3`` like any FUSE filesystem.
- The sandboxed mount of ``systemd/dgfs@.service``, with systemd played
  by this test: ``dgfs mount ... --handoff USER`` (root, ``ExecStartPre=+``)
  mounts and sends the /dev/fuse descriptor to a notify socket as to
  systemd's descriptor store; the daemon then starts as ``nobody`` in a
  mount namespace of its own that is a *slave* of the host's (the
  propagation systemd gives a sandboxed service), with the root file system
  read-only but for its cache (``ProtectSystem=strict`` + ``CacheDirectory=``),
  in a user namespace that maps only root and itself (``PrivateUsers=``),
  no new privileges, no capabilities, no writable-executable memory
  (``MemoryDenyWriteExecute=``), the unit's system-call filter (loaded with
  libseccomp from python3-seccomp), and the descriptor as fd 3 with
  ``LISTEN_FDS``. The host sees and uses the mount; stopping as the unit
  does (``umount --lazy`` as root, then SIGTERM) uploads everything first.
- ``systemd-analyze security --offline=true`` rates the unit 1.2 (the docs' figure).

Only processes started here are signalled, by PID; every mount made here
is detached in ``finally`` blocks.
"""

from __future__ import annotations

import array
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mountutil import S3View, dgfs_bin, fusermount, is_mounted, new_bucket

pytestmark = pytest.mark.mount

NOBODY = 65534
ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "dgfs@.service"
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, setpriv, unshare)")
needs_tools = pytest.mark.skipif(
    not (shutil.which("setpriv") and shutil.which("unshare") and shutil.which("fusermount3")),
    reason="needs setpriv, unshare (util-linux) and fusermount3",
)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory ``nobody`` can reach (pytest's tmp_path is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="dgfs-unpriv-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for mountpoint in (path / "mnt",):
            if is_mounted(mountpoint):
                fusermount("-uz", str(mountpoint))
        shutil.rmtree(path, ignore_errors=True)


def _daemon_env(endpoint: str, **extra: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name.startswith("AWS_")
        and name not in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
    }
    env.update(
        PATH="/usr/local/bin:/usr/bin:/bin",
        HOME="/nonexistent",
        AWS_CONFIG_FILE="/nonexistent/config",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent/credentials",
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
        **extra,
    )
    if "PYTHONPATH" in os.environ:  # a worktree under test, not the installed copy
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def _as_nobody(*, no_new_privs: bool) -> list[str]:
    command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    if no_new_privs:
        command += ["--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"]
    return [*command, "--"]


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _wait_mounted(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while not is_mounted(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"not mounted (exit {proc.poll()}):\n{log.read_text()}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Our daemon, by PID: SIGKILL if it is still there."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _clean_log(log: Path) -> str:
    text = log.read_text(errors="replace")
    bad = [
        line
        for line in text.splitlines()
        if re.search(r"Traceback|\b(ERROR|CRITICAL|WARNING)\b", line)
    ]
    assert not bad, text
    return text


_USER_MOUNT = """
set -e
# Users may open /dev/fuse, as distributions ship it (0666), in this namespace only.
mknod -m 666 "$DIR/fuse" c 10 229
mount --bind "$DIR/fuse" /dev/fuse
"$@" > "$DIR/daemon.log" 2>&1 &
daemon=$!
trap 'kill -KILL $daemon 2>/dev/null || true' EXIT
for _ in $(seq 900); do
    grep -q " $MNT " /proc/self/mountinfo && break
    kill -0 $daemon
    sleep 0.1
done
echo "daemon uid: $(awk '/^Uid/{print $2}' /proc/$daemon/status)"
setpriv --reuid=65534 --regid=65534 --clear-groups --no-new-privs -- "$PY" -c "$WRITE" "$MNT"
setpriv --reuid=65534 --regid=65534 --clear-groups -- fusermount3 -u "$MNT"
wait $daemon
echo "daemon exit: $?"
"""


@needs_root
@needs_tools
def test_an_unprivileged_user_mounts_through_fusermount3(
    moto_endpoint: str, open_dir: Path
) -> None:
    """``nobody`` mounts (through the setuid fusermount3), writes, reads back and
    unmounts its own mount; the daemon runs as nobody. In a mount namespace of
    the test's own where users may open /dev/fuse (this machine keeps it 0600:
    FUSE for root only, and fusermount3 opens it with the user's rights)."""
    bucket = new_bucket(moto_endpoint)
    mnt, cache = open_dir / "mnt", open_dir / "cache"
    mnt.mkdir()
    cache.mkdir()
    os.chown(mnt, NOBODY, NOBODY)  # fusermount3 mounts only where the user may write
    os.chown(cache, NOBODY, NOBODY)
    options = f"endpoint={moto_endpoint},cache_dir={cache},log_level=info"
    daemon = [*_as_nobody(no_new_privs=False), dgfs_bin(), "mount", bucket, str(mnt)]
    # Without allow_other only the mounting user may enter: nobody writes and reads.
    write = (
        "import os, sys; p = sys.argv[1] + '/app/a.bin'; os.mkdir(sys.argv[1] + '/app');"
        "open(p, 'wb').write(b'x' * 300000); fd = os.open(p, os.O_RDONLY); os.fsync(fd);"
        "assert open(p, 'rb').read() == b'x' * 300000"
    )
    env = _daemon_env(moto_endpoint, DIR=str(open_dir), MNT=str(mnt), PY=sys.executable)
    env["WRITE"] = write
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--",
         "/bin/sh", "-c", _USER_MOUNT, "sh", *daemon, "-f", "-o", options],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )  # fmt: skip
    log = (open_dir / "daemon.log").read_text(errors="replace")
    assert result.returncode == 0, result.stdout + result.stderr + log
    assert f"daemon uid: {NOBODY}" in result.stdout
    assert "daemon exit: 0" in result.stdout, result.stdout + log
    assert S3View(moto_endpoint, bucket).keys("app/")
    _clean_log(open_dir / "daemon.log")
    assert not is_mounted(mnt)  # never visible here: the namespace was the test's own


class FakeSystemd:
    """systemd's side of the notify protocol for one unit: a datagram socket that
    keeps descriptors sent with ``FDSTORE=1`` and confirms ``BARRIER=1``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        os.chmod(path, 0o777)  # the daemon (nobody) notifies too
        self.store: dict[str, int] = {}
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout: float) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % 4])
                fds += list(received)
        message = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.messages.append(message)
        if message.get("BARRIER") == "1":
            for fd in fds:
                os.close(fd)
        elif message.get("FDSTOREREMOVE") == "1":
            old = self.store.pop(message["FDNAME"], None)
            if old is not None:
                os.close(old)
        elif message.get("FDSTORE") == "1":
            assert len(fds) == 1, message
            self.store[message.get("FDNAME", "stored")] = fds[0]
        else:
            for fd in fds:
                os.close(fd)
        return message

    def wait_for(self, key: str, timeout: float = 90) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(max(0.1, deadline - time.monotonic()))
            if key in message:
                return message

    def close(self) -> None:
        for fd in self.store.values():
            os.close(fd)
        self.store.clear()
        self.sock.close()


def _unit_command(setting: str, mountpoint: Path) -> list[str]:
    """The unit's (one) ``setting=`` command line as systemd would run it for ``mountpoint``."""
    (line,) = [x for x in UNIT.read_text().splitlines() if x.startswith(f"{setting}=")]
    command = line.split("=", 1)[1].lstrip("-+")
    return shlex.split(command.replace("%f", str(mountpoint)).replace("$$", "$"))


def _wait_ready(
    systemd: FakeSystemd, daemon: subprocess.Popen[bytes], log: Path, timeout: float = 90
) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and daemon.poll() is None:
        with contextlib.suppress(TimeoutError):
            message = systemd.receive(0.5)
            if "READY" in message:
                return message
    raise AssertionError(f"no READY=1 (exit {daemon.poll()}):\n{log.read_text()}")


def _syscalls(group: str) -> set[str]:
    """The system calls of a systemd syscall group, nested groups expanded."""
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager", group],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    names: set[str] = set()
    for line in listing.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        names |= _syscalls(item) if item.startswith("@") else {item}
    return names


#: libseccomp's Python binding comes with the system's Python (python3-seccomp);
#: the venv's Python 3.11 loads the same extension module.
SYSTEM_SITE = "/usr/lib/python3/dist-packages"


def _unit_syscall_filter(directory: Path) -> Path | None:
    """The system calls the unit's SystemCallFilter= lines allow (the first
    line's groups minus the second's), one per line in a file; None without
    python3-seccomp or systemd-analyze (then only systemd itself applies them)."""
    if not Path(SYSTEM_SITE, "seccomp.cpython-311-x86_64-linux-gnu.so").exists():
        return None
    if shutil.which("systemd-analyze") is None or sys.version_info[:2] != (3, 11):
        return None
    lines = [x for x in UNIT.read_text().splitlines() if x.startswith("SystemCallFilter=")]
    allow_groups = lines[0].split("=", 1)[1].split()
    deny_groups = lines[1].split("=", 1)[1].lstrip("~").split()
    allowed = set().union(*map(_syscalls, allow_groups)) - set().union(*map(_syscalls, deny_groups))
    path = directory / "allowed-syscalls.txt"
    path.write_text("\n".join(sorted(allowed)))
    return path


_USERNS_EXEC = """
import ctypes, os, sys
# PrivateUsers=: a user namespace where only root and the service's user exist.
# Its maps are written from outside (by a helper left in the host's namespace),
# as only a process privileged there may map more than its own uid.
CLONE_NEWUSER = 0x10000000
ready_r, ready_w = os.pipe()
helper = os.fork()
if helper == 0:
    os.close(ready_w)
    os.read(ready_r, 1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{os.getppid()}/{name}", "w") as f:
            f.write(f"0 0 1\\n{sys.argv[1]} {sys.argv[1]} 1\\n")
    os._exit(0)
os.close(ready_r)
libc = ctypes.CDLL(None, use_errno=True)
assert libc.unshare(CLONE_NEWUSER) == 0, os.strerror(ctypes.get_errno())
os.write(ready_w, b"x")
assert os.waitpid(helper, 0)[1] == 0
os.execvp(sys.argv[2], sys.argv[2:])
"""


def _private_users() -> list[str]:
    """A prefix for the unit's PrivateUsers=yes (else none): the rest runs in a
    user namespace mapping only root and ``nobody`` (the test's service user)."""
    if "PrivateUsers=yes" not in UNIT.read_text().splitlines():
        return []
    return [sys.executable, "-c", _USERNS_EXEC, str(NOBODY)]


def _unit_address_families() -> list[int]:
    """The unit's RestrictAddressFamilies= as numbers (AF_UNIX: 1, ...)."""
    (line,) = [x for x in UNIT.read_text().splitlines() if x.startswith("RestrictAddressFamilies=")]
    return sorted(int(getattr(socket, name)) for name in line.split("=", 1)[1].split())


def _sandboxed_dgfs(directory: Path) -> tuple[list[str], list[str]]:
    """``(command, what it enforces)``: ``dgfs`` in a process that first forbids
    writable-executable memory (prctl PR_SET_MDWE, Linux 6.3+: what
    MemoryDenyWriteExecute= enforces) and loads the unit's system-call filter
    (libseccomp; every other call fails with EPERM, as SystemCallErrorNumber=
    says), before dgfs, pyfuse3, trio, boto3 or cryptography is imported; in
    the same process, as the venv's Python may live where the daemon's user
    could not exec it again. Each part only where this machine can do it."""
    parts = ["import ctypes, errno, os, sys"]
    mdwe = (
        "libc = ctypes.CDLL(None, use_errno=True);"
        f"assert libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0,"
        " os.strerror(ctypes.get_errno())"
    )
    enforced = []
    probe = subprocess.run(
        [sys.executable, "-c", f"import ctypes, os; {mdwe}"], capture_output=True, timeout=60
    )
    if probe.returncode == 0:
        parts.append(mdwe)
        enforced.append("MemoryDenyWriteExecute")
    allowed = _unit_syscall_filter(directory)
    if allowed is not None:
        parts += [
            f"sys.path.append({SYSTEM_SITE!r}); import seccomp; sys.path.remove({SYSTEM_SITE!r})",
            "f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))",
            f"names = open({str(allowed)!r}).read().split()",
            "[f.add_rule(seccomp.ALLOW, n) for n in names if n != 'socket' and"
            " seccomp.resolve_syscall(seccomp.Arch.NATIVE, n) >= 0]",
            # RestrictAddressFamilies=: socket() of another family fails EAFNOSUPPORT.
            f"families = {_unit_address_families()!r}",
            "[f.add_rule(seccomp.ALLOW, 'socket', seccomp.Arg(0, seccomp.EQ, n))"
            " for n in families]",
            "deny = seccomp.ERRNO(errno.EAFNOSUPPORT)",
            "[f.add_rule(deny, 'socket', seccomp.Arg(0, seccomp.EQ, n))"
            " for n in range(max(families)) if n not in families]",
            "f.add_rule(deny, 'socket', seccomp.Arg(0, seccomp.GT, max(families)))",
            "f.load()",
        ]
        enforced += ["SystemCallFilter", "RestrictAddressFamilies"]
    parts.append("from dgfs.cli.main import main; sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", "\n".join(parts)], enforced


@needs_root
@needs_tools
def test_the_sandboxed_unit_mounts_for_the_host(moto_endpoint: str, open_dir: Path) -> None:
    """The unit's design without systemd: the privileged step mounts and hands
    over /dev/fuse; the daemon, unprivileged in a slave mount namespace with a
    read-only root, serves a mount that the host sees, writes and reads; the
    unit's stop (root's lazy umount, then SIGTERM) uploads everything."""
    bucket = new_bucket(moto_endpoint)
    mnt, cache, log = open_dir / "mnt", open_dir / "cache", open_dir / "daemon.log"
    mnt.mkdir()
    cache.mkdir(mode=0o700)
    os.chown(cache, NOBODY, NOBODY)  # CacheDirectory= of the unit, owned by User=
    systemd = FakeSystemd(open_dir / "notify.sock")
    # A name to resolve, as real endpoints are: getaddrinfo under the unit's filters.
    endpoint = moto_endpoint.replace("127.0.0.1", "localhost")
    options = f"endpoint={endpoint},allow_other,log_level=info"
    common = [bucket, str(mnt), "-o", f"cache_dir={cache}", "-o", options]
    daemon: subprocess.Popen[bytes] | None = None
    try:
        # ExecStartPre=+dgfs mount ... --handoff nobody: as root, on the host.
        env = _daemon_env(moto_endpoint, NOTIFY_SOCKET=str(systemd.path))
        step = subprocess.Popen(
            [dgfs_bin(), "mount", *common, "--handoff", "nobody"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        stored = systemd.wait_for("FDSTORE")
        assert stored == {"FDSTORE": "1", "FDNAME": "fuse", "FDPOLL": "0"}
        systemd.wait_for("BARRIER")
        output, _ = step.communicate(timeout=90)
        assert step.returncode == 0, output.decode()
        assert is_mounted(mnt)  # mounted on the host (not to be touched before it is served)
        fuse_fd = systemd.store["fuse"]

        # ExecStart=dgfs mount ... --fuse-fd systemd: sandboxed, as User=nobody.
        sandboxed_dgfs, enforced = _sandboxed_dgfs(open_dir)
        print("also enforced here:", ", ".join(enforced) or "nothing more")
        sandbox = (
            f"mount --bind {cache} {cache} && mount -o remount,bind,ro / && "
            'exec env LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=fuse "$@"'
        )
        command = [
            *_private_users(),
            "unshare", "--mount", "--propagation", "slave", "--",
            "/bin/sh", "-c", sandbox, "sh",
            *_as_nobody(no_new_privs=True),
            *sandboxed_dgfs, "mount", *common, "-f", "--fuse-fd", "systemd",
        ]  # fmt: skip
        with open(log, "wb") as out:
            daemon = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                pass_fds=(3,),
                preexec_fn=lambda: os.dup2(fuse_fd, 3),
                start_new_session=True,
            )
        ready = _wait_ready(systemd, daemon, log)
        assert ready["MAINPID"] == str(daemon.pid)
        assert "fuse" not in systemd.store  # FDSTOREREMOVE: only the daemon holds it now
        status = _proc_status(daemon.pid)
        assert status["Uid"].split()[0] == str(NOBODY)
        assert status["NoNewPrivs"] == "1"
        assert int(status["CapBnd"], 16) == 0 and int(status["CapEff"], 16) == 0
        if "SystemCallFilter" in enforced:
            assert status["Seccomp"].strip() == "2"  # a filter is loaded
            allowed = set((open_dir / "allowed-syscalls.txt").read_text().split())
            assert {"read", "openat", "setrlimit", "execve"} <= allowed
            assert not {"mount", "ptrace", "setuid", "chown", "reboot"} & allowed
        assert os.readlink(f"/proc/{daemon.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        if _private_users():
            assert os.readlink(f"/proc/{daemon.pid}/ns/user") != os.readlink("/proc/self/ns/user")
            uid_map = Path(f"/proc/{daemon.pid}/uid_map").read_text().split()
            assert uid_map == ["0", "0", "1", str(NOBODY), str(NOBODY), "1"]

        # ExecStartPost=+: root sets the read-ahead the sandboxed daemon cannot.
        subprocess.run(_unit_command("ExecStartPost", mnt), check=True, timeout=30)
        device = subprocess.run(
            ["mountpoint", "-d", str(mnt)], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text().strip() == "1024"

        # The host (root, allow_other) uses the mount; the second release is stored
        # as a delta, so xdelta3 runs inside the sandbox too.
        first = os.urandom(200_000)
        second = first[:150_000] + b"changed" + first[150_000:]
        (mnt / "app").mkdir()
        (mnt / "app" / "app-1.0.zip").write_bytes(first)
        (mnt / "app" / "app-1.1.zip").write_bytes(second)
        for name in ("app-1.0.zip", "app-1.1.zip"):
            fd = os.open(mnt / "app" / name, os.O_RDONLY)
            try:
                os.fsync(fd)  # returns once it is in S3
            finally:
                os.close(fd)
        assert (mnt / "app" / "app-1.0.zip").read_bytes() == first
        assert (mnt / "app" / "app-1.1.zip").read_bytes() == second
        assert sorted(os.listdir(mnt / "app")) == ["app-1.0.zip", "app-1.1.zip"]
        # Its writes landed in the cache, the one writable place.
        assert any(path.stat().st_uid == NOBODY for path in cache.rglob("*"))

        # Root on the host reads the sandboxed daemon's status (its socket is in the cache).
        status_run = subprocess.run(
            [dgfs_bin(), "status", str(mnt)], capture_output=True, text=True, timeout=60
        )
        assert status_run.returncode == 0, status_run.stdout + status_run.stderr

        # ExecStop=+umount --lazy, then SIGTERM: pending uploads finish, then exit.
        subprocess.run(_unit_command("ExecStop", mnt), check=True, timeout=30)
        assert not is_mounted(mnt)
        os.kill(daemon.pid, signal.SIGTERM)
        assert daemon.wait(120) == 0, log.read_text()
        keys = S3View(moto_endpoint, bucket).keys("app/")
        assert {"app/reference.bin", "app/app-1.1.zip.delta"} <= set(keys), keys
        assert systemd.wait_for("STOPPING")["STOPPING"] == "1"
        text = _clean_log(log)
        assert "all uploads done" in text
    finally:
        if daemon is not None:
            _stop(daemon)
        if is_mounted(mnt):
            fusermount("-uz", str(mnt))
        systemd.close()


def test_handoff_refuses_to_run_outside_systemd(tmp_path: Path) -> None:
    """Without NOTIFY_SOCKET nobody could take the descriptor: nothing is mounted."""
    (tmp_path / "mnt").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    result = subprocess.run(
        [dgfs_bin(), "mount", "b", str(tmp_path / "mnt"), "--handoff", "nobody"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 2
    assert "ExecStartPre=+" in result.stderr
    assert not is_mounted(tmp_path / "mnt")


def test_fuse_fd_systemd_needs_the_descriptor(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    result = subprocess.run(
        [dgfs_bin(), "mount", "b", str(tmp_path / "mnt"), "-f", "--fuse-fd", "systemd"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 2
    assert "passed no descriptor named 'fuse'" in result.stderr


def test_a_descriptor_that_is_not_dev_fuse_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    with open(tmp_path / "plain", "wb") as plain:
        fd = plain.fileno()
        result = subprocess.run(
            [dgfs_bin(), "mount", "b", str(tmp_path / "mnt"), "-f", "--fuse-fd", str(fd)],
            capture_output=True,
            text=True,
            timeout=60,
            pass_fds=(fd,),
            check=False,
        )
    assert result.returncode == 2
    assert f"descriptor {fd} is not /dev/fuse" in result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_unit_is_rated_1_2_by_systemd_analyze(tmp_path: Path) -> None:
    """The figure README.md and docs/operations.md give (it was 9.6 as root, unsandboxed)."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 1.2, result.stdout


def test_the_unit_hands_over_the_mount_and_serves_it_sandboxed() -> None:
    """The unit's privileged step and its daemon agree: same source, mount point
    and options, --handoff for the unit's User=, --fuse-fd systemd; and only the
    privileged steps carry the "+" that escapes the sandbox."""
    text = UNIT.read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    user = next(line.split("=", 1)[1] for line in lines if line.startswith("User="))
    (start,) = [line for line in lines if line.startswith("ExecStart=")]
    pre = [line for line in lines if line.startswith("ExecStartPre=")]
    (handoff,) = [line for line in pre if "--handoff" in line]
    assert start.startswith("ExecStart=/") and "--fuse-fd systemd" in start
    assert handoff.startswith("ExecStartPre=+") and handoff.endswith(f"--handoff {user}")
    assert "${DGFS_SOURCE} %f" in handoff and "${DGFS_SOURCE} %f" in start
    assert "-o ${DGFS_OPTIONS}" in handoff and "-o ${DGFS_OPTIONS}" in start
    for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                    "ProtectHome=yes", "CapabilityBoundingSet=", "NotifyAccess=exec",
                    "FileDescriptorStoreMax=1"):  # fmt: skip
        assert setting in lines, setting
