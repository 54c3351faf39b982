"""PDF files: the text of each page, with pypdf (pure Python, well kept, no native parser).

A PDF encrypted with an empty user password (common for "no printing" PDFs) is opened;
one that needs a password is reported as encrypted. Hostile files are left to the bounds
of the process that runs this (wall-clock timeout, address-space limit: a huge stream
raises MemoryError there) and to recursion errors, reported as a limit.
"""

from __future__ import annotations

import io
import logging

from pypdf import PdfReader
from pypdf.errors import FileNotDecryptedError, PdfReadError, PdfStreamError

from bridge.attachments.kinds import Unreadable
from bridge.attachments.limits import LimitHit, TextBudget

logging.getLogger("pypdf").setLevel(logging.ERROR)  # it warns about every odd file


def extract_pdf(data: bytes, out: TextBudget) -> None:
    """Add the text of the PDF ``data`` to ``out`` (also its document information)."""
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise LimitHit(Unreadable.ENCRYPTED, "PDF needs a password")
        info = reader.metadata
        if info:
            out.add(" ".join(str(v) for v in info.values() if isinstance(v, str)) + "\n")
        for page in reader.pages:
            out.add(page.extract_text() + "\n")
            if out.full:
                return
    except LimitHit:
        raise
    except FileNotDecryptedError:
        raise LimitHit(Unreadable.ENCRYPTED, "PDF needs a password") from None
    except RecursionError:
        raise LimitHit(Unreadable.LIMIT, "PDF nests objects too deeply") from None
    except MemoryError:
        raise LimitHit(Unreadable.LIMIT, "PDF needs more memory than allowed") from None
    except (PdfReadError, PdfStreamError, ValueError, KeyError, TypeError, AttributeError,
            IndexError, AssertionError, NotImplementedError, OSError) as e:  # fmt: skip
        raise LimitHit(Unreadable.MALFORMED, f"PDF unreadable ({e.__class__.__name__})") from None
