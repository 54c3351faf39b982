"""One file to text: sniff its type, run the reader for it, recurse into archives.

:func:`extract` never raises for what a file contains: every bound hit or unreadable part
becomes the ``reason`` of the :class:`Extraction` (text read before it is kept and still
judged). Run it in the pool (:mod:`bridge.attachments.pool`), which adds the bounds of time
and memory.

A long PDF may be read by several processes at once: each reads its share of the pages
(:func:`extract_part`), and :func:`merge_parts` puts the parts together into what
:func:`extract` would have answered for the whole file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bridge.attachments import archive, compressed
from bridge.attachments.archive import InflateBudget
from bridge.attachments.kinds import FileType, Unreadable
from bridge.attachments.limits import LimitHit, Limits, TextBudget
from bridge.attachments.markup import extract_html
from bridge.attachments.odf import extract_odf
from bridge.attachments.ooxml import extract_ooxml
from bridge.attachments.pdf import Part, extract_pdf
from bridge.attachments.sniff import ZIP_TAIL, appended_zip, is_pdf, sniff
from bridge.attachments.text import extract_text

_OOXML = frozenset({FileType.DOCX, FileType.XLSX, FileType.PPTX})
_ODF = frozenset({FileType.ODT, FileType.ODS, FileType.ODP})
#: Types that are themselves zip archives: no zip appended to them is looked for. Tar and
#: the compressed streams are not: a zip behind them is still a zip to zip tools.
_ZIPPED = _OOXML | _ODF | {FileType.ZIP}
#: Archives known by their magic but not read.
_NOT_READ = {FileType.SEVEN_ZIP: "7z archive: not read", FileType.RAR: "RAR archive: not read"}
#: Types told by magic bytes that other readers may ignore (a PDF reader finds a PDF after
#: leading junk): when such a file cannot be read as what it claims, it is read as what it
#: would be without that magic too.
_CLAIMED = compressed.STREAMS | {FileType.TAR}


@dataclass(frozen=True, slots=True)
class Extraction:
    """What was read from one file. ``reason``/``detail``: why (part of) it was not read
    (the first problem met; never content). ``types``: every type met, archives' members
    included, outermost first."""

    file_type: FileType
    text: str = ""
    reason: Unreadable | None = None
    detail: str = ""
    truncated: bool = False
    types: tuple[FileType, ...] = ()

    @property
    def read(self) -> bool:
        """Whether everything was read (text may still have been capped)."""
        return self.reason is None


class _Walk:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.out = TextBudget(limits.max_text_chars)
        self.budget = InflateBudget(limits.max_inflated_bytes)
        self.types: list[FileType] = []
        self.problem: LimitHit | None = None

    def note(self, hit: LimitHit) -> None:
        if self.problem is None:
            self.problem = hit

    def file(self, data: bytes, depth: int) -> FileType:
        kind = sniff(data)
        self.types.append(kind)
        # An archive appended to another file (a photo, a program, even a PDF): zip tools
        # read it from the end whatever comes first, so it is read as well.
        appended = kind not in _ZIPPED and appended_zip(data[-ZIP_TAIL:])
        try:
            if kind is FileType.TEXT:
                extract_text(data, self.out)
            elif kind is FileType.HTML:
                extract_html(data, self.out)
            elif kind is FileType.PDF:
                extract_pdf(data, self.out)
            elif kind in _OOXML:
                extract_ooxml(kind, data, self.out, self.limits, self.budget)
            elif kind in _ODF:
                extract_odf(data, self.out, self.limits, self.budget)
            elif kind is FileType.ZIP:
                self.zip(data, depth)
            elif kind in compressed.STREAMS:
                self.stream(kind, data, depth)
            elif kind is FileType.TAR:
                tar_end = self.tar(data, depth)
                # Only a zip after the tar's members is appended (one inside is a member).
                appended = appended and appended_zip(data[tar_end:][-ZIP_TAIL:])
            elif kind in _NOT_READ:
                raise LimitHit(Unreadable.UNREAD_ARCHIVE, _NOT_READ[kind])
            elif kind is FileType.UNKNOWN and not appended:
                raise LimitHit(Unreadable.UNKNOWN_TYPE, "a type the bridge does not read")
        except LimitHit as hit:
            self.note(hit)
            if kind in _CLAIMED and hit.reason is Unreadable.MALFORMED:
                self.unclaimed(data)
        if appended and not self.out.full:
            self.types.append(FileType.ZIP)
            if self.out.parts:
                self.out.add("\n")
            try:
                self.zip(data, depth)
            except LimitHit as hit:
                self.note(hit)
        if self.out.parts and not self.out.full:
            self.out.add("\n")  # the next file's text does not run into this one's
        return kind

    def zip(self, data: bytes, depth: int) -> None:
        if depth >= self.limits.max_depth:
            raise LimitHit(Unreadable.LIMIT, f"archives nested deeper than {self.limits.max_depth}")
        for _name, body in archive.members(data, self.limits, self.budget):
            self.file(body, depth + 1)
            if self.problem is not None and self.problem.reason is Unreadable.LIMIT:
                return  # a bomb's sibling members are not worth inflating
            if self.out.full:
                return

    def unclaimed(self, data: bytes) -> None:
        """Read ``data``, which failed as the archive its magic claims, as the type it would
        be without that magic when that is a PDF, HTML or text (a zip behind it is read as
        an appended archive)."""
        kind = sniff(data, archives=False)
        if kind not in (FileType.PDF, FileType.HTML, FileType.TEXT):
            return
        self.types.append(kind)
        try:
            if kind is FileType.PDF:
                extract_pdf(data, self.out)
            elif kind is FileType.HTML:
                extract_html(data, self.out)
            else:
                extract_text(data, self.out)
        except LimitHit as hit:
            self.note(hit)

    def stream(self, kind: FileType, data: bytes, depth: int) -> None:
        if depth >= self.limits.max_depth:
            raise LimitHit(Unreadable.LIMIT, f"archives nested deeper than {self.limits.max_depth}")
        try:
            body = compressed.inflate(kind, data, self.limits, self.budget)
        except compressed.Damaged as damaged:
            if damaged.partial:  # what came before the damage is still read
                self.file(damaged.partial, depth + 1)
            raise
        self.file(body, depth + 1)

    def tar(self, data: bytes, depth: int) -> int:
        """Read the tar ``data``'s members; the offset where its members end."""
        if depth >= self.limits.max_depth:
            raise LimitHit(Unreadable.LIMIT, f"archives nested deeper than {self.limits.max_depth}")
        members = compressed.TarMembers(data, self.limits, self.budget)
        for _name, body in members:
            self.file(body, depth + 1)
            if self.problem is not None and self.problem.reason is Unreadable.LIMIT:
                break
            if self.out.full:
                break
        return members.end


