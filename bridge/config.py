"""Configuration: load, merge over the documented defaults, validate, resolve secrets.

The file ``config.example.yaml`` shipped in the package is both the documentation and the
default values: a user's file is merged over it, so every key has a documented default.
Validation collects every problem (key path, bad value, what was expected) before failing.
"""

from __future__ import annotations

import copy
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from bridge.attachments.kinds import DEFAULT_UNREADABLE, OnUnreadable, Unreadable
from bridge.attachments.limits import MIB, Limits
from bridge.policy.model import server_name
from bridge.policy.notices import Languages, NoticeSettings
from bridge.roles import Role

ENV_PREFIX = "POLICY_BRIDGE__"
PLACEHOLDER_PREFIX = "CHANGE_ME"
# A token containing one of these (letter case, spaces and punctuation ignored) is a
# placeholder someone forgot to replace, like the example config's CHANGE_ME_AS_TOKEN.
PLACEHOLDER_MARKERS = ("changeme", "replaceme", "placeholder")
MIN_TOKEN_LENGTH = 32  # generate-registration writes 43 characters (256 bits)
ROLES = tuple(r.value for r in Role)
# Mappings whose keys are data (user IDs, room IDs, detector names), not options.
FREEFORM = frozenset({"permissions", "rooms", "spaces", "detectors", "languages"})


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration in {source}:\n{lines}")


def default_config_text() -> str:
    """The text of the bundled ``config.example.yaml``."""
    return resources.files("bridge").joinpath("config.example.yaml").read_text("utf-8")


def _yaml() -> YAML:
    y = YAML()  # round-trip mode keeps comments for generate-registration
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    return y


@dataclass(frozen=True, slots=True)
class HomeserverConfig:
    url: str
    domain: str
    admin_token: str
    startup_timeout: float


@dataclass(frozen=True, slots=True)
class AppserviceConfig:
    id: str
    address: str
    hostname: str
    port: int
    as_token: str
    hs_token: str
    allow_query_token: bool
    max_body_size: int
    bot_localpart: str
    bot_displayname: str


@dataclass(frozen=True, slots=True)
class GateConfig:
    base_path: str
    token: str


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    url: str
    pool_size: int

    @property
    def backend(self) -> str:
        return "postgresql" if self.url.startswith("postgresql") else "sqlite"


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    command_prefix: str
    management_room: str
    auto_enroll: bool
    permissions: Mapping[str, Role]
    obtain_power: bool = False


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    max_attempts: int
    initial_backoff: float
    max_backoff: float
    rate_per_second: float


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str
    format: str


@dataclass(frozen=True, slots=True)
class AuditConfig:
    keyring: Path  # the keyring file (BRIDGE_AUDIT_KEYRING, when set, is used instead)
    signing_key: Path  # Ed25519 checkpoint signing key (PEM)
    checkpoint_every: int
    archive_retention_ms: int | None  # None = keep forever
    archive_expiry_interval_s: float = 3600.0  # how often the expiry job runs
    legal_hold_rooms: tuple[str, ...] = ()  # on legal hold from config (plus `!policy hold`)
    legal_hold_users: tuple[str, ...] = ()
    post_checkpoints: bool = True  # post checkpoint heads to the management room
    checkpoint_post_interval_s: float = 3600.0  # at most one such notice per interval
    # public keys (PEM) of earlier signing keys, trusted by verify besides the current one
    previous_public_keys: tuple[Path, ...] = ()
    # the longest any record stays unsigned: a checkpoint is signed this long after the
    # oldest record not yet under one (besides every checkpoint_every records and at stop)
    checkpoint_interval_s: float = 60.0

    @property
    def checkpoint_log(self) -> Path:
        """Signed checkpoints are appended here, beside the signing key (outside the DB)."""
        return self.signing_key.with_name(self.signing_key.stem + ".checkpoints.jsonl")

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> AuditConfig:
        return cls(data_dir / "audit-keyring.json", data_dir / "audit-signing.pem", 1000, None)


