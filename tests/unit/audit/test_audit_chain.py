"""Hash chain, signed checkpoints and the streaming verifier of the audit store."""

from __future__ import annotations

import hashlib
import logging
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.audit.chain import (
    EXPIRY_KIND,
    GENESIS,
    SHRED_KIND,
    ChainFields,
    ChainRecord,
    ChainVerifier,
    Checkpoint,
    CheckpointError,
    Removals,
    SigningKeyError,
    encode_record,
    key_fingerprint,
    load_or_create_signing_key,
    load_public_key,
    load_signing_key,
    public_key_pem,
    record_hash,
    sign_checkpoint,
    verify_chain,
    verify_checkpoint,
)
from bridge.audit.crypto import (
    BlindIndexer,
    DataKey,
    RecordDecryptError,
    ciphertext_digest,
    decrypt_record,
    encrypt_record,
)

SK = Ed25519PrivateKey.generate()
PK = SK.public_key()
OTHER_SK = Ed25519PrivateKey.generate()


def make_fields(seq: int, ct: bytes, *, room: bytes | None = b"R" * 16) -> ChainFields:
    return ChainFields(
        seq=seq,
        ts=1_700_000_000_000 + seq,
        kind="event" if seq % 3 else "action",
        event_id_idx=hashlib.md5(b"e%d" % seq).digest(),
        room_idx=room,
        sender_idx=b"S" * 16 if seq % 2 else None,
        type_idx=b"T" * 16,
        key_id="dk1",
        nonce=seq.to_bytes(12, "big"),
        ciphertext_digest=ciphertext_digest(ct),
    )


def rechain(
    fields: list[ChainFields], cts: list[bytes | None], prev: bytes = GENESIS
) -> list[ChainRecord]:
    out = []
    for f, ct in zip(fields, cts, strict=True):
        prev = record_hash(prev, f)
        out.append(ChainRecord(f, prev, ct))
    return out


def build(n: int, every: int = 0) -> tuple[list[ChainRecord], list[Checkpoint]]:
    cts: list[bytes | None] = [b"ciphertext-%d" % s for s in range(1, n + 1)]
    fields = [make_fields(s, ct) for s, ct in zip(range(1, n + 1), cts, strict=True)]  # type: ignore[arg-type]
    recs = rechain(fields, cts)
    cps = []
    if every:
        for r in recs:
            if r.fields.seq % every == 0:
                cps.append(sign_checkpoint(SK, r.fields.seq, r.hash, r.fields.ts, r.fields.seq))
    return recs, cps


def flip(b: bytes, i: int = 0) -> bytes:
    return b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1 :]


# -- encoding --------------------------------------------------------------------------


def test_encoding_layout() -> None:
    f = ChainFields(1, 2, "ev", b"E", None, b"", None, "k", b"N", b"D" * 32)
    enc = encode_record(GENESIS, f)
    expected = (
        b"PBAUDIT1"
        + GENESIS
        + (1).to_bytes(8, "big")
        + (2).to_bytes(8, "big")
        + b"\x00\x00\x00\x02ev"
        + b"\x01\x00\x00\x00\x01E"
        + b"\x00"
        + b"\x01\x00\x00\x00\x00"
        + b"\x00"
        + b"\x01\x00\x00\x00\x01k"
        + b"\x00\x00\x00\x01N"
        + b"\x00\x00\x00\x20"
        + b"D" * 32
    )
    assert enc == expected
    assert record_hash(GENESIS, f) == hashlib.sha256(expected).digest()
    with pytest.raises(ValueError, match="32 bytes"):
        record_hash(b"short", f)


opt_bytes = st.one_of(st.none(), st.binary(max_size=20))
fields_st = st.builds(
    ChainFields,
    seq=st.integers(0, 2**64 - 1),
    ts=st.integers(-(2**63), 2**63 - 1),
    kind=st.text(max_size=10),
    event_id_idx=opt_bytes,
    room_idx=opt_bytes,
    sender_idx=opt_bytes,
    type_idx=opt_bytes,
    key_id=st.one_of(st.none(), st.text(max_size=10)),
    nonce=st.binary(max_size=16),
    ciphertext_digest=st.binary(max_size=33),
    origin_ts=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
)


