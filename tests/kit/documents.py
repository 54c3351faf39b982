"""Real documents built in the test: PDF (by hand, a valid minimal file), DOCX, XLSX, PPTX
(with their libraries), OpenDocument and zip archives (by hand), tar archives and gzip,
bzip2 and xz streams (the standard library), and bombs."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
import tarfile
import zipfile
import zlib


def pdf(*pages: str, extra_stream: bytes = b"", info_title: str = "") -> bytes:
    """A PDF with one page per text (Helvetica, one line per page)."""
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    pages_index = add(b"")  # filled below
    kids = []
    for text in pages:
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        content = b"BT /F1 12 Tf 72 720 Td (" + escaped.encode("latin-1") + b") Tj ET"
        stream = add(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
        kids.append(
            add(
                b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
                b"/Resources << /Font << /F1 %d 0 R >> >> >>" % (pages_index, stream, font)
            )
        )
    if extra_stream:
        packed = zlib.compress(extra_stream, 9)
        add(
            b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(packed)
            + packed
            + b"\nendstream"
        )
    objects[pages_index - 1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % k for k in kids),
        len(kids),
    )
    catalog = add(b"<< /Type /Catalog /Pages %d 0 R >>" % pages_index)
    info = add(b"<< /Title (" + info_title.encode("latin-1") + b") >>") if info_title else 0
    return _write_pdf(objects, catalog, info)


def encrypted_pdf(text: str, password: str = "s3cret") -> bytes:
    """A PDF that needs ``password`` to open (pypdf's writer)."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf(text))))
    writer.encrypt(user_password=password, owner_password=password, algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def docx(*paragraphs: str, header: str = "") -> bytes:
    """A Word document (python-docx)."""
    import docx as python_docx

    document = python_docx.Document()
    for text in paragraphs:
        document.add_paragraph(text)
    if header:
        document.sections[0].header.paragraphs[0].text = header
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def xlsx(rows: list[list[object]]) -> bytes:
    """An Excel workbook (openpyxl)."""
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    for row in rows:
        sheet.append(row)
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def pptx(*slides: str) -> bytes:
    """A PowerPoint deck, one text box per slide (python-pptx)."""
    from pptx import Presentation
    from pptx.util import Inches

    deck = Presentation()
    for text in slides:
        slide = deck.slides.add_slide(deck.slide_layouts[6])
        box = slide.shapes.add_textbox(Inches(1), Inches(1), Inches(4), Inches(1))
        box.text_frame.text = text
    out = io.BytesIO()
    deck.save(out)
    return out.getvalue()


_ODF_NS = (
    'xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" '
    'xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0"'
)


def odt(*paragraphs: str, mimetype: str = "application/vnd.oasis.opendocument.text") -> bytes:
    """An OpenDocument text (by hand: mimetype stored first, then content.xml)."""
    body = "".join(f"<text:p>{p}</text:p>" for p in paragraphs)
    content = (
        f'<?xml version="1.0" encoding="UTF-8"?><office:document-content {_ODF_NS}>'
        f"<office:body><office:text>{body}</office:text></office:body>"
        "</office:document-content>"
    )
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(zipfile.ZipInfo("mimetype"), mimetype, zipfile.ZIP_STORED)
        zf.writestr("content.xml", content, zipfile.ZIP_DEFLATED)
    return out.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    """A zip archive holding ``members`` (deflated)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def tar_of(members: dict[str, bytes], *, symlinks: dict[str, str] | None = None) -> bytes:
    """A tar archive (POSIX pax format) holding ``members`` and ``symlinks`` (name ->
    target)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT) as tf:
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def sparse_tar(data: bytes, realsize: int) -> bytes:
    """A tar (PAX, GNU sparse 1.0) whose one member stores ``data`` at offset 0 and declares
    ``realsize`` bytes: the rest is a hole that reads as zeros."""
    smap = f"1\n0\n{len(data)}\n".encode()
    smap += b"\0" * (-len(smap) % 512)
    info = tarfile.TarInfo("GNUSparseFile.0/big.txt")
    info.size = len(smap) + len(data)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "big.txt",
        "GNU.sparse.realsize": str(realsize),
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info, io.BytesIO(smap + data))
    return out.getvalue()


def gz(data: bytes) -> bytes:
    """``data`` gzip-compressed."""
    return gzip.compress(data, mtime=0)


def bz(data: bytes) -> bytes:
    """``data`` bzip2-compressed."""
    return bz2.compress(data)


def xz(data: bytes) -> bytes:
    """``data`` xz-compressed."""
    return lzma.compress(data, format=lzma.FORMAT_XZ)


