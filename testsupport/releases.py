"""Deterministic series of similar release archives, like a plugin's releases.

Each version is a zip of a source-and-binary tree; from one version to the
next a few files change, one is added, and the version file is bumped, as a
real project's releases do. Unchanged members keep their bytes and zip
timestamps, so consecutive archives share most of their content — the case
dgfs exists for. Used by tests, the demo and the benchmarks (no pytest here).
"""

from __future__ import annotations

import gzip
import io
import random
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from dgfs.shard import Shard

_WORDS = [
    "def",
    "class",
    "return",
    "import",
    "self",
    "value",
    "result",
    "config",
    "error",
    "buffer",
    "stream",
    "delta",
    "store",
    "cache",
    "plugin",
    "release",
    "build",
    "module",
    "export",
    "handler",
    "request",
]
_EPOCH = (2024, 1, 1, 0, 0, 0)


def _text(rng: random.Random, size: int) -> bytes:
    words = [rng.choice(_WORDS) for _ in range(size // 6 + 1)]
    return " ".join(words).encode()[:size]


def _binary(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


class ReleaseSeries:
    """Versions of one synthetic project.

    ``size`` is roughly the uncompressed size of one release; about a third
    of it is incompressible (binaries), the rest text.
    """

    def __init__(self, name: str = "plugin", size: int = 4 << 20, seed: int = 1) -> None:
        self.name = name
        self.rng = random.Random(seed)
        self.members: dict[str, bytes] = {}
        count = max(8, size // (64 << 10))
        per_member = size // count
        for i in range(count):
            if i % 3 == 0:
                self.members[f"{name}/lib/part{i:04d}.so"] = _binary(self.rng, per_member)
            else:
                self.members[f"{name}/src/mod{i:04d}.py"] = _text(self.rng, per_member)
        self.version = 0

    def _advance(self) -> None:
        self.version += 1
        if self.version == 1:
            return
        names = sorted(self.members)
        for path in self.rng.sample(names, max(1, len(names) // 50)):
            data = bytearray(self.members[path])
            start = self.rng.randrange(len(data))
            data[start : start + 512] = _text(self.rng, 512)
            self.members[path] = bytes(data)
        self.members[f"{self.name}/src/added{self.version:04d}.py"] = _text(self.rng, 4096)

    def _version_text(self) -> bytes:
        return f"__version__ = '1.{self.version}.0'\n".encode()

    def next_zip(self) -> tuple[str, bytes]:
        """``(file name, bytes)`` of the next release as a zip."""
        self._advance()
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            for path in sorted(self.members):
                zf.writestr(zipfile.ZipInfo(path, _EPOCH), self.members[path], zipfile.ZIP_DEFLATED)
            zf.writestr(zipfile.ZipInfo(f"{self.name}/VERSION", _EPOCH), self._version_text())
        return f"{self.name}-1.{self.version}.0.zip", buf.getvalue()

    def next_tar(self) -> tuple[str, bytes]:
        """``(file name, bytes)`` of the next release as an uncompressed tar."""
        self._advance()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            entries = sorted(self.members.items())
            entries.append((f"{self.name}/VERSION", self._version_text()))
            for path, data in entries:
                info = tarfile.TarInfo(path)
                info.size = len(data)
                info.mtime = 1_700_000_000
                tf.addfile(info, io.BytesIO(data))
        return f"{self.name}-1.{self.version}.0.tar", buf.getvalue()

    def zips(self, count: int) -> Iterator[tuple[str, bytes]]:
        for _ in range(count):
            yield self.next_zip()


def write_series(directory: Path, count: int, *, size: int = 4 << 20, seed: int = 1) -> list[Path]:
    """Write ``count`` consecutive zip releases into ``directory``; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in ReleaseSeries(size=size, seed=seed).zips(count):
        path = directory / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def write_sdist(tmp: Path, version: int, files: int = 40) -> Path:
    """A Python-made ``.tar.gz`` like an sdist: most members unchanged between versions."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(files):
            body = random.Random(i).randbytes(3000).hex().encode()
            if i == 3:
                body += f"version {version}".encode()
            info = tarfile.TarInfo(f"pkg-{version}/mod{i}.py")
            info.size = len(body)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(body))
    path = tmp / f"pkg-{version}.tar.gz"
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=1_700_000_000 + version) as gz:
        gz.write(buf.getvalue())
    return path


def directories_per_shard(count: int, per_shard: int, parent: str = "rel") -> list[str]:
    """Sorted directory names under ``parent``, ``per_shard`` of them owned by each of
    the ``count`` shards of ``dgfs.shard``: a bucket in which every worker has work."""
    chosen: dict[int, list[str]] = {k: [] for k in range(1, count + 1)}
    number = 0
    while any(len(names) < per_shard for names in chosen.values()):
        name = f"{parent}/app{number}"
        owner = next(k for k in chosen if Shard(k, count).owns_space(name))
        if len(chosen[owner]) < per_shard:
            chosen[owner].append(name)
        number += 1
    return sorted(name for names in chosen.values() for name in names)