@settings(max_examples=300, deadline=None)
@given(a=fields_st, b=fields_st)
def test_encoding_is_injective(a: ChainFields, b: ChainFields) -> None:
    assert (encode_record(GENESIS, a) == encode_record(GENESIS, b)) == (a == b)


def test_none_and_empty_and_shifted_values_differ() -> None:
    base = make_fields(1, b"x")
    variants = [
        base._replace(sender_idx=None),
        base._replace(sender_idx=b""),
        base._replace(room_idx=None, sender_idx=b"R" * 16),
        base._replace(kind="even", event_id_idx=b"t" + base.event_id_idx),  # type: ignore[operator]
    ]
    encodings = {encode_record(GENESIS, v) for v in variants}
    assert len(encodings) == len(variants)


# -- intact chains ---------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 60), every=st.integers(0, 7))
def test_intact_chain_verifies(n: int, every: int) -> None:
    recs, cps = build(n, every)
    report = verify_chain(recs, cps, PK)
    assert report.ok, str(report)
    assert report.records_checked == n
    assert report.checkpoints_checked == len(cps)
    assert report.last_seq == (n or None)
    assert report.head_hash == (recs[-1].hash if recs else GENESIS)
    assert "OK" in str(report)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), every=st.integers(0, 7), batch=st.integers(1, 9))
def test_the_report_names_the_signed_head_and_the_unsigned_tail(
    n: int, every: int, batch: int
) -> None:
    """Record by record and in batches alike: the last checkpoint's seq and time, and how
    many records follow it with the archive times of the first and last of them."""
    recs, cps = build(n, every)
    one = verify_chain(recs, cps, PK)
    verifier = ChainVerifier(PK, cps)
    rows = [(*r.fields, r.hash, r.ciphertext) for r in recs]
    for i in range(0, len(rows), batch):
        verifier.feed_rows(rows[i : i + batch])
    batched = verifier.finish()
    signed = cps[-1].seq if cps else 0
    for report in (one, batched):
        assert report.ok
        assert report.signed_seq == signed
        assert report.signed_ts == (cps[-1].ts if cps else None)
        assert report.tail_records == n - signed
        if n > signed:
            assert report.tail_first_ts == recs[signed].fields.ts
            assert report.tail_last_ts == recs[-1].fields.ts
            assert report.tail_span_s == (n - signed - 1) / 1000
            assert report.tail_age_s(recs[signed].fields.ts + 5000) == 5.0
        else:
            assert report.tail_first_ts is None and report.tail_last_ts is None
            assert report.tail_age_s(1 << 50) == 0.0


def test_a_tail_after_a_trusted_start_counts_from_it() -> None:
    recs, cps = build(12, 5)
    report = verify_chain(recs[10:], [], PK, start=cps[1])
    assert report.ok and report.signed_seq == 10 and report.signed_ts == cps[1].ts
    assert report.tail_records == 2 and report.tail_first_ts == recs[10].fields.ts


def test_crypto_shredded_and_expired_records_still_verify() -> None:
    idx = BlindIndexer(b"\x01" * 32)
    keys = {r: DataKey.generate(idx.room(r)) for r in ("!a:x", "!b:x")}
    fields, cts = [], []
    for seq in range(1, 41):
        room = "!a:x" if seq % 2 else "!b:x"
        dk = keys[room]
        nonce, ct = encrypt_record(dk, seq, dk.scope, b"body %d" % seq)
        fields.append(
            ChainFields(
                seq,
                seq,
                "event",
                None,
                dk.scope,
                None,
                None,
                dk.key_id,
                nonce,
                ciphertext_digest(ct),
            )
        )
        cts.append(ct)
    recs = rechain(fields, list(cts))
    cps = [sign_checkpoint(SK, 40, recs[-1].hash, 0, 40)]

    # crypto-shred room !b: its data key is destroyed; ciphertext stays but is unreadable
    del keys["!b:x"]
    # retention: the ciphertext of the first 10 records is dropped, digests stay
    stripped = [r._replace(ciphertext=None) if r.fields.seq <= 10 else r for r in recs]
    report = verify_chain(stripped, cps, PK)
    assert report.ok, str(report)
    assert report.records_without_ciphertext == 10
    f11 = recs[10].fields
    assert f11.room_idx == idx.room("!a:x")
    assert decrypt_record(keys["!a:x"], 11, f11.room_idx, f11.nonce, recs[10].ciphertext or b"")
    with pytest.raises(RecordDecryptError):  # another room's key cannot read !b's records
        f12 = recs[11].fields
        decrypt_record(keys["!a:x"], 12, keys["!a:x"].scope, f12.nonce, recs[11].ciphertext or b"")


