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
    "appservice": {
        "as_token": "as-secret-1-xxxxxxxxxxxxxxxxxxxx",
        "hs_token": "hs-secret-1-xxxxxxxxxxxxxxxxxxxx",
    },
    "gate": {"token": "gate-secret-1-xxxxxxxxxxxxxxxxxx"},
}

AS_FROM_ENV = "as-from-env-" + "e" * 24
HS_FROM_FILE = "hs-from-file-" + "f" * 24


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
    data = {
        **GOOD,
        "appservice": {"as_token": 12345678, "hs_token": "h-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"},
    }
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
    (tmp_path / "hs").write_text(HS_FROM_FILE + "\n")
    data = {
        **GOOD,
        "appservice": {"as_token": "env:AS_TOK", "hs_token": "file:hs"},
    }
    cfg = build_config(data, base_dir=tmp_path, env={"AS_TOK": AS_FROM_ENV})
    assert cfg.appservice.as_token == AS_FROM_ENV
    assert cfg.appservice.hs_token == HS_FROM_FILE
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


# -- tokens: checked after env:/file: resolution ------------------------------------------

LONG = "k" * 32


def tokens(as_token: str = "a" * 32, hs_token: str = "h" * 32, gate: str = "g" * 32) -> dict:
    return {
        "homeserver": {"domain": "corp.example"},
        "appservice": {"as_token": as_token, "hs_token": hs_token},
        "gate": {"token": gate},
    }


@pytest.mark.parametrize(
    "placeholder",
    [
        "CHANGE_ME_AS_TOKEN",  # the example config's
        "change_me_as_token_0123456789abcdefghij",
        "changeme-0123456789abcdefghijklmnopqrstuv",
        "Change-Me-Please-0123456789abcdefghijklmno",
        "REPLACE-ME-0123456789abcdefghijklmnopqrstu",
        "replace me with a random token of 32 chars",
        "<placeholder: a random token of 32 characters>",
    ],
)
def test_placeholders_are_refused_in_any_letter_case(placeholder: str, tmp_path: Path) -> None:
    found = problems(tokens(as_token=placeholder))
    assert any(p.startswith("appservice.as_token: still a placeholder") for p in found), found
    # the same after env: and file: resolution
    (tmp_path / "gate").write_text(placeholder.lower() + "\n")
    with pytest.raises(ConfigError) as exc:
        build_config(
            tokens(hs_token="env:HS", gate="file:gate"),
            base_dir=tmp_path,
            env={"HS": placeholder.upper()},
        )
    found = exc.value.problems
    assert any(p.startswith("appservice.hs_token: still a placeholder") for p in found), found
    assert any(p.startswith("gate.token: still a placeholder") for p in found), found
    assert not any(placeholder.lower() in p.lower() for p in found)  # not echoed


def test_every_placeholder_of_the_example_config_is_refused() -> None:
    found = problems({"homeserver": {"domain": "corp.example"}})
    for key in ("appservice.as_token", "appservice.hs_token", "gate.token"):
        assert any(p.startswith(f"{key}: still a placeholder") for p in found), (key, found)


def test_empty_tokens_are_refused_also_after_resolution(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ConfigError) as exc:
        build_config(
            tokens(as_token="env:AS", hs_token="file:empty", gate=""),
            base_dir=tmp_path,
            env={"AS": "   "},
        )
    found = exc.value.problems
    assert "appservice.as_token: env:AS is empty, expected a secret" in found
    assert "appservice.hs_token: file:empty is empty, expected a secret" in found
    assert any(p.startswith("gate.token: got <secret>, expected a non-empty") for p in found)


def test_tokens_must_have_at_least_32_characters(tmp_path: Path) -> None:
    found = problems(tokens(gate="g" * 31))
    assert found == [
        "gate.token: too short (31 characters), expected at least 32 random characters; "
        "`python -m bridge generate-registration` writes fresh tokens (or: openssl rand -hex 32)"
    ]
    found = problems(tokens(as_token="env:AS"), env={"AS": "short"})
    assert any(p.startswith("appservice.as_token: too short (5 characters)") for p in found)
    build_config(tokens(gate="g" * 32), env={})  # 32 is enough