def gzip_bomb(inflated: int = 1024 * 1024 * 1024) -> bytes:
    """A gzip file of ``inflated`` zero bytes (about 1000:1): one compressed MiB of zeros
    repeated as concatenated gzip members (valid gzip; the zeros are never in memory)."""
    return gz(b"\0" * (1024 * 1024)) * (inflated // (1024 * 1024))


def tar_gz_bomb(inflated: int = 1024 * 1024 * 1024) -> bytes:
    """A .tar.gz whose one member is ``inflated`` zero bytes (a multiple of 1 MiB): its tar
    header, the zeros and the end blocks as concatenated gzip members."""
    header = tarfile.TarInfo("zeros.bin")
    header.size = inflated
    return gz(header.tobuf(format=tarfile.PAX_FORMAT)) + gzip_bomb(inflated) + gz(b"\0" * 1024)


def ratio_bomb(inflated: int = 200 * 1024 * 1024) -> bytes:
    """One member of ``inflated`` zero bytes (about 1000:1), deflated in chunks."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("zeros.txt", "w") as f:
        chunk = b"\0" * (1024 * 1024)
        for _ in range(inflated // len(chunk)):
            f.write(chunk)
    return out.getvalue()


def nested_bomb(levels: int = 5, width: int = 4, leaf: int = 4 * 1024 * 1024) -> bytes:
    """A 42.zip-style bomb: ``width`` copies of the level below, ``levels`` deep, the leaf a
    run of zero bytes (``width ** levels * leaf`` bytes fully unpacked)."""
    data = zip_of({"leaf.txt": b"0" * leaf})
    for level in range(levels):
        data = zip_of({f"l{level}-{i}.zip": data for i in range(width)})
    return data


def overlapping_bomb(members: int = 200, kernel: int = 2 * 1024 * 1024) -> bytes:
    """Fifield's construction: many central-directory entries pointing at ONE deflate
    stream, so the archive's members overlap (``members * kernel`` bytes when unpacked)."""
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = raw.compress(b"a" * kernel) + raw.flush()
    crc = zlib.crc32(b"a" * kernel)
    name = b"k.txt"
    local = struct.pack(
        "<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(packed), kernel, len(name), 0
    )
    body = local + name + packed
    central = b""
    for i in range(members):
        entry = f"m{i:04d}.txt".encode()
        central += (
            struct.pack(
                "<4s6H3L5H2L",
                b"PK\x01\x02",
                20,
                20,
                0,
                8,
                0,
                0,
                crc,
                len(packed),
                kernel,
                len(entry),
                0,
                0,
                0,
                0,
                0,
                0,  # every entry's local header is the one at offset 0
            )
            + entry
        )
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, members, members, len(central), len(body), 0)
    return body + central + end


def billion_laughs(levels: int = 9) -> bytes:
    """The XML entity bomb, as a docx's document.xml."""
    ents = ['<!ENTITY l0 "lol">'] + [
        f'<!ENTITY l{i} "{("&l" + str(i - 1) + ";") * 10}">' for i in range(1, levels + 1)
    ]
    xml = (
        f'<?xml version="1.0"?><!DOCTYPE d [{"".join(ents)}]>'
        f'<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
        f"<w:body><w:p><w:r><w:t>&l{levels};</w:t></w:r></w:p></w:body></w:document>"
    )
    return zip_of(
        {
            "[Content_Types].xml": b"<Types/>",
            "word/document.xml": xml.encode(),
        }
    )


