"""Throwaway Synapse homeservers for the demo command and the integration tests.

This module never imports Synapse itself: it writes a ``homeserver.yaml`` into a work
directory and runs ``python -m synapse.app.homeserver`` as a subprocess, so the product
keeps working when ``matrix-synapse`` is not installed (only :meth:`SynapseServer.start`
then fails, with an explanation of what to install).

Typical use::

    with SynapseServer(Path("/tmp/hs"), registrations=[Path("registration.yaml")]) as hs:
        user_id, token = hs.register_user("alice", "secret", admin=True)
        print(hs.url)

The generated server is meant for development only: SQLite, plain HTTP on 127.0.0.1,
every rate limit lifted, registration closed except through the shared-secret admin API.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import hashlib
import hmac
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "DEFAULT_ANTISPAM_CALLBACKS",
    "INSTALL_HINT",
    "POLICY_BRIDGE_CALLBACKS",
    "SYNAPSE_MODULE_DIR",
    "AntispamSettings",
    "GateModule",
    "HomeserverRequestError",
    "SynapseNotInstalledError",
    "SynapseServer",
    "SynapseStartError",
    "deep_merge",
    "free_port",
]

INSTALL_HINT = "install matrix-synapse (pip install 'matrix-policy-bridge[test]')"

#: Callbacks of synapse-http-antispam the bridge's gate answers by default.
#: ``accept_make_join`` is deliberately absent: synapse-http-antispam 0.5.1 defines it, but
#: Synapse 1.163's ``register_spam_checker_callbacks`` has no such parameter, and listing it
#: makes Synapse die at startup with a TypeError. (Leaving ``enabled_callbacks`` out of the
#: module config is just as fatal: the module then registers every method it has.)
DEFAULT_ANTISPAM_CALLBACKS: tuple[str, ...] = (
    "check_event_for_spam",
    "user_may_invite",
    "federated_user_may_invite",
    "user_may_join_room",
)


class GateModule(StrEnum):
    """The Synapse module that asks the bridge's gate (both speak the same HTTP protocol)."""

    #: The project's own module (``synapse_module/``): full context, media, no text in logs.
    POLICY_BRIDGE = "policy_bridge_synapse.PolicyBridgeModule"
    #: The third-party ``synapse-http-antispam`` from PyPI.
    HTTP_ANTISPAM = "synapse_http_antispam.HTTPAntispam"

    @property
    def package(self) -> str:
        """The importable package Synapse's Python needs."""
        return self.value.split(".", 1)[0]


#: The project's own Synapse module, a distribution of its own next to the ``bridge`` package.
#: Synapse started here finds it through ``PYTHONPATH`` (no installation needed in a checkout).
SYNAPSE_MODULE_DIR = Path(__file__).resolve().parents[2] / "synapse_module"

#: Callbacks the project's module forwards by default: those above, room creation and state
#: events with their content, and uploaded files.
POLICY_BRIDGE_CALLBACKS: tuple[str, ...] = (
    *DEFAULT_ANTISPAM_CALLBACKS,
    "user_may_create_room",
    "user_may_send_state_event",
    "check_media_file_for_spam",
    "user_may_create_room_alias",
)

# Generous enough that nothing a test or the demo does ever hits them.
_UNLIMITED: dict[str, float] = {"per_second": 100_000, "burst_count": 1_000_000}

# Every rate limiter Synapse 1.163 reads from its config (synapse/config/ratelimiting.py).
# Nested keys ("rc_login.address") are expanded into nested mappings.
_RATE_LIMIT_KEYS: tuple[str, ...] = (
    "rc_message",
    "rc_registration",
    "rc_registration_token_validity",
    "rc_login.address",
    "rc_login.account",
    "rc_login.failed_attempts",
    "rc_admin_redaction",
    "rc_joins.local",
    "rc_joins.remote",
    "rc_joins_per_room",
    "rc_key_requests",
    "rc_3pid_validation",
    "rc_invites.per_room",
    "rc_invites.per_user",
    "rc_invites.per_issuer",
    "rc_third_party_invite",
    "rc_media_create",
    "rc_presence.per_user",
    "rc_delayed_event_mgmt",
    "rc_room_creation",
    "rc_reports",
    "rc_user_directory",
    "rc_profile",
)

_LOG_FORMAT = "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"

