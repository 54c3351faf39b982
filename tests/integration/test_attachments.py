"""Attachments through a real Synapse with the project's module loaded (issue 12, items 4
and 5): uploads judged before Synapse stores them, files judged again in their room.

One stack of its own (the attachment settings differ from the shared stack's): the card
detector blocks globally; the gate reads at most 1 MiB and the module streams at most
2 MiB (larger files are announced without their bytes); files too large to read are
REFUSED here (the default allows them) so the test can tell the rule was followed.

Synapse 1.163 answers a refused upload with 400 ``M_UNKNOWN`` "Bad content" whatever the
module returns (``upload_resource.py`` replaces the refusal; the rule's message cannot reach
the uploader through Synapse): the tests check that answer and the audit record, which
names the rule and the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import User, accept_invites
from helpers import bot_notices, bot_replies, notice_invite, sync_token
from matrix_client import MatrixError, MatrixTestClient, wait_for
from synapse_fixtures import require_synapse

from bridge.attachments.pool import SPLIT_MIN_BYTES
from bridge.dev.devstack import BridgeProcess, DevStack, prepare_stack
from tests.kit import documents as d

pytestmark = pytest.mark.integration

CARD = "4111 1111 1111 1111"
ADMIN = "@admin:localhost"
MIB = 1024 * 1024


@dataclass
class MediaStack:
    dev: DevStack
    bridge: BridgeProcess
    admin: User

    @property
    def bot(self) -> str:
        return f"@policybot:{self.dev.server_name}"

    def client(self, user: User) -> MatrixTestClient:
        return MatrixTestClient(self.dev.synapse.url, user.user_id, user.token)

    def new_user(self, localpart: str) -> User:
        return User(*self.dev.synapse.register_user(localpart))

    def media_records(self) -> list[dict[str, Any]]:
        """The ``media`` audit records, decrypted by the audit CLI."""
        out = subprocess.run(
            [sys.executable, "-m", "bridge", "audit", "search", "-c", str(self.dev.config_path),
             "--type", "media", "--limit", "0", "--json", "--actor", "test"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return [r.get("data", r) for r in records]

    async def metric(self, name: str, **labels: str) -> float:
        """One sample of the bridge's /metrics (0 when absent)."""
        url = f"http://127.0.0.1:{self.dev.bridge_port}/metrics"
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            text = await r.text()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(name + "{"):
                head, _, value = line.rpartition(" ")
                got = ",".join(sorted(head[len(name) + 1 : -1].split(",")))
                if got == want:
                    return float(value)
        return 0.0


@pytest.fixture(scope="module")
def media_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MediaStack]:
    require_synapse(antispam=True)
    workdir = tmp_path_factory.mktemp("media-stack")
    dev = prepare_stack(
        workdir,
        permissions={ADMIN: "admin"},
        bridge_options={
            "dlp": {"detectors": {"card": ["block", "notify"]}},
            "attachments": {"max_file_mb": 1, "unreadable": {"too_large": "refuse"}},
        },
        module_options={"media_max_bytes": 2 * MIB},
    )
    dev.synapse.start()
    admin = User(*dev.synapse.register_user("admin", "admin-pw", admin=True))
    bridge = BridgeProcess(dev.config_path, workdir / "bridge.log", dev.bridge_port)
    try:
        bridge.start()
        yield MediaStack(dev, bridge, admin)
    finally:
        bridge.stop()
        dev.synapse.stop()


@pytest.fixture(scope="module")
async def management_room(media_stack: MediaStack) -> str:
    async with media_stack.client(media_stack.admin) as admin:
        [room] = await accept_invites(admin)
    return room


