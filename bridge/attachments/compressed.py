"""Compressed streams (gzip, bzip2, xz) and tar archives read within bounds.

A stream is decompressed in chunks of at most 64 KiB of output, every byte counted (as a
zip member's: the member cap, the budget shared with nested archives, the ratio past its
grace) before the next chunk is asked for: a bomb is stopped having produced little more
than a bound. Concatenated streams (``cat a.gz b.gz``, multi-stream xz and bzip2) are all
read. What a stream holds is then read as a file nested in it (by its own type).

A tar archive is already uncompressed bytes: its regular files are copied out (counted
against the budget too), links and devices are never followed, the member count is capped.
"""

from __future__ import annotations

import bz2
import io
import lzma
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import Protocol

from bridge.attachments.archive import InflateBudget, charge
from bridge.attachments.kinds import FileType, Unreadable
from bridge.attachments.limits import LimitHit, Limits

_CHUNK = 64 * 1024

#: The compressed-stream types this module reads.
STREAMS = frozenset({FileType.GZIP, FileType.BZIP2, FileType.XZ})


class _Decompressor(Protocol):
    """bz2.BZ2Decompressor and lzma.LZMADecompressor: output capped by ``max_length``,
    input they could not yet use kept inside."""

    @property
    def eof(self) -> bool: ...
    @property
    def needs_input(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


def _new_bz2() -> _Decompressor:
    return bz2.BZ2Decompressor()


def _new_xz() -> _Decompressor:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)


_MALFORMED_ERRORS = (zlib.error, OSError, EOFError, ValueError, lzma.LZMAError)


def _gzip_chunks(data: bytes) -> Iterator[bytes]:
    """Output chunks of the gzip members in ``data``, one after another (zlib keeps input it
    could not use in ``unconsumed_tail`` when the output is capped)."""
    pending = data
    while True:
        d = zlib.decompressobj(wbits=31)  # gzip only
        while not d.eof:
            chunk = d.decompress(pending, _CHUNK)
            pending = d.unconsumed_tail
            if chunk:
                yield chunk
            elif not pending:
                raise EOFError("stream ends before its end marker")
        pending = d.unused_data
        if not pending.strip(b"\0"):
            return  # the end, or zero padding (tape blocking): gzip ignores it too


def _other_chunks(data: bytes, new: Callable[[], _Decompressor]) -> Iterator[bytes]:
    """Output chunks of the bzip2 or xz streams in ``data``, one after another."""
    pending = data
    while True:
        d = new()
        while not d.eof:
            chunk = d.decompress(pending, _CHUNK)
            pending = b""
            if chunk:
                yield chunk
            elif d.needs_input:
                raise EOFError("stream ends before its end marker")
        pending = d.unused_data
        if not pending.strip(b"\0"):
            return


class Damaged(LimitHit):
    """A compressed stream that is truncated or corrupt (MALFORMED); ``partial``: the bytes
    decompressed before the damage."""

    def __init__(self, detail: str, partial: bytes) -> None:
        super().__init__(Unreadable.MALFORMED, detail)
        self.partial = partial


def inflate(kind: FileType, data: bytes, limits: Limits, budget: InflateBudget) -> bytes:
    """What the compressed stream ``data`` (gzip, bzip2 or xz: ``kind``) holds, counted
    while it decompresses.

    Raises LimitHit: LIMIT when a bound is crossed (nothing is returned); MALFORMED when the
    stream is truncated or corrupt, with what was decompressed before the damage in
    :attr:`Damaged.partial` (still worth reading).
    """
    if kind is FileType.GZIP:
        chunks = _gzip_chunks(data)
    elif kind is FileType.BZIP2:
        chunks = _other_chunks(data, _new_bz2)
    elif kind is FileType.XZ:
        chunks = _other_chunks(data, _new_xz)
    else:
        raise ValueError(f"not a compressed stream: {kind}")
    out = bytearray()
    what = f"{kind} stream"
    try:
        for chunk in chunks:
            out += chunk
            charge(budget, limits, len(chunk), len(out), len(data), what)
    except _MALFORMED_ERRORS as e:
        raise Damaged(f"{what} damaged or truncated ({e.__class__.__name__})", bytes(out)) from None
    return bytes(out)


class TarMembers:
    """``(name, bytes)`` of each regular file in the tar archive ``data`` (uncompressed),
    when iterated; then :attr:`end`, the offset where its members end (0 until then).

    Directories, links (symbolic and hard: never followed), devices and FIFOs are skipped.
    Iterating raises LimitHit: LIMIT for more than ``limits.max_members`` entries or a bound
    crossed while copying a member (sparse members' holes are counted as they fill in);
    MALFORMED for a damaged archive (a header's size past the end of the data included).
    """

    def __init__(self, data: bytes, limits: Limits, budget: InflateBudget) -> None:
        self.data = data
        self.limits = limits
        self.budget = budget
        self.end = 0

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        try:
            tf = tarfile.open(fileobj=io.BytesIO(self.data), mode="r:")
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            detail = f"not a readable tar archive ({e.__class__.__name__})"
            raise LimitHit(Unreadable.MALFORMED, detail) from None
        with tf:
            count = 0
            while True:
                try:
                    info = tf.next()
                except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeError) as e:
                    detail = f"tar archive damaged ({e.__class__.__name__})"
                    raise LimitHit(Unreadable.MALFORMED, detail) from None
                if info is None:
                    self.end = tf.offset
                    return
                count += 1
                if count > self.limits.max_members:
                    detail = f"archive has more than {self.limits.max_members} members"
                    raise LimitHit(Unreadable.LIMIT, detail)
                self.end = info.offset_data + info.size
                if info.isreg():
                    if info.issparse():
                        body, damage = _tar_member(tf, info, self.limits, self.budget)
                    else:
                        body, damage = self._stored(info)
                    if body:
                        yield info.name, body  # before the damage, still read
                    if damage is not None:
                        raise damage

    def _stored(self, info: tarfile.TarInfo) -> tuple[bytes, LimitHit | None]:
        """A (non-sparse) member's bytes, cut from the archive's where its header says,
        counted; the damage when the header's size runs past the end of the data."""
        start = info.offset_data
        end = start + info.size
        body = self.data[start : min(end, len(self.data))]
        charge(self.budget, self.limits, len(body), len(body), len(body), "tar member")
        if end > len(self.data):
            return body, LimitHit(Unreadable.MALFORMED, "tar member runs past the end of the data")
        return body, None


def _tar_member(
    tf: tarfile.TarFile, info: tarfile.TarInfo, limits: Limits, budget: InflateBudget
) -> tuple[bytes, LimitHit | None]:
    """A sparse member's bytes, copied in chunks and counted (the size its header declares
    is not trusted: reading stops at the bounds or the end of the data), and the damage
    that stopped it early (MALFORMED), if any. Raises LimitHit (LIMIT) for a bound."""
    out = bytearray()
    try:
        f = tf.extractfile(info)
        if f is None:
            return b"", None
        with f:
            while chunk := f.read(_CHUNK):
                out += chunk
                # Stored bytes do not expand: only a sparse member's holes can (no ratio,
                # the member cap and the budget bound them).
                charge(budget, limits, len(chunk), len(out), len(out), "tar member")
    except LimitHit:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        detail = f"tar member unreadable ({e.__class__.__name__})"
        return bytes(out), LimitHit(Unreadable.MALFORMED, detail)
    return bytes(out), None
