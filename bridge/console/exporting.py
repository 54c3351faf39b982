"""Streamed downloads of an archive search (JSONL or CSV), in constant memory.

Records are read in seq order a batch at a time (:meth:`RecordReader.iter_batches`), the
words filter applied as ``audit export --text`` does, and each batch written to the
response before the next is read. CSV cells that a spreadsheet would run as a formula
(``= + - @``, tab, CR first) are neutralised with a leading apostrophe.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web

from bridge.archive.export import searches_trail, text_matches
from bridge.console.readmodel import SearchFilters
from bridge.console.security import NO_STORE, SECURITY_HEADERS, neutralise_cell
from bridge.store import Store

FORMATS = ("jsonl", "csv")
COLUMNS = ("seq", "ts", "origin_ts", "kind", "event_id", "room_id", "sender", "type", "data")
_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv"}


def jsonl_lines(recs: Iterable[Mapping[str, Any]]) -> bytes:
    """One JSON object per record and line (the columns of :data:`COLUMNS`)."""
    return b"".join(
        json.dumps({k: rec.get(k) for k in COLUMNS}, ensure_ascii=False, default=str).encode()
        + b"\n"
        for rec in recs
    )


def csv_rows(recs: Iterable[Mapping[str, Any]], *, header: bool = False) -> bytes:
    """CSV rows (the data column as JSON), every text cell neutralised."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    if header:
        writer.writerow(COLUMNS)
    for rec in recs:
        cells = []
        for key in COLUMNS:
            value = rec.get(key)
            if key == "data":
                value = json.dumps(value, ensure_ascii=False, default=str)
            cells.append("" if value is None else neutralise_cell(str(value)))
        writer.writerow(cells)
    return buf.getvalue().encode()


async def stream(
    request: web.Request, store: Store, f: SearchFilters, fmt: str
) -> web.StreamResponse:
    """Send the records matching ``f`` as a file download in ``fmt``."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    response = web.StreamResponse(
        headers={
            **SECURITY_HEADERS,  # sent before the middleware could add them
            **NO_STORE,
            "Content-Type": f"{_TYPES[fmt]}; charset=utf-8",
            "Content-Disposition": f'attachment; filename="archive-{stamp}.{fmt}"',
        }
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    if fmt == "csv":
        await response.write(csv_rows((), header=True))
    words, query = f.words(), f.reader_args()
    trail = searches_trail(query["kind"])
    batches = store.reader.iter_batches(**query, batch=1000)
    async with contextlib.aclosing(batches):
        async for recs in batches:
            recs = text_matches(recs, words, trail=trail)
            if recs:
                await response.write(jsonl_lines(recs) if fmt == "jsonl" else csv_rows(recs))
    await response.write_eof()
    return response