def _write_pdf(objects: list[bytes], root: int, info: int = 0) -> bytes:
    """A PDF of ``objects`` (object n is ``objects[n - 1]``) with catalog ``root`` (and
    document information dictionary ``info``, if not 0)."""
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    trailer = b"<< /Size %d /Root %d 0 R" % (len(objects) + 1, root)
    if info:
        trailer += b" /Info %d 0 R" % info
    out.write(b"trailer\n" + trailer + b" >>\nstartxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


_FONT = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"


def pdf_stream_bomb(inflated: int = 1024 * 1024 * 1024, text: str = "") -> bytes:
    """One page whose content stream (deflated) inflates to ``inflated`` bytes: ``text`` shown
    once, then spaces (about 1000:1)."""
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    head = b"BT /F1 12 Tf 72 720 Td (" + escaped.encode("latin-1") + b") Tj ET\n"
    packer = zlib.compressobj(9)
    parts = [packer.compress(head)]
    chunk = b" " * (1024 * 1024)
    for _ in range(inflated // len(chunk)):
        parts.append(packer.compress(chunk))
    parts.append(packer.flush())
    packed = b"".join(parts)
    objects = [
        _FONT,
        b"<< /Type /Pages /Kids [4 0 R] /Count 1 >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(packed) + packed + b"\nendstream",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 3 0 R "
        b"/Resources << /Font << /F1 1 0 R >> >> >>",
        b"<< /Type /Catalog /Pages 2 0 R >>",
    ]
    return _write_pdf(objects, 5)


def pdf_deep(levels: int = 100_000, text: str = "deep") -> bytes:
    """One page whose resources hold an array nested ``levels`` deep (a recursive parser's
    stack), and a page tree ``min(levels, 5000)`` nodes deep."""
    escaped = text.encode("latin-1")
    content = b"BT /F1 12 Tf 72 720 Td (" + escaped + b") Tj ET"
    nested = b"[" * levels + b"]" * levels
    tree = min(levels, 5000)
    objects = [
        _FONT,
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Catalog /Pages 4 0 R >>",
    ]
    # Pages nodes 4 .. 4 + tree - 1, each the only kid of the one before; then the page.
    first = 4
    page = first + tree
    for i in range(tree):
        number = first + i
        parent = b"" if i == 0 else b"/Parent %d 0 R " % (number - 1)
        objects.append(b"<< /Type /Pages %s/Kids [%d 0 R] /Count 1 >>" % (parent, number + 1))
    objects.append(
        b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] /Contents 2 0 R "
        b"/Resources << /Font << /F1 1 0 R >> /Deep %s >> >>" % (page - 1, nested)
    )
    return _write_pdf(objects, 3)


def _words(count: int, seed: int) -> list[str]:
    """``count`` pseudo-words from a fixed vocabulary (text that compresses like prose)."""
    import random

    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    weights = [26 - i for i in range(len(letters))]
    vocab = ["".join(rng.choices(letters, weights, k=rng.randint(2, 10))) for _ in range(3000)]
    return rng.choices(vocab, k=count)


def text_heavy_pdf(size: int = 1_000_000, lines_per_page: int = 50, seed: int = 1) -> bytes:
    """A PDF of about ``size`` bytes of dense text pages (deflated content streams, standard
    font, ~90 characters a line): the most text a megabyte of PDF carries."""
    words = iter(_words(size, seed))
    pages: list[bytes] = []
    total = 0
    while total < size:
        ops = [b"BT /F1 9 Tf 11 TL 50 760 Td"]
        for _ in range(lines_per_page):
            line = ""
            while len(line) < 90:
                line += next(words) + " "
            ops.append(b"(" + line.encode("ascii") + b") '")
        ops.append(b"ET")
        packed = zlib.compress(b"\n".join(ops), 6)
        pages.append(packed)
        total += len(packed) + 200
    return _pages_pdf([(p, b"") for p in pages])


def image_heavy_pdf(size: int = 1_000_000, images: int = 6, seed: int = 2) -> bytes:
    """A PDF of about ``size`` bytes: ``images`` pages, each a JPEG photo-like image (noise
    over gradients, made with Pillow) and a caption of a few words."""
    import random

    from PIL import Image, ImageFilter

    rng = random.Random(seed)
    per_image = size // images
    pages: list[tuple[bytes, bytes]] = []
    words = _words(images * 12, seed)
    for i in range(images):
        side = 400
        jpeg = b""
        while True:
            noise = Image.effect_noise((side, side), 60).filter(ImageFilter.GaussianBlur(1))
            img = Image.merge("RGB", (noise, noise.rotate(90), noise.rotate(180)))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
            jpeg = buf.getvalue()
            if len(jpeg) >= per_image * 0.9 or side > 3000:
                break
            side = int(side * (per_image / len(jpeg)) ** 0.5) + rng.randint(1, 9)
        caption = " ".join(words[i * 12 : (i + 1) * 12]).encode("ascii")
        ops = b"q 500 0 0 500 56 200 cm /Im0 Do Q BT /F1 10 Tf 56 150 Td (" + caption + b") Tj ET"
        xobject = (
            b"<< /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceRGB "
            b"/BitsPerComponent 8 /Filter /DCTDecode /Length %d >>\nstream\n"
            % (side, side, len(jpeg))
            + jpeg
            + b"\nendstream"
        )
        pages.append((zlib.compress(ops), xobject))
    return _pages_pdf(pages)


def _pages_pdf(pages: list[tuple[bytes, bytes]]) -> bytes:
    """Pages of (deflated content stream, image XObject object or b"")."""
    objects: list[bytes] = [_FONT, b""]  # 1: font, 2: page tree (filled below)
    kids = []
    for content, image in pages:
        objects.append(
            b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(content)
            + content
            + b"\nendstream"
        )
        stream = len(objects)
        xobjects = b""
        if image:
            objects.append(image)
            xobjects = b" /XObject << /Im0 %d 0 R >>" % len(objects)
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
            b"/Resources << /Font << /F1 1 0 R >>%s >> >>" % (stream, xobjects)
        )
        kids.append(len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % k for k in kids),
        len(kids),
    )
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    return _write_pdf(objects, len(objects))
