"""Hash chain, signed checkpoints and the streaming verifier for the audit store.

Every record carries ``hash = SHA-256(encoding)`` where the encoding is
(all integers big-endian, ``lp(x)`` = u32 length then bytes,
``opt(x)`` = ``0x00`` if absent else ``0x01 || lp(x)``)::

    b"PBAUDIT1"                  8-byte domain tag
    prev_hash                    32 bytes (GENESIS for seq 1)
    u64 seq
    i64 ts                       milliseconds, plain in the store
    u32 len(kind) || kind        UTF-8
    opt(event_id_idx)            blind indexes, 16 bytes each when present
    opt(room_idx)
    opt(sender_idx)
    opt(type_idx)
    opt(key_id)                  data key id, UTF-8
    lp(nonce)
    lp(ciphertext_digest)        SHA-256(ciphertext), 32 bytes
    [0x01 || i64 origin_ts]      only when ``origin_ts`` is set (the store always sets
                                 it): the event's origin_server_ts, plain in the store

Fixed order plus length prefixes make the encoding injective. The chain covers
the *digest* of the ciphertext, so a record whose ciphertext was dropped
(retention) or made unreadable (room key destroyed) still verifies as long as
its ``ciphertext_digest`` column stays.

Checkpoints sign ``b"PBCKPT01" || u64 seq || head_hash(32) || i64 ts ||
u64 record_count || u16 len(key_id) || key_id`` with Ed25519; ``key_id`` is the
signer's public-key fingerprint (:func:`key_fingerprint`).

Removals. A verifier holds no data keys, so what retention removed must be stated by
records it can read without them: their plain, hashed columns.

* An **expiry record** (kind ``expiry``, :data:`EXPIRY_KIND`) is appended, and signed into a
  checkpoint, before an archive-expiry run drops any ciphertext; its ``origin_ts`` is the
  run's cutoff. It justifies a NULL ciphertext in every *earlier* record (lower seq)
  archived before that cutoff (``ts < origin_ts``).
* A **shred record** (kind ``shred``, :data:`SHRED_KIND`) is appended, with a checkpoint, in
  the commit that deletes a data key; its ``key_id`` is the destroyed key and it has no
  ciphertext of its own. It justifies records whose data key is no longer in ``data_keys``.

Given the :class:`Removals` read from the store, :class:`ChainVerifier` reports a NULL
ciphertext or a missing data key that no such record justifies. Only removal records that a
signed checkpoint covers count: records after the last checkpoint can be appended by anyone
who can write the database.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import logging
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from bridge.audit.keyring import check_file_permissions
from bridge.audit.kinds import AuditKind

log = logging.getLogger(__name__)

HASH_TAG = b"PBAUDIT1"
CHECKPOINT_TAG = b"PBCKPT01"
HASH_BYTES = 32
#: ``prev_hash`` of the first record (seq 1).
GENESIS = hashlib.sha256(b"matrix-policy-bridge audit chain genesis v1").digest()
FIRST_SEQ = 1

_sha256 = hashlib.sha256
_HEAD = struct.Struct(">8s32sQqI").pack
_U32 = struct.Struct(">I").pack
_I64 = struct.Struct(">q").pack
_CKPT = struct.Struct(">8sQ32sqQH").pack
_ABSENT = b"\x00"
_PRESENT = b"\x01"

#: Record kinds whose plain columns state a removal (see the module docstring).
EXPIRY_KIND = AuditKind.EXPIRY
SHRED_KIND = AuditKind.SHRED
_NEVER = -(1 << 63)  # no record's ts is below this: nothing justified
_ALWAYS = 1 << 63  # every record's ts is below this: no check


class ChainFields(NamedTuple):
    """The hashed columns of one audit record (a NamedTuple: cheap to build from a DB row)."""

    seq: int
    ts: int
    kind: str
    event_id_idx: bytes | None
    room_idx: bytes | None
    sender_idx: bytes | None
    type_idx: bytes | None
    key_id: str | None
    nonce: bytes
    ciphertext_digest: bytes
    origin_ts: int | None = None


class ChainRecord(NamedTuple):
    """What the verifier reads per record: hashed fields, stored hash, ciphertext if kept."""

    fields: ChainFields
    hash: bytes
    ciphertext: bytes | None = None


def _opt(value: bytes | None) -> bytes:
    if value is None:
        return _ABSENT
    return _PRESENT + _U32(len(value)) + value


def _encode(prev_hash: bytes, f: ChainFields) -> bytes:
    seq, ts, kind, eid, room, sender, etype, key_id, nonce, digest, origin = f
    k = kind.encode("utf-8")
    return b"".join(
        (
            _HEAD(HASH_TAG, prev_hash, seq, ts, len(k)),
            k,
            _ABSENT if eid is None else _PRESENT + _U32(len(eid)) + eid,
            _ABSENT if room is None else _PRESENT + _U32(len(room)) + room,
            _ABSENT if sender is None else _PRESENT + _U32(len(sender)) + sender,
            _ABSENT if etype is None else _PRESENT + _U32(len(etype)) + etype,
            _ABSENT if key_id is None else _opt(key_id.encode("utf-8")),
            _U32(len(nonce)),
            nonce,
            _U32(len(digest)),
            digest,
            b"" if origin is None else _PRESENT + _I64(origin),
        )
    )


def encode_record(prev_hash: bytes, fields: ChainFields) -> bytes:
    """The canonical byte string hashed for a record (see module docstring)."""
    if len(prev_hash) != HASH_BYTES:
        raise ValueError(f"prev_hash must be {HASH_BYTES} bytes, got {len(prev_hash)}")
    if fields.seq < 0:
        raise ValueError("seq must be >= 0")
    return _encode(prev_hash, fields)


def record_hash(prev_hash: bytes, fields: ChainFields) -> bytes:
    """SHA-256 of :func:`encode_record`: the value stored in the record's ``hash`` column."""
    return _sha256(encode_record(prev_hash, fields)).digest()


