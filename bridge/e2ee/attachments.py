"""Decrypting end-to-end encrypted attachments (``content.file``, AES-256-CTR, v2).

A client in an encrypted room uploads the file encrypted and sends the key, IV and the
ciphertext's SHA-256 inside the (Megolm-encrypted) message. The bot holds the decrypted
message, so it holds the key. mautrix's ``decrypt_attachment`` (pycryptodome) is imported
only when a file is decrypted, like the rest of the crypto library behind this package.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

#: The only cipher and version of ``EncryptedFile`` (client-server API, "Sending encrypted
#: attachments"). Anything else is refused as unreadable, never guessed at.
ALGORITHM = "A256CTR"
VERSION = "v2"


class BadAttachment(ValueError):
    """The key or IV does not decode, or the cipher cannot be set up with them."""


@dataclass(frozen=True, slots=True)
class Opened:
    """A decrypted attachment: the plaintext, and whether the ciphertext had the hash the
    message declared (``hashes.sha256``)."""

    plaintext: bytes
    hash_ok: bool


def _b64(value: str) -> bytes:
    """Unpadded standard or URL-safe base64 to bytes (ValueError when it is not)."""
    raw = value.encode("ascii")  # UnicodeEncodeError is a ValueError
    return base64.b64decode(raw + b"=" * (-len(raw) % 4), altchars=b"-_", validate=True)


def open_attachment(ciphertext: bytes, k: str, iv: str, sha256: str) -> Opened:
    """Verify and decrypt ``ciphertext`` with the JWK key ``k`` (base64url) and ``iv``.

    A ciphertext whose hash differs from ``sha256`` is decrypted all the same (``hash_ok``
    False): conforming clients refuse to show it, but one that skips the check would, so
    its text is still judged. Raises :class:`BadAttachment` when the key or IV is unusable.
    CPU-bound (AES and SHA-256 over the whole file): call it off the event loop.
    """
    from mautrix.crypto.attachments import decrypt_attachment
    from mautrix.errors import DecryptionError

    actual = hashlib.sha256(ciphertext).digest()
    try:
        hash_ok = _b64(sha256) == actual
    except (ValueError, binascii.Error):
        hash_ok = False
    try:
        if len(_b64(iv)) != 16:
            raise BadAttachment("the IV is not 16 bytes")
        _b64(k)
        # The hash was compared above; mautrix is handed the actual one so that a
        # mismatch is still decrypted (see the docstring).
        actual_b64 = base64.b64encode(actual).decode("ascii").rstrip("=")
        plaintext = decrypt_attachment(ciphertext, k, actual_b64, iv)
    except BadAttachment:
        raise
    except (DecryptionError, ValueError, OverflowError) as e:
        # Never the key material in the message: it may reach a log or an audit record.
        raise BadAttachment(f"the key or IV cannot be used ({e.__class__.__name__})") from None
    return Opened(bytes(plaintext), hash_ok)
