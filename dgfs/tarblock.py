"""Tar headers, as far as dgfs reads them (one rule for the expansion's cuts,
``dgfs.deep.archives``, and the gzip recovery's facts, ``dgfs.dgzip.tarscan``).

Nothing here trusts the bytes: a number field that is neither octal nor
base-256 is None, and a block whose checksum fails is no header.
"""

from __future__ import annotations

BLOCK = 512
_HIGH_BYTES = bytes(range(128, 256))


def padded(size: int) -> int:
    """The bytes of data blocks a member of ``size`` bytes takes."""
    return -(-size // BLOCK) * BLOCK


def checksum_ok(block: bytes) -> bool:
    """Whether ``block`` is a tar header: its checksum (unsigned, or signed as
    some old tars wrote it) matches; a block of zeros never does."""
    recorded = number(block[148:156])
    if recorded is None or not block.strip(b"\0"):
        return False
    rest = block[:148] + b" " * 8 + block[156:]
    unsigned = sum(rest)
    if recorded == unsigned:
        return True
    high = len(rest) - len(rest.translate(None, _HIGH_BYTES))
    return recorded == unsigned - 256 * high


def number(field: bytes) -> int | None:
    """A tar header's numeric field: octal text, or base-256 (GNU); None if neither."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    if text.strip(b"01234567"):
        return None
    return int(text, 8)
