"""The attachment gate: ``POST {gate}/check_media_file_for_spam`` from the project's module.

The module calls it from Synapse's ``check_media_file_for_spam`` with the file's bytes as
the body (``application/octet-stream``, streamed) and these headers:

* ``Authorization: Bearer <gate token>`` (compared in constant time);
* ``X-Bridge-Media-Kind``: ``upload``, ``remote``, ``thumbnail`` or ``url_preview``;
* ``X-Bridge-Media-Id``: Synapse's file ID (recorded, never trusted for anything else);
* ``X-Bridge-Media-Length``: the file's total size (recorded; the body is counted anyway);
* ``X-Bridge-Media-Over-Limit: 1`` with an EMPTY body when the file is over the module's
  limit;
* ``X-Bridge-Media-User`` (optional): the local user whose request it is (the uploader),
  told in a policy notice why a file was refused, since Synapse answers every refused upload
  with "Bad content" only;
* ``X-Bridge-Media-Name`` (optional, percent-encoded): an upload's file name, which Synapse
  stores and serves with the file: judged with the file's text;
  ``X-Bridge-Media-Name-Truncated: 1`` when the module had to cut it (the file then counts
  as over the reading bounds: ``limit``);
* ``X-Bridge-Media-Path`` (percent-encoded) with an EMPTY body: the file's path in Synapse's
  media store, when the module is set to ``media_delivery: path`` and this bridge reads the
  same store (``attachments.shared_media_store``, :mod:`bridge.attachments.shared_store`).
  When it cannot read that file (no shared store configured, not mounted, outside the
  store) it answers 409 ``BRIDGE_MEDIA_PATH_UNREADABLE`` and the module sends the bytes.

The body is read in chunks up to ``attachments.max_file_mb`` (a longer body is not read
further: the file counts as too large). Its type is sniffed from the bytes, its text read in
the extraction pool and judged by the GLOBAL DLP rules (an upload has no room yet). 200 ``{}``
allows; a refusal is 403 ``{"errcode": "M_FORBIDDEN", "error": <the rule's message>}`` (never
the matched text). Every refusal, every file that could not be read and every ``notify`` or
``audit`` finding is audited (digest, size, type, rule; never content) before the answer;
``notify`` rules and refusals reach the management room. Thumbnails are Synapse's own
renderings of an image it already checked: allowed without reading.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from bridge import metrics
from bridge.archive.sink import AuditSink
from bridge.attachments.decide import MediaVerdict, decide
from bridge.attachments.extract import Extraction
from bridge.attachments.kinds import FileType, Outcome, Unreadable
from bridge.attachments.pool import ExtractionPool, FileRef, read_at
from bridge.attachments.shared_store import StoredFile, StoredFileError, locate, open_stored
from bridge.attachments.sniff import textless
from bridge.audit.kinds import AuditKind
from bridge.config import AttachmentsConfig
from bridge.http.transactions import bearer_token, matrix_error, token_matches
from bridge.policy.engine import PolicyEngine
from bridge.policy.model import Action, Finding
from bridge.policy.notices import new_ref
from bridge.store import AuditEntry

log = logging.getLogger(__name__)

CALLBACK = "check_media_file_for_spam"
#: Seconds a decision may wait for its audit record's commit (as the gate).
AUDIT_WAIT = 1.0
#: Texts longer than this are judged on a thread, not on the event loop.
INLINE_SCAN_CHARS = 64 * 1024
_CHUNK = 256 * 1024
#: Files up to this size are hashed on the event loop (well under a millisecond); larger
#: ones on a thread.
INLINE_IO_BYTES = 2 * 1024 * 1024
#: The answer that makes the module send the file's bytes after all.
PATH_UNREADABLE = "BRIDGE_MEDIA_PATH_UNREADABLE"
_MEDIA_ID = re.compile(r"[A-Za-z0-9._=-]{1,255}")
_USER_ID = re.compile(r"@[\x21-\x39\x3b-\x7e]+:[\x21-\x7e]+")


class MediaKind(StrEnum):
    """Which of Synapse's media paths the file came through (``X-Bridge-Media-Kind``)."""

    UPLOAD = "upload"
    REMOTE = "remote"
    THUMBNAIL = "thumbnail"
    URL_PREVIEW = "url_preview"


