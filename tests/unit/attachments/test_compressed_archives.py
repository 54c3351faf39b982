"""Tar archives and gzip, bzip2 and xz streams: what they hold is read by its type, bombs
stop on their bounds, damage is malformed, links are never followed, 7z and RAR are named
as not read (timings belong to bench/attachments.py)."""

from __future__ import annotations

import tarfile
from collections.abc import Callable

import pytest

from bridge.attachments.decide import decide
from bridge.attachments.extract import extract
from bridge.attachments.kinds import FileType, Unreadable
from bridge.attachments.limits import MIB, Limits
from bridge.attachments.pool import ExtractionPool
from bridge.attachments.sniff import is_pdf, sniff
from bridge.policy.dlp import DlpEngine, DlpPolicy
from tests.kit import documents as d

CARD = "4111 1111 1111 1111"
TEXT = f"card {CARD}".encode()
LIMITS = Limits()


@pytest.mark.parametrize(
    ("data", "types"),
    [
        (d.gz(d.tar_of({"a.txt": TEXT})), (FileType.GZIP, FileType.TAR, FileType.TEXT)),
        (d.bz(d.tar_of({"a.txt": TEXT})), (FileType.BZIP2, FileType.TAR, FileType.TEXT)),
        (d.xz(d.tar_of({"a.txt": TEXT})), (FileType.XZ, FileType.TAR, FileType.TEXT)),
        (d.tar_of({"a.txt": TEXT}), (FileType.TAR, FileType.TEXT)),
        (d.gz(TEXT), (FileType.GZIP, FileType.TEXT)),
        (d.xz(d.pdf(f"card {CARD}")), (FileType.XZ, FileType.PDF)),
        (
            d.gz(d.tar_of({"x.txt": b"x", "in.zip": d.zip_of({"a.txt": TEXT})})),
            (FileType.GZIP, FileType.TAR, FileType.TEXT, FileType.ZIP, FileType.TEXT),
        ),
        (d.gz(d.zip_of({"a.txt": TEXT})), (FileType.GZIP, FileType.ZIP, FileType.TEXT)),
    ],
)
def test_what_a_stream_or_tar_holds_is_read_by_its_type(
    data: bytes, types: tuple[FileType, ...]
) -> None:
    result = extract(data, LIMITS)
    assert result.reason is None, result.detail
    assert result.types == types
    assert CARD in result.text


@pytest.mark.parametrize("pack", [d.gz, d.bz, d.xz])
def test_concatenated_streams_are_all_read(pack: Callable[[bytes], bytes]) -> None:
    result = extract(pack(b"first part\n") + pack(TEXT), LIMITS)
    assert result.reason is None and "first part" in result.text and CARD in result.text
    padded = extract(pack(TEXT) + b"\0" * 512, LIMITS)  # tape blocking: zeros after the end
    assert padded.reason is None and CARD in padded.text
    garbage = extract(pack(TEXT) + b"garbage", LIMITS)
    assert garbage.reason is Unreadable.MALFORMED and CARD in garbage.text


