"""Generate the appservice registration file and matching tokens."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any, TextIO

from ruamel.yaml import YAML

from bridge.config import Config, load_config, update_config_file, write_private


def new_token() -> str:
    """A fresh random token (256 bits)."""
    return secrets.token_urlsafe(32)


def registration_dict(config: Config, as_token: str, hs_token: str) -> dict[str, Any]:
    """The registration Synapse loads via ``app_service_config_files``."""
    domain = re.escape(config.homeserver.domain)
    bot = re.escape(config.appservice.bot_localpart)
    return {
        "id": config.appservice.id,
        "url": config.appservice.address,
        "as_token": as_token,
        "hs_token": hs_token,
        "sender_localpart": config.appservice.bot_localpart,
        "rate_limited": False,
        "namespaces": {
            "users": [{"exclusive": True, "regex": f"@{bot}:{domain}"}],
            "aliases": [],
            # Non-exclusive "every room": the bridge sees every event on the server.
            "rooms": [{"exclusive": False, "regex": "!.*"}],
        },
        "receive_ephemeral": False,
        # e2ee: to-device messages (MSC2409) and device lists / one-time-key counts (MSC3202)
        # for the bot's device, pushed in transactions (docs/e2ee.md)
        **(
            {"de.sorunome.msc2409.push_ephemeral": True, "org.matrix.msc3202": True}
            if config.e2ee.enabled
            else {}
        ),
    }


def generate_registration(config_path: Path, registration_path: Path) -> dict[str, Any]:
    """Write a registration with fresh tokens and store the same tokens in the config.

    The config keeps its comments. Both files are written with mode 0600.
    """
    as_token, hs_token, gate_token = new_token(), new_token(), new_token()
    if not config_path.exists():
        from bridge.config import default_config_text

        write_private(config_path, lambda fh: fh.write(default_config_text()))
    update_config_file(
        config_path,
        {
            "appservice": {"as_token": as_token, "hs_token": hs_token},
            "gate": {"token": gate_token},
        },
    )
    config = load_config(config_path)
    reg = registration_dict(config, as_token, hs_token)
    y = YAML()
    y.default_flow_style = False

    def write(fh: TextIO) -> None:
        fh.write("# Appservice registration for the policy bridge. Generated; keep it secret.\n")
        y.dump(reg, fh)

    write_private(registration_path, write)
    return reg
