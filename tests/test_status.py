"""``dgfs status``, the control socket and the Prometheus endpoint.

- The counters (dgfs/telemetry.py) and the address rules of ``-o metrics=``.
- A real mount after a known workload: ``dgfs status --json`` and
  ``/metrics`` report exactly the files, bytes, kinds and cache lookups the
  test predicts from what it wrote and read (the stored sizes come from
  the files' own ``user.dgfs.stored_size``).
- An upload that fails for good shows up with its path and the place its
  data is kept; the socket is 0600 and another user gets a clear refusal.
- The systemd units pass ``systemd-analyze verify``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

import pytest

from dgfs import control, metrics
from dgfs.cli.main import build_parser
from dgfs.cli.main import main as dgfs_main
from dgfs.control import _answer, public_endpoint
from dgfs.errors import ConfigError
from dgfs.metrics import parse_listen_address
from dgfs.mount_helper import translate
from dgfs.telemetry import Histogram, Telemetry
from tests.mountutil import DgfsMount, Mounts, S3View, daemon_env, dgfs_bin
from testsupport.fuzz_targets import _complete, _Stream
from testsupport.servers import free_port

REPO = Path(__file__).resolve().parent.parent

# --- units: counters, addresses, credentials -------------------------------------------


def test_histogram_is_cumulative_like_prometheus() -> None:
    h = Histogram(bounds=(0.1, 1.0))
    h.counts = [0, 0, 0]
    for seconds in (0.05, 0.1, 0.5, 3.0):
        h.observe(seconds)
    assert h.cumulative() == [(0.1, 2), (1.0, 3), (float("inf"), 4)]
    assert h.count == 4 and h.total == pytest.approx(3.65)


def test_snapshot_ratio_and_hit_rate() -> None:
    t = Telemetry()
    assert t.snapshot().ratio is None and t.snapshot().cache_hit_rate is None
    t.uploaded("delta", 1000, 100, 0.2)
    t.uploaded("direct", 1000, 1000, 0.1)
    t.cache_lookup(True)
    t.cache_lookup(True)
    t.cache_lookup(False)
    snap = t.snapshot()
    assert snap.uploads == {"delta": 1, "direct": 1} and snap.uploaded_files == 2
    assert snap.ratio == pytest.approx(0.55)
    assert snap.cache_hit_rate == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("text", "host", "port", "loopback"),
    [
        ("9464", "127.0.0.1", 9464, True),
        ("localhost:9464", "127.0.0.1", 9464, True),
        ("127.0.0.1:9100", "127.0.0.1", 9100, True),
        ("[::1]:9464", "::1", 9464, True),
        ("0.0.0.0:9464", "0.0.0.0", 9464, False),
        ("10.1.2.3:9464", "10.1.2.3", 9464, False),
    ],
)
def test_metrics_addresses(text: str, host: str, port: int, loopback: bool) -> None:
    address = parse_listen_address(text)
    assert (address.host, address.port, address.is_loopback) == (host, port, loopback)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("buildhost:9464", "not an IP address"),
        ("127.0.0.1:http", "bad port"),
        ("127.0.0.1:70000", "bad port"),
        ("[::1:9464", "[IPv6]:PORT"),
    ],
)
def test_bad_metrics_addresses_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_listen_address(text)


def test_endpoint_never_shows_credentials() -> None:
    assert public_endpoint("http://AKIA:secret@s3.local:9000/") == "http://s3.local:9000/"
    assert public_endpoint("https://s3.amazonaws.com") == "https://s3.amazonaws.com"
    assert public_endpoint(None) == ""


def test_a_status_request_nesting_deeper_than_json_recurses_is_refused() -> None:
    # Found by fuzzing (tests/fuzz_corpus/control/crash-dbb2cb47...): the
    # parser recursed once per bracket and its RecursionError escaped.
    def document() -> dict[str, Any]:
        raise AssertionError("no status for a malformed request")

    for request in (b"[" * 5000, b'{"a":' * 5000, b'{"request": ' + b"[" * 5000):
        assert _answer(request, document) == {"error": "a request is one JSON object on one line"}


def test_a_request_sent_byte_by_byte_costs_the_trio_thread_little() -> None:
    # Found by fuzzing (benchmarks/fuzz.py --target control, its slowest
    # input): each byte made the reader search everything received again,
    # 0.5 s of the trio thread for one 16 KiB metrics request head.

    def read_head(data: bytes) -> float:
        started = time.perf_counter()
        with contextlib.suppress(ValueError):
            _complete(metrics._read_head(cast(Any, _Stream(data, 1))))
        return time.perf_counter() - started

    assert min(read_head(b"G" * (20 << 10)) for _ in range(3)) < 0.2
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    assert _complete(metrics._read_head(cast(Any, _Stream(head + b"more", 1)))) == head
    line = _complete(control._read_line(cast(Any, _Stream(b'{"request": "status"}\nx', 1))))
    assert line == b'{"request": "status"}'


def test_metrics_option_reaches_dgfs_through_the_mount_helper() -> None:
    argv = translate(["releases", "/mnt/r", "-o", "_netdev,metrics=127.0.0.1:9464,allow_other"])
    assert argv == ["mount", "releases", "/mnt/r", "-o", "metrics=127.0.0.1:9464,allow_other"]


def test_status_of_a_plain_directory_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert dgfs_main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a dgfs mount" in err and "Traceback" not in err
    assert dgfs_main(["status", str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


# --- a real mount ------------------------------------------------------------------------


def status_json(mount: DgfsMount, *extra: str) -> dict[str, Any]:
    result = subprocess.run(
        [dgfs_bin(), "status", str(mount.mountpoint), "--json", *extra],
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``(sample name, sorted labels) -> value`` of every sample the endpoint serves."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def xattr(path: Path, name: str) -> str:
    return os.getxattr(path, f"user.dgfs.{name}").decode()


@pytest.mark.mount
def test_status_and_metrics_report_a_known_workload(mounts: Mounts) -> None:
    port = free_port()
    mount = mounts.mount(metrics=f"127.0.0.1:{port}", cache_size="64M")
    base = mount / "app"
    base.mkdir()
    rng = random.Random(10)
    # Five small text files (stored direct) and three similar images; the
    # first becomes the directory's reference, the others delta against it.
    payload = rng.randbytes(300_000)
    files: dict[str, bytes] = {f"notes-{i}.txt": b"line %d\n" % i * (100 + i) for i in range(5)}
    for i in range(3):
        files[f"build-{i}.iso"] = payload[: 200_000 + i] + bytes([i]) * 1000
    for name, data in files.items():
        (base / name).write_bytes(data)
        if name == "build-0.iso":
            mount.settle(base / name)  # the reference: uploads run in parallel
    sync = subprocess.run(
        [dgfs_bin(), "sync", "-q", str(base)], env=daemon_env(), timeout=60, check=False
    )
    assert sync.returncode == 0

    kinds: dict[str, int] = {}
    stored = 0
    for name in files:
        kind = xattr(base / name, "kind")
        kinds[kind] = kinds.get(kind, 0) + 1
        stored += int(xattr(base / name, "stored_size"))
    assert kinds.get("delta") == 3, kinds  # the workload is what the test means it to be
    original = sum(len(d) for d in files.values())

    # Reads: each open of an uploaded file asks the cache once. The first
    # open of each delta rebuilds it (a miss); the second finds it (a hit).
    for name in ("build-1.iso", "build-2.iso"):
        for _ in range(2):
            assert (base / name).read_bytes() == files[name]

    doc = status_json(mount)
    up, nbytes, cache = doc["uploads"], doc["bytes"], doc["cache"]
    assert doc["mount"]["bucket"] == mount.bucket and doc["mount"]["endpoint"] == mount.endpoint
    assert doc["mount"]["mountpoint"] == str(mount.mountpoint)
    assert doc["mount"]["metrics"] == f"127.0.0.1:{port}"
    assert (up["pending"], up["in_flight"], up["failed"]) == (0, 0, 0)
    assert up["uploaded"] == len(files) and up["uploaded_by_kind"] == kinds
    assert up["failed_files"] == []
    assert nbytes["written"] == original
    assert nbytes["uploaded_original"] == original
    assert nbytes["uploaded_stored"] == stored
    assert nbytes["ratio"] == pytest.approx(stored / original, abs=1e-6)
    assert (cache["hits"], cache["misses"]) == (2, 2), (doc["rebuilds"], up, cache)
    assert doc["rebuilds"]["count"] == 2
    assert cache["budget_bytes"] == 64 << 20 and 0 < cache["size_bytes"] <= 64 << 20
    assert doc["s3"]["errors"].get("AccessDenied", 0) == 0
    view = S3View(mount.endpoint, mount.bucket)
    try:
        listing = view.keys()
        objects = [k for k in listing if not k.startswith(".deltaglider/")]
    finally:
        view.close()
    # Every object was PUT once, plus the two PUTs of the If-None-Match probe
    # at mount time (the second refused: one PreconditionFailed).
    assert doc["s3"]["requests"]["PutObject"] == len(objects) + 2
    assert doc["s3"]["errors"]["PreconditionFailed"] == 1
    journal = doc["journal"]
    assert (journal["slot"], journal["slots_in_use"], journal["entries"]) == (0, 1, 0)
    assert journal["commits"] == len(files)

    samples = scrape(port)
    assert samples[("dgfs_uploads_pending", ())] == 0
    assert samples[("dgfs_uploads_failed_total", ())] == 0
    for kind, n in kinds.items():
        assert samples[("dgfs_uploads_total", (("kind", kind),))] == n
    assert samples[("dgfs_written_bytes_total", ())] == original
    assert samples[("dgfs_uploaded_original_bytes_total", ())] == original
    assert samples[("dgfs_uploaded_stored_bytes_total", ())] == stored
    assert samples[("dgfs_cache_hits_total", ())] == 2
    assert samples[("dgfs_cache_misses_total", ())] == 2
    assert samples[("dgfs_upload_duration_seconds_count", ())] == len(files)
    assert samples[("dgfs_upload_duration_seconds_bucket", (("le", "+Inf"),))] == len(files)
    assert samples[("dgfs_rebuild_duration_seconds_count", ())] == 2
    assert samples[("dgfs_s3_requests_total", (("operation", "PutObject"),))] == len(objects) + 2
    assert samples[("dgfs_cache_budget_bytes", ())] == 64 << 20
    info = [labels for (name, labels) in samples if name == "dgfs_mount_info"]
    assert dict(info[0])["bucket"] == mount.bucket
    # Nothing that identifies credentials, in any label or value.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "testing" not in text.replace("dgfs-mount", "")  # the test servers' key and secret
    with pytest.raises(urllib.error.HTTPError) as info_404:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    assert info_404.value.code == 404
    info_404.value.close()

    human = subprocess.run(
        [dgfs_bin(), "status", str(base)],  # a path inside the mount works too
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=30,
        check=False,
    )
    assert human.returncode == 0, human.stderr
    assert f"{len(files)} uploaded" in human.stdout and "0 failed" in human.stdout
    assert "hit rate 50.0% (2 hits, 2 misses)" in human.stdout


@pytest.mark.mount
def test_failed_upload_shows_with_its_path_and_where_the_data_is(mounts: Mounts) -> None:
    mount = mounts.mount(upload_delay="30")
    (mount / "ok.txt").write_text("stored\n")
    mount.settle(mount / "ok.txt")
    (mount / "late.txt").write_text("never uploaded")
    view = S3View(mount.endpoint, mount.bucket)
    try:
        listing = view.keys()
        for key in listing:
            view.client.delete_object(Bucket=mount.bucket, Key=key)
        view.client.delete_bucket(Bucket=mount.bucket)
    finally:
        view.close()
    mount.expect_log(r"late\.txt|NoSuchBucket|does not exist|could not be uploaded")
    fd = os.open(mount / "late.txt", os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)

    doc = status_json(mount)
    up = doc["uploads"]
    assert (up["failed"], up["uploaded"], up["pending"], up["in_flight"]) == (1, 1, 0, 0)
    (failed,) = up["failed_files"]
    assert failed["path"] == str(mount.mountpoint / "late.txt")
    assert failed["key"] == "late.txt" and "does not exist" in failed["error"]
    kept = Path(failed["kept_in"])
    assert kept.read_text() == "never uploaded" and kept.parent.name == "failed"
    assert doc["journal"]["failed_kept"] == 1
    assert doc["s3"]["errors"]["NoSuchBucket"] >= 1

    human = subprocess.run(
        [dgfs_bin(), "status", str(mount.mountpoint)],
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=30,
        check=False,
    )
    assert f"FAILED  {mount.mountpoint / 'late.txt'}" in human.stdout
    assert f"data kept in {kept}" in human.stdout


@pytest.mark.mount
def test_two_mounts_of_one_bucket_show_two_journal_slots(mounts: Mounts) -> None:
    first = mounts.mount()
    second = mounts.mount(first.bucket, cache_dir=first.cache_dir)
    one, two = status_json(first)["journal"], status_json(second)["journal"]
    assert (one["slot"], two["slot"]) == (0, 1)
    assert one["slots_in_use"] == two["slots_in_use"] == 2
    assert Path(two["directory"]).name == Path(one["directory"]).name + ".1"
    second.unmount()
    assert status_json(first)["journal"]["slots_in_use"] == 1


def _run_as(uid: int, argv: list[str]) -> tuple[int, str]:
    """``dgfs ARGV`` in a forked child that dropped to ``uid`` (code already imported)."""
    build_parser()  # imports every sub-command while still allowed to read them
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            os.close(read_fd)
            sys.stderr = open(write_fd, "w")  # noqa: SIM115 - pytest captures sys.stderr
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            code = dgfs_main(argv)
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        err = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


@pytest.mark.mount
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_socket_is_private_and_other_users_get_a_clear_error(mounts: Mounts) -> None:
    # Under a directory every user may enter (pytest's own are 0700).
    public = Path(tempfile.mkdtemp(prefix="dgfs-status-"))
    os.chmod(public, 0o755)
    made: list[DgfsMount] = []

    def mount_here(name: str, **options: str | None) -> DgfsMount:
        mount = DgfsMount(
            mounts.endpoint, mounts.new_bucket(), public / name, public / f"{name}-cache", options
        )
        mounts.mounts.append(mount)  # its log is checked when the module ends
        made.append(mount)
        return mount.start()

    try:
        shared = mount_here("shared", allow_other=None)
        socket_path = Path(xattr(shared.mountpoint, "status_socket"))
        st = os.stat(socket_path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(socket_path.parent).st_mode) == 0o700
        code, err = _run_as(65534, ["status", str(shared.mountpoint)])
        assert code == 2, err
        assert "permission denied" in err and "only the user who mounted it (uid 0)" in err
        assert "Traceback" not in err

        private = mount_here("private")  # without allow_other the kernel refuses others
        code, err = _run_as(65534, ["status", str(private.mountpoint)])
        assert code == 2 and "mounted by another user without allow_other" in err, err
    finally:
        for mount in made:
            mount.unmount()  # before the tree goes: rmtree must not walk into a mount
        shutil.rmtree(public, ignore_errors=True)


@pytest.mark.mount
def test_a_taken_metrics_port_fails_the_mount_clearly(mounts: Mounts) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mount = mounts.mount(metrics=str(port), start=False)
        mount.daemon = True
        mount.expect_log("cannot serve metrics on 127.0.0.1")
        with pytest.raises(AssertionError, match="cannot serve metrics on 127.0.0.1"):
            mount.start()
    assert not list(mount.cache_dir.rglob("status.sock"))  # nothing left behind


# --- systemd units --------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this dgfs.
    units = tmp_path / "units"
    units.mkdir()
    for unit in (REPO / "systemd").iterdir():
        text = unit.read_text().replace("/usr/local/bin/dgfs", dgfs_bin())
        (units / unit.name).write_text(text)
    # The template needs an instance; its EnvironmentFile is read only at start.
    instance = units / "dgfs@mnt-releases.service"
    instance.symlink_to(units / "dgfs@.service")
    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            str(instance),
            str(units / "mnt-releases.mount"),
            str(units / "mnt-releases.automount"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )
    output = (result.stdout + result.stderr).strip()
    relevant = [
        line
        for line in output.splitlines()
        # This test box has no systemd running and no mount.dgfs helper on PATH.
        if "System has not been booted with systemd" not in line and "mount.dgfs" not in line
    ]
    assert result.returncode == 0 or not relevant, output
    assert not relevant, output


def test_python_here_can_run_status_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dgfs.cli.main", "status", "--help"],
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=30,
        check=False,
    )
    assert result.returncode == 0 and "MOUNTPOINT" in result.stdout
