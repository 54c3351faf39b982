"""Smoke test of the built image's filesystem, run the way the image says (called by
.ci/container-check, which builds the image and mounts its filesystem).

The image's ENTRYPOINT, CMD, ENV, WORKDIR and USER come from ``podman image inspect``; each
command runs as ``chroot --userspec=<USER> <rootfs> env -i <ENV> --chdir <WORKDIR> …`` (the
sandbox refuses ``podman run``). On the host network namespace, so the bridge in the image
and a throwaway Synapse on the host (bridge.dev.devsynapse) reach each other on loopback.

1. First start with an empty /data: exit 0, config.yaml and registration.yaml written,
   owned by the image's user, mode 0600.
2. ``check-config`` (the entrypoint's argument form) passes, with the homeserver URL and the
   bridge's address set through ``POLICY_BRIDGE__…`` variables as an operator would.
3. Synapse loads the registration the bridge wrote; ``run`` (the image's CMD) starts the
   bridge, which reports ready on /_bridge/health/ready; SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bridge.dev.devsynapse import SynapseServer, free_port


class SmokeError(RuntimeError):
    """A step of the smoke test failed."""


def _strings(value: object) -> list[str]:
    """A JSON list of strings from ``podman image inspect`` (absent: empty)."""
    return [str(v) for v in value] if isinstance(value, list) else []


class Image:
    """Runs commands in the mounted image filesystem as the image would."""

    def __init__(self, rootfs: Path, inspected: dict[str, Any]) -> None:
        self.rootfs = rootfs
        config: dict[str, Any] = inspected.get("Config") or {}
        user = str(config.get("User") or "")
        if not user or user.split(":")[0] in ("0", "root"):
            raise SmokeError(f"the image must run as an unprivileged USER, not {user!r}")
        self.user = user if ":" in user else f"{user}:{user}"
        self.env = _strings(config.get("Env"))
        self.workdir = str(config.get("WorkingDir") or "/")
        self.entrypoint = _strings(config.get("Entrypoint"))
        self.cmd = _strings(config.get("Cmd"))
        # podman shows a (docker-format) HEALTHCHECK beside Config, not in it
        health = inspected.get("Healthcheck") or config.get("Healthcheck") or {}
        test = _strings(health.get("Test"))
        if test[:1] != ["CMD"]:
            raise SmokeError(f"the image has no exec-form HEALTHCHECK (Test: {test!r})")
        self.healthcheck = test[1:]

    @classmethod
    def inspect(cls, rootfs: Path, image: str) -> Image:
        out = subprocess.run(
            ["podman", "image", "inspect", image], check=True, capture_output=True, text=True
        ).stdout
        return cls(rootfs, json.loads(out)[0])

    def exec_argv(self, command: list[str], extra_env: dict[str, str]) -> list[str]:
        """``command`` as is (no ENTRYPOINT), like the engine runs a HEALTHCHECK."""
        return self._chroot(command, extra_env)

    def argv(self, args: list[str] | None, extra_env: dict[str, str]) -> list[str]:
        """ENTRYPOINT + ``args`` (None: the image's CMD), as the image's USER."""
        return self._chroot(self.entrypoint + (self.cmd if args is None else args), extra_env)

    def _chroot(self, command: list[str], extra_env: dict[str, str]) -> list[str]:
        env = self.env + [f"{k}={v}" for k, v in extra_env.items()]
        return [
            "chroot",
            f"--userspec={self.user}",
            str(self.rootfs),
            "/usr/bin/env",
            "-i",
            f"--chdir={self.workdir}",
            *env,
            *command,
        ]

    def run(
        self, args: list[str] | None, extra_env: dict[str, str], timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(args, extra_env), capture_output=True, text=True, timeout=timeout
        )

    def data(self, name: str) -> Path:
        env = dict(e.split("=", 1) for e in self.env)
        return self.rootfs / env.get("BRIDGE_DATA_DIR", "/data").lstrip("/") / name


def check(ok: bool, message: str, output: str = "") -> None:
    if not ok:
        raise SmokeError(message + (f"\n--- output ---\n{output[-3000:]}" if output else ""))
    print(f"  ok: {message}", flush=True)


def ready(port: int) -> int:
    try:
        url = f"http://127.0.0.1:{port}/_bridge/health/ready"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def smoke(image: Image, work: Path) -> None:
    uid = int(image.user.split(":")[0])
    # 1. first start: writes config and registration, exits 0
    first = image.run(None, {})
    check(first.returncode == 0, "first start exits 0", first.stdout + first.stderr)
    for name in ("config.yaml", "registration.yaml"):
        st = image.data(name).stat()
        check(
            st.st_uid == uid and stat.S_IMODE(st.st_mode) == 0o600,
            f"first start wrote {name} (owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})",
        )
    check("first start" in first.stdout, "first start explains what to edit", first.stdout)

    synapse_port, bridge_port = free_port(), free_port()
    env = {
        "POLICY_BRIDGE__HOMESERVER__URL": f"http://127.0.0.1:{synapse_port}",
        "POLICY_BRIDGE__HOMESERVER__DOMAIN": "localhost",
        "POLICY_BRIDGE__HOMESERVER__STARTUP_TIMEOUT": "120",
        "POLICY_BRIDGE__APPSERVICE__ADDRESS": f"http://127.0.0.1:{bridge_port}",
        "POLICY_BRIDGE__APPSERVICE__PORT": str(bridge_port),
        # the example's admin is on example.org: a local one instead (no federation here)
        "POLICY_BRIDGE__BRIDGE__PERMISSIONS": '{"@admin:localhost": admin}',
    }
    # 2. check-config passes (and the entrypoint brings the registration up to date)
    cc = image.run(["check-config"], env)
    check(cc.returncode == 0, "check-config passes", cc.stdout + cc.stderr)

    # 3. a test Synapse loading the registration the image wrote
    registration = work / "registration.yaml"
    shutil.copyfile(image.data("registration.yaml"), registration)
    check(
        f"127.0.0.1:{bridge_port}" in registration.read_text("utf-8"),
        "the registration names the bridge's address",
    )
    synapse = SynapseServer(
        work / "synapse", server_name="localhost", port=synapse_port, registrations=[registration]
    )
    synapse.start(timeout=120)
    synapse.register_user("admin")
    log_path = work / "bridge.log"
    try:
        with log_path.open("wb") as log:
            proc = subprocess.Popen(image.argv(None, env), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            status = 0
            while time.monotonic() < deadline and proc.poll() is None:
                status = ready(bridge_port)
                if status == 200:
                    break
                time.sleep(0.25)
            output = log_path.read_text("utf-8", "replace")
            if status != 200:
                output += "\n--- Synapse ---\n" + synapse.log_tail(30)
            check(status == 200, "the bridge reports ready on /_bridge/health/ready", output)
            probe = env | {"BRIDGE_HEALTH_URL": f"http://127.0.0.1:{bridge_port}/_bridge/health"}
            hc = subprocess.run(
                image.exec_argv(image.healthcheck, probe), capture_output=True, text=True
            )
            check(hc.returncode == 0, "the image's HEALTHCHECK passes", hc.stdout + hc.stderr)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        check(
            proc.returncode == 0,
            f"SIGTERM stops the bridge cleanly (exit {proc.returncode})",
            log_path.read_text("utf-8", "replace"),
        )
    finally:
        synapse.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rootfs", type=Path, required=True)
    ap.add_argument("--image", required=True)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="container-smoke-"))
    try:
        smoke(Image.inspect(args.rootfs, args.image), work)
    except (SmokeError, subprocess.SubprocessError, OSError) as e:
        print(f"container smoke test FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
