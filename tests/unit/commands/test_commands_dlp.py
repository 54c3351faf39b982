"""The ``dlp`` commands, called alone: staged documents, engines swapped after the commit,
retroactive scans asked for, refusals."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from bridge.commands import dlp
from bridge.commands.errors import CommandError
from bridge.commands.roles import Role
from bridge.policy.layers import GLOBAL
from bridge.policy.model import Action
from tests.kit.services import CommandFake
from tests.unit.commands.conftest import ROOM, make_config

DAY = 86_400_000


def blocks(fake: CommandFake, text: str, room: str = ROOM) -> bool:
    findings = fake.policy.engine.dlp_for(room).scan([text])
    return any(Action.BLOCK in f.actions for f in findings)


async def test_add_keyword_is_staged_and_applied_only_after_the_commit(fake: CommandFake) -> None:
    ctx = fake.context(args={"word": "bluefin"})
    reply = await dlp.add_keyword(ctx)
    assert reply.text == "✅ keyword added (block) globally: bluefin"
    assert set(ctx.state_updates) == {"policy.dlp"} and "bluefin" in ctx.state_updates["policy.dlp"]
    assert ctx.audit == {"change": "add keyword (block) globally"}
    assert not blocks(fake, "bluefin at noon")  # nothing changes before the commit
    fake.commit(ctx)
    assert blocks(fake, "bluefin at noon")
    assert fake.policy.runtime_dlp[GLOBAL]["keywords"][0]["keywords"] == ["bluefin"]
    assert fake.scans == []


async def test_retroactive_asks_for_a_scan_of_the_new_word_after_the_commit(
    fake: CommandFake,
) -> None:
    ctx = fake.context(
        room_id=ROOM,
        args={"word": "Bluefin"},
        flags={"retroactive": True, "window": "5d", "scope": "here", "action": "redact,notify"},
    )
    reply = await dlp.add_keyword(ctx)
    assert "Scanning the archive of the last 5d in the background" in reply.text
    assert fake.scans == []
    fake.commit(ctx)
    [(engine, scan)] = fake.scans
    assert engine is fake.policy.engine
    assert (scan.scope, scan.rules, scan.window_ms) == (
        ROOM,
        frozenset({"keyword:admin-redact+notify"}),
        5 * DAY,
    )
    assert scan.probe_word is not None and scan.probe_word.lower() == "bluefin"
    assert abs(scan.since_ms - (time.time() * 1000 - 5 * DAY)) < 60_000
    assert (scan.requested_by, scan.command_room) == ("@admin:corp.example", ROOM)
    assert ctx.audit["retroactive"] == {"window_ms": 5 * DAY, "rule": "keyword:admin-redact+notify"}


async def test_the_retroactive_window_defaults_to_the_config(sqlite_store, tmp_path: Path) -> None:
    fake = CommandFake(sqlite_store, make_config(tmp_path, dlp={"retroactive_window": "3d"}))
    ctx = fake.context(
        args={"name": "ssn", "pattern": r"\d{3}-\d{2}-\d{4}"}, flags={"retroactive": True}
    )
    await dlp.add_regex(ctx)
    fake.commit(ctx)
    [(_, scan)] = fake.scans
    assert (scan.window_ms, scan.rules, scan.probe_word) == (
        3 * DAY,
        frozenset({"regex:ssn"}),
        None,
    )


@pytest.mark.parametrize(
    ("handler", "args", "flags", "message"),
    [
        (
            dlp.add_keyword,
            {"word": "x"},
            {"window": "1d"},
            "--window only makes sense with --retroactive",
        ),
        (dlp.add_keyword, {"word": "  "}, {}, "the keyword is empty"),
        (dlp.add_keyword, {"word": "x"}, {"action": "explode"}, "--action must be one or more of"),
        (dlp.add_keyword, {"word": "x"}, {"retroactive": True, "window": "soon"}, "--window: "),
        (dlp.add_regex, {"name": "bad", "pattern": "(?<=x)y"}, {}, "refused by RE2"),
        (dlp.remove_keyword, {"word": "never-added"}, {}, "no runtime keyword 'never-added'"),
        (
            dlp.detectors,
            {"switch": "disable", "name": "credit_card"},
            {"retroactive": True},
            "--retroactive only applies when enabling a detector",
        ),
    ],
)
async def test_bad_changes_are_refused_and_nothing_is_staged(
    fake: CommandFake, handler, args, flags, message: str
) -> None:
    ctx = fake.context(args=args, flags=flags)
    with pytest.raises(CommandError, match=re.escape(message)):
        await handler(ctx)
    assert ctx.state_updates == {} and ctx.after_commit == []


async def test_remove_keyword_and_encryption(fake: CommandFake) -> None:
    added = fake.context(args={"word": "tuna"})
    await dlp.add_keyword(added)
    fake.commit(added)
    removed = fake.context(args={"word": "tuna"})
    assert (await dlp.remove_keyword(removed)).text == "✅ keyword removed globally: tuna"
    fake.commit(removed)
    assert not blocks(fake, "tuna")

    forbid = fake.context(room_id=ROOM, args={"setting": "forbid"}, flags={"scope": "here"})
    assert "forbidden in " + ROOM in (await dlp.encryption(forbid)).text
    fake.commit(forbid)
    assert fake.policy.engine.encryption_forbidden(ROOM)
    assert not fake.policy.engine.encryption_forbidden("!other:corp.example")


async def test_list_and_test_show_the_rules_in_force(fake: CommandFake) -> None:
    ctx = fake.context(args={"word": "bluefin"}, flags={"action": "block,notify"})
    await dlp.add_keyword(ctx)
    fake.commit(ctx)
    listed = await dlp.list_rules(fake.context(role=Role.AUDITOR))
    assert listed.text.startswith("DLP rules in force globally")
    assert "bluefin" in listed.text

    tried = fake.context(role=Role.AUDITOR, args={"text": "the bluefin is here"})
    reply = await dlp.test_text(tried)
    assert reply.text.startswith("The gate would refuse this message.")
    assert "keyword:admin-block+notify" in reply.text
    # Outside the management room: counts only, no rule names or excerpts.
    elsewhere = fake.context(room_id=ROOM, role=Role.AUDITOR, args={"text": "the bluefin is here"})
    counted = (await dlp.test_text(elsewhere)).text
    assert counted.startswith("The gate would refuse this message: 1 rule matches")
    assert "admin-block" not in counted and "bluefin" not in counted
    assert tried.audit == {"matched": ["keyword:admin-block+notify"]}
    assert "text" not in tried.args  # the tested text is not kept in the audit record
    clean = await dlp.test_text(fake.context(room_id=ROOM, args={"text": "salmon"}))
    assert clean.text == "No DLP rule matches: the message would be sent."
