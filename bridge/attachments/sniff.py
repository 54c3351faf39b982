"""Tell a file's type from its bytes: magic numbers, and zip-based formats by their members.

Synapse gives the module neither a content type nor a filename, and neither could be
trusted: the type is read from the content alone.
"""

from __future__ import annotations

import io
import zipfile

from bridge.attachments.kinds import FileType

_HEAD = 4096
_MEDIA_MAGIC: tuple[bytes, ...] = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"GIF87a",
    b"GIF89a",
    b"OggS",
    b"ID3",  # MP3 with a tag
    b"fLaC",
    b"\x1a\x45\xdf\xa3",  # Matroska / WebM
)
_ODF_TYPES = {
    "application/vnd.oasis.opendocument.text": FileType.ODT,
    "application/vnd.oasis.opendocument.spreadsheet": FileType.ODS,
    "application/vnd.oasis.opendocument.presentation": FileType.ODP,
}
_HTML_MARKERS = (b"<!doctype html", b"<html", b"<head", b"<body")
#: A zip's end-of-central-directory record is within this many bytes of its end (22 bytes
#: and a comment of up to 65,535).
ZIP_TAIL = 22 + 65_535
_EOCD = b"PK\x05\x06"
_CENTRAL = b"PK\x01\x02"


def _is_media(head: bytes) -> bool:
    if head.startswith(_MEDIA_MAGIC):
        return True
    if head[:4] == b"RIFF" and head[8:12] in (b"WEBP", b"WAVE", b"AVI "):
        return True
    return head[4:8] == b"ftyp"  # MP4, MOV, HEIC, AVIF


def zip_type(data: bytes) -> FileType:
    """Which zip-based format ``data`` is (ZIP when none we know; reads names only, plus at
    most 128 bytes of an OpenDocument ``mimetype`` member)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = set(zf.namelist())
            if "mimetype" in names:
                info = zf.getinfo("mimetype")
                if info.compress_type == zipfile.ZIP_STORED and info.file_size <= 128:
                    with zf.open(info) as f:
                        kind = f.read(128).decode("ascii", "replace").strip()
                    if kind in _ODF_TYPES:
                        return _ODF_TYPES[kind]
            if "[Content_Types].xml" in names:
                if "word/document.xml" in names:
                    return FileType.DOCX
                if "xl/workbook.xml" in names:
                    return FileType.XLSX
                if "ppt/presentation.xml" in names:
                    return FileType.PPTX
    except (zipfile.BadZipFile, OSError, RuntimeError, ValueError, EOFError):
        return FileType.ZIP  # the archive reader reports it as malformed
    return FileType.ZIP


def appended_zip(tail: bytes) -> bool:
    """Whether ``tail`` (a file's last :data:`ZIP_TAIL` bytes, or all of a shorter file)
    ends a zip archive: an end-of-central-directory record whose central directory starts
    where it says (or lies before ``tail``). Zip tools find an archive from its end,
    whatever precedes it: a photo or a program with a zip appended is also an archive."""
    at = tail.rfind(_EOCD)
    while at >= 0:
        if at + 22 <= len(tail):
            size = int.from_bytes(tail[at + 12 : at + 16], "little")
            start = at - size
            if size == 0xFFFFFFFF or start < 0 or tail[start : start + 4] == _CENTRAL:
                return True
        at = tail.rfind(_EOCD, 0, at)
    return False


def _looks_like_text(head: bytes) -> bool:
    if head.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
        return True
    if b"\x00" in head:
        return False
    controls = sum(1 for b in head if b < 9 or 13 < b < 32)
    return controls <= len(head) // 100


def is_pdf(data: bytes) -> bool:
    """Whether :func:`sniff` calls ``data`` a PDF (the marker in its first KiB: nothing is
    parsed, so the bridge's process may ask)."""
    return b"%PDF-" in data[:1024]


def sniff(data: bytes) -> FileType:
    """The type of ``data`` from its content."""
    if not data:
        return FileType.EMPTY
    head = data[:_HEAD]
    if is_pdf(head):
        return FileType.PDF
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return zip_type(data)
    if _is_media(head):
        return FileType.MEDIA
    if _looks_like_text(head):
        lowered = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
        if any(m in lowered[:1024] for m in _HTML_MARKERS):
            return FileType.HTML
        return FileType.TEXT
    return FileType.UNKNOWN


def textless(data: bytes) -> FileType | None:
    """``MEDIA`` or ``EMPTY`` when :func:`sniff` would say so, told from magic bytes alone
    (nothing is parsed): such a file needs no reader, and no extraction process. None when
    the file may carry text, an archive appended to it included (``data`` may be a file's
    head and tail joined: the tail is what :func:`appended_zip` reads)."""
    if not data:
        return FileType.EMPTY
    head = data[:_HEAD]
    if is_pdf(head) or head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return None
    if appended_zip(data[-ZIP_TAIL:]):
        return None  # an image with an archive behind it: read
    return FileType.MEDIA if _is_media(head) else None