# A scoped policy section as written: "global" (the section's own fields) and space and room
# IDs (from its ``spaces:`` and ``rooms:``) -> the policy fields that scope sets.
ScopeFields = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class FederationConfig:
    """The ``federation:`` section. The policy layer merges ``scopes`` (see policy.scopes)."""

    scopes: ScopeFields  # mode, servers, allow_ip_literals per scope
    kick_excluded_members: bool
    rollout_rate: float  # rooms per second brought in line after a policy change
    # The section as written, merged over the defaults: what the rollout fingerprint hashes.
    written: Mapping[str, Any] = field(repr=False, compare=False)

    def to_doc(self) -> dict[str, Any]:
        """The section as written (a copy), the same document earlier versions hashed."""
        return copy.deepcopy(dict(self.written))


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """The ``retention:`` section: scoped lifetimes and the sweeper's pacing."""

    scopes: ScopeFields  # max_lifetime, min_lifetime per scope
    sweep_interval_s: float
    sweep_batch: int  # events per room per sweep
    sweep_max_events: int  # events per sweep, all rooms together
    sweep_max_pending: int  # no new sweep work while more executor actions wait
    written: Mapping[str, Any] = field(repr=False, compare=False)

    def to_doc(self) -> dict[str, Any]:
        """The section as written (a copy), the same document earlier versions hashed."""
        return copy.deepcopy(dict(self.written))


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Who may read ``/metrics`` and where it is served."""

    token: str  # bearer token /metrics requires; "" = none
    listen: tuple[str, int] | None  # its own (host, port); None = the appservice listener


# -- e2ee (the bot as an end-to-end encrypted member; see docs/e2ee.md) ----------------
@dataclass(frozen=True, slots=True)
class E2EEConfig:
    """``e2ee:``: the bot's own E2EE device, decrypting what it is given keys for."""

    enabled: bool = False
    device_name: str = "policy bridge (compliance archive)"
    key_wait_s: float = 3.0  # how long the worker waits for a late room key per transaction
    retry_interval_s: float = 30.0  # undecryptable events are retried at least this often
    max_pending: int = 5000  # undecryptable events kept for retry (oldest dropped, recorded)
    notice: str = ""  # transparency notice posted on joining an encrypted room ("" = default)


def _e2ee_config(v: _Validator) -> E2EEConfig:
    """The ``e2ee`` section."""
    return E2EEConfig(
        enabled=v.boolean("e2ee.enabled"),
        device_name=v.string("e2ee.device_name"),
        key_wait_s=v.number("e2ee.key_wait_seconds", 0, 60),
        retry_interval_s=v.number("e2ee.retry_interval_seconds", 1, 86400),
        max_pending=v.integer("e2ee.max_pending", 1, 1_000_000),
        notice=v.string("e2ee.notice", nonempty=False),
    )


# -- end of e2ee -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    """The compliance console (``console:``): where it is served, sessions, login limits."""

    enabled: bool = False
    path: str = "/console"  # on the appservice listener ("" with ``listen``)
    listen: tuple[str, int] | None = None  # its own (host, port) instead
    public_url: str = ""  # how browsers reach it; "" = no single sign-on
    secure_cookies: bool = True
    session_idle_s: float = 1800.0
    session_max_s: float = 43200.0
    login_attempts: int = 5  # failed logins per client address and per user in login_window
    login_window_s: float = 300.0


# --- attachments (issue 12, items 4 and 5) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class SharedMediaStore:
    """``attachments.shared_media_store``: where this process reads Synapse's media store."""

    synapse_path: Path  # Synapse's media_store_path, as the module reports file paths
    path: Path  # the same directory here (a read-only mount in a container)


@dataclass(frozen=True, slots=True)
class AttachmentsConfig:
    """``attachments:``: scanning files at upload (the module's media callback) and again in
    their room; the bounds of reading one file and the rule for files that cannot be read."""

    enabled: bool = True
    limits: Limits = field(default_factory=Limits)
    workers: int = 2
    unreadable: Mapping[Unreadable, OnUnreadable] = field(
        default_factory=lambda: dict(DEFAULT_UNREADABLE)
    )
    recheck_in_rooms: bool = True
    download_max_bytes: int = 25 * MIB
    #: Synapse's media store as Synapse names it and as this process reads it (both absolute),
    #: when the two share it: the module may then send a file's path instead of its bytes.
    shared_media: SharedMediaStore | None = None


