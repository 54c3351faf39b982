"""``audit export``'s output formats, and the work of an export worker process.

One copy of the formatting (:func:`format_jsonl`, :func:`format_csv`) and of ``--text``
(:func:`text_matches`) for the in-process path and the workers, so both write the same bytes.
:func:`export_batch` is what a worker does with a batch of sealed rows (see
:mod:`bridge.archive.parallel`): open them (:func:`bridge.audit.decode.decode_rows`, the store's
own code) with the data keys that came with the batch, apply ``--text``, format them.

A worker process loads this module, the crypto and the two standard-library modules of the
store that decoding needs: not asyncio, SQLAlchemy or the store (each worker is a process of
its own, and its memory counts).
"""

from __future__ import annotations

import csv
import ctypes
import functools
import gc
import io
import json
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from bridge.audit.crypto import DataKey
from bridge.audit.kinds import AuditKind

CSV_COLUMNS = ("seq", "ts", "origin_ts", "kind", "event_id", "room_id", "sender", "type", "data")
FORMATS = ("jsonl", "csv")

_jstr = json.encoder.encode_basestring  # a JSON string literal, non-ASCII kept (C speed)


def _json_text_function() -> Callable[[Any], str]:
    """``json.dumps(value, ensure_ascii=False)`` for values parsed from JSON.

    The same C encoder with the same settings, made once instead of per call (json.dumps
    builds a JSONEncoder and a C encoder every time: a third of its cost on an event). No
    check for reference cycles: a parsed JSON value has none (the output is the same).
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has the C encoder
        return functools.partial(json.dumps, ensure_ascii=False)
    encode = make(None, json.JSONEncoder().default, _jstr, None, ": ", ", ", False, False, True)
    join = "".join

    def json_text(value: Any) -> str:
        if isinstance(value, str):
            return _jstr(value)
        return join(encode(value, 0))

    return json_text


json_text = _json_text_function()


#: The search trail: records of who logged in, searched, viewed or exported what. They hold
#: the words people searched for, so a word search would find its own earlier searches; they
#: match words only when the search asks for their kind (``--type access``).
TRAIL_KINDS = frozenset({AuditKind.LOGIN, AuditKind.ACCESS, AuditKind.EXPORT})


def searches_trail(kind: str | None) -> bool:
    """Whether a search filtered to ``kind`` (None: every kind) looks into the trail."""
    return kind in TRAIL_KINDS


def text_matches(
    recs: list[dict[str, Any]], words: Sequence[str], *, trail: bool = False
) -> list[dict[str, Any]]:
    """The records whose data holds every one of ``words`` (casefolded), as ``--text``.

    Matched against the data's JSON text (non-ASCII kept), casefolded; unreadable records
    (no data) never match, nor do the search trail's (:data:`TRAIL_KINDS`) unless ``trail``.
    """
    if not words:
        return recs
    dumps = json_text
    out = []
    for r in recs:
        data = r["data"]
        if data is None or (not trail and r.get("kind") in TRAIL_KINDS):
            continue
        text = dumps(data).casefold()
        if all(w in text for w in words):
            out.append(r)
    return out


def format_jsonl(recs: list[dict[str, Any]]) -> bytes:
    """One JSON object per line, UTF-8. Pops ``json`` from the records: an event's archived
    JSON, copied into its line as stored (not serialised again from ``data``).

    Built as bytes, line by line: a chunk joined as text first would be as wide as its widest
    character (one emoji, and every character of the chunk takes 4 bytes and the slow path
    of the encoder).
    """
    dumps = json.dumps
    jstr = _jstr
    parts: list[bytes] = []
    add = parts.append
    for rec in recs:
        raw = rec.pop("json", None)
        if raw is None:
            add(dumps(rec, ensure_ascii=False).encode())
            add(b"\n")
            continue
        event_id, room_id = rec["event_id"], rec["room_id"]
        sender, etype = rec["sender"], rec["type"]
        add(
            (
                f'{{"seq": {rec["seq"]:d}, "ts": {rec["ts"]:d}, "kind": {jstr(rec["kind"])}, '
                f'"event_id": {"null" if event_id is None else jstr(event_id)}, '
                f'"room_id": {"null" if room_id is None else jstr(room_id)}, '
                f'"sender": {"null" if sender is None else jstr(sender)}, '
                f'"type": {"null" if etype is None else jstr(etype)}, '
                f'"origin_ts": {rec["origin_ts"]:d}, "data": '
            ).encode()
        )
        add(raw)
        add(b"}\n")
    return b"".join(parts)


def _csv_cell(value: Any) -> str:
    """One field as the csv module writes it in its default dialect (``excel``): None empty,
    other values as ``str()``; quoted when it holds a quote, comma, CR or LF, quotes doubled.
    """
    if value is None:
        return ""
    if type(value) is not str:
        if type(value) is int:  # digits and a sign: never quoted
            return str(value)
        value = str(value)
    if '"' in value:
        return '"' + value.replace('"', '""') + '"'
    if "," in value or "\n" in value or "\r" in value:
        return '"' + value + '"'
    return value


def csv_header() -> bytes:
    """The header row (:data:`CSV_COLUMNS`), written by the csv module itself."""
    buf = io.StringIO(newline="")
    csv.writer(buf).writerow(CSV_COLUMNS)
    return buf.getvalue().encode()


def format_csv(recs: list[dict[str, Any]]) -> bytes:
    """CSV rows (:data:`CSV_COLUMNS`, CRLF), UTF-8, the data as JSON (``json.dumps``).

    The bytes of ``csv.writer`` in its default dialect (the tests compare them), written
    without it: its per-character loop cost more than everything else per record. The data
    field, the long one, is quoted as UTF-8 bytes (a quote is one byte there, and no other
    character contains that byte).
    """
    text = json_text
    cell = _csv_cell
    parts: list[bytes] = []
    add = parts.append
    for rec in recs:
        get = rec.get
        add(
            (
                f"{cell(get('seq'))},{cell(get('ts'))},{cell(get('origin_ts'))},"
                f"{cell(get('kind'))},{cell(get('event_id'))},{cell(get('room_id'))},"
                f"{cell(get('sender'))},{cell(get('type'))},"
            ).encode()
        )
        data = text(rec["data"]).encode()
        if b'"' in data:
            add(b'"')
            add(data.replace(b'"', b'""'))
            add(b'"\r\n')
        elif b"," in data or b"\n" in data or b"\r" in data:
            add(b'"')
            add(data)
            add(b'"\r\n')
        else:
            add(data)
            add(b"\r\n")
    return b"".join(parts)


def format_records(recs: list[dict[str, Any]], fmt: str) -> bytes:
    """``recs`` in the output format ``fmt`` (``jsonl`` or ``csv``), UTF-8."""
    return format_jsonl(recs) if fmt == "jsonl" else format_csv(recs)


# -- both sides ------------------------------------------------------------------------


def keep_heap_pages() -> None:
    """Serve batch-sized buffers from the heap, and keep freed heap pages (glibc only).

    Each batch makes buffers of about a megabyte on both sides of the pool's pipes (pickled
    rows, output chunks). By default glibc maps each one afresh and unmaps it when freed, so
    every page of every batch faults in again: that doubled the CPU time of moving a batch.
    Up to 64 MB of freed heap is kept instead (the peak resident size stays that of the
    largest batches in flight). Elsewhere (no ``mallopt``) this does nothing.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return
    mallopt(_M_MMAP_THRESHOLD, 16 << 20)
    mallopt(_M_TRIM_THRESHOLD, 64 << 20)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


