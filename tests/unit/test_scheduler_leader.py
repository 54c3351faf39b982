"""The leader's tasks: started in a leader context, cancelled (with what they spawned)
when the term ends, while the other tasks run on."""

from __future__ import annotations

import asyncio

from bridge.scheduler import Scheduler, TaskKind, in_leader_task


async def test_stop_leader_cancels_leader_work_and_what_it_spawned_only() -> None:
    scheduler = Scheduler()
    seen: dict[str, bool] = {}
    forever = asyncio.Event()

    async def job(name: str) -> None:
        seen[name] = in_leader_task()
        await forever.wait()

    async def leader_job() -> None:
        seen["worker"] = in_leader_task()
        scheduler.spawn(job("child"), "child", TaskKind.ONE_OFF)
        await forever.wait()

    scheduler.spawn(job("gate-side"), "gate-side")
    scheduler.spawn_leader(leader_job(), "worker")
    await asyncio.sleep(0.05)
    assert seen == {"gate-side": False, "worker": True, "child": True}
    assert sorted(t.get_name() for t in scheduler.leader_tasks) == ["child", "worker"]
    await scheduler.stop_leader(1.0)
    assert scheduler.leader_tasks == []
    assert [t.get_name() for t in scheduler.running] == ["gate-side"]
    assert not in_leader_task()
    await scheduler.stop(1.0)


async def test_a_cancelled_leader_task_is_not_a_death() -> None:
    deaths: list[str] = []
    scheduler = Scheduler(on_critical_death=lambda name, _exc: deaths.append(name))
    scheduler.spawn_leader(asyncio.sleep(3600), "executor")
    await asyncio.sleep(0)
    await scheduler.stop_leader(1.0)
    assert deaths == []