# -- attacks ---------------------------------------------------------------------------


COLUMNS = [
    "ts",
    "kind",
    "event_id_idx",
    "room_idx",
    "sender_idx",
    "type_idx",
    "key_id",
    "nonce",
    "ciphertext_digest",
]


def _tamper(f: ChainFields, column: str) -> ChainFields:
    value = getattr(f, column)
    new: Any
    if isinstance(value, int):
        new = value + 1
    elif isinstance(value, str):
        new = value + "x"
    elif value is None:
        new = b"\x00" * 16
    else:
        new = flip(value, len(value) - 1)
    return f._replace(**{column: new})


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), data=st.data(), column=st.sampled_from(COLUMNS))
def test_modified_column_detected_at_that_seq(n: int, data: st.DataObject, column: str) -> None:
    recs, cps = build(n, 5)
    i = data.draw(st.integers(0, n - 1))
    recs[i] = recs[i]._replace(fields=_tamper(recs[i].fields, column))
    report = verify_chain(recs, cps, PK)
    assert not report.ok
    assert report.first_bad_seq == i + 1
    expected = "ciphertext_digest" if column == "ciphertext_digest" else "hash_mismatch"
    assert report.problem_kind == expected
    assert report.records_checked == i


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), data=st.data())
def test_modified_ciphertext_byte_detected(n: int, data: st.DataObject) -> None:
    recs, cps = build(n, 4)
    i = data.draw(st.integers(0, n - 1))
    ct = recs[i].ciphertext
    assert ct is not None
    j = data.draw(st.integers(0, len(ct) - 1))
    recs[i] = recs[i]._replace(ciphertext=flip(ct, j))
    report = verify_chain(recs, cps, PK)
    assert (report.ok, report.first_bad_seq, report.problem_kind) == (
        False,
        i + 1,
        "ciphertext_digest",
    )
    assert "seq" in (report.problem or "")


def test_modified_stored_hash_detected() -> None:
    recs, _ = build(10)
    recs[6] = recs[6]._replace(hash=flip(recs[6].hash, 31))
    report = verify_chain(recs)
    assert (report.first_bad_seq, report.problem_kind) == (7, "hash_mismatch")


def test_rewritten_record_with_fixed_hash_is_caught_at_next_record() -> None:
    recs, _ = build(10)
    f = recs[4].fields._replace(kind="forged")
    prev = recs[3].hash
    recs[4] = ChainRecord(f, record_hash(prev, f), recs[4].ciphertext)
    report = verify_chain(recs)
    assert (report.first_bad_seq, report.problem_kind) == (6, "hash_mismatch")
    assert "previous record was rewritten" in (report.problem or "")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 40), data=st.data())
def test_deleted_record_detected(n: int, data: st.DataObject) -> None:
    recs, cps = build(n, 10)
    i = data.draw(st.integers(0, n - 2))  # deleting the last one is a truncation
    del recs[i]
    report = verify_chain(recs, cps, PK)
    assert (report.ok, report.first_bad_seq, report.problem_kind) == (False, i + 1, "missing")
    assert f"record {i + 1} is missing" in (report.problem or "")


def test_deleted_range_detected() -> None:
    recs, _ = build(30)
    del recs[9:14]
    report = verify_chain(recs)
    assert (report.first_bad_seq, report.problem_kind) == (10, "missing")
    assert "records 10..14 are missing" in (report.problem or "")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 40), data=st.data())
def test_reordered_records_detected(n: int, data: st.DataObject) -> None:
    recs, cps = build(n, 6)
    i = data.draw(st.integers(0, n - 2))
    j = data.draw(st.integers(i + 1, n - 1))
    recs[i], recs[j] = recs[j], recs[i]
    report = verify_chain(recs, cps, PK)
    assert (report.ok, report.first_bad_seq, report.problem_kind) == (False, i + 1, "reordered")


def test_swapped_row_contents_detected_as_hash_mismatch() -> None:
    # a database attacker who swaps two rows' contents but keeps seq ordering
    recs, _ = build(20)
    a, b = recs[4], recs[11]
    recs[4] = ChainRecord(b.fields._replace(seq=5), b.hash, b.ciphertext)
    recs[11] = ChainRecord(a.fields._replace(seq=12), a.hash, a.ciphertext)
    report = verify_chain(recs)
    assert (report.first_bad_seq, report.problem_kind) == (5, "hash_mismatch")


