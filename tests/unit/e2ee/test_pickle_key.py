"""The pickle key: derived (HKDF, own label) from the audit data key, per account."""

from __future__ import annotations

import base64
import os

import pytest

from bridge.e2ee.olm import crypto_db_url
from bridge.e2ee.pickle_key import derive_pickle_key

SECRET = bytes(range(32))


def test_derived_key_is_stable_256_bit_and_depends_on_secret_and_account() -> None:
    key = derive_pickle_key(SECRET, "@bot:x")
    assert key == derive_pickle_key(SECRET, "@bot:x")
    assert len(base64.b64decode(key)) == 32
    assert key != derive_pickle_key(SECRET, "@other:x")
    assert key != derive_pickle_key(bytes(32), "@bot:x")
    # never the secret itself, in any form
    assert SECRET not in base64.b64decode(key) and base64.b64encode(SECRET).decode() != key


def test_short_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        derive_pickle_key(b"short", "@bot:x")


@pytest.mark.parametrize(
    ("bridge_url", "crypto_url"),
    [
        ("sqlite+aiosqlite:////data/bridge.db", "sqlite:///data/bridge.db"),
        ("sqlite+aiosqlite:///rel/bridge.db", f"sqlite://{os.path.abspath('rel/bridge.db')}"),
        (
            "postgresql+asyncpg://u:p@db:5432/bridge",
            "postgres://u:p@db:5432/bridge",
        ),
    ],
)
def test_crypto_store_uses_the_bridge_database(bridge_url: str, crypto_url: str) -> None:
    assert crypto_db_url(bridge_url) == crypto_url


def test_unsupported_database_is_refused() -> None:
    with pytest.raises(ValueError):
        crypto_db_url("mysql://x/y")