# -- signing keys ----------------------------------------------------------------------


class SigningKeyError(Exception):
    """The checkpoint signing key file is unreadable or not an Ed25519 key."""


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """Short stable id of a public key: first 16 hex chars of SHA-256(raw key)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """PEM (SubjectPublicKeyInfo) export of the public key, for verifiers."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(data: bytes | str) -> Ed25519PublicKey:
    """Parse a public key given as PEM, or as base64 of the 32 raw bytes."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(raw)
            if not isinstance(key, Ed25519PublicKey):
                raise SigningKeyError("public key is not an Ed25519 key")
            return key
        decoded = base64.b64decode(raw.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(decoded)
    except (ValueError, binascii.Error) as exc:
        raise SigningKeyError(f"cannot parse Ed25519 public key: {exc}") from None


def load_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load a PEM (PKCS#8, unencrypted) Ed25519 private key; warn on loose permissions."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(f"checkpoint signing key file {p} does not exist") from None
    except OSError as exc:
        raise SigningKeyError(
            f"checkpoint signing key file {p} cannot be read: {exc.strerror or exc}"
        ) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(
            f"checkpoint signing key file {p} is not an unencrypted PEM private key: {exc}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"checkpoint signing key file {p} does not hold an Ed25519 key")
    warning = check_file_permissions(p)
    if warning:
        log.warning("%s", warning)
    return key


def load_or_create_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load the signing key, creating it (mode 0600, never overwriting) if absent.

    Keep this file outside the database volume: whoever can write the database
    must not be able to sign checkpoints.
    """
    p = Path(path)
    if p.exists():
        return load_signing_key(p)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # created concurrently: use that one
        return load_signing_key(p)
    except OSError as exc:
        raise SigningKeyError(
            f"cannot create checkpoint signing key file {p}: {exc.strerror or exc}"
        ) from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    return key


# -- checkpoints -----------------------------------------------------------------------