async def upload(client: MatrixTestClient, data: bytes, name: str, ctype: str) -> str:
    """``POST /_matrix/media/v3/upload``: the mxc URI, or :class:`MatrixError`."""
    url = f"{client.base_url}/_matrix/media/v3/upload"
    headers = {"Authorization": f"Bearer {client.access_token}", "Content-Type": ctype}
    async with client.session.post(url, data=data, params={"filename": name}, headers=headers) as r:
        body = await r.json(content_type=None)
        if r.status >= 300:
            raise MatrixError(r.status, body.get("errcode"), str(body.get("error", "")), body)
        return str(body["content_uri"])


async def refused(client: MatrixTestClient, data: bytes, name: str, ctype: str) -> MatrixError:
    with pytest.raises(MatrixError) as exc:
        await upload(client, data, name, ctype)
    return exc.value


def newest(stack: MediaStack, **match: Any) -> dict[str, Any]:
    """The newest media record whose fields equal ``match``."""
    found = [r for r in stack.media_records() if all(r.get(k) == v for k, v in match.items())]
    assert found, f"no media record with {match}"
    return found[-1]


ADD_KEYWORD = "!policy dlp add-keyword pelicanbrief --scope here --action block,notify"
PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
ZIP = "application/zip"


async def test_documents_holding_a_card_number_are_refused_at_upload(
    media_stack: MediaStack, management_room: str
) -> None:
    user = media_stack.new_user("uploader")
    files = {
        "invoice.pdf": (d.pdf("Invoice", f"pay with {CARD} by friday"), PDF, "pdf"),
        "memo.docx": (d.docx("memo", f"the card is {CARD}"), DOCX, "docx"),
        "bundle.zip": (d.zip_of({"notes/card.txt": f"card {CARD}\n".encode()}), ZIP, "zip"),
    }
    async with media_stack.client(user) as u:
        for name, (data, ctype, ftype) in files.items():
            err = await refused(u, data, name, ctype)
            # Synapse's own answer to any refused upload (the rule's text is not passed on).
            assert (err.status, err.errcode, err.error) == (400, "M_UNKNOWN", "Bad content"), name
            record = newest(media_stack, path="gate", file_type=ftype)
            assert record["outcome"] == "blocked" and record["rule"] == "detector:card"
            assert record["media_kind"] == "upload" and record["size"] == len(data)
            assert CARD not in json.dumps(record)  # masked excerpt only
        # A harmless PDF passes and can be downloaded again.
        plain = d.pdf("Lunch menu", "soup of the day: lentils")
        mxc = await upload(u, plain, "menu.pdf", PDF)
        server, media_id = mxc.removeprefix("mxc://").split("/")
        got = await u.session.get(
            f"{u.base_url}/_matrix/client/v1/media/download/{server}/{media_id}",
            headers={"Authorization": f"Bearer {u.access_token}"},
        )
        assert got.status == 200 and await got.read() == plain
    # notify: the management room hears of the refusals (masked, with the digest).
    async with media_stack.client(media_stack.admin) as admin:

        async def notices() -> list[str] | None:
            bodies = [
                str(e.get("content", {}).get("body", ""))
                for e in await admin.messages(management_room, limit=50)
                if e.get("sender") == media_stack.bot
            ]
            hits = [b for b in bodies if "detector:card blocked an upload" in b]
            return hits if len(hits) >= 3 else None

        lines = await wait_for(notices, timeout=30, message="three upload notices")
        assert all(CARD not in line and "sha256" in line for line in lines)


async def test_a_tar_gz_holding_a_card_number_is_refused_at_upload(
    media_stack: MediaStack,
) -> None:
    user = media_stack.new_user("tarball")
    data = d.gz(d.tar_of({"dump/notes.txt": f"card {CARD}\n".encode()}))
    async with media_stack.client(user) as u:
        err = await refused(u, data, "secrets.tar.gz", "application/gzip")
        assert err.status == 400
    record = newest(media_stack, path="gate", file_type="gzip", size=len(data))
    assert record["outcome"] == "blocked" and record["rule"] == "detector:card"
    assert CARD not in json.dumps(record)
    # A 7z cannot be read: refused by default like an encrypted file (unread_archive).
    seven = b"7z\xbc\xaf\x27\x1c" + os.urandom(4096)
    async with media_stack.client(user) as u:
        err = await refused(u, seven, "secrets.7z", "application/x-7z-compressed")
        assert err.status == 400
    record = newest(media_stack, path="gate", size=len(seven))
    assert record["outcome"] == "unreadable_refused" and record["unreadable"] == "unread_archive"


