"""Files with a zip archive appended (a photo, a program or a PDF in front): zip tools read
the archive from the end, whatever precedes it, so the bridge reads it too."""

from __future__ import annotations

import os

from bridge.attachments.extract import extract
from bridge.attachments.kinds import FileType
from bridge.attachments.limits import Limits
from bridge.attachments.sniff import ZIP_TAIL, appended_zip, textless
from tests.kit import documents as d

CARD = "4111 1111 1111 1111"
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(20_000)
HIDDEN = d.zip_of({"notes/card.txt": f"card {CARD}\n".encode()})


def test_a_photo_with_an_archive_behind_it_is_read_as_the_archive() -> None:
    got = extract(PNG + HIDDEN, Limits())
    assert got.file_type is FileType.MEDIA and FileType.ZIP in got.types
    assert CARD in got.text and got.reason is None
    assert textless(PNG + HIDDEN) is None  # the gate sends it to a reader
    assert textless(PNG) is FileType.MEDIA


def test_a_program_or_a_pdf_with_an_archive_behind_it_is_read_in_full() -> None:
    program = b"MZ\x90\x00" + bytes(range(256)) * 40  # an unknown binary (a self-extractor)
    got = extract(program + HIDDEN, Limits())
    assert CARD in got.text and got.reason is None  # not "a type the bridge does not read"
    pdf = extract(d.pdf("quarterly minutes") + HIDDEN, Limits())
    assert "quarterly minutes" in pdf.text and CARD in pdf.text
    assert pdf.file_type is FileType.PDF


def test_a_real_zip_is_not_read_twice_and_noise_is_no_archive() -> None:
    plain = extract(HIDDEN, Limits())
    assert plain.text.count(CARD) == 1 and plain.types.count(FileType.ZIP) == 1
    # The end record's signature alone, without a central directory where it points.
    fake = PNG + b"PK\x05\x06" + (100).to_bytes(4, "little") * 4 + b"\x00\x00"
    assert not appended_zip(fake[-ZIP_TAIL:])
    assert extract(fake, Limits()).reason is None
    assert textless(fake) is FileType.MEDIA


def test_an_archive_appended_behind_a_long_prefix_is_found_from_the_tail() -> None:
    long_photo = b"\xff\xd8\xff" + os.urandom(2_000_000)
    data = long_photo + HIDDEN
    assert appended_zip(data[-ZIP_TAIL:])
    assert CARD in extract(data, Limits(max_file_bytes=8_000_000)).text
