"""Decrypting end-to-end encrypted attachments: mautrix's own encryption round-trips, a
wrong hash is still decrypted (and said), an unusable key or IV is refused, and an IV whose
counter half starts at its maximum wraps (as WebCrypto's 64-bit AES-CTR counter does)."""

from __future__ import annotations

import base64
import hashlib

import pytest
from Crypto.Cipher import AES
from Crypto.Util import Counter
from mautrix.crypto.attachments import encrypt_attachment

from bridge.e2ee.attachments import BadAttachment, open_attachment

DATA = b"%PDF-1.4 the card is 4111 1111 1111 1111" * 50


def _b64(raw: bytes, urlsafe: bool = False) -> str:
    enc = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    return enc(raw).decode().rstrip("=")


def test_round_trip_with_mautrix_encryption() -> None:
    ciphertext, info = encrypt_attachment(DATA)
    opened = open_attachment(ciphertext, info.key.key, info.iv, info.hashes["sha256"])
    assert opened.plaintext == DATA and opened.hash_ok


def test_a_wrong_or_missing_hash_is_decrypted_and_said() -> None:
    ciphertext, info = encrypt_attachment(DATA)
    wrong = _b64(b"\x00" * 32)
    for declared in (wrong, "", "not base64 !"):
        opened = open_attachment(ciphertext, info.key.key, info.iv, declared)
        assert opened.plaintext == DATA and not opened.hash_ok


@pytest.mark.parametrize(
    ("k", "iv"),
    [
        ("!!", None),  # key not base64
        ("é", None),  # not ASCII
        (_b64(b"k" * 7, urlsafe=True), None),  # no AES key size
        (None, _b64(b"\x00" * 8)),  # IV not 16 bytes
        (None, "**"),
    ],
)
def test_an_unusable_key_or_iv_is_bad(k: str | None, iv: str | None) -> None:
    ciphertext, info = encrypt_attachment(DATA)
    with pytest.raises(BadAttachment) as err:
        open_attachment(ciphertext, k or info.key.key, iv or info.iv, info.hashes["sha256"])
    assert info.key.key not in str(err.value)


def test_the_counter_wraps_like_webcrypto() -> None:
    key, prefix = b"K" * 32, b"P" * 8
    counter = Counter.new(64, prefix=prefix, initial_value=2**64 - 1)
    ciphertext = AES.new(key, AES.MODE_CTR, counter=counter).encrypt(DATA)
    iv = _b64(prefix + b"\xff" * 8)
    opened = open_attachment(
        ciphertext, _b64(key, urlsafe=True), iv, _b64(hashlib.sha256(ciphertext).digest())
    )
    assert opened.plaintext == DATA and opened.hash_ok