async def test_the_uploader_is_told_why_in_a_policy_notice(media_stack: MediaStack) -> None:
    """Synapse answers a refused upload with "Bad content" only: the bot tells the uploader
    (named to the gate by the module) which rule refused it, in their notice room."""
    user = media_stack.new_user("toldwhy")
    async with media_stack.client(user) as u:
        since = await sync_token(u)
        data = d.docx("quarterly memo", f"the card is {CARD}")
        err = await refused(u, data, "memo.docx", DOCX)
        assert (err.status, err.error) == (400, "Bad content")
        room, _ = await notice_invite(u, media_stack.bot, since)
        await u.join(room)

        async def notices() -> list[dict[str, Any]] | None:
            return await bot_notices(u, room, media_stack.bot) or None

        [notice] = await wait_for(notices, timeout=30, message="the upload notice")
    body = notice["content"]["body"]
    assert f"Your upload (DOCX, {len(data) // 1024} KiB) was not stored (reference" in body
    assert "Rule: detector:card" in body and "upload it again" in body
    assert CARD not in body and "1111" not in json.dumps(notice["content"])
    ref = body.split("(reference ", 1)[1].split(")", 1)[0]
    record = newest(media_stack, path="gate", file_type="docx")
    assert record["ref"] == ref  # the audit record of the refusal names the same reference


async def test_a_long_pdf_read_in_parts_is_refused_for_a_card_on_its_last_page(
    media_stack: MediaStack,
) -> None:
    # Long enough that the bridge's two extraction workers, idle here, each read half of
    # its pages (bridge/attachments/pool.py); the card is on the last one.
    pages = [f"page {i}: " + "minutes of the meeting " * 40 for i in range(300)]
    data = d.pdf(*pages, f"pay with {CARD} by friday", info_title="Long minutes")
    assert SPLIT_MIN_BYTES <= len(data) <= MIB
    async with media_stack.client(media_stack.new_user("longreader")) as u:
        err = await refused(u, data, "minutes.pdf", PDF)
        assert (err.status, err.errcode) == (400, "M_UNKNOWN")
    record = newest(media_stack, path="gate", file_type="pdf", size=len(data))
    assert record["outcome"] == "blocked" and record["rule"] == "detector:card"
    assert record["unreadable"] is None


async def test_a_file_name_and_the_two_step_upload_are_judged_too(media_stack: MediaStack) -> None:
    """The file name Synapse stores with an upload is text the user chose; and the
    create-then-PUT upload (``POST /_matrix/media/v1/create``, then ``PUT
    /_matrix/media/v3/upload/{server}/{id}``) goes through the same check."""
    user = media_stack.new_user("namer")
    async with media_stack.client(user) as u:
        err = await refused(u, d.pdf("Lunch menu"), f"receipt {CARD}.pdf", PDF)
        assert (err.status, err.error) == (400, "Bad content")
        assert newest(media_stack, path="gate", media_kind="upload")["rule"] == "detector:card"
        headers = {"Authorization": f"Bearer {u.access_token}"}
        async with u.session.post(f"{u.base_url}/_matrix/media/v1/create", headers=headers) as r:
            assert r.status == 200
            server, media_id = (await r.json())["content_uri"].removeprefix("mxc://").split("/")
        data = d.docx("memo", f"the card is {CARD}")
        async with u.session.put(
            f"{u.base_url}/_matrix/media/v3/upload/{server}/{media_id}",
            data=data,
            params={"filename": "memo.docx"},
            headers={**headers, "Content-Type": DOCX},
        ) as r:
            assert r.status == 400, await r.text()
        record = newest(media_stack, path="gate", media_id=media_id)
        assert record["rule"] == "detector:card" and record["size"] == len(data)


