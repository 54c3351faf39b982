"""The to-device part that arrives before the bot's E2EE device is open is kept durably and
handed over in order: Synapse does not resend it after a refused transaction."""

from __future__ import annotations

from bridge.pipeline.to_device import BACKLOG_KEY, ToDeviceBacklog, to_device_part
from bridge.store import Store

KEY = {"type": "m.room.encrypted", "to_user_id": "@bot:x", "to_device_id": "D", "content": {}}


def test_only_the_devices_keys_are_taken() -> None:
    body = {
        "txn_id": "1",
        "events": [{"type": "m.room.message"}],
        "de.sorunome.msc2409.to_device": [KEY],
        "org.matrix.msc3202.device_lists": {"changed": ["@a:x"]},
    }
    assert to_device_part(body) == {
        "de.sorunome.msc2409.to_device": [KEY],
        "org.matrix.msc3202.device_lists": {"changed": ["@a:x"]},
    }
    assert to_device_part({"events": []}) == {}


async def test_parts_are_kept_in_order_until_handed_over(store: Store) -> None:
    backlog = ToDeviceBacklog(store)
    assert await backlog.parts() == []
    for i in range(3):
        await backlog.keep({"de.sorunome.msc2409.to_device": [{**KEY, "n": i}]})
    # Durable: a new backlog on the same store (a restarted bridge) sees the same parts.
    again = ToDeviceBacklog(store)
    parts = await again.parts()
    assert [p["de.sorunome.msc2409.to_device"][0]["n"] for p in parts] == [0, 1, 2]
    await backlog.keep({"de.sorunome.msc2409.to_device": [{**KEY, "n": 3}]})  # meanwhile
    await again.forget(len(parts))
    assert [p["de.sorunome.msc2409.to_device"][0]["n"] for p in await again.parts()] == [3]
    await again.forget(1)
    assert await again.parts() == [] and not await store.state.get(BACKLOG_KEY)