# Servers still running when the interpreter exits are stopped, so a crashed test run or an
# interrupted demo does not leave orphaned homeservers behind.
_RUNNING: weakref.WeakSet[SynapseServer] = weakref.WeakSet()


class SynapseNotInstalledError(RuntimeError):
    """matrix-synapse (or synapse-http-antispam) is not importable by the chosen Python."""


class SynapseStartError(RuntimeError):
    """Synapse did not come up; the message carries the tail of its log."""


class HomeserverRequestError(RuntimeError):
    """A request to the homeserver answered with a non-2xx status."""

    def __init__(self, status: int, errcode: str | None, error: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status} {errcode or ''}: {error}".strip())
        self.status = status
        self.errcode = errcode
        self.error = error
        self.body = body


@dataclass
class AntispamSettings:
    """Configuration of the gate module: the project's own (default) or synapse-http-antispam.

    ``base_url`` is where the bridge's gate listens (callbacks are POSTed to
    ``{base_url}/{callback}``); ``authorization`` is sent as a bearer token. Both modules
    take these keys; ``options`` holds further keys of the project's module (``timeout``,
    ``media_timeout``, ``media_max_bytes``, ``media_kinds``). ``enabled_callbacks`` defaults
    to what the chosen module can forward on this Synapse.
    """

    base_url: str
    authorization: str | None = None
    fail_open: dict[str, bool] = field(default_factory=dict)
    enabled_callbacks: list[str] | None = None
    do_ping: bool = False
    module: GateModule = GateModule.POLICY_BRIDGE
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> AntispamSettings:
        """Build settings from a plain dict using the module's own config keys."""
        known = {
            "base_url",
            "authorization",
            "fail_open",
            "enabled_callbacks",
            "do_ping",
            "module",
            "options",
        }
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"unknown antispam settings {sorted(unknown)}; expected some of {sorted(known)}"
            )
        if "base_url" not in data:
            raise ValueError("antispam settings need 'base_url'")
        values = dict(data)
        if "module" in values:
            values["module"] = GateModule(values["module"])
        return cls(**values)

    @property
    def callbacks(self) -> list[str]:
        """The callbacks forwarded: as configured, else the module's default list."""
        if self.enabled_callbacks is not None:
            return list(self.enabled_callbacks)
        if self.module is GateModule.POLICY_BRIDGE:
            return list(POLICY_BRIDGE_CALLBACKS)
        return list(DEFAULT_ANTISPAM_CALLBACKS)

    def module_config(self) -> dict[str, Any]:
        """The ``config:`` block for the module entry in homeserver.yaml."""
        config: dict[str, Any] = {
            "base_url": self.base_url.rstrip("/"),
            "enabled_callbacks": self.callbacks,
            "fail_open": dict(self.fail_open),
        }
        if self.authorization:
            config["authorization"] = self.authorization
        if self.do_ping:
            config["do_ping"] = True
        if self.options:
            if self.module is not GateModule.POLICY_BRIDGE:
                raise ValueError(f"options {sorted(self.options)} need {GateModule.POLICY_BRIDGE}")
            config.update(self.options)
        return config


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    return {head: _nested(rest, value) if rest else value}


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``extra`` into ``base`` recursively (mappings merge, anything else replaces)."""
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def _signing_key_line() -> str:
    """A fresh ed25519 signing key in Synapse's file format.

    Any 32 random bytes are a valid ed25519 seed, so no crypto library (and no extra
    ``--generate-keys`` run of Synapse, which costs seconds) is needed.
    """
    seed = base64.b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    version = "a_" + secrets.token_hex(2)
    return f"ed25519 {version} {seed}\n"


def _python_has(python: str, module: str) -> bool:
    if Path(python).resolve() == Path(sys.executable).resolve():
        return importlib.util.find_spec(module) is not None
    probe = f"import importlib.util,sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", probe], check=False, capture_output=True).returncode == 0


class SynapseServer:
    """A single-process Synapse on 127.0.0.1 with its state in ``workdir``.

    Construction only writes files; :meth:`start` launches the homeserver and waits until
    it answers. The work directory is reused by :meth:`restart`, so rooms and users
    survive it. Creating a second server over the same work directory keeps the database
    and signing key but rewrites homeserver.yaml.
    """

    def __init__(
        self,
        workdir: Path,
        server_name: str = "localhost",
        port: int | None = None,
        registrations: Iterable[Path] = (),
        antispam: AntispamSettings | Mapping[str, Any] | None = None,
        retention: bool = False,
        extra_config: Mapping[str, Any] | None = None,
        *,
        python: str | None = None,
        log_level: str = "INFO",
        retention_interval: str = "1s",
    ) -> None:
        """Write homeserver.yaml, the log config and the signing key into ``workdir``.

        Args:
            workdir: directory for config, SQLite database, media, logs (created if missing).
            server_name: the Matrix server name (user IDs end in ``:server_name``).
            port: HTTP port on 127.0.0.1; a free one is picked when omitted.
            registrations: appservice registration files to load.
            antispam: settings of the gate module (dict keys as in the module's config:
                base_url, authorization, fail_open, enabled_callbacks, do_ping; plus
                ``module`` to choose synapse-http-antispam and ``options`` for further keys
                of the project's module), see :class:`AntispamSettings`.
            retention: enable Synapse's ``retention:`` support with a purge job every
                ``retention_interval`` so ``m.room.retention`` takes effect within seconds.
            extra_config: merged recursively into the generated config, last.
            python: interpreter that has matrix-synapse installed (default: this one).
            log_level: root level of homeserver.log.
            retention_interval: interval of the retention purge job.
        """
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.server_name = server_name
        self.port = port if port is not None else free_port()
        self.registrations = [Path(p).resolve() for p in registrations]
        if antispam is None or isinstance(antispam, AntispamSettings):
            self.antispam = antispam
        else:
            self.antispam = AntispamSettings.from_mapping(antispam)
        self.retention = retention
        self.python = python or sys.executable
        self.config_path = self.workdir / "homeserver.yaml"
        self.log_path = self.workdir / "homeserver.log"
        self.output_path = self.workdir / "synapse.out"
        self.signing_key_path = self.workdir / f"{server_name}.signing.key"
        self.registration_shared_secret = secrets.token_urlsafe(32)
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._output_file: Any = None

        self.config = self._build_config(log_level, retention_interval)
        if extra_config:
            deep_merge(self.config, extra_config)
        self._write_files(log_level)

    # ----------------------------------------------------------------------------- config

    @property
    def url(self) -> str:
        """Base URL of the client-server (and admin, and federation) API."""
        return f"http://127.0.0.1:{self.port}"

    def _build_config(self, log_level: str, retention_interval: str) -> dict[str, Any]:
        config: dict[str, Any] = {
            "server_name": self.server_name,
            "public_baseurl": self.url + "/",
            "pid_file": str(self.workdir / "homeserver.pid"),
            "report_stats": False,
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client", "federation"], "compress": False}],
                }
            ],
            "database": {
                "name": "sqlite3",
                "args": {"database": str(self.workdir / "homeserver.db")},
            },
            "log_config": str(self.workdir / "log.config"),
            "media_store_path": str(self.workdir / "media_store"),
            "signing_key_path": str(self.signing_key_path),
            "registration_shared_secret": self.registration_shared_secret,
            "macaroon_secret_key": secrets.token_urlsafe(32),
            "form_secret": secrets.token_urlsafe(32),
            "enable_registration": False,
            "suppress_key_server_warning": True,
            "trusted_key_servers": [],
            "enable_metrics": False,
            "url_preview_enabled": False,
            "app_service_config_files": [str(p) for p in self.registrations],
            "rc_federation": {
                "window_size": 1000,
                "sleep_limit": 100_000,
                "sleep_delay": 1,
                "reject_limit": 1_000_000,
                "concurrent": 1000,
            },
        }
        for key in _RATE_LIMIT_KEYS:
            deep_merge(config, _nested(key, dict(_UNLIMITED)))
        # e2ee (docs/e2ee.md): to-device messages, device lists and one-time-key counts for
        # appservice devices, pushed in transactions (only to registrations asking for them)
        deep_merge(
            config,
            {
                "experimental_features": {
                    "msc2409_to_device_messages_enabled": True,
                    "msc3202_transaction_extensions": True,
                }
            },
        )
        if self.antispam is not None:
            config["modules"] = [
                {
                    "module": self.antispam.module.value,
                    "config": self.antispam.module_config(),
                }
            ]
        if self.retention:
            config["retention"] = {
                "enabled": True,
                "purge_jobs": [{"interval": retention_interval}],
            }
        return config

    def _write_files(self, log_level: str) -> None:
        log_config = {
            "version": 1,
            "formatters": {"precise": {"format": _LOG_FORMAT}},
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filename": str(self.log_path),
                    "encoding": "utf8",
                }
            },
            "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
            "root": {"level": log_level, "handlers": ["file"]},
            "disable_existing_loggers": False,
        }
        # JSON is valid YAML, and needs no YAML library here.
        (self.workdir / "log.config").write_text(json.dumps(log_config, indent=2) + "\n")
        self.config_path.write_text(json.dumps(self.config, indent=2) + "\n")
        self.config_path.chmod(0o600)  # holds the shared secret
        if not self.signing_key_path.exists():
            self.signing_key_path.write_text(_signing_key_line())
            self.signing_key_path.chmod(0o600)
        (self.workdir / "media_store").mkdir(exist_ok=True)

    # -------------------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        """Whether the Synapse process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """PID of the Synapse process, if started."""
        return self._process.pid if self._process is not None else None

    def _check_installed(self) -> None:
        if not _python_has(self.python, "synapse"):
            raise SynapseNotInstalledError(
                f"matrix-synapse is not importable by {self.python}: {INSTALL_HINT}"
            )
        if self.antispam is None:
            return
        if self.antispam.module is GateModule.POLICY_BRIDGE:
            if not SYNAPSE_MODULE_DIR.is_dir() and not _python_has(
                self.python, self.antispam.module.package
            ):
                raise SynapseNotInstalledError(
                    f"the policy bridge's Synapse module is not importable by {self.python}: "
                    "install it there (pip install --no-deps ./synapse_module)"
                )
        elif not _python_has(self.python, self.antispam.module.package):
            raise SynapseNotInstalledError(
                f"synapse-http-antispam is not importable by {self.python}: "
                "install synapse-http-antispam (pip install 'matrix-policy-bridge[test]')"
            )

    def start(self, timeout: float = 60.0) -> None:
        """Launch Synapse and block until ``/_matrix/client/versions`` answers.

        Raises:
            SynapseNotInstalledError: matrix-synapse is missing.
            SynapseStartError: the process died or did not answer within ``timeout``
                seconds; the message includes the end of its log.
        """
        if self.running:
            return
        self._check_installed()
        begin = time.monotonic()
        self._output_file = open(self.output_path, "ab")  # closed in stop()
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.antispam is not None and self.antispam.module is GateModule.POLICY_BRIDGE:
            if SYNAPSE_MODULE_DIR.is_dir():  # a checkout: the module from source
                paths = [str(SYNAPSE_MODULE_DIR), env.get("PYTHONPATH", "")]
                env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        self._process = subprocess.Popen(
            [self.python, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._output_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        _RUNNING.add(self)
        deadline = begin + timeout
        versions = self.url + "/_matrix/client/versions"
        while True:
            code = self._process.poll()
            if code is not None:
                self._close_output()
                raise SynapseStartError(
                    f"Synapse exited with status {code} during startup "
                    f"(config {self.config_path}).{self._diagnose()}\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(versions, timeout=1) as resp:  # noqa: S310
                    if resp.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SynapseStartError(
                    f"Synapse did not answer {versions} within {timeout:.0f}s "
                    f"(config {self.config_path}).\n{self.log_tail()}"
                )
            time.sleep(0.05)
        self.startup_seconds = time.monotonic() - begin

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate Synapse: SIGTERM, then SIGKILL if it is still alive after ``timeout``."""
        proc = self._process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        self._process = None
        self._close_output()
        _RUNNING.discard(self)

    def restart(self, timeout: float = 60.0) -> None:
        """Stop and start again on the same port, database and config."""
        self.stop()
        self.start(timeout=timeout)

    def _close_output(self) -> None:
        if self._output_file is not None:
            self._output_file.close()
            self._output_file = None

    def _diagnose(self) -> str:
        """A plain-words hint for startup failures we know the cause of."""
        text = ""
        for path in (self.log_path, self.output_path):
            if path.exists():
                text += path.read_text(errors="replace")[-20_000:]
        marker = "register_spam_checker_callbacks() got an unexpected keyword argument"
        if marker in text:
            name = text.split(marker, 1)[1].split("\n", 1)[0].strip(" '")
            return (
                f"\nThis Synapse does not support the spam-checker callback {name!r}; "
                "remove it from the antispam 'enabled_callbacks'."
            )
        if "policy_bridge_synapse cannot load:" in text:
            reason = text.split("policy_bridge_synapse cannot load:", 1)[1].split("\n", 1)[0]
            return f"\nThe policy bridge's Synapse module refused to load:{reason}"
        if "Address already in use" in text:
            return f"\nPort {self.port} on 127.0.0.1 is already in use."
        return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of homeserver.log and of the process output."""
        parts = []
        for path in (self.log_path, self.output_path):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text))
        return "\n".join(parts) or "(no log output)"

    def __enter__(self) -> SynapseServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------------- HTTP/admin

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        access_token: str | None = None,
        timeout: float = 30.0,
    ) -> Any:
        """Send one JSON request to the homeserver and return the decoded JSON answer.

        Raises:
            HomeserverRequestError: on a non-2xx status, carrying errcode and error text.
        """
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310
        req.add_header("Content-Type", "application/json")
        if access_token:
            req.add_header("Authorization", f"Bearer {access_token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = None
            if isinstance(payload, dict):
                raise HomeserverRequestError(
                    err.code, payload.get("errcode"), str(payload.get("error", "")), payload
                ) from None
            text = raw.decode(errors="replace")[:500]
            raise HomeserverRequestError(err.code, None, text) from None
        return json.loads(raw) if raw else {}

    def register_user(
        self,
        localpart: str,
        password: str | None = None,
        admin: bool = False,
        *,
        lift_ratelimit: bool = True,
    ) -> tuple[str, str]:
        """Create a user through the shared-secret admin API.

        Returns ``(user_id, access_token)``. With ``lift_ratelimit`` the user's per-user
        message rate limit is also removed (``override_ratelimit`` 0/0 means unlimited,
        and Synapse then skips every other limiter for that user as well).
        """
        password = password or secrets.token_urlsafe(16)
        nonce = self.request("GET", "/_synapse/admin/v1/register")["nonce"]
        mac = hmac.new(self.registration_shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(nonce.encode() + b"\x00" + localpart.encode() + b"\x00")
        mac.update(password.encode() + b"\x00" + (b"admin" if admin else b"notadmin"))
        result = self.request(
            "POST",
            "/_synapse/admin/v1/register",
            {
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": mac.hexdigest(),
            },
        )
        user_id, token = str(result["user_id"]), str(result["access_token"])
        if lift_ratelimit:
            self.lift_ratelimit(user_id, admin_token=token if admin else None)
        return user_id, token

    def lift_ratelimit(self, user_id: str, admin_token: str | None = None) -> None:
        """Remove all rate limits for ``user_id`` via the admin API.

        Needs an admin's token; when none is given a hidden admin user is created once
        and reused.
        """
        token = admin_token or self._harness_admin_token()
        quoted = urllib.parse.quote(user_id, safe="")
        self.request(
            "POST",
            f"/_synapse/admin/v1/users/{quoted}/override_ratelimit",
            {"messages_per_second": 0, "burst_count": 0},
            access_token=token,
        )

    def _harness_admin_token(self) -> str:
        token: str | None = getattr(self, "_admin_token", None)
        if token is None:
            localpart = "devsynapse-admin-" + secrets.token_hex(4)
            _, token = self.register_user(localpart, admin=True, lift_ratelimit=False)
            self._admin_token = token
        return token

    async def async_register_user(
        self,
        localpart: str,
        password: str | None = None,
        admin: bool = False,
        *,
        lift_ratelimit: bool = True,
    ) -> tuple[str, str]:
        """:meth:`register_user` for async code (runs in a worker thread)."""
        return await asyncio.to_thread(
            lambda: self.register_user(localpart, password, admin, lift_ratelimit=lift_ratelimit)
        )

    async def async_start(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        """:meth:`start` for async code (runs in a worker thread)."""
        await asyncio.to_thread(self.start, timeout)

    async def async_stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """:meth:`stop` for async code (runs in a worker thread)."""
        await asyncio.to_thread(self.stop, timeout)


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_RUNNING):
        with contextlib.suppress(Exception):
            server.stop(timeout=5)
