"""Auto-enrolment through the admin API (with its retry policy) and obtaining power."""

from __future__ import annotations

from typing import Any

from mautrix.errors import make_request_error

from bridge.commands import Reply
from bridge.pipeline.enforcement import RoomEnforcer
from bridge.pipeline.enrollment import AutoEnroller, PowerObtainer
from bridge.store import NewAction, Store, StoreUnavailable

BOT = "@policybot:corp.example"


class Admin:
    def __init__(self, rooms: list[str], failures: list[Exception] | None = None) -> None:
        self.rooms = rooms
        self.failures = list(failures or [])
        self.calls = 0

    async def list_rooms(self) -> list[str]:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.rooms


class Recorder:
    def __init__(self) -> None:
        self.actions: list[NewAction] = []
        self.notices: list[str] = []
        self.slept: list[float] = []

    async def submit(self, actions: list[NewAction]) -> None:
        self.actions.extend(actions)

    async def notify(self, reply: Reply) -> None:
        self.notices.append(reply.text)

    async def sleep(self, s: float) -> None:
        self.slept.append(s)


def _enroller(admin: Admin, store: Store, rec: Recorder) -> AutoEnroller:
    return AutoEnroller(
        admin,  # type: ignore[arg-type]
        store,
        rec.submit,
        rec.notify,
        BOT,
        retry=(1, 2),
        sleep=rec.sleep,
    )


async def test_enrols_rooms_not_joined_yet(store: Store) -> None:
    await store.rooms.upsert("!known:x", joined=True)
    rec = Recorder()
    await _enroller(Admin(["!known:x", "!a:x", "!b:x"]), store, rec).run()
    kinds = [(a.kind, a.room_id) for a in rec.actions]
    assert kinds == [
        ("make_room_admin", "!a:x"),
        ("join", "!a:x"),
        ("make_room_admin", "!b:x"),
        ("join", "!b:x"),
    ]
    assert rec.actions[0].payload == {"user_id": BOT}
    assert all(a.not_before == 1.0 for a in rec.actions if a.kind == "join")


async def test_retries_while_the_homeserver_or_database_fails_then_gives_up(
    store: Store,
) -> None:
    rec = Recorder()
    err = make_request_error(http_status=502, text="", errcode="M_UNKNOWN", message="down")
    admin = Admin(["!a:x"], [err, StoreUnavailable("db down")])
    await _enroller(admin, store, rec).run()
    assert rec.slept == [1, 2] and admin.calls == 3 and len(rec.actions) == 2

    rec = Recorder()
    admin = Admin(["!a:x"], [TimeoutError(), TimeoutError(), TimeoutError()])
    await _enroller(admin, store, rec).run()
    assert rec.slept == [1, 2] and admin.calls == 3 and rec.actions == []
    assert rec.notices == []


async def test_a_refused_admin_token_is_reported_and_not_retried(store: Store) -> None:
    rec = Recorder()
    err = make_request_error(http_status=403, text="", errcode="M_FORBIDDEN", message="no")
    admin = Admin(["!a:x"], [err])
    await _enroller(admin, store, rec).run()
    assert admin.calls == 1 and rec.slept == [] and rec.actions == []
    [text] = rec.notices
    assert "admin API refused" in text and "M_FORBIDDEN" in text


async def test_power_is_obtained_once_where_a_reconcile_lacked_it(store: Store) -> None:
    rec = Recorder()

    async def quiet(_r: Any) -> None:
        return None

    allowed = [True]
    power = PowerObtainer(
        RoomEnforcer(store, lambda: 1.0, quiet), rec.submit, BOT, lambda: allowed[0]
    )
    await power.on_result("!r:x", {"lacking": [], "payload": {}})
    assert rec.actions == []
    await power.on_result("!r:x", {"lacking": ["m.room.server_acl"], "payload": {}})
    assert [a.kind for a in rec.actions] == ["make_room_admin", "reconcile"]
    assert rec.actions[1].payload["after_admin"] is True
    rec.actions.clear()
    lacking = {"lacking": ["m.room.server_acl"], "payload": {"after_admin": True}}
    await power.on_result("!r:x", lacking)  # the second try lacks it too: give up
    allowed[0] = False
    await power.on_result("!r:x", {"lacking": ["x"], "payload": {}})
    assert rec.actions == []
