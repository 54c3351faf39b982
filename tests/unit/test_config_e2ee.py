"""The ``e2ee`` section: off by default, each value checked with its key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError
from tests.kit.config import make_config


def test_off_by_default_with_documented_defaults(tmp_path: Path) -> None:
    e2ee = make_config({}, base_dir=tmp_path).e2ee
    assert e2ee.enabled is False
    assert e2ee.key_wait_s == 3 and e2ee.retry_interval_s == 30 and e2ee.max_pending == 5000
    assert e2ee.notice == "" and e2ee.device_name


def test_values_are_read_and_bad_ones_named(tmp_path: Path) -> None:
    cfg = make_config(
        {"e2ee": {"enabled": True, "notice": "Archived by {bot}", "max_pending": 10}},
        base_dir=tmp_path,
    )
    assert cfg.e2ee.enabled and cfg.e2ee.notice == "Archived by {bot}"
    assert cfg.e2ee.max_pending == 10
    with pytest.raises(ConfigError) as err:
        make_config(
            {"e2ee": {"enabled": "yes", "key_wait_seconds": 600, "max_pending": 0}},
            base_dir=tmp_path,
        )
    text = str(err.value)
    for key in ("e2ee.enabled", "e2ee.key_wait_seconds", "e2ee.max_pending"):
        assert key in text