class CheckpointError(Exception):
    """A checkpoint's signature does not verify or its key is not trusted."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Signed statement: at ``seq``, after ``record_count`` records, the head was ``head_hash``."""

    seq: int
    head_hash: bytes
    ts: int
    record_count: int
    key_id: str
    signature: bytes

    def signed_message(self) -> bytes:
        """The exact bytes covered by the signature."""
        return checkpoint_message(self.seq, self.head_hash, self.ts, self.record_count, self.key_id)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (hashes hex, signature base64)."""
        return {
            "seq": self.seq,
            "head_hash": self.head_hash.hex(),
            "ts": self.ts,
            "record_count": self.record_count,
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checkpoint:
        """Inverse of :meth:`to_dict`."""
        return cls(
            seq=int(data["seq"]),
            head_hash=bytes.fromhex(data["head_hash"]),
            ts=int(data["ts"]),
            record_count=int(data["record_count"]),
            key_id=str(data["key_id"]),
            signature=base64.b64decode(data["signature"]),
        )


def checkpoint_message(
    seq: int, head_hash: bytes, ts: int, record_count: int, key_id: str
) -> bytes:
    """Canonical signed encoding of a checkpoint."""
    if len(head_hash) != HASH_BYTES:
        raise ValueError(f"head_hash must be {HASH_BYTES} bytes")
    kid = key_id.encode("utf-8")
    return _CKPT(CHECKPOINT_TAG, seq, head_hash, ts, record_count, len(kid)) + kid


def sign_checkpoint(
    signing_key: Ed25519PrivateKey, seq: int, head_hash: bytes, ts: int, record_count: int
) -> Checkpoint:
    """Sign the chain head at ``seq`` (``record_count`` records so far, ``ts`` in ms)."""
    key_id = key_fingerprint(signing_key.public_key())
    msg = checkpoint_message(seq, head_hash, ts, record_count, key_id)
    return Checkpoint(seq, head_hash, ts, record_count, key_id, signing_key.sign(msg))


def _as_key_map(
    public_keys: Ed25519PublicKey | Iterable[Ed25519PublicKey],
) -> dict[str, Ed25519PublicKey]:
    keys = [public_keys] if isinstance(public_keys, Ed25519PublicKey) else list(public_keys)
    return {key_fingerprint(k): k for k in keys}


def verify_checkpoint(
    checkpoint: Checkpoint, public_keys: Ed25519PublicKey | Iterable[Ed25519PublicKey]
) -> None:
    """Raise :class:`CheckpointError` unless a trusted key signed ``checkpoint``."""
    _verify_checkpoint(checkpoint, _as_key_map(public_keys))


def _verify_checkpoint(cp: Checkpoint, keys: Mapping[str, Ed25519PublicKey]) -> None:
    key = keys.get(cp.key_id)
    if key is None:
        trusted = ", ".join(keys) or "none"
        raise CheckpointError(
            f"checkpoint at seq {cp.seq} claims signing key {cp.key_id!r}, which is not a "
            f"trusted checkpoint key (trusted: {trusted}): forged or signed by another key"
        )
    try:
        key.verify(cp.signature, cp.signed_message())
    except (InvalidSignature, ValueError):
        raise CheckpointError(
            f"checkpoint at seq {cp.seq}: signature does not verify with key {cp.key_id!r} "
            f"(checkpoint forged or altered)"
        ) from None


# -- verification ----------------------------------------------------------------------


@dataclass(slots=True)
class VerifyReport:
    """Outcome of a chain verification; on failure, the first bad seq and what is wrong."""

    ok: bool
    records_checked: int
    first_bad_seq: int | None = None
    problem_kind: str | None = None
    problem: str | None = None
    last_seq: int | None = None
    head_hash: bytes | None = None
    checkpoints_checked: int = 0
    records_without_ciphertext: int = 0
    #: The signed head: the last seq a verified checkpoint covers (0: none) and when that
    #: checkpoint was signed (ms; None without one).
    signed_seq: int = 0
    signed_ts: int | None = None
    #: The unsigned tail after it: how many records, and the archive times (ms, plain and
    #: not signed) of its first and last record (None when the tail is empty).
    tail_records: int = 0
    tail_first_ts: int | None = None
    tail_last_ts: int | None = None

    def tail_age_s(self, now_ms: int) -> float:
        """Seconds the oldest unsigned record has been unsigned at ``now_ms`` (0: none)."""
        if self.tail_first_ts is None:
            return 0.0
        return max(0.0, (now_ms - self.tail_first_ts) / 1000)

    @property
    def tail_span_s(self) -> float:
        """Seconds from the oldest to the newest unsigned record (0: none or one)."""
        if self.tail_first_ts is None or self.tail_last_ts is None:
            return 0.0
        return max(0.0, (self.tail_last_ts - self.tail_first_ts) / 1000)

    def __str__(self) -> str:
        if self.ok:
            return (
                f"audit chain OK: {self.records_checked} records (last seq {self.last_seq}), "
                f"{self.checkpoints_checked} checkpoints verified, "
                f"{self.records_without_ciphertext} without ciphertext; signed head: seq "
                f"{self.signed_seq}, unsigned tail: {self.tail_records} records"
            )
        return (
            f"audit chain BROKEN at seq {self.first_bad_seq} [{self.problem_kind}]: {self.problem}"
        )


#: problem_kind values
HASH_MISMATCH = "hash_mismatch"
CIPHERTEXT_DIGEST = "ciphertext_digest"
MISSING = "missing"
REORDERED = "reordered"
DUPLICATE = "duplicate"
CHECKPOINT_SIGNATURE = "checkpoint_signature"
CHECKPOINT_MISMATCH = "checkpoint_mismatch"
TRUNCATED = "truncated"
CIPHERTEXT_REMOVED = "ciphertext_removed"
DATA_KEY_MISSING = "data_key_missing"
CHANGED = "changed_while_verifying"


@dataclass(frozen=True, slots=True)
class Removals:
    """What the store's plain columns say about removed data (read without any key).

    ``data_keys``: the key ids in the ``data_keys`` table; ``expiries``: ``(seq, cutoff)``
    of every expiry record; ``shreds``: ``(seq, key_id)`` of every shred record.
    """

    data_keys: frozenset[str | None] = frozenset()
    expiries: tuple[tuple[int, int], ...] = ()
    shreds: tuple[tuple[int, str], ...] = ()


class ChainVerifier:
    """Streaming verifier: feed records in seq order, then call :meth:`finish`.

    Memory is constant in the number of records (checkpoints and removal records are held
    in memory; there are few). Stops at the first problem; after a seq gap it looks ahead
    up to ``lookahead`` records to tell a deleted record from a reordered one.

    With ``removals`` (read from the store, see :class:`Removals`) a NULL ciphertext must be
    justified by a later expiry record and a data key missing from the store by a shred
    record, both covered by a signed checkpoint; without, neither is checked.
    """

    def __init__(
        self,
        public_keys: Ed25519PublicKey | Iterable[Ed25519PublicKey] = (),
        checkpoints: Iterable[Checkpoint] = (),
        *,
        start: Checkpoint | None = None,
        check_ciphertext: bool = True,
        lookahead: int = 10_000,
        removals: Removals | None = None,
    ) -> None:
        """Prepare to verify from the genesis, or after a trusted ``start`` checkpoint."""
        self._keys = _as_key_map(public_keys)
        self._cps = sorted(checkpoints, key=lambda c: c.seq)
        self._cp_i = 0
        self._check_ct = check_ciphertext
        self._lookahead = lookahead
        self._prev = GENESIS
        self._expected = FIRST_SEQ
        self._count = 0
        self._last_good_cp = 0
        self._last_good_ts: int | None = None
        if start is not None:
            _verify_checkpoint(start, self._keys)
            self._prev = start.head_hash
            self._expected = start.seq + 1
            self._count = start.record_count
            self._last_good_cp = start.seq
            self._last_good_ts = start.ts
        #: the seq whose archive time starts the unsigned tail, and that time once seen
        self._mark = self._last_good_cp + 1
        self._tail_first_ts: int | None = None
        self._last_ts: int | None = None
        self._checked = 0
        self._cps_checked = 0
        self._no_ct = 0
        self._failed = False
        self._done = False
        self._gap: tuple[int, int] | None = None
        self.report: VerifyReport | None = None
        self._next_cp = -1
        self._next_stop = -1
        self._setup_removals(removals, start)
        # checkpoints before the first record we will see are only signature-checked
        while self._cp_i < len(self._cps) and self._cps[self._cp_i].seq < self._expected:
            if not self._check_sig(self._cps[self._cp_i]):
                return
            self._cp_i += 1
        self._next_cp = self._cps[self._cp_i].seq if self._cp_i < len(self._cps) else -1
        self._set_next_stop()

    def _setup_removals(self, removals: Removals | None, start: Checkpoint | None) -> None:
        self._removals = removals
        #: claims checked when their record is reached: seq -> (kind, cutoff or key id)
        self._claims: dict[int, tuple[str, int | str]] = {}
        self._claim_seqs: list[int] = []
        self._claim_i = 0
        self._next_claim = -1
        self._exp_seqs: list[int] = []
        self._exp_max: list[int] = []  # max cutoff of the expiry records from index i on
        self._exp_i = 0
        self._cutoff = _ALWAYS  # a NULL ciphertext is accepted for ts < this
        self._keys_ok: frozenset[str | None] | None = None  # None: not checked
        if removals is None:
            return
        # only removal records a signed checkpoint covers count (the tail is forgeable)
        covered = max([c.seq for c in self._cps] + [start.seq if start else 0])
        expiries = sorted((s, c) for s, c in removals.expiries if s <= covered)
        shreds = sorted((s, k) for s, k in removals.shreds if s <= covered)
        for s, c in expiries:
            self._claims[s] = (EXPIRY_KIND, c)
        for s, k in shreds:
            self._claims[s] = (SHRED_KIND, k)
        self._claim_seqs = sorted(self._claims)
        self._claim_i = bisect.bisect_left(self._claim_seqs, self._expected)
        self._next_claim = (
            self._claim_seqs[self._claim_i] if self._claim_i < len(self._claim_seqs) else -1
        )
        self._exp_seqs = [s for s, _ in expiries]
        best = _NEVER
        self._exp_max = [0] * len(expiries)
        for i in range(len(expiries) - 1, -1, -1):
            best = max(best, expiries[i][1])
            self._exp_max[i] = best
        self._exp_i = bisect.bisect_left(self._exp_seqs, self._expected)
        self._cutoff = self._exp_max[self._exp_i] if self._exp_i < len(expiries) else _NEVER
        self._keys_ok = frozenset(removals.data_keys) | {k for _, k in shreds} | {None}

    def _set_next_stop(self) -> None:
        stop = -1
        for s in (self._next_cp, self._next_claim, self._mark):
            if s >= 0 and (stop < 0 or s < stop):
                stop = s
        self._next_stop = stop

    # -- failure bookkeeping

    def _fail(self, seq: int, kind: str, problem: str, *, done: bool = True) -> None:
        self._failed = True
        self._done = done
        self.report = VerifyReport(
            ok=False,
            records_checked=self._checked,
            first_bad_seq=seq,
            problem_kind=kind,
            problem=problem,
            last_seq=self._expected - 1 if self._checked else None,
            head_hash=self._prev,
            checkpoints_checked=self._cps_checked,
            records_without_ciphertext=self._no_ct,
        )

    def _check_sig(self, cp: Checkpoint) -> bool:
        try:
            _verify_checkpoint(cp, self._keys)
        except CheckpointError as exc:
            self._fail(cp.seq, CHECKPOINT_SIGNATURE, str(exc))
            return False
        return True

    def _check_checkpoints(self, seq: int) -> None:
        cps = self._cps
        while self._cp_i < len(cps) and cps[self._cp_i].seq == seq:
            cp = cps[self._cp_i]
            if not self._check_sig(cp):
                return
            if cp.head_hash != self._prev:
                lo = self._last_good_cp + 1
                self._fail(
                    seq,
                    CHECKPOINT_MISMATCH,
                    f"signed checkpoint at seq {seq} (ts {cp.ts}) has head hash "
                    f"{cp.head_hash.hex()[:16]}…, the chain has {self._prev.hex()[:16]}…: "
                    f"records {lo}..{seq} were rewritten together with their hashes",
                )
                return
            if cp.record_count != self._count:
                self._fail(
                    seq,
                    CHECKPOINT_MISMATCH,
                    f"signed checkpoint at seq {seq} counts {cp.record_count} records, "
                    f"the chain has {self._count}",
                )
                return
            self._cps_checked += 1
            self._last_good_cp = seq
            self._last_good_ts = cp.ts
            self._mark = seq + 1
            self._tail_first_ts = None
            self._cp_i += 1
        self._next_cp = cps[self._cp_i].seq if self._cp_i < len(cps) else -1

    def _pass_claim(self, f: ChainFields) -> bool:
        """The record at a removal record's seq: is it that record? Then step past it."""
        kind, value = self._claims[f.seq]
        actual = f.origin_ts if kind == EXPIRY_KIND else f.key_id
        if f.kind != kind or actual != value:
            self._fail(
                f.seq,
                CHANGED,
                f"record seq {f.seq} is not the {kind} record read before verifying (the "
                f"records table changed while verifying: run verify again)",
            )
            return False
        if kind == EXPIRY_KIND:
            self._exp_i += 1
            i = self._exp_i
            self._cutoff = self._exp_max[i] if i < len(self._exp_max) else _NEVER
        self._claim_i += 1
        i = self._claim_i
        self._next_claim = self._claim_seqs[i] if i < len(self._claim_seqs) else -1
        return True

    def _uncovered(self, kind: str, seq: int, ok: Callable[[int | str], bool]) -> int | None:
        """Seq of a removal record that would justify ``seq`` were it covered by a checkpoint."""
        rm = self._removals
        assert rm is not None
        found: list[tuple[int, int | str]] = sorted(
            rm.expiries if kind == EXPIRY_KIND else rm.shreds
        )
        for s, v in found:
            if s not in self._claims and (kind == SHRED_KIND or s > seq) and ok(v):
                return s
        return None

    def _removed_problem(self, f: ChainFields) -> tuple[str, str]:
        """Why a NULL ciphertext or a missing data key is not justified."""
        rm = self._removals
        assert rm is not None
        seq = f.seq
        legacy = (
            " (an archive whose expiry ran before expiry and shred records existed: start "
            "the bridge once, it records the earlier runs from their retention records)"
            if not rm.expiries
            else ""
        )
        if f.key_id not in (self._keys_ok or ()):
            s = self._uncovered(SHRED_KIND, seq, lambda k: k == f.key_id)
            why = (
                f"the shred record at seq {s} names it, but no signed checkpoint covers that "
                f"record yet"
                if s is not None
                else f"no shred record names it: deleted outside the bridge{legacy}"
            )
            return (
                DATA_KEY_MISSING,
                f"record seq {seq}: its data key {f.key_id!r} is not in the data_keys table and "
                f"{why}",
            )
        s = self._uncovered(EXPIRY_KIND, seq, lambda c: isinstance(c, int) and f.ts < c)
        if s is not None:
            why = (
                f"the expiry record at seq {s} covers it, but no signed checkpoint covers "
                f"that record yet"
            )
        else:
            why = (
                "no later archive-expiry record has a cutoff after its archive time "
                f"(ts {f.ts}): removed outside the bridge{legacy}"
            )
        return CIPHERTEXT_REMOVED, f"record seq {seq}: its ciphertext was removed (NULL) but {why}"

    def _seq_problem(self, seq: int) -> None:
        exp = self._expected
        if seq > exp:
            self._gap = (exp, seq)
            what = f"records {exp}..{seq - 1} are" if seq - exp > 1 else f"record {exp} is"
            self._fail(
                exp,
                MISSING,
                f"{what} missing: after seq {exp - 1} the next record is seq {seq} (deleted)",
                done=self._lookahead <= 0,
            )
        elif seq == exp - 1:
            self._fail(seq, DUPLICATE, f"record seq {seq} appears twice")
        else:
            self._fail(
                seq,
                REORDERED,
                f"record seq {seq} appears after seq {exp - 1} (records out of order)",
            )

    def _classify(self, seq: int) -> bool:
        """After a gap: is a 'missing' seq merely out of place further on?"""
        gap = self._gap
        assert gap is not None and self.report is not None
        if gap[0] <= seq < gap[1]:
            self.report.problem_kind = REORDERED
            self.report.problem = (
                f"record seq {gap[0]} is out of order: seq {gap[1]} came first, "
                f"seq {seq} appears later (records reordered)"
            )
            self._done = True
        else:
            self._lookahead -= 1
            if self._lookahead <= 0:
                self._done = True
        return not self._done

    # -- public API

    @property
    def done(self) -> bool:
        """True once feeding more records cannot change the report."""
        return self._done

    def feed(
        self, fields: ChainFields, stored_hash: bytes, ciphertext: bytes | None = None
    ) -> bool:
        """Check the next record; return False once verification has concluded (stop feeding)."""
        if self._failed:
            return False if self._done else self._classify(fields[0])
        seq = fields[0]
        if seq != self._expected:
            self._seq_problem(seq)
            return not self._done
        if ciphertext is not None and self._check_ct and _sha256(ciphertext).digest() != fields[9]:
            self._fail(
                seq,
                CIPHERTEXT_DIGEST,
                f"record seq {seq}: ciphertext does not match its stored digest "
                f"(ciphertext altered)",
            )
            return False
        h = _sha256(_encode(self._prev, fields)).digest()
        if h != stored_hash:
            self._fail(
                seq,
                HASH_MISMATCH,
                f"record seq {seq}: recomputed hash differs from the stored hash (a column of "
                f"this record was altered, or the previous record was rewritten with its hash)",
            )
            return False
        if seq == self._next_claim and not self._pass_claim(fields):
            return False
        keys = self._keys_ok
        if (keys is not None and fields.key_id not in keys) or (
            ciphertext is None and fields.kind != SHRED_KIND and fields.ts >= self._cutoff
        ):
            self._fail(seq, *self._removed_problem(fields))
            return False
        if ciphertext is None:
            self._no_ct += 1
        if seq == self._mark:
            self._tail_first_ts = fields.ts
            self._mark = -1
        self._last_ts = fields.ts
        self._prev = h
        self._expected = seq + 1
        self._count += 1
        self._checked += 1
        if seq == self._next_cp:
            self._check_checkpoints(seq)
        self._set_next_stop()
        return not self._done

    def feed_rows(self, rows: Iterable[Sequence[Any]]) -> bool:
        """:meth:`feed` for a batch of rows ``(*ChainFields, stored_hash, ciphertext)``.

        Same checks and report as feeding the rows one by one, in a tighter loop (the
        common case: the expected seq, no checkpoint or removal record there, hashes match,
        the data key known, a NULL ciphertext justified); anything else goes through
        :meth:`feed`. Returns False once verification has concluded.
        """
        sha, enc, check_ct = _sha256, _encode, self._check_ct
        prev, expected, stop = self._prev, self._expected, self._next_stop
        cutoff, keys = self._cutoff, self._keys_ok
        n = no_ct = 0
        for r in rows:
            seq = r[0]
            if not self._failed and seq == expected and seq != stop:
                ct = r[12]
                if (r[1] < cutoff if ct is None else not check_ct or sha(ct).digest() == r[9]) and (
                    keys is None or r[7] in keys
                ):
                    h = sha(enc(prev, r[:11])).digest()  # type: ignore[arg-type]
                    if h == r[11]:
                        prev, expected = h, seq + 1
                        n += 1
                        if ct is None:
                            no_ct += 1
                        continue
            # slow path: write the running state back, let feed() judge this row
            self._prev, self._expected = prev, expected
            self._count += n
            self._checked += n
            self._no_ct += no_ct
            n = no_ct = 0
            if not self.feed(ChainFields(*r[:11]), r[11], r[12]):
                return False
            prev, expected, stop = self._prev, self._expected, self._next_stop
            cutoff = self._cutoff
        if n:
            self._last_ts = r[1]
        self._prev, self._expected = prev, expected
        self._count += n
        self._checked += n
        self._no_ct += no_ct
        return True

    def finish(self) -> VerifyReport:
        """Conclude: checks checkpoints beyond the last record (truncated tail) and reports."""
        if self.report is not None:
            return self.report
        last = self._expected - 1
        cps = self._cps
        while self._cp_i < len(cps):
            cp = cps[self._cp_i]
            if not self._check_sig(cp):
                assert self.report is not None
                return self.report
            self._fail(
                last + 1,
                TRUNCATED,
                f"the chain ends at seq {last} but a valid signed checkpoint (ts {cp.ts}) "
                f"covers seq {cp.seq} with {cp.record_count} records: records "
                f"{last + 1}..{cp.seq} are missing (tail truncated)",
            )
            assert self.report is not None
            return self.report
        tail = max(0, last - self._last_good_cp)
        self.report = VerifyReport(
            ok=True,
            records_checked=self._checked,
            last_seq=last if self._checked else None,
            head_hash=self._prev,
            checkpoints_checked=self._cps_checked,
            records_without_ciphertext=self._no_ct,
            signed_seq=self._last_good_cp,
            signed_ts=self._last_good_ts,
            tail_records=tail,
            tail_first_ts=self._tail_first_ts if tail else None,
            tail_last_ts=self._last_ts if tail else None,
        )
        return self.report