def _shared_media(v: _Validator, base_dir: Path) -> SharedMediaStore | None:
    synapse_raw = v.string("attachments.shared_media_store.synapse_path", nonempty=False)
    local_raw = v.string("attachments.shared_media_store.path", nonempty=False)
    if not synapse_raw:
        if local_raw:
            v.fail(
                "attachments.shared_media_store.synapse_path",
                "",
                "Synapse's media_store_path (set with path)",
            )
        return None
    synapse_path = Path(synapse_raw)
    if not synapse_path.is_absolute():
        v.fail(
            "attachments.shared_media_store.synapse_path",
            synapse_raw,
            "an absolute path (Synapse's media_store_path)",
        )
        return None
    local = Path(local_raw or synapse_raw)
    local = local if local.is_absolute() else (base_dir / local).resolve()
    return SharedMediaStore(synapse_path=synapse_path, path=local)


def _attachments_config(v: _Validator, base_dir: Path) -> AttachmentsConfig:
    """The ``attachments`` section (sizes in MiB, times in seconds)."""
    rules = {}
    for reason in Unreadable:
        choice = v.choice(f"attachments.unreadable.{reason}", tuple(o.value for o in OnUnreadable))
        rules[reason] = OnUnreadable(choice)
    max_mib = v.integer("attachments.max_file_mb", 1, 2048)
    limits = Limits(
        max_file_bytes=max_mib * MIB,
        max_text_chars=v.integer("attachments.max_text_chars", 1000, 100_000_000),
        max_depth=v.integer("attachments.max_depth", 0, 20),
        max_members=v.integer("attachments.max_members", 1, 1_000_000),
        max_ratio=v.number("attachments.max_ratio", 2, 100_000),
        max_inflated_bytes=v.integer("attachments.max_inflated_mb", 1, 100_000) * MIB,
        max_member_bytes=v.integer("attachments.max_inflated_mb", 1, 100_000) * MIB,
        timeout_s=v.number("attachments.timeout_seconds", 0.1, 600),
        memory_bytes=v.integer("attachments.memory_mb", 64, 65_536) * MIB,
    )
    return AttachmentsConfig(
        enabled=v.boolean("attachments.enabled"),
        limits=limits,
        workers=v.integer("attachments.workers", 1, 64),
        unreadable=rules,
        recheck_in_rooms=v.boolean("attachments.recheck_in_rooms"),
        download_max_bytes=max_mib * MIB,
        shared_media=_shared_media(v, base_dir),
    )