def test_the_tokens_must_all_differ() -> None:
    assert problems(tokens(as_token=LONG, hs_token=LONG)) == [
        "appservice.as_token and appservice.hs_token must differ: each token is a separate secret"
    ]
    assert problems(tokens(hs_token=LONG, gate=LONG)) == [
        "appservice.hs_token and gate.token must differ: each token is a separate secret"
    ]
    assert problems(tokens(as_token="env:T", gate=LONG), env={"T": LONG}) == [
        "appservice.as_token and gate.token must differ: each token is a separate secret"
    ]
    found = problems({**tokens(), "metrics": {"token": "g" * 32}})
    assert found == ["gate.token and metrics.token must differ: each token is a separate secret"]


def test_admin_token_and_metrics_token_refuse_placeholders() -> None:
    data = {
        **tokens(),
        "homeserver": {"domain": "corp.example", "admin_token": "CHANGE_ME"},
        "metrics": {"token": "changeme"},
    }
    found = problems(data)
    assert any(p.startswith("homeserver.admin_token: still a placeholder") for p in found)
    assert any(p.startswith("metrics.token: still a placeholder") for p in found)
    assert problems({**tokens(), "metrics": {"token": "m" * 10}})[0].startswith(
        "metrics.token: too short (10 characters)"
    )


def test_generated_tokens_are_valid(tmp_path: Path) -> None:
    from bridge.registration import new_token

    for _ in range(50):
        build_config(tokens(new_token(), new_token(), new_token()), env={})


# -- metrics ----------------------------------------------------------------------------------


def test_metrics_defaults_to_open_on_the_appservice_listener() -> None:
    cfg = build_config(tokens(), env={})
    assert cfg.metrics.token == ""
    assert cfg.metrics.listen is None


def test_metrics_token_and_listen() -> None:
    cfg = build_config(
        {**tokens(), "metrics": {"token": "env:M", "listen": "127.0.0.1:9102"}},
        env={"M": "m" * 40},
    )
    assert cfg.metrics.token == "m" * 40
    assert cfg.metrics.listen == ("127.0.0.1", 9102)
    cfg = build_config({**tokens(), "metrics": {"listen": "[::1]:9102"}}, env={})
    assert cfg.metrics.listen == ("::1", 9102)
    for bad in ("9102", "localhost", "host:port", ":9102", "127.0.0.1:70000"):
        assert problems({**tokens(), "metrics": {"listen": bad}}) == [
            f"metrics.listen: got {bad!r}, expected host:port such as 127.0.0.1:9102, or empty"
        ]


# -- federation and retention sections: typed ---------------------------------------------


def test_federation_and_retention_are_typed_with_the_example_defaults() -> None:
    cfg = build_config(tokens(), env={})
    assert cfg.federation.rollout_rate == 10.0
    assert cfg.federation.kick_excluded_members is True
    assert cfg.federation.scopes == {
        "global": {"mode": "open", "servers": [], "allow_ip_literals": False}
    }
    assert cfg.retention.sweep_interval_s == 60.0
    assert (
        cfg.retention.sweep_batch,
        cfg.retention.sweep_max_events,
        cfg.retention.sweep_max_pending,
    ) == (200, 2000, 5000)
    assert cfg.retention.scopes == {"global": {"max_lifetime": "", "min_lifetime": ""}}


def test_federation_and_retention_scopes() -> None:
    cfg = build_config({**tokens(), **CUSTOM}, env={})
    assert cfg.federation.rollout_rate == 5.0
    assert cfg.federation.kick_excluded_members is False
    assert cfg.federation.scopes["!space:corp.example"] == {"mode": "internal"}
    assert cfg.federation.scopes["global"]["servers"] == ["partner.example", "*.ally.example"]
    assert cfg.retention.scopes["!room:corp.example"] == {"max_lifetime": "off"}
    assert cfg.retention.sweep_interval_s == 300.0
    assert cfg.retention.sweep_batch == 50


