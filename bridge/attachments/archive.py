"""Zip archives read within bounds: members are inflated while every byte is counted.

Nothing a zip declares is trusted. Before anything is inflated the central directory is
checked: member count, and entries whose compressed data overlap (the "overlapping
entries" bomb of Fifield 2019 reuses one deflate stream for many members). While a member
inflates, its bytes are counted against the member cap, the budget of all inflated bytes
(shared by nested archives) and the expansion ratio; the first bound crossed stops the
read with :class:`~bridge.attachments.limits.LimitHit`.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

from bridge.attachments.kinds import Unreadable
from bridge.attachments.limits import LimitHit, Limits

_CHUNK = 64 * 1024
_LOCAL_HEADER = 30  # fixed part of a local file header


@dataclass
class InflateBudget:
    """Bytes that may still be inflated, for one file and everything nested in it."""

    left: int


def _check_directory(zf: zipfile.ZipFile, size: int, limits: Limits) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        detail = f"archive has {len(infos)} members (cap {limits.max_members})"
        raise LimitHit(Unreadable.LIMIT, detail)
    end = -1
    for info in sorted(infos, key=lambda i: i.header_offset):
        offset = info.header_offset
        if offset < end:
            raise LimitHit(Unreadable.LIMIT, "archive members overlap (a zip bomb's construction)")
        # The local header's extra field may differ from the directory's: leave it out.
        name = len(info.filename.encode("utf-8", "replace"))
        end = offset + _LOCAL_HEADER + name + info.compress_size
        if end > size:
            raise LimitHit(Unreadable.MALFORMED, "archive member extends past the end of the file")
    return infos


def members(
    data: bytes, limits: Limits, budget: InflateBudget, *, only: re.Pattern[str] | None = None
) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of each file in the zip ``data`` (whose whole name ``only``
    matches, if given), inflated within ``limits``.

    Raises LimitHit (LIMIT for a bound, ENCRYPTED for a password-protected member,
    MALFORMED for a broken archive).
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        detail = f"not a readable zip archive ({e.__class__.__name__})"
        raise LimitHit(Unreadable.MALFORMED, detail) from None
    with zf:
        for info in _check_directory(zf, len(data), limits):
            if info.is_dir() or (only is not None and not only.fullmatch(info.filename)):
                continue
            if info.flag_bits & 0x1:
                raise LimitHit(Unreadable.ENCRYPTED, "archive member is encrypted")
            yield info.filename, read_member(zf, info, limits, budget)


def charge(
    budget: InflateBudget, limits: Limits, added: int, total: int, packed: int, what: str
) -> None:
    """Count ``added`` bytes just inflated (``total`` so far from ``packed`` compressed
    bytes) against the shared budget, the member cap and, past the grace, the ratio.

    Raises LimitHit (LIMIT) naming the bound crossed, with ``what`` was inflating."""
    budget.left -= added
    if budget.left < 0:
        raise LimitHit(
            Unreadable.LIMIT, f"archive inflates past {limits.max_inflated_bytes} bytes in total"
        )
    if total > limits.max_member_bytes:
        raise LimitHit(Unreadable.LIMIT, f"{what} inflates past {limits.max_member_bytes} bytes")
    if total > limits.ratio_grace_bytes and total / max(packed, 1) > limits.max_ratio:
        raise LimitHit(Unreadable.LIMIT, f"{what} expands more than {limits.max_ratio:g} times")


def read_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: Limits, budget: InflateBudget
) -> bytes:
    """One member's bytes, counted while they inflate (its declared size is ignored)."""
    compressed = max(info.compress_size, 1)
    out = bytearray()
    try:
        with zf.open(info) as f:
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                out += chunk
                charge(budget, limits, len(chunk), len(out), compressed, "archive member")
    except LimitHit:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        detail = f"archive member unreadable ({e.__class__.__name__})"
        raise LimitHit(Unreadable.MALFORMED, detail) from None
    except RuntimeError:  # zipfile: "File is encrypted, password required"
        raise LimitHit(Unreadable.ENCRYPTED, "archive member is encrypted") from None
    return bytes(out)
