"""The vocabulary of attachment scanning: file types, why a file could not be read, outcomes."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class FileType(StrEnum):
    """A file's type as sniffed from its bytes."""

    TEXT = "text"
    HTML = "html"
    PDF = "pdf"
    DOCX = "docx"
    XLSX = "xlsx"
    PPTX = "pptx"
    ODT = "odt"
    ODS = "ods"
    ODP = "odp"
    ZIP = "zip"
    TAR = "tar"
    #: Compressed streams: what they hold is read as a file nested in them.
    GZIP = "gzip"
    BZIP2 = "bzip2"
    XZ = "xz"
    #: Archives known by their magic bytes but not read (reported as ``unread_archive``).
    SEVEN_ZIP = "7z"
    RAR = "rar"
    #: Images, audio, video: carry no text we read (known, so not "unknown").
    MEDIA = "media"
    EMPTY = "empty"
    UNKNOWN = "unknown"


class Unreadable(StrEnum):
    """Why a file's text could not (all) be read: the classes of the ``unreadable`` rule."""

    ENCRYPTED = "encrypted"  # a password-protected PDF or zip member
    UNKNOWN_TYPE = "unknown_type"  # bytes of a type we do not read
    UNREAD_ARCHIVE = "unread_archive"  # an archive format we know but do not read (7z, RAR)
    TOO_LARGE = "too_large"  # over the size the module or the bridge reads
    LIMIT = "limit"  # expansion ratio, inflated size, depth, members, time or memory hit
    MALFORMED = "malformed"  # claims a type but cannot be parsed


class Outcome(StrEnum):
    """What the bridge decided about one file."""

    ALLOWED = "allowed"  # read, nothing matched that blocks
    BLOCKED = "blocked"  # a DLP rule that blocks matched
    UNREADABLE_ALLOWED = "unreadable_allowed"  # not read; the rule says allow and record
    UNREADABLE_REFUSED = "unreadable_refused"  # not read; the rule says refuse


class OnUnreadable(StrEnum):
    """What to do with a file that could not be read."""

    ALLOW = "allow"  # let it through and record why it was not read
    REFUSE = "refuse"


#: The defaults: a file nobody can read (a password-protected PDF or archive) and a file
#: that trips a bound (a zip bomb, a parser that does not finish) are refused; files of
#: types without text, too large to read or damaged are let through and recorded.
DEFAULT_UNREADABLE: Mapping[Unreadable, OnUnreadable] = {
    Unreadable.ENCRYPTED: OnUnreadable.REFUSE,
    Unreadable.LIMIT: OnUnreadable.REFUSE,
    Unreadable.UNKNOWN_TYPE: OnUnreadable.ALLOW,
    # An archive hides what is in it as well as a password does: refused like encryption.
    Unreadable.UNREAD_ARCHIVE: OnUnreadable.REFUSE,
    Unreadable.TOO_LARGE: OnUnreadable.ALLOW,
    Unreadable.MALFORMED: OnUnreadable.ALLOW,
}