def test_federation_and_retention_errors_name_the_key() -> None:
    found = problems(
        {
            **tokens(),
            "federation": {"rollout_rate": 0, "kick_excluded_members": "yes", "mode": "some"},
            "retention": {"sweep_interval": "soon", "sweep_batch": 0},
        }
    )
    assert (
        "federation.rollout_rate: got 0, expected a number of rooms per second, 0 < n <= 1000"
        in found
    )
    assert any(p.startswith("federation: global: unknown federation mode 'some'") for p in found)
    assert "federation.kick_excluded_members: got 'yes', expected true or false" in found
    assert any(
        p.startswith("retention.sweep_interval: got 'soon', expected a duration") for p in found
    )
    assert "retention.sweep_batch: got 0, expected an integer from 1 to 10000" in found
    found = problems({**tokens(), "retention": {"rooms": {"!r:x": {"max_lifetime": "soon"}}}})
    assert any(p.startswith("retention: !r:x: ") for p in found), found


CUSTOM = {
    "federation": {
        "mode": "allowlist",
        "servers": ["partner.example", "*.ally.example"],
        "rollout_rate": 5,
        "kick_excluded_members": False,
        "spaces": {"!space:corp.example": {"mode": "internal"}},
        "rooms": {"!room:corp.example": {"mode": "open"}},
    },
    "retention": {
        "max_lifetime": "30d",
        "min_lifetime": "1d",
        "sweep_interval": "5m",
        "sweep_batch": 50,
        "rooms": {"!room:corp.example": {"max_lifetime": "off"}},
        "spaces": {"!space:corp.example": {"max_lifetime": 86400000}},
    },
}


def test_the_rollout_fingerprint_of_an_unchanged_config_is_unchanged() -> None:
    """The digests the bridge stored before the sections were typed (computed on the raw
    dicts): an upgrade must not mistake an unchanged config for a policy change."""
    from bridge.pipeline.rollout import policy_fingerprint as rollout_fingerprint

    cfg = build_config(tokens(), env={})
    assert (
        rollout_fingerprint(cfg, {})
        == "afdf77844558df01ac009dfb243e3cc5653ea700a6f65f3f63722747dba95794"
    )
    cfg = build_config({**tokens(), **CUSTOM}, env={})
    runtime = {
        "federation": {"global": {"mode": "denylist", "servers": ["evil.example"]}},
        "retention": {"!room:corp.example": {"max_lifetime": "7d"}},
        "dlp": {"ignored": True},
    }
    assert (
        rollout_fingerprint(cfg, runtime)
        == "3979f86fca56d807b0e6442082cfc5ff9db10d32b9e1c5f99a4d8fe242bb3906"
    )
    assert cfg.federation.to_doc() == CUSTOM["federation"] | {"allow_ip_literals": False}
    changed = build_config(
        {**tokens(), **CUSTOM, "federation": {**CUSTOM["federation"], "rollout_rate": 6}}, env={}
    )
    assert rollout_fingerprint(changed, runtime) != rollout_fingerprint(cfg, runtime)


def test_config_writes_are_0600_from_the_start_and_never_follow_a_symlink(
    tmp_path: Path,
) -> None:
    from bridge.config import update_config_file

    target = tmp_path / "elsewhere.yaml"
    target.write_text("untouched: true\n")
    cfg_path = tmp_path / "config.yaml"
    cfg_path.symlink_to(target)
    old = os.umask(0)
    try:
        update_config_file(cfg_path, {"gate": {"token": "g" * 32}})
    finally:
        os.umask(old)
    assert target.read_text() == "untouched: true\n"
    assert not cfg_path.is_symlink()
    assert stat.S_IMODE(os.stat(cfg_path).st_mode) == 0o600
    assert "g" * 32 in cfg_path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "elsewhere.yaml"]


def test_audit_checkpoint_interval_defaults_to_a_minute_and_is_validated() -> None:
    from tests.kit.config import make_config

    assert make_config().audit.checkpoint_interval_s == 60.0  # type: ignore[union-attr]
    two = make_config({"audit": {"checkpoint_interval": "2s"}})
    assert two.audit.checkpoint_interval_s == 2.0  # type: ignore[union-attr]
    assert make_config({"audit": {"checkpoint_interval": "5m"}}).audit.checkpoint_interval_s == 300  # type: ignore[union-attr]
    for bad in ("soon", "0s", "-5s"):
        with pytest.raises(ConfigError, match=r"audit\.checkpoint_interval"):
            make_config({"audit": {"checkpoint_interval": bad}})
