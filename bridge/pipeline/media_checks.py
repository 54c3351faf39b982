"""Attachments judged again in their room (issue 12, item 5).

The worker queues a check for every message that refers to media by ``content.url``
(``m.file``, ``m.image``, ``m.video``, ``m.audio``, ``m.sticker``) in the same commit as the
transaction (table ``media_checks``), so none is lost and the worker never waits for a
download. :class:`MediaChecker`, a task of the scheduler, works the queue: it fetches the
file as the bot through the authenticated media API (``GET
/_matrix/client/v1/media/download/{server}/{mediaId}``, bounded by
``attachments.max_file_mb``), reads it in the extraction pool, judges the text by the
ROOM's effective DLP rules and queues the same executor actions as for text (redact for
``block``/``redact``, a management-room notice for ``notify``), all in one commit with the
check's removal and its audit record.

Why a queue of its own and not an executor action: the executor runs actions one at a time,
and a download plus extraction (up to ``timeout_seconds``) would hold up redactions and
notices behind it.

Caching: the extraction cache (table ``media_cache``) maps the mxc URI to the file's
digest, and the digest to what reading gave (type, why not read, whether it holds text),
never the text. Texts stay in a bounded in-memory cache, so judging a file again by another
room's rules costs a scan, not a download and an extraction; a file without text (images,
the common case) is never fetched twice, even after a restart.

End-to-end encrypted attachments (``content.file``, in encrypted rooms): the bot decrypted
the message, so it holds the file's key. The check carries the key material (sealed in the
queue, gone once the check ran); the ciphertext is fetched, its hash verified, decrypted
(:mod:`bridge.e2ee.attachments`) and the plaintext judged like any file. A key or IV that
does not decode, or a hash that does not match, is ``malformed`` (the text of a mismatched
file is still judged: a client that skips the check would show it); a cipher or version
other than A256CTR/v2 is ``encrypted`` (refused by default: no dodging the scan with a
nonstandard cipher). Such a file is cached under its mxc AND a digest of its key material,
never under the plain ``mxc:`` key: the same mxc posted first with a wrong key (noise,
allowed) must not let a later post with the right key pass unread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

from aiohttp import ClientError, ClientSession, ClientTimeout

from bridge import metrics
from bridge.attachments.decide import MediaVerdict, decide
from bridge.attachments.extract import Extraction
from bridge.attachments.kinds import FileType, Outcome, Unreadable
from bridge.attachments.pool import ExtractionPool
from bridge.audit.kinds import AuditKind
from bridge.commands import Reply
from bridge.config import Config
from bridge.e2ee.attachments import ALGORITHM, VERSION, BadAttachment, open_attachment
from bridge.pipeline import actions
from bridge.policy.engine import PolicyEngine
from bridge.policy.model import Action
from bridge.store import AuditEntry, NewAction, Store
from bridge.store.media import FileKey, MediaCheck

log = logging.getLogger(__name__)

MEDIA_MSGTYPES = frozenset({"m.file", "m.image", "m.video", "m.audio"})
MAX_ATTEMPTS = 5
#: Characters of extracted text kept in memory for judging a file again in other rooms.
TEXT_CACHE_CHARS = 32 * 1024 * 1024
_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class MediaRef:
    """The media a message refers to: its mxc URI, and the key when it is end-to-end
    encrypted (``content.file``)."""

    mxc: str
    key: FileKey | None = None


def media_ref(event: Mapping[str, Any]) -> tuple[MediaRef | None, str]:
    """``(reference, "")`` for a message whose media the bridge can read; ``(None, why)``
    for one it cannot (why is "" when the event carries no media)."""
    etype = event.get("type")
    content = event.get("content")
    if not isinstance(content, Mapping):
        return None, ""
    if etype == "m.room.message":
        if content.get("msgtype") not in MEDIA_MSGTYPES:
            return None, ""
    elif etype != "m.sticker":
        return None, ""
    url = content.get("url")
    if isinstance(url, str) and url.startswith("mxc://"):
        return MediaRef(url), ""
    file = content.get("file")
    if isinstance(file, Mapping):
        return encrypted_ref(file)
    return None, ""


def media_refs(event: Mapping[str, Any]) -> list[tuple[MediaRef | None, str]]:
    """Every file a media message refers to: the file itself (:func:`media_ref`) and its
    thumbnail (``info.thumbnail_url``, or ``info.thumbnail_file`` when encrypted): a client
    uploads the thumbnail separately and any file can stand in for it, so it is read and
    judged by the room's rules like the file (in an encrypted room the upload check saw
    only ciphertext). Each ``(reference, why)`` as :func:`media_ref` answers."""
    main = media_ref(event)
    if main == (None, ""):
        return []
    content = event.get("content")
    info = content.get("info") if isinstance(content, Mapping) else None
    if not isinstance(info, Mapping):
        return [main]
    url = info.get("thumbnail_url")
    if isinstance(url, str) and url.startswith("mxc://"):
        return [main, (MediaRef(url), "")]
    file = info.get("thumbnail_file")
    if isinstance(file, Mapping):
        thumb, why = encrypted_ref(file)
        return [main, (thumb, why.replace("attachment", "thumbnail", 1))]
    return [main]


def encrypted_ref(file: Mapping[str, Any]) -> tuple[MediaRef | None, str]:
    """The reference of an ``EncryptedFile``, or ``(None, why)`` when nobody can decrypt
    it (no mxc URL, no key or IV). A missing hash is left to the check (``malformed``, the
    text still judged); a missing ``alg`` is read as A256CTR, as WebCrypto imports such a
    key; the version is checked when the check runs."""
    url = file.get("url")
    if not (isinstance(url, str) and url.startswith("mxc://")):
        return None, "encrypted attachment (content.file) without an mxc URL"
    jwk = file.get("key")
    k = jwk.get("k") if isinstance(jwk, Mapping) else None
    iv = file.get("iv")
    if not isinstance(k, str) or not isinstance(iv, str):
        return None, "encrypted attachment (content.file) without its key or IV"
    hashes = file.get("hashes")
    sha256 = hashes.get("sha256") if isinstance(hashes, Mapping) else None
    alg = jwk.get("alg", ALGORITHM) if isinstance(jwk, Mapping) else ALGORITHM
    version = file.get("v")
    key = FileKey(
        k=k,
        iv=iv,
        sha256=sha256 if isinstance(sha256, str) else "",
        alg=alg if isinstance(alg, str) else "",
        v=version if isinstance(version, str) else "",
    )
    return MediaRef(url, key), ""


def split_mxc(mxc: str) -> tuple[str, str] | None:
    """``(server, media ID)`` of an ``mxc://`` URI, or None when malformed."""
    server, _, media_id = mxc.removeprefix("mxc://").partition("/")
    if not server or not media_id or "/" in media_id:
        return None
    return server, media_id