@dataclass(frozen=True, slots=True)
class MediaRequest:
    """The headers of one call, validated."""

    kind: MediaKind
    media_id: str
    length: int
    over_limit: bool
    path: str | None = None  # percent-encoded, as Synapse names the file
    user_id: str | None = None  # whose request it is, when the module knows
    file_name: str | None = None  # an upload's file name, as the uploader gave it
    name_cut: bool = False  # the module sent only the start of a longer name


def parse_headers(request: web.Request) -> MediaRequest | str:
    """The call's headers, or what is wrong with them."""
    raw_kind = request.headers.get("X-Bridge-Media-Kind", "")
    try:
        kind = MediaKind(raw_kind)
    except ValueError:
        return "X-Bridge-Media-Kind must be one of " + ", ".join(k.value for k in MediaKind)
    media_id = request.headers.get("X-Bridge-Media-Id", "")
    if not _MEDIA_ID.fullmatch(media_id):
        return "X-Bridge-Media-Id must be 1-255 characters of A-Z a-z 0-9 . _ = -"
    raw_length = request.headers.get("X-Bridge-Media-Length", "")
    if not raw_length.isascii() or not raw_length.isdigit() or len(raw_length) > 15:
        return "X-Bridge-Media-Length must be a non-negative integer"
    over = request.headers.get("X-Bridge-Media-Over-Limit", "0")
    if over not in ("0", "1"):
        return "X-Bridge-Media-Over-Limit must be 0 or 1"
    path = request.headers.get("X-Bridge-Media-Path")
    if path is not None and (not path or not path.isascii() or not path.isprintable()):
        return "X-Bridge-Media-Path must be a percent-encoded absolute path"
    user_id = request.headers.get("X-Bridge-Media-User")
    if user_id is not None and (len(user_id) > 255 or not _USER_ID.fullmatch(user_id)):
        return "X-Bridge-Media-User must be a user ID (@name:server)"
    raw_name = request.headers.get("X-Bridge-Media-Name")
    if raw_name is not None and (not raw_name.isascii() or not raw_name.isprintable()):
        return "X-Bridge-Media-Name must be percent-encoded"
    name = unquote(raw_name, errors="replace") if raw_name else None
    cut = request.headers.get("X-Bridge-Media-Name-Truncated", "0")
    if cut not in ("0", "1"):
        return "X-Bridge-Media-Name-Truncated must be 0 or 1"
    return MediaRequest(
        kind, media_id, int(raw_length), over == "1", path, user_id, name, cut == "1"
    )


async def read_capped(request: web.Request, cap: int) -> tuple[bytes, bool]:
    """Up to ``cap`` bytes of the body, read in chunks: ``(data, over)``; ``over`` when the
    body holds more (not read any further)."""
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(_CHUNK)
        if not chunk:
            break
        if size + len(chunk) > cap:
            return b"", True
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts), False


def open_shared(cfg: AttachmentsConfig, reported: str) -> StoredFile:
    """The file Synapse named, opened in the shared media store (a local open, as the
    module's own), or :class:`StoredFileError`."""
    shared = cfg.shared_media
    if shared is None:
        raise StoredFileError("this bridge has no attachments.shared_media_store")
    local = locate(shared.synapse_path, shared.path, reported)

    def enough(head: bytes) -> bool:  # an image or a video: its head says all we read
        return textless(head) is not None

    return open_stored(local, cfg.limits.max_file_bytes, enough)


async def digest_of(source: bytes | FileRef) -> str:
    """The file's SHA-256 for its audit record (on a thread when large)."""
    if isinstance(source, bytes):
        if len(source) <= INLINE_IO_BYTES:
            return hashlib.sha256(source).hexdigest()
        return await asyncio.to_thread(lambda: hashlib.sha256(source).hexdigest())
    fd, size = source.fd, source.size
    return await asyncio.to_thread(lambda: hashlib.sha256(read_at(fd, size)).hexdigest())


def media_audit(
    path: str,
    verdict: MediaVerdict,
    extraction: Extraction,
    *,
    digest: str,
    size: int,
    extra: dict[str, Any],
    room_id: str | None = None,
    sender: str | None = None,
) -> AuditEntry:
    """The audit record of one judged file: never its content, never the matched text."""
    return AuditEntry(
        kind=AuditKind.MEDIA,
        room_id=room_id,
        sender=sender,
        type=str(extraction.file_type),
        data={
            "path": path,
            "outcome": str(verdict.outcome),
            "sha256": digest,
            "size": size,
            "file_type": str(extraction.file_type),
            "types": [str(t) for t in extraction.types],
            "unreadable": None if extraction.reason is None else str(extraction.reason),
            "detail": extraction.detail,
            "rule": verdict.refusal.rule if verdict.refusal else None,
            "findings": [
                {"rule": f.rule, "actions": sorted(f.actions), "excerpt": f.excerpt}
                for f in verdict.findings
            ],
            **extra,
        },
    )


