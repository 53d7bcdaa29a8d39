"""xdelta3 encode/decode on local files; knows nothing of S3.

Files never pass through Python memory: xdelta3 reads and writes them
itself, run as a subprocess through ``trio.run_process``.

Flags, and why (measured on Debian's xdelta3 3.0.11):

- ``-D -R`` on encode, ``-D`` on decode: xdelta3 otherwise notices gzip,
  bzip2, xz and compress(1) input by its magic bytes, diffs the
  *decompressed* stream and re-compresses on decode with the system tool,
  which gives back different bytes.
- ``-B``: the source window, sized to the whole source (clamped to
  xdelta3's accepted range and to ``memory_limit``). With the default
  64 MiB window, content that moved further than that is not found: a
  110 MiB file rotated by 70 MiB gives a 90 MB delta in 28 s by default
  and a few hundred bytes in ~1.5 s with ``-B``. Decoding with the same
  ``-B`` halves decode time when copies jump around the source. xdelta3
  allocates the whole ``-B`` even when the source is smaller, so it is
  never larger than the source.
- ``-A``: no application header. xdelta3 would otherwise record the
  (local, temporary) file names in every delta; decoders ignore it except
  for the external-compression hint, which ``-D -R`` deltas leave empty.
- ``-W``, ``-P`` and ``-I`` changed neither size nor speed measurably on
  100 MiB inputs, so they stay at xdelta3's defaults.

Deltas come from the bucket, which others can write: a 646-byte VCDIFF
decodes to 256 MiB. A decode is given the size its output must have
(an ``OutputCap``, from ``dg-file-size``) and xdelta3 cannot write a byte
more (:func:`dgfs.children.size_capped`); every run has a time limit
proportional to its work. xdelta3 is run by the absolute path resolved
when the engine is made, with a minimal environment (:mod:`dgfs.children`).

A delta made by DeltaGlider's stock command (``xdelta3 -e -9 -s ref
target out``) from gzip/bzip2/xz input says so in its application header;
:meth:`DeltaEngine.decode` then lets xdelta3 decompress and recompress as
that command expects. Whether the recompressed bytes equal the original
depends on the compressor settings, so callers must check the SHA-256.

The other way round has a catch: the stock *decoder* (``xdelta3 -d -s ref
delta out``, as the DeltaGlider CLI runs it) decompresses a gzip/bzip2/xz
*source* by its magic bytes whatever the delta says, so it cannot apply a
``-D`` delta (not even a reference's self-delta) to such a reference
unless ``XDELTA=-D`` is in its environment.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from dgfs import children
from dgfs.errors import DecodeLimit, DeltaEngineError, XdeltaFailedHere, XdeltaMissing

log = logging.getLogger(__name__)

INSTALL_HINT = "install it: apt install xdelta3 / dnf install xdelta / brew install xdelta"

#: xdelta3 3.0.11 rejects ``-B`` outside this range ("-B: minimum value: 524288",
#: "-B: maximum value: 2147483648").
MIN_SOURCE_WINDOW = 512 * 1024
MAX_SOURCE_WINDOW = 2 * 1024 * 1024 * 1024

#: What xdelta3 3.0.11 holds besides its source window: for encoding, a hash
#: table of the source of up to 2 x the window rounded up to a power of two
#: (level 9; 1 x at level 6), never more than 1 GiB; for both, ~10-45 MiB of
#: buffers. Measured (maximum RSS, 2026-12-06, docs/operations.md): encode -9
#: 235 MiB for a 64 MiB window, 685 for 130, 1,327 for 260, 1,587 for 520,
#: 2.2 GB for 1 GiB (docs/benchmarks-large.md); decode 1.02-1.16 x the window.
_HASH_TABLE_CAP = 1 << 30
_BUFFERS = 64 << 20

#: Bytes of a delta read to find its VCDIFF application header.
_HEADER_PROBE = 4096
_VCDIFF_MAGIC = b"\xd6\xc3\xc4\x00"
_VCD_SECONDARY = 0x01
_VCD_CODETABLE = 0x02
_VCD_APPHEADER = 0x04

_STDERR_TAIL = 2000
#: Guessed expansion of a non-gzip compressed source (bzip2/xz keep no size).
_UNKNOWN_EXPANSION = 8
#: bzip2, xz and compress(1) magic: sources xdelta3 also decompresses.
_OTHER_COMPRESSED_MAGIC = (b"BZh", b"\xfd7zXZ\x00", b"\x1f\x9d")
_VERSION_RE = re.compile(rb"version\s+([0-9][^\s,]*)", re.IGNORECASE)


def source_window(source_size: int, memory_limit: int) -> int:
    """The ``-B`` value for a source of ``source_size`` bytes.

    Covers the whole source when ``memory_limit`` allows, and always lies in
    xdelta3's accepted range [``MIN_SOURCE_WINDOW``, ``MAX_SOURCE_WINDOW``].
    """
    cap = max(MIN_SOURCE_WINDOW, min(memory_limit, MAX_SOURCE_WINDOW))
    return max(MIN_SOURCE_WINDOW, min(source_size, cap))


def memory_estimate(what: str, window: int) -> int:
    """An upper bound of the memory one xdelta3 run with source window
    ``window`` holds: ``"encode"`` (any level) or ``"decode"``."""
    if what == "encode":
        return window + min(2 * (1 << (window - 1).bit_length()), _HASH_TABLE_CAP) + _BUFFERS
    return window + _BUFFERS


def external_compression(header: bytes) -> tuple[str, str] | None:
    """The external-compression marks in a VCDIFF delta's application header.

    ``header`` is the first bytes of the delta. Returns ``(target_mark,
    source_mark)`` (e.g. ``("G", "G")`` for gzip on both sides, ``("", "")``
    for a delta made with ``-D``) when the header is xdelta3's
    ``target/mark/source/mark`` form, else None (no header, not VCDIFF, or a
    header written by another tool).
    """
    if len(header) < 5 or not header.startswith(_VCDIFF_MAGIC):
        return None
    indicator = header[4]
    pos = 5
    if indicator & _VCD_SECONDARY:
        pos += 1
    if indicator & _VCD_CODETABLE:
        length, pos = _read_varint(header, pos)
        if length is None:
            return None
        pos += length
    if not indicator & _VCD_APPHEADER:
        return None
    length, pos = _read_varint(header, pos)
    if length is None or pos + length > len(header):
        return None
    fields = header[pos : pos + length].split(b"/")
    if len(fields) != 4:
        return None
    return fields[1].decode("latin-1"), fields[3].decode("latin-1")


#: Bytes of a delta's start that hold its application header.
HEADER_PROBE = _HEADER_PROBE


def is_stock_gzip_delta(header: bytes) -> bool:
    """Whether a delta (its first ``HEADER_PROBE`` bytes) is the stock command's
    diff of decompressed gzip input: DeltaGlider cannot give such a file back."""
    marks = external_compression(header)
    return marks is not None and marks[0] == "G"


def _read_varint(data: bytes, pos: int) -> tuple[int | None, int]:
    """A VCDIFF (RFC 3284) base-128 integer at ``pos``; (None, pos) if truncated."""
    value = 0
    for _ in range(10):
        if pos >= len(data):
            return None, pos
        byte = data[pos]
        pos += 1
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, pos
    return None, pos


@dataclass(frozen=True)
class OutputCap:
    """The most a decode may write: ``size`` bytes, the number the object's
    ``setting`` gives (named in the ``DecodeLimit`` it raises)."""

    size: int
    setting: str = "dg-file-size"


class DeltaEngine:
    """Runs xdelta3 on files.

    ``memory_limit`` caps the source window (``-B``) and so xdelta3's memory
    use: a source larger than it is still diffed, but content that moved
    further than the window may not be found and the delta grows. All the
    engine's xdelta3 processes together hold at most ``memory_budget``
    bytes, what one encode with the largest window needs
    (:func:`memory_estimate`): a run waits until those running leave room
    for its own, so concurrent uploads and reads of large files queue
    instead of adding up (four 260 MiB encodes would hold 5.3 GB at once).

    ``level`` is xdelta3's compression level for encoding (DeltaGlider: 9).
    Levels 7-9 give the same deltas; 6 stores a series markedly faster for
    deltas a fraction of a percent larger (docs/configuration.md has the
    benchmark); any level decodes with any xdelta3.
    """

    def __init__(
        self, binary: str = "xdelta3", *, memory_limit: int = 1 << 30, level: int = 9
    ) -> None:
        if not 1 <= level <= 9:
            raise ValueError(f"xdelta3 level must be 1-9, not {level}")
        self.binary = binary
        #: Where ``binary`` is, resolved once (None: not found; runs fail with XdeltaMissing).
        self.path = children.resolve(binary)
        self.memory_limit = memory_limit
        self.level = level
        largest = source_window(MAX_SOURCE_WINDOW, memory_limit)
        #: Bytes all of this engine's xdelta3 runs together may hold (estimated).
        self.memory_budget = memory_estimate("encode", largest)
        self._memory = _Budget(self.memory_budget)

    def check(self) -> str:
        """Run ``xdelta3 -V`` once (blocking; call at startup) and return its version.

        Raises :class:`XdeltaMissing`, naming how to install it, when the
        binary is missing, not executable or does not answer like xdelta3.
        """
        resolved = self.path
        if resolved is None:
            raise XdeltaMissing(f"xdelta3 not found as {self.binary!r}; {INSTALL_HINT}")
        try:
            result = subprocess.run(
                [resolved, "-V"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
                check=False,
                env=children.child_env(),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise XdeltaMissing(f"cannot run {resolved}: {exc}; {INSTALL_HINT}") from exc
        output = result.stdout + result.stderr
        match = _VERSION_RE.search(output)
        if result.returncode != 0 or match is None:
            raise XdeltaMissing(
                f"{resolved} -V failed (exit {result.returncode}): "
                f"{_tail(output) or 'no output'}; {INSTALL_HINT}"
            )
        version = match.group(1).decode("ascii", "replace")
        log.debug("using %s, xdelta3 %s", resolved, version)
        return version

    async def encode(
        self, source: Path, target: Path, out: Path, *, level: int | None = None
    ) -> int:
        """Write a VCDIFF delta turning ``source`` into ``target`` to ``out``
        (at ``level``, else the engine's).

        Returns the delta's size in bytes. ``out`` is overwritten; on failure
        or cancellation it is removed. Raises :class:`DeltaEngineError` if
        xdelta3 fails, :class:`XdeltaMissing` if it is gone.
        """
        window = await self._window_for(source)
        args: list[str | Path] = ["-e", f"-{level or self.level}", "-f", "-D", "-R", "-A"]
        args += ["-B", str(window), "-s", source, target, out]
        work = await _size(source) + await _size(target)
        async with self._memory.hold(memory_estimate("encode", window)):
            await self._run("encode", args, out, work=work)
        delta_size = (await trio.Path(out).stat()).st_size
        log.debug("encoded %s against %s: %d bytes (-B %d)", target, source, delta_size, window)
        return delta_size

    async def decode(
        self,
        source: Path,
        delta: Path,
        out: Path,
        *,
        cap: OutputCap | None = None,
        window_checks: bool = True,
    ) -> None:
        """Rebuild into ``out`` the file that ``delta`` encodes against ``source``.

        ``out`` is overwritten; on failure or cancellation it is removed.
        Raises :class:`DeltaEngineError` if xdelta3 fails (corrupt delta,
        wrong source), :class:`XdeltaMissing` if it is gone, and
        :class:`DecodeLimit` if the output would pass ``cap`` (xdelta3 is
        stopped at that size) or the run its time limit. Does not
        check the result's SHA-256: that is the caller's job.

        ``window_checks=False`` skips xdelta3's check of every window it
        decodes against the delta's Adler-32 (``-n``): only for a caller
        that checks the whole result before any of it is used, since a
        corrupt delta, or one made against another source, then gives wrong
        bytes instead of failing.
        """
        window = await self._window_for(source)
        marks = await _compression_marks(delta)
        if marks is not None and any(marks):
            # Made by the stock command from compressed input: the delta is
            # against the decompressed source, so xdelta3 must decompress it
            # and recompress its output, as that command expects.
            log.info(
                "%s was made with external compression (%s); decoding it the stock way",
                delta,
                "/".join(marks),
            )
            flags = ["-d", "-f"]
            # The source is then read decompressed, through a pipe that
            # cannot seek: the window must hold all of it.
            window = await self._decompressed_window_for(source)
        else:
            flags = ["-d", "-f", "-D"]
        if not window_checks:
            flags.append("-n")
        args: list[str | Path] = [*flags, "-B", str(window), "-s", source, delta, out]
        await self._decode(args, window, source, delta, out, cap)

    async def decode_decompressed(
        self,
        source: Path,
        delta: Path,
        out: Path,
        *,
        cap: OutputCap | None = None,
    ) -> str:
        """Decode a stock delta of a compressed file without recompressing it.

        For a delta that the stock command (``xdelta3 -e -9 -s ref target``)
        made from a gzip/bzip2/xz ``target``, xdelta3 decompresses ``source``
        exactly as the encoder did and writes the target *as the encoder saw
        it*, decompressed (e.g. the ``.tar`` of a ``.tar.gz``), to ``out``:
        those bytes are exact, unlike the recompressed ones :meth:`decode`
        gives (see :mod:`dgfs.dgzip` for getting the original back).

        Returns the target's compression mark (``"G"`` for gzip, ``"B"``
        bzip2, ``"X"`` xz). Raises :class:`DeltaEngineError` if the delta
        records no target compression (then :meth:`decode` already gives
        the original bytes) or xdelta3 fails, :class:`DecodeLimit` past
        ``cap`` or the time limit; ``out`` is removed on failure.
        """
        marks = await _compression_marks(delta)
        if marks is None or not marks[0]:
            raise DeltaEngineError(f"{delta} records no external compression of its target")
        # The decoder reads a decompressed source from a pipe, so it cannot
        # seek: the window must hold all of it, not just the compressed size.
        window = await self._decompressed_window_for(source)
        args: list[str | Path] = ["-d", "-f", "-R", "-B", str(window), "-s", source, delta, out]
        await self._decode(args, window, source, delta, out, cap)
        return marks[0]

    async def _decode(
        self,
        args: list[str | Path],
        window: int,
        source: Path,
        delta: Path,
        out: Path,
        cap: OutputCap | None,
    ) -> None:
        """Run the decode ``args`` (source window ``window``) under ``cap``."""
        work = await _size(source) + (await _size(delta) if cap is None else cap.size)
        async with self._memory.hold(memory_estimate("decode", window)):
            await self._run("decode", args, out, work=work, cap=cap)

    async def _decompressed_window_for(self, source: Path) -> int:
        """The ``-B`` for reading ``source`` through external decompression."""
        try:
            async with await trio.open_file(source, "rb") as f:
                magic = await f.read(6)
                size = await f.seek(0, os.SEEK_END)
                trailer = b""
                if magic.startswith(b"\x1f\x8b") and size >= 18:
                    await f.seek(-4, os.SEEK_END)
                    trailer = await f.read(4)
        except OSError as exc:
            raise DeltaEngineError(f"cannot read delta source {source}: {exc}") from exc
        if len(trailer) == 4:
            # gzip's ISIZE: the (last member's) uncompressed size modulo 2**32.
            expected = max(size, int.from_bytes(trailer, "little"))
        elif magic.startswith(_OTHER_COMPRESSED_MAGIC):
            expected = size * _UNKNOWN_EXPANSION
        else:
            expected = size  # not decompressed: xdelta3 reads and seeks it as it is
        return self._window(source, expected, "decompresses to about")

    async def _window_for(self, source: Path) -> int:
        try:
            size = (await trio.Path(source).stat()).st_size
        except OSError as exc:
            raise DeltaEngineError(f"cannot read delta source {source}: {exc}") from exc
        return self._window(source, size, "is")

    def _window(self, source: Path, size: int, how: str) -> int:
        """The ``-B`` for a source read as ``size`` bytes, said once when it
        cannot hold them all."""
        window = source_window(size, self.memory_limit)
        if size > window:
            log.info(
                "%s %s %d bytes, more than the %d-byte source window; moved content may be missed",
                source,
                how,
                size,
                window,
            )
        return window

    async def _run(
        self,
        what: str,
        args: Sequence[str | Path],
        out: Path,
        *,
        work: int,
        cap: OutputCap | None = None,
    ) -> None:
        """Run xdelta3 writing ``out``: no more than ``cap`` (None: no cap),
        within the time limit for ``work`` bytes (:func:`dgfs.children.timeout_for`)."""
        command, preexec = self._command(what, args, cap)
        timeout = children.timeout_for(work)
        limit = DecodeLimit if what == "decode" else DeltaEngineError
        try:
            result = await self._spawn(what, command, preexec, timeout)
            if result is None:
                raise limit(
                    f"xdelta3 {what} stopped after {timeout:.0f} s, the time limit for"
                    f" {work} bytes of input and output"
                )
            self._check_result(what, command, result, cap)
        except BaseException:
            # Also on trio.Cancelled: never leave a partial output behind.
            with contextlib.suppress(OSError):
                out.unlink(missing_ok=True)
            raise

    def _command(
        self, what: str, args: Sequence[str | Path], cap: OutputCap | None
    ) -> tuple[list[str], Callable[[], None] | None]:
        """The xdelta3 command line for ``args``, and the ``preexec_fn`` that caps
        its output at ``cap`` (:func:`dgfs.children.size_capped`)."""
        if self.path is None:
            raise XdeltaMissing(f"cannot run {self.binary!r} to {what}: not found; {INSTALL_HINT}")
        command = [self.path, *(os.fspath(a) for a in args)]
        preexec = None
        if cap is not None:
            command, preexec = children.size_capped(command, cap.size)
        return command, preexec

    async def _spawn(
        self,
        what: str,
        command: list[str],
        preexec: Callable[[], None] | None,
        timeout: float,
    ) -> subprocess.CompletedProcess[bytes] | None:
        """Run ``command`` to its end, its stderr captured; None if it was
        killed at ``timeout`` seconds."""
        try:
            with trio.move_on_after(timeout) as deadline:
                result = await trio.run_process(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    capture_stderr=True,
                    check=False,
                    deliver_cancel=_kill_group,
                    # Own process group, so cancellation also kills the gzip
                    # helpers xdelta3 may spawn when decoding stock deltas.
                    start_new_session=True,
                    env=children.child_env(),
                    preexec_fn=preexec,
                )
        except (FileNotFoundError, PermissionError) as exc:
            raise XdeltaMissing(
                f"cannot run {self.binary!r} to {what}: {exc}; {INSTALL_HINT}"
            ) from exc
        return None if deadline.cancelled_caught else result

    def _check_result(
        self,
        what: str,
        command: list[str],
        result: subprocess.CompletedProcess[bytes],
        cap: OutputCap | None,
    ) -> None:
        """Raise the error a finished xdelta3 run stands for, if any: its output
        cap reached, prlimit unusable here, or another failure."""
        if cap is not None and children.wrote_past_cap(result.returncode, result.stderr):
            raise DecodeLimit(
                f"xdelta3 {what} stopped at {cap.size} bytes of output, the limit"
                f" ({cap.setting}) for this object"
            )
        if children.prlimit_failed(result.returncode, result.stderr):
            # Not the object's fault: this machine cannot run xdelta3 capped.
            gone = b"failed to execute" in result.stderr
            raise XdeltaMissing(
                f"cannot run {self.binary!r} to {what} under prlimit (which caps its"
                f" output): {_tail(result.stderr)}; "
                + (INSTALL_HINT if gone else "a seccomp filter may forbid prlimit(2)")
            )
        if result.returncode != 0:
            message = (
                f"xdelta3 {what} failed (exit {result.returncode}): "
                f"{_shell_text(command)}: {_tail(result.stderr) or 'no output'}"
            )
            local = _failed_here(result.returncode, result.stderr)
            if local is not None:
                raise XdeltaFailedHere(message, local)
            raise DeltaEngineError(message)


class _Budget:
    """Bytes that the xdelta3 processes of one engine may hold at once
    (trio thread only)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.peak = 0  # the most held at once: tests and telemetry
        self._released = trio.Event()

    @contextlib.asynccontextmanager
    async def hold(self, amount: int) -> AsyncIterator[None]:
        # A run larger than the whole budget runs once nothing else holds any.
        amount = min(amount, self.total)
        while self.used + amount > self.total:
            await self._released.wait()
        self.used += amount
        self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            self.used -= amount
            self._released.set()
            self._released = trio.Event()


