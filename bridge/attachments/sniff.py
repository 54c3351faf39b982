"""Tell a file's type from its bytes: magic numbers (compressed streams and tar before
anything else: what they hold may look like another type), and zip-based formats by their
members.

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
#: Compressed streams and archives told by their first bytes (bzip2: "BZh" and a block
#: size digit).
_STREAM_MAGIC: tuple[tuple[bytes, FileType], ...] = (
    (b"\x1f\x8b", FileType.GZIP),
    (b"\xfd7zXZ\x00", FileType.XZ),
    (b"7z\xbc\xaf\x27\x1c", FileType.SEVEN_ZIP),
    (b"Rar!\x1a\x07", FileType.RAR),
)
_TAR_MAGIC_AT = 257  # "ustar" in a POSIX (ustar, pax) or GNU tar header; v7 tar has none
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


def archive_type(head: bytes) -> FileType | None:
    """The compressed-stream or archive type ``head`` starts with (gzip, bzip2, xz, tar,
    7z, rar), or None."""
    for magic, kind in _STREAM_MAGIC:
        if head.startswith(magic):
            return kind
    if head.startswith(b"BZh") and head[3:4].isdigit() and head[3:4] != b"0":
        return FileType.BZIP2
    if head[_TAR_MAGIC_AT : _TAR_MAGIC_AT + 5] == b"ustar" and _tar_checksum_ok(head):
        return FileType.TAR
    return None


def _tar_checksum_ok(head: bytes) -> bool:
    """Whether ``head`` starts with a tar header block whose checksum holds (as tar
    computes it: the checksum field counted as spaces; unsigned, or signed by old tars)."""
    if len(head) < 512:
        return False
    try:
        stored = int(head[148:156].replace(b"\0", b" ").strip() or b"-", 8)
    except ValueError:
        return False
    block = head[:148] + b" " * 8 + head[156:512]
    unsigned = sum(block)
    signed = unsigned - 256 * sum(1 for b in block if b > 127)
    return stored in (unsigned, signed)


def _looks_like_text(head: bytes) -> bool:
    if head.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
        return True
    if b"\x00" in head:
        return False
    controls = sum(1 for b in head if b < 9 or 13 < b < 32)
    return controls <= len(head) // 100


def is_pdf(data: bytes) -> bool:
    """Whether :func:`sniff` calls ``data`` a PDF (the marker in its first KiB, and no
    archive's magic before it: nothing is parsed, so the bridge's process may ask). A tar
    whose first member is a PDF has the marker in its first KiB too: it is a tar."""
    return b"%PDF-" in data[:1024] and archive_type(data[:_HEAD]) is None


def sniff(data: bytes, *, archives: bool = True) -> FileType:
    """The type of ``data`` from its content; with ``archives`` false, what it would be
    without the compressed-stream and tar magic (for a file that claims one but is not: a
    PDF reader finds a PDF after leading junk, whatever that junk is)."""
    if not data:
        return FileType.EMPTY
    head = data[:_HEAD]
    archived = archive_type(head) if archives else None
    if archived is not None:
        return archived
    if b"%PDF-" in head[:1024]:
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
    if archive_type(head) is not None:
        return None
    if not _is_media(head):
        return None
    if appended_zip(data[-ZIP_TAIL:]):
        return None  # an image with an archive behind it: read
    return FileType.MEDIA