def test_duplicate_record_detected() -> None:
    recs, _ = build(10)
    recs.insert(5, recs[4])
    report = verify_chain(recs)
    assert (report.first_bad_seq, report.problem_kind) == (5, "duplicate")


def test_record_moved_back_far_detected() -> None:
    recs, _ = build(10)
    moved = recs.pop(2)
    recs.append(moved)
    report = verify_chain(recs)
    assert (report.first_bad_seq, report.problem_kind) == (3, "reordered")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), data=st.data())
def test_truncated_tail_behind_checkpoint(n: int, data: st.DataObject) -> None:
    recs, _ = build(n)
    cps = [sign_checkpoint(SK, n, recs[-1].hash, 0, n)]
    keep = data.draw(st.integers(0, n - 1))
    report = verify_chain(recs[:keep], cps, PK)
    assert (report.ok, report.first_bad_seq, report.problem_kind) == (False, keep + 1, "truncated")
    assert f"records {keep + 1}..{n} are missing" in (report.problem or "")


def test_truncated_and_rechained_tail_caught_by_checkpoint() -> None:
    # the attacker deletes records 16..20 and appends new ones with valid hashes
    recs, cps = build(30, 10)
    tail = [make_fields(s, b"fake")._replace(seq=s) for s in range(16, 31)]
    forged = recs[:15] + rechain(tail, [b"fake"] * len(tail), recs[14].hash)
    report = verify_chain(forged, cps, PK)
    assert (report.first_bad_seq, report.problem_kind) == (20, "checkpoint_mismatch")
    assert "records 11..20 were rewritten" in (report.problem or "")
    assert report.records_checked == 20


def test_checkpoint_record_count_mismatch() -> None:
    recs, _ = build(10)
    cp = sign_checkpoint(SK, 10, recs[-1].hash, 0, 11)
    report = verify_chain(recs, [cp], PK)
    assert (report.first_bad_seq, report.problem_kind) == (10, "checkpoint_mismatch")


@pytest.mark.parametrize(
    "forge",
    [
        lambda cp: Checkpoint(
            cp.seq, cp.head_hash, cp.ts + 1, cp.record_count, cp.key_id, cp.signature
        ),
        lambda cp: Checkpoint(
            cp.seq, flip(cp.head_hash), cp.ts, cp.record_count, cp.key_id, cp.signature
        ),
        lambda cp: Checkpoint(
            cp.seq, cp.head_hash, cp.ts, cp.record_count, cp.key_id, flip(cp.signature)
        ),
        lambda cp: sign_checkpoint(OTHER_SK, cp.seq, cp.head_hash, cp.ts, cp.record_count),
        lambda cp: Checkpoint(
            cp.seq,
            cp.head_hash,
            cp.ts,
            cp.record_count,
            cp.key_id,
            OTHER_SK.sign(cp.signed_message()),
        ),
    ],
    ids=["ts-altered", "hash-altered", "signature-altered", "other-key", "other-key-claims-ours"],
)
def test_forged_checkpoint_detected(forge: Callable[[Checkpoint], Checkpoint]) -> None:
    recs, cps = build(30, 10)
    cps[1] = forge(cps[1])
    report = verify_chain(recs, cps, PK)
    assert (report.ok, report.first_bad_seq, report.problem_kind) == (
        False,
        20,
        "checkpoint_signature",
    )
    assert report.checkpoints_checked == 1
    with pytest.raises(CheckpointError, match="seq 20"):
        verify_checkpoint(cps[1], PK)


def test_forged_checkpoint_beyond_tail_is_reported_as_forged() -> None:
    recs, _ = build(10)
    fake = sign_checkpoint(OTHER_SK, 50, recs[-1].hash, 0, 50)
    report = verify_chain(recs, [fake], PK)
    assert (report.first_bad_seq, report.problem_kind) == (50, "checkpoint_signature")
    assert "not a trusted checkpoint key" in (report.problem or "")


def test_checkpoints_need_a_trusted_key() -> None:
    recs, cps = build(10, 5)
    report = verify_chain(recs, cps, [])
    assert (report.first_bad_seq, report.problem_kind) == (5, "checkpoint_signature")


