"""Open the store with the audit keys named in the configuration."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.audit.chain import load_or_create_signing_key
from bridge.audit.keyring import ENV_VAR, Keyring, KeyringMissingError
from bridge.config import AuditConfig, Config
from bridge.store import Store, StoreError, StoreSettings

log = logging.getLogger(__name__)


def audit_config(config: Config) -> AuditConfig:
    """The ``audit:`` section (defaults under data_dir when the config predates it)."""
    return config.audit_settings()


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
    """The checkpoint signing key, created (0600) on first use (by the bridge only)."""
    cfg.signing_key.parent.mkdir(parents=True, exist_ok=True)
    return load_or_create_signing_key(cfg.signing_key)


async def open_store(
    config: Config,
    *,
    env: Mapping[str, str] | None = None,
    create: bool = True,
    sign_checkpoints: bool | None = None,
) -> Store:
    """Open the configured database as the encrypted audit store.

    The bridge opens with ``create=True``: the schema is created or migrated, data keys
    left under an older KEK are re-wrapped under the current one, the legal holds of
    ``audit.legal_hold`` are synchronised into the store, and removals of expiry runs
    from before removal records are recorded (once). The signing key is loaded, or
    created on first start.

    ``sign_checkpoints`` defaults to ``create``. The audit CLI opens with ``create=False``:
    the signing key is neither read nor created and no checkpoint is signed (not even at
    close), so a command run where the private key is absent cannot sign with a new key
    that ``verify`` would not trust; what it appends is covered by the bridge's next
    checkpoint.

    Raises KeyringError (a configuration error: keyring missing for a non-empty database,
    malformed), SigningKeyError, StoreError (keyring does not fit the stored keys) or
    StoreUnavailable (database unreachable).
    """
    cfg = audit_config(config)
    sign = create if sign_checkpoints is None else sign_checkpoints
    keyring, path = load_keyring(cfg, env)
    store = await Store.open(
        config.database.url,
        StoreSettings(
            pool_size=config.database.pool_size,
            create=create,
            keyring=keyring,
            keyring_path=path,
            signing_key=load_signing_key(cfg) if sign else None,
            checkpoint_every=cfg.checkpoint_every,
            checkpoint_log=cfg.checkpoint_log,
            rewrap_keys=create,
            sign_checkpoints=sign,
        ),
    )
    if create:  # the bridge (the CLI opens with create=False and writes nothing here)
        try:
            changes = await store.holds.sync_config(cfg.legal_hold_rooms, cfg.legal_hold_users)
            try:
                await store.expiry.record_earlier_removals()
            except StoreError as e:  # not a reason to stop: verify names what is unrecorded
                log.error("could not record the removals of earlier expiry runs: %s", e)
        except BaseException:
            await store.close()
            raise
        if changes:
            log.info("legal holds from the configuration: %d changes (audited)", changes)
    return store
