"""Config reload: re-read, validate, what changed and what needs a restart, apply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bridge.commands import Reply
from bridge.config import Config, load_config
from bridge.pipeline.live_policy import LivePolicy
from bridge.pipeline.reload import ConfigChange, Reloader
from bridge.store import AuditEntry

BASE: dict[str, Any] = {
    "homeserver": {"domain": "corp.example"},
    "appservice": {"as_token": "a" * 32, "hs_token": "h" * 32},
    "gate": {"token": "g" * 32},
}


def _write(path: Path, **sections: Any) -> Path:
    path.write_text(yaml.safe_dump({**BASE, **sections}))
    return path


class Harness:
    def __init__(self, path: Path | None, config: Config) -> None:
        self.config = config
        self.policy = LivePolicy(config, {"dlp": {"global": {}}})
        self.installed: list[Config] = []
        self.audited: list[AuditEntry] = []
        self.rollouts = 0
        self.notices: list[str] = []
        self.reloader = Reloader(
            path,
            config=lambda: self.config,
            policy=lambda: self.policy,
            management_room=lambda: "!m:x",
            install=self.install,
            audit=self.audit,
            rollout=self.rollout,
            notify=self.notify,
        )

    def install(self, config: Config, policy: LivePolicy) -> None:
        self.config, self.policy = config, policy
        self.installed.append(config)

    async def audit(self, entry: AuditEntry) -> None:
        self.audited.append(entry)

    async def rollout(self) -> None:
        self.rollouts += 1

    async def notify(self, reply: Reply) -> None:
        self.notices.append(reply.text)


def test_config_change_names_live_and_restart_sections(tmp_path: Path) -> None:
    old = load_config(_write(tmp_path / "a.yaml"))
    new = load_config(
        _write(
            tmp_path / "b.yaml",
            appservice={**BASE["appservice"], "port": 9999},
            retention={"max_lifetime": "30d"},
        )
    )
    change = ConfigChange.between(old, new)
    assert change.changed == ("retention",) and change.needs_restart == ("appservice",)
    assert change.needs_rollout
    assert change.notes() == [
        "changed: retention",
        "these take effect only after a restart: appservice",
    ]
    same = ConfigChange.between(old, old)
    assert same.notes() == ["changed: nothing"] and not same.needs_rollout


async def test_a_valid_file_is_applied_audited_and_rolled_out(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml")
    h = Harness(path, load_config(path))
    _write(path, retention={"max_lifetime": "30d"})
    ok, notes = await h.reloader.reload("@boss:corp.example")
    assert ok and notes == ["changed: retention"]
    assert len(h.installed) == 1 and h.config is h.installed[0]
    assert h.policy.runtime["dlp"] == {"global": {}}  # runtime rules survive
    assert h.policy.management_room == "!m:x"
    [entry] = h.audited
    assert entry.kind == "config" and entry.sender == "@boss:corp.example"
    assert entry.data["changed"] == ["retention"]
    assert h.rollouts == 1


async def test_an_invalid_file_is_rejected_and_the_old_config_stays(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.yaml")
    h = Harness(path, load_config(path))
    _write(path, executor={"rate_per_second": "fast"})
    ok, problems = await h.reloader.reload("SIGHUP")
    assert not ok and any("executor.rate_per_second" in p for p in problems)
    assert h.installed == [] and h.audited == [] and h.rollouts == 0
    await h.reloader.reload_and_report("SIGHUP")
    [text] = h.notices
    assert text.startswith("⚠️ reload rejected: ")


async def test_without_a_config_file_there_is_nothing_to_reload(tmp_path: Path) -> None:
    h = Harness(None, load_config(_write(tmp_path / "e.yaml")))
    assert await h.reloader.reload("@boss:corp.example") == (
        False,
        ["the bridge was started without a config file"],
    )
