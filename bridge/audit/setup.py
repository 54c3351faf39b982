"""Open the store with the audit keys named in the configuration."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..config import AuditConfig, Config
from ..store import Store
from .chain import load_or_create_signing_key
from .keyring import ENV_VAR, Keyring, KeyringMissingError

log = logging.getLogger(__name__)


def audit_config(config: Config) -> AuditConfig:
    """The ``audit:`` section (defaults under data_dir when the config predates it)."""
    return config.audit or AuditConfig.for_data_dir(config.data_dir)


def load_keyring(
    cfg: AuditConfig, env: Mapping[str, str] | None = None
) -> tuple[Keyring | None, Path | None]:
    """The configured keyring, or ``(None, path)`` if it does not exist yet.

    The path is where a keyring generated on first start is saved (None when the keyring
    comes from the environment variable, which must then be complete).
    """
    environ = os.environ if env is None else env
    if environ.get(ENV_VAR):
        return Keyring.from_env(environ[ENV_VAR]), None
    try:
        return Keyring.load(cfg.keyring), cfg.keyring
    except KeyringMissingError:
        return None, cfg.keyring


def load_signing_key(cfg: AuditConfig) -> Ed25519PrivateKey:
    """The checkpoint signing key, created (0600) on first use."""
    cfg.signing_key.parent.mkdir(parents=True, exist_ok=True)
    return load_or_create_signing_key(cfg.signing_key)


async def open_store(
    config: Config, *, env: Mapping[str, str] | None = None, create: bool = True
) -> Store:
    """Open the configured database as the encrypted audit store.

    The bridge opens with ``create=True``: the schema is created or migrated, data keys
    left under an older KEK are re-wrapped under the current one, and the legal holds of
    ``audit.legal_hold`` are synchronised into the store.

    Raises KeyringError (a configuration error: keyring missing for a non-empty database,
    malformed), SigningKeyError, StoreError (keyring does not fit the stored keys) or
    StoreUnavailable (database unreachable).
    """
    cfg = audit_config(config)
    keyring, path = load_keyring(cfg, env)
    store = await Store.open(
        config.database.url,
        pool_size=config.database.pool_size,
        create=create,
        keyring=keyring,
        keyring_path=path,
        signing_key=load_signing_key(cfg),
        checkpoint_every=cfg.checkpoint_every,
        checkpoint_log=cfg.checkpoint_log,
        rewrap_keys=create,
    )
    if create:  # the bridge (the CLI opens with create=False and writes nothing here)
        try:
            changes = await store.sync_config_holds(cfg.legal_hold_rooms, cfg.legal_hold_users)
        except BaseException:
            await store.close()
            raise
        if changes:
            log.info("legal holds from the configuration: %d changes (audited)", changes)
    return store
