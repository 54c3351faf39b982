"""A complete throwaway stack (Synapse + bridge) for the demo and the integration tests.

``prepare_stack`` writes a bridge config and registration and a Synapse config wired to
them (appservice registration, the gate module pointed at the bridge's gate: the project's
own ``policy_bridge_synapse`` by default, or synapse-http-antispam);
``BridgeProcess`` runs ``python -m bridge run`` as a child process, like production.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from bridge.dev.devsynapse import AntispamSettings, GateModule, SynapseServer, free_port
from bridge.registration import generate_registration

#: The callbacks synapse-http-antispam forwards to the gate (``gate_module=HTTP_ANTISPAM``);
#: the project's module forwards its own default list (``POLICY_BRIDGE_CALLBACKS``).
GATE_CALLBACKS = [
    "check_event_for_spam",
    "user_may_invite",
    "federated_user_may_invite",
    "user_may_join_room",
]


class BridgeStartError(RuntimeError):
    """The bridge process exited or did not become ready in time."""


@dataclass
class DevStack:
    """Paths and servers of a prepared stack."""

    workdir: Path
    synapse: SynapseServer
    config_path: Path
    registration_path: Path
    bridge_port: int
    gate_token: str
    server_name: str

    @property
    def bridge_url(self) -> str:
        return f"http://127.0.0.1:{self.bridge_port}"

    def bridge_config(self) -> dict[str, Any]:
        return dict(YAML(typ="safe").load(self.config_path.read_text("utf-8")))

    def set_bridge_options(self, section: str, values: Mapping[str, Any]) -> None:
        """Change options in the bridge config (comments kept)."""
        from bridge.config import update_config_file

        update_config_file(self.config_path, {section: dict(values)})


def prepare_stack(
    workdir: Path,
    *,
    server_name: str = "localhost",
    permissions: Mapping[str, str] | None = None,
    database_url: str = "",
    retention: bool = False,
    bridge_options: Mapping[str, Mapping[str, Any]] | None = None,
    fail_open: Mapping[str, bool] | None = None,
    gate_module: GateModule = GateModule.POLICY_BRIDGE,
    module_options: Mapping[str, Any] | None = None,
    shared_media: bool = False,
) -> DevStack:
    """Write bridge + Synapse configs into ``workdir`` (nothing is started).

    ``gate_module`` chooses the Synapse module that asks the gate; ``module_options`` are
    further options of the project's module (e.g. ``{"timeout": 2}``). ``shared_media``:
    the bridge reads Synapse's media store and the module sends file paths, not bytes.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    synapse_port, bridge_port = free_port(), free_port()
    config_path = workdir / "config.yaml"
    registration_path = workdir / "registration.yaml"
    config: dict[str, Any] = {
        "homeserver": {
            "url": f"http://127.0.0.1:{synapse_port}",
            "domain": server_name,
            "startup_timeout": 120,
        },
        "appservice": {
            "address": f"http://127.0.0.1:{bridge_port}",
            "hostname": "127.0.0.1",
            "port": bridge_port,
        },
        "database": {"url": database_url},
        "data_dir": str(workdir / "data"),
        "bridge": {"permissions": dict(permissions or {f"@admin:{server_name}": "admin"})},
        "executor": {"initial_backoff": 0.2, "rate_per_second": 200},
        "logging": {"level": "INFO"},
    }
    media_store = workdir / "synapse" / "media_store"  # SynapseServer's media_store_path
    if shared_media:
        config["attachments"] = {"shared_media_store": {"synapse_path": str(media_store)}}
    for section, values in (bridge_options or {}).items():
        config.setdefault(section, {}).update(values)
    y = YAML()
    with config_path.open("w", encoding="utf-8") as fh:
        y.dump(config, fh)
    generate_registration(config_path, registration_path)
    gate_token = str(YAML(typ="safe").load(config_path.read_text("utf-8"))["gate"]["token"])
    antispam = AntispamSettings(
        base_url=f"http://127.0.0.1:{bridge_port}/_bridge/antispam",
        authorization=gate_token,
        enabled_callbacks=list(GATE_CALLBACKS) if gate_module is GateModule.HTTP_ANTISPAM else None,
        fail_open=dict(fail_open or {}),
        module=gate_module,
        options={**({"media_delivery": "path"} if shared_media else {}), **(module_options or {})},
    )
    synapse = SynapseServer(
        workdir / "synapse",
        server_name=server_name,
        port=synapse_port,
        registrations=[registration_path],
        antispam=antispam,
        retention=retention,
    )
    return DevStack(
        workdir, synapse, config_path, registration_path, bridge_port, gate_token, server_name
    )


class BridgeProcess:
    """``python -m bridge run -c CONFIG`` as a child process."""

    def __init__(
        self,
        config_path: Path,
        log_path: Path,
        port: int,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.port = port
        #: Extra environment (e.g. ``POLICY_BRIDGE__APPSERVICE__PORT`` for a replica).
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Start the bridge; with ``wait``, block until it reports ready."""
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.env)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "run", "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        if wait:
            self.wait_ready(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def health(self, path: str = "/_bridge/health/ready") -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except (urllib.error.URLError, OSError):
            return 0

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise BridgeStartError(
                    f"bridge exited with code {self.proc.returncode if self.proc else '?'}:\n"
                    + self.log_tail()
                )
            if self.health() == 200:
                return
            time.sleep(0.1)
        raise BridgeStartError("bridge not ready in time:\n" + self.log_tail())

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, like a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
