"""Opening sealed audit records: the one copy of the logic, pure (no database, no I/O).

Used by the store's reads (its record reader and its key repository's ``decrypt``) and
by the export's worker processes
(:mod:`bridge.archive.export`), which get the data keys of each batch from the store. It
imports nothing from the store and nothing that needs SQLAlchemy, so a worker can load it
alone. Its errors are :class:`RecordError`; the store raises them as its ``StoreError``.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping, Sequence
from typing import Any

from bridge.audit.chain import SHRED_KIND
from bridge.audit.codec import loads, str_or_none
from bridge.audit.crypto import GLOBAL_SCOPE, DataKey, RecordDecryptError, decrypt_record
from bridge.audit.kinds import AuditKind


class RecordError(Exception):
    """A record cannot be opened: it fails to authenticate, its data key is unknown, or its
    plaintext is not a JSON object. The message names the record, never its content."""


_EVENT = AuditKind.EVENT  # bound once: compared for every record

#: The columns of a sealed row, in this order (the store's reader selects them so).
SEALED_COLUMNS = ("seq", "ts", "kind", "origin_ts", "room_idx", "key_id", "nonce", "ciphertext")


def open_sealed(
    keys: Mapping[str, DataKey],
    shredded: Container[str],
    seq: int,
    room: bytes | None,
    key_id: str | None,
    nonce: bytes,
    ct: bytes | None,
) -> bytes | None:
    """Plaintext of a record; None if its ciphertext expired or its data key was shredded.

    ``keys`` holds the data keys by id (at least this record's, where the store has it);
    ``shredded`` the ids that shred records say were destroyed. Raises RecordError naming the
    record if it fails to authenticate, or if its data key is neither in ``keys`` nor in
    ``shredded`` (deleted outside the bridge).
    """
    if ct is None or key_id is None:
        return None
    dk = keys.get(key_id)
    if dk is None:
        if key_id in shredded:
            return None
        raise RecordError(
            f"audit record seq {seq}: its data key {key_id!r} is not in the store and no "
            f"shred record says it was destroyed (deleted outside the bridge, or a store "
            f"from before shred records: start the bridge once to record earlier expiry)"
        )
    try:
        return decrypt_record(
            dk, seq, bytes(room) if room is not None else GLOBAL_SCOPE, bytes(nonce), bytes(ct)
        )
    except RecordDecryptError as e:
        raise RecordError(str(e)) from None


def decode_rows(
    rows: Iterable[Sequence[Any]],
    keys: Mapping[str, DataKey],
    shredded: Container[str],
    *,
    raw_json: bool = False,
) -> list[dict[str, Any]]:
    """Sealed rows (:data:`SEALED_COLUMNS`) opened into record dicts, in the rows' order.

    Each dict has seq, ts, kind, event_id, room_id, sender, type, origin_ts and data (the
    event, or the audit entry's data); ``data`` is None when the ciphertext expired or the
    data key was destroyed (``unreadable`` says which). A shred record has no ciphertext: its
    ``data`` is ``{"destroyed_key_id": …}`` from its plain columns. With ``raw_json`` an
    event's dict also holds ``json``: its stored JSON text (UTF-8 bytes), exactly as
    archived. Errors as
    :func:`open_sealed`; a plaintext that is not a JSON object is a RecordError too.
    """
    out: list[dict[str, Any]] = []
    append = out.append
    for seq, ts, rkind, origin, room_idx, key_id, nonce, ct in rows:
        pt = open_sealed(keys, shredded, seq, room_idx, key_id, nonce, ct)
        if pt is None:
            # No content: a shred record (its key id is its plain data) or an unreadable one.
            rec = {
                "seq": seq,
                "ts": ts,
                "kind": rkind,
                "event_id": None,
                "room_id": None,
                "sender": None,
                "type": None,
                "origin_ts": origin,
                "data": {"destroyed_key_id": key_id} if rkind == SHRED_KIND else None,
            }
            if rkind != SHRED_KIND:
                rec["unreadable"] = (
                    "ciphertext expired (archive retention)"
                    if ct is None
                    else f"data key {key_id} destroyed"
                )
            append(rec)
            continue
        try:
            obj = loads(pt)
        except ValueError:
            raise RecordError(f"audit record seq {seq}: plaintext is not JSON") from None
        if not isinstance(obj, dict):
            raise RecordError(f"audit record seq {seq}: plaintext is not a JSON object")
        get = obj.get
        if rkind == _EVENT:
            rec = {
                "seq": seq,
                "ts": ts,
                "kind": rkind,
                "event_id": str_or_none(get("event_id")),
                "room_id": str_or_none(get("room_id")),
                "sender": str_or_none(get("sender")),
                "type": str_or_none(get("type")),
                "origin_ts": origin,
                "data": obj,
            }
            if raw_json:
                rec["json"] = pt
            append(rec)
        else:
            append(
                {
                    "seq": seq,
                    "ts": ts,
                    "kind": rkind,
                    "event_id": None,
                    "room_id": get("room_id"),
                    "sender": get("sender"),
                    "type": get("type"),
                    "origin_ts": origin,
                    "data": get("data"),
                }
            )
    return out