# -- worker side -----------------------------------------------------------------------

#: Data keys a worker has seen, by id (each batch brings the ones it needs again).
_worker_keys: dict[str, DataKey] = {}


def init_worker() -> None:
    """Start of a worker process: load what opening records needs, and only that."""
    from bridge.audit import decode  # noqa: F401

    keep_heap_pages()
    # what is loaded now lives as long as the process: keep it out of every collection
    gc.freeze()


def _keys(material: Iterable[tuple[str, bytes, bytes]]) -> dict[str, DataKey]:
    out = {}
    cache = _worker_keys
    for key_id, scope, key in material:
        dk = cache.get(key_id)
        if dk is None or dk.key != key or dk.scope != scope:
            dk = cache[key_id] = DataKey(key_id, scope, key)
        out[key_id] = dk
    return out


def export_batch(
    rows: Sequence[Sequence[Any]],
    material: Iterable[tuple[str, bytes, bytes]],
    shredded: frozenset[str],
    fmt: str,
    words: Sequence[str],
    trail: bool = False,
) -> tuple[bytes, int]:
    """Open, filter and format one batch of sealed rows: ``(output, records written)``.

    Runs in a worker process (or anywhere: it is pure). ``material`` and ``shredded`` as
    :meth:`bridge.store.keys.KeyRepository.key_material` returns them.
    """
    from bridge.audit.decode import decode_rows

    recs = decode_rows(rows, _keys(material), shredded, raw_json=fmt == "jsonl")
    recs = text_matches(recs, words, trail=trail)
    return format_records(recs, fmt), len(recs)


# -- the output file ---------------------------------------------------------------------

PRIVATE_MODE = 0o600
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class OutputExists(FileExistsError):
    """The export's output file exists and ``--force`` was not given."""


class PrivateOutput:
    """An export's output file, readable by its owner only (mode 0600).

    It is created with ``O_CREAT|O_EXCL|O_NOFOLLOW``: an existing file, or a symlink planted
    where the output goes, is refused (:class:`OutputExists`). With ``replace`` the export is
    written to a new file beside it, created the same way, which :meth:`commit` renames over
    the old one: the rename replaces a symlink itself, never the file it points to, and a
    failed export leaves the old file as it was.
    """

    def __init__(self, path: Path, *, replace: bool = False, buffering: int = 1 << 20) -> None:
        self.path = path
        self._temp: Path | None = None
        self.committed = False
        target = path
        if replace:
            target = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")
            self._temp = target
        try:
            fd = os.open(target, _CREATE, PRIVATE_MODE)
        except FileExistsError:
            raise OutputExists(f"{path} already exists; pass --force to replace it") from None
        os.fchmod(fd, PRIVATE_MODE)  # whatever the umask
        self.file: IO[bytes] = os.fdopen(fd, "wb", buffering=buffering)

    def commit(self) -> None:
        """Close the file; with ``replace``, move it to the output path."""
        self.committed = True
        self.file.close()
        if self._temp is not None:
            os.replace(self._temp, self.path)
            self._temp = None

    def discard(self) -> None:
        """Close the file after a failure; with ``replace``, delete the new file."""
        if self.committed:
            return
        self.file.close()
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)
            self._temp = None
