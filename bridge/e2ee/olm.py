"""The :class:`~bridge.e2ee.seam.RoomCrypto` of the bridge: mautrix's ``OlmMachine``.

python-olm (libolm) does the cryptography: Olm sessions, Megolm inbound and outbound
sessions, device keys, one-time keys; mautrix's ``OlmMachine`` the protocol around it
(key sharing, device lists, trust). Its state lives in mautrix's crypto store
(``crypto_*`` tables) in the bridge's own database, pickles encrypted with a key derived
from the audit keyring (:mod:`bridge.e2ee.pickle_key`).

The bot's device is created once (appservice login, ``m.login.application_service``) and
its ID kept in the crypto store: later starts log in to the same device, so a restart never
adds a device. Synapse refuses ``/sync`` to an appservice's own user, so to-device
messages, device-list changes and one-time-key counts arrive in appservice transactions
(MSC2409, MSC3202; :meth:`OlmCrypto.receive`), handled before the transaction is answered:
a failure answers 503 and Synapse sends them again, so a room key is never lost.

The bot never shares room keys (it ignores key requests) and only ever forwards nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import ClientSession
from mautrix.api import HTTPAPI, Method, Path
from mautrix.client import Client
from mautrix.crypto import OlmMachine, PgCryptoStore
from mautrix.crypto.cross_signing_key import CrossSigningSeeds
from mautrix.crypto.store import StateStore
from mautrix.errors import (
    DecryptionError,
    DuplicateMessageIndex,
    EncryptionError,
    GroupSessionWithheldError,
    MatrixRequestError,
    SessionNotFound,
    VerificationError,
)
from mautrix.types import (
    JSON,
    DeviceID,
    DeviceLists,
    DeviceOTKCount,
    EncryptedEvent,
    EncryptedEventContent,
    EncryptedMegolmEventContent,
    EventID,
    EventType,
    IdentityKey,
    RoomEncryptionStateEventContent,
    RoomID,
    SessionID,
    ToDeviceEvent,
    TrustState,
    UserID,
)
from mautrix.util.async_db import Database as CryptoDatabase
from mautrix.util.logging import TraceLogger

from bridge.e2ee.seam import (
    ENCRYPTION_STATE,
    Decrypted,
    DecryptResult,
    NotDecrypted,
    Trust,
    Undecryptable,
)
from bridge.e2ee.store import BridgeCryptoStore

log = logging.getLogger(__name__)

MEGOLM = "m.megolm.v1.aes-sha2"
WITHHELD_TYPES = frozenset({"m.room_key.withheld", "org.matrix.room_key.withheld"})
#: Where Synapse puts the bot device's to-device messages (MSC2409), device-list changes
#: and one-time-key counts (MSC3202) in an appservice transaction.
TO_DEVICE_KEY = "de.sorunome.msc2409.to_device"
DEVICE_LISTS_KEY = "org.matrix.msc3202.device_lists"
OTK_COUNT_KEYS = (
    "org.matrix.msc3202.device_one_time_keys_count",
    "org.matrix.msc3202.device_one_time_key_counts",
)
CROSS_SIGNING_STATE_KEY = "e2ee_cross_signing_seeds"
MAX_WITHHELD = 10_000


class Secrets:
    """Where the cross-signing seeds are kept (the bridge's sealed state)."""

    def __init__(
        self,
        get: Callable[[str], Awaitable[str | None]],
        put: Callable[[str, str], Awaitable[None]],
    ) -> None:
        self.get = get
        self.put = put


@dataclass(frozen=True, slots=True)
class OlmSettings:
    """Everything :meth:`OlmCrypto.open` needs."""

    homeserver_url: str
    as_token: str
    bot_mxid: str
    crypto_db_url: str  # mautrix async_db URL: sqlite:///path or postgres://…
    pickle_key: str
    device_name: str


#: mautrix's OlmMachine logs a warning for every event from a sender without cross-signing
#: keys; each decrypted record holds the sender device's trust instead. Errors still show.
MACHINE_LOG = cast(TraceLogger, logging.getLogger("bridge.e2ee.olm.machine"))
MACHINE_LOG.setLevel(logging.ERROR)


async def open_crypto_db(url: str) -> CryptoDatabase:
    """mautrix's database for the crypto store (its ``crypto_*`` tables), started."""
    sqlite = url.startswith("sqlite")
    db = CryptoDatabase.create(
        url,
        upgrade_table=PgCryptoStore.upgrade_table,
        # a room key is acknowledged to Synapse once stored: as durable as the archive
        db_args={"init_commands": ["PRAGMA synchronous = FULL"]} if sqlite else None,
        log=cast(TraceLogger, logging.getLogger("bridge.e2ee.db")),
    )
    await db.start()
    return db


def crypto_db_url(sqlalchemy_url: str) -> str:
    """The bridge's SQLAlchemy URL as a mautrix ``async_db`` URL (same database)."""
    scheme, sep, rest = sqlalchemy_url.partition("://")
    if not sep:
        raise ValueError("not a database URL")
    base = scheme.split("+", 1)[0]
    if base == "sqlite":
        # SQLAlchemy: sqlite:///relative or sqlite:////absolute; async_db reads the URL's
        # path, so give it the absolute one (the same file, whatever the working directory)
        path = rest.removeprefix("/").partition("?")[0]
        return f"sqlite://{os.path.abspath(path)}"
    if base in ("postgresql", "postgres"):
        return f"postgres://{rest}"
    raise ValueError(f"unsupported database for the crypto store: {base}")


class _Rooms(StateStore):
    """What the OlmMachine asks about rooms: encryption settings and shared members.
    Filled by :class:`OlmCrypto` from the homeserver when the bot encrypts."""

    def __init__(self) -> None:
        self.encryption: dict[RoomID, RoomEncryptionStateEventContent | None] = {}
        self.members: dict[RoomID, set[UserID]] = {}

    async def is_encrypted(self, room_id: RoomID) -> bool:
        return self.encryption.get(room_id) is not None

    async def get_encryption_info(self, room_id: RoomID) -> RoomEncryptionStateEventContent | None:
        return self.encryption.get(room_id)

    async def find_shared_rooms(self, user_id: UserID) -> list[RoomID]:
        return [room for room, users in self.members.items() if user_id in users]


def _trust(state: object) -> Trust:
    if state == TrustState.UNKNOWN_DEVICE:
        return Trust.UNKNOWN_DEVICE
    if state == TrustState.FORWARDED:
        return Trust.FORWARDED
    if isinstance(state, TrustState) and state >= TrustState.CROSS_SIGNED_TOFU:
        return Trust.VERIFIED
    return Trust.UNVERIFIED


class OlmCrypto:
    """One device of the bot, backed by libolm through mautrix (see the module docstring)."""

    def __init__(
        self,
        settings: OlmSettings,
        db: CryptoDatabase,
        store: BridgeCryptoStore,
        client: Client,
        machine: OlmMachine,
        as_api: HTTPAPI,
    ) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.client = client
        self.machine = machine
        self.as_api = as_api
        self.rooms = cast(_Rooms, machine.state_store)
        self._withheld: dict[tuple[str, str], str] = {}
        self._stale: set[str] = set()
        self._room_locks: dict[str, asyncio.Lock] = {}

    # -- opening ------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, settings: OlmSettings, session: ClientSession, secrets: Secrets
    ) -> OlmCrypto:
        """Open the crypto store, log in to the bot's device (created on the first start
        only), upload its keys and cross-sign it with the bot user's own keys."""
        db = await open_crypto_db(settings.crypto_db_url)
        store = BridgeCryptoStore(settings.bot_mxid, settings.pickle_key, db)
        try:
            as_api = HTTPAPI(
                settings.homeserver_url,
                settings.as_token,
                client_session=session,
                log=cast(TraceLogger, logging.getLogger("bridge.e2ee.http")),
            )
            known = await store.get_device_id()
            device_id, token = await _appservice_login(as_api, settings, known)
            if known and device_id != known:
                raise RuntimeError(f"the homeserver gave device {device_id}, not {known}")
            if not known:
                await store.put_device_id(DeviceID(device_id))
                log.info("created the bot's E2EE device %s", device_id)
            api = HTTPAPI(
                settings.homeserver_url,
                token,
                client_session=session,
                log=cast(TraceLogger, logging.getLogger("bridge.e2ee.http")),
            )
            client = Client(mxid=UserID(settings.bot_mxid), device_id=DeviceID(device_id), api=api)
            machine = OlmMachine(client, store, _Rooms(), log=MACHINE_LOG)
            machine.share_keys_min_trust = TrustState.VERIFIED  # no key is ever forwarded
            await machine.load()
            crypto = cls(settings, db, store, client, machine, as_api)
            await crypto._publish_device()
            await crypto._cross_sign(secrets)
            return crypto
        except BaseException:
            await db.stop()
            raise

    async def _publish_device(self) -> None:
        """Upload device keys and one-time keys; again if the homeserver lost the device."""
        mxid, device = self.client.mxid, self.client.device_id
        listed = await self.client.query_keys([mxid])
        account = self.machine.account
        if account is not None and device not in listed.device_keys.get(mxid, {}):
            account.shared = False  # the homeserver lost the device's keys: upload again
        await self.machine.share_keys()

    async def _cross_sign(self, secrets: Secrets) -> None:
        """Cross-sign the device with the bot user's master/self-signing keys. The seeds
        are made once and kept sealed in the bridge's state; the first upload needs no
        interactive auth (MSC3967), later ones are the same keys (a no-op)."""
        raw = await secrets.get(CROSS_SIGNING_STATE_KEY)
        if raw:
            parts = json.loads(raw)
            seeds = CrossSigningSeeds(
                *(base64.b64decode(parts[k]) for k in ("master", "self_signing", "user_signing"))
            )
        else:
            seeds = CrossSigningSeeds.generate()
            await secrets.put(  # kept before publishing: never keys we could not use again
                CROSS_SIGNING_STATE_KEY,
                json.dumps(
                    {
                        "master": base64.b64encode(seeds.master_key).decode(),
                        "self_signing": base64.b64encode(seeds.self_signing_key).decode(),
                        "user_signing": base64.b64encode(seeds.user_signing_key).decode(),
                    }
                ),
            )
        # mautrix has no public call for "publish these seeds" outside its SSSS flow.
        await self.machine._publish_cross_signing_keys(seeds.to_keys())
        self.machine._import_cross_signing_keys(seeds)
        await self.machine.sign_own_device(self.machine.own_identity)

    @property
    def device_id(self) -> str:
        """The bot's device ID."""
        return str(self.client.device_id)

    async def flush(self) -> None:
        """Write the message indexes of the events decrypted since the last call (one
        transaction; replay protection, see :mod:`bridge.e2ee.store`)."""
        await self.store.flush_message_indexes()

    async def close(self) -> None:
        """Write what the crypto store deferred, close its database pool."""
        try:
            await self.store.flush()
        finally:
            await self.db.stop()

    # -- receiving ----------------------------------------------------------------------

    async def receive(self, payload: Mapping[str, Any]) -> bool:
        """Handle the E2EE parts of an appservice transaction (see the module docstring)."""
        mxid, device = str(self.client.mxid), str(self.client.device_id)
        keys_arrived = False
        for raw in payload.get(TO_DEVICE_KEY) or []:
            if not isinstance(raw, dict):
                continue
            if raw.get("to_user_id") == mxid and raw.get("to_device_id") == device:
                keys_arrived |= await self._to_device(raw)
        lists = payload.get(DEVICE_LISTS_KEY)
        if isinstance(lists, dict) and (lists.get("changed") or lists.get("left")):
            await self.machine.handle_device_lists(DeviceLists.deserialize(cast(JSON, lists)))
        for key in OTK_COUNT_KEYS:
            counts = payload.get(key)
            if isinstance(counts, dict):
                mine = (counts.get(mxid) or {}).get(device)
                if isinstance(mine, dict):
                    await self.machine.handle_otk_count(
                        DeviceOTKCount.deserialize(cast(JSON, mine))
                    )
                break
        return keys_arrived

    async def _to_device(self, raw: Mapping[str, Any]) -> bool:
        kind = raw.get("type")
        content = raw.get("content")
        if not isinstance(content, dict):
            return False
        if kind in WITHHELD_TYPES:
            room, session, code = (
                content.get("room_id"),
                content.get("session_id"),
                content.get("code"),
            )
            if isinstance(room, str) and isinstance(session, str) and isinstance(code, str):
                if len(self._withheld) >= MAX_WITHHELD:
                    self._withheld.pop(next(iter(self._withheld)))
                self._withheld[(room, session)] = code
                log.info("room key withheld from the bot (%s)", code)
                return True
            return False
        if kind != EventType.TO_DEVICE_ENCRYPTED.t:
            return False  # key requests are ignored: the bot never shares room keys
        try:
            evt = ToDeviceEvent.deserialize(cast(JSON, dict(raw)))
            evt.type = EventType.TO_DEVICE_ENCRYPTED
            await self.machine.handle_to_device_event(evt)
        except Exception as e:  # one bad message must not stop the device
            log.warning(
                "could not decrypt a to-device message from %s: %s",
                raw.get("sender"),
                e.__class__.__name__,
            )
            return False
        return True

    def withheld_code(self, room_id: str, session_id: str) -> str:
        """The withheld code received for this session ("" if none)."""
        return self._withheld.get((room_id, session_id), "")

    async def decrypt(self, event: Mapping[str, Any], *, wait: float = 0.0) -> DecryptResult:
        """Decrypt one Megolm room event (see :class:`~bridge.e2ee.seam.RoomCrypto`)."""
        content = event.get("content")
        if not isinstance(content, dict) or content.get("algorithm") != MEGOLM:
            return NotDecrypted(Undecryptable.UNKNOWN_ALGORITHM)
        session_id = content.get("session_id")
        room_id = event.get("room_id")
        if not isinstance(session_id, str) or not isinstance(room_id, str):
            return NotDecrypted(Undecryptable.FAILED, detail="no session_id or room_id")
        try:
            evt = _encrypted_event(event, content, room_id, session_id)
        except Exception:
            return NotDecrypted(Undecryptable.FAILED, session_id, detail="malformed event")
        for attempt in (0, 1):
            try:
                result = await self.machine.decrypt_megolm_event(evt)
            except SessionNotFound:
                if attempt == 0 and wait > 0:
                    got = await self.machine.wait_for_session(
                        RoomID(room_id), SessionID(session_id), timeout=wait
                    )
                    if got:
                        continue
                code = self.withheld_code(room_id, session_id)
                if code:
                    return NotDecrypted(Undecryptable.WITHHELD, session_id, code)
                return NotDecrypted(Undecryptable.NO_SESSION, session_id)
            except GroupSessionWithheldError as e:
                return NotDecrypted(Undecryptable.WITHHELD, session_id, e.withheld_code)
            except DuplicateMessageIndex:
                return NotDecrypted(Undecryptable.REPLAYED, session_id)
            except VerificationError:
                return NotDecrypted(Undecryptable.BAD_SIGNATURE, session_id)
            except DecryptionError as e:
                return NotDecrypted(Undecryptable.FAILED, session_id, detail=e.__class__.__name__)
            break
        plain = {
            key: event[key]
            for key in ("event_id", "room_id", "sender", "origin_server_ts", "unsigned")
            if key in event
        }
        plain["type"] = result.type.t
        plain["content"] = result.content.serialize()
        info = result["mautrix"]
        trust = _trust(info.get("trust_state") if isinstance(info, dict) else None)
        return Decrypted(plain, session_id, trust)

    # -- sending ------------------------------------------------------------------------

    async def is_encrypted(self, room_id: str) -> bool:
        """Whether the room has ``m.room.encryption`` (asked once per room). Only a 404 means
        "not encrypted": any other failure raises (the caller retries), so a transient error
        never sends plaintext into an encrypted room."""
        rid = RoomID(room_id)
        if rid not in self.rooms.encryption:
            try:
                content = await self.as_api.request(
                    Method.GET,
                    Path.v3.rooms[rid].state[ENCRYPTION_STATE],
                )
            except MatrixRequestError as e:
                if e.http_status != 404:
                    raise
                content = None
            self.rooms.encryption[rid] = (
                RoomEncryptionStateEventContent.deserialize(content)
                if isinstance(content, dict) and content.get("algorithm")
                else None
            )
        return self.rooms.encryption[rid] is not None

    def room_encrypted(self, room_id: str, members_changed: bool = False) -> None:
        """Forget what is known of the room: the next message asks again and starts a new
        room key (members changed, or encryption was just turned on)."""
        self.rooms.encryption.pop(RoomID(room_id), None)
        if members_changed:
            self._stale.add(room_id)

    async def encrypt(
        self, room_id: str, event_type: str, content: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Encrypt a message of the bot (sharing a new room key when needed)."""
        rid = RoomID(room_id)
        etype = EventType.find(event_type)
        lock = self._room_locks.setdefault(room_id, asyncio.Lock())
        async with lock:
            await self.is_encrypted(room_id)
            if room_id in self._stale:
                self._stale.discard(room_id)
                await self.store.remove_outbound_group_session(rid)
            try:
                encrypted = await self.machine.encrypt_megolm_event(rid, etype, dict(content))
            except EncryptionError:
                members = await self._members(rid)
                await self.machine.share_group_session(rid, members)
                encrypted = await self.machine.encrypt_megolm_event(rid, etype, dict(content))
        return cast(dict[str, Any], encrypted.serialize())

    async def _members(self, room_id: RoomID) -> list[UserID]:
        resp = await self.as_api.request(Method.GET, Path.v3.rooms[room_id].joined_members)
        joined = resp.get("joined", {}) if isinstance(resp, dict) else {}
        users = {UserID(u) for u in joined}
        self.rooms.members[room_id] = users
        return sorted(users)


def _encrypted_event(
    event: Mapping[str, Any], content: Mapping[str, Any], room_id: str, session_id: str
) -> EncryptedEvent:
    """The event as mautrix's type. mautrix's generic deserializer costs as much as the
    decryption itself; the common case (strings where the spec says so, no relation) is
    built directly, anything else goes through the deserializer."""
    fields = (
        event.get("event_id"),
        event.get("sender"),
        content.get("ciphertext"),
        content.get("sender_key", ""),
        content.get("device_id", ""),
    )
    ts = event.get("origin_server_ts")
    if (
        "m.relates_to" in content
        or not all(isinstance(f, str) for f in fields)
        or not isinstance(ts, int)
        or isinstance(ts, bool)
    ):
        return EncryptedEvent.deserialize(cast(JSON, dict(event)))
    event_id, sender, ciphertext, sender_key, device_id = cast(tuple[str, ...], fields)
    return EncryptedEvent(
        type=EventType.ROOM_ENCRYPTED,
        room_id=RoomID(room_id),
        event_id=EventID(event_id),
        sender=UserID(sender),
        timestamp=ts,
        content=cast(
            EncryptedEventContent,
            EncryptedMegolmEventContent(
                ciphertext=ciphertext,
                session_id=SessionID(session_id),
                sender_key=IdentityKey(sender_key) if sender_key else None,
                device_id=DeviceID(device_id) if device_id else None,
            ),
        ),
    )


async def _appservice_login(
    api: HTTPAPI, settings: OlmSettings, device_id: str | None
) -> tuple[str, str]:
    """Log in as the bot with the appservice token; ``device_id``: the existing device."""
    localpart = settings.bot_mxid[1:].split(":", 1)[0]
    body: dict[str, Any] = {
        "type": "m.login.application_service",
        "identifier": {"type": "m.id.user", "user": localpart},
        "initial_device_display_name": settings.device_name,
    }
    if device_id:
        body["device_id"] = device_id
    resp = await api.request(Method.POST, Path.v3.login, body)
    return str(resp["device_id"]), str(resp["access_token"])
