"""``python -m bridge demo``: Ctrl-C while it starts stops what was started, removes its
directory and exits 130 without a traceback."""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bridge.dev import demo


class FakeSynapse:
    def __init__(self) -> None:
        self.port = 0
        self.stopped = False

    def start(self) -> None:
        raise KeyboardInterrupt  # the user pressed Ctrl-C while Synapse was starting

    def stop(self) -> None:
        self.stopped = True


class FakeBridge:
    def __init__(self, *_args: Any) -> None:
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


def test_ctrl_c_while_starting_cleans_up_and_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "demo"
    workdir.mkdir()
    synapse = FakeSynapse()
    bridges: list[FakeBridge] = []

    def fake_bridge(*args: Any) -> FakeBridge:
        bridges.append(FakeBridge(*args))
        return bridges[-1]

    monkeypatch.setattr(demo.tempfile, "mkdtemp", lambda prefix: str(workdir))
    monkeypatch.setattr(
        demo,
        "prepare_stack",
        lambda *_a, **_k: SimpleNamespace(
            synapse=synapse, config_path=workdir / "config.yaml", bridge_port=1
        ),
    )
    monkeypatch.setattr(demo, "BridgeProcess", fake_bridge)
    previous = signal.getsignal(signal.SIGINT)
    try:
        assert demo.run_demo() == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert synapse.stopped and bridges[0].stopped
    assert not workdir.exists()
    out = capsys.readouterr().out
    assert "Interrupted while starting." in out and "Stopping" in out
