"""The audit keyring: key-encryption keys (KEKs) and the blind-index key.

The keyring is the one secret the audit store needs besides the checkpoint
signing key. It never lives in the database. It is a JSON document, read from a
file (mode 0600) or from an environment variable::

    {
      "version": 1,
      "keks": [
        {"id": "kek-20240601-3f2a", "key": "<base64 of 32 random bytes>",
         "created": "2024-06-01T12:00:00Z"},
        {"id": "kek-20250101-9c1d", "key": "<base64 of 32 random bytes>",
         "created": "2025-01-01T08:30:00Z"}
      ],
      "index_key": "<base64 of 32 random bytes>"
    }

* ``keks`` is ordered oldest first; the **last** entry is the *current* KEK, the
  one new data keys are wrapped with. Ids are 1-64 characters of
  ``[A-Za-z0-9._-]`` and must be unique.
* ``index_key`` is the root of the blind indexes (keyed HMAC-SHA256 over room,
  sender, event type, event id). It is separate from the KEKs and is *not*
  rotated with them: changing it would change every blind index in the store.
* The environment variable holds the same JSON, or the same JSON base64-encoded
  (handy for container secrets that dislike braces and quotes).

Rotation (see :mod:`bridge.audit.crypto` for re-wrapping): ``add_kek()``,
``save()``, re-wrap every stored data key under the new current KEK, then
``remove_kek(old_id)`` and ``save()`` again.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger(__name__)

KEYRING_VERSION = 1
KEY_BYTES = 32
ENV_VAR = "BRIDGE_AUDIT_KEYRING"
_KEK_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class KeyringError(Exception):
    """The keyring is missing, malformed, or lacks a key that is needed.

    The message always names the source (file path or environment variable) and,
    where relevant, the key id and what was expected.
    """


class KeyringMissingError(KeyringError):
    """No keyring was configured or the configured file does not exist (a config error)."""


@dataclass(frozen=True, slots=True, eq=False)
class Kek:
    """One key-encryption key: an AES-256 key with a stable id."""

    id: str
    key: bytes = field(repr=False)
    created: str = ""
    aead: AESGCM = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _KEK_ID_RE.match(self.id):
            raise KeyringError(f"invalid KEK id {self.id!r}: expected 1-64 chars of [A-Za-z0-9._-]")
        if len(self.key) != KEY_BYTES:
            raise KeyringError(
                f"KEK {self.id!r}: key must be {KEY_BYTES} bytes, got {len(self.key)}"
            )
        object.__setattr__(self, "aead", AESGCM(self.key))


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_kek_id() -> str:
    return f"kek-{datetime.now(UTC).strftime('%Y%m%d')}-{secrets.token_hex(3)}"


def check_file_permissions(path: str | os.PathLike[str]) -> str | None:
    """Return a warning if a secret file is readable or writable by group or others.

    Returns ``None`` when the mode is fine (or on platforms without POSIX modes).
    """
    if os.name != "posix":
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    loose = stat.S_IMODE(mode) & 0o077
    if not loose:
        return None
    who = []
    if loose & 0o070:
        who.append("group")
    if loose & 0o007:
        who.append("others")
    return (
        f"secret file {os.fspath(path)} is accessible by {' and '.join(who)} "
        f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {os.fspath(path)}"
    )


def _b64key(value: Any, what: str, source: str) -> bytes:
    if not isinstance(value, str):
        raise KeyringError(f"{source}: {what} must be a base64 string of {KEY_BYTES} bytes")
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyringError(f"{source}: {what} is not valid base64 ({exc})") from None
    if len(raw) != KEY_BYTES:
        raise KeyringError(
            f"{source}: {what} must decode to {KEY_BYTES} bytes, got {len(raw)} bytes"
        )
    return raw


class Keyring:
    """KEKs (oldest first, last is current) plus the blind-index root key."""

    def __init__(
        self,
        keks: list[Kek],
        index_key: bytes,
        *,
        source: str = "<memory>",
        warnings: list[str] | None = None,
    ) -> None:
        """Build a keyring; prefer :meth:`load`, :meth:`from_env` or :meth:`generate`."""
        if not keks:
            raise KeyringError(f"{source}: keyring has no KEKs (expected at least one in 'keks')")
        if len(index_key) != KEY_BYTES:
            raise KeyringError(f"{source}: index_key must be {KEY_BYTES} bytes")
        ids = [k.id for k in keks]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise KeyringError(f"{source}: duplicate KEK id(s): {', '.join(dupes)}")
        self._keks: list[Kek] = list(keks)
        self._by_id: dict[str, Kek] = {k.id: k for k in keks}
        self.index_key: bytes = index_key
        self.source = source
        #: Non-fatal problems found while loading (e.g. loose file permissions).
        self.warnings: list[str] = list(warnings or [])

    def __repr__(self) -> str:
        return f"Keyring(source={self.source!r}, keks={self.kek_ids!r})"

    # -- construction -------------------------------------------------------------------

    @classmethod
    def generate(cls, kek_id: str | None = None) -> Keyring:
        """Create a fresh keyring with one random KEK and a random index key."""
        kek = Kek(kek_id or _new_kek_id(), secrets.token_bytes(KEY_BYTES), _now_iso())
        return cls([kek], secrets.token_bytes(KEY_BYTES), source="<generated>")

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<memory>") -> Keyring:
        """Validate and build a keyring from its parsed JSON form."""
        if not isinstance(data, Mapping):
            raise KeyringError(f"{source}: keyring must be a JSON object")
        version = data.get("version", KEYRING_VERSION)
        if version != KEYRING_VERSION:
            raise KeyringError(
                f"{source}: unsupported keyring version {version!r} (expected {KEYRING_VERSION})"
            )
        unknown = set(data) - {"version", "keks", "index_key"}
        if unknown:
            raise KeyringError(f"{source}: unknown keyring field(s): {', '.join(sorted(unknown))}")
        raw_keks = data.get("keks")
        if not isinstance(raw_keks, list) or not raw_keks:
            raise KeyringError(
                f"{source}: 'keks' must be a non-empty list of {{id, key, created}} objects"
            )
        keks = []
        for i, item in enumerate(raw_keks):
            if not isinstance(item, Mapping) or "id" not in item or "key" not in item:
                raise KeyringError(f"{source}: keks[{i}] must be an object with 'id' and 'key'")
            kid = item["id"]
            if not isinstance(kid, str) or not _KEK_ID_RE.match(kid):
                raise KeyringError(
                    f"{source}: keks[{i}].id {kid!r} invalid: expected 1-64 chars of [A-Za-z0-9._-]"
                )
            key = _b64key(item["key"], f"key of KEK {kid!r}", source)
            created = item.get("created", "")
            keks.append(Kek(kid, key, str(created)))
        if "index_key" not in data:
            raise KeyringError(f"{source}: missing 'index_key' (base64 of {KEY_BYTES} bytes)")
        index_key = _b64key(data["index_key"], "index_key", source)
        return cls(keks, index_key, source=source)

    @classmethod
    def from_json(cls, text: str, *, source: str = "<memory>") -> Keyring:
        """Parse the JSON keyring format."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KeyringError(
                f"{source}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
            ) from None
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keyring:
        """Load a keyring file; loose permissions produce a warning (logged and kept).

        Raises :class:`KeyringMissingError` if the file does not exist and
        :class:`KeyringError` if it cannot be read or parsed.
        """
        p = Path(path)
        source = f"audit keyring file {p}"
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KeyringMissingError(
                f"{source} does not exist; create one with Keyring.generate().save(path) "
                f"(CLI: audit keyring generate) or set {ENV_VAR}"
            ) from None
        except OSError as exc:
            raise KeyringError(f"{source} cannot be read: {exc.strerror or exc}") from None
        ring = cls.from_json(text, source=source)
        warning = check_file_permissions(p)
        if warning:
            log.warning("%s", warning)
            ring.warnings.append(warning)
        return ring

    @classmethod
    def from_env(cls, value: str, *, var: str = ENV_VAR) -> Keyring:
        """Parse the keyring from an environment variable's value (JSON or base64 JSON)."""
        source = f"environment variable {var}"
        text = value.strip()
        if not text:
            raise KeyringMissingError(f"{source} is empty")
        if not text.startswith("{"):
            try:
                text = base64.b64decode(text, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                raise KeyringError(
                    f"{source}: expected the keyring JSON or its base64 encoding"
                ) from None
        return cls.from_json(text, source=source)

    @classmethod
    def resolve(
        cls,
        path: str | os.PathLike[str] | None,
        environ: Mapping[str, str] | None = None,
        *,
        var: str = ENV_VAR,
    ) -> Keyring:
        """Load from the environment variable if set, else from ``path``.

        Raises :class:`KeyringMissingError` when neither is configured.
        """
        env = os.environ if environ is None else environ
        value = env.get(var)
        if value:
            return cls.from_env(value, var=var)
        if path is None or os.fspath(path) == "":
            raise KeyringMissingError(
                f"no audit keyring configured: set audit.keyring_file in the config or the "
                f"environment variable {var}"
            )
        return cls.load(path)

    # -- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form (contains the secrets)."""
        return {
            "version": KEYRING_VERSION,
            "keks": [
                {"id": k.id, "key": base64.b64encode(k.key).decode(), "created": k.created}
                for k in self._keks
            ],
            "index_key": base64.b64encode(self.index_key).decode(),
        }

    def to_json(self) -> str:
        """Serialise to the documented JSON format."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_env_value(self) -> str:
        """The base64 form suitable for the environment variable."""
        return base64.b64encode(self.to_json().encode()).decode()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically with mode 0600 (temp file in the same directory, fsync, rename)."""
        p = Path(path)
        directory = p.parent if str(p.parent) else Path(".")
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self.to_json())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, p)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self.source = f"audit keyring file {p}"

    # -- access and rotation ------------------------------------------------------------

    @property
    def current(self) -> Kek:
        """The newest KEK: new data keys are wrapped with it."""
        return self._keks[-1]

    @property
    def keks(self) -> tuple[Kek, ...]:
        """All KEKs, oldest first."""
        return tuple(self._keks)

    @property
    def kek_ids(self) -> list[str]:
        """Ids of all KEKs, oldest first."""
        return [k.id for k in self._keks]

    def __contains__(self, kek_id: object) -> bool:
        return kek_id in self._by_id

    def get(self, kek_id: str) -> Kek:
        """Return the KEK with this id or raise a :class:`KeyringError` naming it."""
        try:
            return self._by_id[kek_id]
        except KeyError:
            raise KeyringError(
                f"{self.source}: KEK {kek_id!r} is not in the keyring "
                f"(it has: {', '.join(self.kek_ids)}); restore the keyring that contains it"
            ) from None

    def add_kek(self, kek_id: str | None = None, key: bytes | None = None) -> Kek:
        """Append a new KEK, which becomes :attr:`current`; return it."""
        kid = kek_id or _new_kek_id()
        while kek_id is None and kid in self._by_id:  # pragma: no cover - random clash
            kid = _new_kek_id()
        if kid in self._by_id:
            raise KeyringError(f"{self.source}: KEK id {kid!r} already exists")
        kek = Kek(kid, key if key is not None else secrets.token_bytes(KEY_BYTES), _now_iso())
        self._keks.append(kek)
        self._by_id[kid] = kek
        return kek

    def remove_kek(self, kek_id: str) -> None:
        """Remove a KEK. The current (newest) KEK cannot be removed.

        Only remove a KEK after every data key has been re-wrapped under a newer
        one (:func:`bridge.audit.crypto.rewrap`), or those data keys become
        unrecoverable.
        """
        self.get(kek_id)
        if kek_id == self.current.id:
            raise KeyringError(
                f"{self.source}: cannot remove KEK {kek_id!r}: it is the current KEK "
                f"(add a new one first)"
            )
        self._keks = [k for k in self._keks if k.id != kek_id]
        del self._by_id[kek_id]
