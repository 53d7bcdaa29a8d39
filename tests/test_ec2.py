"""EC2 region detection (IMDSv2) against a local stand-in for the metadata service."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dgfs import ec2
from dgfs.cli.main import main as dgfs_main
from testsupport.servers import free_port

TOKEN = "test-token-123"


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up (the timeout tests) is not an error here


class FakeImds:
    """IMDSv2 on 127.0.0.1: token by PUT, metadata by GET with the token."""

    def __init__(self, region: str = "eu-west-1", *, mode: str = "v2") -> None:
        self.region = region
        self.mode = mode  # "v2", "v1-only" (no tokens), "hang" (never answers in time)
        self.requests: list[tuple[str, str]] = []
        self.closing = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _reply(self, status: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
                owner.requests.append(("PUT", self.path))
                if owner.mode == "hang":
                    owner.closing.wait(3)
                if owner.mode != "v2" or self.path != ec2.TOKEN_PATH:
                    return self._reply(403)
                if not self.headers.get(ec2.TOKEN_TTL_HEADER):
                    return self._reply(400)
                self._reply(200, TOKEN)

            def do_GET(self) -> None:  # noqa: N802
                owner.requests.append(("GET", self.path))
                if self.headers.get(ec2.TOKEN_HEADER) != TOKEN:
                    return self._reply(401)
                answers = {
                    ec2.REGION_PATH: owner.region,
                    ec2.ZONE_PATH: owner.region + "b",
                }
                if self.path not in answers:
                    return self._reply(404)
                self._reply(200, answers[self.path])

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeImds:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def imds() -> Iterator[FakeImds]:
    with FakeImds() as server:
        yield server


def env_for(server: FakeImds, **extra: str) -> dict[str, str]:
    return {"AWS_EC2_METADATA_SERVICE_ENDPOINT": server.endpoint, **extra}


def test_instance_region_over_imdsv2(imds: FakeImds) -> None:
    info = ec2.instance_info(env_for(imds))
    assert info == ec2.InstanceInfo("eu-west-1", "eu-west-1b")
    assert imds.requests[0] == ("PUT", ec2.TOKEN_PATH)


@pytest.mark.parametrize(
    "switch",
    [
        {"DG_DISABLE_EC2_DETECTION": "true"},
        {"DG_DISABLE_EC2_DETECTION": "1"},
        {"DG_DISABLE_EC2_DETECTION": "yes"},
        {"AWS_EC2_METADATA_DISABLED": "true"},
    ],
)
def test_detection_can_be_switched_off(imds: FakeImds, switch: dict[str, str]) -> None:
    assert ec2.instance_info(env_for(imds, **switch)) is None
    assert imds.requests == []  # not even asked


def test_imdsv1_only_counts_as_not_ec2() -> None:
    with FakeImds(mode="v1-only") as server:
        assert ec2.instance_info(env_for(server)) is None


def test_unreachable_or_slow_metadata_gives_up_quickly() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert ec2.instance_info({"AWS_EC2_METADATA_SERVICE_ENDPOINT": closed}) is None
    with FakeImds(mode="hang") as server:
        assert ec2.instance_info(env_for(server), timeout=0.3) is None
    assert time.monotonic() - started < 2.5


def test_region_warning() -> None:
    here = ec2.InstanceInfo("eu-west-1", "eu-west-1b")
    warning = ec2.region_warning(here, "releases", "us-east-1")
    assert warning and "eu-west-1" in warning and "us-east-1" in warning
    assert ec2.region_warning(here, "releases", "eu-west-1") is None
    assert ec2.region_warning(None, "releases", "us-east-1") is None


@pytest.mark.parametrize(("instance_region", "warned"), [("eu-west-1", True), ("us-east-1", False)])
def test_migrate_warns_about_cross_region_traffic(
    moto_endpoint: str,
    bucket_name: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: object,
    instance_region: str,
    warned: bool,
) -> None:
    monkeypatch.delenv("DG_DISABLE_EC2_DETECTION", raising=False)
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED", raising=False)
    with FakeImds(region=instance_region) as server:
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", server.endpoint)
        code = dgfs_main(
            [
                "migrate",
                "--dry-run",
                f"s3://{bucket_name}/src/",
                f"s3://{bucket_name}/dst/",
                "--endpoint-url",
                moto_endpoint,
                "--region",
                "us-east-1",
                "--cache-dir",
                str(tmp_path),
            ]
        )
        asked = list(server.requests)
    assert code == 0
    err = capsys.readouterr().err
    assert ("crosses regions" in err) is warned
    assert ("PUT", ec2.TOKEN_PATH) in asked
