"""PDF files: the text of each page and the document information, with PDFium (pypdfium2).

Why PDFium and not pypdf (measured in ``bench/attachments.py``, BENCHMARKS.md): PDFium, the
PDF engine of Chromium, reads text about 3x faster than pure-Python pypdf on dense text and
5-15x on image-heavy files (pypdf, at 0.3-0.6 MB/s, added 2-3 s to the upload of a
text-heavy 1 MB PDF); and it reads what pypdf
gives up on: pypdf stops inflating a stream past its own limit and raises, so a page hidden
behind a large stream was "malformed" (allowed) while PDFium reads it, or trips the memory
bound. pypdfium2 ships PDFium as a binary wheel (Apache-2.0/BSD-3; no AGPL, unlike PyMuPDF).

A PDF encrypted with an empty user password (common for "no printing" PDFs) is opened;
one that needs a password is reported as encrypted. PDFium is native code and not
thread-safe: it runs only in the extraction processes (one file at a time, single
threaded), whose bounds apply to it too: a stream that inflates past ``RLIMIT_AS`` makes
PDFium abort the process, which the pool reports as the memory limit and replaces; a
parser that does not finish is killed at the timeout. A page PDFium cannot load (a page
tree or object nested too deeply, a damaged page) is skipped and reported as malformed;
the other pages are still read.

A long PDF may be read in parts, each by its own extraction process (:class:`Part`): every
part opens the whole document and counts its pages itself, then reads only its share of
them; the first part also reads the document information.
"""

from __future__ import annotations

from dataclasses import dataclass

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from bridge.attachments.kinds import Unreadable
from bridge.attachments.limits import LimitHit, TextBudget

#: Document information keys whose values are text a sender controls.
_INFO_KEYS = ("Title", "Author", "Subject", "Keywords", "Creator", "Producer")


@dataclass(frozen=True, slots=True)
class Part:
    """Part ``index`` of ``count`` of a PDF of N pages: pages ``[index * N // count,
    (index + 1) * N // count)``; part 0 also reads the document information."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"part {self.index} of {self.count}")

    def pages(self, total: int) -> range:
        """The page indexes of this part in a document of ``total`` pages."""
        return range(self.index * total // self.count, (self.index + 1) * total // self.count)


WHOLE = Part(0, 1)


def extract_pdf(data: bytes, out: TextBudget, part: Part = WHOLE) -> None:
    """Add the text of the PDF ``data`` to ``out`` (also its document information): of the
    pages of ``part``, by default all of them."""
    try:
        doc = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as e:
        if e.err_code in (pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY):
            raise LimitHit(Unreadable.ENCRYPTED, "PDF needs a password") from None
        raise LimitHit(Unreadable.MALFORMED, "PDF unreadable (PDFium could not load it)") from None
    try:
        _read(doc, out, part)
    finally:
        doc.close()


def _read(doc: pdfium.PdfDocument, out: TextBudget, part: Part) -> None:
    if part.index == 0:
        info = doc.get_metadata_dict(skip_empty=True)
        values = [info[key] for key in _INFO_KEYS if key in info]
        if values:
            out.add(" ".join(values) + "\n")
    bad_pages = 0
    for index in part.pages(len(doc)):
        if out.full:
            out.truncated = True  # pages left unread, even when the budget was spent exactly
            return
        try:
            page = doc[index]
        except pdfium.PdfiumError:
            bad_pages += 1
            continue
        try:
            textpage = page.get_textpage()
            try:
                out.add(textpage.get_text_range() + "\n")
            finally:
                textpage.close()
        except pdfium.PdfiumError:
            bad_pages += 1
        finally:
            page.close()
    if bad_pages:
        raise LimitHit(Unreadable.MALFORMED, f"PDF: {bad_pages} page(s) could not be read")