def _peak_rss(pid: int) -> int:
    """Peak resident set size (bytes) of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


async def test_a_zip_bomb_is_refused_on_its_bound_with_memory_bounded(
    media_stack: MediaStack,
) -> None:
    proc = media_stack.bridge.proc
    assert proc is not None
    bomb = d.ratio_bomb(200 * MIB)  # ~200 KiB file, 200 MiB inflated
    before = _peak_rss(proc.pid)
    user = media_stack.new_user("bomber")
    async with media_stack.client(user) as u:
        err = await refused(u, bomb, "holiday.zip", ZIP)
    assert err.status == 400
    record = newest(media_stack, path="gate", size=len(bomb))
    assert record["outcome"] == "unreadable_refused" and record["unreadable"] == "limit"
    assert "expands more than 100 times" in record["detail"]  # the ratio bound
    # The bridge itself never held the inflated bytes; its extraction processes stay far
    # below what unpacking would need (each is capped by RLIMIT_AS as well).
    assert _peak_rss(proc.pid) - before < 50 * MIB
    workers = _children(proc.pid)
    assert workers
    assert all(_peak_rss(w) < 100 * MIB for w in workers), [_peak_rss(w) for w in workers]


async def test_files_over_the_size_limits_follow_the_unreadable_rule(
    media_stack: MediaStack,
) -> None:
    user = media_stack.new_user("bigfiles")
    # Over the gate's 1 MiB (streamed by the module, not read past the cap), and over the
    # module's 2 MiB (announced without its bytes): too_large, refused by this config.
    streamed = os.urandom(MIB + 4096)
    announced = os.urandom(2 * MIB + 4096)
    async with media_stack.client(user) as u:
        for data in (streamed, announced):
            err = await refused(u, data, "big.bin", "application/octet-stream")
            assert err.status == 400
            record = newest(media_stack, path="gate", declared_length=len(data))
            assert record["outcome"] == "unreadable_refused"
            assert record["unreadable"] == "too_large"
        # Under the limits, an unknown type is allowed (the rule for unknown_type).
        await upload(u, os.urandom(4096), "small.bin", "application/octet-stream")


async def test_room_rules_judge_a_posted_file_which_is_read_once_for_two_rooms(
    media_stack: MediaStack, management_room: str
) -> None:
    user = media_stack.new_user("forwarder")
    stack = media_stack
    secret = "the pelicanbrief budget is final"
    async with stack.client(user) as u, stack.client(stack.admin) as admin:
        rooms = []
        for name in ("quarterly", "board"):
            room = await u.create_room(
                name=name,
                invite=[stack.bot, ADMIN],
                power_level_content_override={"users": {stack.bot: 50}},
            )
            await admin.join(room)

            async def bot_in(room: str = room) -> bool:
                return stack.bot in await u.joined_members(room)

            await wait_for(bot_in, timeout=20, message="bot joined")
            cmd = await admin.send_text(room, ADD_KEYWORD)
            [reply] = await bot_replies(admin, room, stack.bot, cmd)
            assert "keyword added" in str(reply["content"]["body"])
            rooms.append(room)
        # Harmless at upload: the keyword is a room rule, uploads are judged globally.
        mxc = await upload(u, d.pdf("Budget", secret), "budget.pdf", PDF)
        misses = await stack.metric("bridge_media_cache_total", result="miss")
        hits = await stack.metric("bridge_media_cache_total", result="hit")
        content = {"msgtype": "m.file", "body": "budget.pdf", "url": mxc}
        posted = [await u.send_event(room, "m.room.message", content) for room in rooms]
        for room, event_id in zip(rooms, posted, strict=True):

            async def gone(room: str = room, event_id: str = event_id) -> bool:
                event = await u.get_event(room, event_id)
                return "url" not in event.get("content", {})

            await wait_for(gone, timeout=45, message=f"the file redacted in {room}")
        # The management room is told (rule, sender, room; never the text).
        body = await wait_for(
            lambda: _notice(admin, management_room, stack.bot, rooms[0]),
            timeout=30,
            message="the management notice",
        )
        assert "keyword:admin-" in body and user.user_id in body and "pelicanbrief" not in body
    # Fetched and read once: one miss, one hit from the cache for the second room.
    assert await stack.metric("bridge_media_cache_total", result="miss") - misses == 1
    assert await stack.metric("bridge_media_cache_total", result="hit") - hits == 1
    records = [r for r in stack.media_records() if r.get("path") == "room"]
    assert {r["event_id"] for r in records} >= set(posted)
    assert all(r["outcome"] == "blocked" and "redact" in r["actions"] for r in records)


async def test_a_thumbnail_that_is_really_a_document_is_judged_by_the_room(
    media_stack: MediaStack,
) -> None:
    """A client uploads a thumbnail as a file of its own; any file can stand in for it."""
    user = media_stack.new_user("thumbnailer")
    stack = media_stack
    async with stack.client(user) as u, stack.client(stack.admin) as admin:
        room = await u.create_room(
            name="thumbs",
            invite=[stack.bot, ADMIN],
            power_level_content_override={"users": {stack.bot: 50}},
        )
        await admin.join(room)

        async def bot_in() -> bool:
            return stack.bot in await u.joined_members(room)

        await wait_for(bot_in, timeout=20, message="bot joined")
        cmd = await admin.send_text(room, ADD_KEYWORD)
        [reply] = await bot_replies(admin, room, stack.bot, cmd)
        assert "keyword added" in str(reply["content"]["body"])
        photo = await upload(u, b"\x89PNG\r\n\x1a\n" + os.urandom(2048), "p.png", "image/png")
        thumb = await upload(u, d.pdf("notes", "the pelicanbrief plan"), "t.png", "image/png")
        content = {
            "msgtype": "m.image",
            "body": "holiday.png",
            "url": photo,
            "info": {"mimetype": "image/png", "thumbnail_url": thumb},
        }
        event_id = await u.send_event(room, "m.room.message", content)

        async def gone() -> bool:
            event = await u.get_event(room, event_id)
            return "url" not in event.get("content", {})

        await wait_for(gone, timeout=45, message="the image with its document thumbnail redacted")


async def _notice(admin: MatrixTestClient, room: str, bot: str, needle: str) -> str | None:
    for e in await admin.messages(room, limit=50):
        body = str(e.get("content", {}).get("body", ""))
        if e.get("sender") == bot and needle in body and "a file from" in body:
            return body
    return None


def test_synapse_logs_hold_none_of_the_files_text(media_stack: MediaStack) -> None:
    # Runs after the tests above (file order): none of their files' text is in any log.
    synapse_log = media_stack.dev.synapse.log_path.read_text("utf-8", "replace")
    assert "Blocking media due to spam checker" in synapse_log  # the uploads are in this log
    logs = [media_stack.dev.synapse.log_path, media_stack.dev.synapse.output_path]
    logs.append(media_stack.dev.workdir / "bridge.log")
    for path in logs:
        text = path.read_text("utf-8", "replace")
        for needle in (CARD, "4111111111111111", "pelicanbrief budget", "soup of the day"):
            assert needle not in text, (path.name, needle)


# --- the module names the file, the bridge reads Synapse's media store (shared_media) -----


@dataclass
class SharedStack:
    stack: MediaStack
    view: Path  # the bridge's view of the store: a symbolic link the test can re-point
    store: Path  # Synapse's media_store_path


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedStack]:
    """Synapse's module set to ``media_delivery: path``; the bridge reads the media store
    through a link (``attachments.shared_media_store.path``), as a container would through a
    read-only mount."""
    require_synapse(antispam=True)
    workdir = tmp_path_factory.mktemp("shared-media")
    store = workdir / "synapse" / "media_store"
    view = workdir / "bridge-view-of-media"
    dev = prepare_stack(
        workdir,
        permissions={ADMIN: "admin"},
        bridge_options={
            "dlp": {"detectors": {"card": ["block"]}},
            "attachments": {
                "max_file_mb": 1,
                "unreadable": {"too_large": "refuse"},
                "shared_media_store": {"synapse_path": str(store), "path": str(view)},
            },
        },
        shared_media=True,
    )
    dev.synapse.start()
    view.symlink_to(store)
    admin = User(*dev.synapse.register_user("admin", "admin-pw", admin=True))
    bridge = BridgeProcess(dev.config_path, workdir / "bridge.log", dev.bridge_port)
    try:
        bridge.start()
        yield SharedStack(MediaStack(dev, bridge, admin), view, store)
    finally:
        bridge.stop()
        dev.synapse.stop()


FALLBACK = "sending the file's bytes"


async def test_uploads_named_by_path_are_read_from_the_media_store_and_judged(
    shared_stack: SharedStack,
) -> None:
    stack = shared_stack.stack
    user = stack.new_user("byname")
    async with stack.client(user) as u:
        for name, data, ctype, ftype in (
            ("invoice.pdf", d.pdf("Invoice", f"pay with {CARD}"), PDF, "pdf"),
            ("memo.docx", d.docx("memo", f"card {CARD}"), DOCX, "docx"),
            ("bundle.zip", d.zip_of({"a/card.txt": CARD.encode()}), ZIP, "zip"),
            # Larger than the head the bridge reads itself: its workers read it by descriptor.
            ("minutes.pdf", d.pdf(*["minutes " * 300] * 30, f"card {CARD}"), PDF, "pdf"),
        ):
            err = await refused(u, data, name, ctype)
            assert err.status == 400, name
            record = newest(stack, path="gate", file_type=ftype)
            assert record["rule"] == "detector:card" and record["size"] == len(data)
            assert record["declared_length"] == len(data)
        plain = d.pdf("Lunch menu", "soup of the day: lentils")
        mxc = await upload(u, plain, "menu.pdf", PDF)
        assert mxc.startswith("mxc://")
        # Over the bridge's 1 MiB: not read, too_large (refused by this config).
        err = await refused(u, os.urandom(MIB + 1), "big.bin", "application/octet-stream")
        assert newest(stack, path="gate", size=MIB + 1)["unreadable"] == "too_large"
    # Every file went by name: the module never had to send bytes.
    assert FALLBACK not in stack.dev.synapse.log_path.read_text("utf-8")
    assert "not read from the shared media store" not in stack.bridge.log_path.read_text("utf-8")


async def test_when_the_bridge_cannot_read_the_store_the_module_sends_the_bytes(
    shared_stack: SharedStack, tmp_path: Path
) -> None:
    stack = shared_stack.stack
    empty = tmp_path / "empty"
    empty.mkdir()
    shared_stack.view.unlink()
    shared_stack.view.symlink_to(empty)  # the mount is gone: nothing under the store path
    try:
        user = stack.new_user("nomount")
        async with stack.client(user) as u:
            data = d.pdf("Invoice", f"pay with {CARD}")
            err = await refused(u, data, "invoice.pdf", PDF)
            assert err.status == 400
            assert newest(stack, path="gate", size=len(data))["rule"] == "detector:card"
            await upload(u, d.pdf("Lunch", "lentils"), "menu.pdf", PDF)
    finally:
        shared_stack.view.unlink()
        shared_stack.view.symlink_to(shared_stack.store)
    assert FALLBACK in stack.dev.synapse.log_path.read_text("utf-8")
    bridge_log = stack.bridge.log_path.read_text("utf-8")
    assert "not read from the shared media store (no such file" in bridge_log
    assert CARD not in bridge_log