def test_a_truncated_stream_is_malformed_and_what_came_before_is_still_read() -> None:
    packed = d.gz(TEXT + b"\n" + b"more text " * 5000)
    result = extract(packed[: len(packed) // 2], LIMITS)
    assert result.reason is Unreadable.MALFORMED and "truncated" in result.detail
    assert CARD in result.text
    assert extract(d.xz(TEXT)[:-8], LIMITS).reason is Unreadable.MALFORMED
    assert extract(b"\x1f\x8b" + b"\xff" * 100, LIMITS).reason is Unreadable.MALFORMED


def test_a_gzip_bomb_stops_on_its_bounds_having_inflated_little() -> None:
    bomb = d.gzip_bomb(1024 * MIB)  # 1 GiB of zeros in about 1 MB
    result = extract(bomb, LIMITS)
    assert result.reason is Unreadable.LIMIT and "inflates past" in result.detail
    lifted = extract(bomb, Limits(max_member_bytes=2048 * MIB))
    assert lifted.reason is Unreadable.LIMIT and "expands more than 100 times" in lifted.detail
    total = extract(bomb, Limits(max_member_bytes=2048 * MIB, max_ratio=1e9))
    assert total.reason is Unreadable.LIMIT and "in total" in total.detail


def test_a_tar_gz_bomb_stops_before_its_member_is_copied() -> None:
    result = extract(d.tar_gz_bomb(1024 * MIB), LIMITS)
    assert result.reason is Unreadable.LIMIT and result.types == (FileType.GZIP,)


def test_streams_nest_no_deeper_than_the_depth_limit() -> None:
    data = TEXT
    for _ in range(5):
        data = d.gz(data)
    result = extract(data, LIMITS)
    assert result.reason is Unreadable.LIMIT and "nested deeper than 3" in result.detail
    assert CARD not in result.text


def test_a_symlink_in_a_tar_is_never_followed() -> None:
    data = d.tar_of({"a.txt": b"harmless"}, symlinks={"passwd": "/etc/passwd"})
    result = extract(data, LIMITS)
    assert result.reason is None and result.text.strip() == "harmless"
    assert "root:" not in result.text


def test_a_tar_with_more_members_than_the_cap_is_a_limit() -> None:
    data = d.tar_of({f"{i}.txt": b"x" for i in range(30)})
    result = extract(data, Limits(max_members=20))
    assert result.reason is Unreadable.LIMIT and "more than 20 members" in result.detail


def test_a_sparse_tar_member_s_holes_count_against_the_bounds() -> None:
    bomb = d.sparse_tar(TEXT, realsize=1024 * MIB)  # 1 GiB of holes in 2 KiB
    result = extract(bomb, LIMITS)
    assert result.reason is Unreadable.LIMIT and "tar member inflates past" in result.detail
    small = extract(d.sparse_tar(TEXT, realsize=len(TEXT)), LIMITS)
    assert small.reason is None and CARD in small.text


def test_a_tar_header_that_claims_more_than_the_data_holds_is_malformed() -> None:
    info = tarfile.TarInfo("big.txt")
    info.size = 10 * MIB
    data = info.tobuf(format=tarfile.USTAR_FORMAT) + TEXT * 100
    result = extract(data, LIMITS)
    assert result.reason is Unreadable.MALFORMED and "past the end" in result.detail
    assert CARD in result.text  # what is there is read


def test_a_zip_appended_to_a_tar_is_read_and_one_inside_it_once() -> None:
    appended = d.tar_of({"a.txt": b"hi"}) + d.zip_of({"c.txt": TEXT})
    result = extract(appended, LIMITS)
    assert result.reason is None and CARD in result.text
    assert result.types == (FileType.TAR, FileType.TEXT, FileType.ZIP, FileType.TEXT)
    inside = extract(d.tar_of({"c.zip": d.zip_of({"c.txt": TEXT})}), LIMITS)
    assert inside.types == (FileType.TAR, FileType.ZIP, FileType.TEXT)


@pytest.mark.parametrize(
    ("magic", "kind", "detail"),
    [
        (b"7z\xbc\xaf\x27\x1c", FileType.SEVEN_ZIP, "7z archive: not read"),
        (b"Rar!\x1a\x07\x00", FileType.RAR, "RAR archive: not read"),
        (b"Rar!\x1a\x07\x01\x00", FileType.RAR, "RAR archive: not read"),
    ],
)
def test_7z_and_rar_are_named_and_reported_as_not_read(
    magic: bytes, kind: FileType, detail: str
) -> None:
    result = extract(magic + bytes(range(256)), LIMITS)
    assert (result.file_type, result.reason, result.detail) == (
        kind,
        Unreadable.UNREAD_ARCHIVE,
        detail,
    )
    # Refused by default, as an encrypted file is: it hides what is in it.
    verdict = decide(result, DlpEngine.compile(DlpPolicy()))
    assert verdict.refused and verdict.refusal is not None
    assert verdict.refusal.rule == "attachment:unreadable:unread_archive"
    assert "archive format that cannot be inspected" in verdict.refusal.message


def test_archive_magic_is_sniffed_before_what_the_archive_holds() -> None:
    tar_with_pdf = d.tar_of({"a.pdf": d.pdf("first"), "b.txt": TEXT})
    assert sniff(tar_with_pdf) is FileType.TAR and not is_pdf(tar_with_pdf)
    assert CARD in extract(tar_with_pdf, LIMITS).text
    assert sniff(b"BZh9" + b"\0" * 10) is FileType.BZIP2
    assert sniff(b"\xfd7zXZ\x00" + b"\0" * 10) is FileType.XZ


def test_a_file_that_only_claims_an_archive_is_read_as_what_it_is() -> None:
    # "ustar" at 257 without a valid tar header is text; gzip magic before a PDF: the PDF
    # reader finds it anyway, so the bridge reads it too.
    text = b"x" * 257 + b"ustar " + TEXT
    assert sniff(text) is FileType.TEXT and CARD in extract(text, LIMITS).text
    fake = extract(b"\x1f\x8b" + d.pdf(f"card {CARD}"), LIMITS)
    assert fake.reason is Unreadable.MALFORMED and CARD in fake.text


async def test_a_tar_gz_bomb_in_the_pool_is_a_limit_within_the_workers_memory() -> None:
    pool = ExtractionPool(1, 300 * MIB)
    await pool.start()
    try:
        bomb = d.tar_gz_bomb(1024 * MIB)
        result, _ = await pool.extract(bomb, LIMITS)
        assert result.reason is Unreadable.LIMIT and "inflates past" in result.detail
        # Bounds lifted: the worker's address space (RLIMIT_AS, 300 MB) stops it instead.
        lifted = Limits(
            max_ratio=1e9, max_inflated_bytes=4096 * MIB, max_member_bytes=4096 * MIB, timeout_s=60
        )
        over, _ = await pool.extract(bomb, lifted)
        assert over.reason is Unreadable.LIMIT and "memory" in over.detail
        again, _ = await pool.extract(d.gz(b"after the bomb"), LIMITS)
        assert again.text.strip() == "after the bomb"
    finally:
        pool.close()
