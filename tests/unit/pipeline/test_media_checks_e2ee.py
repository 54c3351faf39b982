"""End-to-end encrypted attachments (``content.file``) checked in their room: the reference
with its key, the ciphertext fetched from a fake homeserver, verified, decrypted and judged
(a card number in an encrypted PDF is removed), a wrong hash is ``malformed``, an unknown
cipher ``encrypted``; the cache cannot be primed with a wrong key; and the key material
never reaches a plaintext column, an audit record or a log."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from mautrix.crypto.attachments import encrypt_attachment

from bridge.pipeline.media_checks import MediaChecker, MediaRef, media_ref
from bridge.store import Store
from bridge.store.media import FileKey, MediaCheck
from tests.kit import documents as d
from tests.kit.config import make_config
from tests.kit.media import media_checker, media_homeserver, queue_checks

CARD = "4111 1111 1111 1111"
ROOM = "!enc:corp.example"
SENDER = "@a:corp.example"
MGMT = "!mgmt:corp.example"


def _encrypt(data: bytes) -> tuple[bytes, FileKey]:
    ciphertext, info = encrypt_attachment(data)
    return ciphertext, FileKey(info.key.key, info.iv, info.hashes["sha256"])


def _content_file(key: FileKey, url: str = "mxc://corp/f") -> dict[str, object]:
    return {
        "url": url,
        "key": {"kty": "oct", "alg": "A256CTR", "k": key.k, "key_ops": ["encrypt", "decrypt"]},
        "iv": key.iv,
        "hashes": {"sha256": key.sha256},
        "v": "v2",
    }


def test_encrypted_file_reference_carries_its_key() -> None:
    _, key = _encrypt(b"x")
    event = {
        "type": "m.room.message",
        "content": {"msgtype": "m.file", "body": "a.pdf", "file": _content_file(key)},
    }
    assert media_ref(event) == (MediaRef("mxc://corp/f", key), "")
    assert key.k not in repr(media_ref(event))  # never logged by accident

    def with_file(**changes: object) -> dict[str, object]:
        file = {**_content_file(key), **changes}
        return {"type": "m.room.message", "content": {"msgtype": "m.file", "file": file}}

    for broken in (with_file(url="https://x"), with_file(key={"alg": "A256CTR"}), with_file(iv=3)):
        ref, why = media_ref(broken)
        assert ref is None and why.startswith("encrypted attachment")
    no_alg = with_file(key={"k": key.k}, v=None)
    ref, _ = media_ref(no_alg)
    assert ref is not None and ref.key == replace(key, v="")  # alg read as A256CTR
    other = with_file(key={"k": key.k, "alg": "A128CBC"})
    ref, _ = media_ref(other)
    assert ref is not None and ref.key is not None and ref.key.alg == "A128CBC"


@dataclass
class Stack:
    store: Store
    checker: MediaChecker
    files: dict[str, bytes]
    fetched: list[str] = field(default_factory=list)

    async def queue(self, *checks: MediaCheck) -> None:
        await queue_checks(self.store, checks)

    async def run(self, *checks: MediaCheck) -> list[tuple[str, str | None]]:
        """Queue and run ``checks``; the actions due after them (kind, event)."""
        await self.queue(*checks)
        assert await self.checker.run_once() == len(checks)
        due = await self.store.actions.due(1e12)
        return sorted((a.kind, a.payload.get("event_id")) for a in due)

    async def media_records(self) -> list[dict[str, object]]:
        return [r["data"] async for r in self.store.reader.iter(kind="media")]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    files: dict[str, bytes] = {}
    async with media_homeserver(files) as served:
        config = make_config(
            {
                "homeserver": {"url": served.url},
                "dlp": {"detectors": {"card": ["block", "notify"]}},
            },
            base_dir=tmp_path,
        )
        async with media_checker(config, tmp_path / "m.db", MGMT) as rig:
            yield Stack(rig.store, rig.checker, files, served.fetched)


def _check(event_id: str, mxc: str, key: FileKey | None) -> MediaCheck:
    return MediaCheck(ROOM, event_id, SENDER, mxc, key=key)


async def test_card_number_in_an_encrypted_pdf_is_redacted_and_audited(stack: Stack) -> None:
    pdf = d.pdf("Invoice", f"pay with {CARD} by friday")
    stack.files["card"], card_key = _encrypt(pdf)
    stack.files["menu"], menu_key = _encrypt(d.pdf("lunch menu"))
    due = await stack.run(
        _check("$card", "mxc://corp/card", card_key), _check("$menu", "mxc://corp/menu", menu_key)
    )
    assert due == [("redact", "$card"), ("send_notice", None)]
    [record] = await stack.media_records()
    assert record["event_id"] == "$card" and record["e2ee"] is True
    assert record["outcome"] == "blocked" and record["rule"] == "detector:card"
    assert record["file_type"] == "pdf" and record["sha256"] == hashlib.sha256(pdf).hexdigest()
    assert CARD not in json.dumps(record)


async def test_a_wrong_hash_is_malformed_yet_its_text_still_judged(stack: Stack) -> None:
    stack.files["menu"], menu_key = _encrypt(d.pdf("lunch menu"))
    stack.files["card"], card_key = _encrypt(d.pdf(f"card {CARD}"))
    wrong = base64.b64encode(b"\x01" * 32).decode().rstrip("=")
    due = await stack.run(
        _check("$menu", "mxc://corp/menu", replace(menu_key, sha256=wrong)),
        _check("$card", "mxc://corp/card", replace(card_key, sha256=wrong)),
    )
    assert due == [("redact", "$card"), ("send_notice", None)]
    records = {r["event_id"]: r for r in await stack.media_records()}
    assert records["$menu"]["outcome"] == "unreadable_allowed"
    assert records["$menu"]["unreadable"] == "malformed"
    assert records["$card"]["outcome"] == "blocked"


async def test_an_undecodable_key_is_malformed(stack: Stack) -> None:
    stack.files["menu"], menu_key = _encrypt(d.pdf("lunch menu"))
    assert await stack.run(_check("$m", "mxc://corp/menu", replace(menu_key, iv="AAAA"))) == []
    [record] = await stack.media_records()
    assert record["unreadable"] == "malformed" and record["e2ee"] is True


@pytest.mark.parametrize("changes", [{"alg": "A128CBC"}, {"v": "v1"}, {"v": ""}])
async def test_an_unknown_cipher_is_encrypted_and_refused(
    stack: Stack, changes: dict[str, str]
) -> None:
    stack.files["menu"], menu_key = _encrypt(d.pdf("lunch menu"))
    due = await stack.run(_check("$m", "mxc://corp/menu", replace(menu_key, **changes)))
    assert due == [("redact", "$m")]
    [record] = await stack.media_records()
    assert record["outcome"] == "unreadable_refused" and record["unreadable"] == "encrypted"
    assert stack.fetched == []  # refused without a download


async def test_the_cache_cannot_be_primed_with_a_wrong_key(stack: Stack) -> None:
    """The attack: post the ciphertext's mxc first unencrypted and with a garbage key (both
    read as noise, allowed), then with the right key. The right key must be read."""
    stack.files["card"], key = _encrypt(d.pdf(f"card {CARD}"))
    _, garbage = _encrypt(b"other")
    wrong = replace(garbage, sha256=key.sha256)  # the same ciphertext, another key
    mxc = "mxc://corp/card"
    assert await stack.run(_check("$plain", mxc, None), _check("$wrong", mxc, wrong)) == []
    assert await stack.run(_check("$right", mxc, key)) == [
        ("redact", "$right"),
        ("send_notice", None),
    ]
    assert stack.fetched == ["card", "card", "card"]
    # The right key again (a forwarded message): from the cache, and still refused.
    await stack.run(_check("$again", mxc, key))
    assert stack.fetched == ["card"] * 3
    outcomes = {r["event_id"]: r["outcome"] for r in await stack.media_records()}
    assert outcomes == {
        "$plain": "unreadable_allowed",
        "$wrong": "unreadable_allowed",
        "$right": "blocked",
        "$again": "blocked",
    }


async def test_key_material_stays_sealed(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stack.files["card"], key = _encrypt(d.pdf(f"card {CARD}"))
    raw_key = base64.urlsafe_b64decode(key.k + "=" * (-len(key.k) % 4))
    forms = [key.k, key.iv, raw_key.hex(), base64.b64encode(raw_key).decode().rstrip("=")]
    check = _check("$card", "mxc://corp/card", key)
    await stack.queue(check)

    def plaintext_columns() -> str:
        with sqlite3.connect(tmp_path / "m.db") as db:
            rows = db.execute("SELECT * FROM media_checks").fetchall()
            rows += db.execute("SELECT * FROM media_cache").fetchall()
        return repr(rows)

    [queued] = await stack.store.media.due(1e12)
    assert queued.key == key  # back from the sealed JSON
    dumped = plaintext_columns()
    assert all(f not in dumped for f in forms)
    assert await stack.checker.run_once() == 1
    assert await stack.store.media.pending() == 0  # the key leaves with the check
    dumped = plaintext_columns()
    assert "mxc://" not in dumped and all(f not in dumped for f in forms)
    records = [r async for r in stack.store.reader.iter(kind="media")]
    assert records and all(f not in json.dumps(records) for f in forms)
    assert all(f not in caplog.text for f in forms)
    files = (tmp_path / "m.db").read_bytes()
    assert all(f.encode() not in files for f in forms) and raw_key not in files


async def test_checks_queued_before_keys_existed_still_load(stack: Stack) -> None:
    await stack.queue(MediaCheck(ROOM, "$old", SENDER, "mxc://corp/old"))
    [old] = await stack.store.media.due(1e12)
    assert old.key is None and old.mxc == "mxc://corp/old"