async def _size(path: Path) -> int:
    """Size of an input file (0 if it cannot be read: xdelta3 then says why)."""
    try:
        return (await trio.Path(path).stat()).st_size
    except OSError:
        return 0


async def _compression_marks(delta: Path) -> tuple[str, str] | None:
    """``external_compression`` of the delta file ``delta``."""
    try:
        async with await trio.open_file(delta, "rb") as f:
            header = await f.read(_HEADER_PROBE)
    except OSError as exc:
        raise DeltaEngineError(f"cannot read delta {delta}: {exc}") from exc
    return external_compression(header)


async def _kill_group(process: trio.Process) -> None:
    """Cancel a running xdelta3 at once: SIGKILL its whole process group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.kill()


def _tail(output: bytes) -> str:
    text = output.decode("utf-8", "replace").strip()
    return text[-_STDERR_TAIL:]


def _shell_text(command: Sequence[str]) -> str:
    return " ".join(command)


#: What xdelta3 (strerror) says when this machine, not its input, failed it.
_LOCAL_ERRORS = {
    b"No space left on device": errno.ENOSPC,
    b"Disk quota exceeded": errno.EDQUOT,
    b"Input/output error": errno.EIO,
    b"Read-only file system": errno.EROFS,
}


def _failed_here(returncode: int, stderr: bytes) -> int | None:
    """The errno of a failure of this machine's (a full or failing disk, a
    kill), or None when xdelta3 failed on its input (a corrupt delta)."""
    for text, err in _LOCAL_ERRORS.items():
        if text in stderr:
            return err
    return errno.EIO if returncode < 0 else None
