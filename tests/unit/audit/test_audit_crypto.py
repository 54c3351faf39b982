"""Keyring, envelope encryption and blind indexes of the audit store."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.audit.crypto import (
    GLOBAL_SCOPE,
    BlindIndexer,
    CryptoError,
    DataKey,
    KeyUnwrapError,
    RecordDecryptError,
    WrappedKey,
    blind_index,
    check_keyring,
    decrypt_record,
    encrypt_record,
    record_aad,
    rewrap,
    unwrap,
    unwrap_with_keyring,
    wrap,
)
from bridge.audit.keyring import (
    ENV_VAR,
    Kek,
    Keyring,
    KeyringError,
    KeyringMissingError,
    check_file_permissions,
)

ROOM_A = "!alpha:example.org"
ROOM_B = "!beta:example.org"


@pytest.fixture
def ring() -> Keyring:
    return Keyring.generate("k1")


@pytest.fixture
def idx(ring: Keyring) -> BlindIndexer:
    return BlindIndexer(ring.index_key)


# -- keyring file ----------------------------------------------------------------------


def test_generate_save_load_roundtrip(tmp_path: Path, ring: Keyring) -> None:
    path = tmp_path / "keyring.json"
    ring.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Keyring.load(path)
    assert loaded.kek_ids == ["k1"]
    assert loaded.current.key == ring.current.key
    assert loaded.index_key == ring.index_key
    assert loaded.warnings == []
    data = json.loads(path.read_text())
    assert data["version"] == 1
    assert len(base64.b64decode(data["keks"][0]["key"])) == 32
    assert data["keks"][0]["created"].endswith("Z")


def test_save_tightens_mode_despite_umask(tmp_path: Path, ring: Keyring) -> None:
    old = os.umask(0)
    try:
        ring.save(tmp_path / "k.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k.json").stat().st_mode) == 0o600


@pytest.mark.parametrize(("mode", "who"), [(0o644, "group and others"), (0o640, "group")])
def test_loose_permissions_warn(
    tmp_path: Path, ring: Keyring, caplog: pytest.LogCaptureFixture, mode: int, who: str
) -> None:
    path = tmp_path / "keyring.json"
    ring.save(path)
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="bridge.audit.keyring"):
        loaded = Keyring.load(path)
    assert len(loaded.warnings) == 1
    assert who in loaded.warnings[0]
    assert f"chmod 600 {path}" in loaded.warnings[0]
    assert any("accessible by" in r.message for r in caplog.records)
    path.chmod(0o600)
    assert check_file_permissions(path) is None


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(KeyringMissingError, match=r"nope\.json does not exist"):
        Keyring.load(path)


def test_resolve_prefers_env_and_requires_something(tmp_path: Path, ring: Keyring) -> None:
    path = tmp_path / "k.json"
    Keyring.generate("file-kek").save(path)
    assert Keyring.resolve(path, {}).kek_ids == ["file-kek"]
    assert Keyring.resolve(path, {ENV_VAR: ring.to_json()}).kek_ids == ["k1"]
    with pytest.raises(KeyringMissingError, match=ENV_VAR):
        Keyring.resolve(None, {})


def test_from_env_json_and_base64(ring: Keyring) -> None:
    a = Keyring.from_env(ring.to_json())
    b = Keyring.from_env(ring.to_env_value())
    assert a.current.key == b.current.key == ring.current.key
    assert "environment variable" in a.source
    with pytest.raises(KeyringError, match="environment variable"):
        Keyring.from_env("not base64 !!")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(keks=[]), "non-empty list"),
        (lambda d: d["keks"][0].update(key=base64.b64encode(b"x" * 16).decode()), "'k1'.*16 bytes"),
        (lambda d: d["keks"][0].update(key="@@@"), "not valid base64"),
        (lambda d: d["keks"][0].update(id="bad id!"), "invalid"),
        (lambda d: d.pop("index_key"), "missing 'index_key'"),
        (lambda d: d.update(version=9), "unsupported keyring version"),
        (lambda d: d["keks"].append(dict(d["keks"][0])), "duplicate KEK id"),
        (lambda d: d.update(extra=1), "unknown keyring field"),
    ],
)
def test_malformed_keyring_messages(
    tmp_path: Path, ring: Keyring, mutate: object, message: str
) -> None:
    data = ring.to_dict()
    mutate(data)  # type: ignore[operator]
    path = tmp_path / "k.json"
    path.write_text(json.dumps(data))
    with pytest.raises(KeyringError, match=message) as exc:
        Keyring.load(path)
    assert str(path) in str(exc.value)


def test_bad_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_text('{\n  "keks": [\n')
    with pytest.raises(KeyringError, match=r"k\.json: not valid JSON \(line \d+"):
        Keyring.load(path)


def test_add_and_remove_kek(ring: Keyring) -> None:
    new = ring.add_kek("k2")
    assert ring.current is new
    assert ring.kek_ids == ["k1", "k2"]
    with pytest.raises(KeyringError, match="already exists"):
        ring.add_kek("k2")
    with pytest.raises(KeyringError, match="current KEK"):
        ring.remove_kek("k2")
    ring.remove_kek("k1")
    assert ring.kek_ids == ["k2"]
    with pytest.raises(KeyringError, match="'k1' is not in the keyring"):
        ring.remove_kek("k1")
    generated = ring.add_kek()
    assert generated.id.startswith("kek-")


def test_repr_hides_secrets(ring: Keyring) -> None:
    dk = DataKey.generate(GLOBAL_SCOPE)
    assert ring.current.key.hex() not in repr(ring.current)
    assert dk.key.hex() not in repr(dk)
    assert "k1" in repr(ring)


# -- wrapping and rotation -------------------------------------------------------------


def test_wrap_unwrap_roundtrip(ring: Keyring, idx: BlindIndexer) -> None:
    dk = DataKey.generate(idx.room(ROOM_A))
    wk = wrap(ring.current, dk)
    assert wk.kek_id == "k1" and wk.key_id == dk.key_id and wk.scope == dk.scope
    assert dk.key not in wk.blob
    back = unwrap_with_keyring(ring, wk)
    assert back.key == dk.key and back.scope == dk.scope


def test_wrong_kek_material_fails_clearly(ring: Keyring) -> None:
    dk = DataKey.generate(GLOBAL_SCOPE)
    wk = wrap(ring.current, dk)
    impostor = Kek("k1", os.urandom(32))
    with pytest.raises(KeyUnwrapError, match=f"data key '{dk.key_id}'.*KEK 'k1'.*wrong key"):
        unwrap(impostor, wk)


def test_missing_kek_names_id(ring: Keyring) -> None:
    wk = wrap(ring.current, DataKey.generate(GLOBAL_SCOPE))
    other = Keyring.generate("k9")
    with pytest.raises(KeyUnwrapError, match=r"KEK 'k1' is needed.*it has: k9"):
        unwrap_with_keyring(other, wk)
    with pytest.raises(KeyUnwrapError, match=r"missing KEK 'k1' \(2 data keys\)"):
        check_keyring(other, [wk, wrap(ring.current, DataKey.generate(b"x"))])
    with pytest.raises(KeyringError):  # KeyUnwrapError is also a KeyringError
        check_keyring(other, [wk])


def test_wrapped_key_bound_to_scope_and_id(ring: Keyring, idx: BlindIndexer) -> None:
    wk = wrap(ring.current, DataKey.generate(idx.room(ROOM_A)))
    moved = wk._replace(scope=idx.room(ROOM_B))
    with pytest.raises(KeyUnwrapError):
        unwrap_with_keyring(ring, moved)
    renamed = wk._replace(key_id="other")
    with pytest.raises(KeyUnwrapError):
        unwrap_with_keyring(ring, renamed)
    flipped = wk._replace(blob=wk.blob[:-1] + bytes([wk.blob[-1] ^ 1]))
    with pytest.raises(KeyUnwrapError):
        unwrap_with_keyring(ring, flipped)


def test_rotation_rewraps_without_reencrypting(tmp_path: Path, idx: BlindIndexer) -> None:
    path = tmp_path / "keyring.json"
    ring = Keyring.generate("k1")
    ring.save(path)
    scope = idx.room(ROOM_A)
    dk = DataKey.generate(scope)
    stored: list[WrappedKey] = [wrap(ring.current, dk)]
    records = [(seq, *encrypt_record(dk, seq, scope, f"msg {seq}".encode())) for seq in (1, 2, 3)]

    ring.add_kek("k2")
    ring.save(path)
    stored = [rewrap(ring, wk) for wk in stored]
    assert [wk.kek_id for wk in stored] == ["k2"]
    assert rewrap(ring, stored[0]) is stored[0]  # already current: unchanged
    ring.remove_kek("k1")
    ring.save(path)

    reloaded = Keyring.load(path)
    assert reloaded.kek_ids == ["k2"]
    check_keyring(reloaded, stored)
    dk2 = unwrap_with_keyring(reloaded, stored[0])
    for seq, nonce, ct in records:  # old records decrypt, none were re-encrypted
        assert decrypt_record(dk2, seq, scope, nonce, ct) == f"msg {seq}".encode()
    assert wrap(reloaded.current, DataKey.generate(b"new")).kek_id == "k2"


def test_startup_with_old_keyring_after_rotation_fails_naming_key(ring: Keyring) -> None:
    old = Keyring.from_json(ring.to_json())
    ring.add_kek("k2")
    stored = [rewrap(ring, wrap(ring.current, DataKey.generate(GLOBAL_SCOPE)))]
    ring.remove_kek("k1")
    with pytest.raises(KeyUnwrapError, match="missing KEK 'k2'"):
        check_keyring(old, stored)


# -- records ---------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(plaintext=st.binary(max_size=2000), seq=st.integers(min_value=0, max_value=2**63))
def test_record_roundtrip(plaintext: bytes, seq: int) -> None:
    scope = b"s" * 16
    dk = DataKey("d1", scope, b"\x07" * 32)
    nonce, ct = encrypt_record(dk, seq, scope, plaintext)
    assert len(nonce) == 12 and len(ct) == len(plaintext) + 16
    assert decrypt_record(dk, seq, scope, nonce, ct) == plaintext


def test_ciphertext_swapped_between_seqs_fails(idx: BlindIndexer) -> None:
    scope = idx.room(ROOM_A)
    dk = DataKey.generate(scope)
    n1, c1 = encrypt_record(dk, 1, scope, b"first")
    n2, c2 = encrypt_record(dk, 2, scope, b"second")
    with pytest.raises(RecordDecryptError, match="seq 2") as exc:
        decrypt_record(dk, 2, scope, n1, c1)
    assert exc.value.seq == 2
    with pytest.raises(RecordDecryptError, match="seq 1"):
        decrypt_record(dk, 1, scope, n2, c2)


def test_ciphertext_swapped_between_rooms_fails(idx: BlindIndexer) -> None:
    sa, sb = idx.room(ROOM_A), idx.room(ROOM_B)
    dka, dkb = DataKey.generate(sa), DataKey.generate(sb)
    nonce, ct = encrypt_record(dka, 5, sa, b"room a secret")
    with pytest.raises(RecordDecryptError, match="seq 5"):
        decrypt_record(dkb, 5, sb, nonce, ct)
    with pytest.raises(RecordDecryptError, match="another scope"):
        decrypt_record(dka, 5, sb, nonce, ct)
    # same key material relabelled to another room must not decrypt either
    relabelled = DataKey(dka.key_id, sb, dka.key)
    with pytest.raises(RecordDecryptError):
        decrypt_record(relabelled, 5, sb, nonce, ct)


def test_encrypt_refuses_foreign_scope(idx: BlindIndexer) -> None:
    dk = DataKey.generate(idx.room(ROOM_A))
    with pytest.raises(CryptoError, match="another scope"):
        encrypt_record(dk, 1, idx.room(ROOM_B), b"x")


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_tampered_record_fails(where: str) -> None:
    dk = DataKey.generate(GLOBAL_SCOPE)
    nonce, ct = encrypt_record(dk, 9, GLOBAL_SCOPE, b"payload" * 10)
    if where == "nonce":
        nonce = bytes([nonce[0] ^ 1]) + nonce[1:]
    elif where == "ciphertext":
        ct = bytes([ct[0] ^ 1]) + ct[1:]
    else:
        ct = ct[:-1] + bytes([ct[-1] ^ 1])
    with pytest.raises(RecordDecryptError, match="seq 9"):
        decrypt_record(dk, 9, GLOBAL_SCOPE, nonce, ct)


def test_nonces_are_unique() -> None:
    dk = DataKey.generate(GLOBAL_SCOPE)
    nonces = {encrypt_record(dk, i, GLOBAL_SCOPE, b"")[0] for i in range(5000)}
    assert len(nonces) == 5000


def test_record_aad_layout() -> None:
    dk = DataKey("ab", b"\x01\x02", b"\x00" * 32)
    assert record_aad(dk, 258, dk.scope) == (
        b"PBREC1" + (258).to_bytes(8, "big") + b"\x00\x02\x01\x02" + b"\x00\x02ab"
    )


# -- blind indexes ---------------------------------------------------------------------


def test_blind_index_deterministic_and_truncated(ring: Keyring, idx: BlindIndexer) -> None:
    a = blind_index(ring.index_key, "sender", "@alice:example.org")
    assert len(a) == 16
    assert a == blind_index(ring.index_key, "sender", "@alice:example.org")
    assert a == blind_index(ring.index_key, "sender", b"@alice:example.org")
    assert a == idx("sender", "@alice:example.org")
    assert idx("sender", None) is None
    assert a != blind_index(ring.index_key, "sender", "@Alice:example.org")


def test_blind_index_domain_separation(ring: Keyring) -> None:
    value = "!same:example.org"
    per_field = {f: blind_index(ring.index_key, f, value) for f in BlindIndexer.FIELDS}
    assert len(set(per_field.values())) == len(BlindIndexer.FIELDS)
    other = Keyring.generate()
    assert blind_index(other.index_key, "room", value) != per_field["room"]


def test_blind_index_independent_of_kek_rotation(ring: Keyring) -> None:
    before = blind_index(ring.index_key, "room", ROOM_A)
    ring.add_kek("k2")
    ring.remove_kek("k1")
    assert blind_index(ring.index_key, "room", ROOM_A) == before


@settings(max_examples=100, deadline=None)
@given(a=st.text(max_size=40), b=st.text(max_size=40))
def test_blind_index_equality_matches_plaintext_equality(a: str, b: str) -> None:
    key = b"\x42" * 32
    assert (blind_index(key, "type", a) == blind_index(key, "type", b)) == (a == b)


def test_room_scope_helper(idx: BlindIndexer) -> None:
    assert idx.room(None) == GLOBAL_SCOPE
    assert idx.room(ROOM_A) == idx("room", ROOM_A)
