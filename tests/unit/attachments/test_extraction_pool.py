"""The extraction processes: results come back, and a worker that overruns its time or
memory is killed and replaced (the call answers with a limit) while the pool keeps working."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.attachments.kinds import FileType, Unreadable
from bridge.attachments.limits import MIB, Limits
from bridge.attachments.pool import ExtractionPool, FileRef
from tests.kit import documents as d


@pytest.fixture
async def pool() -> AsyncIterator[ExtractionPool]:
    p = ExtractionPool(1, 512 * MIB)
    await p.start()
    yield p
    p.close()


async def test_a_file_is_read_in_the_worker(pool: ExtractionPool) -> None:
    result, _ = await pool.extract(d.docx("hello from a worker"), Limits())
    assert result.file_type is FileType.DOCX and "hello from a worker" in result.text


async def test_an_overrun_worker_is_replaced_and_the_pool_goes_on(pool: ExtractionPool) -> None:
    # A huge text with a timeout far below what charset detection needs on it: the worker is
    # killed at the timeout (whatever the machine's speed, this one cannot finish in 1 ms).
    slow = ("é".encode("latin-1") + b"x" * 99) * 200_000
    result, _ = await pool.extract(slow, Limits(timeout_s=0.001, max_file_bytes=64 * MIB))
    assert result.reason is Unreadable.LIMIT and "longer than" in result.detail
    assert pool.replaced == 1
    again, _ = await pool.extract(b"still working", Limits())
    assert again.text.strip() == "still working"


async def test_a_worker_over_its_memory_limit_answers_with_a_limit_and_goes_on() -> None:
    # 400 MB inflated from one member (ratio and size bounds lifted): more than the worker's
    # 300 MB of address space, so the allocation fails in the worker, not in the bridge.
    pool = ExtractionPool(1, 300 * MIB)
    await pool.start()
    try:
        bomb = d.ratio_bomb(400 * MIB)
        lifted = Limits(
            max_ratio=1e9, max_inflated_bytes=1024 * MIB, max_member_bytes=1024 * MIB, timeout_s=60
        )
        result, _ = await pool.extract(bomb, lifted)
        assert result.reason is Unreadable.LIMIT
        assert "memory" in result.detail
        again, _ = await pool.extract(b"after the bomb", Limits())
        assert again.text.strip() == "after the bomb"
    finally:
        pool.close()


async def test_large_files_go_through_a_memory_file_and_small_ones_inline(
    pool: ExtractionPool,
) -> None:
    from bridge.attachments.pool import MEMFD_MIN_BYTES

    big = b"".join(b"line of text %d\n" % i for i in range(MEMFD_MIN_BYTES // 8))
    assert len(big) > MEMFD_MIN_BYTES
    for data in (big, b"small and inline", big[: MEMFD_MIN_BYTES - 1]):
        result, _ = await pool.extract(data, Limits())
        assert result.text.rstrip("\n") == data.decode().rstrip("\n")
    assert pool.replaced == 0


async def test_start_waits_for_each_worker_and_replaces_one_that_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bridge.attachments import pool as pool_module

    real = pool_module._Worker.call
    answers: list[object] = []

    def first_call_unanswered(
        self: pool_module._Worker, data: bytes, job: pool_module.Job
    ) -> object:
        result = real(self, data, job)
        answers.append(result)
        return None if len(answers) == 1 else result

    monkeypatch.setattr(pool_module._Worker, "call", first_call_unanswered)
    p = ExtractionPool(1, 512 * MIB)
    await p.start()
    try:
        assert answers[0] is not None  # the worker did answer the warm-up file ...
        assert p.replaced == 1  # ... but an unanswered warm-up means a fresh worker
        monkeypatch.setattr(pool_module._Worker, "call", real)
        result, _ = await p.extract(b"after the warm-up", Limits())
        assert result.text.strip() == "after the warm-up"
    finally:
        p.close()


async def test_an_open_file_is_read_by_its_descriptor_whole_or_in_parts(tmp_path: Path) -> None:
    """A file of the shared media store goes to the workers by descriptor (FileRef): the
    same extraction as from its bytes, also when a long PDF is split between two workers;
    the descriptor's own offset does not matter (the workers read from offset 0)."""
    pages = [f"page {i}: " + "minutes of the meeting " * 40 for i in range(300)]
    long_pdf = d.pdf(*pages, "pay with 4111 1111 1111 1111")
    pool = ExtractionPool(2, 512 * MIB, max_parts=2)
    await pool.start()
    try:
        for data in (d.docx("by descriptor " * 2000), long_pdf):
            path = tmp_path / "stored"
            path.write_bytes(data)
            with path.open("rb") as f:
                f.seek(123)
                ref = FileRef(f.fileno(), len(data), data[:1024])
                by_fd, _ = await pool.extract(ref, Limits())
            by_bytes, _ = await pool.extract(data, Limits())
            assert by_fd == by_bytes and by_fd.text
        assert pool.split == 2  # the long PDF, both times
        assert "4111 1111 1111 1111" in by_fd.text
    finally:
        pool.close()