def _too_large(data: bytes, limits: Limits) -> Extraction | None:
    if len(data) <= limits.max_file_bytes:
        return None
    return Extraction(
        FileType.UNKNOWN,
        reason=Unreadable.TOO_LARGE,
        detail=f"{len(data)} bytes, over {limits.max_file_bytes}",
    )


def extract(data: bytes, limits: Limits) -> Extraction:
    """Read ``data`` within ``limits`` (all but time and memory, which the pool enforces)."""
    walk = _Walk(limits)
    too_large = _too_large(data, limits)
    if too_large is not None:
        return too_large
    kind = walk.file(data, 0)
    problem = walk.problem
    return Extraction(
        kind,
        "".join(walk.out.parts),
        None if problem is None else problem.reason,
        "" if problem is None else problem.detail,
        walk.out.truncated,
        tuple(walk.types[:50]),
    )


def extract_part(data: bytes, limits: Limits, part: Part) -> Extraction:
    """Read ``part`` of the PDF ``data`` (see :class:`~bridge.attachments.pdf.Part`), within
    ``limits`` as :func:`extract` would read the whole file (each part with the whole text
    budget: :func:`merge_parts` caps the total), for :func:`merge_parts`.

    The caller splits only what :func:`~bridge.attachments.sniff.is_pdf` accepts (what
    :func:`sniff` calls a PDF); anything else is answered as malformed, never read."""
    too_large = _too_large(data, limits)
    if too_large is not None:
        return too_large
    if not is_pdf(data):
        return Extraction(FileType.UNKNOWN, reason=Unreadable.MALFORMED, detail="not a PDF")
    out = TextBudget(limits.max_text_chars)
    problem: LimitHit | None = None
    try:
        extract_pdf(data, out, part)
    except LimitHit as hit:
        problem = hit
    return Extraction(
        FileType.PDF,
        "".join(out.parts),
        None if problem is None else problem.reason,
        "" if problem is None else problem.detail,
        out.truncated,
        (FileType.PDF,),
    )


#: Which reason a file read in parts reports when its parts report different ones: the
#: one that refuses by default first (a part over its bounds, then a password).
_SEVERITY = (
    Unreadable.LIMIT,
    Unreadable.ENCRYPTED,
    Unreadable.UNREAD_ARCHIVE,
    Unreadable.MALFORMED,
    Unreadable.TOO_LARGE,
    Unreadable.UNKNOWN_TYPE,
)


def merge_parts(parts: Sequence[Extraction], limits: Limits) -> Extraction:
    """One extraction from the extractions of a file's parts, in page order: their text
    joined and capped at ``limits.max_text_chars``, ended as :func:`extract` ends a file; the
    most severe reason of any part (the first part's detail for it).

    A part that hit a bound of time or memory (``LIMIT``: its process was killed or ran out
    of memory, nothing of it was read) makes the whole file that result, text and all, as a
    single process that hit it would have answered."""
    if not parts:
        raise ValueError("no parts")
    over = next((p for p in parts if p.reason is Unreadable.LIMIT), None)
    if over is not None:
        return over
    out = TextBudget(limits.max_text_chars)
    for part in parts:
        out.add(part.text)
    if out.parts and not out.full:
        out.add("\n")  # as _Walk.file ends a file
    # (severity, page order, reason, detail) of each part that was not all read
    problems = [
        (_SEVERITY.index(p.reason), i, p.reason, p.detail)
        for i, p in enumerate(parts)
        if p.reason is not None
    ]
    worst = min(problems, default=None)
    first = parts[0]
    return Extraction(
        first.file_type,
        "".join(out.parts),
        None if worst is None else worst[2],
        "" if worst is None else worst[3],
        out.truncated or any(p.truncated for p in parts),
        first.types,
    )
