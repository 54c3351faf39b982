"""Configuration: defaults, validation messages, secrets, env overrides, round trips."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bridge.config import ConfigError, build_config, default_config_text, load_config
from bridge.registration import generate_registration

GOOD = {
    "homeserver": {"domain": "corp.example"},
    "appservice": {"as_token": "as-secret-1", "hs_token": "hs-secret-1"},
    "gate": {"token": "gate-secret-1"},
}


def problems(data: dict, env: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        build_config(data, base_dir=Path("/tmp"), env=env or {})
    return exc.value.problems


def test_defaults_come_from_the_example_file() -> None:
    cfg = build_config(GOOD, base_dir=Path("/srv/bridge"), env={})
    assert cfg.homeserver.url == "http://127.0.0.1:8008"
    assert cfg.bridge.command_prefix == "!policy"
    assert cfg.bot_mxid == "@policybot:corp.example"
    assert cfg.database.url == "sqlite+aiosqlite:////srv/bridge/data/bridge.db"
    assert cfg.database.backend == "sqlite"


def test_placeholder_tokens_are_refused() -> None:
    found = problems({"homeserver": {"domain": "x.example"}})
    assert any("appservice.as_token" in p and "placeholder" in p for p in found)
    assert any("gate.token" in p for p in found)


def test_bad_values_name_key_value_and_expectation() -> None:
    data = {**GOOD, "appservice": {**GOOD["appservice"], "port": "eighty"}}
    data["logging"] = {"format": "xml"}
    data["homeserver"] = {"domain": "x", "url": "ftp://hs"}
    found = problems(data)
    assert "appservice.port: got 'eighty', expected an integer from 1 to 65535" in found
    assert any(p.startswith("logging.format: got 'xml'") and "text, json" in p for p in found)
    assert any(p.startswith("homeserver.url") and "http://" in p for p in found)


def test_unknown_keys_are_reported_as_typos() -> None:
    found = problems({**GOOD, "homeservr": {"url": "http://x"}})
    assert found == ["homeservr: unknown option (typo?); see config.example.yaml"]


def test_tokens_are_not_echoed_in_errors() -> None:
    data = {**GOOD, "appservice": {"as_token": 12345678, "hs_token": "h"}}
    found = problems(data)
    assert any("appservice.as_token: got <secret>" in p for p in found)
    assert not any("12345678" in p for p in found)


def test_permissions_validation() -> None:
    data = {**GOOD, "bridge": {"permissions": {"admin": "admin", "@a:b": "root", "@x*:b": "admin"}}}
    found = problems(data)
    assert any("bridge.permissions.admin" in p for p in found)
    assert any("bridge.permissions.@a:b: got 'root'" in p for p in found)
    assert any("wildcards only" in p for p in found)


def test_role_lookup_prefers_exact_then_domain_then_star() -> None:
    data = {
        **GOOD,
        "bridge": {
            "permissions": {
                "@boss:corp.example": "admin",
                "@*:corp.example": "auditor",
                "*": "auditor",
            }
        },
    }
    cfg = build_config(data, env={})
    assert cfg.role_of("@boss:corp.example") == "admin"
    assert cfg.role_of("@joe:corp.example") == "auditor"
    assert cfg.role_of("@eve:evil.example") == "auditor"
    cfg2 = build_config(GOOD, env={})
    assert cfg2.role_of("@eve:evil.example") is None


def test_secrets_from_env_and_file(tmp_path: Path) -> None:
    (tmp_path / "hs").write_text("hs-from-file\n")
    data = {
        **GOOD,
        "appservice": {"as_token": "env:AS_TOK", "hs_token": "file:hs"},
    }
    cfg = build_config(data, base_dir=tmp_path, env={"AS_TOK": "as-from-env"})
    assert cfg.appservice.as_token == "as-from-env"
    assert cfg.appservice.hs_token == "hs-from-file"
    found = problems({**GOOD, "appservice": {"as_token": "env:NOPE", "hs_token": "file:/nope"}})
    assert any("environment variable NOPE is not set" in p for p in found)
    assert any("cannot read secret file /nope" in p for p in found)


def test_env_overrides_any_key() -> None:
    env = {
        "POLICY_BRIDGE__DATABASE__URL": "postgresql+asyncpg://u@db/bridge",
        "POLICY_BRIDGE__APPSERVICE__PORT": "29999",
    }
    cfg = build_config(GOOD, env=env)
    assert cfg.database.backend == "postgresql"
    assert cfg.appservice.port == 29999
    found = problems(GOOD, env={"POLICY_BRIDGE__NOPE__X": "1"})
    assert any("nope" in p and "environment" in p for p in found)


def test_broken_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("homeserver: [unclosed\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    assert str(path) in str(exc.value)
    assert "not valid YAML" in str(exc.value)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml", env={})


def test_generate_registration_round_trip_keeps_comments(tmp_path: Path) -> None:
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(
        default_config_text().replace("domain: example.org", "domain: corp.example")
    )
    reg_path = tmp_path / "registration.yaml"
    reg = generate_registration(cfg_path, reg_path)
    text = cfg_path.read_text()
    assert "# Tokens shared with Synapse" in text  # comments survive
    cfg = load_config(cfg_path, env={})
    assert cfg.appservice.as_token == reg["as_token"]
    assert cfg.appservice.hs_token == reg["hs_token"]
    assert len({reg["as_token"], reg["hs_token"], cfg.gate.token}) == 3
    assert reg["rate_limited"] is False
    assert reg["namespaces"]["rooms"] == [{"exclusive": False, "regex": "!.*"}]
    assert reg["namespaces"]["users"][0]["regex"] == r"@policybot:corp\.example"
    for p in (cfg_path, reg_path):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    # A second run rotates the tokens.
    reg2 = generate_registration(cfg_path, reg_path)
    assert reg2["as_token"] != reg["as_token"]
