"""The attachment gate over HTTP with the module's exact contract: token, headers, bodies
over the cap, over-limit calls, refusals audited (digest, size, type, rule; never content),
the unreadable rule, notify lines for the management room."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.archive.sink import AuditSink
from bridge.attachments.kinds import FileType
from bridge.attachments.pool import ExtractionPool
from bridge.http.gate import Gate
from bridge.http.media_gate import CALLBACK, MediaGate, file_label
from bridge.pipeline.live_policy import build_engine
from bridge.policy.model import Finding
from bridge.store import Store
from tests.kit import documents as d
from tests.kit.config import GATE_TOKEN, make_config

BASE = "/_bridge/antispam"
URL = f"{BASE}/{CALLBACK}"
CARD = "4111 1111 1111 1111"


@dataclass
class Rig:
    client: TestClient
    store: Store
    notices: list[str]
    uploaders: list[tuple[str, str, Finding, str]]  # (user, ref, refusing finding, file)


@pytest.fixture(scope="module")
async def pool() -> AsyncIterator[ExtractionPool]:
    p = ExtractionPool(1, 768 * 1024 * 1024)
    await p.start()
    yield p
    p.close()


@contextlib.asynccontextmanager
async def gate_rig(
    tmp_path: Path, pool: ExtractionPool, attachments: Mapping[str, Any] | None = None
) -> AsyncIterator[Rig]:
    """A media gate with a card-blocking, keyword-notifying policy; ``attachments`` adds to
    its ``attachments:`` section."""
    config = make_config(
        {
            "dlp": {
                "detectors": {"card": "block"},
                "keywords": [{"name": "projects", "keywords": ["bluebird"], "action": "notify"}],
            },
            "attachments": {"max_file_mb": 2, **(attachments or {})},
        },
        base_dir=tmp_path,
    )
    engine = build_engine(config)
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'media.db'}")
    sink = AuditSink(store)
    task = asyncio.ensure_future(sink.run())
    notices: list[str] = []
    uploaders: list[tuple[str, str, Finding, str]] = []
    app = web.Application(client_max_size=1024 * 1024)  # smaller than the media cap
    media = MediaGate(
        BASE,
        GATE_TOKEN,
        lambda: config.attachments,
        lambda: engine,
        pool,
        sink,
        notices.append,
        uploader_refused=lambda *told: uploaders.append(told),
    )
    app.add_routes(media.routes())
    app.add_routes(Gate(BASE, GATE_TOKEN, lambda: engine, sink).routes())  # the catch-all
    try:
        async with TestClient(TestServer(app)) as client:
            yield Rig(client, store, notices, uploaders)
    finally:
        task.cancel()
        await store.close()


@pytest.fixture
async def rig(tmp_path: Path, pool: ExtractionPool) -> AsyncIterator[Rig]:
    async with gate_rig(tmp_path, pool) as r:
        yield r


def headers(data: bytes, **extra: str) -> dict[str, str]:
    out = {
        "Authorization": f"Bearer {GATE_TOKEN}",
        "Content-Type": "application/octet-stream",
        "X-Bridge-Media-Kind": "upload",
        "X-Bridge-Media-Id": "AbCdEf123",
        "X-Bridge-Media-Length": str(len(data)),
    }
    out.update(extra)
    return out


async def post(rig: Rig, data: bytes, **extra: str) -> tuple[int, Mapping[str, Any]]:
    r = await rig.client.post(URL, data=data, headers=headers(data, **extra))
    return r.status, await r.json()


async def media_records(store: Store) -> list[Mapping[str, Any]]:
    return [rec async for rec in store.reader.iter(kind="media")]


@pytest.mark.parametrize(
    "build",
    [
        lambda: d.pdf(f"card {CARD}"),
        lambda: d.docx(f"card {CARD}"),
        lambda: d.zip_of({"x/y.txt": f"card {CARD}".encode()}),
    ],
    ids=["pdf", "docx", "zip"],
)
async def test_a_file_holding_a_card_number_is_refused_and_audited(rig: Rig, build: Any) -> None:
    data = build()
    status, body = await post(rig, data)
    assert status == 403
    assert body["errcode"] == "M_FORBIDDEN" and "detector:card" in body["error"]
    assert CARD not in body["error"]
    [record] = await media_records(rig.store)  # committed before the answer
    assert record["data"]["outcome"] == "blocked"
    assert record["data"]["rule"] == "detector:card"
    assert record["data"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["data"]["size"] == len(data)
    assert CARD not in str(record)


async def test_a_harmless_file_passes_without_a_record(rig: Rig) -> None:
    status, body = await post(rig, d.pdf("quarterly minutes, nothing secret"))
    assert (status, body) == (200, {})
    assert await media_records(rig.store) == []


async def test_a_notify_rule_reaches_the_management_room_and_the_file_passes(rig: Rig) -> None:
    status, _ = await post(rig, d.docx("project Bluebird kickoff"))
    assert status == 200
    assert len(rig.notices) == 1 and "keyword:projects" in rig.notices[0]
    [record] = await media_records(rig.store)
    assert record["data"]["outcome"] == "allowed"


async def test_look_alikes_in_files_are_normalised(rig: Rig) -> None:
    status, _ = await post(rig, d.docx("card ４１１１ １１１１ １１１１ １１１１"))
    assert status == 403


async def test_a_zip_bomb_is_refused_on_its_bound(rig: Rig) -> None:
    status, body = await post(rig, d.ratio_bomb(100 * 1024 * 1024))
    assert status == 403 and "limits for reading files" in body["error"]
    [record] = await media_records(rig.store)
    assert record["data"]["unreadable"] == "limit"
    assert "expands more than" in record["data"]["detail"]


async def test_an_encrypted_pdf_follows_the_unreadable_rule(rig: Rig) -> None:
    status, body = await post(rig, d.encrypted_pdf("x"))
    assert status == 403 and "encrypted" in body["error"]


async def test_an_unknown_type_is_allowed_and_recorded(rig: Rig) -> None:
    status, _ = await post(rig, bytes(range(256)) * 8)
    assert status == 200
    [record] = await media_records(rig.store)
    assert (record["data"]["outcome"], record["data"]["unreadable"]) == (
        "unreadable_allowed",
        "unknown_type",
    )


async def test_over_limit_call_with_an_empty_body_is_too_large_and_allowed(rig: Rig) -> None:
    status, _ = await post(rig, b"", **{"X-Bridge-Media-Over-Limit": "1",
                                        "X-Bridge-Media-Length": "999999999"})  # fmt: skip
    assert status == 200
    [record] = await media_records(rig.store)
    assert record["data"]["unreadable"] == "too_large" and record["data"]["size"] == 999999999


async def test_an_over_limit_call_with_a_body_is_refused(rig: Rig) -> None:
    status, body = await post(rig, b"abc", **{"X-Bridge-Media-Over-Limit": "1"})
    assert status == 400 and body["errcode"] == "M_BAD_PARAM"


async def test_a_body_over_the_cap_is_not_read_past_it(rig: Rig) -> None:
    # 3 MB against a 2 MB cap (and a 1 MB aiohttp client_max_size): counted as too large.
    data = f"card {CARD} ".encode() * 200_000
    status, _ = await post(rig, data, **{"X-Bridge-Media-Length": "10"})  # a lying length
    assert status == 200  # too_large: allow (and record) by default
    [record] = await media_records(rig.store)
    assert record["data"]["unreadable"] == "too_large"


async def test_a_bad_token_is_refused_before_anything_is_read(rig: Rig) -> None:
    r = await rig.client.post(URL, data=b"x", headers=headers(b"x", Authorization="Bearer nope"))
    assert r.status == 403 and (await r.json())["error"] == "invalid gate token"
    r = await rig.client.post(URL, data=b"x", headers={"X-Bridge-Media-Kind": "upload"})
    assert r.status == 403


@pytest.mark.parametrize(
    "bad",
    [
        {"X-Bridge-Media-Kind": "avatar"},
        {"X-Bridge-Media-Id": "../../etc"},
        {"X-Bridge-Media-Length": "-1"},
        {"X-Bridge-Media-Length": "1e6"},
        {"X-Bridge-Media-Over-Limit": "yes"},
    ],
)
async def test_malformed_headers_are_refused(rig: Rig, bad: dict[str, str]) -> None:
    status, body = await post(rig, b"hello", **bad)
    assert status == 400 and body["errcode"] == "M_BAD_PARAM"


async def test_thumbnails_are_not_read(rig: Rig) -> None:
    status, _ = await post(rig, f"card {CARD}".encode(), **{"X-Bridge-Media-Kind": "thumbnail"})
    assert status == 200


async def test_images_pass_without_an_extraction_process(
    rig: Rig, pool: ExtractionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unused(data: bytes, limits: object) -> object:
        raise AssertionError("the extraction pool was asked")

    monkeypatch.setattr(pool, "extract", unused)
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 1024
    status, body = await post(rig, png)
    assert (status, body) == (200, {})
    # A file that may carry text still goes to the pool (here: the stub above refuses).
    r = await rig.client.post(URL, data=d.pdf("x"), headers=headers(d.pdf("x")))
    assert r.status == 500


# --- the file named by its path in a shared media store (module: media_delivery: path) ----

SYNAPSE_STORE = "/var/lib/synapse/media_store"


@dataclass
class SharedRig:
    rig: Rig
    store_dir: Path  # the store as this process sees it (Synapse calls it SYNAPSE_STORE)

    def put(self, relative: str, data: bytes) -> str:
        """Write a file into the store; the path Synapse would report for it."""
        target = self.store_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return f"{SYNAPSE_STORE}/{relative}"


@pytest.fixture
async def shared(tmp_path: Path, pool: ExtractionPool) -> AsyncIterator[SharedRig]:
    store_dir = tmp_path / "mounted-store"
    store_dir.mkdir()
    option = {"shared_media_store": {"synapse_path": SYNAPSE_STORE, "path": str(store_dir)}}
    async with gate_rig(tmp_path, pool, option) as r:
        yield SharedRig(r, store_dir)


async def post_path(rig: Rig, path: str, body: bytes = b"", **extra: str) -> tuple[int, Any]:
    hdrs = headers(b"", **{"X-Bridge-Media-Path": quote(path), **extra})
    r = await rig.client.post(URL, data=body, headers=hdrs)
    return r.status, await r.json()


async def test_a_file_named_by_path_is_read_from_the_shared_store_and_judged(
    shared: SharedRig,
) -> None:
    data = d.pdf(f"card {CARD}")
    status, body = await post_path(shared.rig, shared.put("local_content/ab/cd/efgh", data))
    assert status == 403 and "detector:card" in body["error"]
    [record] = await media_records(shared.rig.store)
    assert record["data"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["data"]["size"] == len(data) == record["data"]["declared_length"]
    harmless = shared.put("local_content/ab/cd/ijkl", d.pdf("nothing to see"))
    assert await post_path(shared.rig, harmless) == (200, {})


async def test_a_larger_stored_file_is_read_by_the_workers_through_its_descriptor(
    shared: SharedRig,
) -> None:
    pages = [f"page {i}: " + "minutes of the meeting " * 40 for i in range(40)]
    data = d.pdf(*pages, f"card {CARD}")
    assert len(data) > 4096  # more than the head read in the bridge's process
    status, body = await post_path(shared.rig, shared.put("local_content/long", data))
    assert status == 403 and "detector:card" in body["error"]
    [record] = await media_records(shared.rig.store)
    assert record["data"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["data"]["size"] == len(data)


async def test_a_path_with_characters_to_encode_is_found(shared: SharedRig) -> None:
    status, _ = await post_path(shared.rig, shared.put("dir with spaces/é%/x", d.docx(CARD)))
    assert status == 403


@pytest.mark.parametrize(
    "reported",
    [
        "/etc/passwd",
        f"{SYNAPSE_STORE}/../../../etc/passwd",
        f"{SYNAPSE_STORE}/local_content/../../secret",
        f"{SYNAPSE_STORE}",
        f"{SYNAPSE_STORE}-other/x",
        "local_content/ab/cd/efgh",
        f"{SYNAPSE_STORE}/missing/file",
        f"{SYNAPSE_STORE}/local_content/ab\x00/x",
    ],
    ids=[
        "other-root",
        "dotdot",
        "inner-dotdot",
        "the-root",
        "sibling",
        "relative",
        "missing",
        "nul",
    ],
)
async def test_paths_that_do_not_name_a_file_in_the_store_make_the_module_send_the_bytes(
    shared: SharedRig, reported: str
) -> None:
    shared.put("local_content/ab/cd/efgh", d.pdf(f"card {CARD}"))
    (shared.store_dir.parent / "secret").write_bytes(d.pdf(f"card {CARD}"))
    status, body = await post_path(shared.rig, reported)
    assert status == 409 and body["errcode"] == "BRIDGE_MEDIA_PATH_UNREADABLE"
    assert await media_records(shared.rig.store) == []


async def test_a_symlink_or_a_fifo_in_the_store_is_not_followed_or_read(
    shared: SharedRig, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.pdf"
    outside.write_bytes(d.pdf(f"card {CARD}"))
    link = shared.store_dir / "local_content" / "link"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    fifo = shared.store_dir / "local_content" / "fifo"
    os.mkfifo(fifo)
    for name in ("link", "fifo"):  # a FIFO must not block the gate: answered at once
        status, body = await post_path(shared.rig, f"{SYNAPSE_STORE}/local_content/{name}")
        assert status == 409 and body["errcode"] == "BRIDGE_MEDIA_PATH_UNREADABLE", name


async def test_without_a_shared_store_a_path_call_asks_for_the_bytes(rig: Rig) -> None:
    status, body = await post_path(rig, f"{SYNAPSE_STORE}/local_content/ab/cd/efgh")
    assert status == 409 and body["errcode"] == "BRIDGE_MEDIA_PATH_UNREADABLE"
    assert "shared_media_store" in body["error"]


async def test_a_path_call_with_a_body_or_a_bad_header_is_refused(shared: SharedRig) -> None:
    path = shared.put("local_content/x", d.pdf("fine"))
    status, body = await post_path(shared.rig, path, body=b"%PDF-")
    assert status == 400 and body["errcode"] == "M_BAD_PARAM"
    r = await shared.rig.client.post(
        URL, data=b"", headers=headers(b"", **{"X-Bridge-Media-Path": ""})
    )
    assert r.status == 400


async def test_a_stored_file_over_the_cap_is_too_large_without_being_read(
    shared: SharedRig,
) -> None:
    big = b"%PDF-1.4\n" + b"x" * (2 * 1024 * 1024 + 1)
    status, _ = await post_path(shared.rig, shared.put("local_content/big", big))
    assert status == 200  # too_large: allow (the default rule), and recorded
    [record] = await media_records(shared.rig.store)
    assert record["data"]["unreadable"] == "too_large"
    assert record["data"]["size"] == len(big) and record["data"]["sha256"] == ""


async def test_a_large_image_in_the_store_is_judged_from_its_head(shared: SharedRig) -> None:
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(1024 * 1024)
    status, _ = await post_path(shared.rig, shared.put("local_content/photo", png))
    assert status == 200
    assert await media_records(shared.rig.store) == []


async def test_the_uploader_named_by_the_module_is_told_with_the_records_reference(
    rig: Rig,
) -> None:
    data = d.pdf(f"card {CARD}")
    status, _ = await post(rig, data, **{"X-Bridge-Media-User": "@alice:corp.example"})
    assert status == 403
    [(user, ref, finding, label)] = rig.uploaders
    assert user == "@alice:corp.example" and finding.rule == "detector:card"
    assert len(data) < 1024 and label == f"PDF, {len(data)} bytes"  # type and size, no name
    [record] = await media_records(rig.store)
    assert record["data"]["ref"] == ref and record["sender"] == "@alice:corp.example"
    # Allowed files, and refusals without a user, tell nobody.
    await post(rig, d.pdf("harmless"), **{"X-Bridge-Media-User": "@alice:corp.example"})
    await post(rig, d.docx(f"card {CARD}"))
    remote = {"X-Bridge-Media-User": "@alice:corp.example", "X-Bridge-Media-Kind": "remote"}
    assert (await post(rig, d.docx(f"card {CARD}"), **remote))[0] == 403
    assert len(rig.uploaders) == 1


def test_file_labels_name_the_type_and_size_only() -> None:
    assert file_label(FileType.DOCX, 5 * 1024 * 1024 + 1) == "DOCX, 5.0 MiB"
    assert file_label(FileType.ZIP, 2048) == "ZIP, 2 KiB"
    assert file_label(FileType.UNKNOWN, 10) == "file, 10 bytes"


@pytest.mark.parametrize("user", ["alice", "@alice", "@:x", "@a b:x", "@" + "a" * 300 + ":x"])
async def test_a_malformed_uploader_is_refused(rig: Rig, user: str) -> None:
    status, body = await post(rig, d.pdf("x"), **{"X-Bridge-Media-User": user})
    assert status == 400 and "X-Bridge-Media-User" in body["error"]


def name(text: str) -> dict[str, str]:
    return {"X-Bridge-Media-Name": quote(text, safe="")}


async def test_an_uploads_file_name_is_judged_with_its_content(rig: Rig) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(5000)  # not read: only its name can hold text
    status, body = await post(rig, png, **name(f"receipt {CARD}.png"))
    assert status == 403 and "detector:card" in body["error"]
    status, _ = await post(rig, d.pdf("minutes"), **name("bluebird-kickoff.pdf"))
    assert status == 200 and "keyword:projects" in rig.notices[-1]  # notify only
    assert await post(rig, d.pdf("minutes"), **name("minutes.pdf")) == (200, {})
    records = await media_records(rig.store)
    assert all(CARD not in str(r) for r in records)  # masked, never the name itself


async def test_a_name_the_module_had_to_cut_follows_the_limit_rule(rig: Rig) -> None:
    cut = {**name("a" * 100), "X-Bridge-Media-Name-Truncated": "1"}
    status, body = await post(rig, d.pdf("minutes"), **cut)
    assert status == 403 and "exceeds the limits" in body["error"]
    bad = {"X-Bridge-Media-Name": "caf\u00e9"}
    assert (await post(rig, b"x", **bad))[0] == 400


async def test_a_photo_with_an_archive_appended_is_read_in_both_deliveries(
    shared: SharedRig,
) -> None:
    hidden = d.zip_of({"card.txt": f"card {CARD}".encode()})
    polyglot = b"\x89PNG\r\n\x1a\n" + bytes(50_000) + hidden
    status, body = await post(shared.rig, polyglot)
    assert status == 403 and "detector:card" in body["error"]
    status, body = await post_path(shared.rig, shared.put("local_content/poly", polyglot))
    assert status == 403 and "detector:card" in body["error"]