@dataclass(frozen=True, slots=True)
class Fetched:
    """A downloaded file: its bytes (empty when over the cap), digest and size."""

    data: bytes
    digest: str
    size: int
    over: bool


class Unavailable(Exception):
    """The homeserver has no such media (or refuses it for good)."""


class MediaChecker:
    """Works the queue of in-room media checks (a task under the scheduler)."""

    def __init__(
        self,
        store: Store,
        session: ClientSession,
        config: Callable[[], Config],
        engine: Callable[[], PolicyEngine],
        pool: ExtractionPool,
        management_room: Callable[[], str],
        on_actions: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.session = session
        self.config = config
        self.engine = engine
        self.pool = pool
        self.management_room = management_room
        self.on_actions = on_actions
        self._wake = asyncio.Event()
        self._texts: OrderedDict[str, str] = OrderedDict()
        self._text_chars = 0

    def wake(self) -> None:
        """New checks were committed."""
        self._wake.set()

    async def run(self) -> None:
        """Work the queue forever."""
        while True:
            try:
                ran = await self.run_once()
            except Exception:
                log.exception("media check loop error; retrying in 5s")
                await asyncio.sleep(5)
                continue
            if ran:
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), 10)
            except TimeoutError:
                pass

    async def run_once(self, limit: int = 20) -> int:
        """Run the checks that are due; returns how many."""
        due = await self.store.media.due(time.time(), limit)
        for check in due:
            try:
                await self.check(check)
            except Unavailable as e:
                await self._commit(check, [], self._skipped(check, str(e)))
            except (ClientError, OSError, TimeoutError) as e:
                attempts = check.attempts + 1
                if attempts >= MAX_ATTEMPTS:
                    why = f"download failed {attempts} times ({e.__class__.__name__})"
                    await self._commit(check, [], self._skipped(check, why))
                else:
                    await self.store.media.retry(check.id, attempts, time.time() + 2**attempts)
        return len(due)

    # -- one check -------------------------------------------------------------------

    async def check(self, check: MediaCheck) -> None:
        """Fetch (or recall), read, judge and enforce one message's media."""
        cfg = self.config()
        engine = self.engine()
        dlp = engine.dlp_for(check.room_id)
        if check.room_id == self.management_room() or dlp.is_exempt(check.sender, check.room_id):
            await self._commit(check, [], None)
            return
        if check.key is None:
            extraction, digest, size = await self._read(check.mxc, cfg)
        else:
            extraction, digest, size = await self._read_encrypted(check.mxc, check.key, cfg)
        verdict = decide(extraction, dlp, cfg.attachments.unreadable)
        metrics.MEDIA_CHECKS.labels("room", str(verdict.outcome), str(extraction.file_type)).inc()
        new, done = self._enforce(check, verdict, digest)
        audit = None
        if verdict.outcome is not Outcome.ALLOWED or verdict.findings:
            audit = AuditEntry(
                kind=AuditKind.MEDIA,
                room_id=check.room_id,
                sender=check.sender,
                type=str(extraction.file_type),
                data={
                    "path": "room",
                    "event_id": check.event_id,
                    "e2ee": check.key is not None,
                    "outcome": str(verdict.outcome),
                    "sha256": digest,
                    "size": size,
                    "file_type": str(extraction.file_type),
                    "unreadable": None if extraction.reason is None else str(extraction.reason),
                    "detail": extraction.detail,
                    "rule": verdict.refusal.rule if verdict.refusal else None,
                    "actions": done,
                    "findings": [
                        {"rule": f.rule, "actions": sorted(f.actions), "excerpt": f.excerpt}
                        for f in verdict.findings
                    ],
                },
            )
        await self._commit(check, new, audit)

    def _enforce(
        self, check: MediaCheck, verdict: MediaVerdict, digest: str
    ) -> tuple[list[NewAction], list[str]]:
        new: list[NewAction] = []
        done: list[str] = []
        removing = verdict.refusal is not None or any(
            Action.REDACT in f.actions for f in verdict.findings
        )
        if removing:
            rule = verdict.refusal.rule if verdict.refusal else verdict.findings[0].rule
            new.append(
                actions.redact(check.room_id, check.event_id, f"removed by company policy ({rule})")
            )
            done.append("redact")
        mgmt = self.management_room()
        wanted = [f for f in verdict.findings if Action.NOTIFY in f.actions]
        if mgmt and wanted:
            verb = "removed" if removing else "matched"
            lines = [
                f"Policy {f.rule} {verb} a file from {check.sender} in {check.room_id}"
                f" (sha256 {digest[:16]}…)" + (f": {f.excerpt}" if f.excerpt else "")
                for f in wanted
            ]
            new.append(actions.notice(mgmt, Reply.plain("\n".join(lines))))
            done.append("notify")
        return new, done

    def _skipped(self, check: MediaCheck, why: str) -> AuditEntry:
        return AuditEntry(
            kind=AuditKind.MEDIA,
            room_id=check.room_id,
            sender=check.sender,
            data={
                "path": "room",
                "event_id": check.event_id,
                "e2ee": check.key is not None,
                "outcome": "skipped",
                "why": why,
            },
        )

    async def _commit(
        self, check: MediaCheck, new: list[NewAction], audit: AuditEntry | None
    ) -> None:
        await self.store.keys.op_key()

        async def run(conn: Any) -> None:
            await self.store.media.finish(conn, check.id)
            await self.store.actions.insert(conn, new)
            if audit is not None:
                await self.store.records.append_audit(conn, [audit])

        await self.store.records.write(run)
        if new:
            self.on_actions()

    # -- reading, with the caches ----------------------------------------------------

    async def _read(self, mxc: str, cfg: Config) -> tuple[Extraction, str, int]:
        """The extraction of ``mxc``: from the caches when possible, else downloaded and
        read. Returns it with the file's digest and size."""
        hit = await self._cached(f"mxc:{mxc}")
        if hit is not None:
            return hit
        fetched = await self.fetch(mxc, cfg.attachments.download_max_bytes)
        if fetched.over:
            return _over_cap(), "", fetched.size
        extraction = await self._extract(fetched.data, fetched.digest, cfg)
        value = _cache_value(extraction, fetched.digest, fetched.size)
        await self.store.media.remember({f"mxc:{mxc}": value, f"sha256:{fetched.digest}": value})
        return extraction, fetched.digest, fetched.size

    async def _read_encrypted(
        self, mxc: str, key: FileKey, cfg: Config
    ) -> tuple[Extraction, str, int]:
        """The extraction of the end-to-end encrypted file at ``mxc``, decrypted with
        ``key``. The digest returned is the plaintext's (as for an unencrypted copy), or
        the ciphertext's when it could not be decrypted. Cached under the mxc AND the key
        material (:meth:`FileKey.cache_key`), never under ``mxc:``."""
        if key.alg != ALGORITHM or key.v != VERSION:
            # Attacker-chosen strings: bounded, and only in the sealed audit record.
            detail = f"unsupported attachment encryption (alg {key.alg[:32]!r}, v {key.v[:8]!r})"
            return Extraction(FileType.UNKNOWN, reason=Unreadable.ENCRYPTED, detail=detail), "", 0
        cache_key = key.cache_key(mxc)
        hit = await self._cached(cache_key)
        if hit is not None:
            return hit
        fetched = await self.fetch(mxc, cfg.attachments.download_max_bytes)
        if fetched.over:
            return _over_cap(), "", fetched.size
        try:
            opened = await asyncio.to_thread(
                open_attachment, fetched.data, key.k, key.iv, key.sha256
            )
        except BadAttachment as e:
            extraction = Extraction(FileType.UNKNOWN, reason=Unreadable.MALFORMED, detail=str(e))
            value = _cache_value(extraction, fetched.digest, fetched.size)
            await self.store.media.remember({cache_key: value})
            return extraction, fetched.digest, fetched.size
        digest = hashlib.sha256(opened.plaintext).hexdigest()
        extraction = await self._extract(opened.plaintext, digest, cfg)
        size = len(opened.plaintext)
        # The plaintext's entry describes the file; the mismatch belongs to this post only.
        entries = {f"sha256:{digest}": _cache_value(extraction, digest, size)}
        if not opened.hash_ok and extraction.reason is None:
            extraction = replace(
                extraction,
                reason=Unreadable.MALFORMED,
                detail="the ciphertext does not match its hashes.sha256",
            )
        entries[cache_key] = _cache_value(extraction, digest, size)
        await self.store.media.remember(entries)
        return extraction, digest, size

    async def _cached(self, key: str) -> tuple[Extraction, str, int] | None:
        """What the caches recall under ``key`` (an mxc entry), with digest and size."""
        known = await self.store.media.cached(key)
        if known is not None:
            hit = self._recall(str(known.get("sha256", "")), known)
            if hit is not None:
                metrics.MEDIA_CACHE.labels("hit").inc()
                return hit, str(known["sha256"]), int(known.get("size", 0))
        metrics.MEDIA_CACHE.labels("miss").inc()
        return None

    async def _extract(self, data: bytes, digest: str, cfg: Config) -> Extraction:
        """The extraction of the file ``data`` (by its ``digest``: recalled, or read in the
        pool and its text kept)."""
        meta = await self.store.media.cached(f"sha256:{digest}")
        recalled = self._recall(digest, meta) if meta is not None else None
        if recalled is not None:
            return recalled
        extraction, elapsed = await self.pool.extract(data, cfg.attachments.limits)
        metrics.MEDIA_EXTRACT_SECONDS.labels(str(extraction.file_type)).observe(elapsed)
        self._keep_text(digest, extraction.text)
        return extraction

    def _recall(self, digest: str, meta: Mapping[str, Any] | None) -> Extraction | None:
        """The extraction rebuilt from the cache, or None when its text is not in memory."""
        if meta is None or not digest:
            return None
        text = ""
        if meta.get("has_text"):
            cached = self._texts.get(digest)
            if cached is None:
                return None
            self._texts.move_to_end(digest)
            text = cached
        reason = meta.get("reason")
        try:
            return Extraction(
                FileType(str(meta.get("file_type"))),
                text,
                None if reason is None else Unreadable(str(reason)),
                str(meta.get("detail", "")),
            )
        except ValueError:
            return None

    def _keep_text(self, digest: str, text: str) -> None:
        if not text or len(text) > TEXT_CACHE_CHARS // 4:
            return
        self._texts[digest] = text
        self._text_chars += len(text)
        while self._text_chars > TEXT_CACHE_CHARS:
            _, old = self._texts.popitem(last=False)
            self._text_chars -= len(old)

    async def fetch(self, mxc: str, cap: int) -> Fetched:
        """Download ``mxc`` as the bot, reading at most ``cap`` bytes."""
        parts = split_mxc(mxc)
        if parts is None:
            raise Unavailable("malformed mxc URI")
        cfg = self.config()
        server, media_id = (quote(p, safe="") for p in parts)
        url = f"{cfg.homeserver.url}/_matrix/client/v1/media/download/{server}/{media_id}"
        headers = {"Authorization": f"Bearer {cfg.appservice.as_token}"}
        async with self.session.get(
            url, headers=headers, timeout=ClientTimeout(total=120), allow_redirects=False
        ) as r:
            if r.status in (400, 403, 404):
                raise Unavailable(f"the homeserver answered {r.status}")
            if r.status >= 300:
                raise ClientError(f"HTTP {r.status}")
            digest = hashlib.sha256()
            chunks: list[bytes] = []
            size = 0
            async for chunk in r.content.iter_chunked(_CHUNK):
                size += len(chunk)
                if size > cap:
                    return Fetched(b"", "", size, True)
                chunks.append(chunk)
                digest.update(chunk)
        return Fetched(b"".join(chunks), digest.hexdigest(), size, False)


def _over_cap() -> Extraction:
    return Extraction(FileType.UNKNOWN, reason=Unreadable.TOO_LARGE, detail="over the download cap")


def _cache_value(extraction: Extraction, digest: str, size: int) -> dict[str, Any]:
    """What the cache keeps of a reading (never the text)."""
    return {
        "sha256": digest,
        "size": size,
        "file_type": str(extraction.file_type),
        "reason": None if extraction.reason is None else str(extraction.reason),
        "detail": extraction.detail,
        "has_text": bool(extraction.text),
    }
