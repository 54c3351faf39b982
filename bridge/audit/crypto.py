"""Envelope encryption and blind indexes for the audit store (pure, no I/O).

Layers:

* **KEK** (:class:`bridge.audit.keyring.Kek`), from the keyring, never stored in the DB.
* **Data keys** (:class:`DataKey`), AES-256, one per room plus one for records
  without a room (scope ``GLOBAL_SCOPE``). Stored in the DB only wrapped by a KEK
  (:class:`WrappedKey`). Destroying a room's wrapped key crypto-shreds that room.
* **Records**: AES-256-GCM under the data key with a random 96-bit nonce and
  associated data binding the ciphertext to its sequence number, scope and data
  key id, so ciphertexts cannot be moved between records or rooms.
* **Blind indexes**: HMAC-SHA256 truncated to 16 bytes under a per-field subkey
  derived from the keyring's ``index_key`` (separate from every encryption key),
  so equal plaintext values give equal indexes within one field only.

Wrap AAD   = ``b"PBDK1" | u16 len(key_id) | key_id | u16 len(scope) | scope
             | u16 len(kek_id) | kek_id``
Record AAD = ``b"PBREC1" | u64 seq | u16 len(scope) | scope | u16 len(key_id) | key_id``
(all integers big-endian; ids UTF-8).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bridge.audit.keyring import Kek, Keyring, KeyringError

NONCE_BYTES = 12
DATA_KEY_BYTES = 32
BLIND_INDEX_BYTES = 16
#: Scope of the data key used for records that belong to no room.
GLOBAL_SCOPE = b""

_U16 = struct.Struct(">H").pack
_REC_AAD_HEAD = struct.Struct(">6sQ").pack
_SUBKEY_LABEL = b"bridge.audit.blind-index.v1\x00"


class CryptoError(Exception):
    """Base class for audit crypto failures."""


class KeyUnwrapError(CryptoError, KeyringError):
    """A data key could not be unwrapped (missing KEK, wrong KEK, or tampered blob)."""


class RecordDecryptError(CryptoError):
    """A record failed authentication: wrong key, wrong seq/scope, or tampered bytes."""

    def __init__(self, seq: int, reason: str) -> None:
        """Create the error for record ``seq``."""
        super().__init__(f"audit record seq {seq}: cannot decrypt: {reason}")
        self.seq = seq


def _enc_id(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError("identifier too long")
    return _U16(len(raw)) + raw


def _enc_bytes16(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError("scope too long")
    return _U16(len(value)) + value


@dataclass(frozen=True, slots=True, eq=False)
class DataKey:
    """A plaintext data key with its id and scope (room blind index or ``GLOBAL_SCOPE``).

    Holds a ready AESGCM object, so keeping ``DataKey`` objects in a dict is the
    per-key cipher cache.
    """

    key_id: str
    scope: bytes
    key: bytes = field(repr=False)
    aead: AESGCM = field(init=False, repr=False, compare=False)
    _aad_tail: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.key) != DATA_KEY_BYTES:
            raise CryptoError(f"data key {self.key_id!r} must be {DATA_KEY_BYTES} bytes")
        object.__setattr__(self, "aead", AESGCM(self.key))
        object.__setattr__(self, "_aad_tail", _enc_bytes16(self.scope) + _enc_id(self.key_id))

    @classmethod
    def generate(cls, scope: bytes, key_id: str | None = None) -> DataKey:
        """Create a random data key for ``scope`` (id: 16 random hex chars unless given)."""
        return cls(key_id or secrets.token_hex(8), bytes(scope), secrets.token_bytes(32))


class WrappedKey(NamedTuple):
    """A data key as stored in the database: store all four columns."""

    key_id: str
    scope: bytes
    kek_id: str
    blob: bytes  # nonce (12) || AES-GCM ciphertext+tag (48)


def _wrap_aad(key_id: str, scope: bytes, kek_id: str) -> bytes:
    return b"PBDK1" + _enc_id(key_id) + _enc_bytes16(scope) + _enc_id(kek_id)


def wrap(kek: Kek, data_key: DataKey) -> WrappedKey:
    """Encrypt ``data_key`` under ``kek`` (AES-256-GCM, AAD = key id, scope, KEK id)."""
    nonce = os.urandom(NONCE_BYTES)
    aad = _wrap_aad(data_key.key_id, data_key.scope, kek.id)
    blob = nonce + kek.aead.encrypt(nonce, data_key.key, aad)
    return WrappedKey(data_key.key_id, data_key.scope, kek.id, blob)


def unwrap(kek: Kek, wrapped: WrappedKey) -> DataKey:
    """Decrypt a wrapped data key with ``kek``; raise :class:`KeyUnwrapError` naming both ids."""
    if kek.id != wrapped.kek_id:
        raise KeyUnwrapError(
            f"data key {wrapped.key_id!r} is wrapped by KEK {wrapped.kek_id!r}, not {kek.id!r}"
        )
    blob = wrapped.blob
    aad = _wrap_aad(wrapped.key_id, wrapped.scope, wrapped.kek_id)
    try:
        key = kek.aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        raise KeyUnwrapError(
            f"data key {wrapped.key_id!r} cannot be unwrapped with KEK {kek.id!r}: the KEK "
            f"has the right id but the wrong key material, or the wrapped key was altered"
        ) from None
    return DataKey(wrapped.key_id, wrapped.scope, key)


def unwrap_with_keyring(keyring: Keyring, wrapped: WrappedKey) -> DataKey:
    """Unwrap using whichever KEK of ``keyring`` the data key names."""
    if wrapped.kek_id not in keyring:
        raise KeyUnwrapError(
            f"{keyring.source}: KEK {wrapped.kek_id!r} is needed to unwrap data key "
            f"{wrapped.key_id!r} but is not in the keyring (it has: "
            f"{', '.join(keyring.kek_ids)}); restore the keyring that contains "
            f"{wrapped.kek_id!r}"
        )
    return unwrap(keyring.get(wrapped.kek_id), wrapped)


def rewrap(keyring: Keyring, wrapped: WrappedKey) -> WrappedKey:
    """Re-wrap a data key under the keyring's current KEK (no record is re-encrypted).

    Returns ``wrapped`` unchanged if it already uses the current KEK.
    """
    if wrapped.kek_id == keyring.current.id:
        return wrapped
    return wrap(keyring.current, unwrap_with_keyring(keyring, wrapped))


def check_keyring(keyring: Keyring, wrapped_keys: Iterable[WrappedKey]) -> None:
    """Startup check: every stored data key must unwrap with this keyring.

    Raises :class:`KeyUnwrapError` naming every missing KEK id (and how many data
    keys need it) or the first data key that fails to authenticate.
    """
    missing: dict[str, int] = {}
    for wk in wrapped_keys:
        if wk.kek_id not in keyring:
            missing[wk.kek_id] = missing.get(wk.kek_id, 0) + 1
            continue
        unwrap(keyring.get(wk.kek_id), wk)
    if missing:
        needed = ", ".join(
            f"{kid!r} ({n} data key{'s' if n != 1 else ''})" for kid, n in missing.items()
        )
        raise KeyUnwrapError(
            f"{keyring.source} cannot unwrap the stored data keys: missing KEK {needed}; "
            f"the keyring has: {', '.join(keyring.kek_ids)}"
        )


# -- records ---------------------------------------------------------------------------


def record_aad(data_key: DataKey, seq: int, scope: bytes) -> bytes:
    """Associated data binding a record ciphertext to its seq, scope and data key."""
    return _REC_AAD_HEAD(b"PBREC1", seq) + _enc_bytes16(scope) + _enc_id(data_key.key_id)


def encrypt_record(
    data_key: DataKey, seq: int, room_scope: bytes, plaintext: bytes
) -> tuple[bytes, bytes]:
    """Encrypt one record; return ``(nonce, ciphertext_with_tag)``.

    ``room_scope`` is the room's blind index (or ``GLOBAL_SCOPE``) and must equal
    the data key's scope: a key is never used outside its room.
    """
    if room_scope != data_key.scope:
        raise CryptoError(
            f"record seq {seq}: data key {data_key.key_id!r} belongs to another scope"
        )
    nonce = os.urandom(NONCE_BYTES)
    aad = _REC_AAD_HEAD(b"PBREC1", seq) + data_key._aad_tail
    return nonce, data_key.aead.encrypt(nonce, plaintext, aad)


def decrypt_record(
    data_key: DataKey, seq: int, room_scope: bytes, nonce: bytes, ciphertext: bytes
) -> bytes:
    """Decrypt one record; raise :class:`RecordDecryptError` naming ``seq`` on any failure."""
    if room_scope != data_key.scope:
        raise RecordDecryptError(
            seq, f"data key {data_key.key_id!r} belongs to another scope than this record"
        )
    aad = _REC_AAD_HEAD(b"PBREC1", seq) + data_key._aad_tail
    try:
        return data_key.aead.decrypt(nonce, ciphertext, aad)
    except (InvalidTag, ValueError):
        raise RecordDecryptError(
            seq,
            f"authentication failed with data key {data_key.key_id!r} (ciphertext, nonce, "
            f"seq or room do not match what was encrypted)",
        ) from None


def ciphertext_digest(ciphertext: bytes) -> bytes:
    """SHA-256 of a ciphertext: stored beside it and covered by the hash chain."""
    return hashlib.sha256(ciphertext).digest()


# -- blind indexes ---------------------------------------------------------------------


def _subkey(index_key: bytes, field_name: str) -> bytes:
    return hmac.digest(index_key, _SUBKEY_LABEL + field_name.encode("utf-8"), "sha256")


def blind_index(index_key: bytes, field_name: str, value: str | bytes) -> bytes:
    """Keyed, field-separated equality index: HMAC-SHA256(subkey(field), value)[:16].

    ``str`` values are UTF-8 encoded, without normalisation (Matrix ids are
    case-sensitive). Prefer :class:`BlindIndexer` in loops: it caches subkeys.
    """
    # surrogatepass: a lone surrogate (JSON allows "\ud800") must not raise; valid strings
    # encode exactly as in UTF-8, so existing indexes are unchanged.
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    return hmac.digest(_subkey(index_key, field_name), data, "sha256")[:BLIND_INDEX_BYTES]


class BlindIndexer:
    """Blind indexes with cached per-field subkeys (same output as :func:`blind_index`)."""

    #: Field names the store uses; any other name also works.
    FIELDS = ("event_id", "room", "sender", "type")

    def __init__(self, index_key: bytes) -> None:
        """Derive subkeys lazily from the keyring's ``index_key``."""
        self._index_key = index_key
        self._subkeys: dict[str, bytes] = {}

    def __call__(self, field_name: str, value: str | bytes | None) -> bytes | None:
        """Index ``value`` in ``field_name``; ``None`` stays ``None``."""
        if value is None:
            return None
        sub = self._subkeys.get(field_name)
        if sub is None:
            sub = self._subkeys[field_name] = _subkey(self._index_key, field_name)
        data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
        return hmac.digest(sub, data, "sha256")[:BLIND_INDEX_BYTES]

    def room(self, room_id: str | None) -> bytes:
        """Room blind index, or ``GLOBAL_SCOPE`` when there is no room (data-key scope)."""
        if room_id is None:
            return GLOBAL_SCOPE
        idx = self("room", room_id)
        assert idx is not None
        return idx


# -- operational data ------------------------------------------------------------------

#: Scope of the data key that encrypts the operational tables (rooms, executor actions,
#: bridge state): never a room's blind index (those are 16 bytes), never shredded.
OPERATIONAL_SCOPE = b"operational"


def field_aad(table: str, key: str | bytes, column: str) -> bytes:
    """Associated data binding an operational ciphertext to its table, row and column.

    ``b"PBOPS1" | u16 len(table) | table | u16 len(key) | key | u16 len(column) | column``,
    so a ciphertext copied into another row, column or table fails to authenticate.
    """
    raw = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
    return b"PBOPS1" + _enc_id(table) + _enc_bytes16(raw) + _enc_id(column)


def seal(data_key: DataKey, aad: bytes, plaintext: bytes) -> bytes:
    """AES-256-GCM ``nonce || ciphertext+tag`` of ``plaintext`` under ``data_key``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + data_key.aead.encrypt(nonce, plaintext, aad)


def unseal(data_key: DataKey, aad: bytes, blob: bytes) -> bytes:
    """Inverse of :func:`seal`; raises :class:`CryptoError` if the blob fails to authenticate."""
    try:
        return data_key.aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        raise CryptoError("authentication failed (altered, or moved from another row)") from None
