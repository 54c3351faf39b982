"""Reading the records back: iteration, search summaries, counts."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from typing import Any, TypedDict, Unpack

from sqlalchemy import case, func, null, select
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.audit import codec, decode
from bridge.audit.codec import str_or_none
from bridge.audit.kinds import EVENT_TYPED_KINDS, AuditKind
from bridge.store.chain import prefetched
from bridge.store.database import Database
from bridge.store.keys import KeyRepository
from bridge.store.models import RecordMeta, SearchGroup, SearchSummary, StoreError
from bridge.store.schema import SEALED_PART, records

_EVENT = AuditKind.EVENT  # bound once: compared for every record
#: A summary's type column: the type index where it holds an event type, else NULL.
_GROUP_TYPE = case(
    (records.c.kind.in_(sorted(EVENT_TYPED_KINDS)), records.c.type_idx), else_=null()
).label("group_type")

#: What a reader decrypts of a record: seq, ts, kind, origin_ts and the sealed part
#: (:data:`bridge.audit.decode.SEALED_COLUMNS`).
READ_COLUMNS = (records.c.seq, records.c.ts, records.c.kind, records.c.origin_ts, *SEALED_PART)


class RecordQuery(TypedDict, total=False):
    """The keyword arguments of :meth:`RecordReader.iter_batches`."""

    kind: str | None
    batch: int
    room: str | None
    sender: str | None
    type: str | None
    since: int | None
    until: int | None
    after: int
    raw_json: bool


class RecordReader:
    """Decrypting reads of the records: streams, search summaries, counts."""

    def __init__(self, db: Database, keys: KeyRepository) -> None:
        self.db = db
        self.keys = keys

    async def iter_batches(
        self,
        *,
        kind: str | None = None,
        batch: int = 2000,
        room: str | None = None,
        sender: str | None = None,
        type: str | None = None,
        since: int | None = None,
        until: int | None = None,
        after: int = 0,
        raw_json: bool = False,
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        """Stream records in sequence order, decrypted, in constant memory, by batches.

        Filters: room, sender and type by blind-index equality; ``since``/``until`` (ms,
        inclusive/exclusive) on the event's origin_server_ts; ``after`` a seq. Each dict has
        seq, ts, kind, event_id, room_id, sender, type, origin_ts and data (the event, or the
        audit entry's data); ``data`` is None when the ciphertext expired or the room key was
        destroyed (``unreadable`` says which). A shred record has no ciphertext: its ``data``
        is ``{"destroyed_key_id": …}`` from its plain columns. With ``raw_json`` an event's
        dict also holds ``json``: its stored JSON text (UTF-8 bytes), exactly as archived
        (exports copy it instead of serialising ``data`` again). A record that fails to
        authenticate, or whose data key is unknown (neither in the store nor shredded), raises
        StoreError naming it.
        Decoding: :func:`bridge.audit.decode.decode_rows`.
        """
        sealed = self.iter_sealed_batches(
            kind=kind,
            batch=batch,
            room=room,
            sender=sender,
            type=type,
            since=since,
            until=until,
            after=after,
        )
        async with contextlib.aclosing(sealed) as batches:
            async for rows in batches:
                try:
                    recs = decode.decode_rows(
                        rows, self.keys.by_id, self.keys.shredded, raw_json=raw_json
                    )
                except decode.RecordError as e:
                    raise StoreError(str(e)) from None
                yield recs

    async def iter_sealed_batches(
        self,
        *,
        kind: str | None = None,
        batch: int = 2000,
        room: str | None = None,
        sender: str | None = None,
        type: str | None = None,
        since: int | None = None,
        until: int | None = None,
        after: int = 0,
    ) -> AsyncGenerator[Sequence[Any], None]:
        """The rows of :meth:`iter_batches`, still sealed, their data keys loaded.

        Rows of :data:`bridge.audit.decode.SEALED_COLUMNS`, in seq order, the next batch read
        ahead; open them with :func:`bridge.audit.decode.decode_rows` and this store's keys,
        or in another process with :meth:`KeyRepository.key_material`.
        """
        conds = self._record_conds(kind, room, sender, type, since, until)
        query = select(*READ_COLUMNS).where(*conds).order_by(records.c.seq).limit(batch)

        async def fetch(last: int) -> Sequence[Any]:
            async with self.db.connect() as conn:
                rows = (await conn.execute(query.where(records.c.seq > last))).all()
                await self.keys.by_ids(conn, {r[5] for r in rows})
            return rows

        async with contextlib.aclosing(prefetched(fetch, after)) as batches:
            async for rows in batches:
                yield rows

    async def count(
        self,
        *,
        kind: str | None = None,
        room: str | None = None,
        sender: str | None = None,
        type: str | None = None,
        since: int | None = None,
        until: int | None = None,
        at_most: int | None = None,
    ) -> int:
        """How many records the filters of :meth:`iter_batches` match (no decryption).

        With ``at_most`` the database stops counting there (cheap on a large archive).
        """
        conds = self._record_conds(kind, room, sender, type, since, until)
        matching = select(records.c.seq).where(*conds)
        if at_most is not None:
            matching = matching.limit(at_most)
        async with self.db.connect() as conn:
            return (
                await conn.execute(select(func.count()).select_from(matching.subquery()))
            ).scalar_one()

    async def iter(self, **query: Unpack[RecordQuery]) -> AsyncGenerator[dict[str, Any], None]:
        """Stream records in sequence order, decrypted (see :meth:`iter_batches`)."""
        async with contextlib.aclosing(self.iter_batches(**query)) as batches:
            async for recs in batches:
                for rec in recs:
                    yield rec

    def _record_conds(
        self,
        kind: str | None,
        room: str | None,
        sender: str | None,
        type: str | None,
        since: int | None,
        until: int | None,
    ) -> list[Any]:
        conds: list[Any] = []
        if kind is not None:
            if room is None and sender is None and type is None:
                # Read in seq order along the primary key: an index on kind would make the
                # database sort every page (pages get slower as the archive grows).
                conds.append(func.coalesce(records.c.kind, "") == kind)
            else:
                conds.append(records.c.kind == kind)
        if room is not None:
            conds.append(records.c.room_idx == self.keys.bidx("room", room))
        if sender is not None:
            conds.append(records.c.sender_idx == self.keys.bidx("sender", sender))
        if type is not None:
            conds.append(records.c.type_idx == self.keys.bidx("type", type))
        if since is not None:
            conds.append(records.c.origin_ts >= since)
        if until is not None:
            conds.append(records.c.origin_ts < until)
        return conds

    async def _describe(self, conn: AsyncConnection, seqs: Iterable[int]) -> dict[int, RecordMeta]:
        """Metadata (never content) of the records ``seqs``, decrypted where readable."""
        rows = (
            await conn.execute(select(*READ_COLUMNS).where(records.c.seq.in_(list(seqs))))
        ).all()
        await self.keys.by_ids(conn, {r[5] for r in rows})
        out = {}
        for seq, ts, rkind, origin, room_idx, key_id, nonce, ct in rows:
            pt = self.keys.decrypt(seq, room_idx, key_id, nonce, ct)
            obj: Any = {}
            if pt is not None:
                try:
                    obj = codec.loads(pt)
                except ValueError:
                    raise StoreError(f"audit record seq {seq}: plaintext is not JSON") from None
            if not isinstance(obj, dict):
                obj = {}
            out[seq] = RecordMeta(
                seq,
                ts,
                rkind,
                origin,
                str_or_none(obj.get("event_id")) if rkind == _EVENT else None,
                str_or_none(obj.get("room_id")),
                str_or_none(obj.get("sender")),
                str_or_none(obj.get("type")),
                pt is not None,
            )
        return out

    async def search_summary(
        self,
        *,
        kind: str | None = None,
        room: str | None = None,
        sender: str | None = None,
        type: str | None = None,
        since: int | None = None,
        until: int | None = None,
        groups: int = 15,
        latest: int = 5,
    ) -> SearchSummary:
        """How many records match, per (kind, room, type), and the latest few, no content.

        Only kinds whose type is an event type (:data:`EVENT_TYPED_KINDS`) are grouped by
        type; the others (commands, actions, …) by kind and room alone, with ``type`` None.

        Counting runs in the database over the blind indexes; only one record per group
        and the ``latest`` ones are decrypted, for their room ID, type and event ID.
        """
        conds = self._record_conds(kind, room, sender, type, since, until)
        async with self.db.connect() as conn:
            total = (
                await conn.execute(select(func.count()).select_from(records).where(*conds))
            ).scalar_one()
            count = func.count().label("n")
            grouped = (
                await conn.execute(
                    select(
                        records.c.kind,
                        records.c.room_idx,
                        _GROUP_TYPE,
                        count,
                        func.max(records.c.seq),
                    )
                    .where(*conds)
                    .group_by(records.c.kind, records.c.room_idx, _GROUP_TYPE)
                    .order_by(count.desc(), func.max(records.c.seq).desc())
                    .limit(groups + 1)
                )
            ).all()
            last = (
                await conn.execute(
                    select(records.c.seq).where(*conds).order_by(records.c.seq.desc()).limit(latest)
                )
            ).all()
            metas = await self._describe(
                conn, {g[4] for g in grouped[:groups]} | {r[0] for r in last}
            )
        out_groups = [
            SearchGroup(
                metas[g[4]].kind,
                metas[g[4]].room_id,
                metas[g[4]].type if g[2] is not None else None,
                g[3],
                metas[g[4]].origin_ts,
                metas[g[4]].readable,
            )
            for g in grouped[:groups]
        ]
        return SearchSummary(total, out_groups, len(grouped) > groups, [metas[r[0]] for r in last])

    async def newest_page(
        self,
        *,
        kind: str | None = None,
        kinds: Sequence[str] = (),
        room: str | None = None,
        sender: str | None = None,
        type: str | None = None,
        since: int | None = None,
        until: int | None = None,
        before: int | None = None,
        limit: int = 50,
        keep: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
        scan_limit: int = 20_000,
    ) -> tuple[list[dict[str, Any]], int | None]:
        """One page of matching records, newest first (keyset pagination on seq).

        The filters of :meth:`iter_batches` (``kinds``: any of these kinds), ``before``: only
        records with a lower seq. Rows are read newest-first in batches along an index
        (room, sender or kind, then seq), decrypted, and passed through ``keep`` (e.g. the
        words filter) until ``limit`` are kept or ``scan_limit`` rows were read. Returns the
        page and the seq to continue before (None when nothing older is left to scan).
        """
        conds = self._record_conds(None, room, sender, type, since, until)
        # one query per kind, each along its (kind, seq) index, merged here: a kind IN (…)
        # would make the database sort every record of those kinds for each batch
        per_kind: list[list[Any]] = [[records.c.kind == k] for k in ([kind] if kind else kinds)]
        out: list[dict[str, Any]] = []
        scanned = 0
        cursor = before
        batch = max(limit, 100) if keep is None else max(limit * 4, 500)
        while len(out) < limit and scanned < scan_limit:
            rows: list[Any] = []
            async with self.db.connect() as conn:
                for extra in per_kind or [[]]:
                    query = select(*READ_COLUMNS).where(*conds, *extra)
                    if cursor is not None:
                        query = query.where(records.c.seq < cursor)
                    query = query.order_by(records.c.seq.desc()).limit(batch)
                    rows.extend((await conn.execute(query)).all())
                if len(per_kind) > 1:  # the newest ``batch`` of the union, in seq order
                    rows.sort(key=lambda r: -r[0])
                    del rows[batch:]
                await self.keys.by_ids(conn, {r[5] for r in rows})
            if not rows:
                return out, None
            scanned += len(rows)
            try:
                recs = decode.decode_rows(rows, self.keys.by_id, self.keys.shredded)
            except decode.RecordError as e:
                raise StoreError(str(e)) from None
            if keep is not None:
                recs = keep(recs)
            for rec in recs:
                out.append(rec)
                if len(out) == limit:
                    return out, int(rec["seq"])
            cursor = int(rows[-1][0])
            if len(rows) < batch:
                return out, None
        return out, cursor

    async def one(self, seq: int) -> dict[str, Any] | None:
        """The record ``seq``, decrypted (as :meth:`iter_batches` yields it), or None."""
        async with self.db.connect() as conn:
            rows = (await conn.execute(select(*READ_COLUMNS).where(records.c.seq == seq))).all()
            await self.keys.by_ids(conn, {r[5] for r in rows})
        if not rows:
            return None
        try:
            return decode.decode_rows(rows, self.keys.by_id, self.keys.shredded)[0]
        except decode.RecordError as e:
            raise StoreError(str(e)) from None
