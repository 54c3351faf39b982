"""Two replicas refusing the same sender at the same moment: one notice, the other grouped
under it, and both refusals in the sender's ledger (the ledger row is locked, not raced)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bridge.policy.model import Verdict
from bridge.policy.notices import Ledger
from bridge.store import Store, StoreSettings
from bridge.store.notice_rooms import load_ledger
from tests.conftest import fresh_store_url
from tests.unit.pipeline.test_notice_pipeline import ALICE, CARD, Harness, subject


async def test_concurrent_refusals_on_two_replicas_share_one_ledger(tmp_path: Path) -> None:
    url = await fresh_store_url("postgresql", tmp_path)
    first = await Store.open(url)
    second = await Store.open(url, StoreSettings(keyring=first.keyring))
    try:
        for round_ in range(5):
            a, b = Harness(first), Harness(second)
            refs = [f"A{round_}-XXXX", f"B{round_}-XXXX"]
            a.notices.blocked(subject(refs[0]), Verdict((CARD,)))
            b.notices.blocked(subject(refs[1]), Verdict((CARD,)))
            await asyncio.gather(a.settle(), b.settle())
            outcomes = sorted(e.data["outcome"] for e in [*a.audit, *b.audit])
            assert outcomes == (["grouped", "sent"] if round_ == 0 else ["grouped", "grouped"])
            assert len(a.queued) + len(b.queued) == (1 if round_ == 0 else 0)
            ledger = Ledger.loads(await load_ledger(first, ALICE))
            assert {r.ref for r in ledger.recent} >= set(refs)
    finally:
        await second.close()
        await first.close()
