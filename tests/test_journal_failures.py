"""Uploads and the journal when the machine misbehaves: its clock set back
after a power loss, credentials that cannot be had for a moment. Each test
lost or hid an acknowledged file before its fix."""

from __future__ import annotations

import time as real_time
from pathlib import Path

import botocore.exceptions as bexc
import pytest
import trio
import trio.testing

from dgfs.fs import journal as journal_module
from dgfs.fs.journal import Journal
from dgfs.store.faulty import FaultyStore
from dgfs.store.memory import MemoryStore
from dgfs.store.s3.calls import translate_error
from tests.fsharness import (
    OPTIONS,
    bucket,
    close,
    mounted,
    open_for_rewrite,
    read_file,
    write_file,
)

pytestmark = pytest.mark.timeout(30)


class _ClockSteppedBack:
    """The wall clock after a power loss, an hour behind (RTC drift before NTP)."""

    @staticmethod
    def time_ns() -> int:
        return real_time.time_ns() - 3600 * 10**9


async def test_a_version_closed_after_a_clock_step_back_survives_a_second_crash(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mount 1 closes ``a`` v1 and dies (power loss). The machine comes back
    with its clock an hour behind. Mount 2 recovers v1, whose upload is
    in flight when the user rewrites ``a`` (v2) and closes it: close()
    returned 0. Mount 2 dies too. Mount 3 must show v2; it recovered v1
    and dropped v2: of two entries for one key the one written last wins,
    and mount 2 stamped v2 by its clock, behind v1's stamp. A journal's
    stamps now start after every entry it recovered."""
    async with mounted(memory, tmp_path, crash=True) as m:
        await write_file(m.fs, "a", b"version 1\n")  # committed; upload still in its delay
    monkeypatch.setattr(journal_module, "time", _ClockSteppedBack)
    held = faulty.hang("upload", key="a")
    async with mounted(faulty, tmp_path, crash=True) as m:
        assert m.recovered == 1
        mock_clock.jump(OPTIONS.upload_delay)
        await held.reached.wait()  # v1's recovered upload is in flight
        await close(m.fs, await open_for_rewrite(m.fs, "a", b"version 2\n"))  # acknowledged
    monkeypatch.undo()
    faulty.clear()
    async with mounted(memory, tmp_path) as m:
        assert await read_file(m.fs, "a") == b"version 2\n"
    assert bucket(memory) == {"a": b"version 2\n"}


def _credentials_unavailable(_message: str) -> BaseException:
    """What S3Store raises when botocore cannot fetch the instance role's
    credentials for a moment (IMDS timeout): no request reached S3."""
    exc = bexc.CredentialRetrievalError(provider="iam-role", error_msg="IMDS timed out")
    return translate_error(
        exc, bucket="fs-bucket", key="a.txt", endpoint="https://s3", operation="upload"
    )


@pytest.mark.expected_log(r"failed for good|retrying in")
async def test_a_credential_fetch_hiccup_is_retried_not_given_up(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The upload's credentials could not be fetched once (the instance
    metadata service timed out). S3 refused nothing, yet the file was moved
    to failed/ for good: never retried, gone from the mount after the next
    remount, though S3 took it the moment credentials were back. Such an
    error (``CredentialsUnavailable``) is retried now."""
    faulty.fail("upload", key="a.txt", error=_credentials_unavailable)
    async with mounted(faulty, tmp_path) as m:
        await write_file(m.fs, "a.txt", b"precious\n")
    assert bucket(memory) == {"a.txt": b"precious\n"}


@pytest.mark.parametrize("code", ["ExpiredToken", "TokenRefreshRequired"])
def test_credentials_that_expired_while_their_provider_was_down_are_retried(code: str) -> None:
    """When the instance metadata service does not answer through botocore's
    refresh window, botocore signs with the old session token until it
    expires and S3 answers ``ExpiredToken`` (or ``TokenRefreshRequired``):
    the same outage as a failed fetch, one step later. It was a plain
    ``AccessDenied``, and the upload went to failed/ for good."""
    import botocore.exceptions as bexc

    from dgfs.fs import upload_failures as failures
    from dgfs.store.s3.calls import translate_error

    exc = bexc.ClientError(
        {
            "Error": {"Code": code, "Message": "The provided token has expired."},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        },
        "PutObject",
    )
    error = translate_error(
        exc, bucket="fs-bucket", key="a.txt", endpoint="https://s3", operation="upload"
    )
    verdict = failures.judge(error, direct=False, races_lost=0)
    assert verdict.next is not failures.Next.GIVE_UP


def test_a_version_closed_in_another_slot_after_a_clock_step_back_wins_the_recovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mount 2 (slot 0) holds ``a`` v1, stamped by a clock that was right,
    still finishing that upload after its unmount. The clock is an hour
    behind now. Mount 3 of the same bucket takes slot 1: its stamps rose
    only over its own slot's entries (none), so v2 of ``a``, closed through
    it, was stamped behind v1, and after a second power loss the next mount
    kept v1. A journal's stamps now start after every slot's."""
    from dgfs.fs import journal as journal_module

    base = tmp_path / "journal" / "bucket-0123456789abcdef"
    mount2 = Journal.open_slot(base)
    entry, path = mount2.new_staging()
    path.write_bytes(b"version 1\n")
    mount2.commit(entry, "a", {})  # the stamp a right clock gave it before the power loss
    monkeypatch.setattr(journal_module, "time", _ClockSteppedBack)
    mount3 = Journal.open_slot(base)
    assert mount3.directory != mount2.directory
    assert mount3.recover() == []
    entry, path = mount3.new_staging()
    path.write_bytes(b"version 2\n")
    mount3.commit(entry, "a", {})  # close() returned 0
    mount2.close()
    mount3.close()  # power loss
    mount4 = Journal.open_slot(base)
    try:
        (kept,) = mount4.recover()
        assert mount4.data_path(kept.entry_id).read_bytes() == b"version 2\n"
    finally:
        mount4.close()


@pytest.mark.expected_log(r"directory index not written")
async def test_a_credential_hiccup_does_not_stop_directory_indexes_for_good() -> None:
    """``CredentialsUnavailable`` is an ``AccessDenied``, which turns
    directory indexes off for the life of the mount ("not trying again"):
    one IMDS timeout did so. It is tried again at the next listing now."""
    from dgfs.errors import CredentialsUnavailable
    from dgfs.fs.attrcache import AttrCache
    from dgfs.fs.namespace import Namespace

    class OneHiccup(MemoryStore):
        hiccups = 1

        async def put_bytes(self, key, body, metadata, **kwargs):  # type: ignore[no-untyped-def]
            if self.hiccups:
                self.hiccups -= 1
                raise CredentialsUnavailable("no usable AWS credentials (IMDS timed out)")
            return await super().put_bytes(key, body, metadata, **kwargs)

    ns = Namespace(OneHiccup("b"), AttrCache(None), root_prefix="", listing_ttl=60, mounted_at_ns=1)
    ns._indexes_due["rel/"] = {}
    await ns.write_due_indexes()
    assert ns.write_indexes