def with_name(extraction: Extraction, name: str | None, cut: bool) -> Extraction:
    """The extraction with the upload's file name judged as part of its text (a name is
    text a user chose, stored and served with the file); a name the module had to cut
    makes the file one over the reading bounds."""
    if not name:
        return extraction
    named = replace(extraction, text=f"{name}\n{extraction.text}")
    if cut and extraction.reason is None:
        return replace(named, reason=Unreadable.LIMIT, detail="file name too long to read")
    return named


def file_label(file_type: FileType, size: int) -> str:
    """A file as a notice names it: its type and size (``PDF, 988 KiB``), never its name."""
    if size >= 1024 * 1024:
        amount = f"{size / (1024 * 1024):.1f} MiB"
    elif size >= 1024:
        amount = f"{size // 1024} KiB"
    else:
        amount = f"{size} bytes"
    return f"{_LABELS.get(file_type, str(file_type).upper())}, {amount}"


_LABELS = {
    FileType.TEXT: "text",
    FileType.MEDIA: "image, audio or video",
    FileType.EMPTY: "file",
    FileType.UNKNOWN: "file",
}


def notify_lines(verdict: MediaVerdict, where: str, digest: str) -> list[str]:
    """Management-room lines for ``notify`` findings and for a refusal (masked excerpts)."""
    lines = []
    verb = "blocked" if verdict.refused else "matched"
    for f in verdict.findings:
        if Action.NOTIFY in f.actions:
            line = f"Policy {f.rule} {verb} {where} (sha256 {digest[:16]}…)"
            lines.append(line + (f": {f.excerpt}" if f.excerpt else ""))
    if verdict.outcome is Outcome.UNREADABLE_REFUSED and verdict.refusal is not None:
        lines.append(f"Policy {verdict.refusal.rule} refused {where} (sha256 {digest[:16]}…)")
    return lines


async def judge(
    extraction: Extraction, engine: PolicyEngine, room_id: str | None, cfg: AttachmentsConfig
) -> MediaVerdict:
    """:func:`decide` with the rules in force in ``room_id`` (global for None), on a thread
    for long texts."""
    dlp = engine.dlp_for(room_id)
    if len(extraction.text) <= INLINE_SCAN_CHARS:
        return decide(extraction, dlp, cfg.unreadable)
    return await asyncio.to_thread(decide, extraction, dlp, cfg.unreadable)


