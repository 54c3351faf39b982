"""``textless``: the gate's shortcut for files without text agrees with the full sniffing,
and never claims a file that may carry text (a PDF or an archive behind a media header)."""

from __future__ import annotations

import pytest

from bridge.attachments.kinds import FileType
from bridge.attachments.sniff import sniff, textless
from tests.kit import documents as d

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 64


@pytest.mark.parametrize(
    "data",
    [
        b"",
        PNG,
        JPEG,
        b"RIFF\0\0\0\0WEBPVP8 ",
        b"\0\0\0\x18ftypmp42" + b"\0" * 32,
        d.pdf("text"),
        d.docx("text"),
        d.zip_of({"a.txt": b"text"}),
        b"plain text",
        JPEG[:4] + b"%PDF-1.4 a PDF behind a JPEG header",
        b"\x01\x02\x03 unknown binary",
    ],
)
def test_textless_agrees_with_sniff(data: bytes) -> None:
    quick = textless(data)
    assert quick is None or quick is sniff(data)
    if sniff(data) not in (FileType.MEDIA, FileType.EMPTY):
        assert quick is None


def test_images_and_empty_files_are_known_without_parsing() -> None:
    assert textless(PNG) is FileType.MEDIA and textless(JPEG) is FileType.MEDIA
    assert textless(b"") is FileType.EMPTY