def verify_chain(
    records: Iterable[ChainRecord | tuple[ChainFields, bytes, bytes | None]],
    checkpoints: Iterable[Checkpoint] = (),
    public_keys: Ed25519PublicKey | Iterable[Ed25519PublicKey] = (),
    *,
    start: Checkpoint | None = None,
    check_ciphertext: bool = True,
    removals: Removals | None = None,
) -> VerifyReport:
    """Verify a stream of records (in seq order) against the chain and signed checkpoints."""
    verifier = ChainVerifier(
        public_keys,
        checkpoints,
        start=start,
        check_ciphertext=check_ciphertext,
        removals=removals,
    )
    if not verifier.done:
        feed = verifier.feed
        for fields, stored_hash, ciphertext in records:
            if not feed(fields, stored_hash, ciphertext):
                break
    return verifier.finish()


def checkpoint_due(last_checkpoint_seq: int, seq: int, every: int = 1000) -> bool:
    """Simple policy helper: checkpoint after every ``every`` records."""
    return seq - last_checkpoint_seq >= every


__all__ = [
    "EXPIRY_KIND",
    "GENESIS",
    "SHRED_KIND",
    "ChainFields",
    "ChainRecord",
    "ChainVerifier",
    "Checkpoint",
    "CheckpointError",
    "Removals",
    "SigningKeyError",
    "VerifyReport",
    "checkpoint_due",
    "encode_record",
    "key_fingerprint",
    "load_or_create_signing_key",
    "load_public_key",
    "load_signing_key",
    "public_key_pem",
    "record_hash",
    "sign_checkpoint",
    "verify_chain",
    "verify_checkpoint",
]
