"""Config factory for tests: valid, distinct tokens and a domain, with overrides merged in."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bridge.config import Config, build_config

DOMAIN = "corp.example"
AS_TOKEN = "as-test-token-0123456789abcdefghijklmnop"
HS_TOKEN = "hs-test-token-0123456789abcdefghijklmnop"
GATE_TOKEN = "gate-test-token-0123456789abcdefghijklm"

BASE: Mapping[str, Any] = {
    "homeserver": {"domain": DOMAIN},
    "appservice": {"as_token": AS_TOKEN, "hs_token": HS_TOKEN},
    "gate": {"token": GATE_TOKEN},
}


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, mappings merged key by key, other values replaced."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def config_data(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The raw config mapping a test config is built from (for tests that write a file)."""
    return merged(BASE, overrides or {})


def make_config(
    overrides: Mapping[str, Any] | None = None, *, base_dir: Path | None = None
) -> Config:
    """A validated config: the defaults, test tokens, ``corp.example``, then ``overrides``."""
    return build_config(config_data(overrides), base_dir=base_dir, env={})