def test_key_rotation_of_signer_accepts_both_trusted_keys() -> None:
    recs, _ = build(20)
    cps = [
        sign_checkpoint(SK, 10, recs[9].hash, 0, 10),
        sign_checkpoint(OTHER_SK, 20, recs[19].hash, 0, 20),
    ]
    assert verify_chain(recs, cps, [PK, OTHER_SK.public_key()]).ok


def test_first_problem_in_seq_order_wins() -> None:
    recs, cps = build(30, 10)
    cps[2] = sign_checkpoint(OTHER_SK, 30, recs[29].hash, 0, 30)  # forged at 30
    recs[12] = recs[12]._replace(hash=flip(recs[12].hash))  # bad at 13
    report = verify_chain(recs, cps, PK)
    assert (report.first_bad_seq, report.problem_kind) == (13, "hash_mismatch")


def test_verify_from_trusted_start_checkpoint() -> None:
    recs, cps = build(30, 10)
    report = verify_chain(recs[10:], cps, PK, start=cps[0])
    assert report.ok and report.records_checked == 20 and report.checkpoints_checked == 2
    with pytest.raises(CheckpointError):
        ChainVerifier(PK, start=sign_checkpoint(OTHER_SK, 10, recs[9].hash, 0, 10))


def test_incremental_feed_api() -> None:
    recs, cps = build(12, 4)
    v = ChainVerifier(PK, cps)
    for r in recs:
        assert v.feed(r.fields, r.hash, r.ciphertext)
    assert not v.done
    assert v.finish().ok


def test_feed_stops_after_failure() -> None:
    recs, _ = build(5)
    v = ChainVerifier()
    assert not v.feed(recs[0].fields, b"\x00" * 32, recs[0].ciphertext)
    assert v.done
    assert not v.feed(recs[1].fields, recs[1].hash, recs[1].ciphertext)
    assert v.finish().first_bad_seq == 1


# -- checkpoints and signing keys ------------------------------------------------------


def test_checkpoint_dict_roundtrip() -> None:
    _, cps = build(5, 5)
    cp = Checkpoint.from_dict(cps[0].to_dict())
    assert cp == cps[0]
    verify_checkpoint(cp, PK)
    assert cp.key_id == key_fingerprint(PK)


def test_signing_key_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "signing.pem"
    key = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_signing_key(path)
    assert key_fingerprint(again.public_key()) == key_fingerprint(key.public_key())
    pem = public_key_pem(key)
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    pub = load_public_key(pem)
    assert key_fingerprint(pub) == key_fingerprint(key.public_key())
    cp = sign_checkpoint(again, 1, GENESIS, 0, 1)
    verify_checkpoint(cp, pub)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="bridge.audit.chain"):
        load_signing_key(path)
    assert any("chmod 600" in r.message for r in caplog.records)


def test_signing_key_errors(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="does not exist"):
        load_signing_key(tmp_path / "missing.pem")
    bad = tmp_path / "bad.pem"
    bad.write_text("nonsense")
    with pytest.raises(SigningKeyError, match=r"bad\.pem is not an unencrypted PEM"):
        load_or_create_signing_key(bad)
    with pytest.raises(SigningKeyError, match="cannot parse"):
        load_public_key("%%%")


# -- removals: NULL ciphertexts and missing data keys need a removal record ------------------


def _removal_chain(
    n: int = 60, *, expiry_at: int = 40, cutoff: int = 21, shred: tuple[int, str] | None = None
) -> list[tuple[Any, ...]]:
    """Records 1..n (ts = seq, key "k1"); an expiry record at ``expiry_at`` (origin_ts =
    ``cutoff``) and optionally a shred record ``(seq, key_id)``, chained as the store does."""
    rows: list[tuple[Any, ...]] = []
    prev = GENESIS
    for seq in range(1, n + 1):
        ct: bytes | None = b"ct-%d" % seq
        kind, key, origin = "event", "k1", seq
        if seq == expiry_at:
            kind, origin = EXPIRY_KIND, cutoff
        elif shred is not None and seq == shred[0]:
            kind, key, ct = SHRED_KIND, shred[1], None
        f = ChainFields(
            seq, seq, kind, None, b"R" * 16, None, None, key, b"n" * 12,
            ciphertext_digest(ct or b""), origin,
        )  # fmt: skip
        prev = record_hash(prev, f)
        rows.append((*f, prev, ct))
    return rows


