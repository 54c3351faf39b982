"""The console's tables: per-day counters kept on append, and the schema 3 → 4 upgrade."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import inspect

from bridge.audit.keyring import Keyring
from bridge.audit.kinds import AuditKind
from bridge.store import AuditEntry, Store, StoreSettings
from bridge.store.console import DAY_MS
from bridge.store.schema import SCHEMA_VERSION


def gate_deny(rule: str) -> AuditEntry:
    return AuditEntry(
        AuditKind.GATE,
        {"callback": "user_may_invite", "decision": "deny", "findings": [{"rule": rule}]},
    )


async def test_appends_count_per_day_kind_rule_and_refusal(store: Store) -> None:
    event = {
        "event_id": "$1",
        "room_id": "!r:x",
        "sender": "@a:x",
        "type": "m.room.message",
        "origin_server_ts": 1,
        "content": {"body": "hi"},
    }
    await store.queue.ingest("t1", [event, {**event, "event_id": "$2"}])
    await store.records.append([gate_deny("keyword:a"), gate_deny("keyword:a")])
    await store.records.append(
        [
            AuditEntry(AuditKind.DECISION, {"findings": [{"rule": "detector:card"}]}),
            AuditEntry(AuditKind.COMMAND, {"outcome": "ok"}, type="report"),
            AuditEntry(AuditKind.COMMAND, {"outcome": "error"}, type="report"),
        ]
    )
    rows = {(m, lab): n for _d, m, lab, n in await store.console.daily(0, 10**6, [
        "event", "gate", "decision", "finding", "refusal", "report"])}  # fmt: skip
    assert rows == {
        ("event", ""): 2,
        ("gate", ""): 2,
        ("decision", ""): 1,
        ("finding", "keyword:a"): 2,
        ("finding", "detector:card"): 1,
        ("refusal", "user_may_invite"): 2,
        ("report", ""): 1,
    }


def media(path: str, outcome: str, rule: str | None) -> AuditEntry:
    findings = [{"rule": rule, "actions": ["block"], "excerpt": "x"}] if rule else []
    return AuditEntry(
        AuditKind.MEDIA, {"path": path, "outcome": outcome, "rule": rule, "findings": findings}
    )


async def test_attachment_findings_and_upload_refusals_are_counted(store: Store) -> None:
    await store.records.append(
        [
            media("gate", "blocked", "detector:card"),  # an upload refused
            media("gate", "unreadable_refused", None),  # a password-protected upload refused
            media("gate", "unreadable_allowed", None),  # recorded, let through
            media("room", "blocked", "detector:card"),  # a file redacted in its room
        ]
    )
    rows = {(m, lab): n for _d, m, lab, n in await store.console.daily(0, 10**6, [
        "finding", "refusal"])}  # fmt: skip
    assert rows == {
        ("finding", "detector:card"): 2,
        ("refusal", "check_media_file_for_spam"): 2,
    }


async def test_a_failed_commit_counts_nothing(store: Store) -> None:
    async def fails(conn: object) -> None:
        await store.records.append_audit(conn, [gate_deny("keyword:a")])  # type: ignore[arg-type]
        raise RuntimeError("rolled back")

    try:
        await store.records.write(fails)  # type: ignore[arg-type]
    except RuntimeError:
        pass
    assert await store.console.daily(0, 10**6, ["gate", "finding"]) == []


async def test_schema_3_is_upgraded_with_counters_and_indexes(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'up.db'}"
    keyring = Keyring.generate()
    store = await Store.open(url, StoreSettings(keyring=keyring))
    await store.records.append([AuditEntry(AuditKind.COMMAND, {"n": i}) for i in range(3)])
    day = (await store.console.daily(0, 10**6, ["command"]))[0][0]
    # back to schema 3: no counters, the old indexes
    async with store.db.transaction() as conn:
        for sql in (
            "DELETE FROM console_daily",
            "DROP INDEX ix_records_sender_seq",
            "DROP INDEX ix_records_type_seq",
            "DROP INDEX ix_records_room_seq",
            "DROP INDEX ix_records_kind_seq",
            "DROP INDEX ix_records_kind_room_seq",
            "CREATE INDEX ix_records_kind_ts ON records (kind, ts)",
            "CREATE INDEX ix_records_sender ON records (sender_idx)",
            "CREATE INDEX ix_records_type ON records (type_idx)",
            "UPDATE bridge_state SET value = '3' WHERE key = 'schema_version'",
        ):
            await conn.exec_driver_sql(sql)
    await store.close()
    store = await Store.open(url, StoreSettings(keyring=keyring))
    try:
        assert await store.state.get("schema_version") == str(SCHEMA_VERSION)
        rows = await store.console.daily(0, 10**6, ["command"])
        assert rows == [(day, "command", "", 3)] and day == rows[0][0]
        assert day * DAY_MS <= (await store.reader.one(1) or {})["ts"] < (day + 1) * DAY_MS

        def names(sync_conn: object) -> set[str]:
            return {i["name"] for i in inspect(sync_conn).get_indexes("records")}

        async with store.db.connect() as conn:
            indexes = await conn.run_sync(names)
        assert {"ix_records_room_seq", "ix_records_sender_seq", "ix_records_type_seq"} <= indexes
        assert "ix_records_kind_room_seq" in indexes and "ix_records_kind_ts" not in indexes
        assert "ix_records_sender" not in indexes and "ix_records_type" not in indexes
    finally:
        await store.close()


async def test_newest_pages_of_several_kinds_merge_in_seq_order(store: Store) -> None:
    kinds = [AuditKind.COMMAND, AuditKind.CONFIG, AuditKind.HOLD]
    await store.records.append(
        [AuditEntry(kinds[i % 3] if i % 5 else AuditKind.ACTION, {"i": i}) for i in range(400)]
    )
    want = [r["seq"] async for r in store.reader.iter() if r["kind"] in kinds[:2]][::-1]
    got: list[int] = []
    before = None
    while True:
        page, before = await store.reader.newest_page(kinds=kinds[:2], before=before, limit=50)
        got.extend(r["seq"] for r in page)
        if before is None:
            break
    assert got == want and len(got) > 200
