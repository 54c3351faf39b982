"""The sender's self-service replies in their language (notices.languages)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.commands.catalog import build_registry
from bridge.commands.dispatch import CommandRequest, Outcome, run_command
from bridge.config import ConfigError
from bridge.policy.notices import Language, Ledger, NoticeSettings, Refusal, Subject, decide
from bridge.store import Store
from bridge.store.notice_rooms import save_ledger
from tests.kit.services import CommandFake
from tests.unit.commands.conftest import MGMT, ROOM, make_config

HANS = "@hans:corp.example"
NOTICES = "!notices-hans:corp.example"
REF = "K7QM-2XPA"


@pytest.fixture
async def german(sqlite_store: Store, tmp_path: Path) -> CommandFake:
    for room in (MGMT, ROOM):
        await sqlite_store.rooms.upsert(room, joined=True)
    config = make_config(tmp_path, notices={"languages": {"@*:corp.example": "de"}})
    assert config.notices.languages.for_user(HANS) is Language.DE
    return CommandFake(sqlite_store, config, MGMT)


async def run(fake: CommandFake, body: str):  # type: ignore[no-untyped-def]
    request = CommandRequest(HANS, NOTICES, "$c", "!policy", body, None, False, notice_owner=HANS)
    return await run_command(build_registry(), fake, request)


async def test_report_and_override_replies_are_german(german: CommandFake) -> None:
    refusal = Refusal(REF, "detector:card", ROOM, 0.0, Subject.MESSAGE, "blocked", "4111 …")
    await save_ledger(
        german.store, HANS, decide(Ledger(), refusal, NoticeSettings()).ledger.dumps()
    )
    unknown = await run(german, "!policy report ZZZZ-ZZZZ")
    assert unknown.outcome is Outcome.ERROR
    assert "keine Ihrer letzten Ablehnungen hat die Referenz ZZZZ-ZZZZ" in unknown.reply.text
    sent = await run(german, f"!policy report {REF} ein Test")
    assert sent.outcome is Outcome.OK
    assert sent.reply.text.startswith("Danke: Ihre Meldung zu K7QM-2XPA")
    short = await run(german, f"!policy override {REF} ok")
    assert "geschäftliche Begründung" in short.reply.text
    refused = await run(german, f"!policy override {REF} der Kunde braucht es")
    assert "für die Regel detector:card ist keine Ausnahme möglich" in refused.reply.text


def test_bad_language_settings_fail_the_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"notices\.language: got 'fr'"):
        make_config(tmp_path, notices={"language": "fr"})


def test_allowed_phrases_in_the_config_file(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        dlp={
            "detectors": {"card": "block"},
            "allowed_phrases": [{"rule": "detector:card", "phrase": "test card 4111"}],
        },
    )
    [allowed] = config.dlp["global"].allowed_phrases
    assert (allowed.rule, allowed.phrase) == ("detector:card", "test card 4111")


async def test_the_notice_room_refusals_are_german_too(german: CommandFake) -> None:
    other = await run(german, "!policy status")
    assert other.outcome is Outcome.REFUSED
    assert "in Ihrem Hinweisraum funktionieren nur `!policy report`" in other.reply.text
    unreadable = await run(german, '!policy report "K7QM')
    assert unreadable.outcome is Outcome.ERROR
    assert "der Befehl konnte nicht gelesen werden" in unreadable.reply.text
