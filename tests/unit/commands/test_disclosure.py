"""``dlp list`` and ``dlp test`` show rule contents only in the management room.

Elsewhere (an ordinary room, maybe federated) they answer with counts: a keyword list or a
pattern posted there would itself be the leak DLP exists to prevent.
"""

from __future__ import annotations

from pathlib import Path

from bridge.commands.disclosure import redact_rule_listing, redact_test_result
from bridge.policy.dlp import DetectorRule, DlpPolicy, KeywordList, RegexRule
from bridge.policy.model import Action, Finding
from bridge.store import Store
from tests.unit.pipeline.test_retroactive import (
    ADMIN,
    MGMT,
    ROOM,
    feed,
    make_config,
    make_worker,
    msg,
)

SECRETS = ("nightingale", "falcon-x", "SEC-[0-9]{4,}", "@exempt:corp.example")
DLP = {
    "keywords": [
        {"name": "projects", "keywords": ["nightingale", "falcon-x"], "action": "block"},
        {"name": "watch", "keywords": ["bluefin"], "action": "notify"},
    ],
    "regexes": [{"name": "ticket", "pattern": "SEC-[0-9]{4,}", "action": "notify"}],
    "detectors": {"card": "block"},
    "exempt_users": ["@exempt:corp.example"],
}


def test_a_rule_listing_outside_the_management_room_has_counts_only() -> None:
    policy = DlpPolicy(
        keyword_lists=(
            KeywordList("projects", ("nightingale", "falcon-x")),
            KeywordList("watch", ("bluefin",), frozenset({Action.NOTIFY})),
        ),
        regex_rules=(RegexRule("ticket", "SEC-[0-9]{4,}"),),
        detectors=(DetectorRule("card"),),
        exempt_users=frozenset({"@exempt:corp.example"}),
    )
    title, items = redact_rule_listing(policy, "globally", encryption_forbidden=True)
    assert title == (
        "DLP rules in force globally (rule contents are shown only in the management room):"
    )
    assert items == [
        "2 keyword lists (3 keywords)",
        "1 pattern",
        "1 detector",
        "1 exemption",
        "end-to-end encryption: forbidden (the gate refuses m.room.encryption)",
    ]
    assert redact_rule_listing(DlpPolicy(), "in !r:x", encryption_forbidden=False) == (
        "DLP rules in force in !r:x: none",
        [],
    )


def test_a_test_result_outside_the_management_room_has_the_outcome_and_a_count() -> None:
    block = Finding("keyword:projects", "keyword", frozenset({Action.BLOCK}), "m", "night…")
    notify = Finding("regex:ticket", "regex", frozenset({Action.NOTIFY}), "m", "SEC-1234")
    assert redact_test_result([]) == "No DLP rule matches: the message would be sent."
    assert redact_test_result([block, notify]) == (
        "The gate would refuse this message: 2 rules match "
        "(rule contents are shown only in the management room)."
    )
    assert redact_test_result([notify]).startswith("The message would pass: 1 rule matches")


async def test_list_and_test_show_contents_only_in_the_management_room(
    store: Store, tmp_path: Path
) -> None:
    worker = await make_worker(store, make_config(tmp_path, DLP))
    [full] = await feed(worker, msg("!policy dlp list", sender=ADMIN, room=MGMT))
    assert all(s in full.payload["body"] for s in SECRETS), full.payload["body"]
    [counted] = await feed(worker, msg("!policy dlp list", sender=ADMIN, room=ROOM))
    body = counted.payload["body"] + counted.payload.get("formatted_body", "")
    assert not any(s.lower() in body.lower() for s in (*SECRETS, "projects", "ticket", "card"))
    assert "2 keyword lists (3 keywords)" in body and "1 pattern" in body
    assert counted.room_id == ROOM

    text = "is falcon-x on for SEC-12345?"
    [tested] = await feed(worker, msg(f"!policy dlp test {text}", sender=ADMIN, room=MGMT))
    assert "keyword:projects" in tested.payload["body"]
    assert "regex:ticket" in tested.payload["body"]
    # in an ordinary room the command's text is itself judged (and redacted): other actions
    acts = await feed(worker, msg(f"!policy dlp test {text}", sender=ADMIN, room=ROOM))
    [counted] = [a for a in acts if "rules match" in a.payload.get("body", "")]
    assert counted.room_id == ROOM
    body = counted.payload["body"] + counted.payload.get("formatted_body", "")
    assert body.startswith("The gate would refuse this message: 2 rules match"), body
    assert not any(s in body for s in ("projects", "ticket", "falcon", "SEC-"))
