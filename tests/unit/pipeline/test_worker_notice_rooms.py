"""Commands in a policy-notice room through the worker: only its recipient is answered."""

from __future__ import annotations

from bridge.pipeline.worker import Worker
from bridge.store.notice_rooms import remember_notice_room
from tests.unit.pipeline.test_worker import feed, msg, notices, worker

__all__ = ["worker"]  # the fixture, used by name

ALICE = "@alice:corp.example"
DM = "!notices:corp.example"


async def test_only_the_recipient_is_answered_in_a_notice_room(worker: Worker) -> None:
    await remember_notice_room(worker.store, ALICE, DM)  # not in the tracker's joined rooms
    assert await feed(worker, msg("!policy report ABCD-EFGH x", sender="@mallory:corp.example",
                                  room=DM)) == []  # fmt: skip
    assert await feed(worker, msg("!policy status", sender="@boss:corp.example", room=DM)) == []
    [reply] = notices(await feed(worker, msg("!policy report ABCD-EFGH oops", ALICE, DM)))
    assert "none of your recent refusals has the reference ABCD-EFGH" in reply
    records = [r async for r in worker.store.reader.iter(kind="command")]
    assert [r["data"]["outcome"] for r in records] == ["ignored", "ignored", "error"]
