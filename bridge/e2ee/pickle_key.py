"""The key that protects the crypto library's pickles at rest (derived, never stored).

Derived with HKDF-SHA256 from the audit store's operational data key (itself wrapped by
the keyring's KEK), under a label of its own: rotating the KEK re-wraps the data key and
leaves this key, and so the bot's device, unchanged.
"""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LABEL = b"matrix-policy-bridge/e2ee/pickle-key/v1"


def derive_pickle_key(secret: bytes, account: str) -> str:
    """A 256-bit pickle key for ``account`` (the bot's user ID), as base64 text."""
    if len(secret) < 16:
        raise ValueError("the secret to derive the pickle key from is too short")
    hkdf = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=LABEL + b"\0" + account.encode()
    )
    return base64.b64encode(hkdf.derive(secret)).decode("ascii")
