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
"""

from __future__ import annotations

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from bridge.attachments.kinds import Unreadable
from bridge.attachments.limits import LimitHit, TextBudget

#: Document information keys whose values are text a sender controls.
_INFO_KEYS = ("Title", "Author", "Subject", "Keywords", "Creator", "Producer")


def extract_pdf(data: bytes, out: TextBudget) -> None:
    """Add the text of the PDF ``data`` to ``out`` (also its document information)."""
    try:
        doc = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as e:
        if e.err_code in (pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY):
            raise LimitHit(Unreadable.ENCRYPTED, "PDF needs a password") from None
        raise LimitHit(Unreadable.MALFORMED, "PDF unreadable (PDFium could not load it)") from None
    try:
        _read(doc, out)
    finally:
        doc.close()


def _read(doc: pdfium.PdfDocument, out: TextBudget) -> None:
    info = doc.get_metadata_dict(skip_empty=True)
    values = [info[key] for key in _INFO_KEYS if key in info]
    if values:
        out.add(" ".join(values) + "\n")
    bad_pages = 0
    for index in range(len(doc)):
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
        if out.full:
            return
    if bad_pages:
        raise LimitHit(Unreadable.MALFORMED, f"PDF: {bad_pages} page(s) could not be read")
