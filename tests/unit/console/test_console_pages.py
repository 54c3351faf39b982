"""Console pages: CSRF, roles on holds, escaping, headers, search, export, incidents."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from bridge.audit.kinds import AuditKind
from bridge.console.exporting import csv_rows
from bridge.console.readmodel import SearchFilters
from bridge.console.security import CSP, csrf_token
from bridge.store import AuditEntry, Store, StoreUnavailable
from tests.kit.config import DOMAIN
from tests.kit.console import ConsoleRig

ROOM = f"!room:{DOMAIN}"
XSS = '<script>alert(1)</script><img src=x onerror="alert(2)">'


def event(
    n: int, body: str, *, sender: str = f"@alice:{DOMAIN}", room: str = ROOM
) -> dict[str, Any]:
    return {
        "event_id": f"$e{n}",
        "room_id": room,
        "sender": sender,
        "type": "m.room.message",
        "origin_server_ts": 1_750_000_000_000 + n,
        "content": {"msgtype": "m.text", "body": body},
    }


async def kinds(store: Store, kind: str) -> list[dict[str, Any]]:
    return [r async for r in store.reader.iter(kind=kind)]


async def test_every_response_has_the_security_headers(rig: ConsoleRig) -> None:
    for path in ("/console/login", "/console/static/console.css", "/console/nope"):
        resp = await rig.client.get(path, allow_redirects=False)
        assert resp.headers["Content-Security-Policy"] == CSP, path
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert "default-src 'none'" in CSP and "frame-ancestors 'none'" in CSP
    await rig.login("admin")
    for path in ("/console/", "/console/archive?go=1", "/console/incidents", "/console/holds",
                 "/console/policies", "/console/rooms", "/console/activity"):  # fmt: skip
        resp = await rig.client.get(path)
        assert resp.status == 200, (path, await resp.text())
        assert resp.headers["Content-Security-Policy"] == CSP
        assert resp.headers["Cache-Control"] == "no-store", path
        assert "<script" not in await resp.text()  # the console itself runs no script


async def test_forms_without_their_csrf_token_are_refused(rig: ConsoleRig) -> None:
    await rig.login("admin")
    good = await rig.csrf("/console/holds")
    form = {"scope": "room", "target": ROOM, "reason": "case 7"}
    for token in (None, "", "0" * 64, good[:-1] + ("0" if good[-1] != "0" else "1")):
        data = dict(form) if token is None else {**form, "csrf": token}
        resp = await rig.client.post("/console/holds/add", data=data)
        assert resp.status == 403 and "Form refused" in await resp.text()
    assert await rig.store.holds.entries() == []
    resp = await rig.client.post("/console/logout", data={}, allow_redirects=False)
    assert resp.status == 403
    # the token of another session does not work either
    other = rig.console.sessions
    s2 = await other.create(f"@admin:{DOMAIN}")
    resp = await rig.client.post("/console/holds/add", data={**form, "csrf": csrf_token(s2.id)})
    assert resp.status == 403


async def test_admins_add_and_lift_holds_and_auditors_cannot(rig: ConsoleRig) -> None:
    await rig.login("auditor")
    page = await (await rig.client.get("/console/holds")).text()
    assert (
        "Only admins can add or lift legal holds" in page
        and 'action="/console/holds/add"' not in page
    )
    token = await rig.csrf("/console/holds")
    resp = await rig.client.post(
        "/console/holds/add",
        data={"scope": "room", "target": ROOM, "reason": "x", "csrf": token},
    )
    assert resp.status == 403 and "Only admins" in await resp.text()
    assert await rig.store.holds.entries() == []
    rig.client.session.cookie_jar.clear()
    await rig.login("admin")
    token = await rig.csrf("/console/holds")
    resp = await rig.client.post(
        "/console/holds/add",
        data={"scope": "room", "target": ROOM, "reason": "case 7", "csrf": token},
    )
    assert resp.status == 200 and "Hold added." in await resp.text()
    (hold,) = await rig.store.holds.entries()
    assert (hold.target, hold.by, hold.reason) == (ROOM, f"@admin:{DOMAIN}", "case 7")
    resp = await rig.client.post(
        "/console/holds/lift",
        data={"scope": "room", "target": ROOM, "reason": "case closed", "csrf": token},
    )
    assert "Hold lifted." in await resp.text() and await rig.store.holds.entries() == []
    records = await kinds(rig.store, AuditKind.HOLD)
    assert [(r["data"]["action"], r["data"]["by"], r["data"]["reason"]) for r in records] == [
        ("on", f"@admin:{DOMAIN}", "case 7"),
        ("off", f"@admin:{DOMAIN}", "case closed"),
    ]


async def test_a_hold_needs_a_reason(rig: ConsoleRig) -> None:
    await rig.login("admin")
    token = await rig.csrf("/console/holds")
    resp = await rig.client.post(
        "/console/holds/add", data={"scope": "room", "target": ROOM, "reason": "", "csrf": token}
    )
    assert resp.status == 400 and await rig.store.holds.entries() == []


async def test_message_text_is_shown_as_text(rig: ConsoleRig) -> None:
    await rig.store.queue.ingest("t1", [event(1, XSS, sender=f"@<b>x</b>:{DOMAIN}")])
    await rig.login("auditor")
    for path in ("/console/archive?go=1", "/console/archive/1"):
        text = await (await rig.client.get(path)).text()
        assert "<script>alert" not in text and "<img src=x" not in text and "<b>x</b>" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        assert "&lt;b&gt;x&lt;/b&gt;" in text


async def test_search_filters_pages_and_is_audited(rig: ConsoleRig) -> None:
    other = f"!other:{DOMAIN}"
    await rig.store.queue.ingest(
        "t1",
        [event(n, f"hello number {n}", room=ROOM if n % 2 else other) for n in range(1, 121)],
    )
    await rig.login("auditor")
    text = await (await rig.client.get("/console/archive", params={"room": ROOM})).text()
    assert text.count('href="/console/archive/') == 50  # a page, newest first
    assert "hello number 119" in text and "hello number 120" not in text
    assert "Older records" in text
    words = await (
        await rig.client.get("/console/archive", params={"room": ROOM, "text": "NUMBER 77"})
    ).text()
    assert "hello number 77<" in words and "hello number 75<" not in words
    searches = [r for r in await kinds(rig.store, AuditKind.ACCESS) if r["type"] == "search"]
    assert [s["data"]["filters"] for s in searches] == [
        {"room": ROOM},
        {"room": ROOM, "text": "NUMBER 77"},
    ]
    assert all(s["sender"] == f"@auditor:{DOMAIN}" for s in searches)
    await rig.client.get("/console/archive/3")
    views = [r for r in await kinds(rig.store, AuditKind.ACCESS) if r["type"] == "view"]
    assert views[-1]["data"]["seq"] == 3 and views[-1]["sender"] == f"@auditor:{DOMAIN}"


async def test_keyset_pages_cover_every_match_once(rig: ConsoleRig) -> None:
    await rig.store.queue.ingest("t1", [event(n, f"m{n}") for n in range(1, 131)])
    seen: list[int] = []
    before: int | None = None
    while True:
        page = await rig.console.read.search(SearchFilters(type="m.room.message", before=before))
        seen.extend(int(r["seq"]) for r in page.items)
        if page.next_before is None:
            break
        before = page.next_before
    assert seen == sorted(seen, reverse=True) and len(seen) == len(set(seen)) == 130


async def test_export_streams_the_matches_and_neutralises_formulas(rig: ConsoleRig) -> None:
    await rig.store.queue.ingest(
        "t1",
        [
            event(1, '=HYPERLINK("http://evil")'),
            event(2, "plain words"),
            event(3, "other room", room=f"!other:{DOMAIN}"),
        ],
    )
    await rig.login("auditor")
    token = await rig.csrf("/console/archive?go=1")
    resp = await rig.client.post(
        "/console/archive/export", data={"csrf": token, "format": "csv", "room": ROOM}
    )
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in resp.headers["Content-Disposition"]
    assert resp.headers["Content-Security-Policy"] == CSP
    rows = list(csv.reader(io.StringIO(await resp.text())))
    assert rows[0][0] == "seq" and len(rows) == 3
    assert rows[1][-1].startswith("'") or rows[1][-1].startswith("{")  # JSON data cell
    data = json.loads(rows[1][-1])
    assert data["content"]["body"].startswith("=HYPERLINK")
    # a cell that itself starts with a formula character is neutralised
    out = csv_rows([{"seq": 1, "sender": "@x:y", "type": "=1+1", "data": None}])
    cells = next(csv.reader(io.StringIO(out.decode())))
    assert cells[6] == "'@x:y" and cells[7] == "'=1+1"
    resp = await rig.client.post(
        "/console/archive/export",
        data={"csrf": token, "format": "jsonl", "text": "plain", "type": "m.room.message"},
    )
    lines = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert [rec["event_id"] for rec in lines] == ["$e2"]
    exports = await kinds(rig.store, AuditKind.EXPORT)
    assert [(e["sender"], e["data"]["format"]) for e in exports] == [
        (f"@auditor:{DOMAIN}", "csv"),
        (f"@auditor:{DOMAIN}", "jsonl"),
    ]
    resp = await rig.client.post("/console/archive/export", data={"format": "csv"})
    assert resp.status == 403  # no CSRF token


async def test_incidents_list_findings_and_refusals_masked(rig: ConsoleRig) -> None:
    await rig.store.records.append(
        [
            AuditEntry(
                AuditKind.GATE,
                {
                    "callback": "check_event_for_spam",
                    "decision": "deny",
                    "findings": [
                        {
                            "rule": "detector:card",
                            "actions": ["block"],
                            "excerpt": "4111 **** **** 1111",
                        }
                    ],
                },
                room_id=ROOM,
                sender=f"@alice:{DOMAIN}",
                type="m.room.message",
            ),
            AuditEntry(
                AuditKind.GATE,
                {"callback": "check_event_for_spam", "decision": "allow", "findings": []},
                room_id=ROOM,
                sender=f"@bob:{DOMAIN}",
            ),
        ]
    )
    await rig.login("auditor")
    text = await (await rig.client.get("/console/incidents")).text()
    assert (
        "detector:card" in text and "4111 **** **** 1111" in text and "refused by the gate" in text
    )
    assert f"@bob:{DOMAIN}" not in text  # an allow without findings is no incident
    none = await (await rig.client.get("/console/incidents", params={"rule": "regex:x"})).text()
    assert "No incidents match these filters" in none
    detail = await rig.client.get("/console/incidents/1")
    assert detail.status == 200 and "check_event_for_spam" in await detail.text()


async def test_incidents_list_attachments_refused_at_upload_and_in_rooms(
    rig: ConsoleRig,
) -> None:
    finding = {"rule": "detector:card", "actions": ["block"], "excerpt": "4111 **** **** 1111"}
    await rig.store.records.append(
        [
            AuditEntry(
                AuditKind.MEDIA,
                {
                    "path": "gate",
                    "outcome": "blocked",
                    "rule": "detector:card",
                    "findings": [finding],
                    "sha256": "ab" * 32,
                },
                type="pdf",
            ),
            AuditEntry(
                AuditKind.MEDIA,
                {
                    "path": "room",
                    "outcome": "unreadable_refused",
                    "rule": "unreadable:encrypted",
                    "findings": [],
                    "actions": ["redact"],
                },
                room_id=ROOM,
                sender=f"@carol:{DOMAIN}",
            ),
            AuditEntry(
                AuditKind.MEDIA,
                {"path": "gate", "outcome": "allowed", "rule": None, "findings": []},
            ),
        ]
    )
    await rig.login("auditor")
    text = await (await rig.client.get("/console/incidents")).text()
    assert "upload refused by the gate" in text and "4111 **** **** 1111" in text
    assert "unreadable:encrypted" in text and f"@carol:{DOMAIN}" in text and "redact" in text
    assert "upload allowed by the gate" not in text  # an allowed file is no incident
    only = await (
        await rig.client.get("/console/incidents", params={"rule": "unreadable:encrypted"})
    ).text()
    assert f"@carol:{DOMAIN}" in only and "upload refused" not in only


async def test_overview_draws_charts_from_the_daily_counters(rig: ConsoleRig) -> None:
    day_ms = 86_400_000
    now = int(rig.clock.now * 1000)
    await rig.store.queue.ingest("t1", [event(n, "x") for n in range(1, 4)])
    await rig.store.records.append(
        [
            AuditEntry(
                AuditKind.GATE,
                {"callback": "check_event_for_spam", "decision": "deny",
                 "findings": [{"rule": "keyword:secret", "actions": ["block"]}]},
            )
        ],
        # archived "today" as the console's clock sees it
    )  # fmt: skip
    rows = await rig.store.console.daily(0, 10**6, ["event", "finding", "refusal", "gate"])
    assert ("event", "", 3) in {(m, lab, n) for _d, m, lab, n in rows}
    assert ("finding", "keyword:secret", 1) in {(m, lab, n) for _d, m, lab, n in rows}
    assert ("refusal", "check_event_for_spam", 1) in {(m, lab, n) for _d, m, lab, n in rows}
    # show them in the console's range: its clock is set to the day of the records
    rig.clock.now = rows[0][0] * day_ms / 1000 + 3600
    del now
    await rig.login("admin")
    text = await (await rig.client.get("/console/", params={"days": "7"})).text()
    assert text.count("<svg viewBox=") == 4
    assert '<rect class="bar s0"' in text
    assert "<caption>Events archived per day, days with any count</caption>" in text
    assert "keyword:secret" in text


async def test_a_database_outage_is_a_503_page(rig: ConsoleRig) -> None:
    await rig.login("auditor")

    async def down(_sid: str) -> None:
        raise StoreUnavailable("OperationalError")

    rig.store.console.session = down  # type: ignore[method-assign]
    resp = await rig.client.get("/console/archive")
    assert resp.status == 503 and "Database unreachable" in await resp.text()
    assert resp.headers["Content-Security-Policy"] == CSP


def test_a_short_page_says_the_scan_stopped_at_its_bound() -> None:
    """One pager serves the archive and the incidents; a page the scan could not fill says
    why, with the bound the reader used."""
    from bridge.console.readmodel import PAGE_SIZE, SCAN_LIMIT, Page
    from bridge.console.web import _environment

    older = _environment().get_template("_older.html").module.older  # type: ignore[attr-defined]
    short = str(older(Page([1], next_before=7), "/archive?before=7", "Older records"))
    assert f"Stopped after scanning {SCAN_LIMIT:,} records" in short
    assert '<a href="/archive?before=7">Older records</a>' in short
    full = str(older(Page(list(range(PAGE_SIZE)), next_before=7), "/x", "Older"))
    assert "Stopped" not in full and "Older" in full
    assert str(older(Page([1]), "/x", "Older")).strip() == ""  # the last page: no link