class MediaGate:
    """The aiohttp handler of the attachment callback."""

    def __init__(
        self,
        base_path: str,
        token: str,
        config: Callable[[], AttachmentsConfig],
        engine: Callable[[], PolicyEngine],
        pool: ExtractionPool,
        sink: AuditSink | None,
        notify: Callable[[str], None] | None = None,
        uploader_refused: Callable[[str, str, Finding, str], None] | None = None,
    ) -> None:
        self.base_path = base_path
        self.token = token
        self.config = config
        self.engine = engine
        self.pool = pool
        self.sink = sink
        # Posts a line in the management room; must not block (it only schedules work).
        self.notify = notify
        # (user ID, reference, refusing finding, file label): tells the uploader, in the
        # background (SenderNotices.upload_refused).
        self.uploader_refused = uploader_refused

    def routes(self) -> list[web.RouteDef]:
        """The route; add it BEFORE the gate's catch-all ``{callback}`` route."""
        return [web.post(f"{self.base_path}/{CALLBACK}", self.check)]

    async def check(self, request: web.Request) -> web.Response:
        """Judge one file (see the module docstring)."""
        if not token_matches(bearer_token(request), self.token):
            log.warning("media gate call refused: bad or missing token")
            return matrix_error(403, "M_FORBIDDEN", "invalid gate token")
        parsed = parse_headers(request)
        if isinstance(parsed, str):
            return matrix_error(400, "M_BAD_PARAM", parsed)
        cfg = self.config()
        if not cfg.enabled or parsed.kind is MediaKind.THUMBNAIL:
            return web.json_response({})
        started = time.perf_counter()
        cap = cfg.limits.max_file_bytes
        if (parsed.over_limit or parsed.path is not None) and await request.content.read(1):
            return matrix_error(400, "M_BAD_PARAM", "this call has an empty body")
        stored: StoredFile | None = None
        source: bytes | FileRef = b""
        if parsed.over_limit:
            over, size = True, parsed.length
        elif parsed.path is not None:
            try:
                stored = open_shared(cfg, parsed.path)
            except StoredFileError as e:
                log.warning(
                    "media gate: %s %s not read from the shared media store (%s); the module"
                    " sends it in the body",
                    parsed.kind,
                    parsed.media_id,
                    e,
                )
                return matrix_error(409, PATH_UNREADABLE, f"shared media store: {e}")
            over, size = stored.over, stored.size
            parsed = replace(parsed, length=size)
            if stored.fd is not None:  # the workers read it by its descriptor
                source = FileRef(stored.fd, size, stored.head[:1024])
            else:
                source = stored.head  # the whole file, or the head of an image or video
        else:
            source, over = await read_capped(request, cap)
            size = parsed.length if over else len(source)
        try:
            return await self._judge(parsed, cfg, source, size, over, started)
        finally:
            if stored is not None:
                stored.close()

    async def _judge(
        self,
        parsed: MediaRequest,
        cfg: AttachmentsConfig,
        source: bytes | FileRef,
        size: int,
        over: bool,
        started: float,
    ) -> web.Response:
        """Read, judge, record and answer for one received file."""
        cap = cfg.limits.max_file_bytes
        if over:
            extraction = Extraction(
                FileType.UNKNOWN,
                reason=Unreadable.TOO_LARGE,
                detail=f"over the {cap} bytes read",
            )
            elapsed = 0.0
        elif isinstance(source, bytes) and (known := textless(source)) is not None:
            extraction, elapsed = Extraction(known, types=(known,)), 0.0  # images, audio, video
        else:
            extraction, elapsed = await self.pool.extract(source, cfg.limits)
        extraction = with_name(extraction, parsed.file_name, parsed.name_cut)
        verdict = await judge(extraction, self.engine(), None, cfg)
        # Hashed only for a record: an allowed file without findings needs no digest.
        recorded = verdict.outcome is not Outcome.ALLOWED or bool(verdict.findings)
        digest = await digest_of(source) if recorded and not over else ""
        ftype = str(extraction.file_type)
        metrics.MEDIA_CHECKS.labels("gate", str(verdict.outcome), ftype).inc()
        if elapsed:
            metrics.MEDIA_EXTRACT_SECONDS.labels(ftype).observe(elapsed)
        for f in verdict.findings:
            metrics.DLP_HITS.labels(f.rule, "gate").inc()
        ref = new_ref() if verdict.refusal is not None else None
        if recorded:
            extra = {
                "media_kind": str(parsed.kind),
                "media_id": parsed.media_id,
                "declared_length": parsed.length,
                "ms": round(elapsed * 1000, 1),
                **({"ref": ref} if ref else {}),
            }
            entry = media_audit(
                "gate",
                verdict,
                extraction,
                digest=digest,
                size=size,
                extra=extra,
                sender=parsed.user_id,
            )
            await self._record(entry, refusal=verdict.refused)
            lines = notify_lines(verdict, f"an {parsed.kind} ({ftype})", digest or "-" * 16)
            if lines and self.notify is not None:
                self.notify("\n".join(lines))
        metrics.GATE_LATENCY.labels(CALLBACK).observe(time.perf_counter() - started)
        if verdict.refusal is None:
            return web.json_response({})
        # Only an uploader is told (remote media refused for a reader is no upload of theirs).
        if ref and parsed.user_id and parsed.kind is MediaKind.UPLOAD and self.uploader_refused:
            label = file_label(extraction.file_type, size)
            self.uploader_refused(parsed.user_id, ref, verdict.refusal, label)
        log.info(
            "media gate refused %s %s (%s, %d bytes): rule %s",
            parsed.kind,
            parsed.media_id,
            ftype,
            size,
            verdict.refusal.rule,
        )
        return matrix_error(403, verdict.refusal.errcode, verdict.refusal.message)

    async def _record(self, entry: AuditEntry, *, refusal: bool) -> None:
        """As the gate: answer once the record is committed, bounded by :data:`AUDIT_WAIT`."""
        if self.sink is None:
            return
        if not refusal and self.sink.store_down:
            self.sink.submit(entry)
            return
        if not await self.sink.record(entry, AUDIT_WAIT):
            log.warning("media gate answered before its audit record was committed")
