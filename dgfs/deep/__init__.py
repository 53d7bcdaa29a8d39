"""Deep deltas: archives diffed by what they hold (docs/FORMAT.md, "deep").

A zip, gzip or tar.gz is turned into its expanded form (every deflate
stream inflated, with the recipe that compresses it back bit for bit),
the expanded forms are diffed with xdelta3, and a read compresses the
expanded form back and checks the file's SHA-256. What the rest of dgfs
uses of deep mode is named here; the modules under it are its parts
(tests reach into them, the rest of dgfs does not):

- ``expand``: expand, prove, rebuild (under ``ExpansionLimits``);
- ``objects``: what S3 holds (the zstd reference, the wrapped delta);
- ``deflate``, ``gnuzip``: the compressors replayed (zlib, GNU gzip's zgz);
- ``remember``: the verdicts on compressed spans, kept across mounts;
- ``spans``: what a delta takes from its reference as is, cut out before xdelta3.
"""

from dgfs.deep.deadline import Deadline
from dgfs.deep.deflate import CANDIDATES, DeflateParams, zlib_is_reference
from dgfs.deep.expand import (
    ExpandStats,
    ExpansionLimits,
    Recipe,
    expand_file,
    plain_form,
    prove_form,
    rebuild_file,
)
from dgfs.deep.gnuzip import INSTALL_HINT as ZGZ_INSTALL_HINT
from dgfs.deep.gnuzip import LEVELS as GNU_LEVELS
from dgfs.deep.gnuzip import gnu_deflate, zgz_path
from dgfs.deep.objects import (
    PackedReference,
    compress_reference,
    decompress_reference,
    reference_cap,
    unwrap_delta,
    wrap_delta,
)
from dgfs.deep.remember import keep_in as keep_verified_spans_in
from dgfs.deep.remember import load as load_verified_spans
from dgfs.deep.remember import save as save_verified_spans
from dgfs.deep.remember import save_kept as save_kept_verified_spans
from dgfs.deep.spans import InReference, Span, spliced, write_cut, write_source
from dgfs.deep.spans import find as find_spans
from dgfs.deep.spans import pack as pack_spans

__all__ = [
    "CANDIDATES",
    "ZGZ_INSTALL_HINT",
    "GNU_LEVELS",
    "Deadline",
    "DeflateParams",
    "ExpandStats",
    "ExpansionLimits",
    "InReference",
    "PackedReference",
    "Recipe",
    "Span",
    "compress_reference",
    "decompress_reference",
    "expand_file",
    "find_spans",
    "gnu_deflate",
    "keep_verified_spans_in",
    "pack_spans",
    "load_verified_spans",
    "plain_form",
    "prove_form",
    "rebuild_file",
    "reference_cap",
    "save_kept_verified_spans",
    "save_verified_spans",
    "spliced",
    "unwrap_delta",
    "wrap_delta",
    "write_cut",
    "write_source",
    "zgz_path",
    "zlib_is_reference",
]
