"""Rebuilding side by side: a zip's members are re-deflated by every worker at once."""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgfs.deep import expand, recompress
from dgfs.deep.expand import expand_file, rebuild_file

#: How long a test waits for two tasks to run at once before it fails (a
#: bound, not a timing: they meet in microseconds when they run side by side).
MEET = 10.0


@pytest.fixture(autouse=True)
def _fresh_memos() -> Iterator[None]:
    expand.VERIFIED_SPANS.clear()
    expand.REBUILT_SUBTREES.clear()
    yield
    expand.REBUILT_SUBTREES.clear()


def _zip(members: int) -> bytes:
    """A zip of deflated members, each behind its RAW local header in the form."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n in range(members):
            body = b"".join(b"member %d line %d\n" % (n, i) for i in range(2000))
            info = zipfile.ZipInfo(f"pkg/m{n}.py", (2024, 1, 2, 3, 4, 6))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, body)
    return buf.getvalue()


def test_zip_members_are_rebuilt_side_by_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers re-deflate two members at once: the RAW header between them
    does not make the rebuild wait for the first. Before, every RAW segment
    drained the queue, so a wheel's members were rebuilt one at a time (a
    botocore wheel's rebuild took 2.25 s with two workers, 2.15 s with one;
    1.21 s now). Here the first two members each wait until the other runs:
    one at a time, they never meet and the rebuild fails."""
    data = _zip(6)
    src = tmp_path / "a.whl"
    src.write_bytes(data)
    form = tmp_path / "a.dgx"
    expand_file(src, form, scratch_dir=tmp_path)
    meet = threading.Barrier(2, timeout=MEET)
    calls = 0
    rebuild_subtree = recompress._rebuild_subtree

    def meeting(subtree: bytes, *args: object, **kwargs: bool) -> list[bytes]:
        nonlocal calls
        calls += 1
        if calls <= 2:
            meet.wait()
        return rebuild_subtree(subtree, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(recompress, "_rebuild_subtree", meeting)
    digest, size = rebuild_file(form, tmp_path / "out", tmp_path, 2)
    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert calls == 6
