"""The one seam between the bridge and its E2EE library (pure types, no I/O).

The pipeline decrypts archived ``m.room.encrypted`` events and encrypts the bot's own
messages through :class:`RoomCrypto`; nothing else in the bridge imports the crypto library.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

ENCRYPTED_EVENT = "m.room.encrypted"
ENCRYPTION_STATE = "m.room.encryption"


class Undecryptable(StrEnum):
    """Why an encrypted event could not be read (stored in audit records and metrics)."""

    NOT_MEMBER = "not_member"  # the bot is not in the room: no key is ever shared with it
    NO_SESSION = "no_session"  # the room key has not reached the bot's device (yet)
    WITHHELD = "withheld"  # the sender's device refused to share it (``code`` says why)
    UNKNOWN_ALGORITHM = "unknown_algorithm"  # not Megolm v1
    REPLAYED = "replayed"  # a message index seen before with another event (replay)
    BAD_SIGNATURE = "bad_signature"  # session keys do not match the sender's device
    FAILED = "failed"  # the ciphertext did not decrypt, or the payload is malformed


class Trust(StrEnum):
    """How far the sending device of a decrypted event is known (recorded with it)."""

    VERIFIED = "verified"  # cross-signed by its owner, or our own device
    UNVERIFIED = "unverified"  # known device, not cross-signed
    UNKNOWN_DEVICE = "unknown_device"  # the homeserver does not list the sending device
    FORWARDED = "forwarded"  # the key was forwarded by another device


@dataclass(frozen=True, slots=True)
class Decrypted:
    """A decrypted event: ``event`` in client format (type and content the plaintext's)."""

    event: Mapping[str, Any]
    session_id: str
    trust: Trust


@dataclass(frozen=True, slots=True)
class NotDecrypted:
    """An event that could not be decrypted: ``code`` is the withheld code, if any."""

    reason: Undecryptable
    session_id: str = ""
    code: str = ""
    detail: str = field(default="", compare=False)


DecryptResult = Decrypted | NotDecrypted


class RoomCrypto(Protocol):
    """What the bridge needs of an E2EE implementation (one device of the bot)."""

    @property
    def device_id(self) -> str:
        """The bot's device ID (stable across restarts)."""
        ...

    async def decrypt(self, event: Mapping[str, Any], *, wait: float = 0.0) -> DecryptResult:
        """Decrypt one ``m.room.encrypted`` room event; ``wait``: seconds to wait for a
        room key still on its way. Never raises for a bad event (NotDecrypted says why)."""
        ...

    async def flush(self) -> None:
        """Make durable what :meth:`decrypt` deferred (the message indexes that protect
        against replays); awaited before the records of decrypted events are committed."""
        ...

    async def encrypt(
        self, room_id: str, event_type: str, content: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The ``m.room.encrypted`` content for a message of the bot to ``room_id``,
        sharing a room key with the members' devices first when needed."""
        ...

    async def is_encrypted(self, room_id: str) -> bool:
        """Whether ``room_id`` has ``m.room.encryption`` (asked once, then remembered)."""
        ...

    def room_encrypted(self, room_id: str, members_changed: bool = False) -> None:
        """The room turned on encryption, or its members changed (start a new room key)."""
        ...

    def withheld_code(self, room_id: str, session_id: str) -> str:
        """The withheld code a sender sent for this session ("" if none)."""
        ...

    async def receive(self, payload: Mapping[str, Any]) -> bool:
        """Handle an appservice transaction's to-device messages, device-list changes and
        key counts; True if room keys or withheld notices arrived (worth retrying
        undecryptable events). Raises if they could not be handled (answer 5xx)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
