"""A long PDF read by several extraction processes at once, each its share of the pages:
the same text, reason and verdict as one process reading the whole file; only idle workers
taken; a part over its bounds makes the file a limit; a cancelled split leaves no worker
busy or missing."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import AsyncIterator

import pytest

from bridge.attachments.decide import decide
from bridge.attachments.extract import Extraction, extract, extract_part, merge_parts
from bridge.attachments.kinds import FileType, Outcome, Unreadable
from bridge.attachments.limits import MIB, Limits
from bridge.attachments.pdf import Part
from bridge.attachments.pool import SPLIT_MIN_BYTES, ExtractionPool
from bridge.policy.dlp import DlpEngine
from bridge.policy.dlp.rules import DetectorRule, DlpPolicy
from tests.kit import documents as d

CARD = "4111 1111 1111 1111"
LIMITS = Limits(timeout_s=60)
PAGES = [f"page {i} of the minutes" for i in range(30)]


def split_in_process(data: bytes, limits: Limits, count: int) -> Extraction:
    return merge_parts([extract_part(data, limits, Part(i, count)) for i in range(count)], limits)


@pytest.fixture
async def pool() -> AsyncIterator[ExtractionPool]:
    # Every PDF split (threshold lowered), in two parts even on a one-CPU machine.
    p = ExtractionPool(2, 512 * MIB, split_min_bytes=1, max_parts=2)
    await p.start()
    yield p
    p.close()


async def wait_idle(pool: ExtractionPool) -> None:
    async with asyncio.timeout(60):
        while pool.idle < pool.size:
            await asyncio.sleep(0.01)


# -- the parts and their merge, in this process -------------------------------------------


@pytest.mark.parametrize("count", [2, 3, 7])
@pytest.mark.parametrize("max_chars", [2_000_000, 1000, 60, 7])
def test_parts_merged_are_the_whole_file(count: int, max_chars: int) -> None:
    limits = Limits(max_text_chars=max_chars)
    for data in (
        d.pdf(*PAGES, info_title="Codename Osprey"),
        d.pdf("the only page", info_title="a title"),  # fewer pages than parts
        d.pdf(info_title="no pages at all"),
    ):
        assert split_in_process(data, limits, count) == extract(data, limits)


def test_text_heavy_pdf_in_parts_is_the_whole_file() -> None:
    data = d.text_heavy_pdf()
    whole = extract(data, LIMITS)
    assert whole.read and len(whole.text) > 1_000_000
    assert split_in_process(data, LIMITS, 2) == whole


def test_only_the_first_part_reads_the_document_information() -> None:
    data = d.pdf("first", "second", info_title="Codename Osprey")
    first, second = (extract_part(data, LIMITS, Part(i, 2)) for i in range(2))
    assert "Codename Osprey" in first.text and "first" in first.text
    assert "Codename Osprey" not in second.text and second.text == "second\n"


def test_each_part_and_the_merge_are_bounded_by_the_text_budget() -> None:
    limits = Limits(max_text_chars=50)
    data = d.pdf(*PAGES)
    parts = [extract_part(data, limits, Part(i, 2)) for i in range(2)]
    assert all(len(p.text) <= 50 and p.truncated for p in parts)
    merged = merge_parts(parts, limits)
    assert len(merged.text) == 50 and merged.truncated


def test_the_most_severe_reason_of_the_parts_is_the_files() -> None:
    read = Extraction(FileType.PDF, "text\n", types=(FileType.PDF,))
    damaged = Extraction(FileType.PDF, "more\n", Unreadable.MALFORMED, "PDF: 1 page(s) ...")
    locked = Extraction(FileType.PDF, "", Unreadable.ENCRYPTED, "PDF needs a password")
    killed = Extraction(FileType.UNKNOWN, reason=Unreadable.LIMIT, detail="memory")
    merged = merge_parts([read, damaged], LIMITS)
    assert (merged.reason, merged.detail, merged.text) == (
        Unreadable.MALFORMED,
        "PDF: 1 page(s) ...",
        "text\nmore\n\n",
    )
    assert merge_parts([damaged, locked], LIMITS).reason is Unreadable.ENCRYPTED
    # A part over its bounds: the file is that limit, nothing read, as for one process.
    assert merge_parts([read, killed, damaged], LIMITS) == killed


# -- through the pool ---------------------------------------------------------------------


async def test_split_and_unsplit_give_the_same_extraction(pool: ExtractionPool) -> None:
    unsplit = ExtractionPool(1, 512 * MIB)
    await unsplit.start()
    try:
        for data in (
            d.pdf(*PAGES, info_title="Codename Osprey"),
            d.text_heavy_pdf(),
            d.encrypted_pdf(f"card {CARD}"),
            d.pdf(*PAGES)[:700],  # truncated: malformed
            d.pdf_deep(100_000, text=f"card {CARD}"),  # its one page damaged
        ):
            before = pool.split
            got, _ = await pool.extract(data, LIMITS)
            assert pool.split == before + 1
            want, _ = await unsplit.extract(data, LIMITS)
            assert unsplit.split == 0
            assert got == want
        assert pool.replaced == 0
    finally:
        unsplit.close()


async def test_the_default_threshold_splits_the_text_heavy_pdf_only() -> None:
    p = ExtractionPool(2, 512 * MIB, max_parts=2)
    await p.start()
    try:
        heavy = d.text_heavy_pdf()
        assert len(heavy) >= SPLIT_MIN_BYTES
        result, _ = await p.extract(heavy, LIMITS)
        assert p.split == 1 and result == extract(heavy, LIMITS)
        await p.extract(d.pdf(*PAGES), LIMITS)  # small: one worker
        assert p.split == 1
    finally:
        p.close()


@pytest.mark.parametrize(
    "data",
    [
        d.pdf(f"card {CARD}", *PAGES),
        d.pdf(*PAGES, f"card {CARD}"),
        d.pdf(*PAGES, info_title=f"card {CARD}"),
    ],
    ids=["first page", "last page", "title"],
)
async def test_a_card_anywhere_is_blocked_split_as_unsplit(
    pool: ExtractionPool, data: bytes
) -> None:
    dlp = DlpEngine.compile(DlpPolicy(detectors=(DetectorRule("card"),)))
    split, _ = await pool.extract(data, LIMITS)
    assert pool.split == 1
    verdict = decide(split, dlp)
    assert verdict.outcome is Outcome.BLOCKED
    assert verdict == decide(extract(data, LIMITS), dlp)


async def test_a_stream_bomb_in_one_part_is_a_limit_and_its_worker_replaced() -> None:
    p = ExtractionPool(2, 320 * MIB, split_min_bytes=1, max_parts=2)
    await p.start()
    try:
        # One page (in the second part; the first reads none) inflating to 1 GiB.
        result, _ = await p.extract(d.pdf_stream_bomb(1024 * MIB, text=f"card {CARD}"), LIMITS)
        assert p.split == 1
        assert result.reason is Unreadable.LIMIT and not result.text
        assert "memory" in result.detail or "longer than" in result.detail
        assert p.replaced == 1
        assert p.idle == 2
        again, _ = await p.extract(d.pdf("after", "the bomb"), LIMITS)
        assert p.split == 2 and again.text.split() == ["after", "the", "bomb"]
    finally:
        p.close()


async def test_only_idle_workers_are_taken(pool: ExtractionPool) -> None:
    busy = asyncio.create_task(pool.extract(d.docx("holding one worker"), LIMITS))
    await asyncio.sleep(0)  # it has taken its worker
    assert pool.idle == 1
    data = d.pdf(*PAGES)
    result, _ = await pool.extract(data, LIMITS)
    assert pool.split == 0 and result == extract(data, LIMITS)
    held, _ = await busy
    assert "holding one worker" in held.text


async def test_files_other_than_pdf_are_not_split(pool: ExtractionPool) -> None:
    for data in (d.docx(*PAGES), "\n".join(PAGES).encode(), d.zip_of({"a.pdf": d.pdf(*PAGES)})):
        result, _ = await pool.extract(data, LIMITS)
        assert result == extract(data, LIMITS)
    assert pool.split == 0


async def test_a_cancelled_split_leaves_no_worker_busy_or_missing(pool: ExtractionPool) -> None:
    heavy = d.text_heavy_pdf()
    task = asyncio.create_task(pool.extract(heavy, LIMITS))
    await asyncio.sleep(0)
    assert pool.idle == 0 and pool.split == 1  # both parts running
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()  # again, while the workers are being replaced
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(pool)
    assert pool.replaced == 2  # each may still have been reading its part: replaced
    result, _ = await pool.extract(heavy, LIMITS)
    assert pool.split == 2 and result == extract(heavy, LIMITS)


async def test_closing_the_pool_while_a_cancelled_split_is_replaced_leaves_no_worker() -> None:
    p = ExtractionPool(2, 512 * MIB, split_min_bytes=1, max_parts=2)
    await p.start()
    workers = list(p._all)
    task = asyncio.create_task(p.extract(d.text_heavy_pdf(), LIMITS))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()
    p.close()  # as the bridge stops: its tasks cancelled, then the pool closed
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(60):
        while p._replacing:
            await asyncio.sleep(0.01)
    assert not any(w.process.is_alive() for w in workers)
    assert p.replaced == 0  # nothing started after close()
    assert not [c for c in multiprocessing.active_children() if c.name == "attachment-extract"]
