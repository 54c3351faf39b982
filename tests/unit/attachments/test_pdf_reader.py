"""The PDF reader (PDFium) on hostile and damaged files, alone and in the pool: a stream that
inflates past the memory bound kills only its worker (reported as the memory limit), nesting
too deep for a parser is stopped without touching the stack, a page hidden behind a large
stream is still read, and pages that fail do not hide the others."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bridge.attachments.extract import extract
from bridge.attachments.kinds import FileType, Unreadable
from bridge.attachments.limits import MIB, Limits
from bridge.attachments.pool import ExtractionPool
from tests.kit import documents as d

CARD = "4111 1111 1111 1111"
LIMITS = Limits(timeout_s=60)


@pytest.fixture
async def small_pool() -> AsyncIterator[ExtractionPool]:
    pool = ExtractionPool(1, 320 * MIB)
    await pool.start()
    yield pool
    pool.close()


async def test_a_stream_inflating_past_the_memory_bound_is_a_limit(
    small_pool: ExtractionPool,
) -> None:
    # 1 GiB of page content from a ~1 MB file, in a worker with 320 MiB of address space.
    bomb = d.pdf_stream_bomb(1024 * MIB, text=f"card {CARD}")
    assert len(bomb) < 2 * MIB
    result, _ = await small_pool.extract(bomb, LIMITS)
    # Stopped by the memory bound; on a machine so loaded that inflating is slower than the
    # wall-clock bound, by that one: a limit either way, never read, the worker replaced.
    assert result.reason is Unreadable.LIMIT and not result.text
    assert "memory" in result.detail or "longer than" in result.detail
    assert small_pool.replaced == 1
    again, _ = await small_pool.extract(d.pdf("after the bomb"), LIMITS)
    assert again.text.strip() == "after the bomb"


async def test_nesting_too_deep_is_stopped_and_the_worker_goes_on(
    small_pool: ExtractionPool,
) -> None:
    # An array nested 100,000 deep and a page tree 5,000 deep: a recursive parser would
    # overflow its stack; PDFium stops at its depth limits and the page counts as damaged.
    result, _ = await small_pool.extract(d.pdf_deep(100_000, text=f"card {CARD}"), LIMITS)
    assert (result.file_type, result.reason) == (FileType.PDF, Unreadable.MALFORMED)
    assert "page" in result.detail
    assert small_pool.replaced == 0
    shallow, _ = await small_pool.extract(d.pdf_deep(20, text="shallow enough"), LIMITS)
    assert shallow.read and "shallow enough" in shallow.text


def test_text_behind_a_large_stream_is_read() -> None:
    # 80 MiB of content, well within the worker's memory: pypdf (the reader before PDFium)
    # stops inflating a stream past 75 MB and raises, so this file counted as damaged and by
    # default was let through with the card unread.
    result = extract(d.pdf_stream_bomb(80 * MIB, text=f"card {CARD}"), LIMITS)
    assert result.read and CARD in result.text


def test_a_truncated_pdf_is_malformed_not_an_error() -> None:
    whole = d.pdf(*[f"page {i}" for i in range(40)])
    result = extract(whole[: len(whole) // 2], LIMITS)
    assert (result.file_type, result.reason) == (FileType.PDF, Unreadable.MALFORMED)


def test_document_information_and_every_page_are_read() -> None:
    result = extract(d.pdf("first page", f"second {CARD}", info_title="Codename Osprey"), LIMITS)
    assert result.read
    assert "Codename Osprey" in result.text and "first page" in result.text
    assert CARD in result.text


def test_pages_left_unread_count_as_truncated_when_the_budget_is_spent_exactly() -> None:
    # "one\n" + "two\n" fills 8 characters exactly; "three" was never read.
    result = extract(d.pdf("one", "two", "three"), Limits(max_text_chars=8))
    assert result.text == "one\ntwo\n" and result.truncated
