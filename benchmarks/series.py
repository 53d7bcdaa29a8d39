"""Real consecutive release series from PyPI, downloaded once into a cache.

Four series, each a list of paths in version order:

- ``wheels``: botocore 1.34.100..1.34.111 py3-none-any wheels (12 x ~12 MB;
  their service definitions are nested ``.json.gz`` members).
- ``sdists``: Django 4.2.1..4.2.8 sdists, ``.tar.gz`` (8 x ~10 MB).
- ``tars``: the same Django sdists gunzipped to their ``.tar`` (8 x ~60 MB).
- ``plain-wheels``: pip 23.0..24.1 py3-none-any wheels (12 x ~2 MB; no
  nested compressed members, real code changes between releases).

Files come from PyPI's JSON simple API (PEP 691) and are checked against
the SHA-256 the index gives; files already in the cache are not fetched
again. ``--small`` takes the first three versions of each series.

    .venv/bin/python benchmarks/series.py [--cache DIR] [--small]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_CACHE = Path.home() / ".cache" / "dgfs-bench"
SIMPLE_API = "https://pypi.org/simple/{project}/"
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
HTTP_TIMEOUT = 120.0
SMALL_COUNT = 3


@dataclass(frozen=True)
class Release:
    """Consecutive releases of one PyPI project: ``template`` names the file of a version."""

    project: str
    template: str
    versions: tuple[str, ...]

    def filenames(self, count: int | None = None) -> list[str]:
        return [self.template.format(v) for v in self.versions[:count]]

    def span(self, count: int | None = None) -> str:
        versions = self.versions[:count]
        return f"{versions[0]}..{versions[-1]}"


@dataclass(frozen=True)
class Series:
    """A benchmark input: files of consecutive versions, oldest first."""

    name: str
    description: str
    paths: list[Path]

    @property
    def original_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)


BOTOCORE = Release(
    "botocore", "botocore-{}-py3-none-any.whl", tuple(f"1.34.{n}" for n in range(100, 112))
)
DJANGO = Release("django", "Django-{}.tar.gz", tuple(f"4.2.{n}" for n in range(1, 9)))
PIP = Release(
    "pip",
    "pip-{}-py3-none-any.whl",
    (
        "23.0",
        "23.0.1",
        "23.1",
        "23.1.1",
        "23.1.2",
        "23.2",
        "23.2.1",
        "23.3",
        "23.3.1",
        "23.3.2",
        "24.0",
        "24.1",
    ),
)


def _index(project: str) -> dict[str, dict[str, Any]]:
    """PyPI's file entries of ``project`` by file name."""
    request = urllib.request.Request(
        SIMPLE_API.format(project=project), headers={"Accept": SIMPLE_JSON}
    )
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
        files = json.load(response)["files"]
    return {f["filename"]: f for f in files}


def _download(url: str, sha256: str, dest: Path) -> None:
    """``url`` into ``dest`` (atomically), checked against ``sha256``."""
    partial = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response, open(partial, "wb") as f:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            f.write(chunk)
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise RuntimeError(f"{url}: sha256 {digest.hexdigest()}, PyPI says {sha256}")
    os.replace(partial, dest)


def fetch(release: Release, directory: Path, count: int | None = None) -> list[Path]:
    """The first ``count`` files of ``release`` in ``directory``, downloading the missing ones."""
    directory.mkdir(parents=True, exist_ok=True)
    names = release.filenames(count)
    missing = [n for n in names if not (directory / n).exists()]
    if missing:
        index = _index(release.project)
        for name in missing:
            entry = index.get(name)
            if entry is None:
                raise RuntimeError(f"{name} is not on PyPI's index of {release.project}")
            print(f"   downloading {name}", file=sys.stderr, flush=True)
            _download(entry["url"], entry["hashes"]["sha256"], directory / name)
    return [directory / n for n in names]


def gunzipped(paths: list[Path], directory: Path) -> list[Path]:
    """Each ``.tar.gz`` of ``paths`` as its plain ``.tar`` in ``directory`` (made once)."""
    directory.mkdir(parents=True, exist_ok=True)
    tars = []
    for path in paths:
        tar = directory / path.name.removesuffix(".gz")
        if not tar.exists():
            partial = tar.with_name(tar.name + ".part")
            with gzip.open(path, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(partial, tar)
        tars.append(tar)
    return tars


def all_series(
    cache: Path = DEFAULT_CACHE, small: bool = False, count: int | None = None
) -> list[Series]:
    """The four series, downloaded into ``cache`` as needed (``small``: 3 versions
    each; ``count``: that many, where a series has them)."""
    if count is None and small:
        count = SMALL_COUNT
    pypi = cache / "pypi"
    wheels = fetch(BOTOCORE, pypi, count)
    sdists = fetch(DJANGO, pypi, count)
    plain = fetch(PIP, pypi, count)
    tars = gunzipped(sdists, cache / "tars")

    return [
        Series(
            "wheels",
            f"botocore {BOTOCORE.span(count)} py3-none-any wheels (nested .json.gz)",
            wheels,
        ),
        Series("sdists", f"Django {DJANGO.span(count)} sdists (.tar.gz)", sdists),
        Series("tars", f"Django {DJANGO.span(count)} sdists gunzipped (.tar)", tars),
        Series(
            "plain-wheels",
            f"pip {PIP.span(count)} py3-none-any wheels (no nested compressed members)",
            plain,
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"default {DEFAULT_CACHE}"
    )
    parser.add_argument("--small", action="store_true", help=f"{SMALL_COUNT} versions per series")
    args = parser.parse_args()
    for series in all_series(args.cache, args.small):
        print(
            f"{series.name:<13} {len(series.paths):>2} files "
            f"{series.original_bytes / 1e6:>7.1f} MB  {series.description}"
        )
        for path in series.paths:
            print(f"    {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