@dataclass(frozen=True, slots=True)
class Config:
    """The validated configuration. Immutable: a reload builds a new one."""

    homeserver: HomeserverConfig
    appservice: AppserviceConfig
    gate: GateConfig
    database: DatabaseConfig
    data_dir: Path
    bridge: BridgeConfig
    executor: ExecutorConfig
    logging: LoggingConfig
    federation: FederationConfig
    retention: RetentionConfig
    metrics: MetricsConfig
    audit: AuditConfig | None = None
    dlp: Mapping[str, Any] = field(default_factory=dict)  # scope -> DlpLayer
    notices: NoticeSettings = field(default_factory=NoticeSettings)
    e2ee: E2EEConfig = field(default_factory=E2EEConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    attachments: AttachmentsConfig = field(default_factory=AttachmentsConfig)
    source: str = "<defaults>"
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def bot_mxid(self) -> str:
        return f"@{self.appservice.bot_localpart}:{self.homeserver.domain}"

    def audit_settings(self) -> AuditConfig:
        """The ``audit:`` section (defaults under data_dir when the config predates it)."""
        return self.audit or AuditConfig.for_data_dir(self.data_dir)

    def role_of(self, user_id: str) -> Role | None:
        """The role of a Matrix user ID: exact entry, else ``@*:domain``, else ``*``."""
        perms = self.bridge.permissions
        if user_id in perms:
            return perms[user_id]
        domain_key = f"@*:{server_name(user_id)}"
        if domain_key in perms:
            return perms[domain_key]
        return perms.get("*")


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key not in FREEFORM:
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _plain(node: Any) -> Any:
    """ruamel's round-trip types -> plain dict/list/scalars."""
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _yaml().load(value) if value else ""
    return out


class _Validator:
    def __init__(self, data: Mapping[str, Any], base_dir: Path, env: Mapping[str, str]) -> None:
        self.data = data
        self.base_dir = base_dir
        self.env = env
        self.problems: list[str] = []

    def get(self, path: str) -> Any:
        node: Any = self.data
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return node

    def fail(self, path: str, value: Any, expected: str) -> None:
        shown = "<secret>" if "token" in path else repr(value)
        self.problems.append(f"{path}: got {shown}, expected {expected}")

    def string(self, path: str, *, nonempty: bool = True) -> str:
        value = self.get(path)
        if value is None and not nonempty:
            return ""
        if not isinstance(value, str) or (nonempty and not value.strip()):
            self.fail(path, value, "a non-empty string" if nonempty else "a string")
            return ""
        return value.strip()

    def secret(self, path: str, *, required: bool = True, placeholders: bool = False) -> str:
        """A secret, resolved from ``env:NAME`` or ``file:PATH``.

        Placeholders are refused unless ``placeholders`` (a URL that holds a password).
        """
        written = self.string(path, nonempty=required)
        value = written
        if written.startswith("env:"):
            name = written[4:]
            if name not in self.env:
                self.problems.append(f"{path}: environment variable {name} is not set")
                return ""
            value = self.env[name].strip()
        elif written.startswith("file:"):
            file = Path(written[5:])
            if not file.is_absolute():
                file = self.base_dir / file
            try:
                value = file.read_text("utf-8").strip()
            except OSError as e:
                self.problems.append(f"{path}: cannot read secret file {file}: {e.strerror}")
                return ""
        if required and written and not value:
            self.problems.append(f"{path}: {written} is empty, expected a secret")
        elif not placeholders and is_placeholder(value):
            self.problems.append(
                f"{path}: still a placeholder, not a secret; run "
                "`python -m bridge generate-registration` or set a real secret"
            )
        return value

    def token(self, path: str, *, required: bool = True) -> str:
        """A token shared with another program: a secret of at least MIN_TOKEN_LENGTH."""
        value = self.secret(path, required=required)
        if value and not is_placeholder(value) and len(value) < MIN_TOKEN_LENGTH:
            self.problems.append(
                f"{path}: too short ({len(value)} characters), expected at least "
                f"{MIN_TOKEN_LENGTH} random characters; `python -m bridge "
                "generate-registration` writes fresh tokens (or: openssl rand -hex 32)"
            )
        return value

    def distinct(self, tokens: Mapping[str, str]) -> None:
        """Every token (path -> value) set differs from every other."""
        seen: dict[str, str] = {}
        for path, value in tokens.items():
            if not value:
                continue
            if value in seen:
                self.problems.append(
                    f"{seen[value]} and {path} must differ: each token is a separate secret"
                )
            else:
                seen[value] = path

    def integer(self, path: str, low: int, high: int) -> int:
        value = self.get(path)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(path, value, f"an integer from {low} to {high}")
            return low
        return value

    def number(self, path: str, low: float, high: float) -> float:
        value = self.get(path)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            self.fail(path, value, f"a number from {low} to {high}")
            return low
        return float(value)

    def boolean(self, path: str) -> bool:
        value = self.get(path)
        if not isinstance(value, bool):
            self.fail(path, value, "true or false")
            return False
        return value

    def choice(self, path: str, options: tuple[str, ...]) -> str:
        value = self.get(path)
        if isinstance(value, str) and value.lower() in [o.lower() for o in options]:
            return value.upper() if options[0].isupper() else value.lower()
        self.fail(path, value, "one of " + ", ".join(options))
        return options[0]

    def url(self, path: str, schemes: tuple[str, ...]) -> str:
        value = self.string(path)
        parsed = urlparse(value)
        if value and (parsed.scheme not in schemes or not parsed.netloc):
            self.fail(path, value, "a URL starting with " + " or ".join(f"{s}://" for s in schemes))
        return value.rstrip("/")


def is_placeholder(value: str) -> bool:
    """Whether a secret is a placeholder (any letter case, punctuation ignored)."""
    folded = "".join(c for c in value.casefold() if c.isalnum())
    return any(marker in folded for marker in PLACEHOLDER_MARKERS)


def _check_unknown_keys(
    data: Mapping[str, Any], defaults: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    problems = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in defaults:
            problems.append(f"{path}: unknown option (typo?); see config.example.yaml")
        elif (
            isinstance(value, Mapping)
            and isinstance(defaults[key], Mapping)
            and key not in FREEFORM
        ):
            problems.extend(_check_unknown_keys(value, defaults[key], f"{path}."))
    return problems


def build_config(
    user_data: Mapping[str, Any] | None,
    *,
    source: str = "<defaults>",
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Merge ``user_data`` over the defaults, apply env overrides, validate."""
    env = os.environ if env is None else env
    base_dir = base_dir or Path.cwd()
    defaults = _plain(_yaml().load(default_config_text()))
    problems: list[str] = []
    user_plain = _plain(user_data or {})
    if not isinstance(user_plain, Mapping):
        raise ConfigError(source, ["the file must contain a mapping of sections at top level"])
    problems.extend(_check_unknown_keys(user_plain, defaults))
    overrides = _env_overrides(env)
    problems.extend(
        p.replace("unknown option", f"unknown option (from {ENV_PREFIX}… environment variable)")
        for p in _check_unknown_keys(overrides, defaults)
    )
    data = _merge(_merge(defaults, user_plain), overrides)
    v = _Validator(data, base_dir, env)

    hs_url = v.url("homeserver.url", ("http", "https"))
    domain = v.string("homeserver.domain")
    homeserver = HomeserverConfig(
        url=hs_url,
        domain=domain,
        admin_token=v.secret("homeserver.admin_token", required=False),
        startup_timeout=v.number("homeserver.startup_timeout", 0, 86400),
    )
    base_path = v.string("gate.base_path")
    if base_path and (not base_path.startswith("/") or base_path.startswith("/_matrix")):
        v.fail("gate.base_path", base_path, "a path starting with / (not under /_matrix)")
    appservice = AppserviceConfig(
        id=v.string("appservice.id"),
        address=v.url("appservice.address", ("http", "https")),
        hostname=v.string("appservice.hostname"),
        port=v.integer("appservice.port", 1, 65535),
        as_token=v.token("appservice.as_token"),
        hs_token=v.token("appservice.hs_token"),
        allow_query_token=v.boolean("appservice.allow_query_token"),
        max_body_size=v.integer("appservice.max_body_size", 1024, 1 << 30),
        bot_localpart=v.string("appservice.bot_localpart"),
        bot_displayname=v.string("appservice.bot_displayname", nonempty=False),
    )
    gate = GateConfig(base_path=base_path.rstrip("/"), token=v.token("gate.token"))
    metrics = _metrics_config(v)
    v.distinct(
        {
            "appservice.as_token": appservice.as_token,
            "appservice.hs_token": appservice.hs_token,
            "gate.token": gate.token,
            "metrics.token": metrics.token,
        }
    )

    data_dir_raw = v.string("data_dir")
    data_dir = Path(data_dir_raw)
    if not data_dir.is_absolute():
        data_dir = (base_dir / data_dir).resolve()
    db_url = v.secret("database.url", required=False, placeholders=True)
    if not db_url:
        db_url = f"sqlite+aiosqlite:///{data_dir / 'bridge.db'}"
    elif not db_url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        v.fail(
            "database.url", db_url.split("@")[-1], "sqlite+aiosqlite:///… or postgresql+asyncpg://…"
        )
    database = DatabaseConfig(url=db_url, pool_size=v.integer("database.pool_size", 1, 200))

    perms_raw = v.get("bridge.permissions")
    permissions: dict[str, Role] = {}
    if not isinstance(perms_raw, Mapping):
        v.fail("bridge.permissions", perms_raw, "a mapping of user ID or pattern to role")
    else:
        for who, role in perms_raw.items():
            key = f"bridge.permissions.{who}"
            if not (who == "*" or (who.startswith("@") and ":" in who)):
                v.fail(key, who, "a Matrix user ID (@user:domain), @*:domain or *")
            elif who.startswith("@") and "*" in who and not who.startswith("@*:"):
                v.fail(key, who, "wildcards only as @*:domain or *")
            parsed = Role.parse(role if isinstance(role, str) else None)
            if parsed is None:
                v.fail(key, role, "one of " + ", ".join(ROLES))
            else:
                permissions[str(who)] = parsed
    prefix = v.string("bridge.command_prefix")
    if prefix and any(c.isspace() for c in prefix):
        v.fail("bridge.command_prefix", prefix, "a prefix without spaces, like !policy")
    mgmt = v.string("bridge.management_room", nonempty=False)
    if mgmt and not (mgmt.startswith("!") or mgmt.startswith("#")):
        v.fail("bridge.management_room", mgmt, "a room ID (!…) or alias (#…), or empty")
    bridge = BridgeConfig(
        command_prefix=prefix,
        management_room=mgmt,
        auto_enroll=v.boolean("bridge.auto_enroll"),
        obtain_power=v.boolean("bridge.obtain_power"),
        permissions=permissions,
    )
    executor = ExecutorConfig(
        max_attempts=v.integer("executor.max_attempts", 1, 100),
        initial_backoff=v.number("executor.initial_backoff", 0.01, 3600),
        max_backoff=v.number("executor.max_backoff", 0.01, 86400),
        rate_per_second=v.number("executor.rate_per_second", 0.01, 10000),
    )
    logging_cfg = LoggingConfig(
        level=v.choice("logging.level", ("DEBUG", "INFO", "WARNING", "ERROR")),
        format=v.choice("logging.format", ("text", "json")),
    )
    dlp_layers: Mapping[str, Any] = {}
    try:
        from bridge.policy.layers import parse_config_dlp

        dlp_layers = parse_config_dlp(data.get("dlp"))
        from bridge.policy.layers import DlpLayers

        DlpLayers(dlp_layers, {}).compile()  # refuse bad patterns now, not at the gate
    except ValueError as e:
        v.problems.append(str(e))
    audit = _audit_config(v, data_dir, base_dir)
    try:
        languages = Languages.parse(v.get("notices.language"), v.get("notices.languages"))
    except ValueError as e:
        v.problems.append(str(e))
        languages = Languages()
    notices = NoticeSettings(
        enabled=v.boolean("notices.enabled"),
        group_window=v.number("notices.group_window_seconds", 0, 7 * 86400),
        per_minute=v.integer("notices.per_minute", 0, 1000),
        per_day=v.integer("notices.per_day", 0, 100_000),
        override_window=v.number("notices.override_window_seconds", 10, 86400),
        languages=languages,
    )
    federation = _federation_config(v)
    retention = _retention_config(v)
    e2ee = _e2ee_config(v)
    console = _console_config(v)
    attachments = _attachments_config(v, base_dir)
    problems.extend(v.problems)
    if problems:
        raise ConfigError(source, problems)
    return Config(
        homeserver=homeserver,
        appservice=appservice,
        gate=gate,
        database=database,
        data_dir=data_dir,
        bridge=bridge,
        executor=executor,
        logging=logging_cfg,
        federation=federation,
        retention=retention,
        metrics=metrics,
        audit=audit,
        dlp=dlp_layers,
        notices=notices,
        e2ee=e2ee,
        console=console,
        attachments=attachments,
        source=source,
        raw=data,
    )


def _scopes(v: _Validator, name: str) -> tuple[ScopeFields, Mapping[str, Any]]:
    """A scoped policy section: its scopes (checked by building every one) and as written."""
    from bridge.policy import scopes

    written = v.get(name)
    try:
        if name == "federation":
            layers = scopes.split_section(written, scopes.FEDERATION_FIELDS, name)
            scopes.federation_layers(layers).validate()
        else:
            layers = scopes.split_section(written, scopes.RETENTION_FIELDS, name)
            scopes.retention_layers(layers).validate()
    except ValueError as e:
        v.problems.append(str(e) if str(e).startswith(name) else f"{name}: {e}")
        return {}, {}
    return layers, copy.deepcopy(dict(written or {}))


def _federation_config(v: _Validator) -> FederationConfig:
    layers, written = _scopes(v, "federation")
    rate = v.get("federation.rollout_rate")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1000:
        v.fail("federation.rollout_rate", rate, "a number of rooms per second, 0 < n <= 1000")
        rate = 1.0
    return FederationConfig(
        scopes=layers,
        kick_excluded_members=v.boolean("federation.kick_excluded_members"),
        rollout_rate=float(rate),
        written=written,
    )


def _retention_config(v: _Validator) -> RetentionConfig:
    """The retention section: scoped lifetimes and the sweeper's pacing options."""
    from bridge.policy.durations import DurationError, parse_duration

    layers, written = _scopes(v, "retention")
    raw = v.get("retention.sweep_interval")
    ms = 60_000
    try:
        ms = parse_duration(str(raw))
    except DurationError as e:
        v.fail("retention.sweep_interval", raw, f"a duration such as 60s or 5m ({e})")
    else:
        if not 100 <= ms <= 86_400_000:
            v.fail("retention.sweep_interval", raw, "a duration from 100ms to 1d, e.g. 60s")
    return RetentionConfig(
        scopes=layers,
        sweep_interval_s=ms / 1000,
        sweep_batch=v.integer("retention.sweep_batch", 1, 10_000),
        sweep_max_events=v.integer("retention.sweep_max_events", 1, 10_000_000),
        sweep_max_pending=v.integer("retention.sweep_max_pending", 1, 10_000_000),
        written=written,
    )


def _metrics_config(v: _Validator) -> MetricsConfig:
    """``metrics.token`` (optional bearer token) and ``metrics.listen`` (host:port or empty)."""
    raw = v.string("metrics.listen", nonempty=False)
    listen: tuple[str, int] | None = None
    if raw:
        host, sep, port = raw.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")  # [::1]:9102
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            v.fail("metrics.listen", raw, "host:port such as 127.0.0.1:9102, or empty")
        else:
            listen = (host, int(port))
    return MetricsConfig(token=v.token("metrics.token", required=False), listen=listen)


def _console_config(v: _Validator) -> ConsoleConfig:
    """The ``console:`` section (see config.example.yaml)."""
    from bridge.policy.durations import DurationError, parse_duration

    def seconds(key: str, least_s: int, most_s: int) -> float:
        raw = v.get(f"console.{key}")
        try:
            ms = parse_duration(str(raw))
        except DurationError as e:
            v.fail(f"console.{key}", raw, f"a duration such as 30m or 12h ({e})")
            return float(least_s)
        if not least_s * 1000 <= ms <= most_s * 1000:
            v.fail(f"console.{key}", raw, f"a duration from {least_s}s to {most_s // 3600}h")
        return ms / 1000

    raw_listen = v.string("console.listen", nonempty=False)
    listen: tuple[str, int] | None = None
    if raw_listen:
        host, sep, port = raw_listen.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            v.fail("console.listen", raw_listen, "host:port such as 127.0.0.1:8090, or empty")
        else:
            listen = (host, int(port))
    path = v.string("console.path", nonempty=False).rstrip("/")
    if listen is None and (not path.startswith("/") or path.startswith(("/_matrix", "/_bridge"))):
        v.fail("console.path", path, "a path such as /console (not / or under /_matrix, /_bridge)")
    public_url = v.string("console.public_url", nonempty=False)
    if public_url and not public_url.startswith(("https://", "http://")):
        v.fail("console.public_url", public_url, "a URL starting with https:// (or http://)")
    return ConsoleConfig(
        enabled=v.boolean("console.enabled"),
        path="" if listen is not None else path,
        listen=listen,
        public_url=public_url.rstrip("/"),
        secure_cookies=v.boolean("console.secure_cookies"),
        session_idle_s=seconds("session_idle", 60, 7 * 86400),
        session_max_s=seconds("session_max", 60, 30 * 86400),
        login_attempts=v.integer("console.login_attempts", 1, 1000),
        login_window_s=seconds("login_window", 1, 86400),
    )


def _audit_config(v: _Validator, data_dir: Path, base_dir: Path) -> AuditConfig:
    from bridge.policy.durations import DurationError, parse_duration

    def path_of(key: str, default: str) -> Path:
        raw = v.string(f"audit.{key}", nonempty=False)
        p = Path(raw) if raw else data_dir / default
        return p if p.is_absolute() else (base_dir / p).resolve()

    retention_raw = v.get("audit.archive_retention")
    retention: int | None = None
    if retention_raw not in (None, "", "forever"):
        try:
            retention = parse_duration(str(retention_raw))
        except DurationError as e:
            v.fail("audit.archive_retention", retention_raw, f"a duration or empty ({e})")

    def seconds(key: str, least_ms: int = 60_000, example: str = "30m or 1h") -> float:
        raw = v.get(f"audit.{key}")
        try:
            ms = parse_duration(str(raw))
        except DurationError as e:
            v.fail(f"audit.{key}", raw, f"a duration such as {example} ({e})")
            return 3600.0
        if ms < least_ms:
            v.fail(f"audit.{key}", raw, f"a duration of at least {least_ms // 1000}s")
        return ms / 1000

    def id_list(key: str, sigil: str, what: str) -> tuple[str, ...]:
        raw = v.get(f"audit.legal_hold.{key}")
        if raw is None:
            return ()
        if not isinstance(raw, list):
            v.fail(f"audit.legal_hold.{key}", raw, f"a list of {what}")
            return ()
        for item in raw:
            if not (
                isinstance(item, str)
                and item.startswith(sigil)
                and len(item) > 1
                and (sigil == "!" or ":" in item)  # room version 12 IDs have no :server
            ):
                v.fail(f"audit.legal_hold.{key}", item, what)
        return tuple(str(i) for i in raw)

    def key_files(key: str) -> tuple[Path, ...]:
        raw = v.get(f"audit.{key}")
        if raw is None:
            return ()
        if not isinstance(raw, list) or not all(isinstance(i, str) and i for i in raw):
            v.fail(f"audit.{key}", raw, "a list of paths of public key files (PEM)")
            return ()
        paths = tuple(p if p.is_absolute() else (base_dir / p).resolve() for p in map(Path, raw))
        for p in paths:
            if not p.is_file():
                v.fail(f"audit.{key}", str(p), "an existing public key file (PEM)")
        return paths

    return AuditConfig(
        keyring=path_of("keyring", "audit-keyring.json"),
        signing_key=path_of("signing_key", "audit-signing.pem"),
        checkpoint_every=v.integer("audit.checkpoint_every", 1, 10_000_000),
        archive_retention_ms=retention,
        archive_expiry_interval_s=seconds("archive_expiry_interval"),
        legal_hold_rooms=id_list("rooms", "!", "room IDs (!room)"),
        legal_hold_users=id_list("users", "@", "user IDs (@user:server)"),
        post_checkpoints=v.boolean("audit.post_checkpoints"),
        checkpoint_post_interval_s=seconds("checkpoint_post_interval"),
        previous_public_keys=key_files("previous_public_keys"),
        checkpoint_interval_s=seconds("checkpoint_interval", 1_000, "60s or 5m"),
    )


def read_yaml(path: Path) -> Any:
    """Parse a YAML file, raising ConfigError with the file, line and column on failure."""
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found"]) from None
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read: {e.strerror}"]) from None
    try:
        return _yaml().load(text)
    except YAMLError as e:
        raise ConfigError(str(path), [f"not valid YAML: {e}"]) from None


def load_config(path: Path | str, env: Mapping[str, str] | None = None) -> Config:
    """Load and validate a config file."""
    path = Path(path)
    data = read_yaml(path)
    return build_config(data, source=str(path), base_dir=path.resolve().parent, env=env)


def update_config_file(path: Path, updates: Mapping[str, Mapping[str, Any]]) -> None:
    """Set ``section.key`` values in a config file, keeping its comments and layout."""
    y = _yaml()
    doc = y.load(path.read_text("utf-8")) if path.exists() else None
    if doc is None:
        doc = y.load(default_config_text())
    for section, values in updates.items():
        if section not in doc or doc[section] is None:
            doc[section] = {}
        for key, value in values.items():
            doc[section][key] = value
    write_private(path, lambda fh: y.dump(doc, fh))


def write_private(path: Path, write: Callable[[TextIO], object]) -> None:
    """(Re)write a text file only its owner can read (config, registration: they hold tokens).

    ``write`` fills a new file beside ``path``, created with mode 0600 (never through a
    symlink, whatever the umask), which then replaces ``path`` in one rename.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
