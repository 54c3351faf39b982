"""The Synapse module's configuration: defaults, and a clear error naming the key for each
kind of mistake (unknown keys, bad base_url, missing token, bad fail modes and limits)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from policy_bridge_synapse.config import (
    DEFAULT_CALLBACKS,
    Callback,
    MediaDelivery,
    MediaKind,
    ModuleConfigError,
    media_kind,
    parse_module_config,
    parse_version,
    unsupported,
)
from policy_bridge_synapse.module import PolicyBridgeModule
from synapse.module_api.errors import ConfigError

BASE = {"base_url": "http://bridge:29330/_bridge/antispam/", "authorization": "tok-123"}


def parse(**extra: Any) -> Any:
    return parse_module_config({**BASE, **extra})


def error(**extra: Any) -> ModuleConfigError:
    with pytest.raises(ModuleConfigError) as e:
        parse_module_config({**BASE, **extra})
    return e.value


def test_defaults() -> None:
    config = parse()
    assert config.base_url == "http://bridge:29330/_bridge/antispam"
    assert config.url("user_may_invite") == "http://bridge:29330/_bridge/antispam/user_may_invite"
    assert config.token == "tok-123"
    assert config.callbacks == DEFAULT_CALLBACKS
    assert Callback.USER_MAY_CREATE_ROOM in config.callbacks
    assert Callback.CHECK_MEDIA_FILE_FOR_SPAM in config.callbacks
    assert config.fails_open(Callback.CHECK_EVENT_FOR_SPAM)
    assert not config.fails_open(Callback.USER_MAY_CREATE_ROOM)
    assert not config.fails_open(Callback.CHECK_MEDIA_FILE_FOR_SPAM)
    assert config.timeout == 10 and config.media_timeout == 60
    assert config.media_max_bytes == 50 * 1024 * 1024
    assert config.media_kinds == {MediaKind.UPLOAD, MediaKind.REMOTE}
    assert config.media_delivery is MediaDelivery.BODY


def test_options() -> None:
    config = parse(
        enabled_callbacks=["check_event_for_spam", "user_may_send_state_event"],
        fail_open={"check_event_for_spam": False, "user_may_send_state_event": True},
        timeout=2.5,
        media_timeout=120,
        media_max_bytes=1024,
        media_kinds=["upload", "thumbnail", "url_preview"],
        media_delivery="path",
        do_ping=True,
    )
    assert config.callbacks == (
        Callback.CHECK_EVENT_FOR_SPAM,
        Callback.USER_MAY_SEND_STATE_EVENT,
    )
    assert config.fail_open == {Callback.USER_MAY_SEND_STATE_EVENT}
    assert (config.timeout, config.media_timeout, config.media_max_bytes) == (2.5, 120, 1024)
    assert MediaKind.REMOTE not in config.media_kinds
    assert config.media_delivery is MediaDelivery.PATH
    assert config.do_ping


def test_token_from_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("file-token\n")
    config = parse_module_config(
        {"base_url": "https://gate.example", "authorization_path": str(path)}
    )
    assert config.token == "file-token"
    missing = tmp_path / "absent"
    with pytest.raises(ModuleConfigError) as e:
        parse_module_config(
            {"base_url": "https://gate.example", "authorization_path": str(missing)}
        )
    assert e.value.path == ("authorization_path",)
    assert "cannot read the token file" in e.value.message


@pytest.mark.parametrize(
    ("extra", "path", "words"),
    [
        ({"bogus": 1, "fail_closed": {}}, ("bogus",), "unknown option(s) bogus, fail_closed"),
        ({"base_url": "bridge:29330"}, ("base_url",), "not an http(s) URL"),
        ({"base_url": "ftp://bridge/x"}, ("base_url",), "not an http(s) URL"),
        ({"base_url": ""}, ("base_url",), "expected the URL"),
        ({"base_url": "http://u:p@bridge/x"}, ("base_url",), "credentials"),
        ({"base_url": "http://bridge/x?a=1"}, ("base_url",), "query"),
        ({"base_url": "http://bridge:99999/x"}, ("base_url",), "invalid port"),
        ({"authorization": ""}, ("authorization",), "empty"),
        ({"authorization": "a b"}, ("authorization",), "spaces"),
        ({"authorization": 5}, ("authorization",), "string"),
        ({"authorization_path": "/x"}, ("authorization",), "not both"),
        (
            {"enabled_callbacks": ["check_event_for_spam", "nope"]},
            ("enabled_callbacks", "1"),
            "unknown callback 'nope'",
        ),
        ({"enabled_callbacks": []}, ("enabled_callbacks",), "non-empty list"),
        ({"fail_open": {"nope": True}}, ("fail_open", "nope"), "unknown callback"),
        (
            {"fail_open": {"user_may_invite": "yes"}},
            ("fail_open", "user_may_invite"),
            "true or false",
        ),
        ({"fail_open": ["user_may_invite"]}, ("fail_open",), "mapping"),
        (
            {"enabled_callbacks": ["user_may_invite"], "fail_open": {"user_may_join_room": True}},
            ("fail_open", "user_may_join_room"),
            "not in enabled_callbacks",
        ),
        ({"timeout": 0}, ("timeout",), "more than 0"),
        ({"timeout": "5s"}, ("timeout",), "number of seconds"),
        ({"media_timeout": 10_000}, ("media_timeout",), "at most 600"),
        ({"media_max_bytes": -1}, ("media_max_bytes",), "positive"),
        ({"media_max_bytes": True}, ("media_max_bytes",), "positive"),
        ({"media_kinds": ["pdf"]}, ("media_kinds", "0"), "unknown media kind 'pdf'"),
        ({"do_ping": "yes"}, ("do_ping",), "true or false"),
        ({"media_delivery": "file"}, ("media_delivery",), "one of body, path"),
    ],
)
def test_errors_name_the_key(extra: dict[str, Any], path: tuple[str, ...], words: str) -> None:
    e = error(**extra)
    assert e.path == path
    assert words in e.message


def test_missing_token_and_not_a_mapping() -> None:
    with pytest.raises(ModuleConfigError) as e:
        parse_module_config({"base_url": "http://bridge/x"})
    assert e.value.path == ("authorization",)
    assert "missing token" in e.value.message
    with pytest.raises(ModuleConfigError):
        parse_module_config(["base_url"])


def test_synapse_parse_config_raises_synapse_config_error() -> None:
    """Synapse prints a ConfigError with its path when it loads homeserver.yaml."""
    with pytest.raises(ConfigError) as e:
        PolicyBridgeModule.parse_config({"base_url": "http://bridge/x"})
    assert e.value.path == ("authorization",)
    assert "missing token" in e.value.msg
    assert PolicyBridgeModule.parse_config(BASE).token == "tok-123"


def test_media_kind() -> None:
    assert media_kind(thumbnail=True, url_cache=True, remote=True) is MediaKind.THUMBNAIL
    assert media_kind(thumbnail=False, url_cache=True, remote=True) is MediaKind.URL_PREVIEW
    assert media_kind(thumbnail=False, url_cache=False, remote=True) is MediaKind.REMOTE
    assert media_kind(thumbnail=False, url_cache=False, remote=False) is MediaKind.UPLOAD


def test_versions_and_support() -> None:
    assert parse_version("1.163.2") == (1, 163)
    assert parse_version("1.132.0rc1") == (1, 132)
    assert parse_version("garbage") == (0, 0)
    everything = [c.value for c in Callback if c is not Callback.ACCEPT_MAKE_JOIN]
    assert unsupported(DEFAULT_CALLBACKS, everything, "1.163.2") == []
    old = unsupported(DEFAULT_CALLBACKS, everything, "1.131.0")
    assert len(old) == 2
    assert old[0].startswith("user_may_create_room: this Synapse (1.131.0) does not pass")
    missing = unsupported((Callback.ACCEPT_MAKE_JOIN,), everything, "1.163.2")
    assert missing == ["accept_make_join: this Synapse (1.163.2) has no such spam-checker callback"]
