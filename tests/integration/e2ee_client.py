"""A real end-to-end encrypted Matrix user for the tests: mautrix ``Client`` + ``OlmMachine``
(python-olm) with a memory crypto store, its own device (password login) and a to-device
sync loop. It encrypts what it sends and decrypts what it reads, like any E2EE client."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, cast

import aiohttp
from mautrix.api import HTTPAPI, MediaPath, Method, Path
from mautrix.client import Client
from mautrix.crypto import OlmMachine
from mautrix.crypto.attachments import encrypt_attachment
from mautrix.crypto.store import MemoryCryptoStore, StateStore
from mautrix.types import (
    JSON,
    CrossSigningUsage,
    DeviceID,
    DeviceLists,
    DeviceOTKCount,
    EncryptedEvent,
    EventType,
    RoomEncryptionStateEventContent,
    RoomID,
    SigningKey,
    ToDeviceEvent,
    TOFUSigningKey,
    UserID,
)

FILTER = json.dumps({"room": {"rooms": []}, "presence": {"not_types": ["*"]}})


class CryptoStore(MemoryCryptoStore):
    """mautrix's memory store, whose update of a known cross-signing key fails (it assigns
    to a NamedTuple field): replace the entry instead."""

    async def put_cross_signing_key(
        self, user_id: UserID, usage: CrossSigningUsage, key: SigningKey
    ) -> None:
        current = self._cross_signing_keys.get(user_id, {}).get(usage)
        first = current.first if current is not None else key
        self._cross_signing_keys.setdefault(user_id, {})[usage] = TOFUSigningKey(
            key=key, first=first
        )


class Rooms(StateStore):
    """Encryption and members of the rooms this client sends in."""

    def __init__(self) -> None:
        self.members: dict[RoomID, set[UserID]] = {}

    async def is_encrypted(self, room_id: RoomID) -> bool:
        return True

    async def get_encryption_info(self, room_id: RoomID) -> RoomEncryptionStateEventContent:
        return RoomEncryptionStateEventContent.deserialize({"algorithm": "m.megolm.v1.aes-sha2"})

    async def find_shared_rooms(self, user_id: UserID) -> list[RoomID]:
        return [r for r, users in self.members.items() if user_id in users]


class E2EEUser:
    """One user with one real E2EE device."""

    def __init__(self, hs_url: str, user_id: str, password: str) -> None:
        self.hs_url = hs_url
        self.user_id = user_id
        self.password = password
        self.rooms = Rooms()
        self._sync: asyncio.Task[None] | None = None

    async def start(self) -> E2EEUser:
        self.session = aiohttp.ClientSession()
        login = HTTPAPI(self.hs_url, client_session=self.session)
        resp = await login.request(
            Method.POST,
            Path.v3.login,
            {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": self.user_id},
                "password": self.password,
            },
        )
        self.device_id = str(resp["device_id"])
        api = HTTPAPI(self.hs_url, str(resp["access_token"]), client_session=self.session)
        self.client = Client(mxid=UserID(self.user_id), device_id=DeviceID(self.device_id), api=api)
        self.store = CryptoStore(self.user_id, "test-pickle-key")
        self.machine = OlmMachine(self.client, self.store, self.rooms)
        await self.machine.load()
        await self.machine.share_keys()
        self._sync = asyncio.create_task(self._sync_loop())
        return self

    async def close(self) -> None:
        if self._sync is not None:
            self._sync.cancel()
            with contextlib.suppress(BaseException):
                await self._sync
        await self.session.close()

    async def _sync_loop(self) -> None:
        since = None
        while True:
            try:
                resp = await self.client.sync(
                    since=since, timeout=5000, filter_id=cast(Any, FILTER)
                )
            except Exception:
                await asyncio.sleep(0.5)
                continue
            for raw in (resp.get("to_device") or {}).get("events") or []:
                if raw.get("type") == "m.room.encrypted":
                    evt = ToDeviceEvent.deserialize(raw)
                    evt.type = EventType.TO_DEVICE_ENCRYPTED
                    with contextlib.suppress(Exception):
                        await self.machine.handle_to_device_event(evt)
            if resp.get("device_lists"):
                await self.machine.handle_device_lists(
                    DeviceLists.deserialize(resp["device_lists"])
                )
            if isinstance(resp.get("device_one_time_keys_count"), dict):
                await self.machine.handle_otk_count(
                    DeviceOTKCount.deserialize(resp["device_one_time_keys_count"])
                )
            since = resp["next_batch"]

    # -- rooms ----------------------------------------------------------------------------

    async def request(self, method: Method, path: Any, body: Any = None) -> Any:
        return await self.client.api.request(method, path, body)

    async def create_encrypted_room(
        self, invite: list[str], name: str = "secret", powers: dict[str, int] | None = None
    ) -> str:
        resp = await self.request(
            Method.POST,
            Path.v3.createRoom,
            {
                "preset": "private_chat",
                "name": name,
                "invite": invite,
                "power_level_content_override": {"users": dict(powers or {})},
                "initial_state": [
                    {
                        "type": "m.room.encryption",
                        "state_key": "",
                        "content": {"algorithm": "m.megolm.v1.aes-sha2"},
                    }
                ],
            },
        )
        return str(resp["room_id"])

    async def join(self, room_id: str) -> None:
        await self.request(Method.POST, Path.v3.join[room_id], {})

    async def members(self, room_id: str) -> list[UserID]:
        resp = await self.request(Method.GET, Path.v3.rooms[room_id].joined_members)
        users = {UserID(u) for u in resp["joined"]}
        self.rooms.members[RoomID(room_id)] = users
        return sorted(users)

    async def send_text(self, room_id: str, body: str, *, new_session: bool = False) -> str:
        """Encrypt and send a text message (sharing a room key first where needed)."""
        rid = RoomID(room_id)
        if new_session:
            await self.store.remove_outbound_group_session(rid)
        session = await self.store.get_outbound_group_session(rid)
        if session is None or not session.shared or session.expired:
            await self.machine.share_group_session(rid, await self.members(room_id))
        return await self.send_encrypted(room_id, body)

    async def send_encrypted(self, room_id: str, body: str) -> str:
        return await self.send_content(room_id, {"msgtype": "m.text", "body": body})

    async def send_content(self, room_id: str, message: dict[str, Any]) -> str:
        """Encrypt and send an ``m.room.message`` with ``message`` as its content (the
        room key must have been shared: :meth:`send_text` first)."""
        content = await self.machine.encrypt_megolm_event(
            RoomID(room_id), EventType.ROOM_MESSAGE, message
        )
        event_id = await self.client.send_message_event(
            RoomID(room_id), EventType.ROOM_ENCRYPTED, content
        )
        return str(event_id)

    async def send_file(self, room_id: str, data: bytes, name: str, mimetype: str) -> str:
        """Send ``data`` as an end-to-end encrypted attachment, as Element does: encrypted
        (AES-256-CTR), the ciphertext uploaded (``POST /_matrix/media/v3/upload``), an
        encrypted ``m.file`` message carrying ``content.file`` (url, key, iv, hashes)."""
        ciphertext, info = encrypt_attachment(data)
        resp = await self.client.api.request(
            Method.POST,
            MediaPath.v3.upload,
            ciphertext,
            headers={"Content-Type": "application/octet-stream"},
            query_params={"filename": name},
        )
        file = info.serialize()
        file["url"] = str(resp["content_uri"])
        message = {
            "msgtype": "m.file",
            "body": name,
            "info": {"mimetype": mimetype, "size": len(data)},
            "file": file,
        }
        return await self.send_content(room_id, message)

    async def encrypted_events(self, room_id: str, limit: int = 50) -> list[dict[str, Any]]:
        resp = await self.client.api.request(
            Method.GET,
            Path.v3.rooms[room_id].messages,
            query_params={"dir": "b", "limit": str(limit)},
        )
        return [e for e in resp["chunk"] if e.get("type") == "m.room.encrypted"]

    async def decrypt(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        """The decrypted event (type and content), or None without a key."""
        try:
            evt = EncryptedEvent.deserialize(cast(JSON, dict(raw)))
            dec = await self.machine.decrypt_megolm_event(evt)
        except Exception:
            return None
        return {
            "event_id": raw.get("event_id"),
            "sender": raw.get("sender"),
            "type": dec.type.t,
            "content": dec.content.serialize(),
        }

    async def read_decrypted(self, room_id: str) -> list[dict[str, Any]]:
        out = []
        for raw in await self.encrypted_events(room_id):
            dec = await self.decrypt(raw)
            if dec is not None:
                out.append(dec)
        return out
