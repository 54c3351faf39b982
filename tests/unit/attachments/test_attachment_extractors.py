"""Each reader on real files built in the test, the sniffing, and every bomb refused on its
bound (the reason and which bound are asserted; timings belong to bench/attachments.py)."""

from __future__ import annotations

import pytest

from bridge.attachments.extract import extract
from bridge.attachments.kinds import FileType, Unreadable
from bridge.attachments.limits import MIB, Limits
from bridge.attachments.sniff import sniff
from bridge.attachments.text import decode
from tests.kit import documents as d

CARD = "4111 1111 1111 1111"
LIMITS = Limits()


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (d.pdf(f"card {CARD}"), FileType.PDF),
        (d.docx(f"card {CARD}"), FileType.DOCX),
        (d.xlsx([["card", CARD]]), FileType.XLSX),
        (d.pptx(f"card {CARD}"), FileType.PPTX),
        (d.odt(f"card {CARD}"), FileType.ODT),
        (d.odt(f"card {CARD}", mimetype="application/vnd.oasis.opendocument.spreadsheet"),
         FileType.ODS),
        (f"<!DOCTYPE html><p>card <b>{CARD}</b></p>".encode(), FileType.HTML),
        (f"card {CARD}".encode(), FileType.TEXT),
        (d.zip_of({"notes/a.txt": f"card {CARD}".encode()}), FileType.ZIP),
    ],
)  # fmt: skip
def test_each_format_is_sniffed_and_its_text_read(data: bytes, kind: FileType) -> None:
    result = extract(data, LIMITS)
    assert (result.file_type, result.reason) == (kind, None)
    assert CARD in result.text


def test_office_files_give_up_text_outside_the_body() -> None:
    assert "Secret header" in extract(d.docx("body", header="Secret header"), LIMITS).text
    numbers = extract(d.xlsx([[4111111111111111, 42]]), LIMITS).text
    assert "4111111111111111" in numbers and "42" in numbers
    assert "two" in extract(d.pptx("one", "two"), LIMITS).text
    assert "Codename" in extract(d.pdf("x", info_title="Codename"), LIMITS).text


def test_archives_are_read_recursively_and_members_by_their_type() -> None:
    inner = d.zip_of({"deck.pptx": d.pptx("inner slide"), "doc.pdf": d.pdf("inner pdf")})
    result = extract(d.zip_of({"a.txt": b"top", "inner.zip": inner}), LIMITS)
    assert result.reason is None
    assert {"top", "inner slide", "inner pdf"} <= set(result.text.split("\n"))
    assert FileType.PPTX in result.types and FileType.PDF in result.types


def test_media_and_empty_files_are_known_types_without_text() -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    assert sniff(png) is FileType.MEDIA and extract(png, LIMITS).reason is None
    assert sniff(b"\0\0\0\x18ftypmp42") is FileType.MEDIA
    assert sniff(b"") is FileType.EMPTY
    unknown = extract(bytes(range(256)) * 4, LIMITS)
    assert (unknown.file_type, unknown.reason) == (FileType.UNKNOWN, Unreadable.UNKNOWN_TYPE)


def test_charsets_are_detected_sanely() -> None:
    assert decode("café 4111".encode("latin-1")) == "café 4111"
    assert decode("Grüße aus Köln. ".encode("cp1252") * 200).startswith("Grüße")
    assert decode(("Привет, это проверка текста. " * 100).encode("cp1251")).startswith("Привет")
    assert decode("naïve".encode("utf-16")) == "naïve"
    assert decode("日本語のテキスト".encode()) == "日本語のテキスト"


def test_an_encrypted_pdf_is_reported_not_read() -> None:
    result = extract(d.encrypted_pdf(f"card {CARD}"), LIMITS)
    assert (result.file_type, result.reason) == (FileType.PDF, Unreadable.ENCRYPTED)
    assert CARD not in result.text


def test_an_empty_password_pdf_is_read() -> None:
    result = extract(d.encrypted_pdf(f"card {CARD}", password=""), LIMITS)
    assert result.reason is None and CARD in result.text


def test_a_damaged_pdf_is_malformed() -> None:
    assert extract(b"%PDF-1.4\n garbage", LIMITS).reason is Unreadable.MALFORMED


def test_a_ratio_bomb_stops_on_the_ratio_before_it_inflates() -> None:
    result = extract(d.ratio_bomb(200 * MIB), LIMITS)
    assert result.reason is Unreadable.LIMIT
    assert "expands more than 100 times" in result.detail


def test_the_total_inflated_budget_holds_across_members_and_depths() -> None:
    limits = Limits(max_ratio=1e9, max_inflated_bytes=8 * MIB, max_text_chars=100 * MIB)
    result = extract(d.nested_bomb(levels=2, width=4, leaf=2 * MIB), limits)
    assert result.reason is Unreadable.LIMIT
    assert "inflates past" in result.detail


def test_a_42_zip_style_bomb_stops_on_depth() -> None:
    result = extract(d.nested_bomb(levels=5, width=16, leaf=MIB), LIMITS)
    assert result.reason is Unreadable.LIMIT
    assert "nested deeper than 3" in result.detail


def test_an_overlapping_entries_bomb_is_refused_before_anything_inflates() -> None:
    result = extract(d.overlapping_bomb(members=500), LIMITS)
    assert result.reason is Unreadable.LIMIT
    assert "overlap" in result.detail


def test_too_many_members_is_a_limit() -> None:
    data = d.zip_of({f"{i}.txt": b"x" for i in range(30)})
    assert extract(data, Limits(max_members=20)).reason is Unreadable.LIMIT


def test_declared_sizes_are_not_trusted() -> None:
    # A member that claims 10 bytes but inflates to 5 MB is cut by zipfile at 10 bytes and
    # fails its CRC: reported as damaged, never passed off as a read file.
    data = bytearray(d.zip_of({"a.txt": b"A" * (5 * MIB)}))
    central = data.rindex(b"PK\x01\x02")
    data[central + 24 : central + 28] = (10).to_bytes(4, "little")
    local = data.index(b"PK\x03\x04")
    data[local + 22 : local + 26] = (10).to_bytes(4, "little")
    assert extract(bytes(data), LIMITS).reason is Unreadable.MALFORMED


def test_an_xml_entity_bomb_is_refused() -> None:
    result = extract(d.billion_laughs(), LIMITS)
    assert (result.file_type, result.reason) == (FileType.DOCX, Unreadable.LIMIT)
    assert "EntitiesForbidden" in result.detail


def test_an_encrypted_zip_member_is_reported() -> None:
    data = bytearray(d.zip_of({"a.txt": b"hello"}))
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # set the "encrypted" flag bit
        at = data.index(sig) + (6 if sig == b"PK\x03\x04" else 8)
        data[at] |= 1
    assert extract(bytes(data), LIMITS).reason is Unreadable.ENCRYPTED


def test_text_is_capped_and_the_cap_is_reported() -> None:
    result = extract(b"word " * 10_000, Limits(max_text_chars=1000))
    assert len(result.text) == 1000 and result.truncated


def test_a_file_over_the_size_limit_is_not_read() -> None:
    result = extract(b"x" * 2048, Limits(max_file_bytes=1024))
    assert result.reason is Unreadable.TOO_LARGE and result.text == ""
