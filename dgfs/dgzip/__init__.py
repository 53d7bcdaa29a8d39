"""Getting back the original bytes of a ``.gz`` that the stock DeltaGlider CLI stored.

DeltaGlider 6.2.0 runs ``xdelta3 -e -9 -s reference.bin FILE FILE.delta``
without ``-D -R``. For a gzip ``FILE`` xdelta3 then encodes the
*decompressed* file (against the decompressed reference) and marks the
delta so that decoding re-gzips its output with the system ``gzip``: the
content comes back exact, the compressed bytes do not (different level,
header name, mtime and OS byte), so the recorded ``dg-file-sha256`` fails.

The recorded SHA-256 and size are enough to find the original again when
its compressor can be replayed. :meth:`dgfs.delta.DeltaEngine.decode_decompressed`
gives the decompressed target; :func:`recover_gzip` then searches

- the deflate body: zlib settings (:data:`dgfs.deep.CANDIDATES`)
  and GNU gzip levels (through ``zgz``, :func:`dgfs.deep.gnu_deflate`), those
  that reproduce the start of the reference's own stream first. Each is
  computed once; its length alone must fit the recorded size
  (``header + body + 8 == expected_size``), which rules out nearly all of
  them before any hashing.
- the 10-byte header and name of a surviving body: FLG (FNAME or not),
  the name (from the original name and the tar's top directory), MTIME
  (around the newest tar member's mtime, the reference's, 0), XFL and OS
  (the level's own XFL, the reference's; OS 255 as Python writes, 3 as
  GNU gzip and zlib do). Every candidate costs one SHA-256 of the whole
  file (about 6 ms per 10 MB here), so their number is bounded, and so are
  the bytes hashed by the whole search (:func:`~dgfs.dgzip.limits.hash_budget`).

Measured on the eight Django 4.2.1-4.2.8 sdists stored by the stock CLI
(Python's gzip, level 9, OS 255, FNAME, MTIME = the newest member's mtime
rounded down): all eight come back, each at the first header tried, in
about 4 s for a 10 MB file (59 MB tar): mostly one level-9 compression,
plus ~0.9 s reading the tar's mtimes and ~0.5 s fingerprinting the
reference. A file that cannot be recovered costs up to ``MAX_BODIES``
compressions and ``MAX_HEADERS`` hashes per body, and no more than
:func:`~dgfs.dgzip.limits.hash_budget` bytes hashed in all (~100 hashes at that size).

Nothing here is trusted. The size and SHA-256 come from metadata anyone
who can write the bucket chose, the content from their delta: the search
stops with ``DecodeLimit`` past its wall time (``expand_time``) or its
hashing budget, and the tar is read header by header, each extended
header (pax, GNU long name) up to ``MAX_TAR_EXTENSION`` bytes. The output
appears only when its SHA-256 equals the recorded one. Only single-member
gzip files are rebuilt. Blocking (CPU and disk): call it from a worker
thread.

What the rest of dgfs uses is named here; the modules under it are its
parts (tests reach into them, the rest of dgfs does not), each importing
only those listed before it:

- ``limits``: what one search may spend (``MAX_BODIES``, ``MAX_HEADERS``,
  :func:`~dgfs.dgzip.limits.hash_budget`) and the ``Budget`` counting it;
- ``member``: the gzip header, read and written, and the trailer;
- ``tarscan``: the tar's newest mtime and top directory, read header by
  header under limits;
- ``bodies``: the deflate bodies to try and how each is made;
- ``candidates``: the headers to try for a body;
- ``search``: :func:`recover_gzip` itself.

A constant is read in the module that defines it: patch it there.
"""

from dgfs.dgzip.member import OS_UNIX, GzipHeader, gzip_header, read_gzip_header
from dgfs.dgzip.search import recover_gzip

__all__ = ["OS_UNIX", "GzipHeader", "gzip_header", "read_gzip_header", "recover_gzip"]