def _drop_ct(rows: list[tuple[Any, ...]], *seqs: int) -> None:
    for s in seqs:
        rows[s - 1] = (*rows[s - 1][:12], None)


def _with_key(rows: list[tuple[Any, ...]], seq: int, key: str) -> list[tuple[Any, ...]]:
    """Rechain with record ``seq`` under another data key (as if written so)."""
    out, prev = [], GENESIS
    for r in rows:
        f = ChainFields(*r[:11])
        if f.seq == seq:
            f = f._replace(key_id=key)
        prev = record_hash(prev, f)
        out.append((*f, prev, r[12]))
    return out


def _both_ways(
    rows: list[tuple[Any, ...]], cps: list[Checkpoint], removals: Removals | None
) -> tuple[bool, int | None, str | None, str]:
    one = verify_chain(
        [(ChainFields(*r[:11]), r[11], r[12]) for r in rows], cps, PK, removals=removals
    )
    batched = ChainVerifier(PK, cps, removals=removals)
    for i in range(0, len(rows), 7):
        if not batched.feed_rows(rows[i : i + 7]):
            break
    two = batched.finish()
    got = (one.ok, one.first_bad_seq, one.problem_kind, one.records_checked)
    assert got == (two.ok, two.first_bad_seq, two.problem_kind, two.records_checked)
    assert one.problem == two.problem
    return one.ok, one.first_bad_seq, one.problem_kind, str(one.problem)


def _cp(rows: list[tuple[Any, ...]], seq: int) -> Checkpoint:
    return sign_checkpoint(SK, seq, rows[seq - 1][11], seq, seq)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("expired before the cutoff", (True, None, None)),
        ("no removals given: unchecked", (True, None, None)),
        ("expired at the cutoff", (False, 21, "ciphertext_removed")),
        ("expired after the expiry record", (False, 45, "ciphertext_removed")),
        ("expiry record not under a checkpoint", (False, 5, "ciphertext_removed")),
        ("unknown data key", (False, 50, "data_key_missing")),
        ("shredded data key", (True, None, None)),
        ("shred record not under a checkpoint", (False, 50, "data_key_missing")),
        ("expiry record read differs", (False, 40, "changed_while_verifying")),
    ],
)
def test_removals_must_be_recorded_and_checkpointed(
    case: str, expected: tuple[bool, int | None, str | None]
) -> None:
    shred = (55, "k2") if "shred" in case else None
    rows = _removal_chain(shred=shred)
    cps = [_cp(rows, 30), _cp(rows, 60)]
    removals: Removals | None = Removals(
        frozenset({"k1"}), ((40, 21),), ((shred[0], shred[1]),) if shred else ()
    )
    if case in ("expired before the cutoff", "no removals given: unchecked"):
        _drop_ct(rows, 5, 20)
        if case.startswith("no removals"):
            _drop_ct(rows, 25, 45)
            removals = None
    elif case == "expired at the cutoff":
        _drop_ct(rows, 5, 21)
    elif case == "expired after the expiry record":
        _drop_ct(rows, 45)
    elif case == "expiry record not under a checkpoint":
        _drop_ct(rows, 5)
        cps = [_cp(rows, 30)]
    elif case in ("unknown data key", "shredded data key"):
        rows = _with_key(rows, 50, "k2")
        cps = [_cp(rows, 30), _cp(rows, 60)]
        if case == "unknown data key":
            removals = Removals(frozenset({"k1"}), ((40, 21),))
    elif case == "shred record not under a checkpoint":
        rows = _with_key(rows, 50, "k2")
        cps = [_cp(rows, 30), _cp(rows, 52)]
    elif case == "expiry record read differs":
        removals = Removals(frozenset({"k1"}), ((40, 99),))
    ok, seq, kind, problem = _both_ways(rows, cps, removals)
    assert (ok, seq, kind) == expected, problem
    if case == "expiry record not under a checkpoint":
        assert "the expiry record at seq 40 covers it, but no signed checkpoint" in problem
    if case == "shred record not under a checkpoint":
        assert "the shred record at seq 55 names it, but no signed checkpoint" in problem
    if case == "unknown data key":
        assert "'k2' is not in the data_keys table and no shred record names it" in problem
