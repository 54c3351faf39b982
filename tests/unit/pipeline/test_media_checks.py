"""In-room media checks: the media reference of a message, and the checker against a fake
homeserver's authenticated media endpoint: room rules applied, redaction and notice queued,
and one fetch and one extraction for a file posted in several rooms (cache by mxc/digest)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.pipeline.media_checks import MediaRef, media_ref, media_refs
from bridge.store.media import MediaCheck
from tests.kit import documents as d
from tests.kit.config import AS_TOKEN, make_config
from tests.kit.media import (
    DOWNLOAD_ROUTE,
    MediaHomeserver,
    media_checker,
    media_homeserver,
    queue_checks,
)


def test_media_messages_are_recognised_and_unusable_encrypted_files_skipped() -> None:
    msg = {"type": "m.room.message", "content": {"msgtype": "m.file", "url": "mxc://s/abc"}}
    assert media_ref(msg) == (MediaRef("mxc://s/abc"), "")
    sticker = {"type": "m.sticker", "content": {"url": "mxc://s/st"}}
    assert media_ref(sticker) == (MediaRef("mxc://s/st"), "")
    # without its key (the readable ones: test_media_checks_e2ee.py)
    enc = {"type": "m.room.message", "content": {"msgtype": "m.image", "file": {"url": "mxc://x"}}}
    ref, why = media_ref(enc)
    assert ref is None and "encrypted" in why
    assert media_ref({"type": "m.room.message", "content": {"msgtype": "m.text"}}) == (None, "")
    http = {"type": "m.room.message", "content": {"msgtype": "m.file", "url": "https://x"}}
    assert media_ref(http) == (None, "")


def test_a_thumbnail_is_a_file_of_its_own_and_checked_too() -> None:
    """A client uploads the thumbnail separately; any file can stand in for it."""
    info = {"thumbnail_url": "mxc://s/thumb", "mimetype": "image/png"}
    msg = {"type": "m.room.message", "content": {"msgtype": "m.image", "url": "mxc://s/img",
                                                 "info": info}}  # fmt: skip
    assert media_refs(msg) == [(MediaRef("mxc://s/img"), ""), (MediaRef("mxc://s/thumb"), "")]
    secret = {"url": "mxc://s/enc-thumb", "key": {"k": "a2V5", "alg": "A256CTR"}, "iv": "aXY",
              "hashes": {"sha256": "aGFzaA"}, "v": "v2"}  # fmt: skip
    file = {"url": "mxc://s/enc", "key": {"k": "a2V5"}, "iv": "aXY", "hashes": {}, "v": "v2"}
    enc = {"type": "m.room.message", "content": {"msgtype": "m.image", "file": file,
                                                 "info": {"thumbnail_file": secret}}}  # fmt: skip
    [(main, _), (thumb, _)] = media_refs(enc)
    assert main is not None and main.key is not None and main.mxc == "mxc://s/enc"
    assert thumb is not None and thumb.key is not None and thumb.mxc == "mxc://s/enc-thumb"
    broken = {**enc, "content": {**enc["content"], "info": {"thumbnail_file": {"url": "x"}}}}
    [_, (none, why)] = media_refs(broken)
    assert none is None and "thumbnail" in why
    text = {"type": "m.room.message", "content": {"msgtype": "m.text", "info": info}}
    assert media_refs(text) == []


@pytest.fixture
async def homeserver() -> AsyncIterator[MediaHomeserver]:
    files = {"doc": d.docx("project Bluebird budget"), "plain": d.pdf("lunch menu")}
    async with media_homeserver(files, AS_TOKEN) as served:
        yield served


async def test_room_rules_redact_and_notify_and_the_file_is_fetched_once(
    tmp_path: Path, homeserver: MediaHomeserver
) -> None:
    url, fetched = homeserver.url, homeserver.fetched
    config = make_config(
        {
            "homeserver": {"url": url},
            "dlp": {
                "rooms": {
                    "!secret:corp.example": {
                        "keywords": [
                            {
                                "name": "codes",
                                "keywords": ["bluebird"],
                                "action": ["redact", "notify"],
                            }
                        ]
                    }
                }
            },
        },
        base_dir=tmp_path,
    )
    async with media_checker(config, tmp_path / "m.db", "!mgmt:corp.example") as rig:
        store, checker = rig.store, rig.checker
        await queue_checks(
            store,
            [
                MediaCheck("!open:corp.example", "$1", "@a:corp.example", "mxc://corp/doc"),
                MediaCheck("!secret:corp.example", "$2", "@a:corp.example", "mxc://corp/doc"),
                MediaCheck("!secret:corp.example", "$3", "@a:corp.example", "mxc://corp/plain"),
                MediaCheck("!secret:corp.example", "$4", "@a:corp.example", "mxc://corp/gone"),
            ],
        )
        assert await checker.run_once() == 4
        assert await store.media.pending() == 0
        assert fetched.count("doc") == 1  # once for two rooms
        due = await store.actions.due(1e12)
        kinds = sorted((a.kind, a.room_id, a.payload.get("event_id")) for a in due)
        assert kinds == [
            ("redact", "!secret:corp.example", "$2"),
            ("send_notice", "!mgmt:corp.example", None),
        ]
        notice = next(a for a in due if a.kind == "send_notice")
        assert "keyword:codes" in notice.payload["body"]
        records = [r async for r in store.reader.iter(kind="media")]
        outcomes = sorted(r["data"]["outcome"] for r in records)
        assert outcomes == ["allowed", "skipped"]  # $2's finding; $4 unavailable
        assert "budget" not in str(records)


@pytest.mark.parametrize("rule", ["refuse", "allow"])
async def test_media_over_the_download_cap_is_too_large_and_follows_the_rule(
    tmp_path: Path, rule: str
) -> None:
    big = b"%PDF-1.4\n" + b"0" * (2 * 1024 * 1024)  # 2 MiB: over a 1 MiB cap

    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(0, len(big), 64 * 1024):
            try:
                await response.write(big[i : i + 64 * 1024])
            except (ConnectionError, RuntimeError):
                break  # the checker stopped reading at its cap
        return response

    app = web.Application()
    app.add_routes([web.get(DOWNLOAD_ROUTE, download)])
    server = TestServer(app)
    await server.start_server()
    config = make_config(
        {
            "homeserver": {"url": str(server.make_url("")).rstrip("/")},
            "attachments": {"max_file_mb": 1, "unreadable": {"too_large": rule}},
        },
        base_dir=tmp_path,
    )
    try:
        async with media_checker(config, tmp_path / "big.db", "!mgmt:corp.example") as rig:
            store = rig.store
            check = MediaCheck("!r:corp.example", "$big", "@a:corp.example", "mxc://corp/big")
            await queue_checks(store, [check])
            assert await rig.checker.run_once() == 1
            [record] = [r async for r in store.reader.iter(kind="media")]
            data = record["data"]
            assert data["unreadable"] == "too_large" and data["detail"] == "over the download cap"
            expected = "unreadable_refused" if rule == "refuse" else "unreadable_allowed"
            assert data["outcome"] == expected
            due = await store.actions.due(1e12)
            assert [(a.kind, a.payload.get("event_id")) for a in due] == (
                [("redact", "$big")] if rule == "refuse" else []
            )
            assert rig.pool.replaced == 0 and data["size"] <= 1024 * 1024 + 256 * 1024
    finally:
        await server.close()
