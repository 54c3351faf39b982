"""The record log: the encrypted, hash-chained records, their appends and checkpoints.

:meth:`RecordLog.write` is the one way to commit anything that appends to the chain: it
runs a function of a connection in ONE transaction under the append lock and adopts the
new chain head only after the commit. Repositories that take that ``conn`` (queue,
actions, state, holds, …) thereby commit together with the records they append.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.audit.chain import (
    GENESIS,
    SHRED_KIND,
    ChainFields,
    Checkpoint,
    record_hash,
    sign_checkpoint,
)
from bridge.audit.codec import dumps
from bridge.audit.crypto import GLOBAL_SCOPE, encrypt_record
from bridge.audit.kinds import AuditKind
from bridge.store.console import add_daily, finding_counts, kind_counts
from bridge.store.database import CHAIN_LOCK_KEY, Backend, Database, advisory_xact_lock, log
from bridge.store.keys import KeyRepository
from bridge.store.models import AuditEntry, Plain, StoreUnavailable, now_ms
from bridge.store.schema import checkpoints, records

_EVENT = AuditKind.EVENT  # bound once: compared for every record

T = TypeVar("T")
_RECORD_COLS = (
    "seq",
    "ts",
    "kind",
    "event_id_idx",
    "room_idx",
    "sender_idx",
    "type_idx",
    "origin_ts",
    "key_id",
    "nonce",
    "ciphertext",
    "ct_digest",
    "hash",
)
_SQLITE_INSERT_RECORDS = (
    f"INSERT INTO records ({', '.join(_RECORD_COLS)}) "  # noqa: S608 - constant column names
    f"VALUES ({', '.join('?' * len(_RECORD_COLS))})"
)
_sha256 = hashlib.sha256
_INSERT_RECORDS = insert(records)
_LAST_RECORD = select(records.c.seq, records.c.hash).order_by(records.c.seq.desc()).limit(1)
#: Kinds of non-event records (``--type`` parsing is
#: :func:`bridge.audit.kinds.split_type_filter`).
AUDIT_KINDS = tuple(k for k in AuditKind if k is not AuditKind.EVENT)
#: ``ct_digest`` of a record that never had a ciphertext (a shred record).
_NO_CIPHERTEXT_DIGEST = _sha256(b"").digest()


class RecordLog:
    """Appends to the record chain (audit entries, events) and its signed checkpoints.

    The chain head is kept in memory (read from the last row at open, never recomputed);
    a signed checkpoint is written every ``checkpoint_every`` records, after every removal
    record and at close, and by :meth:`sign_due` (the checkpoint job,
    :mod:`bridge.archive.jobs`) once the oldest unsigned record is old enough. With
    ``sign_checkpoints`` False (a CLI command) none is signed.
    """

    def __init__(
        self,
        db: Database,
        keys: KeyRepository,
        *,
        signing_key: Ed25519PrivateKey,
        checkpoint_every: int = 1000,
        checkpoint_log: Path | None = None,
        sign_checkpoints: bool = True,
    ) -> None:
        self.db = db
        self.keys = keys
        self.signing_key = signing_key
        self.checkpoint_every = max(1, checkpoint_every)
        self.checkpoint_log = checkpoint_log
        #: False for a store opened by a CLI command: it appends (an export records itself)
        #: but never signs a checkpoint; the bridge's next checkpoint covers what it appended.
        self.sign_checkpoints = sign_checkpoints
        self._next_seq: int | None = None
        self._head: bytes | None = None
        self._last_cp_seq = 0
        #: When the newest signed checkpoint was made (ms since the epoch), once known.
        self.last_checkpoint_ts: int | None = None
        #: Archive time (ms) of the oldest committed record no checkpoint covers yet
        #: (None: every record is signed, or the head is not loaded yet).
        self.unsigned_since: int | None = None
        #: (next seq, head hash, checkpoint signed, oldest unsigned ts) of the open transaction
        self._tentative: tuple[int, bytes, Checkpoint | None, int | None] | None = None
        self._mismatch_logged: tuple[int, int] | None = None
        #: Events stored, counted once (by the stats), then kept up to date by appends.
        self.events: int | None = None
        self._tentative_events = 0
        #: Called (in the event loop, after the commit) with every new signed checkpoint.
        self.on_checkpoint: Callable[[Checkpoint], None] | None = None

    def reset(self) -> None:
        """Forget the in-memory head after a failure: it is re-read from the last row."""
        self._next_seq = None
        self._head = None
        self._tentative = None
        self._tentative_events = 0
        self.keys.rolled_back()

    async def load_head(self, conn: AsyncConnection) -> bool:
        """Read the chain head (the last record's seq and hash) and the last checkpoint;
        False if there are no records."""
        last = (
            await conn.execute(
                select(records.c.seq, records.c.hash).order_by(records.c.seq.desc()).limit(1)
            )
        ).first()
        self._next_seq = (last[0] if last else 0) + 1
        self._head = bytes(last[1]) if last else GENESIS
        cp = (
            await conn.execute(
                select(checkpoints.c.seq, checkpoints.c.ts)
                .order_by(checkpoints.c.seq.desc())
                .limit(1)
            )
        ).first()
        self._last_cp_seq = cp[0] if cp else 0
        if cp:
            self.last_checkpoint_ts = cp[1]
        self.unsigned_since = None
        if last is not None and last[0] > self._last_cp_seq:
            self.unsigned_since = (
                await conn.execute(
                    select(records.c.ts)
                    .where(records.c.seq > self._last_cp_seq)
                    .order_by(records.c.seq)
                    .limit(1)
                )
            ).scalar()
        return last is not None

    @property
    def unsigned_records(self) -> int:
        """Records committed after the last checkpoint this process knows of."""
        if self._next_seq is None:
            return 0
        return max(0, self._next_seq - 1 - self._last_cp_seq)

    async def seq_start(self, conn: AsyncConnection) -> int:
        if self._next_seq is None or self._head is None:
            await self.load_head(conn)
        assert self._next_seq is not None
        return self._next_seq

    async def chain_start(self, conn: AsyncConnection) -> tuple[int, bytes]:
        """The next seq and the hash before it, counting appends earlier in this transaction."""
        if self._tentative is not None:
            return self._tentative[0], self._tentative[1]
        seq0 = await self.seq_start(conn)
        assert self._head is not None
        return seq0, self._head

    async def append_records(
        self,
        conn: AsyncConnection,
        items: Sequence[Plain],
        ts: int,
        *,
        checkpoints: bool = True,
        sign: bool = False,
    ) -> tuple[int, int]:
        """Encrypt, chain and insert ``items``; returns (first_seq, last_seq).

        ``ts`` is the archive time of items without one of their own. With ``sign`` the new
        head is signed into a checkpoint in the same commit (removal records: a verifier
        trusts them only under a checkpoint). The new head is only adopted after the commit
        (:meth:`write`); several appends in one transaction continue each other.
        """
        seq0, prev = await self.chain_start(conn)
        if not items:
            return seq0, seq0 - 1
        bidx = self.keys.bidx
        scopes = [GLOBAL_SCOPE if p.room_id is None else bidx("room", p.room_id) for p in items]
        await self.keys.for_scopes(conn, set(scopes))
        keys = self.keys.by_scope
        rows: list[tuple[Any, ...]] = []
        seq = seq0
        for p, scope in zip(items, scopes, strict=True):
            record_ts = ts if p.ts is None else p.ts
            dk = keys[scope]
            nonce, ct = encrypt_record(dk, seq, scope, p.plaintext)
            digest = _sha256(ct).digest()
            eid = p.event_id_idx
            room = scope or None
            sender = None if p.sender is None else bidx("sender", p.sender)
            etype = None if p.type is None else bidx("type", p.type)
            prev = record_hash(
                prev,
                ChainFields(
                    seq,
                    record_ts,
                    p.kind,
                    eid,
                    room,
                    sender,
                    etype,
                    dk.key_id,
                    nonce,
                    digest,
                    p.origin_ts,
                ),
            )
            rows.append(
                (
                    seq,
                    record_ts,
                    p.kind,
                    eid,
                    room,
                    sender,
                    etype,
                    p.origin_ts,
                    dk.key_id,
                    nonce,
                    ct,
                    digest,
                    prev,
                )
            )
            seq += 1
        self._tentative_events += sum(1 for p in items if p.kind == _EVENT)
        await self._insert_rows(conn, rows, prev, ts, checkpoints=checkpoints, sign=sign)
        await add_daily(conn, kind_counts((r[2], r[1]) for r in rows))  # the console's charts
        return seq0, seq - 1

    async def _insert_rows(
        self,
        conn: AsyncConnection,
        rows: list[tuple[Any, ...]],
        head: bytes,
        ts: int,
        *,
        checkpoints: bool,
        sign: bool,
    ) -> None:
        """Insert chained rows (``_RECORD_COLS``) ending at ``head``; checkpoint if due."""
        if self.db.backend is Backend.SQLITE:
            # executemany straight to the driver: skips per-value bind processing
            await conn.exec_driver_sql(_SQLITE_INSERT_RECORDS, rows)
        else:
            await conn.execute(
                _INSERT_RECORDS, [dict(zip(_RECORD_COLS, r, strict=True)) for r in rows]
            )
        last = rows[-1][0]
        cp, since = (None, self.unsigned_since) if self._tentative is None else self._tentative[2:]
        last_cp = cp.seq if cp is not None else self._last_cp_seq
        if self.sign_checkpoints and (
            sign or (checkpoints and last - last_cp >= self.checkpoint_every)
        ):
            cp = await self.insert_checkpoint(conn, last, head, ts)
            since = None
        elif since is None:
            since = min(r[1] for r in rows)
        else:
            since = min(since, min(r[1] for r in rows))
        self._tentative = (last + 1, head, cp, since)

    async def append_shreds(
        self,
        conn: AsyncConnection,
        shreds: Sequence[tuple[str, bytes]],
        ts: int,
        *,
        sign: bool = True,
    ) -> int:
        """Chain one shred record per destroyed data key ``(key_id, scope)``, then sign
        (unless ``sign`` is False: the caller signs after more appends).

        A shred record has no ciphertext: what it says is in its hashed plain columns
        (kind ``shred``, ``key_id`` = the destroyed key, ``room_idx`` = its room), so a
        verifier without keys can read it. Returns the seq of the last one.
        """
        seq, prev = await self.chain_start(conn)
        rows: list[tuple[Any, ...]] = []
        for key_id, scope in shreds:
            nonce = os.urandom(12)
            room = scope or None
            prev = record_hash(
                prev,
                ChainFields(
                    seq, ts, SHRED_KIND, None, room, None, None, key_id, nonce,
                    _NO_CIPHERTEXT_DIGEST, ts,
                ),
            )  # fmt: skip
            rows.append(
                (seq, ts, SHRED_KIND, None, room, None, None, ts, key_id, nonce, None,
                 _NO_CIPHERTEXT_DIGEST, prev)
            )  # fmt: skip
            seq += 1
        await self._insert_rows(conn, rows, prev, ts, checkpoints=False, sign=sign)
        return seq - 1

    async def insert_checkpoint(
        self, conn: AsyncConnection, seq: int, head: bytes, ts: int
    ) -> Checkpoint:
        cp = sign_checkpoint(self.signing_key, seq, head, ts, seq)
        await conn.execute(
            insert(checkpoints).values(
                seq=cp.seq,
                head_hash=cp.head_hash,
                ts=cp.ts,
                record_count=cp.record_count,
                key_id=cp.key_id,
                signature=cp.signature,
            )
        )
        return cp

    def committed(self) -> None:
        self.keys.committed()
        if self.events is not None:
            self.events += self._tentative_events
        self._tentative_events = 0
        if self._tentative is None:
            return
        next_seq, head, cp, since = self._tentative
        self._tentative = None
        self._next_seq, self._head = next_seq, head
        self.unsigned_since = since
        if cp is not None:
            self._last_cp_seq = cp.seq
            self.last_checkpoint_ts = cp.ts
            self._publish_checkpoint(cp)

    def _publish_checkpoint(self, cp: Checkpoint) -> None:
        """Log the checkpoint and append it to the checkpoint log file (outside the DB)."""
        line = json.dumps(cp.to_dict(), separators=(",", ":"))
        log.info(
            "audit checkpoint: seq %d head %s signed by %s", cp.seq, cp.head_hash.hex(), cp.key_id
        )
        if self.on_checkpoint is not None:
            try:
                self.on_checkpoint(cp)
            except Exception:
                log.exception("checkpoint callback failed")
        if self.checkpoint_log is None:
            return
        try:
            fd = os.open(self.checkpoint_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode() + b"\n")
            finally:
                os.close(fd)
        except OSError as e:
            log.error("cannot append to the checkpoint log %s: %s", self.checkpoint_log, e)

    async def write_or_unavailable(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """:meth:`write`; a database or I/O error raises StoreUnavailable."""
        try:
            return await self.write(fn)
        except (SQLAlchemyError, OSError) as e:
            raise StoreUnavailable(str(e.__class__.__name__)) from e

    async def write(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``fn`` in one transaction under the append lock; adopt the head on commit.

        On PostgreSQL the transaction first takes the chain's advisory lock and continues
        from the head in the database (:meth:`_serialize`): replicas append to one chain.
        A seq conflict (another process appended without the lock) reloads the head and
        retries once.
        """
        async with self.db.write_lock:
            for attempt in (0, 1):
                try:
                    async with self.db.transaction() as conn:
                        if self.db.backend is Backend.POSTGRESQL:
                            await self._serialize(conn)
                        result = await fn(conn)
                except IntegrityError:
                    self.reset()
                    if attempt:
                        raise
                    continue
                except BaseException:
                    self.reset()
                    raise
                self.committed()
                return result
        raise AssertionError("unreachable")

    async def _serialize(self, conn: AsyncConnection) -> None:
        """PostgreSQL: take the chain lock for this transaction and continue from the head
        in the database (replicas append to one chain; each transaction that appends holds
        the lock until its commit, so the next one reads the head it left)."""
        await advisory_xact_lock(conn, CHAIN_LOCK_KEY)
        if self._next_seq is None or self._head is None:
            await self.load_head(conn)
            return
        last = (await conn.execute(_LAST_RECORD)).first()
        mine, db_last = self._next_seq - 1, last[0] if last else 0
        if db_last == mine and (last is None or bytes(last[1]) == self._head):
            return  # nobody appended since this process did
        if db_last > mine:
            at_head = (
                await conn.execute(select(records.c.hash).where(records.c.seq == mine))
            ).scalar()
            if mine == 0 or (at_head is not None and bytes(at_head) == self._head):
                await self.load_head(conn)  # other replicas appended after this head
                return
            await self.load_head(conn)  # nothing else to append to; verify names the change
        # The records up to this process's head differ from what it wrote (rewritten or
        # removed in the database): it keeps its own head when it can, so the next
        # checkpoint signs what it wrote and `audit verify` reports the change.
        if self._mismatch_logged != (mine, db_last):
            self._mismatch_logged = (mine, db_last)
            log.error(
                "the audit records in the database differ from those this bridge wrote (its "
                "head: seq %d; the database's: seq %d); `audit verify` will name the records",
                mine,
                db_last,
            )

    def adopt_tentative(self) -> None:
        """Take the appends so far in the open transaction as the head now (the schema 1
        migration appends batches in one long transaction; it rolls back as a whole)."""
        assert self._tentative is not None
        self._next_seq, self._head, _cp, self.unsigned_since = self._tentative
        self._tentative = None

    async def sign_head(self, conn: AsyncConnection) -> None:
        """Sign a checkpoint over the head adopted by :meth:`adopt_tentative`, in ``conn``."""
        assert self._head is not None and self._next_seq is not None
        last = self._next_seq - 1
        cp = await self.insert_checkpoint(conn, last, self._head, now_ms())
        self._tentative = (last + 1, self._head, cp, None)

    async def checkpoint(self) -> Checkpoint | None:
        """Sign the current head now (if not yet signed); done at close.

        A store that does not sign checkpoints (CLI commands) returns None.
        """
        if not self.sign_checkpoints:
            return None
        return await self.write(self._sign_head_if_unsigned)

    async def sign_due(self, older_than: int) -> Checkpoint | None:
        """Sign the head if a record archived at or before ``older_than`` (ms) is unsigned.

        Runs through :meth:`write` (the append lock, one transaction), so it never races an
        append of this process. Records another process appended since (an ``audit export``
        recording itself) are taken into the head first (:meth:`_adopt_foreign`), so they
        are signed in time too. Nothing new written: nothing signed. Raises
        StoreUnavailable when the database is down.
        """
        if not self.sign_checkpoints:
            return None

        async def run(conn: AsyncConnection) -> Checkpoint | None:
            await self._adopt_foreign(conn)
            if self.unsigned_since is None or self.unsigned_since > older_than:
                return None
            return await self._sign_head_if_unsigned(conn)

        return await self.write_or_unavailable(run)

    async def _sign_head_if_unsigned(self, conn: AsyncConnection) -> Checkpoint | None:
        seq = await self.seq_start(conn) - 1
        if seq < 1 or seq <= self._last_cp_seq:
            return None
        assert self._head is not None
        exists = (
            await conn.execute(select(checkpoints.c.seq).where(checkpoints.c.seq == seq))
        ).first()
        if exists:  # signed already (by another process): nothing is unsigned
            self._last_cp_seq, self.unsigned_since = seq, None
            return None
        cp = await self.insert_checkpoint(conn, seq, self._head, now_ms())
        self._tentative = (seq + 1, self._head, cp, None)
        return cp

    async def _adopt_foreign(self, conn: AsyncConnection) -> None:
        """Take records appended by another process after this head into the head.

        Only when the record at this process's head still has the hash this process wrote:
        a head that differs (the unsigned tail rewritten or deleted in the database) is not
        adopted and is logged; the checkpoint then signed over the head held in memory
        makes ``audit verify`` report the change.
        """
        mine = await self.seq_start(conn) - 1
        last = (
            await conn.execute(
                select(records.c.seq, records.c.hash, records.c.ts)
                .order_by(records.c.seq.desc())
                .limit(1)
            )
        ).first()
        db_last = last[0] if last else 0
        if db_last == mine and (last is None or bytes(last[1]) == self._head):
            return
        if db_last > mine:
            at_head = (
                await conn.execute(select(records.c.hash).where(records.c.seq == mine))
            ).scalar()
            if mine == 0 or (at_head is not None and bytes(at_head) == self._head):
                first = (
                    await conn.execute(
                        select(records.c.ts)
                        .where(records.c.seq > mine)
                        .order_by(records.c.seq)
                        .limit(1)
                    )
                ).scalar()
                since = self.unsigned_since
                assert last is not None and first is not None
                self._next_seq, self._head = db_last + 1, bytes(last[1])
                self.unsigned_since = first if since is None else min(since, first)
                return
        if self._mismatch_logged == (mine, db_last):
            return
        self._mismatch_logged = (mine, db_last)
        log.error(
            "the audit records in the database differ from those this bridge wrote (its "
            "head: seq %d; the database's: seq %d): the unsigned tail was changed or "
            "removed; the next checkpoint signs the head as written, `audit verify` will "
            "name the records",
            mine,
            db_last,
        )

    def audit_items(self, entries: Iterable[AuditEntry], ts: int) -> list[Plain]:
        return [
            Plain(
                e.kind,
                None,
                e.room_id,
                e.sender,
                e.type,
                ts,
                dumps(
                    {"room_id": e.room_id, "sender": e.sender, "type": e.type, "data": dict(e.data)}
                ),
            )
            for e in entries
        ]

    async def append_audit(
        self,
        conn: AsyncConnection,
        entries: Iterable[AuditEntry],
        ts: int | None = None,
        *,
        sign: bool = False,
    ) -> tuple[int, int]:
        """Append audit records in ``conn``'s transaction, archived at ``ts`` (else now);
        returns their (first_seq, last_seq). ``sign``: see :meth:`append_records`."""
        if ts is None:
            ts = now_ms()
        entries = list(entries)
        seqs = await self.append_records(conn, self.audit_items(entries, ts), ts, sign=sign)
        await add_daily(conn, finding_counts(((e.kind, e.type, e.data) for e in entries), ts))
        return seqs

    async def append(self, entries: Sequence[AuditEntry]) -> None:
        """Append audit records (gate decisions, outcomes, commands) in one commit."""
        if not entries:
            return

        await self.write_or_unavailable(lambda conn: self.append_audit(conn, entries))
