"""The least CPU deep mode's format lets a store or a cold read cost, beside
what DeltaGlider's own work costs on the same files.

Deep mode stores a file as an xdelta3 delta of its *expanded form* (every
deflate stream inflated) against its directory's reference, and a read
compresses every stream back, bit for bit (docs/FORMAT.md). Whatever the
code around them does, a store cannot cost less than inflating the file,
deflating once each stream whose content the reference does not hold (to
prove it compresses back to its bytes) and diffing the expanded form
(finding the spans the reference holds, xdelta3 over the rest: version-2
deep deltas); a cold read of a directory cannot cost less than decoding
each expanded form, re-deflating the reference's streams once and
deflating every later stream the reference does not hold. Streams it
holds count as free (a copy of the reference's bytes could serve them);
the others count at zlib level 6, no more than the level 6 or 9 these
series were made with. DeltaGlider's store and read of the same file are
one xdelta3 over the file itself. This script measures those pieces in
CPU seconds (this process and its children), one version after another,
with no S3 and no FUSE:

    .venv/bin/python benchmarks/deep_floor.py [--series wheels,sdists,plain-wheels] [--count 6]

Per series it prints each piece's total over the later versions (the first
is the reference in both formats) and the floors they add up to. A
benchmark run of the real tools (``speed.py --tools deep,api``) gives the
wall time to hold them against: with C cores a series can at best spread
its floor over all of them, so ``floor / C`` is the least wall time deep
mode can reach there.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def streams(path: Path) -> list[bytes]:
    """The inflated content of every deflate stream of ``path`` (a zip's
    members, the gzip files inside them, or a gzip file), inflated as deep
    mode's expansion must. A zip member holding a gzip file counts twice:
    the gzip stream's content, and the member's own stream, whose content
    is the gzip file (a botocore wheel's ``.json.gz`` carry their build
    time in their headers, so those are new in every release)."""
    if path.name.endswith(".gz"):
        return [gzip.decompress(path.read_bytes())]
    found = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            data = archive.read(info)
            if info.compress_type == zipfile.ZIP_DEFLATED:
                found.append(data)
            if info.filename.endswith(".gz"):
                found.append(gzip.GzipFile(fileobj=io.BytesIO(data)).read())
    return found


def deflate_new(contents: list[bytes], known: set[bytes]) -> None:
    """Deflate (zlib level 6: no cheaper than the level 6 or 9 these series
    use) every stream whose content is not among ``known`` (a copy of the
    reference's compressed bytes could serve those)."""
    for data in contents:
        if hashlib.sha256(data).digest() not in known:
            zlib.compress(data, 6)


def xdelta3(*args: str | Path) -> None:
    """xdelta3 as dgfs and DeltaGlider run it (no secondary checksum)."""
    subprocess.run(["xdelta3", *map(str, args)], check=True, stdin=subprocess.DEVNULL)


def window(source: Path) -> str:
    """The ``-B`` dgfs gives xdelta3: the source's size (``delta.source_window``).
    Its hash tables grow with ``-B``: a 1 GiB window costs ~1.8 s of page
    zeroing per run whatever the source."""
    return str(max(1 << 19, source.stat().st_size))


def dg_encode(source: Path, target: Path, out: Path) -> None:
    """DeltaGlider's command (xdelta3's own 64 MiB window)."""
    xdelta3("-e", "-9", "-f", "-D", "-R", "-A", "-s", source, target, out)


def dg_decode(source: Path, delta: Path, out: Path) -> None:
    xdelta3("-d", "-f", "-D", "-R", "-s", source, delta, out)


def deep_encode(reference: Path, reference_sha256: str, form: Path, work: Path) -> list:
    """What dgfs does: the spans the reference holds found (its index made
    once per reference), and xdelta3 over the rest on both sides
    (``dgfs.deep.spans``, at ``writer._CUT_LEVEL``); returns the spans."""
    from dgfs.deep import find_spans, write_cut, write_source

    found = find_spans(reference, reference_sha256, form)
    write_cut(form, found, work / "cut")
    write_source(reference, found, work / "source")
    src, cut = work / "source", work / "cut"
    xdelta3("-e", "-6", "-f", "-D", "-R", "-A", "-B", window(src), "-s", src, cut, work / "deep")
    return found


def deep_decode(reference: Path, found: list, work: Path) -> None:
    """The cut form decoded against the source (the rebuild then reads the
    spans from the reference in place: ``dgfs.deep.spans.SplicedForm``)."""
    from dgfs.deep import write_source

    write_source(reference, found, work / "source")
    src, cut = work / "source", work / "cut"
    xdelta3("-d", "-f", "-D", "-R", "-B", window(src), "-s", src, work / "deep", cut)


@dataclass
class Pieces:
    """CPU seconds of each piece, summed over the later versions of a series."""

    inflate: float = 0.0
    deflate_new: float = 0.0
    deep_encode: float = 0.0
    deep_decode: float = 0.0
    dg_encode: float = 0.0
    dg_decode: float = 0.0
    reference_rebuild: float = 0.0
    expanded_mb: list[float] = field(default_factory=list)


def timed(work: Callable[..., object], *args: object) -> float:
    """CPU seconds of ``work(*args)``."""
    start = cpu_seconds()
    work(*args)
    return cpu_seconds() - start


def measure(paths: list[Path], work: Path) -> Pieces:
    from dgfs.deep import expand_file, rebuild_file

    pieces = Pieces()
    forms = []
    for i, path in enumerate(paths):
        form = work / f"{i}.dgx"
        expand_file(path, form, scratch_dir=work)
        forms.append(form)
        pieces.expanded_mb.append(form.stat().st_size / 1e6)
    # The reference's streams re-deflated once; later versions deflate only
    # the streams it lacks (deflate_new).
    pieces.reference_rebuild = timed(rebuild_file, forms[0], work / "ref.out", work)
    known = {hashlib.sha256(data).digest() for data in streams(paths[0])}
    ref_sha = hashlib.sha256(forms[0].read_bytes()).hexdigest()
    for path, form in zip(paths[1:], forms[1:], strict=True):
        start = cpu_seconds()
        contents = streams(path)
        pieces.inflate += cpu_seconds() - start
        pieces.deflate_new += timed(deflate_new, contents, known)
        start = cpu_seconds()
        found = deep_encode(forms[0], ref_sha, form, work)
        pieces.deep_encode += cpu_seconds() - start
        pieces.deep_decode += timed(deep_decode, forms[0], found, work)
        pieces.dg_encode += timed(dg_encode, paths[0], path, work / "dg.vcdiff")
        pieces.dg_decode += timed(dg_decode, paths[0], work / "dg.vcdiff", work / "dg.out")
    return pieces


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--series", default="wheels,sdists,plain-wheels")
    parser.add_argument("--count", type=int, default=6, help="versions per series (default 6)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.series import all_series

    every = {s.name: s for s in all_series(count=args.count)}
    print("CPU seconds over the later versions (the first is the reference)")
    for name in args.series.split(","):
        series = every[name]
        with tempfile.TemporaryDirectory(prefix="dgfs-deep-floor-") as tmp:
            p = measure(series.paths, Path(tmp))
        later = len(series.paths) - 1
        store_floor = p.inflate + p.deflate_new + p.deep_encode
        read_floor = p.reference_rebuild + p.deep_decode + p.deflate_new
        print(f"{name}: {series.description}")
        print(
            f"  expanded forms {min(p.expanded_mb):.0f}-{max(p.expanded_mb):.0f} MB;"
            f" originals {min(f.stat().st_size for f in series.paths) / 1e6:.0f}"
            f"-{max(f.stat().st_size for f in series.paths) / 1e6:.0f} MB"
        )
        print(
            f"  store of {later}: deep floor {store_floor:.2f} (inflate {p.inflate:.2f}"
            f" + new streams deflated {p.deflate_new:.2f}"
            f" + spans and xdelta3 of the rest {p.deep_encode:.2f});"
            f" DeltaGlider's xdelta3 {p.dg_encode:.2f}; {store_floor / p.dg_encode:.1f}x"
        )
        print(
            f"  cold read of {later + 1}: deep floor {read_floor:.2f} (the reference re-deflated"
            f" {p.reference_rebuild:.2f} + xdelta3 -d of the expanded forms {p.deep_decode:.2f}"
            f" + streams the reference lacks deflated {p.deflate_new:.2f});"
            f" DeltaGlider's xdelta3 -d {p.dg_decode:.2f}; {read_floor / p.dg_decode:.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
